//! Snapshots: a sandbox's files as a stored image. The sandbox is frozen only while its
//! writable layer is copied (as for a fork); the copy and the layers the sandbox stacked on
//! its image (a fork's, a task's prepared layer) then become OCI layers on top of the image's
//! own: overlay whiteouts become `.wh.` entries, opaque directories `.wh..wh..opq`, owners go
//! back from the sandboxes' host ids to the ids inside. A sandbox made from the new image
//! sees the same files. What is in `/tmp` (a tmpfs) and the processes do not carry over.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_images::commit::{derive_image, LayerWriter, NewLayer};
use agentd_images::ImageRecord;

use super::{Manager, Result, Sandbox};
use crate::error::Error;
use crate::walk::{walk, Kind, MAX_DEPTH};

/// What a snapshot made.
#[derive(Debug)]
pub struct Snapshotted {
    /// The new image.
    pub image: ImageRecord,
    /// Layers added on top of the sandbox's image.
    pub layers: usize,
    /// Files (and links) copied from the sandbox's writable layer.
    pub files: u64,
    /// Bytes of file content copied.
    pub bytes: u64,
    /// How long the sandbox was frozen.
    pub frozen: Duration,
    /// The whole request.
    pub total: Duration,
}

/// The OCI whiteout prefix; a file of the sandbox's own with such a name would delete another
/// file when the layer is unpacked, so a snapshot refuses it.
const WHITEOUT: &str = ".wh.";

impl Manager {
    /// Stores `sb`'s files as the image `name` (see the module's doc).
    pub async fn snapshot(self: &Arc<Self>, sb: &Arc<Sandbox>, name: &str) -> Result<Snapshotted> {
        let started = Instant::now();
        let name = agentd_images::layout::normalise_name(name)
            .map_err(|e| Error::Invalid(agentd_runtime::error_chain(&e)))?;
        let rec = sb.snapshot();
        let store = self.store.clone();
        let (n2, r2) = (name.clone(), rec.clone());
        let base = tokio::task::spawn_blocking(move || {
            let images = store.images()?;
            if images.iter().any(|i| i.name == n2) {
                return Ok(Err(Error::Conflict(format!(
                    "an image named {n2} exists: delete it first (agentd image rm) or choose another name"
                ))));
            }
            Ok(images
                .into_iter()
                .find(|i| i.manifest.to_string() == r2.image_digest)
                .ok_or_else(|| {
                    Error::Conflict(format!(
                        "the image sandbox {} was made from ({}) is no longer stored: pull or import it again",
                        r2.id, r2.image
                    ))
                }))
        })
        .await
        .map_err(Error::internal)?
        .map_err(|e: agentd_images::StoreError| Error::internal(agentd_runtime::error_chain(&e)))??;
        let taken = self.take_held_layer(sb).await?;
        // Bottom first: the stacked layers (kept topmost first in the record), then the copy.
        let mut dirs: Vec<PathBuf> = rec.base_layers.iter().rev().cloned().collect();
        dirs.push(taken.dir.clone());
        let store = self.store.clone();
        let id_base = self.config.id_base;
        let created_by = format!("agentd snapshot of sandbox {}", rec.id);
        let made = tokio::task::spawn_blocking(move || {
            // Shared: a prune (exclusive) waits until the new blobs belong to an image.
            let _lock = store
                .lock_store(false)
                .map_err(|e| Error::internal(agentd_runtime::error_chain(&e)))?;
            let mut layers = Vec::new();
            for dir in &dirs {
                layers.push(write_layer(&store, dir, id_base)?);
            }
            derive_image(
                &store,
                &base,
                &layers,
                &name,
                &created_by,
                crate::sandbox::now_ms() / 1000,
            )
            .map(|image| (image, layers.len()))
            .map_err(|e| Error::internal(agentd_runtime::error_chain(&e)))
        })
        .await
        .map_err(Error::internal)?;
        let dir = taken.dir.clone();
        drop(taken.hold);
        let _ = tokio::task::spawn_blocking(move || agentd_runtime::tree::remove_tree(&dir)).await;
        self.sweep_forks().await;
        let (image, layers) = made?;
        tracing::info!(sandbox = %rec.id, image = %image.name, files = taken.stats.files, bytes = taken.stats.bytes, copy_ms = taken.copy.as_millis() as u64, "snapshot stored");
        Ok(Snapshotted {
            image,
            layers,
            files: taken.stats.files,
            bytes: taken.stats.bytes,
            frozen: taken.copy,
            total: started.elapsed(),
        })
    }
}

