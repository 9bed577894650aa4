//! `agentd serve` end to end: the real daemon, shims, OpenCode binary and kernel features, with
//! a mock LLM upstream speaking OpenAI's streaming protocol.

use std::process::Command;
use std::time::Duration;

use agentd_tests::daemon::{follow_until, Daemon, MockLlm};
use agentd_tests::require_sandbox_support;
use serde_json::json;

#[path = "daemon/e2b.rs"]
mod e2b;
#[path = "daemon/egress.rs"]
mod egress;
#[path = "daemon/faults.rs"]
mod faults;
#[path = "daemon/gateway.rs"]
mod gateway;
#[path = "daemon/hardening.rs"]
mod hardening;
#[path = "daemon/pause.rs"]
mod pause;
#[path = "daemon/ssh.rs"]
mod ssh;
#[path = "daemon/tasks.rs"]
mod tasks;
#[path = "daemon/terminal.rs"]
mod terminal;

const FILE: &str = "/home/agent/written-by-agent.txt";

fn store() -> Option<std::path::PathBuf> {
    agentd_tests::opencode_store().map(|p| p.join("images"))
}

/// A daemon whose LLM upstream is `llm`, listening on TCP too; its gateway port and its TCP
/// address.
fn opencode_daemon(images: &std::path::Path, llm: &MockLlm) -> (Daemon, u16, String) {
    let port = agentd_tests::registry::free_port();
    let listen = format!("127.0.0.1:{}", agentd_tests::registry::free_port());
    let d = Daemon::start(
        images,
        &[
            "--llm-base-url",
            &llm.base_url,
            "--gateway-port",
            &port.to_string(),
            "--listen",
            &listen,
        ],
    );
    (d, port, listen)
}

/// An OpenCode sandbox, ready; its view.
fn ready_opencode(d: &Daemon, body: serde_json::Value) -> serde_json::Value {
    let r = d.call("POST", "/v1/sandboxes", Some(body));
    assert_eq!(r.status, 201, "{}\n{}", r.text(), d.log());
    let v = r.json();
    assert_eq!(v["opencode"], true, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let v = d.wait_state(&id, "ready", Duration::from_secs(120));
    assert_eq!(v["state"], "ready", "{v}\n{}", d.log());
    v
}

/// A new session in sandbox `id`'s OpenCode (through agentd's proxy), `text` sent as its
/// prompt, followed on OpenCode's event stream until `session.idle` (at most 2 min).
fn prompt_until_idle(d: &Daemon, id: &str, text: &str) {
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/opencode/session"),
        Some(json!({})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let session = r.json()["id"].as_str().unwrap().to_string();
    let socket = d.socket.clone();
    let events = std::thread::spawn({
        let path = format!("/v1/sandboxes/{id}/opencode/event");
        move || follow_until(&socket, &path, "session.idle", Duration::from_secs(120))
    });
    std::thread::sleep(Duration::from_millis(500));
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/opencode/session/{session}/prompt_async"),
        Some(json!({"parts": [{"type": "text", "text": text}]})),
    );
    assert!(
        r.status == 204 || r.status == 200,
        "{} {}",
        r.status,
        r.text()
    );
    let seen = events.join().unwrap();
    assert!(
        seen.contains("session.idle"),
        "no session.idle in the event stream:\n{seen}\n{}",
        d.log()
    );
}

/// The whole path of a user: an OpenCode sandbox, a session through the proxy (the agent's
/// bash tool call comes from the mock LLM through agentd's gateway) followed on its event
/// stream until idle, the file it wrote read through the files API, the tokens counted;
/// then the official OpenCode SDK does the same through agentd's TCP listener.
#[test]
fn test_an_agent_session_through_the_proxy() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::start(&format!("echo agent-was-here > {FILE}"));
    let (d, _, listen) = opencode_daemon(&images, &llm);
    let a = ready_opencode(
        &d,
        json!({"image": "opencode", "name": "a", "labels": {"t": "1"}}),
    );
    let id = a["id"].as_str().unwrap().to_string();
    prompt_until_idle(&d, &id, "write the file");
    assert!(llm.requests.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    let r = d.call(
        "GET",
        &format!("/v1/sandboxes/{id}/files?path={FILE}"),
        None,
    );
    assert_eq!(
        (r.status, r.text().trim()),
        (200, "agent-was-here"),
        "{}",
        d.log()
    );
    let a = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert!(a["usage"]["prompt_tokens"].as_u64().unwrap() >= 42, "{a}");
    assert!(
        a["usage"]["completion_tokens"].as_u64().unwrap() >= 7,
        "{a}"
    );
    let metrics = d.call("GET", "/metrics", None).text();
    assert!(
        metrics.contains("agentd_sandboxes{state=\"ready\"} 1"),
        "{metrics}"
    );
    if let Some(sdk) = agentd_tests::opencode_sdk() {
        let script = sdk.join("session.mjs");
        std::fs::copy(
            agentd_tests::workspace_root().join("tests/sdk/session.mjs"),
            &script,
        )
        .unwrap();
        let out = std::process::Command::new("node")
            .arg(&script)
            .env(
                "BASE_URL",
                format!("http://{listen}/v1/sandboxes/{id}/opencode"),
            )
            .env("TOKEN", d.token())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "SDK session failed: {}\n{}",
            agentd_tests::describe(&out),
            d.log()
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["text"], "All done: the file is written.", "{v}");
        assert_eq!(v["tools"], json!(["bash"]), "{v}");
    }
    d.delete_all_and_check_clean();
}

