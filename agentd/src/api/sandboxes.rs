//! `/v1/sandboxes`: create, list, inspect, stop, delete, exec (streamed), logs (with follow)
//! and stats. Files and the OpenCode proxy have their own modules.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use bytes::Bytes;
use hyper::body::Frame;
use hyper::{Response, StatusCode};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::routes::{Id, Params, Query};
use super::types::{
    EgressRequest, EgressView, ExecLine, ExecRequest, FilesQuery, ListQuery, LogStream, LogsQuery,
    SandboxList, SandboxView, Stats,
};
use super::{json, read_json, Body, BoxError, Req};
use crate::exec::{Stream, Utf8Chunker};
use crate::sandbox::{ActiveGuard, CreateSandbox, Manager, Sandbox, SandboxState};

/// The last line of a stream that ends because agentd is stopping.
pub const STOPPING: &str = "agentd is stopping: this stream ends here (sandboxes keep running; reconnect once agentd is back)";

/// Longest exec timeout.
pub const MAX_EXEC_TIMEOUT_SECS: u64 = 24 * 3600;

/// A handler's answer.
type Reply = Result<Response<Body>, ApiError>;

/// The sandbox a request names. Any request to it counts as activity for its idle timeout,
/// except reading its status (a dashboard polling it must not keep it alive).
fn named(mgr: &Manager, id: &str, touch: bool) -> Result<Arc<Sandbox>, ApiError> {
    let sb = mgr.get(id)?;
    if touch {
        sb.touch();
    }
    Ok(sb)
}

/// The sandbox a request is about to use: touched, and resumed if it was paused; `opencode`:
/// the request goes to OpenCode, which is woken if it was hibernated.
async fn used(mgr: &Manager, id: &str, opencode: bool) -> Result<Arc<Sandbox>, ApiError> {
    let sb = named(mgr, id, true)?;
    mgr.wake(&sb, opencode).await?;
    Ok(sb)
}

/// `POST /v1/sandboxes/{id}/fork`.
pub(crate) async fn fork_route(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Id>,
    req: Req,
) -> Reply {
    let sb = used(&mgr, &p.id, false).await?;
    let body: super::types::ForkRequest = super::read_json(req).await?;
    let f = mgr.fork(&sb, body.count.unwrap_or(1)).await?;
    Ok(json(
        StatusCode::CREATED,
        &super::types::ForkView {
            sandboxes: f.sandboxes.iter().map(SandboxView::from).collect(),
            files: f.files,
            bytes: f.bytes,
            copy_ms: f.copy.as_secs_f64() * 1000.0,
            total_ms: f.total.as_secs_f64() * 1000.0,
        },
    ))
}

/// `GET /v1/sandboxes/{id}/llm`.
pub(crate) async fn llm_route(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    let sb = named(&mgr, &p.id, false)?;
    let rec = sb.snapshot();
    Ok(json(
        StatusCode::OK,
        &super::types::LlmLog {
            usage: rec.usage,
            budget_tokens: rec.budget_tokens,
            budget_cost: rec.budget_cost,
            currency: mgr.config.llm_currency.clone(),
            requests: sb.llm_log.entries(),
        },
    ))
}

/// `POST /v1/sandboxes/{id}/snapshot`.
pub(crate) async fn snapshot_route(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Id>,
    req: Req,
) -> Reply {
    let sb = named(&mgr, &p.id, true)?;
    let body: super::types::SnapshotRequest = super::read_json(req).await?;
    let s = mgr.snapshot(&sb, &body.name).await?;
    Ok(json(
        StatusCode::CREATED,
        &super::types::SnapshotView {
            image: (&s.image).into(),
            layers_added: s.layers,
            files: s.files,
            bytes: s.bytes,
            frozen_ms: s.frozen.as_secs_f64() * 1000.0,
            total_ms: s.total.as_secs_f64() * 1000.0,
        },
    ))
}

/// `POST /v1/sandboxes/{id}/pause`.
pub(crate) async fn pause_route(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    let sb = named(&mgr, &p.id, false)?;
    let took = mgr.pause(&sb).await?;
    Ok(paused(&sb, Some(took), None))
}

