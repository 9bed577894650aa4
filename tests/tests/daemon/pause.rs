//! Pause and resume (`POST /v1/sandboxes/{id}/pause`, `/resume`): a paused sandbox's
//! processes do not run (its CPU time stands still; a counter it writes stops), reading its
//! status does not resume it, the next exec does (transparently), an explicit resume of a
//! running sandbox does nothing; `idle_action: pause` pauses an idle sandbox before it stops
//! it; a paused sandbox stops and deletes cleanly. The freezer's times are printed (the
//! benchmark's job is the ratio; this test only checks the semantics). Forks start from a
//! sandbox's files and diverge. Warm pools hand out paused, ready OpenCode sandboxes that
//! become the claimer's alone. Hibernation stops a sandbox's OpenCode and starts it again on
//! the next use.

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

/// An exec as root inside; its exit code and stderr.
fn exec_root(d: &agentd_tests::daemon::Daemon, id: &str, script: &str) -> (i64, String) {
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"command": ["sh", "-c", script], "uid": 0, "timeout_secs": 60})),
    );
    assert_eq!(r.status, 200, "exec: {}", r.text());
    let (mut code, mut err) = (-1, String::new());
    for line in r.text().lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        match v["stream"].as_str() {
            Some("stderr") => err.push_str(v["data"].as_str().unwrap()),
            Some(_) => {}
            None => code = v["exit_code"].as_i64().unwrap_or(-1),
        }
    }
    (code, err)
}

