//! The sandbox manager: creates sandboxes from images, supervises them, stops and reaps them,
//! and reconciles with what is left after an agentd restart.
//!
//! Every sandbox has: a record in the database (the source of truth across restarts), a shim
//! (started through `agentd_runtime::Runtime`, outlives agentd), an overlay rootfs over the
//! image's shared layers (mounted and unmounted by the shim), a cgroup, a user namespace whose
//! ids 0-65535 map to the daemon's id range, and its own netns with a veth on agentd's bridge.
//!
//! Ownership of what a sandbox uses, and who removes it:
//! - the shim removes the container, cgroups, overlay mount and state dir (`Delete`);
//! - [`Manager::finish`] moves the logs out first, then deletes through the shim (or cleans up
//!   after a dead shim with `Runtime::cleanup`), then removes the veth pair if it survived;
//! - a failed create rolls back whatever it made, in reverse order;
//! - [`Manager::reconcile`] at start handles sandboxes whose owner (an earlier agentd) died.
//!
//! All sandboxes of the daemon share one host id range (like docker's userns-remap), so the
//! image layers are unpacked once with their owners shifted into it and shared by every
//! sandbox. Sandboxes are kept apart by their namespaces, not by distinct host ids.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentd_images::{Store, UnpackOptions};
use agentd_runtime::{
    layout, IdMap, Limits, NetworkMode, Rootfs, Runtime, SandboxSpec, SandboxStatus, VethConfig,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::daemon::config::Config;
use crate::db::{Db, SANDBOXES};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::net::Network;

/// Cgroup parent of the daemon's sandboxes (apart from `agentd run`'s).
pub const CGROUP_PARENT: &str = "agentd/serve";
/// Bytes of a log kept in the record when a sandbox ends.
pub const LOG_TAIL_BYTES: u64 = 4096;
/// Seconds a stop waits after SIGTERM before the shim kills everything.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a second finish of a sandbox waits for the first (which waits at most for the
/// shim's delete, 30 s, its exit, 10 s, and a cleanup).
const FINISH_WAIT: Duration = Duration::from_secs(120);
/// The image a sandbox gets when the request names none.
pub const DEFAULT_IMAGE: &str = "opencode";
/// How long the upstream's model list is trusted before it is read again.
const MODELS_CACHE: Duration = Duration::from_secs(60);

/// What the manager's operations return.
pub mod fs;

pub type Result<T> = std::result::Result<T, Error>;

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Resources are being made.
    Creating,
    /// Running; its OpenCode server is not answering yet.
    Starting,
    /// Running and usable (OpenCode answers, for OpenCode sandboxes).
    Ready,
    /// Its command exited (or OpenCode died); every resource is freed.
    Exited,
    /// Stopped by a request, the idle timeout or the TTL; every resource is freed.
    Stopped,
}

impl SandboxState {
    /// Whether the sandbox holds resources.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            SandboxState::Creating | SandboxState::Starting | SandboxState::Ready
        )
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Starting => "starting",
            SandboxState::Ready => "ready",
            SandboxState::Exited => "exited",
            SandboxState::Stopped => "stopped",
        }
    }
}

/// Token usage through the LLM gateway.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct Usage {
    /// Requests forwarded.
    pub requests: u64,
    /// Prompt tokens the upstream reported.
    pub prompt_tokens: u64,
    /// Completion tokens the upstream reported.
    pub completion_tokens: u64,
}

/// How a sandbox ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct ExitInfo {
    /// Exit status of its command (128+N for signal N), if known.
    pub code: Option<i32>,
    /// The OOM killer killed a process of it.
    pub oom_killed: bool,
    /// Why it ended, in words.
    pub reason: String,
    /// The end of its stderr (and stdout), for a quick diagnosis.
    pub log_tail: String,
}

/// A sandbox's secrets: never shown on the API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenCodeSecrets {
    /// OpenCode's server password.
    pub password: String,
    /// The token OpenCode presents to agentd's LLM gateway.
    pub gateway_token: String,
}

/// A sandbox as stored in the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Id (12 hex chars).
    pub id: String,
    /// Optional unique name.
    pub name: Option<String>,
    /// The image as requested.
    pub image: String,
    /// Manifest digest of the image.
    pub image_digest: String,
    /// State.
    pub state: SandboxState,
    /// Unix time (ms) of creation.
    pub created_at: u64,
    /// Unix time (ms) when it became ready.
    pub ready_at: Option<u64>,
    /// Its address on the bridge.
    pub address: Ipv4Addr,
    /// Memory limit, bytes.
    pub memory_bytes: u64,
    /// CPU limit in cores.
    pub cpus: Option<f64>,
    /// Task limit.
    pub pids: Option<u64>,
    /// Size of the writable layer, bytes (None: unbounded, or created before disk limits).
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// Idle timeout, seconds (0: never).
    pub idle_timeout_secs: u64,
    /// Lifetime limit, seconds.
    pub ttl_secs: Option<u64>,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// OpenCode runs in it (its secrets).
    pub opencode: Option<OpenCodeSecrets>,
    /// Uid and gid (inside) of the image's user: files put into it belong to them.
    pub user: (u32, u32),
    /// Gateway usage.
    pub usage: Usage,
    /// How it ended.
    pub exit: Option<ExitInfo>,
}

/// A size given as bytes or as text like `2g`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum SizeValue {
    /// Bytes.
    Bytes(u64),
    /// Human text.
    Text(String),
}

impl SizeValue {
    fn bytes(&self, field: &str) -> Result<u64> {
        match self {
            SizeValue::Bytes(b) => Ok(*b),
            SizeValue::Text(t) => {
                agentd_runtime::parse_size(t).map_err(|e| Error::Invalid(format!("{field}: {e}")))
            }
        }
    }
}

/// Requested limits.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// Memory limit (bytes or `2g`).
    pub memory: Option<SizeValue>,
    /// CPU cores.
    pub cpus: Option<f64>,
    /// Most tasks.
    pub pids: Option<u64>,
    /// Size of the writable layer (bytes or `10g`): bytes and inodes written beyond it fail
    /// with ENOSPC inside.
    pub disk: Option<SizeValue>,
}

/// `POST /v1/sandboxes`: what a sandbox is made of. Also its JSON Schema in the OpenAPI
/// document (from these fields and their comments).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Image name or reference [default: opencode].
    pub image: Option<String>,
    /// Unique name.
    pub name: Option<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Limits.
    #[serde(default)]
    pub limits: LimitsRequest,
    /// Network mode: only `none` (no egress) for now.
    pub network: Option<String>,
    /// Idle timeout, seconds (0: never).
    pub idle_timeout_secs: Option<u64>,
    /// Lifetime, seconds.
    pub ttl_secs: Option<u64>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Start OpenCode [default: whether the image carries it].
    pub opencode: Option<bool>,
    /// Command of a non-OpenCode sandbox [default: none, the sandbox idles until stopped].
    pub command: Option<Vec<String>>,
    /// Model OpenCode uses through the gateway [default: agentd's `llm_model`].
    pub model: Option<String>,
}

