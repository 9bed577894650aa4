//! The agent's side of an attempt: OpenCode's HTTP API in the sandbox (sessions, prompts,
//! messages, aborts) and its event stream, followed until the session is idle, counting tool
//! calls. What OpenCode says is data: bounded, never interpreted beyond its fields.

use std::sync::Arc;

use super::*;
use crate::opencode::client::Client;

/// Most open permission requests followed per round.
const MAX_ASKED: usize = 1000;

impl TaskManager {
    /// One round of the agent: prompt (unless a resumed round sent it already), then follow
    /// the events until the session is idle. With `said`, that message is the prompt (a
    /// person's, between rounds).
    pub(super) async fn agent_round(
        &self,
        task: &Arc<Task>,
        n: u32,
        sb: &Arc<Sandbox>,
        session: &str,
        rec: &TaskRecord,
        said: Option<(&str, usize)>,
    ) -> std::result::Result<(), Outcome> {
        let a = self.attempt_snapshot(task, n);
        let round = a.round;
        let t = Instant::now();
        let agent = self.agent(sb).map_err(Outcome::Failed)?;
        // Subscribe before prompting: the idle event cannot be missed.
        let mut events = agent
            .events()
            .await
            .map_err(|e| Outcome::Failed(format!("OpenCode's event stream: {e}")))?;
        let mut idle_now = false;
        if let Some((text, count)) = said {
            agent
                .prompt(session, text)
                .await
                .map_err(|e| Outcome::Failed(format!("OpenCode refused the follow-up: {e}")))?;
            self.sent_follow_ups(task, n, count);
            self.emit(
                task,
                "prompt",
                serde_json::json!({"attempt": n, "round": round, "bytes": text.len(), "follow_up": true}),
            );
        } else if a.prompted < round {
            let text = if round == 1 {
                rec.request.prompt.clone()
            } else {
                follow_up(rec.request.check.as_deref().unwrap_or(""), a.check.as_ref())
            };
            agent
                .prompt(session, &text)
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
            idle_now = agent.is_idle(session).await;
        }
        // Requests already waiting (a resumed round): the attempt waits for a person.
        let mut asked: std::collections::HashSet<String> = agent
            .permissions()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|p| p["sessionID"].as_str() == Some(session))
            .filter_map(|p| p["id"].as_str().map(|s| tail(s, 100)))
            .take(MAX_ASKED)
            .collect();
        let waiting = self.attempt_snapshot(task, n).waiting_since.is_some();
        if !asked.is_empty() || waiting {
            self.set_waiting(task, n, !asked.is_empty(), None);
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
                        if let Ok(e) = agent.events().await {
                            events = e;
                            if agent.is_idle(session).await {
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
                    super::attempt::Seen::Text(text) => {
                        self.emit(
                            task,
                            "text",
                            serde_json::json!({"attempt": n, "round": round, "text": text}),
                        );
                    }
                    super::attempt::Seen::Tool {
                        new,
                        tool,
                        status,
                        title,
                        ended,
                    } => {
                        if new {
                            // In memory only: the count is saved with the attempt's next
                            // state change, not with a durable commit per tool call.
                            self.update_unsaved(task, n, |a| a.tool_calls += 1);
                        }
                        let calls = self.attempt_snapshot(task, n).tool_calls;
                        let mut ev = serde_json::json!({"attempt": n, "round": round, "tool": tool, "status": status, "title": title, "tool_calls": calls});
                        if let Some((input, output)) = ended {
                            ev["input"] = input;
                            ev["output"] = output.into();
                        }
                        self.emit(task, "tool", ev);
                    }
                    super::attempt::Seen::Error(msg) => {
                        self.emit(
                            task,
                            "error",
                            serde_json::json!({"attempt": n, "round": round, "message": msg}),
                        );
                        error = Some(msg);
                    }
                    super::attempt::Seen::Approval {
                        asked: is_ask,
                        id,
                        what,
                    } => {
                        // The round waits for a person; the event says what for.
                        let mut ev = serde_json::json!({
                            "attempt": n, "round": round, "request": id,
                            "state": if is_ask { "asked" } else { "answered" },
                        });
                        if let (Some(e), Some(w)) = (ev.as_object_mut(), what.as_object()) {
                            e.extend(w.clone());
                        }
                        self.emit(task, "approval", ev);
                        // Waiting while any request of the round is open; its time limit
                        // is paused meanwhile.
                        let before = asked.is_empty();
                        if is_ask && asked.len() < MAX_ASKED {
                            asked.insert(id);
                        } else if !is_ask {
                            asked.remove(&id);
                        }
                        if before != asked.is_empty() {
                            let detail = if asked.is_empty() {
                                "answered: the agent goes on"
                            } else {
                                "the agent waits for a person to answer a permission request"
                            };
                            self.set_waiting(task, n, !asked.is_empty(), Some(detail));
                        }
                    }
                    super::attempt::Seen::Idle => break,
                }
            }
        }
        if self.attempt_snapshot(task, n).waiting_since.is_some() {
            self.set_waiting(task, n, false, None);
        }
        let round_ms = ms(t.elapsed());
        let message = agent
            .last_message(session)
            .await
            .map(|m| tail(&m, MAX_MESSAGE_BYTES));
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

    /// The typed client of the sandbox's OpenCode, scoped to the workspace.
    pub(super) fn agent(&self, sb: &Sandbox) -> std::result::Result<Client, String> {
        let rec = sb.snapshot();
        let secrets = rec.opencode.ok_or("not an OpenCode sandbox")?;
        Ok(Client::new(
            &self.mgr.http,
            rec.address,
            &secrets.password,
            WORKSPACE_DIR,
        ))
    }
}
