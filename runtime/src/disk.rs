//! A bounded writable layer: the overlay's upper and work dirs on a file system of their own.
//!
//! Without it, whatever a sandbox writes into its rootfs lands on the host's disk with no bound
//! (bytes or inodes). With a disk limit, the shim makes `<dir>/disk.img`, a sparse file of the
//! limit's size, formats it as ext4 (`mke2fs`, no journal: the layer dies with the sandbox, and a
//! host crash takes the sandbox with it), attaches it to a free loop device and mounts it at
//! `<dir>/overlay`. The sandbox then gets ENOSPC at the limit, in bytes (the size) and in inodes
//! (mke2fs's default ratio: one per 16 KiB, one per 4 KiB below 512 MiB), and `df /` inside shows
//! the limit. The host pays for what is written, not for the limit (about 230 KiB of metadata for
//! a 10 GiB layer).
//!
//! Ownership: the loop device is attached with autoclear and no fd of ours stays open, so the
//! kernel detaches it when the last mount of it goes; unmounting `<dir>/overlay` (after the
//! overlay above it) is the whole cleanup, done by the shim on delete and by
//! `Runtime::cleanup` after a dead shim, before the state dir (and the image file) is removed.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{MntFlags, MsFlags};

use crate::layout;

/// The smallest disk limit accepted: ext4 and an overlay's work dir need some room.
pub const MIN_DISK_BYTES: u64 = 16 * 1024 * 1024;

/// Where mke2fs is looked for, in order (the shim's PATH may not name sbin dirs).
const MKE2FS: &[&str] = &["/usr/sbin/mke2fs", "/sbin/mke2fs", "/usr/bin/mke2fs"];

// From <linux/loop.h>: the ioctls and the config struct of LOOP_CONFIGURE (Linux 5.8+).
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Makes the bounded file system for the overlay of `dir` and mounts it at `<dir>/overlay`.
/// Its root dir belongs to host root (mode 0755): the overlay's upper dir in it is the
/// sandbox's, the log files beside it are not, and nothing of the sandbox's can plant a link
/// there. Undone by [`unmount`].
pub fn mount(dir: &Path, bytes: u64) -> io::Result<()> {
    if bytes < MIN_DISK_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a disk limit of {bytes} bytes is below the minimum of 16m"),
        ));
    }
    let image = dir.join(layout::DISK_IMAGE);
    let mount_point = dir.join(layout::OVERLAY);
    fs::create_dir_all(&mount_point)?;
    // Root only: the sandbox's files are in it.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&image)?;
    // Sparse: blocks are allocated on the host only as the sandbox writes.
    file.set_len(bytes)?;
    mke2fs(&image, None)?;
    let device = attach_loop(&file)?;
    drop(file);
    let source = device.path.clone();
    // nodev, nosuid as on the overlay; noinit_itable: no kernel thread zeroing inode tables
    // in the background (that would write every table into the sparse file).
    let mounted = nix::mount::mount(
        Some(&source),
        &mount_point,
        Some("ext4"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some("noinit_itable"),
    );
    // The mount holds the device now; closing ours lets autoclear detach it on unmount (or
    // now, when the mount failed).
    drop(device);
    mounted.map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot mount the sandbox's disk {}: {e}", source.display()),
        )
    })
}

/// Mounts the volume `image` at `at` (`nodev,nosuid,noexec`): an ext4 file system in a sparse
/// file of `bytes`, made first if the file does not exist (or holds no file system ext4
/// mounts: a volume is disposable). Its root dir belongs to host root (mode 0755) until the
/// caller hands it on. Undone by unmounting `at` ([`unmount_at`]); the loop device goes with
/// the mount (autoclear).
pub fn mount_volume(image: &Path, at: &Path, bytes: u64) -> io::Result<()> {
    mount_volume_with_inodes(image, at, bytes, None)
}