/// `POST /v1/sandboxes/{id}/hibernate`.
pub(crate) async fn hibernate_route(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Id>,
) -> Reply {
    let sb = named(&mgr, &p.id, false)?;
    let h = mgr.hibernate(&sb).await?;
    Ok(json(
        StatusCode::OK,
        &super::types::Hibernated {
            sandbox: SandboxView::from(&sb.snapshot()),
            stop_ms: h.stop.as_secs_f64() * 1000.0,
            freezer_ms: h.freezer.as_secs_f64() * 1000.0,
        },
    ))
}

/// `POST /v1/sandboxes/{id}/resume`.
pub(crate) async fn resume_route(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    let sb = named(&mgr, &p.id, true)?;
    let r = mgr.resume(&sb).await?;
    Ok(paused(
        &sb,
        r.map(|r| r.freezer),
        r.and_then(|r| r.opencode),
    ))
}

/// The answer of a pause or resume: the sandbox now, the freezer's time (0: nothing done) and
/// a woken OpenCode's.
fn paused(
    sb: &Sandbox,
    took: Option<std::time::Duration>,
    opencode: Option<std::time::Duration>,
) -> Response<Body> {
    json(
        StatusCode::OK,
        &super::types::Paused {
            sandbox: SandboxView::from(&sb.snapshot()),
            freezer_ms: took.map_or(0.0, |t| t.as_secs_f64() * 1000.0),
            opencode_ms: opencode.map(|t| t.as_secs_f64() * 1000.0),
        },
    )
}

/// `GET /v1/sandboxes[?label=key=value]`.
pub(crate) async fn list(State(mgr): State<Arc<Manager>>, Query(q): Query<ListQuery>) -> Reply {
    let label = q.label;
    let sandboxes = mgr
        .list()
        .iter()
        .map(|s| s.snapshot())
        // Pooled sandboxes are nobody's until claimed (GET /v1/pools counts them).
        .filter(|r| r.pool.is_none())
        .filter(|r| match &label {
            None => true,
            Some(l) => {
                let (k, v) = l.split_once('=').unwrap_or((l, ""));
                r.labels.get(k).is_some_and(|x| v.is_empty() || x == v)
            }
        })
        .map(|r| SandboxView::from(&r))
        .collect();
    Ok(json(StatusCode::OK, &SandboxList { sandboxes }))
}

/// `POST /v1/sandboxes`.
pub(crate) async fn create(State(mgr): State<Arc<Manager>>, req: Req) -> Reply {
    let body: CreateSandbox = read_json(req).await?;
    // In a task of its own: hyper drops this future when the client goes away, and a
    // create stopped half-way would leave a sandbox nobody supervises.
    let rec = tokio::spawn(async move { mgr.create(body).await })
        .await
        .map_err(ApiError::internal)??;
    Ok(json(StatusCode::CREATED, &SandboxView::from(&rec)))
}

/// `GET /v1/sandboxes/{id}`.
pub(crate) async fn inspect(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    let sb = named(&mgr, &p.id, false)?;
    Ok(json(StatusCode::OK, &SandboxView::from(&sb.snapshot())))
}

/// `GET /v1/sandboxes/{id}/egress`.
pub(crate) async fn egress(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    let sb = named(&mgr, &p.id, false)?;
    Ok(json(
        StatusCode::OK,
        &EgressView {
            network: sb.snapshot().network,
            log: sb.egress.entries(),
        },
    ))
}

/// `PUT /v1/sandboxes/{id}/egress`.
pub(crate) async fn set_egress(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Id>,
    req: Req,
) -> Reply {
    let sb = used(&mgr, &p.id, false).await?;
    let body: EgressRequest = read_json(req).await?;
    let mgr2 = mgr.clone();
    let sb2 = sb.clone();
    // The record is written durably before the change shows.
    let network = tokio::task::spawn_blocking(move || mgr2.set_egress_allow(&sb2, body.allow))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(json(
        StatusCode::OK,
        &EgressView {
            network,
            log: sb.egress.entries(),
        },
    ))
}

/// `DELETE /v1/sandboxes/{id}`.
pub(crate) async fn delete(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    // Not woken: the stop thaws it (and leaves a hibernated OpenCode asleep).
    let sb = named(&mgr, &p.id, true)?;
    mgr.delete(&sb).await?;
    Ok(Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(super::empty())
        .expect("valid response"))
}

