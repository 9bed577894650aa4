//! Pause and resume (`POST /v1/sandboxes/{id}/pause`, `/resume`): a paused sandbox's
//! processes do not run (its CPU time stands still; a counter it writes stops), reading its
//! status does not resume it, the next exec does (transparently), an explicit resume of a
//! running sandbox does nothing; `idle_action: pause` pauses an idle sandbox before it stops
//! it; a paused sandbox stops and deletes cleanly. The freezer's times are printed (the
//! benchmark's job is the ratio; this test only checks the semantics). Forks start from a
//! sandbox's files and diverge.

use std::time::{Duration, Instant};

use serde_json::json;

use super::{plain, small_daemon, store};
use agentd_tests::require_sandbox_support;

#[test]
fn test_pause_freezes_and_any_use_resumes() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = small_daemon(&images, &[]);
    let id = plain(&d, json!({"limits": {"memory": "256m"}}));
    d.wait_state(&id, "ready", Duration::from_secs(60));
    // A counter that ticks ten times a second, in the background.
    let (code, _, err) = d.exec(
        &id,
        &[
            "sh",
            "-c",
            "(i=0; while :; do i=$((i+1)); echo $i > /home/agent/count; sleep 0.1; done) </dev/null >/dev/null 2>&1 &",
        ],
    );
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_millis(500));

    let r = d.call("POST", &format!("/v1/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["sandbox"]["paused"], true, "{v:#}");
    eprintln!("pause: the freezer took {} ms", v["freezer_ms"]);
    // Frozen: no CPU time passes, and reading the status (or stats) keeps it paused.
    let cpu = |d: &agentd_tests::daemon::Daemon| {
        d.call("GET", &format!("/v1/sandboxes/{id}/stats"), None)
            .json()["cpu_usec"]
            .as_u64()
            .unwrap()
    };
    let before = cpu(&d);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(cpu(&d), before, "a paused sandbox used CPU");
    let view = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert_eq!(view["paused"], true, "{view:#}");
    assert_eq!(view["state"], "ready", "{view:#}");
    let metrics = d.call("GET", "/metrics", None).text();
    assert!(metrics.contains("agentd_sandboxes_paused 1"), "{metrics}");

    // An exec resumes it on the way; the counter goes on from where it stood.
    let (code, out, err) = d.exec(&id, &["cat", "/home/agent/count"]);
    assert_eq!(code, 0, "{err}");
    let first: u64 = out.trim().parse().unwrap();
    let view = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert_eq!(view["paused"], false, "{view:#}");
    std::thread::sleep(Duration::from_millis(600));
    let (_, out, _) = d.exec(&id, &["cat", "/home/agent/count"]);
    let second: u64 = out.trim().parse().unwrap();
    assert!(
        second > first,
        "the counter did not go on: {first} then {second}"
    );
    assert!(cpu(&d) > before);

    // Resuming a running sandbox does nothing; pause and resume, 20 times, timed.
    let r = d.call("POST", &format!("/v1/sandboxes/{id}/resume"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["freezer_ms"], 0.0);
    let mut resumes = Vec::new();
    for _ in 0..20 {
        let r = d.call("POST", &format!("/v1/sandboxes/{id}/pause"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        let t = Instant::now();
        let r = d.call("POST", &format!("/v1/sandboxes/{id}/resume"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        resumes.push((
            t.elapsed().as_secs_f64() * 1000.0,
            r.json()["freezer_ms"].as_f64().unwrap(),
        ));
    }
    resumes.sort_by(|a, b| a.0.total_cmp(&b.0));
    eprintln!(
        "resume over the API: p50 {:.2} ms (the freezer {:.2} ms), max {:.2} ms",
        resumes[10].0, resumes[10].1, resumes[19].0
    );

    // Paused, then stopped and deleted: nothing is left.
    let r = d.call("POST", &format!("/v1/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let t = Instant::now();
    let r = d.call("POST", &format!("/v1/sandboxes/{id}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "a paused sandbox stopped slowly"
    );
    let r = d.call("POST", &format!("/v1/sandboxes/{id}/pause"), None);
    assert_eq!(r.status, 409, "{}", r.text());

    // Idle: paused first, then stopped at twice the timeout.
    let id = plain(
        &d,
        json!({"limits": {"memory": "256m"}, "idle_timeout_secs": 2, "idle_action": "pause"}),
    );
    d.wait_state(&id, "ready", Duration::from_secs(60));
    let start = Instant::now();
    let paused = loop {
        let v = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
        if v["paused"] == true {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "never paused when idle: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(paused["state"], "ready", "{paused:#}");
    let v = d.wait_state(&id, "stopped", Duration::from_secs(20));
    assert!(
        v["exit"]["reason"].as_str().unwrap_or("").contains("idle"),
        "{v:#}"
    );
    d.delete_all_and_check_clean();
}

/// Forks (`POST /v1/sandboxes/{id}/fork`): each fork starts with the parent's files (200 MB
/// of them, timed) and its labels, then they diverge; the parent's later writes are its own;
/// the fork layer goes once the last fork is deleted. Bad counts and stopped parents say why.
#[test]
fn test_fork_copies_files_and_diverges() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let gateway = agentd_tests::registry::free_port().to_string();
    let d = agentd_tests::daemon::Daemon::start(&images, &["--gateway-port", &gateway]);
    let parent = plain(
        &d,
        json!({"limits": {"memory": "256m"}, "labels": {"team": "a"}}),
    );
    d.wait_state(&parent, "ready", Duration::from_secs(60));
    let (code, _, err) = d.exec(
        &parent,
        &[
            "sh",
            "-c",
            "echo from-parent > /home/agent/marker && dd if=/dev/urandom of=/home/agent/big bs=1M count=200 status=none",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{parent}/fork"),
        Some(json!({"count": 0})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let t = Instant::now();
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{parent}/fork"),
        Some(json!({"count": 2})),
    );
    let took = t.elapsed();
    assert_eq!(r.status, 201, "{}\n{}", r.text(), d.log());
    let v = r.json();
    eprintln!(
        "fork of a sandbox with 200 MB written, 2 forks: {:.0} ms over the API, the parent frozen {:.0} ms while {} files ({} bytes) were copied",
        took.as_secs_f64() * 1000.0,
        v["copy_ms"],
        v["files"],
        v["bytes"]
    );
    assert!(v["bytes"].as_u64().unwrap() >= 200 << 20, "{v:#}");
    let forks: Vec<String> = v["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(forks.len(), 2);
    for f in &forks {
        let s = d.wait_state(f, "ready", Duration::from_secs(60));
        assert_eq!(s["labels"]["agentd.fork_of"], parent.as_str(), "{s:#}");
        assert_eq!(s["labels"]["team"], "a", "{s:#}");
        let (code, out, err) = d.exec(
            f,
            &[
                "sh",
                "-c",
                "cat /home/agent/marker; stat -c %s /home/agent/big",
            ],
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, "from-parent\n209715200\n");
    }
    // They diverge: each one's writes are its own, and so are the parent's.
    let (code, _, _) = d.exec(&forks[0], &["sh", "-c", "echo mine > /home/agent/mine"]);
    assert_eq!(code, 0);
    let (code, _, _) = d.exec(&parent, &["sh", "-c", "echo later > /home/agent/later"]);
    assert_eq!(code, 0);
    let (code, _, _) = d.exec(&forks[1], &["test", "-e", "/home/agent/mine"]);
    assert_ne!(code, 0, "a fork saw its sibling's file");
    let (code, _, _) = d.exec(&parent, &["test", "-e", "/home/agent/mine"]);
    assert_ne!(code, 0, "the parent saw a fork's file");
    let (code, _, _) = d.exec(&forks[0], &["test", "-e", "/home/agent/later"]);
    assert_ne!(code, 0, "a fork saw the parent's later file");

    // A stopped parent cannot be forked.
    let r = d.call("POST", &format!("/v1/sandboxes/{parent}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{parent}/fork"),
        Some(json!({})),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    // The layer lives as long as a fork stands on it.
    let layers = || {
        std::fs::read_dir(d.state.path().join("forks"))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    assert_eq!(layers(), 1);
    let r = d.call("DELETE", &format!("/v1/sandboxes/{}", forks[0]), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(layers(), 1, "the layer went while a fork stood on it");
    let r = d.call("DELETE", &format!("/v1/sandboxes/{}", forks[1]), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(layers(), 0, "the fork layer outlived its forks");
    d.delete_all_and_check_clean();
}
