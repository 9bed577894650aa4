//! What runs inside the sandbox once libcontainer has set it up: the libcontainer `Executor`s.
//!
//! libcontainer calls [`SandboxExecutor::exec`] in the container's first process after
//! namespaces, mounts, cgroups, capabilities and no_new_privs are in place, just before the
//! workload would be exec'd. There we install the seccomp filter (so it covers everything that
//! follows) and then:
//!
//! - for the sandbox's main process, become a real PID 1: fork the command, reap every zombie in
//!   the pid namespace, forward SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to the command, and
//!   exit with its status (128+N when a signal killed it). A plain command as PID 1 would ignore
//!   SIGTERM and leave zombies behind (MACHINE.md);
//! - hibernate the command on request: [`hibernate_signal`] makes PID 1 stop it (SIGTERM, and
//!   SIGKILL if it comes again while the command still runs) and, once it is reaped, stay with
//!   the rest of the sandbox instead of exiting; [`wake_signal`] starts it again with the same
//!   arguments and environment. PID 1 takes both only from outside the sandbox (a `kill` from
//!   the host's pid namespace: `si_code` SI_USER and no sender pid in ours), and says that the
//!   command sleeps by its own name ([`asleep`]), which no process in the sandbox can change;
//! - for a process exec'd into a running sandbox, exec the command directly.
//!
//! This code runs in a process that libcontainer forked from the single-threaded shim, so
//! `fork` here is safe: there are no other threads whose locks could be held.

use std::ffi::CString;
use std::process;

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::errno::Errno;
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{execvp, fork, ForkResult, Pid};

use crate::seccomp::CompiledProfile;
use crate::spec::IDLE_ARGS;

/// Signals PID 1 passes on to the command.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// The signal that hibernates the command (see the module's doc).
pub fn hibernate_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

/// The signal that starts a hibernated command again.
pub fn wake_signal() -> i32 {
    libc::SIGRTMIN() + 2
}

/// PID 1's name (its `comm`) while the command runs, and once a hibernation reaped it. Only the
/// process itself can change its own name.
const AWAKE_NAME: &[u8] = b"agentd-init\0";
const ASLEEP_NAME: &[u8] = b"agentd-asleep\0";

/// Whether the init with host pid `init_pid` has hibernated its command (reaped it, not started
/// it again).
pub fn asleep(init_pid: i32) -> std::io::Result<bool> {
    let comm = std::fs::read(format!("/proc/{init_pid}/comm"))?;
    Ok(comm.strip_suffix(b"\n").unwrap_or(&comm) == &ASLEEP_NAME[..ASLEEP_NAME.len() - 1])
}

fn set_name(name: &[u8]) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from the pointer;
    // both names are static, NUL-terminated and shorter.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
    }
}

/// Exit status used when the command could not be found (as shells do).
pub const EXIT_NOT_FOUND: i32 = 127;
/// Exit status used when the command was found but could not be executed.
pub const EXIT_CANNOT_EXEC: i32 = 126;

/// Which role the executor plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutorRole {
    /// The sandbox's first process: becomes the init (PID 1).
    Init,
    /// An extra process exec'd into a running sandbox; with an identity, it first enters the
    /// sandbox's user namespace (libcontainer's exec does not).
    Exec(Option<ExecIdentity>),
}

/// Who an exec'd process becomes inside the sandbox's user namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecIdentity {
    /// An fd (inherited from the shim, which keeps it open until the process is started) of
    /// the sandbox init's `/proc/<pid>/ns/user`.
    pub userns_fd: i32,
    /// Uid inside the sandbox.
    pub uid: u32,
    /// Gid inside the sandbox.
    pub gid: u32,
}

