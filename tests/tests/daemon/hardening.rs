//! The daemon's own boundary and truthful results, grouped by attacker: a process in a
//! sandbox, a TCP client, a flood. Each test asserts the secure outcome and that the host is
//! unchanged (nothing left behind). Issue 12 lists the properties; docs/security.md names the
//! test of each.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use agentd_tests::daemon::{request, tcp_request, Daemon};
use agentd_tests::require_sandbox_support;
use serde_json::json;

use super::store;

/// A daemon without an LLM upstream.
fn plain_daemon(images: &std::path::Path) -> Daemon {
    let port = agentd_tests::registry::free_port().to_string();
    Daemon::start(images, &["--gateway-port", &port])
}

/// Lines of an exec response: (stdout, stderr, the last line).
fn exec_lines(body: &[u8]) -> (String, String, serde_json::Value) {
    let (mut out, mut err, mut end) = (String::new(), String::new(), json!(null));
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        match v["stream"].as_str() {
            Some("stdout") => out.push_str(v["data"].as_str().unwrap()),
            Some("stderr") => err.push_str(v["data"].as_str().unwrap()),
            _ => end = v,
        }
    }
    (out, err, end)
}

/// Opens an exec whose response is read as it streams; returns the socket after the head.
fn exec_stream(d: &Daemon, id: &str, body: &str) -> UnixStream {
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST /v1/sandboxes/{id}/exec HTTP/1.1\r\nHost: agentd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// Reads from `s` until `needle` shows up; the time it took.
fn read_until(s: &mut UnixStream, needle: &str) -> (Duration, String) {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "stream ended before {needle:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    (start.elapsed(), String::from_utf8_lossy(&seen).into_owned())
}

/// A process in a sandbox and an API client: exec output is read while the process runs
/// (more than a pipe holds never blocks it), streamed as it comes, takes stdin, and a client
/// that goes away kills its process; bad input answers 4xx; races answer 404/409.
#[test]
fn test_exec_streams_takes_stdin_and_dies_with_its_client() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = plain_daemon(&images);
    let id = d.plain_sandbox();

    // The shim's argv (the sandbox's PID 1 is a fork of it) names no host path, nor do the
    // overlay's options in the sandbox's mountinfo (its dirs are named by the shim's fds).
    let (code, out, _) = d.exec(
        &id,
        &[
            "sh",
            "-c",
            "tr '\\0' ' ' < /proc/1/cmdline; cat /proc/self/mountinfo",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let state = d.state.path().to_str().unwrap();
    let store_dir = d.images.to_str().unwrap();
    assert!(out.contains("agentd-shim"), "{out}");
    assert!(out.contains("lowerdir=/proc/self/fd/"), "{out}");
    for host in [
        state,
        store_dir,
        "/work/",
        "target/debug",
        "sandbox.json/",
        "/var/tmp/",
    ] {
        assert!(!out.contains(host), "{host} shows inside:\n{out}");
    }

    // 70,000 bytes (more than a 64 KiB pipe) from an instant command with a 5 s timeout.
    let t = Instant::now();
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"command": ["sh", "-c", "head -c 70000 /dev/zero | tr '\\0' a; head -c 70000 /dev/zero | tr '\\0' b >&2"], "timeout_secs": 5})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (out, err, end) = exec_lines(&r.body);
    assert_eq!((out.len(), err.len()), (70_000, 70_000), "{end}");
    assert!(out.bytes().all(|b| b == b'a') && err.bytes().all(|b| b == b'b'));
    assert_eq!(end["exit_code"], 0, "{end}");
    assert_eq!(end["timed_out"], false, "{end}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // Output arrives while the process runs, not at its end.
    let mut s = exec_stream(
        &d,
        &id,
        r#"{"command":["sh","-c","echo first-line; sleep 4; echo second-line"]}"#,
    );
    let (took, _) = read_until(&mut s, "first-line");
    assert!(took < Duration::from_secs(3), "first line after {took:?}");
    let (_, rest) = read_until(&mut s, "exit_code");
    assert!(rest.contains("second-line"), "{rest}");
    drop(s);

    // Stdin: the bytes after the JSON request and a newline.
    let body = b"{\"command\":[\"sh\",\"-c\",\"wc -c; cat\"],\"stdin\":true}\nhello stdin";
    let r = request(
        &d.socket,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(body),
        "application/json",
    );
    let (out, _, end) = exec_lines(&r.body);
    assert_eq!(out.trim(), "11", "{end}");
    // Data after the request without "stdin": refused, not silently dropped.
    let r = request(
        &d.socket,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(b"{\"command\":[\"cat\"]}\nsurprise"),
        "application/json",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("stdin"), "{}", r.text());

    // A client that goes away kills its process.
    let mut s = exec_stream(
        &d,
        &id,
        r#"{"command":["sh","-c","echo pid=$$; exec sleep 300"]}"#,
    );
    let (_, seen) = read_until(&mut s, "pid=");
    let pid: String = seen
        .split("pid=")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    assert!(!pid.is_empty(), "{seen}");
    drop(s);
    let start = Instant::now();
    loop {
        let (code, _, _) = d.exec(&id, &["sh", "-c", &format!("kill -0 {pid}")]);
        if code != 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the exec of a client that left still runs\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Limits: a default pids limit; timeouts bounded.
    let v = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert_eq!(v["limits"]["pids"], 2048, "{v}");
    for body in [
        json!({"image": "opencode", "opencode": false, "ttl_secs": u64::MAX / 2}),
        json!({"image": "opencode", "opencode": false, "idle_timeout_secs": u64::MAX}),
        json!({"image": "opencode", "opencode": false, "ttl_secs": 0}),
    ] {
        let r = d.call("POST", "/v1/sandboxes", Some(body.clone()));
        assert_eq!(r.status, 400, "{body}: {}", r.text());
    }
    // No LLM upstream: OpenCode sandboxes and tasks are refused at once, naming the flag.
    for (path, body) in [
        ("/v1/sandboxes", json!({"image": "opencode"})),
        (
            "/v1/sandboxes",
            json!({"image": "opencode", "opencode": true}),
        ),
        (
            "/v1/tasks",
            json!({"prompt": "x", "workspace": {"path": "/nonexistent"}}),
        ),
    ] {
        let r = d.call("POST", path, Some(body.clone()));
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.text().contains("--llm-base-url"), "{}", r.text());
    }

    // A stop racing an exec: the answer is ours, never a 500 or runtime internals.
    let r = d.call("POST", &format!("/v1/sandboxes/{id}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"command": ["true"]})),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None)
            .status,
        204
    );
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"command": ["true"]})),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(d.leftovers().is_empty(), "{:#?}", d.leftovers());
}

