//! `agentd run`: run one command in a sandbox made from a rootfs directory, pass stdio through,
//! exit with the command's status, and leave nothing behind (not on Ctrl-C, not on an OOM kill).
//!
//! The sandbox is supervised by a foreground `agentd-shim` (libcontainer never runs in this
//! process). This process blocks SIGINT, SIGTERM and SIGHUP and forwards them to the shim,
//! which stops the sandbox (SIGTERM, then SIGKILL after the stop timeout) and removes it.

use std::path::{Path, PathBuf};

use agentd_images::{ImageRootfs, Store, UnpackOptions};
use agentd_runtime::spec::IdMap;

use crate::image_spec::{find_command, ImageDefaults};
use agentd_runtime::{parse_size, BindMount, Limits, NetworkMode, Rootfs, Runtime, SandboxSpec};
use anyhow::{bail, Context};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// Exit status of `agentd run` when agentd itself fails (bad input, sandbox not created), as
/// docker and podman do, so that it differs from the command's own statuses.
pub const EXIT_AGENTD_ERROR: u8 = 125;

/// Options of `agentd run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Root filesystem directory of the sandbox (mounted read-only; /tmp is a tmpfs).
    #[arg(long, required_unless_present = "image", conflicts_with = "image")]
    pub rootfs: Option<PathBuf>,
    /// Run an image from agentd's image store instead of a rootfs dir (`agentd image pull` or
    /// `import` it first): its layers are stacked with overlayfs, and its entrypoint, command,
    /// environment, working dir and user are the defaults.
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// agentd's state dir, whose image store (<dir>/images) --image reads (the same dir as
    /// `agentd serve --state-dir` and `agentd image --state-dir`).
    #[arg(long, alias = "store-dir", env = "AGENTD_STATE_DIR", default_value = crate::daemon::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Memory limit, like 256m or 2g; the command is OOM-killed above it (exit 137).
    #[arg(long, value_parser = parse_size_arg)]
    pub memory: Option<u64>,
    /// CPU quota in cores, like 0.5 or 2.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Maximum number of processes and threads [default: 2048; without a limit a fork bomb
    /// in the sandbox could use up the host's pids].
    #[arg(long)]
    pub pids: Option<u64>,
    /// Size of the writable layer of an --image rootfs, like 1g, or `none` [default: 10g];
    /// writes beyond it (bytes or inodes) fail with ENOSPC inside.
    #[arg(long, value_parser = parse_disk_arg)]
    pub disk: Option<DiskArg>,
    /// Environment variable for the command, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the sandbox (default: the image's, else /).
    #[arg(long, short = 'w')]
    pub workdir: Option<PathBuf>,
    /// Bind a host path into the sandbox, HOST:SANDBOX[:ro] (repeatable; the target must exist
    /// in the rootfs).
    #[arg(long = "bind", short = 'b', value_name = "HOST:SANDBOX[:ro]", value_parser = parse_bind)]
    pub binds: Vec<BindMount>,
    /// Join this network namespace (e.g. /run/netns/ci from `ip netns add ci`) instead of a new
    /// one with only loopback. Root inside cannot reconfigure it.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Hostname inside the sandbox.
    #[arg(long, default_value = "sandbox")]
    pub hostname: String,
    /// First host uid/gid that the sandbox's ids map to (root inside is this uid outside).
    /// Default: the first range of 65536 ids from 100000 up that no other sandbox uses.
    #[arg(long)]
    pub host_id_base: Option<u32>,
    /// Directory for the sandbox's runtime state while it runs (removed when the command exits).
    #[arg(long, env = "AGENTD_RUN_STATE", default_value = agentd_runtime::client::DEFAULT_STATE_ROOT)]
    pub run_dir: PathBuf,
    /// Cgroup parent under every controller; the sandbox's cgroup is <parent>/<id>.
    #[arg(long, env = "AGENTD_CGROUP_PARENT", default_value = agentd_runtime::cgroups::DEFAULT_CGROUP_PARENT)]
    pub cgroup_parent: String,
    /// Seconds between SIGTERM and SIGKILL when agentd run is interrupted.
    #[arg(long, default_value_t = agentd_runtime::client::DEFAULT_STOP_TIMEOUT_SECS)]
    pub stop_timeout: u64,
    /// Print the OCI runtime spec (config.json) the sandbox would get, and exit. For debugging
    /// and for running the same sandbox under other runtimes (`cargo xtask bench start`).
    #[arg(long, hide = true)]
    pub print_oci_spec: bool,
    /// The command and its arguments (with --image: the image's command by default, and
    /// arguments to its entrypoint if it has one, as docker does).
    #[arg(last = true, required_unless_present = "image", value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

