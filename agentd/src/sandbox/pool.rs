//! Warm pools: per image, sandboxes started ahead of need (OpenCode ready, then paused), taken
//! by a create or a task attempt that asks for nothing a pooled sandbox cannot become.
//!
//! A pooled sandbox is an ordinary sandbox whose record says `pool` (its image): it is hidden
//! from the API (lists and lookups) until it is claimed, never idles out, and counts against
//! the quotas like any other. A claim ([`Manager::claim`]) makes it the claimer's: its name,
//! labels, limits (written to its cgroup live), timeouts, the model the gateway sends its
//! requests to, and token accounting from zero; then it is thawed. What cannot change in a
//! running sandbox (image, environment, network policy, OpenCode's permissions, a setup
//! command, extra layers, the disk limit) must be the pool's defaults, else the create is a
//! miss and makes its own sandbox.
//!
//! The keeper ([`Manager::pool_keeper`]) refills each pool, one sandbox at a time per image,
//! within the quotas, and removes pooled sandboxes that ended or are more than the pool's
//! size. A create that meets a quota while pooled sandboxes take room stops one of those
//! first ([`Manager::evict_pooled`]). Sizes come from the config (`--warm-pool IMAGE=N`) and
//! `PUT /v1/pools`, which is kept in the database and wins over the config.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{now_ms, CreateSandbox, Manager, Result, Sandbox, SandboxRecord, SandboxState};
use crate::db::POOLS;
use crate::error::Error;

/// How long a pooled sandbox may take to become ready before the refill counts as failed.
const READY_LIMIT: Duration = Duration::from_secs(180);
/// How long a pool waits after a failed refill before it tries again.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// How long a pooled sandbox's warm-up prompt may take.
const WARM_UP_LIMIT: Duration = Duration::from_secs(60);
/// Where the warm-up session runs: OpenCode's own directory.
const WARM_UP_DIR: &str = "";
/// How often the keeper looks at the pools when nothing wakes it.
const TICK: Duration = Duration::from_secs(2);

/// A pool's size as stored.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PoolSize {
    /// Sandboxes kept ready.
    pub size: u32,
}

/// `PUT /v1/pools`: a pool's size.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPool {
    /// The image, as creates name it (`opencode`, an alias or a reference).
    pub image: String,
    /// Sandboxes kept ready (0 empties the pool).
    pub size: u32,
}

/// `GET /v1/pools`.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct PoolList {
    /// Every pool with a size or a pooled sandbox.
    pub pools: Vec<PoolView>,
}

/// A pool as the API shows it.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct PoolView {
    /// The image (as creates name it).
    pub image: String,
    /// Sandboxes it keeps ready.
    pub size: u32,
    /// Pooled sandboxes ready (OpenCode answered) and paused, waiting for a claim.
    pub ready: u32,
    /// Pooled sandboxes not ready: starting or warming up (a claim takes one if no other is
    /// ready), or being removed.
    pub starting: u32,
    /// Creates served from it since agentd started.
    pub hits: u64,
    /// Creates that found it empty since agentd started.
    pub misses: u64,
    /// Sandboxes it started since agentd started.
    pub refills: u64,
    /// Time the last refill took to a ready (paused) sandbox, ms.
    pub last_refill_ms: Option<u64>,
    /// Why the last refill failed, if it did.
    pub last_error: Option<String>,
    /// Refills whose OpenCode warm-up failed since agentd started: those sandboxes are pooled
    /// cold (they work; their claimer's first prompt is slower).
    pub warm_up_failures: u64,
    /// Why the last warm-up failed, if the last one did.
    pub last_warm_up_error: Option<String>,
}

#[derive(Debug, Default)]
struct PoolState {
    size: u32,
    hits: u64,
    misses: u64,
    refills: u64,
    refill_failures: u64,
    refill_seconds: f64,
    last_refill_ms: Option<u64>,
    last_error: Option<String>,
    warm_up_failures: u64,
    last_warm_up_error: Option<String>,
    refilling: bool,
    retry_at: Option<Instant>,
}

