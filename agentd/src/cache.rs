//! Dependency caches: what a task's setup downloads (pip, uv, npm, yarn) is kept for the next
//! setup of the same repository on the same image.
//!
//! Trust: a cache is keyed by the image's digest and the workspace's origin (its git URL or
//! host path) and is mounted only into the sandbox of a task's shared preparation, where the
//! repository's own setup runs before any agent does. Agents never see it, so what a cache can
//! hold is what that repository's setup put there: a hostile repository poisons only its own
//! future setups, which its setup could do anyway; another repository or image never reads it.
//!
//! Bounds: each cache is an ext4 volume of its own (`dependency_cache` bytes and the inodes
//! that size brings; a sparse file, so the host pays for what is written), at most
//! [`MAX_CACHES`] of them (the least recently used goes first) and none unused for
//! [`CACHE_TTL`]. One preparation at a time uses a cache (an exclusive lock); another one
//! meanwhile runs without it.
//!
//! Layout: `<state>/caches/<key>/{volume.img, mnt/, lock, origin}`. Owner: agentd mounts the
//! volume for a preparation and unmounts it when the preparation's sandbox is gone; a start
//! unmounts what a crash left mounted.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

/// Where a cache is mounted in the sandbox.
pub const MOUNT: &str = "/var/cache/agentd";

/// Most caches kept.
pub const MAX_CACHES: usize = 32;

/// A cache unused this long is removed.
pub const CACHE_TTL: Duration = Duration::from_secs(14 * 24 * 3600);

/// The environment that points package managers at the cache.
pub fn env() -> Vec<String> {
    vec![
        format!("PIP_CACHE_DIR={MOUNT}/pip"),
        format!("UV_CACHE_DIR={MOUNT}/uv"),
        format!("npm_config_cache={MOUNT}/npm"),
        format!("YARN_CACHE_FOLDER={MOUNT}/yarn"),
    ]
}

/// The dependency caches of one agentd.
pub struct Caches {
    dir: PathBuf,
    bytes: u64,
}

/// A cache mounted for one preparation; [`Caches::release`] gives it back.
pub struct MountedCache {
    /// The mounted volume's root (bound into the sandbox at [`MOUNT`]).
    pub dir: PathBuf,
    /// It existed before (a hit) rather than being made now.
    pub reused: bool,
    _lock: Flock<File>,
}

/// Whether a loop device is backed by `image`.
fn attached(image: &Path) -> bool {
    let Ok(image) = fs::canonicalize(image) else {
        return false;
    };
    let Ok(devices) = fs::read_dir("/sys/block") else {
        return false;
    };
    devices.flatten().any(|d| {
        fs::read_to_string(d.path().join("loop/backing_file"))
            .is_ok_and(|f| Path::new(f.trim_end_matches('\n')) == image)
    })
}

impl Caches {
    /// The caches in `<state_dir>/caches`, each `bytes` large.
    pub fn new(state_dir: &Path, bytes: u64) -> Caches {
        Caches {
            dir: state_dir.join("caches"),
            bytes,
        }
    }

    /// The key of the cache for `image` (as a task names it) and the workspace `origin`.
    pub fn key(image_digest: &str, origin: &str) -> String {
        let mut h = Sha256::new();
        for field in [image_digest, origin] {
            // Length-prefixed: no two pairs hash the same bytes.
            h.update((field.len() as u64).to_le_bytes());
            h.update(field.as_bytes());
        }
        let hex: String = h
            .finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect();
        hex
    }

