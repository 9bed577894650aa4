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
    /// Its last message (the prompt or tool result it sends), the first [`MAX_PROMPT`]
    /// bytes of its JSON: only when agentd runs with `llm_log_prompts`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
}

/// Most bytes of a prompt an entry keeps.
pub const MAX_PROMPT: usize = 4096;

/// The last message of a request body (`messages`, or the Responses API's `input`), its JSON
/// cut to [`MAX_PROMPT`] bytes; only the top level and that list are parsed, each message
/// stays the raw text it was.
pub fn last_message(body: &[u8]) -> Option<String> {
    use serde_json::value::RawValue;
    let fields: std::collections::BTreeMap<String, &RawValue> =
        serde_json::from_slice(body).ok()?;
    let list = fields.get("messages").or_else(|| fields.get("input"))?;
    let text = match serde_json::from_str::<Vec<&RawValue>>(list.get()) {
        Ok(items) => items.last()?.get().to_string(),
        // The Responses API also takes one string as its input.
        Err(_) => list.get().to_string(),
    };
    let mut end = text.len().min(MAX_PROMPT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(text[..end].to_string())
}

impl Entry {
    /// A request for `model` agentd answered itself with `error` (never sent upstream, or no
    /// answer).
    pub fn refused(model: &str, error: &str, status: u16) -> Entry {
        Entry {
            at_ms: crate::sandbox::now_ms(),
            model: model.to_string(),
            status,
            streaming: false,
            prompt_tokens: 0,
            completion_tokens: 0,
            latency_ms: 0,
            retries: 0,
            error: Some(error.to_string()),
            prompt: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_last_message_is_cut_and_needs_a_list() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"first"},{"role":"user","content":"last words"}]}"#;
        assert_eq!(
            last_message(body).unwrap(),
            r#"{"role":"user","content":"last words"}"#
        );
        assert_eq!(
            last_message(br#"{"input":"just text"}"#).unwrap(),
            r#""just text""#
        );
        let long = format!(r#"{{"input":[{{"content":"{}"}}]}}"#, "é".repeat(5000));
        let cut = last_message(long.as_bytes()).unwrap();
        assert!(cut.len() <= MAX_PROMPT && cut.len() > MAX_PROMPT - 4);
        assert_eq!(last_message(b"{}"), None);
        assert_eq!(last_message(b"not json"), None);
    }
}
