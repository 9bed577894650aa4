//! The JSON documents of an image: descriptors, manifests, indexes (manifest lists) and the image
//! config, in both the OCI and the Docker schema 2 dialects (they share one structure).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// OCI layer media types.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI gzip layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker gzip layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Media types we accept for a manifest request.
pub const MANIFEST_TYPES: [&str; 4] = [
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

/// A content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// Digest of the referenced content.
    pub digest: Digest,
    /// Size of the referenced content in bytes.
    pub size: u64,
    /// Platform of an index entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformJson>,
    /// Annotations (the OCI layout uses `org.opencontainers.image.ref.name` for tags).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The platform object of an index entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlatformJson {
    /// CPU architecture (`amd64`, `arm64`, ...).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// CPU variant (`v8`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// Media type (optional in OCI manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The image config.
    pub config: Descriptor,
    /// Layers, bottom first.
    pub layers: Vec<Descriptor>,
}

/// An image index or Docker manifest list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// Media type (optional in OCI indexes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests it lists.
    pub manifests: Vec<Descriptor>,
}

/// A manifest document of either kind.
#[derive(Debug, Clone)]
pub enum ManifestKind {
    /// A single-platform image manifest.
    Image(Manifest),
    /// An index of manifests (multi-platform).
    Index(Index),
}

/// Why a manifest could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("malformed manifest")]
    Json(#[from] serde_json::Error),
    #[error("unsupported manifest media type {0:?} (expected an OCI or Docker schema 2 manifest or index)")]
    MediaType(String),
    #[error("no manifest for platform {wanted} in the index (it has: {available})")]
    NoPlatform { wanted: Platform, available: String },
    #[error("invalid platform {0:?} (expected os/arch or os/arch/variant, e.g. linux/amd64)")]
    BadPlatform(String),
    #[error("image config lists {diff_ids} diff-ids but the manifest has {layers} layers")]
    LayerCount { diff_ids: usize, layers: usize },
    #[error("unsupported layer media type {0:?}")]
    LayerType(String),
}

impl ManifestKind {
    /// Parses a manifest or index, using the media type from the document or the transport.
    pub fn parse(bytes: &[u8], transport_media_type: Option<&str>) -> Result<Self, ManifestError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
            layers: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_slice(bytes)?;
        let media_type = probe
            .media_type
            .or(transport_media_type.map(str::to_string));
        match media_type.as_deref() {
            Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => {
                Ok(ManifestKind::Index(serde_json::from_slice(bytes)?))
            }
            Some(OCI_MANIFEST | DOCKER_MANIFEST) => {
                Ok(ManifestKind::Image(serde_json::from_slice(bytes)?))
            }
            // OCI makes mediaType optional: tell them apart by their fields.
            None | Some("application/json") if probe.manifests.is_some() => {
                Ok(ManifestKind::Index(serde_json::from_slice(bytes)?))
            }
            None | Some("application/json") if probe.layers.is_some() => {
                Ok(ManifestKind::Image(serde_json::from_slice(bytes)?))
            }
            other => Err(ManifestError::MediaType(
                other.unwrap_or("none").to_string(),
            )),
        }
    }
}