/// The pools' sizes and counters. A std mutex: read and updated, never held across an await.
#[derive(Debug, Default)]
pub struct Pools {
    inner: std::sync::Mutex<BTreeMap<String, PoolState>>,
    /// Wakes the keeper (a claim, a miss, a size change).
    wake: tokio::sync::Notify,
}

impl Pools {
    fn inner(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PoolState>> {
        self.inner.lock().expect("pools lock")
    }

    /// The configured size of `image`'s pool (0: none).
    pub fn size(&self, image: &str) -> u32 {
        self.inner().get(image).map_or(0, |p| p.size)
    }

    fn count(&self, image: &str, f: impl FnOnce(&mut PoolState)) {
        f(self.inner().entry(image.to_string()).or_default());
        self.wake.notify_one();
    }
}

/// The pool a create request could be served from: its image's, when it asks for nothing a
/// pooled sandbox cannot become.
pub fn pool_for(req: &CreateSandbox) -> Option<String> {
    let plain = req.pool.is_none()
        && req.env.is_empty()
        && req
            .network
            .as_ref()
            .is_none_or(|n| n.policy() == crate::egress::NetworkPolicy::default())
        && req.command.is_none()
        && req.permissions.is_empty()
        && req.setup.is_none()
        && req.setup_timeout_secs.is_none()
        && req.base_layers.is_empty()
        && req.cache.is_none()
        && req.limits.disk.is_none();
    plain.then(|| {
        req.image
            .clone()
            .unwrap_or_else(|| super::DEFAULT_IMAGE.to_string())
    })
}

impl Manager {
    /// Sets the pools' sizes at start: the config's, then those kept in the database.
    pub(super) fn load_pools(&self) -> anyhow::Result<()> {
        let mut inner = self.pools.inner();
        for (image, size) in &self.config.warm_pools {
            inner.entry(image.clone()).or_default().size = *size;
        }
        for (image, size) in self.db.entries::<PoolSize>(POOLS)? {
            inner.entry(image).or_default().size = size.size;
        }
        Ok(())
    }

    /// Every pool with a size or a pooled sandbox.
    pub fn pools(&self) -> Vec<PoolView> {
        let mut counts: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        for sb in self.list() {
            let r = sb.snapshot();
            if let (Some(image), true) = (&r.pool, r.state.is_live()) {
                let c = counts.entry(image.clone()).or_default();
                // Ready once its refill is done: OpenCode answered and it is paused (and not
                // being removed).
                if r.state == SandboxState::Ready && r.paused_at.is_some() && r.exit.is_none() {
                    c.0 += 1;
                } else {
                    c.1 += 1;
                }
            }
        }
        let inner = self.pools.inner();
        let mut images: Vec<&String> = inner.keys().chain(counts.keys()).collect();
        images.sort();
        images.dedup();
        images
            .into_iter()
            .map(|image| {
                let p = inner.get(image);
                let (ready, starting) = counts.get(image).copied().unwrap_or_default();
                PoolView {
                    image: image.clone(),
                    size: p.map_or(0, |p| p.size),
                    ready,
                    starting,
                    hits: p.map_or(0, |p| p.hits),
                    misses: p.map_or(0, |p| p.misses),
                    refills: p.map_or(0, |p| p.refills),
                    last_refill_ms: p.and_then(|p| p.last_refill_ms),
                    last_error: p.and_then(|p| p.last_error.clone()),
                    warm_up_failures: p.map_or(0, |p| p.warm_up_failures),
                    last_warm_up_error: p.and_then(|p| p.last_warm_up_error.clone()),
                }
            })
            .collect()
    }

