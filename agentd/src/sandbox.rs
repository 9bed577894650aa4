//! The sandbox manager: creates sandboxes from images ([`create`]: plan, admit, spec, start),
//! supervises, stops and reaps them ([`supervise`]), and reconciles with what is left after an
//! agentd restart ([`reconcile`]); [`fs`] reaches into a rootfs without trusting it. This file
//! holds what a sandbox is (records, states, limits requested) and the manager's state.
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

/// An upstream's `/models` answer (`None`: it gave no list) and when it was read.
type ModelList = (Instant, Option<Vec<String>>);

/// What the manager's operations return.
mod create;
mod fork;
pub mod fs;
mod pause;
pub mod pool;
pub mod procs;
mod reconcile;
mod snapshot;
mod supervise;
pub mod watchers;

pub use create::{limits_for, require_llm, validate_create};
pub use supervise::{how_it_ended, log_tail, setup_failure};

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
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Usage {
    /// Requests forwarded.
    pub requests: u64,
    /// Prompt (input) tokens the upstream reported, Anthropic's cache tokens included.
    pub prompt_tokens: u64,
    /// Completion (output) tokens the upstream reported.
    pub completion_tokens: u64,
    /// Their cost in agentd's `llm_currency`, for models with a price (`llm_prices`).
    #[serde(default)]
    pub cost: f64,
    /// The same by model, as sandboxes name it (`UPSTREAM/MODEL`, or a plain model of the
    /// first upstream); at most [`MAX_USAGE_MODELS`], the rest as `other`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_model: BTreeMap<String, ModelUsage>,
}

/// Most models a usage counts apart (the rest are `other`): a sandbox names its models.
pub const MAX_USAGE_MODELS: usize = 16;

/// One model's part of a [`Usage`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ModelUsage {
    /// Requests forwarded.
    pub requests: u64,
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
    /// Their cost.
    #[serde(default)]
    pub cost: f64,
}

impl Usage {
    /// Input plus output tokens.
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// Counts one request to `model`.
    pub fn count(&mut self, model: &str, prompt: u64, completion: u64, cost: f64) {
        let one = ModelUsage {
            requests: 1,
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost,
        };
        self.add_totals(&one);
        self.add_model(model, &one);
    }

    /// Adds `other` (another attempt's) to this.
    pub fn add(&mut self, other: &Usage) {
        self.add_totals(&ModelUsage {
            requests: other.requests,
            prompt_tokens: other.prompt_tokens,
            completion_tokens: other.completion_tokens,
            cost: other.cost,
        });
        for (model, u) in &other.by_model {
            self.add_model(model, u);
        }
    }

    fn add_totals(&mut self, u: &ModelUsage) {
        self.requests += u.requests;
        self.prompt_tokens += u.prompt_tokens;
        self.completion_tokens += u.completion_tokens;
        self.cost += u.cost;
    }

    /// Adds `u` to `model`'s part (its name cut to 200 characters; past
    /// [`MAX_USAGE_MODELS`] models, to `other`).
    fn add_model(&mut self, model: &str, u: &ModelUsage) {
        let model: String = model.chars().take(200).collect();
        let key = if self.by_model.contains_key(&model) || self.by_model.len() < MAX_USAGE_MODELS {
            model
        } else {
            "other".to_string()
        };
        let m = self.by_model.entry(key).or_default();
        m.requests += u.requests;
        m.prompt_tokens += u.prompt_tokens;
        m.completion_tokens += u.completion_tokens;
        m.cost += u.cost;
    }
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
    /// The password `opencode attach` gives agentd for this sandbox's origin (not
    /// OpenCode's: the sandbox never sees it). Empty for sandboxes made before it existed.
    #[serde(default)]
    pub attach_password: String,
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
    /// What it may reach beyond agentd.
    #[serde(default)]
    pub network: crate::egress::NetworkPolicy,
    /// Its setup, if the create gave one.
    #[serde(default)]
    pub setup: Option<SandboxSetup>,
    /// Unix time (ms) since when it is paused (its processes frozen), while it is.
    #[serde(default)]
    pub paused_at: Option<u64>,
    /// Its OpenCode is hibernated: stopped (its memory freed) while the sandbox is paused; the
    /// next request starts it again. Set before the OpenCode is stopped, so that a crash
    /// meanwhile leaves a record whose next use wakes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hibernated: bool,
    /// The layers stacked on its image's, topmost first (agentd's own dirs; a fork of it
    /// stacks on them too).
    #[serde(default)]
    pub base_layers: Vec<std::path::PathBuf>,
    /// What its idle timeout does.
    #[serde(default)]
    pub idle_action: IdleAction,
    /// The warm pool (its image) it waits in until a create claims it; hidden from the API
    /// meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The model the LLM gateway sends its OpenCode's requests to, when it is not the one
    /// OpenCode was started with (a pooled sandbox claimed for another model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Its token budget: the gateway refuses its requests once its usage reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_tokens: Option<u64>,
    /// Its cost budget, in agentd's `llm_currency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_cost: Option<f64>,
}

