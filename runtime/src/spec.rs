//! The typed sandbox description (`SandboxSpec`) and its translation into an OCI runtime spec.
//!
//! Everything a caller may choose about a sandbox is a field here; everything that is a security
//! default (namespaces, capabilities, masked paths, mounts of /proc, /sys, /dev, /tmp) is decided
//! in [`SandboxSpec::to_oci`] and cannot be turned off by the caller.

use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxIdMappingBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, ProcessBuilder, RootBuilder,
    Spec, SpecBuilder, UserBuilder,
};
use serde::{Deserialize, Serialize};

/// Errors from validating a [`SandboxSpec`] or building its OCI form.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The process has no command to run.
    #[error("the sandbox needs a command to run")]
    NoCommand,
    /// A sandbox id must be a short, path-safe name.
    #[error("invalid sandbox id {0:?}: use 1-64 characters from [a-zA-Z0-9_-]")]
    InvalidId(String),
    /// A path inside the sandbox must be absolute.
    #[error("{what} must be an absolute path inside the sandbox, got {path:?}")]
    NotAbsolute {
        /// Which field held the path.
        what: &'static str,
        /// The offending path.
        path: PathBuf,
    },
    /// An environment entry must have the form `KEY=VALUE`.
    #[error("invalid environment entry {0:?}: expected KEY=VALUE")]
    InvalidEnv(String),
    /// A limit is outside what the kernel or this project accepts.
    #[error("invalid limit: {0}")]
    InvalidLimit(String),
    /// The oci-spec builder refused a value.
    #[error("failed to build the OCI spec")]
    Oci(#[source] libcontainer::oci_spec::OciSpecError),
}

type Result<T> = std::result::Result<T, SpecError>;

impl From<libcontainer::oci_spec::OciSpecError> for SpecError {
    fn from(err: libcontainer::oci_spec::OciSpecError) -> Self {
        SpecError::Oci(err)
    }
}

/// The first host uid (and gid) that sandbox ids map to by default. Host ids below this are
/// reserved for real users and system accounts on common distributions (`/etc/subuid` starts
/// at 100000 by convention).
pub const DEFAULT_HOST_ID_BASE: u32 = 100_000;

/// How many host id ranges the runtime hands out (sandboxes of one state root at once).
pub const MAX_ID_RANGES: u32 = 1024;

/// How many ids a sandbox's user namespace maps: 0..65535 inside, like a normal system.
pub const DEFAULT_ID_RANGE: u32 = 65_536;

/// The default cpu period for cpu quotas, in microseconds (the kernel's default).
pub const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

/// The PATH a sandbox process gets when the caller sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One user namespace mapping: `size` ids starting at `inside` map to ids starting at `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    /// First id inside the sandbox.
    pub inside: u32,
    /// First id on the host.
    pub host: u32,
    /// Number of ids mapped.
    pub size: u32,
}

impl IdMap {
    /// Whether the host ids of `self` and `other` overlap.
    pub fn overlaps(&self, other: &IdMap) -> bool {
        let end = |m: &IdMap| u64::from(m.host) + u64::from(m.size);
        u64::from(self.host) < end(other) && u64::from(other.host) < end(self)
    }

    /// The default mapping: root inside is `host_base` on the host, for [`DEFAULT_ID_RANGE`] ids.
    pub fn unprivileged(host_base: u32) -> Self {
        IdMap {
            inside: 0,
            host: host_base,
            size: DEFAULT_ID_RANGE,
        }
    }
}

/// Resource limits enforced through the sandbox's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory limit in bytes; the sandbox is OOM-killed above it.
    pub memory_bytes: Option<u64>,
    /// Swap the sandbox may use on top of `memory_bytes`, in bytes (default 0: no swap).
    pub swap_bytes: Option<u64>,
    /// CPU quota in cores (0.5 = half a core), enforced as quota per [`DEFAULT_CPU_PERIOD_US`].
    pub cpus: Option<f64>,
    /// Maximum number of tasks (processes and threads) in the sandbox.
    pub pids: Option<u64>,
    /// Size of the writable layer of an image rootfs, in bytes (see [`crate::disk`]); what the
    /// sandbox writes beyond it (or beyond its inodes) fails with ENOSPC. None: unbounded.
    /// Not enforced for a directory rootfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
}

