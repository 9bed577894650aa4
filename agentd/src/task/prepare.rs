//! A task's shared preparation. With a setup, the workspace and the setup run once, in a
//! sandbox of their own without OpenCode (no agent's state lands in it); that
//! sandbox is frozen, what it wrote into its rootfs is copied into a layer in the task's dir,
//! and it is deleted. Each attempt's sandbox stacks the layer on the image's layers
//! (copy-on-write: what an agent changes lands in its own upper dir) and starts with its
//! workspace, baseline and setup done, so N agents cost one setup.
//!
//! What carries over is what the setup left in the rootfs: not `/tmp` (a tmpfs), not the
//! processes it started (`setup_once: false` runs the setup in every sandbox instead).
//!
//! The setup there has the repository's dependency cache, when agentd keeps them (see
//! [`crate::cache`]): only this sandbox ever mounts it, never an agent's.
//!
//! The layer belongs to the task. It is removed once the task's sandboxes are (after the
//! grace period, or on delete) and no sandbox holds it: the shim of every sandbox stacked on
//! it holds a shared lock on it while its overlay is mounted, and the removal takes the
//! exclusive one first. A restart mid-preparation starts it over; a start removes the dirs
//! of tasks it does not know.

use std::sync::Arc;

use super::*;
use crate::task::model::{Prepared, PreparedState};

/// The layer's dir in the task's dir.
const LAYER_DIR: &str = "prepared";

impl TaskManager {
    /// Where task `id`'s prepared layer is.
    pub(super) fn layer_path(&self, id: &str) -> PathBuf {
        self.task_dir(id).join(LAYER_DIR)
    }

    /// Whether the attempts of the task share one preparation.
    pub(super) fn shares_setup(rec: &TaskRecord) -> bool {
        rec.request.setup.is_some() && rec.request.setup_once != Some(false)
    }

    fn update_prepared(&self, task: &Task, f: impl FnOnce(&mut Prepared)) {
        {
            let mut r = task.record.lock().expect("task record lock");
            if let Some(p) = r.prepared.as_mut() {
                f(p);
            }
        }
        self.persist(task);
    }

    /// Prepares the task unless that is done, bounded by its deadline and stopped by a
    /// cancel, then hands the result to the attempts that have no sandbox yet. On a failure:
    /// the state the attempts end in and why.
    pub(super) async fn prepare(
        self: &Arc<Self>,
        task: &Arc<Task>,
        deadline_ms: u64,
    ) -> std::result::Result<(), (TaskState, String)> {
        let rec = task.snapshot();
        let ready = rec
            .prepared
            .as_ref()
            .is_some_and(|p| p.state == PreparedState::Ready);
        if !ready {
            let (me, t2) = (self.clone(), task.clone());
            let mut run = tokio::spawn(async move { me.run_prepare(&t2, deadline_ms).await });
            let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
            let outcome = tokio::select! {
                r = &mut run => r.unwrap_or_else(|e| Err(Outcome::Lost(format!("internal error: {e}")))).map_err(Ok),
                s = stop_signal(task.stop_tx.subscribe()) => Err(Err(s)),
                _ = tokio::time::sleep(left) => Err(Err(TaskState::TimedOut)),
            };
            let failed = match outcome {
                Ok(()) => None,
                Err(Ok(Outcome::Failed(why) | Outcome::Lost(why))) => {
                    Some((TaskState::Failed, why))
                }
                Err(Ok(Outcome::Succeeded)) => {
                    Some((TaskState::Failed, "internal error: nothing prepared".into()))
                }
                Err(Err(state)) => {
                    set_stop(task, state);
                    // The setup ends with its sandbox; the preparation then returns.
                    let sandbox = task.snapshot().prepared.and_then(|p| p.sandbox);
                    if let Some(sb) = sandbox.and_then(|id| self.mgr.get(&id).ok()) {
                        self.mgr.stop(&sb, "the task stopped").await;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(180), run).await;
                    let why = if state == TaskState::TimedOut {
                        format!(
                            "the task's time limit ({} s) passed while it was prepared",
                            rec.timeout().as_secs()
                        )
                    } else {
                        "cancelled".to_string()
                    };
                    Some((state, why))
                }
            };
            if let Some((state, why)) = failed {
                // The setup's output is in the events and on the attempts: the sandbox goes
                // now, and with it its hold on the cache.
                self.delete_prep_sandbox(task).await;
                self.release_cache(&rec.id).await;
                self.update_prepared(task, |p| {
                    p.state = PreparedState::Failed;
                    p.error = Some(why.clone());
                });
                self.emit(
                    task,
                    "prepare",
                    serde_json::json!({"state": "failed", "error": why}),
                );
                let setup = task.snapshot().prepared.and_then(|p| p.setup);
                for a in rec.attempts.iter().filter(|a| a.sandbox.is_none()) {
                    self.update_unsaved(task, a.n, |a| a.setup = setup.clone());
                }
                return Err((state, why));
            }
        }
        let Some(p) = task.snapshot().prepared else {
            return Err((TaskState::Failed, "internal error: nothing prepared".into()));
        };
        // Ready before a restart, with its sandbox not yet deleted.
        self.delete_prep_sandbox(task).await;
        for a in rec.attempts.iter() {
            if a.state.is_terminal() || a.sandbox.is_some() || a.baseline.is_some() {
                continue;
            }
            self.update_unsaved(task, a.n, |a| {
                a.baseline = p.baseline.clone();
                a.source = p.source.clone();
                a.setup = p.setup.clone();
                // The attempt waited for it.
                a.timings.setup_ms = p.setup_ms;
            });
        }
        self.persist(task);
        Ok(())
    }

