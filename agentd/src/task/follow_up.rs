//! A person's follow-up to one attempt (`POST /v1/tasks/{id}/attempts/{n}/messages`, `agentd
//! task say`): a message for the attempt's agent, in its own session.
//!
//! - To a working attempt (queued, starting, running, waiting, checking) it is kept with the
//!   attempt and sent when the agent's current turn ends, before the check: the agent reads it
//!   with what it did so far, and the check runs after it answered.
//! - To a finished attempt whose sandbox is still kept (the task's grace period), it reopens
//!   the attempt: the agent gets the message, the check runs again, the diff is taken again,
//!   and the attempt ends with the new result. Its time limit starts again (the task's
//!   `timeout_secs`). A cancelled task's attempts are not reopened.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{now_ms, Result, Task, TaskManager, TaskState};
use crate::error::Error;

/// Longest follow-up message.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most follow-ups waiting for an attempt's turn to end.
const MAX_PENDING: usize = 16;

/// `POST /v1/tasks/{id}/attempts/{n}/messages`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FollowUp {
    /// What the agent is told (at most 64 KiB).
    pub text: String,
}

/// What became of a follow-up.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Said {
    /// The attempt.
    pub attempt: u32,
    /// The attempt was finished and runs again for it.
    pub reopened: bool,
    /// Follow-ups waiting for the agent's turn to end, this one included.
    pub pending: u64,
}

impl TaskManager {
    /// Hands `text` to attempt `n` of `task` (see the module's doc).
    pub async fn say(self: &Arc<Self>, task: &Arc<Task>, n: u32, text: String) -> Result<Said> {
        if text.trim().is_empty() {
            return Err(Error::Invalid("text is empty".into()));
        }
        if text.len() > MAX_MESSAGE {
            return Err(Error::Invalid(format!(
                "text is longer than {} KiB",
                MAX_MESSAGE / 1024
            )));
        }
        let rec = task.snapshot();
        let id = rec.id.clone();
        let Some(a) = rec.attempts.iter().find(|a| a.n == n) else {
            return Err(Error::NotFound(format!(
                "task {id} has no attempt {n} (it has {})",
                rec.attempts.len()
            )));
        };
        if rec.deleting {
            return Err(Error::Conflict(format!("task {id} is being deleted")));
        }
        if !a.state.is_terminal() {
            let pending = {
                let mut r = task.record.lock().expect("task record lock");
                let Some(a) = r.attempts.iter_mut().find(|a| a.n == n) else {
                    return Err(Error::NotFound(format!("task {id} has no attempt {n}")));
                };
                if a.follow_ups.len() >= MAX_PENDING {
                    return Err(Error::Quota(format!(
                        "attempt {n} has {MAX_PENDING} follow-ups waiting for its agent's turn to end: retry then"
                    )));
                }
                a.follow_ups.push(text.clone());
                a.follow_ups.len() as u64
            };
            // Kept before it is acknowledged: a restart sends it rather than losing it.
            if let Err(e) = self.persist_checked(task) {
                let mut r = task.record.lock().expect("task record lock");
                if let Some(a) = r.attempts.iter_mut().find(|a| a.n == n) {
                    if let Some(i) = a.follow_ups.iter().rposition(|t| *t == text) {
                        a.follow_ups.remove(i);
                    }
                }
                return Err(e);
            }
            self.emit(
                task,
                "follow_up",
                serde_json::json!({"attempt": n, "state": "queued", "bytes": text.len()}),
            );
            return Ok(Said {
                attempt: n,
                reopened: false,
                pending,
            });
        }
        // A finished attempt: reopened, if its sandbox and session are still there.
        if rec.stop == Some(TaskState::Cancelled) {
            return Err(Error::Conflict(format!(
                "task {id} was cancelled: its attempts are not reopened (start a new task)"
            )));
        }
        let live = a
            .sandbox
            .as_deref()
            .and_then(|s| self.mgr.get(s).ok())
            .is_some_and(|sb| sb.snapshot().state.is_live());
        if !live || a.session.is_none() || rec.sandboxes_removed {
            return Err(Error::Conflict(format!(
                "attempt {n}'s sandbox is gone (a finished task keeps its sandboxes for its grace_secs): start a new task, e.g. from its patch"
            )));
        }
        // A finished attempt's sandbox is paused: resumed for the agent.
        if let Some(sb) = a.sandbox.as_deref().and_then(|s| self.mgr.get(s).ok()) {
            self.mgr.wake(&sb, true).await?;
        }
        let now = now_ms();
        // Readers of its events follow it again, to its next task.finished.
        task.events
            .finished
            .store(false, std::sync::atomic::Ordering::SeqCst);
        {
            let mut r = task.record.lock().expect("task record lock");
            if r.attempts.iter().all(|a| a.state.is_terminal()) {
                // Nothing runs: a time limit that ended the task ends nothing any more.
                r.stop = None;
                task.stop_tx.send_replace(None);
            }
            if let Some(a) = r.attempts.iter_mut().find(|a| a.n == n) {
                a.follow_ups.push(text.clone());
                a.limit_from = Some(now);
                a.waited_ms = 0;
                a.waiting_since = None;
                a.finished_at = None;
                a.error = None;
                a.note = None;
            }
        }
        self.set_attempt_state(
            task,
            n,
            TaskState::Running,
            Some("a follow-up reopened the attempt"),
        );
        self.emit(
            task,
            "follow_up",
            serde_json::json!({"attempt": n, "state": "reopened", "bytes": text.len()}),
        );
        let (me, t) = (self.clone(), task.clone());
        tokio::spawn(async move {
            me.clone().attempt(t.clone(), n).await;
            let rec = t.snapshot();
            if rec.state.is_terminal() {
                me.emit(
                    &t,
                    "task.finished",
                    serde_json::json!({"state": rec.state.as_str()}),
                );
            }
        });
        Ok(Said {
            attempt: n,
            reopened: true,
            pending: 1,
        })
    }

    /// The follow-ups waiting for attempt `n`, joined into one message, and how many they
    /// are; they stay until [`TaskManager::sent_follow_ups`] (a crash in between sends them
    /// again rather than losing them).
    pub(super) fn follow_ups(&self, task: &Task, n: u32) -> Option<(String, usize)> {
        let r = task.record.lock().expect("task record lock");
        let a = r.attempts.iter().find(|a| a.n == n)?;
        (!a.follow_ups.is_empty()).then(|| (a.follow_ups.join("\n\n"), a.follow_ups.len()))
    }

    /// Removes the first `count` follow-ups of attempt `n`: they reached the agent.
    pub(super) fn sent_follow_ups(&self, task: &Task, n: u32, count: usize) {
        {
            let mut r = task.record.lock().expect("task record lock");
            if let Some(a) = r.attempts.iter_mut().find(|a| a.n == n) {
                a.follow_ups.drain(..count.min(a.follow_ups.len()));
            }
        }
        self.persist(task);
    }
}
