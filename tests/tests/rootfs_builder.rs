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
        Command::new(agentd_tests::bin("agentd"))
            .args(["run", "--image", "minimal:test", "--store-dir"])
            .arg(&state)
            .arg("--state-dir")
            .arg(scope.state.path())
            .arg("--cgroup-parent")
            .arg(&scope.cgroup_parent)
            .env("AGENTD_SHIM", agentd_tests::bin("agentd-shim"))
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
    let mut child = Command::new(agentd_tests::bin("agentd"))
        .args(["run", "--image", &digest[7..19], "--store-dir"])
        .arg(&state)
        .arg("--state-dir")
        .arg(scope.state.path())
        .arg("--cgroup-parent")
        .arg(&scope.cgroup_parent)
        .env("AGENTD_SHIM", agentd_tests::bin("agentd-shim"))
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