    /// Sets the size of `image`'s pool (kept in the database); the keeper fills or shrinks it.
    pub async fn set_pool(&self, image: &str, size: u32) -> Result<PoolView> {
        let max = crate::daemon::config::MAX_POOL_SIZE;
        if size > max {
            return Err(Error::Invalid(format!("size must be at most {max}")));
        }
        if size > 0 {
            // Refused now rather than failing in the background: the image must be there.
            let req = CreateSandbox {
                image: Some(image.to_string()),
                ..CreateSandbox::default()
            };
            self.validate_create(&req)?;
            if image != crate::default_image::NAME {
                let store = self.store.clone();
                let name = image.to_string();
                tokio::task::spawn_blocking(move || store.resolve(&name))
                    .await
                    .map_err(Error::internal)?
                    .map_err(|_| {
                        Error::Invalid(format!(
                            "unknown image {image:?}: pull or import it first (agentd image pull|import)"
                        ))
                    })?;
            }
        }
        self.db.put(POOLS, image, &PoolSize { size })?;
        self.pools.count(image, |p| {
            p.size = size;
            p.retry_at = None;
            p.last_error = None;
        });
        tracing::info!(image, size, "warm pool size set");
        Ok(self
            .pools()
            .into_iter()
            .find(|p| p.image == image)
            .expect("the pool just set is listed"))
    }

    /// Takes a ready (else a starting) sandbox from `image`'s pool for `req`, whose limits
    /// are `limits`; `None` when the pool has none (a miss). Under the create lock, so the
    /// same pooled sandbox is never claimed twice and quotas hold.
    pub(super) async fn claim(
        &self,
        req: &CreateSandbox,
        image: &str,
        limits: &agentd_runtime::Limits,
    ) -> Result<Option<SandboxRecord>> {
        if self.pools.size(image) == 0 && !self.has_pooled(image) {
            return Ok(None);
        }
        self.check_budget(req.budget.as_ref(), req.model.as_deref())?;
        if let Some(model) = &req.model {
            self.check_model(model).await?;
            // A pooled OpenCode speaks its default model's upstream's protocol: the gateway
            // can give a claim another model there, not another upstream.
            let upstream = |m: &str| {
                crate::gateway::upstream::resolve(&self.config.llm, m).map(|(u, _)| u.name.clone())
            };
            if upstream(model) != upstream(&self.config.llm_model) {
                self.pools.count(image, |p| p.misses += 1);
                return Ok(None);
            }
        }
        let guard = self.create_lock.lock().await;
        let live: Vec<(Arc<Sandbox>, SandboxRecord)> = self
            .list()
            .into_iter()
            .map(|s| {
                let r = s.snapshot();
                (s, r)
            })
            .filter(|(_, r)| r.state.is_live())
            .collect();
        if let Some(name) = &req.name {
            if live.iter().any(|(_, r)| r.name.as_deref() == Some(name)) {
                return Err(Error::Conflict(format!("a sandbox named {name:?} exists")));
            }
        }
        let wants_opencode = req.opencode;
        let pick = live
            .iter()
            .filter(|(_, r)| {
                r.pool.as_deref() == Some(image)
                    && r.exit.is_none()
                    && matches!(r.state, SandboxState::Ready | SandboxState::Starting)
                    && wants_opencode.is_none_or(|o| o == r.opencode.is_some())
            })
            // Warmed and paused first, then ready, then the oldest.
            .min_by_key(|(_, r)| {
                (
                    r.paused_at.is_none(),
                    r.state != SandboxState::Ready,
                    r.created_at,
                )
            });
        let Some((sb, rec)) = pick.cloned() else {
            self.pools.count(image, |p| p.misses += 1);
            return Ok(None);
        };
        let memory = limits.memory_bytes.unwrap_or(self.config.sandbox_memory);
        let committed: u64 = live.iter().map(|(_, r)| r.memory_bytes).sum();
        if committed - rec.memory_bytes + memory > self.config.max_memory {
            // As a create would be refused: the same words.
            return Err(Error::Quota(format!(
                "{memory} bytes more would commit {} of {} bytes of memory (max_memory): stop a sandbox or ask for less",
                committed - rec.memory_bytes + memory,
                self.config.max_memory
            )));
        }
        let _one = sb.freezer.lock().await;
        let cgroup = self.runtime.cgroup(&rec.id);
        let (cpus, pids) = (limits.cpus, limits.pids.unwrap_or(self.config.sandbox_pids));
        let set = tokio::task::spawn_blocking(move || {
            cgroup.set_limits(memory, cpus, pids)?;
            cgroup.freeze(false)
        })
        .await
        .map_err(Error::internal)?;
        if let Err(e) = set {
            // Left in the pool (the keeper replaces it if it is broken); this create makes
            // its own sandbox.
            tracing::warn!(sandbox = %rec.id, error = %agentd_runtime::error_chain(&e), "a pooled sandbox could not take the claim's limits");
            self.pools.count(image, |p| p.misses += 1);
            return Ok(None);
        }
        let previous = rec.clone();
        {
            let now = now_ms();
            let mut r = sb.record.lock().expect("sandbox record lock");
            r.pool = None;
            r.paused_at = None;
            r.name = req.name.clone();
            r.labels = req.labels.clone();
            r.memory_bytes = memory;
            r.cpus = cpus;
            r.pids = Some(pids);
            r.idle_timeout_secs = req.idle_timeout_secs.unwrap_or(self.config.idle_timeout);
            r.idle_action = req.idle_action.unwrap_or_default();
            r.ttl_secs = req.ttl_secs;
            r.created_at = now;
            if r.state == SandboxState::Ready {
                r.ready_at = Some(now);
            }
            r.usage = super::Usage::default();
            let started_with = &self.config.llm_model;
            r.model = req.model.clone().filter(|m| m != started_with);
            r.budget_tokens = req.budget.as_ref().and_then(|b| b.tokens);
            r.budget_cost = req.budget.as_ref().and_then(|b| b.cost);
        }
        if let Err(e) = self.persist(&sb) {
            // Not acknowledged: the record goes back to the pool's (the sandbox stays
            // thawed, which only costs it CPU until the keeper pauses or replaces it).
            *sb.record.lock().expect("sandbox record lock") = previous;
            return Err(e);
        }
        drop(guard);
        sb.touch();
        self.pools.count(image, |p| p.hits += 1);
        tracing::info!(sandbox = %rec.id, image, "claimed from the warm pool");
        Ok(Some(sb.snapshot()))
    }