/// An upload belongs to the sandbox's user, as its home does; a symlink planted inside
/// leads to the sandbox's own files, never the host's.
#[test]
fn test_files_api_keeps_to_the_sandbox() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = small_daemon(&images, &[]);
    let id = plain(&d, json!({}));
    let r = agentd_tests::daemon::request(
        &d.socket,
        "PUT",
        &format!("/v1/sandboxes/{id}/files?path=/home/agent/up.txt"),
        Some(b"uploaded"),
        "application/octet-stream",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (code, out, _) = d.exec(&id, &["sh", "-c", "cat /home/agent/up.txt; echo; stat -c %u:%g /home/agent/up.txt /home/agent; ln -s /etc /home/agent/hostetc"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!((code, lines[0]), (0, "uploaded"), "{out}");
    assert_eq!(
        lines[1], lines[2],
        "uploads belong to the sandbox's user, as its home does: {out}"
    );
    let r = d.call(
        "GET",
        &format!("/v1/sandboxes/{id}/files?path=/home/agent/hostetc/hostname"),
        None,
    );
    // /etc/hostname of the sandbox's own rootfs (none in the image), never the host's.
    assert_eq!(r.status, 404, "{}", r.text());
    d.delete_all_and_check_clean();
}

/// A sandbox reaches agentd's gateway on the bridge and nothing else: not another sandbox
/// (B runs OpenCode on port 4096, which agentd itself reaches), not the host's other ports,
/// not its loopback; agentd's API socket is not in its file system.
#[test]
fn test_a_sandbox_reaches_only_the_gateway() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::start("true");
    let (d, port, _) = opencode_daemon(&images, &llm);
    let a = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"image": "opencode", "opencode": false})),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    let a = a.json();
    let id = a["id"].as_str().unwrap().to_string();
    let b = ready_opencode(&d, json!({"image": "opencode", "name": "b"}));
    let b_id = b["id"].as_str().unwrap().to_string();
    let r = d.call(
        "GET",
        &format!("/v1/sandboxes/{b_id}/opencode/global/health"),
        None,
    );
    assert_eq!(r.status, 200, "agentd reaches B: {}", r.text());
    let b_addr = b["address"].as_str().unwrap().to_string();
    let bridge_addr = a["address"]
        .as_str()
        .unwrap()
        .rsplit_once('.')
        .unwrap()
        .0
        .to_string()
        + ".1";
    let probe = |addr: &str, port: u16| {
        d.exec(&id, &["bash", "-c", &format!("timeout 3 bash -c 'exec 3<>/dev/tcp/{addr}/{port}' && echo open || echo closed")]).1
    };
    let host_service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_service.local_addr().unwrap().port();
    let seen = [
        ("the gateway", probe(&bridge_addr, port), "open"),
        ("sandbox B", probe(&b_addr, 4096), "closed"),
        ("the sandbox's loopback", probe("127.0.0.1", 1), "closed"),
        ("a host service", probe(&bridge_addr, host_port), "closed"),
    ];
    let wrong: Vec<String> = seen
        .iter()
        .filter(|(_, got, want)| got.trim() != *want)
        .map(|(what, got, want)| format!("{what}: {} (want {want})", got.trim()))
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
    let (_, out, _) = d.exec(
        &id,
        &[
            "sh",
            "-c",
            &format!(
                "test -e {} && echo visible || echo absent",
                d.socket.display()
            ),
        ],
    );
    assert_eq!(out.trim(), "absent");
    d.delete_all_and_check_clean();
}

