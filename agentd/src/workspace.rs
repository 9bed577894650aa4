//! Task workspaces: a host directory, an uploaded tar, or a git URL the host can reach, each
//! turned into one tar (`workspace.tar` in the task's dir) that agentd extracts into every
//! attempt's `/workspace`.
//!
//! A host directory is read with the file-system identity (fsuid/fsgid) of the directory's
//! owner, on a thread of its own: a task can only carry into a sandbox what the owner of the
//! workspace could read, never root's view of the host (a symlink to `/etc/shadow`, another
//! user's 0600 file). Symlinks are copied as symlinks, never followed; devices, FIFOs and
//! sockets are skipped. Uploaded tars are checked entry by entry (files, dirs, symlinks only).
//! Git URLs are cloned on the host with `git` over http(s), git or ssh only (no `file://`,
//! no `ext::` helpers that would run commands).

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest workspace (bytes of file content).
pub const MAX_WORKSPACE_BYTES: u64 = 1 << 30;
/// Most entries in a workspace.
pub const MAX_WORKSPACE_ENTRIES: u64 = 500_000;
/// How long a git clone may take.
pub const GIT_TIMEOUT: Duration = Duration::from_secs(600);
/// Protocols `git clone` may use for a task's workspace.
pub const GIT_PROTOCOLS: &str = "http:https:git:ssh";

/// Errors while preparing a workspace: all of them are the request's fault or the source's,
/// and are shown to the client.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The request names no source, or more than one.
    #[error("workspace needs exactly one of path, upload or git")]
    Source,
    /// A field is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// A host path could not be read.
    #[error("workspace {path}: {source}")]
    Read {
        /// What could not be read.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not allowed for this client (e.g. an internal address from a TCP client).
    #[error("{0}")]
    Forbidden(String),
    /// The workspace is over a limit.
    #[error("workspace is too large: {0}")]
    TooLarge(String),
    /// `git` failed.
    #[error("git {what} failed: {detail}")]
    Git {
        /// Which step.
        what: String,
        /// git's own message.
        detail: String,
    },
    /// agentd could not write the tar.
    #[error("failed to write the workspace archive")]
    Write(#[source] io::Error),
}

type Result<T> = std::result::Result<T, WorkspaceError>;

/// Where a task's workspace comes from (`workspace` of `POST /v1/tasks`): exactly one of
/// `path`, `upload` or `git`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSpec {
    /// An absolute directory on agentd's host (on the Unix socket only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The id `POST /v1/workspaces` returned for an uploaded tar.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload: Option<String>,
    /// A git URL agentd's host can reach (http, https, git or ssh).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git: Option<String>,
    /// Branch, tag or commit of `git` [default: the remote's HEAD].
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Paths left out of a `path` or `git` workspace: an entry is skipped when its path
    /// relative to the workspace, or its name, equals one of these (e.g. `target`,
    /// `node_modules`, `build/cache`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

impl WorkspaceSpec {
    /// Checks the fields without touching the host.
    pub fn validate(&self) -> Result<()> {
        let n = [
            self.path.is_some(),
            self.upload.is_some(),
            self.git.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if n != 1 {
            return Err(WorkspaceError::Source);
        }
        if self.git_ref.is_some() && self.git.is_none() {
            return Err(WorkspaceError::Invalid(
                "workspace.ref goes with workspace.git".into(),
            ));
        }
        if let Some(p) = &self.path {
            if !p.starts_with('/') {
                return Err(WorkspaceError::Invalid(format!(
                    "workspace.path must be absolute, got {p:?}"
                )));
            }
        }
        if let Some(u) = &self.upload {
            if !valid_upload_id(u) {
                return Err(WorkspaceError::Invalid(format!(
                    "workspace.upload {u:?} is not an upload id (POST /v1/workspaces returns one)"
                )));
            }
        }
        if let Some(url) = &self.git {
            check_git_url(url)?;
        }
        if !self.exclude.is_empty() && self.upload.is_some() {
            return Err(WorkspaceError::Invalid(
                "workspace.exclude goes with path or git (an upload has what you put in it)".into(),
            ));
        }
        for e in &self.exclude {
            let p = Path::new(e);
            if e.is_empty()
                || p.is_absolute()
                || p.components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(WorkspaceError::Invalid(format!(
                    "workspace.exclude {e:?}: give a relative path or a name, like target"
                )));
            }
        }
        if let Some(r) = &self.git_ref {
            if r.is_empty()
                || r.starts_with('-')
                || r.len() > 255
                || r.chars().any(|c| c.is_control() || c == ' ')
            {
                return Err(WorkspaceError::Invalid(format!(
                    "workspace.ref {r:?} is not a branch, tag or commit"
                )));
            }
        }
        Ok(())
    }

    /// A one-line description for people.
    pub fn describe(&self) -> String {
        match (&self.path, &self.upload, &self.git) {
            (Some(p), _, _) => p.clone(),
            (_, Some(u), _) => format!("upload {u}"),
            (_, _, Some(g)) => match &self.git_ref {
                Some(r) => format!("{g} ({r})"),
                None => g.clone(),
            },
            _ => String::new(),
        }
    }
}

/// What went into a workspace archive.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkspaceInfo {
    /// Entries (files, dirs, symlinks).
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Special files (devices, FIFOs, sockets) left out.
    pub skipped: u64,
    /// Entries left out by `exclude` (a directory counts once).
    #[serde(default)]
    pub excluded: u64,
}

