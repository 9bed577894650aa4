//! rootfs-builder's binary on real recipes: reproducibility, layer caching, clear errors, and
//! third-party tools (skopeo, umoci) reading what it writes.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn builder(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rootfs-builder"))
        .args(args)
        .output()
        .unwrap()
}

#[track_caller]
fn ok(out: Output) -> (String, String) {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "rootfs-builder failed: {stderr}");
    (stdout, stderr)
}

/// A three-step recipe with no downloads: dirs, a file from the recipe's dir, symlinks.
fn write_recipe(dir: &Path, motd: &str) -> String {
    fs::write(dir.join("motd"), motd).unwrap();
    let recipe = dir.join("test.toml");
    fs::write(
        &recipe,
        r#"[image]
env = ["PATH=/bin"]
cmd = ["/bin/sh"]

[[step]]
name = "dirs"
dirs = [{ path = "/etc" }, { path = "/tmp", mode = "1777" }, { path = "/home/u", owner = "1000:1000" }]

[[step]]
name = "motd"
files = [{ src = "motd", dest = "/etc/motd", mode = "0640", owner = "0:4" }]

[[step]]
name = "links"
symlinks = [{ path = "/etc/issue", target = "motd" }]
"#,
    )
    .unwrap();
    recipe.to_string_lossy().into_owned()
}

fn build(recipe: &str, out: &Path, cache: &Path) -> (String, String) {
    ok(builder(&[
        "build",
        recipe,
        "--output",
        out.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
    ]))
}

#[test]
fn test_two_builds_from_cold_caches_are_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = write_recipe(tmp.path(), "hello\n");
    let (a, _) = build(
        &recipe,
        &tmp.path().join("a.oci"),
        &tmp.path().join("cache-a"),
    );
    let (b, _) = build(
        &recipe,
        &tmp.path().join("b.oci"),
        &tmp.path().join("cache-b"),
    );
    assert_eq!(a, b, "the same recipe gave two digests");
    assert!(a.trim().starts_with("sha256:"));
    // A tar of the layout is byte-identical too.
    build(
        &recipe,
        &tmp.path().join("a.tar"),
        &tmp.path().join("cache-a"),
    );
    build(
        &recipe,
        &tmp.path().join("b.tar"),
        &tmp.path().join("cache-b"),
    );
    assert_eq!(
        fs::read(tmp.path().join("a.tar")).unwrap(),
        fs::read(tmp.path().join("b.tar")).unwrap()
    );
    // A different SOURCE_DATE_EPOCH is a different image.
    let out = Command::new(env!("CARGO_BIN_EXE_rootfs-builder"))
        .args([
            "build",
            &recipe,
            "--output",
            tmp.path().join("c.oci").to_str().unwrap(),
            "--cache",
            tmp.path().join("cache-a").to_str().unwrap(),
        ])
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    assert_ne!(ok(out).0, a);
}

#[test]
fn test_a_changed_step_rebuilds_it_and_the_steps_after_it_only() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let recipe = write_recipe(tmp.path(), "one\n");
    let (first, log) = build(&recipe, &tmp.path().join("1.oci"), &cache);
    assert_eq!(log.matches(": built").count(), 3, "{log}");
    let (again, log) = build(&recipe, &tmp.path().join("2.oci"), &cache);
    assert_eq!(
        (again.clone(), log.matches(": cached").count()),
        (first.clone(), 3),
        "{log}"
    );
    write_recipe(tmp.path(), "two\n");
    let (changed, log) = build(&recipe, &tmp.path().join("3.oci"), &cache);
    assert_ne!(changed, first);
    assert!(log.contains("[1/3] dirs: cached"), "{log}");
    assert!(
        log.contains("[2/3] motd: built") && log.contains("[3/3] links: built"),
        "{log}"
    );
}

