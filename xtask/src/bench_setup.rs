//! `cargo xtask bench setup`: a task with a setup and three agents, its setup run once and
//! shared (the default: one sandbox runs it, the attempts start from a copy-on-write layer of
//! its result) against a setup run in each agent's sandbox (`setup_once: false`), in
//! alternation on one daemon: median time from the create to every agent at work (its
//! attempt `running`, the prompt sent).
//!
//! The setup stands in for an install: 1,500 files of 4 KiB written by as many processes
//! (ignored by git, like `node_modules`) and a shell loop of CPU work, light (about 2 s alone)
//! and heavy (about 3 times that, like `pip install` of a test tool through the egress proxy
//! measured here). The LLM upstream is not
//! there (nothing is prompted beyond the first request): each run is cancelled once every
//! agent works.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::bench_sandbox::{call, json, median_ms, prepare, start_daemon};

const AGENTS: usize = 3;
const RUNS: usize = 3;
/// The setup, with `loops` iterations of CPU work.
fn setup_command(loops: u32) -> String {
    format!("mkdir -p node_modules && i=0; while [ $i -lt 1500 ]; do head -c 4096 /dev/urandom > node_modules/f$i; i=$((i+1)); done; n=0; while [ $n -lt {loops} ]; do n=$((n+1)); done; echo installed")
}

/// One task; (create -> every agent at work, the preparation's timings if shared).
fn one(
    socket: &Path,
    ws: &Path,
    setup: &str,
    once: bool,
) -> anyhow::Result<(Duration, serde_json::Value)> {
    let body = serde_json::json!({
        "prompt": "bench", "workspace": {"path": ws}, "agents": AGENTS,
        "setup": setup, "setup_once": once, "grace_secs": 0,
    });
    let (st, b) = call(socket, "POST", "/v1/tasks", &body.to_string())?;
    if st != 201 {
        bail!("task create failed ({st}): {b}");
    }
    let v = json(&b);
    let id = v["id"].as_str().unwrap_or_default().to_string();
    let created = v["created_at"].as_u64().unwrap_or_default();
    let t = Instant::now();
    loop {
        let v = json(&call(socket, "GET", &format!("/v1/tasks/{id}"), "")?.1);
        let states: Vec<String> = v["attempts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|a| a["state"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        if states.iter().all(|s| s != "queued" && s != "starting") {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("task {id} did not start its agents: {v}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = call(socket, "POST", &format!("/v1/tasks/{id}/cancel"), "");
    // The event stream ends with task.finished.
    let (_, events) = call(socket, "GET", &format!("/v1/tasks/{id}/events"), "")?;
    let mut at_work = Vec::new();
    for line in events.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let ev = json(line);
        if ev["type"] == "attempt.state" && ev["state"] == "running" {
            at_work.push(ev["time"].as_u64().unwrap_or_default());
        }
        if ev["type"] == "setup" && ev["state"] == "failed" {
            bail!("the setup failed: {ev}");
        }
    }
    if at_work.len() < AGENTS {
        bail!("only {} of {AGENTS} agents worked", at_work.len());
    }
    let v = json(&call(socket, "GET", &format!("/v1/tasks/{id}"), "")?.1);
    let prepared = v["prepared"].clone();
    let _ = call(socket, "DELETE", &format!("/v1/tasks/{id}"), "");
    let t = Instant::now();
    while call(socket, "GET", &format!("/v1/tasks/{id}"), "")?.0 != 404 {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("task {id} was not deleted");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = at_work.iter().max().copied().unwrap_or_default();
    Ok((
        Duration::from_millis(last.saturating_sub(created)),
        prepared,
    ))
}

pub fn setup() -> anyhow::Result<()> {
    let (release, bench, images) = prepare("setup", &["opencode"])?;
    let daemon = start_daemon(
        &release,
        &bench,
        &images,
        &[
            // Not 4197-4199: agentd's own defaults for the NAT and the egress proxy.
            "--gateway-port",
            "4195",
            "--llm-base-url",
            "http://127.0.0.1:9/v1",
        ],
    )?;
    let ws = bench.join("workspace");
    let _ = fs::remove_dir_all(&ws);
    fs::create_dir_all(ws.join("src"))?;
    fs::write(ws.join(".gitignore"), "node_modules/\n")?;
    fs::write(ws.join("src/lib.txt"), "one\ntwo\n")?;
    // Warm-up: the default image's layers unpacked with shifted owners.
    one(&daemon.socket, &ws, &setup_command(1000), true).context("warm-up")?;
    let mut results = Vec::new();
    for (name, loops) in [("light", 300_000), ("heavy", 3_000_000)] {
        let setup = setup_command(loops);
        let (mut shared, mut each) = (Vec::new(), Vec::new());
        let mut prepared = serde_json::Value::Null;
        for _ in 0..RUNS {
            let (t, p) = one(&daemon.socket, &ws, &setup, true)?;
            shared.push(t);
            prepared = p;
            each.push(one(&daemon.socket, &ws, &setup, false)?.0);
        }
        results.push((name, median_ms(&mut shared), median_ms(&mut each), prepared));
    }
    drop(daemon);
    println!("\nbench setup (release builds, this machine): {AGENTS} agents, median of {RUNS}");
    println!("create -> every agent at work:");
    for (name, s, e, prepared) in results {
        println!("  {name} setup:");
        println!("    setup once, shared     {s:8.0} ms");
        println!(
            "    setup in each sandbox  {e:8.0} ms   shared/each = {:.2}x (saves {:.0} ms)",
            s / e,
            e - s
        );
        println!(
            "    the shared preparation: sandbox {} ms, workspace {} ms, setup {} ms, layer {} ms ({} files, {} bytes)",
            prepared["sandbox_ms"],
            prepared["workspace_ms"],
            prepared["setup_ms"],
            prepared["layer_ms"],
            prepared["layer_files"],
            prepared["layer_bytes"]
        );
    }
    Ok(())
}
