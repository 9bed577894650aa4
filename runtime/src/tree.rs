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
