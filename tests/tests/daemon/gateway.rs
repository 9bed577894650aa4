//! The LLM gateway's retries, budgets and audit log, with the real OpenCode in a sandbox: an
//! upstream that answers 429 (with `Retry-After`) and then 503 is retried until it answers;
//! a sandbox whose token budget is spent gets a readable refusal and the upstream sees
//! nothing more; every request is in the sandbox's audit log (model, tokens, retries,
//! status), never its prompt; a model the admin did not allow is refused at create; tokens
//! are counted by model in /metrics; a task attempt whose budget is spent fails saying so.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use agentd_tests::daemon::{MockLlm, Turn};
use agentd_tests::require_sandbox_support;
use serde_json::json;

use super::{opencode_daemon, prompt_until_idle, ready_opencode, store};

#[test]
fn test_gateway_retries_budgets_and_audit() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    // The agent's (tool-offering) requests: a 429 asking for 1 s, a 503, then an answer.
    let calls = Arc::new(AtomicU64::new(0));
    let c2 = calls.clone();
    let llm = MockLlm::scripted(move |_| match c2.fetch_add(1, Ordering::SeqCst) {
        0 => Turn::Fail(429, Some(1)),
        1 => Turn::Fail(503, None),
        _ => Turn::Text("hello from the upstream".into()),
    });
    let gateway = agentd_tests::registry::free_port().to_string();
    let d = agentd_tests::daemon::Daemon::start(
        &images,
        &[
            "--llm-base-url",
            &llm.base_url,
            "--gateway-port",
            &gateway,
            "--llm-models",
            "default,mock",
        ],
    );
    // Model policy: a model the upstream offers but the admin did not allow is refused at
    // create, with the list; so is a task asking for it.
    let r = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"model": "mock-large"})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("llm_models: default, mock"),
        "{}",
        r.text()
    );
    let ws = tempfile::tempdir().unwrap();
    let r = d.call(
        "POST",
        "/v1/tasks",
        Some(json!({"prompt": "x", "workspace": {"path": ws.path()}, "model": "mock-large"})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let v = ready_opencode(&d, json!({"budget": {"tokens": 60}}));
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["budget_tokens"], 60, "{v:#}");
    prompt_until_idle(&d, &id, "say hello: secret-prompt-words");
    let log = d
        .call("GET", &format!("/v1/sandboxes/{id}/llm"), None)
        .json();
    let requests = log["requests"].as_array().unwrap().clone();
    let retried: Vec<_> = requests.iter().filter(|r| r["retries"] == 2).collect();
    assert_eq!(retried.len(), 1, "{log:#}");
    assert_eq!(retried[0]["status"], 200, "{log:#}");
    assert_eq!(retried[0]["prompt_tokens"], 42, "{log:#}");
    assert_eq!(retried[0]["completion_tokens"], 7, "{log:#}");
    assert!(
        retried[0]["latency_ms"].as_u64().unwrap() >= 1000,
        "the 429's Retry-After was not waited for: {log:#}"
    );
    assert!(!log.to_string().contains("secret-prompt-words"), "{log:#}");
    let used = log["usage"]["prompt_tokens"].as_u64().unwrap()
        + log["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        used >= 60,
        "the first prompt should spend the budget: {log:#}"
    );
    // Spent: the next prompt is refused by agentd, and the upstream sees nothing of it.
    let seen = llm.requests.load(Ordering::SeqCst);
    prompt_until_idle(&d, &id, "again");
    assert_eq!(
        llm.requests.load(Ordering::SeqCst),
        seen,
        "a request past the budget reached the upstream"
    );
    let log = d
        .call("GET", &format!("/v1/sandboxes/{id}/llm"), None)
        .json();
    let refused: Vec<_> = log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["error"] == "budget_exhausted")
        .collect();
    assert!(!refused.is_empty(), "{log:#}");
    assert_eq!(refused[0]["status"], 402, "{log:#}");
    let after = log["usage"]["prompt_tokens"].as_u64().unwrap()
        + log["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(after, used, "{log:#}");
    // Tokens by model in /metrics.
    let metrics = d.call("GET", "/metrics", None).text();
    assert!(
        metrics.contains("agentd_llm_model_tokens_total{model=\"default\",kind=\"completion\"}"),
        "{metrics}"
    );
    // What the agent was told: the session's last message carries the gateway's words.
    let sessions = d
        .call("GET", &format!("/v1/sandboxes/{id}/opencode/session"), None)
        .json();
    let text = sessions.to_string();
    let mut said = String::new();
    for s in sessions.as_array().into_iter().flatten() {
        let sid = s["id"].as_str().unwrap_or_default();
        let m = d.call(
            "GET",
            &format!("/v1/sandboxes/{id}/opencode/session/{sid}/message"),
            None,
        );
        said.push_str(&m.text());
    }
    assert!(
        said.contains("token budget is spent"),
        "the agent was not told why: {text}\n{said}"
    );
    d.delete_all_and_check_clean();
}

/// A task's `budget`: each attempt's sandbox gets it; once spent, the agent's next request is
/// refused and the attempt fails with `budget_exhausted` as its reason (the CLI's
/// `--budget-tokens`).
#[test]
fn test_a_task_attempt_stops_when_its_budget_is_spent() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    // The agent runs a command (one request), then would answer (a second): the budget of 1
    // token lets the first through (49 tokens) and refuses the second.
    let llm = MockLlm::start("echo ran > ran.txt");
    let (d, _, _) = opencode_daemon(&images, &llm);
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("README.md"), "hello\n").unwrap();
    let out = std::process::Command::new(agentd_tests::bin("agentd"))
        .args(["task", "run", "--budget-tokens", "1", "--workspace"])
        .arg(ws.path())
        .arg("write ran.txt")
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{}", agentd_tests::describe(&out));
    assert!(
        stderr.contains("budget_exhausted"),
        "{}\n{}",
        agentd_tests::describe(&out),
        d.log()
    );
    let tasks = d.call("GET", "/v1/tasks", None).json();
    let id = tasks["tasks"][0]["id"].as_str().unwrap().to_string();
    let v = d.call("GET", &format!("/v1/tasks/{id}"), None).json();
    let a = &v["attempts"][0];
    assert_eq!(a["state"], "failed", "{v:#}");
    assert!(
        a["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("budget_exhausted: the attempt's token budget of 1 is spent"),
        "{v:#}"
    );
    d.delete_all_and_check_clean();
}