/// A sandbox's LLM budget.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Prompt + completion tokens, as the upstream reports them; the gateway refuses the
    /// sandbox's requests once its usage reaches this (402, `budget_exhausted`).
    pub tokens: Option<u64>,
    /// Cost in agentd's `llm_currency`, from its `llm_prices`; the gateway refuses the
    /// sandbox's requests once their cost reaches this (402, `budget_exhausted`), and requests
    /// for a model without a price (403, `no_price`).
    pub cost: Option<f64>,
    /// On a task: when an attempt's budget is spent, ask a person for more (an approval with
    /// the permission `budget`: `once` gives one more budget, `always` lifts it, `reject`
    /// fails the attempt) instead of failing it at once [default: false].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ask: Option<bool>,
    /// On a task: tokens all its attempts together may spend (each attempt's sandbox is
    /// refused once they have) [default: none].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_tokens: Option<u64>,
    /// On a task: cost all its attempts together may spend [default: none].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_cost: Option<f64>,
}

impl Budget {
    /// Checks the numbers.
    pub fn validate(&self) -> Result<()> {
        for (what, c) in [("cost", self.cost), ("total_cost", self.total_cost)] {
            if let Some(c) = c {
                if !c.is_finite() || c <= 0.0 {
                    return Err(Error::Invalid(format!(
                        "budget.{what} must be a positive number, got {c}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether it bounds a cost (a price is then needed).
    pub fn has_cost(&self) -> bool {
        self.cost.is_some() || self.total_cost.is_some()
    }
}

/// What a sandbox's idle timeout does.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum IdleAction {
    /// Stop it.
    #[default]
    Stop,
    /// Pause it (its processes frozen, resumed by the next request to it); stop it once it has
    /// been idle twice as long.
    Pause,
    /// Hibernate it: its OpenCode stopped (its memory freed, its sessions kept on the
    /// sandbox's disk) and the rest paused; the next request starts OpenCode again (seconds,
    /// not milliseconds). Paused instead while OpenCode works on a session, and for a sandbox
    /// without OpenCode. Stopped once idle twice as long.
    Hibernate,
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
    /// Egress: `"none"` or a policy (`{"mode": "allowlist", "allow": ["host", ...]}`)
    /// [default: none, only the LLM gateway].
    pub network: Option<NetworkRequest>,
    /// Idle timeout, seconds (0: never).
    pub idle_timeout_secs: Option<u64>,
    /// What the idle timeout does: `stop`, or `pause` (stopped after twice the timeout)
    /// [default: stop].
    pub idle_action: Option<IdleAction>,
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
    /// Its LLM budget [default: none].
    #[serde(default)]
    pub budget: Option<Budget>,
    /// OpenCode's permission per tool (`{"bash": "ask"}`): `allow`, `ask` (a person answers
    /// through OpenCode's `/permission` API, or a task's approvals) or `deny` [default: edit,
    /// bash and webfetch allowed; OpenCode's defaults for the rest].
    #[serde(default)]
    pub permissions: BTreeMap<String, crate::opencode::Permission>,
    /// Shell command run once in the image's working directory after the sandbox starts
    /// (and OpenCode answers); the sandbox stays `starting` until it ends, and a failure
    /// stops the sandbox with the end of its output as the reason.
    pub setup: Option<String>,
    /// Seconds the setup may run before it is killed [default: 1800].
    pub setup_timeout_secs: Option<u64>,
    /// Layers (host dirs) stacked on top of the image's, topmost first: a task's prepared
    /// workspace, a fork's copy of its parent. Never on the wire: host paths are agentd's own.
    #[serde(skip)]
    #[schemars(skip)]
    pub base_layers: Vec<std::path::PathBuf>,
    /// A dependency cache (a host dir) bound read-write at [`crate::cache::MOUNT`], with the
    /// environment that points package managers at it. Never on the wire.
    #[serde(skip)]
    #[schemars(skip)]
    pub cache: Option<std::path::PathBuf>,
    /// Made for this warm pool (an image), not for a caller. Never on the wire.
    #[serde(skip)]
    #[schemars(skip)]
    pub pool: Option<String>,
}

/// How the setup command went.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct SetupResult {
    /// Exit status (`None`: lost or killed at the time limit).
    pub exit_code: Option<i32>,
    /// Exit status 0.
    pub passed: bool,
    /// The end of its output (stderr goes to stdout, so the order is kept).
    pub output: String,
    /// How long it ran, ms.
    pub duration_ms: u64,
    /// It was killed at `setup_timeout_secs`.
    pub timed_out: bool,
}

/// A sandbox's setup: the command and, once it ended, how.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SandboxSetup {
    /// The command.
    pub command: String,
    /// Its time limit, seconds.
    pub timeout_secs: u64,
    /// How it went, once it ended.
    pub result: Option<SetupResult>,
}

/// A create's `network`: a mode name, or a policy.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum NetworkRequest {
    /// `none`, `allowlist` (with nothing allowed yet) or `open`.
    Mode(crate::egress::EgressMode),
    /// A mode and its allow list.
    Policy(crate::egress::NetworkPolicy),
}

impl<'de> Deserialize<'de> for NetworkRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let v = serde_json::Value::deserialize(d)?;
        let said = |e: serde_json::Error| {
            D::Error::custom(format!(
                "network: {e} (give \"none\", \"open\", \"allowlist\" or {{\"mode\": \"allowlist\", \"allow\": [\"host\", ...]}})"
            ))
        };
        match v {
            serde_json::Value::String(_) => serde_json::from_value(v).map(NetworkRequest::Mode),
            _ => serde_json::from_value(v).map(NetworkRequest::Policy),
        }
        .map_err(said)
    }
}

impl NetworkRequest {
    /// The policy this asks for.
    pub fn policy(&self) -> crate::egress::NetworkPolicy {
        match self {
            NetworkRequest::Mode(mode) => crate::egress::NetworkPolicy {
                mode: *mode,
                allow: Vec::new(),
            },
            NetworkRequest::Policy(p) => p.clone(),
        }
    }
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
    /// The gateway's audit log of its requests.
    pub llm_log: crate::gateway::audit::Log,
    /// Changes when the state does; waiters watch it.
    pub state_tx: watch::Sender<SandboxState>,
    /// Set by the first [`Manager::finish`]: its resources are being freed.
    ending: std::sync::atomic::AtomicBool,
    /// Set when its warm pool let it go on purpose (the pool shrank, a create needed its
    /// room): its refill then neither counts as one nor as a failure.
    pub(crate) retired: std::sync::atomic::AtomicBool,
    /// Its connections through the egress proxy (in memory: a restart starts it again).
    pub egress: crate::egress::EgressLog,
    /// Held while it is paused or resumed: one freezer change at a time.
    pub(crate) freezer: tokio::sync::Mutex<()>,
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

