//! The end-to-end test harness: finds the real binaries, builds the static probe once, makes
//! busybox rootfs fixtures, and checks that nothing of ours is left behind after a test.
//!
//! Tests that need root and the kernel features skip with a printed reason when they are not
//! available (they are in CI, which runs as root).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use agentd_runtime::Runtime;

pub mod daemon;
pub mod registry;

/// The target dir the test binaries were built into (`target/debug`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Path of a binary of the workspace (`agentd`, `agentd-shim`, `rootfs-builder`, `start-sandbox`).
///
/// `cargo test` builds only the binaries of the package whose tests run, so the first call
/// builds agentd's and the runtime's binaries, which makes them current even when only this
/// package's tests were asked for (a no-op when they are up to date).
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        // `cargo xtask vm-test` builds them on the host; the guest has no business compiling.
        if std::env::var_os("AGENTD_PREBUILT").is_some() {
            return;
        }
        cargo_build(
            &[
                "--bins",
                "-p",
                "agentd",
                "-p",
                "agentd-runtime",
                "-p",
                "rootfs-builder",
            ],
            None,
        );
    });
    let p = target_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing after building the workspace's binaries",
        p.display()
    );
    p
}

/// Runs `cargo build --quiet ARGS` in the workspace (with RUSTFLAGS when given), failing the
/// test with cargo's output when the build fails.
fn cargo_build(args: &[&str], rustflags: Option<&str>) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet"])
        .args(args)
        .current_dir(workspace_root());
    if let Some(flags) = rustflags {
        cmd.env("RUSTFLAGS", flags);
    }
    let out = cmd.output().expect("run cargo");
    assert!(
        out.status.success(),
        "cargo build {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Returns a reason to skip privileged tests, or None when they can run.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (namespaces, cgroups)".into());
    }
    if !Path::new("/proc/self/ns/user").exists() {
        return Some("needs user namespaces".into());
    }
    if which("busybox").is_none() {
        return Some("needs busybox-static (apt-get install busybox-static)".into());
    }
    None
}

/// Whether every end-to-end test must run: `AGENTD_E2E=1` (`cargo xtask ci` and so
/// `.ci/run` set it; `AGENTD_E2E_REQUIRED`, its old name, still counts). Then a test that
/// cannot run here fails instead of passing quietly; otherwise it prints `SKIPPED: why`.
pub fn e2e_required() -> bool {
    std::env::var("AGENTD_E2E").is_ok_and(|v| v == "1")
        || std::env::var_os("AGENTD_E2E_REQUIRED").is_some()
}

/// Panics when [`e2e_required`]: in CI a test that cannot run fails instead of passing
/// quietly.
pub fn required_or_skip() {
    if e2e_required() {
        panic!("a test cannot run here (see the SKIPPED line) and AGENTD_E2E=1 is set");
    }
}

