//! Files in a sandbox's rootfs, reached from the host without trusting the rootfs: open in
//! root, write a file, extract a tar into a dir, append a dir to a tar.
//!
//! The sandbox's rootfs is hostile: any component of a path may be a symlink the sandbox
//! planted to point at the host's `/etc`. Every path is therefore opened with
//! `openat2(RESOLVE_IN_ROOT)` relative to the rootfs mount, so the kernel resolves symlinks
//! and `..` as if the rootfs were `/`; directories are walked fd by fd with `O_NOFOLLOW`;
//! files are opened `O_NONBLOCK` (a FIFO cannot hang agentd) and checked with `fstat` to be
//! regular. Files put in get the sandbox user's (shifted) owner. Used by the files API and by
//! tasks (the workspace into `/workspace`).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

// From <linux/openat2.h>.
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `path` under `root` as if `root` were `/`.
pub(crate) fn open_in_root(root: &File, path: &Path, flags: i32, mode: u32) -> io::Result<File> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let how = OpenHow {
        flags: u64::try_from(flags | libc::O_CLOEXEC).unwrap_or(0),
        mode: u64::from(mode),
        resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: c is NUL-terminated and `how` is a valid open_how of the size passed; both
    // outlive the call. A non-negative result is a new fd we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: fd is a fresh descriptor from openat2.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Appends everything below the directory open as `dir`, never following a symlink, to a
/// depth of [`crate::walk::MAX_DEPTH`] (a deeper tree ends the archive with an error).
pub(crate) fn append_dir<W: Write>(b: &mut tar::Builder<W>, dir: File) -> io::Result<()> {
    // Devices, FIFOs, sockets and files replaced since they were listed are skipped.
    crate::walk::walk(
        dir.into(),
        crate::walk::MAX_DEPTH,
        |_, _| false,
        |rel, st, kind| crate::walk::append_to_tar(b, rel, st, kind).map(|_| ()),
    )
}

pub(crate) fn write_file(
    root: &File,
    path: &Path,
    mut data: impl Read,
    owner: (u32, u32),
) -> io::Result<()> {
    let mut f = open_in_root(
        root,
        path,
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_NONBLOCK,
        0o644,
    )?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    io::copy(&mut data, &mut f)?;
    nix::unistd::fchown(f.as_raw_fd(), Some(owner.0.into()), Some(owner.1.into()))
        .map_err(io::Error::from)?;
    Ok(())
}

/// Extracts a tar into directory `dir` (created if missing). Every entry is opened with
/// RESOLVE_IN_ROOT relative to `dir` itself, so nothing lands outside it; hard links and
/// devices are refused.
pub(crate) fn extract_tar(
    root: &File,
    dir: &Path,
    data: impl Read,
    owner: (u32, u32),
) -> io::Result<usize> {
    mkdir_in_root(root, dir, owner)?;
    let base = open_in_root(root, dir, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let mut archive = tar::Archive::new(data);
    let mut count = 0;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let rel = entry.path()?.into_owned();
        let rel_str = rel.to_string_lossy().to_string();
        let target = Path::new("/").join(&rel);
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        match entry.header().entry_type() {
            tar::EntryType::Directory => mkdir_in_root(&base, &target, owner)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    mkdir_in_root(&base, parent, owner)?;
                }
                let mut f = open_in_root(
                    &base,
                    &target,
                    libc::O_WRONLY
                        | libc::O_CREAT
                        | libc::O_TRUNC
                        | libc::O_NOFOLLOW
                        | libc::O_NONBLOCK,
                    mode,
                )?;
                if !f.metadata()?.is_file() {
                    return Err(io::Error::other(format!("{rel_str}: not a regular file")));
                }
                io::copy(&mut entry, &mut f)?;
                nix::unistd::fchown(f.as_raw_fd(), Some(owner.0.into()), Some(owner.1.into()))
                    .map_err(io::Error::from)?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()?
                    .ok_or_else(|| io::Error::other(format!("{rel_str}: symlink without target")))?
                    .into_owned();
                let parent = target.parent().unwrap_or(Path::new("/"));
                mkdir_in_root(&base, parent, owner)?;
                let pfd = open_in_root(&base, parent, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
                let name = target
                    .file_name()
                    .ok_or_else(|| io::Error::other(format!("{rel_str}: bad name")))?;
                nix::unistd::symlinkat(link.as_path(), Some(pfd.as_raw_fd()), name)
                    .map_err(io::Error::from)?;
                nix::unistd::fchownat(
                    Some(pfd.as_raw_fd()),
                    name,
                    Some(owner.0.into()),
                    Some(owner.1.into()),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(io::Error::from)?;
            }
            other => {
                return Err(io::Error::other(format!(
                    "{rel_str}: {other:?} entries are not accepted (files, dirs and symlinks only)"
                )))
            }
        }
        count += 1;
    }
    Ok(count)
}

/// `mkdir -p` of `path` under `root`, every component resolved in root.
pub(crate) fn mkdir_in_root(root: &File, path: &Path, owner: (u32, u32)) -> io::Result<()> {
    let mut cur = std::path::PathBuf::from("/");
    for comp in path.components() {
        let std::path::Component::Normal(name) = comp else {
            continue;
        };
        let parent = open_in_root(root, &cur, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        match nix::sys::stat::mkdirat(
            Some(parent.as_raw_fd()),
            name,
            nix::sys::stat::Mode::from_bits_truncate(0o755),
        ) {
            Ok(()) => {
                nix::unistd::fchownat(
                    Some(parent.as_raw_fd()),
                    name,
                    Some(owner.0.into()),
                    Some(owner.1.into()),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(io::Error::from)?;
            }
            Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        cur.push(name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_symlinks_resolve_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        std::os::unix::fs::symlink("../../../../..", root.path().join("up")).unwrap();
        let r = File::open(root.path()).unwrap();
        // An absolute symlink resolves inside the root: the host file is not reachable.
        let e = open_in_root(&r, Path::new("/escape/secret"), libc::O_RDONLY, 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = open_in_root(&r, Path::new("/up/etc/passwd"), libc::O_RDONLY, 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let me = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        write_file(&r, Path::new("/escape/new"), &b"x"[..], me).unwrap_err();
        assert!(!outside.path().join("new").exists());
        // A tar that climbs out stays in.
        let mut b = tar::Builder::new(Vec::new());
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        b.append_link(&mut l, "up", "../../../..").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "up/x/y", &b"hi"[..]).unwrap();
        let data = b.into_inner().unwrap();
        extract_tar(&r, Path::new("/dst"), &data[..], me).unwrap();
        assert_eq!(std::fs::read(root.path().join("dst/x/y")).unwrap(), b"hi");
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct DirEntry {
    /// Its name.
    pub name: String,
    /// `file`, `dir`, `link` or `other`.
    pub kind: String,
    /// Bytes (of a file).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Unix time (s) of the last change of its content.
    pub mtime: i64,
}

/// The entries of directory `path` below `root` (never following the entries' links), sorted
/// by name, at most `max` of them; true when there were more.
pub(crate) fn list_dir(root: &File, path: &Path, max: usize) -> io::Result<(Vec<DirEntry>, bool)> {
    use rustix::fs::{AtFlags, FileType};
    let dir = open_in_root(root, path, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let mut out = Vec::new();
    let mut more = false;
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        if out.len() >= max {
            more = true;
            break;
        }
        // An entry removed since it was listed is skipped.
        let Ok(st) = rustix::fs::statat(&dir, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => "file",
            FileType::Directory => "dir",
            FileType::Symlink => "link",
            _ => "other",
        };
        out.push(DirEntry {
            name: String::from_utf8_lossy(name).into_owned(),
            kind: kind.into(),
            size: u64::try_from(st.st_size).unwrap_or(0),
            mode: st.st_mode & 0o7777,
            mtime: st.st_mtime,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((out, more))
}
