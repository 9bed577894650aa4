//! `agentd image ...`: pull, import, export, list, inspect, remove and prune images in the store
//! under agentd's state dir (the store the daemon uses too).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use agentd_images::{
    Digest, Platform, Progress, ProgressEvent, PullOptions, Reference, Store, UnpackOptions,
};
use anyhow::Context;

/// Default state dir of agentd (the image store is `<state-dir>/images`).
pub use crate::daemon::config::DEFAULT_STATE_DIR;

use crate::api::types::ImageView;

/// `agentd image` and its subcommands.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// agentd's state directory; images are kept in <state-dir>/images.
    #[arg(long, env = "AGENTD_STATE_DIR", default_value = DEFAULT_STATE_DIR, global = true)]
    pub state_dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: ImageCommand,
}

/// What to do with images.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Pull an image from a registry (and unpack its layers).
    Pull {
        /// Image reference, like debian:bookworm or 127.0.0.1:5000/org/x@sha256:...
        reference: String,
        /// Platform to pick from a multi-platform image, os/arch[/variant].
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        /// Allow plain HTTP to a registry that is not on loopback (loopback always may).
        #[arg(long)]
        insecure: bool,
        /// Credentials file in auth.json / docker config.json format (default: the usual places).
        #[arg(long)]
        authfile: Option<PathBuf>,
        /// Layers downloaded at once.
        #[arg(long, default_value_t = agentd_images::registry::DEFAULT_CONCURRENT_DOWNLOADS)]
        jobs: usize,
    },
    /// Import an OCI image layout (directory or tar) or a docker-archive tar.
    Import {
        /// The layout directory or archive.
        path: PathBuf,
        /// Name to record the image under (default: the archive's own name, or the file name).
        #[arg(long)]
        name: Option<String>,
        /// Platform to pick from a multi-platform image.
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        /// Only store the blobs; unpack the layers at first use (or with `agentd image unpack`).
        #[arg(long)]
        no_unpack: bool,
    },
    /// Unpack the layers of an image that are not unpacked yet (pull and import do this).
    Unpack {
        /// Image name or manifest digest.
        image: String,
    },
    /// Export an image as an OCI image layout directory.
    Export {
        /// Image name or manifest digest.
        image: String,
        /// Target directory (created; an existing layout gets the image added).
        dir: PathBuf,
    },
    /// List images.
    Ls,
    /// Show an image: digests, layers and its process defaults.
    Inspect {
        /// Image name or manifest digest.
        image: String,
    },
    /// Remove an image's name (its content goes at the next prune).
    Rm {
        /// Image names or manifest digests.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Delete blobs and unpacked layers no image uses, and leftovers of interrupted work.
    Prune,
    /// Re-hash every blob and check every image's blobs are present.
    Verify,
}

