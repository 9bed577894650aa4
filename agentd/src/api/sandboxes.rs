//! `/v1/sandboxes`: create, list, inspect, stop, delete, exec (streamed), logs (with follow)
//! and stats. Files and the OpenCode proxy have their own modules.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::{json, read_json, Body, BoxError};
use crate::sandbox::{ActiveGuard, CreateSandbox, Manager, Sandbox, SandboxState};

/// Longest exec timeout.
pub const MAX_EXEC_TIMEOUT_SECS: u64 = 24 * 3600;

pub(crate) async fn dispatch(
    mgr: &Arc<Manager>,
    method: &Method,
    segs: &[&str],
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    match (method, segs) {
        (&Method::GET, []) => {
            let label = super::query_param(&req, "label");
            let items: Vec<serde_json::Value> = mgr
                .list()
                .iter()
                .map(|s| s.snapshot())
                .filter(|r| match &label {
                    None => true,
                    Some(l) => {
                        let (k, v) = l.split_once('=').unwrap_or((l, ""));
                        r.labels.get(k).is_some_and(|x| v.is_empty() || x == v)
                    }
                })
                .map(|r| r.view())
                .collect();
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "sandboxes": items }),
            ))
        }
        (&Method::POST, []) => {
            let body: CreateSandbox = read_json(req).await?;
            // In a task of its own: hyper drops this future when the client goes away, and a
            // create stopped half-way would leave a sandbox nobody supervises.
            let mgr2 = mgr.clone();
            let rec = tokio::spawn(async move { mgr2.create(body).await })
                .await
                .map_err(ApiError::internal)??;
            Ok(json(StatusCode::CREATED, &rec.view()))
        }
        (_, []) => Err(ApiError::MethodNotAllowed(
            "use GET or POST on /v1/sandboxes".into(),
        )),
        (_, [id, rest @ ..]) => {
            let sb = mgr.get(id)?;
            // Any request to the sandbox counts as activity for its idle timeout, except
            // reading its status (a dashboard polling it must not keep it alive).
            if !(method == Method::GET && rest.is_empty()) {
                sb.touch();
            }
            match (method, rest) {
                (&Method::GET, []) => Ok(json(StatusCode::OK, &sb.snapshot().view())),
                (&Method::DELETE, []) => {
                    mgr.delete(&sb).await?;
                    Ok(Response::builder()
                        .status(StatusCode::NO_CONTENT)
                        .body(super::empty())
                        .expect("valid response"))
                }
                (&Method::POST, ["stop"]) => {
                    mgr.stop(&sb, "stopped by request").await;
                    Ok(json(StatusCode::OK, &sb.snapshot().view()))
                }
                (&Method::POST, ["exec"]) => exec(mgr, sb, req).await,
                (&Method::GET, ["logs"]) => logs(mgr, sb, &req).await,
                (&Method::GET, ["stats"]) => stats(mgr, &sb).await,
                (&Method::GET | &Method::PUT, ["files"]) => {
                    super::files::handle(mgr, sb, req).await
                }
                (_, ["opencode", ..]) => super::proxy::opencode(mgr, sb, &rest[1..], req).await,
                _ => Err(ApiError::NotFound(format!(
                    "no route {method} /v1/sandboxes/{id}/{}",
                    rest.join("/")
                ))),
            }
        }
    }
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
        .map_err(|e| ApiError::Conflict(format!("no stats: {e}")))?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "memory_bytes": stats.memory_bytes,
            "memory_peak_bytes": stats.memory_peak_bytes,
            "cpu_usec": stats.cpu_usec,
            "pids": stats.pids,
            "cpu_throttled_periods": stats.cpu_throttled_periods,
        }),
    ))
}

/// `POST .../exec` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    /// Command and arguments.
    command: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Working directory.
    cwd: Option<String>,
    /// Seconds before the process is killed [default: none].
    timeout_secs: Option<u64>,
    /// Uid inside the sandbox [default: the sandbox's user].
    uid: Option<u32>,
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