/// Whether `id` has the shape of an upload id.
pub fn valid_upload_id(id: &str) -> bool {
    id.len() == 24 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn check_git_url(url: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(WorkspaceError::Invalid(format!(
            "workspace.git {url:?}: {why}"
        )))
    };
    if url.starts_with('-') || url.chars().any(|c| c.is_control() || c == ' ') {
        return bad("not a URL");
    }
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("file:") || url.starts_with('/') || url.starts_with('.') {
        return bad("local repositories are given as workspace.path");
    }
    let scheme_ok = ["http://", "https://", "git://", "ssh://"]
        .iter()
        .any(|s| lower.starts_with(s));
    // scp-like ssh syntax: user@host:path.
    let scp_like = !lower.contains("://") && url.contains('@') && url.contains(':');
    if !scheme_ok && !scp_like {
        return bad("use an http(s)://, git:// or ssh:// URL");
    }
    Ok(())
}

/// Reads the host directory `dir` as its owner and writes it as a tar to `dest`.
pub fn archive_host_dir(dir: &Path, dest: &Path, exclude: &[String]) -> Result<WorkspaceInfo> {
    let dir = dir.to_path_buf();
    let dest = dest.to_path_buf();
    let exclude = exclude.to_vec();
    // A thread of its own: the fsuid change is per thread and must not leak into a pool
    // thread that later serves something else. The thread ends with the copy.
    std::thread::Builder::new()
        .name("workspace-read".into())
        .spawn(move || {
            let read_err = |source| WorkspaceError::Read {
                path: dir.display().to_string(),
                source,
            };
            // The owner is taken from the directory actually opened, which was reached
            // without following a symlink that someone other than root could have planted.
            let root = open_host_dir(&dir).map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOTDIR) {
                    WorkspaceError::Invalid(format!(
                        "workspace.path {} is not a directory",
                        dir.display()
                    ))
                } else {
                    read_err(e)
                }
            })?;
            let meta = nix::sys::stat::fstat(root.as_raw_fd()).map_err(|e| read_err(e.into()))?;
            if meta.st_mode & libc::S_IFMT != libc::S_IFDIR {
                return Err(WorkspaceError::Invalid(format!(
                    "workspace.path {} is not a directory",
                    dir.display()
                )));
            }
            // The archive is created (and renamed into place) as agentd; only the reads
            // happen as the owner.
            write_archive(&dest, |b, info| {
                let _ids = FsIds::become_owner(meta.st_uid, meta.st_gid);
                // Reopened as the owner: a directory the owner cannot read is refused here.
                let root = nix::fcntl::openat(
                    Some(root.as_raw_fd()),
                    ".",
                    nix::fcntl::OFlag::O_RDONLY
                        | nix::fcntl::OFlag::O_DIRECTORY
                        | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )
                .map_err(|e| read_err(e.into()))?;
                // SAFETY: openat returned a new descriptor that nothing else owns.
                let root = unsafe { OwnedFd::from_raw_fd(root) };
                append_tree(b, root, &dir, &exclude, info)
            })
        })
        .map_err(WorkspaceError::Write)?
        .join()
        .unwrap_or_else(|_| {
            Err(WorkspaceError::Invalid(
                "the workspace reader panicked".into(),
            ))
        })
}

/// Most symlinks followed while resolving a workspace path (the kernel's own limit).
const MAX_PATH_SYMLINKS: usize = 40;

/// Opens the directory at the absolute `path` as `O_PATH`, one component at a time, following
/// only symlinks owned by root: a link planted by another user (`~mallory/ws -> /root/secret`)
/// must not make agentd read what it points at with the permissions of its target's owner.
pub fn open_host_dir(path: &Path) -> io::Result<OwnedFd> {
    use nix::fcntl::{AtFlags, OFlag};
    use std::collections::VecDeque;
    use std::path::Component;
    let open = |dir: &OwnedFd, name: &std::ffi::OsStr| -> io::Result<OwnedFd> {
        let fd = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            name,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let root_dir = || -> io::Result<OwnedFd> { Ok(File::open("/")?.into()) };
    let mut queue: VecDeque<std::ffi::OsString> = VecDeque::new();
    let push_front = |queue: &mut VecDeque<std::ffi::OsString>, p: &Path| {
        let comps: Vec<_> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some("..".into()),
                _ => None,
            })
            .collect();
        for c in comps.into_iter().rev() {
            queue.push_front(c);
        }
    };
    if !path.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path",
        ));
    }
    push_front(&mut queue, path);
    let mut cur = root_dir()?;
    let mut links = 0;
    while let Some(name) = queue.pop_front() {
        let st = nix::sys::stat::fstatat(
            Some(cur.as_raw_fd()),
            name.as_os_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            if st.st_uid != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} goes through the symlink {:?}, owned by uid {}: give the real path of the directory",
                        path.display(),
                        name,
                        st.st_uid
                    ),
                ));
            }
            links += 1;
            if links > MAX_PATH_SYMLINKS {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = nix::fcntl::readlinkat(Some(cur.as_raw_fd()), name.as_os_str())?;
            let target = PathBuf::from(target);
            if target.is_absolute() {
                cur = root_dir()?;
            }
            push_front(&mut queue, &target);
            continue;
        }
        // O_NOFOLLOW: a component swapped for a symlink since the lstat fails here.
        cur = open(&cur, &name)?;
    }
    Ok(cur)
}

/// This thread's fsuid/fsgid set to a file owner's until dropped (and its supplementary
/// groups emptied for good: only for a thread that ends after the copy). When the fsuid leaves 0
/// the kernel also clears this thread's effective file capabilities (CAP_DAC_OVERRIDE,
/// CAP_DAC_READ_SEARCH, CAP_FOWNER, ...), so permission checks are the owner's; setting it
/// back to 0 restores them.
struct FsIds {
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
}

