//! The agent's side of an attempt: OpenCode's HTTP API in the sandbox (sessions, prompts,
//! messages, aborts) and its event stream, followed until the session is idle, counting tool
//! calls. What OpenCode says is data: bounded, never interpreted beyond its fields.

use std::sync::Arc;

use super::*;

impl TaskManager {
    /// One round of the agent: prompt (unless a resumed round sent it already), then follow
    /// the events until the session is idle.
    pub(super) async fn agent_round(
        &self,
        task: &Arc<Task>,
        n: u32,
        sb: &Arc<Sandbox>,
        session: &str,
        rec: &TaskRecord,
    ) -> std::result::Result<(), Outcome> {
        let a = self.attempt_snapshot(task, n);
        let round = a.round;
        let t = Instant::now();
        // Subscribe before prompting: the idle event cannot be missed.
        let mut events = self
            .event_stream(sb)
            .await
            .map_err(|e| Outcome::Failed(format!("OpenCode's event stream: {e}")))?;
        let mut idle_now = false;
        if a.prompted < round {
            let text = if round == 1 {
                rec.request.prompt.clone()
            } else {
                follow_up(rec.request.check.as_deref().unwrap_or(""), a.check.as_ref())
            };
            let body = serde_json::json!({"parts": [{"type": "text", "text": text}]});
            self.opencode(
                sb,
                hyper::Method::POST,
                &format!("/session/{session}/prompt_async"),
                Some(body),
            )
            .await
            .map_err(|e| Outcome::Failed(format!("OpenCode refused the prompt: {e}")))?;
            self.update(task, n, |a| a.prompted = round);
            self.emit(
                task,
                "prompt",
                serde_json::json!({"attempt": n, "round": round, "bytes": text.len()}),
            );
        } else {
            // Resumed after a restart: the session may have gone idle while nobody watched.
            idle_now = self.session_idle(sb, session).await;
        }
        let mut watch = super::attempt::RoundWatch::new(session);
        let mut error: Option<String> = None;
        let mut state_rx = sb.state_tx.subscribe();
        let mut reconnects = 0;
        // A resumed round whose session is idle already has nothing to follow.
        if !idle_now {
            loop {
                let ev = tokio::select! {
                    ev = events.next() => ev,
                    _ = async {
                        while state_rx.borrow_and_update().is_live() {
                            if state_rx.changed().await.is_err() { break; }
                        }
                    } => None,
                };
                let Some(ev) = ev else {
                    // The stream ended: the sandbox is gone, or OpenCode closed it (then
                    // subscribe again and ask whether the session went idle meanwhile).
                    if sb.snapshot().state.is_live() && reconnects < MAX_EVENT_RECONNECTS {
                        reconnects += 1;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if let Ok(e) = self.event_stream(sb).await {
                            events = e;
                            if self.session_idle(sb, session).await {
                                break;
                            }
                            continue;
                        }
                    }
                    let why = sb
                        .snapshot()
                        .exit
                        .map(|e| e.reason)
                        .unwrap_or_else(|| "OpenCode's event stream ended".into());
                    return Err(Outcome::Lost(format!("the agent stopped: {why}")));
                };
                match watch.see(&ev) {
                    super::attempt::Seen::Nothing => {}
                    super::attempt::Seen::Tool {
                        new,
                        tool,
                        status,
                        title,
                    } => {
                        if new {
                            // In memory only: the count is saved with the attempt's next
                            // state change, not with a durable commit per tool call.
                            self.update_unsaved(task, n, |a| a.tool_calls += 1);
                        }
                        let calls = self.attempt_snapshot(task, n).tool_calls;
                        self.emit(
                            task,
                            "tool",
                            serde_json::json!({"attempt": n, "round": round, "tool": tool, "status": status, "title": title, "tool_calls": calls}),
                        );
                    }
                    super::attempt::Seen::Error(msg) => {
                        self.emit(
                            task,
                            "error",
                            serde_json::json!({"attempt": n, "round": round, "message": msg}),
                        );
                        error = Some(msg);
                    }
                    super::attempt::Seen::Idle => break,
                }
            }
        }
        let round_ms = ms(t.elapsed());
        let message = self.last_message(sb, session).await;
        let usage = sb.snapshot().usage;
        self.update(task, n, |a| {
            a.timings.rounds_ms.push(round_ms);
            a.usage = usage;
            if message.is_some() {
                a.final_message = message.clone();
            }
        });
        if let Some(m) = &message {
            self.emit(
                task,
                "message",
                serde_json::json!({"attempt": n, "round": round, "text": tail(m, 4096)}),
            );
        }
        match error {
            Some(e) => Err(Outcome::Failed(format!("the agent failed: {e}"))),
            None => Ok(()),
        }
    }

    /// Whether OpenCode reports the session idle (not busy or retrying).
    pub(super) async fn session_idle(&self, sb: &Arc<Sandbox>, session: &str) -> bool {
        match self
            .opencode(sb, hyper::Method::GET, "/session/status", None)
            .await
        {
            Ok(v) => !matches!(v[session]["type"].as_str(), Some("busy" | "retry")),
            Err(_) => false,
        }
    }

