//! The private protocol between the runtime library and its own `agentd-shim` binary.
//!
//! One request per connection on the shim's Unix socket: the client sends one JSON object (with
//! file descriptors attached via SCM_RIGHTS for `Exec`), half-closes, and reads one JSON reply.
//! This is not a public wire format: both ends ship in the same binary release.
//!
//! The shim also reports its progress to whoever started it as JSON lines on an inherited pipe
//! ([`ShimEvent`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cgroups::Stats;
use crate::spec::SandboxSpec;

/// Where the sandbox's stdio goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StdioConfig {
    /// The shim's own stdin/stdout/stderr (used by `agentd run`).
    Inherit,
    /// Append stdout and stderr to these files; stdin is /dev/null.
    Files {
        /// File for the sandbox's stdout.
        stdout: PathBuf,
        /// File for the sandbox's stderr.
        stderr: PathBuf,
    },
}

/// Everything the shim needs, written to `sandbox.json` in the sandbox's state dir.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimConfig {
    /// Sandbox id (also the container id and the cgroup name).
    pub id: String,
    /// Root filesystem of the sandbox (for `layers`, the overlay mount point).
    pub rootfs: PathBuf,
    /// Image layer dirs, topmost first: the shim mounts them as an overlay at `rootfs` and
    /// unmounts it when the sandbox is deleted. Empty: `rootfs` is a plain directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<PathBuf>,
    /// The sandbox.
    pub spec: SandboxSpec,
    /// Cgroup parent under every controller.
    pub cgroup_parent: String,
    /// Stdio of the sandbox's command.
    pub stdio: StdioConfig,
    /// Foreground: stay in the caller's session, remove everything when the command exits and
    /// exit with its status. Otherwise: detach, keep the exit status until asked to delete.
    pub foreground: bool,
    /// Seconds between SIGTERM and SIGKILL when the shim is asked to stop the sandbox.
    pub stop_timeout_secs: u64,
}

/// How a sandbox (or an exec'd process) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Shell-style status: the exit code, or 128+N when signal N killed it.
    pub code: i32,
    /// The kernel's OOM killer killed a process of the sandbox.
    pub oom_killed: bool,
}

/// A request to the shim.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// The sandbox's state.
    State,
    /// Wait until the sandbox's command exits; the reply comes then.
    Wait,
    /// Send a signal to the sandbox's init (which forwards SIGTERM/SIGINT to the command).
    Kill {
        /// Signal number.
        signal: i32,
    },
    /// Hibernate the command: the init stops it (SIGTERM; SIGKILL when asked again while it
    /// still runs) and keeps the sandbox, its other processes and its namespaces.
    Hibernate,
    /// Start the hibernated command again (the same arguments and environment).
    Wake,
    /// Whether the command is hibernated (stopped and reaped); the reply is `Asleep`.
    Asleep,
    /// Start a process in the running sandbox. Three fds (stdin, stdout, stderr) are attached.
    Exec(ExecRequest),
    /// Wait until an exec'd process exits.
    WaitExec {
        /// The id `Exec` returned.
        exec_id: u64,
    },
    /// Send a signal to an exec'd process (until it is reaped, its pid cannot be reused).
    KillExec {
        /// The id `Exec` returned.
        exec_id: u64,
        /// Signal number.
        signal: i32,
    },
    /// Current resource usage.
    Stats,
    /// Kill whatever runs, remove cgroups, container state and the state dir; the shim exits.
    Delete,
}

/// A process to start in a running sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Command and arguments.
    pub args: Vec<String>,
    /// Extra environment, `KEY=VALUE`, on top of the sandbox's.
    pub env: Vec<String>,
    /// Working directory; the sandbox's when absent.
    pub cwd: Option<PathBuf>,
    /// Uid inside the sandbox; the sandbox's when absent.
    pub uid: Option<u32>,
}

/// Lifecycle state of a sandbox as the shim sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxStatus {
    /// The command runs.
    Running,
    /// The command exited.
    Exited(ExitStatus),
}

/// The shim's reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    /// Reply to `State`.
    State {
        /// Host pid of the sandbox's init.
        pid: i32,
        /// Running or exited.
        status: SandboxStatus,
    },
    /// Reply to `Wait` and `WaitExec`.
    Exited(ExitStatus),
    /// Reply to `Exec`.
    ExecStarted {
        /// Handle for `WaitExec`.
        exec_id: u64,
        /// Host pid of the process.
        pid: i32,
    },
    /// Reply to `Stats`.
    Stats(Stats),
    /// Reply to `Asleep`.
    Asleep(bool),
    /// The request was carried out.
    Ok,
    /// The request failed.
    Error(String),
}

/// Progress the shim reports on its event pipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ShimEvent {
    /// The sandbox runs; `pid` is its init on the host.
    Started {
        /// Host pid of the sandbox's init.
        pid: i32,
    },
    /// The sandbox could not be created; nothing of it is left.
    Failed {
        /// What went wrong, with its causes.
        error: String,
    },
    /// The command exited (foreground mode only; afterwards everything is removed).
    Exited(ExitStatus),
}