/// agentd restarted with SIGTERM, then SIGKILL: the OpenCode sandbox keeps running (the
/// same process), is reattached and ready, its usage and its logs kept.
#[test]
fn test_a_restart_reattaches_running_sandboxes() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::start("true");
    let (mut d, _, _) = opencode_daemon(&images, &llm);
    let a = ready_opencode(&d, json!({"image": "opencode"}));
    let id = a["id"].as_str().unwrap().to_string();
    let pid_before = d.exec(&id, &["sh", "-c", "echo $PPID"]).1;
    let usage_before = a["usage"].clone();
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        d.restart(signal);
        let a2 = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
        assert!(a2["state"] == "ready" || a2["state"] == "starting", "{a2}");
        let a2 = d.wait_state(&id, "ready", Duration::from_secs(60));
        assert_eq!(a2["state"], "ready");
        let r = d.call(
            "GET",
            &format!("/v1/sandboxes/{id}/opencode/global/health"),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(d.exec(&id, &["sh", "-c", "echo $PPID"]).1, pid_before);
        assert_eq!(a2["usage"], usage_before, "usage persists");
    }
    // OpenCode's logs are complete across the restarts (it logs its listening line).
    let logs = d
        .call("GET", &format!("/v1/sandboxes/{id}/logs"), None)
        .text();
    assert!(
        logs.contains("opencode server listening") || logs.contains("listening"),
        "{logs}"
    );
    d.delete_all_and_check_clean();
}

/// A sandbox whose shim is killed is reported exited and cleaned up.
#[test]
fn test_a_dead_shim_is_reported() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = small_daemon(&images, &[]);
    let id = plain(&d, json!({}));
    let shim_pid = d.shim_pid(&id).expect("the shim");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let v = d.wait_state(&id, "exited", Duration::from_secs(30));
    assert_eq!(v["state"], "exited", "{v}");
    d.delete_all_and_check_clean();
}

/// OpenCode dying in its sandbox ends the sandbox, with the reason and its log tail; the
/// logs outlive it.
#[test]
fn test_opencode_dying_ends_its_sandbox_with_the_reason() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::start("true");
    let (d, _, _) = opencode_daemon(&images, &llm);
    let a = ready_opencode(&d, json!({"image": "opencode"}));
    let id = a["id"].as_str().unwrap().to_string();
    let kill_opencode = "for p in /proc/[0-9]*; do case \"$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\" in opencode*) kill -9 ${p#/proc/};; esac; done";
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"command": ["bash", "-c", kill_opencode], "uid": 1000})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let a3 = d.wait_state(&id, "exited", Duration::from_secs(30));
    assert_eq!(a3["state"], "exited", "{a3}");
    let reason = a3["exit"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("opencode exited with status 137"), "{a3}");
    assert!(
        !a3["exit"]["log_tail"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{a3}"
    );
    let logs = d.call("GET", &format!("/v1/sandboxes/{id}/logs"), None);
    assert_eq!(logs.status, 200, "logs outlive the sandbox");
    d.delete_all_and_check_clean();
}

/// A daemon without OpenCode sandboxes (they need no LLM) and with small quotas: at most
/// 2 sandboxes and 3 GiB of memory; `extra` flags on top.
fn small_daemon(images: &std::path::Path, extra: &[&str]) -> Daemon {
    let gateway = agentd_tests::registry::free_port().to_string();
    let mut args = vec![
        "--max-sandboxes",
        "2",
        "--max-memory",
        "3g",
        "--gateway-port",
        &gateway,
    ];
    args.extend_from_slice(extra);
    Daemon::start(images, &args)
}

