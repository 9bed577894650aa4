//! What an image's config gives a sandbox: its environment, working dir and user (resolved in
//! the image's own /etc/passwd and /etc/group), and whether a command exists in its layers.
//! Shared by `agentd run --image` and the daemon's sandboxes, so both read an image the same way.
//!
//! An image's files are hostile: a layer's symlink may point anywhere (`/etc` ->
//! `/root/.ssh`). Paths are resolved in the layers' merged view the way overlayfs and the
//! kernel would inside the sandbox ([`resolve`]): links are read and followed inside the
//! image, every open is `openat2` with `RESOLVE_NO_SYMLINKS` below a layer's root, so no link
//! is ever followed on the host.

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

use agentd_images::ImageRootfs;
use agentd_runtime::spec::DEFAULT_PATH;
use anyhow::Context;

/// The defaults an image's config gives a sandbox's spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDefaults {
    /// The image's environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Its working dir (`/` when it names none).
    pub cwd: PathBuf,
    /// Its user as (uid, gid) inside (root when it names none).
    pub user: (u32, u32),
}

/// Reads the defaults of `image`; fails when its user is not in its passwd/group.
pub fn defaults(image: &ImageRootfs) -> anyhow::Result<ImageDefaults> {
    let config = &image.config;
    Ok(ImageDefaults {
        env: config.env.clone(),
        cwd: PathBuf::from(if config.workdir.is_empty() {
            "/"
        } else {
            config.workdir.as_str()
        }),
        user: if config.user.is_empty() {
            (0, 0)
        } else {
            resolve_user(&image.lower_dirs, &config.user)?
        },
    })
}

/// Sets `KEY=VALUE` in `env`, replacing any earlier value of the key (a process's getenv
/// would see the first of two).
pub fn set_env(env: &mut Vec<String>, kv: String) {
    let key = kv.split('=').next().unwrap_or_default().to_string();
    env.retain(|e| e.split('=').next() != Some(key.as_str()));
    env.push(kv);
}

/// Most symlinks followed resolving one path (the kernel's own limit).
const MAX_LINKS: usize = 40;
/// Largest passwd or group file read.
const MAX_ID_FILE: u64 = 4 << 20;

/// An entry of the layers' merged view.
struct Found {
    /// The layer that holds it.
    layer: usize,
    /// Its path in that layer, with no symlink on the way.
    rel: PathBuf,
    /// An `O_PATH` descriptor of it.
    fd: OwnedFd,
    /// Its type.
    kind: FileType,
}

/// Opens `rel` below `layer` with `flags`, refusing every symlink on the way (`ELOOP`)
/// and never leaving the layer.
fn open_in_layer(layer: &Path, rel: &Path, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    let root = rustix::fs::open(
        layer,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // openat2 resolves `rel` below `root` only, and fails on any symlink or magic link.
    rustix::fs::openat2(
        &root,
        rel,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
}

/// The topmost entry at `rel` (no symlink in it) among `layers`: the first layer that has
/// it; `None` when none has it, a whiteout hides it, or a layer's non-directory on the way
/// hides the layers below (as overlayfs does).
fn entry(layers: &[PathBuf], rel: &Path) -> Option<Found> {
    for (i, layer) in layers.iter().enumerate() {
        match open_in_layer(layer, rel, OFlags::PATH) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd).ok()?;
                let kind = FileType::from_raw_mode(st.st_mode);
                // A 0/0 character device is an overlay whiteout: deleted by this layer.
                if kind == FileType::CharacterDevice && st.st_rdev == 0 {
                    return None;
                }
                return Some(Found {
                    layer: i,
                    rel: rel.to_path_buf(),
                    fd,
                    kind,
                });
            }
            Err(rustix::io::Errno::NOENT) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// `path` (absolute, or relative to `/`) resolved in the merged view of `layers` (topmost
/// first): each component's topmost entry, symlinks (absolute or relative, the last one too)
/// followed inside the image, at most [`MAX_LINKS`]. `None`: it does not exist.
fn resolve(layers: &[PathBuf], path: &str) -> Option<Found> {
    let mut todo: VecDeque<String> = path.split('/').map(str::to_string).collect();
    let mut done: Vec<String> = Vec::new();
    let mut links = 0;
    let mut last = None;
    while let Some(c) = todo.pop_front() {
        match c.as_str() {
            "" | "." => continue,
            ".." => {
                done.pop();
                last = None;
                continue;
            }
            _ => done.push(c),
        }
        let rel: PathBuf = done.iter().collect();
        let found = entry(layers, &rel)?;
        if found.kind == FileType::Symlink {
            links += 1;
            if links > MAX_LINKS {
                return None;
            }
            let target = rustix::fs::readlinkat(&found.fd, "", Vec::new()).ok()?;
            let target = target.to_string_lossy().into_owned();
            done.pop();
            if target.starts_with('/') {
                done.clear();
            }
            for t in target.split('/').rev() {
                todo.push_front(t.to_string());
            }
            last = None;
            continue;
        }
        if found.kind != FileType::Directory && todo.iter().any(|t| !t.is_empty() && t != ".") {
            return None;
        }
        last = Some(found);
    }
    last
}

/// The content of the image's file at `path` (resolved as [`resolve`] does), at most
/// [`MAX_ID_FILE`] bytes.
fn read_image_file(layers: &[PathBuf], path: &str) -> Option<String> {
    let found = resolve(layers, path)?;
    if found.kind != FileType::RegularFile {
        return None;
    }
    let fd = open_in_layer(&layers[found.layer], &found.rel, OFlags::RDONLY).ok()?;
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(MAX_ID_FILE)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// Reads `name` from the image's `/etc/<file>` (passwd or group format).
fn lookup_id(layers: &[PathBuf], file: &str, name: &str) -> Option<(u32, u32)> {
    let text = read_image_file(layers, &format!("/etc/{file}"))?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 4 && f[0] == name)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().unwrap_or(0))))?
    })
}