    fn has_pooled(&self, image: &str) -> bool {
        self.list()
            .iter()
            .any(|s| s.snapshot().pool.as_deref() == Some(image))
    }

    /// Stops the newest unclaimed pooled sandbox, to make room for a create that met a quota;
    /// whether there was one.
    pub(super) async fn evict_pooled(&self) -> bool {
        let victim = self
            .list()
            .into_iter()
            .filter(|s| {
                let r = s.snapshot();
                r.pool.is_some() && r.state.is_live()
            })
            .max_by_key(|s| s.snapshot().created_at);
        let Some(sb) = victim else {
            return false;
        };
        tracing::info!(sandbox = %sb.snapshot().id, "a pooled sandbox makes room for a create");
        self.retire_pooled(&sb, "it made room for a create").await
    }

    /// Deletes a pooled sandbox unless a claim took it: checked under the create lock (which
    /// claims hold), where it is also marked as stopping (`exit`), which no claim takes; the
    /// delete itself runs after the lock is released. Whether it was deleted.
    async fn retire_pooled(&self, sb: &Arc<Sandbox>, reason: &str) -> bool {
        {
            let _guard = self.create_lock.lock().await;
            let mut r = sb.record.lock().expect("sandbox record lock");
            if r.pool.is_none() {
                return false;
            }
            // Ended by us, not by itself (a pooled sandbox that died is no retirement).
            if r.state.is_live() {
                sb.retired.store(true, Ordering::SeqCst);
            }
            if r.state.is_live() && r.exit.is_none() {
                r.exit = Some(super::ExitInfo {
                    code: None,
                    oom_killed: false,
                    reason: reason.to_string(),
                    log_tail: String::new(),
                });
            }
        }
        let _ = self.delete(sb).await;
        true
    }

