//! The SSH skin: `agentd serve --ssh-listen ADDR` (russh), the way in for OpenSSH, VS Code
//! Remote-SSH and JetBrains Gateway.
//!
//! - The user name is the sandbox (id or name): `ssh -p PORT SANDBOX@HOST`.
//! - Public keys only, from an OpenSSH `authorized_keys` file (`ssh_authorized_keys`), read at
//!   every login, so a key is added or removed without a restart. A key there reaches every
//!   sandbox, as the API token does.
//! - The host key is ed25519, made once in `<state>/ssh/host_ed25519_key` (0600; its `.pub`
//!   next to it for `known_hosts`).
//! - Session channels: a login shell on a terminal (`pty-req` + `shell`), a command
//!   (`exec`, run by `/bin/sh -c` as sshd does), `env` (names only of letters, digits and `_`),
//!   `window-change`, and the `sftp` subsystem ([`sftp`], served by agentd on the sandbox's
//!   rootfs). Everything runs as the image's user, through the same exec path as the API.
//! - `direct-tcpip` (`ssh -L`, an editor's port forwarding) to `localhost`/`127.0.0.1` (or
//!   the sandbox's own name) reaches the sandbox's loopback, from a socket made in its network
//!   namespace; any other host is refused: the gateway is no way out of the sandbox's network.
//! - An unknown, stopped or exited sandbox is answered on stderr with what to do, and exit
//!   status 255.
//!
//! Bounded: 256 connections, 30 s to authenticate, 64 channels per connection, SFTP packets of
//! 256 KiB; an open session or forward keeps its sandbox from being reaped as idle.

pub mod sftp;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Handle, Msg, PublicKeyOffer, Session};
use russh::{Channel, ChannelMsg, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::exec::Stream;
use crate::sandbox::{ActiveGuard, Manager, Sandbox, SandboxState};

/// Most connections at once.
const MAX_CONNECTIONS: usize = 256;
/// Time a client has to authenticate.
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);
/// Most open channels (sessions and forwards) per connection.
const MAX_CHANNELS: usize = 64;
/// Largest authorized_keys file read.
const MAX_KEYS_FILE: u64 = 1 << 20;
/// Most `env` requests kept per session.
const MAX_ENV: usize = 64;

/// What every connection shares.
pub struct Gateway {
    mgr: Arc<Manager>,
    authorized_keys: PathBuf,
}

