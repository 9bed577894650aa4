//! Unpacks one layer (a tar, plain, gzip or zstd) into its own directory, in the form overlayfs
//! stacks as a lower dir: whiteouts become 0/0 character devices and opaque markers become the
//! `trusted.overlay.opaque` xattr.
//!
//! Security: the layer is hostile input. Every entry path is checked before anything is written:
//! absolute paths and `..` are refused; no entry may be written through a symlink or a file
//! (the unpacker remembers the type of every path it created, so it never follows a link the
//! layer made, whatever the target says); a hard link must name a non-directory entry of the
//! same layer; device nodes other than whiteouts are not created (a sandbox gets its own /dev);
//! xattrs in the overlay namespaces are dropped (they would steer overlayfs); the uncompressed
//! size is capped. The target dir must be new and private to the caller (the store unpacks into
//! its own `tmp/`), so nothing but this code writes in it meanwhile.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeSpec;

use crate::digest::{Digest, HashingReader};
use crate::sys;

/// Default cap on a layer's uncompressed size: far above any real layer, far below a disk.
pub const DEFAULT_MAX_LAYER_SIZE: u64 = 64 << 30;
/// Default cap on the number of entries in one layer.
pub const DEFAULT_MAX_ENTRIES: u64 = 4_000_000;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// How to unpack.
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Added to every uid and gid (for user-namespaced sandboxes whose root is a host id).
    pub id_offset: u32,
    /// Maximum uncompressed bytes; a bigger layer (a decompression bomb) is refused.
    pub max_size: u64,
    /// Maximum number of entries.
    pub max_entries: u64,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            id_offset: 0,
            max_size: DEFAULT_MAX_LAYER_SIZE,
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

/// What an unpack did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Digest of the uncompressed tar stream.
    pub diff_id: Digest,
    /// Uncompressed bytes read.
    pub tar_bytes: u64,
    /// Regular files written.
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Hard links created.
    pub hardlinks: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Device nodes not created.
    pub skipped_devices: u64,
    /// Xattrs dropped (overlay namespace) or refused by the filesystem.
    pub skipped_xattrs: u64,
}

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("failed to read the layer")]
    Read(#[source] io::Error),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("refused entry {path:?}: {why}")]
    Refused { path: String, why: String },
    #[error(
        "layer is bigger than the limit of {limit} bytes uncompressed (a decompression bomb?)"
    )]
    TooLarge { limit: u64 },
    #[error("layer has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("unpack target {0} already exists")]
    TargetExists(PathBuf),
}

type Result<T> = std::result::Result<T, UnpackError>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn refused(path: &Path, why: impl Into<String>) -> UnpackError {
    UnpackError::Refused {
        path: path.display().to_string(),
        why: why.into(),
    }
}

/// Counts bytes and fails the read once more than `limit` came through.
struct LimitedReader<R> {
    inner: R,
    left: u64,
    tripped: Arc<AtomicBool>,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.tripped.store(true, Ordering::Relaxed);
            return Err(io::Error::other("uncompressed size limit exceeded"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Opens the decompressor that the blob's magic bytes call for (the media type is not trusted
/// to be right: some registries serve gzip under the plain tar type).
fn decompress<'a, R: BufRead + Send + 'a>(mut reader: R) -> Result<Box<dyn Read + Send + 'a>> {
    let head = reader.fill_buf().map_err(UnpackError::Read)?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(
            zstd::stream::read::Decoder::with_buffer(reader).map_err(UnpackError::Read)?,
        ))
    } else {
        Ok(Box::new(reader))
    }
}

/// What the unpacker created at a path (it never asks the filesystem, which the layer shapes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

struct Unpacker<'a> {
    root: &'a Path,
    options: &'a UnpackOptions,
    /// Every path created, relative to root.
    kinds: HashMap<PathBuf, Kind>,
    /// Dirs with the setgid bit: files created in them take the dir's group.
    setgid_dirs: HashSet<PathBuf>,
    /// Directory mtimes, applied last (creating entries inside changes them).
    dir_mtimes: HashMap<PathBuf, i64>,
    /// The process umask, to know when `open`'s mode needs a `fchmod`.
    umask: u32,
    stats: UnpackStats,
}