/// `POST /v1/sandboxes/{id}/stop`.
pub(crate) async fn stop(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    // Not woken: the stop thaws it (and leaves a hibernated OpenCode asleep).
    let sb = named(&mgr, &p.id, true)?;
    mgr.stop(&sb, "stopped by request").await;
    Ok(json(StatusCode::OK, &SandboxView::from(&sb.snapshot())))
}

/// `POST /v1/sandboxes/{id}/exec`.
pub(crate) async fn exec_route(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Id>,
    req: Req,
) -> Reply {
    let sb = used(&mgr, &p.id, false).await?;
    exec(&mgr, sb, req).await
}

/// `GET /v1/sandboxes/{id}/exec/ws`: an interactive exec over a WebSocket.
pub(crate) async fn exec_ws(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Id>,
    req: Req,
) -> Reply {
    let sb = used(&mgr, &p.id, false).await?;
    require_live(&sb)?;
    super::terminal::upgrade(mgr, sb, req).await
}

/// Any method on `/v1/sandboxes/{id}/ports/{port}[/{path}]`.
pub(crate) async fn port(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<super::routes::IdPort>,
    req: Req,
) -> Reply {
    let sb = used(&mgr, &p.id, p.port == crate::opencode::PORT).await?;
    let path = super::proxy::below(req.uri().path(), 5, req.uri().query());
    super::proxy::port(&mgr, sb, req, p.port, path, false).await
}

/// `POST /v1/sandboxes/{id}/tickets[?port=N]`.
pub(crate) async fn ticket(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Id>,
    Query(q): Query<super::types::TicketQuery>,
) -> Reply {
    let sb = named(&mgr, &p.id, false)?;
    require_live(&sb)?;
    let rec = sb.snapshot();
    if q.port.is_none() && rec.opencode.is_none() {
        return Err(ApiError::BadRequest(format!(
            "sandbox {} runs no OpenCode: ask for a port's ticket (?port=N)",
            rec.id
        )));
    }
    if q.port == Some(0) {
        return Err(ApiError::BadRequest("port must be 1 to 65535".into()));
    }
    let ticket = super::origins::new_ticket(&rec.id);
    let host = super::origins::host_for(&rec.id, q.port, &mgr.config.origin_base);
    let url = mgr.config.listen.map(|l| {
        format!(
            "http://{host}:{}/?{}={ticket}",
            l.port(),
            super::origins::TICKET_PARAM
        )
    });
    Ok(json(
        StatusCode::CREATED,
        &super::types::TicketView {
            ticket,
            expires_in_secs: super::origins::TICKET_TTL.as_secs(),
            host,
            url,
        },
    ))
}

/// `GET /v1/sandboxes/{id}/attach`.
pub(crate) async fn attach(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    let sb = named(&mgr, &p.id, false)?;
    let rec = sb.snapshot();
    let Some(oc) = rec.opencode else {
        return Err(ApiError::BadRequest(format!(
            "sandbox {} runs no OpenCode server",
            rec.id
        )));
    };
    if oc.attach_password.is_empty() {
        return Err(ApiError::Conflict(format!(
            "sandbox {} was made before attach existed: make a new one",
            rec.id
        )));
    }
    let host = super::origins::host_for(&rec.id, None, &mgr.config.origin_base);
    let origin_url = mgr
        .config
        .listen
        .map(|l| format!("http://{host}:{}", l.port()));
    let url = mgr.config.listen.map(|l| {
        let ip = if l.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            l.ip()
        };
        format!(
            "http://{}/v1/sandboxes/{}/opencode",
            std::net::SocketAddr::new(ip, l.port()),
            rec.id
        )
    });
    let command = url.as_ref().map(|u| {
        format!(
            "OPENCODE_SERVER_PASSWORD={} opencode attach {u}",
            oc.attach_password
        )
    });
    Ok(json(
        StatusCode::OK,
        &super::types::AttachView {
            url,
            origin_url,
            username: "opencode".into(),
            password: oc.attach_password,
            command,
        },
    ))
}

/// `GET /v1/sandboxes/{id}/logs`.
pub(crate) async fn logs_route(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Id>,
    Query(q): Query<LogsQuery>,
) -> Reply {
    let sb = used(&mgr, &p.id, false).await?;
    logs(&mgr, sb, q.follow, q.stream).await
}

/// `GET /v1/sandboxes/{id}/stats`.
pub(crate) async fn stats_route(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    // A status read: a paused sandbox stays paused (and its CPU time still).
    let sb = named(&mgr, &p.id, false)?;
    stats(&mgr, &sb).await
}

