//! `agentd image` against a real registry on loopback (Debian's docker-registry), with images
//! made by umoci and copied by skopeo: pulls (plain, multi-platform, token and basic auth,
//! concurrent), unpack parity with `umoci unpack` through a real overlay mount, import and export
//! round trips, and crash safety (a pull killed mid-download and mid-unpack, then resumed).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use agentd_images::Digest;
use agentd_tests::registry::{run_tool, tools_available, tree, Auth, Layout, Proxy, Registry};

fn skip() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root (owners, whiteouts, overlay mounts)");
        agentd_tests::required_or_skip();
        return true;
    }
    !tools_available()
}

/// Runs `agentd image --state-dir STATE ARGS` with no credentials from the environment.
fn agentd(state: &Path, args: &[&str]) -> Output {
    image_cmd(state, args).output().unwrap()
}

fn image_cmd(state: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(agentd_tests::bin("agentd"));
    cmd.arg("image").arg("--state-dir").arg(state).args(args);
    // No auth files from the host: the tests say which credentials exist.
    cmd.env("HOME", state)
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("DOCKER_CONFIG")
        .env_remove("XDG_RUNTIME_DIR");
    cmd.stdin(Stdio::null());
    cmd
}

#[track_caller]
fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "agentd failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `agentd image import --name NAME DIR`.
fn import_as(state: &Path, name: &str, dir: &Path) {
    ok(agentd(
        state,
        &["import", "--name", name, dir.to_str().unwrap()],
    ));
}

fn inspect(state: &Path, image: &str) -> serde_json::Value {
    serde_json::from_str(&ok(agentd(state, &["inspect", image]))).unwrap()
}

/// Builds the parity image: three layers with setuid files, owners, symlinks, hard links, a
/// fifo, deletions (whiteouts of a file and a dir) and an opaque dir.
fn parity_layout(dir: &Path) -> Layout {
    let layout = Layout::new(&dir.join("parity"), "v1");
    let root = layout.rootfs();
    let sh = |script: &str| run_tool(Command::new("sh").arg("-ec").arg(script).current_dir(&root));
    sh(
        "mkdir -p bin etc usr/bin usr/share/doc/a home/user var/cache/old run
        cp /bin/busybox bin/busybox && ln -s busybox bin/sh && ln -s /etc/missing etc/dangling
        echo root:x:0:0 > etc/passwd && echo gone > etc/gone && echo keep > etc/keep
        printf '#!/bin/sh\\n' > usr/bin/suid && chmod 4755 usr/bin/suid && chmod 2755 usr/bin
        echo hl > usr/bin/hl1 && ln usr/bin/hl1 usr/bin/hl2
        echo doc > usr/share/doc/a/b && echo f > home/user/f && chown -R 1000:1001 home/user
        chmod 1777 run && mkfifo run/fifo && echo 1 > var/cache/old/1 && echo 2 > var/cache/old/2",
    );
    layout.commit();
    sh("rm etc/gone && echo changed > etc/keep && rm -r usr/share/doc/a && mkdir new && echo n > new/file");
    layout.commit();
    // Layer 3, written by GNU tar: an opaque marker that hides the old contents of a dir.
    let l3 = dir.join("l3");
    fs::create_dir_all(l3.join("var/cache/old")).unwrap();
    fs::write(l3.join("var/cache/old/.wh..wh..opq"), "").unwrap();
    fs::write(l3.join("var/cache/old/new"), "new\n").unwrap();
    let tar = dir.join("l3.tar");
    run_tool(
        Command::new("tar")
            .arg("-C")
            .arg(&l3)
            .arg("-cf")
            .arg(&tar)
            .arg("var"),
    );
    layout.add_layer_tar(&tar);
    layout
}

/// Mounts the image's layers as overlayfs (read-only, lower dirs only) and returns the mount.
struct Overlay(PathBuf);

