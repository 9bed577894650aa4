//! `agentd run`: exit statuses, stdio pass-through, options, bad input, and interruption.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use agentd_tests::{busybox_rootfs, describe, require_sandbox_support, Scope};

#[test]
fn test_exit_status_and_stdio_pass_through() {
    require_sandbox_support!();
    let scope = Scope::new("stdio");
    let rootfs = busybox_rootfs();
    let mut child = scope
        .agentd_run_command(
            &rootfs.path,
            &[],
            &[
                "sh",
                "-c",
                "read line; echo got:$line; echo oops >&2; exit 42",
            ],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(42), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got:hello\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    scope.assert_clean();
}

#[test]
fn test_options_env_workdir_bind_hostname() {
    require_sandbox_support!();
    let scope = Scope::new("opts");
    let rootfs = busybox_rootfs();
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("in.txt"), "from-host").unwrap();
    // The sandbox's root is uid 100000 on the host: it may write here only because of 0777.
    std::fs::set_permissions(
        host.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let bind_rw = format!("{}:/w", host.path().display());
    let out = scope.agentd_run(
        &rootfs.path,
        &[
            "--env",
            "A=1",
            "-e",
            "B=two",
            "--workdir",
            "/w",
            "--bind",
            &bind_rw,
            "--hostname",
            "hn",
        ],
        &[
            "sh",
            "-c",
            "echo $A-$B-$(pwd)-$(hostname)-$(cat in.txt); echo made > out.txt",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1-two-/w-hn-from-host"
    );
    // The write went through the bind, as the unprivileged host uid.
    let made = host.path().join("out.txt");
    assert_eq!(std::fs::read_to_string(&made).unwrap(), "made\n");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&made).unwrap()),
        100_000
    );
    // A read-only bind refuses writes.
    let bind_ro = format!("{}:/data:ro", host.path().display());
    let out = scope.agentd_run(
        &rootfs.path,
        &["--bind", &bind_ro],
        &["sh", "-c", "echo x > /data/new.txt"],
    );
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(!host.path().join("new.txt").exists());
    // The rootfs itself is read-only.
    let out = scope.agentd_run(&rootfs.path, &[], &["sh", "-c", "echo x > /etc/new"]);
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(!rootfs.path.join("etc/new").exists());
    scope.assert_clean();
}

#[track_caller]
fn check_bad_input(
    scope: &Scope,
    rootfs: &std::path::Path,
    args: &[&str],
    cmd: &[&str],
    needle: &str,
) {
    let out = scope.agentd_run(rootfs, args, cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn test_bad_input_gets_one_line_errors() {
    require_sandbox_support!();
    let scope = Scope::new("badinput");
    let rootfs = busybox_rootfs();
    let missing = std::path::Path::new("/nonexistent/rootfs");
    check_bad_input(&scope, missing, &[], &["true"], "does not exist");
    check_bad_input(&scope, &rootfs.path, &[], &["no-such-command"], "not found");
    check_bad_input(
        &scope,
        &rootfs.path,
        &["--memory", "12x"],
        &["true"],
        "invalid size",
    );
    check_bad_input(
        &scope,
        &rootfs.path,
        &["--memory", "1k"],
        &["true"],
        "minimum",
    );
    check_bad_input(&scope, &rootfs.path, &["--cpus", "0"], &["true"], "cpus");
    check_bad_input(
        &scope,
        &rootfs.path,
        &["--bind", "/tmp"],
        &["true"],
        "invalid bind",
    );
    check_bad_input(
        &scope,
        &rootfs.path,
        &["--env", "NOVALUE"],
        &["true"],
        "KEY=VALUE",
    );
    scope.assert_clean();
}

/// Starts `agentd run ARGS -- sh -c SCRIPT` with a host dir bound at /w, and waits until the
/// script wrote /w/ready (a script that does not write it itself gets `touch /w/ready; ` first).
fn start_ready(
    scope: &Scope,
    rootfs: &std::path::Path,
    args: &[&str],
    script: &str,
) -> (std::process::Child, tempfile::TempDir) {
    let ready = ready_dir();
    let bind = format!("{}:/w", ready.path().display());
    let mut all_args = args.to_vec();
    all_args.extend(["--bind", &bind]);
    let script = if script.contains("/w/ready") {
        script.to_string()
    } else {
        format!("touch /w/ready; {script}")
    };
    let mut child = scope
        .agentd_run_command(rootfs, &all_args, &["sh", "-c", &script])
        .spawn()
        .unwrap();
    wait_ready(ready.path(), &mut child);
    (child, ready)
}

/// A host dir the sandbox can write a "ready" marker into, bound at /w.
fn ready_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    dir
}

/// Waits until the sandbox wrote /w/ready (slow under the emulated VM of vm-test).
#[track_caller]
fn wait_ready(dir: &std::path::Path, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.join("ready").exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "agentd run exited before the command was ready"
        );
        assert!(Instant::now() < deadline, "the command never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &std::process::Child, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, sig).unwrap();
}

#[test]
fn test_interrupt_stops_and_cleans_up() {
    require_sandbox_support!();
    let scope = Scope::new("sigint");
    let rootfs = busybox_rootfs();
    let (mut child, _ready) = start_ready(&scope, &rootfs.path, &[], "exec sleep 60");
    assert!(!scope.leftovers().is_empty(), "the sandbox runs");
    let started = Instant::now();
    signal(&child, nix::sys::signal::Signal::SIGINT);
    let status = child.wait().unwrap();
    // Well under the 10 s stop timeout: the SIGTERM path stopped it, not the SIGKILL fallback.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "Ctrl-C must stop the sandbox promptly"
    );
    // sleep died of the SIGTERM that PID 1 forwarded.
    assert_eq!(status.code(), Some(143));
    scope.assert_clean();
}

#[test]
fn test_sigterm_ignoring_command_is_killed_after_the_stop_timeout() {
    require_sandbox_support!();
    let scope = Scope::new("stubborn");
    let rootfs = busybox_rootfs();
    let (mut child, _ready) = start_ready(
        &scope,
        &rootfs.path,
        &["--stop-timeout", "1"],
        "trap '' TERM INT; touch /w/ready; while :; do sleep 1; done",
    );
    let started = Instant::now();
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let status = child.wait().unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(9),
        "SIGKILL after the 1 s stop timeout, took {took:?}"
    );
    assert_eq!(status.code(), Some(137));
    scope.assert_clean();
}

#[test]
fn test_killed_agentd_run_still_cleans_up() {
    // SIGKILL cannot be forwarded: the foreground shim notices its parent died (PDEATHSIG),
    // stops the sandbox and removes it.
    require_sandbox_support!();
    let scope = Scope::new("sigkill");
    let rootfs = busybox_rootfs();
    let (mut child, _ready) = start_ready(&scope, &rootfs.path, &[], "exec sleep 60");
    signal(&child, nix::sys::signal::Signal::SIGKILL);
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !scope.leftovers().is_empty() {
        assert!(
            Instant::now() < deadline,
            "leftovers after agentd run was killed: {:?}",
            scope.leftovers()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