/// The host key, made on first use (ed25519, 0600, in a 0700 dir; written to a temporary
/// file and renamed, so a crash leaves no half key).
pub fn host_key(state_dir: &Path) -> anyhow::Result<PrivateKey> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = state_dir.join("ssh");
    let path = dir.join("host_ed25519_key");
    // blocking-ok: called once at start-up, before serving.
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return PrivateKey::from_openssh(text.as_bytes())
                .with_context(|| format!("{} is no OpenSSH private key", path.display()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let seed: [u8; 32] = crate::sandbox::random_bytes();
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::new(pair.into(), "agentd host key")?;
    let text = key.to_openssh(russh::keys::ssh_key::LineEnding::LF)?;
    let tmp = dir.join("host_ed25519_key.part");
    let _ = std::fs::remove_file(&tmp);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    let public = key.public_key().to_openssh()?;
    std::fs::write(dir.join("host_ed25519_key.pub"), format!("{public}\n"))?;
    Ok(key)
}

/// Serves SSH on `listener` until the process ends.
pub async fn serve(mgr: Arc<Manager>, listener: TcpListener, key: PrivateKey) {
    let authorized_keys = mgr.config.ssh_authorized_keys.clone();
    // blocking-ok: one metadata lookup at start-up.
    if !authorized_keys.is_file() {
        tracing::warn!(file = %authorized_keys.display(), "SSH: no authorized_keys file yet: nobody can log in until it lists a key");
    }
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        fingerprint = %key.public_key().fingerprint(HashAlg::Sha256),
        authorized_keys = %authorized_keys.display(),
        "SSH gateway"
    );
    let config = Arc::new(russh::server::Config {
        server_id: russh::SshId::Standard(
            concat!("SSH-2.0-agentd_", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![key],
        // OpenSSH asks with method "none" first: no need to make it wait for that answer.
        auth_rejection_time_initial: Some(Duration::ZERO),
        max_auth_attempts: 6,
        // A client that vanished is noticed by keepalives; an idle shell is not cut.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    });
    let gw = Arc::new(Gateway {
        mgr,
        authorized_keys,
    });
    // Bounded as agentd's other listeners are; one address may use them all (a bastion or
    // NAT in front of many people is one address).
    crate::net::serve_bounded(
        listener,
        "SSH",
        MAX_CONNECTIONS,
        MAX_CONNECTIONS,
        move |tcp, peer| {
            let _ = tcp.set_nodelay(true);
            connection(gw.clone(), config.clone(), tcp, peer)
        },
    )
    .await;
}

/// One client's connection: dropped if it has not authenticated within [`AUTH_TIMEOUT`].
async fn connection(
    gw: Arc<Gateway>,
    config: Arc<russh::server::Config>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let (authed_tx, authed_rx) = oneshot::channel();
    let conn = Conn {
        gw,
        peer,
        sandbox: String::new(),
        authed: Some(authed_tx),
        channels: Arc::new(AtomicUsize::new(0)),
    };
    let run = async move {
        match russh::server::run_stream(config, tcp, conn).await {
            Ok(session) => session.await,
            Err(e) => Err(e),
        }
    };
    tokio::pin!(run);
    tokio::select! {
        r = &mut run => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "SSH: connection ended");
            }
            return;
        }
        authed = tokio::time::timeout(AUTH_TIMEOUT, authed_rx) => {
            if !matches!(authed, Ok(Ok(()))) {
                tracing::debug!(%peer, "SSH: no authentication in time: dropped");
                return;
            }
        }
    }
    if let Err(e) = run.await {
        tracing::debug!(%peer, error = %e, "SSH: connection ended");
    }
}

impl Gateway {
    /// Whether `key` is in the authorized_keys file (read now; at most [`MAX_KEYS_FILE`]).
    async fn authorized(&self, key: &PublicKey) -> bool {
        let path = self.authorized_keys.clone();
        let text = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let f = std::fs::File::open(&path)?;
            let mut text = String::new();
            f.take(MAX_KEYS_FILE).read_to_string(&mut text)?;
            Ok::<_, std::io::Error>(text)
        })
        .await;
        let text = match text {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::warn!(file = %self.authorized_keys.display(), error = %e, "SSH: cannot read authorized_keys");
                return false;
            }
            Err(_) => return false,
        };
        authorized_in(&text, key)
    }
}

/// Whether `key` is one of the keys of authorized_keys text `text` (lines that do not parse
/// are skipped).
fn authorized_in(text: &str, key: &PublicKey) -> bool {
    text.lines().any(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return false;
        }
        russh::keys::ssh_key::authorized_keys::Entry::from_str(line)
            .is_ok_and(|e| e.public_key().key_data() == key.key_data())
    })
}

/// One connection's handler.
struct Conn {
    gw: Arc<Gateway>,
    peer: SocketAddr,
    /// The user name: the sandbox's id or name.
    sandbox: String,
    authed: Option<oneshot::Sender<()>>,
    channels: Arc<AtomicUsize>,
}

/// Counts an open channel until dropped.
struct ChannelSlot(Arc<AtomicUsize>);

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Conn {
    fn slot(&self) -> Option<ChannelSlot> {
        let n = self.channels.fetch_add(1, Ordering::Relaxed);
        let slot = ChannelSlot(self.channels.clone());
        (n < MAX_CHANNELS).then_some(slot)
    }
}

