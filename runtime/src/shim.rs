//! The shim: one small single-threaded supervisor per sandbox (the `agentd-shim` binary).
//!
//! It creates and starts the container with libcontainer (which must only run in a
//! single-threaded process, MACHINE.md), stays its parent, reaps it, records its exit status
//! (and whether the OOM killer struck), and answers requests on a Unix socket in the sandbox's
//! state dir. In background mode it runs in its own session, so it outlives whoever started it
//! (agentd restarts reattach through the socket). In foreground mode (`agentd run`) it removes
//! everything as soon as the command exits and exits with the command's status.
//!
//! Every resource of the sandbox is owned here: the libcontainer state under `lc/`, the cgroups
//! (removed by libcontainer's delete, then by [`SandboxCgroup::remove`] for anything left), the
//! namespaces and mounts (they die with the sandbox's processes) and the state dir itself.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::cgroups::SandboxCgroup;
use crate::init::{exit_code, ExecutorRole, SandboxExecutor};
use crate::proto::{
    ExecRequest, ExitStatus, Request, Response, SandboxStatus, ShimConfig, ShimEvent, StdioConfig,
};
use crate::seccomp::{CompiledProfile, Profile};
use crate::spec::{NetworkMode, SeccompProfile};
use crate::{error_chain, layout};

/// Largest request the shim reads.
const MAX_REQUEST: usize = 1 << 20;

/// How long the shim waits for a client to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors that stop the shim.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// A file or socket operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A system call failed.
    #[error("{what}")]
    Sys {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// libcontainer failed to create, start or delete the container.
    #[error("{what}")]
    Container {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: libcontainer::error::LibcontainerError,
    },
    /// The spec could not be turned into an OCI spec.
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    /// The seccomp profile could not be loaded.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

type Result<T> = std::result::Result<T, ShimError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ShimError {
    let what = what.into();
    move |source| ShimError::Io { what, source }
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> ShimError {
    let what = what.into();
    move |source| ShimError::Sys { what, source }
}

fn lc_err(
    what: impl Into<String>,
) -> impl FnOnce(libcontainer::error::LibcontainerError) -> ShimError {
    let what = what.into();
    move |source| ShimError::Container { what, source }
}

/// A process exec'd into the sandbox.
struct ExecProcess {
    pid: Pid,
    status: Option<ExitStatus>,
    waiters: Vec<UnixStream>,
}

/// The shim's state while the sandbox lives.
struct Shim {
    /// The sandbox's configuration as read from `sandbox.json`.
    config: ShimConfig,
    /// The sandbox's state dir; removed on delete.
    dir: PathBuf,
    /// The compiled seccomp filters, shared by the init and every exec.
    seccomp: CompiledProfile,
    /// libcontainer's handle on the container.
    container: Container,
    /// Host pid of the sandbox's init; our child, so its pid cannot be reused before we reap it.
    init_pid: Pid,
    /// Set once the init has been reaped.
    exit: Option<ExitStatus>,
    /// Clients waiting for the exit.
    waiters: Vec<UnixStream>,
    /// Exec'd processes by id.
    execs: HashMap<u64, ExecProcess>,
    /// Next exec id.
    next_exec: u64,
    /// When to escalate a requested stop from SIGTERM to SIGKILL.
    kill_deadline: Option<Instant>,
    /// The cgroups, for stats and OOM detection.
    cgroup: SandboxCgroup,
    /// The socket agentd talks to; removed with the state dir.
    listener: UnixListener,
    /// The overlay rootfs of image layers, holding their in-use locks while the shim lives.
    _overlay: Option<crate::rootfs::MountedOverlay>,
}

/// Runs the shim for the sandbox whose `sandbox.json` is at `config_path`, reporting progress as
/// [`ShimEvent`] lines on `events`. Returns the process exit code for the shim.
pub fn main(config_path: &Path, mut events: File) -> i32 {
    tracing::debug!("shim running");
    // Given relative to the shim's working dir (its argv, which the sandbox can read as
    // /proc/1/cmdline, names no host path); absolute from here on.
    let config_path =
        &std::path::absolute(config_path).unwrap_or_else(|_| config_path.to_path_buf());
    let dir = config_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let config: ShimConfig = match fs::read(config_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            send_event(
                &mut events,
                &ShimEvent::Failed {
                    error: format!("cannot read {}: {e}", config_path.display()),
                },
            );
            return 1;
        }
    };
    if config.spec.memory_merge {
        // Set on the shim, before the sandbox's processes exist: forks inherit it and exec
        // keeps it, so every process of the sandbox is mergeable (and none of the host's).
        // SAFETY: prctl(PR_SET_MEMORY_MERGE, 1) only sets a flag of this process's mm.
        let r = unsafe { libc::prctl(libc::PR_SET_MEMORY_MERGE, 1, 0, 0, 0) };
        if r != 0 {
            // An older kernel or one without KSM: the sandbox runs, unmerged.
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot mark the sandbox's memory mergeable (KSM)");
        }
    }
    let mut shim = match Shim::start(config, dir.clone()) {
        Ok(s) => s,
        Err(e) => {
            let error = error_chain(&e);
            tracing::error!(%error, "failed to start sandbox");
            send_event(&mut events, &ShimEvent::Failed { error });
            return 1;
        }
    };
    send_event(
        &mut events,
        &ShimEvent::Started {
            pid: shim.init_pid.as_raw(),
        },
    );
    if !shim.config.foreground {
        // The starter only needed to know we started; from now on it talks to the socket.
        drop(events);
        match shim.serve() {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "shim failed");
                // Leave nothing behind even when the loop itself failed.
                shim.destroy();
                1
            }
        }
    } else {
        if let Err(e) = shim.serve() {
            tracing::error!(error = %error_chain(&e), "shim failed");
        }
        // After destroy: when the loop failed, destroy kills the sandbox and records that exit.
        shim.destroy();
        let status = shim.exit.unwrap_or(ExitStatus {
            code: 1,
            oom_killed: false,
        });
        send_event(&mut events, &ShimEvent::Exited(status));
        status.code
    }
}

