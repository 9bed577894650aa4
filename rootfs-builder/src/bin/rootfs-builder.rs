//! `rootfs-builder build RECIPE [--output PATH | --store STATE_DIR] [--tag NAME]` and
//! `rootfs-builder lock RECIPE`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rootfs_builder::{BuildEvent, BuildOptions, Recipe};

/// Builds OCI images for agentd from TOML recipes, without Docker.
#[derive(Parser)]
#[command(name = "rootfs-builder", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build an image from a recipe.
    Build {
        /// The recipe (TOML).
        recipe: PathBuf,
        /// Write an OCI image layout here (a directory, or a tar if the name ends in .tar).
        #[arg(long, conflicts_with = "store")]
        output: Option<PathBuf>,
        /// Add the image to the image store of this agentd state dir (e.g. /var/lib/agentd).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Name (in the store) or tag (in a layout); default: the recipe's file name.
        #[arg(long)]
        tag: Option<String>,
        /// Layer and package cache.
        #[arg(
            long,
            env = "ROOTFS_BUILDER_CACHE",
            default_value = "/var/cache/agentd-rootfs-builder"
        )]
        cache: PathBuf,
        /// Every mtime in the image (default 0, the reproducible-builds convention).
        #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
        source_date_epoch: u64,
    },
    /// Resolve the recipe's `packages` with this host's apt to their dependency closure and
    /// write (or refresh) the lock file beside it (NAME.lock for NAME.toml).
    Lock {
        /// The recipe (TOML).
        recipe: PathBuf,
    },
}

fn main() -> ExitCode {
    let done = match Cli::parse().command {
        Cmd::Build {
            recipe,
            output,
            store,
            tag,
            cache,
            source_date_epoch,
        } => run(recipe, output, store, tag, cache, source_date_epoch),
        Cmd::Lock { recipe } => lock(&recipe),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rootfs-builder: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(
    recipe_path: PathBuf,
    output: Option<PathBuf>,
    store: Option<PathBuf>,
    tag: Option<String>,
    cache: PathBuf,
    epoch: u64,
) -> anyhow::Result<()> {
    let recipe = Recipe::load(&recipe_path)?;
    if output.is_none() && store.is_none() {
        anyhow::bail!("say where the image goes: --output PATH or --store STATE_DIR");
    }
    let tag = tag.unwrap_or_else(|| {
        recipe_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into())
    });
    let started = Instant::now();
    let total = recipe.steps.len();
    let mut n = 0;
    let image = rootfs_builder::build(&recipe, &BuildOptions { cache_dir: cache.clone(), epoch }, &mut |event| {
        n += 1;
        match event {
            BuildEvent::Cached { step, digest } => eprintln!("[{n}/{total}] {step}: cached {}", digest.short()),
            BuildEvent::Built { step, digest, entries, size, seconds } => {
                eprintln!("[{n}/{total}] {step}: built {} ({entries} entries, {size} bytes, {seconds:.1}s)", digest.short())
            }
        }
    })
    .with_context(|| format!("cannot build {}", recipe_path.display()))?;
    if let Some(output) = &output {
        rootfs_builder::write_layout(&image, &cache, output, &tag)
            .with_context(|| format!("cannot write {}", output.display()))?;
        eprintln!(
            "wrote {} ({}:{tag}) in {:.1}s",
            output.display(),
            output.display(),
            started.elapsed().as_secs_f64()
        );
    }
    if let Some(store) = &store {
        let record = rootfs_builder::write_store(&image, &cache, store, &tag)
            .with_context(|| format!("cannot add the image to the store in {}", store.display()))?;
        eprintln!(
            "stored as {} in {:.1}s",
            record.name,
            started.elapsed().as_secs_f64()
        );
    }
    println!("{}", image.digest());
    Ok(())
}

/// `rootfs-builder lock RECIPE`.
fn lock(recipe: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(recipe)
        .with_context(|| format!("cannot read recipe {}", recipe.display()))?;
    let parsed = Recipe::parse(&text, recipe)?;
    let steps = parsed.package_steps();
    if steps.is_empty() {
        anyhow::bail!(
            "{} has no step with `packages`: nothing to lock",
            recipe.display()
        );
    }
    let started = Instant::now();
    let lock = rootfs_builder::lock::write(recipe, &steps)?;
    for s in &lock.steps {
        eprintln!(
            "step {}: {} packages -> {} pinned debs",
            s.name,
            s.packages.len(),
            s.debs.len()
        );
    }
    eprintln!(
        "wrote {} in {:.1} s",
        rootfs_builder::lock::lock_path(recipe).display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
