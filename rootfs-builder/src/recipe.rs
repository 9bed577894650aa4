//! Recipes: TOML files that describe an image as a base plus steps, one layer per step.
//!
//! ```toml
//! # The image's process defaults.
//! [image]
//! base = "scratch"                 # or "oci-layout:DIR", or a reference like "debian@sha256:..."
//! env = ["PATH=/bin"]
//! entrypoint = ["/bin/sh"]
//! cmd = []
//! user = "0:0"
//! workdir = "/"
//! labels = { "org.opencontainers.image.title" = "minimal" }
//!
//! # One step = one layer. A step may combine the kinds below; within a step, debs are
//! # unpacked first, then dirs, files and symlinks are applied in that order.
//! [[step]]
//! name = "busybox"
//! debs = [{ package = "busybox-static", version = "1:1.35.0-4+deb12u1+b1", sha256 = "3d3f..." }]
//! dirs = [{ path = "/tmp", mode = "1777" }]
//! files = [{ src = "motd", dest = "/etc/motd", mode = "0644", owner = "0:0" }]
//! symlinks = [{ path = "/bin/sh", target = "busybox" }]
//!
//! # Files taken from a pinned npm package (fetched with `npm pack`, checked against the
//! # integrity hash that `npm view PKG@VERSION dist.integrity` prints).
//! [[step]]
//! name = "opencode"
//! npm = [{ package = "opencode-linux-x64", version = "1.18.33", integrity = "sha512-...",
//!          files = [{ src = "bin/opencode", dest = "/usr/local/bin/opencode", mode = "0755" }] }]
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a recipe was refused. Messages name the file and, for TOML errors, the line.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read recipe {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: step {step}: {message}")]
    Invalid {
        path: PathBuf,
        step: String,
        message: String,
    },
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
}

/// A parsed, validated recipe.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Image-wide settings.
    pub image: ImageSection,
    /// The steps, bottom layer first.
    #[serde(default, rename = "step")]
    pub steps: Vec<Step>,
    /// The directory `files` are read from (the recipe's own directory).
    #[serde(skip)]
    pub dir: PathBuf,
}

/// The `[image]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    /// `scratch`; `oci-layout:DIR`, the single image of an OCI layout (relative to the recipe's
    /// directory); or an image reference pulled from its registry (best with a digest, for
    /// reproducibility). The base's layers go below the steps' and its process defaults are
    /// extended (env, labels) or replaced (the others, when set) by the recipe's.
    #[serde(default = "scratch")]
    pub base: String,
    /// `KEY=value` environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Entrypoint.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Default command.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `uid[:gid]` or a name.
    #[serde(default)]
    pub user: String,
    /// Working directory.
    #[serde(default)]
    pub workdir: String,
    /// Labels.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

fn scratch() -> String {
    "scratch".into()
}

/// One step: one layer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Name shown in progress output.
    pub name: String,
    /// Debian packages by name: their dependency closure is pinned in the recipe's lock file
    /// (`rootfs-builder lock RECIPE`) and unpacked like `debs`.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Debian packages whose files are unpacked (maintainer scripts are not run).
    #[serde(default)]
    pub debs: Vec<Deb>,
    /// Directories to create.
    #[serde(default)]
    pub dirs: Vec<DirEntry>,
    /// Files copied from the recipe's directory.
    #[serde(default)]
    pub files: Vec<FileEntry>,
    /// Symlinks.
    #[serde(default)]
    pub symlinks: Vec<SymlinkEntry>,
    /// Files from npm packages.
    #[serde(default)]
    pub npm: Vec<NpmPackage>,
    /// Paths left out of this step's Debian packages (with everything below them), e.g.
    /// `/usr/share/doc`.
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// A pinned npm package and the files to take from it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NpmPackage {
    /// Package name.
    pub package: String,
    /// Exact version.
    pub version: String,
    /// Subresource integrity of the tarball (`sha512-<base64>`).
    pub integrity: String,
    /// Files to take, by path inside the package (without the tarball's `package/` prefix);
    /// a path ending in `/` takes every regular file below it (`""`-relative: `/` is the
    /// whole package), executable ones 0755, the others 0644.
    pub files: Vec<NpmFile>,
}

/// One file taken from an npm package.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NpmFile {
    /// Path inside the package.
    pub src: String,
    /// Absolute path in the image.
    pub dest: String,
    /// Octal mode, default 0644.
    #[serde(default = "file_mode")]
    pub mode: String,
}

/// A pinned Debian package.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Deb {
    /// Package name.
    pub package: String,
    /// Exact version (as `apt-cache policy` shows it).
    pub version: String,
    /// sha256 of the .deb (as `apt-cache show` shows it); the download must match.
    pub sha256: String,
}

