//! Fault injection: random concurrent operations while agentd (and sometimes a shim) is
//! killed with SIGKILL at a random moment; after each restart the API, the shims, mounts,
//! cgroups, veths and state dirs must agree, and no acknowledged write may be lost. A few
//! rounds run in CI; `AGENTD_FAULT_ROUNDS=N` runs more.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentd_tests::daemon::{try_request, Daemon};
use agentd_tests::require_sandbox_support;
use serde_json::json;

use super::store;

/// A small deterministic generator (xorshift): the seed is printed, so a failing round can be
/// replayed with `AGENTD_FAULT_SEED`.
struct Rng(AtomicU64);

impl Rng {
    fn next(&self, below: u64) -> u64 {
        let mut x = self.0.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0.store(x, Ordering::Relaxed);
        x % below.max(1)
    }
}

/// What the API acknowledged.
#[derive(Default)]
struct Acked {
    /// Creates answered 201.
    created: BTreeSet<String>,
    /// Deletes answered 204.
    deleted: BTreeSet<String>,
    /// Deletes without an answer (agentd was killed meanwhile): they may or may not have
    /// happened. A delete answered with an error must not have happened.
    unanswered: BTreeSet<String>,
}

/// Shim processes of this daemon: `agentd-shim` whose working dir is a sandbox dir of its
/// state (a sandbox's init is a fork of the shim too, but its working dir is in the rootfs).
fn shims(d: &Daemon) -> Vec<(i32, String)> {
    let dir = d.state.path().join("sandboxes");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) else {
            continue;
        };
        if comm.trim() == "agentd-shim" && cwd.parent() == Some(dir.as_path()) {
            out.push((pid, cwd.file_name().unwrap().to_string_lossy().into_owned()));
        }
    }
    out
}

fn worker(
    d_socket: std::path::PathBuf,
    rng: Arc<Rng>,
    acked: Arc<Mutex<Acked>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let known: Vec<String> = {
            let a = acked.lock().unwrap();
            a.created.difference(&a.deleted).cloned().collect()
        };
        let pick = || known.get(rng.next(known.len() as u64) as usize).cloned();
        match rng.next(10) {
            0..=2 if known.len() < 6 => {
                let body =
                    json!({"image": "opencode", "opencode": false, "limits": {"memory": "64m"}});
                if let Some(r) = try_request(
                    &d_socket,
                    "POST",
                    "/v1/sandboxes",
                    Some(body.to_string().as_bytes()),
                ) {
                    if r.status == 201 {
                        let id = r.json()["id"].as_str().unwrap().to_string();
                        acked.lock().unwrap().created.insert(id);
                    }
                }
            }
            3 | 4 => {
                if let Some(id) = pick() {
                    match try_request(&d_socket, "DELETE", &format!("/v1/sandboxes/{id}"), None) {
                        Some(r) if r.status == 204 => {
                            acked.lock().unwrap().deleted.insert(id);
                        }
                        Some(_) => {}
                        None => {
                            acked.lock().unwrap().unanswered.insert(id);
                        }
                    }
                }
            }
            5 => {
                if let Some(id) = pick() {
                    let _ =
                        try_request(&d_socket, "POST", &format!("/v1/sandboxes/{id}/stop"), None);
                }
            }
            6 | 7 => {
                if let Some(id) = pick() {
                    let body = json!({"command": ["sh", "-c", "echo x > /tmp/x; true"], "timeout_secs": 10});
                    let _ = try_request(
                        &d_socket,
                        "POST",
                        &format!("/v1/sandboxes/{id}/exec"),
                        Some(body.to_string().as_bytes()),
                    );
                }
            }
            _ => {
                let _ = try_request(&d_socket, "GET", "/v1/sandboxes", None);
            }
        }
    }
}