/// `GET /v1/sandboxes/{id}/dir?path=`.
pub(crate) async fn dir_route(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Id>,
    Query(q): Query<FilesQuery>,
) -> Reply {
    let sb = used(&mgr, &p.id, false).await?;
    if !q.path.starts_with('/') {
        return Err(ApiError::BadRequest("path must be absolute".into()));
    }
    let (rootfs, _) = mgr.rootfs(&sb)?;
    let path = q.path.clone();
    let listed = tokio::task::spawn_blocking(move || {
        let root = std::fs::File::open(&rootfs)?;
        crate::sandbox::fs::list_dir(&root, std::path::Path::new(&path), 10_000)
    })
    .await
    .map_err(ApiError::internal)?;
    let (entries, truncated) = listed.map_err(|e| super::files::io_api(&q.path, e))?;
    Ok(json(
        StatusCode::OK,
        &super::types::DirList {
            path: q.path,
            entries,
            truncated,
        },
    ))
}

/// `GET /v1/sandboxes/{id}/ports`.
pub(crate) async fn ports_route(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    let sb = used(&mgr, &p.id, false).await?;
    if !sb.snapshot().state.is_live() {
        return Err(ApiError::Conflict(format!(
            "sandbox {} is {}",
            p.id,
            sb.snapshot().state.as_str()
        )));
    }
    let ports = mgr
        .listening_ports(&sb)
        .await
        .map_err(|e| ApiError::Conflict(format!("cannot read sandbox {}'s sockets: {e}", p.id)))?;
    Ok(json(StatusCode::OK, &super::types::PortList { ports }))
}

/// `GET` and `PUT /v1/sandboxes/{id}/files?path=`.
pub(crate) async fn files(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Id>,
    Query(q): Query<FilesQuery>,
    req: Req,
) -> Reply {
    let sb = used(&mgr, &p.id, false).await?;
    super::files::handle(&mgr, sb, q.path, req).await
}

/// Any method on `/v1/sandboxes/{id}/opencode[/{path}]`.
pub(crate) async fn opencode(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Id>,
    req: Req,
) -> Reply {
    let sb = used(&mgr, &p.id, true).await?;
    super::proxy::opencode(&mgr, sb, req).await
}

fn require_live(sb: &Sandbox) -> Result<(), ApiError> {
    let r = sb.snapshot();
    match r.state {
        SandboxState::Ready | SandboxState::Starting => Ok(()),
        s => Err(ApiError::Conflict(format!(
            "sandbox {} is {}",
            r.id,
            s.as_str()
        ))),
    }
}

async fn stats(mgr: &Arc<Manager>, sb: &Arc<Sandbox>) -> Result<Response<Body>, ApiError> {
    require_live(sb)?;
    let client = mgr.runtime.client(&sb.snapshot().id);
    let stats = tokio::task::spawn_blocking(move || client.stats())
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| mgr.shim_failed(sb, "stats", &e.to_string()))?;
    Ok(json(
        StatusCode::OK,
        &Stats {
            memory_bytes: stats.memory_bytes,
            memory_peak_bytes: stats.memory_peak_bytes,
            cpu_usec: stats.cpu_usec,
            pids: stats.pids,
            cpu_throttled_periods: stats.cpu_throttled_periods,
        },
    ))
}

fn stream_response(
    content_type: &str,
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(super::channel_body(rx))
        .expect("valid response")
}