/// Unpacks a layer blob (compressed or not) from `reader` into the new dir `target`.
/// On error the caller removes `target`.
///
/// Two threads: one decompresses and hashes (the diff-id), the calling one parses the tar and
/// writes the files, so that CPU work and file creation (the slow part on disk) overlap.
pub fn unpack(
    reader: impl BufRead + Send,
    target: &Path,
    options: &UnpackOptions,
) -> Result<UnpackStats> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(target)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                UnpackError::TargetExists(target.into())
            } else {
                UnpackError::Io {
                    op: "failed to create",
                    path: target.into(),
                    source: e,
                }
            }
        })?;
    let tripped = Arc::new(AtomicBool::new(false));
    let read_err = |e: io::Error| {
        if tripped.load(Ordering::Relaxed) {
            UnpackError::TooLarge {
                limit: options.max_size,
            }
        } else {
            UnpackError::Read(e)
        }
    };
    let (chunks_tx, chunks_rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(8);
    std::thread::scope(|scope| {
        let producer = scope.spawn(|| -> Result<(Digest, u64)> {
            let limited = LimitedReader {
                inner: decompress(reader)?,
                left: options.max_size,
                tripped: tripped.clone(),
            };
            let mut hashing = HashingReader::new(limited);
            loop {
                let mut chunk = vec![0u8; CHUNK_SIZE];
                let mut filled = 0;
                while filled < CHUNK_SIZE {
                    match hashing.read(&mut chunk[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let msg = io::Error::new(e.kind(), e.to_string());
                            let _ = chunks_tx.send(Err(msg));
                            return Err(read_err(e));
                        }
                    }
                }
                if filled == 0 {
                    break;
                }
                chunk.truncate(filled);
                if chunks_tx.send(Ok(chunk)).is_err() {
                    // The tar side stopped (it failed): its error is the one to report.
                    return Err(UnpackError::Read(io::Error::other("unpack stopped")));
                }
            }
            drop(chunks_tx);
            hashing.finish().map_err(read_err)
        });
        let consumed = unpack_entries(
            ChannelReader {
                rx: chunks_rx,
                current: Vec::new(),
                pos: 0,
            },
            target,
            options,
            &read_err,
        );
        let produced = producer
            .join()
            .expect("the decompression thread does not panic");
        let mut stats = consumed?;
        let (diff_id, size) = produced?;
        stats.diff_id = diff_id;
        stats.tar_bytes = size;
        Ok(stats)
    })
}

/// Size of the decompressed chunks handed from the decompression thread to the tar parser.
const CHUNK_SIZE: usize = 1 << 20;

/// Reads the chunks the decompression thread sends.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.current = chunk?;
                    self.pos = 0;
                }
                Err(_) => return Ok(0), // the sender finished: end of stream
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn unpack_entries(
    reader: ChannelReader,
    target: &Path,
    options: &UnpackOptions,
    read_err: &dyn Fn(io::Error) -> UnpackError,
) -> Result<UnpackStats> {
    let mut archive = tar::Archive::new(reader);
    let mut unpacker = Unpacker {
        root: target,
        options,
        kinds: HashMap::new(),
        setgid_dirs: HashSet::new(),
        dir_mtimes: HashMap::new(),
        umask: process_umask(),
        stats: UnpackStats::default(),
    };
    let mut count = 0u64;
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        count += 1;
        if count > options.max_entries {
            return Err(UnpackError::TooManyEntries {
                limit: options.max_entries,
            });
        }
        unpacker.entry(&mut entry).map_err(|e| match e {
            UnpackError::Read(e) => read_err(e),
            other => other,
        })?;
    }
    unpacker.finish()?;
    Ok(unpacker.stats)
}