    /// Keeps the pools filled (and no fuller than their sizes); runs until agentd stops.
    pub async fn pool_keeper(self: Arc<Self>) {
        let mut stopping = self.shutdown.subscribe();
        loop {
            if *stopping.borrow_and_update() {
                return;
            }
            let pooled: Vec<(Arc<Sandbox>, SandboxRecord)> = self
                .list()
                .into_iter()
                .filter_map(|s| {
                    let r = s.snapshot();
                    r.pool.is_some().then_some((s, r))
                })
                .collect();
            // Ended ones go (a pooled sandbox nobody claimed has nothing worth keeping).
            for (sb, r) in &pooled {
                if !r.state.is_live() {
                    let (me, sb) = (self.clone(), sb.clone());
                    tokio::spawn(async move { me.retire_pooled(&sb, "it ended").await });
                }
            }
            let sizes: Vec<(String, u32)> = self
                .pools
                .inner()
                .iter()
                .map(|(k, p)| (k.clone(), p.size))
                .collect();
            let mut images: Vec<String> = sizes.iter().map(|(k, _)| k.clone()).collect();
            images.extend(pooled.iter().filter_map(|(_, r)| r.pool.clone()));
            images.sort();
            images.dedup();
            for image in images {
                let size = sizes
                    .iter()
                    .find(|(k, _)| *k == image)
                    .map_or(0, |(_, s)| *s);
                let mut mine: Vec<&(Arc<Sandbox>, SandboxRecord)> = pooled
                    .iter()
                    .filter(|(_, r)| r.pool.as_deref() == Some(&image) && r.state.is_live())
                    .collect();
                // The newest go first when the pool shrank.
                mine.sort_by_key(|(_, r)| std::cmp::Reverse(r.created_at));
                let have = u32::try_from(mine.len()).unwrap_or(u32::MAX);
                for (sb, _) in mine.iter().take(have.saturating_sub(size) as usize) {
                    let (me, sb) = (self.clone(), sb.clone());
                    tokio::spawn(
                        async move { me.retire_pooled(&sb, "the warm pool shrank").await },
                    );
                }
                if have < size {
                    let start = {
                        let mut inner = self.pools.inner();
                        let p = inner.entry(image.clone()).or_default();
                        let due = p.retry_at.is_none_or(|t| Instant::now() >= t);
                        let start = due && !p.refilling;
                        if start {
                            p.refilling = true;
                        }
                        start
                    };
                    if start {
                        let me = self.clone();
                        tokio::spawn(async move { me.refill(image).await });
                    }
                }
            }
            tokio::select! {
                () = self.pools.wake.notified() => {}
                () = tokio::time::sleep(TICK) => {}
                _ = stopping.changed() => {}
            }
        }
    }

    /// Starts one sandbox for `image`'s pool and pauses it once OpenCode is ready.
    async fn refill(self: Arc<Self>, image: String) {
        let t = Instant::now();
        let outcome = self.refill_one(&image).await;
        let took = t.elapsed();
        self.pools.count(&image, |p| {
            p.refilling = false;
            match &outcome {
                // Let go of on purpose while it started: no refill, no failure.
                Ok(false) => {}
                Ok(true) => {
                    p.refills += 1;
                    p.refill_seconds += took.as_secs_f64();
                    p.last_refill_ms = Some(u64::try_from(took.as_millis()).unwrap_or(u64::MAX));
                    p.last_error = None;
                    p.retry_at = None;
                }
                Err(e) => {
                    p.refill_failures += 1;
                    p.last_error = Some(e.to_string());
                    p.retry_at = Some(Instant::now() + RETRY_AFTER);
                }
            }
        });
        match outcome {
            Ok(true) => {
                tracing::info!(image, ms = took.as_secs_f64() * 1e3, "warm pool refilled")
            }
            Ok(false) => tracing::debug!(image, "a starting pooled sandbox was let go"),
            // A pool at a quota waits for room quietly; anything else is worth a warning.
            Err(Error::Quota(m)) => tracing::debug!(image, reason = %m, "warm pool waits for room"),
            Err(e) => tracing::warn!(image, error = %e, "warm pool refill failed"),
        }
    }