/// Skips the calling test with a printed reason when privileged tests cannot run here.
#[macro_export]
macro_rules! require_sandbox_support {
    () => {
        if let Some(reason) = $crate::skip_reason() {
            // `cargo xtask ci` sets AGENTD_E2E=1: there a test that cannot run is a failure.
            if $crate::e2e_required() {
                panic!("cannot run: {reason} (AGENTD_E2E=1 is set)");
            }
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Builds the probe once per test process, statically linked so it runs in any rootfs.
pub fn probe() -> PathBuf {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            // `cargo xtask vm-test` builds it on the host and passes it in.
            if let Some(p) = std::env::var_os("AGENTD_PROBE") {
                return PathBuf::from(p);
            }
            let target = workspace_root().join("target").join("probe");
            let target_arg = target.to_string_lossy().into_owned();
            cargo_build(
                &[
                    "--release",
                    "-p",
                    "agentd-probe",
                    "--target-dir",
                    &target_arg,
                ],
                Some("-C target-feature=+crt-static"),
            );
            target.join("release").join("agentd-probe")
        })
        .clone()
}

/// A busybox rootfs with the probe at `/probe`, in a temp dir that the sandbox's unprivileged
/// root can reach.
pub struct Rootfs {
    /// Keeps the directory alive.
    _dir: tempfile::TempDir,
    /// The rootfs.
    pub path: PathBuf,
}

/// Makes a fresh busybox rootfs.
pub fn busybox_rootfs() -> Rootfs {
    let dir = tempfile::Builder::new()
        .prefix("agentd-rootfs-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let root = dir.path().join("root");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "w", "data"] {
        fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    let busybox = which("busybox").expect("busybox");
    fs::copy(&busybox, root.join("bin/busybox")).expect("copy busybox");
    let list = Command::new(&busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    fs::copy(probe(), root.join("probe")).expect("copy probe");
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("passwd");
    Rootfs {
        _dir: dir,
        path: root,
    }
}

/// A private state dir and cgroup parent for one test, checked for leftovers when dropped.
pub struct Scope {
    /// The sandboxes' state root.
    pub state: tempfile::TempDir,
    /// The cgroup parent (unique per test).
    pub cgroup_parent: String,
}

impl Scope {
    /// A new scope named after the test.
    pub fn new(name: &str) -> Scope {
        let state = tempfile::Builder::new()
            .prefix("agentd-state-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        fs::set_permissions(state.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
        Scope {
            state,
            cgroup_parent: format!("agentd-test-{}-{name}", std::process::id()),
        }
    }

    /// A runtime on this scope.
    pub fn runtime(&self) -> Runtime {
        Runtime::new(self.state.path())
            .with_shim(bin("agentd-shim"))
            .with_cgroup_parent(&self.cgroup_parent)
    }

    /// `agentd run` on this scope with `args` before `--` and `cmd` after it.
    pub fn agentd_run(&self, rootfs: &Path, args: &[&str], cmd: &[&str]) -> Output {
        self.agentd_run_command(rootfs, args, cmd)
            .output()
            .expect("run agentd")
    }

    /// The `agentd run` command, not started.
    pub fn agentd_run_command(&self, rootfs: &Path, args: &[&str], cmd: &[&str]) -> Command {
        let mut c = Command::new(bin("agentd"));
        c.arg("run")
            .arg("--rootfs")
            .arg(rootfs)
            .arg("--run-dir")
            .arg(self.state.path())
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .env("AGENTD_SHIM", bin("agentd-shim"))
            .args(args)
            .arg("--")
            .args(cmd);
        c
    }

    /// `agentd run --image IMAGE` on this scope, reading images from the store of the agentd
    /// state dir `store`; the caller adds options and `-- CMD`.
    pub fn agentd_run_image(&self, image: &str, store: &Path) -> Command {
        let mut c = Command::new(bin("agentd"));
        c.args(["run", "--image", image, "--state-dir"])
            .arg(store)
            .arg("--run-dir")
            .arg(self.state.path())
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .env("AGENTD_SHIM", bin("agentd-shim"));
        c
    }

    /// Everything of ours that still exists: state dirs, cgroup dirs, mounts.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        if let Ok(entries) = fs::read_dir(self.state.path()) {
            // `.lock` is the state root's own lock file, not a sandbox's.
            for e in entries.flatten().filter(|e| e.file_name() != ".lock") {
                left.push(format!("state dir {}", e.path().display()));
            }
        }
        for c in cgroup_parents(&self.cgroup_parent) {
            if let Ok(entries) = fs::read_dir(&c) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        left.push(format!("cgroup {}", e.path().display()));
                    }
                }
            }
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for l in mounts.lines() {
            if l.contains(self.state.path().to_str().unwrap_or("\0")) {
                left.push(format!("mount {l}"));
            }
        }
        left.extend(loop_devices_left(self.state.path()));
        left
    }

    /// Asserts that nothing of ours is left.
    #[track_caller]
    pub fn assert_clean(&self) {
        let left = self.leftovers();
        assert!(left.is_empty(), "leftovers after the test: {left:#?}");
    }
}

/// Loop devices still backed by files under `dir` after up to 5 s: a loop device detaches once
/// the last mount of it is gone, which a lazy unmount may finish a moment after a delete.
pub fn loop_devices_left(dir: &Path) -> Vec<String> {
    let waited = std::time::Instant::now();
    let mut loops = loop_devices_under(dir);
    while !loops.is_empty() && waited.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        loops = loop_devices_under(dir);
    }
    loops
        .into_iter()
        .map(|l| format!("loop device {l}"))
        .collect()
}

/// Loop devices whose backing file lies under `dir` (sandboxes' disks): `loopN -> file`.
fn loop_devices_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(file) = fs::read_to_string(e.path().join("loop/backing_file")) {
            if file.starts_with(&prefix) {
                out.push(format!("{name} -> {}", file.trim()));
            }
        }
    }
    out
}

/// The dirs of cgroup parent `parent` under every controller that has it.
pub fn cgroup_parents(parent: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut out = vec![root.join(parent)];
    if let Ok(entries) = fs::read_dir(root) {
        for e in entries.flatten() {
            out.push(e.path().join(parent));
        }
    }
    out.into_iter().filter(|p| p.is_dir()).collect()
}

impl Drop for Scope {
    fn drop(&mut self) {
        // A failed test may have left sandboxes running: delete them through their shims, or
        // clean up after dead shims, so one failure does not leak into the next test.
        let runtime = self.runtime();
        for id in runtime.list().unwrap_or_default() {
            if runtime.client(&id).delete().is_err() {
                let _ = runtime.cleanup(&id);
            }
        }
        // The parent dirs are ours (named for this test process); remove them once empty.
        for c in cgroup_parents(&self.cgroup_parent) {
            let _ = fs::remove_dir(c);
        }
    }
}