/// A directory.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirEntry {
    /// Absolute path in the image.
    pub path: String,
    /// Octal mode, default 0755.
    #[serde(default = "dir_mode")]
    pub mode: String,
    /// `uid:gid`, default 0:0.
    #[serde(default = "root_owner")]
    pub owner: String,
}

/// A file copied from the recipe's directory.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the recipe's directory.
    pub src: String,
    /// Absolute path in the image.
    pub dest: String,
    /// Octal mode, default 0644.
    #[serde(default = "file_mode")]
    pub mode: String,
    /// `uid:gid`, default 0:0.
    #[serde(default = "root_owner")]
    pub owner: String,
}

/// A symlink.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SymlinkEntry {
    /// Absolute path in the image.
    pub path: String,
    /// Link target, as is.
    pub target: String,
}

fn dir_mode() -> String {
    "0755".into()
}
fn file_mode() -> String {
    "0644".into()
}
fn root_owner() -> String {
    "0:0".into()
}

/// Parses an octal mode (`0644`, `4755`, `1777`).
pub fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("mode {s:?} is not an octal mode like 0644"))
}

/// Parses `uid:gid`.
pub fn parse_owner(s: &str) -> Result<(u64, u64), String> {
    let (u, g) = s
        .split_once(':')
        .ok_or_else(|| format!("owner {s:?} is not uid:gid"))?;
    match (u.parse(), g.parse()) {
        (Ok(u), Ok(g)) => Ok((u, g)),
        _ => Err(format!("owner {s:?} is not numeric uid:gid")),
    }
}

/// Checks an image path: absolute, no `..`, not `/` itself.
pub fn check_image_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p == "/" || p.split('/').any(|c| c == "..") {
        return Err(format!(
            "path {p:?} must be absolute, below / and free of `..`"
        ));
    }
    Ok(())
}