    /// Waits until the sandbox is ready (OpenCode answered, its setup done); when it ends
    /// first, why (its exit reason).
    pub async fn wait_ready(&self) -> std::result::Result<(), String> {
        let mut rx = self.state_tx.subscribe();
        loop {
            let s = *rx.borrow_and_update();
            match s {
                SandboxState::Ready => return Ok(()),
                s if !s.is_live() => {
                    let why = self
                        .snapshot()
                        .exit
                        .map(|e| e.reason)
                        .unwrap_or_else(|| s.as_str().into());
                    return Err(format!(
                        "the sandbox ended before OpenCode was ready: {why}"
                    ));
                }
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err("the sandbox went away".into());
            }
        }
    }

    fn new(record: SandboxRecord) -> Arc<Self> {
        let (state_tx, _) = watch::channel(record.state);
        Arc::new(Sandbox {
            record: Mutex::new(record),
            last_activity: AtomicU64::new(now_ms()),
            active: AtomicUsize::new(0),
            gateway_requests: AtomicUsize::new(0),
            llm_log: crate::gateway::audit::Log::default(),
            state_tx,
            ending: std::sync::atomic::AtomicBool::new(false),
            retired: std::sync::atomic::AtomicBool::new(false),
            egress: crate::egress::EgressLog::default(),
            freezer: tokio::sync::Mutex::new(()),
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
    fill_random(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// `N` random bytes.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    fill_random(&mut buf);
    buf
}

fn fill_random(buf: &mut [u8]) {
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, buf))
        .is_ok();
    assert!(ok, "cannot read /dev/urandom");
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
    /// Each upstream's model list and when it was read (`None` inside: it gave none), by
    /// upstream name. A std mutex: read and replaced, never held across an await.
    models: Mutex<HashMap<String, ModelList>>,
    /// The warm pools.
    pub pools: pool::Pools,
    /// The gateway's count of today, for the daily budget.
    pub daily: crate::gateway::spend::Daily,
    /// Detached processes (E2B's commands), by sandbox.
    pub procs: procs::Procs,
    /// Watched directories (E2B's filesystem watchers).
    pub watchers: watchers::Watchers,
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
        crate::egress::install_ca(&config.state_dir, config.egress_ca_file.as_deref())
            .context("egress_ca_file")?;
        let db = Db::open(&config.db_path())?;
        let store = Store::open(config.images_dir()).with_context(|| {
            format!(
                "failed to open the image store in {}",
                config.images_dir().display()
            )
        })?;
        let net = Network::setup(&config.bridge, config.subnet, config.prefix_len)
            .context("failed to set up the sandbox bridge")?;
        net.firewall(
            &[config.gateway_port, config.egress_port],
            config.egress_open.then_some(config.egress_nat_port),
        )
        .context("failed to keep sandboxes off the host's ports")?;
        crate::egress::open::write_resolv_conf(&config.state_dir, net.bridge_addr)
            .context("failed to write the open sandboxes' resolv.conf")?;
        let runtime =
            Runtime::new(config.sandboxes_dir()).with_cgroup_parent(config.cgroup_parent.clone());
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let daily = crate::gateway::spend::Daily::load(&db);
        let mgr = Arc::new(Manager {
            daily,
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
            models: Mutex::new(HashMap::new()),
            shutdown: watch::channel(false).0,
            pools: pool::Pools::default(),
            procs: procs::Procs::default(),
            watchers: watchers::Watchers::default(),
        });
        mgr.load_pools()?;
        Ok(mgr)
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

    /// Copies what the live sandbox `sb` wrote into its rootfs (its writable layer; not what
    /// is in `/tmp`, a tmpfs, nor its processes) into the new dir `dest`, with the sandbox
    /// frozen meanwhile: a layer for sandboxes made with `base_layer`.
    pub async fn take_layer(
        &self,
        sb: &Arc<Sandbox>,
        dest: &Path,
    ) -> Result<agentd_runtime::tree::CopyStats> {
        let rec = sb.snapshot();
        if !rec.state.is_live() {
            return Err(Error::Conflict(format!(
                "sandbox {} is {}: only a running sandbox's files can be taken",
                rec.id,
                rec.state.as_str()
            )));
        }
        // One freezer change at a time: a pause or resume waits for the copy, and a paused
        // sandbox stays paused after it.
        let _one = sb.freezer.lock().await;
        let paused = sb.snapshot().paused_at.is_some();
        let runtime = self.runtime.clone();
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let cgroup = runtime.cgroup(&rec.id);
            cgroup
                .freeze(true)
                .map_err(|e| Error::internal(agentd_runtime::error_chain(&e)))?;
            let copied = agentd_runtime::tree::copy_layer(&runtime.upper_dir(&rec.id), &dest);
            let thawed = if paused { Ok(()) } else { cgroup.freeze(false) };
            let stats = copied.map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    Error::NoSpace(format!(
                        "agentd's disk is full: sandbox {}'s files could not be copied",
                        rec.id
                    ))
                } else {
                    Error::internal(format!("copying sandbox {}'s files: {e}", rec.id))
                }
            })?;
            thawed.map_err(|e| Error::internal(agentd_runtime::error_chain(&e)))?;
            Ok(stats)
        })
        .await
        .map_err(Error::internal)?
    }

    /// A sandbox by id or name (not one waiting in a warm pool: nobody's yet).
    pub fn get(&self, key: &str) -> Result<Arc<Sandbox>> {
        let map = self.map();
        let found = match map.get(key) {
            Some(sb) => Some(sb.clone()),
            None => map
                .values()
                .find(|s| s.snapshot().name.as_deref() == Some(key))
                .cloned(),
        };
        found
            .filter(|s| s.snapshot().pool.is_none())
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
    pub fn add_usage(&self, sb: &Sandbox, model: &str, prompt: u64, completion: u64, cost: f64) {
        let rec = {
            let mut r = sb.record.lock().expect("sandbox record lock");
            r.usage.count(model, prompt, completion, cost);
            r.clone()
        };
        self.persist_lazy(&rec);
        self.daily.add(&self.db, prompt + completion, cost);
    }

    /// Writes `rec` without waiting for the disk (see `Db::put_lazy`); a failure is logged.
    fn persist_lazy(&self, rec: &SandboxRecord) {
        if let Err(e) = self.db.put_lazy(SANDBOXES, &rec.id, rec) {
            tracing::error!(sandbox = %rec.id, error = %agentd_runtime::error_chain(&e), "failed to persist sandbox");
        }
    }

    /// Changes a sandbox's budget (a person gave more): written durably.
    pub fn set_budget(&self, sb: &Sandbox, tokens: Option<u64>, cost: Option<f64>) -> Result<()> {
        let previous = sb.snapshot();
        {
            let mut r = sb.record.lock().expect("sandbox record lock");
            r.budget_tokens = tokens;
            r.budget_cost = cost;
        }
        if let Err(e) = self.persist(sb) {
            *sb.record.lock().expect("sandbox record lock") = previous;
            return Err(e);
        }
        Ok(())
    }

    /// Makes a live sandbox end `secs` from now (its TTL counted from its creation, as the
    /// reaper counts it); written durably.
    pub fn set_timeout(&self, sb: &Sandbox, secs: u64) -> Result<SandboxRecord> {
        let rec = sb.snapshot();
        if !rec.state.is_live() {
            return Err(Error::Conflict(format!(
                "sandbox {} is {}",
                rec.id,
                rec.state.as_str()
            )));
        }
        let lived = now_ms().saturating_sub(rec.created_at) / 1000;
        let old = rec.ttl_secs;
        sb.record.lock().expect("sandbox record lock").ttl_secs = Some(lived + secs);
        if let Err(e) = self.persist(sb) {
            sb.record.lock().expect("sandbox record lock").ttl_secs = old;
            return Err(e);
        }
        Ok(sb.snapshot())
    }

    /// The live sandbox at address `ip`.
    pub fn by_address(&self, ip: std::net::IpAddr) -> Option<Arc<Sandbox>> {
        let std::net::IpAddr::V4(ip) = ip else {
            return None;
        };
        self.map()
            .values()
            .find(|s| {
                let r = s.record.lock().expect("sandbox record lock");
                r.state.is_live() && r.address == ip
            })
            .cloned()
    }

    /// Replaces the allow list of a live sandbox in allowlist mode (checked as at create);
    /// the proxy applies it to the next connection.
    pub fn set_egress_allow(
        &self,
        sb: &Sandbox,
        allow: Vec<String>,
    ) -> Result<crate::egress::NetworkPolicy> {
        let mut rec = sb.snapshot();
        if !rec.state.is_live() {
            return Err(Error::Conflict(format!(
                "sandbox {} is {}",
                rec.id,
                rec.state.as_str()
            )));
        }
        if rec.network.mode != crate::egress::EgressMode::Allowlist {
            return Err(Error::Conflict(format!(
                "sandbox {} has network mode {}: an allow list needs mode allowlist, chosen at create",
                rec.id,
                rec.network.mode.as_str()
            )));
        }
        let policy = crate::egress::NetworkPolicy {
            mode: rec.network.mode,
            allow,
        };
        crate::egress::compile(
            &policy,
            &self.config.egress_presets,
            self.config.egress_open,
        )
        .map_err(Error::Invalid)?;
        rec.network = policy.clone();
        self.db.put(SANDBOXES, &rec.id, &rec).map_err(Error::from)?;
        sb.record.lock().expect("sandbox record lock").network = policy.clone();
        Ok(policy)
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

    /// Refuses a budget that cannot work: a cost that is no positive number, or a cost budget
    /// for a model without a price (agentd could not count what it spends).
    pub fn check_budget(&self, budget: Option<&Budget>, model: Option<&str>) -> Result<()> {
        let Some(b) = budget else { return Ok(()) };
        b.validate()?;
        if !b.has_cost() {
            return Ok(());
        }
        let model = model.unwrap_or(&self.config.llm_model);
        let Some((u, m)) = crate::gateway::upstream::resolve(&self.config.llm, model) else {
            return Ok(());
        };
        if !self
            .config
            .llm_prices
            .contains_key(&(u.name.clone(), m.to_string()))
        {
            let priced: Vec<String> =
                crate::gateway::spend::by_name(&self.config.llm_prices, &self.config.llm)
                    .map(|(name, _)| name)
                    .collect();
            return Err(Error::Invalid(format!(
                "budget.cost needs a price for model {model:?}, and llm_prices has none (priced: {})",
                if priced.is_empty() { "none".to_string() } else { priced.join(", ") }
            )));
        }
        Ok(())
    }

    /// Refuses a model its upstream's allowlist does not name, or (without an allowlist) its
    /// upstream does not list in its `/models` (when it answers that with a list; the answer
    /// is kept for a minute).
    pub async fn check_model(&self, model: &str) -> Result<()> {
        validate_model(Some(model))?;
        let Some((upstream, name)) = crate::gateway::upstream::resolve(&self.config.llm, model)
        else {
            return Ok(());
        };
        if !upstream.models.is_empty() {
            if upstream.models.iter().any(|m| m == name) {
                return Ok(());
            }
            return Err(Error::Invalid(format!(
                "model {model:?} is not allowed here (llm_models: {})",
                crate::gateway::upstream::allowed_names(&self.config.llm).join(", ")
            )));
        }
        let cached = self
            .models
            .lock()
            .expect("models lock")
            .get(&upstream.name)
            .filter(|(at, _)| at.elapsed() < MODELS_CACHE)
            .map(|(_, list)| list.clone());
        let list = match cached {
            Some(l) => l,
            None => {
                let l = crate::gateway::upstream_models(upstream).await;
                self.models
                    .lock()
                    .expect("models lock")
                    .insert(upstream.name.clone(), (Instant::now(), l.clone()));
                l
            }
        };
        match list {
            Some(models) if !models.is_empty() && !models.iter().any(|m| m == name) => {
                let mut shown: Vec<&str> = models.iter().map(String::as_str).take(20).collect();
                if models.len() > 20 {
                    shown.push("...");
                }
                Err(Error::Invalid(format!(
                    "model {model:?} is not one the LLM upstream {:?} offers (its /models lists: {})",
                    upstream.name,
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

    /// The root of a live sandbox as its processes see it (`/proc/<init>/root`: its overlay
    /// with its own mounts on it, `/tmp` included), for [`fs::open_in_root`]; and the host ids
    /// of its user.
    pub async fn live_root(&self, sb: &Sandbox) -> Result<(std::fs::File, (u32, u32))> {
        let (_, owner) = self.rootfs(sb)?;
        let client = self.runtime.client(&sb.snapshot().id);
        let root = tokio::task::spawn_blocking(move || {
            let (pid, _) = client.state().map_err(|e| e.to_string())?;
            let root = rustix::fs::open(
                format!("/proc/{pid}/root"),
                rustix::fs::OFlags::PATH
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| e.to_string())?;
            // The init is the shim's unreaped child: the same pid now means its root.
            match client.state() {
                Ok((p, agentd_runtime::SandboxStatus::Running)) if p == pid => {}
                _ => return Err("the sandbox stopped".to_string()),
            }
            Ok(std::fs::File::from(root))
        })
        .await
        .map_err(Error::internal)?
        .map_err(Error::Conflict)?;
        Ok((root, owner))
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

    #[test]
    fn test_usage_by_model_is_bounded_and_adds_up() {
        let mut u = Usage::default();
        for i in 0..20 {
            u.count(&format!("m{i}"), 10, 1, 0.5);
        }
        u.count("m0", 10, 1, 0.5);
        u.count(&"x".repeat(300), 1, 1, 0.0);
        assert_eq!(u.by_model.len(), MAX_USAGE_MODELS + 1);
        assert_eq!(u.by_model["m0"].requests, 2);
        assert_eq!(u.by_model["other"].requests, 5);
        assert_eq!((u.requests, u.tokens()), (22, 233));
        let mut total = Usage::default();
        total.add(&u);
        total.add(&u);
        assert_eq!((total.requests, total.tokens()), (44, 466));
        assert_eq!(total.by_model["m0"].requests, 4);
        assert_eq!(total.by_model.values().map(|m| m.requests).sum::<u64>(), 44);
        assert!((total.cost - 21.0).abs() < 1e-9);
    }
}