/// Runs an image subcommand. Returns the process exit code.
pub fn run(args: ImageArgs) -> anyhow::Result<u8> {
    let unpacks = matches!(
        args.command,
        ImageCommand::Pull { .. }
            | ImageCommand::Import {
                no_unpack: false,
                ..
            }
            | ImageCommand::Unpack { .. }
    );
    if unpacks && !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "unpacking layers needs root (files keep their owners, whiteouts are device nodes): run it with sudo"
        );
    }
    let root = args.state_dir.join("images");
    let store = Store::open(&root)
        .with_context(|| format!("cannot open the image store in {}", root.display()))?;
    match args.command {
        ImageCommand::Pull {
            reference,
            platform,
            insecure,
            authfile,
            jobs,
        } => {
            let reference: Reference = reference.parse()?;
            let platform: Platform = platform.parse()?;
            let options = PullOptions {
                platform,
                insecure,
                auth_file: authfile,
                concurrency: jobs,
                unpack: Some(UnpackOptions::default()),
            };
            let started = Instant::now();
            let progress = Arc::new(Display::new());
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let record = runtime
                .block_on(agentd_images::registry::pull(
                    &store,
                    &reference,
                    &options,
                    progress.clone(),
                ))
                .with_context(|| format!("cannot pull {reference}"))?;
            progress.clear();
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&ImageView::from(&record))?
                );
            } else {
                eprintln!(
                    "pulled {} in {:.1}s",
                    record.name,
                    started.elapsed().as_secs_f64()
                );
                println!("{}", record.manifest);
            }
        }
        ImageCommand::Import {
            path,
            name,
            platform,
            no_unpack,
        } => {
            let platform: Platform = platform.parse()?;
            let started = Instant::now();
            let records = agentd_images::layout::import(&store, &path, name.as_deref(), &platform)
                .with_context(|| format!("cannot import {}", path.display()))?;
            for record in &records {
                if !no_unpack {
                    store
                        .rootfs(&record.name, &UnpackOptions::default())
                        .with_context(|| format!("cannot unpack {}", record.name))?;
                }
                if args.json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&ImageView::from(record))?
                    );
                } else {
                    eprintln!(
                        "imported {} in {:.1}s",
                        record.name,
                        started.elapsed().as_secs_f64()
                    );
                    println!("{}", record.manifest);
                }
            }
        }
        ImageCommand::Unpack { image } => {
            let started = Instant::now();
            let rootfs = store
                .rootfs(&image, &UnpackOptions::default())
                .with_context(|| format!("cannot unpack {image}"))?;
            eprintln!(
                "{}: {} layers unpacked in {:.2}s",
                rootfs.image.name,
                rootfs.lower_dirs.len(),
                started.elapsed().as_secs_f64()
            );
        }
        ImageCommand::Export { image, dir } => {
            let record = agentd_images::layout::export(&store, &image, &dir)
                .with_context(|| format!("cannot export {image} to {}", dir.display()))?;
            eprintln!("exported {} to {}", record.name, dir.display());
        }
        ImageCommand::Ls => {
            let images = store.images()?;
            if args.json {
                let list: Vec<_> = images.iter().map(ImageView::from).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<50} {:<14} {:>10} {:<12}",
                    "NAME", "MANIFEST", "SIZE", "PLATFORM"
                );
                for image in images {
                    println!(
                        "{:<50} {:<14} {:>10} {:<12}",
                        image.name,
                        &image.manifest.hex()[..12],
                        human_size(image.size()),
                        image.platform
                    );
                }
            }
        }
        ImageCommand::Inspect { image } => {
            let record = store.resolve(&image)?;
            let config = store.image_config(&record)?;
            let mut json = serde_json::to_value(ImageView::from(&record))?;
            json["config"] = serde_json::json!({
                "entrypoint": config.entrypoint,
                "cmd": config.cmd,
                "env": config.env,
                "workdir": config.workdir,
                "user": config.user,
                "exposed_ports": config.exposed_ports,
                "labels": config.labels,
                "stop_signal": config.stop_signal,
            });
            json["layers"] = record
                .layers
                .iter()
                .map(|l| {
                    let path = store.layer_path(&l.diff_id, &UnpackOptions::default());
                    serde_json::json!({
                        "digest": l.digest, "media_type": l.media_type, "size": l.size, "diff_id": l.diff_id,
                        "unpacked": path.exists().then(|| path.display().to_string()),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        ImageCommand::Rm { images } => {
            for image in images {
                let record = store.remove_image(&image)?;
                eprintln!("removed {} ({})", record.name, record.manifest.short());
            }
        }
        ImageCommand::Prune => {
            let report = store.prune()?;
            eprintln!(
                "removed {} blobs ({}), {} unpacked layers, {} leftover work files",
                report.blobs,
                human_size(report.bytes),
                report.layers,
                report.tmp
            );
            if report.layers_in_use > 0 {
                eprintln!(
                    "kept {} unused layers that running sandboxes still mount",
                    report.layers_in_use
                );
            }
        }
        ImageCommand::Verify => {
            let problems = store.verify()?;
            for p in &problems {
                println!("{}: {}", p.what, p.problem);
            }
            if !problems.is_empty() {
                anyhow::bail!("the store has {} problems", problems.len());
            }
            eprintln!("store verified: every blob matches its digest");
        }
    }
    Ok(0)
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    #[allow(clippy::cast_precision_loss)] // Display only.
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Shows pull progress: one bar per layer on a terminal, one line per finished step otherwise.
struct Display {
    bars: Option<indicatif::MultiProgress>,
    /// Bar of each layer by digest. A std mutex: held only to look a bar up, never across await.
    layers: Mutex<HashMap<Digest, indicatif::ProgressBar>>,
}

impl Display {
    fn new() -> Self {
        let bars = std::io::stderr()
            .is_terminal()
            .then(indicatif::MultiProgress::new);
        Display {
            bars,
            layers: Mutex::new(HashMap::new()),
        }
    }

    fn clear(&self) {
        if let Some(bars) = &self.bars {
            let _ = bars.clear();
        }
    }

    fn bar(&self, digest: &Digest) -> Option<indicatif::ProgressBar> {
        self.layers
            .lock()
            .expect("progress lock poisoned")
            .get(digest)
            .cloned()
    }
}

impl Progress for Display {
    fn event(&self, event: ProgressEvent) {
        match (&self.bars, event) {
            (Some(bars), ProgressEvent::Resolved { layers, .. }) => {
                let style = indicatif::ProgressStyle::with_template(
                    "{prefix} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}",
                )
                .expect("the template is valid");
                let mut map = self.layers.lock().expect("progress lock poisoned");
                for (digest, size) in layers {
                    let bar = bars.add(indicatif::ProgressBar::new(size));
                    bar.set_style(style.clone());
                    bar.set_prefix(digest.short());
                    bar.set_message("waiting");
                    map.insert(digest, bar);
                }
            }
            (
                None,
                ProgressEvent::Resolved {
                    name,
                    manifest,
                    layers,
                },
            ) => {
                let total: u64 = layers.iter().map(|l| l.1).sum();
                eprintln!(
                    "{name}: manifest {}, {} layers, {}",
                    manifest.short(),
                    layers.len(),
                    human_size(total)
                );
            }
            (Some(_), ProgressEvent::LayerBytes { digest, done, .. }) => {
                if let Some(bar) = self.bar(&digest) {
                    bar.set_message("downloading");
                    bar.set_position(done);
                }
            }
            (_, ProgressEvent::LayerDone { digest, cached }) => {
                let what = if cached {
                    "already present"
                } else {
                    "downloaded, verified"
                };
                match self.bar(&digest) {
                    Some(bar) => {
                        bar.set_position(bar.length().unwrap_or(0));
                        bar.set_message(what);
                    }
                    None => eprintln!("{}: {what}", digest.short()),
                }
            }
            (_, ProgressEvent::UnpackStart { digest }) => {
                if let Some(bar) = self.bar(&digest) {
                    bar.set_message("unpacking");
                }
            }
            (_, ProgressEvent::UnpackDone { digest, stats }) => {
                let what = match &stats {
                    Some(s) => format!("unpacked {} files, {} dirs", s.files, s.dirs),
                    None => "already unpacked".to_string(),
                };
                match self.bar(&digest) {
                    Some(bar) => bar.finish_with_message(what),
                    None => eprintln!("{}: {what}", digest.short()),
                }
            }
            _ => {}
        }
    }
}
