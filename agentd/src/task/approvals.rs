//! A person in the loop: what the agents of a task ask permission for, and the answers.
//!
//! A task's `permissions` (`{"bash": "ask"}`) go into each attempt's OpenCode config. When an
//! agent wants such a tool, OpenCode holds the call and lists a permission request; the
//! attempt's round waits (its events say `approval` `asked`) until someone answers here (or
//! the task's time limit ends it). The requests are read from each running attempt's
//! OpenCode when asked for (nothing to keep in sync), and an answer goes to the OpenCode
//! whose request it is.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Result;
use super::{Task, TaskManager};
use crate::error::Error;

/// One permission request waiting for a person (an agent's tool call, or `budget`: an
/// attempt's spent budget).
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Approval {
    /// The attempt whose agent asks.
    pub attempt: u32,
    /// OpenCode's request id (answer it with `POST /v1/tasks/{id}/approvals/{request}`).
    pub id: String,
    /// The tool's permission (`bash`, `edit`, `webfetch`, ...).
    pub permission: String,
    /// What exactly (the command, the files), as OpenCode says it.
    pub patterns: Vec<String>,
    /// OpenCode's details of the call (capped at 4 KiB of JSON).
    pub metadata: serde_json::Value,
}

/// An answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    /// Let this call run.
    Once,
    /// Let this call and the same kind run from now on.
    Always,
    /// Refuse it (the agent is told, with the message if one is given).
    Reject,
}

impl Reply {
    fn as_str(self) -> &'static str {
        match self {
            Reply::Once => "once",
            Reply::Always => "always",
            Reply::Reject => "reject",
        }
    }
}

/// `POST /v1/tasks/{id}/approvals/{request}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    /// `once`, `always` or `reject`.
    pub reply: Reply,
    /// For `reject`: what the agent is told (at most 4 KiB).
    pub message: Option<String>,
}

fn capped(v: &serde_json::Value) -> serde_json::Value {
    let s = v.to_string();
    if s.len() <= 4096 {
        v.clone()
    } else {
        serde_json::Value::String(crate::text::tail(&s, 4096))
    }
}

impl TaskManager {
    /// The permission requests of `task`'s running attempts.
    pub async fn approvals(&self, task: &Arc<Task>) -> Result<Vec<Approval>> {
        let mut list: Vec<Approval> = self
            .pending(task)
            .await
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        list.extend(self.budget_approvals(task));
        Ok(list)
    }

    async fn pending(&self, task: &Arc<Task>) -> Vec<(Approval, crate::opencode::client::Client)> {
        let rec = task.snapshot();
        let mut out = Vec::new();
        for a in &rec.attempts {
            let (Some(sandbox), Some(session)) = (&a.sandbox, &a.session) else {
                continue;
            };
            if a.state.is_terminal() {
                continue;
            }
            let Ok(sb) = self.mgr.get(sandbox) else {
                continue;
            };
            let Ok(client) = self.agent(&sb) else {
                continue;
            };
            let Ok(list) = client.permissions().await else {
                continue;
            };
            for p in list
                .iter()
                .filter(|p| p["sessionID"].as_str() == Some(session.as_str()))
            {
                out.push((
                    Approval {
                        attempt: a.n,
                        id: crate::text::tail(p["id"].as_str().unwrap_or_default(), 100),
                        permission: crate::text::tail(
                            p["permission"].as_str().unwrap_or_default(),
                            100,
                        ),
                        patterns: p["patterns"]
                            .as_array()
                            .map(|v| {
                                v.iter()
                                    .take(10)
                                    .map(|s| crate::text::tail(s.as_str().unwrap_or_default(), 200))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        metadata: capped(&p["metadata"]),
                    },
                    client.clone(),
                ));
            }
        }
        out
    }

    /// Answers permission request `request` of `task`.
    pub async fn approve(
        &self,
        task: &Arc<Task>,
        request: &str,
        answer: Answer,
    ) -> Result<Approval> {
        if answer.message.as_ref().is_some_and(|m| m.len() > 4096) {
            return Err(Error::Invalid("message is longer than 4 KiB".into()));
        }
        let id = task.snapshot().id;
        // A spent budget's request is agentd's own; the others are OpenCode's.
        let approval = match self.answer_budget(task, request, answer.reply) {
            Some(approval) => approval,
            None => {
                let Some((approval, client)) = self
                    .pending(task)
                    .await
                    .into_iter()
                    .find(|(a, _)| a.id == request)
                else {
                    return Err(Error::NotFound(format!(
                        "task {id} has no request {request:?} waiting (GET /v1/tasks/{id}/approvals lists them)"
                    )));
                };
                client
                    .reply_permission(request, answer.reply.as_str(), answer.message.as_deref())
                    .await
                    .map_err(|e| {
                        Error::Conflict(format!("OpenCode did not take the answer: {e}"))
                    })?;
                approval
            }
        };
        self.emit(
            task,
            "approval",
            serde_json::json!({
                "attempt": approval.attempt, "request": request, "state": "replied",
                "reply": answer.reply.as_str(),
            }),
        );
        Ok(approval)
    }
}