/// Snapshots (`POST /v1/sandboxes/{id}/snapshot`): a fork's files (the fork layer it stands
/// on and its own writes) become an image; a sandbox of that image sees them as the fork did:
/// new files with their owners, hard links, symlinks and FIFOs, deleted image files gone, a
/// directory replaced wholesale (opaque) without the old entries; the base image is unchanged;
/// the scratch copy is gone afterwards; a taken name, a bad name and a stopped sandbox say why.
#[test]
fn test_snapshot_stores_a_sandboxs_files_as_an_image() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let gateway = agentd_tests::registry::free_port().to_string();
    let d = agentd_tests::daemon::Daemon::start(&images, &["--gateway-port", &gateway]);
    // The image store is shared by the test run: a failed earlier run may have left the image.
    d.call("DELETE", "/v1/images/localhost/snap-test:v1", None);
    let parent = plain(&d, json!({"limits": {"memory": "256m"}}));
    d.wait_state(&parent, "ready", Duration::from_secs(60));
    let (code, err) = exec_root(
        &d,
        &parent,
        "mkdir -p /opt/d && echo a > /opt/d/a && echo b > /opt/d/b && echo g > /home/agent/gone && test -e /etc/issue",
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = d.exec(
        &parent,
        &["sh", "-c", "echo mine > /home/agent/mine; id -u"],
    );
    assert_eq!(code, 0, "{err}");
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{parent}/fork"),
        Some(json!({"count": 1})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let fork = r.json()["sandboxes"][0]["id"].as_str().unwrap().to_string();
    d.wait_state(&fork, "ready", Duration::from_secs(60));
    let (code, err) = exec_root(
        &d,
        &fork,
        "rm /home/agent/gone /etc/issue && rm -rf /opt/d && mkdir /opt/d && echo c > /opt/d/c \
         && echo new > /home/agent/new && ln /home/agent/new /home/agent/hard \
         && ln -s new /home/agent/link && mkfifo /home/agent/fifo \
         && dd if=/dev/urandom of=/home/agent/big bs=1M count=100 status=none",
    );
    assert_eq!(code, 0, "{err}");

    let t = Instant::now();
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{fork}/snapshot"),
        Some(json!({"name": "snap-test:v1"})),
    );
    let took = t.elapsed();
    assert_eq!(r.status, 201, "{}\n{}", r.text(), d.log());
    let v = r.json();
    eprintln!(
        "snapshot of a fork with 100 MB written: {:.0} ms over the API, frozen {:.0} ms while {} files ({} bytes) were copied; image {} bytes",
        took.as_secs_f64() * 1000.0,
        v["frozen_ms"],
        v["files"],
        v["bytes"],
        v["image"]["size"]
    );
    assert_eq!(v["image"]["name"], "localhost/snap-test:v1", "{v:#}");
    assert_eq!(
        v["layers_added"], 2,
        "the fork layer and the fork's own: {v:#}"
    );
    // The scratch copy is gone; the fork layer stays while the fork stands on it.
    let layers = std::fs::read_dir(d.state.path().join("forks"))
        .unwrap()
        .count();
    assert_eq!(layers, 1, "the snapshot's copy outlived it");
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{fork}/snapshot"),
        Some(json!({"name": "snap-test:v1"})),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("exists"), "{}", r.text());
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{fork}/snapshot"),
        Some(json!({"name": "Not A Name!"})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = d.call("GET", "/v1/images", None).json();
    assert!(
        r["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "localhost/snap-test:v1"),
        "{r:#}"
    );

    let r = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"image": "localhost/snap-test:v1", "opencode": false, "limits": {"memory": "256m"}})),
    );
    assert_eq!(r.status, 201, "{}\n{}", r.text(), d.log());
    let child = r.json()["id"].as_str().unwrap().to_string();
    d.wait_state(&child, "ready", Duration::from_secs(60));
    let (code, out, err) = d.exec(
        &child,
        &[
            "sh",
            "-c",
            "cat /home/agent/mine /home/agent/new; stat -c '%u %h' /home/agent/mine /home/agent/hard; \
             readlink /home/agent/link; test -p /home/agent/fifo && echo fifo; ls /opt/d; \
             test -e /home/agent/gone || echo gone-is-gone; test -e /etc/issue || echo issue-is-gone; \
             stat -c %s /home/agent/big",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let uid = d.exec(&parent, &["id", "-u"]).1.trim().to_string();
    assert_eq!(
        out,
        format!("mine\nnew\n{uid} 1\n0 2\nnew\nfifo\nc\ngone-is-gone\nissue-is-gone\n104857600\n"),
        "the image's files differ from the fork's"
    );
    // The base image is unchanged.
    let other = plain(&d, json!({"limits": {"memory": "256m"}}));
    d.wait_state(&other, "ready", Duration::from_secs(60));
    let (code, _, _) = d.exec(&other, &["test", "-e", "/etc/issue"]);
    assert_eq!(code, 0, "the base image lost /etc/issue");
    // A stopped sandbox has no files to take.
    let r = d.call("POST", &format!("/v1/sandboxes/{fork}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{fork}/snapshot"),
        Some(json!({"name": "snap-test:v2"})),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    d.delete_all_and_check_clean();
    let r = d.call("DELETE", "/v1/images/localhost/snap-test:v1", None);
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
}

/// The pool's view of `image`, once `ready` pooled sandboxes of it are ready, none starting,
/// and `refills` refills done (at most 3 min).
/// `image`'s pool as `GET /v1/pools` lists it (null when it is not listed).
fn pool_view(d: &agentd_tests::daemon::Daemon, image: &str) -> serde_json::Value {
    d.call("GET", "/v1/pools", None).json()["pools"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["image"] == image).cloned())
        .unwrap_or_default()
}

pub(crate) fn pool_when_ready(
    d: &agentd_tests::daemon::Daemon,
    image: &str,
    ready: u64,
    refills: u64,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let p = pool_view(d, image);
        if p["ready"].as_u64() == Some(ready)
            && p["starting"].as_u64() == Some(0)
            && p["refills"].as_u64() >= Some(refills)
        {
            return p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the pool never had {ready} ready: {p:#}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A host cgroup file of sandbox `id` under the daemon's parent, v1 or v2.
fn cgroup_file(d: &agentd_tests::daemon::Daemon, id: &str, controller: &str, file: &str) -> String {
    cgroup_files(d, id, controller, file, file)
        .unwrap_or_else(|e| panic!("{controller}/{file} of {id}: {e}"))
}

/// As [`cgroup_file`] where v1 and v2 name the file differently; an error when neither is
/// there (the cgroup is gone).
fn cgroup_files(
    d: &agentd_tests::daemon::Daemon,
    id: &str,
    controller: &str,
    v1_file: &str,
    v2_file: &str,
) -> std::io::Result<String> {
    let parent = &d.cgroup_parent;
    std::fs::read_to_string(format!(
        "/sys/fs/cgroup/{controller}/{parent}/{id}/{v1_file}"
    ))
    .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/{parent}/{id}/{v2_file}")))
    .map(|s| s.trim().to_string())
}

/// Warm pools: `--warm-pool opencode=1` keeps one OpenCode sandbox ready and paused, hidden
/// from the sandbox list; a create that asks for nothing the pool cannot give takes it at
/// once (timed) with its own name, labels, limits (in the cgroup), model (the gateway sends
/// the sandbox's requests to it) and token count from zero; the pool refills with another
/// sandbox; a create with its own environment is not served from the pool; hits, misses and
/// refills show in `/v1/pools` and `/metrics`; size 0 empties the pool and leaves nothing.
#[test]
fn test_warm_pool_claims_are_the_claimers_alone() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let llm = agentd_tests::daemon::MockLlm::start("echo pooled > /home/agent/pooled.txt");
    let gateway = agentd_tests::registry::free_port().to_string();
    let mut d = agentd_tests::daemon::Daemon::start(
        &images,
        &[
            "--llm-base-url",
            &llm.base_url,
            "--gateway-port",
            &gateway,
            "--warm-pool",
            "opencode=1",
        ],
    );
    let t0 = Instant::now();
    let p = pool_when_ready(&d, "opencode", 1, 1);
    eprintln!("[{:?}] pool ready: {p}", t0.elapsed());
    assert_eq!(p["size"], 1, "{p:#}");
    assert!(p["last_refill_ms"].as_u64().is_some(), "{p:#}");
    // Warmed up (the gateway answered its prompt), not pooled cold.
    assert_eq!(p["warm_up_failures"], 0, "{p:#}");
    assert_eq!(p["last_warm_up_error"], serde_json::Value::Null, "{p:#}");
    let listed = d.call("GET", "/v1/sandboxes", None).json();
    assert_eq!(listed["sandboxes"], json!([]), "a pooled sandbox is listed");

    // agentd killed (-9) and started again keeps the pooled sandbox ready (paused): its
    // OpenCode is not checked again (it cannot answer, frozen) nor replaced.
    d.restart(libc::SIGKILL);
    let p = pool_view(&d, "opencode");
    assert_eq!(
        (p["ready"].as_u64(), p["starting"].as_u64()),
        (Some(1), Some(0)),
        "after a restart: {p:#}\n{}",
        d.log()
    );

    // Bad pool requests say why.
    let r = d.call(
        "PUT",
        "/v1/pools",
        Some(json!({"image": "no-such-image", "size": 1})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("unknown image"), "{}", r.text());
    let r = d.call(
        "PUT",
        "/v1/pools",
        Some(json!({"image": "opencode", "size": 100000})),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    let t = Instant::now();
    let r = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({
            "name": "mine", "labels": {"team": "x"}, "model": "mock-large",
            "limits": {"memory": "1536m", "cpus": 1.5, "pids": 300}
        })),
    );
    let took = t.elapsed();
    assert_eq!(r.status, 201, "{}\n{}", r.text(), d.log());
    let v = r.json();
    eprintln!(
        "warm pool: claimed create -> OpenCode ready {:.1} ms over the socket",
        took.as_secs_f64() * 1000.0
    );
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["state"], "ready", "{v:#}");
    assert_eq!(v["paused"], false, "{v:#}");
    assert_eq!(v["name"], "mine", "{v:#}");
    assert_eq!(v["labels"], json!({"team": "x"}), "{v:#}");
    assert_eq!(v["usage"]["prompt_tokens"], 0, "{v:#}");
    assert_eq!(v["limits"]["memory_bytes"], 1536u64 << 20, "{v:#}");
    // The limits are the kernel's, not only the record's.
    assert_eq!(
        cgroup_file(&d, &id, "memory", "memory.limit_in_bytes"),
        (1536u64 << 20).to_string()
    );
    assert_eq!(cgroup_file(&d, &id, "pids", "pids.max"), "300");
    assert_eq!(cgroup_file(&d, &id, "cpu", "cpu.cfs_quota_us"), "150000");
    let listed = d.call("GET", "/v1/sandboxes", None).json();
    assert_eq!(
        listed["sandboxes"].as_array().unwrap().len(),
        1,
        "{listed:#}"
    );

    // Its OpenCode works for the claimer, through the gateway, with the claimer's model.
    super::prompt_until_idle(&d, &id, "write the file");
    let (code, out, err) = d.exec(&id, &["cat", "/home/agent/pooled.txt"]);
    assert_eq!((code, out.trim()), (0, "pooled"), "{err}");
    let models: Vec<String> = llm
        .requests_seen()
        .iter()
        .filter_map(|r| r["model"].as_str().map(str::to_string))
        .collect();
    assert!(!models.is_empty());
    assert!(
        models.iter().all(|m| m == "mock-large"),
        "the gateway did not send the claimer's model: {models:?}"
    );
    let v = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() >= 42, "{v:#}");

    // Refilled with another sandbox, which is not the claimed one (counted since the
    // restart).
    eprintln!("[{:?}] prompt done", t0.elapsed());
    let p = pool_when_ready(&d, "opencode", 1, 1);
    eprintln!("[{:?}] refilled: {p}", t0.elapsed());
    assert_eq!(
        (p["hits"].as_u64(), p["refills"].as_u64()),
        (Some(1), Some(1)),
        "{p:#}"
    );
    // A create with an environment of its own is no claim: it makes its own sandbox.
    let r = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"opencode": false, "env": {"A": "1"}, "limits": {"memory": "256m"}})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let own = r.json();
    assert_eq!(own["state"], "ready", "{own:#}");
    let p = pool_when_ready(&d, "opencode", 1, 1);
    assert_eq!(p["hits"], 1, "{p:#}");
    let metrics = d.call("GET", "/metrics", None).text();
    for line in [
        "agentd_pool_hits_total{image=\"opencode\"} 1",
        "agentd_pool_ready{image=\"opencode\"} 1",
        "agentd_pool_refill_seconds_count{image=\"opencode\"} 1",
    ] {
        assert!(metrics.contains(line), "no {line} in\n{metrics}");
    }
    // The pooled one waits frozen.
    assert!(metrics.contains("agentd_sandboxes_paused 1"), "{metrics}");

    // Emptied: the pooled sandbox goes; the claimed one stays the claimer's.
    let r = d.call(
        "PUT",
        "/v1/pools",
        Some(json!({"image": "opencode", "size": 0})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let p = pool_when_ready(&d, "opencode", 0, 1);
    eprintln!("[{:?}] emptied", t0.elapsed());
    assert_eq!(p["size"], 0, "{p:#}");
    let v = d.call("GET", "/v1/sandboxes/mine", None).json();
    assert_eq!(v["state"], "ready", "{v:#}");
    d.delete_all_and_check_clean();
}

/// `--memory-merge` marks every process of a sandbox mergeable by KSM (the kernel says so in
/// `/proc/PID/ksm_stat`), and nothing of the host's: not agentd; without it, nothing is.
#[test]
fn test_memory_merge_marks_only_the_sandboxes() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    if !std::path::Path::new("/proc/self/ksm_stat").exists() {
        eprintln!("SKIPPED: this kernel has no /proc/PID/ksm_stat (KSM, Linux 6.8+)");
        agentd_tests::required_or_skip();
        return;
    }
    for (flag, inside) in [("true", "yes"), ("false", "no")] {
        let d = small_daemon(&images, &["--memory-merge", flag]);
        let id = plain(&d, json!({"limits": {"memory": "256m"}}));
        d.wait_state(&id, "ready", Duration::from_secs(60));
        // A process exec'd into it later, from inside; every process of its cgroup (its
        // init: non-dumpable, so read from the host).
        let (code, out, err) = d.exec(&id, &["grep", "ksm_merge_any", "/proc/self/ksm_stat"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out.trim(),
            format!("ksm_merge_any: {inside}"),
            "--memory-merge {flag}"
        );
        let procs = cgroup_file(&d, &id, "pids", "cgroup.procs");
        assert!(!procs.is_empty());
        for pid in procs.lines() {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/ksm_stat")).unwrap();
            assert!(
                stat.contains(&format!("ksm_merge_any: {inside}")),
                "--memory-merge {flag}, pid {pid}: {stat}"
            );
        }
        let host = std::fs::read_to_string(format!("/proc/{}/ksm_stat", d.pid().unwrap())).unwrap();
        assert!(host.contains("ksm_merge_any: no"), "agentd itself: {host}");
        d.delete_all_and_check_clean();
    }
}

/// `--opencode-jit false` runs OpenCode interpreted (`BUN_JSC_useJIT=0` in its environment,
/// read from the host) and it still comes up ready; a sandbox's own `env` can turn the JIT back
/// on. (What it saves is measured by `cargo xtask bench density`.)
#[test]
fn test_opencode_without_jit() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = small_daemon(
        &images,
        &[
            "--opencode-jit",
            "false",
            "--llm-base-url",
            "http://127.0.0.1:9/v1",
        ],
    );
    let mut ids = Vec::new();
    for env in [json!({}), json!({"BUN_JSC_useJIT": "1"})] {
        let r = d.call(
            "POST",
            "/v1/sandboxes",
            Some(json!({"image": "opencode", "env": env, "limits": {"memory": "1g"}})),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    for (id, want) in ids.iter().zip(["BUN_JSC_useJIT=0", "BUN_JSC_useJIT=1"]) {
        let v = d.wait_state(id, "ready", Duration::from_secs(120));
        assert_eq!(v["state"], "ready", "{v:#}");
        let procs = cgroup_file(&d, id, "pids", "cgroup.procs");
        let opencode: Vec<String> = procs
            .lines()
            .filter_map(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                cmd.starts_with(b"opencode")
                    .then(|| std::fs::read(format!("/proc/{pid}/environ")).ok())
                    .flatten()
            })
            .map(|env| {
                env.split(|b| *b == 0)
                    .filter(|kv| kv.starts_with(b"BUN_JSC_useJIT="))
                    .map(|kv| String::from_utf8_lossy(kv).into_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        assert_eq!(opencode, [want], "{id}: OpenCode's environment");
    }
    d.delete_all_and_check_clean();
}

/// A pool set to 0 while its refill is starting lets that sandbox go, and that is no failed
/// refill: no `last_error`, no refill failure counted (it was one, with a 30 s retry delay).
#[test]
fn test_a_pool_shrunk_while_it_refills_counts_no_failure() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let d = small_daemon(
        &images,
        &[
            "--llm-base-url",
            "http://127.0.0.1:9/v1",
            "--sandbox-memory",
            "1g",
        ],
    );
    let set = |size: u32| {
        let r = d.call(
            "PUT",
            "/v1/pools",
            Some(json!({"image": "opencode", "size": size})),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    };
    let pool = || pool_view(&d, "opencode");
    set(1);
    // Its OpenCode takes about 3 s to start: caught while it does.
    let t = Instant::now();
    while pool()["starting"].as_u64() != Some(1) {
        assert!(t.elapsed() < Duration::from_secs(60), "{:#}", pool());
        std::thread::sleep(Duration::from_millis(20));
    }
    set(0);
    let t = Instant::now();
    while pool()["starting"].as_u64() != Some(0) {
        assert!(t.elapsed() < Duration::from_secs(60), "{:#}", pool());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The refill's end is counted right after the sandbox ends.
    std::thread::sleep(Duration::from_secs(2));
    let p = pool();
    assert_eq!(p["last_error"], serde_json::Value::Null, "{p:#}");
    assert_eq!(p["refills"], 0, "{p:#}");
    let metrics = d.call("GET", "/metrics", None).text();
    let line = "agentd_pool_refill_failures_total{image=\"opencode\"} 0";
    assert!(metrics.contains(line), "no {line} in\n{metrics}");
    d.delete_all_and_check_clean();
}

/// Pools live within the quotas: with room for two sandboxes, a pool of 2 takes both; a
/// create that needs room (it is no claim: it has an environment of its own) gets it from a
/// pooled sandbox instead of a 429, and the pool's refill then waits for room and says why.
#[test]
fn test_a_create_takes_the_room_of_a_pooled_sandbox() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    // No upstream: a pool's warm-up is answered by agentd's gateway itself.
    let d = small_daemon(
        &images,
        &[
            "--llm-base-url",
            "http://127.0.0.1:9/v1",
            "--sandbox-memory",
            "1g",
            "--warm-pool",
            "opencode=2",
        ],
    );
    let p = pool_when_ready(&d, "opencode", 2, 2);
    assert_eq!(p["last_error"], serde_json::Value::Null, "{p:#}");
    let id = plain(
        &d,
        json!({"env": {"MINE": "1"}, "limits": {"memory": "256m"}}),
    );
    let v = d.wait_state(&id, "ready", Duration::from_secs(60));
    assert_eq!(v["state"], "ready", "{v:#}");
    let start = Instant::now();
    let p = loop {
        let v = d.call("GET", "/v1/pools", None).json();
        let p = v["pools"][0].clone();
        if p["ready"] == 1
            && p["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("max_sandboxes"))
        {
            break p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the pool did not give room and say why: {v:#}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(p["hits"], 0, "{p:#}");
    d.delete_all_and_check_clean();
}

/// The host pids of the OpenCode processes in sandbox `id`.
pub(crate) fn opencode_pids(d: &agentd_tests::daemon::Daemon, id: &str) -> Vec<String> {
    cgroup_file(d, id, "pids", "cgroup.procs")
        .lines()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"opencode"))
        })
        .map(str::to_string)
        .collect()
}

/// Whether sandbox `id`'s cgroup is gone or holds no OpenCode.
fn opencode_pids_gone(d: &agentd_tests::daemon::Daemon, id: &str) -> bool {
    cgroup_files(d, id, "pids", "cgroup.procs", "cgroup.procs").is_err()
        || opencode_pids(d, id).is_empty()
}

/// Bytes of memory the sandbox's cgroup is charged, v1 or v2.
fn memory_used(d: &agentd_tests::daemon::Daemon, id: &str) -> u64 {
    cgroup_files(d, id, "memory", "memory.usage_in_bytes", "memory.current")
        .unwrap_or_else(|e| panic!("memory of {id}: {e}"))
        .parse()
        .unwrap()
}

/// Hibernation (`POST .../hibernate`): the sandbox's OpenCode is stopped (its process gone,
/// the cgroup's memory falls by more than 100 MiB) and the rest paused; the next request
/// through the proxy starts OpenCode again, which still has the session made before; a file
/// and a background process of the sandbox carry over; `resume` wakes it too and says how
/// long OpenCode took; a process inside the sandbox cannot wake it (the signal is taken only
/// from the host); a hibernated sandbox stops and leaves nothing; a sandbox without OpenCode
/// cannot be hibernated; `idle_action: hibernate` hibernates an idle sandbox.
#[test]
fn test_hibernate_frees_opencode_and_any_use_wakes_it() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let mut d = small_daemon(&images, &["--llm-base-url", "http://127.0.0.1:9/v1"]);
    let r = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"image": "opencode", "limits": {"memory": "1g"}})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let v = d.wait_state(&id, "ready", Duration::from_secs(120));
    assert_eq!(v["state"], "ready", "{v:#}\n{}", d.log());
    let r = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/opencode/session"),
        Some(json!({"title": "kept across hibernation"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let session = r.json()["id"].as_str().unwrap().to_string();
    let (code, _, err) = d.exec(
        &id,
        &[
            "sh",
            "-c",
            "echo kept > /home/agent/file; (sleep 100000) </dev/null >/dev/null 2>&1 &",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let before = opencode_pids(&d, &id);
    assert_eq!(before.len(), 1, "{before:?}");
    std::thread::sleep(Duration::from_secs(2));
    let used_awake = memory_used(&d, &id);

    let r = d.call("POST", &format!("/v1/sandboxes/{id}/hibernate"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["sandbox"]["hibernated"], true, "{v:#}");
    assert_eq!(v["sandbox"]["paused"], true, "{v:#}");
    assert!(opencode_pids(&d, &id).is_empty(), "OpenCode still runs");
    let used_asleep = memory_used(&d, &id);
    eprintln!(
        "hibernate: OpenCode stopped in {} ms; the cgroup's memory {} MiB awake, {} MiB hibernated",
        v["stop_ms"],
        used_awake >> 20,
        used_asleep >> 20
    );
    assert!(
        used_asleep + (100 << 20) < used_awake,
        "memory did not fall: {used_awake} -> {used_asleep}"
    );
    let metrics = d.call("GET", "/metrics", None).text();
    assert!(
        metrics.contains("agentd_sandboxes_hibernated 1"),
        "{metrics}"
    );
    // The CLI's list says so too.
    let out = std::process::Command::new(agentd_tests::bin("agentd"))
        .args(["sandbox", "ls"])
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&id) && l.contains(" hibernated ")),
        "{}",
        agentd_tests::describe(&out)
    );
    // Hibernating again does nothing.
    let r = d.call("POST", &format!("/v1/sandboxes/{id}/hibernate"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["stop_ms"], 0.0);

    // An exec thaws the sandbox but leaves OpenCode asleep: it does not need it.
    let t = Instant::now();
    let (code, out, err) = d.exec(&id, &["cat", "/home/agent/file"]);
    assert_eq!((code, out.as_str()), (0, "kept\n"), "{err}");
    eprintln!(
        "an exec in a hibernated sandbox answered in {:?}",
        t.elapsed()
    );
    let view = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert_eq!(view["paused"], false, "{view:#}");
    assert_eq!(view["hibernated"], true, "{view:#}");
    assert!(opencode_pids(&d, &id).is_empty(), "an exec woke OpenCode");
    // Hibernating it again only freezes it.
    let r = d.call("POST", &format!("/v1/sandboxes/{id}/hibernate"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["stop_ms"], 0.0);
    assert_eq!(r.json()["sandbox"]["paused"], true, "{}", r.text());

    // agentd killed (-9) and started again finds it as it was: hibernated and paused.
    d.restart(libc::SIGKILL);
    let view = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert_eq!(
        (&view["state"], &view["paused"], &view["hibernated"]),
        (&json!("ready"), &json!(true), &json!(true)),
        "after a restart: {view:#}"
    );
    assert!(opencode_pids(&d, &id).is_empty(), "a restart woke OpenCode");

    // The next request through the proxy wakes it: the session is still there.
    let t = Instant::now();
    let r = d.call("GET", &format!("/v1/sandboxes/{id}/opencode/session"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    eprintln!("woken by a proxied request in {:?}", t.elapsed());
    assert!(r.text().contains(&session), "{}", r.text());
    let view = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert_eq!(view["hibernated"], false, "{view:#}");
    assert_eq!(view["paused"], false, "{view:#}");
    let after = opencode_pids(&d, &id);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after, before, "the same OpenCode process");
    let (code, out, err) = d.exec(
        &id,
        &[
            "sh",
            "-c",
            "cat /home/agent/file; grep -qx sleep /proc/[0-9]*/comm && echo sleeping",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "kept\nsleeping\n");

    // From inside (root in the sandbox), the hibernate signal (SIGRTMIN+1, 35) is ignored:
    // OpenCode stays up.
    let (code, out) = exec_root(&d, &id, "kill -35 1 && kill -35 1 && echo sent >&2");
    assert_eq!((code, out.as_str()), (0, "sent\n"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        opencode_pids(&d, &id),
        after,
        "a sandbox process hibernated OpenCode"
    );

    // Resume wakes it too and says how long OpenCode took.
    let r = d.call("POST", &format!("/v1/sandboxes/{id}/hibernate"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = d.call("POST", &format!("/v1/sandboxes/{id}/resume"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v["opencode_ms"].as_f64().unwrap() > 0.0, "{v:#}");
    assert_eq!(v["sandbox"]["hibernated"], false, "{v:#}");
    eprintln!(
        "resume of a hibernated sandbox: OpenCode answered after {} ms",
        v["opencode_ms"]
    );

    // Hibernated, then stopped: at once, with nothing left (checked at the end).
    let r = d.call("POST", &format!("/v1/sandboxes/{id}/hibernate"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let t = Instant::now();
    let r = d.call("POST", &format!("/v1/sandboxes/{id}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    // Without waking OpenCode first (that alone takes seconds).
    eprintln!("a hibernated sandbox stopped in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(2), "stopped slowly");
    assert!(
        opencode_pids_gone(&d, &id),
        "OpenCode was woken to be stopped"
    );
    let view = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert_eq!(view["hibernated"], false, "a stopped sandbox: {view:#}");

    // Only OpenCode sandboxes hibernate.
    let plain_id = plain(&d, json!({"limits": {"memory": "256m"}}));
    d.wait_state(&plain_id, "ready", Duration::from_secs(60));
    let r = d.call("POST", &format!("/v1/sandboxes/{plain_id}/hibernate"), None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("pause it instead"), "{}", r.text());

    // Idle: hibernated, then stopped at twice the timeout.
    let r = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"image": "opencode", "limits": {"memory": "1g"},
                    "idle_timeout_secs": 4, "idle_action": "hibernate"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let idle = r.json()["id"].as_str().unwrap().to_string();
    d.wait_state(&idle, "ready", Duration::from_secs(120));
    let t = Instant::now();
    loop {
        // The view says hibernated from the start of the hibernation (a request then waits
        // for it to end, and wakes OpenCode); OpenCode is gone a moment later.
        let v = d.call("GET", &format!("/v1/sandboxes/{idle}"), None).json();
        if v["hibernated"] == true && opencode_pids(&d, &idle).is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never hibernated when idle: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let v = d.wait_state(&idle, "stopped", Duration::from_secs(30));
    assert!(
        v["exit"]["reason"].as_str().unwrap_or("").contains("idle"),
        "{v:#}"
    );
    d.delete_all_and_check_clean();
}
