//! `cargo xtask vm-test`: runs the sandbox tests inside a throw-away VM whose kernel offers only
//! cgroup v2, so that the v2 path is tested on a hybrid (v1) host like ours.
//!
//! Everything comes from Debian packages: the kernel (`apt-get download`, unpacked with
//! `dpkg-deb -x`, never installed), busybox-static for the initramfs, qemu-system-x86 with
//! software emulation (KVM cannot boot a kernel on this host). The test binaries are built on the
//! host; the guest sees the host's `/` read-only over 9p (with a tmpfs overlay) and the workspace
//! read-write at the same path, so they run unchanged. The guest boots with `cgroup_no_v1=all`,
//! mounts cgroup2 with the cpu, memory, pids and io controllers enabled, runs the tests, writes
//! their exit status to a file in the workspace and reboots, which ends QEMU (`-no-reboot`).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{build_probe, cargo, output, project_root, run as run_cmd};

/// The kernel modules the guest needs, in load order (dependencies first): virtio PCI for the
/// 9p transport, 9p itself, overlayfs for the writable root, veth for the netns test.
const MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "overlay",
    "veth",
];

/// The test binaries (of `tests/`) that run in the guest.
const GUEST_TESTS: &[&str] = &["limits", "shim", "isolation", "run_cli"];

/// Longest the guest may run before it is killed.
const VM_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// Runs the guest tests; fails when any fails or the VM does not finish.
pub fn run() -> anyhow::Result<()> {
    let root = project_root();
    let vm_dir = root.join("target").join("vm");
    fs::create_dir_all(&vm_dir)?;
    let kernel = ensure_kernel(&vm_dir)?;

    eprintln!("vm-test: building the binaries and tests on the host");
    run_cmd(cargo().args(["build", "--workspace", "--bins"]))?;
    let probe = build_probe()?;
    let tests = test_executables()?;

    let initramfs = build_initramfs(&vm_dir, &kernel)?;
    let guest_script = vm_dir.join("guest.sh");
    let exit_file = vm_dir.join("exit-code");
    let _ = fs::remove_file(&exit_file);
    let mut script =
        String::from("#!/bin/sh\n# Written by cargo xtask vm-test; runs inside the guest.\n");
    script.push_str(
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root\n",
    );
    script.push_str(&format!(
        "export AGENTD_PROBE={} AGENTD_EXPECT_CGROUP=v2 AGENTD_PREBUILT=1\n",
        probe.display()
    ));
    script.push_str("echo \"guest: kernel $(uname -r), cgroup controllers: $(cat /sys/fs/cgroup/cgroup.controllers)\"\n");
    script.push_str("status=0\n");
    for (name, path) in &tests {
        script.push_str(&format!(
            "echo \"guest: running {name}\"; {} --test-threads=1 || status=1\n",
            path.display()
        ));
    }
    script.push_str("exit $status\n");
    fs::write(&guest_script, script)?;
    fs::set_permissions(&guest_script, fs::Permissions::from_mode(0o755))?;

    let workspace = root.to_str().context("workspace path is not UTF-8")?;
    let append = format!(
        "console=ttyS0 quiet panic=-1 cgroup_no_v1=all agentd.workspace={workspace} agentd.script={} agentd.exit={}",
        guest_script.display(),
        exit_file.display()
    );
    eprintln!("vm-test: booting the cgroup v2 guest (QEMU, software emulation)");
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-M",
            "q35",
            "-m",
            "3072",
            "-smp",
            "2",
        ])
        .args([
            "-nodefaults",
            "-nic",
            "none",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel.join("vmlinuz"))
        .arg("-initrd")
        .arg(&initramfs)
        .arg("-append")
        .arg(&append)
        .args([
            "-fsdev",
            "local,id=hostroot,path=/,security_model=passthrough,readonly=on,multidevs=remap",
        ])
        .args(["-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"])
        .arg("-fsdev")
        .arg(format!(
            "local,id=work,path={workspace},security_model=passthrough,multidevs=remap"
        ))
        .args(["-device", "virtio-9p-pci,fsdev=work,mount_tag=work"])
        // A pipe we never write: with stdin at /dev/null the guest's console writes hang.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let mut out = qemu.stdout.take().context("qemu stdout")?;
    let copier = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let stdout = std::io::stdout();
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut lock = stdout.lock();
            let _ = lock.write_all(&buf[..n]);
            let _ = lock.flush();
        }
    });
    let mut err = qemu.stderr.take().context("qemu stderr")?;
    let err_copier = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = qemu.try_wait()? {
            break s;
        }
        if started.elapsed() > VM_TIMEOUT {
            let _ = qemu.kill();
            let _ = qemu.wait();
            bail!("the VM did not finish within {VM_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = copier.join();
    let qemu_err = err_copier.join().unwrap_or_default();
    eprintln!(
        "vm-test: the guest ran for {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let code = fs::read_to_string(&exit_file).with_context(|| {
        format!(
            "the guest wrote no exit status (qemu: {status}; {})",
            qemu_err.trim()
        )
    })?;
    match code.trim() {
        "0" => {
            eprintln!("vm-test: all guest tests passed on cgroup v2");
            Ok(())
        }
        other => bail!("guest tests failed on cgroup v2 (exit status {other})"),
    }
}

