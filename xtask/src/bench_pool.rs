//! `cargo xtask bench pool`: what a warm pool buys, side by side in one run on one daemon.
//!
//! (a) create -> OpenCode answering (`GET .../opencode/global/health` through agentd's proxy,
//!     200), claimed from a warm pool of 1 (refilled between runs), against the same create
//!     with no pool: p50 and p90 of 10 claims, median of 3 cold creates;
//! (b) a one-round task end to end (create -> the task `succeeded`: sandbox, workspace in,
//!     session, the agent's turn, the check `true`, the diff) with an LLM that answers at
//!     once (a mock on loopback speaking OpenAI's streaming protocol), with the pool and
//!     without, alternating, median of 3 each; the attempt's own timings say where the time
//!     goes.
//!
//! Release builds, a daemon of its own (see `bench sandbox`).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::bench_sandbox::{call, json, median_ms, prepare, start_daemon};

const CLAIMS: usize = 10;
const COLD: usize = 3;
const TASKS: usize = 3;
const IMAGE: &str = "opencode";

/// An OpenAI-compatible upstream on loopback that answers every chat request at once with
/// one short text (streamed when asked), and lists one model.
fn instant_llm() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = answer(stream);
            });
        }
    });
    Ok(format!("http://127.0.0.1:{port}/v1"))
}

fn answer(stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; len.min(64 << 20)];
    reader.read_exact(&mut body)?;
    let mut out = stream;
    if line.starts_with("GET") {
        let b =
            r#"{"object":"list","data":[{"id":"default","object":"model","owned_by":"bench"}]}"#;
        return write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
            b.len()
        );
    }
    let streaming = serde_json::from_slice::<serde_json::Value>(&body)
        .map(|v| v["stream"] == true)
        .unwrap_or(false);
    let usage = r#"{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12}"#;
    if streaming {
        let chunk = |delta: &str, finish: &str, usage: &str| {
            format!("data: {{\"id\":\"b\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"default\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]{usage}}}\n\n")
        };
        let body = format!(
            "{}{}data: [DONE]\n\n",
            chunk(r#"{"role":"assistant","content":"Done."}"#, "null", ""),
            chunk("{}", "\"stop\"", &format!(",\"usage\":{usage}"))
        );
        write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}"
        )
    } else {
        let b = format!(
            r#"{{"id":"b","object":"chat.completion","created":0,"model":"default","choices":[{{"index":0,"message":{{"role":"assistant","content":"Done."}},"finish_reason":"stop"}}],"usage":{usage}}}"#
        );
        write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
            b.len()
        )
    }
}

/// p-th percentile (0-100) in ms of `v`, sorted in place.
fn percentile_ms(v: &mut [Duration], p: usize) -> f64 {
    v.sort();
    let i = ((v.len() - 1) * p).div_ceil(100);
    v[i].as_secs_f64() * 1000.0
}

fn set_pool(socket: &Path, size: u32) -> anyhow::Result<()> {
    let body = serde_json::json!({"image": IMAGE, "size": size}).to_string();
    let (st, b) = call(socket, "PUT", "/v1/pools", &body)?;
    if st != 200 {
        bail!("setting the pool failed ({st}): {b}");
    }
    Ok(())
}