/// A process in a sandbox makes a directory 20,000 levels deep: downloading it through the
/// files API fails cleanly (agentd lives on), and deleting the sandbox removes all of it.
#[test]
fn test_deep_tree_neither_crashes_agentd_nor_outlives_its_sandbox() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = plain_daemon(&images);
    let id = d.plain_sandbox();
    // Built from the host side into the sandbox's rootfs, fd by fd (a shell in the sandbox
    // would fork a mkdir per level). Owned by host root: inside it is nobody's.
    let home = d
        .state
        .path()
        .join("sandboxes")
        .join(&id)
        .join("rootfs/home/agent");
    let started = Instant::now();
    let mut cur = std::fs::File::open(home).unwrap();
    nix::sys::stat::mkdirat(
        Some(std::os::fd::AsRawFd::as_raw_fd(&cur)),
        "deep",
        nix::sys::stat::Mode::S_IRWXU,
    )
    .unwrap();
    cur = open_dir_at(&cur, "deep");
    for _ in 0..20_000 {
        nix::sys::stat::mkdirat(
            Some(std::os::fd::AsRawFd::as_raw_fd(&cur)),
            "d",
            nix::sys::stat::Mode::S_IRWXU,
        )
        .unwrap();
        cur = open_dir_at(&cur, "d");
    }
    drop(cur);
    eprintln!("made 20,000 levels in {:?}", started.elapsed());
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "GET /v1/sandboxes/{id}/files?path=/home/agent/deep HTTP/1.1\r\nHost: agentd\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    // The archive ends early (a chunked body without its last chunk): the client sees an
    // error, not a complete tar.
    assert!(
        !raw.ends_with(b"0\r\n\r\n"),
        "a deep tree was sent as complete"
    );
    let r = d.call("GET", "/v1/health", None);
    assert_eq!(r.status, 200, "agentd died:\n{}", d.log());
    let sandbox_dir = d.state.path().join("sandboxes").join(&id);
    assert_eq!(
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None)
            .status,
        204
    );
    if sandbox_dir.exists() {
        // Removed here so that the test's own cleanup (std's recursive removal) does not
        // overflow its stack on the tree, hiding this message.
        let shim_log = std::fs::read_to_string(sandbox_dir.join("shim.log")).unwrap_or_default();
        let _ = agentd_runtime::tree::remove_tree(&sandbox_dir);
        panic!(
            "the deep tree outlived its sandbox\nshim: {shim_log}\n{}",
            d.log()
        );
    }
    assert!(d.leftovers().is_empty(), "{:#?}", d.leftovers());
}

