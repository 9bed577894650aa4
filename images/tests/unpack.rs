//! Layer unpacking through the public API, with tars written byte by byte so that hostile
//! entries (which well-behaved tar writers refuse to produce) can be expressed.
//!
//! Creating whiteouts (mknod) and owners needs root; without it these tests print why and pass
//! nothing off as tested.

use std::fs;
use std::io::{Cursor, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use agentd_images::unpack::{unpack, UnpackError, UnpackOptions};
use agentd_images::Digest;

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: unpacking whiteouts and owners needs root");
    false
}

/// One tar entry: name, type flag, link target, data, mode, uid, gid.
struct E<'a> {
    name: &'a [u8],
    kind: u8,
    link: &'a [u8],
    data: &'a [u8],
    mode: u32,
    uid: u32,
    gid: u32,
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> E<'a> {
    E {
        name: name.as_bytes(),
        kind: b'0',
        link: b"",
        data,
        mode: 0o644,
        uid: 0,
        gid: 0,
    }
}
fn dir(name: &str) -> E<'_> {
    E {
        name: name.as_bytes(),
        kind: b'5',
        link: b"",
        data: b"",
        mode: 0o755,
        uid: 0,
        gid: 0,
    }
}
fn symlink<'a>(name: &'a str, target: &'a str) -> E<'a> {
    E {
        name: name.as_bytes(),
        kind: b'2',
        link: target.as_bytes(),
        data: b"",
        mode: 0o777,
        uid: 0,
        gid: 0,
    }
}
fn hardlink<'a>(name: &'a str, target: &'a str) -> E<'a> {
    E {
        name: name.as_bytes(),
        kind: b'1',
        link: target.as_bytes(),
        data: b"",
        mode: 0o644,
        uid: 0,
        gid: 0,
    }
}

