//! The agent layer: OpenCode and what it needs, owned by agentd and mounted read-only at
//! [`MOUNT`] into the sandbox of an image that does not carry OpenCode, so any image is an
//! agent image (a project's own toolchain image, a devcontainer image, a third-party image).
//!
//! It is made once per OpenCode version under `<state>/agent-layer/<version>/` from agentd's
//! default image (built from the pinned npm package by the embedded recipe): `bin/opencode`,
//! `bin/rg` (OpenCode's text search; without it OpenCode would try to download one),
//! `seed/package-lock.json` (stops OpenCode's background plugin install) and
//! `bin/agentd-opencode`, a launcher that makes OpenCode's XDG dirs (in the sandbox's private
//! `/tmp`, writable by whatever user the image runs as) and execs OpenCode. The image's own
//! env, workdir and user are kept; `PATH` gets `/opt/agentd/bin` at its end, so the image's
//! tools win. Needs a glibc image with `/bin/sh` (OpenCode's shell tool needs one anyway);
//! musl images are refused with a message (no musl build here yet).
//!
//! Owner: agentd; older versions' dirs are removed when a new one is made, `agentd teardown
//! --purge` removes the rest with the state dir. Built into a `.part` dir and renamed, so a
//! crash leaves no half layer in use.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where the layer is mounted in the sandbox.
pub const MOUNT: &str = "/opt/agentd";

/// Where OpenCode's writable dirs go in such a sandbox (its private tmpfs).
pub const HOME: &str = "/tmp/agentd";

/// The launcher (run by the image's `/bin/sh`).
const LAUNCHER: &str = r#"#!/bin/sh
# agentd: OpenCode in an image that does not carry it. This layer is read-only; OpenCode's
# dirs are made here, writable by the image's user, with its plugin install pre-seeded.
set -e
for d in "$XDG_CONFIG_HOME/opencode/node_modules" "$XDG_DATA_HOME" "$XDG_STATE_HOME" "$XDG_CACHE_HOME" "$HOME"; do
  mkdir -p "$d"
done
[ -e "$XDG_CONFIG_HOME/opencode/package-lock.json" ] ||
  cp /opt/agentd/seed/package-lock.json "$XDG_CONFIG_HOME/opencode/package-lock.json"
exec /opt/agentd/bin/opencode "$@"
"#;

/// The command that starts OpenCode from the layer.
pub fn command() -> Vec<String> {
    let mut cmd = crate::opencode::command();
    cmd[0] = format!("{MOUNT}/bin/agentd-opencode");
    cmd
}

/// The environment entries a sandbox running OpenCode from the layer gets on top of the
/// image's (`image_env`): OpenCode's dirs, `HOME` and `SHELL` if the image has none, and the
/// layer's bin at the end of `PATH`.
pub fn env(image_env: &[String]) -> Vec<String> {
    let get = |k: &str| {
        image_env
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    let path = get("PATH").unwrap_or(agentd_runtime::spec::DEFAULT_PATH);
    let mut env = vec![
        format!("PATH={path}:{MOUNT}/bin"),
        format!("XDG_CONFIG_HOME={HOME}/config"),
        format!("XDG_DATA_HOME={HOME}/data"),
        format!("XDG_STATE_HOME={HOME}/state"),
        format!("XDG_CACHE_HOME={HOME}/cache"),
    ];
    if get("HOME").is_none_or(str::is_empty) {
        env.push(format!("HOME={HOME}/home"));
    }
    if get("SHELL").is_none_or(str::is_empty) {
        env.push("SHELL=/bin/sh".into());
    }
    env
}

/// Whether `version` may name a directory.
fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && !v.starts_with('.')
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-+_".contains(&b))
}

