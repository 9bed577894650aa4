//! Cgroup limits, observed from the host and from inside: memory (OOM kill reported), pids
//! (a fork bomb is contained), cpu (quota throttles), and stats read back. These run on
//! whichever cgroup version the host has: v1 here, v2 inside `cargo xtask vm-test`.

use std::time::{Duration, Instant};

use agentd_tests::{busybox_rootfs, describe, parse_report, require_sandbox_support, Scope};

#[test]
fn test_cgroup_version_is_the_expected_one() {
    // vm-test sets AGENTD_EXPECT_CGROUP=v2, so a guest that silently fell back to v1 fails here.
    let version = agentd_runtime::cgroups::detect();
    eprintln!("cgroup version: {version:?}");
    match std::env::var("AGENTD_EXPECT_CGROUP").as_deref() {
        Ok("v2") => assert_eq!(version, agentd_runtime::CgroupVersion::V2),
        Ok("v1") => assert_eq!(version, agentd_runtime::CgroupVersion::V1),
        _ => {}
    }
}

#[test]
fn test_memory_limit_oom_kill_is_reported() {
    require_sandbox_support!();
    let scope = Scope::new("oom");
    let rootfs = busybox_rootfs();
    let out = scope.agentd_run(
        &rootfs.path,
        &["--memory", "64m"],
        &["sh", "-c", "cat /dev/zero | head -c 200m | tail"],
    );
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("out of memory"),
        "{}",
        describe(&out)
    );
    scope.assert_clean();
}

#[test]
fn test_memory_limit_kills_the_probe() {
    require_sandbox_support!();
    let scope = Scope::new("oomprobe");
    let rootfs = busybox_rootfs();
    let out = scope.agentd_run(
        &rootfs.path,
        &["--memory", "32m"],
        &["/probe", "alloc", "256"],
    );
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    // The same allocation fits without the limit.
    let out = scope.agentd_run(&rootfs.path, &[], &["/probe", "alloc", "64"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(parse_report(&out.stdout)["allocated_mib"], "64");
    scope.assert_clean();
}

#[test]
fn test_pids_limit_contains_a_fork_bomb() {
    require_sandbox_support!();
    let scope = Scope::new("forkbomb");
    let rootfs = busybox_rootfs();
    let runtime = scope.runtime();
    let mut spec =
        agentd_runtime::SandboxSpec::new(vec!["/probe".into(), "forkbomb".into(), "60".into()]);
    spec.limits.pids = Some(64);
    let client = runtime
        .create("forkbomb", &rootfs.path, &spec, None)
        .unwrap();
    // Sample until the bomb has pressed against the limit for a while (slow to get there under
    // the emulated VM of vm-test), or a generous deadline passes.
    let mut max_seen = 0;
    let started = Instant::now();
    let mut at_limit_since: Option<Instant> = None;
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(stats) = client.stats() {
            max_seen = max_seen.max(stats.pids);
        }
        if max_seen >= 48 {
            let since = *at_limit_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The host keeps working: we can still start processes here.
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());
    client.delete().unwrap();
    // It keeps forking, so it sits at the limit.
    assert!(
        max_seen >= 48,
        "the fork bomb should have reached the limit (max pids {max_seen})"
    );
    assert!(
        max_seen <= 64,
        "pids must stay within the limit, saw {max_seen}"
    );
    scope.assert_clean();
}

#[test]
fn test_cpu_quota_throttles() {
    require_sandbox_support!();
    let scope = Scope::new("cpu");
    let rootfs = busybox_rootfs();
    let out = scope.agentd_run(&rootfs.path, &["--cpus", "0.2"], &["/probe", "burn", "1.5"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let r = parse_report(&out.stdout);
    let cpu: f64 = r["cpu_seconds"].parse().unwrap();
    let wall: f64 = r["wall_seconds"].parse().unwrap();
    // 0.2 cores for 1.5 s is 0.3 s of CPU; allow scheduling slack but far below a full core.
    assert!(
        cpu / wall < 0.4,
        "cpu quota 0.2 must throttle: {cpu} s cpu in {wall} s"
    );
    assert!(cpu > 0.05, "the probe must have run: {cpu}");
    scope.assert_clean();
}

#[test]
fn test_stats_read_back() {
    require_sandbox_support!();
    let scope = Scope::new("stats");
    let rootfs = busybox_rootfs();
    let runtime = scope.runtime();
    let mut spec =
        agentd_runtime::SandboxSpec::new(vec!["/probe".into(), "burn".into(), "30".into()]);
    spec.limits.cpus = Some(0.5);
    spec.limits.memory_bytes = Some(128 << 20);
    let client = runtime.create("stats", &rootfs.path, &spec, None).unwrap();
    // Wait for a throttled period, some cpu time and both processes counted (slow to come
    // under vm-test's emulation: one CI run there read 1 task once the rest had come).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stats = client.stats().unwrap();
    while (stats.cpu_usec <= 50_000 || stats.cpu_throttled_periods == 0 || stats.pids < 2)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
        stats = client.stats().unwrap();
    }
    client.delete().unwrap();
    assert!(stats.memory_bytes > 0, "{stats:?}");
    assert!(stats.cpu_usec > 50_000, "{stats:?}");
    assert!(stats.pids >= 2, "init and the probe: {stats:?}");
    assert!(
        stats.cpu_throttled_periods > 0,
        "0.5 cores of a busy loop must be throttled: {stats:?}"
    );
    scope.assert_clean();
}