/// A sandbox without OpenCode; its id.
fn plain(d: &Daemon, extra: serde_json::Value) -> String {
    let mut body = json!({"image": "opencode", "opencode": false});
    if let (Some(b), Some(x)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(x.clone());
    }
    let r = d.call("POST", "/v1/sandboxes", Some(body));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

/// A sandbox's setup runs before it is ready (its result in the view, what it did there for
/// the next exec); a failing setup stops the sandbox with its output as the reason.
#[test]
fn test_sandbox_setup_runs_before_ready() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = small_daemon(&images, &[]);
    let id = plain(
        &d,
        json!({"setup": "echo preparing; echo prepared > /tmp/prepared; sleep 1", "limits": {"memory": "512m"}}),
    );
    let v = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert_eq!(
        v["state"], "starting",
        "not ready while the setup runs: {v:#}"
    );
    let v = d.wait_state(&id, "ready", Duration::from_secs(60));
    assert_eq!(v["setup"]["result"]["passed"], true, "{v:#}");
    assert!(
        v["setup"]["result"]["output"]
            .as_str()
            .unwrap()
            .contains("preparing"),
        "{v:#}"
    );
    assert_eq!(d.exec(&id, &["cat", "/tmp/prepared"]).1, "prepared\n");
    let bad = plain(
        &d,
        json!({"setup": "echo 'E: cannot reach the mirror' >&2; exit 3", "limits": {"memory": "512m"}}),
    );
    let v = d.wait_state(&bad, "stopped", Duration::from_secs(60));
    let reason = v["exit"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("the setup failed (exit status 3)")
            && reason.contains("cannot reach the mirror"),
        "{v:#}"
    );
    assert_eq!(v["setup"]["result"]["exit_code"], 3, "{v:#}");
    d.delete_all_and_check_clean();
}

/// Bad create requests get a 400 that says what is wrong, never a 500 or a leaked resource;
/// an unknown sandbox is a 404.
#[test]
fn test_bad_create_requests_get_400_with_the_reason() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = small_daemon(&images, &[]);
    let bad = [
        ("not json", "invalid JSON"),
        (
            r#"{"image":"opencode","memroy":"1g"}"#,
            "unknown field `memroy`",
        ),
        (r#"{"image":"no-such-image"}"#, "pull or import it first"),
        (
            r#"{"image":"opencode","limits":{"memory":"1k"}}"#,
            "below the minimum",
        ),
        (
            r#"{"image":"opencode","limits":{"memory":"100t"}}"#,
            "in total",
        ),
        (r#"{"image":"opencode","limits":{"cpus":-1}}"#, "cpus"),
        (
            r#"{"image":"opencode","network":"nat"}"#,
            "unknown variant `nat`",
        ),
        (
            r#"{"image":"opencode","network":{"mode":"open","allow":["x.example"]}}"#,
            "open allows every public address",
        ),
        (
            r#"{"image":"opencode","network":{"mode":"none","allow":["x.example"]}}"#,
            "needs mode allowlist",
        ),
        (
            r#"{"image":"opencode","opencode":true,"command":["x"]}"#,
            "exclusive",
        ),
    ];
    let mut wrong = Vec::new();
    for (body, msg) in bad {
        let r = agentd_tests::daemon::request(
            &d.socket,
            "POST",
            "/v1/sandboxes",
            Some(body.as_bytes()),
            "application/json",
        );
        let m = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        // Every case is checked before the test fails, so one failure hides no other.
        if r.status != 400 || !m.contains(msg) {
            wrong.push(format!("{body}: {} {m}", r.status));
        }
    }
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    let r = d.call("GET", "/v1/sandboxes/nope", None);
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    assert_eq!(
        d.call("GET", "/v1/sandboxes", None).json()["sandboxes"],
        json!([])
    );
    let left = d.leftovers();
    assert!(left.is_empty(), "leftovers: {left:#?}");
}

/// Past max_memory or max_sandboxes a create is a 429 naming the quota; what fits is made.
#[test]
fn test_quotas_answer_429_naming_the_limit() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = small_daemon(&images, &[]);
    plain(&d, json!({}));
    // 2g (the default) + 2g > 3g: memory quota; 2g + 512m fits; then the sandbox count.
    let r = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"image": "opencode", "opencode": false})),
    );
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.text().contains("max_memory"), "{}", r.text());
    plain(&d, json!({"limits": {"memory": "512m"}}));
    let r = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"image": "opencode", "opencode": false, "limits": {"memory": "64m"}})),
    );
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.text().contains("max_sandboxes"), "{}", r.text());
    d.delete_all_and_check_clean();
}

