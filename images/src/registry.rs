//! Pulls images over the OCI distribution API (through `oci-client`): manifest or index, the
//! config, then the layers in parallel, each streamed into the store and verified there.
//!
//! Authentication: anonymous, bearer tokens from the registry's `WWW-Authenticate` challenge
//! (handled by oci-client), or HTTP basic credentials from an `auth.json` / docker `config.json`
//! file. Transport: HTTPS with the system's roots; plain HTTP only for loopback registries or
//! registries the caller marks insecure. Resuming: blobs already in the store (verified) are not
//! fetched again, so an interrupted pull continues where it stopped, blob by blob.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use std::io::Write as _;

use crate::config::{
    layer_compression, ImageConfig, ManifestError, ManifestKind, Platform, MANIFEST_TYPES,
};
use crate::digest::{Digest, DigestError};
use crate::progress::{Progress, ProgressEvent};
use crate::reference::Reference;
use crate::store::{ImageRecord, LayerRecord, Store, StoreError};
use crate::unpack::UnpackOptions;

/// Default number of layers downloaded at once.
pub const DEFAULT_CONCURRENT_DOWNLOADS: usize = 4;

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("registry request for {reference} failed")]
    Registry {
        reference: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("manifest of {reference} is unusable")]
    Manifest {
        reference: String,
        #[source]
        source: Box<ManifestError>,
    },
    #[error("registry sent a bad digest for {reference}")]
    Digest {
        reference: String,
        #[source]
        source: DigestError,
    },
    #[error("manifest of {reference} does not match the digest {expected} it was asked for (got {actual})")]
    ManifestDigest {
        reference: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("image config {digest} is malformed")]
    Config {
        digest: Digest,
        #[source]
        source: serde_json::Error,
    },
    #[error("credentials file {path}")]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("download of {digest} failed")]
    Download {
        digest: Digest,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("a pull task failed")]
    Join(#[from] tokio::task::JoinError),
}

type Result<T> = std::result::Result<T, PullError>;

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Platform to select from an index.
    pub platform: Platform,
    /// Allow plain HTTP to a registry that is not on loopback.
    pub insecure: bool,
    /// Credentials file (`auth.json` format); `None` searches the usual places.
    pub auth_file: Option<PathBuf>,
    /// Layers downloaded at once.
    pub concurrency: usize,
    /// Unpack the layers after download (with these options).
    pub unpack: Option<UnpackOptions>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: Platform::default(),
            insecure: false,
            auth_file: None,
            concurrency: DEFAULT_CONCURRENT_DOWNLOADS,
            unpack: Some(UnpackOptions::default()),
        }
    }
}

/// The credentials files searched when none is given, in order: `$REGISTRY_AUTH_FILE`,
/// `$XDG_RUNTIME_DIR/containers/auth.json`, `~/.config/containers/auth.json`,
/// `$DOCKER_CONFIG/config.json`, `~/.docker/config.json`.
pub fn default_auth_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let env = |k| std::env::var_os(k).map(PathBuf::from);
    if let Some(f) = env("REGISTRY_AUTH_FILE") {
        files.push(f);
    }
    if let Some(d) = env("XDG_RUNTIME_DIR") {
        files.push(d.join("containers/auth.json"));
    }
    if let Some(home) = env("HOME") {
        files.push(home.join(".config/containers/auth.json"));
    }
    if let Some(d) = env("DOCKER_CONFIG") {
        files.push(d.join("config.json"));
    }
    if let Some(home) = env("HOME") {
        files.push(home.join(".docker/config.json"));
    }
    files
}