/// Waits until the pool has `ready` sandboxes ready and none starting.
fn pool_ready(socket: &Path, ready: u64) -> anyhow::Result<serde_json::Value> {
    let t = Instant::now();
    loop {
        let v = json(&call(socket, "GET", "/v1/pools", "")?.1);
        let p = v["pools"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["image"] == IMAGE).cloned())
            .unwrap_or_default();
        if p["ready"].as_u64() == Some(ready) && p["starting"].as_u64() == Some(0) {
            return Ok(p);
        }
        if t.elapsed() > Duration::from_secs(180) {
            bail!("the pool did not reach {ready} ready: {v}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Create -> OpenCode's health answering through the proxy.
fn create_to_ready(socket: &Path) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let (st, b) = call(socket, "POST", "/v1/sandboxes", r#"{"image":"opencode"}"#)?;
    if st != 201 {
        bail!("create failed ({st}): {b}");
    }
    let id = json(&b)["id"].as_str().unwrap_or_default().to_string();
    loop {
        let (st, _) = call(
            socket,
            "GET",
            &format!("/v1/sandboxes/{id}/opencode/global/health"),
            "",
        )?;
        if st == 200 {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("sandbox {id}'s OpenCode never answered");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = t.elapsed();
    let _ = call(socket, "DELETE", &format!("/v1/sandboxes/{id}"), "");
    Ok(took)
}

/// One one-round task: its time from the create to `succeeded`, and its attempt's timings.
fn task(socket: &Path, ws: &Path) -> anyhow::Result<(Duration, serde_json::Value)> {
    let body = serde_json::json!({
        "prompt": "say done", "workspace": {"path": ws}, "agents": 1, "check": "true",
        "max_rounds": 1, "grace_secs": 0,
    });
    let t = Instant::now();
    let (st, b) = call(socket, "POST", "/v1/tasks", &body.to_string())?;
    if st != 201 {
        bail!("task create failed ({st}): {b}");
    }
    let id = json(&b)["id"].as_str().unwrap_or_default().to_string();
    let v = loop {
        let v = json(&call(socket, "GET", &format!("/v1/tasks/{id}"), "")?.1);
        match v["state"].as_str().unwrap_or_default() {
            "succeeded" => break v,
            "failed" | "cancelled" | "lost" => bail!("task {id} ended {}: {v}", v["state"]),
            _ => {}
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("task {id} did not end: {v}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = t.elapsed();
    let timings = v["attempts"][0]["timings"].clone();
    let _ = call(socket, "DELETE", &format!("/v1/tasks/{id}"), "");
    Ok((took, timings))
}

pub fn pool() -> anyhow::Result<()> {
    let (release, bench, images) = prepare("pool", &[IMAGE])?;
    let llm = instant_llm()?;
    let daemon = start_daemon(
        &release,
        &bench,
        &images,
        &["--gateway-port", "4195", "--llm-base-url", &llm],
    )?;
    let socket = daemon.socket.clone();
    let ws = bench.join("workspace");
    let _ = fs::remove_dir_all(&ws);
    fs::create_dir_all(&ws)?;
    fs::write(ws.join("README.md"), "bench\n")?;
    // Warm-up: the image's layers unpacked with shifted owners, one task through.
    task(&socket, &ws).context("warm-up task")?;

    // (a) claims against cold creates.
    let mut cold = Vec::new();
    for _ in 0..COLD {
        cold.push(create_to_ready(&socket)?);
    }
    set_pool(&socket, 1)?;
    let mut claims = Vec::new();
    let mut refill = Vec::new();
    for _ in 0..CLAIMS {
        let p = pool_ready(&socket, 1)?;
        refill.push(Duration::from_millis(
            p["last_refill_ms"].as_u64().unwrap_or(0),
        ));
        claims.push(create_to_ready(&socket)?);
    }
    // (b) tasks, with the pool and without, alternating.
    let (mut pooled, mut unpooled) = (Vec::new(), Vec::new());
    let mut pooled_timings = serde_json::Value::Null;
    let mut unpooled_timings = serde_json::Value::Null;
    for _ in 0..TASKS {
        set_pool(&socket, 1)?;
        pool_ready(&socket, 1)?;
        let (t, timings) = task(&socket, &ws)?;
        pooled.push(t);
        pooled_timings = timings;
        set_pool(&socket, 0)?;
        pool_ready(&socket, 0)?;
        let (t, timings) = task(&socket, &ws)?;
        unpooled.push(t);
        unpooled_timings = timings;
    }
    let p = json(&call(&socket, "GET", "/v1/pools", "")?.1);
    drop(daemon);

    let cold_ms = median_ms(&mut cold);
    let claim_p50 = percentile_ms(&mut claims, 50);
    let claim_p90 = percentile_ms(&mut claims, 90);
    println!("\nbench pool (release builds, this machine)");
    println!("(a) create -> OpenCode answering through agentd:");
    println!("    claimed from a warm pool  p50 {claim_p50:8.1} ms  p90 {claim_p90:8.1} ms  ({CLAIMS} claims; goal: p50 < 100 ms)");
    println!(
        "    no pool (cold)            med {cold_ms:8.1} ms  ({COLD} creates)   claimed/cold = {:.3}x",
        claim_p50 / cold_ms
    );
    println!(
        "    refill (create -> ready and paused) median {:.0} ms",
        median_ms(&mut refill)
    );
    let (tp, tu) = (median_ms(&mut pooled), median_ms(&mut unpooled));
    println!("(b) a one-round task, create -> succeeded, instant LLM, median of {TASKS}:");
    println!("    with the pool      {tp:8.0} ms   (goal: < 3000 ms)");
    println!(
        "    without a pool     {tu:8.0} ms   pooled/unpooled = {:.2}x",
        tp / tu
    );
    println!("    timings with the pool:    {pooled_timings}");
    println!("    timings without a pool:   {unpooled_timings}");
    println!("    pool counters: {}", p["pools"]);
    Ok(())
}