impl russh::server::Handler for Conn {
    type Error = anyhow::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.gw.authorized(offer.public_key).await {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if !self.gw.authorized(key.public_key).await {
            tracing::info!(peer = %self.peer, user, "SSH: refused a key that is not authorized");
            return Ok(Auth::reject());
        }
        tracing::info!(peer = %self.peer, sandbox = user, key = %key.public_key.fingerprint(HashAlg::Sha256), "SSH: logged in");
        self.sandbox = user.to_string();
        Ok(Auth::Accept)
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        if let Some(tx) = self.authed.take() {
            let _ = tx.send(());
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(slot) = self.slot() else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        reply.accept().await;
        let (gw, key, handle) = (self.gw.clone(), self.sandbox.clone(), session.handle());
        tokio::spawn(async move {
            let _slot = slot;
            session_channel(gw, key, channel, handle).await;
        });
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(slot) = self.slot() else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        let (gw, key, host) = (
            self.gw.clone(),
            self.sandbox.clone(),
            host_to_connect.to_string(),
        );
        // Connected on a task of its own: the connection's other channels keep flowing.
        tokio::spawn(async move {
            let _slot = slot;
            forward(gw, key, channel, host, port_to_connect, reply).await;
        });
        Ok(())
    }
}

/// Why a sandbox cannot be entered, as said to the client.
fn unusable(gw: &Gateway, key: &str) -> Result<Arc<Sandbox>, String> {
    let sb = gw.mgr.get(key).map_err(|_| {
        format!(
            "agentd: no sandbox {key:?}. The SSH user name is a sandbox's id or name: \
             `agentd sandbox ls` lists them."
        )
    })?;
    let rec = sb.snapshot();
    match rec.state {
        SandboxState::Ready | SandboxState::Starting => Ok(sb),
        SandboxState::Creating => Err(format!(
            "agentd: sandbox {} is still being created: try again in a moment.",
            rec.id
        )),
        SandboxState::Stopped | SandboxState::Exited => Err(format!(
            "agentd: sandbox {} is {}: its processes and files are gone. Create a new one \
             (`agentd sandbox create`).",
            rec.id,
            rec.state.as_str()
        )),
    }
}

/// The sandbox a channel is about to use, resumed if it was paused (`opencode`: the channel
/// goes to OpenCode, which is woken if it was hibernated); else what to say.
async fn enter(gw: &Gateway, key: &str, opencode: bool) -> Result<Arc<Sandbox>, String> {
    let sb = unusable(gw, key)?;
    gw.mgr
        .wake(&sb, opencode)
        .await
        .map_err(|e| format!("agentd: cannot resume sandbox {key}: {e}"))?;
    Ok(sb)
}

/// Whether `host` (of a `direct-tcpip` request) names the sandbox's own loopback.
fn is_sandbox_host(host: &str, sb: &Sandbox) -> bool {
    let rec = sb.snapshot();
    matches!(host, "localhost" | "127.0.0.1" | "::1" | "0.0.0.0")
        || host == rec.id
        || rec.name.as_deref() == Some(host)
}

/// `ssh -L`: joins the channel to a connection to `port` on the sandbox's loopback.
async fn forward(
    gw: Arc<Gateway>,
    key: String,
    channel: Channel<Msg>,
    host: String,
    port: u32,
    reply: ChannelOpenHandle,
) {
    let sb = match enter(&gw, &key, port == u32::from(crate::opencode::PORT)).await {
        Ok(sb) => sb,
        Err(why) => {
            tracing::debug!(sandbox = key, why, "SSH: forward refused");
            return reply.reject(ChannelOpenFailure::ConnectFailed).await;
        }
    };
    let port = match u16::try_from(port) {
        Ok(p) if p != 0 && is_sandbox_host(&host, &sb) => p,
        _ => {
            tracing::info!(
                sandbox = key,
                host,
                port,
                "SSH: refused a forward beyond the sandbox's own ports"
            );
            return reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
        }
    };
    let _guard = ActiveGuard::new(sb.clone());
    let mut tcp = match gw.mgr.connect_in_sandbox(&sb, port).await {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(sandbox = key, port, error = %e, "SSH: forward could not connect");
            return reply.reject(ChannelOpenFailure::ConnectFailed).await;
        }
    };
    reply.accept().await;
    let mut stream = channel.into_stream();
    if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await {
        tracing::debug!(sandbox = key, port, error = %e, "SSH: forward ended");
    }
}

