//! E2B's official SDKs, pinned and unmodified, against agentd's E2B API, configured only by
//! environment variables: the Python SDK (PyPI `e2b`, `tests/e2b/python_sdk.py`) runs its
//! scenario (create, commands with streamed output and exit codes, background commands and
//! kill, stdin, a PTY, files, a watched directory, `get_host` with a web server inside, list by
//! metadata, pause and connect, a timeout that expires, kill) and reports every call it tried;
//! the JS SDK (npm `e2b`, installed by the test into `target/e2b-js`, `tests/e2b/js_sdk.mjs`)
//! runs a scenario of its own, with the streamed watcher the JS SDK uses.

use std::process::Command;

use super::store;
use agentd_tests::daemon::Daemon;
use agentd_tests::require_sandbox_support;

/// The JS SDK's pinned version.
const JS_SDK: &str = "2.51.0";

/// A daemon listening on TCP too; its address.
fn e2b_daemon(images: &std::path::Path) -> (Daemon, String) {
    let listen = format!("127.0.0.1:{}", agentd_tests::registry::free_port());
    let gateway = agentd_tests::registry::free_port().to_string();
    let d = Daemon::start(images, &["--listen", &listen, "--gateway-port", &gateway]);
    (d, listen)
}

/// Runs an SDK's scenario with E2B's variables pointed at `d`; checks every call it reports.
fn run_scenario(d: &Daemon, listen: &str, cmd: &mut Command, what: &str) -> usize {
    let base = format!("http://{listen}/e2b");
    let out = cmd
        .env("E2B_API_URL", &base)
        .env("E2B_SANDBOX_URL", &base)
        .env("E2B_API_KEY", d.token().trim())
        .env("AGENTD_HOST_PORT", listen)
        .env("PROBE", agentd_tests::probe())
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        agentd_tests::describe(&out),
        d.log()
    );
    let tried: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", agentd_tests::describe(&out)));
    let calls = tried.as_array().unwrap();
    for c in calls {
        eprintln!("{what}: {} -> {}", c["call"], c["ok"]);
        assert_eq!(c["ok"], true, "{c:#}");
    }
    calls.len()
}

#[test]
fn test_the_official_e2b_python_sdk() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let ready = Command::new("python3")
        .args(["-c", "import e2b"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ready {
        eprintln!("SKIPPED: needs python3 with the e2b SDK (.ci/run installs it)");
        agentd_tests::required_or_skip();
        return;
    }
    let (d, listen) = e2b_daemon(&images);
    let base = format!("http://{listen}/e2b");
    let mut py = Command::new("python3");
    py.arg(agentd_tests::workspace_root().join("tests/e2b/python_sdk.py"));
    let calls = run_scenario(&d, &listen, &mut py, "e2b python sdk");
    assert!(calls >= 30, "only {calls} calls reported");
    // The wrong key is refused.
    let r = Command::new("python3")
        .args([
            "-c",
            "from e2b import Sandbox\ntry:\n    Sandbox.create(template='opencode')\nexcept Exception as e:\n    print(type(e).__name__, e)",
        ])
        .env("E2B_API_URL", &base)
        .env("E2B_SANDBOX_URL", &base)
        .env("E2B_API_KEY", "e2b_0000")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(said.contains("AuthenticationException"), "{said}");
    // Network rules agentd would not enforce are refused, not dropped.
    let r = d.call(
        "POST",
        "/e2b/v2/sandboxes",
        Some(serde_json::json!({"templateID": "opencode", "allow_internet_access": true, "network": {"denyOut": ["192.0.2.1"]}})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("network.denyOut"), "{}", r.text());
    d.delete_all_and_check_clean();
}

#[test]
fn test_the_official_e2b_js_sdk() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let node_ok = Command::new("node")
        .args(["-e", "const [a, b] = process.versions.node.split('.').map(Number); process.exit(a > 20 || (a === 20 && b >= 18) ? 0 : 1)"])
        .status()
        .is_ok_and(|s| s.success());
    let npm_ok = Command::new("npm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node_ok || !npm_ok {
        eprintln!("SKIPPED: needs node >= 20.18 and npm (the JS SDK's engines)");
        agentd_tests::required_or_skip();
        return;
    }
    // The SDK from the npm registry, pinned, once per target dir.
    let dir = agentd_tests::target_dir().join("e2b-js");
    std::fs::create_dir_all(&dir).unwrap();
    let installed = std::fs::read_to_string(dir.join("node_modules/e2b/package.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["version"] == JS_SDK);
    if !installed {
        std::fs::write(
            dir.join("package.json"),
            r#"{"private": true, "type": "module"}"#,
        )
        .unwrap();
        let out = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--save-exact"])
            .arg(format!("e2b@{JS_SDK}"))
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    }
    let script = dir.join("js_sdk.mjs");
    std::fs::copy(
        agentd_tests::workspace_root().join("tests/e2b/js_sdk.mjs"),
        &script,
    )
    .unwrap();
    let (d, listen) = e2b_daemon(&images);
    let mut node = Command::new("node");
    node.arg(&script);
    let calls = run_scenario(&d, &listen, &mut node, "e2b js sdk");
    assert!(calls >= 15, "only {calls} calls reported");
    d.delete_all_and_check_clean();
}