/// Looks up basic credentials for `registry` in an `auth.json` / docker `config.json` file:
/// `{"auths": {"<registry>": {"auth": base64("user:password")}}}` (also `username`/`password`
/// fields, and keys written as URLs such as `https://index.docker.io/v1/`).
pub fn credentials_for(file: &Path, registry: &str) -> std::io::Result<Option<(String, String)>> {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    #[derive(serde::Deserialize)]
    struct AuthFile {
        #[serde(default)]
        auths: BTreeMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let parsed: AuthFile =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not valid auth JSON: {e}")))?;
    let wanted: &[&str] = if registry == crate::reference::DEFAULT_REGISTRY {
        &["docker.io", "index.docker.io", "registry-1.docker.io"]
    } else {
        &[registry]
    };
    for (key, entry) in parsed.auths {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let host = host.split('/').next().unwrap_or(host);
        if !wanted.contains(&host) {
            continue;
        }
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(Some((u.clone(), p.clone())));
        }
        if let Some(auth) = entry.auth {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| invalid(format!("auth for {key} is not base64")))?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| invalid(format!("auth for {key} is not UTF-8")))?;
            let (u, p) = decoded
                .split_once(':')
                .ok_or_else(|| invalid(format!("auth for {key} is not user:password")))?;
            return Ok(Some((u.to_string(), p.to_string())));
        }
    }
    Ok(None)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Pulls `reference` into `store` and records it under its normalised name.