/// A session channel: its requests until one starts something (a shell, a command, SFTP).
async fn session_channel(gw: Arc<Gateway>, key: String, mut ch: Channel<Msg>, handle: Handle) {
    let id = ch.id();
    let reply = |ok: bool| {
        let handle = handle.clone();
        async move {
            let _ = if ok {
                handle.channel_success(id).await
            } else {
                handle.channel_failure(id).await
            };
        }
    };
    let mut pty: Option<(u16, u16)> = None;
    let mut env: Vec<String> = Vec::new();
    while let Some(msg) = ch.wait().await {
        match msg {
            ChannelMsg::RequestPty {
                want_reply,
                col_width,
                row_height,
                ..
            } => {
                pty = Some((clamp(col_width, 80), clamp(row_height, 24)));
                if want_reply {
                    reply(true).await;
                }
            }
            ChannelMsg::SetEnv {
                want_reply,
                variable_name,
                variable_value,
            } => {
                let ok = env.len() < MAX_ENV
                    && valid_env_name(&variable_name)
                    && variable_value.len() <= 4096
                    && !variable_value.contains('\0');
                if ok {
                    env.push(format!("{variable_name}={variable_value}"));
                }
                if want_reply {
                    reply(ok).await;
                }
            }
            ChannelMsg::RequestShell { want_reply } => {
                if want_reply {
                    reply(true).await;
                }
                return run(&gw, &key, ch, None, pty, env).await;
            }
            ChannelMsg::Exec {
                want_reply,
                command,
            } => {
                if want_reply {
                    reply(true).await;
                }
                let command = String::from_utf8_lossy(&command).into_owned();
                return run(&gw, &key, ch, Some(command), pty, env).await;
            }
            ChannelMsg::RequestSubsystem { want_reply, name } if name == "sftp" => {
                match enter(&gw, &key, false)
                    .await
                    .and_then(|sb| sftp_session(&gw, sb))
                {
                    Ok(session) => {
                        if want_reply {
                            reply(true).await;
                        }
                        let config = russh_sftp::server::Config {
                            max_client_packet_len: sftp::MAX_PACKET,
                        };
                        let handle = handle.clone();
                        let stream = sftp::Fused::new(ch.into_stream(), move |s| {
                            // The session ended (the client's end of input): exit status 0,
                            // then the channel closes.
                            tokio::spawn(async move {
                                let _ = handle.exit_status_request(id, 0).await;
                                let _ = handle.eof(id).await;
                                let _ = handle.close(id).await;
                                drop(s);
                            });
                        });
                        russh_sftp::server::run_with_config(stream, session, config).await;
                    }
                    Err(why) => {
                        let _ = ch
                            .extended_data_bytes(1, Bytes::from(format!("{why}\r\n")))
                            .await;
                        if want_reply {
                            reply(false).await;
                        }
                        let _ = ch.close().await;
                    }
                }
                return;
            }
            ChannelMsg::RequestSubsystem {
                want_reply: true, ..
            }
            | ChannelMsg::RequestX11 {
                want_reply: true, ..
            } => reply(false).await,
            ChannelMsg::Eof | ChannelMsg::Close => return,
            _ => {}
        }
    }
}

fn clamp(v: u32, default: u16) -> u16 {
    match u16::try_from(v) {
        Ok(0) => default,
        Ok(v) => v,
        Err(_) => u16::MAX,
    }
}

/// An environment variable name a session may set: letters, digits and `_`, not first a
/// digit, at most 128 bytes.
fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn sftp_session(gw: &Gateway, sb: Arc<Sandbox>) -> Result<sftp::SftpSession, String> {
    let (rootfs, owner) = gw.mgr.rootfs(&sb).map_err(|e| format!("agentd: {e}"))?;
    // blocking-ok: opening the mounted rootfs's root dir is a lookup of a cached inode.
    let root = std::fs::File::open(&rootfs)
        .map_err(|e| format!("agentd: cannot open the sandbox's files: {e}"))?;
    let guard = ActiveGuard::new(sb.clone());
    Ok(sftp::SftpSession::new(
        root,
        owner,
        gw.mgr.config.id_base,
        sb.snapshot().user.0,
        guard,
    ))
}

