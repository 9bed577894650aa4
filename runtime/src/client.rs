//! The caller's side: start a shim for a sandbox and talk to it.
//!
//! [`Runtime`] owns a state root (one directory per sandbox, see [`crate::layout`]). Starting a
//! sandbox writes its `sandbox.json`, fork+execs `agentd-shim`, and reads the shim's first event
//! from a pipe: either the sandbox runs, or it failed and the shim removed everything. After that
//! a [`ShimClient`] talks to the shim over its socket; it works from any process, also after the
//! process that started the shim is gone.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use crate::cgroups::{SandboxCgroup, Stats, DEFAULT_CGROUP_PARENT};
use crate::layout;
use crate::proto::{
    ExecRequest, ExitStatus, Request, Response, SandboxStatus, ShimConfig, ShimEvent, StdioConfig,
};
use crate::rootfs::Rootfs;
use crate::spec::{
    validate_id, IdMap, SandboxSpec, DEFAULT_HOST_ID_BASE, DEFAULT_ID_RANGE, MAX_ID_RANGES,
};

/// Default state root for sandboxes: on tmpfs, so a host reboot (which kills every sandbox)
/// also forgets them.
pub const DEFAULT_STATE_ROOT: &str = "/run/agentd/sandboxes";

/// Seconds a sandbox gets between SIGTERM and SIGKILL when it is stopped.
pub const DEFAULT_STOP_TIMEOUT_SECS: u64 = 10;

/// How long a request other than a wait may take before the shim counts as stuck. Delete
/// includes killing the sandbox and removing its cgroups.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long [`Runtime::shim_alive`] waits for a shim to answer.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The command name of shim processes (the file name of the binary; `comm` is 15 bytes).
const SHIM_COMM: &str = "agentd-shim";

/// Processes whose working directory is `dir` (pid and command name). Shims are started in
/// their sandbox's dir and so are their helpers until they change it; nothing else of agentd
/// works there.
fn processes_in(dir: &Path) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    // The kernel shows working dirs resolved.
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd == dir) {
            let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            found.push((pid, comm.trim().to_string()));
        }
    }
    found
}

/// The fd number the shim finds its event pipe on.
const EVENTS_FD: RawFd = 3;

/// Errors of the caller's side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The spec is invalid.
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    /// The rootfs is unusable.
    #[error("{0}")]
    Rootfs(String),
    /// A sandbox with this id exists already.
    #[error("a sandbox with id {0:?} already exists")]
    Exists(String),
    /// The `agentd-shim` binary was not found.
    #[error(
        "cannot find the agentd-shim binary at {0}: install it next to agentd or set AGENTD_SHIM"
    )]
    NoShim(PathBuf),
    /// The shim reported that the sandbox could not be created.
    #[error("{0}")]
    CreateFailed(String),
    /// The shim answered with an error.
    #[error("{0}")]
    Shim(String),
    /// The shim did not behave as the protocol says.
    #[error("unexpected answer from the shim: {0}")]
    Protocol(String),
    /// File or socket I/O failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Removing a dead sandbox's cgroups failed.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroups::CgroupError),
}

type Result<T> = std::result::Result<T, ClientError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ClientError {
    let what = what.into();
    move |source| ClientError::Io { what, source }
}

/// The caller's stdin, stdout and stderr for a sandbox.
type StdioFds = (OwnedFd, OwnedFd, OwnedFd);

/// Starts sandboxes under one state root and finds them again.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// One directory per sandbox lives here.
    state_root: PathBuf,
    /// The `agentd-shim` executable.
    shim: PathBuf,
    /// Cgroup parent for every sandbox of this runtime.
    cgroup_parent: String,
    /// Seconds between SIGTERM and SIGKILL on stop.
    stop_timeout_secs: u64,
}

/// A sandbox whose shim runs in the foreground of the caller (`agentd run`).
pub struct ForegroundSandbox {
    child: Child,
    events: BufReader<File>,
    /// Host pid of the sandbox's init.
    pub init_pid: i32,
}