fn open_dir_at(dir: &std::fs::File, name: &str) -> std::fs::File {
    let fd = nix::fcntl::openat(
        Some(std::os::fd::AsRawFd::as_raw_fd(dir)),
        name,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    // SAFETY: openat returned a new descriptor that nothing else owns.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// A TCP client with the token cannot read host files (image import) nor make agentd's host
/// connect to internal addresses (a task's git URL); a flood of idle connections neither
/// exhausts agentd's descriptors nor stops it answering.
#[test]
fn test_tcp_clients_reach_no_host_files_no_internal_addresses_and_cannot_flood() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = agentd_tests::daemon::MockLlm::start("true");
    let listen = format!("127.0.0.1:{}", agentd_tests::registry::free_port());
    let d = Daemon::start(
        &images,
        &[
            "--listen",
            &listen,
            "--llm-base-url",
            &llm.base_url,
            "--gateway-port",
            &agentd_tests::registry::free_port().to_string(),
        ],
    );
    let token = d.token();
    // Host paths: forbidden over TCP, and nothing of the file in the answer.
    let r = tcp_request(
        &listen,
        &token,
        "POST",
        "/v1/images/import",
        Some(br#"{"path":"/etc/shadow"}"#),
        "application/json",
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(!r.text().contains("root:"), "{}", r.text());
    // On the root-only socket a host path is allowed, but its contents are never echoed.
    let r = d.call(
        "POST",
        "/v1/images/import",
        Some(json!({"path": "/etc/shadow"})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(!r.text().contains("root:"), "{}", r.text());
    // A body that is not an image: a 400 that does not quote it.
    let r = tcp_request(
        &listen,
        &token,
        "POST",
        "/v1/images/import?name=x",
        Some(b"root:$6$secret-hash:19000:0:99999:7:::\n"),
        "application/x-tar",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(!r.text().contains("secret-hash"), "{}", r.text());
    assert!(!d
        .state
        .path()
        .join("tmp")
        .read_dir()
        .is_ok_and(|mut e| e.next().is_some()));
    // Git URLs at internal addresses: refused before anything is cloned.
    for url in [
        "http://127.0.0.1:1/repo.git",
        "git://localhost/repo.git",
        "http://169.254.169.254/x.git",
    ] {
        let body = json!({"prompt": "x", "workspace": {"git": url}}).to_string();
        let r = tcp_request(
            &listen,
            &token,
            "POST",
            "/v1/tasks",
            Some(body.as_bytes()),
            "application/json",
        );
        assert_eq!(r.status, 403, "{url}: {}", r.text());
        assert!(r.text().contains("internal address"), "{}", r.text());
    }
    let body =
        json!({"prompt": "x", "workspace": {"git": "ssh://git@example.com/r.git"}}).to_string();
    let r = tcp_request(
        &listen,
        &token,
        "POST",
        "/v1/tasks",
        Some(body.as_bytes()),
        "application/json",
    );
    assert_eq!(r.status, 400, "{}", r.text());

    // 1,100 idle unauthenticated connections: agentd stays within its cap and answers.
    let pid = d.pid().unwrap();
    let before = open_fds(pid);
    let mut idle = Vec::new();
    for _ in 0..1100 {
        if let Ok(s) = std::net::TcpStream::connect(&listen) {
            idle.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let r = d.call("GET", "/v1/health", None);
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "health took {:?}",
        t.elapsed()
    );
    let during = open_fds(pid);
    assert!(
        during < before + 600,
        "agentd holds {during} descriptors (was {before}) under 1,100 idle connections"
    );
    drop(idle);
    let log = d.log();
    assert!(log.contains("connection limit reached"), "{log}");
    assert!(log.len() < 5 << 20, "the log grew to {} bytes", log.len());
    assert!(d.leftovers().is_empty(), "{:#?}", d.leftovers());
}

/// SIGTERM with an exec streaming (`sleep infinity`): agentd is gone within seconds, the
/// stream's last line says why, the database is free for the next agentd, and the sandbox runs
/// on. The CLI: a closed pipe ends it quietly; a user who may not use the socket is told so.
#[test]
fn test_sigterm_is_quick_and_the_cli_says_what_is_wrong() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let mut d = plain_daemon(&images);
    let id = d.plain_sandbox();
    let mut s = exec_stream(&d, &id, r#"{"command":["sleep","infinity"]}"#);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    d.kill(libc::SIGTERM);
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM took {took:?}\n{}",
        d.log()
    );
    let (_, rest) = read_until(&mut s, "agentd is stopping");
    assert!(rest.contains("sandboxes keep running"), "{rest}");
    drop(s);
    d.start_again();
    let v = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert_eq!(v["state"], "ready", "{v}");
    let (code, _, _) = d.exec(&id, &["true"]);
    assert_eq!(code, 0);

    // `agentd sandbox ls | head -c 1`: the closed pipe ends the CLI without a panic.
    let mut child = std::process::Command::new(agentd_tests::bin("agentd"))
        .args(["sandbox", "ls"])
        .env("AGENTD_SOCKET", &d.socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    // Not root: the socket (0600 in a 0700 dir) is refused, and the CLI says to use sudo. (A
    // copy of the binary in a dir anyone may enter: the checkout may be private.)
    let open_dir = tempfile::Builder::new()
        .prefix("agentd-cli-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(
        open_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let cli = open_dir.path().join("agentd");
    std::fs::copy(agentd_tests::bin("agentd"), &cli).unwrap();
    let out = std::process::Command::new(&cli)
        .args(["sandbox", "ls"])
        .env("AGENTD_SOCKET", &d.socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(125),
        "{}",
        agentd_tests::describe(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("root-only") && err.contains("sudo"), "{err}");
    assert_eq!(
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None)
            .status,
        204
    );
    assert!(d.leftovers().is_empty(), "{:#?}", d.leftovers());
}

/// schemathesis (property-based requests from our OpenAPI document) against a live daemon over
/// TCP finds no server error, no status code or response schema outside the document, and a
/// 405 for every method a path does not take. `positive_data_acceptance` is left out: the
/// document does not yet say everything the API checks (an image must exist, say).
#[test]
fn test_schemathesis_finds_nothing() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let found = std::process::Command::new("python3")
        .args(["-c", "import schemathesis"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!(
            "SKIPPED: needs schemathesis (python3 -m pip install schemathesis; .ci/run does)"
        );
        agentd_tests::required_or_skip();
        return;
    }
    let listen = format!("127.0.0.1:{}", agentd_tests::registry::free_port());
    let d = Daemon::start(
        &images,
        &[
            "--listen",
            &listen,
            "--max-sandboxes",
            "4",
            "--gateway-port",
            &agentd_tests::registry::free_port().to_string(),
        ],
    );
    let reports = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'st'; sys.exit(schemathesis())",
            "run",
            &format!("http://{listen}/v1/openapi.json"),
            "-H",
            &format!("Authorization: Bearer {}", d.token()),
            "--max-examples",
            "30",
            "--workers",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
            "--request-timeout",
            "60",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,unsupported_method",
            "--generation-deterministic",
            // Image names come back from GET /v1/images (now that its answer has a schema,
            // schemathesis reuses them) and all hold a `/`, which it filters out of path
            // parameters: for /v1/images/{name} too many of its examples are filtered.
            "--suppress-health-check=filter_too_much",
            "--report-dir",
            reports.path().to_str().unwrap(),
        ])
        .env("NO_COLOR", "1")
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(reports.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{text}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    assert!(text.contains("passed"), "{text}");
    d.delete_all_and_check_clean();
}

/// Unmounts (and removes) a mount point the test made, after everything else is dropped.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn listed_ids(d: &Daemon) -> Vec<String> {
    d.call("GET", "/v1/sandboxes", None).json()["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

/// agentd's state on a full disk (a small ext4 on a loop device): a create fails with 507 and is not listed,
/// a delete is listed or gone as it answered, and after a restart with space again the state
/// is what the API said; agentd then works again (its database was reopened).
#[test]
fn test_full_disk_fails_requests_and_loses_nothing() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let state = tempfile::Builder::new()
        .prefix("agentd-serve-full-")
        .tempdir_in("/var/tmp")
        .unwrap();
    // Declared before the daemon: dropped after it.
    let _unmount = Unmount(state.path().to_path_buf());
    // A small ext4 filesystem of its own (a loop device, freed when it is unmounted).
    let image = tempfile::Builder::new()
        .prefix("agentd-full-disk-")
        .suffix(".img")
        .tempfile_in("/var/tmp")
        .unwrap();
    image.as_file().set_len(64 << 20).unwrap();
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", agentd_tests::describe(&out));
    };
    run(std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0"])
        .arg(image.path()));
    run(std::process::Command::new("mount")
        .args(["-o", "loop"])
        .arg(image.path())
        .arg(state.path()));
    std::fs::set_permissions(
        state.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let mut d = Daemon::start_in(
        state,
        &images,
        &[
            "--gateway-port",
            &agentd_tests::registry::free_port().to_string(),
        ],
    );
    let a = d.plain_sandbox();
    // Fill the disk.
    let filler = d.state.path().join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        // Big writes, then ever smaller ones for the last partial block.
        for size in [1 << 20, 4096, 64, 1] {
            let chunk = vec![7u8; size];
            while f.write_all(&chunk).is_ok() {}
        }
        let _ = f.sync_all();
        // And no inode left either.
        for i in 0.. {
            if std::fs::File::create(d.state.path().join(format!("inode-{i}"))).is_err() {
                break;
            }
        }
    }
    let r = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"image": "opencode", "opencode": false})),
    );
    assert_eq!(r.status, 507, "{}\n{}", r.text(), d.log());
    assert!(r.text().contains("disk is full"), "{}", r.text());
    assert_eq!(listed_ids(&d), vec![a.clone()]);
    let r = d.call("DELETE", &format!("/v1/sandboxes/{a}"), None);
    let a_listed = listed_ids(&d).contains(&a);
    assert_eq!(r.status == 204, !a_listed, "{}: {}", r.status, r.text());
    // Space again, a crash, a restart: the state is what the API said.
    std::fs::remove_file(&filler).unwrap();
    d.kill(libc::SIGKILL);
    d.start_again();
    assert_eq!(listed_ids(&d).contains(&a), a_listed, "{}", d.log());
    let b = d.plain_sandbox();
    let (code, _, _) = d.exec(&b, &["true"]);
    assert_eq!(code, 0);
    for id in listed_ids(&d) {
        assert_eq!(
            d.call("DELETE", &format!("/v1/sandboxes/{id}"), None)
                .status,
            204
        );
    }
    let state_path = d.state.path().to_str().unwrap().to_string();
    let left: Vec<String> = d
        .leftovers()
        .into_iter()
        .filter(|l| !(l.starts_with("mount ") && l.contains(&format!(" {state_path} "))))
        .collect();
    assert!(left.is_empty(), "{left:#?}");
}

/// A process in a sandbox fills its disk: bytes and inodes beyond `limits.disk` fail with
/// ENOSPC inside, `df` shows the limit, the host holds no more than the limit, and deleting the
/// sandbox leaves no mount, loop device or file.
#[test]
fn test_disk_limit_bounds_bytes_and_inodes() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = plain_daemon(&images);
    // The default: 10g, shown by inspect and by df inside.
    let id = d.plain_sandbox();
    let v = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert_eq!(v["limits"]["disk_bytes"], 10u64 << 30, "{v}");
    let (code, out, err) = d.exec(&id, &["sh", "-c", "df -k / | tail -1"]);
    assert_eq!(code, 0, "{err}");
    let kib: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        ((9u64 << 20)..=(10 << 20)).contains(&kib),
        "df of a default sandbox: {out}"
    );
    assert_eq!(
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None)
            .status,
        204
    );
    for disk in [json!("1m"), json!("1000000t"), json!("lots")] {
        let r = d.call(
            "POST",
            "/v1/sandboxes",
            Some(json!({"image": "opencode", "opencode": false, "limits": {"disk": disk}})),
        );
        assert_eq!(r.status, 400, "{disk}: {}", r.text());
        assert!(r.text().contains("disk"), "{}", r.text());
    }

    let r = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"image": "opencode", "opencode": false, "limits": {"disk": "24m"}})),
    );
    assert_eq!(r.status, 201, "{}\n{}", r.text(), d.log());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let image = d
        .state
        .path()
        .join("sandboxes")
        .join(&id)
        .join(agentd_runtime::layout::DISK_IMAGE);
    // Bytes: 64 MiB into a 24 MiB layer.
    let (code, _, err) = d.exec(
        &id,
        &["sh", "-c", "head -c 67108864 /dev/zero > /home/agent/big"],
    );
    assert_ne!(code, 0, "64 MiB fit into a 24m disk");
    assert!(err.contains("No space left"), "{err}");
    let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&image).unwrap()) * 512;
    assert!(
        used <= 24 << 20,
        "the host holds {used} bytes for a 24m disk"
    );
    // Inodes: empty files until none is left (one inode per 4 KiB at this size).
    let (code, out, err) = d.exec(
        &id,
        &[
            "sh",
            "-c",
            "rm /home/agent/big; mkdir /home/agent/many && cd /home/agent/many && i=0; \
             while true > f$i; do i=$((i+1)); done; echo $i",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let files: u64 = out.trim().parse().unwrap();
    assert!((1000..7000).contains(&files), "{files} files in a 24m disk");
    assert!(err.contains("No space left"), "{err}");
    // The sandbox still works, and agentd is untouched.
    let (code, _, _) = d.exec(&id, &["rm", "-rf", "/home/agent/many"]);
    assert_eq!(code, 0);
    assert_eq!(d.call("GET", "/v1/health", None).status, 200);
    assert_eq!(
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None)
            .status,
        204
    );
    assert!(!image.exists());

    // What the main process prints is on the disk too: 40 MB of stdout into a 24m disk.
    let r = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({
            "image": "opencode", "opencode": false, "limits": {"disk": "24m"},
            "command": ["sh", "-c", "head -c 40000000 /dev/zero | tr '\\0' x; sleep 300"],
        })),
    );
    assert_eq!(r.status, 201, "{}\n{}", r.text(), d.log());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let logs = d.state.path().join("sandboxes").join(&id).join("overlay");
    // The log grows until the disk is full (the writer then gets ENOSPC), then stays.
    let size = || std::fs::metadata(logs.join("stdout.log")).map_or(0, |m| m.len());
    let start = Instant::now();
    let mut last = 0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = size();
        if now > 16 << 20 && now == last {
            break;
        }
        last = now;
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the log never stopped growing ({now} bytes)\n{}",
            d.log()
        );
    }
    assert!(last < 24 << 20, "a 24m sandbox's log holds {last} bytes");
    let r = d.call("POST", &format!("/v1/sandboxes/{id}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let kept = d.call(
        "GET",
        &format!("/v1/sandboxes/{id}/logs?stream=stdout"),
        None,
    );
    assert_eq!(kept.status, 200);
    assert!(
        kept.body.len() > 1 << 20,
        "{} bytes of logs kept",
        kept.body.len()
    );
    assert_eq!(
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None)
            .status,
        204
    );
    assert!(d.leftovers().is_empty(), "{:#?}", d.leftovers());
}

