//! `agentd sandbox shell` and `agentd sandbox exec -i/-t`: the client of the interactive exec
//! WebSocket (`GET /v1/sandboxes/{id}/exec/ws`, see `api::terminal`).
//!
//! With a terminal, the local one is put in raw mode while the session lasts (and restored
//! after, whatever happens), its size is sent at the start and on every SIGWINCH, and what
//! the user types goes to the process as is (^C, ^D and ^Z included). The process's exit
//! status becomes agentd's.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, Message};

/// The local terminal in raw mode until dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enable() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved =
            rustix::termios::tcgetattr(stdin.as_fd()).context("cannot read the terminal's mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &raw)
            .context("cannot put the terminal in raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin().as_fd(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

/// The local terminal's size (columns, rows), if stdout is one.
fn size() -> Option<(u16, u16)> {
    let w = rustix::termios::tcgetwinsize(std::io::stdout().as_fd()).ok()?;
    (w.ws_col > 0 && w.ws_row > 0).then_some((w.ws_col, w.ws_row))
}

/// Runs `request` (the session's first message; `tty` and the size are filled in here) in
/// sandbox `id` (percent-encoded) through agentd at `socket`; the process's exit status.
pub async fn run(
    socket: &Path,
    id: &str,
    mut request: serde_json::Value,
    tty: bool,
) -> anyhow::Result<u8> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| anyhow::anyhow!(super::sandbox::connect_error(socket, &e)))?;
    let url = format!("ws://agentd/v1/sandboxes/{id}/exec/ws");
    let (ws, _) = match tokio_tungstenite::client_async(url, stream).await {
        Ok(x) => x,
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let msg = v["error"]["message"].as_str().unwrap_or("request failed");
            bail!("{msg} (HTTP {})", resp.status().as_u16());
        }
        Err(e) => bail!("cannot open the session: {e}"),
    };
    let local_tty = rustix::termios::isatty(std::io::stdin());
    request["tty"] = tty.into();
    if let Some((cols, rows)) = size().filter(|_| tty) {
        request["cols"] = cols.into();
        request["rows"] = rows.into();
    }
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::text(request.to_string())).await?;
    let _raw = if tty && local_tty {
        Some(RawMode::enable()?)
    } else {
        None
    };
    // Stdin on a thread of its own (a blocking read is never cancelled); None at its end.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = in_tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    if in_tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut stdin_open = true;
    let mut code: Option<u8> = None;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if tty {
                        stdout.write_all(&b)?;
                        stdout.flush()?;
                    } else if let Some((first, data)) = b.split_first() {
                        if *first == 2 {
                            stderr.write_all(data)?;
                        } else {
                            stdout.write_all(data)?;
                            stdout.flush()?;
                        }
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                    if let Some(e) = v["error"].as_str() {
                        drop(_raw);
                        bail!("{e}");
                    }
                    if v["timed_out"] == true {
                        code = Some(124);
                    } else if let Some(c) = v["exit_code"].as_i64() {
                        code = Some(u8::try_from(c.clamp(0, 255)).unwrap_or(255));
                    }
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    drop(_raw);
                    bail!("the session broke: {e}");
                }
            },
            chunk = in_rx.recv(), if stdin_open => match chunk.flatten() {
                Some(data) => tx.send(Message::binary(data)).await?,
                None => {
                    stdin_open = false;
                    // Without a terminal, the end of our stdin is the process's; on one, the
                    // user types ^D when they mean it.
                    if !local_tty {
                        tx.send(Message::text(r#"{"eof":true}"#)).await?;
                    }
                }
            },
            _ = winch.recv(), if tty => {
                if let Some((cols, rows)) = size() {
                    let resize = serde_json::json!({"resize": {"cols": cols, "rows": rows}});
                    tx.send(Message::text(resize.to_string())).await?;
                }
            }
        }
    }
    drop(_raw);
    code.ok_or_else(|| anyhow::anyhow!("the session ended without the command's exit status"))
}
