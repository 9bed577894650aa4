//! Building: each step becomes a layer (or comes from the cache when it and everything below
//! it are unchanged), then the config, manifest and index are written as an OCI image layout,
//! a tar of one, or straight into agentd's image store.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use agentd_images::config::{self as oci, Descriptor, Index, Manifest};
use agentd_images::Digest;
use serde::{Deserialize, Serialize};

use crate::layer::{Entry, Kind, Layer};
use crate::recipe::{parse_mode, parse_owner, Recipe, Step};

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("step {step}: {message}")]
    Step { step: String, message: String },
    #[error("cannot add the image to the store")]
    Store(#[from] agentd_images::LayoutError),
    #[error("cannot unpack the image in the store")]
    Unpack(#[from] agentd_images::StoreError),
}

type Result<T> = std::result::Result<T, BuildError>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BuildError + 'a {
    move |source| BuildError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Layer and package cache.
    pub cache_dir: PathBuf,
    /// Every mtime in the image, and the config's `created` (from `SOURCE_DATE_EPOCH`).
    pub epoch: u64,
}

/// One built (or cached) layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuiltLayer {
    /// Step name.
    pub step: String,
    /// Blob digest.
    pub digest: Digest,
    /// Uncompressed digest.
    pub diff_id: Digest,
    /// Blob size.
    pub size: u64,
    /// Media type (gzip for built layers; a base's layers keep theirs).
    #[serde(default = "gzip_layer")]
    pub media_type: String,
    /// Came from the cache.
    #[serde(skip)]
    pub cached: bool,
}

/// A built image: its blobs are in the cache.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// Layers, bottom first.
    pub layers: Vec<BuiltLayer>,
    /// Config blob digest and size.
    pub config: (Digest, u64),
    /// Manifest bytes (its digest names the image).
    pub manifest: Vec<u8>,
}

impl BuiltImage {
    /// The manifest digest.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.manifest)
    }
}

struct Cache {
    dir: PathBuf,
}

impl Cache {
    fn open(dir: &Path) -> Result<Cache> {
        for sub in ["blobs/sha256", "steps", "debs"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err("cannot create", &p))?;
        }
        Ok(Cache {
            dir: dir.to_path_buf(),
        })
    }

    fn blob(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    fn put(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        let path = self.blob(&digest);
        if !path.exists() {
            write_atomic(&path, bytes)?;
        }
        Ok(digest)
    }
}

/// The image store's atomic write (temp file, fsync, rename, fsync the dir).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(agentd_images::store::write_atomic(path, bytes)?)
}

/// Progress of a build, one event per step.
pub enum BuildEvent<'a> {
    /// A step's layer was taken from the cache.
    Cached { step: &'a str, digest: &'a Digest },
    /// A step's layer was built.
    Built {
        step: &'a str,
        digest: &'a Digest,
        entries: usize,
        size: u64,
        seconds: f64,
    },
}