fn send_event(events: &mut File, event: &ShimEvent) {
    if let Ok(mut line) = serde_json::to_vec(event) {
        line.push(b'\n');
        // The starter may be gone (background mode after a crash of agentd); that is fine.
        let _ = events.write_all(&line);
    }
}

fn open_stdio(stdio: &StdioConfig) -> Result<(OwnedFd, OwnedFd, OwnedFd)> {
    match stdio {
        StdioConfig::Inherit => {
            let dup = |fd: RawFd, name: &str| -> Result<OwnedFd> {
                // SAFETY: fds 0-2 are open for the whole life of the shim (the starter gives
                // them); we only borrow them to duplicate.
                let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                borrowed
                    .try_clone_to_owned()
                    .map_err(io_err(format!("failed to duplicate {name}")))
            };
            Ok((dup(0, "stdin")?, dup(1, "stdout")?, dup(2, "stderr")?))
        }
        StdioConfig::Files { stdout, stderr } => {
            let open = |p: &Path| -> Result<OwnedFd> {
                // Logs may carry whatever the sandbox prints, secrets included: root only.
                Ok(OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(p)
                    .map_err(io_err(format!("failed to open log file {}", p.display())))?
                    .into())
            };
            let null = File::open("/dev/null").map_err(io_err("failed to open /dev/null"))?;
            Ok((null.into(), open(stdout)?, open(stderr)?))
        }
    }
}