fn octal(field: &mut [u8], value: u64) {
    let s = format!("{:0width$o}\0", value, width = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}

/// A ustar archive of the entries, with no checks on names: hostile input on purpose.
fn tar(entries: &[E<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = [0u8; 512];
        h[..e.name.len()].copy_from_slice(e.name);
        octal(&mut h[100..108], u64::from(e.mode));
        octal(&mut h[108..116], u64::from(e.uid));
        octal(&mut h[116..124], u64::from(e.gid));
        octal(&mut h[124..136], e.data.len() as u64);
        octal(&mut h[136..148], 1_700_000_000);
        h[156] = e.kind;
        h[157..157 + e.link.len()].copy_from_slice(e.link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|b| u64::from(*b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// Unpacks into `<tmp>/layer` and returns the result; `<tmp>` is checked afterwards for
/// anything written outside the layer dir.
fn run(
    tar_bytes: Vec<u8>,
    options: &UnpackOptions,
) -> (
    tempfile::TempDir,
    Result<agentd_images::UnpackStats, UnpackError>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let result = unpack(Cursor::new(tar_bytes), &tmp.path().join("layer"), options);
    (tmp, result)
}

#[track_caller]
fn assert_refused(entries: &[E<'_>], expected: &str) {
    if !is_root() {
        return;
    }
    let (tmp, result) = run(tar(entries), &UnpackOptions::default());
    let err = result.expect_err("a hostile layer was accepted");
    let msg = agentd_runtime_free_chain(&err);
    assert!(
        msg.contains(expected),
        "error {msg:?} does not say {expected:?}"
    );
    let outside: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        outside,
        ["layer"],
        "something was written next to the layer dir"
    );
    assert!(
        !Path::new("/tmp/agentd-escape").exists(),
        "an entry escaped to /tmp"
    );
}

fn agentd_runtime_free_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[test]
fn test_refuses_parent_dir_paths() {
    assert_refused(&[file("../agentd-escape", b"x")], "`..`");
    assert_refused(&[file("a/../../agentd-escape", b"x")], "`..`");
}

#[test]
fn test_refuses_absolute_paths() {
    assert_refused(&[file("/tmp/agentd-escape", b"x")], "absolute path");
}

#[test]
fn test_refuses_writing_through_a_symlink() {
    // The classic escape: a symlink that points out, then a file through it.
    assert_refused(
        &[symlink("out", "/tmp"), file("out/agentd-escape", b"x")],
        "is a symlink",
    );
    assert_refused(
        &[symlink("up", ".."), file("up/agentd-escape", b"x")],
        "is a symlink",
    );
    assert_refused(
        &[file("f", b"x"), file("f/agentd-escape", b"x")],
        "non-directory",
    );
}

#[test]
fn test_refuses_hard_link_escapes() {
    assert_refused(&[hardlink("passwd", "/etc/passwd")], "outside the layer");
    assert_refused(
        &[hardlink("passwd", "../../etc/passwd")],
        "outside the layer",
    );
    assert_refused(&[hardlink("x", "missing")], "not an earlier entry");
    assert_refused(&[dir("d"), hardlink("x", "d")], "hard link to a directory");
    // A hard link to a symlink that points out links the symlink itself, never its target.
    if is_root() {
        let (tmp, result) = run(
            tar(&[symlink("s", "/etc/passwd"), hardlink("h", "s")]),
            &UnpackOptions::default(),
        );
        result.unwrap();
        let meta = fs::symlink_metadata(tmp.path().join("layer/h")).unwrap();
        assert!(
            meta.file_type().is_symlink(),
            "the hard link followed the symlink"
        );
    }
}

#[test]
fn test_decompression_bomb_stops_at_the_limit() {
    if !is_root() {
        return;
    }
    // 32 MiB of zeros gzip to about 32 KiB.
    let zeros = vec![0u8; 32 << 20];
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar(&[file("big", &zeros)])).unwrap();
    let compressed = gz.finish().unwrap();
    assert!(compressed.len() < 1 << 20);
    let options = UnpackOptions {
        max_size: 4 << 20,
        ..Default::default()
    };
    let (_tmp, result) = run(compressed, &options);
    let err = result.expect_err("the bomb was unpacked");
    assert!(matches!(err, UnpackError::TooLarge { .. }), "{err:?}");
}

#[test]
fn test_whiteouts_become_overlay_whiteouts() {
    if !is_root() {
        return;
    }
    let entries = [
        dir("etc"),
        file("etc/.wh.gone", b""),
        dir("var"),
        file("var/.wh..wh..opq", b""),
        file("var/new", b"n"),
    ];
    let (tmp, result) = run(tar(&entries), &UnpackOptions::default());
    let stats = result.unwrap();
    assert_eq!(stats.whiteouts, 2);
    let layer = tmp.path().join("layer");
    let whiteout = fs::symlink_metadata(layer.join("etc/gone")).unwrap();
    assert!(
        whiteout.file_type().is_char_device() && whiteout.rdev() == 0,
        "etc/gone is not a 0/0 char device"
    );
    assert!(!layer.join("etc/.wh.gone").exists());
    let opaque = xattr(&layer.join("var"), "trusted.overlay.opaque");
    assert_eq!(opaque.as_deref(), Some(&b"y"[..]));
    assert!(!layer.join("var/.wh..wh..opq").exists());
}

#[test]
fn test_overlay_xattrs_from_the_layer_are_dropped() {
    if !is_root() {
        return;
    }
    // A PAX record that tries to mark a dir opaque (or redirect it) by itself.
    let body = "SCHILY.xattr.trusted.overlay.redirect=/etc\n";
    // The length prefix counts itself, the space and the body.
    let len = body.len() + 1 + 2;
    let pax = format!("{len} {body}").into_bytes();
    assert_eq!(pax.len(), len);
    let header = E {
        name: b"PaxHeaders/d",
        kind: b'x',
        link: b"",
        data: &pax,
        mode: 0o644,
        uid: 0,
        gid: 0,
    };
    let (tmp, result) = run(tar(&[header, dir("d")]), &UnpackOptions::default());
    let stats = result.unwrap();
    assert_eq!(stats.skipped_xattrs, 1);
    assert_eq!(
        xattr(&tmp.path().join("layer/d"), "trusted.overlay.redirect"),
        None
    );
}

#[test]
fn test_modes_owners_links_and_id_offset() {
    if !is_root() {
        return;
    }
    let suid = E {
        mode: 0o4755,
        uid: 0,
        gid: 0,
        ..file("bin/su", b"#!")
    };
    let owned = E {
        uid: 1000,
        gid: 1001,
        ..file("home/u/f", b"data")
    };
    let entries = [
        dir("bin"),
        suid,
        dir("home"),
        dir("home/u"),
        owned,
        hardlink("bin/su2", "bin/su"),
        symlink("bin/sh", "su"),
    ];
    let options = UnpackOptions {
        id_offset: 100_000,
        ..Default::default()
    };
    let (tmp, result) = run(tar(&entries), &options);
    let stats = result.unwrap();
    assert_eq!((stats.files, stats.hardlinks, stats.symlinks), (2, 1, 1));
    let layer = tmp.path().join("layer");
    let su = fs::metadata(layer.join("bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755, "setuid bit lost");
    assert_eq!((su.uid(), su.gid()), (100_000, 100_000));
    let f = fs::metadata(layer.join("home/u/f")).unwrap();
    assert_eq!((f.uid(), f.gid()), (101_000, 101_001));
    assert_eq!(f.mtime(), 1_700_000_000);
    assert_eq!(fs::metadata(layer.join("bin/su2")).unwrap().ino(), su.ino());
    assert_eq!(
        fs::read_link(layer.join("bin/sh")).unwrap(),
        Path::new("su")
    );
    let link_meta = fs::symlink_metadata(layer.join("bin/sh")).unwrap();
    assert_eq!(link_meta.uid(), 100_000);
}

#[test]
fn test_diff_id_and_compressions() {
    if !is_root() {
        return;
    }
    let plain = tar(&[dir("a"), file("a/b", b"hello")]);
    let expected = Digest::of(&plain);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&plain).unwrap();
    let zst = zstd::encode_all(Cursor::new(&plain), 3).unwrap();
    for blob in [plain.clone(), gz.finish().unwrap(), zst] {
        let (tmp, result) = run(blob, &UnpackOptions::default());
        let stats = result.unwrap();
        assert_eq!(stats.diff_id, expected);
        assert_eq!(fs::read(tmp.path().join("layer/a/b")).unwrap(), b"hello");
    }
}

#[test]
fn test_device_nodes_are_not_created() {
    if !is_root() {
        return;
    }
    let mut dev = E {
        kind: b'3',
        ..file("dev/sda", b"")
    };
    dev.mode = 0o660;
    let (tmp, result) = run(tar(&[dir("dev"), dev]), &UnpackOptions::default());
    assert_eq!(result.unwrap().skipped_devices, 1);
    assert!(!tmp.path().join("layer/dev/sda").exists());
}

#[test]
fn test_later_entries_replace_earlier_ones() {
    if !is_root() {
        return;
    }
    let entries = [
        file("x", b"old"),
        dir("d"),
        file("d/inner", b"i"),
        file("x", b"new"),
        file("d", b"now a file"),
    ];
    let (tmp, result) = run(tar(&entries), &UnpackOptions::default());
    result.unwrap();
    assert_eq!(fs::read(tmp.path().join("layer/x")).unwrap(), b"new");
    assert_eq!(fs::read(tmp.path().join("layer/d")).unwrap(), b"now a file");
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    xattr::get(path, name).unwrap()
}