#[test]
fn test_bad_recipes_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("bad.toml");
    fs::write(&recipe, "[image]\ncmd = \"/bin/sh\"\n").unwrap();
    let out = builder(&[
        "build",
        recipe.to_str().unwrap(),
        "--output",
        "/nonexistent/x",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.toml") && err.contains("line 2"), "{err}");
    fs::write(
        &recipe,
        "[image]\n[[step]]\nname = \"f\"\nfiles = [{ src = \"missing\", dest = \"/x\" }]\n",
    )
    .unwrap();
    let out = builder(&[
        "build",
        recipe.to_str().unwrap(),
        "--output",
        tmp.path().join("o").to_str().unwrap(),
        "--cache",
        tmp.path().join("c").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("step f") && err.contains("missing"),
        "{err}"
    );
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn test_skopeo_and_umoci_read_the_minimal_image() {
    if !have("skopeo") || !have("umoci") || !have("apt-get") || !nix_root() {
        eprintln!("SKIPPED: needs root, skopeo, umoci and apt-get (.ci/run installs them)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/minimal.toml");
    let layout = tmp.path().join("minimal.oci");
    build(recipe.to_str().unwrap(), &layout, &tmp.path().join("cache"));
    let inspect = Command::new("skopeo")
        .args(["inspect", &format!("oci:{}:minimal", layout.display())])
        .output()
        .unwrap();
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(json["Layers"].as_array().unwrap().len(), 2);
    let bundle = tmp.path().join("bundle");
    let unpack = Command::new("umoci")
        .args([
            "unpack",
            "--image",
            &format!("{}:minimal", layout.display()),
        ])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        unpack.status.success(),
        "{}",
        String::from_utf8_lossy(&unpack.stderr)
    );
    let rootfs = bundle.join("rootfs");
    assert_eq!(
        fs::read_link(rootfs.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert!(fs::metadata(rootfs.join("bin/busybox")).unwrap().len() > 1_000_000);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(rootfs.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    assert_eq!(
        fs::metadata(rootfs.join("bin/busybox")).unwrap().mtime(),
        0,
        "mtimes are SOURCE_DATE_EPOCH"
    );
}

fn nix_root() -> bool {
    // umoci unpack keeps owners, which needs root.
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    })
}

#[test]
fn test_npm_files_are_taken_from_the_pinned_tarball() {
    if !have("npm") {
        eprintln!("SKIPPED: needs npm (.ci/run installs it)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("npm.toml");
    let write = |integrity: &str, src: &str| {
        fs::write(
            &recipe,
            format!(
                "[image]\n[[step]]\nname = \"js\"\nnpm = [{{ package = \"is-number\", version = \"7.0.0\", integrity = \"{integrity}\", files = [{{ src = \"{src}\", dest = \"/lib/is-number.js\" }}] }}]\n"
            ),
        )
        .unwrap();
    };
    const GOOD: &str = "sha512-41Cifkg6e8TylSpdtTpeLVMqvSBEVzTttHvERD741+pnZ8ANv0004MRL43QKPDlK9cGvNp6NZWZUBlbGXYxxng==";
    let cache = tmp.path().join("cache");
    let out_dir = tmp.path().join("npm.tar");
    write(GOOD, "index.js");
    let (digest, log) = build(recipe.to_str().unwrap(), &out_dir, &cache);
    // Two entries: /lib and /lib/is-number.js.
    assert!(
        log.contains("js: built") && log.contains("(2 entries"),
        "{log}"
    );
    // The layer holds the file (read back from the layout tar: blobs are gzip'd tars).
    let layout = fs::read(&out_dir).unwrap();
    assert!(digest.starts_with("sha256:") && layout.len() > 1000);
    // A tampered integrity is refused; a file the package does not have too.
    write(&GOOD.replace("41C", "41D"), "index.js");
    let out = builder(&[
        "build",
        recipe.to_str().unwrap(),
        "--output",
        tmp.path().join("x").to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not match the recipe's integrity"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    write(GOOD, "missing.js");
    let out = builder(&[
        "build",
        recipe.to_str().unwrap(),
        "--output",
        tmp.path().join("y").to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has no package/missing.js"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn test_an_oci_layout_base_goes_below_the_steps() {
    if !have("skopeo") || !nix_root() {
        eprintln!("SKIPPED: needs root and skopeo (.ci/run installs it)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base_recipe = write_recipe(tmp.path(), "base\n");
    let cache = tmp.path().join("cache");
    build(&base_recipe, &tmp.path().join("base.oci"), &cache);
    let derived = tmp.path().join("derived.toml");
    fs::write(tmp.path().join("extra"), "extra\n").unwrap();
    fs::write(
        &derived,
        "[image]\nbase = \"oci-layout:base.oci\"\nenv = [\"MORE=1\"]\n[[step]]\nname = \"extra\"\nfiles = [{ src = \"extra\", dest = \"/etc/extra\" }]\n",
    )
    .unwrap();
    let out = tmp.path().join("derived.oci");
    let (first, _) = build(derived.to_str().unwrap(), &out, &cache);
    let (second, _) = build(
        derived.to_str().unwrap(),
        &tmp.path().join("again.oci"),
        &tmp.path().join("cache2"),
    );
    assert_eq!(first, second, "a build on a base is reproducible too");
    let inspect = Command::new("skopeo")
        .args(["inspect", &format!("oci:{}:derived", out.display())])
        .output()
        .unwrap();
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(
        json["Layers"].as_array().unwrap().len(),
        4,
        "3 base layers + 1"
    );
    let env: Vec<&str> = json["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(env, ["PATH=/bin", "MORE=1"], "the base's env, extended");
    fs::write(
        &derived,
        "[image]\nbase = \"Not A Reference\"\n[[step]]\nname = \"x\"\ndirs = [{ path = \"/x\" }]\n",
    )
    .unwrap();
    let bad = builder(&[
        "build",
        derived.to_str().unwrap(),
        "--output",
        tmp.path().join("z").to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("is not \"scratch\""),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
