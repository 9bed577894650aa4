//! The shim: background sandboxes with a socket, exec, kill, wait, delete, survival of the
//! starter's death, and cleanup after the shim itself died badly.

use std::time::Duration;

use agentd_runtime::{ExecRequest, SandboxSpec, SandboxStatus};
use agentd_tests::{busybox_rootfs, require_sandbox_support, Scope};

#[test]
fn test_exec_kill_wait_delete() {
    require_sandbox_support!();
    let scope = Scope::new("exec");
    let rootfs = busybox_rootfs();
    let runtime = scope.runtime();
    let spec = SandboxSpec::new(vec!["sleep".into(), "60".into()]);
    let client = runtime.create("exec1", &rootfs.path, &spec, None).unwrap();
    assert!(matches!(client.state().unwrap().1, SandboxStatus::Running));

    let req = ExecRequest {
        args: vec![
            "sh".into(),
            "-c".into(),
            "echo out-$FOO; echo err >&2; grep Seccomp: /proc/self/status; cat /proc/self/uid_map; grep CapEff /proc/self/status; exit 7".into(),
        ],
        env: vec!["FOO=bar".into()],
        ..Default::default()
    };
    let (status, out, err) = client.exec_output(req).unwrap();
    let out = String::from_utf8_lossy(&out);
    assert_eq!(status.code, 7);
    assert!(out.contains("out-bar"), "{out}");
    assert!(
        out.contains("Seccomp:\t2"),
        "exec'd processes get the filter too: {out}"
    );
    assert_eq!(String::from_utf8_lossy(&err).trim(), "err");
    // The exec'd process is in the sandbox's user namespace (libcontainer's exec alone would
    // leave it in the host's), as root inside with the default capabilities only.
    let map = out
        .lines()
        .find(|l| l.split_whitespace().count() == 3)
        .unwrap_or_default();
    let fields: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"0"), "{out}");
    assert_ne!(
        fields.get(1),
        Some(&"0"),
        "exec'd process in the host's user namespace: {out}"
    );
    assert!(out.contains("CapEff:\t00000000800405fb"), "{out}");

    // An exec of a missing command is an error status, not a hang.
    let (status, _, err) = client
        .exec_output(ExecRequest {
            args: vec!["nope".into()],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(status.code, 127, "{}", String::from_utf8_lossy(&err));

    // SIGTERM reaches the command through PID 1: 128 + 15.
    client.kill(15).unwrap();
    let exit = client.wait().unwrap();
    assert_eq!(exit.code, 143);
    assert!(!exit.oom_killed);
    assert!(matches!(
        client.state().unwrap().1,
        SandboxStatus::Exited(_)
    ));
    assert!(client
        .exec_output(ExecRequest {
            args: vec!["true".into()],
            ..Default::default()
        })
        .is_err());
    client.delete().unwrap();
    scope.assert_clean();
}

#[test]
fn test_sandbox_output_goes_to_log_files() {
    require_sandbox_support!();
    let scope = Scope::new("logs");
    let rootfs = busybox_rootfs();
    let runtime = scope.runtime();
    let spec = SandboxSpec::new(vec![
        "sh".into(),
        "-c".into(),
        "echo to-stdout; echo to-stderr >&2; sleep 30".into(),
    ]);
    let client = runtime.create("logs", &rootfs.path, &spec, None).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let dir = runtime.sandbox_dir("logs");
    let out = std::fs::read_to_string(dir.join(agentd_runtime::layout::STDOUT)).unwrap();
    let err = std::fs::read_to_string(dir.join("stderr.log")).unwrap();
    client.delete().unwrap();
    assert_eq!(out, "to-stdout\n");
    assert_eq!(err, "to-stderr\n");
    scope.assert_clean();
}

#[test]
fn test_sandbox_survives_its_starter() {
    require_sandbox_support!();
    let scope = Scope::new("survive");
    let rootfs = busybox_rootfs();
    // A separate process starts the sandbox and is then SIGKILLed.
    let mut starter = std::process::Command::new(agentd_tests::bin("start-sandbox"))
        .arg(scope.state.path())
        .arg(&scope.cgroup_parent)
        .arg(&rootfs.path)
        .arg("survivor")
        .env("AGENTD_SHIM", agentd_tests::bin("agentd-shim"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(starter.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "started");
    starter.kill().unwrap();
    starter.wait().unwrap();
    let client = scope.runtime().client("survivor");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        matches!(client.state().unwrap().1, SandboxStatus::Running),
        "the sandbox must outlive its starter"
    );
    let (status, out, _) = client
        .exec_output(ExecRequest {
            args: vec!["echo".into(), "alive".into()],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        (status.code, String::from_utf8_lossy(&out).trim()),
        (0, "alive")
    );
    client.delete().unwrap();
    scope.assert_clean();
}

#[test]
fn test_cleanup_after_the_shim_died() {
    require_sandbox_support!();
    let scope = Scope::new("deadshim");
    let rootfs = busybox_rootfs();
    let runtime = scope.runtime();
    let spec = SandboxSpec::new(vec!["sleep".into(), "60".into()]);
    let client = runtime
        .create("deadshim", &rootfs.path, &spec, None)
        .unwrap();
    let (init_pid, _) = client.state().unwrap();
    // Find the shim: the parent of the sandbox's init.
    let stat = std::fs::read_to_string(format!("/proc/{init_pid}/stat")).unwrap();
    let ppid: i32 = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ppid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(client.state().is_err(), "the shim is dead");
    assert!(
        !scope.leftovers().is_empty(),
        "the dead shim left its sandbox behind"
    );
    runtime.cleanup("deadshim").unwrap();
    // Gone, or a zombie waiting for the host's init (its new parent) to reap it.
    let stat = std::fs::read_to_string(format!("/proc/{init_pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .map(|r| r.1.trim_start().chars().next().unwrap_or('?'));
    assert!(
        matches!(state, None | Some('Z') | Some('X')),
        "the sandbox's processes must be dead: {stat}"
    );
    scope.assert_clean();
}

#[test]
fn test_create_failures_leave_nothing() {
    require_sandbox_support!();
    let scope = Scope::new("fail");
    let rootfs = busybox_rootfs();
    let runtime = scope.runtime();
    // A bind target missing from the read-only rootfs makes libcontainer fail mid-way.
    let mut spec = SandboxSpec::new(vec!["true".into()]);
    spec.mounts.push(agentd_runtime::BindMount {
        source: "/tmp".into(),
        target: "/no/such/dir".into(),
        readonly: true,
    });
    let err = runtime
        .create("fail1", &rootfs.path, &spec, None)
        .unwrap_err();
    assert!(!err.to_string().is_empty());
    // An id that is not path-safe is refused up front.
    assert!(runtime
        .create(
            "../x",
            &rootfs.path,
            &SandboxSpec::new(vec!["true".into()]),
            None
        )
        .is_err());
    // A duplicate id is refused and the first sandbox is untouched.
    let c = runtime
        .create(
            "dup",
            &rootfs.path,
            &SandboxSpec::new(vec!["sleep".into(), "30".into()]),
            None,
        )
        .unwrap();
    let err = runtime
        .create(
            "dup",
            &rootfs.path,
            &SandboxSpec::new(vec!["true".into()]),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert!(matches!(c.state().unwrap().1, SandboxStatus::Running));
    c.delete().unwrap();
    scope.assert_clean();
}

#[test]
fn test_output_goes_to_caller_fds() {
    require_sandbox_support!();
    let scope = Scope::new("fds");
    let rootfs = busybox_rootfs();
    let runtime = scope.runtime();
    let (out_r, out_w) = nix::unistd::pipe().unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    let err = null.try_clone().unwrap();
    let spec = SandboxSpec::new(vec!["echo".into(), "via-fd".into()]);
    let client = runtime
        .create_with_fds("fds", &rootfs.path, &spec, null.into(), out_w, err.into())
        .unwrap();
    let status = client.wait().unwrap();
    client.delete().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(out_r), &mut out).unwrap();
    assert_eq!(status.code, 0);
    assert_eq!(out, "via-fd\n");
    scope.assert_clean();
}

/// The host uid range the sandbox's root maps to, read from the host.
fn host_uid_base(client: &agentd_runtime::ShimClient) -> u32 {
    let (pid, _) = client.state().unwrap();
    let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    map.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn test_sandboxes_get_distinct_host_id_ranges() {
    require_sandbox_support!();
    let scope = Scope::new("idranges");
    let rootfs = busybox_rootfs();
    let runtime = scope.runtime();
    let spec = SandboxSpec::new(vec!["sleep".into(), "60".into()]);
    let a = runtime.create("ida", &rootfs.path, &spec, None).unwrap();
    let b = runtime.create("idb", &rootfs.path, &spec, None).unwrap();
    let (base_a, base_b) = (host_uid_base(&a), host_uid_base(&b));
    assert_eq!(base_a, 100_000);
    assert_eq!(
        base_b, 165_536,
        "the second sandbox must not share the first's host ids"
    );
    // A freed range is handed out again.
    a.delete().unwrap();
    let c = runtime.create("idc", &rootfs.path, &spec, None).unwrap();
    assert_eq!(host_uid_base(&c), 100_000);
    // An explicit mapping is kept as given.
    let mut fixed = spec.clone();
    fixed.uid_map = Some(agentd_runtime::IdMap::unprivileged(300_000));
    fixed.gid_map = fixed.uid_map;
    let d = runtime.create("idd", &rootfs.path, &fixed, None).unwrap();
    assert_eq!(host_uid_base(&d), 300_000);
    for s in [b, c, d] {
        s.delete().unwrap();
    }
    scope.assert_clean();
}

/// Waits until the shim says the command sleeps (or not), at most 10 s.
fn until_asleep(client: &agentd_runtime::ShimClient, want: bool) -> Duration {
    let t = std::time::Instant::now();
    while client.asleep().unwrap() != want {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "asleep never became {want}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

/// Hibernation at the runtime's level: PID 1 stops the command on `hibernate` and keeps the
/// sandbox (an exec still runs in it, the command's files stay), starts it again with the same
/// arguments on `wake`; a command that ignores SIGTERM is killed when asked again; SIGTERM to
/// a sandbox whose command sleeps ends it (143); nothing is left.
#[test]
fn test_hibernate_and_wake_the_command() {
    require_sandbox_support!();
    let scope = Scope::new("hibernate");
    let rootfs = busybox_rootfs();
    let runtime = scope.runtime();
    let spec = SandboxSpec::new(vec![
        "sh".into(),
        "-c".into(),
        "echo started >> /tmp/starts; trap '' TERM; while :; do sleep 1; done".into(),
    ]);
    let client = runtime.create("hib1", &rootfs.path, &spec, None).unwrap();
    let starts = |client: &agentd_runtime::ShimClient| {
        let (status, out, err) = client
            .exec_output(ExecRequest {
                args: vec!["cat".into(), "/tmp/starts".into()],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(status.code, 0, "{}", String::from_utf8_lossy(&err));
        String::from_utf8_lossy(&out).lines().count()
    };
    let t = std::time::Instant::now();
    while starts(&client) != 1 {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!client.asleep().unwrap());

    // It ignores SIGTERM: still awake half a second after the first ask, asleep after the
    // second (SIGKILL).
    client.hibernate().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !client.asleep().unwrap(),
        "a command that ignores SIGTERM was stopped"
    );
    client.hibernate().unwrap();
    until_asleep(&client, true);
    // The sandbox is still there: an exec runs, the command's file stays.
    assert_eq!(starts(&client), 1);
    assert!(matches!(client.state().unwrap().1, SandboxStatus::Running));

    // Woken: the same command again.
    client.wake().unwrap();
    until_asleep(&client, false);
    let t = std::time::Instant::now();
    while starts(&client) != 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the command did not start again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second wake while it runs does nothing.
    client.wake().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(starts(&client), 2);

    // Asleep, SIGTERM ends the sandbox.
    client.hibernate().unwrap();
    client.hibernate().unwrap();
    until_asleep(&client, true);
    client.kill(15).unwrap();
    let exit = client.wait().unwrap();
    assert_eq!(exit.code, 143);
    client.delete().unwrap();
    scope.assert_clean();
}
