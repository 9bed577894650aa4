//! Where a sandbox's root filesystem comes from: a directory, or the unpacked layers of an
//! image stacked with overlayfs.
//!
//! For layers, the lower dirs are shared by every sandbox of the image and never written (an
//! overlay lower layer is read-only); each sandbox gets its own upper and work dir in its state
//! dir, so a second sandbox of an image costs one mount. The shim mounts the overlay before it
//! creates the container and unmounts it when the sandbox is deleted (it owns it like the
//! cgroup); `Runtime::cleanup` unmounts it after a shim that died.
//!
//! No host path shows in the sandbox's `/proc/self/mountinfo`: the overlay names its dirs by
//! the shim's descriptors (`/proc/self/fd/N`), opened without following symlinks. The image
//! store learns that a layer is in use from a shared `flock` on its dir, which the shim holds
//! for the sandbox's life (see [`MountedOverlay`]); `prune` skips layers it cannot lock.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{MntFlags, MsFlags};

use crate::layout;

/// The root filesystem of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rootfs {
    /// A directory, used as is (bind-mounted by the container runtime).
    Dir(PathBuf),
    /// Image layer dirs, topmost first (overlayfs `lowerdir=` order).
    Layers(Vec<PathBuf>),
}

impl From<&Path> for Rootfs {
    fn from(p: &Path) -> Self {
        Rootfs::Dir(p.to_path_buf())
    }
}

impl From<&PathBuf> for Rootfs {
    fn from(p: &PathBuf) -> Self {
        Rootfs::Dir(p.clone())
    }
}

impl From<PathBuf> for Rootfs {
    fn from(p: PathBuf) -> Self {
        Rootfs::Dir(p)
    }
}

/// The upper dir's name in `<dir>/overlay`.
pub const UPPER: &str = "upper";

/// Most layers one overlay takes (the kernel's limit is 500; the mount data must also fit a
/// page).
pub const MAX_LAYERS: usize = 128;

/// A mounted overlay rootfs (at `<dir>/rootfs`). Holds a shared lock on each layer dir (what
/// the image store's prune looks for) as long as it lives: keep it for the sandbox's life.
#[derive(Debug)]
pub struct MountedOverlay {
    _layer_locks: Vec<Flock<File>>,
}

/// Checks that layer dirs can be named in overlayfs mount options: absolute, existing dirs,
/// without the option separators `,` `:` `\` or a newline.
pub fn validate_layers(layers: &[PathBuf]) -> Result<(), String> {
    if layers.is_empty() {
        return Err("an image rootfs needs at least one layer".into());
    }
    if layers.len() > MAX_LAYERS {
        return Err(format!(
            "{} layers is more than the {MAX_LAYERS} one overlay mount takes",
            layers.len()
        ));
    }
    for layer in layers {
        let s = layer.to_string_lossy();
        if !layer.is_absolute() || s.contains([',', ':', '\\', '\n']) {
            return Err(format!(
                "layer path {s:?} must be absolute and free of ',', ':' and '\\'"
            ));
        }
        if !layer.is_dir() {
            return Err(format!("layer {s} is not a directory"));
        }
    }
    Ok(())
}

/// Mounts the overlay of `layers` at `<dir>/rootfs` with upper and work dirs in `<dir>/overlay`;
/// returns the mount point. The upper dir (which is the merged root dir) belongs to `root`, the
/// host ids of the sandbox's root, so that `/` inside belongs to root inside and the container
/// runtime, running as that root, can create missing mount points such as `/proc`.
///
/// With `disk` (bytes), upper and work live on a file system of that size of their own
/// ([`crate::disk`]); undone by [`unmount_overlay`] too.
pub fn mount_overlay(
    dir: &Path,
    layers: &[PathBuf],
    root: (u32, u32),
    disk: Option<u64>,
) -> io::Result<MountedOverlay> {
    validate_layers(layers).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if let Some(bytes) = disk {
        crate::disk::mount(dir, bytes)?;
    }
    let mounted = mount_layers(dir, layers, root);
    if mounted.is_err() {
        let _ = crate::disk::unmount(dir);
    }
    mounted
}

fn mount_layers(dir: &Path, layers: &[PathBuf], root: (u32, u32)) -> io::Result<MountedOverlay> {
    let overlay = dir.join(layout::OVERLAY);
    let (upper, work, merged) = (
        overlay.join(UPPER),
        overlay.join("work"),
        dir.join(layout::ROOTFS),
    );
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d)?;
    }
    std::os::unix::fs::chown(&upper, Some(root.0), Some(root.1))?;
    let mut layer_locks = Vec::with_capacity(layers.len());
    for layer in layers {
        // Shared: every sandbox of the image holds one; prune's exclusive try fails on it.
        let lock = Flock::lock(open_dir(layer)?, FlockArg::LockShared)
            .map_err(|(_, e)| io::Error::from(e))?;
        layer_locks.push(lock);
    }
    let (upper_dir, work_dir) = (open_dir(&upper)?, open_dir(&work)?);
    // The options name our descriptors, which the sandbox sees in its mountinfo instead of
    // the host's layout (state dir, image store). They resolve now, in this process.
    let fd_path = |f: &File| format!("/proc/self/fd/{}", f.as_raw_fd());
    let lowers: Vec<String> = layer_locks.iter().map(|l| fd_path(l)).collect();
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        fd_path(&upper_dir),
        fd_path(&work_dir)
    );
    tracing::debug!(target = %merged.display(), layers = layers.len(), "mounting overlay rootfs");
    // nodev: an image's device nodes (which the unpacker does not create anyway) never open;
    // nosuid: setuid files in an image grant nothing (no_new_privs does the same inside).
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some(data.as_str()),
    )?;
    Ok(MountedOverlay {
        _layer_locks: layer_locks,
    })
}

/// Opens a dir to name it in mount options: no symlink followed at the last component (the
/// dirs above are agentd's own), close-on-exec (no sandbox process inherits it).
fn open_dir(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))
}

/// Unmounts `<dir>/rootfs` if something is mounted there (lazily: a process that still holds
/// it keeps its view, the state dir can go), then the disk under its upper dir if any.
pub fn unmount_overlay(dir: &Path) -> io::Result<()> {
    let merged = dir.join(layout::ROOTFS);
    match nix::mount::umount2(&merged, MntFlags::MNT_DETACH) {
        Ok(()) => {
            tracing::debug!(target = %merged.display(), "unmounted overlay rootfs");
        }
        // Not mounted, or already gone.
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    crate::disk::unmount(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_validate_layers() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().to_path_buf();
        assert!(validate_layers(std::slice::from_ref(&ok)).is_ok());
        assert!(validate_layers(&[]).is_err());
        assert!(validate_layers(&[PathBuf::from("relative")]).is_err());
        assert!(validate_layers(&[PathBuf::from("/a:b")]).is_err());
        assert!(validate_layers(&[PathBuf::from("/a,upperdir=/etc")]).is_err());
        assert!(validate_layers(&[ok.join("missing")]).is_err());
        assert!(validate_layers(&vec![ok; MAX_LAYERS + 1]).is_err());
    }
}