/// An exec past its timeout_secs is killed and says so.
#[test]
fn test_exec_timeout_kills_the_process() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = small_daemon(&images, &[]);
    let id = plain(&d, json!({}));
    let started = std::time::Instant::now();
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"command": ["sleep", "30"], "timeout_secs": 1})),
    );
    assert!(r.text().contains("\"timed_out\":true"), "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    d.delete_all_and_check_clean();
}

/// On TCP every request needs the bearer token: 401 without it, 200 with it.
#[test]
fn test_tcp_needs_the_token() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let listen = format!("127.0.0.1:{}", agentd_tests::registry::free_port());
    let d = small_daemon(&images, &["--listen", &listen]);
    use std::io::{Read, Write};
    let get = |auth: &str| {
        let mut s = std::net::TcpStream::connect(&listen).unwrap();
        write!(
            s,
            "GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw
    };
    let raw = get("");
    assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
    let raw = get("Authorization: Bearer not-the-token\r\n");
    assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
    let token = std::fs::read_to_string(d.state.path().join("api-token")).unwrap();
    let raw = get(&format!("Authorization: Bearer {}\r\n", token.trim()));
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
}

/// The idle timeout and the TTL each stop a sandbox and free its resources (reading its
/// status is not activity).
#[test]
fn test_idle_timeout_or_ttl_stops_a_sandbox() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = small_daemon(&images, &[]);
    for (extra, reason) in [
        (json!({"idle_timeout_secs": 2}), "idle timeout"),
        (
            json!({"idle_timeout_secs": 0, "ttl_secs": 2}),
            "ttl expired",
        ),
    ] {
        let sid = plain(&d, extra);
        let v = d.wait_state(&sid, "stopped", Duration::from_secs(20));
        assert_eq!(
            (v["state"].as_str(), v["exit"]["reason"].as_str()),
            (Some("stopped"), Some(reason)),
            "{v}"
        );
        assert!(d.leftovers().is_empty(), "{:#?}", d.leftovers());
        assert_eq!(
            d.call("DELETE", &format!("/v1/sandboxes/{sid}"), None)
                .status,
            204
        );
    }
}

