//! The default image, `opencode`, built on first use.
//!
//! `agentd serve` needs no set-up beyond itself: when a sandbox asks for the `opencode` image
//! and the store has none, agentd builds it from rootfs-builder's embedded recipe
//! (`rootfs_builder::embedded::opencode`, its `recipes/opencode.toml`), with its library:
//! pinned Debian packages fetched with `apt-get download` and the pinned OpenCode binary with
//! `npm pack`, every one checked against its recorded digest. Builds are cached in the build
//! cache dir, so a rebuild after `agentd image rm opencode` costs the import only. One build
//! runs at a time; concurrent creates wait for it.

use std::path::Path;

use anyhow::Context;

/// The name the built image is recorded under.
pub const NAME: &str = "opencode";

/// Builds the default image into `store` from the embedded recipe, caching in `cache_dir`.
pub fn build(store: &agentd_images::Store, cache_dir: &Path) -> anyhow::Result<()> {
    let recipe = rootfs_builder::embedded::opencode()
        .load_into(&cache_dir.join("recipe"))
        .context("the embedded opencode recipe")?;
    let started = std::time::Instant::now();
    tracing::info!(cache = %cache_dir.display(), "building the default image `opencode` (first use)");
    let options = rootfs_builder::BuildOptions {
        cache_dir: cache_dir.to_path_buf(),
        epoch: 0,
    };
    let image = rootfs_builder::build(&recipe, &options, &mut |event| match event {
        rootfs_builder::BuildEvent::Cached { step, .. } => {
            tracing::info!(step, "default image: step cached")
        }
        rootfs_builder::BuildEvent::Built { step, entries, size, seconds, .. } => {
            tracing::info!(step, entries, size, seconds, "default image: step built")
        }
    })
    .context("failed to build the default image `opencode` (it needs apt-get and npm on the host; or import one: agentd image import)")?;
    rootfs_builder::import_into(&image, cache_dir, store, NAME)
        .context("failed to import the built default image")?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "default image `opencode` built"
    );
    Ok(())
}