/// The layer for OpenCode `version`, made from the default image's `layers` (top first) if
/// it is not there yet. Blocking: call it off the async workers.
pub fn ensure(state_dir: &Path, version: &str, layers: &[PathBuf]) -> io::Result<PathBuf> {
    if !valid_version(version) {
        return Err(io::Error::other(format!(
            "the default image's OpenCode version {version:?} cannot name a directory"
        )));
    }
    let root = state_dir.join("agent-layer");
    let dir = root.join(version);
    if dir.join("bin/agentd-opencode").exists() {
        return Ok(dir);
    }
    // One maker at a time (parallel creates of a task's attempts): the others wait, then
    // find the layer made.
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _making = MAKING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if dir.join("bin/agentd-opencode").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&root)?;
    // A maker that crashed left its `.part` dir (a copy of a 185 MB binary): one agentd owns
    // the state dir and makers take turns, so every `.part` here is debris.
    for entry in std::fs::read_dir(&root)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with('.') {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let part = root.join(format!(".{version}.part-{}", std::process::id()));
    let made = (|| -> io::Result<()> {
        std::fs::create_dir_all(part.join("bin"))?;
        std::fs::create_dir_all(part.join("seed"))?;
        copy_from_layers(
            layers,
            "usr/local/bin/opencode",
            &part.join("bin/opencode"),
            0o755,
        )?;
        copy_from_layers(layers, "usr/bin/rg", &part.join("bin/rg"), 0o755)?;
        let seed = rootfs_builder::embedded::opencode()
            .files
            .iter()
            .find(|(p, _)| p.ends_with("package-lock.json"))
            .map(|(_, text)| *text)
            .ok_or_else(|| io::Error::other("the embedded recipe has no package-lock.json"))?;
        std::fs::write(part.join("seed/package-lock.json"), seed)?;
        let launcher = part.join("bin/agentd-opencode");
        std::fs::write(&launcher, LAUNCHER)?;
        std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&part);
        return Err(e);
    }
    match std::fs::rename(&part, &dir) {
        Ok(()) => {}
        // Another create made it meanwhile: use theirs.
        Err(_) if dir.join("bin/agentd-opencode").exists() => {
            let _ = std::fs::remove_dir_all(&part);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&part);
            return Err(e);
        }
    }
    // Older versions are no longer mounted by new sandboxes. (A running sandbox keeps its
    // mount: a removed directory stays usable through it.)
    for entry in std::fs::read_dir(&root)?.flatten() {
        let name = entry.file_name();
        if name != version && !name.to_string_lossy().starts_with('.') {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    tracing::info!(dir = %dir.display(), version, "agent layer made");
    Ok(dir)
}

/// Copies `rel` from the topmost layer that has it (a regular file) to `dest`. The layers
/// are whatever image is named `opencode` in the store (an admin may have imported one): each
/// path is resolved inside its layer dir ([`crate::sandbox::fs::open_in_root`]), so a symlink
/// a layer carries never leads to a host file, and the file itself is never a link.
fn copy_from_layers(layers: &[PathBuf], rel: &str, dest: &Path, mode: u32) -> io::Result<()> {
    for layer in layers {
        let src = layer.join(rel);
        let root = match std::fs::File::open(layer) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{}: {e}", layer.display()),
                ))
            }
        };
        let file = match crate::sandbox::fs::open_in_root(
            &root,
            Path::new(rel),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            0,
        ) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", src.display()))),
        };
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!(
                "{} is not a regular file",
                src.display()
            )));
        }
        let mut reader = file;
        let mut out = std::fs::File::create(dest)?;
        io::copy(&mut reader, &mut out)?;
        out.sync_all()?;
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))?;
        return Ok(());
    }
    Err(io::Error::other(format!(
        "the default image has no /{rel} to make the agent layer from"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_env_keeps_the_image_and_adds_the_layer_last() {
        let env = env(&["PATH=/usr/bin:/bin".into(), "HOME=/root".into()]);
        assert!(env.contains(&"PATH=/usr/bin:/bin:/opt/agentd/bin".to_string()));
        assert!(env.contains(&"XDG_CONFIG_HOME=/tmp/agentd/config".to_string()));
        assert!(!env.iter().any(|e| e.starts_with("HOME=")), "{env:?}");
        assert!(env.contains(&"SHELL=/bin/sh".to_string()));
        let env = super::env(&[]);
        assert!(env.contains(&"HOME=/tmp/agentd/home".to_string()));
        assert_eq!(command()[0], "/opt/agentd/bin/agentd-opencode");
    }

    #[test]
    fn test_ensure_makes_the_layer_once_from_the_top_layer() {
        let tmp = tempfile::tempdir().unwrap();
        let (top, bottom) = (tmp.path().join("top"), tmp.path().join("bottom"));
        for (l, what) in [(&top, "top"), (&bottom, "bottom")] {
            std::fs::create_dir_all(l.join("usr/local/bin")).unwrap();
            std::fs::create_dir_all(l.join("usr/bin")).unwrap();
            std::fs::write(l.join("usr/local/bin/opencode"), what).unwrap();
        }
        std::fs::write(bottom.join("usr/bin/rg"), "rg").unwrap();
        let state = tmp.path().join("state");
        let layers = [top.clone(), bottom.clone()];
        std::fs::create_dir_all(state.join("agent-layer/0.9")).unwrap();
        std::fs::create_dir_all(state.join("agent-layer/.1.0.part-1/bin")).unwrap();
        let dir = ensure(&state, "1.0", &layers).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("bin/opencode")).unwrap(),
            "top"
        );
        assert_eq!(std::fs::read_to_string(dir.join("bin/rg")).unwrap(), "rg");
        assert!(std::fs::read_to_string(dir.join("bin/agentd-opencode"))
            .unwrap()
            .contains("exec /opt/agentd/bin/opencode"));
        assert!(
            !state.join("agent-layer/0.9").exists(),
            "the old version is removed"
        );
        assert!(
            !state.join("agent-layer/.1.0.part-1").exists(),
            "a crashed maker's debris is removed"
        );
        assert_eq!(ensure(&state, "1.0", &layers).unwrap(), dir);
        // A link planted where the binary should be is not followed.
        std::fs::remove_file(top.join("usr/local/bin/opencode")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", top.join("usr/local/bin/opencode")).unwrap();
        let e = ensure(&state, "2.0", &layers).unwrap_err();
        assert!(e.to_string().contains("usr/local/bin/opencode"), "{e}");
        assert!(!state.join("agent-layer/2.0").exists());
        // Nor a link in the middle of the path: it resolves inside the layer, where the host's
        // file is not (so the lower layer's binary is taken).
        std::fs::remove_dir_all(top.join("usr")).unwrap();
        let host = tmp.path().join("host/bin");
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join("rg"), "a host file").unwrap();
        std::fs::create_dir_all(top.join("usr")).unwrap();
        std::os::unix::fs::symlink(&host, top.join("usr/bin")).unwrap();
        let dir = ensure(&state, "3.0", &layers).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("bin/rg")).unwrap(), "rg");
        assert_eq!(
            std::fs::read_to_string(dir.join("bin/opencode")).unwrap(),
            "bottom"
        );
        assert!(ensure(&state, "../x", &layers).is_err());
    }
}
