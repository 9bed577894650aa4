//! The SSH gateway's `sftp` subsystem (protocol version 3, as OpenSSH's `sftp`, `scp` and
//! editors speak it), served by agentd on the sandbox's rootfs: images need no sftp-server.
//!
//! The rootfs is hostile, as for the files API ([`crate::sandbox::fs`]): every path is opened
//! with `openat2(RESOLVE_IN_ROOT)` below the rootfs mount, so no link or `..` the sandbox
//! planted leads out; operations on a path's last component (lstat, remove, mkdir, rename,
//! readlink, symlink) go through its parent dir's fd and never follow it; files are opened
//! `O_NONBLOCK` and checked to be regular. New files and dirs get the sandbox user's owner.
//! Relative paths are below the user's home (from the sandbox's `/etc/passwd`, else `/`).
//!
//! What it reaches is what the files API reaches: the overlay rootfs, not the sandbox's
//! private tmpfs mounts (`/tmp`, `/dev/shm`). Owners are not changed (a request to is
//! refused); `rename` does not replace an existing file (as OpenSSH's plain rename).
//! `symlink` takes its arguments in OpenSSH's order (target first, then the link).
//!
//! Bounded: packets of [`MAX_PACKET`], reads of [`MAX_READ`], [`MAX_HANDLES`] open handles.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use russh_sftp::protocol::{
    Attrs, Data, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use russh_sftp::server::StatusReply;
use rustix::fs::{AtFlags, Mode, RenameFlags, Timespec, Timestamps};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sandbox::fs::open_in_root;
use crate::sandbox::ActiveGuard;

/// Largest packet a client may send.
pub const MAX_PACKET: u32 = 256 * 1024;
/// Largest read answered at once.
const MAX_READ: u32 = 64 * 1024;
/// Most open file and dir handles per session.
const MAX_HANDLES: usize = 256;
/// Names per readdir answer.
const NAMES_PER_READDIR: usize = 128;
/// Largest /etc/passwd read to find the home dir.
const MAX_PASSWD: u64 = 1 << 20;

/// What is done with a session's stream when the SFTP loop lets go of it.
type OnEnd<S> = Box<dyn FnOnce(S) + Send>;

/// A stream that, after its first read error, reads as ended (the SFTP loop stops at the
/// end of its input and would otherwise go round on a broken one), and is handed to `on_end`
/// when the loop drops it (the channel then gets its exit status, as OpenSSH's `scp` wants).
pub struct Fused<S> {
    inner: Option<S>,
    failed: bool,
    on_end: Option<OnEnd<S>>,
}

impl<S> Fused<S> {
    pub fn new(inner: S, on_end: impl FnOnce(S) + Send + 'static) -> Self {
        Fused {
            inner: Some(inner),
            failed: false,
            on_end: Some(Box::new(on_end)),
        }
    }
}

