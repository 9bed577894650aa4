//! Removing a directory tree a sandbox wrote: iterative (a tree 20,000 levels deep must not
//! overflow a stack) and with two file descriptors at a time (one per level would run out of
//! them long before such a depth), never following a symlink.
//!
//! `std::fs::remove_dir_all` recurses with one open directory per level, so a deep tree made
//! inside a sandbox defeats it (EMFILE) and its data outlives the sandbox.
//!
//! The walk goes back up with `..`: it is meant for trees nobody changes while they are
//! removed (a stopped sandbox's state dir). A tree changed meanwhile can make it fail, never
//! make it remove something outside the tree: every entry is removed relative to the
//! directory it was listed in, and a directory is entered only with `O_NOFOLLOW`.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

/// One directory on the way down: its name in its parent and its subdirectories not yet
/// removed.
struct Level {
    name: CString,
    pending: Vec<CString>,
}

fn open_dir_at(parent: &impl AsFd, name: &CStr) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        Some(parent.as_fd().as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Removes every non-directory in `dir` and returns its subdirectories' names.
fn clear_files(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    let mut subdirs = Vec::new();
    // A second descriptor for the listing: Dir takes ownership of the one it reads.
    let listing = nix::dir::Dir::from_fd(nix::unistd::dup(dir.as_raw_fd())?)?;
    let mut names = Vec::new();
    for entry in listing.into_iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        names.push(name.to_owned());
    }
    for name in names {
        let st = match nix::sys::stat::fstatat(
            Some(dir.as_raw_fd()),
            name.as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            subdirs.push(name);
        } else {
            match nix::unistd::unlinkat(
                Some(dir.as_raw_fd()),
                name.as_c_str(),
                UnlinkatFlags::NoRemoveDir,
            ) {
                Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(subdirs)
}

/// Deepest directory level [`copy_layer`] enters (two descriptors are open per level).
pub const MAX_COPY_DEPTH: usize = 512;

/// What [`copy_layer`] copied.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Directories made.
    pub dirs: u64,
    /// Regular files, symlinks, whiteouts and FIFOs made (hard links included).
    pub files: u64,
    /// Bytes of file content copied.
    pub bytes: u64,
    /// Entries left out: sockets and devices other than whiteouts.
    pub skipped: u64,
}

/// The overlay xattr that marks a directory opaque (it hides the layers below).
const OPAQUE: &CStr = c"trusted.overlay.opaque";

/// One directory being copied: the source and the copy, the names still to visit, and the
/// source's times (set on the copy once its entries are in, which change its mtime).
struct CopyLevel {
    rel: std::path::PathBuf,
    src: OwnedFd,
    dst: OwnedFd,
    names: Vec<CString>,
    times: [libc::timespec; 2],
}

fn times_of(st: &libc::stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn list_names(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    let listing = nix::dir::Dir::from_fd(nix::unistd::dup(dir.as_raw_fd())?)?;
    let mut names = Vec::new();
    for entry in listing.into_iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Owner, mode and times of the entry `name` in `dir` (made by us; never followed).
fn set_meta(dir: &OwnedFd, name: &CStr, st: &libc::stat, link: bool) -> io::Result<()> {
    // SAFETY: plain syscalls on a descriptor we own and a NUL-terminated name; with
    // AT_SYMLINK_NOFOLLOW none of them follows a symlink.
    unsafe {
        check(libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.st_uid,
            st.st_gid,
            libc::AT_SYMLINK_NOFOLLOW,
        ))?;
        if !link {
            // After the chown, which clears set-id bits.
            check(libc::fchmodat(
                dir.as_raw_fd(),
                name.as_ptr(),
                st.st_mode & 0o7777,
                0,
            ))?;
        }
        let times = times_of(st);
        check(libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        ))
    }
}

/// Whether the directory `fd` carries the opaque marker.
fn is_opaque(fd: &OwnedFd) -> bool {
    let mut value = [0u8; 4];
    // SAFETY: reads at most `value.len()` bytes into our buffer from a descriptor we own.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            OPAQUE.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

fn mark_opaque(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: writes one byte of our buffer as the xattr of a descriptor we own.
    check(unsafe { libc::fsetxattr(fd.as_raw_fd(), OPAQUE.as_ptr(), c"y".as_ptr().cast(), 1, 0) })
}

/// Copies the writable layer of a sandbox (an overlay upper dir, which nothing changes while
/// it is copied: the sandbox is frozen) into the new directory `dest`, so that it can be
/// stacked as an overlay lower layer: directories, regular files (content, hard links kept),
/// symlinks (never followed), whiteouts (0/0 character devices) and FIFOs, with owners,
/// modes, times and the opaque marker. Other xattrs are left out (file capabilities
/// included); so are sockets and other devices, which a sandbox cannot make. Iterative,
/// fd-relative and [`MAX_COPY_DEPTH`] deep at most; the copy is synced before it returns.
/// On an error, `dest` is left for the caller to remove.
pub fn copy_layer(src: &Path, dest: &Path) -> io::Result<CopyStats> {
    use std::collections::HashMap;
    let open_flags = libc::O_DIRECTORY | libc::O_NOFOLLOW;
    let src_root: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(open_flags)
        .open(src)?
        .into();
    std::fs::create_dir(dest)?;
    let dst_root: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(open_flags)
        .open(dest)?
        .into();
    let root_st = nix::sys::stat::fstat(src_root.as_raw_fd())?;
    if is_opaque(&src_root) {
        mark_opaque(&dst_root)?;
    }
    let sync_fd = nix::unistd::dup(dst_root.as_raw_fd())?;
    // SAFETY: dup returned a new descriptor that nothing else owns.
    let sync_fd: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(sync_fd) };
    let mut stats = CopyStats::default();
    // (dev, inode) of a source file with more than one link -> its copy's path below `dest`
    // (every component a directory made here).
    let mut linked: HashMap<(u64, u64), CString> = HashMap::new();
    let mut stack = vec![CopyLevel {
        rel: std::path::PathBuf::new(),
        names: list_names(&src_root)?,
        src: src_root,
        dst: dst_root,
        times: times_of(&root_st),
    }];
    while let Some(level) = stack.last_mut() {
        let Some(name) = level.names.pop() else {
            let done = stack.pop().expect("just looked at it");
            // SAFETY: sets the times of a directory we made, by its descriptor.
            check(unsafe { libc::futimens(done.dst.as_raw_fd(), done.times.as_ptr()) })?;
            continue;
        };
        let (src_dir, dst_dir) = (level.src.as_raw_fd(), level.dst.as_raw_fd());
        let st =
            nix::sys::stat::fstatat(Some(src_dir), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                if stack.len() > MAX_COPY_DEPTH {
                    return Err(io::Error::other(format!(
                        "the layer is more than {MAX_COPY_DEPTH} directories deep"
                    )));
                }
                nix::sys::stat::mkdirat(
                    Some(dst_dir),
                    name.as_c_str(),
                    Mode::from_bits_truncate(0o700),
                )?;
                let level = stack.last().expect("the parent is on the stack");
                let src = open_dir_at(&level.src, &name)?;
                let dst = open_dir_at(&level.dst, &name)?;
                if is_opaque(&src) {
                    mark_opaque(&dst)?;
                }
                set_meta(&level.dst, &name, &st, false)?;
                stats.dirs += 1;
                let rel = level.rel.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
                stack.push(CopyLevel {
                    rel,
                    names: list_names(&src)?,
                    src,
                    dst,
                    times: times_of(&st),
                });
            }
            libc::S_IFREG => {
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1 {
                    if let Some(first) = linked.get(&key) {
                        nix::unistd::linkat(
                            Some(sync_fd.as_raw_fd()),
                            first.as_c_str(),
                            Some(dst_dir),
                            name.as_c_str(),
                            AtFlags::empty(),
                        )?;
                        stats.files += 1;
                        continue;
                    }
                }
                let from = nix::fcntl::openat(
                    Some(src_dir),
                    name.as_c_str(),
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?;
                // SAFETY: openat returned a new descriptor that nothing else owns.
                let mut from = std::fs::File::from(unsafe {
                    <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(from)
                });
                let to = nix::fcntl::openat(
                    Some(dst_dir),
                    name.as_c_str(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )?;
                // SAFETY: as above.
                let mut to = std::fs::File::from(unsafe {
                    <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(to)
                });
                stats.bytes += io::copy(&mut from, &mut to)?;
                drop(to);
                let level = stack.last().expect("the dir is on the stack");
                set_meta(&level.dst, &name, &st, false)?;
                stats.files += 1;
                if st.st_nlink > 1 {
                    let rel = level.rel.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
                    let rel =
                        CString::new(rel.into_os_string().into_vec()).expect("names have no NUL");
                    linked.insert(key, rel);
                }
            }
            libc::S_IFLNK => {
                let target = nix::fcntl::readlinkat(Some(src_dir), name.as_c_str())?;
                nix::unistd::symlinkat(target.as_os_str(), Some(dst_dir), name.as_c_str())?;
                set_meta(&level.dst, &name, &st, true)?;
                stats.files += 1;
            }
            libc::S_IFCHR | libc::S_IFIFO
                if st.st_mode & libc::S_IFMT == libc::S_IFIFO || st.st_rdev == 0 =>
            {
                // SAFETY: makes a whiteout (0/0 character device) or a FIFO by name in a
                // directory we made.
                check(unsafe {
                    libc::mknodat(
                        dst_dir,
                        name.as_ptr(),
                        st.st_mode & (libc::S_IFMT | 0o7777),
                        0,
                    )
                })?;
                set_meta(&level.dst, &name, &st, false)?;
                stats.files += 1;
            }
            _ => stats.skipped += 1,
        }
    }
    nix::unistd::syncfs(sync_fd.as_raw_fd())?;
    Ok(stats)
}

/// Removes `path` and everything below it; a missing `path` is not an error.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    let top = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)?;
    let mut cur: OwnedFd = top.into();
    let mut stack = vec![Level {
        name: CString::default(),
        pending: clear_files(&cur)?,
    }];
    loop {
        let top = stack
            .last_mut()
            .expect("the stack holds the top dir until the end");
        if let Some(name) = top.pending.pop() {
            let next = match open_dir_at(&cur, &name) {
                Ok(fd) => fd,
                // Gone or replaced by a non-directory since it was listed: try the next.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                    continue
                }
                Err(e) => return Err(e),
            };
            cur = next;
            let pending = clear_files(&cur)?;
            stack.push(Level { name, pending });
            continue;
        }
        // Everything below this directory is gone: remove it from its parent.
        let done = stack.pop().expect("just looked at it");
        if stack.is_empty() {
            break;
        }
        let parent = open_dir_at(&cur, c"..")?;
        match nix::unistd::unlinkat(
            Some(parent.as_raw_fd()),
            done.name.as_c_str(),
            UnlinkatFlags::RemoveDir,
        ) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
        cur = parent;
    }
    drop(cur);
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn test_copy_layer_keeps_what_overlay_reads_and_follows_no_link() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test makes whiteouts and sets owners: run it as root");
        }
        let base = tempfile::tempdir().unwrap();
        let src = base.path().join("upper");
        std::fs::create_dir_all(src.join("opaque/sub")).unwrap();
        std::fs::write(src.join("opaque/sub/f"), "data").unwrap();
        mark_opaque(&open_dir_at(&std::fs::File::open(&src).unwrap(), c"opaque").unwrap()).unwrap();
        std::fs::write(src.join("setuid"), "x").unwrap();
        std::os::unix::fs::chown(src.join("setuid"), Some(1000), Some(1001)).unwrap();
        std::fs::set_permissions(src.join("setuid"), std::fs::Permissions::from_mode(0o4750))
            .unwrap();
        std::fs::hard_link(src.join("opaque/sub/f"), src.join("link-to-f")).unwrap();
        std::os::unix::fs::symlink("/etc", src.join("etc")).unwrap();
        nix::sys::stat::mknod(
            &src.join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            Mode::empty(),
            0,
        )
        .unwrap();
        nix::unistd::mkfifo(&src.join("fifo"), Mode::S_IRUSR).unwrap();
        let old = nix::sys::time::TimeSpec::new(1_000_000, 0);
        nix::sys::stat::utimensat(
            None,
            &src.join("opaque"),
            &old,
            &old,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();

        let dest = base.path().join("layer");
        let stats = copy_layer(&src, &dest).unwrap();
        assert_eq!(stats.dirs, 2);
        assert_eq!(stats.files, 6, "{stats:?}");
        assert_eq!(stats.bytes, 5);
        assert_eq!(
            std::fs::read_to_string(dest.join("opaque/sub/f")).unwrap(),
            "data"
        );
        let f = std::fs::metadata(dest.join("opaque/sub/f")).unwrap();
        let l = std::fs::metadata(dest.join("link-to-f")).unwrap();
        assert_eq!((f.ino(), f.nlink()), (l.ino(), 2), "the hard link is kept");
        let s = std::fs::metadata(dest.join("setuid")).unwrap();
        assert_eq!((s.uid(), s.gid(), s.mode() & 0o7777), (1000, 1001, 0o4750));
        assert_eq!(
            std::fs::read_link(dest.join("etc")).unwrap(),
            Path::new("/etc")
        );
        let w = std::fs::symlink_metadata(dest.join("gone")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(&w.file_type()) && w.rdev() == 0);
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(
            &std::fs::symlink_metadata(dest.join("fifo"))
                .unwrap()
                .file_type()
        ));
        let dst = std::fs::File::open(&dest).unwrap();
        assert!(is_opaque(&open_dir_at(&dst, c"opaque").unwrap()));
        assert!(!is_opaque(&open_dir_at(&dst, c"opaque/sub").unwrap()));
        assert_eq!(
            std::fs::metadata(dest.join("opaque")).unwrap().mtime(),
            1_000_000,
            "a directory's time is set after its entries"
        );
        // A second copy into the same place is refused, not merged.
        assert!(copy_layer(&src, &dest).is_err());
    }

    #[test]
    fn test_remove_tree_of_any_depth_without_following_links() {
        let base = tempfile::tempdir().unwrap();
        let outside = base.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        let tree = base.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        // 5,000 levels (paths far beyond PATH_MAX), built fd by fd.
        let mut cur: OwnedFd = std::fs::File::open(&tree).unwrap().into();
        for i in 0..5000 {
            let name = CString::new(format!("d{}", i % 7)).unwrap();
            nix::sys::stat::mkdirat(Some(cur.as_raw_fd()), name.as_c_str(), Mode::S_IRWXU).unwrap();
            if i % 1000 == 0 {
                let f = nix::fcntl::openat(
                    Some(cur.as_raw_fd()),
                    c"file",
                    OFlag::O_CREAT | OFlag::O_WRONLY,
                    Mode::S_IRUSR,
                )
                .unwrap();
                nix::unistd::close(f).unwrap();
                nix::unistd::symlinkat(&outside, Some(cur.as_raw_fd()), "link").unwrap();
            }
            cur = open_dir_at(&cur, &name).unwrap();
        }
        drop(cur);
        for i in 0..100 {
            std::fs::create_dir(tree.join(format!("wide{i}"))).unwrap();
        }
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        assert!(outside.join("keep").exists(), "a symlink was followed");
        remove_tree(&tree).unwrap();
        let file = base.path().join("f");
        std::fs::write(&file, "x").unwrap();
        remove_tree(&file).unwrap();
        assert!(!file.exists());
    }
}
