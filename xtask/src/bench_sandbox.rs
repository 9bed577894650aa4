//! `cargo xtask bench sandbox`: the daemon's costs, side by side with peers in the same run.
//!
//! (a) API create -> sandbox running, `minimal` image, median of 50, against `crun run -d` of
//!     the same rootfs (the image's layer) with agentd's own OCI spec; with the default 10g
//!     disk limit (a sparse ext4 on a loop device under the overlay) and without one, in
//!     alternation; then claimed from a warm pool of `minimal` (started ahead, paused);
//! (b) API create -> OpenCode answering `/global/health`, against `opencode serve` started bare
//!     on the host (same binary, fresh HOME), median of 5 each;
//! (c) host memory per idle sandbox, excluding the workload: the shim's PSS plus agentd's RSS
//!     growth, over 20 sandboxes;
//! (d) 50 sandboxes created concurrently: all must succeed; total wall time;
//! (e) resume of a paused sandbox over the API (and the freezer's part), against `crun resume`
//!     of a paused crun container, median of 50.
//!
//! Everything runs from release builds on a daemon of its own (state in target/bench/sandbox,
//! bridge `adbench0`, cgroup parent `agentd-bench/serve`), removed at the end.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{cargo, project_root, run};

const BRIDGE: &str = "adbench0";
const CGROUP_PARENT: &str = "agentd-bench/serve";
const RUNS: usize = 50;
const OPENCODE_RUNS: usize = 5;

/// One HTTP request over the daemon's socket: (status, body).
pub(crate) fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((status, body))
}

pub(crate) fn json(body: &str) -> serde_json::Value {
    // Chunked bodies are not used by these endpoints (full JSON answers).
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

pub(crate) fn median_ms(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

pub(crate) struct Daemon {
    child: Child,
    pub(crate) socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Warm pools' sandboxes are not listed: the pools are emptied first.
        let pools = |s: &Path| {
            call(s, "GET", "/v1/pools", "")
                .map(|(_, b)| json(&b)["pools"].as_array().cloned().unwrap_or_default())
                .unwrap_or_default()
        };
        for p in pools(&self.socket) {
            let body = serde_json::json!({"image": p["image"], "size": 0}).to_string();
            let _ = call(&self.socket, "PUT", "/v1/pools", &body);
        }
        let t = Instant::now();
        while pools(&self.socket)
            .iter()
            .any(|p| p["ready"] != 0 || p["starting"] != 0)
            && t.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Ok((_, body)) = call(&self.socket, "GET", "/v1/sandboxes", "") {
            for s in json(&body)["sandboxes"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                let _ = call(
                    &self.socket,
                    "DELETE",
                    &format!("/v1/sandboxes/{}", s["id"].as_str().unwrap_or("")),
                    "",
                );
            }
        }
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).status();
        let chain = format!("AGENTD-{BRIDGE}");
        let _ = Command::new("iptables")
            .args(["-w", "-D", "INPUT", "-i", BRIDGE, "-j", &chain])
            .status();
        let _ = Command::new("iptables").args(["-w", "-F", &chain]).status();
        let _ = Command::new("iptables").args(["-w", "-X", &chain]).status();
        for e in fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = fs::remove_dir(e.path().join(CGROUP_PARENT));
            let _ = fs::remove_dir(e.path().join("agentd-bench"));
        }
    }
}

fn rss_kb(pid: u32, field: &str) -> u64 {
    let path = if field == "Pss:" {
        format!("/proc/{pid}/smaps_rollup")
    } else {
        format!("/proc/{pid}/status")
    };
    kib_field(&path, field)
}

/// The number after `field` in a `/proc` file of `Field: N kB` lines (0 if absent).
pub(crate) fn kib_field(path: &str, field: &str) -> u64 {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Shims of sandboxes under `sandboxes`: named `agentd-shim`, working in a sandbox's dir (their
/// argv names no path).
fn shims_under(sandboxes: &Path) -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "agentd-shim")
                && fs::read_link(format!("/proc/{p}/cwd")).is_ok_and(|c| c.starts_with(sandboxes))
        })
        .collect()
}