    /// The preparation's steps: sandbox, workspace, setup, layer.
    async fn run_prepare(
        self: &Arc<Self>,
        task: &Arc<Task>,
        deadline_ms: u64,
    ) -> std::result::Result<(), Outcome> {
        let rec = task.snapshot();
        // Whatever a preparation cut short by a restart left: its sandbox and its layer.
        self.delete_prep_sandbox(task).await;
        let layer = self.layer_path(&rec.id);
        let l2 = layer.clone();
        tokio::task::spawn_blocking(move || agentd_runtime::tree::remove_tree(&l2))
            .await
            .map_err(|e| Outcome::Lost(e.to_string()))?
            .map_err(|e| Outcome::Lost(format!("a previous prepared layer stays: {e}")))?;
        let mut prepared = Prepared::new();
        prepared.cache_reused = self.acquire_cache(&rec).await;
        let cache_reused = prepared.cache_reused;
        task.record.lock().expect("task record lock").prepared = Some(prepared);
        self.persist(task);
        self.emit(
            task,
            "prepare",
            serde_json::json!({"state": "running", "cache_reused": cache_reused}),
        );

        let begun = Instant::now();
        task.creating.lock().expect("creating lock").insert(0);
        let created = self.create_sandbox(task, &rec, 0).await;
        task.creating.lock().expect("creating lock").remove(&0);
        let sb = created.map_err(Outcome::Lost)?;
        self.give_cache(&rec.id, &sb).await;
        let ms_now = ms(begun.elapsed());
        self.update_prepared(task, |p| {
            p.sandbox = Some(sb.snapshot().id);
            p.sandbox_ms = Some(ms_now);
        });
        // A cancel or the time limit ends the preparation between its steps (and the
        // setup with its sandbox).
        still_wanted(task)?;
        sb.wait_ready().await.map_err(Outcome::Lost)?;

        let t = Instant::now();
        let (baseline, source) = self
            .put_workspace(&rec, &sb)
            .await
            .map_err(Outcome::Failed)?;
        let ws_ms = ms(t.elapsed());
        self.update_prepared(task, |p| {
            p.baseline = Some(baseline);
            p.source = source;
            p.workspace_ms = Some(ws_ms);
        });
        still_wanted(task)?;

        let command = rec.request.setup.clone().unwrap_or_default();
        match self.run_setup(task, 0, &sb, &command, deadline_ms).await {
            Ok(done) => self.update_prepared(task, |p| {
                p.setup = Some(done.result);
                p.baseline = Some(done.baseline);
                p.setup_ms = Some(done.ms);
            }),
            Err((outcome, result)) => {
                self.update_prepared(task, |p| p.setup = result);
                return Err(outcome);
            }
        }
        still_wanted(task)?;

        let t = Instant::now();
        let stats = match self.mgr.take_layer(&sb, &layer).await {
            Ok(s) => s,
            Err(e) => {
                let l2 = layer.clone();
                let _ = tokio::task::spawn_blocking(move || agentd_runtime::tree::remove_tree(&l2))
                    .await;
                return Err(Outcome::Lost(format!(
                    "the prepared workspace could not be kept: {e}"
                )));
            }
        };
        let layer_ms = ms(t.elapsed());
        // Durable (the copy is synced) before it says ready.
        self.update_prepared(task, |p| {
            p.layer_ms = Some(layer_ms);
            p.layer_files = Some(stats.files);
            p.layer_bytes = Some(stats.bytes);
            p.state = PreparedState::Ready;
        });
        if let Err(e) = self.mgr.delete(&sb).await {
            tracing::warn!(task = %rec.id, error = %e, "the preparation's sandbox could not be deleted");
        } else {
            self.update_prepared(task, |p| p.sandbox = None);
            self.release_cache(&rec.id).await;
        }
        self.emit(
            task,
            "prepare",
            serde_json::json!({"state": "ready", "files": stats.files, "bytes": stats.bytes,
                "skipped": stats.skipped, "layer_ms": layer_ms, "total_ms": ms(begun.elapsed())}),
        );
        tracing::info!(task = %rec.id, files = stats.files, bytes = stats.bytes, layer_ms, "task prepared");
        Ok(())
    }

