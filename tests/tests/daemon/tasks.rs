//! Tasks end to end: the real daemon hands a prompt and a workspace to OpenCode agents in
//! sandboxes; the mock LLM, scripted per test, decides what the agents' bash tool calls do.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use agentd_tests::daemon::{last_is_tool, last_user_text, Daemon, MockLlm, Turn};
use agentd_tests::require_sandbox_support;
use serde_json::json;

use super::store;

/// A small project: a README, a source file and an executable script.
fn make_workspace() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("agentd-ws-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("README.md"), "a project\n").unwrap();
    std::fs::write(dir.path().join("src/lib.txt"), "one\ntwo\nthree\n").unwrap();
    std::fs::write(dir.path().join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
    let mut perm = std::fs::metadata(dir.path().join("run.sh"))
        .unwrap()
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(dir.path().join("run.sh"), perm).unwrap();
    dir
}

fn daemon(images: &Path, llm: &MockLlm, extra: &[&str]) -> Daemon {
    let port = agentd_tests::registry::free_port().to_string();
    let mut args = vec!["--llm-base-url", &llm.base_url, "--gateway-port", &port];
    args.extend_from_slice(extra);
    Daemon::start(images, &args)
}

fn create(d: &Daemon, body: serde_json::Value) -> String {
    let r = d.call("POST", "/v1/tasks", Some(body));
    assert_eq!(r.status, 201, "{}\n{}", r.text(), d.log());
    r.json()["id"].as_str().unwrap().to_string()
}

/// Polls a task until it is finished.
fn wait_done(d: &Daemon, id: &str, timeout: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let v = d.call("GET", &format!("/v1/tasks/{id}"), None).json();
        if ["succeeded", "failed", "cancelled", "timed_out"]
            .contains(&v["state"].as_str().unwrap_or(""))
        {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "task {id} not done after {timeout:?}: {v:#}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls until `pred` holds for the task's view.
fn wait_for(d: &Daemon, id: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let start = Instant::now();
    loop {
        let v = d.call("GET", &format!("/v1/tasks/{id}"), None).json();
        if pred(&v) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "task {id}: no {what}: {v:#}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The task's events after `after`, read as SSE (the stream ends at task.finished).
fn events(d: &Daemon, id: &str, last_event_id: Option<u64>) -> Vec<serde_json::Value> {
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let extra = last_event_id
        .map(|n| format!("Last-Event-ID: {n}\r\n"))
        .unwrap_or_default();
    std::io::Write::write_all(
        &mut s,
        format!("GET /v1/tasks/{id}/events HTTP/1.1\r\nHost: agentd\r\nConnection: close\r\n{extra}\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains("text/event-stream"), "{text}");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn ids(evs: &[serde_json::Value]) -> Vec<u64> {
    evs.iter().filter_map(|e| e["id"].as_u64()).collect()
}

fn kinds(evs: &[serde_json::Value]) -> Vec<String> {
    evs.iter()
        .filter_map(|e| e["type"].as_str().map(String::from))
        .collect()
}

fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dst = tempfile::Builder::new()
        .prefix("agentd-ws-copy-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let out = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(dst.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    dst
}

/// `git apply` of `patch` in `dir`.
fn git_apply(dir: &Path, patch: &[u8]) {
    let p = dir.join("..").join(format!(
        "{}.patch",
        dir.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&p, patch).unwrap();
    let out = Command::new("git")
        .arg("apply")
        .arg("--verbose")
        .arg(&p)
        .current_dir(dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&p);
    assert!(
        out.status.success(),
        "git apply failed: {}\npatch:\n{}",
        agentd_tests::describe(&out),
        String::from_utf8_lossy(patch)
    );
}

/// Workspaces agentd cannot use and bad task requests get a 400 that says why, and leave
/// nothing behind.
#[test]
fn test_bad_task_requests_get_400_with_the_reason() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::start("true");
    let d = daemon(&images, &llm, &[]);
    let ws = make_workspace();
    let bad = |workspace: serde_json::Value, want: &str| {
        let r = d.call(
            "POST",
            "/v1/tasks",
            Some(json!({"prompt": "x", "workspace": workspace})),
        );
        assert_eq!(r.status, 400, "{workspace}: {}", r.text());
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(want), "{workspace}: {msg:?} lacks {want:?}");
    };
    bad(
        json!({"path": "/var/tmp/agentd-no-such-dir"}),
        "No such file or directory",
    );
    bad(
        json!({"path": ws.path().join("README.md")}),
        "not a directory",
    );
    bad(json!({"path": "relative/dir"}), "must be absolute");
    bad(json!({}), "exactly one of path, upload or git");
    bad(json!({"git": "file:///etc"}), "workspace.path");
    bad(
        json!({"upload": "0123456789abcdef01234567"}),
        "no uploaded workspace",
    );
    // Not readable by its owner: agentd reads a workspace as the owner of its directory.
    let locked = tempfile::Builder::new()
        .prefix("agentd-ws-locked-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::create_dir(locked.path().join("secret")).unwrap();
    std::fs::write(locked.path().join("secret/key"), "k").unwrap();
    let chown = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(locked.path())
        .status()
        .unwrap();
    assert!(chown.success());
    std::fs::set_permissions(
        locked.path().join("secret"),
        std::os::unix::fs::PermissionsExt::from_mode(0o000),
    )
    .unwrap();
    bad(json!({"path": locked.path()}), "Permission denied");
    let r = d.call(
        "POST",
        "/v1/tasks",
        Some(json!({"prompt": "x", "workspace": {"path": ws.path()}, "agents": 0})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = d.call(
        "POST",
        "/v1/tasks",
        Some(json!({"prompt": "x", "workspace": {"path": ws.path()}, "max_rounds": 2})),
    );
    assert!(r.text().contains("needs a check"), "{}", r.text());
    let r = d.call(
        "POST",
        "/v1/tasks",
        Some(json!({"prompt": "x", "workspace": {"path": ws.path()}, "agentz": 2})),
    );
    assert!(r.text().contains("unknown field `agentz`"), "{}", r.text());
    for (extra, want) in [
        (json!({"image": "no-such-image"}), "pull or import it first"),
        (json!({"limits": {"memory": "lots"}}), "limits.memory"),
        (json!({"timeout_secs": 0}), "timeout_secs"),
        (json!({"prompt": " "}), "prompt must not be empty"),
    ] {
        let mut body = json!({"prompt": "x", "workspace": {"path": ws.path()}});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = d.call("POST", "/v1/tasks", Some(body));
        assert_eq!(r.status, 400, "{extra}: {}", r.text());
        assert!(r.text().contains(want), "{extra}: {}", r.text());
    }
    assert_eq!(d.call("GET", "/v1/tasks/nope", None).status, 404);
    let listed = d.call("GET", "/v1/tasks", None).json();
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 0, "{listed}");
    assert!(
        std::fs::read_dir(d.state.path().join("tasks"))
            .unwrap()
            .all(|e| e.unwrap().file_name() == "uploads"),
        "a refused task left its dir behind"
    );
}

/// One agent, no check: the CLI runs the task and prints the diff; the result, the events
/// (resumed with Last-Event-ID without gaps), the patch (applies to a fresh copy of the
/// workspace), and the sandbox removed after the grace period.
#[test]
fn test_task_single_agent_from_the_cli() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::start(
        "echo 'written by the agent' > answer.txt && printf 'one\\nTWO\\nthree\\n' > src/lib.txt && rm README.md",
    );
    let d = daemon(&images, &llm, &["--task-grace", "3"]);
    let ws = make_workspace();

    // The CLI: request to result, progress on stderr, the diff on stdout.
    let started = Instant::now();
    // Build output the task leaves out.
    std::fs::create_dir_all(ws.path().join("target/debug")).unwrap();
    std::fs::write(ws.path().join("target/debug/app"), "binary").unwrap();
    let out = Command::new(agentd_tests::bin("agentd"))
        .args(["task", "run", "--exclude", "target", "--workspace"])
        .arg(ws.path())
        .arg("write answer.txt and shout two")
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap();
    let wall = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}\n{}",
        agentd_tests::describe(&out),
        d.log()
    );
    assert!(stdout.contains("+written by the agent"), "{stdout}");
    assert!(stderr.contains("attempt 1: succeeded"), "{stderr}");
    let id = stderr
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();

    let v = d.call("GET", &format!("/v1/tasks/{id}"), None).json();
    assert_eq!(v["state"], "succeeded", "{v:#}");
    let metrics = d.call("GET", "/metrics", None).text();
    assert!(
        metrics.contains("agentd_tasks{state=\"succeeded\"} 1"),
        "{metrics}"
    );
    let a = &v["attempts"][0];
    assert!(a["tool_calls"].as_u64().unwrap() >= 1, "{a:#}");
    assert!(
        a["final_message"].as_str().unwrap().contains("All done"),
        "{a:#}"
    );
    assert!(a["usage"]["prompt_tokens"].as_u64().unwrap() >= 42, "{a:#}");
    assert_eq!(v["workspace"]["entries"], 4, "{v:#}");
    assert_eq!(v["workspace"]["excluded"], 1, "{v:#}");
    let t = &a["timings"];
    eprintln!(
        "one-round task, request to result {:.2} s (CLI wall time); sandbox {} ms, opencode ready {} ms, workspace {} ms, agent round {} ms, diff {} ms, attempt total {} ms",
        wall.as_secs_f64(),
        t["sandbox_ms"], t["opencode_ready_ms"], t["workspace_ms"], t["rounds_ms"][0], t["diff_ms"], t["total_ms"]
    );

    // The result and the patch: it applies to a fresh copy of the original workspace.
    let r = d
        .call("GET", &format!("/v1/tasks/{id}/result"), None)
        .json();
    assert_eq!(r["attempts"][0]["rank"], 1, "{r:#}");
    let patch = d
        .call("GET", &format!("/v1/tasks/{id}/attempts/1/diff"), None)
        .body;
    assert_eq!(
        r["attempts"][0]["patch"].as_str().unwrap().as_bytes(),
        &patch[..]
    );
    assert_eq!(r["attempts"][0]["diff"]["files"], 3, "{r:#}");
    let copy = copy_dir(ws.path());
    git_apply(copy.path(), &patch);
    assert_eq!(
        std::fs::read_to_string(copy.path().join("answer.txt")).unwrap(),
        "written by the agent\n"
    );
    assert_eq!(
        std::fs::read_to_string(copy.path().join("src/lib.txt")).unwrap(),
        "one\nTWO\nthree\n"
    );
    assert!(!copy.path().join("README.md").exists());
    assert_eq!(
        d.call("GET", &format!("/v1/tasks/{id}/attempts/2/diff"), None)
            .status,
        404
    );
    let cli_diff = Command::new(agentd_tests::bin("agentd"))
        .args(["task", "diff", &id])
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert_eq!(cli_diff.stdout, patch);

    // `task apply`: a branch in the user's repository, nothing else touched.
    let repo = copy_dir(ws.path());
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-q", "-m", "mine"]);
    std::fs::write(repo.path().join("notes.txt"), "uncommitted work\n").unwrap();
    let head = git(repo.path(), &["rev-parse", "HEAD"]);
    let out = task_apply(&d, &id, repo.path(), &[]);
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    let branch = format!("agentd/{id}-1");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("branch {branch}: commit")),
        "{}",
        agentd_tests::describe(&out)
    );
    assert_eq!(git(repo.path(), &["rev-parse", "HEAD"]), head);
    assert_eq!(git(repo.path(), &["branch", "--show-current"]), "main\n");
    assert_eq!(
        git(repo.path(), &["status", "--porcelain"]),
        "?? notes.txt\n",
        "the working tree and the index are untouched"
    );
    assert!(!repo.path().join("answer.txt").exists());
    assert_eq!(
        git(repo.path(), &["show", &format!("{branch}:answer.txt")]),
        "written by the agent\n"
    );
    assert_eq!(
        git(repo.path(), &["rev-parse", &format!("{branch}~1")]),
        head
    );
    let subject = git(repo.path(), &["log", "-1", "--format=%s%n%an", &branch]);
    assert_eq!(
        subject,
        format!("agentd task {id}/1: write answer.txt and shout two\nagentd\n")
    );
    let changed = git(repo.path(), &["diff", "--name-status", "HEAD", &branch]);
    assert_eq!(changed, "D\tREADME.md\nA\tanswer.txt\nM\tsrc/lib.txt\n");
    // The branch exists now: a second apply refuses and says what to do.
    let again = task_apply(&d, &id, repo.path(), &[]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists already"),
        "{}",
        agentd_tests::describe(&again)
    );
    // The mbox form: `git am` takes it, with the same message.
    let mbox = d.call("GET", &format!("/v1/tasks/{id}/attempts/1/patch"), None);
    assert_eq!(mbox.status, 200, "{}", mbox.text());
    let mbox_path = repo.path().join("..").join(format!("{id}.mbox"));
    std::fs::write(&mbox_path, &mbox.body).unwrap();
    git(repo.path(), &["switch", "-q", "-c", "from-mbox"]);
    git(repo.path(), &["am", "-q", mbox_path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&mbox_path);
    assert_eq!(
        git(repo.path(), &["diff", &branch, "from-mbox"]),
        "",
        "git am of the mbox makes the same tree"
    );
    assert_eq!(
        git(repo.path(), &["log", "-1", "--format=%s", "from-mbox"]),
        format!("agentd task {id}/1: write answer.txt and shout two\n")
    );

    // Events: the whole story, then a resume after event k gives k+1.. without gaps.
    let all = events(&d, &id, None);
    let k = kinds(&all);
    for want in [
        "task.state",
        "attempt.sandbox",
        "prompt",
        "tool",
        "message",
        "diff",
        "task.finished",
    ] {
        assert!(k.iter().any(|x| x == want), "no {want} in {k:?}");
    }
    let t0 = all[0]["time"].as_u64().unwrap();
    let timeline: Vec<String> = all
        .iter()
        .map(|e| {
            let what = e["state"].as_str().or(e["status"].as_str()).unwrap_or("");
            format!(
                "+{}ms {} {what}",
                e["time"].as_u64().unwrap() - t0,
                e["type"].as_str().unwrap()
            )
        })
        .collect();
    eprintln!("events: {}", timeline.join(", "));
    let all_ids = ids(&all);
    assert_eq!(all_ids, (1..=all_ids.len() as u64).collect::<Vec<_>>());
    let tool = all.iter().find(|e| e["type"] == "tool").unwrap();
    assert_eq!(tool["tool"], "bash", "{tool}");
    assert!(
        all.iter()
            .filter(|e| e["type"] == "tool")
            .all(|e| e["tool_calls"] == 1),
        "one tool call, counted once: {all:#?}"
    );
    let resumed = events(&d, &id, Some(3));
    assert_eq!(ids(&resumed), all_ids[3..].to_vec());
    // A client that saw the end and reconnects gets nothing more, and the stream ends.
    let last = *all_ids.last().unwrap();
    assert_eq!(events(&d, &id, Some(last)), Vec::<serde_json::Value>::new());

    // The sandbox is removed once the grace period (3 s) is over; the results stay.
    let start = Instant::now();
    loop {
        let l = d.call("GET", "/v1/sandboxes", None).json();
        if l["sandboxes"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{l:#}");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        d.call("GET", &format!("/v1/tasks/{id}/attempts/1/diff"), None)
            .body,
        patch
    );
    let ls = Command::new(agentd_tests::bin("agentd"))
        .args(["task", "ls"])
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ls.stdout).contains(&id));
    // `agentd task rm` returns once the task is gone (the API answers 202 at once).
    let rm = Command::new(agentd_tests::bin("agentd"))
        .args(["task", "rm", &id])
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert!(rm.status.success(), "{}", agentd_tests::describe(&rm));
    assert_eq!(d.call("GET", &format!("/v1/tasks/{id}"), None).status, 404);
    assert!(!d.state.path().join("tasks").join(&id).exists());
    assert_eq!(d.leftovers(), Vec::<String>::new());
}

/// A git server on loopback (`git daemon`) serving `repo` as `/repo`; killed on drop.
struct GitDaemon {
    child: std::process::Child,
    url: String,
}

impl GitDaemon {
    fn start(base: &Path) -> GitDaemon {
        let port = agentd_tests::registry::free_port();
        let child = Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stderr(std::process::Stdio::null())
            // A group of its own: `git daemon` runs `git-daemon` as a child, which forks per
            // connection; Drop kills them all.
            .process_group(0)
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "git daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        GitDaemon {
            child,
            url: format!("git://127.0.0.1:{port}/repo"),
        }
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        // The group we made in start (its leader is our child, not yet reaped: the id is ours).
        let pgid = i32::try_from(self.child.id()).unwrap();
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

/// A smart-HTTP git server on loopback: `git http-backend` behind a small CGI bridge, serving
/// the repositories in `root`; reading is open, pushing needs Basic auth `user:password`.
struct GitHttp {
    url: String,
}

impl GitHttp {
    fn start(root: &Path, user: &str, password: &str) -> GitHttp {
        use base64::Engine as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let root = root.to_path_buf();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (root, auth) = (root.clone(), auth.clone());
                std::thread::spawn(move || {
                    let _ = GitHttp::serve(conn, &root, &auth);
                });
            }
        });
        GitHttp {
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// One request (the connection closes after it).
    fn serve(conn: std::net::TcpStream, root: &Path, auth: &str) -> std::io::Result<()> {
        use std::io::{BufRead, Read, Write};
        let mut r = std::io::BufReader::new(conn.try_clone()?);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut headers = std::collections::HashMap::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        assert!(
            !headers.contains_key("transfer-encoding"),
            "the test server takes Content-Length bodies only"
        );
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let mut w = conn;
        let push = query.contains("git-receive-pack") || path.ends_with("/git-receive-pack");
        let authed = headers.get("authorization").map(String::as_str) == Some(auth);
        if push && !authed {
            w.write_all(b"HTTP/1.0 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\n\r\n")?;
            return Ok(());
        }
        let mut cmd = Command::new("git");
        cmd.arg("http-backend")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("GIT_PROJECT_ROOT", root)
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("REQUEST_METHOD", &method)
            .env("PATH_INFO", path)
            .env("QUERY_STRING", query)
            .env("REMOTE_ADDR", "127.0.0.1")
            .env("CONTENT_LENGTH", len.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        if let Some(t) = headers.get("content-type") {
            cmd.env("CONTENT_TYPE", t);
        }
        if let Some(enc) = headers.get("content-encoding") {
            cmd.env("HTTP_CONTENT_ENCODING", enc);
        }
        if authed {
            cmd.env("REMOTE_USER", "agentd");
        }
        let mut child = cmd.spawn()?;
        child.stdin.take().unwrap().write_all(&body)?;
        let out = child.wait_with_output()?;
        let split = out
            .stdout
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| (i, 4))
            .or_else(|| {
                out.stdout
                    .windows(2)
                    .position(|w| w == b"\n\n")
                    .map(|i| (i, 2))
            })
            .unwrap_or((out.stdout.len(), 0));
        let head = String::from_utf8_lossy(&out.stdout[..split.0]).to_string();
        let rest = &out.stdout[split.0 + split.1..];
        let mut status = "200 OK".to_string();
        let mut reply = String::new();
        for h in head.lines() {
            match h.strip_prefix("Status:") {
                Some(s) => status = s.trim().to_string(),
                None => reply.push_str(&format!("{h}\r\n")),
            }
        }
        w.write_all(
            format!(
                "HTTP/1.0 {status}\r\n{reply}Content-Length: {}\r\nConnection: close\r\n\r\n",
                rest.len()
            )
            .as_bytes(),
        )?;
        w.write_all(rest)
    }
}

/// Pushing an attempt's change to a git-URL workspace: with agentd's credentials file the
/// branch appears in the repository, on the workspace's commit, with the agent's change; a
/// wrong password, an existing branch, a bad name and a local workspace are refused with the
/// reason; the CLI pushes too.
#[test]
fn test_task_push_to_a_git_url_with_credentials() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let base = tempfile::Builder::new()
        .prefix("agentd-git-http-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let src = make_workspace();
    git(src.path(), &["init", "-q", "-b", "main"]);
    git(src.path(), &["add", "-A"]);
    git(src.path(), &["commit", "-q", "-m", "start"]);
    // Its stdout without the last newline.
    let git = |dir: &Path, args: &[&str]| git(dir, args).trim_end().to_string();
    let main = git(src.path(), &["rev-parse", "HEAD"]);
    let bare = base.path().join("origin.git");
    git(
        base.path(),
        &[
            "clone",
            "-q",
            "--bare",
            src.path().to_str().unwrap(),
            "origin.git",
        ],
    );
    let server = GitHttp::start(base.path(), "agentd", "s3cret");
    let creds = base.path().join("credentials");
    let write_creds = |password: &str| {
        std::fs::write(
            &creds,
            format!(
                "{}\n",
                server
                    .url
                    .replace("http://", &format!("http://agentd:{password}@"))
            ),
        )
        .unwrap();
        std::fs::set_permissions(&creds, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    };
    write_creds("wrong");
    let llm = MockLlm::start("echo four >> src/lib.txt");
    let d = daemon(
        &images,
        &llm,
        &["--git-credentials", creds.to_str().unwrap()],
    );
    let url = format!("{}/origin.git", server.url);
    let id = create(&d, json!({"prompt": "add four", "workspace": {"git": url}}));
    let v = wait_done(&d, &id, Duration::from_secs(180));
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    let push = |body: serde_json::Value| {
        d.call(
            "POST",
            &format!("/v1/tasks/{id}/attempts/1/push"),
            Some(body),
        )
    };
    let r = push(json!({}));
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("git push failed"), "{}", r.text());
    let branches = || git(&bare, &["branch", "--list"]);
    assert!(!branches().contains("agentd/"), "{}", branches());

    write_creds("s3cret");
    let r = push(json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let p = r.json();
    let branch = format!("agentd/{id}-1");
    assert_eq!(p["branch"], branch.as_str(), "{p:#}");
    assert_eq!(p["remote"], url.as_str(), "{p:#}");
    let commit = p["commit"].as_str().unwrap();
    assert_eq!(git(&bare, &["rev-parse", &branch]), commit);
    assert_eq!(git(&bare, &["rev-parse", &format!("{commit}^")]), main);
    let file = git(&bare, &["show", &format!("{commit}:src/lib.txt")]);
    assert_eq!(file, "one\ntwo\nthree\nfour");
    let subject = git(&bare, &["log", "-1", "--format=%s", commit]);
    assert!(
        subject.contains(&id) && subject.contains("add four"),
        "{subject}"
    );
    // The same branch again: refused, the branch unchanged.
    let r = push(json!({}));
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("exists"), "{}", r.text());
    assert_eq!(git(&bare, &["rev-parse", &branch]), commit);
    let r = push(json!({"branch": "../x"}));
    assert_eq!(r.status, 400, "{}", r.text());
    // The CLI, to a branch of the caller's choosing.
    let out = Command::new(agentd_tests::bin("agentd"))
        .args(["task", "push", &id, "1", "--branch", "review/four"])
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("as branch review/four"),
        "{}",
        agentd_tests::describe(&out)
    );
    assert_eq!(git(&bare, &["rev-parse", "review/four^"]), main);
    // A local workspace has nowhere to push to.
    let local = create(
        &d,
        json!({"prompt": "add four", "workspace": {"path": src.path()}}),
    );
    wait_done(&d, &local, Duration::from_secs(180));
    let r = d.call(
        "POST",
        &format!("/v1/tasks/{local}/attempts/1/push"),
        Some(json!({})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("agentd task apply"), "{}", r.text());
    delete_all(&d);
}

/// `git args` in `dir` (as user t), which must succeed; its stdout.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        agentd_tests::describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `agentd task apply` of task `id` into the repository `repo` with `extra` arguments.
fn task_apply(d: &Daemon, id: &str, repo: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(agentd_tests::bin("agentd"))
        .args(["task", "apply", id, "--repo"])
        .arg(repo)
        .args(extra)
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap()
}

/// The workspace's `.agentd.toml` gives the setup: it runs once before the agent, its
/// output streams as events, what it changes is in the baseline (not the diff); a request's
/// own setup wins, and a failing one fails the attempt with its output before any prompt;
/// a devcontainer naming an image agentd lacks is refused at create with the file named.
#[test]
fn test_task_setup_and_the_workspace_environment() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::start("cat .setup-stamp > seen.txt && echo four >> src/lib.txt");
    let d = daemon(&images, &llm, &["--task-grace", "1"]);
    let ws = make_workspace();
    std::fs::write(
        ws.path().join(".agentd.toml"),
        "# how agents get this project ready\nsetup = \"echo installing deps through $HTTPS_PROXY; git ls-remote https://denied.example/r.git >/dev/null 2>&1 || echo refused; mkdir -p node_modules/dep && echo dep > node_modules/dep/index.js; echo stamp > .setup-stamp; echo warn-on-stderr >&2\"\n",
    )
    .unwrap();
    let path = ws.path().to_str().unwrap();
    // In allowlist mode: the setup sees the proxy, and OpenCode still reaches the gateway
    // directly (NO_PROXY).
    let id = create(
        &d,
        json!({"prompt": "use what setup made", "workspace": {"path": path}, "check": "test -f .setup-stamp",
               "network": {"mode": "allowlist", "allow": ["pkgs.example"]}}),
    );
    let v = wait_done(&d, &id, Duration::from_secs(180));
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    assert_eq!(v["environment"]["file"], ".agentd.toml", "{v:#}");
    assert!(
        v["setup"].as_str().unwrap().contains("installing deps"),
        "{v:#}"
    );
    let a = &v["attempts"][0];
    assert_eq!(a["setup"]["passed"], true, "{a:#}");
    assert_eq!(a["setup"]["exit_code"], 0, "{a:#}");
    assert!(
        a["setup"]["output"]
            .as_str()
            .unwrap()
            .contains("warn-on-stderr"),
        "{a:#}"
    );
    assert!(a["timings"]["setup_ms"].as_u64().is_some(), "{a:#}");
    let evs = events(&d, &id, None);
    let k = kinds(&evs);
    let at = |kind: &str| {
        k.iter()
            .position(|x| x == kind)
            .unwrap_or_else(|| panic!("no {kind} in {k:?}"))
    };
    assert!(
        at("setup") < at("prompt"),
        "the setup runs before the agent: {k:?}"
    );
    let streamed: String = evs
        .iter()
        .filter(|e| e["type"] == "setup.output")
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert!(
        streamed.contains("installing deps through http://"),
        "{streamed:?}"
    );
    assert_eq!(v["network"]["allow"], json!(["pkgs.example"]), "{v:#}");
    // What the setup tried to reach is in the task's events.
    assert!(streamed.contains("refused"), "{streamed:?}");
    assert!(
        evs.iter().any(|e| e["type"] == "egress"
            && e["host"] == "denied.example"
            && e["allowed"] == false),
        "{evs:#?}"
    );
    assert!(
        evs.iter()
            .any(|e| e["type"] == "setup" && e["state"] == "passed"),
        "{evs:#?}"
    );
    // The agent saw the setup's file; the diff has the agent's work only.
    let patch = d
        .call("GET", &format!("/v1/tasks/{id}/attempts/1/diff"), None)
        .text();
    assert!(
        patch.contains("+stamp") && patch.contains("seen.txt"),
        "{patch}"
    );
    assert!(patch.contains("+four"), "{patch}");
    assert!(
        !patch.contains(".setup-stamp") && !patch.contains("node_modules"),
        "{patch}"
    );

    // The request's setup wins; a failure ends the attempt before any prompt.
    let prompts_before = llm.requests_seen().len();
    let id = create(
        &d,
        json!({"prompt": "never sent", "workspace": {"path": path},
               "setup": "echo resolving; echo 'ERROR: no matching distribution for left-pad' >&2; exit 3"}),
    );
    let v = wait_done(&d, &id, Duration::from_secs(120));
    assert_eq!(v["state"], "failed", "{v:#}");
    let a = &v["attempts"][0];
    let error = a["error"].as_str().unwrap();
    assert!(
        error.starts_with("the setup failed (exit status 3)"),
        "{a:#}"
    );
    assert!(
        error.contains("no matching distribution for left-pad"),
        "{a:#}"
    );
    assert_eq!(a["setup"]["passed"], false, "{a:#}");
    assert!(!kinds(&events(&d, &id, None)).contains(&"prompt".to_string()));
    assert_eq!(llm.requests_seen().len(), prompts_before, "no LLM request");

    // `ignore_environment`: no setup at all.
    let id = create(
        &d,
        json!({"prompt": "no setup", "workspace": {"path": path}, "ignore_environment": true}),
    );
    let v = wait_done(&d, &id, Duration::from_secs(120));
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert!(v["environment"].is_null() && v["setup"].is_null(), "{v:#}");
    assert!(v["attempts"][0]["setup"].is_null(), "{v:#}");

    // A devcontainer naming an image agentd lacks: refused, saying which file and what to do.
    std::fs::remove_file(ws.path().join(".agentd.toml")).unwrap();
    std::fs::create_dir(ws.path().join(".devcontainer")).unwrap();
    std::fs::write(
        ws.path().join(".devcontainer/devcontainer.json"),
        "{\n  // from the team\n  \"image\": \"example.test/devcontainers/python:3\",\n  \"postCreateCommand\": \"pip install -e .\",\n}\n",
    )
    .unwrap();
    let tasks_dir = || {
        std::fs::read_dir(d.state.path().join("tasks"))
            .unwrap()
            .count()
    };
    let before = tasks_dir();
    let r = d.call(
        "POST",
        "/v1/tasks",
        Some(json!({"prompt": "x", "workspace": {"path": path}})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let text = r.text();
    assert!(
        text.contains(".devcontainer/devcontainer.json") && text.contains("agentd image pull"),
        "{text}"
    );
    assert_eq!(tasks_dir(), before, "the refused task left nothing");
    delete_all(&d);
    assert_eq!(d.leftovers(), Vec::<String>::new());
}

/// Builds `rootfs-builder/recipes/python.toml` (a Debian python3 image without OpenCode,
/// from its lock file) and imports it into `d` as `python`; or, with `registry`, pushes it
/// to that registry on loopback and has `d` pull it, as any third-party image. Its name in
/// `d`.
/// A setup with three agents runs once, in a sandbox of its own: every attempt starts from a
/// copy-on-write layer of what it left in the rootfs (not `/tmp`), with the setup in its
/// baseline; the layer goes with the task's sandboxes. A failing shared setup fails every
/// attempt before any prompt; `setup_once: false` runs it in each sandbox.
#[test]
fn test_task_setup_runs_once_for_every_agent() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::start(
        "cat $HOME/.cache/dep.txt .setup-stamp > seen.txt; test -e /tmp/from-setup && echo tmp-carried >> seen.txt; test -e /var/cache/agentd/pip -o -n \"$PIP_CACHE_DIR\" && echo cache-visible >> seen.txt; echo four >> src/lib.txt",
    );
    let mut d = daemon(&images, &llm, &["--task-grace", "2"]);
    let ws = make_workspace();
    let path = ws.path().to_str().unwrap();
    // The dependency cache (PIP_CACHE_DIR): empty the first time, filled the next.
    let setup = "echo setup-ran; if test -e $PIP_CACHE_DIR/wheel; then echo cache-hit; else echo cache-miss; mkdir -p $PIP_CACHE_DIR && echo w > $PIP_CACHE_DIR/wheel; fi; echo built > $HOME/.cache/dep.txt; echo t > /tmp/from-setup; echo stamp > .setup-stamp; dd if=/dev/zero of=$HOME/.cache/blob bs=1M count=4 2>/dev/null";
    let id = create(
        &d,
        json!({"prompt": "use what setup made", "workspace": {"path": path}, "agents": 3,
               "setup": setup, "check": "test -s seen.txt"}),
    );
    // While the attempts run, their sandboxes stack the layer.
    let layer = d.state.path().join("tasks").join(&id).join("prepared");
    let v = wait_done(&d, &id, Duration::from_secs(240));
    report_timings(&v);
    assert_eq!(
        v["state"],
        "succeeded",
        "{v:#}
{}",
        d.log()
    );
    let p = &v["prepared"];
    eprintln!("prepared: {p}");
    assert_eq!(p["state"], "ready", "{v:#}");
    assert!(p["sandbox"].is_null(), "its sandbox is deleted: {p:#}");
    assert!(p["layer_bytes"].as_u64().unwrap() >= 4 << 20, "{p:#}");
    assert_eq!(p["setup"]["passed"], true, "{p:#}");
    assert_eq!(p["cache_reused"], false, "a new cache: {p:#}");
    assert!(
        p["setup"]["output"]
            .as_str()
            .unwrap()
            .contains("cache-miss"),
        "{p:#}"
    );
    assert!(layer.is_dir(), "the layer stays while the sandboxes do");
    let evs = events(&d, &id, None);
    let setups: Vec<&serde_json::Value> = evs
        .iter()
        .filter(|e| e["type"] == "setup" && e["state"] == "running")
        .collect();
    assert_eq!(setups.len(), 1, "one setup for three agents: {evs:#?}");
    assert_eq!(setups[0]["attempt"], 0, "{evs:#?}");
    assert!(
        evs.iter().any(|e| e["type"] == "setup.output"
            && e["text"].as_str().unwrap_or("").contains("setup-ran")),
        "{evs:#?}"
    );
    let mut sandboxes = std::collections::BTreeSet::new();
    for a in v["attempts"].as_array().unwrap() {
        assert_eq!(a["state"], "succeeded", "{a:#}");
        assert_eq!(a["setup"]["passed"], true, "{a:#}");
        assert_eq!(
            a["timings"]["setup_ms"], p["setup_ms"],
            "it waited for it: {a:#}"
        );
        sandboxes.insert(a["sandbox"].as_str().unwrap().to_string());
        let n = a["attempt"].as_u64().unwrap();
        let patch = d
            .call("GET", &format!("/v1/tasks/{id}/attempts/{n}/diff"), None)
            .text();
        // The setup's files outside and inside the workspace reached every agent; /tmp did
        // not; the diff has the agent's work only.
        assert!(
            patch.contains("+built") && patch.contains("+stamp"),
            "{patch}"
        );
        assert!(!patch.contains("tmp-carried"), "{patch}");
        assert!(
            !patch.contains("cache-visible"),
            "agents never see the cache: {patch}"
        );
        assert!(
            patch.contains("+four") && !patch.contains(".setup-stamp"),
            "{patch}"
        );
    }
    assert_eq!(sandboxes.len(), 3, "{v:#}");
    // After the grace period the sandboxes go, then the layer.
    wait_for(&d, &id, "removed layer", |v| {
        v["prepared"]["removed"] == true
    });
    assert!(!layer.exists());

    // One agent, the same repository: its setup finds what the first one cached.
    let id = create(
        &d,
        json!({"prompt": "again", "workspace": {"path": path}, "setup": setup}),
    );
    let v = wait_done(&d, &id, Duration::from_secs(240));
    assert_eq!(v["state"], "succeeded", "{v:#}");
    let p = &v["prepared"];
    assert_eq!(p["cache_reused"], true, "{p:#}");
    assert!(
        p["setup"]["output"].as_str().unwrap().contains("cache-hit"),
        "{p:#}"
    );
    // Another repository never sees it.
    let other = make_workspace();
    let id = create(
        &d,
        json!({"prompt": "other", "workspace": {"path": other.path().to_str().unwrap()}, "setup": setup}),
    );
    let v = wait_done(&d, &id, Duration::from_secs(240));
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(v["prepared"]["cache_reused"], false, "{v:#}");

    // A failing shared setup fails every attempt with its output, before any prompt.
    let prompts_before = llm.requests_seen().len();
    let id = create(
        &d,
        json!({"prompt": "never sent", "workspace": {"path": path}, "agents": 2,
               "setup": "echo 'ERROR: no matching distribution for left-pad' >&2; exit 3"}),
    );
    let v = wait_done(&d, &id, Duration::from_secs(120));
    assert_eq!(v["state"], "failed", "{v:#}");
    assert_eq!(v["prepared"]["state"], "failed", "{v:#}");
    for a in v["attempts"].as_array().unwrap() {
        let error = a["error"].as_str().unwrap();
        assert!(
            error.starts_with("the setup failed (exit status 3)") && error.contains("left-pad"),
            "{a:#}"
        );
        assert_eq!(a["setup"]["passed"], false, "{a:#}");
        assert!(a["sandbox"].is_null(), "{a:#}");
    }
    assert_eq!(llm.requests_seen().len(), prompts_before, "no LLM request");

    // setup_once: false: each attempt runs its own.
    let id = create(
        &d,
        json!({"prompt": "each", "workspace": {"path": path}, "agents": 2, "setup_once": false,
               "setup": setup}),
    );
    let v = wait_done(&d, &id, Duration::from_secs(240));
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert!(v["prepared"].is_null(), "{v:#}");
    let evs = events(&d, &id, None);
    let mut ran: Vec<u64> = evs
        .iter()
        .filter(|e| e["type"] == "setup" && e["state"] == "running")
        .filter_map(|e| e["attempt"].as_u64())
        .collect();
    ran.sort();
    assert_eq!(ran, [1, 2], "{evs:#?}");

    // agentd is killed while the shared setup runs: the restarted agentd starts the
    // preparation over (its old sandbox deleted, the cache unmounted) and the task succeeds.
    let id = create(
        &d,
        json!({"prompt": "after a restart", "workspace": {"path": path}, "agents": 2,
               "setup": "echo started; sleep 4; echo done > $HOME/.cache/dep.txt; echo stamp > .setup-stamp"}),
    );
    wait_for(&d, &id, "setup under way", |v| {
        v["prepared"]["workspace_ms"].as_u64().is_some()
    });
    d.restart(libc::SIGKILL);
    let v = wait_done(&d, &id, Duration::from_secs(240));
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    assert_eq!(v["prepared"]["state"], "ready", "{v:#}");
    let evs = events(&d, &id, None);
    assert!(
        kinds(&evs).contains(&"task.resumed".to_string()),
        "{evs:#?}"
    );
    let patch = d
        .call("GET", &format!("/v1/tasks/{id}/attempts/2/diff"), None)
        .text();
    assert!(patch.contains("+done"), "{patch}");

    // A cancel while the shared setup runs ends it at once: its sandbox goes, every attempt
    // is cancelled, no agent starts.
    let id = create(
        &d,
        json!({"prompt": "never", "workspace": {"path": path}, "agents": 2, "setup": "sleep 300"}),
    );
    wait_for(&d, &id, "setup under way", |v| {
        v["prepared"]["workspace_ms"].as_u64().is_some()
    });
    let t = Instant::now();
    let r = d.call("POST", &format!("/v1/tasks/{id}/cancel"), None);
    assert_eq!(r.status, 202, "{}", r.text());
    let v = wait_done(&d, &id, Duration::from_secs(60));
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert_eq!(v["state"], "cancelled", "{v:#}");
    assert_eq!(v["prepared"]["state"], "failed", "{v:#}");
    assert!(v["prepared"]["sandbox"].is_null(), "{v:#}");
    for a in v["attempts"].as_array().unwrap() {
        assert_eq!(a["state"], "cancelled", "{a:#}");
        assert!(a["sandbox"].is_null(), "{a:#}");
    }
    delete_all(&d);
}

fn python_image(d: &Daemon, registry: Option<&agentd_tests::registry::Registry>) -> String {
    recipe_image(d, "python", registry)
}

/// Builds the image of `rootfs-builder/recipes/<name>.toml` and imports it as `name` (or
/// pushes it to `registry` and pulls it from there).
fn recipe_image(
    d: &Daemon,
    name: &str,
    registry: Option<&agentd_tests::registry::Registry>,
) -> String {
    let out_dir = tempfile::Builder::new()
        .prefix("agentd-recipe-image-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let tar = out_dir.path().join(format!("{name}.tar"));
    let t = Instant::now();
    let out = Command::new(agentd_tests::bin("rootfs-builder"))
        .arg("build")
        .arg(agentd_tests::workspace_root().join(format!("rootfs-builder/recipes/{name}.toml")))
        .arg("--output")
        .arg(&tar)
        .args(["--tag", name, "--cache"])
        .arg(agentd_tests::target_dir().join("rootfs-builder-cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    eprintln!("{name} image built in {:.1} s", t.elapsed().as_secs_f64());
    if let Some(registry) = registry {
        registry.push(
            &format!("oci-archive:{}:python", tar.display()),
            "third/python:1",
        );
        let reference = format!("{}/third/python:1", registry.addr);
        let r = d.call(
            "POST",
            "/v1/images/pull",
            Some(json!({"reference": reference})),
        );
        assert!(
            r.status == 200 && r.text().contains("\"event\":\"complete\""),
            "{}",
            r.text()
        );
        return reference;
    }
    let r = d.call(
        "POST",
        "/v1/images/import",
        Some(json!({"path": tar.to_str().unwrap(), "name": name})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    name.into()
}

/// A real npm package (chalk 4.1.2, from the registry) with a bug, whose test needs its
/// dependencies: the setup `npm ci` runs once through the allowlist (npm's own CA settings
/// from `--egress-ca-file`), two agents fix it, `task apply` makes the branch, and `npm ci &&
/// npm test` pass on the host. A second task of the same repository finds npm's downloads in
/// its dependency cache.
#[test]
fn test_task_on_a_real_node_project_with_npm_ci_through_the_allowlist() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let dl = tempfile::Builder::new()
        .prefix("agentd-npm-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let npm = |args: &[&str], dir: &Path| {
        let out = Command::new("npm")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "npm {args:?}: {}",
            agentd_tests::describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    npm(&["pack", "--silent", "chalk@4.1.2"], dl.path());
    let ws = untar(dl.path(), "chalk-4.1.2.tgz", "chalk");
    // Its own test tools (ava, xo, ...) are hundreds of packages: a test of its behaviour with
    // Node's runner instead, which needs its runtime dependencies all the same.
    let mut pkg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.join("package.json")).unwrap()).unwrap();
    pkg.as_object_mut().unwrap().remove("devDependencies");
    pkg["scripts"] = json!({"test": "node --test test/levels.test.js"});
    std::fs::write(ws.join("package.json"), pkg.to_string()).unwrap();
    std::fs::create_dir(ws.join("test")).unwrap();
    std::fs::write(
        ws.join("test/levels.test.js"),
        "const test = require('node:test');\nconst assert = require('node:assert');\nconst chalk = require('..');\n\ntest('level 0 adds no codes', () => {\n  assert.strictEqual(new chalk.Instance({level: 0}).red('x'), 'x');\n});\n\ntest('level 1 colours', () => {\n  assert.strictEqual(new chalk.Instance({level: 1}).red('x'), '\\u001b[31mx\\u001b[39m');\n});\n",
    )
    .unwrap();
    let src = std::fs::read_to_string(ws.join("source/index.js")).unwrap();
    assert_eq!(src.matches("if (self.level <= 0 || !string) {").count(), 1);
    std::fs::write(
        ws.join("source/index.js"),
        src.replace(
            "if (self.level <= 0 || !string) {",
            "if (self.level < 0 || !string) {",
        ),
    )
    .unwrap();
    npm(
        &[
            "install",
            "--package-lock-only",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
        ],
        &ws,
    );
    std::fs::write(ws.join(".gitignore"), "node_modules/\n").unwrap();
    git(&ws, &["init", "-q", "-b", "main"]);
    git(&ws, &["add", "-A"]);
    git(&ws, &["commit", "-q", "-m", "chalk 4.1.2 with a bug"]);

    // The registry as npm names it; on this machine it resolves into a reserved range, which
    // the admin's setting lets the proxy reach.
    let registry = npm(&["config", "get", "registry"], dl.path());
    let host = registry
        .split("://")
        .nth(1)
        .and_then(|r| r.split(['/', ':']).next())
        .unwrap()
        .to_string();
    let networks = networks_of(std::slice::from_ref(&host));
    let llm = MockLlm::start("sed -i 's/self.level < 0 ||/self.level <= 0 ||/' source/index.js");
    let d = registry_daemon(&images, &llm, &networks);
    recipe_image(&d, "node", None);
    let setup = "npm ci --no-audit --no-fund";
    let id = create(
        &d,
        json!({"prompt": "the level 0 test fails: fix it", "workspace": {"path": ws.to_str().unwrap()},
               "image": "node", "agents": 2, "network": {"mode": "allowlist", "allow": [host]},
               "setup": setup, "check": "npm test"}),
    );
    let v = wait_done(&d, &id, Duration::from_secs(600));
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    report_timings(&v);
    let p = &v["prepared"];
    assert_eq!(p["state"], "ready", "{v:#}");
    assert_eq!(p["cache_reused"], false, "{p:#}");
    assert!(
        p["setup"]["output"].as_str().unwrap().contains("added"),
        "{p:#}"
    );
    for a in v["attempts"].as_array().unwrap() {
        assert_eq!(a["check"]["passed"], true, "{a:#}");
        let patch = d
            .call(
                "GET",
                &format!("/v1/tasks/{id}/attempts/{}/diff", a["attempt"]),
                None,
            )
            .text();
        assert!(
            patch.contains("+\tif (self.level <= 0 || !string) {")
                && !patch.contains("node_modules"),
            "{patch}"
        );
    }
    let first = p["setup_ms"].clone();
    // The same repository again: npm ci takes the tarballs from the dependency cache.
    let again = create(
        &d,
        json!({"prompt": "again", "workspace": {"path": ws.to_str().unwrap()},
               "image": "node", "network": {"mode": "allowlist", "allow": [host]},
               "setup": format!("{setup} --offline")}),
    );
    let v2 = wait_done(&d, &again, Duration::from_secs(600));
    assert_eq!(v2["state"], "succeeded", "{v2:#}");
    let p2 = &v2["prepared"];
    assert_eq!(p2["cache_reused"], true, "{p2:#}");
    eprintln!(
        "npm ci: first {first} ms (empty cache), again {} ms (--offline: every tarball from the cache)",
        p2["setup_ms"]
    );
    let out = task_apply(&d, &id, &ws, &[]);
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    git(&ws, &["checkout", "-q", &format!("agentd/{id}-1")]);
    npm(&["ci", "--no-audit", "--no-fund"], &ws);
    npm(&["test"], &ws);
    delete_all(&d);
}

/// Any image is an agent image: a Debian python3 image that never heard of OpenCode, pulled
/// from a registry on loopback, gets agentd's OpenCode layer (read-only at /opt/agentd), keeps its own env and workdir, and a
/// Python project's own test command runs there as the check; the repository's
/// `.agentd.toml` picks the image and a setup; `task apply` makes the branch whose tests pass
/// on the host.
#[test]
fn test_task_on_an_image_without_opencode() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::start("sed -i 's/return a - b/return a + b/' calc.py");
    if !agentd_tests::registry::tools_available() {
        return;
    }
    let d = daemon(&images, &llm, &["--task-grace", "60"]);
    let registry = agentd_tests::registry::Registry::start();
    let image = python_image(&d, Some(&registry));
    let ws = tempfile::Builder::new()
        .prefix("agentd-py-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let p = ws.path();
    std::fs::write(p.join("calc.py"), "def add(a, b):\n    return a - b\n").unwrap();
    std::fs::write(
        p.join("test_calc.py"),
        "import unittest\nfrom calc import add\n\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n",
    )
    .unwrap();
    std::fs::write(
        p.join(".agentd.toml"),
        format!("image = \"{image}\"\n")
            + "setup = \"python3 -m venv /tmp/venv && /tmp/venv/bin/python -c 'import sys; print(\\\"venv\\\", sys.version_info[0])'\"\n",
    )
    .unwrap();
    git(p, &["init", "-q", "-b", "main"]);
    git(p, &["add", "-A"]);
    git(p, &["commit", "-q", "-m", "a bug"]);
    let id = create(
        &d,
        json!({"prompt": "fix add", "workspace": {"path": p.to_str().unwrap()},
               "check": "python3 -m unittest -q 2>&1"}),
    );
    let v = wait_done(&d, &id, Duration::from_secs(300));
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    assert_eq!(v["image"], image.as_str(), "{v:#}");
    let a = &v["attempts"][0];
    assert_eq!(a["check"]["passed"], true, "{a:#}");
    assert!(
        a["setup"]["output"].as_str().unwrap().contains("venv 3"),
        "{a:#}"
    );
    report_timings(&v);
    // The image's own env and workdir, OpenCode from the read-only layer.
    let sb = a["sandbox"].as_str().unwrap();
    let (_, out, _) = d.exec(
        sb,
        &[
            "sh",
            "-c",
            "echo $LANG; pwd; command -v opencode; touch /opt/agentd/x 2>&1 || echo read-only",
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "C.UTF-8", "{out}");
    assert_eq!(lines[1], "/workspace", "{out}");
    assert_eq!(lines[2], "/opt/agentd/bin/opencode", "{out}");
    assert!(out.contains("read-only"), "{out}");
    // The branch's tests pass on the host.
    let out = task_apply(&d, &id, p, &["--branch", "fixed"]);
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    git(p, &["checkout", "-q", "fixed"]);
    let t = Command::new("python3")
        .args(["-m", "unittest", "-q"])
        .current_dir(p)
        .output()
        .unwrap();
    assert!(t.status.success(), "{}", agentd_tests::describe(&t));
    delete_all(&d);
}

/// `python3 -c CODE` on the host; its stdout.
fn host_python(code: &str) -> String {
    let out = Command::new("python3").args(["-c", code]).output().unwrap();
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A real project nobody here wrote, fetched from the package index this machine uses (the
/// `six` 1.16.0 sdist), with a bug injected: two agents on the Debian python image, a setup
/// that installs the tests' one extra dependency (pytest) with pip through the egress
/// allowlist (the index's hosts as pip itself names them), the project's own tests as the
/// check; then `task apply` and the tests pass on the host.
#[test]
fn test_task_on_a_real_python_project_with_setup_through_the_allowlist() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let dl = tempfile::Builder::new()
        .prefix("agentd-sdist-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "-q",
            "--no-binary",
            ":all:",
            "--no-deps",
            "six==1.16.0",
            "-d",
        ])
        .arg(dl.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    let ws = untar(dl.path(), "six-1.16.0.tar.gz", "six");
    let src = std::fs::read_to_string(ws.join("six.py")).unwrap();
    assert_eq!(src.matches("return s.encode(\"latin-1\")").count(), 1);
    std::fs::write(
        ws.join("six.py"),
        src.replace("return s.encode(\"latin-1\")", "return s.encode(\"utf-8\")"),
    )
    .unwrap();
    git(&ws, &["init", "-q", "-b", "main"]);
    git(&ws, &["add", "-A"]);
    git(&ws, &["commit", "-q", "-m", "six 1.16.0 with a bug"]);

    // The index's hosts as pip names them; on this machine they resolve into a reserved range,
    // which the admin's setting lets the proxy reach.
    let hosts: Vec<String> = host_python(
        "from pip._internal.models.index import PyPI\nimport urllib.parse\nprint(urllib.parse.urlsplit(PyPI.url).hostname, PyPI.file_storage_domain)",
    )
    .split_whitespace()
    .map(String::from)
    .collect();
    let networks = networks_of(&hosts);
    let llm = MockLlm::start("sed -i 's/s.encode(\"utf-8\")/s.encode(\"latin-1\")/' six.py");
    let d = registry_daemon(&images, &llm, &networks);
    python_image(&d, None);
    let check = ".venv/bin/python -m pytest -q -p no:cacheprovider test_six.py -k 'not test_move_items' 2>&1 | tail -3; exit ${PIPESTATUS[0]}";
    let id = create(
        &d,
        json!({"prompt": "test_b fails: fix six.b", "workspace": {"path": ws.to_str().unwrap()},
               "image": "python", "agents": 2,
               "network": {"mode": "allowlist", "allow": hosts},
               "setup": SIX_SETUP,
               "check": format!("bash -c {}", shell_words(check))}),
    );
    let v = wait_done(&d, &id, Duration::from_secs(600));
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    for a in v["attempts"].as_array().unwrap() {
        assert_eq!(a["state"], "succeeded", "{a:#}");
        assert_eq!(a["setup"]["passed"], true, "{a:#}");
        assert_eq!(a["check"]["passed"], true, "{a:#}");
        eprintln!(
            "attempt {}: check {:?} ms",
            a["attempt"], a["timings"]["checks_ms"]
        );
    }
    // One setup (venv + pip install pytest through the proxy) for both agents.
    let p = &v["prepared"];
    assert_eq!(p["state"], "ready", "{v:#}");
    eprintln!("prepared once: {p}");
    let evs = events(&d, &id, None);
    assert!(
        evs.iter().any(|e| e["type"] == "egress"
            && e["host"] == hosts[0].as_str()
            && e["allowed"] == true),
        "no allowed connection to the index: {:#?}",
        evs.iter()
            .filter(|e| e["type"] == "egress")
            .collect::<Vec<_>>()
    );
    report_timings(&v);
    let first = v["prepared"]["setup_ms"].clone();
    // The same repository again, with the repository's dependency cache (pip stores only
    // responses that say they may be cached: this machine's index mirror sends no caching
    // headers, so here pip downloads again).
    let again = create(
        &d,
        json!({"prompt": "test_b fails: fix six.b", "workspace": {"path": ws.to_str().unwrap()},
               "image": "python", "network": {"mode": "allowlist", "allow": hosts},
               "setup": SIX_SETUP}),
    );
    let v2 = wait_done(&d, &again, Duration::from_secs(600));
    assert_eq!(v2["state"], "succeeded", "{v2:#}");
    let p = &v2["prepared"];
    assert_eq!(p["cache_reused"], true, "{p:#}");
    eprintln!(
        "six setup (venv + pip install pytest): first {first} ms (empty cache), again {} ms (cache reused)",
        p["setup_ms"]
    );
    let out = task_apply(&d, &id, &ws, &[]);
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    git(&ws, &["checkout", "-q", &format!("agentd/{id}-1")]);
    let t = Command::new("python3")
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "test_six.py",
            "-k",
            "test_b or test_u",
        ])
        .current_dir(&ws)
        .output()
        .unwrap();
    assert!(t.status.success(), "{}", agentd_tests::describe(&t));
    delete_all(&d);
}

/// The setup of the six task: a venv in the workspace (left out of diffs by default) and
/// pytest from the index through the proxy; run once and shared by the agents.
const SIX_SETUP: &str =
    "python3 -m venv .venv && .venv/bin/pip install -q --disable-pip-version-check pytest";

/// Unpacks `dir/tarball` (a package's tarball, one top dir) into `dir/name`.
fn untar(dir: &Path, tarball: &str, name: &str) -> std::path::PathBuf {
    let ws = dir.join(name);
    std::fs::create_dir(&ws).unwrap();
    let out = Command::new("tar")
        .args(["-xzf", tarball, "--strip-components=1", "-C", name])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    ws
}

/// The addresses `hosts` resolve to, as /32 networks.
fn networks_of(hosts: &[String]) -> Vec<String> {
    let mut networks = Vec::new();
    for h in hosts {
        for a in std::net::ToSocketAddrs::to_socket_addrs(&(h.as_str(), 443)).unwrap() {
            networks.push(format!("{}/32", a.ip()));
        }
    }
    networks
}

/// A daemon whose egress proxy may reach `networks` (where this machine's package registries
/// resolve: a reserved range) with the host's CA bundle (their TLS proxy's CA is only there).
fn registry_daemon(images: &Path, llm: &MockLlm, networks: &[String]) -> Daemon {
    daemon(
        images,
        llm,
        &[
            "--task-grace",
            "1",
            "--egress-allow-networks",
            &networks.join(","),
            "--egress-ca-file",
            "/etc/ssl/certs/ca-certificates.crt",
        ],
    )
}

/// `s` as one single-quoted shell word.
fn shell_words(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A check that fails in round 1 and passes after the agent's second round (the follow-up
/// carried the check's output), on a workspace cloned from a git URL at a branch; then three
/// parallel agents on an uploaded tar: three different diffs, the passing one ranked first.
#[test]
fn test_task_check_rounds_git_workspace_and_parallel_ranking() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let first_turns = AtomicUsize::new(0);
    let llm = MockLlm::scripted(move |req| {
        if last_is_tool(req) {
            return Turn::Text("Done with this round.".into());
        }
        let text = last_user_text(req);
        if text.contains("CHECK-SAYS") {
            Turn::Bash("echo fixed > answer.txt".into())
        } else if text.contains("PARALLEL") {
            // Each agent's first turn gets the next variant: three different diffs.
            match first_turns.fetch_add(1, Ordering::SeqCst) % 3 {
                0 => Turn::Bash("echo 41 > answer.txt".into()),
                1 => Turn::Bash("echo 42 > answer.txt".into()),
                _ => Turn::Bash("printf '43\\nand\\nmore\\n' > answer.txt".into()),
            }
        } else {
            Turn::Bash("echo first-try > answer.txt".into())
        }
    });
    // Two sandboxes at most: the third agent waits (queued) for room.
    let d = daemon(&images, &llm, &["--max-sandboxes", "2"]);

    // A repository with a branch `feature` that has `feature.txt`.
    let base = tempfile::Builder::new()
        .prefix("agentd-git-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let repo = base.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("README.md"), "from git\n").unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    git(&repo, &["checkout", "-q", "-b", "feature"]);
    std::fs::write(repo.join("feature.txt"), "feature\n").unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "two"]);
    git(&repo, &["checkout", "-q", "main"]);
    let server = GitDaemon::start(base.path());

    let check = "test -f feature.txt && grep -qx fixed answer.txt || { echo 'CHECK-SAYS: answer.txt is not fixed'; exit 1; }";
    let id = create(
        &d,
        json!({"prompt": "make the check pass", "workspace": {"git": server.url, "ref": "feature"},
               "check": check, "max_rounds": 2, "model": "mock-large"}),
    );
    let v = wait_done(&d, &id, Duration::from_secs(240));
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    let a = &v["attempts"][0];
    assert_eq!(a["round"], 2, "{a:#}");
    assert_eq!(a["check"]["passed"], true, "{a:#}");
    assert_eq!(a["timings"]["checks_ms"].as_array().unwrap().len(), 2);
    let evs = events(&d, &id, None);
    let checks: Vec<bool> = evs
        .iter()
        .filter(|e| e["type"] == "check")
        .map(|e| e["passed"].as_bool().unwrap())
        .collect();
    assert_eq!(checks, [false, true], "{evs:#?}");
    // The second round's prompt carried the check's output and status.
    let follow_up = llm
        .requests_seen()
        .iter()
        .map(last_user_text)
        .find(|t| t.contains("CHECK-SAYS"))
        .expect("no request carried the check output");
    assert!(follow_up.contains("exit status 1"), "{follow_up}");
    // The task's model reached the upstream.
    assert!(
        llm.requests_seen()
            .iter()
            .any(|r| r["model"] == "mock-large"),
        "no request for the task's model"
    );
    assert!(follow_up.contains("grep -qx fixed"), "{follow_up}");
    // The diff is against the checkout of `feature` (its history came along).
    let patch = d
        .call("GET", &format!("/v1/tasks/{id}/attempts/1/diff"), None)
        .text();
    assert!(
        patch.contains("+fixed") && !patch.contains("feature.txt"),
        "{patch}"
    );
    // The workspace's commit is known, and `task apply` branches from it even though the
    // repository here has `main` checked out.
    let feature = git(&repo, &["rev-parse", "feature"]);
    assert_eq!(a["source_commit"].as_str(), Some(feature.trim()), "{a:#}");
    let out = task_apply(&d, &id, &repo, &["--branch", "agent-fix"]);
    assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("the commit the workspace was at"),
        "{}",
        agentd_tests::describe(&out)
    );
    assert_eq!(git(&repo, &["rev-parse", "agent-fix~1"]), feature);
    assert_eq!(git(&repo, &["show", "agent-fix:answer.txt"]), "fixed\n");
    assert_eq!(git(&repo, &["branch", "--show-current"]), "main\n");
    let r = d.call(
        "POST",
        "/v1/tasks",
        Some(json!({"prompt": "x", "workspace": {"git": server.url, "ref": "no-such-branch"}})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("no-such-branch"), "{}", r.text());

    // Three agents on an uploaded tar; the check passes only for 42.
    let ws = make_workspace();
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", ws.path()).unwrap();
    let tar = b.into_inner().unwrap();
    let r = agentd_tests::daemon::request(
        &d.socket,
        "POST",
        "/v1/workspaces",
        Some(&tar),
        "application/x-tar",
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let upload = r.json()["upload"].as_str().unwrap().to_string();
    let id = create(
        &d,
        json!({"prompt": "PARALLEL: write the answer", "workspace": {"upload": upload},
               "agents": 3, "check": "grep -qx 42 answer.txt", "max_rounds": 1}),
    );
    let v = wait_done(&d, &id, Duration::from_secs(300));
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    report_timings(&v);
    // With room for two sandboxes (one still kept by the first task), agents waited in
    // `queued` and finished attempts' sandboxes made room.
    let evs = events(&d, &id, None);
    let queued = evs
        .iter()
        .find(|e| e["type"] == "attempt.state" && e["state"] == "queued")
        .unwrap_or_else(|| panic!("no attempt waited: {evs:#?}"));
    assert!(
        queued["detail"].as_str().unwrap().contains("max_sandboxes"),
        "{queued}"
    );
    let r = d
        .call("GET", &format!("/v1/tasks/{id}/result"), None)
        .json();
    let attempts = r["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3);
    assert_eq!(attempts[0]["state"], "succeeded", "{r:#}");
    assert!(
        attempts[0]["patch"].as_str().unwrap().contains("+42"),
        "{r:#}"
    );
    for a in &attempts[1..] {
        assert_eq!(a["state"], "failed", "{r:#}");
        assert_eq!(a["check"]["passed"], false, "{r:#}");
    }
    // Smaller diff before larger among the failing ones: "41" (1 line) before "43..." (3).
    assert!(
        attempts[1]["patch"].as_str().unwrap().contains("+41"),
        "{r:#}"
    );
    assert!(
        attempts[2]["patch"].as_str().unwrap().contains("+43"),
        "{r:#}"
    );
    let patches: std::collections::HashSet<&str> = attempts
        .iter()
        .map(|a| a["patch"].as_str().unwrap())
        .collect();
    assert_eq!(patches.len(), 3);
    // Each patch applies to the original workspace.
    for a in attempts {
        let copy = copy_dir(ws.path());
        git_apply(copy.path(), a["patch"].as_str().unwrap().as_bytes());
    }
    // An upload serves one task.
    let r = d.call(
        "POST",
        "/v1/tasks",
        Some(json!({"prompt": "x", "workspace": {"upload": upload}})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    delete_all(&d);
}

/// Cancel mid-run, a timeout, and agentd killed mid-task: the task resumes and finishes.
#[test]
fn test_task_cancel_timeout_and_restart() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::scripted(|req| {
        if last_is_tool(req) {
            return Turn::Text("Finished.".into());
        }
        let text = last_user_text(req);
        if text.contains("SLOW") {
            Turn::Bash("sleep 8; echo slow-done > slow.txt".into())
        } else {
            Turn::Bash("sleep 300".into())
        }
    });
    // Room for one sandbox: a second task waits in `queued` across the restart.
    let mut d = daemon(&images, &llm, &["--max-sandboxes", "1"]);
    let ws = make_workspace();
    let tool_running = |v: &serde_json::Value| v["attempts"][0]["tool_calls"].as_u64() >= Some(1);

    // Cancel while the agent's tool runs.
    let id = create(
        &d,
        json!({"prompt": "FOREVER", "workspace": {"path": ws.path()}}),
    );
    wait_for(&d, &id, "tool call", tool_running);
    let r = d.call("POST", &format!("/v1/tasks/{id}/cancel"), None);
    assert_eq!(r.status, 202, "{}", r.text());
    let v = wait_done(&d, &id, Duration::from_secs(60));
    assert_eq!(v["state"], "cancelled", "{v:#}");
    assert_eq!(v["attempts"][0]["state"], "cancelled", "{v:#}");
    let sb = v["attempts"][0]["sandbox"].as_str().unwrap().to_string();
    let s = d.call("GET", &format!("/v1/sandboxes/{sb}"), None).json();
    assert_eq!(s["state"], "stopped", "{s:#}");
    assert_eq!(
        d.call("POST", &format!("/v1/tasks/{id}/cancel"), None)
            .status,
        409
    );

    // The time limit.
    let id = create(
        &d,
        json!({"prompt": "FOREVER", "workspace": {"path": ws.path()}, "timeout_secs": 20}),
    );
    let v = wait_done(&d, &id, Duration::from_secs(90));
    assert_eq!(v["state"], "timed_out", "{v:#}");
    assert!(
        v["attempts"][0]["error"]
            .as_str()
            .unwrap()
            .contains("time limit"),
        "{v:#}"
    );

    // agentd is killed while the agent's tool runs; the restarted agentd follows the
    // sandbox again and the task finishes with the tool's file in the diff.
    let id = create(
        &d,
        json!({"prompt": "SLOW", "workspace": {"path": ws.path()}}),
    );
    wait_for(&d, &id, "tool call", tool_running);
    let queued = create(
        &d,
        json!({"prompt": "SLOW too", "workspace": {"path": ws.path()}}),
    );
    wait_for(&d, &queued, "wait for room", |v| {
        v["attempts"][0]["state"] == "queued" && v["state"] == "queued"
    });
    d.restart(libc::SIGKILL);
    let v = d.call("GET", &format!("/v1/tasks/{id}"), None).json();
    assert_eq!(
        v["state"], "running",
        "the task ended before the restart: {v:#}"
    );
    let v = wait_done(&d, &id, Duration::from_secs(120));
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    report_timings(&v);
    let patch = d
        .call("GET", &format!("/v1/tasks/{id}/attempts/1/diff"), None)
        .text();
    assert!(patch.contains("+slow-done"), "{patch}");
    // The queued task started after the restart, once the first one's sandbox made room.
    let v = wait_done(&d, &queued, Duration::from_secs(120));
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    let evs = events(&d, &id, None);
    assert!(
        kinds(&evs).contains(&"task.resumed".to_string()),
        "{evs:#?}"
    );
    let all_ids = ids(&evs);
    assert_eq!(all_ids, (1..=all_ids.len() as u64).collect::<Vec<_>>());
    delete_all(&d);
}

/// Prints each attempt's timings (for the record of how long tasks take).
fn report_timings(v: &serde_json::Value) {
    for a in v["attempts"].as_array().unwrap() {
        eprintln!(
            "task {} attempt {}: {} timings {}",
            v["id"], a["attempt"], a["state"], a["timings"]
        );
    }
}

/// Deletes a task: 202 with state `deleting` at once, then gone.
pub fn delete_task(d: &Daemon, id: &str) {
    let r = d.call("DELETE", &format!("/v1/tasks/{id}"), None);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["state"], "deleting", "{}", r.text());
    let start = Instant::now();
    while d.call("GET", &format!("/v1/tasks/{id}"), None).status != 404 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "task {id} not deleted in 120 s\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Deletes every task and checks nothing of their sandboxes is left on the host.
fn delete_all(d: &Daemon) {
    let l = d.call("GET", "/v1/tasks", None).json();
    for t in l["tasks"].as_array().unwrap() {
        let id = t["id"].as_str().unwrap();
        delete_task(d, id);
    }
    let l = d.call("GET", "/v1/sandboxes", None).json();
    assert_eq!(l["sandboxes"].as_array().unwrap().len(), 0, "{l:#}");
    assert_eq!(d.leftovers(), Vec::<String>::new());
}

/// Results a user can trust: a check that writes more than a pipe holds and a diff full of
/// caches (left out: `.gitignore` and the default excludes) succeed with a clean patch; a diff
/// that cannot be made fails the attempt with the command, its status and its stderr; a
/// passing check with no change is a success with a note and no patch; a check past its
/// `check_timeout_secs` is killed and fails the round with a message.
#[test]
fn test_task_results_are_truthful() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::scripted(|req| {
        if last_is_tool(req) {
            return Turn::Text("Done.".into());
        }
        let text = last_user_text(req);
        if text.contains("WRITE-CACHES") {
            Turn::Bash(
                "mkdir -p __pycache__ pkg/__pycache__ .pytest_cache node_modules/x \
                 && head -c 300000 /dev/urandom > __pycache__/m.cpython-311.pyc \
                 && echo x > pkg/__pycache__/a.pyc && echo x > .pytest_cache/v \
                 && echo x > node_modules/x/i.js && echo ignored > local.log \
                 && echo fixed > answer.txt \
                 && head -c 100000 /dev/zero | tr '\\0' y > big.txt"
                    .into(),
            )
        } else if text.contains("BREAK-GIT") {
            Turn::Bash("echo changed > answer.txt && chmod 000 .git/objects".into())
        } else if text.contains("SLOW-CHECK") {
            Turn::Bash("echo slow > answer.txt".into())
        } else {
            Turn::Text("Nothing to do.".into())
        }
    });
    let d = daemon(&images, &llm, &[]);
    let ws = make_workspace();
    std::fs::write(ws.path().join(".gitignore"), "*.log\n").unwrap();
    let path = ws.path().to_str().unwrap();
    let caches = create(
        &d,
        json!({"prompt": "WRITE-CACHES", "workspace": {"path": path},
               "check": "cat big.txt; grep -qx fixed answer.txt", "max_rounds": 1}),
    );
    let broken = create(
        &d,
        json!({"prompt": "BREAK-GIT", "workspace": {"path": path}}),
    );
    let nothing = create(
        &d,
        json!({"prompt": "NOTHING", "workspace": {"path": path}, "check": "true", "max_rounds": 1}),
    );
    let slow = create(
        &d,
        json!({"prompt": "SLOW-CHECK", "workspace": {"path": path},
               "check": "echo started; sleep 30", "check_timeout_secs": 2, "max_rounds": 1}),
    );

    let v = wait_done(&d, &caches, Duration::from_secs(300));
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    let a = &v["attempts"][0];
    let output = a["check"]["output"].as_str().unwrap();
    assert!(output.ends_with("yyyy"), "{a:#}");
    let r = d
        .call("GET", &format!("/v1/tasks/{caches}/result"), None)
        .json();
    assert_eq!(r["attempts_with_patch"], json!([1]), "{r:#}");
    assert_eq!(r["attempts"][0]["has_patch"], true);
    let patch = r["attempts"][0]["patch"].as_str().unwrap();
    assert!(
        patch.contains("answer.txt") && patch.contains("big.txt"),
        "{patch:.500}"
    );
    for cache in [
        "__pycache__",
        ".pyc",
        ".pytest_cache",
        "node_modules",
        "local.log",
    ] {
        assert!(!patch.contains(cache), "{cache} in the diff: {patch:.2000}");
    }

    let v = wait_done(&d, &broken, Duration::from_secs(300));
    assert_eq!(v["state"], "failed", "{v:#}\n{}", d.log());
    let err = v["attempts"][0]["error"].as_str().unwrap();
    assert!(
        err.contains("git add -A") && err.contains("exited with status"),
        "{err}"
    );

    let v = wait_done(&d, &nothing, Duration::from_secs(300));
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    assert!(
        v["attempts"][0]["note"]
            .as_str()
            .is_some_and(|n| n.contains("changed nothing")),
        "{v:#}"
    );
    let r = d
        .call("GET", &format!("/v1/tasks/{nothing}/result"), None)
        .json();
    assert_eq!(r["attempts_with_patch"], json!([]), "{r:#}");
    assert_eq!(r["attempts"][0]["has_patch"], false);

    let v = wait_done(&d, &slow, Duration::from_secs(300));
    assert_eq!(v["state"], "failed", "{v:#}\n{}", d.log());
    let a = &v["attempts"][0];
    assert_eq!(a["check"]["timed_out"], true, "{a:#}");
    assert!(
        a["check"]["duration_ms"].as_u64().unwrap() < 15_000,
        "{a:#}"
    );
    let out = a["check"]["output"].as_str().unwrap();
    assert!(
        out.contains("started") && out.contains("timed out after 2 s"),
        "{out}"
    );
    assert!(
        a["error"].as_str().unwrap().contains("timed out after 2 s"),
        "{a:#}"
    );
    delete_all(&d);
}

/// The permission requests of task `id` waiting for a person, once there is one other than
/// `seen` (within 120 s).
fn next_approvals(d: &Daemon, id: &str, seen: &[String]) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        let v = d
            .call("GET", &format!("/v1/tasks/{id}/approvals"), None)
            .json();
        let list = v["approvals"].as_array().cloned().unwrap_or_default();
        if list
            .iter()
            .any(|a| !seen.iter().any(|s| a["id"].as_str() == Some(s.as_str())))
        {
            return list;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no approval request: {:#}\n{}",
            d.call("GET", &format!("/v1/tasks/{id}"), None).json(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A person in the loop: a task whose permissions make bash ask holds the agent's call until
/// someone answers; the request is listed with its command (API and CLI), is an `approval`
/// event, the attempt and the task say `waiting` and the time limit does not run meanwhile;
/// a follow-up sent while it waits reaches the agent when its turn ends; answers from the CLI
/// and the API let the calls run and the attempt succeed.
#[test]
fn test_task_approvals() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::start("echo approved > approved.txt");
    let d = daemon(&images, &llm, &["--task-grace", "3"]);
    let ws = make_workspace();
    let created = Instant::now();
    let id = create(
        &d,
        json!({
            "prompt": "write approved.txt",
            "workspace": {"path": ws.path()},
            "check": "test -f approved.txt",
            "permissions": {"bash": "ask"},
            "timeout_secs": 40,
        }),
    );
    // The request appears, naming the command.
    let approvals = next_approvals(&d, &id, &[]);
    let a = &approvals[0];
    assert_eq!(a["permission"], "bash", "{a:#}");
    assert_eq!(a["attempt"], 1, "{a:#}");
    assert!(a["patterns"].to_string().contains("echo approved"), "{a:#}");
    // Nothing runs meanwhile: the attempt and the task wait, past the 40 s time limit.
    std::thread::sleep(Duration::from_secs(45).saturating_sub(created.elapsed()));
    let v = d.call("GET", &format!("/v1/tasks/{id}"), None).json();
    assert_eq!(v["state"], "waiting", "{v:#}");
    assert_eq!(v["attempts"][0]["state"], "waiting", "{v:#}");
    assert!(
        v["attempts"][0]["waited_ms"].as_u64().unwrap() > 1000,
        "{v:#}"
    );
    // A follow-up while it waits: kept for the end of the agent's turn.
    let r = d.call(
        "POST",
        &format!("/v1/tasks/{id}/attempts/1/messages"),
        Some(json!({"text": "FOLLOWUP: write it once more"})),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["reopened"], false);
    assert_eq!(r.json()["pending"], 1);
    // The CLI lists it and answers it.
    let cli = |args: &[&str]| {
        Command::new(agentd_tests::bin("agentd"))
            .arg("task")
            .args(args)
            .env("AGENTD_SOCKET", &d.socket)
            .output()
            .unwrap()
    };
    let request = a["id"].as_str().unwrap();
    let out = cli(&["approvals", &id]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(request),
        "{out:?}"
    );
    let r = d.call(
        "POST",
        &format!("/v1/tasks/{id}/approvals/per_nope"),
        Some(json!({"reply": "once"})),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    let out = cli(&["approve", &id, request]);
    assert!(out.status.success(), "{out:?}");
    // The follow-up's turn: the agent asks again; answered for good through the API.
    let again = next_approvals(&d, &id, &[request.to_string()]);
    let second = again[0]["id"].as_str().unwrap();
    let r = d.call(
        "POST",
        &format!("/v1/tasks/{id}/approvals/{second}"),
        Some(json!({"reply": "always"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = wait_done(&d, &id, Duration::from_secs(180));
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    assert!(
        llm.requests_seen()
            .iter()
            .any(|r| agentd_tests::daemon::last_user_text(r)
                .contains("FOLLOWUP: write it once more")),
        "the follow-up never reached the agent"
    );
    assert_eq!(v["attempts"][0]["follow_ups_pending"], 0, "{v:#}");
    let evs = events(&d, &id, None);
    let approvals: Vec<&serde_json::Value> =
        evs.iter().filter(|e| e["type"] == "approval").collect();
    assert!(
        approvals
            .iter()
            .any(|e| e["state"] == "asked" && e["permission"] == "bash")
            && approvals.iter().any(|e| e["state"] == "replied"),
        "{approvals:#?} {:?}",
        kinds(&evs)
    );
    assert!(
        evs.iter()
            .any(|e| e["type"] == "attempt.state" && e["state"] == "waiting"),
        "{:?}",
        kinds(&evs)
    );
    assert!(
        evs.iter()
            .any(|e| e["type"] == "prompt" && e["follow_up"] == true),
        "{:?}",
        kinds(&evs)
    );
    // The live view: what the agent wrote, the tool call with its output, the approval.
    let tool = evs
        .iter()
        .find(|e| e["type"] == "tool" && e["status"] == "completed")
        .unwrap_or_else(|| panic!("{evs:#?}"));
    assert!(
        tool["input"].to_string().contains("echo approved"),
        "{tool:#}"
    );
    assert!(tool.get("output").is_some(), "{tool:#}");
    let out = cli(&["watch", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for want in [
        "asks to use bash",
        &format!("agentd task approve {id} {request}"),
        "[completed]",
        "All done",
        "check passed",
        "task finished: succeeded",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    d.delete_all_and_check_clean();
}

/// Follow-ups to a finished attempt whose sandbox is kept (`agentd task say`): the attempt
/// runs again for it (the agent gets the message in its session, the check runs again, the
/// diff is taken again) and the task ends again; what cannot be reopened says why.
#[test]
fn test_task_follow_ups() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::scripted(|req| {
        if agentd_tests::daemon::last_is_tool(req) {
            agentd_tests::daemon::Turn::Text("Done.".into())
        } else if agentd_tests::daemon::last_user_text(req).contains("FOLLOWUP") {
            agentd_tests::daemon::Turn::Bash("echo more > followed.txt".into())
        } else {
            agentd_tests::daemon::Turn::Bash("echo first > first.txt".into())
        }
    });
    let d = daemon(&images, &llm, &["--task-grace", "600"]);
    let ws = make_workspace();
    let id = create(
        &d,
        json!({
            "prompt": "write first.txt",
            "workspace": {"path": ws.path()},
            "check": "test -f first.txt",
        }),
    );
    let v = wait_done(&d, &id, Duration::from_secs(180));
    assert_eq!(v["state"], "succeeded", "{v:#}\n{}", d.log());
    let diff = |d: &Daemon| {
        d.call("GET", &format!("/v1/tasks/{id}/attempts/1/diff"), None)
            .text()
    };
    assert!(!diff(&d).contains("followed.txt"));
    // The finished attempt's sandbox is kept, hibernated (or paused, if its OpenCode was still
    // busy): the follow-up below wakes it.
    let sandbox = v["attempts"][0]["sandbox"].as_str().unwrap().to_string();
    let sv = d
        .call("GET", &format!("/v1/sandboxes/{sandbox}"), None)
        .json();
    assert_eq!(sv["paused"], true, "{sv:#}");
    eprintln!(
        "the finished attempt's sandbox: hibernated {}",
        sv["hibernated"]
    );

    // Bad follow-ups.
    let say = |n: &str, text: &str| {
        d.call(
            "POST",
            &format!("/v1/tasks/{id}/attempts/{n}/messages"),
            Some(json!({ "text": text })),
        )
    };
    assert_eq!(say("2", "hi").status, 404);
    assert_eq!(say("1", "  ").status, 400);

    // From the CLI: the attempt runs again.
    let out = Command::new(agentd_tests::bin("agentd"))
        .args([
            "task",
            "say",
            &id,
            "1",
            "FOLLOWUP:",
            "also",
            "write",
            "followed.txt",
        ])
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("runs again"),
        "{out:?}"
    );
    let start = Instant::now();
    let v = loop {
        let v = d.call("GET", &format!("/v1/tasks/{id}"), None).json();
        let evs = events(&d, &id, None);
        let checks = evs.iter().filter(|e| e["type"] == "check").count();
        if v["state"] == "succeeded" && checks >= 2 {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{v:#}\n{:?}\n{}",
            kinds(&evs),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(v["attempts"][0]["state"], "succeeded", "{v:#}");
    assert!(diff(&d).contains("followed.txt"), "{}", diff(&d));
    let evs = events(&d, &id, None);
    assert!(
        evs.iter()
            .any(|e| e["type"] == "follow_up" && e["state"] == "reopened"),
        "{:?}",
        kinds(&evs)
    );
    assert_eq!(
        evs.iter().filter(|e| e["type"] == "task.finished").count(),
        2,
        "{:?}",
        kinds(&evs)
    );

    // Once the sandbox is gone, the attempt cannot run again.
    let sandbox = v["attempts"][0]["sandbox"].as_str().unwrap().to_string();
    let r = d.call("DELETE", &format!("/v1/sandboxes/{sandbox}"), None);
    assert_eq!(r.status, 204, "{}", r.text());
    let r = say("1", "FOLLOWUP again");
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("sandbox is gone"), "{}", r.text());
    d.delete_all_and_check_clean();
}

/// `agentd task run --ask bash` on a terminal (tmux): the agent's permission request is asked
/// there, a typed `o` answers it, and the task succeeds with the diff printed.
#[test]
fn test_task_run_asks_at_the_terminal() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = MockLlm::start("echo approved > approved.txt");
    let d = daemon(&images, &llm, &["--task-grace", "3"]);
    let ws = make_workspace();
    let dir = tempfile::tempdir().unwrap();
    let tmux_socket = dir.path().join("tmux.sock");
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .arg("-S")
            .arg(&tmux_socket)
            .args(args)
            .output()
            .expect("tmux (.ci/run installs it)")
    };
    let log = dir.path().join("out.txt");
    let command = format!(
        "env AGENTD_SOCKET={sock} {agentd} task run --ask bash --check 'test -f approved.txt' --workspace {ws} 'write approved.txt' > {log} ; echo EXIT=$? >> {log}; sleep 60",
        sock = d.socket.display(),
        agentd = agentd_tests::bin("agentd").display(),
        ws = ws.path().display(),
        log = log.display(),
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "160",
        "-y",
        "48",
        &command,
    ]);
    assert!(out.status.success(), "{out:?}");
    let screen =
        || String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "t"]).stdout).into_owned();
    let t = Instant::now();
    while !screen().contains("allow it?") {
        if t.elapsed() > Duration::from_secs(120) {
            let s = screen();
            let _ = tmux(&["kill-server"]);
            panic!("never asked; the screen:\n{s}\n{}", d.log());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        screen().contains("asks to use bash: echo approved"),
        "{}",
        screen()
    );
    let _ = tmux(&["send-keys", "-t", "t", "-l", "o"]);
    let _ = tmux(&["send-keys", "-t", "t", "Enter"]);
    let t = Instant::now();
    let out = loop {
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        if out.contains("EXIT=") {
            break out;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let s = screen();
            let _ = tmux(&["kill-server"]);
            panic!("task run never ended; the screen:\n{s}\n{}", d.log());
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let s = screen();
    let _ = tmux(&["kill-server"]);
    assert!(out.contains("EXIT=0"), "{out}\n{s}");
    assert!(out.contains("+approved"), "{out}\n{s}");
    let list = d.call("GET", "/v1/tasks", None).json();
    let id = list["tasks"][0]["id"].as_str().unwrap().to_string();
    let evs = events(&d, &id, None);
    assert!(
        evs.iter()
            .any(|e| e["type"] == "approval" && e["state"] == "replied" && e["reply"] == "once"),
        "{:?}\n{s}",
        kinds(&evs)
    );
    d.delete_all_and_check_clean();
}

/// axe-core (npm, pinned) for the UI's accessibility check: packed once into the target dir.
fn axe_core() -> std::path::PathBuf {
    let dir = agentd_tests::target_dir().join("test-fixtures/axe-core-4.10.2");
    let file = dir.join("package/axe.min.js");
    if !file.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("npm")
            .args(["pack", "--silent", "axe-core@4.10.2", "--pack-destination"])
            .arg(&dir)
            .output()
            .expect("npm (.ci/run installs it)");
        assert!(out.status.success(), "npm pack axe-core: {out:?}");
        let out = Command::new("tar")
            .arg("xzf")
            .arg(dir.join("axe-core-4.10.2.tgz"))
            .arg("-C")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    file
}

/// agentd's web UI in Debian's Chromium (Playwright), as a person uses it: a login link and
/// the token; a task of two agents on a git repository with bash on ask, watched live, both
/// requests answered in the page, the ranked diff (unified and split), an attempt's OpenCode
/// UI, a terminal in its sandbox, the task deleted; axe-core finds no serious violation.
/// Screenshots go to `target/test-artifacts/ui`.
#[test]
fn test_web_ui_in_a_browser() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let ready = Command::new("python3")
        .args(["-c", "import playwright.sync_api"])
        .output()
        .is_ok_and(|o| o.status.success())
        && Path::new("/usr/bin/chromium").exists();
    if !ready {
        eprintln!(
            "SKIPPED: needs python3 with playwright and /usr/bin/chromium (.ci/run installs them)"
        );
        agentd_tests::required_or_skip();
        return;
    }
    let axe = axe_core();
    let llm = MockLlm::start("echo approved > approved.txt");
    let listen = format!("127.0.0.1:{}", agentd_tests::registry::free_port());
    let d = daemon(
        &images,
        &llm,
        &[
            "--listen",
            &listen,
            "--git-allow-networks",
            "127.0.0.0/8",
            "--task-grace",
            "600",
        ],
    );
    let base = tempfile::Builder::new()
        .prefix("agentd-git-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let repo = base.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("README.md"), "a small repository\n").unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    let server = GitDaemon::start(base.path());
    let out = Command::new(agentd_tests::bin("agentd"))
        .arg("ui")
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let login = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        login.starts_with(&format!("http://{listen}/ui/login?ticket=")),
        "{login}"
    );
    let shots = agentd_tests::target_dir().join("test-artifacts/ui");
    let out = Command::new("python3")
        .arg(agentd_tests::workspace_root().join("tests/browser/ui.py"))
        .env("BASE_URL", format!("http://{listen}"))
        .env("TOKEN", d.token())
        .env("LOGIN_URL", &login)
        .env("GIT_URL", &server.url)
        .env("AXE", &axe)
        .env("SHOTS", &shots)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        agentd_tests::describe(&out),
        d.log()
    );
    let seen: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("{}"),
    )
    .unwrap();
    eprintln!("web UI: {seen}");
    assert_eq!(seen["approvals_answered"], 2, "{seen:#}");
    assert!(
        seen["opencode_url"]
            .as_str()
            .is_some_and(|u| u.contains(".localhost:")),
        "{seen:#}"
    );
    for shot in [
        "new-task.png",
        "approval.png",
        "task-results.png",
        "terminal.png",
        "tasks.png",
    ] {
        let len = std::fs::metadata(shots.join(shot)).map_or(0, |m| m.len());
        assert!(len > 10_000, "{shot}: {len} bytes");
    }
    // The session's limits, from a plain HTTP client: the cookie reads; a change needs the
    // CSRF header and the UI's own origin; a sandbox's origin (same-site) is refused.
    let raw = |req: String| -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&listen).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let body = json!({ "token": d.token() }).to_string();
    let answer = raw(format!(
        "POST /ui/login HTTP/1.1\r\nHost: {listen}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    let set = answer
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie: agentd_ui="))
        .unwrap_or_else(|| panic!("{answer}"));
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set["set-cookie: ".len()..]
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let req = |method: &str, path: &str, extra: &str| {
        raw(format!(
            "{method} {path} HTTP/1.1\r\nHost: {listen}\r\nCookie: {cookie}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        ))
    };
    let status = |a: &str| a.split_whitespace().nth(1).unwrap_or("").to_string();
    assert_eq!(status(&req("GET", "/v1/tasks", "")), "200");
    assert_eq!(status(&req("POST", "/v1/tasks/nosuch/cancel", "")), "401");
    let foreign = format!(
        "Origin: http://3000-x.localhost:{}\r\n",
        listen.rsplit(':').next().unwrap()
    );
    assert_eq!(
        status(&req(
            "POST",
            "/v1/tasks/nosuch/cancel",
            &format!("X-Agentd-CSRF: 1\r\n{foreign}")
        )),
        "401"
    );
    assert_eq!(
        status(&req(
            "POST",
            "/v1/tasks/nosuch/cancel",
            &format!("X-Agentd-CSRF: 1\r\nOrigin: http://{listen}\r\n")
        )),
        "404"
    );
    let page = req("GET", "/", "");
    assert!(
        page.to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{page}"
    );

    // The page's delete went through: the task is deleting or gone.
    let id = seen["task"].as_str().unwrap();
    let r = d.call("GET", &format!("/v1/tasks/{id}"), None);
    assert!(
        r.status == 404 || r.json()["state"] == "deleting",
        "{}",
        r.text()
    );
    d.delete_all_and_check_clean();
}