/// The smallest memory limit accepted: below this even a shell cannot start.
pub const MIN_MEMORY_BYTES: u64 = 4 * 1024 * 1024;

impl Limits {
    /// Checks that every limit is one the kernel accepts and that makes sense.
    pub fn validate(&self) -> Result<()> {
        if let Some(mem) = self.memory_bytes {
            if mem < MIN_MEMORY_BYTES {
                return Err(SpecError::InvalidLimit(format!(
                    "memory limit {mem} bytes is below the minimum of {MIN_MEMORY_BYTES} bytes (4m)"
                )));
            }
            if i64::try_from(mem).is_err() {
                return Err(SpecError::InvalidLimit(format!(
                    "memory limit {mem} is too large"
                )));
            }
        }
        if self.swap_bytes.is_some() && self.memory_bytes.is_none() {
            return Err(SpecError::InvalidLimit(
                "a swap limit needs a memory limit".into(),
            ));
        }
        if let Some(cpus) = self.cpus {
            if !(cpus.is_finite() && (0.01..=1024.0).contains(&cpus)) {
                return Err(SpecError::InvalidLimit(format!(
                    "cpus must be between 0.01 and 1024, got {cpus}"
                )));
            }
        }
        if let Some(pids) = self.pids {
            if pids == 0 || i64::try_from(pids).is_err() {
                return Err(SpecError::InvalidLimit(format!(
                    "pids must be at least 1, got {pids}"
                )));
            }
        }
        if let Some(disk) = self.disk_bytes {
            if disk < crate::disk::MIN_DISK_BYTES || i64::try_from(disk).is_err() {
                return Err(SpecError::InvalidLimit(format!(
                    "disk limit {disk} bytes is outside 16m..8e (16777216..2^63 bytes)"
                )));
            }
        }
        Ok(())
    }
}

/// Parses a human size such as `256m`, `2g`, `512k`, `1048576` or `1.5g` into bytes.
///
/// Suffixes are binary (k = 1024) and case-insensitive; an optional trailing `b`/`ib` is accepted.
pub fn parse_size(input: &str) -> std::result::Result<u64, String> {
    let s = input.trim().to_ascii_lowercase();
    let s = s
        .strip_suffix("ib")
        .or_else(|| s.strip_suffix('b'))
        .unwrap_or(&s);
    let (num, mult) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        Some('t') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let bad = || {
        format!("invalid size {input:?}: expected a number with an optional k, m, g or t suffix, like 256m")
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let value: f64 = num.parse().map_err(|_| bad())?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // range checked just above
    Ok(bytes as u64)
}

/// An extra bind mount from the host into the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    /// Host path (file or directory) to expose.
    pub source: PathBuf,
    /// Absolute path inside the sandbox; it must already exist in the rootfs.
    pub target: PathBuf,
    /// Mount read-only.
    pub readonly: bool,
}

/// The sandbox's network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkMode {
    /// A new, empty network namespace (loopback only). With a user namespace this is the only
    /// mode that works; agentd moves a veth in between create and start.
    #[default]
    New,
    /// Join an existing network namespace by path (e.g. `/run/netns/x`, made by `ip netns add`).
    /// The shim enters it before creating the sandbox, which inherits it; it stays owned by the
    /// host, so root inside cannot reconfigure it, and /sys is a read-only bind of the host's.
    Join(PathBuf),
    /// A new network namespace with a veth pair that the shim creates between create and
    /// start: `eth0` inside with this address, the host end on the caller's bridge.
    Veth(VethConfig),
}

impl NetworkMode {
    /// Whether the sandbox gets a network namespace of its own (owned by its user namespace).
    pub fn is_new(&self) -> bool {
        matches!(self, NetworkMode::New | NetworkMode::Veth(_))
    }
}

