//! `cargo xtask bench start`: the cost of one sandbox, end to end. Each runtime runs
//! create+start+wait+delete of `/bin/true` on the same busybox rootfs with the same limits
//! (256 MiB memory, 1 cpu, 256 pids) and, for the OCI runtimes, the very OCI spec agentd uses
//! (`agentd run --print-oci-spec`: the same namespaces, user namespace mapping, mounts and
//! masked paths). Runs are interleaved across runtimes so that drift in the machine's load
//! hits all alike; the table gives medians and each peer's ratio to agentd.
//!
//! Differences that remain: agentd also compiles and installs its seccomp filter (the peers get
//! none, as the spec carries none); bwrap creates no cgroup; crun refuses this hybrid cgroup
//! host, so it runs in a private mount namespace with the cgroup2 mount hidden (MACHINE.md), and
//! that wrapper's own cost is measured and shown on its own row.
//!
//! Two tables, because the kernel makes the order matter: on cgroup v1 the first move of a task
//! into a cgroup after a quiet spell waits an RCU grace period (8-16 ms here), and moves
//! within a grace period of an earlier one do not. Back to back, a runtime that starts right
//! after another one's move skips part of that wait (so each round runs the runtimes in a new
//! shuffled order, lest one always follow another); 50 ms apart, every run starts on a quiet
//! kernel, as one `agentd run` in a CI job does.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{cargo, output, run};

/// Measured runs per runtime (the issue asks for at least 20).
const RUNS: usize = 30;
/// Unmeasured runs first, to warm caches.
const WARMUP: usize = 3;
/// The pause before each run in the second table: longer than two grace periods.
const QUIET: Duration = Duration::from_millis(50);
/// Cgroup parent of every benchmark sandbox.
const CGROUP_PARENT: &str = "agentd-bench";

struct Runner {
    name: &'static str,
    cmd: Vec<String>,
    note: &'static str,
    times: Vec<Duration>,
}

/// Runs the start benchmark and prints the table.
pub fn start() -> anyhow::Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "agentd",
        "-p",
        "agentd-runtime",
        "--bins",
    ]))?;
    let release = crate::target_dir().join("release");
    let agentd = release.join("agentd");
    let bench = crate::target_dir().join("bench");
    let rootfs = make_rootfs(&bench)?;
    let rootfs_s = rootfs.to_string_lossy().into_owned();
    let limits = ["--memory", "256m", "--cpus", "1", "--pids", "256"];

    let mut agentd_cmd: Vec<String> = vec![
        agentd.to_string_lossy().into(),
        "run".into(),
        "--rootfs".into(),
        rootfs_s.clone(),
    ];
    agentd_cmd.extend(limits.iter().map(|s| s.to_string()));
    // The default state root, as crun and runc use their defaults (/run/crun, /run/runc).
    agentd_cmd.extend(["--cgroup-parent".into(), CGROUP_PARENT.into()]);
    let mut spec_cmd = agentd_cmd.clone();
    spec_cmd.extend(["--print-oci-spec".into(), "--".into(), "/bin/true".into()]);
    agentd_cmd.extend(["--".into(), "/bin/true".into()]);
    let spec_json = output(Command::new(&spec_cmd[0]).args(&spec_cmd[1..]))?;
    let mut runners = vec![Runner {
        name: "agentd run",
        cmd: agentd_cmd,
        note: "shim + libcontainer + seccomp + PID 1",
        times: vec![],
    }];

    let hide_v2 = "umount /sys/fs/cgroup/unified 2>/dev/null;";
    if let Some(crun) = which("crun") {
        let bundle = make_bundle(&bench, "crun", &spec_json)?;
        runners.push(Runner {
            name: "crun run",
            cmd: sh_in_private_mounts(&format!(
                "{hide_v2} exec {crun} run --bundle {} agentd-bench-crun",
                bundle.display()
            )),
            note: "in unshare -m with cgroup2 hidden",
            times: vec![],
        });
        runners.push(Runner {
            name: "(crun's wrapper alone)",
            cmd: sh_in_private_mounts(&format!("{hide_v2} exec /bin/true")),
            note: "unshare -m + sh + umount, no container",
            times: vec![],
        });
    } else {
        eprintln!("bench: crun not installed (apt-get install crun); skipping it");
    }
    if let Some(runc) = which("runc") {
        let bundle = make_bundle(&bench, "runc", &spec_json)?;
        runners.push(Runner {
            name: "runc run",
            cmd: vec![
                runc,
                "run".into(),
                "--bundle".into(),
                bundle.to_string_lossy().into(),
                "agentd-bench-runc".into(),
            ],
            note: "",
            times: vec![],
        });
    } else {
        eprintln!("bench: runc not installed (apt-get install runc); skipping it");
    }
    if let Some(bwrap) = which("bwrap") {
        runners.push(Runner {
            name: "bwrap",
            cmd: vec![
                bwrap,
                "--unshare-all".into(),
                "--ro-bind".into(),
                rootfs_s.clone(),
                "/".into(),
                "--proc".into(),
                "/proc".into(),
                "--dev".into(),
                "/dev".into(),
                "--tmpfs".into(),
                "/tmp".into(),
                "/bin/true".into(),
            ],
            note: "no cgroup, no limits",
            times: vec![],
        });
    } else {
        eprintln!("bench: bwrap not installed (apt-get install bubblewrap); skipping it");
    }

    // Every runner must work before anything is timed.
    runners.retain(|r| match once(&r.cmd) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("bench: {} does not work here, skipping it: {e:#}", r.name);
            false
        }
    });
    if runners.first().map(|r| r.name) != Some("agentd run") {
        bail!("agentd run itself failed; see above");
    }
    eprintln!("bench: {WARMUP} warm-up + {RUNS} measured runs per runtime, interleaved");
    for (pause, title) in [
        (Duration::ZERO, "back to back"),
        (QUIET, "each run 50 ms after the last (a quiet kernel)"),
    ] {
        for r in &mut runners {
            r.times.clear();
        }
        let mut order: Vec<usize> = (0..runners.len()).collect();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..WARMUP + RUNS {
            // Fisher-Yates with xorshift: a fixed seed, so runs of the bench compare.
            for k in (1..order.len()).rev() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                order.swap(k, (seed % (k as u64 + 1)) as usize);
            }
            for &k in &order {
                std::thread::sleep(pause);
                let t = once(&runners[k].cmd)?;
                if i >= WARMUP {
                    runners[k].times.push(t);
                }
            }
        }
        print_table(&mut runners, title);
    }
    let _ = remove_cgroup_parent();
    Ok(())
}