impl Recipe {
    /// Reads and validates a recipe file.
    pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
            path: path.into(),
            source,
        })?;
        let mut recipe = Recipe::parse(&text, path)?;
        recipe.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        // Steps that name packages get their pinned closure from the lock file.
        if recipe.steps.iter().any(|s| !s.packages.is_empty()) {
            let lock = crate::lock::read(path)?;
            for step in &mut recipe.steps {
                if !step.packages.is_empty() {
                    let debs =
                        crate::lock::debs_for(lock.as_ref(), path, &step.name, &step.packages)?;
                    step.debs.extend(debs);
                }
            }
        }
        Ok(recipe)
    }

    /// The steps that name packages, as `(name, packages)`: what a lock resolves.
    pub fn package_steps(&self) -> Vec<(String, Vec<String>)> {
        self.steps
            .iter()
            .filter(|s| !s.packages.is_empty())
            .map(|s| (s.name.clone(), s.packages.clone()))
            .collect()
    }

    /// Parses and validates recipe text; `path` is only for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Recipe, RecipeError> {
        // toml's messages carry the line and column and quote the offending line.
        let recipe: Recipe = toml::from_str(text).map_err(|e| RecipeError::Parse {
            path: path.into(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |step: &str, message: String| RecipeError::Invalid {
            path: path.into(),
            step: step.into(),
            message,
        };
        let base = recipe.image.base.as_str();
        if base != "scratch" && !base.starts_with("oci-layout:") {
            if let Err(e) = base.parse::<agentd_images::Reference>() {
                return Err(RecipeError::Parse {
                    path: path.into(),
                    message: format!("base {base:?} is not \"scratch\", \"oci-layout:DIR\" or an image reference: {e}"),
                });
            }
        }
        if recipe.steps.is_empty() {
            return Err(RecipeError::Parse {
                path: path.into(),
                message: "a recipe needs at least one [[step]]".into(),
            });
        }
        let mut names = std::collections::BTreeSet::new();
        for step in &recipe.steps {
            let name = step.name.as_str();
            if name.is_empty() || !names.insert(name) {
                return Err(invalid(
                    name,
                    "every step needs a unique, non-empty name".into(),
                ));
            }
            for pkg in &step.npm {
                let spec = format!("{}@{}", pkg.package, pkg.version);
                if pkg.package.is_empty() || pkg.version.is_empty() || pkg.package.contains(' ') {
                    return Err(invalid(
                        name,
                        format!("npm {spec:?}: give a package name and an exact version"),
                    ));
                }
                if !pkg.integrity.starts_with("sha512-") {
                    return Err(invalid(
                        name,
                        format!("npm {spec}: integrity must be sha512-<base64> (npm view {spec} dist.integrity)"),
                    ));
                }
                if pkg.files.is_empty() {
                    return Err(invalid(
                        name,
                        format!("npm {spec}: say which files to take"),
                    ));
                }
                for f in &pkg.files {
                    check_image_path(&f.dest)
                        .and(parse_mode(&f.mode).map(drop))
                        .map_err(|m| invalid(name, m))?;
                }
            }
            if let Some(bad) = step
                .packages
                .iter()
                .find(|p| !crate::lock::valid_package(p))
            {
                return Err(invalid(
                    name,
                    format!("package {bad:?} is not a Debian package name"),
                ));
            }
            if step.debs.is_empty()
                && step.packages.is_empty()
                && step.dirs.is_empty()
                && step.files.is_empty()
                && step.symlinks.is_empty()
                && step.npm.is_empty()
            {
                return Err(invalid(name, "the step adds nothing".into()));
            }
            for p in &step.exclude {
                check_image_path(p).map_err(|m| invalid(name, m))?;
            }
            for deb in &step.debs {
                let ok =
                    deb.sha256.len() == 64 && deb.sha256.bytes().all(|b| b.is_ascii_hexdigit());
                if !ok {
                    return Err(invalid(
                        name,
                        format!("deb {}: sha256 must be 64 hex digits", deb.package),
                    ));
                }
                if deb.package.is_empty()
                    || deb.version.is_empty()
                    || deb.package.contains(['=', ' ', '/'])
                {
                    return Err(invalid(
                        name,
                        format!(
                            "deb {:?}: give a package name and an exact version",
                            deb.package
                        ),
                    ));
                }
            }
            for d in &step.dirs {
                check_image_path(&d.path)
                    .and(parse_mode(&d.mode).map(drop))
                    .and(parse_owner(&d.owner).map(drop))
                    .map_err(|m| invalid(name, m))?;
            }
            for f in &step.files {
                check_image_path(&f.dest)
                    .and(parse_mode(&f.mode).map(drop))
                    .and(parse_owner(&f.owner).map(drop))
                    .map_err(|m| invalid(name, m))?;
                if f.src.starts_with('/') || f.src.split('/').any(|c| c == "..") {
                    return Err(invalid(
                        name,
                        format!(
                            "file src {:?} must be relative to the recipe's directory",
                            f.src
                        ),
                    ));
                }
            }
            for l in &step.symlinks {
                check_image_path(&l.path).map_err(|m| invalid(name, m))?;
                if l.target.is_empty() {
                    return Err(invalid(name, format!("symlink {} has no target", l.path)));
                }
            }
        }
        Ok(recipe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_err(text: &str, expected: &str) {
        let err = Recipe::parse(text, Path::new("r.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(expected),
            "{err:?} does not contain {expected:?}"
        );
    }

    const STEP: &str = "[[step]]\nname = \"s\"\ndirs = [{ path = \"/x\" }]\n";

    #[test]
    fn test_valid_recipe() {
        let r = Recipe::parse(
            &format!("[image]\nentrypoint = [\"/bin/sh\"]\n{STEP}"),
            Path::new("r.toml"),
        )
        .unwrap();
        assert_eq!(r.steps.len(), 1);
        assert_eq!(r.steps[0].dirs[0].mode, "0755");
    }

    #[test]
    fn test_errors_name_the_line_and_the_problem() {
        check_err("[image]\nentrypoint = \"/bin/sh\"\n", "line 2");
        check_err(
            &format!("[image]\nbogus = 1\n{STEP}"),
            "unknown field `bogus`",
        );
        check_err("[image]\n", "at least one [[step]]");
        check_err(
            &format!("[image]\nbase = \"Debian Bookworm\"\n{STEP}"),
            "is not \"scratch\"",
        );
        check_err(
            "[image]\n[[step]]\nname = \"s\"\ndirs = [{ path = \"rel\" }]\n",
            "step s: path \"rel\" must be absolute",
        );
        check_err(
            "[image]\n[[step]]\nname = \"s\"\ndirs = [{ path = \"/x\", mode = \"999\" }]\n",
            "not an octal mode",
        );
        check_err("[image]\n[[step]]\nname = \"s\"\nfiles = [{ src = \"../etc/passwd\", dest = \"/p\" }]\n", "relative to the recipe");
        check_err("[image]\n[[step]]\nname = \"s\"\n", "adds nothing");
        check_err(
            "[image]\n[[step]]\nname = \"s\"\ndebs = [{ package = \"x\", version = \"1\", sha256 = \"ab\" }]\n",
            "64 hex digits",
        );
        check_err(&format!("[image]\n{STEP}{STEP}"), "unique");
    }
}