    /// Ok(false): the pool let the new sandbox go on purpose before it was ready.
    async fn refill_one(self: &Arc<Self>, image: &str) -> Result<bool> {
        let req = CreateSandbox {
            image: Some(image.to_string()),
            // Never idle while it waits; the claim sets the claimer's timeouts.
            idle_timeout_secs: Some(0),
            pool: Some(image.to_string()),
            ..CreateSandbox::default()
        };
        let rec = self.create(req).await?;
        let sb = self
            .map()
            .get(&rec.id)
            .cloned()
            .ok_or_else(|| Error::internal(format!("pooled sandbox {} vanished", rec.id)))?;
        match tokio::time::timeout(READY_LIMIT, sb.wait_ready()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) if sb.retired.load(Ordering::SeqCst) => return Ok(false),
            Ok(Err(why)) => {
                return Err(Error::Unavailable(format!(
                    "a pooled sandbox of {image} did not become ready: {why}"
                )));
            }
            Err(_) => {
                // Unless a claim took it while it started: then it is the claimer's.
                self.retire_pooled(&sb, "it was not ready in time").await;
                return Err(Error::Unavailable(format!(
                    "a pooled sandbox of {image} was not ready within {} s",
                    READY_LIMIT.as_secs()
                )));
            }
        }
        // Claimed while it started: it is the claimer's now, not to be paused.
        if sb.snapshot().pool.is_none() {
            return Ok(true);
        }
        // A claim may take it while it warms up: the warm-up session is then left behind
        // (deleted by the warm-up's end if it gets there), which costs the claimer nothing.
        let warmed = self.warm_up(&sb).await;
        if let Err(e) = &warmed {
            // A cold OpenCode still works: only the claimer's first prompt is slower.
            tracing::warn!(sandbox = %rec.id, error = %e, "the pooled sandbox's OpenCode warm-up failed");
        }
        self.pools.count(image, |p| match warmed {
            Ok(()) => p.last_warm_up_error = None,
            Err(e) => {
                p.warm_up_failures += 1;
                p.last_warm_up_error = Some(e);
            }
        });
        if sb.snapshot().pool.is_none() {
            return Ok(true);
        }
        self.pause_pooled(&sb).await.map(|()| true)
    }

