//! Running a process in a live sandbox: its stdout and stderr are read while it runs (a
//! process that writes more than a pipe holds never waits on agentd), its stdin is fed from
//! a stream, and it is killed at its timeout or when whoever reads its output goes away.
//!
//! Both the exec API (which streams every chunk to the client) and the task runner (which
//! keeps capped tails, [`Manager::exec_collect`]) go through [`Manager::run_exec`].
//!
//! An interactive exec ([`Manager::start_pty_exec`]) runs on a terminal of the sandbox's own
//! devpts: agentd opens the sandbox's `/dev/pts/ptmx` below its init's root (`openat2`,
//! `RESOLVE_IN_ROOT`: no link in the sandbox can lead it out), checks it is a ptmx, gets
//! the other end with `TIOCGPTPEER` (no path lookup), gives that end to the process as
//! stdin, stdout and stderr (it becomes its controlling terminal) and keeps the master.
//!
//! [`Manager::connect_in_sandbox`] connects to a port on the sandbox's own loopback (a server
//! that listens on 127.0.0.1 inside), from a socket made in the sandbox's network namespace.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::error::Error;
use crate::sandbox::{ExecOutput, Manager, Sandbox};

/// How long output still in the pipes is read after the process ended: a background child
/// that inherited them may hold them open forever, so after this the exec ends anyway.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Bytes read from a pipe at once.
const CHUNK: usize = 16 * 1024;

/// The command of a login shell in an image that may or may not have bash.
pub const LOGIN_SHELL: [&str; 3] = [
    "/bin/sh",
    "-c",
    "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi",
];

/// Where an interactive client's output goes: [`Manager::relay_exec`] hands it each chunk.
pub trait OutputSink {
    /// Sends one chunk; false when the client can take no more (it went away).
    fn send(
        &mut self,
        stream: Stream,
        data: Bytes,
    ) -> impl std::future::Future<Output = bool> + Send;
}

/// How long a connection to a port inside a sandbox may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which output a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The process's stdout.
    Stdout,
    /// The process's stderr.
    Stderr,
}

impl Stream {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A process started in a sandbox, not yet followed.
pub struct StartedExec {
    /// The sandbox's id.
    sandbox: String,
    /// The shim's id of the process.
    exec_id: u64,
    /// The write end of its stdin, if it has a pipe.
    stdin: Option<OwnedFd>,
    /// The read end of its stdout.
    stdout: OwnedFd,
    /// The read end of its stderr.
    stderr: OwnedFd,
}

impl StartedExec {
    /// The shim's id of the process (for signals).
    pub fn exec_id(&self) -> u64 {
        self.exec_id
    }
}

/// The master side of an interactive exec's terminal, for resizing it.
pub struct Pty {
    master: OwnedFd,
}

impl Pty {
    /// Sets the terminal's size (the process gets SIGWINCH).
    pub fn resize(&self, cols: u16, rows: u16) -> std::io::Result<()> {
        rustix::termios::tcsetwinsize(
            &self.master,
            rustix::termios::Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            },
        )
        .map_err(std::io::Error::from)
    }
}

/// A TCP socket (non-blocking, close-on-exec, not connected) in the network namespace of
/// the sandbox `client` serves. Runs on a thread made for it, which ends with this call: the
/// thread enters the sandbox's namespace, and no thread of agentd's pools may be left there.
fn socket_in_netns(client: &agentd_runtime::ShimClient) -> std::io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let (pid, _) = client.state().map_err(std::io::Error::other)?;
    // blocking-ok: a thread of its own (see above); /proc is no disk.
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    // The init is the shim's unreaped child: if it is still the same pid now, the namespace
    // opened above was its.
    match client.state() {
        Ok((p, agentd_runtime::SandboxStatus::Running)) if p == pid => {}
        _ => return Err(std::io::Error::other("the sandbox stopped")),
    }
    // setns(CLONE_NEWNET) moves this thread only; sockets keep the namespace they were made in.
    rustix::thread::move_into_link_name_space(
        ns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?)
}

