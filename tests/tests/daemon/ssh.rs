//! The SSH gateway (`agentd serve --ssh-listen`) with Debian's OpenSSH clients, unchanged:
//! `ssh` (a command with its exit status, stdin and stderr apart; a login shell on a
//! terminal), `sftp` and `scp` (files in and out, owned by the sandbox's user, links the
//! sandbox planted never lead out of it), `ssh -L` to a server on the sandbox's own loopback
//! (and nowhere else); a key that is not authorized, an unknown sandbox and a stopped one are
//! refused with what to do.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use agentd_tests::daemon::Daemon;
use agentd_tests::require_sandbox_support;
use serde_json::json;

use super::{plain, small_daemon, store};

/// A client's files: its keys and known_hosts.
struct Client {
    dir: tempfile::TempDir,
    port: u16,
}

impl Client {
    fn key(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// OpenSSH's options for this daemon, with key `key`; nothing from the user's config.
    fn opts(&self, key: &str) -> Vec<String> {
        [
            "-F",
            "/dev/null",
            "-i",
            &self.key(key).to_string_lossy(),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            &format!(
                "UserKnownHostsFile={}",
                self.dir.path().join("known_hosts").display()
            ),
            "-o",
            "ConnectTimeout=10",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// `ssh -N` to `sandbox` with key `good` holding the `-L` forwards `forwards` open until
    /// it is killed; its stderr goes to `stderr`.
    fn forward(&self, sandbox: &str, forwards: &[String], stderr: Stdio) -> Child {
        let mut cmd = Command::new("ssh");
        cmd.args(self.opts("good")).args([
            "-p",
            &self.port.to_string(),
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
        ]);
        for f in forwards {
            cmd.args(["-L", f]);
        }
        cmd.arg(format!("{sandbox}@127.0.0.1"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap()
    }

    fn ssh(&self, key: &str, user: &str, args: &[&str], stdin: &[u8]) -> Output {
        let mut cmd = Command::new("ssh");
        cmd.args(self.opts(key))
            .args(["-p", &self.port.to_string()])
            .arg(format!("{user}@127.0.0.1"))
            .args(args);
        run_with_stdin(cmd, stdin)
    }
}

fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("OpenSSH's client (Debian openssh-client) is needed");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "{cmd:?} did not end in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A daemon serving SSH whose authorized_keys holds the client's key `good` (not `bad`).
fn ssh_daemon(images: &Path) -> (Daemon, Client) {
    let dir = tempfile::tempdir().unwrap();
    keygen(&dir.path().join("good"));
    keygen(&dir.path().join("bad"));
    let keys = dir.path().join("authorized_keys");
    std::fs::copy(dir.path().join("good.pub"), &keys).unwrap();
    let port = agentd_tests::registry::free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = small_daemon(
        images,
        &[
            // For the OpenCode sandbox (never prompted: nothing needs to listen there).
            "--llm-base-url",
            "http://127.0.0.1:9/v1",
            "--ssh-listen",
            &listen,
            "--ssh-authorized-keys",
            &keys.to_string_lossy(),
        ],
    );
    // The host key is the daemon's, from its state dir: the client checks it strictly.
    let host = std::fs::read_to_string(d.state.path().join("ssh/host_ed25519_key.pub"))
        .unwrap_or_else(|e| panic!("no host key: {e}\n{}", d.log()));
    std::fs::write(
        dir.path().join("known_hosts"),
        format!("[127.0.0.1]:{port} {host}"),
    )
    .unwrap();
    (d, Client { dir, port })
}

#[test]
fn test_openssh_clients_through_the_gateway() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let (d, c) = ssh_daemon(&images);
    let id = plain(&d, json!({"name": "sshbox", "limits": {"memory": "512m"}}));
    d.wait_state(&id, "ready", Duration::from_secs(60));
    let (_, uid, _) = d.exec(&id, &["id", "-u"]);
    let uid = uid.trim().to_string();

    // A command: its output, stderr apart, its exit status, as the image's user; by name too.
    let out = c.ssh(
        "good",
        "sshbox",
        &["echo out; id -u; echo err >&2; exit 7"],
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}\n{}",
        text(&out.stderr),
        d.log()
    );
    assert_eq!(text(&out.stdout), format!("out\n{uid}\n"));
    assert!(text(&out.stderr).contains("err"), "{}", text(&out.stderr));
    // stdin streams in, its end is the command's end of input.
    let out = c.ssh("good", &id, &["wc -c"], &[b'x'; 300_000]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "300000");

    // A login shell on a terminal of the sandbox's own.
    let out = c.ssh("good", &id, &["-tt"], b"tty; echo sum=$((6*7)); exit 3\n");
    let o = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{o}\n{}", text(&out.stderr));
    assert!(o.contains("/dev/pts/"), "{o}");
    assert!(o.contains("sum=42"), "{o}");

    // A key that is not in authorized_keys; an unknown sandbox; both say why.
    let out = c.ssh("bad", &id, &["true"], b"");
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("Permission denied (publickey)"),
        "{}",
        text(&out.stderr)
    );
    let out = c.ssh("good", "nosuch", &["true"], b"");
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("no sandbox \"nosuch\""),
        "{}",
        text(&out.stderr)
    );

    // sftp: in and out, listed, made, renamed, linked; the sandbox's user owns what came in.
    let local = c.dir.path().join("local.txt");
    std::fs::write(&local, "from the host\n").unwrap();
    let back = c.dir.path().join("back.txt");
    // A link the sandbox planted towards a host path that exists: it resolves inside.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "host secret").unwrap();
    let (code, _, err) = d.exec(
        &id,
        &[
            "ln",
            "-s",
            &outside.path().to_string_lossy(),
            "/home/agent/escape",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let batch = c.dir.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "pwd\nput {} up.txt\nls -l\nmkdir d\nrename up.txt d/moved.txt\nget d/moved.txt {}\n\
             symlink d/moved.txt link.txt\n-get escape/secret {}/leaked\n",
            local.display(),
            back.display(),
            c.dir.path().display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("sftp");
    cmd.args(c.opts("good"))
        .args(["-P", &c.port.to_string(), "-b"])
        .arg(&batch)
        .arg(format!("{id}@127.0.0.1"));
    let out = run_with_stdin(cmd, b"");
    let o = text(&out.stdout);
    assert!(
        out.status.success(),
        "{o}\n{}\n{}",
        text(&out.stderr),
        d.log()
    );
    assert!(
        o.contains("/home/agent"),
        "the home dir is where relative paths go: {o}"
    );
    assert!(o.contains("up.txt"), "{o}");
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "from the host\n");
    assert!(
        !c.dir.path().join("leaked").exists(),
        "a planted link led out of the sandbox"
    );
    let (code, o, err) = d.exec(
        &id,
        &[
            "sh",
            "-c",
            "stat -c '%u %s' /home/agent/d/moved.txt /home/agent/d; readlink /home/agent/link.txt",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = o.lines().collect();
    assert_eq!(lines.len(), 3, "{o}");
    assert_eq!(lines[0], format!("{uid} 14"), "{o}");
    assert!(lines[1].starts_with(&format!("{uid} ")), "{o}");
    assert_eq!(lines[2], "d/moved.txt", "{o}");

    // scp (SFTP underneath): there and back.
    let mut cmd = Command::new("scp");
    cmd.args(c.opts("good"))
        .args(["-P", &c.port.to_string()])
        .arg(&local)
        .arg(format!("{id}@127.0.0.1:/home/agent/scp.txt"));
    let out = run_with_stdin(cmd, b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (_, o, _) = d.exec(&id, &["cat", "/home/agent/scp.txt"]);
    assert_eq!(o, "from the host\n");

    // ssh -L to a server that listens on the sandbox's loopback only; and a forward to any
    // other host is refused.
    super::terminal::start_web_app_on(&d, &id, 8099, "127.0.0.1");
    let local_port = agentd_tests::registry::free_port();
    let other_port = agentd_tests::registry::free_port();
    let mut fwd = c.forward(
        &id,
        &[
            format!("{local_port}:localhost:8099"),
            format!("{other_port}:192.0.2.2:22"),
        ],
        Stdio::piped(),
    );
    let get = |port: u16| -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /through-ssh HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        Some(body)
    };
    // The first answer through a forward that `accept`s, within `limit`.
    let answer = |port: u16, limit: Duration, accept: fn(&str) -> bool| -> String {
        let deadline = Instant::now() + limit;
        loop {
            match get(port) {
                Some(b) if accept(&b) => break b,
                _ if Instant::now() > deadline => panic!("ssh -L to port {port} never answered"),
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    };
    let body = answer(local_port, Duration::from_secs(20), |b| !b.is_empty());
    assert!(
        body.contains("hello from port 8099 path=/through-ssh"),
        "{body}"
    );
    assert_eq!(
        get(other_port).unwrap_or_default(),
        "",
        "a forward left the sandbox"
    );
    // The ssh this test started (Child::kill signals its pid).
    let _ = fwd.kill();
    let _ = fwd.wait();
    assert!(
        d.log()
            .contains("SSH: refused a forward beyond the sandbox's own ports"),
        "{}",
        d.log()
    );

    // A hibernated OpenCode sandbox: a command over SSH resumes it and leaves OpenCode
    // asleep; a forward to OpenCode's port wakes it.
    let r = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"image": "opencode", "limits": {"memory": "1g"}})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let oc = r.json()["id"].as_str().unwrap().to_string();
    d.wait_state(&oc, "ready", Duration::from_secs(120));
    let r = d.call("POST", &format!("/v1/sandboxes/{oc}/hibernate"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let out = c.ssh("good", &oc, &["echo awake"], b"");
    assert_eq!(
        (out.status.code(), text(&out.stdout).as_str()),
        (Some(0), "awake\n"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        super::pause::opencode_pids(&d, &oc).is_empty(),
        "an SSH command woke OpenCode"
    );
    let oc_port = agentd_tests::registry::free_port();
    let mut fwd = c.forward(&oc, &[format!("{oc_port}:localhost:4096")], Stdio::null());
    // OpenCode answers (401 without its password): it was woken for the forward.
    let woke = answer(oc_port, Duration::from_secs(60), |b| {
        b.starts_with("HTTP/1.1")
    });
    let _ = fwd.kill();
    let _ = fwd.wait();
    assert_eq!(
        super::pause::opencode_pids(&d, &oc).len(),
        1,
        "not woken by a forward to its port: {woke}"
    );

    // A stopped sandbox says so.
    let r = d.call("POST", &format!("/v1/sandboxes/{id}/stop"), None);
    assert!(r.status < 300, "{}", r.text());
    d.wait_state(&id, "stopped", Duration::from_secs(30));
    let out = c.ssh("good", &id, &["true"], b"");
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("is stopped"),
        "{}",
        text(&out.stderr)
    );
    d.delete_all_and_check_clean();
}