/// Runs a process in the sandbox and streams its output as JSON lines while it runs:
/// `{"stream":"stdout","data":"..."}`, then `{"exit_code":N,"timed_out":bool,...}`.
///
/// The body is the JSON request; with `"stdin": true` the bytes after it (and one `\n`) are
/// the process's stdin, streamed as they arrive, closed at the body's end. A client that
/// goes away kills the process.
async fn exec(mgr: &Arc<Manager>, sb: Arc<Sandbox>, req: Req) -> Result<Response<Body>, ApiError> {
    let (body, stdin): (ExecRequest, _) = read_exec_request(req).await?;
    require_live(&sb)?;
    if body.command.is_empty() || body.command[0].is_empty() {
        return Err(ApiError::BadRequest("command must not be empty".into()));
    }
    if let Some(t) = body.timeout_secs {
        if t == 0 || t > MAX_EXEC_TIMEOUT_SECS {
            return Err(ApiError::BadRequest(format!(
                "timeout_secs must be between 1 and {MAX_EXEC_TIMEOUT_SECS}"
            )));
        }
    }
    if let Some(cwd) = &body.cwd {
        if !cwd.starts_with('/') {
            return Err(ApiError::BadRequest("cwd must be an absolute path".into()));
        }
    }
    crate::sandbox::validate_env(&body.env)?;
    let rec = sb.snapshot();
    let request = agentd_runtime::ExecRequest {
        args: body.command.clone(),
        env: body.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cwd: body.cwd.as_ref().map(Into::into),
        uid: Some(body.uid.unwrap_or(rec.user.0)),
    };
    // Started here so that a refused exec is an error status, not a line in a 200 stream.
    let started = mgr
        .start_exec(&rec.id, request, stdin.is_some())
        .await
        .map_err(|e| mgr.shim_failed(&sb, "exec", &e))?;
    let (out_tx, mut out_rx) = mpsc::channel::<(Stream, Bytes)>(16);
    let (tx, rx) = mpsc::channel(64);
    let guard = ActiveGuard::new(sb.clone());
    let mgr = mgr.clone();
    let timeout = body.timeout_secs.map(Duration::from_secs);
    tokio::spawn(async move {
        let _guard = guard;
        let run = mgr.run_exec(started, stdin, timeout, out_tx);
        // Forwards output to the client as it comes; when the client goes away this block
        // ends and drops `out_rx` (it is moved in), which makes `run_exec` kill the process.
        let fwd_tx = tx.clone();
        let stopping = mgr.stopping();
        let forward = async move {
            let tx = fwd_tx;
            tokio::pin!(stopping);
            let mut text = [Utf8Chunker::default(), Utf8Chunker::default()];
            let send = |name: &str, data: String| {
                super::json_line(&serde_json::json!({"stream": name, "data": data}))
            };
            loop {
                tokio::select! {
                    m = out_rx.recv() => match m {
                        Some((stream, bytes)) => {
                            let data = text[usize::from(stream == Stream::Stderr)].push(&bytes);
                            if !data.is_empty() && tx.send(send(stream.as_str(), data)).await.is_err() {
                                return;
                            }
                        }
                        None => break,
                    },
                    () = tx.closed() => return,
                    // The process is killed like for a client that left: nobody could read
                    // its output any more.
                    () = &mut stopping => {
                        let _ = tx.send(super::json_line(&serde_json::json!({"error": STOPPING}))).await;
                        return;
                    }
                }
            }
            for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
                let data = text[i].finish();
                if !data.is_empty() && tx.send(send(stream.as_str(), data)).await.is_err() {
                    return;
                }
            }
        };
        let (end, ()) = tokio::join!(run, forward);
        if *mgr.shutdown.borrow() {
            return;
        }
        let line = ExecLine {
            exit_code: end.code,
            timed_out: Some(end.timed_out),
            oom_killed: Some(end.oom_killed),
            error: end.error,
            ..ExecLine::default()
        };
        let _ = tx.send(super::json_line(&line)).await;
    });
    Ok(stream_response("application/x-ndjson", rx))
}

/// Largest JSON head of an exec request.
const MAX_EXEC_HEAD: usize = 1 << 20;

