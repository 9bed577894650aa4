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
    let llm = agentd_tests::daemon::MockLlm::start("true");
    let (d, _, _) = super::opencode_daemon(&images, &llm);
    let v = super::ready_opencode(&d, json!({"image": "opencode"}));
    let id = v["id"].as_str().unwrap().to_string();
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