    /// Deletes the preparation's sandbox, if it has one, and forgets it.
    async fn delete_prep_sandbox(&self, task: &Arc<Task>) {
        let sandbox = task.snapshot().prepared.and_then(|p| p.sandbox);
        let Some(id) = sandbox else { return };
        if let Ok(sb) = self.mgr.get(&id) {
            let _ = self.mgr.delete(&sb).await;
        }
        self.update_prepared(task, |p| p.sandbox = None);
    }

    /// Removes the task's prepared layer once no sandbox holds it (else a later call does).
    pub(super) async fn remove_prepared(&self, task: &Arc<Task>) {
        let rec = task.snapshot();
        let Some(p) = &rec.prepared else { return };
        if p.removed {
            return;
        }
        self.delete_prep_sandbox(task).await;
        self.release_cache(&rec.id).await;
        let path = self.layer_path(&rec.id);
        let removed = tokio::task::spawn_blocking(move || {
            let dir = match std::fs::File::open(&path) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
                Err(_) => return false,
            };
            // Every sandbox stacked on it holds a shared lock while its overlay is mounted.
            match nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(_held) => agentd_runtime::tree::remove_tree(&path).is_ok(),
                Err(_) => false,
            }
        })
        .await
        .unwrap_or(false);
        if removed {
            self.update_prepared(task, |p| p.removed = true);
        }
    }
}

impl TaskManager {
    /// Mounts the dependency cache of the task's image and workspace origin for its
    /// preparation: whether an earlier setup filled it; None without one (turned off, an
    /// uploaded workspace, or in use by another preparation).
    async fn acquire_cache(&self, rec: &TaskRecord) -> Option<bool> {
        let caches = self.caches.clone()?;
        let ws = &rec.request.workspace;
        let origin = match (&ws.git, &ws.path) {
            (Some(url), _) => format!("git {url}"),
            (None, Some(path)) => format!("path {path}"),
            _ => return None,
        };
        let image = rec
            .request
            .image
            .clone()
            .unwrap_or_else(|| crate::sandbox::DEFAULT_IMAGE.to_string());
        let key = crate::cache::Caches::key(&image, &origin);
        let got = tokio::task::spawn_blocking(move || caches.acquire(&key, &origin)).await;
        match got {
            Ok(Ok(Some(cache))) => {
                let reused = cache.reused;
                self.held_caches
                    .lock()
                    .expect("cache lock")
                    .insert(rec.id.clone(), cache);
                Some(reused)
            }
            Ok(Ok(None)) => {
                tracing::info!(task = %rec.id, "the dependency cache is in use: this setup runs without it");
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(task = %rec.id, error = %e, "the dependency cache could not be mounted: this setup runs without it");
                None
            }
            Err(_) => None,
        }
    }

    /// Hands the task's cache to the user of the preparation's sandbox `sb`.
    async fn give_cache(&self, id: &str, sb: &Arc<Sandbox>) {
        let (uid, gid) = sb.snapshot().user;
        let base = self.mgr.config.id_base;
        let dir = self
            .held_caches
            .lock()
            .expect("cache lock")
            .get(id)
            .map(|c| c.dir.clone());
        if let Some(dir) = dir {
            let owner = (base.saturating_add(uid), base.saturating_add(gid));
            let given = tokio::task::spawn_blocking(move || {
                std::os::unix::fs::chown(&dir, Some(owner.0), Some(owner.1))
            })
            .await;
            if !matches!(given, Ok(Ok(()))) {
                tracing::warn!(task = %id, "the dependency cache could not be handed to the sandbox's user");
            }
        }
    }

    /// Unmounts the cache the task's preparation held, if any (its sandbox is gone).
    async fn release_cache(&self, id: &str) {
        let held = self.held_caches.lock().expect("cache lock").remove(id);
        if let (Some(cache), Some(caches)) = (held, self.caches.clone()) {
            let _ = tokio::task::spawn_blocking(move || caches.release(cache)).await;
        }
    }
}

/// Fails once the task is told to stop.
fn still_wanted(task: &Task) -> std::result::Result<(), Outcome> {
    match *task.stop_tx.borrow() {
        Some(_) => Err(Outcome::Lost("the task stopped".into())),
        None => Ok(()),
    }
}

/// Resolves with the state a cancel or a time limit set, once one does.
pub(super) async fn stop_signal(mut rx: watch::Receiver<Option<TaskState>>) -> TaskState {
    loop {
        if let Some(s) = *rx.borrow_and_update() {
            return s;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Records why the task stops, unless it already says.
pub(super) fn set_stop(task: &Task, state: TaskState) {
    task.stop_tx.send_if_modified(|cur| {
        if cur.is_none() {
            *cur = Some(state);
            true
        } else {
            false
        }
    });
}