#[test]
fn test_kill9_under_load_loses_nothing_acknowledged() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let rounds: u64 = std::env::var("AGENTD_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("AGENTD_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| (u64::from(std::process::id()) * 2_654_435_761) | 1);
    eprintln!("fault injection: {rounds} rounds, AGENTD_FAULT_SEED={seed}");
    let rng = Arc::new(Rng(AtomicU64::new(seed)));
    let mut d = Daemon::start(
        &images,
        &[
            "--gateway-port",
            &agentd_tests::registry::free_port().to_string(),
            "--max-sandboxes",
            "8",
        ],
    );
    let acked = Arc::new(Mutex::new(Acked::default()));
    let started = Instant::now();
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (s, r, a, st) = (d.socket.clone(), rng.clone(), acked.clone(), stop.clone());
                std::thread::spawn(move || worker(s, r, a, st))
            })
            .collect();
        // Some work acknowledged in this round first, then the kill at a random moment.
        let want = {
            let a = acked.lock().unwrap();
            a.created.len() + a.deleted.len() + 3
        };
        let waiting = Instant::now();
        while waiting.elapsed() < Duration::from_secs(20) {
            let a = acked.lock().unwrap();
            if a.created.len() + a.deleted.len() >= want {
                break;
            }
            drop(a);
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(rng.next(1000)));
        // Every other round a shim dies first (its sandbox must end up `exited`, cleaned).
        let mut shim_killed = None;
        if round % 2 == 1 {
            let s = shims(&d);
            if !s.is_empty() {
                let (pid, id) = s[rng.next(s.len() as u64) as usize].clone();
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                shim_killed = Some(id);
            }
        }
        d.kill(libc::SIGKILL);
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        d.start_again();

        // The API after the restart.
        let list = d.call("GET", "/v1/sandboxes", None).json();
        let listed: Vec<serde_json::Value> = list["sandboxes"].as_array().unwrap().clone();
        let ids: BTreeSet<String> = listed
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        let mut a = acked.lock().unwrap();
        for id in a.created.difference(&a.deleted) {
            if a.unanswered.contains(id) {
                continue;
            }
            assert!(
                ids.contains(id),
                "round {round}: acknowledged sandbox {id} is gone\n{}",
                d.log()
            );
        }
        for id in &a.deleted {
            assert!(
                !ids.contains(id),
                "round {round}: deleted sandbox {id} came back"
            );
        }
        // What the restart shows is what the workers go on from.
        let gone: Vec<String> = a
            .unanswered
            .iter()
            .filter(|id| !ids.contains(*id))
            .cloned()
            .collect();
        a.deleted.extend(gone);
        a.unanswered.clear();
        drop(a);
        // Live ones answer through their (reattached) shims; the others hold nothing.
        let mut live = BTreeSet::new();
        for s in &listed {
            let id = s["id"].as_str().unwrap().to_string();
            match s["state"].as_str().unwrap() {
                "ready" => {
                    let (code, _, err) = d.exec(&id, &["true"]);
                    assert_eq!(
                        code, 0,
                        "round {round}: ready sandbox {id} does not exec: {err}"
                    );
                    live.insert(id);
                }
                "exited" | "stopped" => {}
                other => panic!("round {round}: sandbox {id} is {other} after a restart"),
            }
        }
        if let Some(id) = &shim_killed {
            assert!(
                !live.contains(id),
                "round {round}: {id} lost its shim yet is ready"
            );
        }
        let left = d.leftovers();
        let veths = left.iter().filter(|l| l.starts_with("veth ")).count();
        assert_eq!(
            veths,
            live.len(),
            "round {round}: veths {left:#?} for live {live:?}"
        );
        for l in left.iter().filter(|l| !l.starts_with("veth ")) {
            assert!(
                live.iter().any(|id| l.contains(id.as_str())),
                "round {round}: {l} belongs to no live sandbox (live: {live:?})"
            );
        }
    }
    let (created, deleted) = {
        let a = acked.lock().unwrap();
        (a.created.len(), a.deleted.len())
    };
    eprintln!(
        "fault injection: {rounds} rounds, {created} creates and {deleted} deletes acknowledged, {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // Everything removed through the API leaves nothing on the host.
    d.delete_all_and_check_clean();
}