/// `--disk`: a size, or `none` for an unbounded writable layer.
#[derive(Debug, Clone, Copy)]
pub enum DiskArg {
    /// No bound.
    Unbounded,
    /// Bytes.
    Bytes(u64),
}

fn parse_disk_arg(s: &str) -> Result<DiskArg, String> {
    if s.trim() == "none" {
        return Ok(DiskArg::Unbounded);
    }
    parse_size(s).map(DiskArg::Bytes)
}

fn parse_bind(s: &str) -> Result<BindMount, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (source, target, readonly) = match parts.as_slice() {
        [h, c] => (h, c, false),
        [h, c, "ro"] => (h, c, true),
        [h, c, "rw"] => (h, c, false),
        _ => {
            return Err(format!(
                "invalid bind {s:?}: expected HOST:SANDBOX or HOST:SANDBOX:ro"
            ))
        }
    };
    let source = PathBuf::from(source);
    if !source.exists() {
        return Err(format!("bind source {} does not exist", source.display()));
    }
    let target = PathBuf::from(target);
    if !target.is_absolute() {
        return Err(format!(
            "bind target {} must be an absolute path",
            target.display()
        ));
    }
    Ok(BindMount {
        source,
        target,
        readonly,
    })
}

/// Where the sandbox's root filesystem comes from.
enum Source {
    Dir(PathBuf),
    Image(Box<ImageRootfs>),
}

/// Finds an image in the store and unpacks what is not unpacked yet.
fn load_image(state_dir: &Path, name: &str) -> anyhow::Result<ImageRootfs> {
    // Absolute: the layer paths become overlayfs mount options.
    let root =
        std::path::absolute(state_dir.join("images")).context("cannot resolve the state dir")?;
    let store = Store::open(&root)
        .with_context(|| format!("cannot open the image store in {}", root.display()))?;
    store
        .rootfs(name, &UnpackOptions::default())
        .with_context(|| {
            format!("cannot use image {name} (pull or import it first: agentd image pull {name})")
        })
}