/// Runs the benchmark.
/// Release builds of the binaries and the bench's images (`names`), in `target/bench/<what>`:
/// (release dir, bench dir, images dir).
pub(crate) fn prepare(what: &str, names: &[&str]) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let root = project_root();
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "agentd",
        "-p",
        "agentd-runtime",
        "-p",
        "rootfs-builder",
        "--bins",
    ]))?;
    let release = crate::target_dir().join("release");
    let bench = crate::target_dir().join("bench").join(what);
    let state = bench.join("state");
    let _ = fs::remove_dir_all(&state);
    fs::create_dir_all(&state)?;
    let store_state = bench.join("images");
    for name in names {
        run(Command::new(release.join("rootfs-builder"))
            .arg("build")
            .arg(root.join(format!("rootfs-builder/recipes/{name}.toml")))
            .arg("--store")
            .arg(&store_state)
            .args(["--tag", name, "--cache"])
            .arg(crate::target_dir().join("rootfs-builder-cache")))
        .with_context(|| format!("cannot build the {name} image"))?;
    }
    Ok((release, bench, store_state.join("images")))
}

/// Starts a release agentd of its own on `bench/state` with `extra` arguments; it is stopped
/// and its bridge, rules and cgroups removed when the result drops.
pub(crate) fn start_daemon(
    release: &Path,
    bench: &Path,
    images: &Path,
    extra: &[&str],
) -> anyhow::Result<Daemon> {
    let state = bench.join("state");
    let socket = state.join("agentd.sock");
    let log = fs::File::create(bench.join("agentd.log"))?;
    let child = Command::new(release.join("agentd"))
        .arg("serve")
        .arg("--state-dir")
        .arg(&state)
        .arg("--images-dir")
        .arg(images)
        .arg("--socket")
        .arg(&socket)
        .args([
            "--bridge",
            BRIDGE,
            "--subnet",
            "10.213.0.0/16",
            "--cgroup-parent",
            CGROUP_PARENT,
        ])
        .args(["--max-sandboxes", "200", "--idle-timeout", "0"])
        .args(extra)
        .env("AGENTD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let daemon = Daemon {
        child,
        socket: socket.clone(),
    };
    let start = Instant::now();
    while call(&socket, "GET", "/v1/health", "")
        .map(|r| r.0)
        .unwrap_or(0)
        != 200
    {
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "agentd did not start; see {}",
                bench.join("agentd.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(daemon)
}

pub fn sandbox() -> anyhow::Result<()> {
    let (release, bench, images) = prepare("sandbox", &["minimal", "opencode"])?;
    let state = bench.join("state");
    let socket = state.join("agentd.sock");
    let daemon = start_daemon(
        &release,
        &bench,
        &images,
        &[
            // Not 4197-4199: agentd's own defaults for the NAT and the egress proxy.
            "--gateway-port",
            "4195",
            // OpenCode sandboxes need an upstream to be configured; (b) never prompts, so
            // nothing needs to listen there.
            "--llm-base-url",
            "http://127.0.0.1:9/v1",
            // Sandboxes without a disk limit too: (a) measures what the limit adds.
            "--sandbox-disk",
            "none",
        ],
    )?;
    let create = |body: &str| -> anyhow::Result<(Duration, String)> {
        let t = Instant::now();
        let (st, b) = call(&socket, "POST", "/v1/sandboxes", body)?;
        let took = t.elapsed();
        if st != 201 {
            bail!("create failed ({st}): {b}");
        }
        Ok((
            took,
            json(&b)["id"].as_str().unwrap_or_default().to_string(),
        ))
    };
    let delete = |id: &str| {
        let _ = call(&socket, "DELETE", &format!("/v1/sandboxes/{id}"), "");
    };
    // With the default disk limit, as agentd's own default gives it.
    let minimal = r#"{"image":"minimal","opencode":false,"limits":{"memory":"64m","disk":"10g"}}"#;
    let minimal_no_disk = r#"{"image":"minimal","opencode":false,"limits":{"memory":"64m"}}"#;
    // The first create unpacks the image's layers with shifted owners: not part of the runs.
    let (_, id) = create(minimal)?;
    delete(&id);

    // (a) create -> running, against crun run -d.
    let (mut agentd_times, mut no_disk_times) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (t, id) = create(minimal)?;
        agentd_times.push(t);
        delete(&id);
        let (t, id) = create(minimal_no_disk)?;
        no_disk_times.push(t);
        delete(&id);
    }
    let a_agentd = median_ms(&mut agentd_times);
    let a_no_disk = median_ms(&mut no_disk_times);
    let crun = crun_times(&release, &images, &bench)?;
    // (a') the same create claimed from a warm pool of `minimal`: sandboxes started ahead and
    // paused, so what is left is the claim (thaw, limits, the record made durable). Each
    // claim waits (untimed) for the pool to be ready again.
    let pool = |size: u32| -> anyhow::Result<serde_json::Value> {
        let body = serde_json::json!({"image": "minimal", "size": size}).to_string();
        let (st, b) = call(&socket, "PUT", "/v1/pools", &body)?;
        if st != 200 {
            bail!("setting the pool failed ({st}): {b}");
        }
        let t = Instant::now();
        loop {
            let (_, b) = call(&socket, "GET", "/v1/pools", "")?;
            let p = json(&b)["pools"]
                .as_array()
                .and_then(|a| a.iter().find(|p| p["image"] == "minimal").cloned())
                .unwrap_or_default();
            if p["ready"] == size && p["starting"] == 0 {
                return Ok(p);
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the minimal pool was not ready in 60 s: {p}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let mut pooled_times = Vec::new();
    for _ in 0..RUNS {
        pool(1)?;
        let (t, id) = create(minimal_no_disk)?;
        pooled_times.push(t);
        delete(&id);
    }
    let hits = pool(0)?["hits"].as_u64().unwrap_or(0);
    if hits != RUNS as u64 {
        bail!("only {hits} of {RUNS} creates were claimed from the pool");
    }
    let a_pooled = median_ms(&mut pooled_times);
    // (e) resume of a paused sandbox (the API's round trip, and the freezer's part of it).
    let (_, id) = create(minimal)?;
    let (mut resumes, mut freezer) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (st, b) = call(&socket, "POST", &format!("/v1/sandboxes/{id}/pause"), "")?;
        if st != 200 {
            bail!("pause failed ({st}): {b}");
        }
        let t = Instant::now();
        let (st, b) = call(&socket, "POST", &format!("/v1/sandboxes/{id}/resume"), "")?;
        resumes.push(t.elapsed());
        if st != 200 {
            bail!("resume failed ({st}): {b}");
        }
        let ms = json(&b)["freezer_ms"].as_f64().unwrap_or(0.0);
        freezer.push(Duration::from_secs_f64(ms / 1000.0));
    }
    delete(&id);
    let e_resume = median_ms(&mut resumes);
    let e_freezer = median_ms(&mut freezer);
    // (b) create -> OpenCode ready, against a bare opencode serve.
    let (b_agentd, b_bare) = opencode_times(&socket, &images, &bench)?;
    // (c) memory per idle sandbox.
    let agentd_pid = daemon.child.id();
    let before = rss_kb(agentd_pid, "VmRSS:");
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(create(minimal)?.1);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kb(agentd_pid, "VmRSS:");
    let shims: Vec<u32> = shims_under(&state.join("sandboxes"))
        .into_iter()
        .filter(|p| {
            // The shim itself, not the sandbox init (a child of the shim running its code).
            fs::read_to_string(format!("/proc/{p}/status"))
                .map(|s| s.contains("\nUid:\t0\t"))
                .unwrap_or(false)
        })
        .collect();
    let shim_pss: u64 = shims.iter().map(|p| rss_kb(*p, "Pss:")).sum();
    if shims.len() != ids.len() {
        bail!("found {} shims for {} sandboxes", shims.len(), ids.len());
    }
    let per_shim = shim_pss as f64 / shims.len() as f64;
    let per_agentd = after.saturating_sub(before) as f64 / ids.len() as f64;
    for id in ids.drain(..) {
        delete(&id);
    }
    // (d) 50 at once.
    let t = Instant::now();
    let handles: Vec<_> = (0..RUNS)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || call(&socket, "POST", "/v1/sandboxes", minimal))
        })
        .collect();
    let mut ok = 0;
    for h in handles {
        if let Ok(Ok((201, b))) = h.join() {
            ok += 1;
            ids.push(json(&b)["id"].as_str().unwrap_or_default().to_string());
        }
    }
    let d_total = t.elapsed();
    for id in ids.drain(..) {
        delete(&id);
    }
    drop(daemon);

    println!("\nbench sandbox (release builds, this machine)");
    println!("(a) create -> running, minimal image, median of {RUNS}:");
    println!("    agentd API   {a_agentd:8.2} ms   (10g disk limit)");
    println!(
        "    agentd API   {a_no_disk:8.2} ms   (no disk limit: the limit adds {:.2} ms)",
        a_agentd - a_no_disk
    );
    println!("    agentd API   {a_pooled:8.2} ms   (claimed from a warm pool, no disk limit)");
    match crun {
        Some((c, _)) => {
            println!(
                "    crun run -d  {c:8.2} ms   agentd/crun = {:.2}x (10g), {:.2}x (no disk limit), {:.2}x (pooled) (goal: < 1)",
                a_agentd / c,
                a_no_disk / c,
                a_pooled / c
            );
        }
        None => println!("    crun: not installed, no comparison"),
    }
    println!("(b) create -> OpenCode ready, median of {OPENCODE_RUNS}:");
    println!("    agentd API        {b_agentd:8.0} ms");
    println!(
        "    bare opencode     {b_bare:8.0} ms   agentd/bare = {:.2}x (goal: <= 1.15)",
        b_agentd / b_bare
    );
    println!("(c) host memory per idle sandbox (excluding the workload), over 20:");
    println!(
        "    shim PSS {:.0} KiB + agentd RSS growth {:.0} KiB = {:.2} MiB (goal: < 2 MiB)",
        per_shim,
        per_agentd,
        (per_shim + per_agentd) / 1024.0
    );
    println!(
        "(d) {RUNS} creates at once: {ok}/{RUNS} succeeded in {:.2} s",
        d_total.as_secs_f64()
    );
    println!("(e) resume of a paused sandbox, median of {RUNS}:");
    println!(
        "    agentd API   {e_resume:8.2} ms   (the freezer {e_freezer:.2} ms of it; goal: < 10 ms)"
    );
    if let Some((_, r)) = crun {
        println!(
            "    crun resume  {r:8.2} ms   agentd/crun = {:.2}x",
            e_resume / r
        );
    }
    if ok != RUNS {
        bail!("{} of {RUNS} concurrent creates failed", RUNS - ok);
    }
    Ok(())
}