pub async fn pull(
    store: &Store,
    reference: &Reference,
    options: &PullOptions,
    progress: Arc<dyn Progress>,
) -> Result<ImageRecord> {
    // reqwest is built without a default crypto provider; installing one twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let name = reference.to_string();
    let registry_err = |source| PullError::Registry {
        reference: name.clone(),
        source,
    };

    let plain_http = reference.is_loopback() || options.insecure;
    let protocol = if plain_http {
        ClientProtocol::HttpsExcept(vec![reference.registry.clone()])
    } else {
        ClientProtocol::Https
    };
    let client = oci_client::Client::new(ClientConfig {
        protocol,
        ..Default::default()
    });

    let mut auth = RegistryAuth::Anonymous;
    let files = match &options.auth_file {
        Some(f) => vec![f.clone()],
        None => default_auth_files(),
    };
    for file in files {
        match credentials_for(&file, &reference.registry) {
            Ok(Some((user, password))) => {
                tracing::debug!(file = %file.display(), registry = %reference.registry, "using basic credentials");
                auth = RegistryAuth::Basic(user, password);
                break;
            }
            Ok(None) => {}
            Err(source) => return Err(PullError::Credentials { path: file, source }),
        }
    }

    let oci_ref = match (&reference.digest, &reference.tag) {
        (Some(d), _) => oci_client::Reference::with_digest(
            reference.registry.clone(),
            reference.repository.clone(),
            d.to_string(),
        ),
        (None, Some(t)) => oci_client::Reference::with_tag(
            reference.registry.clone(),
            reference.repository.clone(),
            t.clone(),
        ),
        (None, None) => unreachable!("a parsed reference has a tag or a digest"),
    };
    let digest_err = |source| PullError::Digest {
        reference: name.clone(),
        source,
    };
    let store2 = store.clone();
    let _store_lock = tokio::task::spawn_blocking(move || store2.lock_store(false)).await??;

    // Manifest (or index, then the platform's manifest).
    let (bytes, digest) = client
        .pull_manifest_raw(&oci_ref, &auth, &MANIFEST_TYPES)
        .await
        .map_err(registry_err)?;
    let digest: Digest = digest.parse().map_err(digest_err)?;
    let actual = Digest::of(&bytes);
    if actual != digest || reference.digest.as_ref().is_some_and(|d| *d != actual) {
        return Err(PullError::ManifestDigest {
            reference: name.clone(),
            expected: reference.digest.clone().unwrap_or(digest),
            actual,
        });
    }
    let manifest_err = |source| PullError::Manifest {
        reference: name.clone(),
        source: Box::new(source),
    };
    let (index, manifest_digest, manifest) = match ManifestKind::parse(&bytes, None)
        .map_err(manifest_err)?
    {
        ManifestKind::Image(m) => {
            store.put_blob(&bytes, Some(&actual))?;
            (None, actual, m)
        }
        ManifestKind::Index(index) => {
            let entry = index
                .select(&options.platform)
                .map_err(manifest_err)?
                .clone();
            let child = oci_client::Reference::with_digest(
                reference.registry.clone(),
                reference.repository.clone(),
                entry.digest.to_string(),
            );
            let (child_bytes, _) = client
                .pull_manifest_raw(&child, &auth, &MANIFEST_TYPES)
                .await
                .map_err(registry_err)?;
            let child_digest = Digest::of(&child_bytes);
            if child_digest != entry.digest {
                return Err(PullError::ManifestDigest {
                    reference: name.clone(),
                    expected: entry.digest,
                    actual: child_digest,
                });
            }
            let ManifestKind::Image(m) =
                ManifestKind::parse(&child_bytes, Some(&entry.media_type)).map_err(manifest_err)?
            else {
                return Err(manifest_err(ManifestError::MediaType(
                    "nested index".into(),
                )));
            };
            store.put_blob(&bytes, Some(&actual))?;
            store.put_blob(&child_bytes, Some(&child_digest))?;
            (Some(actual), child_digest, m)
        }
    };
    for layer in &manifest.layers {
        layer_compression(&layer.media_type).map_err(manifest_err)?;
    }

    // Config.
    let config_digest = manifest.config.digest.clone();
    if !store.has_blob(&config_digest) {
        let mut out = Vec::new();
        let desc = descriptor(&manifest.config);
        client
            .pull_blob(&oci_ref, &desc, &mut out)
            .await
            .map_err(registry_err)?;
        store.put_blob(&out, Some(&config_digest))?;
    }
    let config_bytes = store.read_blob(&config_digest)?;
    let config = ImageConfig::parse(&config_bytes).map_err(|source| PullError::Config {
        digest: config_digest.clone(),
        source,
    })?;
    if config.diff_ids.len() != manifest.layers.len() {
        return Err(manifest_err(ManifestError::LayerCount {
            diff_ids: config.diff_ids.len(),
            layers: manifest.layers.len(),
        }));
    }
    let layers: Vec<LayerRecord> = manifest
        .layers
        .iter()
        .zip(&config.diff_ids)
        .map(|(l, diff_id)| LayerRecord {
            digest: l.digest.clone(),
            media_type: l.media_type.clone(),
            size: l.size,
            diff_id: diff_id.clone(),
        })
        .collect();
    progress.event(ProgressEvent::Resolved {
        name: name.clone(),
        manifest: manifest_digest.clone(),
        layers: layers.iter().map(|l| (l.digest.clone(), l.size)).collect(),
    });

    // Layers, in parallel, then unpacked (each as soon as it is downloaded).
    let client = Arc::new(client);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(options.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for layer in layers.clone() {
        let (client, store, progress, oci_ref, semaphore) = (
            client.clone(),
            store.clone(),
            progress.clone(),
            oci_ref.clone(),
            semaphore.clone(),
        );
        let unpack = options.unpack.clone();
        tasks.spawn(async move {
            let _permit = semaphore
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            fetch_layer(&client, &oci_ref, &store, &layer, &*progress).await?;
            if let Some(unpack) = unpack {
                progress.event(ProgressEvent::UnpackStart {
                    digest: layer.digest.clone(),
                });
                let (store2, layer2) = (store.clone(), layer.clone());
                let (_, stats) =
                    tokio::task::spawn_blocking(move || store2.unpack_layer(&layer2, &unpack))
                        .await??;
                progress.event(ProgressEvent::UnpackDone {
                    digest: layer.digest.clone(),
                    stats,
                });
            }
            Ok::<_, PullError>(())
        });
    }
    let mut first_error = None;
    while let Some(result) = tasks.join_next().await {
        let result = result.map_err(PullError::from).and_then(|r| r);
        if let Err(e) = result {
            if first_error.is_none() {
                first_error = Some(e);
                tasks.abort_all();
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }

    let record = ImageRecord {
        name,
        manifest: manifest_digest,
        index,
        config: config_digest,
        layers,
        platform: config.platform.clone(),
        added: now(),
    };
    store.add_image(record.clone())?;
    progress.event(ProgressEvent::Done {
        name: record.name.clone(),
        manifest: record.manifest.clone(),
    });
    Ok(record)
}

fn descriptor(d: &crate::config::Descriptor) -> OciDescriptor {
    OciDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.to_string(),
        size: i64::try_from(d.size).unwrap_or(i64::MAX),
        ..Default::default()
    }
}

async fn fetch_layer(
    client: &oci_client::Client,
    oci_ref: &oci_client::Reference,
    store: &Store,
    layer: &LayerRecord,
    progress: &dyn Progress,
) -> Result<()> {
    let digest = &layer.digest;
    if store.has_blob(digest) {
        progress.event(ProgressEvent::LayerDone {
            digest: digest.clone(),
            cached: true,
        });
        return Ok(());
    }
    // Wait for anyone else fetching this blob (another pull of the same image), then re-check.
    let (store2, digest2) = (store.clone(), digest.clone());
    let _lock = tokio::task::spawn_blocking(move || store2.lock_digest(&digest2)).await??;
    if store.has_blob(digest) {
        progress.event(ProgressEvent::LayerDone {
            digest: digest.clone(),
            cached: true,
        });
        return Ok(());
    }
    let download_err = |e: Box<dyn std::error::Error + Send + Sync>| PullError::Download {
        digest: digest.clone(),
        source: e,
    };
    let desc = OciDescriptor {
        media_type: layer.media_type.clone(),
        digest: digest.to_string(),
        size: i64::try_from(layer.size).unwrap_or(i64::MAX),
        ..Default::default()
    };
    let mut stream = client
        .pull_blob_stream(oci_ref, &desc)
        .await
        .map_err(|source| PullError::Registry {
            reference: oci_ref.to_string(),
            source,
        })?;
    let mut writer = store.blob_writer(digest)?;
    progress.event(ProgressEvent::LayerStart {
        digest: digest.clone(),
        size: layer.size,
    });
    let mut last_report = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| download_err(Box::new(e)))?;
        if writer.written() + chunk.len() as u64 > layer.size {
            return Err(StoreError::SizeMismatch {
                what: format!("blob {digest}"),
                expected: layer.size,
                actual: writer.written() + chunk.len() as u64,
            }
            .into());
        }
        writer
            .write_all(&chunk)
            .map_err(|e| download_err(Box::new(e)))?;
        if writer.written() - last_report >= 256 * 1024 || writer.written() == layer.size {
            last_report = writer.written();
            progress.event(ProgressEvent::LayerBytes {
                digest: digest.clone(),
                done: last_report,
                total: layer.size,
            });
        }
    }
    let (digest2, size) = (digest.clone(), layer.size);
    tokio::task::spawn_blocking(move || writer.commit(&digest2, Some(size))).await??;
    progress.event(ProgressEvent::LayerDone {
        digest: digest.clone(),
        cached: false,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_credentials_file_formats() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &file,
            format!(r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{b64}"}},"https://index.docker.io/v1/":{{"username":"bob","password":"pw"}}}}}}"#),
        )
        .unwrap();
        assert_eq!(
            credentials_for(&file, "127.0.0.1:5000").unwrap(),
            Some(("alice".into(), "s3cret".into()))
        );
        assert_eq!(
            credentials_for(&file, "docker.io").unwrap(),
            Some(("bob".into(), "pw".into()))
        );
        assert_eq!(credentials_for(&file, "ghcr.io").unwrap(), None);
        assert_eq!(
            credentials_for(&dir.path().join("missing"), "x").unwrap(),
            None
        );
        std::fs::write(&file, "not json").unwrap();
        assert!(credentials_for(&file, "x").is_err());
    }
}