/// `agentd sandbox` over the socket: create, ls, exec (its status and both streams pass
/// through), cp both ways, a clear error for an unknown sandbox, rm.
#[test]
fn test_cli_client_over_the_socket() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = small_daemon(&images, &[]);
    let cli = |args: &[&str]| {
        std::process::Command::new(agentd_tests::bin("agentd"))
            .arg("sandbox")
            .args(args)
            .env("AGENTD_SOCKET", &d.socket)
            .output()
            .unwrap()
    };
    let out = cli(&[
        "create",
        "--image",
        "opencode",
        "--no-opencode",
        "--name",
        "cli1",
        "--memory",
        "256m",
    ]);
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    let out = cli(&["ls"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cli1"),
        "{}",
        agentd_tests::describe(&out)
    );
    let out = cli(&[
        "exec",
        "cli1",
        "--",
        "sh",
        "-c",
        "echo hi; echo oops >&2; exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        agentd_tests::describe(&out)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    let local = d.state.path().join("cp-src");
    std::fs::write(&local, "copied").unwrap();
    let out = cli(&["cp", local.to_str().unwrap(), "cli1:/home/agent/c.txt"]);
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    let back = d.state.path().join("cp-back");
    let out = cli(&["cp", "cli1:/home/agent/c.txt", back.to_str().unwrap()]);
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "copied");
    let out = cli(&["exec", "nope", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no sandbox \"nope\""),
        "{}",
        agentd_tests::describe(&out)
    );
    let out = cli(&["rm", "cli1"]);
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    let left = d.leftovers();
    assert!(left.is_empty(), "leftovers: {left:#?}");
}

/// With an empty store, the first sandbox of the default image builds it (from the recipe
/// compiled into agentd, with a warm build cache here) and starts. The lock it last used
/// pins a libc6 the archive does not have (as after a security update): the build refreshes
/// the lock with the host's apt, keeps it, and succeeds.
#[test]
fn test_default_image_built_on_first_use() {
    require_sandbox_support!();
    // The fixture build warms the rootfs-builder cache that the daemon is pointed at.
    if store().is_none() {
        return;
    }
    let images = tempfile::tempdir_in("/var/tmp").unwrap();
    let cache = agentd_tests::target_dir().join("rootfs-builder-cache");
    let lock = std::fs::read_to_string(
        agentd_tests::workspace_root().join("rootfs-builder/recipes/opencode.lock"),
    )
    .unwrap();
    let libc = lock
        .split("[[step.debs]]")
        .find(|d| d.contains("package = \"libc6\""))
        .unwrap()
        .to_string();
    let gone = libc
        .lines()
        .map(|l| {
            if l.starts_with("version") {
                "version = \"0.0-gone\"".to_string()
            } else if l.starts_with("sha256") {
                format!("sha256 = \"{}\"", "0".repeat(64))
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::create_dir_all(cache.join("recipe")).unwrap();
    let local = cache.join("recipe/opencode.lock.local");
    std::fs::write(&local, lock.replace(&libc, &format!("{gone}\n\n"))).unwrap();
    let d = Daemon::start(
        images.path(),
        &[
            "--build-cache",
            cache.to_str().unwrap(),
            "--gateway-port",
            &agentd_tests::registry::free_port().to_string(),
        ],
    );
    let started = std::time::Instant::now();
    let r = d.call("POST", "/v1/sandboxes", Some(json!({"opencode": false})));
    assert_eq!(r.status, 201, "{}\n{}", r.text(), d.log());
    eprintln!(
        "first create with the default image build: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(r.json()["image"], "opencode");
    let list = d.call("GET", "/v1/images", None).json();
    let names: Vec<&str> = list["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names, vec!["localhost/opencode:latest"], "{list}");
    assert!(
        d.log().contains("default image `opencode` built"),
        "{}",
        d.log()
    );
    assert!(
        d.log().contains("refreshing the default image's lock"),
        "{}",
        d.log()
    );
    let kept = std::fs::read_to_string(&local).unwrap();
    assert!(!kept.contains("0.0-gone"), "{kept}");
    assert!(kept.contains("package = \"libc6\""), "{kept}");
    let id = r.json()["id"].as_str().unwrap().to_string();
    let (code, out, _) = d.exec(&id, &["opencode", "--version"]);
    assert_eq!(
        (code, out.trim()),
        (0, agentd_tests::opencode_version().as_str())
    );
    assert_eq!(
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None)
            .status,
        204
    );
    let left = d.leftovers();
    assert!(left.is_empty(), "leftovers: {left:#?}");
}

/// `/v1/images`: pull from a registry on loopback with progress lines, list, run a sandbox of
/// the pulled image (no shell in it: the sandbox idles), read its file, delete the image.
#[test]
fn test_images_api_pull_list_run_delete() {
    require_sandbox_support!();
    if !agentd_tests::registry::tools_available() {
        return;
    }
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let layout = agentd_tests::registry::Layout::new(&tmp.path().join("img"), "1");
    std::fs::write(layout.rootfs().join("hello"), "hello from the registry").unwrap();
    layout.commit();
    let registry = agentd_tests::registry::Registry::start();
    registry.push(&layout.skopeo_ref(), "test/api:1");
    let images = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = Daemon::start(
        images.path(),
        &[
            "--gateway-port",
            &agentd_tests::registry::free_port().to_string(),
        ],
    );
    let reference = format!("{}/test/api:1", registry.addr);
    let r = d.call(
        "POST",
        "/v1/images/pull",
        Some(json!({"reference": reference})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let events: Vec<serde_json::Value> = r
        .body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"resolved"), "{kinds:?}");
    assert!(kinds.contains(&"layer_done"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"complete"), "{events:?}");
    let r = d.call(
        "POST",
        "/v1/images/pull",
        Some(json!({"reference": "127.0.0.1:1/none:1"})),
    );
    assert!(r.text().contains("\"event\":\"error\""), "{}", r.text());
    let r = d.call(
        "POST",
        "/v1/images/pull",
        Some(json!({"reference": "UPPER/Case"})),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    let list = d.call("GET", "/v1/images", None).json();
    assert_eq!(list["images"][0]["name"], reference, "{list}");
    let r = d.call("POST", "/v1/sandboxes", Some(json!({"image": reference})));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(r.json()["opencode"], false);
    let r = d.call(
        "GET",
        &format!("/v1/sandboxes/{id}/files?path=/hello"),
        None,
    );
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "hello from the registry")
    );
    // A directory comes as a tar.
    let r = d.call("GET", &format!("/v1/sandboxes/{id}/files?path=/"), None);
    assert_eq!(r.status, 200);
    let mut names = Vec::new();
    for e in tar::Archive::new(r.body.as_slice()).entries().unwrap() {
        names.push(e.unwrap().path().unwrap().to_string_lossy().to_string());
    }
    assert!(names.contains(&"hello".to_string()), "{names:?}");
    let r = d.call("GET", &format!("/v1/sandboxes/{id}/stats"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["pids"].as_u64().unwrap() >= 1, "{}", r.text());
    assert_eq!(
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None)
            .status,
        204
    );
    let r = d.call("DELETE", &format!("/v1/images/{reference}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = d.call("DELETE", &format!("/v1/images/{reference}"), None);
    assert_eq!(r.status, 404, "{}", r.text());
    let left = d.leftovers();
    assert!(left.is_empty(), "leftovers: {left:#?}");
}

/// `agentd teardown` refuses while the daemon runs; once it is stopped, it removes every
/// sandbox left (shim, mounts, disk, cgroups), the bridge, the firewall chain and the cgroup
/// parents, and keeps the state dir unless `--purge`.
#[test]
fn test_teardown_removes_what_serve_set_up() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let port = agentd_tests::registry::free_port().to_string();
    let mut d = Daemon::start(&images, &["--gateway-port", &port]);
    let id = d.plain_sandbox();
    let shim = d.shim_pid(&id).expect("the sandbox's shim");

    let out = d.teardown(&[]);
    assert_eq!(
        out.status.code(),
        Some(125),
        "{}",
        agentd_tests::describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("agentd is running"),
        "{}",
        agentd_tests::describe(&out)
    );

    // Stopped: the sandbox runs on under its shim until teardown.
    d.kill(libc::SIGTERM);
    assert!(std::path::Path::new(&format!("/proc/{shim}")).exists());
    let out = d.teardown(&[]);
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in [
        format!("removed sandbox {id}"),
        format!("removed bridge {}", d.bridge),
        format!("removed iptables: chain AGENTD-{}", d.bridge),
    ] {
        assert!(said.contains(&line), "{line:?} not in:\n{said}");
    }
    // The shim is gone (or a zombie until whoever adopted it reaps it).
    let alive = || {
        std::fs::read_to_string(format!("/proc/{shim}/stat"))
            .is_ok_and(|s| s.rsplit(") ").next().is_some_and(|r| !r.starts_with('Z')))
    };
    let waited = std::time::Instant::now();
    while alive() && waited.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!alive(), "the shim {shim} still runs");
    assert!(!std::path::Path::new("/sys/class/net")
        .join(&d.bridge)
        .exists());
    let chain = Command::new("iptables")
        .args(["-w", "-S", &format!("AGENTD-{}", d.bridge)])
        .output()
        .unwrap();
    assert!(!chain.status.success(), "the chain is still there");
    assert!(
        agentd_tests::cgroup_parents(&d.cgroup_parent).is_empty(),
        "{:?}",
        agentd_tests::cgroup_parents(&d.cgroup_parent)
    );
    assert!(d.leftovers().is_empty(), "{:#?}", d.leftovers());
    assert!(
        d.state.path().join("agentd.redb").exists(),
        "the state dir went without --purge"
    );
    // Again: nothing left to do, and --purge takes the state dir.
    let out = d.teardown(&["--purge"]);
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    assert!(!d.state.path().exists());
}
