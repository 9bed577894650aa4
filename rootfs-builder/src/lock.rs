//! Recipes without hand pinning: a step's `packages` (Debian package names) are resolved by
//! the host's apt to their dependency closure, each pinned by version and sha256, in a lock
//! file beside the recipe (`NAME.lock` for `NAME.toml`), like Cargo.lock. `rootfs-builder lock
//! RECIPE` writes or refreshes it; a build reads it (and says how to refresh it when it is
//! missing, stale, or pins a version the archive dropped).
//!
//! Resolution: `apt-get --simulate install` against an empty package database (nothing is
//! installed in a scratch image) with recommends off gives apt's own answer, alternatives
//! and virtual packages included; `apt-cache show NAME=VERSION` gives each .deb's sha256.
//! Nothing is installed or downloaded.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::recipe::Deb;

/// The lock file's format version.
const FORMAT: u32 = 1;

/// Why a lock could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// apt could not be run or refused.
    #[error("{0}")]
    Apt(String),
    /// The lock file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The lock file does not parse.
    #[error("{path}: {message} (refresh it: rootfs-builder lock {recipe})")]
    Parse {
        /// The lock file.
        path: PathBuf,
        /// What is wrong.
        message: String,
        /// The recipe, for the command.
        recipe: String,
    },
    /// The lock is missing or was made for other packages.
    #[error("{0}")]
    Stale(String),
}

/// A lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    /// Format version.
    pub version: u32,
    /// The locked steps, in the recipe's order.
    #[serde(rename = "step", default)]
    pub steps: Vec<LockedStep>,
}

/// One step's resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedStep {
    /// The step's name.
    pub name: String,
    /// The packages the recipe asked for (the lock is stale when they change).
    pub packages: Vec<String>,
    /// Their closure, pinned.
    pub debs: Vec<Deb>,
}

/// Where the lock of the recipe at `recipe` lives.
pub fn lock_path(recipe: &Path) -> PathBuf {
    recipe.with_extension("lock")
}

/// Whether `name` is a Debian package name (and so safe on apt's command line).
pub fn valid_package(name: &str) -> bool {
    name.len() >= 2
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
}

/// Resolves `packages` to their closure on an empty system, pinned by version and sha256.
pub fn resolve(packages: &[String]) -> Result<Vec<Deb>, LockError> {
    if let Some(bad) = packages.iter().find(|p| !valid_package(p)) {
        return Err(LockError::Apt(format!(
            "{bad:?} is not a Debian package name"
        )));
    }
    let out = Command::new("apt-get")
        .args([
            "--simulate",
            "--quiet",
            "--option",
            "Dir::State::status=/dev/null",
            "--option",
            "APT::Install-Recommends=false",
            "--option",
            "APT::Install-Suggests=false",
            "install",
        ])
        .args(packages)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| LockError::Apt(format!("cannot run apt-get (is this a Debian host?): {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(LockError::Apt(format!(
            "apt-get cannot resolve {}: {} (run apt-get update? is each name a package of this host's archive?)",
            packages.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut pins = parse_simulation(&text);
    if pins.is_empty() {
        return Err(LockError::Apt(format!(
            "apt-get resolved {} to nothing",
            packages.join(" ")
        )));
    }
    pins.sort();
    let specs: Vec<String> = pins.iter().map(|(p, v)| format!("{p}={v}")).collect();
    let out = Command::new("apt-cache")
        .arg("show")
        .args(&specs)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| LockError::Apt(format!("cannot run apt-cache: {e}")))?;
    if !out.status.success() {
        return Err(LockError::Apt(format!(
            "apt-cache show failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let shas = parse_show(&String::from_utf8_lossy(&out.stdout));
    pins.into_iter()
        .map(|(package, version)| {
            let sha256 = shas
                .iter()
                .find(|(p, v, _)| *p == package && *v == version)
                .map(|(_, _, s)| s.clone())
                .ok_or_else(|| {
                    LockError::Apt(format!("apt-cache show {package}={version} gave no SHA256"))
                })?;
            Ok(Deb {
                package,
                version,
                sha256,
            })
        })
        .collect()
}

/// `(package, version)` of each `Inst` line of `apt-get --simulate install`.
fn parse_simulation(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|rest| {
            let (name, after) = rest.split_once(" (")?;
            let version = after.split_whitespace().next()?;
            // `Inst pkg [old] (new ...)` would be an upgrade: not on an empty system.
            (!name.contains(' ')).then(|| (name.to_string(), version.to_string()))
        })
        .collect()
}

/// `(package, version, sha256)` of each stanza of `apt-cache show`.
fn parse_show(text: &str) -> Vec<(String, String, String)> {
    let mut all = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(": ")))
                .map(str::trim)
                .map(String::from)
        };
        if let (Some(p), Some(v), Some(s)) = (field("Package"), field("Version"), field("SHA256")) {
            all.push((p, v, s));
        }
    }
    all
}