/// One listening TCP socket in a sandbox.
#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct Listening {
    /// The port.
    pub port: u16,
    /// It listens on loopback only (the sandbox's own 127.0.0.1 or ::1): reachable by
    /// `ssh -L`, not by the port's origin or path form, which connect to the sandbox's address.
    pub loopback_only: bool,
}

/// The listening TCP ports in `/proc/net/tcp` and `tcp6` text (the kernel's format).
fn parse_listening(tables: &[String]) -> Vec<Listening> {
    let mut ports: std::collections::BTreeMap<u16, bool> = std::collections::BTreeMap::new();
    for table in tables {
        for line in table.lines().skip(1) {
            let mut f = line.split_whitespace();
            let (Some(_), Some(local), Some(_), Some(state)) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            if state != "0A" {
                continue;
            }
            let Some((addr, port)) = local.rsplit_once(':') else {
                continue;
            };
            let Ok(port) = u16::from_str_radix(port, 16) else {
                continue;
            };
            let loopback = addr == "0100007F" || addr == "00000000000000000000000001000000";
            let only = ports.get(&port).copied().unwrap_or(true) && loopback;
            ports.insert(port, only);
        }
    }
    ports
        .into_iter()
        .map(|(port, loopback_only)| Listening {
            port,
            loopback_only,
        })
        .collect()
}