/// Parses the probe's `key=value` lines.
pub fn parse_report(stdout: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Formats an output for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A store holding the opencode image (`localhost/opencode:latest`), built by rootfs-builder
/// from its recipe with the shared build cache, into `target/opencode-fixture`: once for all
/// the test binaries of a run (an exclusive lock serializes them; a stamp of the recipe, its
/// lock file and the rootfs-builder binary says whether a store is current), and again only when one of
/// them changed. None (with the reason printed) without npm or apt-get.
pub fn opencode_store() -> Option<PathBuf> {
    static STORE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    STORE
        .get_or_init(|| {
            for tool in ["npm", "apt-get"] {
                if !Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .output()
                    .is_ok_and(|o| o.status.success())
                {
                    eprintln!("SKIPPED: the opencode image needs {tool} (.ci/run installs it)");
                    required_or_skip();
                    return None;
                }
            }
            let state = target_dir().join("opencode-fixture");
            let lock = fs::File::create(target_dir().join("opencode-fixture.lock")).unwrap();
            let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| e)
                .unwrap();
            let recipe = crate::workspace_root().join("rootfs-builder/recipes/opencode.toml");
            let builder = crate::bin("rootfs-builder");
            // The binary's content, not its mtime: cargo relinks it when the test binaries
            // and the harness's build unify features differently.
            let sum = Command::new("sha256sum").arg(&builder).output().unwrap();
            assert!(sum.status.success(), "{}", crate::describe(&sum));
            let stamp = format!(
                "{}\n{}\n{}",
                fs::read_to_string(&recipe).unwrap(),
                fs::read_to_string(recipe.with_extension("lock")).unwrap(),
                String::from_utf8_lossy(&sum.stdout)
            );
            let stamp_file = state.join("fixture.stamp");
            if fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp) {
                eprintln!("the opencode image fixture is current: reused");
                return Some(state);
            }
            let _ = fs::remove_dir_all(&state);
            let started = std::time::Instant::now();
            let build = Command::new(&builder)
                .arg("build")
                .arg(&recipe)
                .arg("--store")
                .arg(&state)
                .args(["--tag", "opencode", "--cache"])
                .arg(crate::target_dir().join("rootfs-builder-cache"))
                .output()
                .unwrap();
            assert!(build.status.success(), "{}", crate::describe(&build));
            eprintln!(
                "built the opencode image in {:.1}s: {}",
                started.elapsed().as_secs_f64(),
                String::from_utf8_lossy(&build.stderr)
            );
            fs::write(&stamp_file, stamp).unwrap();
            Some(state)
        })
        .clone()
}

/// The official OpenCode JS SDK (`@opencode-ai/sdk`, the version of the image's OpenCode),
/// installed once under target/ with npm; None (with the reason printed) without node/npm.
pub fn opencode_sdk() -> Option<PathBuf> {
    static SDK: OnceLock<Option<PathBuf>> = OnceLock::new();
    SDK.get_or_init(|| {
        for tool in ["node", "npm"] {
            if which(tool).is_none() {
                eprintln!("SKIPPED: the OpenCode SDK test needs {tool} (.ci/run installs npm)");
                required_or_skip();
                return None;
            }
        }
        let dir = target_dir().join("opencode-sdk");
        if !dir
            .join("node_modules/@opencode-ai/sdk/package.json")
            .exists()
        {
            fs::create_dir_all(&dir).unwrap();
            let out = Command::new("npm")
                .args([
                    "install",
                    "--ignore-scripts",
                    "--no-audit",
                    "--no-fund",
                    "--prefix",
                ])
                .arg(&dir)
                .arg(format!("@opencode-ai/sdk@{}", opencode_version()))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "npm install of the SDK failed: {}",
                describe(&out)
            );
        }
        Some(dir)
    })
    .clone()
}

/// The OpenCode version the opencode recipe pins (its `dev.agentd.opencode.version` label;
/// the SDK is installed at the same version): read from the recipe, so a version bump is one
/// edit there.
pub fn opencode_version() -> String {
    let recipe = workspace_root().join("rootfs-builder/recipes/opencode.toml");
    let text = fs::read_to_string(&recipe).unwrap();
    let key = "\"dev.agentd.opencode.version\" = \"";
    let start = text
        .find(key)
        .expect("the recipe labels its OpenCode version")
        + key.len();
    let end = text[start..].find('"').expect("a quoted version") + start;
    text[start..end].to_string()
}