/// The veth pair of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VethConfig {
    /// Name of the host end (at most 15 bytes). It dies with the sandbox's network namespace.
    pub host: String,
    /// The bridge the host end joins, as an isolated port (`brport/isolated`).
    pub bridge: String,
    /// The sandbox's IPv4 address on it.
    pub address: std::net::Ipv4Addr,
    /// Prefix length of the subnet.
    pub prefix_len: u8,
    /// The default route's gateway (agentd's bridge address, for sandboxes whose traffic
    /// agentd forwards); `None`: routes to the subnet only, nothing beyond it.
    #[serde(default)]
    pub gateway: Option<std::net::Ipv4Addr>,
}

/// Which seccomp profile to install before the sandbox's command runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeccompProfile {
    /// The reviewed default profile in `runtime/profiles/default.json`.
    #[default]
    Default,
    /// A profile in the same format, read from this host path.
    File(PathBuf),
}

/// Everything the caller chooses about one sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Command and arguments; the first is looked up in the sandbox's PATH.
    pub args: Vec<String>,
    /// Environment as `KEY=VALUE`; PATH defaults to [`DEFAULT_PATH`].
    pub env: Vec<String>,
    /// Working directory inside the sandbox.
    pub cwd: PathBuf,
    /// Uid the process runs as, inside the sandbox.
    pub uid: u32,
    /// Gid the process runs as, inside the sandbox.
    pub gid: u32,
    /// Hostname inside the sandbox's UTS namespace.
    pub hostname: String,
    /// User namespace uid mapping; root inside must map to an unprivileged host uid. `None`:
    /// [`crate::Runtime`] gives the sandbox a host range no other sandbox of its state root uses.
    pub uid_map: Option<IdMap>,
    /// User namespace gid mapping; `None` as for `uid_map`.
    pub gid_map: Option<IdMap>,
    /// Cgroup limits.
    pub limits: Limits,
    /// Extra bind mounts.
    pub mounts: Vec<BindMount>,
    /// Network namespace.
    pub network: NetworkMode,
    /// Seccomp profile.
    pub seccomp: SeccompProfile,
    /// Mount the rootfs read-only (writable places are then /tmp, /dev/shm and binds).
    pub readonly_rootfs: bool,
    /// No command: PID 1 only reaps and waits for SIGTERM/SIGINT (then exits 0), and the
    /// sandbox lives until stopped; work is started in it with exec. `args` must be empty.
    #[serde(default)]
    pub idle: bool,
    /// Mark every process of the sandbox as mergeable by KSM (`PR_SET_MEMORY_MERGE`, Linux
    /// 6.4+): identical pages of sandboxes running the same program are then kept once by
    /// the kernel, once the host turned KSM on (`/sys/kernel/mm/ksm/run`). Off by default:
    /// page sharing between sandboxes opens timing side channels (a sandbox can learn
    /// whether another holds a page with given contents).
    #[serde(default)]
    pub memory_merge: bool,
}

/// The argument vector that tells the sandbox's init to run no command (see
/// [`SandboxSpec::idle`]). Never exec'd: the init recognises it.
pub const IDLE_ARGS: &[&str] = &["agentd-idle"];

impl SandboxSpec {
    /// A spec that runs `args` as root inside, with every default.
    pub fn new(args: Vec<String>) -> Self {
        SandboxSpec {
            args,
            env: Vec::new(),
            cwd: PathBuf::from("/"),
            uid: 0,
            gid: 0,
            hostname: "sandbox".into(),
            uid_map: None,
            gid_map: None,
            limits: Limits::default(),
            mounts: Vec::new(),
            network: NetworkMode::New,
            seccomp: SeccompProfile::Default,
            readonly_rootfs: true,
            idle: false,
            memory_merge: false,
        }
    }

