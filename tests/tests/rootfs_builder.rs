//! Images built by rootfs-builder run under agentd: the `minimal` recipe straight into a store,
//! then `agentd run --image` with the image's defaults and with a command.

use std::process::Command;

use agentd_tests::{describe, require_sandbox_support, Scope};

#[test]
fn test_minimal_image_runs_under_agentd() {
    require_sandbox_support!();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let recipe = agentd_tests::workspace_root().join("rootfs-builder/recipes/minimal.toml");
    let build = Command::new(agentd_tests::bin("rootfs-builder"))
        .arg("build")
        .arg(&recipe)
        .arg("--store")
        .arg(&state)
        .args(["--tag", "minimal:test", "--cache"])
        .arg(tmp.path().join("cache"))
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", describe(&build));
    let digest = String::from_utf8_lossy(&build.stdout).trim().to_string();

    let scope = Scope::new("rootfs-builder-minimal");
    let run = |args: &[&str]| {
        scope
            .agentd_run_image("minimal:test", &state)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[
        "--",
        "sh",
        "-c",
        "echo $PATH; id; cat /etc/passwd | grep -c root; ls -ld /tmp",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "/usr/local/bin:/usr/bin:/bin", "{stdout}");
    assert!(lines[1].starts_with("uid=0(root) gid=0(root)"), "{stdout}");
    assert_eq!(lines[2], "1");
    assert!(lines[3].starts_with("drwxrwxrwt"), "{stdout}");
    // The image's default command is /bin/sh: it reads the script from stdin.
    let mut child = scope
        .agentd_run_image(&digest[7..19], &state)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo from-default-cmd\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-default-cmd\n");
    scope.assert_clean();
}

fn opencode_store() -> Option<std::path::PathBuf> {
    agentd_tests::opencode_store()
}

/// `agentd run --image opencode` with HOME and the XDG dirs on the sandbox's /tmp (the image's
/// rootfs is read-only under agentd run) and the working dir there too.
fn run_opencode(scope: &Scope, store: &std::path::Path, script: &str) -> std::process::Output {
    scope
        .agentd_run_image("opencode", store)
        .args(["--memory", "1g", "-w", "/tmp"])
        .args([
            "-e",
            "HOME=/tmp/h",
            "-e",
            "XDG_CONFIG_HOME=/tmp/h/.config",
            "-e",
            "XDG_DATA_HOME=/tmp/h/data",
        ])
        .args([
            "-e",
            "XDG_STATE_HOME=/tmp/h/state",
            "-e",
            "XDG_CACHE_HOME=/tmp/h/cache",
            "-e",
            "TMPDIR=/tmp",
        ])
        .args(["--", "bash", "-c"])
        .arg(format!(
            "mkdir -p /tmp/h && cp -r /home/agent/.config /tmp/h/ && {script}"
        ))
        .output()
        .unwrap()
}

#[test]
fn test_opencode_image_serves_health_without_network() {
    require_sandbox_support!();
    let Some(store) = opencode_store() else {
        return;
    };
    let scope = Scope::new("rootfs-builder-opencode");
    let out = run_opencode(
        &scope,
        &store,
        "opencode --version; id -un; git --version; rg --version | head -1; readlink /bin/sh",
    );
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], agentd_tests::opencode_version(), "{stdout}");
    assert_eq!(lines[1], "agent");
    assert!(
        lines[2].starts_with("git version 2.") && lines[3].starts_with("ripgrep "),
        "{stdout}"
    );
    assert_eq!(lines[4], "dash");
    // `opencode serve` in a sandbox whose only network is its own loopback: it must come up
    // and answer without reaching anything outside (which would fail: there is no route).
    let serve = r#"(timeout 60 opencode serve --hostname 127.0.0.1 --port 4096 > /tmp/log 2>&1 &)
        (exec 3<>/dev/tcp/10.0.0.1/80) 2>&1 | head -1
        for i in $(seq 1 120); do
          reply=$(timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/4096 && printf "GET /global/health HTTP/1.0\r\n\r\n" >&3 && cat <&3' 2>/dev/null)
          case "$reply" in *'"healthy":true'*) echo "$reply" | tail -1; exit 0;; esac
          sleep 0.5
        done
        cat /tmp/log; exit 1"#;
    let out = run_opencode(&scope, &store, serve);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Network is unreachable"),
        "the sandbox reached outside: {stdout}"
    );
    assert!(
        stdout.contains(&format!(
            r#"{{"healthy":true,"version":"{}"}}"#,
            agentd_tests::opencode_version()
        )),
        "{stdout}"
    );
    scope.assert_clean();
}