impl<S> Drop for Fused<S> {
    fn drop(&mut self) {
        if let (Some(s), Some(f)) = (self.inner.take(), self.on_end.take()) {
            f(s);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Fused<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.failed {
            return Poll::Ready(Ok(()));
        }
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match Pin::new(inner).poll_read(cx, buf) {
            Poll::Ready(Err(_)) => {
                self.failed = true;
                Poll::Ready(Ok(()))
            }
            r => r,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Fused<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        };
        let r = Pin::new(inner).poll_write(cx, buf);
        if let Poll::Ready(Err(_)) = &r {
            self.failed = true;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let r = Pin::new(inner).poll_flush(cx);
        if let Poll::Ready(Err(_)) = &r {
            self.failed = true;
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// An open handle.
enum Open {
    File(Arc<File>),
    Dir(Arc<Mutex<DirState>>),
}

struct DirState {
    fd: File,
    entries: rustix::fs::Dir,
}

/// One SFTP session on one sandbox.
pub struct SftpSession {
    root: Arc<File>,
    /// Host ids of the sandbox's user (new files' owner).
    owner: (u32, u32),
    /// The first host id of the sandbox's range (ids shown are the sandbox's own).
    id_base: u32,
    /// The sandbox user's uid inside.
    uid: u32,
    home: String,
    handles: HashMap<String, Open>,
    next: u64,
    _guard: ActiveGuard,
}

impl SftpSession {
    pub fn new(root: File, owner: (u32, u32), id_base: u32, uid: u32, guard: ActiveGuard) -> Self {
        SftpSession {
            root: Arc::new(root),
            owner,
            id_base,
            uid,
            home: "/".into(),
            handles: HashMap::new(),
            next: 0,
            _guard: guard,
        }
    }

    /// `p` as an absolute path without `.` or `..` (relative ones are below the home).
    fn resolve(&self, p: &str) -> String {
        normalize(&self.home, p)
    }

    fn add(&mut self, open: Open) -> Result<String, StatusReply> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(StatusCode::Failure
                .with_message(format!("{MAX_HANDLES} handles are open: close some")));
        }
        self.next += 1;
        let h = format!("h{}", self.next);
        self.handles.insert(h.clone(), open);
        Ok(h)
    }

    fn file(&self, handle: &str) -> Result<Arc<File>, StatusReply> {
        match self.handles.get(handle) {
            Some(Open::File(f)) => Ok(f.clone()),
            _ => Err(StatusCode::Failure.with_message("no such file handle")),
        }
    }
}

/// Joins `p` to `home` (when relative) and removes `.`, `..` and empty components; `..`
/// stops at `/`.
fn normalize(home: &str, p: &str) -> String {
    let joined = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{home}/{p}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The parent dir and last component of absolute normalized `path` (None for `/`).
fn split(path: &str) -> Option<(&str, &str)> {
    let i = path.rfind('/')?;
    let name = &path[i + 1..];
    if name.is_empty() {
        return None;
    }
    Some((if i == 0 { "/" } else { &path[..i] }, name))
}

fn status(e: io::Error) -> StatusReply {
    let code = match e.kind() {
        io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    code.with_message(e.to_string())
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

/// Runs `f` on the blocking pool: every file system call here may wait on the disk.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, StatusReply> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(status),
        Err(_) => Err(StatusCode::Failure.with_message("internal error")),
    }
}

/// The parent dir of `path`, opened below `root` (O_PATH), and its last component.
fn parent(root: &File, path: &str) -> io::Result<(File, String)> {
    let (dir, name) = split(path)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not for the root directory"))?;
    let fd = open_in_root(root, Path::new(dir), libc::O_PATH | libc::O_DIRECTORY, 0)?;
    Ok((fd, name.to_string()))
}

/// Gives entry `name` of `dir` (never followed) to `owner`.
fn give(dir: &File, name: &str, owner: (u32, u32)) -> io::Result<()> {
    Ok(rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(owner.0)),
        Some(rustix::fs::Gid::from_raw(owner.1)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Attributes of `st` with the sandbox's own ids.
fn attrs(st: &rustix::fs::Stat, id_base: u32) -> FileAttributes {
    let inside = |id: u32| {
        id.checked_sub(id_base)
            .filter(|i| *i < 65_536)
            .unwrap_or(65_534)
    };
    FileAttributes {
        size: u64::try_from(st.st_size).ok(),
        uid: Some(inside(st.st_uid)),
        gid: Some(inside(st.st_gid)),
        user: None,
        group: None,
        permissions: Some(st.st_mode),
        atime: u32::try_from(st.st_atime).ok(),
        mtime: u32::try_from(st.st_mtime).ok(),
    }
}

fn is_reg_or_dir(st: &rustix::fs::Stat) -> bool {
    matches!(
        rustix::fs::FileType::from_raw_mode(st.st_mode),
        rustix::fs::FileType::RegularFile | rustix::fs::FileType::Directory
    )
}

/// Applies `a` (size, permissions, times) to `path` below `root` (or to the open `file`).
/// Changing owners is refused.
fn set_attrs(
    root: &File,
    target: Result<&File, &str>,
    a: &FileAttributes,
    id_base: u32,
) -> io::Result<()> {
    let path_fd;
    let fd = match target {
        Ok(f) => f,
        Err(path) => {
            path_fd = open_in_root(root, Path::new(path), libc::O_PATH, 0)?;
            &path_fd
        }
    };
    let st = rustix::fs::fstat(fd)?;
    if !is_reg_or_dir(&st) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "only regular files and directories",
        ));
    }
    let now = attrs(&st, id_base);
    if (a.uid.is_some() && a.uid != now.uid) || (a.gid.is_some() && a.gid != now.gid) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "agentd's SFTP does not change owners",
        ));
    }
    // An O_PATH fd cannot be written through: changes go through its /proc/self/fd entry,
    // which names exactly the inode opened above.
    let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd));
    if let Some(size) = a.size {
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(io::Error::other("only a regular file has a size to set"));
        }
        let w = std::fs::OpenOptions::new().write(true).open(&proc)?;
        rustix::fs::ftruncate(&w, size)?;
    }
    if let Some(mode) = a.permissions {
        rustix::fs::chmod(&proc, Mode::from_raw_mode(mode & 0o7777))?;
    }
    if let (Some(at), Some(mt)) = (a.atime, a.mtime) {
        let ts = |s: u32| Timespec {
            tv_sec: i64::from(s),
            tv_nsec: 0,
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            &proc,
            &Timestamps {
                last_access: ts(at),
                last_modification: ts(mt),
            },
            AtFlags::empty(),
        )?;
    }
    Ok(())
}