/// An id of the sandboxes' host range as the id inside; ids outside it (none should be) as
/// the overflow id, which is what the sandbox saw.
fn inside_id(host: u32, id_base: u32) -> u64 {
    match host.checked_sub(id_base) {
        Some(id) if id < agentd_runtime::DEFAULT_ID_RANGE => u64::from(id),
        _ => 65_534,
    }
}

fn no_whiteout_name(rel: &Path) -> io::Result<()> {
    let name = rel.file_name().unwrap_or_default().as_bytes();
    if name.starts_with(WHITEOUT.as_bytes()) {
        return Err(io::Error::other(format!(
            "{} cannot be stored in an image: OCI layers reserve names starting with {WHITEOUT}",
            rel.display()
        )));
    }
    Ok(())
}

/// Writes the overlay upper dir `dir` (agentd's own copy: nobody else writes it) into the store
/// as one OCI layer.
fn write_layer(store: &agentd_images::Store, dir: &Path, id_base: u32) -> Result<NewLayer> {
    let fail = |e: io::Error| Error::internal(format!("writing {} as a layer: {e}", dir.display()));
    let writer =
        LayerWriter::new(store).map_err(|e| Error::internal(agentd_runtime::error_chain(&e)))?;
    let mut b = tar::Builder::new(writer);
    let root = File::open(dir).map_err(fail)?;
    // First path of each inode with more than one link: later ones become hard links to it.
    let mut linked: HashMap<(u64, u64), PathBuf> = HashMap::new();
    walk(
        root.into(),
        MAX_DEPTH,
        |_, _| false,
        |rel, st, kind| {
            let mut h = tar::Header::new_gnu();
            h.set_mode(st.st_mode & 0o7777);
            h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
            h.set_uid(inside_id(st.st_uid, id_base));
            h.set_gid(inside_id(st.st_gid, id_base));
            h.set_size(0);
            match kind {
                Kind::Dir => {
                    no_whiteout_name(rel)?;
                    h.set_entry_type(tar::EntryType::Directory);
                    b.append_data(&mut h, rel, io::empty())?;
                    let opaque = rustix::fs::lgetxattr(
                        dir.join(rel),
                        "trusted.overlay.opaque",
                        &mut [0u8; 4],
                    );
                    if let Ok(1) = opaque {
                        h.set_entry_type(tar::EntryType::Regular);
                        h.set_mode(0o644);
                        b.append_data(&mut h, rel.join(".wh..wh..opq"), io::empty())?;
                    }
                }
                Kind::File(opened) => {
                    no_whiteout_name(rel)?;
                    let key = (st.st_dev, st.st_ino);
                    if st.st_nlink > 1 {
                        if let Some(first) = linked.get(&key) {
                            h.set_entry_type(tar::EntryType::Link);
                            b.append_link(&mut h, rel, first)?;
                            return Ok(());
                        }
                        linked.insert(key, rel.to_path_buf());
                    }
                    let (f, len) = opened?;
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(len);
                    b.append_data(&mut h, rel, io::Read::take(f, len))?;
                }
                Kind::Symlink(target) => {
                    no_whiteout_name(rel)?;
                    h.set_entry_type(tar::EntryType::Symlink);
                    b.append_link(&mut h, rel, &target)?;
                }
                Kind::Other => match st.st_mode & libc::S_IFMT {
                    // An overlay whiteout: the file below is deleted.
                    libc::S_IFCHR if st.st_rdev == 0 => {
                        let name = rel.file_name().unwrap_or(OsStr::new(""));
                        let mut wh = OsStr::new(WHITEOUT).to_os_string();
                        wh.push(name);
                        h.set_entry_type(tar::EntryType::Regular);
                        h.set_mode(0o644);
                        b.append_data(&mut h, rel.with_file_name(wh), io::empty())?;
                    }
                    libc::S_IFIFO => {
                        no_whiteout_name(rel)?;
                        h.set_entry_type(tar::EntryType::Fifo);
                        b.append_data(&mut h, rel, io::empty())?;
                    }
                    // Sockets and devices: nothing a sandbox can make that an image should keep.
                    _ => {}
                },
            }
            Ok(())
        },
    )
    .map_err(fail)?;
    let writer = b.into_inner().map_err(fail)?;
    writer
        .finish()
        .map_err(|e| Error::internal(agentd_runtime::error_chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_inside_ids() {
        assert_eq!(inside_id(100_000, 100_000), 0);
        assert_eq!(inside_id(101_000, 100_000), 1000);
        assert_eq!(inside_id(99_999, 100_000), 65_534);
        assert_eq!(
            inside_id(100_000 + agentd_runtime::DEFAULT_ID_RANGE, 100_000),
            65_534
        );
    }
}