impl FsIds {
    fn become_owner(uid: u32, gid: u32) -> FsIds {
        // No supplementary groups either (root's group 0 would open root:root 0640 files).
        // The raw syscall changes this thread only (glibc's wrapper would change every thread
        // of agentd); the thread is dedicated to this copy and ends with it, so the groups
        // need no restoring.
        // SAFETY: setgroups with size 0 and a null list reads no memory; it only changes this
        // thread's credentials.
        let r = unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) };
        if r != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "cannot drop supplementary groups for the workspace copy");
        }
        // setfsgid first: once the fsuid is not root, we may no longer change the fsgid.
        let old_gid = nix::unistd::setfsgid(nix::unistd::Gid::from_raw(gid));
        let old_uid = nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
        tracing::debug!(uid, gid, "reading the workspace as its owner");
        FsIds {
            uid: old_uid,
            gid: old_gid,
        }
    }
}

impl Drop for FsIds {
    fn drop(&mut self) {
        nix::unistd::setfsuid(self.uid);
        nix::unistd::setfsgid(self.gid);
    }
}

type Builder = tar::Builder<io::BufWriter<File>>;

/// Writes a tar at `dest` (through a temp file renamed into place) with `fill`.
fn write_archive(
    dest: &Path,
    fill: impl FnOnce(&mut Builder, &mut WorkspaceInfo) -> Result<()>,
) -> Result<WorkspaceInfo> {
    let tmp = dest.with_extension("tar.part");
    let file = File::create(&tmp).map_err(WorkspaceError::Write)?;
    let mut b = tar::Builder::new(io::BufWriter::new(file));
    b.follow_symlinks(false);
    let mut info = WorkspaceInfo::default();
    let result = fill(&mut b, &mut info).and_then(|()| {
        let w = b.into_inner().map_err(WorkspaceError::Write)?;
        let f = w
            .into_inner()
            .map_err(|e| WorkspaceError::Write(e.into_error()))?;
        f.sync_all().map_err(WorkspaceError::Write)?;
        std::fs::rename(&tmp, dest).map_err(WorkspaceError::Write)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| info)
}

/// Appends everything below the open directory `root` (sorted, symlinks not followed, at
/// most [`crate::walk::MAX_DEPTH`] levels); `shown` names it in errors.
fn append_tree(
    b: &mut Builder,
    root: OwnedFd,
    shown: &Path,
    exclude: &[String],
    info: &mut WorkspaceInfo,
) -> Result<()> {
    use crate::walk::Kind;
    let read_err = |p: &Path, source: io::Error| WorkspaceError::Read {
        path: shown.join(p).display().to_string(),
        source,
    };
    let mut failure: Option<WorkspaceError> = None;
    let walked = crate::walk::walk(
        root,
        crate::walk::MAX_DEPTH,
        |rel, name| {
            let out = exclude
                .iter()
                .any(|e| Path::new(e) == rel || std::ffi::OsStr::new(e) == name);
            if out {
                info.excluded += 1;
            }
            out
        },
        |rel, st, kind| {
            info.entries += 1;
            if info.entries > MAX_WORKSPACE_ENTRIES {
                failure = Some(WorkspaceError::TooLarge(format!(
                    "more than {MAX_WORKSPACE_ENTRIES} entries"
                )));
                return Err(io::Error::other("too large"));
            }
            let kind = match kind {
                Kind::File(opened) => {
                    let (f, len) = opened.inspect_err(|e| {
                        failure = Some(read_err(rel, io::Error::new(e.kind(), e.to_string())));
                    })?;
                    info.bytes += len;
                    if info.bytes > MAX_WORKSPACE_BYTES {
                        failure = Some(WorkspaceError::TooLarge(format!(
                            "more than {MAX_WORKSPACE_BYTES} bytes of files"
                        )));
                        return Err(io::Error::other("too large"));
                    }
                    Kind::File(Ok((f, len)))
                }
                other => other,
            };
            if !crate::walk::append_to_tar(b, rel, st, kind)? {
                // Devices, FIFOs and sockets.
                info.entries -= 1;
                info.skipped += 1;
            }
            Ok(())
        },
    );
    match (walked, failure) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(f)) => Err(f),
        (Err(e), None) => Err(read_err(Path::new(""), e)),
    }
}

/// Checks an uploaded tar (files, dirs and symlinks; relative paths; within the limits) and
/// returns what it holds.
pub fn check_upload(path: &Path) -> Result<WorkspaceInfo> {
    let f = File::open(path).map_err(WorkspaceError::Write)?;
    let mut archive = tar::Archive::new(io::BufReader::new(f));
    let mut info = WorkspaceInfo::default();
    let bad = |what: String| WorkspaceError::Invalid(format!("uploaded workspace: {what}"));
    for entry in archive
        .entries()
        .map_err(|e| bad(format!("not a tar: {e}")))?
    {
        let entry = entry.map_err(|e| bad(format!("not a tar: {e}")))?;
        let p = entry
            .path()
            .map_err(|e| bad(format!("bad path: {e}")))?
            .into_owned();
        if p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(bad(format!("{} climbs out with ..", p.display())));
        }
        match entry.header().entry_type() {
            tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::Directory
            | tar::EntryType::Symlink => {}
            other => {
                return Err(bad(format!(
                    "{}: {other:?} entries are not accepted (files, dirs and symlinks only)",
                    p.display()
                )))
            }
        }
        info.entries += 1;
        info.bytes += entry.header().size().unwrap_or(0);
        if info.bytes > MAX_WORKSPACE_BYTES || info.entries > MAX_WORKSPACE_ENTRIES {
            return Err(WorkspaceError::TooLarge(format!(
                "at most {MAX_WORKSPACE_BYTES} bytes in {MAX_WORKSPACE_ENTRIES} entries"
            )));
        }
    }
    Ok(info)
}

