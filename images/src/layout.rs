//! Import and export: OCI image layouts (a directory or a tar of one) and docker-archive tars
//! (what `docker save`, `podman save` and `skopeo copy ... docker-archive:` write).
//!
//! Every blob is verified on the way in: layout blobs against the digest they are named by,
//! docker-archive files are stored under the digest of their content and the manifest that
//! agentd writes for them refers to those digests.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{
    self, Descriptor, ImageConfig, Index, Manifest, ManifestError, ManifestKind, Platform,
};
use crate::digest::Digest;
use crate::reference::Reference;
use crate::store::{ImageRecord, LayerRecord, Store, StoreError};

/// Annotation that names an image in an OCI layout's index.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// Largest metadata file (index, manifest, config) read into memory from an archive.
const MAX_METADATA_SIZE: u64 = 1 << 20;

/// Why an import or export failed.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is neither an OCI image layout (oci-layout + index.json) nor a docker archive (manifest.json)")]
    UnknownFormat(PathBuf),
    #[error("{what} in {path} is malformed")]
    Json {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("manifest {digest} in {path} is unusable")]
    Manifest {
        digest: String,
        path: PathBuf,
        #[source]
        source: Box<ManifestError>,
    },
    #[error("{path} holds no image")]
    Empty { path: PathBuf },
    #[error("{path} refers to {file}, which it does not contain")]
    MissingFile { path: PathBuf, file: String },
    #[error("invalid image name {name:?}")]
    BadName {
        name: String,
        #[source]
        source: crate::reference::ReferenceError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Result<T> = std::result::Result<T, LayoutError>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayoutError + 'a {
    move |source| LayoutError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Where the content of an import comes from.
enum Source {
    /// An OCI layout directory.
    Dir(PathBuf),
    /// A tar whose regular files have been stored as blobs (path in tar -> digest, size), with
    /// its small JSON files kept in memory.
    Tar {
        files: BTreeMap<String, (Digest, u64)>,
        metadata: BTreeMap<String, Vec<u8>>,
    },
}

/// Imports every image in an OCI layout (dir or tar) or docker archive at `path`. Images are
/// named by `name` if given (only for a single image), else by the names the archive carries,
/// else `localhost/<file name>:latest`. Returns the records added.
pub fn import(
    store: &Store,
    path: &Path,
    name: Option<&str>,
    platform: &Platform,
) -> Result<Vec<ImageRecord>> {
    let _lock = store.lock_store(false)?;
    let meta = fs::metadata(path).map_err(io_err("cannot read", path))?;
    let source = if meta.is_dir() {
        Source::Dir(path.to_path_buf())
    } else {
        read_tar(store, path)?
    };
    let fallback = default_name(path);
    let mut records = match &source {
        Source::Dir(dir) if dir.join("index.json").exists() => {
            import_oci(store, path, &source, platform)?
        }
        Source::Tar { metadata, .. } if metadata.contains_key("index.json") => {
            import_oci(store, path, &source, platform)?
        }
        Source::Tar { metadata, .. } if metadata.contains_key("manifest.json") => {
            import_docker(store, path, &source)?
        }
        _ => return Err(LayoutError::UnknownFormat(path.to_path_buf())),
    };
    if records.is_empty() {
        return Err(LayoutError::Empty {
            path: path.to_path_buf(),
        });
    }
    let single = records.len() == 1;
    for (i, record) in records.iter_mut().enumerate() {
        record.name = match (name, record.name.is_empty()) {
            (Some(n), _) if single => normalise_name(n)?,
            (_, false) => normalise_name(&record.name)?,
            _ if single => fallback.clone(),
            _ => format!("{fallback}-{i}"),
        };
        store.add_image(record.clone())?;
    }
    Ok(records)
}

/// Names an imported (or locally made) image: a full reference keeps its registry; a bare `name[:tag]` gets
/// `localhost/` (as podman names local images); a bare tag (`latest`, as skopeo writes in
/// an OCI layout) is left to the caller's fallback.
pub fn normalise_name(name: &str) -> Result<String> {
    let bad = |source| LayoutError::BadName {
        name: name.to_string(),
        source,
    };
    let first = name.split('/').next().unwrap_or(name);
    if name.contains('/') && (first.contains(['.', ':']) || first == "localhost") {
        return Ok(name.parse::<Reference>().map_err(bad)?.to_string());
    }
    Ok(format!("localhost/{name}")
        .parse::<Reference>()
        .map_err(bad)?
        .to_string())
}

fn default_name(path: &Path) -> String {
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let base = base
        .trim_end_matches(".tar")
        .trim_end_matches(".oci")
        .trim_end_matches(".docker");
    let clean: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let clean = clean.trim_matches('-');
    format!(
        "localhost/{}:latest",
        if clean.is_empty() { "imported" } else { clean }
    )
}

/// Streams a tar: every regular file becomes a blob under its content digest (so nothing is
/// trusted before it is hashed); small files are also kept in memory for parsing.
fn read_tar(store: &Store, path: &Path) -> Result<Source> {
    let file = File::open(path).map_err(io_err("cannot open", path))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    // A gzip-compressed archive (`docker save | gzip`) is accepted too.
    let head = reader.fill_buf().map_err(io_err("cannot read", path))?;
    let inner: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut archive = tar::Archive::new(inner);
    let mut files = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for entry in archive.entries().map_err(io_err("cannot read", path))? {
        let mut entry = entry.map_err(io_err("cannot read", path))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(io_err("cannot read", path))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let size = entry.header().size().map_err(io_err("cannot read", path))?;
        if size <= MAX_METADATA_SIZE {
            let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            entry
                .read_to_end(&mut bytes)
                .map_err(io_err("cannot read", path))?;
            let digest = store.put_blob(&bytes, None)?;
            files.insert(name.clone(), (digest, size));
            metadata.insert(name, bytes);
        } else {
            let mut writer = store.blob_writer_unknown()?;
            io::copy(&mut entry, &mut writer).map_err(io_err("cannot read", path))?;
            let (digest, size) = writer.commit_computed()?;
            files.insert(name, (digest, size));
        }
    }
    Ok(Source::Tar { files, metadata })
}

impl Source {
    /// Reads a small file of the source.
    fn read(&self, origin: &Path, name: &str) -> Result<Vec<u8>> {
        match self {
            Source::Dir(dir) => {
                let path = dir.join(name);
                fs::read(&path).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => LayoutError::MissingFile {
                        path: origin.into(),
                        file: name.into(),
                    },
                    _ => LayoutError::Io {
                        op: "cannot read",
                        path,
                        source: e,
                    },
                })
            }
            Source::Tar { metadata, .. } => {
                metadata
                    .get(name)
                    .cloned()
                    .ok_or_else(|| LayoutError::MissingFile {
                        path: origin.into(),
                        file: name.into(),
                    })
            }
        }
    }

    /// Puts the layout blob `digest` into the store, verified.
    fn store_blob(
        &self,
        store: &Store,
        origin: &Path,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<()> {
        let name = format!("blobs/sha256/{}", digest.hex());
        match self {
            Source::Dir(dir) => {
                let path = dir.join(&name);
                let file = File::open(&path).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => LayoutError::MissingFile {
                        path: origin.into(),
                        file: name.clone(),
                    },
                    _ => LayoutError::Io {
                        op: "cannot open",
                        path: path.clone(),
                        source: e,
                    },
                })?;
                crate::store::copy_blob(store, file, digest, size).map_err(|e| match e {
                    StoreError::Io { op, path, source } => LayoutError::Io { op, path, source },
                    other => other.into(),
                })
            }
            Source::Tar { files, .. } => match files.get(&name) {
                // The file was stored under the digest of its content: a mismatch with its
                // name means the archive is corrupt.
                Some((actual, actual_size)) if actual == digest => match size {
                    Some(s) if s != *actual_size => Err(StoreError::SizeMismatch {
                        what: name,
                        expected: s,
                        actual: *actual_size,
                    }
                    .into()),
                    _ => Ok(()),
                },
                Some((actual, actual_size)) => Err(StoreError::DigestMismatch {
                    what: format!("{name} in {}", origin.display()),
                    expected: digest.clone(),
                    actual: actual.clone(),
                    size: *actual_size,
                }
                .into()),
                None => Err(LayoutError::MissingFile {
                    path: origin.into(),
                    file: name,
                }),
            },
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn import_oci(
    store: &Store,
    origin: &Path,
    source: &Source,
    platform: &Platform,
) -> Result<Vec<ImageRecord>> {
    let index_bytes = source.read(origin, "index.json")?;
    let index: Index = serde_json::from_slice(&index_bytes).map_err(|e| LayoutError::Json {
        what: "index.json",
        path: origin.into(),
        source: e,
    })?;
    let mut records = Vec::new();
    for entry in &index.manifests {
        let name = entry
            .annotations
            .get(REF_NAME_ANNOTATION)
            .cloned()
            .unwrap_or_default();
        // A bare tag ("latest") is not a name: the caller's fallback applies.
        let name = if name.contains('/') || name.contains(':') {
            name
        } else {
            String::new()
        };
        records.push(import_manifest(
            store, origin, source, entry, None, platform, name,
        )?);
    }
    Ok(records)
}

fn import_manifest(
    store: &Store,
    origin: &Path,
    source: &Source,
    entry: &Descriptor,
    parent_index: Option<Digest>,
    platform: &Platform,
    name: String,
) -> Result<ImageRecord> {
    source.store_blob(store, origin, &entry.digest, Some(entry.size))?;
    let bytes = store.read_blob(&entry.digest)?;
    let manifest_err = |source| LayoutError::Manifest {
        digest: entry.digest.to_string(),
        path: origin.into(),
        source: Box::new(source),
    };
    match ManifestKind::parse(&bytes, Some(&entry.media_type)).map_err(manifest_err)? {
        ManifestKind::Index(index) => {
            let child = index.select(platform).map_err(manifest_err)?.clone();
            import_manifest(
                store,
                origin,
                source,
                &child,
                Some(entry.digest.clone()),
                platform,
                name,
            )
        }
        ManifestKind::Image(manifest) => {
            source.store_blob(
                store,
                origin,
                &manifest.config.digest,
                Some(manifest.config.size),
            )?;
            for layer in &manifest.layers {
                config::layer_compression(&layer.media_type).map_err(manifest_err)?;
                source.store_blob(store, origin, &layer.digest, Some(layer.size))?;
            }
            record_for(
                store,
                origin,
                name,
                entry.digest.clone(),
                parent_index,
                &manifest,
            )
        }
    }
}

fn record_for(
    store: &Store,
    origin: &Path,
    name: String,
    manifest_digest: Digest,
    index: Option<Digest>,
    manifest: &Manifest,
) -> Result<ImageRecord> {
    let config_bytes = store.read_blob(&manifest.config.digest)?;
    let config = ImageConfig::parse(&config_bytes).map_err(|e| LayoutError::Json {
        what: "image config",
        path: origin.into(),
        source: e,
    })?;
    if config.diff_ids.len() != manifest.layers.len() {
        return Err(LayoutError::Manifest {
            digest: manifest_digest.to_string(),
            path: origin.into(),
            source: Box::new(ManifestError::LayerCount {
                diff_ids: config.diff_ids.len(),
                layers: manifest.layers.len(),
            }),
        });
    }
    Ok(ImageRecord {
        name,
        manifest: manifest_digest,
        index,
        config: manifest.config.digest.clone(),
        layers: manifest
            .layers
            .iter()
            .zip(config.diff_ids)
            .map(|(l, diff_id)| LayerRecord {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: l.size,
                diff_id,
            })
            .collect(),
        platform: config.platform,
        added: now(),
    })
}

fn import_docker(store: &Store, origin: &Path, source: &Source) -> Result<Vec<ImageRecord>> {
    let Source::Tar { files, .. } = source else {
        unreachable!("docker archives are tars")
    };
    let manifest_bytes = source.read(origin, "manifest.json")?;
    let entries: Vec<DockerArchiveEntry> =
        serde_json::from_slice(&manifest_bytes).map_err(|e| LayoutError::Json {
            what: "manifest.json",
            path: origin.into(),
            source: e,
        })?;
    let file = |name: &str| {
        files
            .get(name.trim_start_matches("./"))
            .cloned()
            .ok_or_else(|| LayoutError::MissingFile {
                path: origin.into(),
                file: name.into(),
            })
    };
    let mut records = Vec::new();
    for entry in entries {
        let (config_digest, config_size) = file(&entry.config)?;
        let mut layers = Vec::new();
        for layer in &entry.layers {
            let (digest, size) = file(layer)?;
            // docker save writes plain tars; some tools write gzip ones. Look at the bytes.
            let mut head = [0u8; 4];
            let n = store.open_blob(&digest)?.read(&mut head).unwrap_or(0);
            let media_type = if head[..n].starts_with(&[0x1f, 0x8b]) {
                config::OCI_LAYER_GZIP
            } else if head[..n].starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                config::OCI_LAYER_ZSTD
            } else {
                config::OCI_LAYER_TAR
            };
            layers.push(Descriptor {
                media_type: media_type.into(),
                digest,
                size,
                platform: None,
                annotations: BTreeMap::new(),
            });
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(config::OCI_MANIFEST.into()),
            config: Descriptor {
                media_type: config::OCI_CONFIG.into(),
                digest: config_digest,
                size: config_size,
                platform: None,
                annotations: BTreeMap::new(),
            },
            layers,
        };
        let manifest_bytes = serde_json::to_vec(&manifest).expect("manifests serialise");
        let manifest_digest = store.put_blob(&manifest_bytes, None)?;
        let name = entry
            .repo_tags
            .as_ref()
            .and_then(|t| t.first())
            .cloned()
            .unwrap_or_default();
        records.push(record_for(
            store,
            origin,
            name,
            manifest_digest,
            None,
            &manifest,
        )?);
    }
    Ok(records)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LayoutMarker {
    image_layout_version: &'static str,
}

/// Writes an image as an OCI image layout directory at `dir` (created if missing; an existing
/// layout gets the image added to its index). Blobs are hard-linked from the store when they
/// share a filesystem, else copied.
pub fn export(store: &Store, name: &str, dir: &Path) -> Result<ImageRecord> {
    let _lock = store.lock_store(false)?;
    let image = store.resolve(name)?;
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io_err("cannot create", &blobs))?;
    let mut digests = vec![image.manifest.clone(), image.config.clone()];
    digests.extend(image.layers.iter().map(|l| l.digest.clone()));
    for digest in &digests {
        let target = blobs.join(digest.hex());
        if target.exists() {
            continue;
        }
        let source = store.blob_path(digest);
        if fs::hard_link(&source, &target).is_err() {
            let tmp = blobs.join(format!(".{}.tmp", digest.hex()));
            fs::copy(&source, &tmp).map_err(io_err("cannot copy to", &tmp))?;
            fs::rename(&tmp, &target).map_err(io_err("cannot rename", &tmp))?;
        }
    }
    let marker = serde_json::to_vec(&LayoutMarker {
        image_layout_version: "1.0.0",
    })
    .expect("serialises");
    write_file(&dir.join("oci-layout"), &marker)?;
    let index_path = dir.join("index.json");
    let mut index = match fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| LayoutError::Json {
            what: "index.json",
            path: dir.into(),
            source: e,
        })?,
        Err(_) => Index {
            schema_version: 2,
            media_type: Some(config::OCI_INDEX.into()),
            manifests: Vec::new(),
        },
    };
    let manifest_bytes = store.read_blob(&image.manifest)?;
    let media_type = match ManifestKind::parse(&manifest_bytes, None) {
        Ok(ManifestKind::Image(m)) => m.media_type.unwrap_or_else(|| config::OCI_MANIFEST.into()),
        _ => config::OCI_MANIFEST.into(),
    };
    // The ref name is the tag for a `name:tag` image (what skopeo's `oci:DIR:TAG` and umoci's
    // `--image DIR:TAG` address).
    let tag = image
        .name
        .rsplit_once(':')
        .map(|(_, t)| t)
        .filter(|t| !t.contains('/'))
        .unwrap_or("latest")
        .to_string();
    index
        .manifests
        .retain(|d| d.annotations.get(REF_NAME_ANNOTATION) != Some(&tag));
    let (os, arch) = image.platform.split_once('/').unwrap_or(("linux", "amd64"));
    index.manifests.push(Descriptor {
        media_type,
        digest: image.manifest.clone(),
        size: manifest_bytes.len() as u64,
        platform: Some(config::PlatformJson {
            architecture: arch.split('/').next().unwrap_or(arch).into(),
            os: os.into(),
            variant: arch.split('/').nth(1).map(Into::into),
        }),
        annotations: BTreeMap::from([(REF_NAME_ANNOTATION.to_string(), tag)]),
    });
    write_file(
        &index_path,
        &serde_json::to_vec_pretty(&index).expect("serialises"),
    )?;
    Ok(image)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
    f.write_all(bytes).map_err(io_err("cannot write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("cannot rename", &tmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_import_names() {
        assert_eq!(
            normalise_name("busybox:1.36").unwrap(),
            "localhost/busybox:1.36"
        );
        assert_eq!(
            normalise_name("busybox").unwrap(),
            "localhost/busybox:latest"
        );
        assert_eq!(
            normalise_name("127.0.0.1:5000/x:y").unwrap(),
            "127.0.0.1:5000/x:y"
        );
        assert_eq!(
            default_name(Path::new("/tmp/My Image.oci.tar")),
            "localhost/my-image:latest"
        );
        assert!(normalise_name("Bad Name").is_err());
    }
}