    /// Checks the spec without touching the system.
    pub fn validate(&self) -> Result<()> {
        if self.idle {
            if !self.args.is_empty() {
                return Err(SpecError::InvalidLimit(
                    "an idle sandbox runs no command: give no args".into(),
                ));
            }
        } else if self.args.is_empty() || self.args[0].is_empty() {
            return Err(SpecError::NoCommand);
        }
        if !self.cwd.is_absolute() {
            return Err(SpecError::NotAbsolute {
                what: "the working directory",
                path: self.cwd.clone(),
            });
        }
        for e in &self.env {
            match e.split_once('=') {
                Some((k, _)) if !k.is_empty() => {}
                _ => return Err(SpecError::InvalidEnv(e.clone())),
            }
        }
        for m in &self.mounts {
            if !m.target.is_absolute() {
                return Err(SpecError::NotAbsolute {
                    what: "a bind mount target",
                    path: m.target.clone(),
                });
            }
        }
        let maps_root = |m: &Option<IdMap>| m.is_some_and(|m| m.host == 0 || m.size == 0);
        if maps_root(&self.uid_map) || maps_root(&self.gid_map) {
            return Err(SpecError::InvalidLimit(
                "root inside the sandbox must not map to root on the host".into(),
            ));
        }
        self.limits.validate()
    }

    /// The environment the process gets: the caller's entries plus a default PATH.
    pub fn effective_env(&self) -> Vec<String> {
        let mut env = self.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        env
    }

    /// Builds the OCI runtime spec for sandbox `id` with its root at `rootfs`.
    ///
    /// The cgroup is `/<cgroup_parent>/<id>` under every controller, so all of ours live under
    /// one project parent and can be found and removed by id.
    pub fn to_oci(&self, id: &str, rootfs: &Path, cgroup_parent: &str) -> Result<Spec> {
        self.validate()?;
        validate_id(id)?;

        let caps: std::collections::HashSet<Capability> =
            DEFAULT_CAPABILITIES.iter().copied().collect();
        let process = ProcessBuilder::default()
            .terminal(false)
            .args(if self.idle {
                IDLE_ARGS.iter().map(|a| a.to_string()).collect()
            } else {
                self.args.clone()
            })
            .env(self.effective_env())
            .cwd(self.cwd.clone())
            .user(UserBuilder::default().uid(self.uid).gid(self.gid).build()?)
            .no_new_privileges(true)
            .capabilities(
                LinuxCapabilitiesBuilder::default()
                    .bounding(caps.clone())
                    .effective(caps.clone())
                    .permitted(caps)
                    .inheritable(std::collections::HashSet::new())
                    .ambient(std::collections::HashSet::new())
                    .build()?,
            )
            .build()?;

        let mut namespaces = Vec::new();
        for typ in [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Cgroup,
            LinuxNamespaceType::User,
        ] {
            namespaces.push(LinuxNamespaceBuilder::default().typ(typ).build()?);
        }
        // A joined netns is entered by the shim before it creates the container, so the
        // sandbox inherits it: the kernel refuses a user-namespaced process setns into a netns
        // of the host's user namespace, and it stays owned by the host, so root inside has no
        // CAP_NET_ADMIN over it.
        if self.network.is_new() {
            namespaces.push(
                LinuxNamespaceBuilder::default()
                    .typ(LinuxNamespaceType::Network)
                    .build()?,
            );
        }

        let mut resources = LinuxResourcesBuilder::default().devices(vec![
            // Deny every device; libcontainer then allows exactly its default set
            // (null, zero, full, tty, random, urandom, pts, ptmx).
            LinuxDeviceCgroupBuilder::default()
                .allow(false)
                .access("rwm")
                .build()?,
        ]);
        if let Some(mem) = self.limits.memory_bytes {
            let limit = to_i64(mem)?;
            let swap = to_i64(mem.saturating_add(self.limits.swap_bytes.unwrap_or(0)))?;
            resources = resources.memory(
                LinuxMemoryBuilder::default()
                    .limit(limit)
                    .swap(swap)
                    .build()?,
            );
        }
        if let Some(cpus) = self.limits.cpus {
            #[allow(clippy::cast_possible_truncation)] // validated to 0.01..=1024 cores
            let quota = (cpus * DEFAULT_CPU_PERIOD_US as f64).round() as i64;
            resources = resources.cpu(
                LinuxCpuBuilder::default()
                    .quota(quota)
                    .period(DEFAULT_CPU_PERIOD_US)
                    .build()?,
            );
        }
        if let Some(pids) = self.limits.pids {
            resources = resources.pids(LinuxPidsBuilder::default().limit(to_i64(pids)?).build()?);
        }

        let map = |m: &IdMap| {
            LinuxIdMappingBuilder::default()
                .container_id(m.inside)
                .host_id(m.host)
                .size(m.size)
                .build()
        };
        // The runtime resolves unset maps before the spec reaches the shim; a spec built
        // directly falls back to the first range.
        let default_map = IdMap::unprivileged(DEFAULT_HOST_ID_BASE);
        let linux = LinuxBuilder::default()
            .namespaces(namespaces)
            .uid_mappings(vec![map(&self.uid_map.unwrap_or(default_map))?])
            .gid_mappings(vec![map(&self.gid_map.unwrap_or(default_map))?])
            .cgroups_path(PathBuf::from(format!("/{cgroup_parent}/{id}")))
            .resources(resources.build()?)
            .masked_paths(masked_paths(&self.network))
            .readonly_paths(
                READONLY_PATHS
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
            )
            .rootfs_propagation("private")
            .build()?;

        let mut mounts = default_mounts(&self.network)?;
        for m in &self.mounts {
            let mut options = vec!["rbind".to_string(), "nosuid".into(), "nodev".into()];
            if m.readonly {
                options.push("ro".into());
            }
            mounts.push(
                MountBuilder::default()
                    .destination(m.target.clone())
                    .typ("bind")
                    .source(m.source.clone())
                    .options(options)
                    .build()?,
            );
        }

        Ok(SpecBuilder::default()
            .version("1.0.2")
            .hostname(self.hostname.clone())
            .root(
                RootBuilder::default()
                    .path(rootfs.to_path_buf())
                    .readonly(self.readonly_rootfs)
                    .build()?,
            )
            .process(process)
            .mounts(mounts)
            .linux(linux)
            .build()?)
    }
}

