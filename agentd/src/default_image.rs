//! The default image, `opencode`, built on first use.
//!
//! `agentd serve` needs no set-up beyond itself: when a sandbox asks for the `opencode` image
//! and the store has none, agentd builds it from rootfs-builder's embedded recipe
//! (`rootfs_builder::embedded::opencode`, its `recipes/opencode.toml` and `opencode.lock`),
//! with its library: the Debian packages its lock pins fetched with `apt-get download` and the
//! pinned OpenCode binary with `npm pack`, every one checked against its recorded digest. When
//! the host's archive no longer has a pinned version, the lock is refreshed with the host's
//! apt and kept in the build cache (`recipe/opencode.lock.local`) for later builds. Builds are cached in the build
//! cache dir, so a rebuild after `agentd image rm opencode` costs the import only. One build
//! runs at a time; concurrent creates wait for it.

use std::path::Path;

use anyhow::Context;

/// The name the built image is recorded under.
pub const NAME: &str = "opencode";

/// The lock this host refreshed (kept beside the written-out recipe in the build cache).
const LOCAL_LOCK: &str = "opencode.lock.local";

/// The embedded recipe written out to `dir`, with the lock this host refreshed earlier if it
/// still fits the recipe, else the embedded one.
fn load_recipe(dir: &Path) -> anyhow::Result<rootfs_builder::Recipe> {
    let embedded = rootfs_builder::embedded::opencode();
    let recipe = embedded
        .load_into(dir)
        .context("the embedded opencode recipe")?;
    if let Ok(local) = std::fs::read(dir.join(LOCAL_LOCK)) {
        std::fs::write(dir.join("opencode.lock"), local)?;
        match rootfs_builder::Recipe::load(&dir.join(embedded.name)) {
            Ok(r) => return Ok(r),
            Err(e) => {
                tracing::info!(error = %e, "the refreshed lock no longer fits the recipe: using the embedded one");
                let _ = std::fs::remove_file(dir.join(LOCAL_LOCK));
                return Ok(embedded.load_into(dir)?);
            }
        }
    }
    Ok(recipe)
}

/// Builds the default image into `store` from the embedded recipe, caching in `cache_dir`.
/// When the host's archive no longer has a version the lock pins (a security update since,
/// or another Debian release), the lock is refreshed with the host's apt, kept for the next
/// build, and the build runs once more.
pub fn build(store: &agentd_images::Store, cache_dir: &Path) -> anyhow::Result<()> {
    let dir = cache_dir.join("recipe");
    let started = std::time::Instant::now();
    tracing::info!(cache = %cache_dir.display(), "building the default image `opencode` (first use)");
    let recipe = load_recipe(&dir)?;
    let image = match build_recipe(&recipe, cache_dir) {
        Err(e) if format!("{e:#}").contains(rootfs_builder::build::DROPPED_PIN) => {
            tracing::warn!(error = %format!("{e:#}"), "a pinned package is gone from this host's archive: refreshing the default image's lock");
            let path = dir.join(rootfs_builder::embedded::opencode().name);
            rootfs_builder::lock::write(&path, &recipe.package_steps())
                .context("failed to refresh the default image's lock with this host's apt")?;
            std::fs::copy(dir.join("opencode.lock"), dir.join(LOCAL_LOCK))?;
            build_recipe(&rootfs_builder::Recipe::load(&path)?, cache_dir)?
        }
        other => other?,
    };
    rootfs_builder::import_into(&image, cache_dir, store, NAME)
        .context("failed to import the built default image")?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "default image `opencode` built"
    );
    Ok(())
}

/// One build of `recipe` with the cache in `cache_dir`.
fn build_recipe(
    recipe: &rootfs_builder::Recipe,
    cache_dir: &Path,
) -> anyhow::Result<rootfs_builder::BuiltImage> {
    let options = rootfs_builder::BuildOptions {
        cache_dir: cache_dir.to_path_buf(),
        epoch: 0,
    };
    let image = rootfs_builder::build(recipe, &options, &mut |event| match event {
        rootfs_builder::BuildEvent::Cached { step, .. } => {
            tracing::info!(step, "default image: step cached")
        }
        rootfs_builder::BuildEvent::Built { step, entries, size, seconds, .. } => {
            tracing::info!(step, entries, size, seconds, "default image: step built")
        }
    })
    .context("failed to build the default image `opencode` (it needs apt-get and npm on the host; or import one: agentd image import)")?;
    Ok(image)
}
