//! `agentd-shim`: the per-sandbox supervisor. Started by the runtime library (never by hand) as
//! `agentd-shim --config <state dir>/sandbox.json [--foreground]` with an event pipe on fd 3.
//!
//! It stays single-threaded on purpose: libcontainer forks and runs Rust code in the child,
//! which deadlocks when another thread holds a lock (MACHINE.md). No tokio, no threads.

use std::fs::{File, OpenOptions};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use agentd_runtime::{layout, shim};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::unistd::{fork, setsid, ForkResult};

fn usage() -> ExitCode {
    eprintln!("usage: agentd-shim --config <state dir>/sandbox.json [--foreground] (started by agentd, not by hand)");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let mut config: Option<PathBuf> = None;
    let mut foreground = false;
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--config") => config = args.next().map(PathBuf::from),
            Some("--foreground") => foreground = true,
            _ => return usage(),
        }
    }
    let Some(config) = config else { return usage() };

    // The event pipe must be fd 3, given by the starter.
    if nix::fcntl::fcntl(3, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        eprintln!("agentd-shim: no event pipe on fd 3 (started by agentd, not by hand)");
        return ExitCode::from(2);
    }
    // SAFETY: fd 3 was checked open just above, and nothing else in this process owns it.
    let events = unsafe { File::from_raw_fd(3) };

    if foreground {
        // If the starter (`agentd run`) is killed outright, stop the sandbox as on Ctrl-C
        // rather than let it run on unattended. SIGTERM is taken through the signalfd.
        let parent = nix::unistd::getppid();
        // SAFETY: prctl(PR_SET_PDEATHSIG, SIGTERM) only sets a flag of this process.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
        }
        if nix::unistd::getppid() != parent {
            // The starter died before the flag was set.
            let _ = nix::sys::signal::raise(Signal::SIGTERM);
        }
    }
    if !foreground {
        // Leave the starter's process and session: the fork's parent exits at once (the starter
        // reaps it), the child becomes a session leader re-parented to init, so the sandbox
        // survives the death of whoever started it.
        // SAFETY: the process is single-threaded here (no thread was ever started).
        match unsafe { fork() } {
            Ok(ForkResult::Parent { .. }) => return ExitCode::SUCCESS,
            Ok(ForkResult::Child) => {}
            Err(e) => {
                eprintln!("agentd-shim: fork failed: {e}");
                return ExitCode::from(1);
            }
        }
        let _ = setsid();
    }

    let filter = |default: &str| {
        tracing_subscriber::EnvFilter::try_from_env("AGENTD_SHIM_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
    };
    if foreground {
        // The state dir (and a log file in it) is gone when `agentd run` returns, and failures
        // reach the user through the event pipe: only errors go to the user's stderr.
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter("error"))
            .init();
    } else {
        let dir = config.parent().map(PathBuf::from).unwrap_or_default();
        if let Ok(log) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(layout::SHIM_LOG))
        {
            tracing_subscriber::fmt()
                .with_writer(std::sync::Mutex::new(log))
                .with_env_filter(filter("info"))
                .with_ansi(false)
                .init();
        }
    }

    // Dispositions survive exec: a starter that ignored SIGINT would make the sandbox ignore it
    // too. Reset to default, then block: the shim takes these through a signalfd.
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        // SAFETY: installing SIG_DFL runs no handler code, so no async-signal-safety concern.
        let _ = unsafe { signal(s, SigHandler::SigDfl) };
    }
    // SAFETY: as above; SIG_IGN for SIGPIPE makes a vanished client an EPIPE, not a shim death.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) };
    if let Err(e) = shim::block_signals() {
        eprintln!("agentd-shim: cannot block signals: {e}");
        return ExitCode::from(1);
    }
    // Become the reaper of anything in the sandbox that gets re-parented (exec'd processes).
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) only sets a flag on this process.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }

    let code = shim::main(&config, events);
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1))
}