/// A new terminal in the devpts of the sandbox whose init is `pid`: (master, peer). The
/// peer is owned by `owner` (host ids) with mode 0620, as a login's terminal.
fn open_sandbox_pty(pid: i32, owner: (u32, u32)) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let root = rustix::fs::open(
        format!("/proc/{pid}/root"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // Resolved below the sandbox's root whatever its links say; the devpts mount is crossed.
    let master = rustix::fs::openat2(
        &root,
        "dev/pts/ptmx",
        OFlags::RDWR | OFlags::NOCTTY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_SYMLINKS,
    )?;
    let st = rustix::fs::fstat(&master)?;
    let rdev = st.st_rdev;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::CharacterDevice
        || rustix::fs::major(rdev) != 5
        || rustix::fs::minor(rdev) != 2
    {
        return Err(std::io::Error::other(
            "the sandbox's /dev/pts/ptmx is not a terminal multiplexer",
        ));
    }
    rustix::pty::unlockpt(&master)?;
    let peer = rustix::pty::ioctl_tiocgptpeer(
        &master,
        rustix::pty::OpenptFlags::RDWR | rustix::pty::OpenptFlags::NOCTTY,
    )?;
    rustix::fs::fchown(
        &peer,
        Some(rustix::fs::Uid::from_raw(owner.0)),
        Some(rustix::fs::Gid::from_raw(owner.1)),
    )?;
    rustix::fs::fchmod(&peer, Mode::from_raw_mode(0o620))?;
    // The peer is handed on; ours must not leak into anything agentd starts.
    rustix::io::fcntl_setfd(&peer, rustix::io::FdFlags::CLOEXEC)?;
    Ok((master, peer))
}

/// How an exec ended.
#[derive(Debug, Clone, Default)]
pub struct ExecEnd {
    /// Exit status (128+N for signal N); `None` if the process was lost.
    pub code: Option<i32>,
    /// The sandbox's OOM killer ran while it did.
    pub oom_killed: bool,
    /// It was killed at its timeout.
    pub timed_out: bool,
    /// It was killed because the reader of its output went away.
    pub abandoned: bool,
    /// Why its status is unknown, when `code` is `None`.
    pub error: Option<String>,
}

impl Manager {
    /// Starts a process in sandbox `id`, its stdin a pipe when `with_stdin` (else
    /// /dev/null); [`Manager::run_exec`] then follows it to its end.
    pub async fn start_exec(
        &self,
        id: &str,
        request: agentd_runtime::ExecRequest,
        with_stdin: bool,
    ) -> std::result::Result<StartedExec, String> {
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| e.to_string());
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (stdin_r, stdin_w): (OwnedFd, Option<OwnedFd>) = if with_stdin {
            let (r, w) = pipe()?;
            (r, Some(w))
        } else {
            // blocking-ok: opening /dev/null waits on no disk.
            let devnull = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
            (devnull.into(), None)
        };
        let client = self.runtime.client(id);
        let exec_id = tokio::task::spawn_blocking(move || {
            // The sandbox's ends go to the shim and are closed here when this closure
            // returns, so EOF on our ends means the process (and its children) closed them.
            client.exec(request, stdin_r.as_fd(), out_w.as_fd(), err_w.as_fd())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        Ok(StartedExec {
            sandbox: id.to_string(),
            exec_id,
            stdin: stdin_w,
            stdout: out_r,
            stderr: err_r,
        })
    }

    /// Starts `request` in sandbox `id` on a new terminal of the sandbox's (`cols` x `rows`),
    /// as uid `uid` inside (the sandbox's user when `None`); [`Manager::run_exec`] follows it
    /// (its stdout carries the terminal's output, stderr nothing; stdin is the terminal's
    /// input). The [`Pty`] resizes the terminal.
    pub async fn start_pty_exec(
        &self,
        sb: &Sandbox,
        mut request: agentd_runtime::ExecRequest,
        cols: u16,
        rows: u16,
    ) -> std::result::Result<(StartedExec, Pty), String> {
        let rec = sb.snapshot();
        let id = rec.id.clone();
        let uid = request.uid.unwrap_or(rec.user.0);
        let gid = if uid == rec.user.0 { rec.user.1 } else { uid };
        let base = self.config.id_base;
        request.env.push("TERM=xterm-256color".into());
        let client = self.runtime.client(&id);
        let (master, exec_id) = tokio::task::spawn_blocking(move || {
            let (pid, _) = client.state().map_err(|e| e.to_string())?;
            let (master, peer) = open_sandbox_pty(pid, (base + uid, base + gid))
                .map_err(|e| format!("cannot open a terminal in the sandbox: {e}"))?;
            // The init is the shim's unreaped child: if it is still the same pid now, the
            // root opened above was its.
            match client.state() {
                Ok((p, agentd_runtime::SandboxStatus::Running)) if p == pid => {}
                _ => return Err("the sandbox stopped".to_string()),
            }
            let tty = Pty { master };
            tty.resize(cols, rows).map_err(|e| e.to_string())?;
            let exec_id = client
                .exec(request, peer.as_fd(), peer.as_fd(), peer.as_fd())
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((tty.master, exec_id))
        })
        .await
        .map_err(|e| e.to_string())??;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| e.to_string());
        // stderr: a pipe whose write end is closed at once (the terminal carries both).
        let (none_r, none_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| e.to_string())?;
        drop(none_w);
        Ok((
            StartedExec {
                sandbox: id,
                exec_id,
                stdin: Some(dup(&master)?),
                stdout: dup(&master)?,
                stderr: none_r,
            },
            Pty { master },
        ))
    }

    /// Connects to `port` on the loopback of sandbox `sb` (a server inside that listens on
    /// 127.0.0.1 or on every address), within [`CONNECT_TIMEOUT`].
    pub async fn connect_in_sandbox(
        &self,
        sb: &Sandbox,
        port: u16,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let client = self.runtime.client(&sb.snapshot().id);
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("agentd-netns".into())
            .spawn(move || {
                let _ = tx.send(socket_in_netns(&client));
            })?;
        let fd = rx
            .await
            .map_err(|_| std::io::Error::other("lost the namespace thread"))??;
        let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
        let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
        tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))?
    }

    /// Follows a started process as [`Manager::run_exec`] does for an interactive client: each
    /// chunk of output goes to `sink` as it is read, until the process ends (then what it
    /// wrote just before) or the client goes away (`sink` fails or `gone` fires; the process
    /// is then killed and None returned).
    pub async fn relay_exec(
        &self,
        started: StartedExec,
        stdin: Option<mpsc::Receiver<Bytes>>,
        timeout: Option<Duration>,
        mut gone: tokio::sync::oneshot::Receiver<()>,
        sink: &mut impl OutputSink,
    ) -> Option<ExecEnd> {
        let (out_tx, out_rx) = mpsc::channel::<(Stream, Bytes)>(16);
        let run = self.run_exec(started, stdin, timeout, out_tx);
        tokio::pin!(run);
        let mut out_rx = Some(out_rx);
        let mut out_open = true;
        let mut client_gone = false;
        let end = loop {
            tokio::select! {
                end = &mut run => break end,
                chunk = async {
                    match &mut out_rx {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                }, if out_open => {
                    let Some((stream, data)) = chunk else {
                        // The output ended; the process's end follows.
                        out_open = false;
                        continue;
                    };
                    if !sink.send(stream, data).await {
                        // Nobody reads: run_exec kills the process once the output has no
                        // reader.
                        client_gone = true;
                        out_rx = None;
                    }
                }
                _ = &mut gone, if !client_gone => {
                    client_gone = true;
                    out_rx = None;
                }
            }
        };
        if end.abandoned || client_gone {
            return None;
        }
        if let Some(mut r) = out_rx {
            while let Ok((stream, data)) = r.try_recv() {
                if !sink.send(stream, data).await {
                    return None;
                }
            }
        }
        Some(end)
    }

    /// The TCP ports that listen in sandbox `sb` (read from its network namespace's
    /// `/proc/<init>/net/tcp` and `tcp6`, 1 MiB each at most).
    pub async fn listening_ports(&self, sb: &Sandbox) -> std::io::Result<Vec<Listening>> {
        let client = self.runtime.client(&sb.snapshot().id);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let (pid, _) = client.state().map_err(std::io::Error::other)?;
            let mut tables = Vec::new();
            for t in ["tcp", "tcp6"] {
                let mut text = String::new();
                if let Ok(f) = std::fs::File::open(format!("/proc/{pid}/net/{t}")) {
                    f.take(1 << 20).read_to_string(&mut text)?;
                }
                tables.push(text);
            }
            // The init is the shim's unreaped child: the same pid now means its tables.
            match client.state() {
                Ok((p, agentd_runtime::SandboxStatus::Running)) if p == pid => {}
                _ => return Err(std::io::Error::other("the sandbox stopped")),
            }
            Ok(parse_listening(&tables))
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Follows a started process to its end. Every chunk of output is sent on `out` as it is
    /// read; stdin is fed from `stdin` (closed when the channel ends). The process is
    /// SIGKILLed at `timeout`, or when `out`'s receiver is dropped (nobody reads it any more).
    pub async fn run_exec(
        &self,
        started: StartedExec,
        stdin: Option<mpsc::Receiver<Bytes>>,
        timeout: Option<Duration>,
        out: mpsc::Sender<(Stream, Bytes)>,
    ) -> ExecEnd {
        let StartedExec {
            sandbox,
            exec_id,
            stdin: stdin_w,
            stdout: out_r,
            stderr: err_r,
        } = started;
        let id = sandbox.as_str();
        // Both pipes are read by tasks of their own from now on, whatever the process does.
        let pumps = [
            tokio::spawn(pump(out_r, Stream::Stdout, out.clone())),
            tokio::spawn(pump(err_r, Stream::Stderr, out.clone())),
        ];
        let feeder = match (stdin, stdin_w) {
            (Some(rx), Some(w)) => Some(tokio::spawn(feed(rx, w))),
            _ => None,
        };
        let client = self.runtime.client(id);
        let wait = tokio::task::spawn_blocking(move || client.wait_exec(exec_id));
        tokio::pin!(wait);
        let mut end = ExecEnd::default();
        let deadline = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let status = tokio::select! {
            st = &mut wait => st,
            () = deadline => {
                end.timed_out = true;
                self.kill_exec(id, exec_id).await;
                (&mut wait).await
            }
            () = out.closed() => {
                end.abandoned = true;
                self.kill_exec(id, exec_id).await;
                (&mut wait).await
            }
        };
        if let Some(f) = feeder {
            f.abort();
        }
        // Output still in the pipes is read to its end, within the grace; then the readers
        // stop (dropping the pipes and their senders), so a child that kept them open cannot
        // hold the exec's end (nor its reader) any longer.
        let [mut p1, mut p2] = pumps;
        let drained = tokio::time::timeout(OUTPUT_GRACE, async {
            let _ = (&mut p1).await;
            let _ = (&mut p2).await;
        });
        if drained.await.is_err() {
            tracing::debug!(
                sandbox = id,
                exec_id,
                "a child of the exec holds its output open: stopped reading"
            );
        }
        p1.abort();
        p2.abort();
        match status {
            Ok(Ok(st)) => {
                end.code = Some(st.code);
                end.oom_killed = st.oom_killed;
            }
            Ok(Err(e)) => end.error = Some(format!("lost the process: {e}")),
            Err(e) => end.error = Some(format!("lost the process: {e}")),
        }
        end
    }

    /// SIGKILLs exec `exec_id` through its shim (which holds it unreaped, so the pid is its).
    async fn kill_exec(&self, id: &str, exec_id: u64) {
        let client = self.runtime.client(id);
        let _ = tokio::task::spawn_blocking(move || client.kill_exec(exec_id, libc::SIGKILL)).await;
    }

    /// Runs `args` in a live sandbox as its user and waits for it: output is kept up to
    /// `max_output` bytes per stream (the end of it; the process is never slowed by the
    /// cap), the process is killed at `timeout`.
    pub async fn exec_collect(
        &self,
        sb: &Arc<Sandbox>,
        args: Vec<String>,
        cwd: Option<&str>,
        timeout: Duration,
        max_output: usize,
    ) -> crate::sandbox::Result<ExecOutput> {
        self.exec_collect_each(sb, args, cwd, timeout, max_output, &mut |_, _| {})
            .await
    }

    /// [`Self::exec_collect`] that also hands every chunk of output to `each` as it comes.
    pub async fn exec_collect_each(
        &self,
        sb: &Arc<Sandbox>,
        args: Vec<String>,
        cwd: Option<&str>,
        timeout: Duration,
        max_output: usize,
        each: &mut (dyn FnMut(Stream, &[u8]) + Send),
    ) -> crate::sandbox::Result<ExecOutput> {
        let rec = sb.snapshot();
        if !rec.state.is_live() {
            return Err(Error::Conflict(format!(
                "sandbox {} is {}",
                rec.id,
                rec.state.as_str()
            )));
        }
        let request = agentd_runtime::ExecRequest {
            args,
            env: Vec::new(),
            cwd: cwd.map(Into::into),
            uid: Some(rec.user.0),
        };
        let started = self
            .start_exec(&rec.id, request, false)
            .await
            .map_err(|e| Error::internal(format!("exec failed: {e}")))?;
        let (tx, mut rx) = mpsc::channel(16);
        let run = self.run_exec(started, None, Some(timeout), tx);
        let collect = async {
            let mut tails = [Tail::new(max_output), Tail::new(max_output)];
            while let Some((stream, data)) = rx.recv().await {
                each(stream, &data);
                tails[usize::from(stream == Stream::Stderr)].push(&data);
            }
            tails
        };
        let (end, [stdout, stderr]) = tokio::join!(run, collect);
        Ok(ExecOutput {
            code: end.code,
            truncated: stdout.truncated || stderr.truncated,
            stdout: stdout.bytes,
            stderr: stderr.bytes,
            timed_out: end.timed_out,
            error: end.error,
        })
    }
}

/// Reads one pipe to its end, sending each chunk on `out`; stops early when `out` is closed
/// (dropping the read end then makes further writes fail with EPIPE, never block).
async fn pump(fd: OwnedFd, stream: Stream, out: mpsc::Sender<(Stream, Bytes)>) {
    let Ok(mut pipe) = FdIo::new(fd) else {
        return;
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        // A terminal's master reads EIO once the process side is closed: the end too.
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out
                    .send((stream, Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Writes what arrives on `rx` to the process's stdin; closes it when `rx` ends or the
/// process stops reading.
async fn feed(mut rx: mpsc::Receiver<Bytes>, w: OwnedFd) {
    let Ok(mut pipe) = FdIo::new(w) else {
        return;
    };
    while let Some(chunk) = rx.recv().await {
        if pipe.write_all(&chunk).await.is_err() {
            return;
        }
    }
}

/// A pipe end or a terminal master, read and written without blocking a thread.
struct FdIo(tokio::io::unix::AsyncFd<OwnedFd>);

impl FdIo {
    fn new(fd: OwnedFd) -> std::io::Result<FdIo> {
        let flags = rustix::fs::fcntl_getfl(&fd)?;
        rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK)?;
        // SAFETY: an OwnedFd is open, and names the same file description, until it is
        // dropped, which happens only when the AsyncFd that owns it is.
        let registered = unsafe { tokio::io::unix::AsyncFd::register(fd) };
        Ok(FdIo(registered.map_err(std::io::Error::from)?))
    }

    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| rustix::io::read(fd.get_ref(), &mut *buf).map_err(Into::into)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| rustix::io::write(fd.get_ref(), buf).map_err(Into::into)) {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// The last `cap` bytes of a stream.
struct Tail {
    cap: usize,
    bytes: Vec<u8>,
    truncated: bool,
}

impl Tail {
    fn new(cap: usize) -> Self {
        Tail {
            cap,
            bytes: Vec::new(),
            truncated: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > self.cap {
            let cut = self.bytes.len() - self.cap;
            self.bytes.drain(..cut);
            self.truncated = true;
        }
    }
}

/// Splits a byte stream into UTF-8 text without breaking characters across chunks: bytes of
/// a character cut at a chunk's end wait for the next chunk; invalid bytes become U+FFFD.
#[derive(Default)]
pub struct Utf8Chunker {
    pending: Vec<u8>,
}

impl Utf8Chunker {
    /// The text of `data` (with what was pending before it); may be empty.
    pub fn push(&mut self, data: &[u8]) -> String {
        self.pending.extend_from_slice(data);
        let keep = match std::str::from_utf8(&self.pending) {
            Ok(_) => 0,
            // An incomplete character at the very end (at most 3 bytes): keep it.
            Err(e) if e.error_len().is_none() => self.pending.len() - e.valid_up_to(),
            Err(_) => incomplete_suffix(&self.pending),
        };
        let rest = self.pending.split_off(self.pending.len() - keep);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        text
    }

    /// What is left at the end of the stream.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// The length of an incomplete UTF-8 character at the end of `b` (0 if none).
fn incomplete_suffix(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let c = b[b.len() - back];
        if c & 0xC0 != 0x80 {
            // A lead byte: how long its character is.
            let need = match c {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => return 0,
            };
            return if need > back { back } else { 0 };
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_listening_ports_from_proc_net() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1000 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1\n\
   1: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2 1\n\
   2: 0A000002:A0F2 0A000001:0FA7 01 00000000:00000000 00:00000000 00000000  1000        0 3 1\n"
            .to_string();
        let tcp6 = "  sl  local_address ...\n\
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 0 0 0 0 0 0 4\n"
            .to_string();
        assert_eq!(
            parse_listening(&[tcp, tcp6]),
            vec![
                Listening {
                    port: 3000,
                    loopback_only: true
                },
                Listening {
                    port: 4096,
                    loopback_only: false
                },
                Listening {
                    port: 8080,
                    loopback_only: true
                },
            ]
        );
    }

    #[test]
    fn test_tail_keeps_the_end() {
        let mut t = Tail::new(4);
        t.push(b"ab");
        t.push(b"cdef");
        assert_eq!((t.bytes.as_slice(), t.truncated), (&b"cdef"[..], true));
    }

    #[test]
    fn test_utf8_chunker_never_splits_a_character() {
        let text = "héllo → wörld 🎉";
        let bytes = text.as_bytes();
        for cut in 0..bytes.len() {
            let mut c = Utf8Chunker::default();
            let mut out = c.push(&bytes[..cut]);
            out.push_str(&c.push(&bytes[cut..]));
            out.push_str(&c.finish());
            assert_eq!(out, text, "cut at {cut}");
        }
        let mut c = Utf8Chunker::default();
        assert_eq!(c.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(c.push(b"x\xe2\x86"), "x");
        assert_eq!(c.finish(), "\u{fffd}");
    }
}