fn print_table(runners: &mut [Runner], title: &str) {
    let agentd_median = median(&mut runners[0].times.clone());
    println!();
    println!(
        "create+start+wait+delete of /bin/true, same rootfs and limits, {RUNS} runs each, {title}"
    );
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>16}  notes",
        "runtime", "median ms", "p10 ms", "p90 ms", "ratio to agentd"
    );
    for r in runners.iter_mut() {
        let mut t = r.times.clone();
        let m = median(&mut t);
        let p10 = t[t.len() / 10];
        let p90 = t[t.len() * 9 / 10];
        println!(
            "{:<24} {:>10.2} {:>10.2} {:>10.2} {:>16.2}  {}",
            r.name,
            ms(m),
            ms(p10),
            ms(p90),
            m.as_secs_f64() / agentd_median.as_secs_f64(),
            r.note
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn once(cmd: &[String]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot start {}", cmd[0]))?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            cmd.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

fn sh_in_private_mounts(script: &str) -> Vec<String> {
    vec![
        "unshare".into(),
        "-m".into(),
        "sh".into(),
        "-c".into(),
        script.into(),
    ]
}

pub(crate) fn which(name: &str) -> Option<String> {
    std::env::var("PATH")
        .ok()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
}

/// A busybox rootfs (with `/bin/true`) that the sandbox's unprivileged root can reach.
fn make_rootfs(bench: &Path) -> anyhow::Result<PathBuf> {
    let rootfs = bench.join("rootfs");
    if rootfs.join("bin/true").exists() {
        return Ok(rootfs);
    }
    let busybox = which("busybox").context("busybox not found (apt-get install busybox-static)")?;
    let _ = fs::remove_dir_all(&rootfs);
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    for d in [bench, &rootfs] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
    }
    fs::copy(&busybox, rootfs.join("bin/busybox"))?;
    for applet in ["true", "sh"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    Ok(rootfs)
}

/// An OCI bundle holding agentd's spec, with the peer's own cgroup path.
fn make_bundle(bench: &Path, peer: &str, spec_json: &str) -> anyhow::Result<PathBuf> {
    let mut spec: serde_json::Value =
        serde_json::from_str(spec_json).context("agentd printed no valid spec")?;
    spec["linux"]["cgroupsPath"] = serde_json::Value::String(format!("/{CGROUP_PARENT}/{peer}"));
    let bundle = bench.join(format!("bundle-{peer}"));
    fs::create_dir_all(&bundle)?;
    fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec)?,
    )?;
    Ok(bundle)
}

/// Removes the benchmark's cgroup parent dirs (empty once every run deleted its cgroup).
fn remove_cgroup_parent() -> std::io::Result<()> {
    for e in fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let _ = fs::remove_dir(e.path().join(CGROUP_PARENT));
    }
    let _ = fs::remove_dir(Path::new("/sys/fs/cgroup").join(CGROUP_PARENT));
    Ok(())
}