/// The home dir of uid `uid` in the sandbox's `/etc/passwd`, if it is a dir there.
fn home_of(root: &File, uid: u32) -> Option<String> {
    use std::io::Read;
    let f = open_in_root(
        root,
        Path::new("/etc/passwd"),
        libc::O_RDONLY | libc::O_NONBLOCK,
        0,
    )
    .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    f.take(MAX_PASSWD).read_to_string(&mut text).ok()?;
    let home = text.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(':').collect();
        (fields.len() >= 6 && fields[2].parse::<u32>().ok() == Some(uid))
            .then(|| normalize("/", fields[5]))
    })?;
    open_in_root(root, Path::new(&home), libc::O_PATH | libc::O_DIRECTORY, 0).ok()?;
    Some(home)
}

impl russh_sftp::server::Handler for SftpSession {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported.with_message("not supported by agentd's SFTP")
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        let (root, uid) = (self.root.clone(), self.uid);
        if let Ok(Some(home)) = blocking(move || Ok(home_of(&root, uid))).await {
            self.home = home;
        }
        Ok(Version::new())
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        Ok(Name {
            id,
            files: vec![russh_sftp::protocol::File::dummy(self.resolve(&path))],
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let (root, path, base) = (self.root.clone(), self.resolve(&path), self.id_base);
        blocking(move || {
            let f = open_in_root(&root, Path::new(&path), libc::O_PATH, 0)?;
            Ok(Attrs {
                id,
                attrs: attrs(&rustix::fs::fstat(&f)?, base),
            })
        })
        .await
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let (root, path, base) = (self.root.clone(), self.resolve(&path), self.id_base);
        blocking(move || {
            let st = if path == "/" {
                rustix::fs::fstat(&*root)?
            } else {
                let (dir, name) = parent(&root, &path)?;
                rustix::fs::statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)?
            };
            Ok(Attrs {
                id,
                attrs: attrs(&st, base),
            })
        })
        .await
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let base = self.id_base;
        let st = match self.handles.get(&handle) {
            Some(Open::File(f)) => rustix::fs::fstat(&**f),
            Some(Open::Dir(d)) => {
                let d = d.lock().expect("dir lock");
                rustix::fs::fstat(&d.fd)
            }
            None => return Err(StatusCode::Failure.with_message("no such handle")),
        }
        .map_err(|e| status(e.into()))?;
        Ok(Attrs {
            id,
            attrs: attrs(&st, base),
        })
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let (root, path, owner) = (self.root.clone(), self.resolve(&filename), self.owner);
        let mut flags = match (
            pflags.contains(OpenFlags::READ),
            pflags.contains(OpenFlags::WRITE) || pflags.contains(OpenFlags::APPEND),
        ) {
            (_, false) => libc::O_RDONLY,
            (false, true) => libc::O_WRONLY,
            (true, true) => libc::O_RDWR,
        };
        if pflags.contains(OpenFlags::APPEND) {
            flags |= libc::O_APPEND;
        }
        if pflags.contains(OpenFlags::TRUNCATE) {
            flags |= libc::O_TRUNC;
        }
        flags |= libc::O_NONBLOCK | libc::O_NOCTTY;
        let create = pflags.contains(OpenFlags::CREATE);
        let exclusive = pflags.contains(OpenFlags::EXCLUDE);
        let mode = attrs.permissions.map_or(0o644, |m| m & 0o777);
        let file = blocking(move || {
            let p = Path::new(&path);
            // Made here (O_EXCL first) or found: only a file agentd made gets the user's owner.
            let (f, made) = if create {
                match open_in_root(&root, p, flags | libc::O_CREAT | libc::O_EXCL, mode) {
                    Ok(f) => (f, true),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !exclusive => {
                        (open_in_root(&root, p, flags, 0)?, false)
                    }
                    Err(e) => return Err(e),
                }
            } else {
                (open_in_root(&root, p, flags, 0)?, false)
            };
            if !f.metadata()?.is_file() {
                return Err(io::Error::other("not a regular file"));
            }
            if made {
                rustix::fs::fchown(
                    &f,
                    Some(rustix::fs::Uid::from_raw(owner.0)),
                    Some(rustix::fs::Gid::from_raw(owner.1)),
                )?;
            }
            Ok(f)
        })
        .await?;
        let handle = self.add(Open::File(Arc::new(file)))?;
        Ok(Handle { id, handle })
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let f = self.file(&handle)?;
        let len = len.min(MAX_READ) as usize;
        let data = blocking(move || {
            let mut buf = vec![0u8; len];
            let n = f.read_at(&mut buf, offset)?;
            buf.truncate(n);
            Ok(buf)
        })
        .await?;
        if data.is_empty() && len > 0 {
            return Err(StatusCode::Eof.into());
        }
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let f = self.file(&handle)?;
        blocking(move || f.write_all_at(&data, offset)).await?;
        Ok(ok(id))
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(_) => Ok(ok(id)),
            None => Err(StatusCode::Failure.with_message("no such handle")),
        }
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        a: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let (root, path, base) = (self.root.clone(), self.resolve(&path), self.id_base);
        blocking(move || set_attrs(&root, Err(&path), &a, base)).await?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        a: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let (root, f, base) = (self.root.clone(), self.file(&handle)?, self.id_base);
        blocking(move || set_attrs(&root, Ok(&f), &a, base)).await?;
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let (root, path) = (self.root.clone(), self.resolve(&path));
        let state = blocking(move || {
            let fd = open_in_root(
                &root,
                Path::new(&path),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )?;
            let entries = rustix::fs::Dir::read_from(&fd)?;
            Ok(DirState { fd, entries })
        })
        .await?;
        let handle = self.add(Open::Dir(Arc::new(Mutex::new(state))))?;
        Ok(Handle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let dir = match self.handles.get(&handle) {
            Some(Open::Dir(d)) => d.clone(),
            _ => return Err(StatusCode::Failure.with_message("no such dir handle")),
        };
        let base = self.id_base;
        let files = blocking(move || {
            let mut d = dir.lock().expect("dir lock");
            let mut files = Vec::new();
            while files.len() < NAMES_PER_READDIR {
                let Some(entry) = d.entries.read() else { break };
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                // An entry removed since it was listed is skipped.
                let Ok(st) =
                    rustix::fs::statat(d.fd.as_fd(), entry.file_name(), AtFlags::SYMLINK_NOFOLLOW)
                else {
                    continue;
                };
                files.push(russh_sftp::protocol::File::new(name, attrs(&st, base)));
            }
            Ok(files)
        })
        .await?;
        if files.is_empty() {
            return Err(StatusCode::Eof.into());
        }
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        let (root, path) = (self.root.clone(), self.resolve(&filename));
        blocking(move || {
            let (dir, name) = parent(&root, &path)?;
            Ok(rustix::fs::unlinkat(&dir, name.as_str(), AtFlags::empty())?)
        })
        .await?;
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        let (root, path) = (self.root.clone(), self.resolve(&path));
        blocking(move || {
            let (dir, name) = parent(&root, &path)?;
            Ok(rustix::fs::unlinkat(
                &dir,
                name.as_str(),
                AtFlags::REMOVEDIR,
            )?)
        })
        .await?;
        Ok(ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        a: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let (root, path, owner) = (self.root.clone(), self.resolve(&path), self.owner);
        let mode = a.permissions.map_or(0o755, |m| m & 0o777);
        blocking(move || {
            let (dir, name) = parent(&root, &path)?;
            rustix::fs::mkdirat(&dir, name.as_str(), Mode::from_raw_mode(mode))?;
            give(&dir, &name, owner)
        })
        .await?;
        Ok(ok(id))
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        let (root, old, new) = (
            self.root.clone(),
            self.resolve(&oldpath),
            self.resolve(&newpath),
        );
        blocking(move || {
            let (odir, oname) = parent(&root, &old)?;
            let (ndir, nname) = parent(&root, &new)?;
            Ok(rustix::fs::renameat_with(
                &odir,
                oname.as_str(),
                &ndir,
                nname.as_str(),
                RenameFlags::NOREPLACE,
            )?)
        })
        .await?;
        Ok(ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let (root, path) = (self.root.clone(), self.resolve(&path));
        let target = blocking(move || {
            let (dir, name) = parent(&root, &path)?;
            let t = rustix::fs::readlinkat(&dir, name.as_str(), Vec::new())?;
            Ok(t.to_string_lossy().into_owned())
        })
        .await?;
        Ok(Name {
            id,
            files: vec![russh_sftp::protocol::File::dummy(target)],
        })
    }

    /// OpenSSH's order: `linkpath` is the link's target (its text), `targetpath` is where
    /// the link is made.
    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, Self::Error> {
        let (root, at, owner) = (self.root.clone(), self.resolve(&targetpath), self.owner);
        if linkpath.is_empty() || linkpath.contains('\0') {
            return Err(StatusCode::Failure.with_message("bad link target"));
        }
        blocking(move || {
            let (dir, name) = parent(&root, &at)?;
            rustix::fs::symlinkat(linkpath.as_str(), &dir, name.as_str())?;
            give(&dir, &name, owner)
        })
        .await?;
        Ok(ok(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_paths_stay_below_root() {
        assert_eq!(normalize("/root", "."), "/root");
        assert_eq!(normalize("/root", "a/../../../etc"), "/etc");
        assert_eq!(normalize("/", "/a//b/./c/"), "/a/b/c");
        assert_eq!(normalize("/home/u", ""), "/home/u");
        assert_eq!(split("/a/b"), Some(("/a", "b")));
        assert_eq!(split("/a"), Some(("/", "a")));
        assert_eq!(split("/"), None);
    }
}
