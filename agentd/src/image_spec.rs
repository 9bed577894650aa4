//! What an image's config gives a sandbox: its environment, working dir and user (resolved in
//! the image's own /etc/passwd and /etc/group), and whether a command exists in its layers.
//! Shared by `agentd run --image` and the daemon's sandboxes, so both read an image the same way.

use std::path::{Path, PathBuf};

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

/// Reads `name` from `etc/<file>` of the topmost layer that has it (passwd or group format).
fn lookup_id(layers: &[PathBuf], file: &str, name: &str) -> Option<(u32, u32)> {
    let text = layers
        .iter()
        .find_map(|l| std::fs::read_to_string(l.join("etc").join(file)).ok())?;
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
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let exists = |p: &Path| {
        let rel = p.strip_prefix("/").unwrap_or(p);
        for layer in layers {
            if let Ok(meta) = layer.join(rel).symlink_metadata() {
                // A 0/0 character device is an overlay whiteout: deleted by this layer.
                return !(meta.file_type().is_char_device() && meta.rdev() == 0);
            }
        }
        false
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
}