/// Downloads and unpacks the Debian kernel once; returns the dir with `vmlinuz` and `modules/`.
fn ensure_kernel(vm_dir: &Path) -> anyhow::Result<PathBuf> {
    let deps = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    let package = deps
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .context("apt-cache names no kernel package for linux-image-amd64 (run apt-get update)")?
        .trim()
        .to_string();
    let dir = vm_dir.join(&package);
    let complete = dir.join("vmlinuz").is_file()
        && MODULES
            .iter()
            .all(|m| dir.join("modules").join(format!("{m}.ko")).is_file());
    if complete {
        return Ok(dir);
    }
    // An older cache without a module added since: unpack again.
    let _ = fs::remove_dir_all(&dir);
    eprintln!("vm-test: downloading {package}");
    let dl = vm_dir.join("download");
    let _ = fs::remove_dir_all(&dl);
    fs::create_dir_all(&dl)?;
    run_cmd(
        Command::new("apt-get")
            .args(["download", &package])
            .current_dir(&dl),
    )?;
    let deb = fs::read_dir(&dl)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;
    let x = dl.join("x");
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;
    let staging = vm_dir.join(format!("{package}.partial"));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(staging.join("modules"))?;
    let vmlinuz = fs::read_dir(x.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the kernel package")?;
    fs::copy(&vmlinuz, staging.join("vmlinuz"))?;
    for m in MODULES {
        let found = find_file(&x.join("lib"), &format!("{m}.ko"))
            .with_context(|| format!("module {m}.ko not in the kernel package"))?;
        fs::copy(&found, staging.join("modules").join(format!("{m}.ko")))?;
    }
    // Rename last, so an interrupted download is never taken for a complete one.
    fs::rename(&staging, &dir)?;
    let _ = fs::remove_dir_all(&dl);
    Ok(dir)
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

/// Builds the test executables of `tests/` and returns those in [`GUEST_TESTS`].
///
/// `--workspace`, as `cargo xtask ci` tests: the same features, so the host's test build is
/// reused instead of building every dependency a second time (time, and disk: CI once ran out
/// of it here). cargo's progress and errors go to this command's stderr as they come, so the
/// end of the log shows what failed.
fn test_executables() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit());
    let built = cmd.output().context("cannot start cargo")?;
    let out = String::from_utf8_lossy(&built.stdout);
    if !built.status.success() {
        // With JSON messages the compiler's errors are on stdout: show them rendered.
        for line in out.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let Some(r) = v["message"]["rendered"].as_str() {
                    eprint!("{r}");
                }
            }
        }
        bail!("building the tests for the VM failed with {}", built.status);
    }
    let mut found = Vec::new();
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        if GUEST_TESTS.contains(&name) && v["target"]["kind"][0] == "test" {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if found.len() != GUEST_TESTS.len() {
        bail!("expected test binaries {GUEST_TESTS:?}, cargo built {found:?}");
    }
    Ok(found)
}

/// The guest's /init: load modules, mount the host and the workspace, set up cgroup v2, run
/// the script in the new root, record its status, reboot (which ends QEMU).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /host /upper /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# A few passes, so that the load order need not follow every dependency exactly.
pending="MODULES"
for pass in 1 2 3 4 5; do
  left=""
  for m in $pending; do insmod /modules/$m.ko 2>/dev/null || left="$left $m"; done
  pending="$left"
done
[ -n "$pending" ] && echo "init: could not load modules:$pending"
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    agentd.workspace=*) WORKSPACE="${arg#*=}" ;;
    agentd.script=*) SCRIPT="${arg#*=}" ;;
    agentd.exit=*) EXIT="${arg#*=}" ;;
  esac
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,multidevs=remap,msize=262144 hostroot /host || echo "init: cannot mount the host root"
mount -t tmpfs -o size=2g tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/host,upperdir=/upper/u,workdir=/upper/w /newroot || echo "init: overlay failed"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup
echo "+cpu +cpuset +memory +pids +io" > /newroot/sys/fs/cgroup/cgroup.subtree_control
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs -o size=1g tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
# The workspace may lie under /tmp, which the tmpfs above hides: make its mount point.
mkdir -p "/newroot$WORKSPACE"
mount -t 9p -o trans=virtio,version=9p2000.L,multidevs=remap,msize=262144 work "/newroot$WORKSPACE" || echo "init: cannot mount the workspace"
# switch_root, not chroot: the kernel refuses new user namespaces to a chrooted process.
exec switch_root /newroot /bin/busybox sh -c "cd '$WORKSPACE' && '$SCRIPT'; echo \$? > '$EXIT'; sync; umount '$WORKSPACE'; /bin/busybox reboot -f"
"#;

fn build_initramfs(vm_dir: &Path, kernel: &Path) -> anyhow::Result<PathBuf> {
    let dir = vm_dir.join("initramfs");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("bin"))?;
    fs::create_dir_all(dir.join("modules"))?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("busybox not found (apt-get install busybox-static)")?;
    fs::copy(&busybox, dir.join("bin/busybox"))?;
    for m in MODULES {
        fs::copy(
            kernel.join("modules").join(format!("{m}.ko")),
            dir.join("modules").join(format!("{m}.ko")),
        )?;
    }
    fs::write(
        dir.join("init"),
        INIT.replace("MODULES", &MODULES.join(" ")),
    )?;
    fs::set_permissions(dir.join("init"), fs::Permissions::from_mode(0o755))?;
    let image = vm_dir.join("initramfs.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find . | LC_ALL=C sort | cpio --quiet -o -H newc > '{}'",
            image.display()
        ))
        .current_dir(&dir)
        .status()
        .context("cannot run cpio (apt-get install cpio)")?;
    if !status.success() {
        bail!("building the initramfs failed");
    }
    Ok(image)
}
