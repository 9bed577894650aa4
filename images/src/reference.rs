//! Image references as users write them: `debian`, `debian:bookworm`, `ghcr.io/org/x@sha256:...`,
//! `localhost:5000/x:tag`, with Docker Hub's defaults (`docker.io`, `library/`, `latest`).

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

/// The registry a reference without a registry part points at.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag a reference without a tag or digest means.
pub const DEFAULT_TAG: &str = "latest";

/// Why a reference was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("empty image reference")]
    Empty,
    #[error("invalid image reference {reference:?}: {why}")]
    Invalid {
        reference: String,
        why: &'static str,
    },
    #[error("invalid digest in image reference {reference:?}")]
    Digest {
        reference: String,
        #[source]
        source: DigestError,
    },
}

/// A parsed, normalised image reference.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host (and port), e.g. `docker.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path inside the registry, e.g. `library/debian`.
    pub repository: String,
    /// Tag, if one was given (or the default tag when no digest was given either).
    pub tag: Option<String>,
    /// Digest, if one was given; it pins the content whatever the tag says.
    pub digest: Option<Digest>,
}

impl Reference {
    /// The name without tag or digest: `docker.io/library/debian`.
    pub fn repository_name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// True if the registry is on this host (`localhost`, 127.0.0.0/8 or `[::1]`), where plain
    /// HTTP is allowed without `--insecure`.
    pub fn is_loopback(&self) -> bool {
        let host = host_of(&self.registry);
        host == "localhost"
            || host == "::1"
            || host
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// The host part of `host[:port]` or `[v6]:port`.
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, ReferenceError> {
        let invalid = |why| ReferenceError::Invalid {
            reference: s.to_string(),
            why,
        };
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (name, digest) = match s.split_once('@') {
            Some((name, digest)) => {
                let digest = digest.parse().map_err(|source| ReferenceError::Digest {
                    reference: s.to_string(),
                    source,
                })?;
                (name, Some(digest))
            }
            None => (s, None),
        };
        // A tag follows the last ':' that comes after the last '/' (a ':' before it is a port).
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
            None => (name, None),
        };
        if let Some(tag) = tag {
            let valid = !tag.is_empty()
                && tag.len() <= 128
                && tag.bytes().enumerate().all(|(i, b)| {
                    b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-'))
                });
            if !valid {
                return Err(invalid("a tag is 1-128 letters, digits, '_', '.' or '-' and does not start with '.' or '-'"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':']) || first == "localhost" || first.starts_with('[') =>
            {
                (first.to_string(), rest.to_string())
            }
            Some(_) => (DEFAULT_REGISTRY.to_string(), name.to_string()),
            None => (DEFAULT_REGISTRY.to_string(), format!("library/{name}")),
        };
        if registry == "index.docker.io" || registry == "registry-1.docker.io" {
            return Self::from_str(&s.replacen(&registry, DEFAULT_REGISTRY, 1));
        }
        if registry.is_empty()
            || !registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        {
            return Err(invalid("bad registry host"));
        }
        for component in repository.split('/') {
            let valid = !component.is_empty()
                && component
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && component.as_bytes()[0].is_ascii_alphanumeric()
                && component.as_bytes()[component.len() - 1].is_ascii_alphanumeric();
            if !valid {
                return Err(invalid(
                    "repository path components are lowercase letters and digits, separated by '.', '_' or '-'",
                ));
            }
        }
        if repository.len() > 255 {
            return Err(invalid("repository name longer than 255 characters"));
        }
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_string()),
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(input: &str, expected: &str) {
        let parsed: Reference = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(parsed.to_string(), expected);
    }

    #[track_caller]
    fn check_err(input: &str) {
        assert!(input.parse::<Reference>().is_err(), "{input} was accepted");
    }

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn test_docker_hub_defaults() {
        check("debian", "docker.io/library/debian:latest");
        check("debian:bookworm", "docker.io/library/debian:bookworm");
        check("org/x", "docker.io/org/x:latest");
        check(
            "index.docker.io/library/debian:12",
            "docker.io/library/debian:12",
        );
    }

    #[test]
    fn test_registries_ports_and_digests() {
        check("localhost:5000/x:tag", "localhost:5000/x:tag");
        check("localhost/x", "localhost/x:latest");
        check("127.0.0.1:5000/a/b/c", "127.0.0.1:5000/a/b/c:latest");
        check(&format!("ghcr.io/org/x@{D}"), &format!("ghcr.io/org/x@{D}"));
        check(
            &format!("ghcr.io/org/x:1.0@{D}"),
            &format!("ghcr.io/org/x:1.0@{D}"),
        );
        check("[::1]:5000/x:v1", "[::1]:5000/x:v1");
    }

    #[test]
    fn test_invalid_references() {
        check_err("");
        check_err("Debian");
        check_err("debian:");
        check_err("debian:-x");
        check_err("a//b");
        check_err("x@sha256:short");
        check_err("x@md5:abcd");
        check_err("reg.io/../x");
        check_err("x y");
    }

    #[test]
    fn test_loopback() {
        for (r, lo) in [
            ("localhost:5000/x", true),
            ("127.0.0.2:1/x", true),
            ("[::1]:5/x", true),
            ("ghcr.io/x", false),
            ("debian", false),
        ] {
            assert_eq!(r.parse::<Reference>().unwrap().is_loopback(), lo, "{r}");
        }
    }
}
