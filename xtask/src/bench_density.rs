//! `cargo xtask bench density`: how many idle OpenCode sandboxes this host holds. A bounded
//! ramp (`AGENTD_BENCH_DENSITY`, default 30 sandboxes; it stops early when the host has less
//! than 3 GiB available) of OpenCode sandboxes, each paused once ready (an idle OpenCode takes
//! CPU: 26 running ones kept both cores busy here): the host memory each costs (the drop of
//! `MemAvailable`, which counts everything: OpenCode, the shim, agentd, page cache), paused
//! and then all resumed and idle, and the median create -> ready (what a setting costs in
//! start time). Each way's line is printed as it ends. The ways, one after the other on one
//! daemon each: OpenCode as it is; with JavaScriptCore told the machine has 256 MiB
//! (`BUN_JSC_forceRAMSize`: its heap is sized and collected as on a small machine); with
//! JavaScriptCore's JIT off (`BUN_JSC_useJIT=0`: the interpreter only, no JIT code or
//! compiler state); with agentd's `--memory-merge` (KSM: identical pages of the sandboxes kept
//! once), for which the bench turns the kernel's KSM on with a faster scan and puts both
//! settings back at the end; KSM with each of the two settings; and hibernated (`POST
//! .../hibernate` instead of pause: OpenCode stopped until the next use), whose sandboxes are
//! not all resumed at once (they would not fit): the first 10 get an exec of `true` (which
//! thaws a sandbox and leaves its OpenCode asleep) and are then woken one by one, and the
//! time until their OpenCode answers is what hibernation costs a request to OpenCode.
//! `AGENTD_BENCH_WAYS=jit,ksm` runs only the ways whose names hold one of the words.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::bench_sandbox::{call, json, median_ms, prepare, start_daemon};

/// One way of running the sandboxes: its name, the sandboxes' env, KSM on, hibernated (else
/// paused).
type Setting = (
    &'static str,
    &'static [(&'static str, &'static str)],
    bool,
    bool,
);

/// How many hibernated sandboxes are woken (one by one) to time it.
const WOKEN: usize = 10;

const SMALL_HEAP: (&str, &str) = ("BUN_JSC_forceRAMSize", "268435456");
const NO_JIT: (&str, &str) = ("BUN_JSC_useJIT", "0");

/// Memory the ramp leaves to the host.
const RESERVE_KIB: u64 = 3 << 20;
const KSM: &str = "/sys/kernel/mm/ksm";

fn meminfo_kib(field: &str) -> u64 {
    crate::bench_sandbox::kib_field("/proc/meminfo", field)
}