impl Overlay {
    fn mount(lower_dirs_top_first: &[String], at: &Path, empty: &Path) -> Overlay {
        fs::create_dir_all(at).unwrap();
        fs::create_dir_all(empty).unwrap();
        // An empty bottom layer: a lower-only overlay needs at least two lower dirs.
        let mut lowers = lower_dirs_top_first.to_vec();
        lowers.push(empty.display().to_string());
        let data = format!("lowerdir={}", lowers.join(":"));
        nix::mount::mount(
            Some("overlay"),
            at,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )
        .expect("mount overlay");
        Overlay(at.to_path_buf())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn lower_dirs(state: &Path, image: &str) -> Vec<String> {
    let json = inspect(state, image);
    let mut dirs: Vec<String> = json["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["unpacked"].as_str().expect("layer unpacked").to_string())
        .collect();
    dirs.reverse();
    dirs
}

#[test]
fn test_pull_matches_umoci_unpack_through_overlay() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = parity_layout(tmp.path());
    let registry = Registry::start();
    registry.push(&layout.skopeo_ref(), "test/parity:v1");
    let state = tmp.path().join("state");
    let reference = format!("{}/test/parity:v1", registry.addr);
    let out = ok(agentd(&state, &["pull", &reference]));
    let manifest = out.trim().to_string();
    assert!(manifest.starts_with("sha256:"), "pull printed {out:?}");

    let expected = tree(&layout.umoci_unpack(&tmp.path().join("umoci-bundle")));
    let lowers = lower_dirs(&state, &reference);
    assert_eq!(lowers.len(), 3);
    let mounted = Overlay::mount(
        &lowers,
        &tmp.path().join("merged"),
        &tmp.path().join("empty"),
    );
    let actual = tree(&mounted.0);
    for (path, entry) in &expected {
        assert_eq!(
            actual.get(path),
            Some(entry),
            "{path} differs from umoci's unpack"
        );
    }
    let extra: Vec<_> = actual
        .keys()
        .filter(|p| !expected.contains_key(*p))
        .collect();
    assert!(extra.is_empty(), "paths only in agentd's unpack: {extra:?}");
    // The checks above only mean something if the image has what they are about.
    for (path, kind) in [
        ("etc/keep", 'f'),
        ("bin/sh", 'l'),
        ("run/fifo", 'p'),
        ("var/cache/old/new", 'f'),
    ] {
        assert_eq!(actual[path].kind, kind, "{path}");
    }
    for gone in ["etc/gone", "usr/share/doc/a", "var/cache/old/1"] {
        assert!(
            !actual.contains_key(gone),
            "{gone} should be deleted by a later layer"
        );
    }
    assert_eq!(actual["usr/bin/suid"].mode, 0o4755);
    assert_eq!(
        (actual["home/user/f"].uid, actual["home/user/f"].gid),
        (1000, 1001)
    );
    drop(mounted);

    // Pulling again finds everything in place and downloads nothing.
    let again = ok(agentd(&state, &["pull", &reference]));
    assert_eq!(again.trim(), manifest);
    ok(agentd(&state, &["verify"]));
}

/// Two images of different architectures in one index, made by umoci and copied by skopeo.
fn multi_arch_layout(dir: &Path) -> (Layout, String, String) {
    let layout = Layout::new(&dir.join("multi"), "amd");
    fs::write(layout.rootfs().join("arch"), "amd64").unwrap();
    layout.commit();
    let arm = Layout::new_in(&layout.dir, "arm");
    fs::write(arm.rootfs().join("arch"), "arm64").unwrap();
    arm.commit();
    run_tool(
        Command::new("umoci")
            .args(["config", "--architecture", "arm64", "--image"])
            .arg(arm.image()),
    );
    let index_path = layout.dir.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    let find = |tag: &str| {
        index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .unwrap()
            .clone()
    };
    let mut amd = find("amd");
    let mut arm_desc = find("arm");
    let (amd_digest, arm_digest) = (
        amd["digest"].as_str().unwrap().to_string(),
        arm_desc["digest"].as_str().unwrap().to_string(),
    );
    amd.as_object_mut().unwrap().remove("annotations");
    arm_desc.as_object_mut().unwrap().remove("annotations");
    amd["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
    arm_desc["platform"] =
        serde_json::json!({"architecture": "arm64", "os": "linux", "variant": "v8"});
    let multi = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [arm_desc, amd],
    });
    let bytes = serde_json::to_vec(&multi).unwrap();
    let digest = Digest::of(&bytes);
    fs::write(layout.dir.join("blobs/sha256").join(digest.hex()), &bytes).unwrap();
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": digest.to_string(),
            "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }));
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    (layout, amd_digest, arm_digest)
}

#[test]
fn test_pull_picks_the_platform_from_an_index() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (layout, amd, arm) = multi_arch_layout(tmp.path());
    let registry = Registry::start();
    registry.push(
        &format!("oci:{}:multi", layout.dir.display()),
        "test/multi:1",
    );
    let reference = format!("{}/test/multi:1", registry.addr);