    /// The text of the session's last assistant message.
    pub(super) async fn last_message(&self, sb: &Arc<Sandbox>, session: &str) -> Option<String> {
        let v = self
            .opencode(
                sb,
                hyper::Method::GET,
                &format!("/session/{session}/message"),
                None,
            )
            .await
            .ok()?;
        let text = v
            .as_array()?
            .iter()
            .rev()
            .filter(|m| m["info"]["role"] == "assistant")
            .map(|m| {
                m["parts"]
                    .as_array()
                    .map(|parts| {
                        parts
                            .iter()
                            .filter(|p| p["type"] == "text")
                            .filter_map(|p| p["text"].as_str())
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default()
            })
            .find(|t| !t.trim().is_empty())?;
        Some(tail(&text, MAX_MESSAGE_BYTES))
    }

    /// A request to a sandbox's OpenCode (scoped to the workspace); the JSON answer.
    pub(super) async fn opencode(
        &self,
        sb: &Arc<Sandbox>,
        method: hyper::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> std::result::Result<serde_json::Value, String> {
        let mut req = workspace_request(sb, method, path)?;
        let payload = match body {
            Some(v) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                crate::http::full(serde_json::to_vec(&v).expect("json"))
            }
            None => crate::http::empty(),
        };
        let req = req.body(payload).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(OPENCODE_TIMEOUT, async {
            let resp = self
                .mgr
                .http
                .request(req)
                .await
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), 64 << 20)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        })
        .await
        .map_err(|_| "no answer in time".to_string())??;
        let (status, bytes) = resp;
        if !status.is_success() {
            return Err(format!(
                "HTTP {}: {}",
                status.as_u16(),
                tail(&String::from_utf8_lossy(&bytes), 300)
            ));
        }
        if bytes.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&bytes).or(Ok(serde_json::Value::Null))
    }

    /// OpenCode's event stream for the workspace, once its first event arrived (the server
    /// subscribed us).
    pub(super) async fn event_stream(
        &self,
        sb: &Arc<Sandbox>,
    ) -> std::result::Result<SseReader, String> {
        let req = workspace_request(sb, hyper::Method::GET, "/event")?
            .header(hyper::header::ACCEPT, "text/event-stream")
            .body(crate::http::empty())
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(OPENCODE_TIMEOUT, self.mgr.http.request(req))
            .await
            .map_err(|_| "no answer in time".to_string())?
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status().as_u16()));
        }
        let mut reader = SseReader {
            events: crate::http::sse_events(
                http_body_util::BodyExt::into_data_stream(resp.into_body()),
                crate::http::MAX_SSE_EVENT,
            ),
        };
        // The first event (server.connected) says the subscription is in place.
        match tokio::time::timeout(OPENCODE_TIMEOUT, reader.next()).await {
            Ok(Some(_)) => Ok(reader),
            _ => Err("no first event".into()),
        }
    }
}

/// A request to `path` of a sandbox's OpenCode, scoped to the workspace directory, with the
/// server's credentials.
pub(super) fn workspace_request(
    sb: &Sandbox,
    method: hyper::Method,
    path: &str,
) -> std::result::Result<hyper::http::request::Builder, String> {
    let rec = sb.snapshot();
    let secrets = rec.opencode.ok_or("not an OpenCode sandbox")?;
    let sep = if path.contains('?') { '&' } else { '?' };
    let uri = format!(
        "http://{}:{}{path}{sep}directory=%2Fworkspace",
        rec.address,
        crate::opencode::PORT
    );
    Ok(hyper::Request::builder().method(method).uri(uri).header(
        hyper::header::AUTHORIZATION,
        crate::opencode::basic_auth(&secrets.password),
    ))
}

/// Waits until a sandbox's OpenCode answers.
pub(super) async fn wait_ready(sb: &Arc<Sandbox>) -> std::result::Result<(), String> {
    let mut rx = sb.state_tx.subscribe();
    loop {
        let s = *rx.borrow_and_update();
        match s {
            SandboxState::Ready => return Ok(()),
            s if !s.is_live() => {
                let why = sb
                    .snapshot()
                    .exit
                    .map(|e| e.reason)
                    .unwrap_or_else(|| s.as_str().into());
                return Err(format!(
                    "the sandbox ended before OpenCode was ready: {why}"
                ));
            }
            _ => {}
        }
        if rx.changed().await.is_err() {
            return Err("the sandbox went away".into());
        }
    }
}

/// OpenCode's server-sent events, one JSON `data` payload at a time.
pub(super) struct SseReader {
    events: std::pin::Pin<
        Box<
            dyn futures_util::Stream<Item = std::result::Result<crate::http::SseEvent, String>>
                + Send,
        >,
    >,
}

impl SseReader {
    /// The next event's data as JSON (events whose data is not JSON are skipped); `None` when
    /// the stream ends or breaks.
    pub(super) async fn next(&mut self) -> Option<serde_json::Value> {
        use futures_util::StreamExt;
        loop {
            match self.events.next().await? {
                Ok(ev) => {
                    if let Ok(v) = serde_json::from_str(&ev.data) {
                        return Some(v);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "OpenCode's event stream broke");
                    return None;
                }
            }
        }
    }
}