    /// Mounts the cache `key` (made if need be); None when another preparation holds it, or
    /// when its volume is still attached (a sandbox of a preparation before a restart still
    /// mounts it: an ext4 mounted twice would be corrupted). Blocking.
    pub fn acquire(&self, key: &str, origin: &str) -> io::Result<Option<MountedCache>> {
        let dir = self.dir.join(key);
        fs::create_dir_all(&dir)?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join("lock"))?;
        let lock = match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err(_) => return Ok(None),
        };
        let image = dir.join("volume.img");
        let reused = image.exists();
        if !reused {
            self.evict(key)?;
        }
        let mnt = dir.join("mnt");
        // A crash may have left it mounted here: mounts do not stack.
        agentd_runtime::disk::unmount_at(&mnt)?;
        // The loop device of a volume just unmounted goes a moment later (autoclear).
        let mut waited = 0;
        while reused && attached(&image) {
            if waited >= 50 {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
            waited += 1;
        }
        agentd_runtime::disk::mount_volume(&image, &mnt, self.bytes)?;
        if let Err(e) = fs::write(dir.join("origin"), origin) {
            let _ = agentd_runtime::disk::unmount_at(&mnt);
            return Err(e);
        }
        Ok(Some(MountedCache {
            dir: mnt,
            reused,
            _lock: lock,
        }))
    }

    /// Unmounts a cache once its sandbox is gone and marks it used now. Blocking.
    pub fn release(&self, cache: MountedCache) {
        if let Err(e) = agentd_runtime::disk::unmount_at(&cache.dir) {
            tracing::warn!(dir = %cache.dir.display(), error = %e, "cannot unmount a dependency cache");
        }
        if let Some(dir) = cache.dir.parent() {
            let _ = File::options()
                .write(true)
                .open(dir.join("lock"))
                .and_then(|f| f.set_modified(SystemTime::now()));
        }
    }

    /// Makes room for one more cache (not `keep`): removes those unused for [`CACHE_TTL`],
    /// then the least recently used beyond [`MAX_CACHES`] - 1. A cache in use is kept.
    fn evict(&self, keep: &str) -> io::Result<()> {
        let mut caches: Vec<(SystemTime, PathBuf)> = Vec::new();
        for e in fs::read_dir(&self.dir)?.flatten() {
            if e.file_name().to_str() == Some(keep) {
                continue;
            }
            let used = fs::metadata(e.path().join("lock"))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            caches.push((used, e.path()));
        }
        caches.sort();
        let now = SystemTime::now();
        let excess = caches.len().saturating_sub(MAX_CACHES - 1);
        for (i, (used, path)) in caches.into_iter().enumerate() {
            let stale = now.duration_since(used).unwrap_or_default() > CACHE_TTL;
            if i < excess || stale {
                remove_unused(&path);
            }
        }
        Ok(())
    }

    /// After a start: unmounts what a crash left mounted. Blocking.
    pub fn reconcile(&self) {
        if let Some(state_dir) = self.dir.parent() {
            for what in Caches::unmount_all(state_dir) {
                tracing::info!("unmounted {what} left by a crash");
            }
        }
    }

    /// Unmounts every cache of the state dir `state_dir` that is mounted; says which.
    pub fn unmount_all(state_dir: &Path) -> Vec<String> {
        let mut done = Vec::new();
        for e in fs::read_dir(state_dir.join("caches"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let mnt = e.path().join("mnt");
            // Mounted: a different device than its parent dir.
            let dev = |p: &Path| fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::dev(&m));
            if dev(&mnt).ok() != dev(&e.path()).ok()
                && agentd_runtime::disk::unmount_at(&mnt).is_ok()
            {
                done.push(format!("dependency cache mount {}", mnt.display()));
            }
        }
        done
    }
}

/// Removes a cache's dir unless a preparation holds it.
fn remove_unused(path: &Path) {
    let Ok(lock) = File::open(path.join("lock")) else {
        let _ = agentd_runtime::tree::remove_tree(path);
        return;
    };
    if let Ok(_held) = Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
        let _ = agentd_runtime::disk::unmount_at(&path.join("mnt"));
        tracing::info!(cache = %path.display(), "removing an old dependency cache");
        let _ = agentd_runtime::tree::remove_tree(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_keys_differ_by_image_and_origin() {
        let a = Caches::key("sha256:1", "/src/a");
        assert_eq!(a.len(), 24);
        assert_eq!(a, Caches::key("sha256:1", "/src/a"));
        assert_ne!(a, Caches::key("sha256:2", "/src/a"));
        assert_ne!(a, Caches::key("sha256:1", "/src/b"));
        // The separator keeps the two fields apart.
        assert_ne!(
            Caches::key("sha256:1\n/src", "a"),
            Caches::key("sha256:1", "/src\na")
        );
    }
}