/// Reads an exec request: its JSON body and, when it asks for stdin, the rest of the body
/// as a stream of chunks.
async fn read_exec_request(
    req: Req,
) -> Result<(ExecRequest, Option<mpsc::Receiver<Bytes>>), ApiError> {
    use http_body_util::BodyExt;
    let mut body = req.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut ended = false;
    let (head, used) = loop {
        let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<ExecRequest>();
        match it.next() {
            Some(Ok(v)) => break (v, it.byte_offset()),
            Some(Err(e)) if !e.is_eof() || ended => {
                return Err(ApiError::BadRequest(format!("invalid JSON body: {e}")))
            }
            None if ended => return Err(ApiError::BadRequest("a JSON body is required".into())),
            _ => {}
        }
        if buf.len() > MAX_EXEC_HEAD {
            return Err(ApiError::TooLarge(format!(
                "the exec request is larger than {MAX_EXEC_HEAD} bytes"
            )));
        }
        match body.frame().await {
            None => ended = true,
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
            Some(Err(e)) => {
                return Err(ApiError::BadRequest(format!(
                    "failed to read the body: {e}"
                )))
            }
        }
    };
    let mut rest = Bytes::from(buf).slice(used..);
    if !head.stdin {
        // Nothing may follow the request but white space.
        let trailing = |b: &[u8]| b.iter().any(|c| !c.is_ascii_whitespace());
        let mut bad = trailing(&rest);
        while !bad && !ended {
            match body.frame().await {
                None => ended = true,
                Some(Ok(f)) => bad = f.into_data().is_ok_and(|d| trailing(&d)),
                Some(Err(_)) => ended = true,
            }
        }
        if bad {
            return Err(ApiError::BadRequest(
                "data after the JSON request: set \"stdin\": true to send it to the process".into(),
            ));
        }
        return Ok((head, None));
    }
    if rest.first() == Some(&b'\n') {
        rest = rest.slice(1..);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        if !rest.is_empty() && tx.send(rest).await.is_err() {
            return;
        }
        if ended {
            return;
        }
        loop {
            let frame = tokio::select! {
                f = body.frame() => f,
                () = tx.closed() => return,
            };
            match frame {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        if tx.send(d).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Err(_)) | None => return,
            }
        }
    });
    Ok((head, Some(rx)))
}

/// The sandbox's stdout and stderr as JSON lines; `follow=true` keeps streaming until the
/// sandbox ends. `stream=stdout|stderr` picks one.
async fn logs(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    follow: bool,
    which: LogStream,
) -> Result<Response<Body>, ApiError> {
    let streams: Vec<(&'static str, &'static str)> = match which {
        LogStream::Both => vec![
            ("stdout", agentd_runtime::layout::STDOUT),
            ("stderr", agentd_runtime::layout::STDERR),
        ],
        LogStream::Stdout => vec![("stdout", agentd_runtime::layout::STDOUT)],
        LogStream::Stderr => vec![("stderr", agentd_runtime::layout::STDERR)],
    };
    let (tx, rx) = mpsc::channel(64);
    let mgr = mgr.clone();
    tokio::spawn(async move {
        let mut offsets = vec![0u64; streams.len()];
        let mut state_rx = sb.state_tx.subscribe();
        loop {
            // Read from wherever the logs are now (they move when the sandbox ends).
            let dir = mgr.logs_dir(&sb);
            let live = sb.snapshot().state.is_live();
            for (i, (name, file)) in streams.iter().enumerate() {
                let Ok(mut f) = tokio::fs::File::open(dir.join(file)).await else {
                    continue;
                };
                use tokio::io::AsyncSeekExt;
                if f.seek(std::io::SeekFrom::Start(offsets[i])).await.is_err() {
                    continue;
                }
                let mut buf = Vec::new();
                if f.read_to_end(&mut buf).await.is_err() {
                    continue;
                }
                offsets[i] += buf.len() as u64;
                for chunk in buf.chunks(16 * 1024) {
                    let data = String::from_utf8_lossy(chunk).into_owned();
                    if tx
                        .send(super::json_line(
                            &serde_json::json!({"stream": name, "data": data}),
                        ))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            if !follow || !live {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = state_rx.changed() => {}
                _ = tx.closed() => return,
                () = mgr.stopping() => {
                    let _ = tx.send(super::json_line(&serde_json::json!({"error": STOPPING}))).await;
                    return;
                }
            }
        }
    });
    Ok(stream_response("application/x-ndjson", rx))
}

#[cfg(test)]
fn collect_lines(b: &[u8]) -> Vec<serde_json::Value> {
    b.split(|c| *c == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_exec_body_refuses_unknown_fields() {
        let e = serde_json::from_str::<ExecRequest>(r#"{"command":["ls"],"cmd":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `cmd`"), "{e}");
        let ok: ExecRequest =
            serde_json::from_str(r#"{"command":["ls"],"timeout_secs":3}"#).unwrap();
        assert_eq!(ok.timeout_secs, Some(3));
        let frame = crate::api::json_line(&serde_json::json!({"a": 1}))
            .unwrap()
            .into_data()
            .unwrap();
        assert_eq!(collect_lines(&frame), vec![serde_json::json!({"a": 1})]);
    }

    #[test]
    fn test_create_body_refuses_unknown_fields() {
        let e =
            serde_json::from_str::<CreateSandbox>(r#"{"image":"x","memroy":"1g"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `memroy`"), "{e}");
    }
}
