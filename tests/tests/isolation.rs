//! Isolation properties, proven from inside a sandbox by the probe: namespaces, identity,
//! seccomp, capabilities, /sys, /dev, PID 1. Each test also checks that nothing is left.

use agentd_tests::{busybox_rootfs, describe, parse_report, require_sandbox_support, Scope};

#[test]
fn test_probe_report_shows_isolation() {
    require_sandbox_support!();
    let scope = Scope::new("report");
    let rootfs = busybox_rootfs();
    let out = scope.agentd_run(
        &rootfs.path,
        &["--hostname", "probe-host"],
        &["/probe", "report"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let r = parse_report(&out.stdout);
    // Host processes are invisible: only the init and the probe exist in the pid namespace.
    assert!(r["visible_pids"].parse::<u32>().unwrap() <= 3, "{r:?}");
    assert!(
        r["pid1"].contains("agentd-shim"),
        "PID 1 must be agentd's init: {r:?}"
    );
    assert_eq!(r["hostname"], "probe-host");
    assert_eq!(r["uid"], "0", "root inside");
    // Root inside is an unprivileged uid outside.
    assert_eq!(r["uid_map"], "0 100000 65536");
    assert_eq!(r["seccomp"], "2");
    assert_eq!(r["no_new_privs"], "1");
    // Reduced capabilities: no CAP_SYS_ADMIN (bit 21), no CAP_NET_RAW (13), no CAP_SYS_PTRACE (19).
    let bnd = u64::from_str_radix(&r["cap_bnd"], 16).unwrap();
    for bit in [21, 13, 19, 16, 17] {
        assert_eq!(
            bnd & (1 << bit),
            0,
            "capability bit {bit} must be dropped: {bnd:x}"
        );
    }
    assert_ne!(bnd, 0, "root inside keeps a reduced set");
    assert_eq!(r["sys_ro"], "true", "/sys must be read-only");
    assert_ne!(r["sys_write"], "ok");
    // Private /dev with only the expected nodes.
    let devs: Vec<&str> = r["dev"].split(',').collect();
    for must in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm",
    ] {
        assert!(devs.contains(&must), "/dev/{must} missing: {devs:?}");
    }
    for must_not in ["sda", "vda", "kmsg", "mem", "kvm"] {
        assert!(
            !devs.contains(&must_not),
            "/dev/{must_not} must not exist: {devs:?}"
        );
    }
    assert_eq!(r["kcore_size"], "0", "/proc/kcore must be masked");
    assert_eq!(r["tmp_writable"], "true");
    scope.assert_clean();
}

#[test]
fn test_denied_syscalls_fail_with_eperm() {
    require_sandbox_support!();
    let scope = Scope::new("syscalls");
    let rootfs = busybox_rootfs();
    let out = scope.agentd_run(&rootfs.path, &[], &["/probe", "syscalls"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let r = parse_report(&out.stdout);
    assert!(r.len() >= 21, "{r:?}");
    for (name, errno) in &r {
        assert_eq!(
            errno, "1",
            "{name} must fail with EPERM (1), got errno {errno}"
        );
    }
    scope.assert_clean();
}

/// Socket families nothing in a sandbox needs fail as if the kernel lacked them (AF_VSOCK
/// would reach the host VM's vsock ports around the netns); the ones programs use work.
#[test]
fn test_unneeded_socket_families_are_refused() {
    require_sandbox_support!();
    let scope = Scope::new("sockets");
    let rootfs = busybox_rootfs();
    let out = scope.agentd_run(&rootfs.path, &[], &["/probe", "sockets"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let r = parse_report(&out.stdout);
    let eafnosupport = libc::EAFNOSUPPORT.to_string();
    for family in ["vsock", "packet", "alg", "key", "appletalk"] {
        assert_eq!(r.get(family), Some(&eafnosupport), "{family}: {r:?}");
    }
    for family in ["unix", "inet", "netlink"] {
        assert_eq!(
            r.get(family).map(String::as_str),
            Some("0"),
            "{family}: {r:?}"
        );
    }
    scope.assert_clean();
}

#[test]
fn test_seccomp_filter_is_what_denies() {
    // With an empty profile, setns(-1) fails with EBADF and unshare(CLONE_NEWUSER) succeeds:
    // so the EPERMs of the default profile come from the filter, not from missing capabilities.
    require_sandbox_support!();
    let scope = Scope::new("nofilter");
    let rootfs = busybox_rootfs();
    let profile = scope
        .state
        .path()
        .join("..")
        .join(format!("empty-profile-{}.json", std::process::id()));
    std::fs::write(
        &profile,
        r#"{"comment":"test: allow everything","rules":[]}"#,
    )
    .unwrap();
    let runtime = scope.runtime();
    let mut spec = agentd_runtime::SandboxSpec::new(vec!["/probe".into(), "syscalls".into()]);
    spec.seccomp = agentd_runtime::SeccompProfile::File(profile.clone());
    let out_path = scope
        .state
        .path()
        .join("..")
        .join(format!("nofilter-out-{}", std::process::id()));
    let stdio = agentd_runtime::StdioConfig::Files {
        stdout: out_path.clone(),
        stderr: out_path.with_extension("err"),
    };
    let client = runtime
        .create("nofilter", &rootfs.path, &spec, Some(stdio))
        .unwrap();
    let status = client.wait().unwrap();
    client.delete().unwrap();
    let r = parse_report(&std::fs::read(&out_path).unwrap());
    let _ = std::fs::remove_file(&profile);
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(out_path.with_extension("err"));
    assert_eq!(status.code, 0);
    assert_eq!(
        r["setns"], "9",
        "setns(-1) without the filter is EBADF: {r:?}"
    );
    assert_eq!(
        r["unshare_newuser"], "0",
        "unshare(CLONE_NEWUSER) without the filter succeeds: {r:?}"
    );
    scope.assert_clean();
}

#[test]
fn test_pid1_reaps_zombies() {
    require_sandbox_support!();
    let scope = Scope::new("zombies");
    let rootfs = busybox_rootfs();
    let out = scope.agentd_run(&rootfs.path, &[], &["/probe", "zombies"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let r = parse_report(&out.stdout);
    assert_eq!(r["orphan_helper"], "true");
    assert_eq!(r["zombies"], "0", "PID 1 must reap re-parented orphans");
    scope.assert_clean();
}

#[test]
fn test_sandbox_root_is_unprivileged_on_host() {
    require_sandbox_support!();
    let scope = Scope::new("hostuid");
    let rootfs = busybox_rootfs();
    let runtime = scope.runtime();
    let spec = agentd_runtime::SandboxSpec::new(vec!["sleep".into(), "30".into()]);
    let client = runtime
        .create("hostuid", &rootfs.path, &spec, None)
        .unwrap();
    let (pid, _) = client.state().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let host_uids: Vec<u32> = uid_line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    client.delete().unwrap();
    assert!(
        host_uids.iter().all(|&u| u == 100_000),
        "sandbox root must be uid 100000 on the host: {uid_line}"
    );
    scope.assert_clean();
}

/// A network namespace made with `ip netns add`, with a dummy interface, deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new() -> Option<TestNetns> {
        let name = format!("agentd-test-{}", std::process::id());
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = TestNetns { name };
        let n = ns.name.as_str();
        assert!(ip(&[
            "-n", n, "link", "add", "agentd0", "type", "veth", "peer", "name", "agentd1"
        ]));
        assert!(ip(&[
            "-n",
            n,
            "addr",
            "add",
            "10.213.0.1/24",
            "dev",
            "agentd0"
        ]));
        assert!(ip(&["-n", n, "link", "set", "agentd0", "up"]));
        Some(ns)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn test_network_namespace_new_or_joined() {
    require_sandbox_support!();
    let Some(netns) = TestNetns::new() else {
        eprintln!("SKIPPED: needs `ip netns add` (iproute2)");
        agentd_tests::required_or_skip();
        return;
    };
    let scope = Scope::new("netns");
    let rootfs = busybox_rootfs();
    // Default: a new netns with only loopback.
    let out = scope.agentd_run(&rootfs.path, &[], &["cat", "/proc/net/dev"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let devs = String::from_utf8_lossy(&out.stdout);
    assert!(devs.contains("lo:") && !devs.contains("agentd0"), "{devs}");
    // Joined: the namespace's interfaces, which root inside cannot reconfigure.
    let path = netns.path();
    let out = scope.agentd_run(
        &rootfs.path,
        &["--netns", &path],
        &[
            "sh",
            "-c",
            "ip addr show agentd0; ls /sys/class/net; ip link set agentd0 down && echo CHANGED",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("10.213.0.1"), "{}", describe(&out));
    assert!(
        !text.contains("CHANGED"),
        "root inside must not reconfigure a host-owned netns: {}",
        describe(&out)
    );
    // A path that is not a netns is a clear error and leaves nothing behind.
    let out = scope.agentd_run(&rootfs.path, &["--netns", "/etc/hostname"], &["true"]);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("network namespace"),
        "{}",
        describe(&out)
    );
    scope.assert_clean();
}