/// Enters the sandbox's user namespace as `id` and leaves the process with the capabilities
/// root inside gets ([`crate::spec::DEFAULT_CAPABILITIES`]) for uid 0, none otherwise.
///
/// libcontainer started this process as host root with the default capabilities plus
/// CAP_SYS_ADMIN (so that it may `setns` into the user namespace) in all the sandbox's other
/// namespaces. `setns` into a user namespace grants a full capability set *in it* and resets
/// the bounding set, so everything is narrowed again here, before seccomp goes on and the
/// command runs.
fn enter_user_namespace(id: ExecIdentity) -> Result<(), String> {
    use caps::{CapSet, Capability as Cap};
    // SAFETY: setns takes an fd and a flag; the fd is open (the shim holds it) and names a
    // user namespace. This process is single-threaded (libcontainer cloned it from the
    // single-threaded shim) and shares no fs struct, as setns(CLONE_NEWUSER) requires.
    if unsafe { libc::setns(id.userns_fd, libc::CLONE_NEWUSER) } != 0 {
        return Err(format!(
            "failed to join the sandbox's user namespace: {}",
            std::io::Error::last_os_error()
        ));
    }
    let gid = nix::unistd::Gid::from_raw(id.gid);
    let uid = nix::unistd::Uid::from_raw(id.uid);
    nix::unistd::setgroups(&[gid]).map_err(|e| format!("setgroups: {e}"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setresgid: {e}"))?;
    let keep: std::collections::HashSet<Cap> = if id.uid == 0 {
        crate::spec::DEFAULT_CAPABILITIES
            .iter()
            .filter_map(|c| format!("CAP_{c}").parse::<Cap>().ok())
            .collect()
    } else {
        std::collections::HashSet::new()
    };
    // The bounding set first (that needs CAP_SETPCAP, which we still have), then the ids
    // (setresuid to a non-zero uid clears permitted, effective and ambient), then the sets.
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| format!("bounding set: {e}"))?;
        }
    }
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setresuid: {e}"))?;
    caps::clear(None, CapSet::Ambient).map_err(|e| format!("ambient set: {e}"))?;
    caps::set(None, CapSet::Inheritable, &std::collections::HashSet::new())
        .map_err(|e| format!("inheritable set: {e}"))?;
    caps::set(None, CapSet::Effective, &keep).map_err(|e| format!("effective set: {e}"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|e| format!("permitted set: {e}"))?;
    Ok(())
}

/// The libcontainer executor for agentd sandboxes.
#[derive(Clone)]
pub struct SandboxExecutor {
    /// The compiled seccomp filters, built in the shim before the container is created so that
    /// nothing is parsed inside the sandbox.
    seccomp: CompiledProfile,
    /// Init or exec.
    role: ExecutorRole,
}

impl SandboxExecutor {
    /// An executor that installs `seccomp` and runs the process in `role`.
    pub fn new(seccomp: CompiledProfile, role: ExecutorRole) -> Self {
        SandboxExecutor { seccomp, role }
    }
}

fn args_of(spec: &Spec) -> Result<Vec<CString>, ExecutorError> {
    let args = spec
        .process()
        .as_ref()
        .and_then(|p| p.args().as_ref())
        .ok_or(ExecutorError::InvalidArg)?;
    if args.is_empty() {
        return Err(ExecutorError::InvalidArg);
    }
    args.iter()
        .map(|a| {
            CString::new(a.as_bytes())
                .map_err(|_| ExecutorError::Other(format!("argument {a:?} contains a NUL byte")))
        })
        .collect()
}

/// Replaces the process with `args`, or exits 127/126 with a message on stderr.
fn exec_or_exit(args: &[CString]) -> ! {
    let err = match execvp(&args[0], args) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    let cmd = args[0].to_string_lossy();
    eprintln!("agentd: cannot run {cmd:?} in the sandbox: {}", err.desc());
    let code = if matches!(err, Errno::ENOENT | Errno::ENOTDIR) {
        EXIT_NOT_FOUND
    } else {
        EXIT_CANNOT_EXEC
    };
    process::exit(code)
}

/// Closes every fd but stdin, stdout and stderr.
fn close_inherited_fds() {
    // SAFETY: close_range only closes descriptors; fds 0-2 stay, and no Rust object of this
    // process refers to a higher fd afterwards (libcontainer is done with its channels once it
    // calls the executor, and this process never returns to it).
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    }
}

