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

/// Runs `agentd task run` with `args` on a new workspace; the task's view (its id from the
/// CLI's stderr) and the CLI's output.
fn task_run(d: &agentd_tests::daemon::Daemon, args: &[&str]) -> (serde_json::Value, String) {
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("README.md"), "hello\n").unwrap();
    let out = std::process::Command::new(agentd_tests::bin("agentd"))
        .args(["task", "run", "--workspace"])
        .arg(ws.path())
        .args(args)
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap();
    let said = format!("{}\n{}", agentd_tests::describe(&out), d.log());
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let id = stderr
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .trim_end_matches(':')
        .to_string();
    let v = d.call("GET", &format!("/v1/tasks/{id}"), None).json();
    (v, said)
}

/// Several upstreams of other protocols at once, configured in the config file: an Anthropic
/// Messages upstream and an OpenAI Responses upstream, each with its own key and allowlist,
/// next to the OpenAI-compatible one. The real OpenCode in a task's sandbox talks to each
/// through the gateway in that protocol (a streamed tool call, its result, a final answer);
/// each upstream hears its own key in its own header and nothing else; no key is in the
/// sandbox; usage is counted from each protocol's fields (Anthropic's cache tokens too); the
/// Anthropic upstream's 429 is retried after its Retry-After; a model outside an upstream's
/// allowlist is refused at create with the list; a spent budget stops an attempt on the
/// Anthropic upstream, and the agent is told in Anthropic's error shape. The default model is
/// the Anthropic upstream's, so a warm pool's OpenCode warms up on the gateway's own answer in
/// Anthropic's protocol, and a claim for another model there is served; a claim for another
/// upstream's model is no claim (a cold create).
#[test]
fn test_anthropic_and_openai_responses_upstreams() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let agent_calls = Arc::new(AtomicU64::new(0));
    let c2 = agent_calls.clone();
    let claude = MockLlm::scripted(move |req| {
        if agentd_tests::daemon::last_is_tool(req) {
            return Turn::Text("claude is done".into());
        }
        match c2.fetch_add(1, Ordering::SeqCst) {
            0 => Turn::Fail(429, Some(1)),
            _ => Turn::Bash("echo by claude > by-claude.txt".into()),
        }
    });
    let gpt = MockLlm::start("echo by gpt > by-gpt.txt");
    let chat = MockLlm::start("echo by chat > by-chat.txt");
    let keys = tempfile::tempdir().unwrap();
    let key = |name: &str, value: &str| {
        let p = keys.path().join(name);
        std::fs::write(&p, format!("{value}\n")).unwrap();
        p.display().to_string()
    };
    let config = keys.path().join("agentd.toml");
    std::fs::write(
        &config,
        format!(
            r#"llm_base_url = "{chat}"
llm_api_key_file = "{chat_key}"
llm_model = "claude/claude-mock"
warm_pools = ["opencode=1"]

[[llm_upstreams]]
name = "claude"
kind = "anthropic"
base_url = "{claude}"
api_key_file = "{claude_key}"
models = ["claude-mock"]

[[llm_upstreams]]
name = "gpt"
kind = "openai"
base_url = "{gpt}"
api_key_file = "{gpt_key}"
models = ["gpt-mock"]
"#,
            chat = chat.base_url,
            chat_key = key("chat.key", "chat-secret-key-0"),
            claude = claude.base_url,
            claude_key = key("claude.key", "claude-secret-key-1"),
            gpt = gpt.base_url,
            gpt_key = key("gpt.key", "gpt-secret-key-2"),
        ),
    )
    .unwrap();
    let gateway = agentd_tests::registry::free_port().to_string();
    let d = agentd_tests::daemon::Daemon::start(
        &images,
        &[
            "--config",
            config.to_str().unwrap(),
            "--gateway-port",
            &gateway,
        ],
    );

    // Model policy: outside an upstream's allowlist, refused at create with the list.
    let ws = tempfile::tempdir().unwrap();
    let r = d.call(
        "POST",
        "/v1/tasks",
        Some(
            json!({"prompt": "x", "workspace": {"path": ws.path()}, "model": "claude/claude-huge"}),
        ),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("claude/claude-mock, gpt/gpt-mock"),
        "{}",
        r.text()
    );

    let mut sandboxes = Vec::new();
    for (model, file, mock_usage) in [
        ("claude/claude-mock", "by-claude.txt", (25, 6)),
        ("gpt/gpt-mock", "by-gpt.txt", (30, 5)),
        ("mock", "by-chat.txt", (42, 7)),
    ] {
        let (v, said) = task_run(&d, &["--model", model, "write the file"]);
        let a = &v["attempts"][0];
        assert_eq!(v["state"], "succeeded", "{model}: {v:#}\n{said}");
        let patch = d
            .call(
                "GET",
                &format!("/v1/tasks/{}/attempts/1/diff", v["id"].as_str().unwrap()),
                None,
            )
            .text();
        assert!(patch.contains(&format!("+++ b/{file}")), "{model}: {patch}");
        let sandbox = a["sandbox"].as_str().unwrap().to_string();
        let log = d
            .call("GET", &format!("/v1/sandboxes/{sandbox}/llm"), None)
            .json();
        let answered: Vec<_> = log["requests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["status"] == 200)
            .collect();
        assert!(answered.len() >= 2, "{model}: {log:#}");
        for r in &answered {
            assert_eq!(
                (r["prompt_tokens"].as_u64(), r["completion_tokens"].as_u64()),
                (Some(mock_usage.0), Some(mock_usage.1)),
                "{model}: usage counted from the protocol's own fields: {log:#}"
            );
        }
        assert_eq!(
            a["usage"]["prompt_tokens"].as_u64(),
            Some(mock_usage.0 * answered.len() as u64),
            "{model}: {v:#}\n{log:#}"
        );
        sandboxes.push((model, sandbox, log));
    }
    // The 429 was retried after its Retry-After, inside the gateway.
    let claude_log = &sandboxes[0].2;
    let retried: Vec<_> = claude_log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["retries"] == 1)
        .collect();
    assert_eq!(retried.len(), 1, "{claude_log:#}");
    assert_eq!(retried[0]["status"], 200, "{claude_log:#}");
    assert!(
        retried[0]["latency_ms"].as_u64().unwrap() >= 1000,
        "{claude_log:#}"
    );

    // Each upstream heard its own key in its own header, and only its protocol's path.
    for s in claude.headers_seen() {
        assert_eq!(s.request, "POST /v1/messages", "{s:?}");
        assert_eq!(s.x_api_key.as_deref(), Some("claude-secret-key-1"), "{s:?}");
        assert!(s.anthropic_version.is_some(), "{s:?}");
        assert_eq!(s.authorization, None, "{s:?}");
    }
    for s in gpt.headers_seen() {
        assert_eq!(s.request, "POST /v1/responses", "{s:?}");
        assert_eq!(
            s.authorization.as_deref(),
            Some("Bearer gpt-secret-key-2"),
            "{s:?}"
        );
        assert_eq!(s.x_api_key, None, "{s:?}");
    }
    for s in chat.headers_seen() {
        // Without an allowlist, agentd asks this upstream which models it has.
        assert!(
            ["POST /v1/chat/completions", "GET /v1/models"].contains(&s.request.as_str()),
            "{s:?}"
        );
        assert_eq!(
            s.authorization.as_deref(),
            Some("Bearer chat-secret-key-0"),
            "{s:?}"
        );
    }
    assert!(!claude.headers_seen().is_empty() && !gpt.headers_seen().is_empty());

    // No key in the sandbox: not in any of its processes' environments, nor in its files
    // where OpenCode keeps its state.
    let (_, sandbox, _) = &sandboxes[0];
    let (code, out, err) = d.exec(
        sandbox,
        &[
            "sh",
            "-c",
            "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'; grep -rl secret-key /home /tmp /etc 2>/dev/null; true",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("OPENCODE_CONFIG_CONTENT"), "{out}");
    assert!(!out.contains("secret-key"), "{out}");

    // The warm pool: warmed up in Anthropic's protocol without a failure; a create for the
    // Anthropic upstream claims it, one for another upstream does not.
    let p = super::pause::pool_when_ready(&d, "opencode", 1, 1);
    assert_eq!(p["warm_up_failures"], 0, "{p:#}");
    let hits = p["hits"].as_u64().unwrap();
    let v = super::ready_opencode(&d, json!({"model": "claude/claude-mock"}));
    let claimed = v["id"].as_str().unwrap().to_string();
    let p = super::pause::pool_when_ready(&d, "opencode", 1, 2);
    assert_eq!(p["hits"].as_u64(), Some(hits + 1), "{p:#}");
    let seen = claude.requests.load(Ordering::SeqCst);
    super::prompt_until_idle(&d, &claimed, "write it in the claimed sandbox");
    assert!(claude.requests.load(Ordering::SeqCst) > seen);
    let log = d
        .call("GET", &format!("/v1/sandboxes/{claimed}/llm"), None)
        .json();
    assert!(
        log["requests"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["status"] == 200 && r["prompt_tokens"] == 25),
        "{log:#}"
    );
    let v = super::ready_opencode(&d, json!({"model": "gpt/gpt-mock"}));
    let p = d.call("GET", "/v1/pools", None).json();
    assert_eq!(p["pools"][0]["hits"].as_u64(), Some(hits + 1), "{p:#}");
    let gpt_seen = gpt.requests.load(Ordering::SeqCst);
    super::prompt_until_idle(&d, v["id"].as_str().unwrap(), "write it with gpt");
    assert!(gpt.requests.load(Ordering::SeqCst) > gpt_seen);

    // A spent budget on the Anthropic upstream: the first request spends it, the next is
    // refused, and the attempt fails saying so.
    let (v, said) = task_run(
        &d,
        &[
            "--model",
            "claude/claude-mock",
            "--budget-tokens",
            "1",
            "write it",
        ],
    );
    let a = &v["attempts"][0];
    assert_eq!(a["state"], "failed", "{v:#}\n{said}");
    assert!(
        a["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("budget_exhausted"),
        "{v:#}"
    );
    let sandbox = a["sandbox"].as_str().unwrap();
    let log = d
        .call("GET", &format!("/v1/sandboxes/{sandbox}/llm"), None)
        .json();
    assert!(
        log["requests"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["status"] == 402 && r["error"] == "budget_exhausted"),
        "{log:#}"
    );
    // The agent read the refusal: OpenCode's error (after agentd's reason) carries the
    // gateway's words, which Anthropic's SDK took from Anthropic's error shape.
    assert!(
        a["error"]
            .as_str()
            .unwrap_or_default()
            .contains("token budget is spent"),
        "{v:#}"
    );
    d.delete_all_and_check_clean();
}

/// The sandbox's audit log.
fn llm_log(d: &agentd_tests::daemon::Daemon, id: &str) -> serde_json::Value {
    d.call("GET", &format!("/v1/sandboxes/{id}/llm"), None)
        .json()
}

/// Prices and cost budgets, the daemon's daily budget (kept across a restart), usage by
/// model, `GET /v1/llm`, and the prompt log the admin turned on: a sandbox's cost budget
/// (from the configured price of its model) stops it once spent; a cost budget for a model
/// without a price is refused at create; once all sandboxes together spent the day's tokens,
/// every sandbox is refused, in OpenAI's shape, until the day ends.
#[test]
fn test_costs_daily_budget_and_prompt_log() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::start("echo hi > hi.txt");
    let gateway = agentd_tests::registry::free_port().to_string();
    let mut d = agentd_tests::daemon::Daemon::start(
        &images,
        &[
            "--llm-base-url",
            &llm.base_url,
            "--gateway-port",
            &gateway,
            "--llm-price",
            "mock=1000,2000",
            "--llm-currency",
            "EUR",
            "--llm-daily-tokens",
            "400",
            "--llm-log-prompts",
            "true",
        ],
    );
    let v = d.call("GET", "/v1/llm", None).json();
    assert_eq!(v["upstreams"][0]["name"], "agentd", "{v:#}");
    assert_eq!(v["upstreams"][0]["kind"], "openai-compatible", "{v:#}");
    assert_eq!(v["upstreams"][0]["has_key"], false, "{v:#}");
    assert_eq!(v["prices"]["mock"]["input"], 1000.0, "{v:#}");
    assert_eq!(v["currency"], "EUR", "{v:#}");
    assert_eq!(v["daily_tokens"], 400, "{v:#}");
    assert_eq!(v["today"]["tokens"], 0, "{v:#}");
    let out = std::process::Command::new(agentd_tests::bin("agentd"))
        .arg("llm")
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    assert!(text.contains("openai-compatible"), "{text}");
    assert!(text.contains("mock: 1000.0 / 2000.0"), "{text}");
    assert!(text.contains("0 tokens (of 400)"), "{text}");

    // A cost budget needs a price for the model.
    let r = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"model": "default", "budget": {"cost": 1}})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("priced: mock"), "{}", r.text());

    // 42 + 7 tokens a request at 1000 and 2000 EUR per million: 0.056 EUR; a budget of 0.05
    // lets the first through and refuses what follows.
    let v = ready_opencode(&d, json!({"model": "mock", "budget": {"cost": 0.05}}));
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["budget_cost"], 0.05, "{v:#}");
    prompt_until_idle(&d, &id, "say hi: logged-words");
    let log = llm_log(&d, &id);
    let entries = log["requests"].as_array().unwrap();
    let answered = entries.iter().filter(|r| r["status"] == 200).count() as f64;
    assert!(answered >= 1.0, "{log:#}");
    let cost = log["usage"]["cost"].as_f64().unwrap();
    assert!(
        (cost - 0.056 * answered).abs() < 1e-9,
        "cost {cost} for {answered} requests: {log:#}"
    );
    assert_eq!(log["currency"], "EUR");
    assert_eq!(
        log["usage"]["by_model"]["mock"]["requests"].as_f64(),
        Some(answered),
        "{log:#}"
    );
    assert!(
        entries
            .iter()
            .any(|r| r["status"] == 402 && r["error"] == "budget_exhausted"),
        "{log:#}"
    );
    // The admin asked for prompts: the agent's request carries the words.
    assert!(log.to_string().contains("logged-words"), "{log:#}");

    // The day's budget: sandboxes together; the one that crosses it is the last answered.
    let mut spent = false;
    for i in 0..6 {
        let v = ready_opencode(&d, json!({"model": "mock"}));
        let id = v["id"].as_str().unwrap().to_string();
        prompt_until_idle(&d, &id, &format!("round {i}"));
        let log = llm_log(&d, &id);
        if log["requests"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["status"] == 402 && r["error"] == "budget_exhausted")
        {
            spent = true;
            break;
        }
    }
    assert!(spent, "the daily budget never stopped a sandbox");
    let today = d.call("GET", "/v1/llm", None).json()["today"].clone();
    assert!(today["tokens"].as_u64().unwrap() >= 400, "{today:#}");
    // Counted in the database: a restart knows what today cost.
    d.restart(libc::SIGTERM);
    let after = d.call("GET", "/v1/llm", None).json()["today"].clone();
    assert_eq!(after, today);
    d.delete_all_and_check_clean();
}