/// A process in a sandbox sends six ~15 MB chat requests at once to the LLM gateway: each is
/// answered (200, or 429 past the 4 in flight a sandbox may have), and agentd's peak memory grows
/// by less than a few bodies' worth (before the fix six 32 MiB bodies grew it by 1.27 GB).
#[test]
fn test_gateway_bodies_do_not_balloon_agentd() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = agentd_tests::daemon::MockLlm::start("true");
    let d = Daemon::start(
        &images,
        &[
            "--llm-base-url",
            &llm.base_url,
            "--gateway-port",
            &agentd_tests::registry::free_port().to_string(),
        ],
    );
    let r = d.call("POST", "/v1/sandboxes", Some(json!({"image": "opencode"})));
    assert_eq!(r.status, 201, "{}\n{}", r.text(), d.log());
    let id = r.json()["id"].as_str().unwrap().to_string();
    d.wait_state(&id, "ready", Duration::from_secs(120));
    let hwm = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let pid = d.pid().unwrap();
    let before = hwm(pid);
    // The gateway's address and this sandbox's token, from OpenCode's config (bash's /dev/tcp
    // speaks HTTP here: the image has no HTTP client).
    let script = r#"
pid=$(for p in /proc/[0-9]*; do case "$(tr '\0' ' ' < $p/cmdline 2>/dev/null)" in opencode*) echo ${p#/proc/}; break;; esac; done)
cfg=$(tr '\0' '\n' < /proc/$pid/environ | sed -n 's/^OPENCODE_CONFIG_CONTENT=//p')
key=$(printf %s "$cfg" | sed 's/.*"apiKey":"\([^"]*\)".*/\1/')
addr=$(printf %s "$cfg" | sed 's|.*"baseURL":"http://\([^"/]*\)/[^"]*".*|\1|')
send() {
  pre='{"model":"mock","messages":[{"role":"user","content":"'; post='"}]}'
  exec 3<>/dev/tcp/${addr%:*}/${addr#*:}
  { printf 'POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' "$key" $(( ${#pre} + $1 + ${#post} )) "$pre"
    head -c $1 /dev/zero | tr '\0' x; printf %s "$post"; } >&3
  head -1 <&3 | tr -d '\r'
  exec 3<&-
}
for i in 1 2 3 4 5 6; do send 15000000 > /tmp/status-$i & done
wait
cat /tmp/status-*
"#;
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"command": ["bash", "-c", script], "uid": 1000, "timeout_secs": 120})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (out, err, end) = exec_lines(&r.body);
    assert_eq!(end["exit_code"], 0, "{out}\n{err}");
    let statuses: Vec<&str> = out.lines().collect();
    assert_eq!(statuses.len(), 6, "{out}\n{err}");
    for s in &statuses {
        assert!(
            s.contains(" 200 ") || s.contains(" 429 "),
            "{out}\n{err}\n{}",
            d.log()
        );
    }
    assert!(statuses.iter().any(|s| s.contains(" 200 ")), "{out}");
    let grown = hwm(pid).saturating_sub(before);
    eprintln!(
        "agentd's peak RSS grew by {} MiB: {statuses:?}",
        grown >> 10
    );
    assert!(
        grown < 200 << 10,
        "agentd's peak RSS grew by {} MiB for six 15 MB bodies",
        grown >> 10
    );
}