/// What a command run to completion with [`Manager::exec_collect`] did.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    /// Exit status (128+N for signal N); `None` if the process was lost.
    pub code: Option<i32>,
    /// Its stdout (the last `max_output` bytes).
    pub stdout: Vec<u8>,
    /// Its stderr (the last `max_output` bytes).
    pub stderr: Vec<u8>,
    /// It was killed at the timeout.
    pub timed_out: bool,
    /// Output beyond `max_output` bytes was dropped (from the front).
    pub truncated: bool,
    /// Why `code` is `None`.
    pub error: Option<String>,
}

/// A live sandbox in memory.
pub struct Sandbox {
    /// The record; written to the database on every change. A std mutex: held only to read
    /// or update fields, never across an await.
    pub record: Mutex<SandboxRecord>,
    /// Unix time (ms) of the last API request that touched it.
    pub last_activity: AtomicU64,
    /// Requests to it in flight (proxied streams keep it from being idle).
    pub active: AtomicUsize,
    /// Chat requests of this sandbox the LLM gateway is forwarding now.
    pub gateway_requests: AtomicUsize,
    /// Changes when the state does; waiters watch it.
    pub state_tx: watch::Sender<SandboxState>,
    /// Set by the first [`Manager::finish`]: its resources are being freed.
    ending: std::sync::atomic::AtomicBool,
}