    /// Runs one prompt through a pooled sandbox's OpenCode (its gateway answers it at once,
    /// without the upstream: no tokens), so that what OpenCode does on its first prompt
    /// (loading the provider SDK, the tools, the system prompt) is done before a claim;
    /// then deletes that session. In OpenCode's own directory (the image's working
    /// directory), where a claimer's sessions go unless they name another: OpenCode sets
    /// up each directory it is asked about once (its project, plugins, configuration),
    /// and that is most of a first prompt's time.
    async fn warm_up(&self, sb: &Arc<Sandbox>) -> std::result::Result<(), String> {
        let rec = sb.snapshot();
        let Some(secrets) = rec.opencode else {
            return Ok(());
        };
        let oc = crate::opencode::client::Client::new(
            &self.http,
            rec.address,
            &secrets.password,
            WARM_UP_DIR,
        );
        let t = Instant::now();
        let session = oc.create_session("agentd warm-up").await?;
        oc.prompt(&session, "Reply with ok.").await?;
        let answered = async {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                // Claimed meanwhile: the claimer's now, so the warm-up stops at once (its
                // requests would reach the upstream on the claimer's account).
                if sb.snapshot().pool.is_none() {
                    let _ = oc.abort(&session).await;
                    return;
                }
                if oc.last_message(&session).await.is_some() && oc.is_idle(&session).await {
                    return;
                }
            }
        };
        let done = tokio::time::timeout(WARM_UP_LIMIT, answered).await;
        let _ = oc.delete_session(&session).await;
        done.map_err(|_| format!("no answer within {} s", WARM_UP_LIMIT.as_secs()))?;
        tracing::debug!(sandbox = %rec.id, ms = t.elapsed().as_secs_f64() * 1e3, "pooled OpenCode warmed up");
        Ok(())
    }

    /// Pauses a pooled sandbox unless a claim took it meanwhile (checked under the freezer
    /// lock, which a claim holds while it thaws).
    async fn pause_pooled(&self, sb: &Arc<Sandbox>) -> Result<()> {
        let _one = sb.freezer.lock().await;
        let rec = sb.snapshot();
        if rec.pool.is_none() || rec.state != SandboxState::Ready || rec.paused_at.is_some() {
            return Ok(());
        }
        self.freeze(&rec.id, true).await?;
        sb.record.lock().expect("sandbox record lock").paused_at = Some(now_ms());
        if let Err(e) = self.persist(sb) {
            sb.record.lock().expect("sandbox record lock").paused_at = None;
            let _ = self.freeze(&rec.id, false).await;
            return Err(e);
        }
        Ok(())
    }

    /// The pools' lines of `GET /metrics`.
    pub fn render_pool_metrics(&self) -> String {
        let views = self.pools();
        let inner = self.pools.inner();
        let mut out = String::new();
        let mut family =
            |name: &str, kind: &str, help: &str, value: &dyn Fn(&PoolView) -> String| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for v in &views {
                    let _ = writeln!(out, "{name}{{image=\"{}\"}} {}", v.image, value(v));
                }
            };
        family(
            "agentd_pool_size",
            "gauge",
            "Sandboxes a warm pool keeps ready.",
            &|v| v.size.to_string(),
        );
        family(
            "agentd_pool_ready",
            "gauge",
            "Pooled sandboxes ready to be claimed.",
            &|v| v.ready.to_string(),
        );
        family(
            "agentd_pool_hits_total",
            "counter",
            "Creates served from a warm pool.",
            &|v| v.hits.to_string(),
        );
        family(
            "agentd_pool_misses_total",
            "counter",
            "Creates that found their warm pool empty.",
            &|v| v.misses.to_string(),
        );
        family(
            "agentd_pool_refill_seconds_sum",
            "counter",
            "Time refills took, to a ready and paused sandbox.",
            &|v| {
                inner
                    .get(&v.image)
                    .map_or(0.0, |p| p.refill_seconds)
                    .to_string()
            },
        );
        family(
            "agentd_pool_refill_seconds_count",
            "counter",
            "Refills that succeeded.",
            &|v| v.refills.to_string(),
        );
        family(
            "agentd_pool_refill_failures_total",
            "counter",
            "Refills that failed.",
            &|v| {
                inner
                    .get(&v.image)
                    .map_or(0, |p| p.refill_failures)
                    .to_string()
            },
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_only_plain_requests_are_served_from_a_pool() {
        let req = |v: serde_json::Value| serde_json::from_value::<CreateSandbox>(v).unwrap();
        assert_eq!(
            pool_for(&req(serde_json::json!({}))).as_deref(),
            Some("opencode")
        );
        let claimable = req(serde_json::json!({
            "image": "x", "name": "n", "labels": {"a": "b"}, "model": "m2",
            "limits": {"memory": "1g", "cpus": 0.5, "pids": 100},
            "idle_timeout_secs": 60, "ttl_secs": 600, "network": "none"
        }));
        assert_eq!(pool_for(&claimable).as_deref(), Some("x"));
        for v in [
            serde_json::json!({"env": {"A": "1"}}),
            serde_json::json!({"network": {"mode": "allowlist", "allow": ["a.example"]}}),
            serde_json::json!({"permissions": {"bash": "ask"}}),
            serde_json::json!({"setup": "true"}),
            serde_json::json!({"limits": {"disk": "1g"}}),
            serde_json::json!({"opencode": false, "command": ["sleep", "1"]}),
        ] {
            assert_eq!(pool_for(&req(v.clone())), None, "{v}");
        }
        let mut pooled = req(serde_json::json!({}));
        pooled.pool = Some("opencode".into());
        assert_eq!(
            pool_for(&pooled),
            None,
            "a pool's own create is never a claim"
        );
    }
}