/// Builds the recipe's layers and its config and manifest (all into the cache).
pub fn build(
    recipe: &Recipe,
    options: &BuildOptions,
    progress: &mut dyn FnMut(BuildEvent<'_>),
) -> Result<BuiltImage> {
    let cache = Cache::open(&options.cache_dir)?;
    let mut layers: Vec<BuiltLayer> = Vec::new();
    // Each step's cache key covers the step, its inputs and every step below it.
    let mut key_chain = format!("epoch={}", options.epoch);
    let base = match (
        recipe.image.base.as_str(),
        recipe.image.base.strip_prefix("oci-layout:"),
    ) {
        ("scratch", _) => None,
        (_, Some(dir)) => Some(load_base(
            &cache,
            BaseSource::Layout(&recipe.dir.join(dir)),
        )?),
        (reference, None) => Some(load_base(&cache, BaseSource::Registry(reference))?),
    };
    if let Some((record, _)) = &base {
        key_chain.push_str(&format!("\nbase={}", record.manifest));
        for l in &record.layers {
            layers.push(BuiltLayer {
                step: "base".into(),
                digest: l.digest.clone(),
                diff_id: l.diff_id.clone(),
                size: l.size,
                media_type: l.media_type.clone(),
                cached: true,
            });
        }
    }
    for step in &recipe.steps {
        let step_err = |message: String| BuildError::Step {
            step: step.name.clone(),
            message,
        };
        key_chain.push('\n');
        key_chain.push_str(&serde_json::to_string(step).expect("steps serialise"));
        // The step's input files, read once: their digests go into the key, their bytes into
        // the layer if it has to be built.
        let mut inputs = Vec::with_capacity(step.files.len());
        for f in &step.files {
            let src = recipe.dir.join(&f.src);
            let bytes = fs::read(&src)
                .map_err(|e| step_err(format!("cannot read {}: {e}", src.display())))?;
            key_chain.push_str(&format!("\n{}={}", f.src, Digest::of(&bytes)));
            inputs.push(bytes);
        }
        let key = Digest::of(key_chain.as_bytes());
        let record = cache.dir.join("steps").join(format!("{}.json", key.hex()));
        if let Ok(bytes) = fs::read(&record) {
            if let Ok(mut layer) = serde_json::from_slice::<BuiltLayer>(&bytes) {
                if cache.blob(&layer.digest).exists() {
                    layer.cached = true;
                    progress(BuildEvent::Cached {
                        step: &step.name,
                        digest: &layer.digest,
                    });
                    layers.push(layer);
                    continue;
                }
            }
        }
        let started = Instant::now();
        let layer = build_step(step, inputs, &cache)?;
        let blob = layer
            .finish(options.epoch)
            .map_err(|e| step_err(format!("cannot write the layer: {e}")))?;
        cache.put(&blob.bytes)?;
        let built = BuiltLayer {
            step: step.name.clone(),
            media_type: gzip_layer(),
            digest: blob.digest,
            diff_id: blob.diff_id,
            size: blob.bytes.len() as u64,
            cached: false,
        };
        write_atomic(&record, &serde_json::to_vec(&built).expect("serialises"))?;
        progress(BuildEvent::Built {
            step: &step.name,
            digest: &built.digest,
            entries: layer.len(),
            size: built.size,
            seconds: started.elapsed().as_secs_f64(),
        });
        layers.push(built);
    }
    let config = config_json(recipe, base.as_ref().map(|b| &b.1), options.epoch, &layers);
    let config_digest = cache.put(&config)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(oci::OCI_MANIFEST.into()),
        config: descriptor(oci::OCI_CONFIG, config_digest.clone(), config.len() as u64),
        layers: layers
            .iter()
            .map(|l| descriptor(&l.media_type, l.digest.clone(), l.size))
            .collect(),
    };
    let manifest = serde_json::to_vec(&manifest).expect("manifests serialise");
    cache.put(&manifest)?;
    Ok(BuiltImage {
        layers,
        config: (config_digest, config.len() as u64),
        manifest,
    })
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

fn gzip_layer() -> String {
    oci::OCI_LAYER_GZIP.into()
}

/// Where a recipe's base image comes from.
enum BaseSource<'a> {
    Layout(&'a Path),
    Registry(&'a str),
}

/// Imports (or pulls) the base image into a store in the cache and copies its blobs into the
/// cache's blob dir (verified on the way in).
fn load_base(
    cache: &Cache,
    source: BaseSource<'_>,
) -> Result<(agentd_images::ImageRecord, agentd_images::ImageConfig)> {
    let base_err = |message: String| BuildError::Step {
        step: "base".into(),
        message,
    };
    let store = agentd_images::Store::open(cache.dir.join("base-store"))?;
    let record = match source {
        BaseSource::Layout(dir) => {
            let mut records = agentd_images::layout::import(
                &store,
                dir,
                None,
                &agentd_images::Platform::default(),
            )?;
            if records.len() != 1 {
                return Err(base_err(format!(
                    "{} holds {} images; a base layout must hold one",
                    dir.display(),
                    records.len()
                )));
            }
            records.remove(0)
        }
        BaseSource::Registry(reference) => {
            let reference: agentd_images::Reference =
                reference.parse().map_err(|e| base_err(format!("{e}")))?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| base_err(format!("cannot start the async runtime: {e}")))?;
            let options = agentd_images::PullOptions {
                unpack: None,
                ..Default::default()
            };
            let pulled = runtime.block_on(agentd_images::registry::pull(
                &store,
                &reference,
                &options,
                std::sync::Arc::new(agentd_images::NoProgress),
            ));
            pulled.map_err(|e| base_err(format!("cannot pull {reference}: {}", error_chain(&e))))?
        }
    };
    let mut blobs = vec![record.config.clone()];
    blobs.extend(record.layers.iter().map(|l| l.digest.clone()));
    for digest in blobs {
        let target = cache.blob(&digest);
        if !target.exists() {
            let source = store.blob_path(&digest);
            fs::copy(&source, &target).map_err(io_err("cannot copy", &source))?;
        }
    }
    let config = store.image_config(&record)?;
    Ok((record, config))
}

fn descriptor(media_type: &str, digest: Digest, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest,
        size,
        platform: None,
        annotations: Default::default(),
    }
}

