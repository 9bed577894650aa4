//! Forks: `count` new sandboxes that start from a sandbox's current files. The parent is
//! frozen while its writable layer is copied (copy-on-write where the file system can,
//! [`agentd_runtime::tree::copy_layer`]) into `<state>/forks/<random>/layer`; each fork stacks that
//! copy (and whatever the parent itself stacked) on the same image, with the parent's image,
//! limits, network, labels (plus `agentd.fork_of`) and OpenCode. What is in the parent's
//! `/tmp` (a tmpfs) and its processes do not carry over; forks diverge from there.
//!
//! Owner of a fork layer: every sandbox stacked on it holds a shared lock on the layer's dir
//! while its overlay is mounted, and the fork request one on `<random>` while it copies and
//! creates; the dir is removed ([`Manager::sweep_forks`]) once nobody holds either: after a
//! delete and every minute.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    CreateSandbox, LimitsRequest, Manager, NetworkRequest, Result, Sandbox, SandboxRecord,
    SandboxState, SizeValue,
};
use crate::error::Error;

/// Most forks in one request.
pub const MAX_FORKS: u32 = 16;
/// The layer's dir in its fork dir.
const LAYER: &str = "layer";

/// A sandbox's writable layer, copied and held (see [`Manager::take_held_layer`]).
pub(super) struct Taken {
    /// Keeps the sweeper off the copy until dropped.
    pub hold: nix::fcntl::Flock<std::fs::File>,
    /// The copy.
    pub dir: PathBuf,
    /// What was copied.
    pub stats: agentd_runtime::tree::CopyStats,
    /// How long the sandbox was frozen for it.
    pub copy: Duration,
}

/// What a fork made.
#[derive(Debug)]
pub struct Forked {
    /// The new sandboxes.
    pub sandboxes: Vec<SandboxRecord>,
    /// Files (and links) copied from the parent's writable layer.
    pub files: u64,
    /// Bytes of file content copied.
    pub bytes: u64,
    /// Time the parent was frozen while its layer was copied.
    pub copy: Duration,
    /// The whole request.
    pub total: Duration,
}

impl Manager {
    fn forks_dir(&self) -> PathBuf {
        self.config.state_dir.join("forks")
    }

    /// `count` sandboxes from `sb`'s current files (see the module's doc).
    pub async fn fork(self: &Arc<Self>, sb: &Arc<Sandbox>, count: u32) -> Result<Forked> {
        let started = Instant::now();
        if count == 0 || count > MAX_FORKS {
            return Err(Error::Invalid(format!("count must be 1 to {MAX_FORKS}")));
        }
        // The forks start their own OpenCode: the parent's may sleep on.
        self.wake(sb, false).await?;
        let rec = sb.snapshot();
        if rec.state != SandboxState::Ready {
            return Err(Error::Conflict(format!(
                "sandbox {} is {}: only a ready sandbox can be forked",
                rec.id,
                rec.state.as_str()
            )));
        }
        let Taken {
            hold,
            dir,
            stats,
            copy,
        } = self.take_held_layer(sb).await?;
        let mut labels = rec.labels.clone();
        labels.insert("agentd.fork_of".into(), rec.id.clone());
        let mut base_layers = vec![dir.clone()];
        base_layers.extend(rec.base_layers.iter().cloned());
        let req = CreateSandbox {
            image: Some(rec.image.clone()),
            limits: LimitsRequest {
                memory: Some(SizeValue::Bytes(rec.memory_bytes)),
                cpus: rec.cpus,
                pids: rec.pids,
                disk: rec.disk_bytes.map(SizeValue::Bytes),
            },
            network: Some(NetworkRequest::Policy(rec.network.clone())),
            idle_timeout_secs: Some(rec.idle_timeout_secs),
            idle_action: Some(rec.idle_action),
            ttl_secs: rec.ttl_secs,
            labels,
            opencode: Some(rec.opencode.is_some()),
            base_layers,
            ..CreateSandbox::default()
        };
        let mut made = Vec::new();
        let mut failed = None;
        for _ in 0..count {
            match self.create(req.clone()).await {
                Ok(r) => made.push(r),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(hold);
        if let Some(e) = failed {
            // All or nothing: the forks made so far go again.
            for r in &made {
                if let Ok(s) = self.get(&r.id) {
                    let _ = self.delete(&s).await;
                }
            }
            self.sweep_forks().await;
            return Err(e);
        }
        tracing::info!(sandbox = %rec.id, count, files = stats.files, bytes = stats.bytes, copy_ms = copy.as_millis() as u64, "forked");
        Ok(Forked {
            sandboxes: made,
            files: stats.files,
            bytes: stats.bytes,
            copy,
            total: started.elapsed(),
        })
    }

    /// Copies `sb`'s writable layer (see [`Manager::take_layer`]) into a new
    /// `<forks>/<random>/layer`, held by the caller (a shared lock on `<random>`) until it drops
    /// [`Taken::hold`]: the sweeper removes it once neither that hold nor a sandbox stacked on
    /// it remains, also after a crash.
    pub(super) async fn take_held_layer(&self, sb: &Arc<Sandbox>) -> Result<Taken> {
        let home = self.forks_dir().join(crate::sandbox::random_hex(8));
        let dir = home.join(LAYER);
        let h2 = home.clone();
        let hold = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&h2)?;
            let f = std::fs::File::open(&h2)?;
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock)
                .map_err(|(_, e)| std::io::Error::from(e))
        })
        .await
        .map_err(Error::internal)?
        .map_err(|e| Error::internal(format!("making the layer dir {}: {e}", home.display())))?;
        let t = Instant::now();
        match self.take_layer(sb, &dir).await {
            Ok(stats) => Ok(Taken {
                hold,
                dir,
                stats,
                copy: t.elapsed(),
            }),
            Err(e) => {
                drop(hold);
                self.sweep_forks().await;
                Err(e)
            }
        }
    }

    /// Removes the fork layers no sandbox (and no fork request) holds any more.
    pub async fn sweep_forks(&self) {
        let forks = self.forks_dir();
        let _ = tokio::task::spawn_blocking(move || {
            let Ok(entries) = std::fs::read_dir(&forks) else {
                return;
            };
            let free = |p: &std::path::Path| match std::fs::File::open(p) {
                Ok(f) => nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
                    .ok()
                    .map(Some),
                // No layer (yet, or any more): nothing to hold.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(None),
                Err(_) => None,
            };
            for e in entries.flatten() {
                let path = e.path();
                // Free when neither a fork request (the dir) nor a sandbox (its layer) holds it.
                let Some(_request) = free(&path) else {
                    continue;
                };
                let Some(_sandboxes) = free(&path.join(LAYER)) else {
                    continue;
                };
                tracing::debug!(path = %path.display(), "removing a fork layer nobody uses");
                if let Err(e) = agentd_runtime::tree::remove_tree(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove a fork layer");
                }
            }
        })
        .await;
    }
}