/// An IP network (`10.0.0.0/8`, `fd00::/8`) the admin lets git URLs from TCP clients reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Network, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address/prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix must be 0-{max}"))?
        };
        Ok(Network { addr, prefix })
    }
}

impl Network {
    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u32) {
            match ip {
                IpAddr::V4(v) => (u128::from(u32::from(v)), 32),
                IpAddr::V6(v) => (u128::from(v), 128),
            }
        };
        let ((net, width), (addr, w2)) = (bits(self.addr), bits(ip));
        if width != w2 {
            return false;
        }
        let shift = width - u32::from(self.prefix);
        shift >= width || (net >> shift) == (addr >> shift)
    }
}

/// Whether an address is one a TCP client must not make agentd's host connect to: loopback,
/// private, link-local (cloud metadata at 169.254.169.254), carrier-grade NAT, unspecified,
/// multicast, broadcast and documentation ranges, and IPv6's equivalents (an IPv4-mapped
/// address counts as its IPv4 address).
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            v.is_loopback()
                || v.is_private()
                || v.is_link_local()
                || v.is_unspecified()
                || v.is_multicast()
                || v.is_broadcast()
                || v.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || o[0] >= 240
        }
        IpAddr::V6(v) => {
            if let Some(m) = v.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(m));
            }
            let s = v.segments();
            v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x64 && s[1] == 0xff9b)
        }
    }
}

/// How a clone asked for over TCP is pinned: the URL to clone and git's extra options.
#[derive(Debug, PartialEq, Eq)]
pub struct PinnedGit {
    /// The URL git is given.
    pub url: String,
    /// `-c` options (the checked address for HTTP, no redirects).
    pub config: Vec<String>,
}

/// Checks a git URL a TCP client gave: http(s) or git:// only (ssh would use the host's keys),
/// its host resolved once, every address public or in `allowed`; git then connects to the
/// address that was checked (curl's resolve for HTTP, the address in the URL for git://) and
/// follows no redirect.
pub async fn pin_git_url(raw: &str, allowed: &[Network]) -> Result<PinnedGit> {
    let bad = |why: String| WorkspaceError::Invalid(format!("workspace.git {raw:?}: {why}"));
    let url = url::Url::parse(raw).map_err(|_| {
        bad("over TCP give an http://, https:// or git:// URL (ssh and scp-like URLs would use agentd's host keys: Unix socket only)".into())
    })?;
    let scheme = url.scheme().to_string();
    if !matches!(scheme.as_str(), "http" | "https" | "git") {
        return Err(bad(format!(
            "{scheme} URLs are accepted on agentd's Unix socket only; over TCP use http(s):// or git://"
        )));
    }
    let host = url
        .host_str()
        .ok_or_else(|| bad("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url
        .port_or_known_default()
        .unwrap_or(if scheme == "git" { 9418 } else { 80 });
    let addrs: Vec<IpAddr> = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    .map_err(|_| bad(format!("{host} did not resolve in 10 s")))?
    .map_err(|e| bad(format!("{host} does not resolve: {e}")))?
    .map(|a| a.ip())
    .collect();
    let Some(first) = addrs.first().copied() else {
        return Err(bad(format!("{host} has no address")));
    };
    for ip in &addrs {
        if is_internal(*ip) && !allowed.iter().any(|n| n.contains(*ip)) {
            return Err(WorkspaceError::Forbidden(format!(
                "workspace.git {raw:?}: {host} is {ip}, an internal address agentd does not reach for TCP clients (an admin can allow it with git_allow_networks)"
            )));
        }
    }
    let ip_text = match first {
        IpAddr::V4(v) => v.to_string(),
        IpAddr::V6(v) => format!("[{v}]"),
    };
    if scheme == "git" {
        let mut pinned = url.clone();
        pinned
            .set_host(Some(&ip_text))
            .map_err(|e| bad(format!("cannot pin the address: {e}")))?;
        return Ok(PinnedGit {
            url: pinned.to_string(),
            config: Vec::new(),
        });
    }
    Ok(PinnedGit {
        url: raw.to_string(),
        config: vec![
            format!("http.curloptResolve={host}:{port}:{ip_text}"),
            "http.followRedirects=false".into(),
        ],
    })
}

/// The URL git is given and its `-c` options: `url` as is, or as `pin` says.
fn pinned(url: &str, pin: Option<PinnedGit>) -> (String, Vec<String>) {
    match pin {
        None => (url.to_string(), Vec::new()),
        Some(p) => (
            p.url,
            p.config
                .into_iter()
                .flat_map(|c| ["-c".to_string(), c])
                .collect(),
        ),
    }
}

/// Size of the volume git works in for a clone or a push's fetch: a workspace's limit and a
/// quarter more for the file system's own blocks and git's packs.
const GIT_VOLUME_BYTES: u64 = MAX_WORKSPACE_BYTES + MAX_WORKSPACE_BYTES / 4;
/// Files that volume has room for.
const GIT_VOLUME_INODES: u64 = MAX_WORKSPACE_ENTRIES + MAX_WORKSPACE_ENTRIES / 4;
/// Name prefix of git volumes (the mount dir; its image file adds `.img`).
const GIT_VOLUME: &str = "git-vol-";

/// A bounded file system git clones or fetches into (a remote decides how much it sends,
/// and a small pack can check out to any size): an ext4 volume in a sparse file under the
/// scratch dir, unmounted and removed by [`GitVolume::remove`], or after a crash by
/// [`remove_git_volumes`].
struct GitVolume {
    at: PathBuf,
    image: PathBuf,
}

impl GitVolume {
    async fn mount(scratch: &Path) -> Result<GitVolume> {
        let name = format!("{GIT_VOLUME}{}", crate::sandbox::random_hex(4));
        let v = GitVolume {
            at: scratch.join(&name),
            image: scratch.join(format!("{name}.img")),
        };
        let (at, image) = (v.at.clone(), v.image.clone());
        tokio::task::spawn_blocking(move || {
            agentd_runtime::disk::mount_volume_with_inodes(
                &image,
                &at,
                GIT_VOLUME_BYTES,
                Some(GIT_VOLUME_INODES),
            )
        })
        .await
        .map_err(|e| WorkspaceError::Write(io::Error::other(e)))?
        .map_err(|e| {
            WorkspaceError::Write(io::Error::new(
                e.kind(),
                format!("cannot make the bounded volume git works in: {e}"),
            ))
        })?;
        Ok(v)
    }

    async fn remove(self) {
        let _ = tokio::task::spawn_blocking(move || remove_volume(&self.at, &self.image)).await;
    }
}

/// Unmounts a git volume and removes its dir and image; whether it is gone.
fn remove_volume(at: &Path, image: &Path) -> bool {
    if let Err(e) = agentd_runtime::disk::unmount_at(at) {
        tracing::warn!(path = %at.display(), error = %e, "cannot unmount a git volume");
        return false;
    }
    // The volume's files went with the unmount; the dir under it is an empty mount point
    // unless the volume never got mounted (then git never ran in it: its files are ours).
    let _ = agentd_runtime::tree::remove_tree(at);
    let _ = std::fs::remove_file(image);
    true
}

/// Removes the git volumes a crash left in `dir` or in its `push-*` dirs (blocking); what
/// it removed, one line each.
pub fn remove_git_volumes(dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("push-") {
            removed.extend(remove_git_volumes(&e.path()));
        } else if name.starts_with(GIT_VOLUME)
            && !name.ends_with(".img")
            && remove_volume(&e.path(), &dir.join(format!("{name}.img")))
        {
            removed.push(format!("git volume {}", e.path().display()));
        }
    }
    removed
}

/// The error for git failing in a [`GitVolume`]: a full volume says which limit was hit.
fn volume_error(url: &str, e: WorkspaceError) -> WorkspaceError {
    match e {
        WorkspaceError::Git { detail, .. }
            if detail.contains("No space left") || detail.contains("ENOSPC") =>
        {
            WorkspaceError::Invalid(format!(
                "{url} is larger than agentd's workspace limit ({} MiB, {MAX_WORKSPACE_ENTRIES} files): {detail}",
                MAX_WORKSPACE_BYTES >> 20
            ))
        }
        other => other,
    }
}

/// What [`push_patch`] is to push.
pub struct Push<'a> {
    /// The repository (as the task gave it).
    pub url: &'a str,
    /// The commit the change applies to (the workspace's commit).
    pub source: &'a str,
    /// The change, as `git apply` takes it (a file agentd wrote).
    pub patch: &'a Path,
    /// The commit message.
    pub message: &'a str,
    /// The branch to make; it must not exist there yet.
    pub branch: &'a str,
    /// A git credential-store file, if agentd was given one.
    pub credentials: Option<&'a Path>,
    /// For a push asked for over TCP: where git may connect ([`pin_git_url`]).
    pub pin: Option<PinnedGit>,
}

