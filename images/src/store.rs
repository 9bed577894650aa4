//! The content store: verified blobs by digest, unpacked layers by diff-id, and the image index.
//!
//! Layout under the store root:
//! ```text
//! blobs/sha256/<hex>          manifests, configs and layer blobs; read-only, always verified
//! layers/sha256/<hex>[-u<N>]  one unpacked layer (by diff-id; -u<N>: ownership shifted by N)
//! images.json                 name -> image record, replaced atomically
//! locks/                      one lock file per digest being fetched or unpacked, plus store.lock
//! tmp/                        work in progress; never read as a result
//! ```
//! Invariants: a file under `blobs/` is complete and matches its name (it is written in `tmp/`,
//! hashed while written, fsynced, then renamed); a directory under `layers/` is a complete layer
//! (unpacked in `tmp/`, synced, then renamed). Whoever holds a digest's lock owns that digest's
//! files in `tmp/` and may delete them, so a crashed writer's leftovers are removed by the next
//! one. Work on one digest is done once: the second worker waits on the lock and then finds the
//! result. `store.lock` is held shared by pulls, imports and unpacks and exclusively by removal
//! and garbage collection, so nothing is collected while it is being added.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::digest::{Digest, Hasher};
use crate::unpack::{self, UnpackOptions, UnpackStats};

/// Errors of the content store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("content of {what} does not match its digest: expected {expected}, got {actual} ({size} bytes)")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
        size: u64,
    },
    #[error("{what} is {actual} bytes but its descriptor says {expected}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("blob {0} is not in the store")]
    MissingBlob(Digest),
    #[error("no image named {0:?} in the store (see `agentd image ls`)")]
    UnknownImage(String),
    #[error("image index {path} is corrupt")]
    CorruptIndex {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("failed to unpack layer {digest}")]
    Unpack {
        digest: Digest,
        #[source]
        source: unpack::UnpackError,
    },
    #[error("layer {digest} unpacked to content with digest {actual}, but the image config says {expected}")]
    DiffIdMismatch {
        digest: Digest,
        expected: Digest,
        actual: Digest,
    },
    #[error("malformed {what} {digest}")]
    Malformed {
        what: &'static str,
        digest: Digest,
        #[source]
        source: serde_json::Error,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// One layer of an image, as the manifest and config describe it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    /// Digest of the blob as stored (compressed or not).
    pub digest: Digest,
    /// Media type from the manifest (gzip, zstd or plain tar; Docker or OCI names).
    pub media_type: String,
    /// Blob size in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids`); names the unpacked dir.
    pub diff_id: Digest,
}

/// One image in the index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// The name users refer to it by (a normalised reference or an import name).
    pub name: String,
    /// Digest of the image manifest.
    pub manifest: Digest,
    /// Digest of the index (manifest list) the manifest was chosen from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Digest>,
    /// Digest of the image config blob.
    pub config: Digest,
    /// Layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// `os/arch[/variant]` of the image.
    pub platform: String,
    /// Unix time it was added to the store.
    pub added: u64,
}

impl ImageRecord {
    /// Sum of the layer blob sizes.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct IndexFile {
    images: BTreeMap<String, ImageRecord>,
}

/// What an image needs to become a sandbox rootfs.
#[derive(Debug, Clone)]
pub struct ImageRootfs {
    /// The image.
    pub image: ImageRecord,
    /// Unpacked layer dirs in overlayfs `lowerdir=` order: topmost layer first.
    pub lower_dirs: Vec<PathBuf>,
    /// Process defaults from the image config.
    pub config: crate::config::ImageConfig,
}

/// What garbage collection removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneReport {
    /// Blobs deleted.
    pub blobs: usize,
    /// Unpacked layer dirs deleted.
    pub layers: usize,
    /// Leftover work files or dirs of crashed writers deleted.
    pub tmp: usize,
    /// Unreferenced layer dirs kept because a mounted overlay still uses them.
    pub layers_in_use: usize,
    /// Bytes freed by deleted blobs.
    pub bytes: u64,
}

/// A problem `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyProblem {
    /// The blob, layer or image concerned.
    pub what: String,
    /// What is wrong.
    pub problem: String,
}