impl Sandbox {
    /// Waits until the sandbox is no longer live, at most `limit`; whether it ended.
    pub async fn wait_ended(&self, limit: Duration) -> bool {
        let mut rx = self.state_tx.subscribe();
        tokio::time::timeout(limit, async {
            while rx.borrow_and_update().is_live() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await
        .is_ok()
    }

    fn new(record: SandboxRecord) -> Arc<Self> {
        let (state_tx, _) = watch::channel(record.state);
        Arc::new(Sandbox {
            record: Mutex::new(record),
            last_activity: AtomicU64::new(now_ms()),
            active: AtomicUsize::new(0),
            gateway_requests: AtomicUsize::new(0),
            state_tx,
            ending: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A copy of the record.
    pub fn snapshot(&self) -> SandboxRecord {
        self.record.lock().expect("sandbox record lock").clone()
    }

    /// Notes API traffic.
    pub fn touch(&self) {
        self.last_activity.store(now_ms(), Ordering::Relaxed);
    }
}

/// Keeps a sandbox busy while a request to it runs.
pub struct ActiveGuard(Arc<Sandbox>);

impl ActiveGuard {
    /// Marks `sb` busy until the guard drops.
    pub fn new(sb: Arc<Sandbox>) -> Self {
        sb.active.fetch_add(1, Ordering::Relaxed);
        sb.touch();
        ActiveGuard(sb)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a create decided before it holds anything: limits, image, command.
struct Plan {
    /// Validated limits.
    limits: Limits,
    /// Memory limit, bytes (the request's or the default).
    memory: u64,
    /// The image as requested.
    image_name: String,
    /// Its rootfs layers and config.
    image: agentd_images::ImageRootfs,
    /// OpenCode runs in it.
    opencode: bool,
    /// The image's env, workdir and user.
    defaults: crate::image_spec::ImageDefaults,
    /// What runs (OpenCode's command, the request's, or nothing: the sandbox idles).
    args: Vec<String>,
}

/// The error for a request that gives both a command and OpenCode.
fn exclusive_error() -> Error {
    Error::Invalid(
        "command and opencode are exclusive: OpenCode is the command of an OpenCode sandbox".into(),
    )
}

/// Checks the names of environment variables a client sets (a sandbox's or an exec's).
pub fn validate_env(env: &BTreeMap<String, String>) -> Result<()> {
    for k in env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(Error::Invalid(format!(
                "invalid environment variable name {k:?}"
            )));
        }
    }
    Ok(())
}

/// Checks a model name a client asks for (it goes into OpenCode's config as text).
pub fn validate_model(model: Option<&str>) -> Result<()> {
    match model {
        Some(m) if m.is_empty() || m.len() > 200 || m.chars().any(char::is_control) => Err(
            Error::Invalid("model must be 1-200 printable characters".into()),
        ),
        _ => Ok(()),
    }
}

/// Unix time in ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .is_ok();
    assert!(ok, "cannot read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sandbox service.
pub struct Manager {
    /// Validated config.
    pub config: Config,
    /// The database.
    pub db: Db,
    /// Starts and finds shims.
    pub runtime: Runtime,
    /// The image store.
    pub store: Arc<Store>,
    /// Bridge and subnet.
    pub net: Network,
    /// Metrics.
    pub metrics: Metrics,
    /// Every sandbox with a record, by id. A std mutex: map lookups only, never across await.
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    /// Serializes creates' quota checks and address choice with each other.
    create_lock: tokio::sync::Mutex<()>,
    /// One build of the default image at a time.
    build_lock: tokio::sync::Mutex<()>,
    /// The task service, set once at start (it holds this manager: both live as long as the
    /// daemon).
    pub tasks: std::sync::OnceLock<Arc<crate::task::TaskManager>>,
    /// Becomes true when agentd is stopping: open streams end with a line that says so.
    pub shutdown: watch::Sender<bool>,
    /// The upstream's model list and when it was read (`None` inside: it gave none).
    /// A std mutex: read and replaced, never held across an await.
    models: Mutex<Option<(Instant, Option<Vec<String>>)>>,
    /// HTTP client for the sandboxes' OpenCode servers.
    pub http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        crate::http::Body,
    >,
}

impl Manager {
    /// Opens the state and sets up the network; call [`Manager::reconcile`] next.
    pub fn new(config: Config) -> anyhow::Result<Arc<Manager>> {
        use anyhow::Context;
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("failed to create {}", config.state_dir.display()))?;
        std::fs::create_dir_all(config.sandboxes_dir())?;
        std::fs::create_dir_all(config.state_dir.join("logs"))?;
        // Uploads under way when agentd stopped are debris.
        let _ = std::fs::remove_dir_all(config.state_dir.join("tmp"));
        let db = Db::open(&config.db_path())?;
        let store = Store::open(config.images_dir()).with_context(|| {
            format!(
                "failed to open the image store in {}",
                config.images_dir().display()
            )
        })?;
        let net = Network::setup(&config.bridge, config.subnet, config.prefix_len)
            .context("failed to set up the sandbox bridge")?;
        net.firewall(config.gateway_port)
            .context("failed to keep sandboxes off the host's ports")?;
        let runtime =
            Runtime::new(config.sandboxes_dir()).with_cgroup_parent(config.cgroup_parent.clone());
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Ok(Arc::new(Manager {
            config,
            db,
            runtime,
            store: Arc::new(store),
            net,
            metrics: Metrics::default(),
            sandboxes: Mutex::new(HashMap::new()),
            create_lock: tokio::sync::Mutex::new(()),
            build_lock: tokio::sync::Mutex::new(()),
            tasks: std::sync::OnceLock::new(),
            http,
            models: Mutex::new(None),
            shutdown: watch::channel(false).0,
        }))
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.sandboxes.lock().expect("sandbox map lock")
    }

    /// Every sandbox.
    pub fn list(&self) -> Vec<Arc<Sandbox>> {
        let mut v: Vec<_> = self.map().values().cloned().collect();
        v.sort_by_key(|s| s.snapshot().created_at);
        v
    }

    /// A sandbox by id or name.
    pub fn get(&self, key: &str) -> Result<Arc<Sandbox>> {
        let map = self.map();
        if let Some(sb) = map.get(key) {
            return Ok(sb.clone());
        }
        map.values()
            .find(|s| s.snapshot().name.as_deref() == Some(key))
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no sandbox {key:?}")))
    }

    /// Writes the record durably; a failure is logged and returned.
    fn persist(&self, sb: &Sandbox) -> Result<()> {
        let rec = sb.snapshot();
        self.db.put(SANDBOXES, &rec.id, &rec).map_err(|e| {
            tracing::error!(sandbox = %rec.id, error = %agentd_runtime::error_chain(&e), "failed to persist sandbox");
            Error::from(e)
        })
    }

    fn set_state(&self, sb: &Sandbox, state: SandboxState, f: impl FnOnce(&mut SandboxRecord)) {
        {
            let mut r = sb.record.lock().expect("sandbox record lock");
            r.state = state;
            f(&mut r);
        }
        // A state the database could not keep is still the state (the sandbox did end):
        // memory follows the facts, and the next start reconciles the record with the shim.
        let _ = self.persist(sb);
        sb.state_tx.send_replace(state);
    }

    /// As [`Manager::set_state`], written without waiting for the disk (see `Db::put_lazy`).
    fn set_state_lazy(
        &self,
        sb: &Sandbox,
        state: SandboxState,
        f: impl FnOnce(&mut SandboxRecord),
    ) {
        let rec = {
            let mut r = sb.record.lock().expect("sandbox record lock");
            r.state = state;
            f(&mut r);
            r.clone()
        };
        self.persist_lazy(&rec);
        sb.state_tx.send_replace(state);
    }

    /// Updates the usage counters (written lazily: the next durable write of any record makes
    /// them durable too).
    pub fn add_usage(&self, sb: &Sandbox, prompt: u64, completion: u64) {
        let rec = {
            let mut r = sb.record.lock().expect("sandbox record lock");
            r.usage.requests += 1;
            r.usage.prompt_tokens += prompt;
            r.usage.completion_tokens += completion;
            r.clone()
        };
        self.persist_lazy(&rec);
    }

    /// Writes `rec` without waiting for the disk (see `Db::put_lazy`); a failure is logged.
    fn persist_lazy(&self, rec: &SandboxRecord) {
        if let Err(e) = self.db.put_lazy(SANDBOXES, &rec.id, rec) {
            tracing::error!(sandbox = %rec.id, error = %agentd_runtime::error_chain(&e), "failed to persist sandbox");
        }
    }

    /// The sandbox whose OpenCode presents `token` to the gateway from `from`.
    pub fn by_gateway_token(&self, token: &str, from: Ipv4Addr) -> Option<Arc<Sandbox>> {
        self.map()
            .values()
            .find(|s| {
                let r = s.record.lock().expect("sandbox record lock");
                r.state.is_live()
                    && r.address == from
                    && r.opencode.as_ref().is_some_and(|o| {
                        constant_time_eq(o.gateway_token.as_bytes(), token.as_bytes())
                    })
            })
            .cloned()
    }

    /// See [`validate_create`].
    pub fn validate_create(&self, req: &CreateSandbox) -> Result<(Limits, String)> {
        validate_create(&self.config, req)
    }

    /// The rootfs of image `image_name`: its layers with owners shifted into the daemon's id
    /// range (unpacked once); the default image is built on first use.
    async fn resolve_image(&self, image_name: &str) -> Result<agentd_images::ImageRootfs> {
        let image_name = image_name.to_string();
        let store = self.store.clone();
        let opts = UnpackOptions {
            id_offset: self.config.id_base,
            ..UnpackOptions::default()
        };
        let name2 = image_name.clone();
        let store2 = store.clone();
        let opts2 = opts.clone();
        let unknown = |name: &str| {
            Error::Invalid(format!(
                "unknown image {name:?}: pull or import it first (POST /v1/images/pull, agentd image pull|import)"
            ))
        };
        let store_error = |e: agentd_images::StoreError| match e {
            agentd_images::StoreError::UnknownImage(_) => unknown(&image_name),
            other => Error::internal(agentd_runtime::error_chain(&other)),
        };
        let image = match tokio::task::spawn_blocking(move || store2.rootfs(&name2, &opts2))
            .await
            .map_err(Error::internal)?
        {
            Err(agentd_images::StoreError::UnknownImage(_))
                if image_name == crate::default_image::NAME =>
            {
                // The default image: built on first use (one build at a time); a build that
                // fails makes the request unavailable, with the build's reason.
                let _building = self.build_lock.lock().await;
                let name2 = image_name.clone();
                let cache = self.config.build_cache.clone();
                tokio::task::spawn_blocking(move || {
                    if store.resolve(&name2).is_err() {
                        crate::default_image::build(&store, &cache)
                            .map_err(|e| Error::Unavailable(format!("{e:#}")))?;
                    }
                    Ok::<_, Error>(store.rootfs(&name2, &opts))
                })
                .await
                .map_err(Error::internal)??
                .map_err(store_error)?
            }
            other => other.map_err(store_error)?,
        };
        Ok(image)
    }

    /// Creates a sandbox: validate and resolve the image ([`Self::plan`]), admit it (quotas,
    /// address, record: [`Self::admit`]), write its spec ([`Self::spec`]) and start it
    /// ([`Self::start`]); returns once it runs (OpenCode may still be starting).
    pub async fn create(self: &Arc<Self>, req: CreateSandbox) -> Result<SandboxRecord> {
        let started = Instant::now();
        let plan = self.plan(&req).await?;
        let (sb, secrets) = self.admit(&req, &plan).await?;
        let id = sb.snapshot().id;
        tracing::debug!(sandbox = %id, ms = started.elapsed().as_secs_f64() * 1e3, "create: image and record ready");
        let spec = self.spec(&req, &plan, &id, secrets.as_ref());
        if let Err(e) = self.start(&sb, &plan, spec).await {
            self.net.remove_link(&id);
            self.map().remove(&id);
            let _ = self.db.delete(SANDBOXES, &id);
            return Err(e);
        }
        tracing::debug!(sandbox = %id, ms = started.elapsed().as_secs_f64() * 1e3, "create: shim reports started");
        self.metrics.observe_create(started.elapsed());
        if plan.opencode {
            self.set_state_lazy(&sb, SandboxState::Starting, |_| {});
        } else {
            self.set_state_lazy(&sb, SandboxState::Ready, |r| r.ready_at = Some(now_ms()));
        }
        tracing::info!(sandbox = %id, image = %plan.image_name, opencode = plan.opencode, "sandbox created");
        self.clone().supervise(sb.clone()).await;
        Ok(sb.snapshot())
    }

    /// Step 1 of a create: the request validated, its image resolved (built or unpacked if
    /// need be) and what runs in it decided. Nothing is held yet.
    async fn plan(&self, req: &CreateSandbox) -> Result<Plan> {
        let (limits, image_name) = self.validate_create(req)?;
        let memory = limits.memory_bytes.unwrap_or(self.config.sandbox_memory);
        if let Some(model) = &req.model {
            self.check_model(model).await?;
        }
        let image = self.resolve_image(&image_name).await?;
        let opencode = req.opencode.unwrap_or_else(|| {
            image
                .config
                .labels
                .contains_key(crate::opencode::IMAGE_LABEL)
        });
        if opencode && req.command.is_some() {
            return Err(exclusive_error());
        }
        if opencode {
            self.require_llm()?;
        }
        let defaults = crate::image_spec::defaults(&image)
            .map_err(|e| Error::Invalid(format!("image {image_name}: {e:#}")))?;
        let args = if opencode {
            let cmd = crate::opencode::command();
            if !crate::image_spec::find_command(&image.lower_dirs, &cmd[0], &image.config.env) {
                return Err(Error::Invalid(format!(
                    "image {image_name} has no opencode binary on its PATH: use an OpenCode image or opencode: false"
                )));
            }
            cmd
        } else {
            req.command.clone().unwrap_or_default()
        };
        Ok(Plan {
            limits,
            memory,
            image_name,
            image,
            opencode,
            defaults,
            args,
        })
    }

    /// Step 2: quotas checked, an address and an id chosen and the record made, under the
    /// create lock (so two creates cannot both take the last slot or the same address).
    async fn admit(
        &self,
        req: &CreateSandbox,
        plan: &Plan,
    ) -> Result<(Arc<Sandbox>, Option<OpenCodeSecrets>)> {
        let _guard = self.create_lock.lock().await;
        let (live, committed, used): (usize, u64, Vec<Ipv4Addr>) = {
            let map = self.map();
            let live: Vec<SandboxRecord> = map
                .values()
                .map(|s| s.snapshot())
                .filter(|r| r.state.is_live())
                .collect();
            (
                live.len(),
                live.iter().map(|r| r.memory_bytes).sum(),
                live.iter().map(|r| r.address).collect(),
            )
        };
        let memory = plan.memory;
        if live >= self.config.max_sandboxes {
            return Err(Error::Quota(format!(
                "agentd runs {live} sandboxes, its maximum (max_sandboxes): stop or delete one first"
            )));
        }
        if committed.saturating_add(memory) > self.config.max_memory {
            return Err(Error::Quota(format!(
                "{memory} bytes more would commit {} of {} bytes of memory (max_memory): stop a sandbox or ask for less",
                committed.saturating_add(memory),
                self.config.max_memory
            )));
        }
        if let Some(name) = &req.name {
            if self
                .map()
                .values()
                .any(|s| s.snapshot().name.as_deref() == Some(name))
            {
                return Err(Error::Conflict(format!("a sandbox named {name:?} exists")));
            }
        }
        let address = (0..)
            .map_while(|n| self.net.address(n))
            .find(|a| !used.contains(a))
            .ok_or_else(|| Error::Quota("no free address in the sandbox subnet".into()))?;
        let id = random_hex(6);
        let secrets = plan.opencode.then(|| OpenCodeSecrets {
            password: random_hex(24),
            gateway_token: random_hex(24),
        });
        let record = SandboxRecord {
            id: id.clone(),
            name: req.name.clone(),
            image: plan.image_name.clone(),
            image_digest: plan.image.image.manifest.to_string(),
            state: SandboxState::Creating,
            created_at: now_ms(),
            ready_at: None,
            address,
            memory_bytes: memory,
            cpus: req.limits.cpus,
            pids: plan.limits.pids,
            disk_bytes: plan.limits.disk_bytes,
            idle_timeout_secs: req.idle_timeout_secs.unwrap_or(self.config.idle_timeout),
            ttl_secs: req.ttl_secs,
            labels: req.labels.clone(),
            opencode: secrets.clone(),
            user: plan.defaults.user,
            usage: Usage::default(),
            exit: None,
        };
        // The record (state `creating`) is written durably while the shim starts, in
        // parallel (see [`Self::start`]): a crash before the write lands leaves a state dir
        // without a record, which the next start removes; after it, the next start finds the
        // record and reattaches if the shim runs. Later state changes of the create are
        // written lazily.
        let sb = Sandbox::new(record);
        self.map().insert(id, sb.clone());
        Ok((sb, secrets))
    }

    /// Step 3: the runtime's spec: the image's defaults, OpenCode's environment, the
    /// request's environment, user namespaces and limits.
    fn spec(
        &self,
        req: &CreateSandbox,
        plan: &Plan,
        id: &str,
        secrets: Option<&OpenCodeSecrets>,
    ) -> SandboxSpec {
        let mut env = plan.defaults.env.clone();
        let mut set = |kv: String| crate::image_spec::set_env(&mut env, kv);
        if let Some(s) = secrets {
            for kv in crate::opencode::env(
                &s.password,
                (self.net.bridge_addr, self.config.gateway_port),
                &s.gateway_token,
                req.model.as_deref().unwrap_or(&self.config.llm_model),
            ) {
                set(kv);
            }
        }
        for (k, v) in &req.env {
            set(format!("{k}={v}"));
        }
        let user = plan.defaults.user;
        let mut spec = SandboxSpec::new(plan.args.clone());
        spec.idle = spec.args.is_empty();
        spec.env = env;
        spec.cwd = plan.defaults.cwd.clone();
        spec.uid = user.0;
        spec.gid = user.1;
        spec.hostname = format!("sb-{id}");
        spec.uid_map = Some(IdMap::unprivileged(self.config.id_base));
        spec.gid_map = Some(IdMap::unprivileged(self.config.id_base));
        spec.limits = plan.limits.clone();
        spec.readonly_rootfs = false;
        spec
    }

    /// Step 4: the network link and the shim, while the record is written. On an error the
    /// caller removes the link and the record; a started shim whose record could not be
    /// saved is removed here.
    async fn start(
        self: &Arc<Self>,
        sb: &Arc<Sandbox>,
        plan: &Plan,
        mut spec: SandboxSpec,
    ) -> Result<()> {
        let rec = sb.snapshot();
        let id = rec.id.clone();
        spec.network = NetworkMode::Veth(VethConfig {
            host: Network::link_name(&id),
            bridge: self.net.bridge.clone(),
            address: rec.address,
            prefix_len: self.config.prefix_len,
        });
        let runtime = self.runtime.clone();
        let id2 = id.clone();
        let layers = plan.image.lower_dirs.clone();
        let start = tokio::task::spawn_blocking(move || {
            runtime.create(&id2, Rootfs::Layers(layers), &spec, None)
        });
        let me = self.clone();
        let sb2 = sb.clone();
        let write = tokio::task::spawn_blocking(move || me.persist(&sb2));
        let (started, written) = tokio::join!(start, write);
        started.map_err(Error::internal)?.map_err(|e| {
            let chain = agentd_runtime::error_chain(&e);
            if chain.contains("os error 28") || chain.contains("No space left") {
                Error::NoSpace(
                    "agentd's disk is full: the sandbox was not created (free space on the state dir's filesystem and retry)".into(),
                )
            } else {
                Error::internal(chain)
            }
        })?;
        // A sandbox whose record could not be saved is not acknowledged: the next start
        // would take it for debris. It is removed again and the create fails.
        if let Err(e) = written.map_err(Error::internal).and_then(|r| r) {
            let client = self.runtime.client(&id);
            let _ = tokio::task::spawn_blocking(move || {
                let _ = client.kill(libc::SIGKILL);
                client.delete()
            })
            .await;
            return Err(e);
        }
        Ok(())
    }

    /// Starts watching a running sandbox: its exit, and for OpenCode its readiness.
    async fn supervise(self: Arc<Self>, sb: Arc<Sandbox>) {
        let id = sb.snapshot().id;
        let client = self.runtime.client(&id);
        // Watch both the sandbox's init and its shim: the init's exit ends the sandbox, and
        // so does the shim's death (nobody would reap, report or clean it up any more).
        let pidfd = tokio::task::spawn_blocking(move || client.watch_fds()).await;
        let me = self.clone();
        let sb2 = sb.clone();
        tokio::spawn(async move {
            match pidfd {
                Ok(Ok((fd, shim_fd))) => {
                    let watch = |fd: OwnedFd| async move {
                        // SAFETY: the OwnedFd moves into the AsyncFd, stays open and names the
                        // same pidfd until the AsyncFd drops it.
                        match unsafe {
                            AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
                        } {
                            Ok(afd) => {
                                let _ = afd.readable().await;
                            }
                            Err(e) => tracing::error!(error = ?e, "cannot watch a pidfd"),
                        }
                    };
                    tokio::select! {
                        _ = watch(fd) => {}
                        _ = watch(shim_fd) => tracing::warn!(sandbox = %id, "the sandbox's shim died"),
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(sandbox = %id, error = %e, "sandbox not running at attach")
                }
                Err(e) => tracing::error!(sandbox = %id, error = %e, "attach task failed"),
            }
            me.finish(&sb2, None).await;
        });
        if sb.snapshot().state == SandboxState::Starting {
            tokio::spawn(self.wait_opencode(sb));
        }
    }

    async fn wait_opencode(self: Arc<Self>, sb: Arc<Sandbox>) {
        let rec = sb.snapshot();
        let Some(secrets) = rec.opencode.clone() else {
            return;
        };
        let uri: hyper::Uri = match format!(
            "http://{}:{}/global/health",
            rec.address,
            crate::opencode::PORT
        )
        .parse()
        {
            Ok(u) => u,
            Err(_) => return,
        };
        let auth = crate::opencode::basic_auth(&secrets.password);
        let deadline = Instant::now() + crate::opencode::READY_TIMEOUT;
        let mut state_rx = sb.state_tx.subscribe();
        while Instant::now() < deadline {
            if !sb.snapshot().state.is_live() {
                return;
            }
            let req = hyper::Request::get(uri.clone())
                .header(hyper::header::AUTHORIZATION, &auth)
                .body(crate::http::empty())
                .expect("valid request");
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(2), self.http.request(req)).await,
                Ok(Ok(resp)) if resp.status().is_success()
            );
            if ok {
                let started = rec.created_at;
                self.set_state(&sb, SandboxState::Ready, |r| r.ready_at = Some(now_ms()));
                self.metrics
                    .observe_ready(Duration::from_millis(now_ms().saturating_sub(started)));
                tracing::info!(sandbox = %rec.id, "opencode ready");
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = state_rx.changed() => {}
            }
        }
        tracing::warn!(sandbox = %rec.id, "opencode did not become ready in time");
        self.stop(&sb, "opencode did not answer its health check in time")
            .await;
    }

    /// Stops a live sandbox: SIGTERM, then everything is killed after [`STOP_GRACE`].
    pub async fn stop(&self, sb: &Arc<Sandbox>, reason: &str) {
        let rec = sb.snapshot();
        if !rec.state.is_live() {
            return;
        }
        tracing::info!(sandbox = %rec.id, reason, "stopping sandbox");
        sb.record.lock().expect("sandbox record lock").exit = Some(ExitInfo {
            code: None,
            oom_killed: false,
            reason: reason.to_string(),
            log_tail: String::new(),
        });
        let client = self.runtime.client(&rec.id);
        let _ = tokio::task::spawn_blocking(move || client.kill(libc::SIGTERM)).await;
        if !sb.wait_ended(STOP_GRACE).await {
            self.finish(sb, Some(reason)).await;
        }
    }

    /// Frees everything of a sandbox whose command ended (or that is being stopped) and records
    /// how it ended. Idempotent.
    pub async fn finish(&self, sb: &Arc<Sandbox>, forced: Option<&str>) {
        let rec = sb.snapshot();
        if !rec.state.is_live() {
            return;
        }
        // Only one finish per sandbox: the exit watcher and a stop's timeout may both get here.
        // The second waits for the first, so that whoever returns (a delete answering 204)
        // knows the sandbox's resources are gone. (Bounded: the shim's own calls are.)
        if sb.ending.swap(true, Ordering::SeqCst) {
            sb.wait_ended(FINISH_WAIT).await;
            return;
        }
        let id = rec.id.clone();
        let runtime = self.runtime.clone();
        let logs_dir = self.config.state_dir.join("logs").join(&id);
        let status = tokio::task::spawn_blocking(move || {
            let client = runtime.client(&id);
            let alive = runtime.shim_alive(&id);
            let status = match alive.then(|| client.state()) {
                Some(Ok((_, SandboxStatus::Exited(st)))) => Some(st),
                _ => None,
            };
            // Logs first: the shim's delete removes its state dir.
            let _ = std::fs::create_dir_all(&logs_dir);
            let live_logs = runtime.logs_dir(&id);
            for f in [layout::STDOUT, layout::STDERR] {
                keep_log(&live_logs.join(f), &logs_dir.join(f));
            }
            let deleted = if alive { client.delete() } else { Err(agentd_runtime::ClientError::Shim("the shim is gone".into())) };
            if let Err(e) = deleted {
                tracing::warn!(sandbox = %id, error = %agentd_runtime::error_chain(&e), "the shim's delete did not finish: cleaning up after it");
                // The shim exits after answering a delete; cleanup refuses a live shim.
                let waited = std::time::Instant::now();
                while client.state().is_ok() && waited.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if let Err(e) = runtime.cleanup(&id) {
                    tracing::error!(sandbox = %id, error = %agentd_runtime::error_chain(&e), "cleanup failed");
                }
            }
            status
        })
        .await
        .unwrap_or(None);
        self.net.remove_link(&rec.id);
        let tail = log_tail(&self.config.state_dir.join("logs").join(&rec.id));
        let previous = rec.exit.clone();
        let stopped = previous.is_some() || forced.is_some();
        let reason = match (&previous, forced, status) {
            (Some(p), _, _) => p.reason.clone(),
            (None, Some(r), _) => r.to_string(),
            (None, None, Some(st)) if st.oom_killed => "out of memory".to_string(),
            (None, None, Some(st)) if rec.opencode.is_some() => {
                format!("opencode exited with status {}", st.code)
            }
            (None, None, Some(st)) => format!("the command exited with status {}", st.code),
            (None, None, None) => "the sandbox's shim is gone".to_string(),
        };
        let state = if stopped {
            SandboxState::Stopped
        } else {
            SandboxState::Exited
        };
        self.set_state(sb, state, |r| {
            r.exit = Some(ExitInfo {
                code: status.map(|s| s.code),
                oom_killed: status.is_some_and(|s| s.oom_killed),
                reason,
                log_tail: tail,
            });
        });
        tracing::info!(sandbox = %rec.id, state = state.as_str(), "sandbox ended");
    }

    /// Stops (if needed) and forgets a sandbox, its logs included.
    pub async fn delete(&self, sb: &Arc<Sandbox>) -> Result<()> {
        self.stop(sb, "deleted").await;
        let id = sb.snapshot().id;
        // The record first: a delete that could not be saved leaves the sandbox listed (and
        // answers the error) instead of one that comes back after a restart.
        self.db.delete(SANDBOXES, &id)?;
        self.map().remove(&id);
        let _ = agentd_runtime::tree::remove_tree(&self.config.state_dir.join("logs").join(&id));
        Ok(())
    }

    /// After a start: load the records, reattach to live shims, end the sandboxes whose shim
    /// died, and remove what belongs to no live sandbox.
    pub async fn reconcile(self: &Arc<Self>) -> anyhow::Result<()> {
        let records: Vec<SandboxRecord> = self.db.list(SANDBOXES)?;
        let mut live_ids = Vec::new();
        for rec in records {
            let sb = Sandbox::new(rec.clone());
            self.map().insert(rec.id.clone(), sb.clone());
            if !rec.state.is_live() {
                continue;
            }
            let client = self.runtime.client(&rec.id);
            let runtime = self.runtime.clone();
            let id = rec.id.clone();
            // A dead shim is found without waiting on its socket (a helper it left may hold
            // the listener and never answer).
            let alive = tokio::task::spawn_blocking(move || {
                runtime
                    .shim_alive(&id)
                    .then(|| client.state().ok())
                    .flatten()
            })
            .await
            .unwrap_or(None);
            match alive {
                Some((_, SandboxStatus::Running)) => {
                    tracing::info!(sandbox = %rec.id, "reattached");
                    live_ids.push(rec.id.clone());
                    if rec.opencode.is_some() {
                        // Check OpenCode again in the background.
                        self.set_state(&sb, SandboxState::Starting, |_| {});
                    } else if rec.state == SandboxState::Creating {
                        // Its create finished but the lazy write of `ready` was lost.
                        self.set_state(&sb, SandboxState::Ready, |r| r.ready_at = Some(now_ms()));
                    }
                    self.clone().supervise(sb).await;
                }
                Some(_) => self.finish(&sb, None).await,
                None => {
                    self.finish(&sb, Some("agentd found its shim gone at start"))
                        .await;
                    if let Some(exit) = &mut sb.record.lock().expect("lock").exit {
                        exit.reason = "the sandbox's shim died while agentd was down".into();
                    }
                    // Exited, not stopped: nobody asked for it.
                    self.set_state(&sb, SandboxState::Exited, |_| {});
                }
            }
        }
        // Sandbox dirs of no live record (a crash mid-create): clean up.
        // blocking-ok: reconcile runs once at start, before the API listens.
        if let Ok(entries) = std::fs::read_dir(self.config.sandboxes_dir()) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().to_string();
                // The state root's own lock file and anything else that is no sandbox id.
                if agentd_runtime::spec::validate_id(&id).is_err() {
                    continue;
                }
                if !live_ids.contains(&id) {
                    let client = self.runtime.client(&id);
                    let cleaned = if self.runtime.shim_alive(&id) {
                        // blocking-ok: at start, before the API listens (as above).
                        client.delete()
                    } else {
                        // blocking-ok: at start, before the API listens (as above).
                        self.runtime.cleanup(&id)
                    };
                    if let Err(err) = cleaned {
                        tracing::warn!(sandbox = %id, error = %agentd_runtime::error_chain(&err), "leftover cleanup failed");
                    }
                    tracing::info!(sandbox = %id, "removed leftovers of a sandbox");
                }
            }
        }
        for link in self.net.leftover_links(&live_ids) {
            if let Ok(index) = agentd_runtime::netlink::link_index(&link) {
                let _ = agentd_runtime::netlink::delete_link(index);
                tracing::info!(link, "removed a leftover veth");
            }
        }
        Ok(())
    }

    /// Stops sandboxes idle or past their TTL; runs until the process ends.
    pub async fn reaper(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = now_ms();
            for sb in self.list() {
                let rec = sb.snapshot();
                // Not while it is created, nor while a stop is under way (it set `exit`).
                if !rec.state.is_live() || rec.state == SandboxState::Creating || rec.exit.is_some()
                {
                    continue;
                }
                let idle_ms = now.saturating_sub(sb.last_activity.load(Ordering::Relaxed));
                // Checked arithmetic: a stored limit too large for ms never expires.
                let reason = if rec.ttl_secs.is_some_and(|t| {
                    t.checked_mul(1000)
                        .is_some_and(|ms| now.saturating_sub(rec.created_at) > ms)
                }) {
                    Some("ttl expired")
                } else if rec.idle_timeout_secs > 0
                    && sb.active.load(Ordering::Relaxed) == 0
                    && rec
                        .idle_timeout_secs
                        .checked_mul(1000)
                        .is_some_and(|ms| idle_ms > ms)
                {
                    Some("idle timeout")
                } else {
                    None
                };
                if let Some(reason) = reason {
                    let me = self.clone();
                    tokio::spawn(async move { me.stop(&sb, reason).await });
                }
            }
        }
    }

    /// The error for a call to a sandbox's shim that failed: if the sandbox was deleted or
    /// stopped meanwhile (a race with a stop or delete), a 404 or 409 that says so in our
    /// words; otherwise `what` with the shim's message, internals of the runtime left out.
    pub fn shim_failed(&self, sb: &Sandbox, what: &str, error: &str) -> Error {
        let rec = sb.snapshot();
        if self.get(&rec.id).is_err() {
            return Error::NotFound(format!("sandbox {} was deleted", rec.id));
        }
        if !rec.state.is_live() || rec.exit.is_some() {
            return Error::Conflict(format!(
                "sandbox {} is {}",
                rec.id,
                if rec.exit.is_some() && rec.state.is_live() {
                    "stopping"
                } else {
                    rec.state.as_str()
                }
            ));
        }
        let internal = ["procfs", "please report", "libcontainer", "os error"];
        if internal.iter().any(|m| error.contains(m)) {
            tracing::warn!(sandbox = %rec.id, error, "{what} failed");
            return Error::Conflict(format!(
                "{what} failed: sandbox {} did not accept it (is it stopping?)",
                rec.id
            ));
        }
        Error::Invalid(format!("{what} failed: {error}"))
    }

    /// Resolves once agentd is stopping (at once if it is).
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Refuses OpenCode when agentd has no LLM upstream ([`require_llm`]).
    pub fn require_llm(&self) -> Result<()> {
        require_llm(&self.config)
    }

    /// Refuses a model the upstream does not list in its `/models` (when it answers that
    /// with a list; the answer is kept for a minute).
    pub async fn check_model(&self, model: &str) -> Result<()> {
        validate_model(Some(model))?;
        let Some(upstream) = &self.config.llm else {
            return Ok(());
        };
        let cached = self
            .models
            .lock()
            .expect("models lock")
            .as_ref()
            .filter(|(at, _)| at.elapsed() < MODELS_CACHE)
            .map(|(_, list)| list.clone());
        let list = match cached {
            Some(l) => l,
            None => {
                let l = crate::gateway::upstream_models(upstream).await;
                *self.models.lock().expect("models lock") = Some((Instant::now(), l.clone()));
                l
            }
        };
        match list {
            Some(models) if !models.is_empty() && !models.iter().any(|m| m == model) => {
                let mut shown: Vec<&str> = models.iter().map(String::as_str).take(20).collect();
                if models.len() > 20 {
                    shown.push("...");
                }
                Err(Error::Invalid(format!(
                    "model {model:?} is not one the LLM upstream offers (its /models lists: {})",
                    shown.join(", ")
                )))
            }
            _ => Ok(()),
        }
    }

    /// The limits a request asks for, with agentd's defaults, validated ([`limits_for`]).
    pub fn limits(&self, req: &LimitsRequest) -> Result<Limits> {
        limits_for(&self.config, req)
    }

    /// The rootfs mount of a live sandbox and the host ids of its user.
    pub fn rootfs(&self, sb: &Sandbox) -> Result<(PathBuf, (u32, u32))> {
        let rec = sb.snapshot();
        if !rec.state.is_live() {
            return Err(Error::Conflict(format!(
                "sandbox {} is {}: its files are gone",
                rec.id,
                rec.state.as_str()
            )));
        }
        let base = self.config.id_base;
        Ok((
            self.runtime.sandbox_dir(&rec.id).join(layout::ROOTFS),
            (base + rec.user.0, base + rec.user.1),
        ))
    }

    /// The dir holding a sandbox's log files (the runtime's while live, then agentd's copy).
    pub fn logs_dir(&self, sb: &Sandbox) -> PathBuf {
        let rec = sb.snapshot();
        if rec.state.is_live() {
            self.runtime.logs_dir(&rec.id)
        } else {
            self.config.state_dir.join("logs").join(&rec.id)
        }
    }
}

/// Most bytes of a log kept after its sandbox ended (the end of it).
const KEPT_LOG_BYTES: u64 = 64 << 20;

/// Moves a sandbox's log out of its state dir. On the sandbox's disk (another file system),
/// it is copied: the last [`KEPT_LOG_BYTES`], after a line saying how much was cut.
fn keep_log(from: &Path, to: &Path) {
    match std::fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
        _ => return,
    }
    let copy = || -> std::io::Result<()> {
        use std::io::{Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let mut src = std::fs::File::open(from)?;
        let len = src.metadata()?.len();
        let mut dst = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(to)?;
        if len > KEPT_LOG_BYTES {
            writeln!(
                dst,
                "[agentd: the first {} bytes of this log were cut]",
                len - KEPT_LOG_BYTES
            )?;
            src.seek(std::io::SeekFrom::Start(len - KEPT_LOG_BYTES))?;
        }
        std::io::copy(&mut src, &mut dst)?;
        Ok(())
    };
    if let Err(e) = copy() {
        tracing::warn!(log = %from.display(), error = %e, "cannot keep the sandbox's log");
    }
}

/// The last [`LOG_TAIL_BYTES`] of stderr, then of stdout, from a logs dir.
pub fn log_tail(dir: &Path) -> String {
    let mut out = String::new();
    for f in [layout::STDERR, layout::STDOUT] {
        if let Ok(bytes) = std::fs::read(dir.join(f)) {
            let start = bytes
                .len()
                .saturating_sub(usize::try_from(LOG_TAIL_BYTES).unwrap_or(4096));
            let text = String::from_utf8_lossy(&bytes[start..]);
            if !text.trim().is_empty() {
                out.push_str(&text);
                if !out.ends_with('\n') {
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// Checks a create request without touching the system (beyond the state dir's size for
/// a disk limit): its limits with agentd's defaults, and the image it names.
pub fn validate_create(config: &Config, req: &CreateSandbox) -> Result<(Limits, String)> {
    if let Some(n) = &req.network {
        if n != "none" {
            return Err(Error::Invalid(format!(
                "network {n:?} is not supported yet: use \"none\" (no egress)"
            )));
        }
    }
    if let Some(name) = &req.name {
        if name.is_empty()
            || name.len() > 63
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(Error::Invalid(format!(
                "name must be 1-63 letters, digits, '-', '_' or '.', got {name:?}"
            )));
        }
    }
    validate_env(&req.env)?;
    let limits = limits_for(config, &req.limits)?;
    for (name, value) in [
        ("ttl_secs", req.ttl_secs),
        ("idle_timeout_secs", req.idle_timeout_secs),
    ] {
        let max = crate::daemon::config::MAX_SANDBOX_TIMEOUT_SECS;
        if value.is_some_and(|v| v > max) {
            return Err(Error::Invalid(format!(
                "{name} must be at most {max} (a year); 0 turns the idle timeout off"
            )));
        }
    }
    if req.ttl_secs == Some(0) {
        return Err(Error::Invalid(
            "ttl_secs must be at least 1 (leave it out for no TTL)".into(),
        ));
    }
    validate_model(req.model.as_deref())?;
    if let Some(cmd) = &req.command {
        if cmd.is_empty() || cmd[0].is_empty() {
            return Err(Error::Invalid("command must not be empty".into()));
        }
    }
    let image_name = req
        .image
        .clone()
        .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
    if req.opencode == Some(true) && req.command.is_some() {
        return Err(exclusive_error());
    }
    // Refused before the image is resolved (the default image may be built first).
    if req.opencode == Some(true)
        || (req.opencode.is_none() && req.command.is_none() && image_name == DEFAULT_IMAGE)
    {
        require_llm(config)?;
    }
    Ok((limits, image_name))
}

/// The limits a request asks for, with agentd's defaults, validated.
pub fn limits_for(config: &Config, req: &LimitsRequest) -> Result<Limits> {
    let memory = match &req.memory {
        Some(m) => m.bytes("limits.memory")?,
        None => config.sandbox_memory,
    };
    let disk = match &req.disk {
        Some(d) => Some(d.bytes("limits.disk")?),
        None => config.sandbox_disk,
    };
    let limits = Limits {
        memory_bytes: Some(memory),
        swap_bytes: None,
        cpus: req.cpus,
        pids: Some(req.pids.unwrap_or(config.sandbox_pids)),
        disk_bytes: disk,
    };
    limits
        .validate()
        .map_err(|e| Error::Invalid(agentd_runtime::error_chain(&e)))?;
    if let Some(disk) = req.disk.as_ref().and(limits.disk_bytes) {
        // Sparse layers overcommit the host's disk by design, but one layer asked for
        // that is larger than the whole file system is no bound at all.
        if let Ok(fs) = nix::sys::statvfs::statvfs(&config.state_dir) {
            let total = fs.blocks().saturating_mul(fs.fragment_size());
            if disk > total {
                return Err(Error::Invalid(format!(
                    "limits.disk {disk} bytes is more than the file system of agentd's state dir holds ({total} bytes)"
                )));
            }
        }
    }
    if memory > config.max_memory {
        return Err(Error::Invalid(format!(
            "limits.memory {memory} bytes is more than agentd may commit in total ({} bytes)",
            config.max_memory
        )));
    }
    Ok(limits)
}

/// Refuses what needs an LLM when agentd has no upstream: an OpenCode server without one
/// would only fail at its first prompt, long after the request.
pub fn require_llm(config: &Config) -> Result<()> {
    if config.llm.is_none() {
        return Err(Error::Invalid(
            "agentd has no LLM upstream, so OpenCode would have nobody to ask: start agentd with --llm-base-url URL (or AGENTD_LLM_BASE_URL, or llm_base_url in agentd.toml), or create the sandbox with \"opencode\": false".into(),
        ));
    }
    Ok(())
}

/// Compares secrets without leaking where they differ through timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, llm: bool) -> Config {
        Config::load(crate::daemon::config::ServeArgs {
            state_dir: Some(dir.to_path_buf()),
            llm_base_url: llm.then(|| "http://127.0.0.1:9/v1".to_string()),
            ..Default::default()
        })
        .unwrap()
    }

    fn refused(config: &Config, req: serde_json::Value) -> String {
        let req: CreateSandbox = serde_json::from_value(req).unwrap();
        match validate_create(config, &req) {
            Err(Error::Invalid(m)) => m,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn test_create_validation_without_root() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), false);
        assert!(refused(&c, serde_json::json!({})).contains("--llm-base-url"));
        let plain = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"opencode": false, "image": "x"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        for (extra, says) in [
            (serde_json::json!({"name": "no spaces"}), "name must be"),
            (serde_json::json!({"network": "nat"}), "not supported"),
            (
                serde_json::json!({"ttl_secs": 0}),
                "ttl_secs must be at least 1",
            ),
            (serde_json::json!({"ttl_secs": u64::MAX}), "at most"),
            (serde_json::json!({"limits": {"memory": "1k"}}), "memory"),
            (serde_json::json!({"limits": {"disk": "1m"}}), "disk"),
            (serde_json::json!({"limits": {"pids": 0}}), "pids"),
            (
                serde_json::json!({"command": []}),
                "command must not be empty",
            ),
            (serde_json::json!({"env": {"A=B": "x"}}), "env"),
        ] {
            let m = refused(&c, plain(extra.clone()));
            assert!(m.contains(says), "{extra}: {m}");
        }
        let c = config(dir.path(), true);
        let m = refused(
            &c,
            serde_json::json!({"opencode": true, "command": ["true"]}),
        );
        assert!(m.contains("opencode"), "{m}");
        let req: CreateSandbox = serde_json::from_value(
            serde_json::json!({"image": "x", "opencode": false, "limits": {"memory": "64m", "disk": "20m"}}),
        )
        .unwrap();
        let (limits, image) = validate_create(&c, &req).unwrap();
        assert_eq!(image, "x");
        assert_eq!(limits.memory_bytes, Some(64 << 20));
        assert_eq!(limits.disk_bytes, Some(20 << 20));
        assert_eq!(
            limits.pids,
            Some(crate::daemon::config::DEFAULT_SANDBOX_PIDS)
        );
    }
}