#[test]
fn test_a_base_pulled_from_a_registry() {
    require_sandbox_support!();
    if !agentd_tests::registry::tools_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let minimal = agentd_tests::workspace_root().join("rootfs-builder/recipes/minimal.toml");
    let layout = tmp.path().join("minimal.oci");
    let built = Command::new(agentd_tests::bin("rootfs-builder"))
        .arg("build")
        .arg(&minimal)
        .arg("--output")
        .arg(&layout)
        .arg("--cache")
        .arg(&cache)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", describe(&built));
    let registry = agentd_tests::registry::Registry::start();
    registry.push(
        &format!("oci:{}:minimal", layout.display()),
        "test/minimal:1",
    );
    std::fs::write(tmp.path().join("extra"), "on top of a pulled base\n").unwrap();
    let recipe = tmp.path().join("derived.toml");
    std::fs::write(
        &recipe,
        format!(
            "[image]\nbase = \"{}/test/minimal:1\"\nenv = [\"DERIVED=yes\"]\n[[step]]\nname = \"extra\"\nfiles = [{{ src = \"extra\", dest = \"/etc/extra\" }}]\n",
            registry.addr
        ),
    )
    .unwrap();
    let state = tmp.path().join("state");
    let built = Command::new(agentd_tests::bin("rootfs-builder"))
        .arg("build")
        .arg(&recipe)
        .arg("--store")
        .arg(&state)
        .args(["--tag", "derived", "--cache"])
        .arg(&cache)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", describe(&built));
    let scope = Scope::new("rootfs-builder-base");
    let out = scope
        .agentd_run_image("derived", &state)
        .args(["--", "sh", "-c", "cat /etc/extra; echo $DERIVED $PATH"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "on top of a pulled base\nyes /usr/local/bin:/usr/bin:/bin\n"
    );
    scope.assert_clean();
}

/// A recipe that names packages: `rootfs-builder lock` resolves them with this host's apt to
/// their closure pinned by version and sha256; a build without the lock, or with a lock made
/// for other packages, says how to refresh it; with the lock it builds, and the image runs
/// what the packages brought.
#[test]
fn test_lock_resolves_packages_and_builds_from_the_lock() {
    require_sandbox_support!();
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("shell.toml");
    let write_recipe = |packages: &str| {
        std::fs::write(
            &recipe,
            format!(
                "[image]\nbase = \"scratch\"\nenv = [\"PATH=/usr/bin:/bin\"]\ncmd = [\"/bin/dash\", \"-c\", \"echo hi\"]\n\n\
                 [[step]]\nname = \"debian\"\npackages = [{packages}]\nexclude = [\"/usr/share/doc\", \"/usr/share/man\"]\n\n\
                 [[step]]\nname = \"dirs\"\ndirs = [{{ path = \"/tmp\", mode = \"1777\" }}, {{ path = \"/proc\" }}, {{ path = \"/sys\" }}, {{ path = \"/dev\" }}]\n"
            ),
        )
        .unwrap();
    };
    let state = tmp.path().join("state");
    let cache = tmp.path().join("cache");
    let builder = |command: &str| {
        let mut cmd = Command::new(agentd_tests::bin("rootfs-builder"));
        cmd.arg(command).arg(&recipe);
        if command == "build" {
            cmd.arg("--store").arg(&state).arg("--cache").arg(&cache);
        }
        cmd.output().unwrap()
    };
    write_recipe("\"dash\"");
    let no_lock = builder("build");
    assert!(!no_lock.status.success());
    let said = String::from_utf8_lossy(&no_lock.stderr).to_string();
    assert!(
        said.contains("shell.lock does not exist") && said.contains("rootfs-builder lock"),
        "{said}"
    );
    let lock = builder("lock");
    assert!(lock.status.success(), "{}", describe(&lock));
    let text = std::fs::read_to_string(tmp.path().join("shell.lock")).unwrap();
    // dash and its closure (libc6 at least), each with a version and a sha256.
    for p in ["\"dash\"", "\"libc6\""] {
        assert!(text.contains(&format!("package = {p}")), "{text}");
    }
    assert_eq!(
        text.matches("package = ").count(),
        text.matches("sha256 = ").count()
    );
    let built = builder("build");
    assert!(built.status.success(), "{}", describe(&built));
    let scope = Scope::new("rootfs-builder-lock");
    let out = scope
        .agentd_run_image("shell", &state)
        .args(["--", "/bin/dash", "-c", "echo locked-and-built"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "locked-and-built"
    );
    // Other packages than the lock was made for: refused with the command to run.
    write_recipe("\"dash\", \"sed\"");
    let stale = builder("build");
    assert!(!stale.status.success());
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("other packages"),
        "{}",
        describe(&stale)
    );
}