/// Runs a shell (`command` None) or a command in the sandbox, its input and output on the
/// channel, its exit status at the end.
async fn run(
    gw: &Gateway,
    key: &str,
    ch: Channel<Msg>,
    command: Option<String>,
    pty: Option<(u16, u16)>,
    env: Vec<String>,
) {
    let sb = match enter(gw, key, false).await {
        Ok(sb) => sb,
        Err(why) => return refuse(ch, &why).await,
    };
    let _guard = ActiveGuard::new(sb.clone());
    let args: Vec<String> = match command {
        None => crate::exec::LOGIN_SHELL
            .iter()
            .map(|s| s.to_string())
            .collect(),
        Some(c) => vec!["/bin/sh".into(), "-c".into(), c],
    };
    let request = agentd_runtime::ExecRequest {
        args,
        env,
        cwd: None,
        uid: None,
    };
    let started = match pty {
        Some((cols, rows)) => gw
            .mgr
            .start_pty_exec(&sb, request, cols, rows)
            .await
            .map(|(s, p)| (s, Some(p))),
        None => gw
            .mgr
            .start_exec(&sb.snapshot().id, request, true)
            .await
            .map(|s| (s, None)),
    };
    let (started, pty) = match started {
        Ok(x) => x,
        Err(e) => return refuse(ch, &format!("agentd: cannot start the command: {e}")).await,
    };
    let tty = pty.is_some();
    let (mut rd, wr) = ch.split();
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(16);
    let (gone_tx, gone_rx) = oneshot::channel::<()>();
    // The client's messages, on a task of their own: stdin may wait on the process while its
    // output must keep flowing.
    let reader = tokio::spawn(async move {
        let mut stdin = Some(in_tx);
        while let Some(msg) = rd.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    if let Some(s) = &stdin {
                        if s.send(data).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                // On a terminal the end of input is the user's to type.
                ChannelMsg::Eof if !tty => stdin = None,
                ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    ..
                } => {
                    if let Some(p) = &pty {
                        let _ = p.resize(clamp(col_width, 80), clamp(row_height, 24));
                    }
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = gone_tx.send(());
    });
    let mut sink = SshOut(&wr);
    let end = gw
        .mgr
        .relay_exec(started, Some(in_rx), None, gone_rx, &mut sink)
        .await;
    reader.abort();
    let Some(end) = end else {
        tracing::debug!(
            sandbox = key,
            "SSH: the client went away; the process was killed"
        );
        return;
    };
    let code = match (end.code, &end.error) {
        (Some(c), _) => u32::try_from(c).unwrap_or(255),
        (None, e) => {
            let why = e.as_deref().unwrap_or("the process was lost");
            let _ = wr
                .extended_data_bytes(1, Bytes::from(format!("agentd: {why}\r\n")))
                .await;
            255
        }
    };
    let _ = wr.exit_status(code).await;
    let _ = wr.eof().await;
    let _ = wr.close().await;
}

/// The process's output on the channel: stdout as data, stderr as extended data 1.
struct SshOut<'a>(&'a russh::ChannelWriteHalf<Msg>);

impl crate::exec::OutputSink for SshOut<'_> {
    async fn send(&mut self, stream: Stream, data: Bytes) -> bool {
        match stream {
            Stream::Stdout => self.0.data_bytes(data).await,
            Stream::Stderr => self.0.extended_data_bytes(1, data).await,
        }
        .is_ok()
    }
}

/// Says `why` on stderr and ends the channel with status 255.
async fn refuse(ch: Channel<Msg>, why: &str) {
    let _ = ch
        .extended_data_bytes(1, Bytes::from(format!("{why}\r\n")))
        .await;
    let _ = ch.exit_status(255).await;
    let _ = ch.eof().await;
    let _ = ch.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_authorized_in_matches_key_data_only() {
        let text = "# comment\n\nnot a key\n\
            command=\"x\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHAHRUl0hY0Z7W6jdJbRoFe7L8jSnW6tXXFKAMpbMmqf someone\n";
        let key = PublicKey::from_openssh(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHAHRUl0hY0Z7W6jdJbRoFe7L8jSnW6tXXFKAMpbMmqf other",
        )
        .unwrap();
        assert!(authorized_in(text, &key));
        let other = PublicKey::from_openssh(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x",
        )
        .unwrap();
        assert!(!authorized_in(text, &other));
    }

    #[test]
    fn test_env_names() {
        assert!(valid_env_name("LANG"));
        assert!(valid_env_name("LC_ALL"));
        assert!(!valid_env_name("1X"));
        assert!(!valid_env_name("A=B"));
        assert!(!valid_env_name(""));
    }
}