/// Makes the change a commit on top of `source` and pushes it to `url` as a new branch: the
/// remote's branches are fetched into a repository in `scratch` (emptied again), the patch is
/// applied to `source`'s tree there (plumbing: no checkout, no hook), and the commit is pushed
/// with `--force-with-lease=refs/heads/BRANCH:` (refused if the branch exists). Credentials
/// come from `credentials` through git's `store` helper; nothing of them reaches a sandbox.
/// Returns the commit.
pub async fn push_patch(p: Push<'_>, scratch: &Path) -> Result<String> {
    let volume = GitVolume::mount(scratch).await?;
    let repo = volume.at.join("push");
    let result = async {
        let repo_s = repo.to_str().unwrap_or_default().to_string();
        git("init", &["init", "-q", "--", &repo_s], None).await?;
        let (url, mut remote) = pinned(p.url, p.pin);
        // Only the helper agentd names (none from the host's git config).
        remote.push("-c".into());
        remote.push("credential.helper=".into());
        if let Some(f) = p.credentials {
            let f = f.to_str().unwrap_or_default().replace('\'', "");
            remote.push("-c".into());
            remote.push(format!("credential.helper=store --file='{f}'"));
        }
        let args = |tail: &[&str]| -> Vec<String> {
            let mut a = remote.clone();
            a.extend(tail.iter().map(|s| s.to_string()));
            a
        };
        let fetch = args(&[
            "fetch",
            "-q",
            "--no-tags",
            "--",
            &url,
            "+refs/heads/*:refs/remotes/origin/*",
        ]);
        let fetch: Vec<&str> = fetch.iter().map(String::as_str).collect();
        git("fetch", &fetch, Some(&repo))
            .await
            .map_err(|e| volume_error(p.url, e))?;
        // Checked here too (the lease below refuses it as well, except when the branch holds
        // the very commit made now: then git says "up to date").
        let existing = format!("refs/remotes/origin/{}", p.branch);
        if let Ok(at) = git_out(
            "rev-parse",
            &["rev-parse", "--verify", "--quiet", &existing],
            Some(&repo),
        )
        .await
        {
            return Err(WorkspaceError::Git {
                what: "push".into(),
                detail: format!(
                    "branch {} exists in {} already (at {at}): pick another name",
                    p.branch, p.url
                ),
            });
        }
        let source_commit = format!("{}^{{commit}}", p.source);
        if git("cat-file", &["cat-file", "-e", &source_commit], Some(&repo))
            .await
            .is_err()
        {
            return Err(WorkspaceError::Invalid(format!(
                "{} has no branch holding commit {} (the workspace's) any more: nothing to push onto",
                p.url, p.source
            )));
        }
        let patch = p.patch.to_str().unwrap_or_default();
        git("read-tree", &["read-tree", p.source], Some(&repo)).await?;
        git(
            "apply",
            &["apply", "--cached", "--whitespace=nowarn", "--", patch],
            Some(&repo),
        )
        .await?;
        let tree = git_out("write-tree", &["write-tree"], Some(&repo)).await?;
        let commit = git_out(
            "commit-tree",
            &[
                "-c",
                "user.name=agentd",
                "-c",
                "user.email=agentd@localhost",
                "commit-tree",
                &tree,
                "-p",
                p.source,
                "-m",
                p.message,
            ],
            Some(&repo),
        )
        .await?;
        let lease = format!("--force-with-lease=refs/heads/{}:", p.branch);
        let refspec = format!("{commit}:refs/heads/{}", p.branch);
        let push = args(&["push", "-q", "--no-verify", &lease, "--", &url, &refspec]);
        let push: Vec<&str> = push.iter().map(String::as_str).collect();
        git("push", &push, Some(&repo)).await?;
        Ok(commit)
    }
    .await;
    volume.remove().await;
    result
}