/// Reads the lock of `recipe` (`None` when there is none).
pub fn read(recipe: &Path) -> Result<Option<LockFile>, LockError> {
    let path = lock_path(recipe);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LockError::Io { path, source }),
    };
    let lock: LockFile = toml::from_str(&text).map_err(|e| LockError::Parse {
        path: path.clone(),
        message: e.message().to_string(),
        recipe: recipe.display().to_string(),
    })?;
    if lock.version != FORMAT {
        return Err(LockError::Parse {
            path,
            message: format!(
                "format version {} (this rootfs-builder reads {FORMAT})",
                lock.version
            ),
            recipe: recipe.display().to_string(),
        });
    }
    Ok(Some(lock))
}

/// Resolves every step of `steps` (`(name, packages)`) and writes the lock of `recipe`
/// (atomically); returns it.
pub fn write(recipe: &Path, steps: &[(String, Vec<String>)]) -> Result<LockFile, LockError> {
    let mut lock = LockFile {
        version: FORMAT,
        steps: Vec::new(),
    };
    for (name, packages) in steps {
        lock.steps.push(LockedStep {
            name: name.clone(),
            packages: packages.clone(),
            debs: resolve(packages)?,
        });
    }
    let path = lock_path(recipe);
    let text = format!(
        "# Written by `rootfs-builder lock {}`: each step's packages and their dependency\n\
         # closure, pinned by version and sha256. Do not edit; run the command again to refresh.\n\n{}",
        recipe.file_name().unwrap_or_default().to_string_lossy(),
        toml::to_string(&lock).map_err(|e| LockError::Apt(e.to_string()))?
    );
    let tmp = path.with_extension("lock.part");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| LockError::Io {
            path: path.clone(),
            source,
        })?;
    Ok(lock)
}

/// The pinned debs of step `name` asking for `packages`, from `lock`; an error that says how
/// to refresh the lock when it has none or was made for other packages.
pub fn debs_for(
    lock: Option<&LockFile>,
    recipe: &Path,
    name: &str,
    packages: &[String],
) -> Result<Vec<Deb>, LockError> {
    let how = format!("run: rootfs-builder lock {}", recipe.display());
    let Some(lock) = lock else {
        return Err(LockError::Stale(format!(
            "step {name:?} names packages but {} does not exist: {how}",
            lock_path(recipe).display()
        )));
    };
    match lock.steps.iter().find(|s| s.name == name) {
        Some(s) if s.packages == packages => Ok(s.debs.clone()),
        Some(_) => Err(LockError::Stale(format!(
            "step {name:?} asks for other packages than {} was made for: {how}",
            lock_path(recipe).display()
        ))),
        None => Err(LockError::Stale(format!(
            "{} has no step {name:?}: {how}",
            lock_path(recipe).display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_simulation_and_show_are_parsed() {
        let sim = "Reading package lists...\n\
            Inst gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64])\n\
            Conf gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64])\n\
            Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []\n";
        assert_eq!(
            parse_simulation(sim),
            [
                ("gcc-12-base".to_string(), "12.2.0-14+deb12u1".to_string()),
                ("libc6".to_string(), "2.36-9+deb12u14".to_string())
            ]
        );
        let show =
            "Package: libc6\nVersion: 2.36-9+deb12u14\nSHA256: abc\n\nPackage: x\nVersion: 1\n";
        assert_eq!(
            parse_show(show),
            [("libc6".into(), "2.36-9+deb12u14".into(), "abc".into())]
        );
    }

    #[test]
    fn test_package_names() {
        assert!(valid_package("python3"));
        assert!(valid_package("libstdc++6"));
        assert!(!valid_package("-o"));
        assert!(!valid_package("a b"));
        assert!(!valid_package("Python"));
    }

    #[test]
    fn test_stale_locks_say_how_to_refresh() {
        let recipe = Path::new("/r/py.toml");
        let lock = LockFile {
            version: FORMAT,
            steps: vec![LockedStep {
                name: "debian".into(),
                packages: vec!["python3".into()],
                debs: vec![],
            }],
        };
        let e = debs_for(None, recipe, "debian", &["python3".into()]).unwrap_err();
        assert!(
            e.to_string()
                .contains("/r/py.lock does not exist: run: rootfs-builder lock /r/py.toml"),
            "{e}"
        );
        let e = debs_for(Some(&lock), recipe, "debian", &["git".into()]).unwrap_err();
        assert!(e.to_string().contains("other packages"), "{e}");
        assert!(debs_for(Some(&lock), recipe, "debian", &["python3".into()]).is_ok());
    }
}
