//! The gateway's audit log: one entry per request a sandbox sent (model, tokens, latency,
//! status, retries; never the prompt), the newest [`MAX_ENTRIES`] per sandbox, kept in memory
//! with the sandbox (a restart of agentd starts them empty) and served at
//! `GET /v1/sandboxes/{id}/llm`.

use std::collections::VecDeque;

use crate::sandbox::Sandbox;

/// Entries kept per sandbox (the oldest go first).
pub const MAX_ENTRIES: usize = 1000;

/// One request through the gateway.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct Entry {
    /// When it came, Unix ms.
    pub at_ms: u64,
    /// The model it asked for (as sent upstream).
    pub model: String,
    /// The status answered (the upstream's, or agentd's own refusal).
    pub status: u16,
    /// Streamed (SSE).
    pub streaming: bool,
    /// Prompt tokens the upstream reported.
    pub prompt_tokens: u64,
    /// Completion tokens the upstream reported.
    pub completion_tokens: u64,
    /// From its arrival to the end of its answer, ms.
    pub latency_ms: u64,
    /// Times the upstream answered 429 or 5xx and agentd tried again.
    pub retries: u32,
    /// Why agentd did not forward it, or why it failed.
    pub error: Option<String>,
}

impl Entry {
    /// A request for `model` agentd answered itself with `error` (never sent upstream, or no
    /// answer).
    pub fn refused(model: &str, error: &str) -> Entry {
        Entry {
            at_ms: crate::sandbox::now_ms(),
            model: model.to_string(),
            status: if error == "budget_exhausted" {
                402
            } else {
                502
            },
            streaming: false,
            prompt_tokens: 0,
            completion_tokens: 0,
            latency_ms: 0,
            retries: 0,
            error: Some(error.to_string()),
        }
    }
}

/// A sandbox's entries.
#[derive(Debug, Default)]
pub struct Log(std::sync::Mutex<VecDeque<Entry>>);

impl Log {
    /// Every entry kept, oldest first.
    pub fn entries(&self) -> Vec<Entry> {
        self.0.lock().expect("lock").iter().cloned().collect()
    }
}

/// Adds `entry` to `sb`'s log.
pub fn record(sb: &Sandbox, entry: Entry) {
    let mut q = sb.llm_log.0.lock().expect("lock");
    if q.len() >= MAX_ENTRIES {
        q.pop_front();
    }
    q.push_back(entry);
}