/// Polls `GET /v1/tasks/{id}/approvals` until request `request` waits (at most 2 min); the
/// task's view then.
fn wait_approval(d: &agentd_tests::daemon::Daemon, id: &str, request: &str) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let v = d
            .call("GET", &format!("/v1/tasks/{id}/approvals"), None)
            .json();
        if let Some(a) = v["approvals"]
            .as_array()
            .and_then(|l| l.iter().find(|a| a["id"] == request))
        {
            return a.clone();
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "no approval {request}: {v:#}\n{:#}\n{}",
            d.call("GET", &format!("/v1/tasks/{id}"), None).json(),
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Task `id`'s view once it succeeded or failed (at most 3 min).
fn finished(d: &agentd_tests::daemon::Daemon, id: &str) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let v = d.call("GET", &format!("/v1/tasks/{id}"), None).json();
        if v["state"] == "succeeded" || v["state"] == "failed" {
            return v;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(180),
            "{v:#}\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A task whose budget says `ask`: when an attempt's budget is spent, the attempt waits for a
/// person (a `budget` approval) instead of failing; `once` gives one more budget and the agent
/// goes on, `always` lifts it and the attempt succeeds; `reject` fails an attempt with
/// `budget_exhausted`.
#[test]
fn test_a_person_gives_more_budget() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    // Each tool-offering request costs 49 tokens: a bash call, then a final answer once the
    // tool's result is in.
    let llm = MockLlm::start("echo more >> more.txt");
    let (d, _, _) = opencode_daemon(&images, &llm);
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("README.md"), "hello\n").unwrap();
    let r = d.call(
        "POST",
        "/v1/tasks",
        Some(
            json!({"prompt": "write more.txt", "workspace": {"path": ws.path()},
            "budget": {"tokens": 1, "ask": true}}),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let a = wait_approval(&d, &id, "budget-1-1");
    assert_eq!(a["permission"], "budget", "{a:#}");
    assert!(
        a["patterns"][0]
            .as_str()
            .unwrap()
            .starts_with("budget_exhausted: the attempt's token budget of 1 is spent"),
        "{a:#}"
    );
    let v = d.call("GET", &format!("/v1/tasks/{id}"), None).json();
    assert_eq!(v["attempts"][0]["state"], "waiting", "{v:#}");
    let r = d.call(
        "POST",
        &format!("/v1/tasks/{id}/approvals/budget-1-1"),
        Some(json!({"reply": "once"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // One more budget of 1 token is spent by the next request again: asked again.
    wait_approval(&d, &id, "budget-1-2");
    let r = d.call(
        "POST",
        &format!("/v1/tasks/{id}/approvals/budget-1-2"),
        Some(json!({"reply": "always"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = finished(&d, &id);
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    let a = &v["attempts"][0];
    assert!(a["usage"]["prompt_tokens"].as_u64().unwrap() > 42, "{v:#}");
    let patch = d
        .call("GET", &format!("/v1/tasks/{id}/attempts/1/diff"), None)
        .text();
    assert!(patch.contains("+more"), "{patch}");
    // The agent was told to go on.
    assert!(
        llm.requests_seen().iter().any(|r| {
            agentd_tests::daemon::last_user_text(r).contains("raised your LLM budget")
        }),
        "the agent was not told"
    );

    // Rejected: the attempt fails with the reason.
    let r = d.call(
        "POST",
        "/v1/tasks",
        Some(
            json!({"prompt": "write more.txt", "workspace": {"path": ws.path()},
            "budget": {"tokens": 1, "ask": true}}),
        ),
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    wait_approval(&d, &id, "budget-1-1");
    let r = d.call(
        "POST",
        &format!("/v1/tasks/{id}/approvals/budget-1-1"),
        Some(json!({"reply": "reject"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = finished(&d, &id);
    assert_eq!(v["attempts"][0]["state"], "failed", "{v:#}");
    assert!(
        v["attempts"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("budget_exhausted"),
        "{v:#}"
    );
    // A sandbox's budget has no one to ask, and no task's total.
    for budget in [
        json!({"tokens": 5, "ask": true}),
        json!({"total_tokens": 5}),
    ] {
        let r = d.call("POST", "/v1/sandboxes", Some(json!({ "budget": budget })));
        assert_eq!(r.status, 400, "{}", r.text());
    }

    // A task's total budget: two agents spend from 40 tokens together (49 a request, two
    // requests an agent); the first answered request spends it, so whichever way the two
    // interleave, each agent's second request is refused and both fail saying so (with 60,
    // one agent could finish alone before the other began).
    let r = d.call(
        "POST",
        "/v1/tasks",
        Some(
            json!({"prompt": "write more.txt", "workspace": {"path": ws.path()}, "agents": 2,
            "budget": {"total_tokens": 40}}),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let v = finished(&d, &id);
    for a in v["attempts"].as_array().unwrap() {
        assert_eq!(a["state"], "failed", "{v:#}");
        assert!(
            a["error"]
                .as_str()
                .unwrap_or_default()
                .starts_with("budget_exhausted: the task's token budget of 40 is spent"),
            "{v:#}"
        );
    }
    let used = v["usage"]["prompt_tokens"].as_u64().unwrap()
        + v["usage"]["completion_tokens"].as_u64().unwrap();
    // At most each agent's first requests in flight together cross it.
    assert!((49..=4 * 49).contains(&used), "{used}: {v:#}");
    d.delete_all_and_check_clean();
}