/// Runs a process in the sandbox and streams its output as JSON lines:
/// `{"stream":"stdout","data":"..."}`, then `{"exit_code":N,"timed_out":bool}`.
async fn exec(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: ExecBody = read_json(req).await?;
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
    for k in body.env.keys() {
        if k.is_empty() || k.contains('=') {
            return Err(ApiError::BadRequest(format!(
                "invalid environment variable name {k:?}"
            )));
        }
    }
    let rec = sb.snapshot();
    let request = agentd_runtime::ExecRequest {
        args: body.command.clone(),
        env: body.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cwd: body.cwd.as_ref().map(Into::into),
        uid: Some(body.uid.unwrap_or(rec.user.0)),
    };
    let (exec_id, out_r, err_r) = mgr
        .start_exec(&rec.id, request)
        .await
        .map_err(|e| ApiError::BadRequest(format!("exec failed: {e}")))?;

    let (tx, rx) = mpsc::channel(64);
    let guard = ActiveGuard::new(sb.clone());
    let mgr = mgr.clone();
    let id = rec.id.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let pump = |fd: OwnedFd,
                    name: &'static str,
                    tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>| async move {
            let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
                return;
            };
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match pipe.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let data = String::from_utf8_lossy(&buf[..n]).into_owned();
                        if tx
                            .send(super::json_line(
                                &serde_json::json!({"stream": name, "data": data}),
                            ))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        };
        let client = mgr.runtime.client(&id);
        let wait = tokio::task::spawn_blocking(move || client.wait_exec(exec_id));
        let outputs = futures_util::future::join(
            pump(out_r, "stdout", tx.clone()),
            pump(err_r, "stderr", tx.clone()),
        );
        let mut timed_out = false;
        let timeout = body
            .timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(Duration::MAX);
        tokio::pin!(wait);
        let status = tokio::select! {
            st = &mut wait => st,
            _ = tokio::time::sleep(timeout) => {
                timed_out = true;
                let client = mgr.runtime.client(&id);
                let _ = tokio::task::spawn_blocking(move || client.kill_exec(exec_id, libc::SIGKILL)).await;
                (&mut wait).await
            }
        };
        // Output still in the pipes comes first; a background child holding them open gets
        // a short grace, then the stream ends.
        let _ = tokio::time::timeout(Duration::from_millis(500), outputs).await;
        let end = match status {
            Ok(Ok(st)) => {
                serde_json::json!({"exit_code": st.code, "timed_out": timed_out, "oom_killed": st.oom_killed})
            }
            Ok(Err(e)) => {
                serde_json::json!({"error": format!("lost the process: {e}"), "timed_out": timed_out})
            }
            Err(e) => serde_json::json!({"error": format!("{e}"), "timed_out": timed_out}),
        };
        let _ = tx.send(super::json_line(&end)).await;
    });
    Ok(stream_response("application/x-ndjson", rx))
}

/// The sandbox's stdout and stderr as JSON lines; `follow=true` keeps streaming until the
/// sandbox ends. `stream=stdout|stderr` picks one.
async fn logs(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let follow = matches!(
        super::query_param(req, "follow").as_deref(),
        Some("true" | "1")
    );
    let which = super::query_param(req, "stream");
    let streams: Vec<(&'static str, &'static str)> = match which.as_deref() {
        None | Some("both") => vec![
            ("stdout", agentd_runtime::layout::STDOUT),
            ("stderr", agentd_runtime::layout::STDERR),
        ],
        Some("stdout") => vec![("stdout", agentd_runtime::layout::STDOUT)],
        Some("stderr") => vec![("stderr", agentd_runtime::layout::STDERR)],
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "stream must be stdout, stderr or both, got {other:?}"
            )))
        }
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
        let e = serde_json::from_str::<ExecBody>(r#"{"command":["ls"],"cmd":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `cmd`"), "{e}");
        let ok: ExecBody = serde_json::from_str(r#"{"command":["ls"],"timeout_secs":3}"#).unwrap();
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