impl Shim {
    /// Mounts the overlay rootfs (for image layers), then creates and starts the container;
    /// unmounts again if that fails.
    fn start(config: ShimConfig, dir: PathBuf) -> Result<Shim> {
        if config.layers.is_empty() {
            return Self::start_container(config, dir);
        }
        // The runtime allocated the maps before it wrote the config; 0 only if it did not.
        let root = (
            config.spec.uid_map.map_or(0, |m| m.host),
            config.spec.gid_map.map_or(0, |m| m.host),
        );
        let overlay =
            crate::rootfs::mount_overlay(&dir, &config.layers, root, config.spec.limits.disk_bytes)
                .map_err(io_err("failed to mount the image's layers as the rootfs"))?;
        match Self::start_container(config, dir.clone()) {
            Ok(shim) => Ok(Shim {
                _overlay: Some(overlay),
                ..shim
            }),
            Err(e) => {
                if let Err(e) = crate::rootfs::unmount_overlay(&dir) {
                    tracing::error!(error = %e, "failed to unmount the rootfs");
                }
                Err(e)
            }
        }
    }

    fn start_container(config: ShimConfig, dir: PathBuf) -> Result<Shim> {
        let profile = match &config.spec.seccomp {
            SeccompProfile::Default => Profile::default_profile()?,
            SeccompProfile::File(p) => Profile::load(p)?,
        };
        let seccomp = profile.compile()?;
        let cgroup = SandboxCgroup::new(&config.cgroup_parent, &config.id);

        if let NetworkMode::Join(path) = &config.spec.network {
            join_netns(path)?;
        }
        let oci = config
            .spec
            .to_oci(&config.id, &config.rootfs, &config.cgroup_parent)?;
        let bundle = dir.join(layout::BUNDLE);
        // The OCI config holds the environment (secrets): root only.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&bundle)
            .map_err(io_err("failed to create the bundle dir"))?;
        oci.save(bundle.join("config.json"))
            .map_err(|e| ShimError::Io {
                what: "failed to write config.json".into(),
                source: io::Error::other(e.to_string()),
            })?;
        // The socket exists before the starter hears that we started, so it can connect at once.
        let listener = UnixListener::bind(dir.join(layout::SOCKET))
            .map_err(io_err("failed to bind the shim socket"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("failed to configure the shim socket"))?;
        let (stdin, stdout, stderr) = open_stdio(&config.stdio)?;
        let lc_root = dir.join(layout::LIBCONTAINER);
        tracing::debug!(id = %config.id, rootfs = %config.rootfs.display(), "creating container");
        let created = ContainerBuilder::new(config.id.clone(), SyscallType::default())
            .with_root_path(&lc_root)
            .and_then(|b| {
                b.with_executor(SandboxExecutor::new(seccomp.clone(), ExecutorRole::Init))
                    .with_stdin(stdin)
                    .with_stdout(stdout)
                    .with_stderr(stderr)
                    .as_init(&bundle)
                    .with_systemd(false)
                    .with_detach(true)
                    .build()
            });
        let mut container = match created {
            Ok(c) => c,
            Err(e) => {
                // libcontainer may have made the cgroup and its state dir before failing.
                let _ = cgroup.remove();
                let _ = crate::tree::remove_tree(&lc_root);
                return Err(ShimError::Container {
                    what: "failed to create the sandbox".into(),
                    source: e,
                });
            }
        };
        if config.spec.network.is_new() {
            let veth = match &config.spec.network {
                NetworkMode::Veth(v) => Some(v),
                _ => None,
            };
            let up = container
                .pid()
                .ok_or_else(|| io::Error::other("no pid after create"))
                .and_then(|pid| crate::netns::configure(pid, veth));
            if let Err(e) = up {
                let _ = container.delete(true);
                let _ = cgroup.remove();
                return Err(ShimError::Io {
                    what: "failed to set up the sandbox's network".into(),
                    source: e,
                });
            }
        }
        if let Err(e) = container.start() {
            let _ = container.delete(true);
            let _ = cgroup.remove();
            return Err(ShimError::Container {
                what: "failed to start the sandbox".into(),
                source: e,
            });
        }
        let init_pid = container.pid().ok_or_else(|| ShimError::Io {
            what: "libcontainer reported no pid for the started sandbox".into(),
            source: io::Error::other("no pid"),
        })?;
        tracing::info!(id = %config.id, pid = init_pid.as_raw(), "sandbox started");
        Ok(Shim {
            config,
            dir,
            seccomp,
            container,
            init_pid,
            exit: None,
            waiters: Vec::new(),
            execs: HashMap::new(),
            next_exec: 1,
            kill_deadline: None,
            cgroup,
            listener,
            _overlay: None,
        })
    }

    /// The event loop: signals (SIGCHLD, stop requests) and socket requests, one at a time.
    /// Returns when the sandbox exited in foreground mode, or after `Delete`.
    fn serve(&mut self) -> Result<()> {
        let sfd = SignalFd::with_flags(
            &handled_signals(),
            SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
        )
        .map_err(sys_err("failed to create a signalfd"))?;
        let listener = self
            .listener
            .try_clone()
            .map_err(io_err("failed to use the shim socket"))?;
        // A SIGCHLD may have arrived before the signalfd existed (a command that exits at once).
        self.reap();
        loop {
            if self.exit.is_some() && self.config.foreground {
                return Ok(());
            }
            let timeout = match self.kill_deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    PollTimeout::try_from(left.as_millis().min(60_000) as i32)
                        .unwrap_or(PollTimeout::MAX)
                }
                None => PollTimeout::NONE,
            };
            let (sig_ready, sock_ready) = {
                let mut fds = [
                    PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
                    PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(sys_err("poll failed")(e)),
                }
                let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), ready(&fds[1]))
            };
            if let Some(d) = self.kill_deadline {
                if Instant::now() >= d && self.exit.is_none() {
                    tracing::warn!("sandbox ignored SIGTERM; sending SIGKILL");
                    let _ = kill(self.init_pid, Signal::SIGKILL);
                    self.kill_deadline = None;
                }
            }
            if sig_ready {
                while let Ok(Some(info)) = sfd.read_signal() {
                    #[allow(clippy::cast_possible_wrap)] // signal numbers are small
                    match Signal::try_from(info.ssi_signo as i32) {
                        Ok(Signal::SIGCHLD) => self.reap(),
                        Ok(Signal::SIGTERM | Signal::SIGINT) => self.request_stop(),
                        // SIGHUP: the terminal went away; the sandbox keeps running.
                        _ => {}
                    }
                }
            }
            if sock_ready {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if self.handle(stream)? {
                            return Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => tracing::warn!(error = %e, "accept failed"),
                }
            }
        }
    }

    /// SIGTERM to the init now, SIGKILL after the stop timeout.
    fn request_stop(&mut self) {
        if self.exit.is_some() {
            return;
        }
        let _ = kill(self.init_pid, Signal::SIGTERM);
        if self.kill_deadline.is_none() {
            self.kill_deadline =
                Some(Instant::now() + Duration::from_secs(self.config.stop_timeout_secs));
        }
    }

    /// Reaps every exited child: the init, exec'd processes, and orphans (we are a subreaper).
    fn reap(&mut self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => s,
            };
            let (Some(pid), Some(code)) = (status.pid(), exit_code(status)) else {
                continue;
            };
            if pid == self.init_pid {
                self.record_exit(code);
            } else if let Some(e) = self.execs.values_mut().find(|e| e.pid == pid) {
                let st = ExitStatus {
                    code,
                    oom_killed: false,
                };
                e.status = Some(st);
                for w in e.waiters.drain(..) {
                    reply(w, &Response::Exited(st));
                }
            }
        }
    }

    fn record_exit(&mut self, code: i32) {
        let oom_killed = self.cgroup.oom_kills().unwrap_or(0) > 0;
        let status = ExitStatus { code, oom_killed };
        tracing::info!(code, oom_killed, "sandbox exited");
        self.exit = Some(status);
        self.kill_deadline = None;
        // Kept for whoever inspects a background sandbox's state dir; a foreground one is
        // removed right away.
        if !self.config.foreground {
            if let Ok(json) = serde_json::to_vec(&status) {
                let _ = fs::write(self.dir.join(layout::EXIT), json);
            }
        }
        for w in self.waiters.drain(..) {
            reply(w, &Response::Exited(status));
        }
        // Processes exec'd into the sandbox died with its pid namespace; their waiters are
        // answered when we reap them.
    }

    /// Handles one connection. Returns true when the shim should exit (after `Delete`).
    fn handle(&mut self, stream: UnixStream) -> Result<bool> {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
        let (request, fds) = match read_request(&stream) {
            Ok(r) => r,
            Err(e) => {
                reply(stream, &Response::Error(format!("bad request: {e}")));
                return Ok(false);
            }
        };
        match request {
            Request::State => {
                let status = match self.exit {
                    Some(e) => SandboxStatus::Exited(e),
                    None => SandboxStatus::Running,
                };
                reply(
                    stream,
                    &Response::State {
                        pid: self.init_pid.as_raw(),
                        status,
                    },
                );
            }
            Request::Wait => match self.exit {
                Some(e) => reply(stream, &Response::Exited(e)),
                None => self.waiters.push(stream),
            },
            Request::Kill { signal } => {
                let resp = match (self.exit, Signal::try_from(signal)) {
                    (Some(_), _) => Response::Error("the sandbox is not running".into()),
                    (None, Err(_)) => Response::Error(format!("invalid signal {signal}")),
                    (None, Ok(sig)) => match kill(self.init_pid, sig) {
                        Ok(()) => Response::Ok,
                        Err(e) => Response::Error(format!("kill failed: {e}")),
                    },
                };
                reply(stream, &resp);
            }
            Request::Hibernate | Request::Wake => {
                let signal = if matches!(request, Request::Hibernate) {
                    crate::init::hibernate_signal()
                } else {
                    crate::init::wake_signal()
                };
                let resp = match self.exit {
                    Some(_) => Response::Error("the sandbox is not running".into()),
                    // SAFETY: kill takes a pid and a signal number and touches no memory. The
                    // init is our unreaped child (`exit` is unset), so its pid names it.
                    None if unsafe { libc::kill(self.init_pid.as_raw(), signal) } == 0 => {
                        Response::Ok
                    }
                    None => {
                        Response::Error(format!("kill failed: {}", std::io::Error::last_os_error()))
                    }
                };
                reply(stream, &resp);
            }
            Request::Asleep => {
                let resp = match self.exit {
                    Some(_) => Response::Error("the sandbox is not running".into()),
                    None => match crate::init::asleep(self.init_pid.as_raw()) {
                        Ok(a) => Response::Asleep(a),
                        Err(e) => Response::Error(format!("cannot read the init's name: {e}")),
                    },
                };
                reply(stream, &resp);
            }
            Request::Exec(req) => {
                let resp = match (self.exit, fds) {
                    (Some(_), _) => Response::Error("the sandbox is not running".into()),
                    (None, Some(fds)) => match self.exec(req, fds) {
                        Ok((exec_id, pid)) => Response::ExecStarted {
                            exec_id,
                            pid: pid.as_raw(),
                        },
                        Err(e) => Response::Error(error_chain(&e)),
                    },
                    (None, None) => {
                        Response::Error("exec needs stdin, stdout and stderr fds".into())
                    }
                };
                reply(stream, &resp);
            }
            Request::WaitExec { exec_id } => match self.execs.get_mut(&exec_id) {
                None => reply(
                    stream,
                    &Response::Error(format!("no exec with id {exec_id}")),
                ),
                Some(e) => match e.status {
                    Some(st) => reply(stream, &Response::Exited(st)),
                    None => e.waiters.push(stream),
                },
            },
            Request::KillExec { exec_id, signal } => {
                let resp = match (self.execs.get(&exec_id), Signal::try_from(signal)) {
                    (None, _) => Response::Error(format!("no exec with id {exec_id}")),
                    (Some(e), _) if e.status.is_some() => Response::Ok,
                    (Some(_), Err(_)) => Response::Error(format!("invalid signal {signal}")),
                    // The process is our unreaped child (its status is unknown): the pid
                    // still names it, and its process group (it leads one, see
                    // init::SandboxExecutor) holds what it started.
                    (Some(e), Ok(sig)) => {
                        let _ = kill(Pid::from_raw(-e.pid.as_raw()), sig);
                        match kill(e.pid, sig) {
                            Ok(()) => Response::Ok,
                            Err(e) => Response::Error(format!("kill failed: {e}")),
                        }
                    }
                };
                reply(stream, &resp);
            }
            Request::Stats => {
                let resp = match self.cgroup.stats() {
                    Ok(s) => Response::Stats(s),
                    Err(e) => Response::Error(error_chain(&e)),
                };
                reply(stream, &resp);
            }
            Request::Delete => {
                // What could not be removed is said in the answer: the caller cleans up after
                // this shim has exited ([`crate::Runtime::cleanup`]).
                match self.destroy() {
                    None => reply(stream, &Response::Ok),
                    Some(problem) => reply(stream, &Response::Error(problem)),
                }
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn exec(
        &mut self,
        req: ExecRequest,
        (stdin, stdout, stderr): (OwnedFd, OwnedFd, OwnedFd),
    ) -> Result<(u64, Pid)> {
        if req.args.is_empty() {
            return Err(ShimError::Io {
                what: "exec needs a command".into(),
                source: io::Error::other("empty args"),
            });
        }
        let mut env: HashMap<String, String> = HashMap::new();
        for e in self
            .config
            .spec
            .effective_env()
            .iter()
            .chain(req.env.iter())
        {
            if let Some((k, v)) = e.split_once('=') {
                env.insert(k.to_string(), v.to_string());
            }
        }
        let cwd = req.cwd.unwrap_or_else(|| self.config.spec.cwd.clone());
        let uid = req.uid.unwrap_or(self.config.spec.uid);
        // Another user than the sandbox's (root for maintenance, say) gets the group of the
        // same number, as `docker exec --user N` does without a passwd lookup.
        let gid = if uid == self.config.spec.uid {
            self.config.spec.gid
        } else {
            uid
        };
        // libcontainer 0.7's exec joins every namespace of the sandbox but its user namespace
        // (tenant_builder's NAMESPACE_TYPES has no "user"). So it starts the process as host
        // root with the capabilities below, and our executor joins the user namespace of the
        // sandbox's init (this fd), becomes uid/gid there and narrows its capabilities
        // (init::enter_user_namespace) before seccomp and exec.
        let userns =
            File::open(format!("/proc/{}/ns/user", self.init_pid)).map_err(|e| ShimError::Io {
                what: "failed to open the sandbox's user namespace".into(),
                source: e,
            })?;
        let identity = crate::init::ExecIdentity {
            userns_fd: userns.as_raw_fd(),
            uid,
            gid,
        };
        // What the executor needs for that: CAP_SYS_ADMIN (setns into a user namespace),
        // CAP_SETPCAP (bounding set), CAP_SETUID/CAP_SETGID (in the default set).
        let caps: Vec<String> = crate::spec::DEFAULT_CAPABILITIES
            .iter()
            .map(|c| format!("CAP_{c}"))
            .chain(["CAP_SYS_ADMIN".to_string(), "CAP_SETPCAP".to_string()])
            .collect();
        let pid = ContainerBuilder::new(self.config.id.clone(), SyscallType::default())
            .with_root_path(self.dir.join(layout::LIBCONTAINER))
            .map_err(lc_err("failed to find the sandbox's state"))?
            .with_executor(SandboxExecutor::new(
                self.seccomp.clone(),
                ExecutorRole::Exec(Some(identity)),
            ))
            .with_stdin(stdin)
            .with_stdout(stdout)
            .with_stderr(stderr)
            .as_tenant()
            .with_container_args(req.args)
            .with_env(env)
            .with_cwd(Some(cwd))
            .with_user(Some(0))
            .with_group(Some(0))
            .with_no_new_privs(true)
            .with_capabilities(caps)
            .with_detach(true)
            .build()
            .map_err(lc_err("failed to exec into the sandbox"))?;
        // The process has its own copy of the fd by now; ours can go.
        drop(userns);
        let id = self.next_exec;
        self.next_exec += 1;
        self.execs.insert(
            id,
            ExecProcess {
                pid,
                status: None,
                waiters: Vec::new(),
            },
        );
        Ok((id, pid))
    }

    /// Kills whatever still runs and removes every resource of the sandbox. Each step is
    /// attempted whatever the others did (one stuck step does not leak the others); what
    /// failed is logged and returned.
    fn destroy(&mut self) -> Option<String> {
        let mut problems = Vec::new();
        if self.exit.is_none() {
            let _ = kill(self.init_pid, Signal::SIGKILL);
            // Our child: this cannot block on anything but its death.
            if let Ok(status) = waitpid(self.init_pid, None) {
                if let Some(code) = exit_code(status) {
                    self.record_exit(code);
                }
            }
        }
        if let Err(e) = self.container.delete(true) {
            tracing::warn!(error = %error_chain(&e), "libcontainer delete failed; removing by hand");
        }
        if let Err(e) = self.cgroup.remove() {
            tracing::error!(error = %error_chain(&e), "failed to remove the sandbox's cgroups");
            problems.push(format!("cgroups: {}", error_chain(&e)));
        }
        for w in self.waiters.drain(..) {
            reply(w, &Response::Error("the sandbox was deleted".into()));
        }
        if !self.config.layers.is_empty() {
            if let Err(e) = crate::rootfs::unmount_overlay(&self.dir) {
                tracing::error!(error = %e, "failed to unmount the rootfs");
                problems.push(format!("unmount: {e}"));
            }
        }
        // The layers' shared locks go now, before the answer, not when this process exits a
        // moment later: whoever asked may remove a layer nobody else holds (a fork layer whose
        // last fork this was) right after it.
        self._overlay = None;
        if let Err(e) = crate::tree::remove_tree(&self.dir) {
            tracing::error!(error = %e, dir = %self.dir.display(), "failed to remove the state dir");
            problems.push(format!("state dir {}: {e}", self.dir.display()));
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

type Fds = (OwnedFd, OwnedFd, OwnedFd);

/// Reads one request and, when attached, three fds.
fn read_request(stream: &UnixStream) -> io::Result<(Request, Option<Fds>)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; 3]);
    let (n, mut fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed this fd in our table for us (SCM_RIGHTS)
                    // and nothing else refers to it, so we take ownership.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        (msg.bytes, fds)
    };
    buf.truncate(n);
    let mut rest = Vec::new();
    stream
        .take((MAX_REQUEST - n) as u64)
        .read_to_end(&mut rest)?;
    buf.extend_from_slice(&rest);
    let request: Request =
        serde_json::from_slice(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let fds = if fds.len() == 3 {
        let stderr = fds.pop();
        let stdout = fds.pop();
        let stdin = fds.pop();
        match (stdin, stdout, stderr) {
            (Some(a), Some(b), Some(c)) => Some((a, b, c)),
            _ => None,
        }
    } else {
        None
    };
    Ok((request, fds))
}

fn reply(mut stream: UnixStream, response: &Response) {
    if let Ok(mut json) = serde_json::to_vec(response) {
        json.push(b'\n');
        // A client that went away does not concern the sandbox.
        let _ = stream.write_all(&json);
    }
}

/// Blocks the signals the shim handles through its signalfd. Must run before the container is
/// created so that no SIGCHLD or SIGTERM is delivered the default way in between.
pub fn block_signals() -> nix::Result<()> {
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled_signals()), None)
}

/// The signals the shim takes through its signalfd: child exits and stop requests.
fn handled_signals() -> SigSet {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    mask
}

/// Moves the shim into the network namespace at `path`, so that the sandbox it creates inherits
/// it. The shim only talks over Unix sockets in the filesystem, which work from any netns.
fn join_netns(path: &Path) -> Result<()> {
    let what = format!("cannot join the network namespace {}", path.display());
    let file = File::open(path).map_err(io_err(what.clone()))?;
    tracing::debug!(path = %path.display(), "setns(CLONE_NEWNET)");
    // setns checks that the fd is a network namespace (EINVAL otherwise).
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(sys_err(format!(
        "{what}: is it a network namespace (ip netns add)?"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ClientError, ShimClient};
    use crate::proto::ExitStatus;

    /// Serves `replies.len()` connections on `listener` like the shim does: reads a request
    /// (with its fds), hands it to `on_request`, sends the reply it returns.
    fn fake_shim(
        listener: UnixListener,
        mut on_request: impl FnMut(Request, Option<Fds>) -> Option<Response> + Send + 'static,
        connections: usize,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            for _ in 0..connections {
                let (stream, _) = listener.accept().unwrap();
                let (request, fds) = read_request(&stream).unwrap();
                // `None`: close without answering, like a shim that died.
                if let Some(response) = on_request(request, fds) {
                    reply(stream, &response);
                }
            }
        })
    }

    /// The protocol end to end, both ends as they ship, over a real Unix socket: a request
    /// with three fds attached (SCM_RIGHTS) arrives whole and its fds work; replies come
    /// back typed; an error reply and a silent close are errors the client names.
    #[test]
    fn test_shim_protocol_exec_fds_errors_and_silence() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("shim.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = fake_shim(
            listener,
            |request, fds| match request {
                Request::Exec(req) => {
                    assert_eq!(req.args, vec!["echo".to_string(), "hi".into()]);
                    assert_eq!(req.env, vec!["A=1".to_string()]);
                    assert_eq!(req.uid, Some(1000));
                    let (_stdin, stdout, stderr) = fds.expect("three fds");
                    File::from(stdout).write_all(b"out").unwrap();
                    File::from(stderr).write_all(b"err").unwrap();
                    Some(Response::ExecStarted {
                        exec_id: 7,
                        pid: 4242,
                    })
                }
                Request::WaitExec { exec_id } => {
                    assert_eq!(exec_id, 7);
                    assert!(fds.is_none());
                    Some(Response::Exited(ExitStatus {
                        code: 3,
                        oom_killed: false,
                    }))
                }
                Request::Stats => Some(Response::Error("cgroup gone".into())),
                Request::State => None,
                other => panic!("unexpected request {other:?}"),
            },
            4,
        );
        let client = ShimClient::new(&socket);
        let (status, out, err) = client
            .exec_output(crate::ExecRequest {
                args: vec!["echo".into(), "hi".into()],
                env: vec!["A=1".into()],
                cwd: None,
                uid: Some(1000),
            })
            .unwrap();
        assert_eq!(status.code, 3);
        assert_eq!((out.as_slice(), err.as_slice()), (&b"out"[..], &b"err"[..]));
        match client.stats() {
            Err(ClientError::Shim(m)) => assert_eq!(m, "cgroup gone"),
            other => panic!("expected the shim's error, got {other:?}"),
        }
        match client.state() {
            Err(ClientError::Protocol(m)) => assert!(m.contains("closed"), "{m}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
        server.join().unwrap();
    }

    /// A request larger than the shim accepts is refused, not read into memory without end.
    #[test]
    fn test_shim_refuses_oversized_requests() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let big = Request::Exec(crate::ExecRequest {
                args: vec!["x".repeat(2 * MAX_REQUEST)],
                ..Default::default()
            });
            let _ = a.write_all(&serde_json::to_vec(&big).unwrap());
        });
        let e = read_request(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        drop(b);
        writer.join().unwrap();
    }
}
