//! Walking a directory tree that someone else controls (a sandbox's files, a user's
//! workspace): fd-relative, never following a symlink, iterative (no recursion: a tree
//! 20,000 levels deep must not overflow a stack) and depth-limited (one descriptor is open per
//! level on the way down, so the limit also bounds descriptors).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode};

/// Deepest directory level a walk enters.
pub const MAX_DEPTH: usize = 512;

/// What an entry is, as the walk met it.
pub enum Kind {
    /// A directory; the walk enters it after the visit.
    Dir,
    /// A regular file, opened `O_NOFOLLOW | O_NONBLOCK` (or why it could not be), with its
    /// length from the opened file.
    File(io::Result<(File, u64)>),
    /// A symlink and its target (never followed).
    Symlink(PathBuf),
    /// A device, FIFO or socket.
    Other,
}

/// One open directory on the way down and the names in it still to visit (in reverse order).
struct Frame {
    dir: OwnedFd,
    rel: PathBuf,
    names: Vec<Vec<u8>>,
}

fn open_at(dir: &OwnedFd, name: &CString, flags: OFlag) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name.as_c_str(),
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn list(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let listing = nix::dir::Dir::from_fd(nix::unistd::dup(dir.as_raw_fd())?)?;
    let mut names = Vec::new();
    for entry in listing.into_iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    // Sorted (reproducible archives), reversed so that pop() gives them in order.
    names.sort();
    names.reverse();
    Ok(names)
}

/// Visits everything below the open directory `root` in sorted depth-first order: `visit`
/// gets each entry's path relative to `root`, its `lstat` and what it is. Entries for which
/// `skip` says true are neither visited nor entered. Fails when a directory is deeper than
/// `max_depth` or when `visit` fails.
pub fn walk(
    root: OwnedFd,
    max_depth: usize,
    mut skip: impl FnMut(&Path, &OsStr) -> bool,
    mut visit: impl FnMut(&Path, &FileStat, Kind) -> io::Result<()>,
) -> io::Result<()> {
    let names = list(&root)?;
    let mut stack = vec![Frame {
        dir: root,
        rel: PathBuf::new(),
        names,
    }];
    loop {
        let depth = stack.len();
        let Some(frame) = stack.last_mut() else {
            break;
        };
        let Some(name) = frame.names.pop() else {
            stack.pop();
            continue;
        };
        let rel = frame.rel.join(OsStr::from_bytes(&name));
        if skip(&rel, OsStr::from_bytes(&name)) {
            continue;
        }
        let cname = CString::new(name).expect("a directory entry has no NUL");
        let st = match nix::sys::stat::fstatat(
            Some(frame.dir.as_raw_fd()),
            cname.as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            // Removed since it was listed.
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                if depth > max_depth {
                    return Err(io::Error::other(format!(
                        "{} is more than {max_depth} directories deep",
                        rel.display()
                    )));
                }
                let sub = open_at(&frame.dir, &cname, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
                visit(&rel, &st, Kind::Dir)?;
                let names = list(&sub)?;
                stack.push(Frame {
                    dir: sub,
                    rel,
                    names,
                });
            }
            libc::S_IFREG => {
                // O_NONBLOCK: a file swapped for a FIFO since the lstat cannot hang us;
                // O_NOFOLLOW: one swapped for a symlink is refused.
                let opened = open_at(&frame.dir, &cname, OFlag::O_RDONLY | OFlag::O_NONBLOCK)
                    .and_then(|fd| {
                        let f = File::from(fd);
                        let meta = f.metadata()?;
                        if !meta.is_file() {
                            return Err(io::Error::other("no longer a regular file"));
                        }
                        Ok((f, meta.len()))
                    });
                visit(&rel, &st, Kind::File(opened))?;
            }
            libc::S_IFLNK => {
                let target = nix::fcntl::readlinkat(Some(frame.dir.as_raw_fd()), cname.as_c_str())?;
                visit(&rel, &st, Kind::Symlink(PathBuf::from(target)))?;
            }
            _ => visit(&rel, &st, Kind::Other)?,
        }
    }
    Ok(())
}

/// Appends an entry [`walk`] met to a tar archive, with its mode and mtime: a directory, a
/// regular file (its content) or a symlink (as a link). Returns false, appending nothing, for a
/// device, FIFO or socket, or a file that could not be opened.
pub fn append_to_tar<W: io::Write>(
    b: &mut tar::Builder<W>,
    rel: &Path,
    st: &FileStat,
    kind: Kind,
) -> io::Result<bool> {
    use std::io::Read;
    let mut h = tar::Header::new_gnu();
    h.set_mode(st.st_mode & 0o7777);
    h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    match kind {
        Kind::Dir => {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            b.append_data(&mut h, rel, io::empty())?;
        }
        Kind::File(Ok((f, len))) => {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(len);
            b.append_data(&mut h, rel, f.take(len))?;
        }
        Kind::Symlink(target) => {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, rel, &target)?;
        }
        Kind::File(Err(_)) | Kind::Other => return Ok(false),
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_fd(p: &Path) -> OwnedFd {
        File::open(p).unwrap().into()
    }

    #[test]
    fn test_walk_is_sorted_skips_and_never_follows() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path();
        std::fs::create_dir_all(p.join("b/c")).unwrap();
        std::fs::write(p.join("a"), "1").unwrap();
        std::fs::write(p.join("b/c/d"), "22").unwrap();
        std::fs::create_dir(p.join("skipme")).unwrap();
        std::os::unix::fs::symlink("/etc", p.join("link")).unwrap();
        let mut seen = Vec::new();
        walk(
            dir_fd(p),
            MAX_DEPTH,
            |_, name| name == "skipme",
            |rel, _, kind| {
                let what = match kind {
                    Kind::Dir => "dir".to_string(),
                    Kind::File(f) => format!("file {}", f.unwrap().1),
                    Kind::Symlink(t) => format!("link {}", t.display()),
                    Kind::Other => "other".into(),
                };
                seen.push(format!("{} {what}", rel.display()));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            seen,
            [
                "a file 1",
                "b dir",
                "b/c dir",
                "b/c/d file 2",
                "link link /etc"
            ]
        );
    }

    #[test]
    fn test_walk_refuses_a_tree_deeper_than_the_limit() {
        let t = tempfile::tempdir().unwrap();
        let mut deep = t.path().to_path_buf();
        for _ in 0..10 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let e = walk(dir_fd(t.path()), 5, |_, _| false, |_, _, _| Ok(())).unwrap_err();
        assert!(
            e.to_string().contains("more than 5 directories deep"),
            "{e}"
        );
        walk(dir_fd(t.path()), 10, |_, _| false, |_, _, _| Ok(())).unwrap();
    }
}
