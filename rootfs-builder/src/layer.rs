//! Reproducible layers: a sorted set of entries written as a tar with fixed mtimes and
//! normalised owners, gzip-compressed with a fixed header, so the same inputs always give the
//! same bytes (and digests).

use std::collections::BTreeMap;
use std::io::{self, Read};

use agentd_images::digest::HashingWriter;
use agentd_images::Digest;

/// What a path in a layer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with these bytes.
    File(Vec<u8>),
    /// A symlink to this target.
    Symlink(String),
    /// A hard link to another path of the layer (relative, no leading `/`).
    Hardlink(String),
}

/// One entry of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: Kind,
    /// Permission bits (with setuid/setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
}

/// The entries of one layer, by path relative to `/` (no leading or trailing slash).
#[derive(Debug, Default, Clone)]
pub struct Layer {
    entries: BTreeMap<String, Entry>,
}

/// A finished layer blob.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// The gzip-compressed tar.
    pub bytes: Vec<u8>,
    /// Digest of `bytes`.
    pub digest: Digest,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
}

fn rel(path: &str) -> String {
    path.trim_matches('/').to_string()
}

impl Layer {
    /// Adds (or replaces) an entry at `path` and the parent dirs it needs (0755, root).
    pub fn add(&mut self, path: &str, entry: Entry) {
        let path = rel(path);
        if path.is_empty() {
            return;
        }
        let mut parent = String::new();
        for component in path.split('/').take(path.split('/').count() - 1) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            self.entries.entry(parent.clone()).or_insert(Entry {
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
            });
        }
        self.entries.insert(path, entry);
    }

    /// The entry at `path` (relative to `/`).
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if the layer has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the layer: entries sorted by path, every mtime `epoch`, no user or group names.
    pub fn finish(&self, epoch: u64) -> io::Result<LayerBlob> {
        let gz = flate2::GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), flate2::Compression::new(6));
        let mut hashing = HashingWriter::new(gz);
        {
            let mut builder = tar::Builder::new(&mut hashing);
            for (path, entry) in &self.entries {
                let mut header = tar::Header::new_gnu();
                header.set_mtime(epoch);
                header.set_mode(entry.mode);
                header.set_uid(entry.uid);
                header.set_gid(entry.gid);
                match &entry.kind {
                    Kind::Dir => {
                        header.set_entry_type(tar::EntryType::Directory);
                        header.set_size(0);
                        builder.append_data(&mut header, format!("{path}/"), io::empty())?;
                    }
                    Kind::File(bytes) => {
                        header.set_entry_type(tar::EntryType::Regular);
                        header.set_size(bytes.len() as u64);
                        builder.append_data(&mut header, path, bytes.as_slice())?;
                    }
                    Kind::Symlink(target) => {
                        header.set_entry_type(tar::EntryType::Symlink);
                        header.set_size(0);
                        builder.append_link(&mut header, path, target)?;
                    }
                    Kind::Hardlink(target) => {
                        header.set_entry_type(tar::EntryType::Link);
                        header.set_size(0);
                        builder.append_link(&mut header, path, target)?;
                    }
                }
            }
            builder.finish()?;
        }
        let (gz, diff_id, _) = hashing.finish();
        let bytes = gz.finish()?;
        let digest = Digest::of(&bytes);
        Ok(LayerBlob {
            bytes,
            digest,
            diff_id,
        })
    }

    /// Adds the files of a Debian package's `data.tar.*` (the .deb is an `ar` archive).
    /// Owners and modes come from the package; mtimes are normalised when the layer is written.
    pub fn add_deb(&mut self, deb: &[u8], exclude: &[String]) -> io::Result<usize> {
        let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
        if !deb.starts_with(b"!<arch>\n") {
            return Err(invalid("not a .deb (ar archive)"));
        }
        let mut pos = 8;
        while pos + 60 <= deb.len() {
            let header = &deb[pos..pos + 60];
            let name = String::from_utf8_lossy(&header[..16])
                .trim()
                .trim_end_matches('/')
                .to_string();
            let size: usize = String::from_utf8_lossy(&header[48..58])
                .trim()
                .parse()
                .map_err(|_| invalid("bad ar member size"))?;
            let start = pos + 60;
            let end = start
                .checked_add(size)
                .filter(|e| *e <= deb.len())
                .ok_or_else(|| invalid("truncated .deb"))?;
            if let Some(ext) = name.strip_prefix("data.tar") {
                let data = &deb[start..end];
                let reader: Box<dyn Read + '_> = match ext {
                    ".xz" => Box::new(xz2::read::XzDecoder::new(data)),
                    ".zst" => Box::new(zstd::stream::read::Decoder::new(data)?),
                    ".gz" => Box::new(flate2::read::GzDecoder::new(data)),
                    "" => Box::new(data),
                    other => {
                        return Err(invalid(&format!(
                            "unsupported data.tar compression {other:?}"
                        )))
                    }
                };
                return self.add_tar(reader, exclude);
            }
            pos = end + (size % 2);
        }
        Err(invalid(".deb has no data.tar member"))
    }

    fn add_tar(&mut self, reader: impl Read, exclude: &[String]) -> io::Result<usize> {
        let excluded = |path: &str| {
            exclude.iter().any(|e| {
                let e = e.trim_matches('/');
                path == e
                    || path
                        .strip_prefix(e)
                        .is_some_and(|rest| rest.starts_with('/'))
            })
        };
        let mut archive = tar::Archive::new(reader);
        let mut count = 0;
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry
                .path()?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            if path.split('/').any(|c| c == "..") {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("package entry {path:?} has `..`"),
                ));
            }
            let h = entry.header().clone();
            let (mode, uid, gid) = (h.mode()? & 0o7777, h.uid()?, h.gid()?);
            let kind = match h.entry_type() {
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut bytes = Vec::with_capacity(usize::try_from(h.size()?).unwrap_or(0));
                    entry.read_to_end(&mut bytes)?;
                    Kind::File(bytes)
                }
                tar::EntryType::Symlink => Kind::Symlink(
                    entry
                        .link_name()?
                        .map(|l| l.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                ),
                tar::EntryType::Link => Kind::Hardlink(
                    entry
                        .link_name()?
                        .map(|l| l.to_string_lossy().trim_start_matches("./").to_string())
                        .unwrap_or_default(),
                ),
                _ => continue,
            };
            if path.is_empty() || excluded(path.trim_end_matches('/')) {
                continue;
            }
            self.add(
                &path,
                Entry {
                    kind,
                    mode,
                    uid,
                    gid,
                },
            );
            count += 1;
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(bytes: &[u8]) -> Entry {
        Entry {
            kind: Kind::File(bytes.to_vec()),
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn test_same_entries_same_digest_whatever_the_order() {
        let mut a = Layer::default();
        a.add("/etc/a", file(b"1"));
        a.add("/bin/b", file(b"2"));
        let mut b = Layer::default();
        b.add("/bin/b", file(b"2"));
        b.add("/etc/a", file(b"1"));
        let (x, y) = (a.finish(1).unwrap(), b.finish(1).unwrap());
        assert_eq!((x.digest.clone(), x.diff_id.clone()), (y.digest, y.diff_id));
        assert_ne!(
            a.finish(2).unwrap().digest,
            x.digest,
            "the epoch is part of the content"
        );
        assert_eq!(a.len(), 4, "parent dirs are added");
    }
}
