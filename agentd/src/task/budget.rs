//! A spent budget with a person in the loop: a task whose `budget` says `ask` does not fail
//! an attempt when its sandbox's budget is spent; the attempt waits (its time limit paused)
//! for an answer to an approval with the permission `budget`, listed and answered as the
//! agents' permission requests are (`GET /v1/tasks/{id}/approvals`, `agentd task run` at a
//! terminal): `once` gives the sandbox one more budget, `always` lifts it, `reject` fails the
//! attempt with `budget_exhausted`. The same for the task's total budget (all attempts
//! together): `once` gives the task its total once more. With more budget, the agent is told
//! to go on.

use std::sync::Arc;

use super::approvals::Reply;
use super::model::BudgetAsk;
use super::{budget_spent, Task, TaskManager};
use crate::sandbox::Sandbox;

/// What the agent is told when a person gave more budget.
pub const GO_ON: &str =
    "A person raised your LLM budget after it was spent. Continue the task from where you stopped.";

impl TaskManager {
    /// After a round that ended in the agent's failure: when the attempt's budget is spent and
    /// the task asks a person, waits for the answer. `true`: there is more budget now (the
    /// caller tells the agent to go on); `false`: the failure stands.
    pub(super) async fn more_budget(&self, task: &Arc<Task>, n: u32, sb: &Arc<Sandbox>) -> bool {
        let rec = task.snapshot();
        let Some(budget) = rec.request.budget.clone().filter(|b| b.ask == Some(true)) else {
            return false;
        };
        let mine = budget_spent(&sb.snapshot());
        let total = self
            .spend(&rec.id, &sb.snapshot().id)
            .and_then(|s| s.spent());
        let Some(spent) = mine.clone().or(total.clone()) else {
            return false;
        };
        let k = self.attempt_snapshot(task, n).budget_asks + 1;
        let id = format!("budget-{n}-{k}");
        self.update(task, n, |a| {
            a.budget_asks = k;
            a.budget_ask = Some(BudgetAsk {
                id: id.clone(),
                spent: spent.clone(),
                answer: None,
            });
        });
        self.set_waiting(
            task,
            n,
            true,
            Some("its budget is spent: a person may give more"),
        );
        self.emit(
            task,
            "approval",
            serde_json::json!({
                "attempt": n, "round": self.attempt_snapshot(task, n).round, "request": id,
                "state": "asked", "permission": "budget", "patterns": [spent],
            }),
        );
        // The answer comes through `approve` (the attempt's own stop and time limit end this
        // wait from outside).
        let reply = loop {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            if let Some(r) = self
                .attempt_snapshot(task, n)
                .budget_ask
                .and_then(|b| b.answer)
            {
                break r;
            }
        };
        self.update(task, n, |a| a.budget_ask = None);
        self.set_waiting(task, n, false, None);
        if reply == Reply::Reject {
            return false;
        }
        if total.is_some() {
            // The task's total: once more of it, or none.
            {
                let mut r = task.record.lock().expect("task record lock");
                match reply {
                    Reply::Once => r.budget_grants += 1,
                    _ => r.budget_unlimited = true,
                }
            }
            self.persist(task);
        }
        if mine.is_none() {
            return true;
        }
        let s = sb.snapshot();
        let (tokens, cost) = match reply {
            // One more budget on top of what is spent.
            Reply::Once => (
                budget
                    .tokens
                    .map(|t| s.usage.tokens().max(s.budget_tokens.unwrap_or(0)) + t),
                budget
                    .cost
                    .map(|c| s.usage.cost.max(s.budget_cost.unwrap_or(0.0)) + c),
            ),
            _ => (None, None),
        };
        match self.mgr.set_budget(sb, tokens, cost) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(task = %rec.id, attempt = n, error = %e, "failed to raise the budget");
                false
            }
        }
    }

    /// The `budget` approvals waiting in `task`'s attempts.
    pub(super) fn budget_approvals(&self, task: &Task) -> Vec<super::approvals::Approval> {
        task.snapshot()
            .attempts
            .iter()
            .filter(|a| !a.state.is_terminal())
            .filter_map(|a| {
                let b = a.budget_ask.as_ref().filter(|b| b.answer.is_none())?;
                Some(super::approvals::Approval {
                    attempt: a.n,
                    id: b.id.clone(),
                    permission: "budget".into(),
                    patterns: vec![b.spent.clone()],
                    metadata: serde_json::json!({"usage": a.usage}),
                })
            })
            .collect()
    }

    /// Answers budget request `request`, if one of `task`'s attempts has it waiting.
    pub(super) fn answer_budget(
        &self,
        task: &Task,
        request: &str,
        reply: Reply,
    ) -> Option<super::approvals::Approval> {
        let approval = self
            .budget_approvals(task)
            .into_iter()
            .find(|a| a.id == request)?;
        self.update(task, approval.attempt, |a| {
            if let Some(b) = a.budget_ask.as_mut() {
                b.answer = Some(reply);
            }
        });
        Some(approval)
    }
}