/// Runs `agentd run`; returns the process exit status.
pub fn run(args: RunArgs) -> anyhow::Result<u8> {
    if !nix::unistd::geteuid().is_root() && !args.print_oci_spec {
        bail!("agentd run needs root to create namespaces and cgroups (the sandbox itself runs unprivileged): run it with sudo");
    }
    if !args.print_oci_spec {
        // As early as can be: the kernel's wait runs while the rest is prepared (the runtime's
        // spawn asks again, which does nothing while this one waits).
        agentd_runtime::cgroups::prime_attach(&args.cgroup_parent);
    }
    let source = match (&args.rootfs, &args.image) {
        (Some(rootfs), _) => {
            if !rootfs.is_dir() {
                bail!(
                    "rootfs {} does not exist or is not a directory",
                    rootfs.display()
                );
            }
            Source::Dir(rootfs.clone())
        }
        (None, Some(image)) => Source::Image(Box::new(load_image(&args.state_dir, image)?)),
        (None, None) => bail!("give --rootfs DIR or --image IMAGE"),
    };
    let (command, defaults) = match &source {
        Source::Dir(_) => (
            args.command.clone(),
            ImageDefaults {
                env: Vec::new(),
                cwd: PathBuf::from("/"),
                user: (0, 0),
            },
        ),
        Source::Image(image) => {
            let config = &image.config;
            // A command replaces the image's cmd, not its entrypoint (as docker run does).
            let args_or_cmd = if args.command.is_empty() {
                &config.cmd
            } else {
                &args.command
            };
            let command = config
                .entrypoint
                .iter()
                .chain(args_or_cmd)
                .cloned()
                .collect();
            (command, crate::image_spec::defaults(image)?)
        }
    };
    if command.is_empty() {
        bail!("the image has no entrypoint or command: give one after --");
    }
    let mut spec = SandboxSpec::new(command);
    spec.env = defaults.env;
    for kv in &args.env {
        crate::image_spec::set_env(&mut spec.env, kv.clone());
    }
    spec.cwd = args.workdir.clone().unwrap_or(defaults.cwd);
    (spec.uid, spec.gid) = defaults.user;
    spec.hostname = args.hostname.clone();
    spec.uid_map = args.host_id_base.map(IdMap::unprivileged);
    spec.gid_map = spec.uid_map;
    spec.limits = Limits {
        memory_bytes: args.memory,
        swap_bytes: None,
        cpus: args.cpus,
        pids: Some(
            args.pids
                .unwrap_or(crate::daemon::config::DEFAULT_SANDBOX_PIDS),
        ),
        disk_bytes: match args.disk {
            Some(DiskArg::Unbounded) => None,
            Some(DiskArg::Bytes(b)) => Some(b),
            None => Some(
                agentd_runtime::parse_size(crate::daemon::config::DEFAULT_SANDBOX_DISK)
                    .expect("the default disk size parses"),
            ),
        },
    };
    spec.mounts = args.binds.clone();
    if let Some(netns) = &args.netns {
        spec.network = NetworkMode::Join(netns.clone());
    }
    spec.validate()?;
    if args.print_oci_spec {
        let rootfs = match &source {
            Source::Dir(dir) => std::fs::canonicalize(dir).context("cannot resolve the rootfs")?,
            Source::Image(_) => args
                .run_dir
                .join("print")
                .join(agentd_runtime::layout::ROOTFS),
        };
        let oci = spec.to_oci("print", &rootfs, &args.cgroup_parent)?;
        let json = serde_json::to_string_pretty(&oci).context("cannot serialize the spec")?;
        println!("{json}");
        return Ok(0);
    }
    let (rootfs, layers): (Rootfs, &[PathBuf]) = match &source {
        Source::Dir(dir) => (Rootfs::Dir(dir.clone()), std::slice::from_ref(dir)),
        Source::Image(image) => (Rootfs::Layers(image.lower_dirs.clone()), &image.lower_dirs),
    };
    if !find_command(layers, &spec.args[0], &spec.effective_env()) {
        bail!(
            "command {:?} not found in the {} (PATH inside is searched)",
            spec.args[0],
            match &source {
                Source::Dir(dir) => format!("rootfs {}", dir.display()),
                Source::Image(image) => format!("image {}", image.image.name),
            }
        );
    }

    // Block the stop signals before the shim exists, so that none is lost; a thread takes them
    // with sigwait and forwards them to the shim.
    let mut stop = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        stop.add(s);
    }
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&stop), None)
        .context("cannot block signals")?;

    let id = format!("run-{}-{:x}", std::process::id(), nanos());
    let runtime = Runtime::new(&args.run_dir)
        .with_stop_timeout(args.stop_timeout)
        .with_cgroup_parent(&args.cgroup_parent);
    let sandbox = runtime
        .run_foreground(&id, rootfs, &spec)
        .context("cannot start the sandbox")?;
    let shim = nix::unistd::Pid::from_raw(i32::try_from(sandbox.shim_pid()).unwrap_or(i32::MAX));
    std::thread::spawn(move || loop {
        if let Ok(sig) = stop.wait() {
            // SIGHUP (terminal gone) and SIGINT (Ctrl-C) both mean: stop the sandbox.
            let _ = sig;
            let _ = nix::sys::signal::kill(shim, Signal::SIGTERM);
        }
    });
    let status = sandbox.wait().context("lost the sandbox's shim")?;
    if status.oom_killed {
        let limit = args
            .memory
            .map(|m| format!(" (memory limit {m} bytes)"))
            .unwrap_or_default();
        eprintln!("agentd: the sandbox ran out of memory and a process was OOM-killed{limit}");
    }
    Ok(u8::try_from(status.code.clamp(0, 255)).unwrap_or(EXIT_AGENTD_ERROR))
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        & 0xffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_bind() {
        let b = parse_bind("/tmp:/w:ro").unwrap();
        assert_eq!(
            (b.source.as_path(), b.target.as_path(), b.readonly),
            (Path::new("/tmp"), Path::new("/w"), true)
        );
        assert!(!parse_bind("/tmp:/w").unwrap().readonly);
        assert!(parse_bind("/tmp").is_err());
        assert!(parse_bind("/tmp:rel").is_err());
        assert!(parse_bind("/does/not/exist:/w").is_err());
        assert!(parse_bind("/tmp:/w:xx").is_err());
    }

    #[test]
    fn test_find_command() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::os::unix::fs::symlink("/bin/busybox", dir.path().join("bin/sh")).unwrap();
        let layers = [dir.path().to_path_buf()];
        // A dangling link is no command (execvp would fail too).
        assert!(!find_command(&layers, "sh", &[]));
        std::fs::write(dir.path().join("bin/busybox"), "").unwrap();
        assert!(find_command(&layers, "sh", &[]));
        assert!(find_command(&layers, "/bin/sh", &[]));
        assert!(!find_command(&layers, "nope", &[]));
        assert!(!find_command(&layers, "sh", &["PATH=/usr/bin".into()]));
    }
}
