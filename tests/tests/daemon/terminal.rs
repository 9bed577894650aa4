//! Interactive exec over the WebSocket (`GET /v1/sandboxes/{id}/exec/ws`): a terminal in the
//! sandbox's own devpts (its name, job control, ^C, resize, the exit status), stdin streamed
//! without one (stdout and stderr apart, the end of input), a client that goes away kills the
//! process, and the CLI's `sandbox exec -i` and `sandbox shell`. The client is tungstenite,
//! a WebSocket library other programs use, over the daemon's Unix socket.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentd_tests::daemon::Daemon;
use agentd_tests::require_sandbox_support;
use serde_json::json;
use tungstenite::{Message, WebSocket};

use super::{plain, small_daemon, store};

fn connect(d: &Daemon, id: &str) -> WebSocket<UnixStream> {
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (ws, resp) =
        tungstenite::client(format!("ws://agentd/v1/sandboxes/{id}/exec/ws"), s).unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

/// Output until `want` shows up in it (or the end); all of it.
fn read_until(ws: &mut WebSocket<UnixStream>, want: &str) -> String {
    let mut out = String::new();
    while !out.contains(want) {
        match ws.read() {
            Ok(Message::Binary(b)) => out.push_str(&String::from_utf8_lossy(&b)),
            Ok(Message::Text(t)) => out.push_str(&format!("\n[text {t}]\n")),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    assert!(out.contains(want), "no {want:?} in {out:?}");
    out
}

/// Everything until the end: (stdout, stderr, the last text message).
fn until_end(ws: &mut WebSocket<UnixStream>, tty: bool) -> (Vec<u8>, Vec<u8>, serde_json::Value) {
    let (mut out, mut err, mut last) = (Vec::new(), Vec::new(), serde_json::Value::Null);
    loop {
        match ws.read() {
            Ok(Message::Binary(b)) if tty => out.extend_from_slice(&b),
            Ok(Message::Binary(b)) => match b.split_first() {
                Some((1, d)) => out.extend_from_slice(d),
                Some((2, d)) => err.extend_from_slice(d),
                other => panic!("a frame without its stream byte: {other:?}"),
            },
            Ok(Message::Text(t)) => last = serde_json::from_str(&t).unwrap(),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    (out, err, last)
}

/// A daemon on TCP with the mock LLM and a ready OpenCode sandbox (`extra` goes into its
/// create request): the mock, the daemon, its TCP address and the sandbox's id.
fn opencode_sandbox(
    images: &std::path::Path,
    extra: serde_json::Value,
) -> (agentd_tests::daemon::MockLlm, Daemon, String, String) {
    let llm = agentd_tests::daemon::MockLlm::start("true");
    let (d, _, listen) = super::opencode_daemon(images, &llm);
    let mut body = json!({"image": "opencode"});
    if let (Some(b), Some(x)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(x.clone());
    }
    let v = super::ready_opencode(&d, body);
    let id = v["id"].as_str().unwrap().to_string();
    (llm, d, listen, id)
}

/// Starts the probe's web app on `port` in sandbox `id` (in the background).
fn start_web_app(d: &Daemon, id: &str, port: u16) {
    start_web_app_on(d, id, port, "0.0.0.0");
}

/// Starts the probe's web app on `port` of `addr` in sandbox `id` (in the background).
pub(crate) fn start_web_app_on(d: &Daemon, id: &str, port: u16, addr: &str) {
    let probe = std::fs::read(agentd_tests::probe()).unwrap();
    let r = agentd_tests::daemon::request(
        &d.socket,
        "PUT",
        &format!("/v1/sandboxes/{id}/files?path=/home/agent/probe"),
        Some(&probe),
        "application/octet-stream",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let script = format!(
        "chmod +x /home/agent/probe && (/home/agent/probe http {port} {addr} </dev/null >/dev/null 2>&1 &) && sleep 0.5"
    );
    let (code, _, err) = d.exec(id, &["sh", "-c", &script]);
    assert_eq!(code, 0, "{err}");
}

fn send(ws: &mut WebSocket<UnixStream>, m: Message) {
    ws.send(m).unwrap();
}

#[test]
fn test_interactive_exec_over_a_websocket() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = small_daemon(&images, &[]);
    let id = plain(&d, json!({"limits": {"memory": "512m"}}));

    // A terminal: the sandbox's own, its size, job control.
    let mut ws = connect(&d, &id);
    send(
        &mut ws,
        Message::text(
            json!({"command": ["bash", "--norc", "--noprofile", "-i"], "cols": 80, "rows": 24})
                .to_string(),
        ),
    );
    send(
        &mut ws,
        Message::binary(&b"stty size; tty; echo T=$TERM\n"[..]),
    );
    let out = read_until(&mut ws, "T=xterm-256color");
    assert!(out.contains("24 80"), "{out:?}");
    assert!(
        out.contains("/dev/pts/0"),
        "the sandbox's own devpts: {out:?}"
    );
    send(
        &mut ws,
        Message::text(json!({"resize": {"cols": 100, "rows": 40}}).to_string()),
    );
    send(&mut ws, Message::binary(&b"stty size\n"[..]));
    read_until(&mut ws, "40 100");
    // ^C reaches the foreground job through the terminal.
    send(&mut ws, Message::binary(&b"sleep 100\n"[..]));
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    send(&mut ws, Message::binary(&b"\x03"[..]));
    send(&mut ws, Message::binary(&b"echo after-$?\n"[..]));
    read_until(&mut ws, "after-130");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    send(&mut ws, Message::binary(&b"exit 3\n"[..]));
    let (_, _, last) = until_end(&mut ws, true);
    assert_eq!(last["exit_code"], 3, "{last}");

    // Without a terminal: stdin streamed to its end, stdout and stderr apart.
    let mut ws = connect(&d, &id);
    send(
        &mut ws,
        Message::text(
            json!({"command": ["sh", "-c", "cat; echo err >&2; exit 5"], "tty": false}).to_string(),
        ),
    );
    send(&mut ws, Message::binary(&b"hello "[..]));
    send(&mut ws, Message::binary(&b"world\n"[..]));
    send(&mut ws, Message::text(json!({"eof": true}).to_string()));
    let (out, err, last) = until_end(&mut ws, false);
    assert_eq!(out, b"hello world\n");
    assert_eq!(err, b"err\n");
    assert_eq!(last["exit_code"], 5, "{last}");

    // A bad request is said, then the socket closes.
    let mut ws = connect(&d, &id);
    send(
        &mut ws,
        Message::text(r#"{"command": ["sh"], "colour": 1}"#),
    );
    let (_, _, last) = until_end(&mut ws, true);
    assert!(
        last["error"].as_str().unwrap().contains("unknown field"),
        "{last}"
    );

    // A client that goes away: the process (and its group) is killed.
    let mut ws = connect(&d, &id);
    send(
        &mut ws,
        Message::text(
            json!({"command": ["sh", "-c", "echo $$ > /tmp/term.pid; echo started; exec sleep 1000"]})
                .to_string(),
        ),
    );
    read_until(&mut ws, "started");
    drop(ws);
    let t = Instant::now();
    loop {
        let (_, out, _) = d.exec(
            &id,
            &[
                "sh",
                "-c",
                "kill -0 $(cat /tmp/term.pid) 2>/dev/null && echo alive || echo gone",
            ],
        );
        if out.trim() == "gone" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "still {out}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A plain GET is told what the endpoint is.
    let r = d.call("GET", &format!("/v1/sandboxes/{id}/exec/ws"), None);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("WebSocket"), "{}", r.text());

    // The CLI: exec -i feeds its stdin; shell passes the exit status through.
    let cli = |args: &[&str], input: &[u8]| {
        let mut child = Command::new(agentd_tests::bin("agentd"))
            .arg("sandbox")
            .args(args)
            .env("AGENTD_SOCKET", &d.socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = cli(
        &["exec", "-i", &id, "--", "sh", "-c", "cat; echo e >&2"],
        b"from the cli\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"from the cli\n");
    assert_eq!(out.stderr, b"e\n");
    let out = cli(&["shell", &id, "--", "sh", "-c", "exit 7"], b"");
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let out = cli(&["shell", "no-such-sandbox"], b"");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-sandbox"),
        "{out:?}"
    );
    d.delete_all_and_check_clean();
}

/// OpenCode's own terminal (its PTY API, a WebSocket) through agentd's OpenCode proxy: the
/// upgrade reaches OpenCode with its credentials, and keystrokes and output flow both ways.
#[test]
fn test_websockets_through_the_opencode_proxy() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let (_llm, d, _, id) = opencode_sandbox(&images, json!({}));
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/opencode/pty"),
        Some(json!({"command": "/bin/sh", "title": "t"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let pty = r.json()["id"].as_str().unwrap().to_string();
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (mut ws, resp) = tungstenite::client(
        format!("ws://agentd/v1/sandboxes/{id}/opencode/pty/{pty}/connect"),
        s,
    )
    .unwrap_or_else(|e| panic!("{e:?}\n{}", d.log()));
    assert_eq!(resp.status().as_u16(), 101);
    send(&mut ws, Message::text("echo via-opencode-$((6*7))\n"));
    read_until(&mut ws, "via-opencode-42");
    drop(ws);
    // A path OpenCode does not know: its own refusal, not a hang.
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let e = tungstenite::client(
        format!("ws://agentd/v1/sandboxes/{id}/opencode/pty/nope/connect"),
        s,
    )
    .unwrap_err();
    assert!(
        matches!(e, tungstenite::HandshakeError::Failure(_)),
        "{e:?}"
    );
    d.delete_all_and_check_clean();
}

/// One HTTP/1.1 request to agentd's TCP listener with this `Host`: (status, headers, body).
fn over_tcp(
    listen: &str,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
) -> (u16, Vec<(String, String)>, String) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    // Chunked bodies are short here: the text is enough to search.
    (status, headers, body.to_string())
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    h.iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A sandbox's origins on agentd's TCP listener: `{port}-{id}.localhost` reaches a web app
/// inside (and the path form on the API), a browser gets in with a one-use ticket exchanged
/// for a host-only session cookie that never reaches the app, another origin cannot use that
/// session to change things, the app cannot set cookies for other origins, `{id}.localhost`
/// is the sandbox's OpenCode, and `opencode attach`'s Basic auth works there with the
/// sandbox's attach password only.
#[test]
fn test_sandbox_origins_tickets_and_attach() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let (_llm, d, listen, id) = opencode_sandbox(&images, json!({"name": "web"}));
    start_web_app(&d, &id, 8080);
    let port = listen.rsplit(':').next().unwrap();
    let app = format!("8080-{id}.localhost:{port}");
    let token = format!("Bearer {}", d.token());

    // The path form, on the API (the socket here).
    let r = d.call(
        "GET",
        &format!("/v1/sandboxes/{id}/ports/8080/x/y?z=1"),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text()
            .contains("hello from port 8080 path=/x/y?z=1 cookie=[]"),
        "{}",
        r.text()
    );

    // The app's origin: nothing without a credential; the token works.
    let (st, h, body) = over_tcp(&listen, &app, "GET", "/", &[]);
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("tickets"), "{body}");
    assert!(!header(&h, "www-authenticate").is_empty());
    let (st, h, body) = over_tcp(
        &listen,
        &app,
        "GET",
        "/p",
        &[("Authorization", token.clone())],
    );
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("path=/p"), "{body}");
    // Its host-only cookie passes; one for the whole base domain does not.
    let cookies = header(&h, "set-cookie");
    assert_eq!(cookies, ["app=1; Path=/"], "{h:?}");
    // By name too.
    let (st, _, body) = over_tcp(
        &listen,
        &format!("8080-web.localhost:{port}"),
        "GET",
        "/",
        &[("Authorization", token.clone())],
    );
    assert_eq!(st, 200, "{body}");

    // A browser: a ticket's URL sets the session and drops the ticket from the URL.
    let t = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/tickets?port=8080"),
        None,
    );
    assert_eq!(t.status, 201, "{}", t.text());
    let t = t.json();
    let url = t["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("http://{app}/?agentd_ticket=")),
        "{url}"
    );
    let path = &url[url.find("/?").unwrap()..];
    let (st, h, _) = over_tcp(&listen, &app, "GET", path, &[]);
    assert_eq!(st, 303, "{h:?}");
    assert_eq!(header(&h, "location"), ["/"]);
    let set = header(&h, "set-cookie")[0].to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax") && !set.contains("Domain"),
        "{set}"
    );
    let session = set.split(';').next().unwrap().to_string();
    // A second use of the ticket: refused.
    let (st, _, _) = over_tcp(&listen, &app, "GET", path, &[]);
    assert_eq!(st, 401);
    // The session works; agentd's cookie never reaches the app, the app's own does.
    let (st, _, body) = over_tcp(
        &listen,
        &app,
        "GET",
        "/s",
        &[("Cookie", format!("{session}; app=1"))],
    );
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("cookie=[app=1]"), "{body}");
    // Another origin's page may not use it to change things; the app's own page may.
    let (st, _, body) = over_tcp(
        &listen,
        &app,
        "POST",
        "/change",
        &[
            ("Cookie", session.clone()),
            ("Origin", format!("http://other.localhost:{port}")),
        ],
    );
    assert_eq!(st, 403, "{body}");
    let (st, _, body) = over_tcp(
        &listen,
        &app,
        "POST",
        "/change",
        &[
            ("Cookie", session.clone()),
            ("Origin", format!("http://{app}")),
        ],
    );
    assert_eq!(st, 200, "{body}");
    // The session is this sandbox's only.
    let other = plain(&d, json!({"limits": {"memory": "256m"}}));
    let (st, _, _) = over_tcp(
        &listen,
        &format!("8080-{other}.localhost:{port}"),
        "GET",
        "/",
        &[("Cookie", session.clone())],
    );
    assert_eq!(st, 401);

    // The OpenCode origin: OpenCode's own answers (its credentials added by agentd).
    let oc = format!("{id}.localhost:{port}");
    let (st, _, body) = over_tcp(
        &listen,
        &oc,
        "GET",
        "/session",
        &[("Authorization", token.clone())],
    );
    assert_eq!(st, 200, "{body}");
    // Its web UI, from the binary, at the origin's root (and its script, by the same origin).
    let (st, h, body) = over_tcp(
        &listen,
        &oc,
        "GET",
        "/",
        &[("Authorization", token.clone())],
    );
    assert_eq!(st, 200, "{h:?}");
    assert!(body.to_ascii_lowercase().contains("<html"), "{body}");
    eprintln!(
        "OpenCode's web UI at the origin's root: {} bytes of HTML",
        body.len()
    );
    // opencode attach's Basic auth: the attach password works there, and only there.
    let a = d
        .call("GET", &format!("/v1/sandboxes/{id}/attach"), None)
        .json();
    let pw = a["password"].as_str().unwrap().to_string();
    assert_eq!(a["origin_url"], format!("http://{oc}"), "{a}");
    assert_eq!(
        a["url"],
        format!("http://{listen}/v1/sandboxes/{id}/opencode"),
        "{a}"
    );
    assert!(
        a["command"]
            .as_str()
            .unwrap()
            .starts_with("OPENCODE_SERVER_PASSWORD="),
        "{a}"
    );
    use base64::Engine;
    let basic = |p: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("opencode:{p}"))
        )
    };
    let (st, _, body) = over_tcp(
        &listen,
        &oc,
        "GET",
        "/session",
        &[("Authorization", basic(&pw))],
    );
    assert_eq!(st, 200, "{body}");
    let (st, _, _) = over_tcp(
        &listen,
        &oc,
        "GET",
        "/session",
        &[("Authorization", basic("wrong"))],
    );
    assert_eq!(st, 401);
    let (st, _, _) = over_tcp(&listen, &app, "GET", "/", &[("Authorization", basic(&pw))]);
    assert_eq!(
        st, 401,
        "the attach password is for the OpenCode origin only"
    );
    // And on the API: this sandbox's OpenCode path only (where attach goes without DNS).
    let api = format!("127.0.0.1:{port}");
    let (st, _, body) = over_tcp(
        &listen,
        &api,
        "GET",
        &format!("/v1/sandboxes/{id}/opencode/session"),
        &[("Authorization", basic(&pw))],
    );
    assert_eq!(st, 200, "{body}");
    for path in [
        "/v1/sandboxes".to_string(),
        format!("/v1/sandboxes/{id}"),
        format!("/v1/sandboxes/{other}/opencode/session"),
    ] {
        let (st, _, _) = over_tcp(
            &listen,
            &api,
            "GET",
            &path,
            &[("Authorization", basic(&pw))],
        );
        assert_eq!(st, 401, "{path}");
    }
    // An unknown sandbox's origin says so; agentd's own API is untouched by the routing.
    let (st, _, body) = over_tcp(
        &listen,
        &format!("nope.localhost:{port}"),
        "GET",
        "/",
        &[("Authorization", token.clone())],
    );
    assert_eq!(st, 404, "{body}");
    let (st, _, _) = over_tcp(
        &listen,
        &format!("localhost:{port}"),
        "GET",
        "/v1/sandboxes",
        &[("Authorization", token.clone())],
    );
    assert_eq!(st, 200);
    d.delete_all_and_check_clean();
}

/// The real `opencode attach` TUI, run by `agentd sandbox attach` in tmux (a server of the
/// test's own), reaches the sandbox's OpenCode through agentd's TCP listener with the attach
/// password: a prompt typed there gets the mock LLM's answer on screen.
#[test]
fn test_opencode_attach_in_tmux() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let (llm, d, _, id) = opencode_sandbox(&images, json!({}));
    // The OpenCode binary of the image, on PATH for the CLI.
    let layers = images.join("layers/sha256");
    let binary = std::fs::read_dir(&layers)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("usr/local/bin/opencode"))
        .find(|p| p.is_file())
        .expect("the opencode image's binary");
    let home = tempfile::tempdir().unwrap();
    let bin = home.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(&binary, bin.join("opencode")).unwrap();
    let printed = Command::new(agentd_tests::bin("agentd"))
        .args(["sandbox", "attach", &id, "--print"])
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&printed.stdout).into_owned();
    assert!(
        line.starts_with("OPENCODE_SERVER_PASSWORD=") && line.contains("/opencode"),
        "{line}"
    );
    // A tmux server of the test's own, its socket in the test's temp dir.
    let tmux_socket = home.path().join("tmux.sock");
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .arg("-S")
            .arg(&tmux_socket)
            .args(args)
            .output()
            .expect("tmux (.ci/run installs it)")
    };
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let command = format!(
        "env HOME={h} XDG_CONFIG_HOME={h}/c XDG_DATA_HOME={h}/d XDG_STATE_HOME={h}/s XDG_CACHE_HOME={h}/k OPENCODE_DISABLE_AUTOUPDATE=1 OPENCODE_DISABLE_MODELS_FETCH=1 AGENTD_SOCKET={sock} PATH={path} {agentd} sandbox attach {id}",
        h = home.path().display(),
        sock = d.socket.display(),
        agentd = agentd_tests::bin("agentd").display(),
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        "a",
        "-x",
        "160",
        "-y",
        "48",
        &command,
    ]);
    assert!(out.status.success(), "{out:?}");
    let screen =
        || String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "a"]).stdout).into_owned();
    let wait_for = |what: &dyn Fn(&str) -> bool, secs: u64| {
        let t = Instant::now();
        loop {
            let s = screen();
            if what(&s) {
                return s;
            }
            if t.elapsed() > Duration::from_secs(secs) {
                let _ = tmux(&["kill-server"]);
                panic!("the TUI never showed it; its screen:\n{s}\n{}", d.log());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    // The TUI is up when its prompt box is drawn.
    wait_for(&|s: &str| s.trim().lines().count() > 5, 60);
    std::thread::sleep(Duration::from_secs(2));
    let _ = tmux(&["send-keys", "-t", "a", "-l", "write the file"]);
    std::thread::sleep(Duration::from_millis(300));
    let _ = tmux(&["send-keys", "-t", "a", "Enter"]);
    let s = wait_for(&|s: &str| s.contains("All done"), 90);
    let _ = tmux(&["kill-server"]);
    assert!(s.contains("All done"), "{s}");
    assert!(llm.requests.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    d.delete_all_and_check_clean();
}

/// Headless Chromium (Debian's, driven by Playwright from PyPI) opens ticket URLs of a
/// sandbox's origins: a web app inside answers through its port's origin (agentd's cookie is
/// HttpOnly and never reaches the app; the app's own cookie works, its domain-wide one is
/// dropped), and the sandbox's OpenCode web UI loads through its origin. Screenshots go to
/// `target/test-artifacts/browser`.
#[test]
fn test_a_browser_on_sandbox_origins() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let ready = Command::new("python3")
        .args(["-c", "import playwright.sync_api"])
        .output()
        .is_ok_and(|o| o.status.success())
        && std::path::Path::new("/usr/bin/chromium").exists();
    if !ready {
        eprintln!(
            "SKIPPED: needs python3 with playwright and /usr/bin/chromium (.ci/run installs them)"
        );
        agentd_tests::required_or_skip();
        return;
    }
    let (_llm, d, listen, id) = opencode_sandbox(&images, json!({}));
    start_web_app(&d, &id, 3000);
    let ticket = |q: &str| {
        let r = d.call("POST", &format!("/v1/sandboxes/{id}/tickets{q}"), None);
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["url"].as_str().unwrap().to_string()
    };
    let shots = agentd_tests::target_dir().join("test-artifacts/browser");
    let out = Command::new("python3")
        .arg(agentd_tests::workspace_root().join("tests/browser/origins.py"))
        .env("OPENCODE_URL", ticket(""))
        .env("APP_URL", ticket("?port=3000"))
        .env("SHOTS", &shots)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        agentd_tests::describe(&out),
        d.log()
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let port = listen.rsplit(':').next().unwrap();
    assert_eq!(
        seen["app_url"],
        format!("http://3000-{id}.localhost:{port}/"),
        "{seen:#}"
    );
    assert_eq!(
        seen["app_first"], "hello from port 3000 path=/ cookie=[]",
        "{seen:#}"
    );
    assert_eq!(
        seen["app_second"], "hello from port 3000 path=/ cookie=[app=1]",
        "{seen:#}"
    );
    assert_eq!(seen["app_document_cookie"], "app=1", "{seen:#}");
    assert_eq!(
        seen["ui_url"],
        format!("http://{id}.localhost:{port}/"),
        "{seen:#}"
    );
    assert_eq!(seen["ui_title"], "OpenCode", "{seen:#}");
    assert!(
        seen["ui_text"]
            .as_str()
            .unwrap()
            .contains("Create a session"),
        "OpenCode's UI drew its (empty) session list from its API: {seen:#}"
    );
    eprintln!("the browser saw: {seen:#}");
    assert!(shots.join("opencode-ui.png").is_file());
    d.delete_all_and_check_clean();
}