/// Builds a step's layer; `inputs` are the contents of its `files`, in order.
fn build_step(step: &Step, inputs: Vec<Vec<u8>>, cache: &Cache) -> Result<Layer> {
    let step_err = |message: String| BuildError::Step {
        step: step.name.clone(),
        message,
    };
    let mut layer = Layer::default();
    prefetch_debs(cache, &step.debs).map_err(step_err)?;
    for deb in &step.debs {
        let bytes = fetch_deb(cache, deb).map_err(step_err)?;
        layer
            .add_deb(&bytes, &step.exclude)
            .map_err(|e| step_err(format!("cannot unpack {}: {e}", deb.package)))?;
    }
    for d in &step.dirs {
        let (uid, gid) = parse_owner(&d.owner).map_err(step_err)?;
        layer.add(
            &d.path,
            Entry {
                kind: Kind::Dir,
                mode: parse_mode(&d.mode).map_err(step_err)?,
                uid,
                gid,
            },
        );
    }
    for (f, bytes) in step.files.iter().zip(inputs) {
        let (uid, gid) = parse_owner(&f.owner).map_err(step_err)?;
        layer.add(
            &f.dest,
            Entry {
                kind: Kind::File(bytes),
                mode: parse_mode(&f.mode).map_err(step_err)?,
                uid,
                gid,
            },
        );
    }
    for l in &step.symlinks {
        layer.add(
            &l.path,
            Entry {
                kind: Kind::Symlink(l.target.clone()),
                mode: 0o777,
                uid: 0,
                gid: 0,
            },
        );
    }
    for pkg in &step.npm {
        let tgz = fetch_npm(cache, pkg).map_err(step_err)?;
        // A `src` ending in `/` takes the whole directory (every regular file below it).
        let (dirs, files): (Vec<_>, Vec<_>) = pkg.files.iter().partition(|f| f.src.ends_with('/'));
        let mut wanted: std::collections::BTreeMap<String, &crate::recipe::NpmFile> = files
            .into_iter()
            .map(|f| (format!("package/{}", f.src.trim_start_matches('/')), f))
            .collect();
        let dirs: Vec<(String, &crate::recipe::NpmFile)> = dirs
            .into_iter()
            .map(|f| (format!("package/{}", f.src.trim_start_matches('/')), f))
            .collect();
        let mut dir_files = vec![0usize; dirs.len()];
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(tgz.as_slice()));
        let read_err =
            |e: io::Error| step_err(format!("cannot read the {} tarball: {e}", pkg.package));
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            let path = entry
                .path()
                .map_err(read_err)?
                .to_string_lossy()
                .into_owned();
            let from_dir = dirs
                .iter()
                .enumerate()
                .find_map(|(i, (prefix, f))| Some((i, path.strip_prefix(prefix.as_str())?, *f)));
            if let Some((i, rest, dir)) = from_dir {
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                if rest
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == "..")
                {
                    return Err(step_err(format!(
                        "{}@{}: refusing the path {path:?}",
                        pkg.package, pkg.version
                    )));
                }
                let exec = entry.header().mode().map_err(read_err)? & 0o111 != 0;
                let mut bytes = Vec::new();
                io::Read::read_to_end(&mut entry, &mut bytes).map_err(read_err)?;
                layer.add(
                    &format!("{}/{rest}", dir.dest.trim_end_matches('/')),
                    Entry {
                        kind: Kind::File(bytes),
                        mode: if exec { 0o755 } else { 0o644 },
                        uid: 0,
                        gid: 0,
                    },
                );
                dir_files[i] += 1;
            } else if let Some(file) = wanted.remove(&path) {
                let mut bytes = Vec::new();
                io::Read::read_to_end(&mut entry, &mut bytes).map_err(read_err)?;
                let mode = parse_mode(&file.mode).map_err(step_err)?;
                layer.add(
                    &file.dest,
                    Entry {
                        kind: Kind::File(bytes),
                        mode,
                        uid: 0,
                        gid: 0,
                    },
                );
            }
        }
        if let Some(missing) = wanted.keys().next() {
            return Err(step_err(format!(
                "{}@{} has no {missing}",
                pkg.package, pkg.version
            )));
        }
        if let Some(((missing, _), _)) = dirs.iter().zip(&dir_files).find(|(_, n)| **n == 0) {
            return Err(step_err(format!(
                "{}@{} has no files in {missing}",
                pkg.package, pkg.version
            )));
        }
    }
    Ok(layer)
}