/// Layout of a store on disk.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A held file lock; released on drop.
pub struct LockGuard {
    _lock: Flock<File>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating if needed) a store at `root`. The root is made accessible to root only.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for dir in ["blobs/sha256", "layers/sha256", "locks", "tmp"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(io_err("failed to create", &path))?;
        }
        fs::set_permissions(&root, fs::Permissions::from_mode(0o711))
            .map_err(io_err("failed to chmod", &root))?;
        Ok(Store { root })
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a blob (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// True if the blob is in the store (and therefore verified).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).exists()
    }

    /// Reads a whole blob (for manifests and configs; layers are streamed).
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.open_blob(digest)?
            .read_to_end(&mut bytes)
            .map_err(io_err("failed to read", &self.blob_path(digest)))?;
        Ok(bytes)
    }

    /// Opens a blob for streaming.
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob(digest.clone()),
            _ => StoreError::Io {
                op: "failed to open",
                path,
                source: e,
            },
        })
    }

    /// Writes `bytes` as a blob after checking them against `expected` (if given).
    pub fn put_blob(&self, bytes: &[u8], expected: Option<&Digest>) -> Result<Digest> {
        let digest = Digest::of(bytes);
        if let Some(expected) = expected {
            if *expected != digest {
                return Err(StoreError::DigestMismatch {
                    what: "blob".into(),
                    expected: expected.clone(),
                    actual: digest,
                    size: bytes.len() as u64,
                });
            }
        }
        if self.has_blob(&digest) {
            return Ok(digest);
        }
        let mut w = self.blob_writer(&digest)?;
        w.write_all(bytes)
            .map_err(io_err("failed to write", &w.tmp))?;
        w.commit(&digest, Some(bytes.len() as u64))?;
        Ok(digest)
    }

    /// Starts writing a blob that should have digest `expected`. The caller should hold the
    /// digest's lock ([`Store::lock_digest`]) so that two writers do not fetch it twice.
    pub fn blob_writer(&self, expected: &Digest) -> Result<BlobWriter> {
        self.blob_writer_at(self.tmp_path("blob", expected))
    }

    /// Starts writing a blob whose digest is not known yet. Its work file is named for no
    /// digest, so only `prune` removes it after a crash.
    pub fn blob_writer_unknown(&self) -> Result<BlobWriter> {
        self.blob_writer_at(self.tmp_path("import", &Digest::default()))
    }

    fn blob_writer_at(&self, tmp: PathBuf) -> Result<BlobWriter> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("failed to create", &tmp))?;
        Ok(BlobWriter {
            store: self.clone(),
            file,
            tmp,
            hasher: Hasher::default(),
        })
    }

    fn tmp_path(&self, kind: &str, digest: &Digest) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!(
            "{kind}-{}-{}-{n}",
            digest.hex(),
            std::process::id()
        ))
    }

    /// Takes the lock that serialises work on `digest` (blocking), then removes the leftovers
    /// of earlier holders that crashed (their work files in `tmp/`).
    pub fn lock_digest(&self, digest: &Digest) -> Result<LockGuard> {
        let guard = self.lock_file(&format!("{}.lock", digest.hex()), true)?;
        self.remove_tmp_of(Some(digest.hex()))?;
        Ok(guard)
    }

    /// Takes `store.lock`: shared for adding content, exclusive for removing it.
    pub fn lock_store(&self, exclusive: bool) -> Result<LockGuard> {
        self.lock_file("store.lock", exclusive)
    }

    fn lock_file(&self, name: &str, exclusive: bool) -> Result<LockGuard> {
        let path = self.root.join("locks").join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("failed to open", &path))?;
        let arg = if exclusive {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockShared
        };
        let lock = Flock::lock(file, arg).map_err(|(_, errno)| StoreError::Io {
            op: "failed to lock",
            path,
            source: errno.into(),
        })?;
        Ok(LockGuard { _lock: lock })
    }

    /// Removes work files in `tmp/` of one digest (the caller holds its lock) or, with `None`,
    /// of every digest whose lock nobody holds.
    fn remove_tmp_of(&self, hex: Option<&str>) -> Result<usize> {
        let dir = self.root.join("tmp");
        let mut removed = 0;
        for entry in fs::read_dir(&dir).map_err(io_err("failed to read", &dir))? {
            let entry = entry.map_err(io_err("failed to read", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(entry_hex) = name.split('-').nth(1) else {
                continue;
            };
            let _held;
            match hex {
                Some(hex) if hex != entry_hex => continue,
                Some(_) => {}
                None => {
                    let Ok(digest) = format!("sha256:{entry_hex}").parse::<Digest>() else {
                        continue;
                    };
                    match self.try_lock_digest(&digest)? {
                        Some(guard) => _held = guard,
                        None => continue,
                    }
                }
            }
            remove_any(&entry.path())?;
            removed += 1;
        }
        Ok(removed)
    }

    fn try_lock_digest(&self, digest: &Digest) -> Result<Option<LockGuard>> {
        let path = self
            .root
            .join("locks")
            .join(format!("{}.lock", digest.hex()));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("failed to open", &path))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(LockGuard { _lock: lock })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(StoreError::Io {
                op: "failed to lock",
                path,
                source: errno.into(),
            }),
        }
    }

    // ---- the image index ----

    fn index_path(&self) -> PathBuf {
        self.root.join("images.json")
    }

    fn read_index(&self) -> Result<IndexFile> {
        let path = self.index_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| StoreError::CorruptIndex { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(IndexFile::default()),
            Err(e) => Err(StoreError::Io {
                op: "failed to read",
                path,
                source: e,
            }),
        }
    }

    /// Changes the index under its lock and replaces it atomically.
    fn update_index<T>(&self, change: impl FnOnce(&mut IndexFile) -> Result<T>) -> Result<T> {
        let _lock = self.lock_file("images.lock", true)?;
        let mut index = self.read_index()?;
        let out = change(&mut index)?;
        let path = self.index_path();
        let json = serde_json::to_vec_pretty(&index).expect("the index always serialises");
        write_atomic(&path, &json)?;
        Ok(out)
    }

    /// Adds or replaces an image record under its name.
    pub fn add_image(&self, record: ImageRecord) -> Result<()> {
        self.update_index(|index| {
            index.images.insert(record.name.clone(), record);
            Ok(())
        })
    }

    /// Every image, by name.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        Ok(self.read_index()?.images.into_values().collect())
    }

    /// Finds an image by its name as stored, by a reference that normalises to it (`debian`
    /// finds `docker.io/library/debian:latest`), or by a manifest digest or a unique prefix of
    /// its hex.
    pub fn resolve(&self, name: &str) -> Result<ImageRecord> {
        let index = self.read_index()?;
        if let Some(record) = index.images.get(name) {
            return Ok(record.clone());
        }
        if let Ok(reference) = name.parse::<crate::Reference>() {
            if let Some(record) = index.images.get(&reference.to_string()) {
                return Ok(record.clone());
            }
            // Imported images are named `localhost/<name>`, as podman names local images.
            if let Ok(local) = format!("localhost/{name}").parse::<crate::Reference>() {
                if let Some(record) = index.images.get(&local.to_string()) {
                    return Ok(record.clone());
                }
            }
        }
        let hex = name.strip_prefix("sha256:").unwrap_or(name);
        if hex.len() >= 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut found = index
                .images
                .values()
                .filter(|r| r.manifest.hex().starts_with(hex));
            if let (Some(record), None) = (found.next(), found.next()) {
                return Ok(record.clone());
            }
        }
        Err(StoreError::UnknownImage(name.to_string()))
    }

    /// Removes an image's name. Its blobs and layers stay until [`Store::prune`].
    pub fn remove_image(&self, name: &str) -> Result<ImageRecord> {
        let record = self.resolve(name)?;
        self.update_index(|index| {
            index.images.remove(&record.name);
            Ok(())
        })?;
        Ok(record)
    }

    // ---- layers ----

    /// Path of an unpacked layer dir (whether or not it exists).
    pub fn layer_path(&self, diff_id: &Digest, options: &UnpackOptions) -> PathBuf {
        let mut name = diff_id.hex().to_string();
        if options.id_offset != 0 {
            name.push_str(&format!("-u{}", options.id_offset));
        }
        self.root.join("layers/sha256").join(name)
    }

    /// Unpacks a layer unless it already is, and returns its dir. Verifies the diff-id.
    pub fn unpack_layer(
        &self,
        layer: &LayerRecord,
        options: &UnpackOptions,
    ) -> Result<(PathBuf, Option<UnpackStats>)> {
        let target = self.layer_path(&layer.diff_id, options);
        if target.exists() {
            return Ok((target, None));
        }
        let _store = self.lock_store(false)?;
        let _lock = self.lock_digest(&layer.diff_id)?;
        if target.exists() {
            return Ok((target, None));
        }
        let blob = self.open_blob(&layer.digest)?;
        let tmp = self.tmp_path("unpack", &layer.diff_id);
        let result = unpack::unpack(io::BufReader::with_capacity(1 << 20, blob), &tmp, options);
        let stats = match result {
            Ok(stats) => stats,
            Err(source) => {
                let _ = remove_any(&tmp);
                return Err(StoreError::Unpack {
                    digest: layer.digest.clone(),
                    source,
                });
            }
        };
        if stats.diff_id != layer.diff_id {
            let _ = remove_any(&tmp);
            return Err(StoreError::DiffIdMismatch {
                digest: layer.digest.clone(),
                expected: layer.diff_id.clone(),
                actual: stats.diff_id,
            });
        }
        // One syncfs makes the whole layer durable before it becomes visible under its name.
        sync_fs(&tmp)?;
        fs::rename(&tmp, &target).map_err(io_err("failed to rename", &tmp))?;
        sync_dir(target.parent().expect("layer dirs have a parent"))?;
        Ok((target, Some(stats)))
    }

    /// Unpacks what is missing and returns the lower dirs and config of an image.
    pub fn rootfs(&self, name: &str, options: &UnpackOptions) -> Result<ImageRootfs> {
        let image = self.resolve(name)?;
        let mut lower_dirs = Vec::with_capacity(image.layers.len());
        for layer in &image.layers {
            lower_dirs.push(self.unpack_layer(layer, options)?.0);
        }
        lower_dirs.reverse();
        let config = self.image_config(&image)?;
        Ok(ImageRootfs {
            image,
            lower_dirs,
            config,
        })
    }

    /// Parses an image's config blob.
    pub fn image_config(&self, image: &ImageRecord) -> Result<crate::config::ImageConfig> {
        let bytes = self.read_blob(&image.config)?;
        crate::config::ImageConfig::parse(&bytes).map_err(|source| StoreError::Malformed {
            what: "image config",
            digest: image.config.clone(),
            source,
        })
    }

    // ---- garbage collection and verification ----

    /// Deletes blobs and unpacked layers that no image references, and leftovers of crashed
    /// writers. Holds the store lock exclusively, so it waits for pulls in progress.
    pub fn prune(&self) -> Result<PruneReport> {
        let _store = self.lock_store(true)?;
        let mut report = PruneReport {
            tmp: self.remove_tmp_of(None)?,
            ..Default::default()
        };
        let mut blobs = BTreeSet::new();
        let mut diff_ids = BTreeSet::new();
        for image in self.images()? {
            blobs.insert(image.manifest.hex().to_string());
            blobs.insert(image.config.hex().to_string());
            if let Some(index) = &image.index {
                blobs.insert(index.hex().to_string());
            }
            for layer in &image.layers {
                blobs.insert(layer.digest.hex().to_string());
                diff_ids.insert(layer.diff_id.hex().to_string());
            }
        }
        let dir = self.root.join("blobs/sha256");
        for entry in fs::read_dir(&dir).map_err(io_err("failed to read", &dir))? {
            let entry = entry.map_err(io_err("failed to read", &dir))?;
            if !blobs.contains(entry.file_name().to_string_lossy().as_ref()) {
                report.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                remove_any(&entry.path())?;
                report.blobs += 1;
            }
        }
        let dir = self.root.join("layers/sha256");
        let in_use = mounted_lower_dirs();
        for entry in fs::read_dir(&dir).map_err(io_err("failed to read", &dir))? {
            let entry = entry.map_err(io_err("failed to read", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let hex = name.split('-').next().unwrap_or_default();
            if !diff_ids.contains(hex) {
                // A sandbox of a removed image may still run on this layer: its shim holds a
                // shared lock on the dir (older shims: the layer shows in a mountinfo). The
                // exclusive lock is held while the layer goes, so a sandbox starting on it
                // meanwhile waits and then finds it gone.
                let file =
                    File::open(entry.path()).map_err(io_err("failed to open", &entry.path()))?;
                let _lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                    Ok(lock) => lock,
                    Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                        report.layers_in_use += 1;
                        continue;
                    }
                    Err((_, e)) => {
                        return Err(io_err("failed to lock", &entry.path())(e.into()));
                    }
                };
                if in_use.contains(&entry.path()) {
                    report.layers_in_use += 1;
                    continue;
                }
                remove_any(&entry.path())?;
                report.layers += 1;
            }
        }
        Ok(report)
    }

    /// Re-hashes every blob and checks that every image's blobs are present.
    pub fn verify(&self) -> Result<Vec<VerifyProblem>> {
        let _store = self.lock_store(false)?;
        let mut problems = Vec::new();
        let dir = self.root.join("blobs/sha256");
        for entry in fs::read_dir(&dir).map_err(io_err("failed to read", &dir))? {
            let entry = entry.map_err(io_err("failed to read", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(expected) = format!("sha256:{name}").parse::<Digest>() else {
                problems.push(VerifyProblem {
                    what: entry.path().display().to_string(),
                    problem: "not a digest".into(),
                });
                continue;
            };
            let file = File::open(entry.path()).map_err(io_err("failed to open", &entry.path()))?;
            let (actual, _) = crate::digest::HashingReader::new(file)
                .finish()
                .map_err(io_err("failed to read", &entry.path()))?;
            if actual != expected {
                problems.push(VerifyProblem {
                    what: expected.to_string(),
                    problem: format!("content hashes to {actual}"),
                });
            }
        }
        for image in self.images()? {
            let mut needed = vec![image.manifest.clone(), image.config.clone()];
            needed.extend(image.layers.iter().map(|l| l.digest.clone()));
            for digest in needed {
                if !self.has_blob(&digest) {
                    problems.push(VerifyProblem {
                        what: image.name.clone(),
                        problem: format!("blob {digest} is missing"),
                    });
                }
            }
        }
        Ok(problems)
    }
}

/// A blob being written: hashed as it is written, visible only after [`BlobWriter::commit`]
/// verified it. Dropping it without commit deletes the work file.
pub struct BlobWriter {
    store: Store,
    file: File,
    tmp: PathBuf,
    hasher: Hasher,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.hasher.len()
    }

    /// Verifies digest (and size, if given), makes the blob durable and visible.
    pub fn commit(self, expected: &Digest, expected_size: Option<u64>) -> Result<()> {
        self.finish(Some(expected), expected_size).map(|_| ())
    }

    /// Makes the blob visible under the digest of what was written (for content whose digest
    /// is not known in advance, such as the files of a docker archive).
    pub fn commit_computed(self) -> Result<(Digest, u64)> {
        self.finish(None, None)
    }

    fn finish(
        mut self,
        expected: Option<&Digest>,
        expected_size: Option<u64>,
    ) -> Result<(Digest, u64)> {
        let size = self.hasher.len();
        let actual = std::mem::take(&mut self.hasher).finish();
        let what = || format!("blob {}", expected.unwrap_or(&actual));
        if let Some(expected_size) = expected_size {
            if size != expected_size {
                return Err(StoreError::SizeMismatch {
                    what: what(),
                    expected: expected_size,
                    actual: size,
                });
            }
        }
        if let Some(expected) = expected {
            if actual != *expected {
                return Err(StoreError::DigestMismatch {
                    what: what(),
                    expected: expected.clone(),
                    actual,
                    size,
                });
            }
        }
        let target = self.store.blob_path(&actual);
        if target.exists() {
            return Ok((actual, size)); // Drop removes the work file.
        }
        self.file
            .sync_all()
            .map_err(io_err("failed to sync", &self.tmp))?;
        fs::set_permissions(&self.tmp, fs::Permissions::from_mode(0o444))
            .map_err(io_err("failed to chmod", &self.tmp))?;
        fs::rename(&self.tmp, &target).map_err(io_err("failed to rename", &self.tmp))?;
        sync_dir(target.parent().expect("blob paths have a parent"))?;
        self.tmp = PathBuf::new();
        Ok((actual, size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Copies a reader into the store as blob `expected`, verifying digest and size.
pub fn copy_blob(
    store: &Store,
    mut reader: impl Read,
    expected: &Digest,
    size: Option<u64>,
) -> Result<()> {
    if store.has_blob(expected) {
        return Ok(());
    }
    let _lock = store.lock_digest(expected)?;
    if store.has_blob(expected) {
        return Ok(());
    }
    let mut writer = store.blob_writer(expected)?;
    let tmp = writer.tmp.clone();
    io::copy(&mut reader, &mut writer).map_err(io_err("failed to write", &tmp))?;
    writer.commit(expected, size)
}

/// Every lower dir of the overlay mounts this process can see (in /proc/self/mountinfo).
fn mounted_lower_dirs() -> BTreeSet<PathBuf> {
    lower_dirs_in(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

fn lower_dirs_in(mountinfo: &str) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    for line in mountinfo.lines() {
        // `... - overlay overlay rw,lowerdir=/a:/b,upperdir=...`
        let Some((_, fs_part)) = line.split_once(" - ") else {
            continue;
        };
        let mut fields = fs_part.split(' ');
        if fields.next() != Some("overlay") {
            continue;
        }
        let options = fields.nth(1).unwrap_or_default();
        for option in options.split(',') {
            if let Some(lowers) = option.strip_prefix("lowerdir=") {
                dirs.extend(lowers.split(':').map(PathBuf::from));
            }
        }
    }
    dirs
}

/// Writes a small file atomically (mode 0600): a temp file in the same dir, fsync, rename,
/// fsync the dir. A crash leaves the old file or the new one, never a torn one. (Also
/// rootfs-builder's, for its cache.)
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("atomic writes target a file in a dir");
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("failed to create", &tmp))?;
    file.write_all(bytes)
        .map_err(io_err("failed to write", &tmp))?;
    file.sync_all().map_err(io_err("failed to sync", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("failed to rename", &tmp))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("failed to sync", dir))
}

fn sync_fs(path: &Path) -> Result<()> {
    let dir = File::open(path).map_err(io_err("failed to open", path))?;
    crate::sys::syncfs(&dir).map_err(io_err("failed to sync", path))
}

/// Removes a file or a whole tree. Layer dirs may contain read-only dirs, which `remove_dir_all`
/// handles as root; a missing path is not an error.
pub(crate) fn remove_any(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(io_err("failed to remove", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_blob_writer_refuses_wrong_content() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let expected = Digest::of(b"right");
        let mut w = store.blob_writer(&expected).unwrap();
        w.write_all(b"wrong").unwrap();
        assert!(matches!(
            w.commit(&expected, None),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert!(!store.has_blob(&expected));
        assert_eq!(
            fs::read_dir(dir.path().join("s/tmp")).unwrap().count(),
            0,
            "work file left behind"
        );
        store.put_blob(b"right", Some(&expected)).unwrap();
        assert_eq!(store.read_blob(&expected).unwrap(), b"right");
    }

    #[test]
    fn test_lock_removes_leftovers_of_crashed_writers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::of(b"x");
        let w = store.blob_writer(&d).unwrap();
        std::mem::forget(w); // a writer that died without cleaning up
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
        let _lock = store.lock_digest(&d).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn test_lower_dirs_from_mountinfo() {
        let info = "71 48 0:39 / /run/x/rootfs rw,nosuid - overlay overlay rw,lowerdir=/s/l/a:/s/l/b,upperdir=/u,workdir=/w\n\
                    72 71 0:43 / /proc rw - proc proc rw\n";
        let dirs: Vec<_> = lower_dirs_in(info).into_iter().collect();
        assert_eq!(dirs, [PathBuf::from("/s/l/a"), PathBuf::from("/s/l/b")]);
    }

    #[test]
    fn test_resolve_by_reference_and_digest_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let manifest = Digest::of(b"m");
        store
            .add_image(ImageRecord {
                name: "docker.io/library/debian:latest".into(),
                manifest: manifest.clone(),
                index: None,
                config: Digest::of(b"c"),
                layers: vec![],
                platform: "linux/amd64".into(),
                added: 0,
            })
            .unwrap();
        assert_eq!(store.resolve("debian").unwrap().manifest, manifest);
        assert_eq!(
            store.resolve(&manifest.hex()[..8]).unwrap().manifest,
            manifest
        );
        assert!(matches!(
            store.resolve("ubuntu"),
            Err(StoreError::UnknownImage(_))
        ));
        store.remove_image("debian").unwrap();
        assert!(store.images().unwrap().is_empty());
    }
}