/// Clones `url` (at `git_ref`) on the host and archives the checkout, `.git` included, to
/// `dest`. `scratch` is an empty dir agentd owns; it is emptied again. `pin`, for a URL from a
/// TCP client, says where git may connect ([`pin_git_url`]).
pub async fn archive_git(
    url: &str,
    git_ref: Option<&str>,
    exclude: &[String],
    scratch: &Path,
    dest: &Path,
    pin: Option<PinnedGit>,
) -> Result<WorkspaceInfo> {
    let volume = GitVolume::mount(scratch).await?;
    let checkout = volume.at.join("checkout");
    let given_url = url;
    let result = async {
        let (url, mut args) = pinned(url, pin);
        args.extend(
            [
                "clone",
                "--quiet",
                "--",
                &url,
                checkout.to_str().unwrap_or_default(),
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        git("clone", &args, None)
            .await
            .map_err(|e| volume_error(given_url, e))?;
        if let Some(r) = git_ref {
            // A branch of the remote, else a tag or commit.
            let remote = format!("origin/{r}");
            let target = if git(
                "rev-parse",
                &[
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    &format!("{remote}^{{commit}}"),
                ],
                Some(&checkout),
            )
            .await
            .is_ok()
            {
                remote
            } else {
                r.to_string()
            };
            git(
                "checkout",
                &["checkout", "--quiet", "--detach", &target, "--"],
                Some(&checkout),
            )
            .await
            .map_err(|e| match e {
                WorkspaceError::Git { detail, .. } if !detail.contains("No space left") => {
                    WorkspaceError::Invalid(format!(
                        "workspace.ref {r:?} is not a branch, tag or commit of {url}: {detail}"
                    ))
                }
                other => volume_error(given_url, other),
            })?;
        }
        let (c, d, x) = (checkout.clone(), dest.to_path_buf(), exclude.to_vec());
        tokio::task::spawn_blocking(move || {
            write_archive(&d, |b, info| {
                let root = File::open(&c).map_err(|source| WorkspaceError::Read {
                    path: c.display().to_string(),
                    source,
                })?;
                append_tree(b, root.into(), &c, &x, info)
            })
        })
        .await
        .map_err(|e| WorkspaceError::Write(io::Error::other(e)))?
    }
    .await;
    volume.remove().await;
    result
}

/// Most of git's stdout kept (what agentd reads from it is a commit id or a short list).
const MAX_GIT_STDOUT: usize = 1 << 20;
/// Most of git's stderr kept: its end (a remote can send any amount of `remote:` lines).
const MAX_GIT_STDERR: usize = 64 << 10;

/// Runs `cmd` to its end with stdout and stderr read while they are produced: stdout's first
/// [`MAX_GIT_STDOUT`] bytes (more is an error: the rest is drained, not kept) and stderr's
/// last [`MAX_GIT_STDERR`].
async fn output_bounded(mut cmd: tokio::process::Command) -> io::Result<std::process::Output> {
    use tokio::io::AsyncReadExt;
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(io::Error::other("git's pipes were not made"));
    };
    let stdout = async {
        let mut kept = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        let mut over = false;
        loop {
            let n = out.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            if kept.len() + n > MAX_GIT_STDOUT {
                over = true;
            } else {
                kept.extend_from_slice(&buf[..n]);
            }
        }
        if over {
            return Err(io::Error::other(format!(
                "git printed more than {MAX_GIT_STDOUT} bytes"
            )));
        }
        Ok::<_, io::Error>(kept)
    };
    let stderr = async {
        let mut kept: std::collections::VecDeque<u8> = std::collections::VecDeque::new();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = err.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            kept.extend(&buf[..n]);
            let excess = kept.len().saturating_sub(MAX_GIT_STDERR);
            kept.drain(..excess);
        }
        Ok::<_, io::Error>(Vec::from(kept))
    };
    let (stdout, stderr, status) = tokio::join!(stdout, stderr, child.wait());
    Ok(std::process::Output {
        status: status?,
        stdout: stdout?,
        stderr: stderr?,
    })
}

/// Runs `git args` (in `cwd`), allowing only network protocols and never prompting.
async fn git(what: &str, args: &[&str], cwd: Option<&PathBuf>) -> Result<()> {
    git_out(what, args, cwd).await.map(|_| ())
}