fn process_umask() -> u32 {
    // /proc/self/status has the umask without changing it (umask(2) would, for every thread).
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:").map(|v| v.trim().to_string()))
        })
        .and_then(|v| u32::from_str_radix(&v, 8).ok())
        .unwrap_or(0o022)
}

/// Turns an entry path into a clean relative path, refusing absolute paths and `..`.
fn clean_path(raw: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err(refused(raw, "path contains `..`")),
            Component::RootDir | Component::Prefix(_) => return Err(refused(raw, "absolute path")),
        }
    }
    Ok(out)
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw_path = entry.path().map_err(UnpackError::Read)?.into_owned();
        let rel = clean_path(&raw_path)?;
        let header = entry.header().clone();
        let header = &header;
        let kind = header.entry_type();
        // PAX records override the header's numeric fields (ids above 2^21, precise mtimes) and
        // carry xattrs.
        let mut uid = header.uid().map_err(UnpackError::Read)?;
        let mut gid = header.gid().map_err(UnpackError::Read)?;
        let mut mtime = header.mtime().map_err(UnpackError::Read)?;
        let mode = header.mode().map_err(UnpackError::Read)? & 0o7777;
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(UnpackError::Read)? {
            for ext in pax {
                let ext = ext.map_err(UnpackError::Read)?;
                let key = ext.key_bytes();
                let parse = || std::str::from_utf8(ext.value_bytes()).ok();
                match key {
                    b"uid" => uid = parse().and_then(|v| v.parse().ok()).unwrap_or(uid),
                    b"gid" => gid = parse().and_then(|v| v.parse().ok()).unwrap_or(gid),
                    b"mtime" => {
                        mtime = parse()
                            .and_then(|v| v.split('.').next()?.parse().ok())
                            .unwrap_or(mtime);
                    }
                    _ => {
                        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                            xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                        }
                    }
                }
            }
        }
        let uid = self.shift(uid, &rel)?;
        let gid = self.shift(gid, &rel)?;
        let mtime = i64::try_from(mtime).unwrap_or(i64::MAX);

        if rel.as_os_str().is_empty() {
            // The layer's own root ("./"): only its metadata applies.
            if kind.is_dir() {
                self.set_owner_mode(self.root, uid, gid, mode, false)?;
                self.dir_mtimes.insert(PathBuf::new(), mtime);
            }
            return Ok(());
        }
        let name = rel
            .file_name()
            .expect("a clean non-empty path has a file name")
            .to_string_lossy()
            .into_owned();
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(&rel, hidden);
        }
        self.ensure_parents(&rel)?;
        let size = header.size().map_err(UnpackError::Read)?;
        if size > self.options.max_size {
            return Err(UnpackError::TooLarge {
                limit: self.options.max_size,
            });
        }
        let path = self.root.join(&rel);

        use tar::EntryType as T;
        match kind {
            T::Directory => {
                match self.kinds.get(&rel) {
                    Some(Kind::Dir) => {}
                    Some(_) => {
                        self.replace(&rel)?;
                        self.mkdir(&path)?;
                    }
                    None => self.mkdir(&path)?,
                }
                self.kinds.insert(rel.clone(), Kind::Dir);
                self.set_owner_mode(&path, uid, gid, mode, false)?;
                if mode & 0o2000 != 0 {
                    self.setgid_dirs.insert(rel.clone());
                } else {
                    self.setgid_dirs.remove(&rel);
                }
                self.dir_mtimes.insert(rel, mtime);
                self.stats.dirs += 1;
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                self.replace(&rel)?;
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode & 0o777)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(io_err("failed to create", &path))?;
                self.kinds.insert(rel.clone(), Kind::File);
                let mut writer = io::BufWriter::with_capacity(256 * 1024, &file);
                io::copy(entry, &mut writer).map_err(|e| {
                    // Reading the entry and writing the file share io::copy; tell them apart.
                    if e.kind() == io::ErrorKind::UnexpectedEof || e.to_string().contains("limit") {
                        UnpackError::Read(e)
                    } else {
                        UnpackError::Io {
                            op: "failed to write",
                            path: path.clone(),
                            source: e,
                        }
                    }
                })?;
                drop(writer);
                self.set_file_meta(&file, &rel, &path, uid, gid, mode, mtime, &xattrs)?;
                self.stats.files += 1;
                return Ok(());
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Read)?
                    .ok_or_else(|| refused(&raw_path, "symlink without a target"))?
                    .into_owned();
                self.replace(&rel)?;
                std::os::unix::fs::symlink(&target, &path)
                    .map_err(io_err("failed to create symlink", &path))?;
                self.kinds.insert(rel.clone(), Kind::Symlink);
                self.chown(&path, &rel, uid, gid, true)?;
                self.stats.symlinks += 1;
            }
            T::Link => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Read)?
                    .ok_or_else(|| refused(&raw_path, "hard link without a target"))?
                    .into_owned();
                let target_rel = clean_path(&target).map_err(|_| {
                    refused(
                        &raw_path,
                        format!("hard link target {} is outside the layer", target.display()),
                    )
                })?;
                match self.kinds.get(&target_rel) {
                    Some(Kind::File | Kind::Symlink | Kind::Other) => {}
                    Some(Kind::Dir) => return Err(refused(&raw_path, "hard link to a directory")),
                    None => {
                        return Err(refused(
                            &raw_path,
                            format!(
                                "hard link target {} is not an earlier entry of this layer",
                                target.display()
                            ),
                        ))
                    }
                }
                if target_rel == rel {
                    return Ok(());
                }
                self.replace(&rel)?;
                let kind = self.kinds[&target_rel];
                fs::hard_link(self.root.join(&target_rel), &path)
                    .map_err(io_err("failed to link", &path))?;
                self.kinds.insert(rel, kind);
                self.stats.hardlinks += 1;
                return Ok(());
            }
            T::Fifo => {
                self.replace(&rel)?;
                nix::sys::stat::mknod(
                    &path,
                    SFlag::S_IFIFO,
                    Mode::from_bits_truncate(mode & 0o777),
                    0,
                )
                .map_err(|e| UnpackError::Io {
                    op: "failed to create fifo",
                    path: path.clone(),
                    source: e.into(),
                })?;
                self.kinds.insert(rel.clone(), Kind::Other);
                self.set_owner_mode(&path, uid, gid, mode, true)?;
            }
            T::Char | T::Block => {
                // Not created: a device node in an image is at best useless in a sandbox (it has
                // its own /dev) and at worst a way to a host device.
                tracing::debug!(path = %rel.display(), "skipping device node");
                self.stats.skipped_devices += 1;
                return Ok(());
            }
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => return Ok(()),
            other => {
                return Err(refused(
                    &raw_path,
                    format!("unsupported tar entry type {:?}", other.as_byte() as char),
                ));
            }
        }
        self.set_xattrs(&path, &xattrs)?;
        self.set_mtime(&path, mtime, kind.is_dir())
    }

    fn shift(&self, id: u64, rel: &Path) -> Result<u32> {
        u32::try_from(id)
            .ok()
            .and_then(|id| id.checked_add(self.options.id_offset))
            .filter(|id| *id != u32::MAX)
            .ok_or_else(|| refused(rel, format!("owner id {id} out of range")))
    }

    /// Makes sure every ancestor of `rel` is a dir this unpacker made, creating missing ones.
    /// An ancestor that is a symlink or a file is refused: writing through it could escape.
    fn ensure_parents(&mut self, rel: &Path) -> Result<()> {
        let mut ancestors: Vec<&Path> = rel
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .collect();
        ancestors.reverse();
        for ancestor in ancestors {
            match self.kinds.get(ancestor) {
                Some(Kind::Dir) => {}
                Some(kind) => {
                    return Err(refused(
                        rel,
                        format!(
                            "its parent {} is a {} in this layer",
                            ancestor.display(),
                            match kind {
                                Kind::Symlink => "symlink",
                                _ => "non-directory",
                            }
                        ),
                    ))
                }
                None => {
                    let path = self.root.join(ancestor);
                    self.mkdir(&path)?;
                    let offset = self.options.id_offset;
                    if offset != 0 {
                        self.chown(&path, ancestor, offset, offset, true)?;
                    }
                    self.kinds.insert(ancestor.to_path_buf(), Kind::Dir);
                }
            }
        }
        Ok(())
    }

    fn mkdir(&self, path: &Path) -> Result<()> {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(path)
            .map_err(io_err("failed to create dir", path))
    }

    /// Removes what an earlier entry of this layer put at `rel` (a later entry wins).
    fn replace(&mut self, rel: &Path) -> Result<()> {
        let Some(kind) = self.kinds.remove(rel) else {
            return Ok(());
        };
        let path = self.root.join(rel);
        if kind == Kind::Dir {
            fs::remove_dir_all(&path).map_err(io_err("failed to remove", &path))?;
            self.kinds.retain(|p, _| !p.starts_with(rel));
            self.dir_mtimes.retain(|p, _| !p.starts_with(rel));
            self.setgid_dirs.retain(|p| !p.starts_with(rel));
        } else {
            fs::remove_file(&path).map_err(io_err("failed to remove", &path))?;
        }
        Ok(())
    }

    fn whiteout(&mut self, rel: &Path, hidden: &str) -> Result<()> {
        self.ensure_parents(rel)?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        self.stats.whiteouts += 1;
        if rel.file_name().is_some_and(|n| n == OPAQUE_MARKER) {
            // Opaque dir: nothing of the lower layers shows through this dir.
            let dir = self.root.join(parent);
            return sys::lsetxattr(&dir, OVERLAY_OPAQUE_XATTR, b"y")
                .map_err(io_err("failed to mark opaque", &dir));
        }
        if hidden.starts_with(".wh.") || hidden.is_empty() {
            // Other AUFS metadata (.wh..wh.plnk, ...) means nothing to overlayfs.
            self.stats.whiteouts -= 1;
            return Ok(());
        }
        let hidden_rel = parent.join(hidden);
        self.replace(&hidden_rel)?;
        let path = self.root.join(&hidden_rel);
        // A 0/0 character device is overlayfs' whiteout: the name is deleted in the merged view.
        nix::sys::stat::mknod(&path, SFlag::S_IFCHR, Mode::empty(), 0).map_err(|e| {
            UnpackError::Io {
                op: "failed to create whiteout",
                path: path.clone(),
                source: e.into(),
            }
        })?;
        self.kinds.insert(hidden_rel, Kind::Other);
        Ok(())
    }

    /// Sets the owner of `path` (not following a symlink). `fresh`: the unpacker just created
    /// it, as root:root unless its dir is setgid, so root ownership needs no call.
    fn chown(&self, path: &Path, rel: &Path, uid: u32, gid: u32, fresh: bool) -> Result<()> {
        if fresh && uid == 0 && gid == 0 && !self.in_setgid_dir(rel) {
            return Ok(());
        }
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(io_err("failed to chown", path))
    }

    fn in_setgid_dir(&self, rel: &Path) -> bool {
        !self.setgid_dirs.is_empty() && rel.parent().is_some_and(|p| self.setgid_dirs.contains(p))
    }

    fn set_owner_mode(
        &self,
        path: &Path,
        uid: u32,
        gid: u32,
        mode: u32,
        fresh: bool,
    ) -> Result<()> {
        let rel = path.strip_prefix(self.root).unwrap_or(path);
        self.chown(path, rel, uid, gid, fresh)?;
        // After chown: chown clears setuid and setgid.
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(io_err("failed to chmod", path))
    }

    #[allow(clippy::too_many_arguments)] // One call site; a struct would only rename the list.
    fn set_file_meta(
        &mut self,
        file: &File,
        rel: &Path,
        path: &Path,
        uid: u32,
        gid: u32,
        mode: u32,
        mtime: i64,
        xattrs: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<()> {
        if uid != 0 || gid != 0 || self.in_setgid_dir(rel) {
            std::os::unix::fs::fchown(file, Some(uid), Some(gid))
                .map_err(io_err("failed to chown", path))?;
        }
        if mode & 0o7000 != 0 || mode & self.umask != 0 {
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(io_err("failed to chmod", path))?;
        }
        self.apply_xattrs(path, xattrs, |name, value| {
            sys::fsetxattr(file.as_fd(), name, value)
        })?;
        let time = system_time(mtime);
        file.set_times(fs::FileTimes::new().set_accessed(time).set_modified(time))
            .map_err(io_err("failed to set mtime of", path))
    }

    fn xattr_allowed(&mut self, name: &[u8]) -> bool {
        // overlay.* xattrs (opaque, redirect, metacopy, origin) would steer how overlayfs merges
        // the layers: only the unpacker's own opaque marker may set them.
        if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
            self.stats.skipped_xattrs += 1;
            return false;
        }
        true
    }

    fn set_xattrs(&mut self, path: &Path, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        self.apply_xattrs(path, xattrs, |name, value| {
            sys::lsetxattr(path, name, value)
        })
    }

    /// Sets the layer's xattrs with `set`, dropping the overlay ones and counting those the
    /// filesystem refuses.
    fn apply_xattrs(
        &mut self,
        path: &Path,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        set: impl Fn(&[u8], &[u8]) -> io::Result<()>,
    ) -> Result<()> {
        for (name, value) in xattrs {
            if self.xattr_allowed(name) {
                match set(name, value) {
                    Ok(()) => {}
                    Err(e) if xattr_unsupported(&e) => self.stats.skipped_xattrs += 1,
                    Err(source) => {
                        return Err(UnpackError::Io {
                            op: "failed to set xattr on",
                            path: path.into(),
                            source,
                        })
                    }
                }
            }
        }
        Ok(())
    }

    fn set_mtime(&self, path: &Path, mtime: i64, is_dir: bool) -> Result<()> {
        if is_dir {
            return Ok(()); // applied in finish()
        }
        set_mtime_nofollow(path, mtime)
    }

    /// Applies directory mtimes, deepest first, once nothing more is created inside them.
    fn finish(&mut self) -> Result<()> {
        let mut dirs: Vec<(&PathBuf, &i64)> = self.dir_mtimes.iter().collect();
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (rel, mtime) in dirs {
            set_mtime_nofollow(&self.root.join(rel), *mtime)?;
        }
        Ok(())
    }
}

