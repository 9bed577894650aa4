//! Interactive exec over a WebSocket: `GET /v1/sandboxes/{id}/exec/ws`.
//!
//! The protocol, for any WebSocket client:
//! - the client's first message is text, the request: `{"command": [...], "tty": true,
//!   "cols": 80, "rows": 24, "env": {}, "cwd": "/", "uid": 0, "timeout_secs": N}` (all
//!   optional; the command defaults to a login shell, `tty` to true);
//! - then binary messages are the process's stdin, and text messages are controls:
//!   `{"resize": {"cols": C, "rows": R}}` (terminal only) and `{"eof": true}` (closes stdin;
//!   on a terminal it types ^D);
//! - agentd sends binary messages: on a terminal its output as is; without one, a first byte
//!   1 (stdout) or 2 (stderr) and the bytes;
//! - at the end a text message `{"exit_code": N, "timed_out": false, "oom_killed": false}` (or
//!   `{"error": "..."}` when it could not start) and a close.
//!
//! A client that goes away (close, error, a dropped connection) kills the process and what it
//! started. Bounded: 256 sessions at once, messages of 1 MiB, 30 s for the first message.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap, Response, StatusCode};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::{Message, Role, WebSocketConfig};

use super::error::ApiError;
use super::{Body, Req};
use crate::exec::Stream;
use crate::sandbox::{Manager, Sandbox};

/// Most interactive sessions at once.
const MAX_SESSIONS: usize = 256;
/// Largest message either way.
const MAX_MESSAGE: usize = 1 << 20;
/// Time the client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

static SESSIONS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_SESSIONS);

/// The first message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TerminalRequest {
    /// Command and arguments [default: a login shell: bash if the image has it, else sh].
    #[serde(default)]
    command: Vec<String>,
    /// On a terminal [default: true].
    #[serde(default = "yes")]
    tty: bool,
    /// Terminal size [default: 80 x 24].
    cols: Option<u16>,
    rows: Option<u16>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    uid: Option<u32>,
    timeout_secs: Option<u64>,
}

fn yes() -> bool {
    true
}

/// A control message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Control {
    resize: Option<Size>,
    #[serde(default)]
    eof: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Size {
    cols: u16,
    rows: u16,
}

/// The key of a WebSocket handshake, if `headers` ask for one.
fn websocket_key(headers: &HeaderMap) -> Result<String, ApiError> {
    if !super::proxy::wants_websocket(headers) {
        return Err(ApiError::BadRequest(
            "this is a WebSocket endpoint: connect with a WebSocket client (Upgrade: websocket)"
                .into(),
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return Err(ApiError::BadRequest(
            "WebSocket version 13 is required".into(),
        ));
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|k| k.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 64)
        .map(str::to_string)
        .ok_or_else(|| ApiError::BadRequest("Sec-WebSocket-Key is missing".into()))
}

/// Answers the handshake and runs the session once the connection is upgraded.
pub async fn upgrade(
    mgr: Arc<Manager>,
    sb: Arc<Sandbox>,
    mut req: Req,
) -> Result<Response<Body>, ApiError> {
    let key = websocket_key(req.headers())?;
    let permit = SESSIONS.try_acquire().map_err(|_| {
        ApiError::Unavailable(format!(
            "{MAX_SESSIONS} interactive sessions are open: retry when one ends"
        ))
    })?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _permit = permit;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade failed");
                return;
            }
        };
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(MAX_MESSAGE);
        config.max_frame_size = Some(MAX_MESSAGE);
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            Some(config),
        )
        .await;
        session(mgr, sb, ws).await;
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(super::empty())
        .map_err(ApiError::internal)
}

type Ws = tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// The process's output as binary messages: as is on a terminal, else after a byte that
/// says which stream.
struct WsOut {
    tx: futures_util::stream::SplitSink<Ws, Message>,
    tty: bool,
}

impl crate::exec::OutputSink for WsOut {
    async fn send(&mut self, stream: Stream, data: Bytes) -> bool {
        let frame = if self.tty {
            data
        } else {
            let mut f = Vec::with_capacity(data.len() + 1);
            f.push(if stream == Stream::Stdout { 1 } else { 2 });
            f.extend_from_slice(&data);
            Bytes::from(f)
        };
        self.tx.send(Message::Binary(frame)).await.is_ok()
    }
}