/// Runs git like [`git`]; its stdout, trimmed.
async fn git_out(what: &str, args: &[&str], cwd: Option<&PathBuf>) -> Result<String> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.args(args)
        .env("GIT_ALLOW_PROTOCOL", GIT_PROTOCOLS)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "/bin/false")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let out = match tokio::time::timeout(GIT_TIMEOUT, output_bounded(cmd)).await {
        Err(_) => {
            return Err(WorkspaceError::Git {
                what: what.into(),
                detail: format!("no result in {} s", GIT_TIMEOUT.as_secs()),
            })
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
            return Err(WorkspaceError::Git {
                what: what.into(),
                detail: "git is not installed on agentd's host (apt-get install git)".into(),
            })
        }
        Ok(Err(e)) => {
            return Err(WorkspaceError::Git {
                what: what.into(),
                detail: e.to_string(),
            })
        }
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let detail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    Err(WorkspaceError::Git {
        what: what.into(),
        detail: detail
            .iter()
            .rev()
            .take(3)
            .rev()
            .copied()
            .collect::<Vec<_>>()
            .join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_spec(json: &str, expected: std::result::Result<(), &str>) {
        let spec: WorkspaceSpec = serde_json::from_str(json).unwrap();
        match (spec.validate(), expected) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{e} lacks {want:?}"),
            (got, want) => panic!("{json}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn test_internal_addresses_and_networks() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "151.101.0.1", "2606:4700::1111"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
        let n: Network = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains("10.9.9.9".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(!n.contains("::1".parse().unwrap()));
        let one: Network = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("nope".parse::<Network>().is_err());
    }

    #[tokio::test]
    async fn test_git_volumes_are_bounded_and_removed_after_a_crash() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test mounts a volume: run it as root");
        }
        let dir = tempfile::tempdir().unwrap();
        let push = dir.path().join("push-ab12");
        std::fs::create_dir_all(&push).unwrap();
        let mounted = |p: &Path| {
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .contains(&format!(" {} ", p.display()))
        };
        let v = GitVolume::mount(&push).await.unwrap();
        assert!(mounted(&v.at));
        let st = nix::sys::statvfs::statvfs(&v.at).unwrap();
        let bytes = st.blocks() * st.fragment_size();
        assert!(
            bytes <= GIT_VOLUME_BYTES && bytes > MAX_WORKSPACE_BYTES,
            "{bytes}"
        );
        assert!(st.files() >= MAX_WORKSPACE_ENTRIES, "{}", st.files());
        std::fs::write(v.at.join("f"), "x").unwrap();
        // A crash: the volume stays until the next start removes it.
        let at = v.at.clone();
        std::mem::forget(v);
        let removed = remove_git_volumes(dir.path());
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert!(!mounted(&at));
        assert_eq!(std::fs::read_dir(&push).unwrap().count(), 0);
        // A full volume says which limit was hit.
        let e = volume_error(
            "https://x.example/r.git",
            WorkspaceError::Git {
                what: "clone".into(),
                detail: "fatal: write error: No space left on device".into(),
            },
        );
        assert!(
            e.to_string()
                .contains("larger than agentd's workspace limit"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn test_git_output_is_read_bounded() {
        let sh = |script: &str| {
            let mut c = tokio::process::Command::new("sh");
            c.args(["-c", script]);
            c
        };
        // A chatty remote: 3 MB on stderr, the end kept.
        let out = output_bounded(sh("head -c 3000000 /dev/zero >&2; echo last >&2; echo ok"))
            .await
            .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"ok\n");
        assert_eq!(out.stderr.len(), MAX_GIT_STDERR);
        assert!(out.stderr.ends_with(b"last\n"));
        // Too much on stdout: an error, after the process ended.
        let e = output_bounded(sh("head -c 2000000 /dev/zero"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }

    #[tokio::test]
    async fn test_git_urls_from_tcp_are_pinned_to_checked_public_addresses() {
        let e = pin_git_url("http://127.0.0.1:9/r.git", &[])
            .await
            .unwrap_err();
        assert!(matches!(e, WorkspaceError::Forbidden(_)), "{e}");
        let e = pin_git_url("http://localhost/r.git", &[])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("internal address"), "{e}");
        let e = pin_git_url("ssh://git@example.com/r.git", &[])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("Unix socket only"), "{e}");
        let e = pin_git_url("git@example.com:r.git", &[]).await.unwrap_err();
        assert!(e.to_string().contains("Unix socket only"), "{e}");
        let allowed = ["127.0.0.0/8".parse().unwrap()];
        let p = pin_git_url("http://localhost:8080/r.git", &allowed)
            .await
            .unwrap();
        assert_eq!(p.url, "http://localhost:8080/r.git");
        assert!(p.config.contains(&"http.followRedirects=false".to_string()));
        assert!(p
            .config
            .iter()
            .any(|c| c.starts_with("http.curloptResolve=localhost:8080:")));
        let p = pin_git_url("git://localhost/r.git", &allowed)
            .await
            .unwrap();
        assert!(
            p.url == "git://127.0.0.1/r.git" || p.url == "git://[::1]/r.git",
            "{}",
            p.url
        );
    }

    #[test]
    fn test_spec_validation() {
        check_spec(r#"{"path":"/srv/repo"}"#, Ok(()));
        check_spec(
            r#"{"git":"https://example.invalid/r.git","ref":"main"}"#,
            Ok(()),
        );
        check_spec(r#"{"git":"git@example.invalid:r.git"}"#, Ok(()));
        check_spec(r#"{"upload":"0123456789abcdef01234567"}"#, Ok(()));
        check_spec(r#"{}"#, Err("exactly one"));
        check_spec(r#"{"path":"/a","git":"https://x/y"}"#, Err("exactly one"));
        check_spec(r#"{"path":"repo"}"#, Err("must be absolute"));
        check_spec(
            r#"{"path":"/a","ref":"main"}"#,
            Err("goes with workspace.git"),
        );
        check_spec(r#"{"git":"file:///etc"}"#, Err("workspace.path"));
        check_spec(r#"{"git":"ext::sh -c id"}"#, Err("not a URL"));
        check_spec(r#"{"git":"--upload-pack=x"}"#, Err("not a URL"));
        check_spec(
            r#"{"git":"https://x/y","ref":"--force"}"#,
            Err("not a branch"),
        );
        check_spec(r#"{"upload":"../../etc"}"#, Err("not an upload id"));
        check_spec(r#"{"path":"/a","exclude":["target","a/b"]}"#, Ok(()));
        check_spec(r#"{"path":"/a","exclude":["../x"]}"#, Err("relative path"));
        check_spec(r#"{"path":"/a","exclude":["/etc"]}"#, Err("relative path"));
        check_spec(
            r#"{"upload":"0123456789abcdef01234567","exclude":["x"]}"#,
            Err("goes with path or git"),
        );
    }

    /// Whether the test can run (as root); without root it is skipped, visibly, unless
    /// `AGENTD_E2E=1` says every test must run, which makes it fail.
    fn root_or_skip(why: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(
            std::env::var("AGENTD_E2E").as_deref() != Ok("1"),
            "needs root ({why}) and AGENTD_E2E=1 is set"
        );
        eprintln!("SKIPPED: needs root ({why})");
        false
    }

    /// A file readable only through one of agentd's supplementary groups is not readable
    /// for the workspace's owner, so the copy refuses it.
    #[test]
    fn test_host_dir_is_read_without_agentds_groups() {
        if !root_or_skip("it changes a thread's groups and chowns files") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("group-only");
        std::fs::write(&secret, "g").unwrap();
        let group = 4242;
        nix::unistd::chown(&secret, Some(0.into()), Some(group.into())).unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o640))
            .unwrap();
        nix::unistd::chown(dir.path(), Some(65534.into()), Some(65534.into())).unwrap();
        let dest = tempfile::tempdir().unwrap();
        let d = dest.path().join("w.tar");
        let src = dir.path().to_path_buf();
        let result = std::thread::spawn(move || {
            // This thread (and the reader thread it starts) has `group` as a supplementary
            // group, as agentd would if started with it.
            let groups = [group];
            // SAFETY: the list outlives the call and holds `len` gids; it changes only this
            // thread's credentials (the thread ends with the test).
            let r = unsafe { libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) };
            assert_eq!(r, 0, "{}", io::Error::last_os_error());
            archive_host_dir(&src, &d, &[])
        })
        .join()
        .unwrap();
        let e = result.unwrap_err();
        assert!(e.to_string().contains("Permission denied"), "{e}");
    }

    #[test]
    fn test_host_dir_archive_keeps_symlinks_and_skips_fifos() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("sub")).unwrap();
        std::fs::write(src.path().join("sub/a.txt"), "hello").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", src.path().join("link")).unwrap();
        nix::unistd::mkfifo(
            &src.path().join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("w.tar");
        std::fs::create_dir_all(src.path().join("target/debug")).unwrap();
        std::fs::write(src.path().join("target/debug/big"), "x").unwrap();
        std::fs::write(src.path().join("sub/skip.log"), "x").unwrap();
        let exclude = ["target".to_string(), "sub/skip.log".to_string()];
        let info = archive_host_dir(src.path(), &dest, &exclude).unwrap();
        assert_eq!(
            info,
            WorkspaceInfo {
                entries: 3,
                bytes: 5,
                skipped: 1,
                excluded: 2,
            }
        );
        let mut names = Vec::new();
        let mut a = tar::Archive::new(File::open(&dest).unwrap());
        for e in a.entries().unwrap() {
            let e = e.unwrap();
            let p = e.path().unwrap().display().to_string();
            if p == "link" {
                // Copied as a link, the host file it names is not read.
                assert_eq!(e.header().entry_type(), tar::EntryType::Symlink);
                assert_eq!(e.header().size().unwrap(), 0);
            }
            names.push(p);
        }
        assert_eq!(names, ["link", "sub", "sub/a.txt"]);
        assert_eq!(check_upload(&dest).unwrap().entries, 3);
        // Not a directory, missing.
        let e = archive_host_dir(&src.path().join("sub/a.txt"), &dest, &[]).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let e = archive_host_dir(&src.path().join("nope"), &dest, &[]).unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
    }

    /// A workspace path through a symlink another user planted is refused (the owner would
    /// otherwise be taken from the link's root-only target); root's own links are followed.
    #[test]
    fn test_host_dir_symlinks_of_other_users_are_not_followed() {
        if !root_or_skip("it chowns files and plants links as another user") {
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let secret = base.path().join("secret");
        std::fs::create_dir(&secret).unwrap();
        std::fs::write(secret.join("key"), "s3cret").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let planted = base.path().join("planted");
        std::os::unix::fs::symlink(&secret, &planted).unwrap();
        std::os::unix::fs::lchown(&planted, Some(65534), Some(65534)).unwrap();
        let dest = base.path().join("out.tar");
        let e = archive_host_dir(&planted, &dest, &[]).unwrap_err();
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        assert!(!dest.exists());
        // Through a planted link in the middle of the path, too.
        let e = archive_host_dir(&planted.join("."), &dest, &[]).unwrap_err();
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        let rooted = base.path().join("rooted");
        std::os::unix::fs::symlink(&secret, &rooted).unwrap();
        let info = archive_host_dir(&rooted, &dest, &[]).unwrap();
        assert_eq!(info.entries, 1);
    }
}