/// Sets atime and mtime of `path` itself (a symlink's own times, not its target's).
fn set_mtime_nofollow(path: &Path, mtime: i64) -> Result<()> {
    let ts = TimeSpec::new(mtime, 0);
    nix::sys::stat::utimensat(
        None,
        path,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| UnpackError::Io {
        op: "failed to set mtime of",
        path: path.into(),
        source: e.into(),
    })
}

fn system_time(secs: i64) -> std::time::SystemTime {
    let epoch = std::time::UNIX_EPOCH;
    match u64::try_from(secs) {
        Ok(s) => epoch + std::time::Duration::from_secs(s),
        Err(_) => epoch - std::time::Duration::from_secs(secs.unsigned_abs()),
    }
}

fn xattr_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTSUP | libc::EPERM | libc::EACCES)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(raw: &str, expected: Option<&str>) {
        let got = clean_path(Path::new(raw))
            .ok()
            .map(|p| p.display().to_string());
        assert_eq!(got.as_deref(), expected, "{raw}");
    }

    #[test]
    fn test_clean_path() {
        check("a/b", Some("a/b"));
        check("./a/./b/", Some("a/b"));
        check("./", Some(""));
        check("/etc/passwd", None);
        check("a/../../b", None);
        check("..", None);
    }
}