impl Runtime {
    /// A runtime with its state under `state_root`, finding `agentd-shim` next to the current
    /// executable (or at `$AGENTD_SHIM`).
    pub fn new(state_root: impl Into<PathBuf>) -> Self {
        let shim = std::env::var_os("AGENTD_SHIM")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join("agentd-shim")))
                    .unwrap_or_else(|| PathBuf::from("agentd-shim"))
            });
        Runtime {
            state_root: state_root.into(),
            shim,
            cgroup_parent: DEFAULT_CGROUP_PARENT.into(),
            stop_timeout_secs: DEFAULT_STOP_TIMEOUT_SECS,
        }
    }

    /// Uses this `agentd-shim` executable.
    pub fn with_shim(mut self, shim: impl Into<PathBuf>) -> Self {
        self.shim = shim.into();
        self
    }

    /// Puts sandbox cgroups under this parent instead of [`DEFAULT_CGROUP_PARENT`].
    pub fn with_cgroup_parent(mut self, parent: impl Into<String>) -> Self {
        self.cgroup_parent = parent.into();
        self
    }

    /// Gives sandboxes this many seconds between SIGTERM and SIGKILL on stop.
    pub fn with_stop_timeout(mut self, secs: u64) -> Self {
        self.stop_timeout_secs = secs;
        self
    }

    /// The cgroup parent in use.
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// The state dir of sandbox `id`.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state_root.join(id)
    }

    /// The writable layer (the overlay's upper dir) of sandbox `id`, while it runs.
    pub fn upper_dir(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id)
            .join(crate::layout::OVERLAY)
            .join(crate::rootfs::UPPER)
    }

    /// The cgroups of sandbox `id`.
    pub fn cgroup(&self, id: &str) -> SandboxCgroup {
        SandboxCgroup::new(&self.cgroup_parent, id)
    }

    /// Where the default log files of sandbox `id` are: on its disk when it has one (so that
    /// what it prints counts against its disk limit too), else in its state dir.
    pub fn logs_dir(&self, id: &str) -> PathBuf {
        let dir = self.sandbox_dir(id);
        let on_disk = dir.join(layout::OVERLAY);
        if on_disk.join(layout::STDOUT).exists() {
            on_disk
        } else {
            dir
        }
    }

    /// Starts sandbox `id` in the background: its shim detaches and outlives the caller. Stdout
    /// and stderr go to `stdout.log` and `stderr.log` in [`Runtime::logs_dir`] unless given.
    pub fn create(
        &self,
        id: &str,
        rootfs: impl Into<Rootfs>,
        spec: &SandboxSpec,
        stdio: Option<StdioConfig>,
    ) -> Result<ShimClient> {
        let rootfs = rootfs.into();
        let dir = self.sandbox_dir(id);
        // The shim opens them after it mounted the disk (at `overlay/`), outside the upper dir:
        // the sandbox cannot see them.
        let logs = match (&rootfs, spec.limits.disk_bytes) {
            (Rootfs::Layers(_), Some(_)) => dir.join(layout::OVERLAY),
            _ => dir.clone(),
        };
        let stdio = stdio.unwrap_or_else(|| StdioConfig::Files {
            stdout: logs.join(layout::STDOUT),
            stderr: logs.join(layout::STDERR),
        });
        let (mut child, mut events) = self.spawn(id, rootfs, spec, stdio, false, None)?;
        self.await_background_start(id, &mut child, &mut events)
    }

    /// Starts sandbox `id` in the background with the caller's fds as its stdin, stdout and
    /// stderr (a pipe, a pty, a socket): like [`Runtime::create`] otherwise.
    pub fn create_with_fds(
        &self,
        id: &str,
        rootfs: impl Into<Rootfs>,
        spec: &SandboxSpec,
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> Result<ShimClient> {
        let fds = Some((stdin, stdout, stderr));
        let (mut child, mut events) =
            self.spawn(id, rootfs.into(), spec, StdioConfig::Inherit, false, fds)?;
        self.await_background_start(id, &mut child, &mut events)
    }

    fn await_background_start(
        &self,
        id: &str,
        child: &mut Child,
        events: &mut BufReader<File>,
    ) -> Result<ShimClient> {
        let dir = self.sandbox_dir(id);
        let first = read_event(events);
        // The background shim has set up its own session and closed the pipe; reap the
        // short-lived fork we started (the shim double-forks so that it is not our child).
        let _ = child.wait();
        match first {
            Some(ShimEvent::Started { .. }) => Ok(self.client(id)),
            other => {
                let hint = format!("; see its log in {}", dir.join(layout::SHIM_LOG).display());
                Err(self.start_failed(id, other, &hint))
            }
        }
    }

    /// Removes what a shim that did not start left, and says why it did not. A shim that
    /// reported its failure has already removed the sandbox (only the state dir is left); one
    /// that died without a word may have left anything, so it gets the full cleanup.
    fn start_failed(&self, id: &str, event: Option<ShimEvent>, hint: &str) -> ClientError {
        match event {
            Some(ShimEvent::Failed { error }) => {
                let _ = crate::tree::remove_tree(&self.sandbox_dir(id));
                ClientError::CreateFailed(error)
            }
            other => {
                let _ = self.cleanup(id);
                ClientError::CreateFailed(format!(
                    "the shim exited without reporting ({other:?}){hint}"
                ))
            }
        }
    }

    /// Starts sandbox `id` with the caller's stdio, for a one-shot run. Everything is removed when
    /// the command exits; [`ForegroundSandbox::wait`] returns its status.
    pub fn run_foreground(
        &self,
        id: &str,
        rootfs: impl Into<Rootfs>,
        spec: &SandboxSpec,
    ) -> Result<ForegroundSandbox> {
        let (mut child, mut events) =
            self.spawn(id, rootfs.into(), spec, StdioConfig::Inherit, true, None)?;
        match read_event(&mut events) {
            Some(ShimEvent::Started { pid }) => Ok(ForegroundSandbox {
                child,
                events,
                init_pid: pid,
            }),
            // A foreground shim logs to the caller's stderr: no log file to point at.
            other => {
                let _ = child.wait();
                Err(self.start_failed(id, other, ""))
            }
        }
    }

    fn spawn(
        &self,
        id: &str,
        rootfs: Rootfs,
        spec: &SandboxSpec,
        stdio: StdioConfig,
        foreground: bool,
        fds: Option<StdioFds>,
    ) -> Result<(Child, BufReader<File>)> {
        validate_id(id)?;
        spec.validate()?;
        crate::cgroups::prime_attach(&self.cgroup_parent);
        let (rootfs, layers) = match rootfs {
            Rootfs::Dir(rootfs) => {
                check_rootfs(&rootfs)?;
                let rootfs = fs::canonicalize(&rootfs).map_err(io_err(format!(
                    "cannot resolve rootfs {}",
                    rootfs.display()
                )))?;
                (rootfs, Vec::new())
            }
            Rootfs::Layers(layers) => {
                crate::rootfs::validate_layers(&layers).map_err(ClientError::Rootfs)?;
                (self.sandbox_dir(id).join(layout::ROOTFS), layers)
            }
        };
        if !self.shim.is_file() {
            return Err(ClientError::NoShim(self.shim.clone()));
        }
        fs::create_dir_all(&self.state_root).map_err(io_err(format!(
            "cannot create the state root {}",
            self.state_root.display()
        )))?;
        // Choosing a free host id range and claiming it (by writing sandbox.json, which records
        // it) happen under one lock, so that concurrent creates never share a range.
        let t = std::time::Instant::now();
        let lock = self.lock_state_root()?;
        let mut spec = spec.clone();
        if spec.uid_map.is_none() || spec.gid_map.is_none() {
            let free = self.free_id_range()?;
            spec.uid_map.get_or_insert(free);
            spec.gid_map.get_or_insert(free);
        }
        let dir = self.sandbox_dir(id);
        match fs::DirBuilder::new().mode(0o711).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(ClientError::Exists(id.to_string()))
            }
            Err(e) => return Err(io_err(format!("cannot create {}", dir.display()))(e)),
        }
        let config = ShimConfig {
            id: id.to_string(),
            rootfs,
            layers,
            spec,
            cgroup_parent: self.cgroup_parent.clone(),
            stdio,
            foreground,
            stop_timeout_secs: self.stop_timeout_secs,
        };
        let config_path = dir.join(layout::CONFIG);
        let write = serde_json::to_vec_pretty(&config)
            .map_err(io::Error::other)
            .and_then(|json| write_private(&config_path, &json));
        drop(lock);
        tracing::debug!(
            id,
            ms = t.elapsed().as_secs_f64() * 1e3,
            "spawn: id range and config written"
        );
        if let Err(e) = write {
            let _ = crate::tree::remove_tree(&dir);
            return Err(io_err("cannot write sandbox.json")(e));
        }
        let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| io_err("cannot create a pipe")(e.into()))?;
        let mut cmd = Command::new(&self.shim);
        // argv names no host path: the sandbox's PID 1 is a fork of the shim, and its
        // /proc/1/cmdline is readable inside. The config is found from the working dir.
        cmd.arg0("agentd-shim")
            .current_dir(&dir)
            .arg("--config")
            .arg(layout::CONFIG);
        if foreground {
            cmd.arg("--foreground");
        }
        if let Some((stdin, stdout, stderr)) = fds {
            // The shim's own stdio becomes the sandbox's (StdioConfig::Inherit).
            cmd.stdin(Stdio::from(stdin))
                .stdout(Stdio::from(stdout))
                .stderr(Stdio::from(stderr));
        } else if !foreground {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        }
        let raw = write_end.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only calls dup2, which
        // is async-signal-safe, so it is sound even when the caller is multi-threaded (agentd).
        unsafe {
            cmd.pre_exec(move || {
                // dup2 clears CLOEXEC on the new fd, so the shim inherits exactly this one.
                if libc::dup2(raw, EVENTS_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = crate::tree::remove_tree(&dir);
                return Err(io_err(format!("cannot start {}", self.shim.display()))(e));
            }
        };
        drop(write_end);
        tracing::debug!(
            id,
            ms = t.elapsed().as_secs_f64() * 1e3,
            "spawn: shim started"
        );
        Ok((child, BufReader::new(File::from(read_end))))
    }

    /// Takes the state root's lock (released when the returned file is dropped).
    fn lock_state_root(&self) -> Result<nix::fcntl::Flock<File>> {
        let path = self.state_root.join(".lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("cannot open {}", path.display())))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io_err(format!("cannot lock {}", path.display()))(e.into()))
    }

    /// The first host id range, from [`DEFAULT_HOST_ID_BASE`] up in steps of
    /// [`DEFAULT_ID_RANGE`], that no sandbox of this state root maps. Sandboxes record their
    /// ranges in their `sandbox.json`; a range is free again once its sandbox's dir is gone.
    /// Call with the state root locked.
    fn free_id_range(&self) -> Result<IdMap> {
        let mut used: Vec<IdMap> = Vec::new();
        for id in self.list()? {
            let Ok(bytes) = fs::read(self.sandbox_dir(&id).join(layout::CONFIG)) else {
                continue;
            };
            if let Ok(config) = serde_json::from_slice::<ShimConfig>(&bytes) {
                used.extend(config.spec.uid_map);
                used.extend(config.spec.gid_map);
            }
        }
        (0..MAX_ID_RANGES)
            .map(|k| IdMap::unprivileged(DEFAULT_HOST_ID_BASE + k * DEFAULT_ID_RANGE))
            .find(|candidate| !used.iter().any(|u| u.overlaps(candidate)))
            .ok_or_else(|| {
                ClientError::Shim(format!(
                    "all {MAX_ID_RANGES} host id ranges are in use: delete sandboxes first"
                ))
            })
    }

    /// A client for the shim of sandbox `id`.
    pub fn client(&self, id: &str) -> ShimClient {
        ShimClient {
            socket: self.sandbox_dir(id).join(layout::SOCKET),
            timeout: CALL_TIMEOUT,
        }
    }

    /// Whether the shim of sandbox `id` runs: a process of the shim's binary working in the
    /// sandbox's dir (where shims are started), or one that answers on its socket within a
    /// moment (a shim of an older agentd). A dead shim's helper that still holds the socket's
    /// listener (a libcontainer process orphaned mid-create) accepts connections but never
    /// answers: that is not a live shim, and asking it would wait for the full call timeout.
    pub fn shim_alive(&self, id: &str) -> bool {
        let dir = self.sandbox_dir(id);
        if processes_in(&dir).iter().any(|(_, comm)| comm == SHIM_COMM) {
            return true;
        }
        let mut quick = self.client(id);
        quick.timeout = PROBE_TIMEOUT;
        quick.state().is_ok()
    }

    /// Ids of every sandbox with a state dir under the state root.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        let entries = match fs::read_dir(&self.state_root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ids),
            Err(e) => return Err(io_err("cannot list the state root")(e)),
        };
        for e in entries.flatten() {
            if let Some(name) = e.file_name().to_str() {
                if validate_id(name).is_ok() {
                    ids.push(name.to_string());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Removes what is left of sandbox `id` after its shim died: kills its processes through
    /// its cgroups, removes the cgroups and the state dir. Refuses while the shim still answers
    /// (use [`ShimClient::delete`] then).
    pub fn cleanup(&self, id: &str) -> Result<()> {
        validate_id(id)?;
        if self.shim_alive(id) {
            return Err(ClientError::Shim(format!(
                "the shim of {id} is alive: delete the sandbox through it"
            )));
        }
        // Helpers the dead shim left (libcontainer's processes of a create it did not finish
        // are not in the sandbox's cgroups yet) still work in its dir: they go first.
        for (pid, comm) in processes_in(&self.sandbox_dir(id)) {
            tracing::debug!(pid, comm, "killing a process the dead shim left");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.cgroup(id).remove()?;
        // Before removing the state dir: an overlay rootfs is mounted inside it.
        crate::rootfs::unmount_overlay(&self.sandbox_dir(id))
            .map_err(io_err("cannot unmount the sandbox's rootfs"))?;
        match crate::tree::remove_tree(&self.sandbox_dir(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("cannot remove the sandbox's state dir")(e)),
        }
    }
}

impl ForegroundSandbox {
    /// Host pid of the shim (signal it to stop the sandbox: SIGTERM, then SIGKILL after the
    /// stop timeout).
    pub fn shim_pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the command exited and the shim removed everything.
    pub fn wait(mut self) -> Result<ExitStatus> {
        let event = read_event(&mut self.events);
        let shim = self
            .child
            .wait()
            .map_err(io_err("cannot wait for the shim"))?;
        match event {
            Some(ShimEvent::Exited(status)) => Ok(status),
            other => Err(ClientError::Protocol(format!(
                "shim ended ({shim}) with {other:?}"
            ))),
        }
    }
}

/// Writes a file only root can read: sandbox configs carry environment values (API keys).
fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

fn read_event(events: &mut BufReader<File>) -> Option<ShimEvent> {
    let mut line = String::new();
    match events.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => serde_json::from_str(&line).ok(),
    }
}

/// Checks that `rootfs` is a directory the sandbox's unprivileged root can reach. Every
/// ancestor must be searchable by "others": inside the user namespace, root is an ordinary uid
/// on the host.
fn check_rootfs(rootfs: &Path) -> Result<()> {
    let meta = fs::metadata(rootfs).map_err(|e| {
        ClientError::Rootfs(format!("rootfs {} is not usable: {e}", rootfs.display()))
    })?;
    if !meta.is_dir() {
        return Err(ClientError::Rootfs(format!(
            "rootfs {} is not a directory",
            rootfs.display()
        )));
    }
    let abs = fs::canonicalize(rootfs)
        .map_err(|e| ClientError::Rootfs(format!("rootfs {}: {e}", rootfs.display())))?;
    for dir in abs.ancestors() {
        let mode = fs::metadata(dir)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        if mode & 0o001 == 0 {
            return Err(ClientError::Rootfs(format!(
                "{} (mode {:o}) is not searchable by the sandbox's unprivileged user: run `chmod o+x {}`",
                dir.display(),
                mode & 0o7777,
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Talks to one sandbox's shim.
#[derive(Debug, Clone)]
pub struct ShimClient {
    socket: PathBuf,
    /// How long a call other than a wait may take.
    timeout: std::time::Duration,
}

impl ShimClient {
    /// A client for the shim listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ShimClient {
            socket: socket.into(),
            timeout: CALL_TIMEOUT,
        }
    }

    fn call(&self, request: &Request, fds: &[BorrowedFd<'_>]) -> Result<Response> {
        let mut stream = UnixStream::connect(&self.socket).map_err(io_err(format!(
            "cannot reach the shim at {}",
            self.socket.display()
        )))?;
        // Only the waits may take long; anything else answers at once or the shim is stuck.
        let waits = matches!(request, Request::Wait | Request::WaitExec { .. });
        let timeout = if waits { None } else { Some(self.timeout) };
        stream
            .set_read_timeout(timeout)
            .map_err(io_err("cannot configure the shim socket"))?;
        let json = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsgs = if raw.is_empty() {
            vec![]
        } else {
            vec![ControlMessage::ScmRights(&raw)]
        };
        let sent = sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&json)],
            &cmsgs,
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| io_err("cannot send to the shim")(e.into()))?;
        if sent < json.len() {
            stream
                .write_all(&json[sent..])
                .map_err(io_err("cannot send to the shim"))?;
        }
        stream
            .shutdown(std::net::Shutdown::Write)
            .map_err(io_err("cannot send to the shim"))?;
        let mut buf = Vec::new();
        stream
            .read_to_end(&mut buf)
            .map_err(io_err("cannot read the shim's answer"))?;
        match serde_json::from_slice(&buf) {
            Ok(Response::Error(e)) => Err(ClientError::Shim(e)),
            Ok(r) => Ok(r),
            Err(_) if buf.is_empty() => Err(ClientError::Protocol(
                "the shim closed the connection".into(),
            )),
            Err(e) => Err(ClientError::Protocol(e.to_string())),
        }
    }

    /// The init's host pid and whether the sandbox runs.
    pub fn state(&self) -> Result<(i32, SandboxStatus)> {
        match self.call(&Request::State, &[])? {
            Response::State { pid, status } => Ok((pid, status)),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Pidfds of the sandbox's init and of its shim, to watch both without polling: the init's
    /// exit ends the sandbox, and so does the shim's death. Fails when the sandbox is not
    /// running. The init is the shim's child (libcontainer clones it with CLONE_PARENT); the
    /// state is asked again after both are open, so a pid reused in between is caught.
    pub fn watch_fds(&self) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
        let (pid, status) = self.state()?;
        if !matches!(status, SandboxStatus::Running) {
            return Err(ClientError::Shim("the sandbox is not running".into()));
        }
        let init = pidfd_open(pid).map_err(io_err("cannot open the init's pidfd"))?;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_err(io_err("cannot read the init's parent"))?;
        let ppid: i32 = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| ClientError::Shim("cannot read the init's parent".into()))?;
        let shim = pidfd_open(ppid).map_err(io_err("cannot open the shim's pidfd"))?;
        match self.state()? {
            (p, SandboxStatus::Running) if p == pid => Ok((init, shim)),
            _ => Err(ClientError::Shim(
                "the sandbox exited while attaching".into(),
            )),
        }
    }

    /// Blocks until the sandbox's command exits.
    pub fn wait(&self) -> Result<ExitStatus> {
        match self.call(&Request::Wait, &[])? {
            Response::Exited(s) => Ok(s),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Sends signal `signal` to the sandbox's init.
    pub fn kill(&self, signal: i32) -> Result<()> {
        match self.call(&Request::Kill { signal }, &[])? {
            Response::Ok => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Asks the init to hibernate the command (see [`Request::Hibernate`]); returns at once,
    /// [`ShimClient::asleep`] says when it is done.
    pub fn hibernate(&self) -> Result<()> {
        match self.call(&Request::Hibernate, &[])? {
            Response::Ok => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Asks the init to start the hibernated command again.
    pub fn wake(&self) -> Result<()> {
        match self.call(&Request::Wake, &[])? {
            Response::Ok => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Whether the command is hibernated (stopped, reaped, not started again).
    pub fn asleep(&self) -> Result<bool> {
        match self.call(&Request::Asleep, &[])? {
            Response::Asleep(a) => Ok(a),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Starts a process in the running sandbox with the given stdio; returns its exec id.
    pub fn exec(
        &self,
        req: ExecRequest,
        stdin: BorrowedFd<'_>,
        stdout: BorrowedFd<'_>,
        stderr: BorrowedFd<'_>,
    ) -> Result<u64> {
        match self.call(&Request::Exec(req), &[stdin, stdout, stderr])? {
            Response::ExecStarted { exec_id, .. } => Ok(exec_id),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Sends `signal` to exec'd process `exec_id` (nothing if it already exited).
    pub fn kill_exec(&self, exec_id: u64, signal: i32) -> Result<()> {
        match self.call(&Request::KillExec { exec_id, signal }, &[])? {
            Response::Ok => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Blocks until exec `exec_id` exits.
    pub fn wait_exec(&self, exec_id: u64) -> Result<ExitStatus> {
        match self.call(&Request::WaitExec { exec_id }, &[])? {
            Response::Exited(s) => Ok(s),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Runs a command in the sandbox to completion, capturing its stdout and stderr.
    pub fn exec_output(&self, req: ExecRequest) -> Result<(ExitStatus, Vec<u8>, Vec<u8>)> {
        let null = File::open("/dev/null").map_err(io_err("cannot open /dev/null"))?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let id = {
            let r = self.exec(
                req,
                std::os::fd::AsFd::as_fd(&null),
                std::os::fd::AsFd::as_fd(&out_w),
                std::os::fd::AsFd::as_fd(&err_w),
            );
            drop(out_w);
            drop(err_w);
            r?
        };
        // Read both pipes on two threads so neither can fill up and stall the process.
        let t = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = File::from(err_r).read_to_end(&mut v);
            v
        });
        let mut out = Vec::new();
        let _ = File::from(out_r).read_to_end(&mut out);
        let err = t.join().unwrap_or_default();
        let status = self.wait_exec(id)?;
        Ok((status, out, err))
    }

    /// Current resource usage of the sandbox.
    pub fn stats(&self) -> Result<Stats> {
        match self.call(&Request::Stats, &[])? {
            Response::Stats(s) => Ok(s),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Kills the sandbox if it runs and removes all of it; the shim exits.
    pub fn delete(&self) -> Result<()> {
        match self.call(&Request::Delete, &[])? {
            Response::Ok => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| io_err("cannot create a pipe")(e.into()))
}

fn pidfd_open(pid: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags, no pointers; a non-negative result is a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: fd was just returned by pidfd_open and is owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}