fn to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| SpecError::InvalidLimit(format!("{v} is too large")))
}

/// Checks that `id` is usable as a file name and a cgroup name.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SpecError::InvalidId(id.to_string()))
    }
}

/// The capabilities root inside a sandbox keeps (all scoped to its user namespace). This is
/// Docker's default set without NET_RAW (raw sockets enable spoofing inside the bridge), MKNOD
/// (device nodes are useless in a user namespace) and AUDIT_WRITE (no audit inside).
pub const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::Setfcap,
    Capability::NetBindService,
    Capability::SysChroot,
];

/// /proc and /sys paths hidden from the sandbox (they leak host information or allow attacks).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
];

/// The masked paths for a sandbox: [`MASKED_PATHS`], plus the host's cgroup tree that a joined
/// netns's bind of /sys brings along.
fn masked_paths(network: &NetworkMode) -> Vec<String> {
    let mut paths: Vec<String> = MASKED_PATHS.iter().map(|s| s.to_string()).collect();
    if matches!(network, NetworkMode::Join(_)) {
        paths.push("/sys/fs/cgroup".into());
    }
    paths
}

/// /proc paths made read-only inside the sandbox.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount> {
    Ok(MountBuilder::default()
        .destination(PathBuf::from(dest))
        .typ(typ)
        .source(PathBuf::from(source))
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()?)
}