/// Sends `{"error": why}` and closes.
async fn fail(ws: &mut Ws, why: &str) {
    let _ = ws
        .send(Message::text(serde_json::json!({"error": why}).to_string()))
        .await;
    let _ = ws.close(None).await;
}

async fn session(mgr: Arc<Manager>, sb: Arc<Sandbox>, mut ws: Ws) {
    let req = match tokio::time::timeout(REQUEST_TIMEOUT, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<TerminalRequest>(&t) {
            Ok(r) => r,
            Err(e) => return fail(&mut ws, &format!("bad request: {e}")).await,
        },
        Ok(Some(Ok(_))) => {
            return fail(
                &mut ws,
                "the first message must be the request, as JSON text",
            )
            .await
        }
        Ok(_) => return,
        Err(_) => return fail(&mut ws, "no request in 30 s").await,
    };
    if req.cwd.as_deref().is_some_and(|c| !c.starts_with('/')) {
        return fail(&mut ws, "cwd must be absolute").await;
    }
    if req.timeout_secs.is_some_and(|t| t == 0 || t > 86_400) {
        return fail(&mut ws, "timeout_secs must be 1 to 86400").await;
    }
    let (cols, rows) = (req.cols.unwrap_or(80), req.rows.unwrap_or(24));
    if cols == 0 || rows == 0 {
        return fail(&mut ws, "cols and rows must be at least 1").await;
    }
    let command = if req.command.is_empty() {
        crate::exec::LOGIN_SHELL
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        req.command
    };
    let id = sb.snapshot().id;
    let exec = agentd_runtime::ExecRequest {
        args: command,
        env: req.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cwd: req.cwd.map(Into::into),
        uid: req.uid,
    };
    if let Some(bad) = exec
        .env
        .iter()
        .find(|kv| kv.starts_with('=') || kv.contains('\0'))
    {
        return fail(&mut ws, &format!("bad env entry {bad:?}")).await;
    }
    let started = if req.tty {
        mgr.start_pty_exec(&sb, exec, cols, rows)
            .await
            .map(|(s, p)| (s, Some(Arc::new(p))))
    } else {
        mgr.start_exec(&id, exec, true).await.map(|s| (s, None))
    };
    let (started, pty) = match started {
        Ok(x) => x,
        Err(e) => return fail(&mut ws, &format!("cannot start the command: {e}")).await,
    };
    let (tx, mut rx) = ws.split();
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(16);
    let (gone_tx, gone_rx) = oneshot::channel::<()>();
    // The client's messages, on a task of their own: stdin may wait on the process while
    // its output must keep flowing.
    let tty = pty.is_some();
    let reader = tokio::spawn(async move {
        let mut stdin = Some(in_tx);
        while let Some(msg) = rx.next().await {
            match msg {
                Ok(Message::Binary(b)) => {
                    if let Some(s) = &stdin {
                        if s.send(b).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Ok(Message::Text(t)) => match serde_json::from_str::<Control>(&t) {
                    Ok(c) => {
                        if let (Some(size), Some(p)) = (c.resize, &pty) {
                            let _ = p.resize(size.cols.max(1), size.rows.max(1));
                        }
                        if c.eof {
                            match (&stdin, tty) {
                                // ^D: the terminal's end of input.
                                (Some(s), true) => {
                                    let _ = s.send(Bytes::from_static(b"\x04")).await;
                                }
                                _ => stdin = None,
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "terminal: bad control message"),
                },
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = gone_tx.send(());
    });
    let timeout = req.timeout_secs.map(Duration::from_secs);
    let mut sink = WsOut { tx, tty };
    let end = mgr
        .relay_exec(started, Some(in_rx), timeout, gone_rx, &mut sink)
        .await;
    reader.abort();
    let Some(end) = end else {
        tracing::debug!(sandbox = %id, "terminal: the client went away; the process was killed");
        return;
    };
    let mut tx = sink.tx;
    let last = match &end.error {
        Some(e) => serde_json::json!({"error": e}),
        None => serde_json::json!({
            "exit_code": end.code,
            "timed_out": end.timed_out,
            "oom_killed": end.oom_killed,
        }),
    };
    let _ = tx.send(Message::text(last.to_string())).await;
    let _ = tx.close().await;
}