fn ksm_read(file: &str) -> String {
    fs::read_to_string(Path::new(KSM).join(file))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// One way's numbers.
struct Way {
    name: &'static str,
    sandboxes: usize,
    /// All resumed and idle (not for hibernated ones).
    running_mib: Option<f64>,
    paused_mib: f64,
    /// The same from the sandboxes' own cgroups (what they are charged), which the host's
    /// other work does not move.
    running_cg_mib: Option<f64>,
    paused_cg_mib: f64,
    ready_ms: f64,
    /// Hibernated: what using [`WOKEN`] of them took.
    woken: Option<Woken>,
}

/// What using hibernated sandboxes took, ms.
#[derive(Clone, Copy)]
struct Woken {
    /// An exec of `true` (which leaves OpenCode asleep), median.
    exec: f64,
    /// A resume until OpenCode answered, median and max.
    wake: f64,
    wake_max: f64,
}

/// The memory the sandboxes' cgroups are charged, summed (KiB).
fn cgroups_kib(socket: &Path, ids: &[String]) -> anyhow::Result<u64> {
    let mut sum = 0;
    for id in ids {
        let (st, b) = call(socket, "GET", &format!("/v1/sandboxes/{id}/stats"), "")?;
        if st != 200 {
            bail!("stats failed ({st}): {b}");
        }
        sum += json(&b)["memory_bytes"].as_u64().unwrap_or(0) / 1024;
    }
    Ok(sum)
}

impl Way {
    fn line(&self) -> String {
        let total_gib = meminfo_kib("MemTotal:") as f64 / 1_048_576.0;
        // Paused: how idle sandboxes wait here (idle CPU, not memory, limits running ones).
        let fits = (total_gib * 1024.0 - 2048.0) / self.paused_mib;
        let mib = |v: Option<f64>| v.map_or("     -".to_string(), |v| format!("{v:6.1}"));
        let wake = match self.woken {
            Some(w) => format!(
                "; resume -> OpenCode answering median {:.0} ms, max {:.0} ms; exec of `true` (OpenCode left asleep) median {:.1} ms",
                w.wake, w.wake_max, w.exec
            ),
            None => String::new(),
        };
        format!(
            "{:<30} {:3} sandboxes: host paused {:6.1} MiB, running {} MiB; cgroups paused {:6.1} MiB, running {} MiB; create -> ready median {:6.0} ms; {fits:4.0} paused fit in {total_gib:.0} GiB (2 GiB left to the host; goal: >= 150){wake}",
            self.name, self.sandboxes, self.paused_mib, mib(self.running_mib), self.paused_cg_mib, mib(self.running_cg_mib), self.ready_ms
        )
    }
}

fn ramp(
    socket: &Path,
    name: &'static str,
    env: serde_json::Value,
    ksm: bool,
    hibernate: bool,
    max: usize,
) -> anyhow::Result<Way> {
    std::thread::sleep(Duration::from_secs(3));
    let before = meminfo_kib("MemAvailable:");
    let mut ids = Vec::new();
    let mut ready = Vec::new();
    let body = serde_json::json!({"image": "opencode", "env": env}).to_string();
    while ids.len() < max && meminfo_kib("MemAvailable:") > RESERVE_KIB {
        let t = Instant::now();
        let (st, b) = call(socket, "POST", "/v1/sandboxes", &body)?;
        if st != 201 {
            bail!("create failed ({st}): {b}");
        }
        let id = json(&b)["id"].as_str().unwrap_or_default().to_string();
        loop {
            let v = json(&call(socket, "GET", &format!("/v1/sandboxes/{id}"), "")?.1);
            match v["state"].as_str().unwrap_or_default() {
                "ready" => break,
                "starting" | "creating" => {}
                s => bail!("sandbox {id} is {s}: {v}"),
            }
            if t.elapsed() > Duration::from_secs(180) {
                bail!("sandbox {id} was not ready in time");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ready.push(t.elapsed());
        // Paused (or hibernated) at once, as an idle sandbox would be (`idle_action`, warm
        // pools): an idle OpenCode still takes CPU, which would slow every later start.
        let how = if hibernate { "hibernate" } else { "pause" };
        let (st, b) = call(socket, "POST", &format!("/v1/sandboxes/{id}/{how}"), "")?;
        if st != 200 {
            bail!("{how} failed ({st}): {b}");
        }
        ids.push(id);
    }
    std::thread::sleep(Duration::from_secs(5));
    if ksm {
        let start: u64 = ksm_read("full_scans").parse().unwrap_or(0);
        let t = Instant::now();
        while ksm_read("full_scans").parse::<u64>().unwrap_or(0) < start + 2
            && t.elapsed() < Duration::from_secs(600)
        {
            std::thread::sleep(Duration::from_secs(2));
        }
        println!(
            "    KSM: pages_shared {} pages_sharing {} after {:.0} s of scanning",
            ksm_read("pages_shared"),
            ksm_read("pages_sharing"),
            t.elapsed().as_secs_f64()
        );
    }
    let paused = before.saturating_sub(meminfo_kib("MemAvailable:"));
    let paused_cg = cgroups_kib(socket, &ids)?;
    let (mut running, mut running_cg, mut woken) = (None, None, None);
    if hibernate {
        // A few used one by one, each paused again: what an exec costs (it thaws the sandbox
        // and leaves OpenCode asleep), then what a request to OpenCode costs.
        let (mut woke, mut execs) = (Vec::new(), Vec::new());
        for id in ids.iter().take(WOKEN) {
            let t = Instant::now();
            let (st, b) = call(
                socket,
                "POST",
                &format!("/v1/sandboxes/{id}/exec"),
                r#"{"command":["true"]}"#,
            )?;
            execs.push(t.elapsed());
            if st != 200 || !b.contains("\"exit_code\":0") {
                bail!("exec failed ({st}): {b}");
            }
            let (st, b) = call(socket, "POST", &format!("/v1/sandboxes/{id}/resume"), "")?;
            if st != 200 {
                bail!("resume failed ({st}): {b}");
            }
            let ms = json(&b)["opencode_ms"].as_f64().unwrap_or(f64::NAN);
            woke.push(Duration::from_secs_f64(ms / 1000.0));
            let (st, b) = call(socket, "POST", &format!("/v1/sandboxes/{id}/pause"), "")?;
            if st != 200 {
                bail!("pause failed ({st}): {b}");
            }
        }
        let max = woke.iter().max().copied().unwrap_or_default();
        woken = Some(Woken {
            exec: median_ms(&mut execs),
            wake: median_ms(&mut woke),
            wake_max: max.as_secs_f64() * 1000.0,
        });
    } else {
        // Then all of them running and idle (OpenCode settles in 15 s).
        for id in &ids {
            let (st, b) = call(socket, "POST", &format!("/v1/sandboxes/{id}/resume"), "")?;
            if st != 200 {
                bail!("resume failed ({st}): {b}");
            }
        }
        std::thread::sleep(Duration::from_secs(15));
        running = Some(before.saturating_sub(meminfo_kib("MemAvailable:")));
        running_cg = Some(cgroups_kib(socket, &ids)?);
    }
    for id in &ids {
        let _ = call(socket, "DELETE", &format!("/v1/sandboxes/{id}"), "");
    }
    let n = ids.len().max(1) as f64;
    let way = Way {
        name,
        sandboxes: ids.len(),
        running_mib: running.map(|r| r as f64 / 1024.0 / n),
        paused_mib: paused as f64 / 1024.0 / n,
        running_cg_mib: running_cg.map(|r| r as f64 / 1024.0 / n),
        paused_cg_mib: paused_cg as f64 / 1024.0 / n,
        ready_ms: median_ms(&mut ready),
        woken,
    };
    // As it comes: a long run stopped half-way still says something.
    println!("  {}", way.line());
    Ok(way)
}

pub fn density() -> anyhow::Result<()> {
    let max: usize = std::env::var("AGENTD_BENCH_DENSITY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
        .clamp(1, 200);
    let (release, bench, images) = prepare("density", &["opencode"])?;
    let common = [
        "--gateway-port",
        "4195",
        "--llm-base-url",
        "http://127.0.0.1:9/v1",
        "--sandbox-memory",
        "1g",
        "--max-memory",
        "1000g",
    ];
    let all: [Setting; 7] = [
        ("OpenCode as it is", &[], false, false),
        ("BUN_JSC_forceRAMSize=256 MiB", &[SMALL_HEAP], false, false),
        ("JIT off (BUN_JSC_useJIT=0)", &[NO_JIT], false, false),
        ("--memory-merge (KSM)", &[], true, false),
        ("KSM + forceRAMSize=256 MiB", &[SMALL_HEAP], true, false),
        ("KSM + JIT off", &[NO_JIT], true, false),
        ("hibernated", &[], false, true),
    ];
    // AGENTD_BENCH_WAYS=jit,ksm: only the ways whose names contain one of these words.
    let filter: Vec<String> = std::env::var("AGENTD_BENCH_WAYS")
        .unwrap_or_default()
        .split(',')
        .map(|w| w.trim().to_lowercase())
        .filter(|w| !w.is_empty())
        .collect();
    let chosen: Vec<_> = all
        .iter()
        .filter(|(name, _, _, _)| {
            filter.is_empty() || filter.iter().any(|w| name.to_lowercase().contains(w))
        })
        .collect();
    let (run, pages) = (ksm_read("run"), ksm_read("pages_to_scan"));
    let mut ksm_ok = true;
    let mut ways = Vec::new();
    let mut warmed = false;
    for (name, env, ksm, hibernate) in chosen {
        let mut args = common.to_vec();
        if *ksm {
            ksm_ok = fs::write(Path::new(KSM).join("pages_to_scan"), "20000").is_ok()
                && fs::write(Path::new(KSM).join("run"), "1").is_ok();
            if !ksm_ok {
                continue;
            }
            args.extend(["--memory-merge", "true"]);
        }
        // One daemon per way: nothing of one way's sandboxes is left for the next.
        let daemon = start_daemon(&release, &bench, &images, &args)?;
        if !warmed {
            // Warm-up: the image's layers unpacked with shifted owners.
            ramp(
                &daemon.socket,
                "warm-up",
                serde_json::json!({}),
                false,
                false,
                1,
            )?;
            warmed = true;
        }
        let env: serde_json::Map<String, serde_json::Value> = env
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        let way = ramp(&daemon.socket, name, env.into(), *ksm, *hibernate, max);
        drop(daemon);
        ways.push(way?);
    }
    let _ = fs::write(Path::new(KSM).join("run"), &run);
    let _ = fs::write(Path::new(KSM).join("pages_to_scan"), &pages);

    let total_gib = meminfo_kib("MemTotal:") as f64 / 1_048_576.0;
    println!("\nbench density (release builds, this machine: {total_gib:.1} GiB)");
    println!("host memory per idle OpenCode sandbox (MemAvailable drop / sandboxes):");
    for w in &ways {
        println!("  {}", w.line());
    }
    if !ksm_ok {
        println!("  KSM: cannot turn it on here ({KSM}), so --memory-merge was not measured");
    }
    println!("  (KSM put back to run={run} pages_to_scan={pages})");
    Ok(())
}