/// The fixed mounts of every sandbox: its own /proc, a read-only /sys, a private /dev with
/// devpts and shm, and a tmpfs /tmp.
fn default_mounts(network: &NetworkMode) -> Result<Vec<Mount>> {
    // sysfs can only be mounted from a user namespace that owns the netns; in a joined (host
    // owned) netns, bind the host's /sys read-only instead. It must be a recursive bind (the
    // kernel refuses to split off locked submounts); /sys/fs/cgroup is then masked.
    let sys = match network {
        NetworkMode::New | NetworkMode::Veth(_) => mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        NetworkMode::Join(_) => mount(
            "/sys",
            "bind",
            "/sys",
            &["rbind", "nosuid", "noexec", "nodev", "ro"],
        )?,
    };
    Ok(vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        sys,
        mount("/tmp", "tmpfs", "tmpfs", &["nosuid", "nodev", "mode=1777"])?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_size(input: &str, expected: Option<u64>) {
        assert_eq!(parse_size(input).ok(), expected, "parse_size({input:?})");
    }

    #[test]
    fn test_parse_size() {
        check_size("256m", Some(256 << 20));
        check_size("2G", Some(2 << 30));
        check_size("512k", Some(512 << 10));
        check_size("1048576", Some(1 << 20));
        check_size("1.5g", Some(3 << 29));
        check_size("64MiB", Some(64 << 20));
        check_size("", None);
        check_size("m", None);
        check_size("-5m", None);
        check_size("12x", None);
        check_size("0", None);
        check_size("1e3m", None);
    }

    #[test]
    fn test_validate_rejects_bad_input() {
        assert!(matches!(
            SandboxSpec::new(vec![]).validate(),
            Err(SpecError::NoCommand)
        ));
        let mut s = SandboxSpec::new(vec!["sh".into()]);
        s.cwd = "rel".into();
        assert!(matches!(s.validate(), Err(SpecError::NotAbsolute { .. })));
        let mut s = SandboxSpec::new(vec!["sh".into()]);
        s.env = vec!["NOEQUALS".into()];
        assert!(matches!(s.validate(), Err(SpecError::InvalidEnv(_))));
        let mut s = SandboxSpec::new(vec!["sh".into()]);
        s.limits.memory_bytes = Some(1024);
        assert!(matches!(s.validate(), Err(SpecError::InvalidLimit(_))));
        let mut s = SandboxSpec::new(vec!["sh".into()]);
        s.limits.cpus = Some(0.0);
        assert!(s.validate().is_err());
        let mut s = SandboxSpec::new(vec!["sh".into()]);
        s.uid_map = Some(IdMap {
            inside: 0,
            host: 0,
            size: 65536,
        });
        assert!(s.validate().is_err());
        assert!(validate_id("../x").is_err());
        assert!(validate_id("ok-id_1").is_ok());
    }

    #[test]
    fn test_oci_spec_has_isolation_defaults() {
        let mut s = SandboxSpec::new(vec!["true".into()]);
        s.limits = Limits {
            memory_bytes: Some(64 << 20),
            swap_bytes: None,
            cpus: Some(0.5),
            pids: Some(32),
            disk_bytes: None,
        };
        let oci = s.to_oci("t1", Path::new("/r"), "agentd").unwrap();
        let linux = oci.linux().as_ref().unwrap();
        let ns: Vec<_> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        for want in [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::Cgroup,
            LinuxNamespaceType::User,
        ] {
            assert!(ns.contains(&want), "missing namespace {want:?}");
        }
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/agentd/t1"))
        );
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(res.memory().as_ref().unwrap().limit(), Some(64 << 20));
        assert_eq!(res.memory().as_ref().unwrap().swap(), Some(64 << 20));
        assert_eq!(res.cpu().as_ref().unwrap().quota(), Some(50_000));
        assert_eq!(res.pids().as_ref().unwrap().limit(), 32);
        let proc = oci.process().as_ref().unwrap();
        assert_eq!(proc.no_new_privileges(), Some(true));
        let caps = proc.capabilities().as_ref().unwrap();
        assert!(!caps
            .bounding()
            .as_ref()
            .unwrap()
            .contains(&Capability::SysAdmin));
        assert!(proc
            .env()
            .as_ref()
            .unwrap()
            .iter()
            .any(|e| e.starts_with("PATH=")));
        let sys = oci
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/sys"))
            .unwrap();
        assert!(sys.options().as_ref().unwrap().contains(&"ro".to_string()));
    }
}