/// The shim blocks signals it handles through a signalfd, and the mask is inherited through
/// clone and exec: the command must start with nothing blocked.
fn unblock_all_signals() {
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// Converts a wait status into a shell-style exit code.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// The signals PID 1 waits for (blocked, then taken with `sigwaitinfo`).
struct Signals(libc::sigset_t);

impl Signals {
    /// The forwarded ones, SIGCHLD, and hibernate and wake.
    fn init() -> Signals {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set it is given; sigaddset only sets a bit in it
        // (every number here is a valid signal, so neither can fail).
        let set = unsafe {
            libc::sigemptyset(set.as_mut_ptr());
            let mut set = set.assume_init();
            for s in FORWARDED {
                libc::sigaddset(&mut set, s as i32);
            }
            libc::sigaddset(&mut set, libc::SIGCHLD);
            libc::sigaddset(&mut set, hibernate_signal());
            libc::sigaddset(&mut set, wake_signal());
            set
        };
        Signals(set)
    }

    /// Blocks them, so that none is lost between a fork and the wait.
    fn block(&self) -> Result<(), Errno> {
        // SAFETY: the set is initialised and the old mask is not asked for.
        Errno::result(unsafe {
            libc::sigprocmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut())
        })
        .map(drop)
    }

    /// The next one: its number, and whether a process outside the sandbox sent it with
    /// `kill` (the only senders trusted with hibernate and wake).
    fn wait(&self) -> Result<(i32, bool), Errno> {
        let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::zeroed();
        // SAFETY: sigwaitinfo writes one siginfo_t into the buffer it is given.
        let signo = Errno::result(unsafe { libc::sigwaitinfo(&self.0, info.as_mut_ptr()) })?;
        // SAFETY: sigwaitinfo succeeded, so it filled the siginfo_t (zeroed before anyway).
        let info = unsafe { info.assume_init() };
        // SAFETY: si_pid reads the union's sender pid, which SI_USER signals carry. A sender in
        // an ancestor pid namespace shows as 0; rt_sigqueueinfo may not forge SI_USER (the
        // kernel refuses si_code >= 0 for another process).
        let outside = info.si_code == libc::SI_USER && unsafe { info.si_pid() } == 0;
        Ok((signo, outside))
    }
}

/// Forks and execs the command; its pid, or `None` (said on stderr) when fork fails.
fn spawn(args: &[CString]) -> Option<Pid> {
    // SAFETY: PID 1 was created by libcontainer's clone from the single-threaded shim and
    // never starts a thread, so no lock (malloc, env, stdio) can be held by another thread
    // across the fork.
    match unsafe { fork() } {
        Err(e) => {
            eprintln!("agentd: cannot start the command: {e}");
            None
        }
        Ok(ForkResult::Child) => {
            unblock_all_signals();
            exec_or_exit(args)
        }
        Ok(ForkResult::Parent { child }) => Some(child),
    }
}

/// Signals that end a sandbox whose command sleeps.
fn ends(sig: i32) -> bool {
    [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT].contains(&sig)
}