/// The image config's `user` (`uid`, `uid:gid`, `name` or `name:group`) as ids.
pub fn resolve_user(layers: &[PathBuf], user: &str) -> anyhow::Result<(u32, u32)> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => lookup_id(layers, "passwd", u)
            .with_context(|| format!("the image's user {u:?} is not in its /etc/passwd"))?,
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup_id(layers, "group", g)
                .map(|(gid, _)| gid)
                .with_context(|| format!("the image's group {g:?} is not in its /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

/// Looks `cmd` up the way the sandbox's execvp will, but from the host in the rootfs (or the
/// image's layers, topmost first, where a whiteout hides what is below), so that a missing
/// command is a clear error before any sandbox exists.
pub fn find_command(layers: &[PathBuf], cmd: &str, env: &[String]) -> bool {
    let exists = |p: &Path| {
        resolve(layers, &p.to_string_lossy()).is_some_and(|f| f.kind != FileType::Directory)
    };
    if cmd.contains('/') {
        return exists(Path::new(cmd));
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .filter(|d| !d.is_empty())
        .any(|d| exists(&Path::new(d).join(cmd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_set_env_replaces_a_key() {
        let mut env = vec!["PATH=/bin".to_string(), "A=1".to_string()];
        set_env(&mut env, "PATH=/usr/bin".into());
        set_env(&mut env, "B=2".into());
        assert_eq!(env, ["A=1", "PATH=/usr/bin", "B=2"]);
    }

    #[test]
    fn test_users_and_commands_from_layers() {
        let top = tempfile::tempdir().unwrap();
        let bottom = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(top.path().join("etc")).unwrap();
        std::fs::write(
            top.path().join("etc/passwd"),
            "agent:x:1000:1001::/home/agent:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(top.path().join("etc/group"), "staff:x:50:\n").unwrap();
        std::fs::create_dir_all(bottom.path().join("usr/bin")).unwrap();
        std::fs::write(bottom.path().join("usr/bin/tool"), "").unwrap();
        let layers = [top.path().to_path_buf(), bottom.path().to_path_buf()];
        assert_eq!(resolve_user(&layers, "agent").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(&layers, "agent:staff").unwrap(), (1000, 50));
        assert_eq!(resolve_user(&layers, "7:8").unwrap(), (7, 8));
        assert!(resolve_user(&layers, "nobody").is_err());
        assert!(find_command(&layers, "tool", &[]));
        assert!(find_command(&layers, "/usr/bin/tool", &[]));
        assert!(!find_command(&layers, "tool", &["PATH=/bin".into()]));
    }

    #[test]
    fn test_links_are_followed_in_the_image_never_on_the_host() {
        use std::os::unix::fs::symlink;
        // The host has a passwd naming a user and a tool the image does not have.
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(host.path().join("etc")).unwrap();
        std::fs::write(
            host.path().join("etc/passwd"),
            "hostuser:x:4242:4242::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::create_dir_all(host.path().join("bin")).unwrap();
        std::fs::write(host.path().join("bin/hosttool"), "").unwrap();
        let top = tempfile::tempdir().unwrap();
        let bottom = tempfile::tempdir().unwrap();
        // Hostile links: absolute ones pointing at the host's dirs.
        symlink(host.path().join("etc"), top.path().join("etc")).unwrap();
        symlink(host.path().join("bin"), top.path().join("hostbin")).unwrap();
        // A usual merged layout: /bin -> usr/bin below, the tool above, a relative link.
        symlink("usr/bin", bottom.path().join("bin")).unwrap();
        std::fs::create_dir_all(top.path().join("usr/bin")).unwrap();
        std::fs::write(top.path().join("usr/bin/python3.11"), "").unwrap();
        symlink("python3.11", top.path().join("usr/bin/python3")).unwrap();
        symlink(
            "../../usr/bin/../bin/python3",
            top.path().join("usr/bin/py"),
        )
        .unwrap();
        // A loop.
        symlink("b", top.path().join("a")).unwrap();
        symlink("a", top.path().join("b")).unwrap();
        let layers = [top.path().to_path_buf(), bottom.path().to_path_buf()];
        assert!(resolve_user(&layers, "hostuser").is_err());
        assert!(!find_command(&layers, "/hostbin/hosttool", &[]));
        assert!(!find_command(
            &layers,
            "hosttool",
            &["PATH=/hostbin".into()]
        ));
        assert!(find_command(&layers, "/bin/python3", &[]));
        assert!(find_command(&layers, "python3", &["PATH=/bin".into()]));
        assert!(find_command(&layers, "/usr/bin/py", &[]));
        assert!(!find_command(&layers, "/a", &[]));
        assert!(!find_command(&layers, "/usr/bin", &[]));
        // What the image's /etc would hold, were it inside the image: found.
        std::fs::create_dir_all(
            top.path()
                .join(host.path().join("etc").strip_prefix("/").unwrap()),
        )
        .unwrap();
        std::fs::write(
            top.path()
                .join(host.path().join("etc/passwd").strip_prefix("/").unwrap()),
            "imageuser:x:7:8::/:/bin/sh\n",
        )
        .unwrap();
        assert_eq!(resolve_user(&layers, "imageuser").unwrap(), (7, 8));
    }
}