/// `crun run -d` of the minimal image's layer with agentd's spec; median ms of create+start
/// (the delete is not timed, as agentd's is not). None without crun.
fn crun_times(release: &Path, images: &Path, bench: &Path) -> anyhow::Result<Option<(f64, f64)>> {
    let Some(crun) = crate::bench::which("crun") else {
        return Ok(None);
    };
    let agentd = release.join("agentd");
    let inspect = Command::new(&agentd)
        .args(["image", "--state-dir"])
        .arg(images.parent().unwrap_or(images))
        .args(["inspect", "minimal"])
        .output()?;
    let v: serde_json::Value =
        serde_json::from_slice(&inspect.stdout).context("agentd image inspect")?;
    // The image's layers, bottom first; crun gets them as a read-only overlay (topmost first
    // in lowerdir), mounted in its private mount namespace below.
    let layers: Vec<PathBuf> = v["layers"]
        .as_array()
        .context("no layers")?
        .iter()
        .filter_map(|l| l["diff_id"].as_str())
        .map(|d| {
            images
                .join("layers/sha256")
                .join(d.trim_start_matches("sha256:"))
        })
        .collect();
    let layer = layers.first().context("no layer")?.clone();
    if !layer.join("bin/busybox").exists() {
        bail!("{} is not unpacked", layer.display());
    }
    let lowerdir = layers
        .iter()
        .rev()
        .map(|l| l.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let merged = bench.join("crun-rootfs");
    fs::create_dir_all(&merged)?;
    let spec = Command::new(&agentd)
        .args(["run", "--rootfs"])
        .arg(&layer)
        .args([
            "--memory",
            "64m",
            "--print-oci-spec",
            "--",
            "/bin/sh",
            "-c",
            "sleep 1000",
        ])
        .output()?;
    let mut spec: serde_json::Value =
        serde_json::from_slice(&spec.stdout).context("agentd printed no spec")?;
    spec["linux"]["cgroupsPath"] = serde_json::Value::String("/agentd-bench/crun".into());
    spec["root"]["path"] = serde_json::Value::String(merged.display().to_string());
    let bundle = bench.join("bundle-crun");
    fs::create_dir_all(&bundle)?;
    fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec)?,
    )?;
    // crun refuses hybrid cgroups: run it where cgroup2 is hidden (a private mount namespace).
    let script = format!(
        "umount /sys/fs/cgroup/unified 2>/dev/null; mount -t overlay overlay -o ro,lowerdir={lowerdir} {m} || exit 1; \
         for i in $(seq {RUNS}); do \
           s=$(date +%s%N); {crun} run -d --bundle {b} agentd-bench-crun </dev/null >/dev/null || exit 1; e=$(date +%s%N); \
           echo $((e - s)); {crun} delete -f agentd-bench-crun >/dev/null 2>&1; done; \
         {crun} run -d --bundle {b} agentd-bench-crun </dev/null >/dev/null || exit 1; \
         for i in $(seq {RUNS}); do \
           {crun} pause agentd-bench-crun || exit 1; \
           s=$(date +%s%N); {crun} resume agentd-bench-crun || exit 1; e=$(date +%s%N); \
           echo R $((e - s)); done; {crun} delete -f agentd-bench-crun >/dev/null 2>&1",
        b = bundle.display(),
        m = merged.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()?;
    if !out.status.success() {
        bail!("crun run failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut times: Vec<Duration> = text
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .map(Duration::from_nanos)
        .collect();
    let mut resumes: Vec<Duration> = text
        .lines()
        .filter_map(|l| l.strip_prefix("R ")?.trim().parse::<u64>().ok())
        .map(Duration::from_nanos)
        .collect();
    if times.is_empty() || resumes.is_empty() {
        bail!("crun printed no timings");
    }
    Ok(Some((median_ms(&mut times), median_ms(&mut resumes))))
}

/// Median ms of create -> ready through agentd, and of a bare `opencode serve` -> health.
fn opencode_times(socket: &Path, images: &Path, bench: &Path) -> anyhow::Result<(f64, f64)> {
    let body = r#"{"image":"opencode","limits":{"disk":"10g"}}"#;
    // Warm-up (unpacks the shifted layers).
    let (st, b) = call(socket, "POST", "/v1/sandboxes", body)?;
    if st != 201 {
        bail!("create failed: {b}");
    }
    let _ = call(
        socket,
        "DELETE",
        &format!("/v1/sandboxes/{}", json(&b)["id"].as_str().unwrap_or("")),
        "",
    );
    let mut agentd = Vec::new();
    for _ in 0..OPENCODE_RUNS {
        let t = Instant::now();
        let (st, b) = call(socket, "POST", "/v1/sandboxes", body)?;
        if st != 201 {
            bail!("create failed: {b}");
        }
        let id = json(&b)["id"].as_str().unwrap_or_default().to_string();
        loop {
            let (_, b) = call(socket, "GET", &format!("/v1/sandboxes/{id}"), "")?;
            let state = json(&b)["state"].as_str().unwrap_or_default().to_string();
            if state == "ready" {
                break;
            }
            if state != "starting" || t.elapsed() > Duration::from_secs(120) {
                bail!("sandbox {id} is {state}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        agentd.push(t.elapsed());
        let _ = call(socket, "DELETE", &format!("/v1/sandboxes/{id}"), "");
    }
    // The same binary, bare on the host.
    let binary = fs::read_dir(images.join("layers/sha256"))?
        .flatten()
        .map(|e| e.path().join("usr/local/bin/opencode"))
        .find(|p| p.exists())
        .context("no opencode binary in the store")?;
    let mut bare = Vec::new();
    for i in 0..OPENCODE_RUNS {
        let home = bench.join(format!("bare-home-{i}"));
        let _ = fs::remove_dir_all(&home);
        fs::create_dir_all(home.join(".config/opencode/node_modules"))?;
        fs::write(
            home.join(".config/opencode/package-lock.json"),
            r#"{"lockfileVersion":3,"packages":{"":{"dependencies":{"@opencode-ai/plugin":"*"}}}}"#,
        )?;
        let port = 4300 + u16::try_from(i).unwrap_or(0);
        let t = Instant::now();
        let mut child = Command::new(&binary)
            .args([
                "serve",
                "--hostname",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .env("XDG_STATE_HOME", home.join(".local/state"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .env("OPENCODE_DISABLE_AUTOUPDATE", "1")
            .env("OPENCODE_DISABLE_MODELS_FETCH", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        loop {
            let ok = std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                    write!(
                        s,
                        "GET /global/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                    )
                    .ok()?;
                    let mut r = String::new();
                    s.read_to_string(&mut r).ok()?;
                    r.starts_with("HTTP/1.1 200").then_some(())
                });
            if ok.is_some() {
                break;
            }
            if t.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                bail!("bare opencode did not answer");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bare.push(t.elapsed());
        let _ = child.kill();
        let _ = child.wait();
        let _ = fs::remove_dir_all(&home);
    }
    Ok((median_ms(&mut agentd), median_ms(&mut bare)))
}