/// The tarball of a pinned npm package: from the cache, else fetched with `npm pack` (from the
/// registry npm is configured with), checked against the recipe's sha512 integrity.
fn fetch_npm(
    cache: &Cache,
    pkg: &crate::recipe::NpmPackage,
) -> std::result::Result<Vec<u8>, String> {
    use base64::Engine as _;
    use sha2::Digest as _;
    let expected = pkg.integrity.strip_prefix("sha512-").unwrap_or_default();
    let expected = base64::engine::general_purpose::STANDARD
        .decode(expected)
        .map_err(|_| format!("npm {}: integrity is not base64", pkg.package))?;
    let name: String = expected.iter().map(|b| format!("{b:02x}")).collect();
    let dir = cache.dir.join("npm");
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let cached = dir.join(format!("{name}.tgz"));
    let check = |bytes: &[u8]| sha2::Sha512::digest(bytes).as_slice() == expected.as_slice();
    if let Ok(bytes) = fs::read(&cached) {
        if check(&bytes) {
            return Ok(bytes);
        }
    }
    // Absolute: npm runs in it and is told to write there (a relative cache dir would name a
    // path below itself).
    let work = std::path::absolute(dir.join(format!("pack-{}", std::process::id())))
        .map_err(|e| format!("cannot resolve the cache dir: {e}"))?;
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let spec = format!("{}@{}", pkg.package, pkg.version);
    let out = Command::new("npm")
        .args([
            "pack",
            "--silent",
            "--ignore-scripts",
            &spec,
            "--pack-destination",
        ])
        .arg(&work)
        .current_dir(&work)
        .output()
        .map_err(|e| format!("cannot run npm (install it: apt-get install npm): {e}"))?;
    let file = fs::read_dir(&work).ok().and_then(|mut d| {
        d.find_map(|e| {
            e.ok()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "tgz"))
        })
    });
    let result = match (out.status.success(), file) {
        (true, Some(file)) => {
            fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))
        }
        (true, None) => Err(format!("npm pack {spec} wrote no tarball")),
        (false, _) => Err(format!(
            "npm pack {spec} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )),
    };
    let _ = fs::remove_dir_all(&work);
    let bytes = result?;
    if !check(&bytes) {
        return Err(format!(
            "{spec}: the tarball does not match the recipe's integrity {}",
            pkg.integrity
        ));
    }
    write_atomic(&cached, &bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// What a build error says when the host's archive lacks a pinned .deb version (a lock made
/// elsewhere or before a security update): the cue to refresh the lock.
pub const DROPPED_PIN: &str = "the archive no longer has";

/// Downloads every package of a step that is not cached yet with one `apt-get download` (one
/// run per package costs about a second each), and caches those whose sha256 the recipe pins.
/// Anything missing or different is left to `fetch_deb`, which says what is wrong.
fn prefetch_debs(cache: &Cache, debs: &[crate::recipe::Deb]) -> std::result::Result<(), String> {
    let missing: Vec<&crate::recipe::Deb> = debs
        .iter()
        .filter(|d| {
            !cache
                .dir
                .join("debs")
                .join(format!("{}.deb", d.sha256))
                .exists()
        })
        .collect();
    if missing.len() < 2 {
        return Ok(());
    }
    let work = cache
        .dir
        .join("debs")
        .join(format!("prefetch-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let status = Command::new("apt-get")
        .args(["download", "-q"])
        .args(
            missing
                .iter()
                .map(|d| format!("{}={}", d.package, d.version)),
        )
        .current_dir(&work)
        .output();
    if status.is_ok() {
        let pinned: std::collections::BTreeSet<&str> =
            missing.iter().map(|d| d.sha256.as_str()).collect();
        for entry in fs::read_dir(&work).into_iter().flatten().flatten() {
            if let Ok(bytes) = fs::read(entry.path()) {
                let digest = Digest::of(&bytes);
                if pinned.contains(digest.hex()) {
                    let target = cache.dir.join("debs").join(format!("{}.deb", digest.hex()));
                    write_atomic(&target, &bytes).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    let _ = fs::remove_dir_all(&work);
    Ok(())
}

/// The .deb of a pinned package: from the cache (by sha256), else downloaded with the host's
/// `apt-get download` (which checks it against the signed archive index) and checked again
/// against the recipe's sha256.
fn fetch_deb(cache: &Cache, deb: &crate::recipe::Deb) -> std::result::Result<Vec<u8>, String> {
    let cached = cache.dir.join("debs").join(format!("{}.deb", deb.sha256));
    if let Ok(bytes) = fs::read(&cached) {
        if Digest::of(&bytes).hex() == deb.sha256 {
            return Ok(bytes);
        }
    }
    let work = cache
        .dir
        .join("debs")
        .join(format!("download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let spec = format!("{}={}", deb.package, deb.version);
    let out = Command::new("apt-get")
        .args(["download", "-q", &spec])
        .current_dir(&work)
        .output()
        .map_err(|e| format!("cannot run apt-get (is this a Debian host?): {e}"))?;
    if !out.status.success() {
        let _ = fs::remove_dir_all(&work);
        return Err(format!(
            "apt-get download {spec} failed: {DROPPED_PIN} (or this host does not know) the pinned version {} of {} (run apt-get update; for a step with `packages`, refresh the lock: rootfs-builder lock RECIPE; for `debs`, pin a version apt-cache policy {} shows): {}",
            deb.version,
            deb.package,
            deb.package,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let file = fs::read_dir(&work)
        .ok()
        .and_then(|mut d| {
            d.find_map(|e| {
                e.ok()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "deb"))
            })
        })
        .ok_or_else(|| format!("apt-get download {spec} wrote no .deb"))?;
    let bytes = fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let _ = fs::remove_dir_all(&work);
    let actual = Digest::of(&bytes);
    if actual.hex() != deb.sha256 {
        return Err(format!(
            "{spec}: downloaded .deb has sha256 {} but the recipe pins {}",
            actual.hex(),
            deb.sha256
        ));
    }
    write_atomic(&cached, &bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// The image config, with keys in a fixed order and `created` from the epoch.
fn config_json(
    recipe: &Recipe,
    base: Option<&agentd_images::ImageConfig>,
    epoch: u64,
    layers: &[BuiltLayer],
) -> Vec<u8> {
    let mut img = recipe.image.clone();
    if let Some(base) = base {
        // The base's defaults, extended (env, labels) or replaced (the rest) by the recipe's.
        img.env = base.env.iter().chain(&recipe.image.env).cloned().collect();
        let mut labels = base.labels.clone();
        labels.extend(recipe.image.labels.clone());
        img.labels = labels;
        let pick = |mine: &Vec<String>, theirs: &Vec<String>| {
            if mine.is_empty() {
                theirs.clone()
            } else {
                mine.clone()
            }
        };
        img.entrypoint = pick(&recipe.image.entrypoint, &base.entrypoint);
        img.cmd = pick(&recipe.image.cmd, &base.cmd);
        if img.user.is_empty() {
            img.user = base.user.clone();
        }
        if img.workdir.is_empty() {
            img.workdir = base.workdir.clone();
        }
    }
    let img = &img;
    let created = agentd_images::commit::rfc3339(epoch);
    let config = serde_json::json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": img.env,
            "Entrypoint": img.entrypoint,
            "Cmd": img.cmd,
            "User": img.user,
            "WorkingDir": img.workdir,
            "Labels": img.labels,
        },
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>()},
        "history": layers.iter().map(|l| serde_json::json!({"created": created, "created_by": format!("rootfs-builder step {}", l.step)})).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&config).expect("configs serialise")
}

/// Writes the image as an OCI layout directory at `dest` (tagged `tag`), or as a tar of one if
/// `dest` ends in `.tar`.
pub fn write_layout(image: &BuiltImage, cache_dir: &Path, dest: &Path, tag: &str) -> Result<()> {
    let as_tar = dest.extension().is_some_and(|e| e == "tar");
    let dir = if as_tar {
        dest.with_extension("tar.d")
    } else {
        dest.to_path_buf()
    };
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io_err("cannot create", &blobs))?;
    let mut digests = vec![image.digest(), image.config.0.clone()];
    digests.extend(image.layers.iter().map(|l| l.digest.clone()));
    for digest in &digests {
        let target = blobs.join(digest.hex());
        if !target.exists() {
            let source = cache_dir.join("blobs/sha256").join(digest.hex());
            fs::copy(&source, &target).map_err(io_err("cannot copy", &source))?;
        }
    }
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(io_err("cannot write", &dir))?;
    let mut annotations = std::collections::BTreeMap::new();
    annotations.insert(
        agentd_images::layout::REF_NAME_ANNOTATION.to_string(),
        tag.to_string(),
    );
    let index = Index {
        schema_version: 2,
        media_type: Some(oci::OCI_INDEX.into()),
        manifests: vec![Descriptor {
            media_type: oci::OCI_MANIFEST.into(),
            digest: image.digest(),
            size: image.manifest.len() as u64,
            platform: Some(oci::PlatformJson {
                architecture: "amd64".into(),
                os: "linux".into(),
                variant: None,
            }),
            annotations,
        }],
    };
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("serialises"),
    )
    .map_err(io_err("cannot write", &dir))?;
    if as_tar {
        let file = fs::File::create(dest).map_err(io_err("cannot create", dest))?;
        let mut builder = tar::Builder::new(file);
        builder.mode(tar::HeaderMode::Deterministic);
        builder
            .append_dir_all(".", &dir)
            .map_err(io_err("cannot write", dest))?;
        builder.into_inner().map_err(io_err("cannot write", dest))?;
        fs::remove_dir_all(&dir).map_err(io_err("cannot remove", &dir))?;
    }
    Ok(())
}

/// Adds the image to agentd's image store under `name` and unpacks it.
pub fn write_store(
    image: &BuiltImage,
    cache_dir: &Path,
    state_dir: &Path,
    name: &str,
) -> Result<agentd_images::ImageRecord> {
    let store = agentd_images::Store::open(state_dir.join("images"))?;
    let record = import_into(image, cache_dir, &store, name)?;
    store.rootfs(&record.name, &agentd_images::UnpackOptions::default())?;
    Ok(record)
}

/// Adds the image to `store` under `name` (through an OCI layout in `cache_dir`, removed
/// again); the layers are unpacked when an image is first used.
pub fn import_into(
    image: &BuiltImage,
    cache_dir: &Path,
    store: &agentd_images::Store,
    name: &str,
) -> Result<agentd_images::ImageRecord> {
    let tmp = cache_dir.join(format!("layout-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    write_layout(image, cache_dir, &tmp, "latest")?;
    let imported =
        agentd_images::layout::import(store, &tmp, Some(name), &agentd_images::Platform::default());
    let _ = fs::remove_dir_all(&tmp);
    Ok(imported?.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gzipped npm tarball of `files` (path below `package/`, mode, content) and its
    /// `sha512-` integrity.
    fn npm_tgz(files: &[(&str, u32, &str)]) -> (Vec<u8>, String) {
        use base64::Engine as _;
        use sha2::Digest as _;
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (path, mode, body) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(*mode);
            h.set_entry_type(tar::EntryType::Regular);
            // Set by hand: `set_path` refuses `..`, which a hostile tarball may hold.
            let name = format!("package/{path}");
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, body.as_bytes()).unwrap();
        }
        let tgz = b.into_inner().unwrap().finish().unwrap();
        let integrity = format!(
            "sha512-{}",
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha512::digest(&tgz))
        );
        (tgz, integrity)
    }

    fn npm_step(cache: &Cache, files: &[(&str, u32, &str)], take: &str) -> Result<Layer> {
        use base64::Engine as _;
        let (tgz, integrity) = npm_tgz(files);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(integrity.strip_prefix("sha512-").unwrap())
            .unwrap();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        fs::create_dir_all(cache.dir.join("npm")).unwrap();
        fs::write(cache.dir.join("npm").join(format!("{hex}.tgz")), &tgz).unwrap();
        let step: Step = toml::from_str(&format!(
            "name = \"n\"\nnpm = [{{ package = \"p\", version = \"1.0.0\", integrity = \"{integrity}\", files = [{take}] }}]\n"
        ))
        .unwrap();
        build_step(&step, Vec::new(), cache)
    }

    #[test]
    fn test_npm_dir_takes_every_file_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let files = [
            ("bin/cli.js", 0o755, "#!/usr/bin/env node\n"),
            ("lib/a.js", 0o644, "a"),
            ("README.md", 0o644, "r"),
        ];
        let layer = npm_step(
            &cache,
            &files,
            r#"{ src = "/", dest = "/usr/lib/node_modules/p" }"#,
        )
        .unwrap();
        let cli = layer.get("usr/lib/node_modules/p/bin/cli.js").unwrap();
        assert_eq!(cli.mode, 0o755);
        assert_eq!(
            layer.get("usr/lib/node_modules/p/lib/a.js").unwrap().mode,
            0o644
        );
        assert!(layer.get("usr/lib/node_modules/p/README.md").is_some());
        let layer = npm_step(&cache, &files, r#"{ src = "lib/", dest = "/opt/l" }"#).unwrap();
        assert!(layer.get("opt/l/a.js").is_some() && layer.get("opt/l/cli.js").is_none());
        let e = npm_step(&cache, &files, r#"{ src = "nothing/", dest = "/opt/n" }"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no files in package/nothing/"), "{e}");
        let evil = [("lib/../../../etc/passwd", 0o644, "x")];
        let e = npm_step(&cache, &evil, r#"{ src = "lib/", dest = "/opt/l" }"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("refusing the path"), "{e}");
    }
}