    let state = tmp.path().join("state");
    assert_eq!(ok(agentd(&state, &["pull", &reference])).trim(), amd);
    let json = inspect(&state, &reference);
    assert_eq!(json["platform"], "linux/amd64");
    assert!(
        json["index"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "index digest not recorded"
    );
    let arm_state = tmp.path().join("arm-state");
    assert_eq!(
        ok(agentd(
            &arm_state,
            &["pull", "--platform", "linux/arm64", &reference]
        ))
        .trim(),
        arm
    );
    let lowers = lower_dirs(&arm_state, &reference);
    assert_eq!(
        fs::read_to_string(Path::new(&lowers[0]).join("arch")).unwrap(),
        "arm64"
    );

    let out = agentd(&state, &["pull", "--platform", "linux/s390x", &reference]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no manifest for platform linux/s390x")
            && err.contains("linux/arm64/v8, linux/amd64"),
        "{err}"
    );
}

fn small_image(dir: &Path, name: &str) -> Layout {
    let layout = Layout::new(&dir.join(name), "1");
    fs::write(layout.rootfs().join("hello"), format!("hello from {name}")).unwrap();
    layout.commit();
    layout
}

fn write_auth_file(path: &Path, registry: &str, user: &str, password: &str) {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    fs::write(
        path,
        format!(r#"{{"auths":{{"{registry}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn test_pull_with_token_and_basic_auth() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = small_image(tmp.path(), "private");
    let registry = Registry::start();
    registry.push(&layout.skopeo_ref(), "test/private:1");
    for auth in [
        Auth::Token {
            user: "alice".into(),
            password: "s3cret".into(),
        },
        Auth::Basic {
            user: "bob".into(),
            password: "hunter2".into(),
        },
    ] {
        let (user, password) = match &auth {
            Auth::Token { user, password } | Auth::Basic { user, password } => {
                (user.clone(), password.clone())
            }
            Auth::None => unreachable!(),
        };
        let proxy = Proxy::start(&registry.addr, auth.clone());
        let reference = format!("{}/test/private:1", proxy.addr);
        let state = tmp.path().join(format!("state-{user}"));

        let anonymous = agentd(&state, &["pull", &reference]);
        assert!(
            !anonymous.status.success(),
            "{auth:?}: an anonymous pull got through"
        );
        assert_eq!(proxy.total_blob_gets(), 0);

        let wrong = tmp.path().join(format!("wrong-{user}.json"));
        write_auth_file(&wrong, &proxy.addr, &user, "wrong");
        let denied = agentd(
            &state,
            &["pull", "--authfile", wrong.to_str().unwrap(), &reference],
        );
        assert!(
            !denied.status.success(),
            "{auth:?}: a wrong password got through"
        );
        let err = String::from_utf8_lossy(&denied.stderr);
        assert!(err.contains("cannot pull"), "{err}");

        let right = tmp.path().join(format!("auth-{user}.json"));
        write_auth_file(&right, &proxy.addr, &user, &password);
        ok(agentd(
            &state,
            &["pull", "--authfile", right.to_str().unwrap(), &reference],
        ));
        // The default search finds ~/.config/containers/auth.json too.
        let home_state = tmp.path().join(format!("home-{user}"));
        fs::create_dir_all(home_state.join(".config/containers")).unwrap();
        fs::copy(&right, home_state.join(".config/containers/auth.json")).unwrap();
        ok(agentd(&home_state, &["pull", &reference]));
        let lowers = lower_dirs(&home_state, &reference);
        assert_eq!(
            fs::read_to_string(Path::new(&lowers[0]).join("hello")).unwrap(),
            "hello from private"
        );
    }
}

#[test]
fn test_concurrent_pulls_download_each_blob_once() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(&tmp.path().join("big"), "1");
    for i in 0..3 {
        // Three layers of 8 MiB of random bytes each, so the two pulls overlap.
        run_tool(
            Command::new("dd")
                .args(["if=/dev/urandom", "bs=1M", "count=8", "status=none"])
                .arg(format!("of={}/blob{i}", layout.rootfs().display())),
        );
        layout.commit();
    }
    let registry = Registry::start();
    registry.push(&layout.skopeo_ref(), "test/big:1");
    let proxy = Proxy::start_throttled(&registry.addr, Auth::None, Some(Duration::from_millis(20)));
    let reference = format!("{}/test/big:1", proxy.addr);
    let state = tmp.path().join("state");
    let children: Vec<_> = (0..2)
        .map(|_| {
            image_cmd(&state, &["pull", &reference])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let digests: Vec<String> = outputs
        .into_iter()
        .map(|o| ok(o).trim().to_string())
        .collect();
    assert_eq!(digests[0], digests[1]);
    let gets = proxy.blob_gets.lock().unwrap().clone();
    let json = inspect(&state, &reference);
    for layer in json["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        assert_eq!(
            gets.get(digest),
            Some(&1),
            "layer {digest} was downloaded {:?} times",
            gets.get(digest)
        );
    }
    ok(agentd(&state, &["verify"]));
}

#[test]
fn test_import_docker_archive_and_oci_tar_and_export() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = parity_layout(tmp.path());
    let state = tmp.path().join("state");

    // The OCI layout dir itself.
    import_as(&state, "parity:dir", &layout.dir);
    let from_dir = inspect(&state, "parity:dir");
    let diff_ids = |json: &serde_json::Value| -> Vec<String> {
        json["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["diff_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(from_dir["name"], "localhost/parity:dir");

    // A docker archive written by skopeo (named by its RepoTags).
    let archive = tmp.path().join("parity.docker.tar");
    run_tool(
        Command::new("skopeo")
            .args(["copy", "--quiet", &layout.skopeo_ref()])
            .arg(format!(
                "docker-archive:{}:example/parity:docker",
                archive.display()
            )),
    );
    ok(agentd(&state, &["import", archive.to_str().unwrap()]));
    let from_archive = inspect(&state, "docker.io/example/parity:docker");
    assert_eq!(
        diff_ids(&from_archive),
        diff_ids(&from_dir),
        "docker archive layers differ"
    );

    // A tar of the OCI layout.
    let oci_tar = tmp.path().join("parity.oci.tar");
    run_tool(
        Command::new("tar")
            .arg("-C")
            .arg(&layout.dir)
            .arg("-cf")
            .arg(&oci_tar)
            .arg("."),
    );
    ok(agentd(
        &state,
        &["import", "--name", "parity:tar", oci_tar.to_str().unwrap()],
    ));
    assert_eq!(
        inspect(&state, "parity:tar")["manifest"],
        from_dir["manifest"]
    );

    // Export, then third-party tools read it.
    let out = tmp.path().join("exported");
    ok(agentd(
        &state,
        &[
            "export",
            "docker.io/example/parity:docker",
            out.to_str().unwrap(),
        ],
    ));
    let skopeo = run_tool(
        Command::new("skopeo").args(["inspect", &format!("oci:{}:docker", out.display())]),
    );
    let skopeo: serde_json::Value = serde_json::from_str(&skopeo).unwrap();
    assert_eq!(skopeo["Layers"].as_array().unwrap().len(), 3);
    let bundle = tmp.path().join("exported-bundle");
    run_tool(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:docker", out.display()))
            .arg(&bundle),
    );
    assert_eq!(
        fs::read_to_string(bundle.join("rootfs/etc/keep")).unwrap(),
        "changed\n"
    );

    // Removing names, then prune, frees the content; a bad archive is refused clearly.
    for name in [
        "parity:dir",
        "docker.io/example/parity:docker",
        "parity:tar",
    ] {
        ok(agentd(&state, &["rm", name]));
    }
    ok(agentd(&state, &["prune"]));
    let blobs = fs::read_dir(state.join("images/blobs/sha256"))
        .unwrap()
        .count();
    let layers = fs::read_dir(state.join("images/layers/sha256"))
        .unwrap()
        .count();
    assert_eq!(
        (blobs, layers),
        (0, 0),
        "prune left content of removed images"
    );
    let junk = tmp.path().join("junk.tar");
    run_tool(
        Command::new("tar")
            .arg("-C")
            .arg(tmp.path())
            .arg("-cf")
            .arg(&junk)
            .arg("l3"),
    );
    let bad = agentd(&state, &["import", junk.to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("neither an OCI image layout"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// Waits until `dir` has an entry whose name starts with `prefix` (and, for files, holds at
/// least `min_size` bytes).
fn wait_for_work(dir: &Path, prefix: &str, min_size: u64, child: &mut std::process::Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(prefix)
                    && e.metadata()
                        .is_ok_and(|m| m.is_dir() || m.len() >= min_size)
                {
                    return true;
                }
            }
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

#[test]
fn test_killed_pull_resumes_and_the_store_verifies() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(&tmp.path().join("crash"), "1");
    // Layer 1: 4000 small files (slow to unpack); layer 2: 24 MiB of random bytes (slow to
    // download through the throttled proxy).
    run_tool(Command::new("sh").arg("-ec").arg("mkdir -p many && for d in $(seq 1 40); do mkdir many/$d; for f in $(seq 1 100); do echo $d-$f > many/$d/$f; done; done").current_dir(layout.rootfs()));
    layout.commit();
    run_tool(
        Command::new("dd")
            .args(["if=/dev/urandom", "bs=1M", "count=24", "status=none"])
            .arg(format!("of={}/random", layout.rootfs().display())),
    );
    layout.commit();
    let registry = Registry::start();
    registry.push(&layout.skopeo_ref(), "test/crash:1");
    let proxy = Proxy::start_throttled(&registry.addr, Auth::None, Some(Duration::from_millis(40)));
    let reference = format!("{}/test/crash:1", proxy.addr);
    let state = tmp.path().join("state");
    let work = state.join("images/tmp");

    for (what, prefix, min_size) in [("download", "blob-", 1 << 20), ("unpack", "unpack-", 0)] {
        let mut child = image_cmd(&state, &["pull", &reference])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let caught = wait_for_work(&work, prefix, min_size, &mut child);
        // SIGKILL by PID: no cleanup code runs, as in a crash.
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            caught,
            "the pull ended before its {what} could be interrupted"
        );
        assert!(
            agentd(&state, &["inspect", &reference]).status.code() != Some(0),
            "a killed pull recorded the image"
        );
        ok(agentd(&state, &["verify"]));
    }
    let leftovers = fs::read_dir(&work).unwrap().count();
    assert!(
        leftovers > 0,
        "the kills left no work files: the test did not interrupt anything"
    );
    ok(agentd(&state, &["pull", &reference]));
    ok(agentd(&state, &["verify"]));
    let lowers = lower_dirs(&state, &reference);
    assert_eq!(
        fs::metadata(Path::new(&lowers[0]).join("random"))
            .unwrap()
            .len(),
        24 << 20
    );
    let many: usize = fs::read_dir(Path::new(&lowers[1]).join("many"))
        .unwrap()
        .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(many, 4000, "the resumed unpack is incomplete");
    ok(agentd(&state, &["prune"]));
    assert_eq!(
        fs::read_dir(&work).unwrap().count(),
        0,
        "prune left work files of the killed pulls"
    );
}

#[test]
fn test_bad_references_and_missing_images_fail_clearly() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let registry = Registry::start();
    for (args, expected) in [
        (vec!["pull", "Bad/Name"], "invalid image reference"),
        (
            vec!["pull", &format!("{}/nope/missing:1", registry.addr)],
            "cannot pull",
        ),
        (vec!["inspect", "nothing-here"], "no image named"),
        (vec!["pull", "--platform", "linux", "x"], "invalid platform"),
    ] {
        let out = agentd(&state, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(
            err.contains(expected) && err.lines().count() == 1,
            "{args:?}: {err:?}"
        );
    }
}

#[test]
fn test_agentd_run_image_stacks_the_layers_and_cleans_up() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = parity_layout(tmp.path());
    let state = tmp.path().join("state");
    // Without an entrypoint (before the config change below).
    import_as(&state, "parity:plain", &layout.dir);
    run_tool(
        Command::new("umoci")
            .args([
                "config",
                "--config.entrypoint",
                "/bin/busybox",
                "--config.cmd",
                "echo",
                "--config.cmd",
                "default-cmd",
            ])
            .args([
                "--config.env",
                "FROM_IMAGE=yes",
                "--config.workingdir",
                "/etc",
                "--image",
            ])
            .arg(layout.image()),
    );
    import_as(&state, "parity:run", &layout.dir);
    let scope = agentd_tests::Scope::new("run-image");
    let run_image = |image: &str, args: &[&str]| {
        scope
            .agentd_run_image(image, &state)
            .args(args)
            .output()
            .unwrap()
    };
    let run = |args: &[&str]| run_image("parity:run", args);
    // No command: the image's entrypoint and cmd.
    assert_eq!(ok(run(&[])), "default-cmd\n");
    // A command is the entrypoint's arguments; env and workdir come from the image; the
    // layers' deletions and opaque dir show through the overlay.
    let script = "echo $FROM_IMAGE $(pwd) $(cat keep); ls /usr/share/doc; ls /var/cache/old; cat /etc/gone 2>&1 || true";
    let out = ok(run(&["--", "sh", "-c", script]));
    assert_eq!(
        out,
        "yes /etc changed\nnew\ncat: can't open '/etc/gone': No such file or directory\n"
    );
    scope.assert_clean();
    // The writable layer is bounded (--disk): 32 MiB do not fit into 20m.
    let out = ok(run(&[
        "--disk",
        "20m",
        "--",
        "sh",
        "-c",
        "head -c 33554432 /dev/zero > /big 2>/dev/null || echo full",
    ]));
    assert_eq!(out, "full\n");
    scope.assert_clean();
    // A command missing from the image (here: deleted by a later layer) is a clear error
    // before any sandbox exists.
    let missing = run_image("parity:plain", &["--", "/etc/gone"]);
    assert_eq!(missing.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("not found in the image"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    // A layer that a running sandbox mounts survives prune even after its image is removed.
    let mut sleeper = scope
        .agentd_run_image("parity:plain", &state)
        .args(["--", "/bin/busybox", "sleep", "60"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(scope.state.path().to_str().unwrap())
    {
        assert!(
            Instant::now() < deadline,
            "the sandbox's overlay never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for name in ["parity:plain", "parity:run"] {
        ok(agentd(&state, &["rm", name]));
    }
    let pruned = agentd(&state, &["prune"]);
    assert!(
        String::from_utf8_lossy(&pruned.stderr).contains("kept 3 unused layers"),
        "{}",
        String::from_utf8_lossy(&pruned.stderr)
    );
    assert_eq!(
        fs::read_dir(state.join("images/layers/sha256"))
            .unwrap()
            .count(),
        3
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(sleeper.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    sleeper.wait().unwrap();
    ok(agentd(&state, &["prune"]));
    assert_eq!(
        fs::read_dir(state.join("images/layers/sha256"))
            .unwrap()
            .count(),
        0
    );
    let unknown = Command::new(agentd_tests::bin("agentd"))
        .args(["run", "--image", "nope:1", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("pull or import it first"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    scope.assert_clean();
}

/// A network namespace made by the test (so that a registry can have an address that is not
/// loopback without touching the host's network); deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        run_tool(Command::new("ip").args(["netns", "add", name]));
        let ns = Netns(name.to_string());
        run_tool(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]));
        run_tool(Command::new("ip").args([
            "-n",
            name,
            "addr",
            "add",
            "10.231.0.1/32",
            "dev",
            "lo",
        ]));
        ns
    }

    fn exec(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A CA and a server certificate for 10.231.0.1 signed by it (openssl).
fn make_certs(dir: &Path) {
    let sh = |script: &str| run_tool(Command::new("sh").arg("-ec").arg(script).current_dir(dir));
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=agentd-test-ca 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=10.231.0.1 2>/dev/null
        printf 'subjectAltName=IP:10.231.0.1\\nbasicConstraints=CA:FALSE\\n' > ext.cnf
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf 2>/dev/null");
}

#[test]
fn test_pull_over_https_verifies_the_certificate() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path());
    let layout = small_image(tmp.path(), "tls");
    let ns = Netns::new(&format!("agentd-tls-{}", std::process::id()));
    let config = tmp.path().join("registry.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 10.231.0.1:5443\n  tls:\n    certificate: {}\n    key: {}\n",
            tmp.path().join("data").display(),
            tmp.path().join("server.pem").display(),
            tmp.path().join("server.key").display()
        ),
    )
    .unwrap();
    let mut registry = ns
        .exec(Path::new("/usr/bin/docker-registry"))
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _registry = Kill(&mut registry);
    let ca = tmp.path().join("ca.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut copy = ns.exec(Path::new("/usr/bin/skopeo"));
        copy.args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &layout.skopeo_ref(),
            "docker://10.231.0.1:5443/test/tls:1",
        ]);
        if copy.output().unwrap().status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the TLS registry in the netns did not come up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let state = tmp.path().join("state");
    let pull = |extra_env: Option<&Path>| {
        let mut c = ns.exec(&agentd_tests::bin("agentd"));
        c.arg("image")
            .arg("--state-dir")
            .arg(&state)
            .args(["pull", "10.231.0.1:5443/test/tls:1"]);
        c.env("HOME", &state)
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
        if let Some(ca) = extra_env {
            c.env("SSL_CERT_FILE", ca);
        }
        c.output().unwrap()
    };
    // The system's roots do not know the test CA: refused.
    let untrusted = pull(None);
    assert!(
        !untrusted.status.success(),
        "a certificate from an unknown CA was accepted"
    );
    let err = String::from_utf8_lossy(&untrusted.stderr);
    assert!(
        err.contains("cannot pull") && err.contains("certificate"),
        "{err}"
    );
    // With the CA trusted (SSL_CERT_FILE replaces the system's roots), the pull works.
    ok(pull(Some(&ca)));
    ok(agentd(&state, &["verify"]));
}