/// As [`mount_volume`], with room for `inodes` files when given (mke2fs's default is one per
/// 16 KiB).
pub fn mount_volume_with_inodes(
    image: &Path,
    at: &Path,
    bytes: u64,
    inodes: Option<u64>,
) -> io::Result<()> {
    if bytes < MIN_DISK_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a volume of {bytes} bytes is below the minimum of 16m"),
        ));
    }
    fs::create_dir_all(at)?;
    let mut made = false;
    let file = match OpenOptions::new().read(true).write(true).open(image) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            made = true;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(image)?;
            f.set_len(bytes)?;
            mke2fs(image, inodes)?;
            f
        }
        Err(e) => return Err(e),
    };
    let flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    let mount = |file: &File| -> io::Result<()> {
        let device = attach_loop(file)?;
        let mounted = nix::mount::mount(
            Some(&device.path),
            at,
            Some("ext4"),
            flags,
            Some("noinit_itable"),
        );
        drop(device);
        mounted.map_err(io::Error::from)
    };
    match mount(&file) {
        Ok(()) => Ok(()),
        Err(e) if made => Err(e),
        Err(_) => {
            // Not a file system any more (a crash while it was made): start it again.
            drop(file);
            fs::remove_file(image)?;
            mount_volume_with_inodes(image, at, bytes, inodes)
        }
    }
}

/// Unmounts what is mounted at `at` (lazily); nothing mounted is not an error.
pub fn unmount_at(at: &Path) -> io::Result<()> {
    match nix::mount::umount2(at, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Unmounts `<dir>/overlay` if a disk is mounted there (lazily, like the overlay above it; the
/// loop device goes with the last user).
pub fn unmount(dir: &Path) -> io::Result<()> {
    match nix::mount::umount2(&dir.join(layout::OVERLAY), MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        // Not mounted (no disk limit), or already gone.
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn mke2fs(image: &Path, inodes: Option<u64>) -> io::Result<()> {
    let program = MKE2FS
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .unwrap_or(Path::new("mke2fs"));
    let mut cmd = Command::new(program);
    if let Some(n) = inodes {
        cmd.arg("-N").arg(n.to_string());
    }
    let out = cmd
        // No journal (see above), no blocks reserved for growing the file system (4 MiB of
        // metadata written per sandbox and half of mke2fs's time), none reserved for root.
        // metadata_csum (the default) stays: without it mke2fs zeroes every inode table.
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-O",
            "^has_journal,^resize_inode",
            "-m",
            "0",
        ])
        .arg("-E")
        .arg("lazy_itable_init=1,nodiscard,root_owner=0:0")
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot run mke2fs for the sandbox's disk limit ({e}): install e2fsprogs"),
            )
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(io::Error::other(format!(
            "mke2fs failed ({}): {}",
            out.status,
            stderr.trim()
        )));
    }
    Ok(())
}

/// A configured loop device; closing it lets autoclear detach it once nothing mounts it.
struct LoopDevice {
    _fd: OwnedFd,
    path: PathBuf,
}

/// Attaches `file` to a free loop device with autoclear. Another process can take the free
/// device between asking and configuring it (EBUSY): then ask again.
fn attach_loop(file: &File) -> io::Result<LoopDevice> {
    let control = open_rw(Path::new("/dev/loop-control")).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot open /dev/loop-control ({e}): a disk limit needs loop devices (modprobe loop), or run without one (agentd run --disk none, sandbox_disk = \"none\")"
            ),
        )
    })?;
    let mut last = None;
    for _ in 0..64 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number; `control`
        // is an open fd of the loop control device.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let fd = match open_rw(&path) {
            Ok(fd) => fd,
            // Created by the kernel, the node may take a moment to appear in /dev.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                last = Some(e);
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(e),
        };
        let config = LoopConfig {
            fd: u32::try_from(file.as_raw_fd()).map_err(io::Error::other)?,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_AUTOCLEAR,
                lo_file_name: [0; 64],
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `LoopConfig` lays out
        // exactly (repr(C), the kernel's field types); both fds are open for the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), LOOP_CONFIGURE, &config) };
        if r == 0 {
            return Ok(LoopDevice { _fd: fd, path });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "cannot attach the sandbox's disk to {}: {e}",
                    path.display()
                ),
            ));
        }
        last = Some(e);
    }
    Err(io::Error::other(format!(
        "no free loop device for the sandbox's disk: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

fn open_rw(path: &Path) -> io::Result<OwnedFd> {
    // std opens with O_CLOEXEC: no exec'd child inherits the device.
    Ok(OpenOptions::new().read(true).write(true).open(path)?.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_loop_config_matches_the_kernel_layout() {
        // sizeof(struct loop_info64) == 232, sizeof(struct loop_config) == 304 on Linux.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn test_refuses_a_tiny_disk() {
        let dir = tempfile::tempdir().unwrap();
        let e = mount(dir.path(), 1024).unwrap_err();
        assert!(e.to_string().contains("minimum"), "{e}");
    }
}
