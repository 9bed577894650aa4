//! Images made on this host from a stored image and new layers (a sandbox's snapshot): the
//! layers are written as gzipped tars straight into the store, the config and manifest are the
//! base image's with those layers appended.

use std::io::{self, Write};

use crate::config::{DOCKER_LAYER_GZIP, DOCKER_MANIFEST, OCI_LAYER_GZIP};
use crate::digest::{Digest, HashingWriter};
use crate::store::{BlobWriter, ImageRecord, LayerRecord, Store, StoreError};

type Result<T> = std::result::Result<T, StoreError>;

/// A layer written into the store.
#[derive(Debug, Clone)]
pub struct NewLayer {
    /// Digest of the gzipped blob.
    pub digest: Digest,
    /// Size of the blob.
    pub size: u64,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
}

/// Writes one layer: a tar stream in, a gzipped blob in the store out, hashed both ways.
pub struct LayerWriter {
    inner: HashingWriter<flate2::write::GzEncoder<BlobWriter>>,
}

impl LayerWriter {
    /// Starts a layer blob in `store` (its work file goes if the writer is dropped).
    pub fn new(store: &Store) -> Result<Self> {
        let blob = store.blob_writer_unknown()?;
        Ok(LayerWriter {
            inner: HashingWriter::new(flate2::write::GzEncoder::new(
                blob,
                flate2::Compression::fast(),
            )),
        })
    }

    /// Ends the gzip stream and makes the blob durable and visible.
    pub fn finish(self) -> Result<NewLayer> {
        let (gz, diff_id, _) = self.inner.finish();
        let blob = gz.finish().map_err(|source| StoreError::Io {
            op: "failed to write a layer into",
            path: std::path::PathBuf::from("the image store"),
            source,
        })?;
        let (digest, size) = blob.commit_computed()?;
        Ok(NewLayer {
            digest,
            size,
            diff_id,
        })
    }
}

impl Write for LayerWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (days to civil date, proleptic Gregorian).
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn malformed(what: &'static str, digest: &Digest) -> impl Fn(serde_json::Error) -> StoreError {
    let digest = digest.clone();
    move |source| StoreError::Malformed {
        what,
        digest: digest.clone(),
        source,
    }
}

fn not_an_object(what: &'static str, digest: &Digest) -> StoreError {
    StoreError::Malformed {
        what,
        digest: digest.clone(),
        source: <serde_json::Error as serde::de::Error>::custom("not the expected JSON object"),
    }
}

/// Adds `name` (a full reference, as the caller normalised it) to `store`: `base` with
/// `layers` on top (bottom first), one history entry each saying `created_by`. Replaces an
/// image of that name.
pub fn derive_image(
    store: &Store,
    base: &ImageRecord,
    layers: &[NewLayer],
    name: &str,
    created_by: &str,
    now: u64,
) -> Result<ImageRecord> {
    let created = rfc3339(now);
    let mut config: serde_json::Value = serde_json::from_slice(&store.read_blob(&base.config)?)
        .map_err(malformed("image config", &base.config))?;
    let obj = config
        .as_object_mut()
        .ok_or_else(|| not_an_object("image config", &base.config))?;
    obj.insert("created".into(), created.clone().into());
    let diff_ids = obj
        .entry("rootfs")
        .or_insert_with(|| serde_json::json!({"type": "layers", "diff_ids": []}))
        .as_object_mut()
        .and_then(|r| r.get_mut("diff_ids"))
        .and_then(|d| d.as_array_mut())
        .ok_or_else(|| not_an_object("image config", &base.config))?;
    diff_ids.extend(layers.iter().map(|l| l.diff_id.to_string().into()));
    if let Some(history) = obj.get_mut("history").and_then(|h| h.as_array_mut()) {
        history.extend(layers.iter().map(|_| {
            serde_json::json!({"created": created, "created_by": created_by, "comment": "agentd"})
        }));
    }
    let config_bytes = serde_json::to_vec(&config).expect("JSON values serialise");
    let config_digest = store.put_blob(&config_bytes, None)?;

    let mut manifest: serde_json::Value = serde_json::from_slice(&store.read_blob(&base.manifest)?)
        .map_err(malformed("image manifest", &base.manifest))?;
    let docker = manifest["mediaType"] == DOCKER_MANIFEST;
    let media_type = if docker {
        DOCKER_LAYER_GZIP
    } else {
        OCI_LAYER_GZIP
    };
    let m = manifest
        .as_object_mut()
        .ok_or_else(|| not_an_object("image manifest", &base.manifest))?;
    let cfg = m
        .get_mut("config")
        .and_then(|c| c.as_object_mut())
        .ok_or_else(|| not_an_object("image manifest", &base.manifest))?;
    cfg.insert("digest".into(), config_digest.to_string().into());
    cfg.insert("size".into(), (config_bytes.len() as u64).into());
    let descs = m
        .get_mut("layers")
        .and_then(|l| l.as_array_mut())
        .ok_or_else(|| not_an_object("image manifest", &base.manifest))?;
    descs.extend(layers.iter().map(|l| {
        serde_json::json!({"mediaType": media_type, "digest": l.digest.to_string(), "size": l.size})
    }));
    let manifest_bytes = serde_json::to_vec(&manifest).expect("JSON values serialise");
    let manifest_digest = store.put_blob(&manifest_bytes, None)?;

    let mut records = base.layers.clone();
    records.extend(layers.iter().map(|l| LayerRecord {
        digest: l.digest.clone(),
        media_type: media_type.to_string(),
        size: l.size,
        diff_id: l.diff_id.clone(),
    }));
    let record = ImageRecord {
        name: name.to_string(),
        manifest: manifest_digest,
        index: None,
        config: config_digest,
        layers: records,
        platform: base.platform.clone(),
        added: now,
    };
    store.add_image(record.clone())?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