/// PID 1's loop: reap everything, forward signals to the command, exit with its status; or,
/// hibernated, keep the sandbox until the command is woken (see the module's doc).
fn run_init(args: &[CString], mut child: Option<Pid>, set: &Signals) -> ! {
    set_name(AWAKE_NAME);
    // A hibernate asked while the command still runs (it was sent SIGTERM, then SIGKILL).
    let mut stopping = false;
    // A wake asked meanwhile: the command starts again as soon as it is reaped.
    let mut wake_after = false;
    loop {
        let (sig, outside) = match set.wait() {
            Ok(s) => s,
            Err(Errno::EINTR) => continue,
            Err(_) => process::exit(EXIT_CANNOT_EXEC),
        };
        if sig == hibernate_signal() {
            if let (true, Some(c)) = (outside, child) {
                let how = if stopping {
                    Signal::SIGKILL
                } else {
                    Signal::SIGTERM
                };
                stopping = true;
                wake_after = false;
                let _ = kill(c, how);
            }
            continue;
        }
        if sig == wake_signal() {
            if outside {
                match child {
                    None => {
                        child = spawn(args);
                        if child.is_some() {
                            set_name(AWAKE_NAME);
                        }
                    }
                    Some(_) => wake_after = stopping,
                }
            }
            continue;
        }
        if sig != libc::SIGCHLD {
            match child {
                Some(c) => {
                    if ends(sig) {
                        // A stop wins over a hibernation under way.
                        stopping = false;
                        wake_after = false;
                    }
                    if let Ok(s) = Signal::try_from(sig) {
                        // The child may already be gone; then there is nothing to forward to.
                        let _ = kill(c, s);
                    }
                }
                None if ends(sig) => process::exit(128 + sig),
                None => {}
            }
            continue;
        }
        // Reap every exited process: orphans re-parented to us and, eventually, the command.
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => {
                    if child.is_some() && status.pid() == child {
                        if let Some(code) = exit_code(status) {
                            if !stopping {
                                // Leaving PID 1 makes the kernel kill whatever is left in the
                                // namespace, so nothing outlives the command.
                                process::exit(code);
                            }
                            stopping = false;
                            child = if wake_after { spawn(args) } else { None };
                            wake_after = false;
                            if child.is_none() {
                                set_name(ASLEEP_NAME);
                            }
                        }
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
    }
}

/// PID 1 of an idle sandbox: reap everything until SIGTERM or SIGINT, then exit 0 (leaving PID
/// 1 makes the kernel kill the rest of the namespace).
fn run_idle(set: &Signals) -> ! {
    loop {
        match set.wait() {
            Ok((libc::SIGTERM | libc::SIGINT, _)) => process::exit(0),
            Ok((libc::SIGCHLD, _)) => loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                    Ok(_) | Err(Errno::EINTR) => continue,
                    Err(_) => break,
                }
            },
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => process::exit(EXIT_CANNOT_EXEC),
        }
    }
}

impl Executor for SandboxExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let args = args_of(spec)?;
        match self.role {
            ExecutorRole::Exec(identity) => {
                unblock_all_signals();
                // A session (and process group) of its own: a kill of the exec (its timeout,
                // its client gone) reaches the children it started too. Fails only for a
                // group leader, which this fresh process is not.
                let _ = nix::unistd::setsid();
                // A terminal on stdin (an interactive exec: the caller opened it in the
                // sandbox's own devpts) becomes the session's controlling terminal, for job
                // control, ^C and hangup.
                if nix::unistd::isatty(0).unwrap_or(false) {
                    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal it from another
                    // session) and touches no memory of ours; fd 0 is open.
                    unsafe {
                        libc::ioctl(0, libc::TIOCSCTTY, 0);
                    }
                }
                if let Some(id) = identity {
                    enter_user_namespace(id).map_err(ExecutorError::Other)?;
                }
                self.seccomp
                    .install()
                    .map_err(|e| ExecutorError::Execution(Box::new(e)))?;
                exec_or_exit(&args)
            }
            ExecutorRole::Init => {
                let set = Signals::init();
                // Block the signals before forking so none is lost between fork and sigwait;
                // the child unblocks everything before exec.
                set.block()
                    .map_err(|e| ExecutorError::Other(format!("failed to block signals: {e}")))?;
                // PID 1 runs the shim's code and never execs, so it still holds every fd the shim
                // had (its socket, the event pipe). Close them, and make PID 1 non-dumpable, so
                // that no process in the sandbox can reach them through /proc/1/fd or read PID
                // 1's memory.
                close_inherited_fds();
                // SAFETY: prctl(PR_SET_DUMPABLE, 0) only clears a flag of this process.
                unsafe {
                    libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
                }
                // The filter goes on PID 1 too: it runs our code, but every process in the
                // sandbox can signal it, so it gets the same restrictions.
                self.seccomp
                    .install()
                    .map_err(|e| ExecutorError::Execution(Box::new(e)))?;
                if args.len() == IDLE_ARGS.len()
                    && args
                        .iter()
                        .zip(IDLE_ARGS)
                        .all(|(a, b)| a.as_bytes() == b.as_bytes())
                {
                    run_idle(&set)
                }
                match spawn(&args) {
                    None => Err(ExecutorError::Other("failed to fork the command".into())),
                    Some(child) => run_init(&args, Some(child), &set),
                }
            }
        }
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        args_of(spec)
            .map(|_| ())
            .map_err(|e| ExecutorValidationError::ArgValidationError(e.to_string()))
    }
}