/// A platform to select from an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// Operating system.
    pub os: String,
    /// Architecture.
    pub architecture: String,
    /// Variant, if it matters.
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl FromStr for Platform {
    type Err = ManifestError;

    fn from_str(s: &str) -> Result<Self, ManifestError> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok =
            |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(ManifestError::BadPlatform(s.to_string())),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Index {
    /// The entry for `platform` (a variant is matched only if the platform names one).
    pub fn select(&self, platform: &Platform) -> Result<&Descriptor, ManifestError> {
        self.manifests
            .iter()
            .filter(|d| matches!(d.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST))
            .find(|d| {
                d.platform.as_ref().is_some_and(|p| {
                    p.os == platform.os
                        && p.architecture == platform.architecture
                        && (platform.variant.is_none() || p.variant == platform.variant)
                })
            })
            .ok_or_else(|| ManifestError::NoPlatform {
                wanted: platform.clone(),
                available: self
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref())
                    .map(|p| match &p.variant {
                        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                        None => format!("{}/{}", p.os, p.architecture),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// Compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// The compression a layer media type declares.
pub fn layer_compression(media_type: &str) -> Result<Compression, ManifestError> {
    match media_type {
        OCI_LAYER_TAR | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
        OCI_LAYER_GZIP
        | DOCKER_LAYER_GZIP
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
        OCI_LAYER_ZSTD => Ok(Compression::Zstd),
        other => Err(ManifestError::LayerType(other.to_string())),
    }
}

/// Process defaults and metadata from an image config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageConfig {
    /// `os/arch[/variant]`.
    pub platform: String,
    /// Entrypoint (argv prefix).
    pub entrypoint: Vec<String>,
    /// Default arguments.
    pub cmd: Vec<String>,
    /// `KEY=value` environment.
    pub env: Vec<String>,
    /// Working directory (empty: `/`).
    pub workdir: String,
    /// User (`uid`, `uid:gid`, or a name), empty: root.
    pub user: String,
    /// Exposed ports (`80/tcp`).
    pub exposed_ports: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Stop signal name, if set.
    pub stop_signal: Option<String>,
    /// The diff-ids of the layers, bottom first.
    pub diff_ids: Vec<Digest>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    config: Option<RawProcess>,
    rootfs: RawRootfs,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawProcess {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    stop_signal: Option<String>,
}

#[derive(Deserialize)]
struct RawRootfs {
    diff_ids: Vec<Digest>,
}

impl ImageConfig {
    /// Parses an image config blob.
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let raw: RawConfig = serde_json::from_slice(bytes)?;
        let p = raw.config.unwrap_or_default();
        let mut platform = format!("{}/{}", raw.os, raw.architecture);
        if let Some(v) = raw.variant {
            platform.push('/');
            platform.push_str(&v);
        }
        Ok(ImageConfig {
            platform,
            entrypoint: p.entrypoint.unwrap_or_default(),
            cmd: p.cmd.unwrap_or_default(),
            env: p.env.unwrap_or_default(),
            workdir: p.working_dir.unwrap_or_default(),
            user: p.user.unwrap_or_default(),
            exposed_ports: p.exposed_ports.unwrap_or_default().into_keys().collect(),
            labels: p.labels.unwrap_or_default(),
            stop_signal: p.stop_signal,
            diff_ids: raw.rootfs.diff_ids,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_manifest_without_media_type() {
        let d = Digest::of(b"c");
        let json = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{d}","size":1}},"layers":[]}}"#
        );
        assert!(matches!(
            ManifestKind::parse(json.as_bytes(), None).unwrap(),
            ManifestKind::Image(_)
        ));
        let json = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":1}}]}}"#
        );
        assert!(matches!(
            ManifestKind::parse(json.as_bytes(), None).unwrap(),
            ManifestKind::Index(_)
        ));
        let json = r#"{"schemaVersion":1,"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}"#;
        assert!(matches!(
            ManifestKind::parse(json.as_bytes(), None),
            Err(ManifestError::MediaType(_))
        ));
    }

    #[test]
    fn test_select_platform() {
        let entry = |arch: &str, variant: Option<&str>, n: &[u8]| Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: Digest::of(n),
            size: 1,
            platform: Some(PlatformJson {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(Into::into),
            }),
            annotations: BTreeMap::new(),
        };
        let index = Index {
            schema_version: 2,
            media_type: None,
            manifests: vec![entry("arm64", Some("v8"), b"a"), entry("amd64", None, b"b")],
        };
        assert_eq!(
            index.select(&Platform::default()).unwrap().digest,
            Digest::of(b"b")
        );
        assert_eq!(
            index
                .select(&"linux/arm64/v8".parse().unwrap())
                .unwrap()
                .digest,
            Digest::of(b"a")
        );
        let err = index
            .select(&"linux/s390x".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("linux/arm64/v8, linux/amd64"), "{err}");
        assert!("linux".parse::<Platform>().is_err());
    }

    #[test]
    fn test_image_config() {
        let d = Digest::of(b"l");
        let json = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Entrypoint":["/bin/sh"],"Env":["A=b"],"ExposedPorts":{{"80/tcp":{{}}}},"WorkingDir":"/w","User":"1000"}},"rootfs":{{"type":"layers","diff_ids":["{d}"]}}}}"#
        );
        let c = ImageConfig::parse(json.as_bytes()).unwrap();
        assert_eq!(c.entrypoint, ["/bin/sh"]);
        assert_eq!(c.exposed_ports, ["80/tcp"]);
        assert_eq!(
            (c.workdir.as_str(), c.user.as_str(), c.platform.as_str()),
            ("/w", "1000", "linux/amd64")
        );
        assert_eq!(c.diff_ids, [d]);
    }
}
