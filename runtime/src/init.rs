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

fn forwarded_and_chld() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// Converts a wait status into a shell-style exit code.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// PID 1's loop: reap everything, forward signals to `child`, exit with `child`'s status.
fn run_init(child: Pid, set: &SigSet) -> ! {
    loop {
        let sig = match set.wait() {
            Ok(s) => s,
            Err(Errno::EINTR) => continue,
            Err(_) => process::exit(EXIT_CANNOT_EXEC),
        };
        if sig != Signal::SIGCHLD {
            // The child may already be gone; then there is nothing to forward to.
            let _ = kill(child, sig);
            continue;
        }
        // Reap every exited process: orphans re-parented to us and, eventually, the command.
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => {
                    if status.pid() == Some(child) {
                        if let Some(code) = exit_code(status) {
                            // Leaving PID 1 makes the kernel kill whatever is left in the
                            // namespace, so nothing outlives the command.
                            process::exit(code);
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
fn run_idle(set: &SigSet) -> ! {
    loop {
        match set.wait() {
            Ok(Signal::SIGTERM | Signal::SIGINT) => process::exit(0),
            Ok(Signal::SIGCHLD) => loop {
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
                let set = forwarded_and_chld();
                // Block the signals before forking so none is lost between fork and sigwait;
                // the child unblocks everything before exec.
                nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&set), None)
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
                // SAFETY: this process was created by libcontainer's clone from the
                // single-threaded shim and has started no threads, so no lock (malloc, env,
                // stdio) can be held by another thread across the fork.
                match unsafe { fork() } {
                    Err(e) => Err(ExecutorError::Other(format!(
                        "failed to fork the command: {e}"
                    ))),
                    Ok(ForkResult::Child) => {
                        unblock_all_signals();
                        exec_or_exit(&args)
                    }
                    Ok(ForkResult::Parent { child }) => run_init(child, &set),
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
