//! agentd-runtime: isolated, limited sandboxes from a root filesystem.
//!
//! Given a rootfs directory and a [`SandboxSpec`], start a process in a sandbox that a hostile
//! workload cannot escape or starve the host from, and remove everything afterwards. Built on
//! youki's libcontainer, which only ever runs inside the single-threaded `agentd-shim`. This
//! crate knows nothing of images, HTTP or tokio.
//!
//! Layout (the private modules are the runtime's own business: agentd and CI runners use the
//! public ones):
//! - [`spec`]: the typed `SandboxSpec` and its OCI form (namespaces, limits, mounts, caps).
//! - `seccomp` (private): the reviewed profile data in `runtime/profiles/`, compiled with
//!   seccompiler.
//! - `init` (private): what runs inside: seccomp install and the sandbox's PID 1.
//! - [`cgroups`]: where cgroups live (v1 or v2), stats and OOM kills read back, leftover removal.
//! - [`shim`]: the per-sandbox supervisor behind the `agentd-shim` binary.
//! - [`client`]: start shims and talk to them ([`Runtime`], [`ShimClient`]).
//! - `proto` (private): the shim protocol; its public types are re-exported below.
//! - `rootfs`, `netns` (private): the overlay rootfs and the sandbox's network namespace.
//! - [`disk`]: the bounded writable layer (a sparse ext4 image on a loop device).
//! - [`netlink`]: the links agentd's bridge needs.
//! - [`tree`]: removing a tree a sandbox wrote (iterative, any depth, no symlink followed).

pub mod cgroups;
pub mod client;
pub mod disk;
mod init;
pub mod netlink;
mod netns;
mod proto;
mod rootfs;
mod seccomp;
pub mod shim;
pub mod spec;
pub mod tree;

pub use cgroups::{CgroupVersion, SandboxCgroup, Stats};
pub use client::{ClientError, ForegroundSandbox, Runtime, ShimClient};
pub use proto::{ExecRequest, ExitStatus, SandboxStatus, StdioConfig};
pub use rootfs::Rootfs;
pub use spec::{
    parse_size, BindMount, IdMap, Limits, NetworkMode, SandboxSpec, SeccompProfile, VethConfig,
    DEFAULT_ID_RANGE,
};

/// Names of the files in a sandbox's state dir, all owned by its shim.
pub mod layout {
    /// The shim's configuration (`ShimConfig`), written by the starter.
    pub const CONFIG: &str = "sandbox.json";
    /// The OCI bundle dir (holds `config.json`).
    pub const BUNDLE: &str = "bundle";
    /// libcontainer's state root.
    pub const LIBCONTAINER: &str = "lc";
    /// The shim's Unix socket.
    pub const SOCKET: &str = "shim.sock";
    /// The exit status once the command exited.
    pub const EXIT: &str = "exit.json";
    /// The shim's own log.
    pub const SHIM_LOG: &str = "shim.log";
    /// Default stdout file of a background sandbox.
    pub const STDOUT: &str = "stdout.log";
    /// Default stderr file of a background sandbox.
    pub const STDERR: &str = "stderr.log";
    /// Mount point of an overlay rootfs made from image layers.
    pub const ROOTFS: &str = "rootfs";
    /// Upper and work dirs of an overlay rootfs (the mount point of the disk, when limited).
    pub const OVERLAY: &str = "overlay";
    /// The sparse ext4 image behind the overlay's upper dir of a sandbox with a disk limit.
    pub const DISK_IMAGE: &str = "disk.img";
}

/// Formats an error with all its causes: `outer: cause: root cause`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let msg = e.to_string();
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = e.source();
    }
    s
}
