//! Tasks: a prompt and a workspace handed to N agents, each in its own OpenCode sandbox, until
//! the agents are done (and the check command passes, if there is one).
//!
//! A task's life: `POST /v1/tasks` validates the request and turns the workspace into one tar
//! (`workspace.tar` in `<state>/tasks/<id>/`), then N attempts run side by side. An attempt:
//! 1. creates an OpenCode sandbox (waiting in `queued` while agentd is at its quotas);
//! 2. waits until OpenCode answers, extracts the workspace to `/workspace`, and commits it as the
//!    baseline (`git init` unless it is a repository already);
//! 3. opens a session (scoped to `/workspace`), follows OpenCode's event stream, sends the
//!    prompt, and waits until the session is idle, counting tool calls on the way;
//! 4. runs the check command in the sandbox if there is one: on failure its output goes back
//!    to the same session as a follow-up, up to `max_rounds` rounds;
//! 5. records the final agent message and the diff against the baseline (`git add -A` then
//!    `git diff --cached --binary`, so new files are in it) in agentd's state.
//!
//! Everything an attempt learns is persisted at each step (the `TASKS` table; events and diffs
//! as files in the task's dir), so after an agentd restart an attempt resumes where it was: a
//! sandbox that still runs is followed again (if its session went idle meanwhile, the check
//! runs now), one that died while agentd was down fails the attempt. Cancellation and the
//! task's timeout abort the sessions, keep what diff there is, and stop the sandboxes. The
//! sandboxes of a finished task are deleted after the grace period (`task_grace`).
//!
//! Nothing an agent produces is trusted: its messages and diffs are stored as data, capped in
//! size, and never interpreted by agentd.
//!
//! Here: the service (create, run, attempts and their rounds, cancel, delete, reconcile,
//! events). [`model`] is what a task is; `agent` talks to OpenCode in a sandbox; `git` puts the
//! workspace in and takes the diff out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::db::TASKS;
use crate::error::Error;
use crate::sandbox::{now_ms, random_hex, CreateSandbox, Manager, Sandbox, SandboxState, Usage};
use crate::text::tail;
use crate::workspace::{WorkspaceInfo, WorkspaceSpec};

mod agent;
pub mod approvals;
mod attempt;
mod budget;
pub mod environment;
mod events;
pub mod follow_up;
pub use events::MAX_EVENTS_BYTES;
mod git;
pub mod model;
mod prepare;
mod push;
pub use push::{valid_branch, Pushed};
mod setup;

use git::validate_diff_exclude;
pub use git::{commit_message, diff_stats, is_commit_id, mbox};
pub use model::*;

type Result<T> = std::result::Result<T, Error>;

/// A task's time limit when the request gives none, seconds.
pub const DEFAULT_TASK_TIMEOUT_SECS: u64 = 3600;
/// Longest task time limit, seconds.
pub const MAX_TASK_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// How long an attempt may wait for a person with its time limit paused, by default.
pub const DEFAULT_WAIT_TIMEOUT_SECS: u64 = 24 * 3600;
/// Most parallel agents of one task.
pub const MAX_AGENTS: u32 = 16;
/// Rounds (agent turns, each followed by the check) when the request gives none.
pub const DEFAULT_MAX_ROUNDS: u32 = 3;
/// Most rounds.
pub const MAX_ROUNDS: u32 = 20;
/// Largest prompt.
pub const MAX_PROMPT_BYTES: usize = 256 * 1024;
/// Bytes of the check's output kept (its end) and sent back to the agent.
pub const CHECK_OUTPUT_TAIL: usize = 8 * 1024;
/// Largest diff kept; a bigger one fails the attempt's result with a message.
pub const MAX_DIFF_BYTES: usize = 16 * 1024 * 1024;
/// Largest final agent message kept.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Where the workspace is in every attempt's sandbox.
pub const WORKSPACE_DIR: &str = "/workspace";
/// Label on a task's sandboxes naming the task (and [`ATTEMPT_LABEL`] the attempt).
pub const TASK_LABEL: &str = "agentd.task";
/// Label on a task's sandboxes naming the attempt number.
pub const ATTEMPT_LABEL: &str = "agentd.attempt";
/// How long the check may run when the request does not say, seconds.
pub const DEFAULT_CHECK_TIMEOUT_SECS: u64 = 600;
/// Longest time a finished task's sandboxes may be kept, seconds.
pub const MAX_GRACE_SECS: u64 = 30 * 24 * 3600;
/// Longest check time limit, seconds.
pub const MAX_CHECK_TIMEOUT_SECS: u64 = 24 * 3600;
/// How long the setup may run when the request does not say, seconds: installing a
/// project's dependencies takes minutes, not hours.
pub const DEFAULT_SETUP_TIMEOUT_SECS: u64 = 1800;
/// Longest setup command, bytes.
pub const MAX_SETUP_BYTES: usize = 64 * 1024;
/// Files left out of every diff unless the task says otherwise: caches and build outputs
/// that checks and toolchains write and nobody wants in a patch. Git exclude syntax; they
/// apply to untracked files only (a repository that tracks such a file keeps it).
pub const DEFAULT_DIFF_EXCLUDE: &[&str] = &[
    "__pycache__/",
    "*.pyc",
    "*.pyo",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
    ".tox/",
    ".nox/",
    ".venv/",
    "*.egg-info/",
    ".coverage",
    "node_modules/",
    ".npm/",
    ".cache/",
    "target/",
    ".gradle/",
    ".next/",
    "__snapshots__.tmp/",
    ".DS_Store",
];
/// Most `diff_exclude` patterns, and the longest.
const MAX_DIFF_EXCLUDE: (usize, usize) = (256, 256);
/// How long the baseline commit and the diff may take.
const GIT_IN_SANDBOX_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a round's event stream may be opened again after OpenCode closed it.
const MAX_EVENT_RECONNECTS: u32 = 5;
/// Pause between tries of a sandbox create refused by a quota.
const QUOTA_RETRY: Duration = Duration::from_secs(2);

/// Distinct tool calls followed per attempt and round (past it they are neither counted nor
/// reported: a bound on what a sandbox can make agentd remember).
const MAX_TOOL_PARTS: usize = 100_000;

/// A task in memory.
pub struct Task {
    /// Its id (the record's, which never changes).
    id: String,
    /// The record; persisted on every change. A std mutex: held to read or update fields,
    /// never across an await.
    record: Mutex<TaskRecord>,
    /// Its events log: what the writer thread needs, shared with it.
    events: Arc<events::Log>,
    /// Set to `Cancelled`/`TimedOut` to end the running attempts.
    stop_tx: watch::Sender<Option<TaskState>>,
    /// Attempts whose sandbox create is under way (in a task of its own, which a cancel does
    /// not interrupt: a create stopped half-way would leave a sandbox nobody supervises).
    creating: Mutex<HashSet<u32>>,
}

impl Task {
    fn new(record: TaskRecord, last_event: u64) -> Arc<Task> {
        let stop = record.stop;
        Arc::new(Task {
            id: record.id.clone(),
            events: Arc::new(events::Log::new(&record.id, last_event)),
            record: Mutex::new(record),
            stop_tx: watch::channel(stop).0,
            creating: Mutex::new(HashSet::new()),
        })
    }

    /// A copy of the record.
    pub fn snapshot(&self) -> TaskRecord {
        self.record.lock().expect("task record lock").clone()
    }

    /// Id of the last event.
    pub fn last_event(&self) -> u64 {
        *self.events.tx.borrow()
    }

    /// Wakes when an event is written.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.events.tx.subscribe()
    }

    /// Whether a reader that has seen event `last` has seen the whole story.
    pub fn read_to_end(&self, last: u64) -> bool {
        self.events
            .finished
            .load(std::sync::atomic::Ordering::SeqCst)
            && last >= self.last_event()
    }
}

/// How an attempt's run ended (before the diff is collected).
enum Outcome {
    Succeeded,
    Failed(String),
    /// The sandbox is gone: no diff can be read.
    Lost(String),
}

/// The task service.
pub struct TaskManager {
    /// The sandbox service the attempts use. (The manager holds this service too: both live as
    /// long as the daemon.)
    mgr: Arc<Manager>,
    /// Every task, by id. A std mutex: map lookups only.
    tasks: Mutex<HashMap<String, Arc<Task>>>,
    /// `<state>/tasks`.
    dir: PathBuf,
    /// Appends events to the tasks' logs, off the async workers.
    events: events::EventWriter,
    /// Dependency caches (None: turned off).
    caches: Option<Arc<crate::cache::Caches>>,
    /// The cache each preparation under way holds, by task id.
    held_caches: Mutex<HashMap<String, crate::cache::MountedCache>>,
    /// Clones and pushes under way (each has a git volume of its own).
    git_slots: Arc<tokio::sync::Semaphore>,
}

/// Most clones and pushes at once (each may fill a 1.25 GiB volume and a core).
pub const MAX_GIT_OPERATIONS: usize = 4;

impl TaskManager {
    /// The service over `mgr`; call [`TaskManager::reconcile`] next.
    pub fn new(mgr: Arc<Manager>) -> anyhow::Result<Arc<TaskManager>> {
        let dir = mgr.config.state_dir.join("tasks");
        std::fs::create_dir_all(dir.join("uploads"))?;
        let caches = mgr
            .config
            .dependency_cache
            .map(|bytes| Arc::new(crate::cache::Caches::new(&mgr.config.state_dir, bytes)));
        Ok(Arc::new(TaskManager {
            mgr,
            tasks: Mutex::new(HashMap::new()),
            dir,
            events: events::EventWriter::start()?,
            caches,
            held_caches: Mutex::new(HashMap::new()),
            git_slots: Arc::new(tokio::sync::Semaphore::new(MAX_GIT_OPERATIONS)),
        }))
    }

    /// A slot for a clone or a push, or an error saying to retry.
    fn git_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.git_slots.clone().try_acquire_owned().map_err(|_| {
            Error::Unavailable(format!(
                "{MAX_GIT_OPERATIONS} git clones and pushes are under way: retry when one ends"
            ))
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Task>>> {
        self.tasks.lock().expect("task map lock")
    }

    fn task_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn events_path(&self, id: &str) -> PathBuf {
        self.task_dir(id).join("events.jsonl")
    }

    /// Where attempt `n`'s patch is kept.
    pub fn diff_path(&self, id: &str, n: u32) -> PathBuf {
        self.task_dir(id).join(format!("attempt-{n}.diff"))
    }

    fn upload_path(&self, upload: &str) -> PathBuf {
        self.dir.join("uploads").join(format!("{upload}.tar"))
    }

    /// Every task, oldest first.
    pub fn list(&self) -> Vec<Arc<Task>> {
        let mut v: Vec<_> = self.map().values().cloned().collect();
        v.sort_by_key(|t| t.snapshot().created_at);
        v
    }

    /// A task by id.
    pub fn get(&self, id: &str) -> Result<Arc<Task>> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no task {id:?}")))
    }

    fn persist(&self, task: &Task) {
        let rec = task.snapshot();
        // A deleted task's stragglers (an attempt finishing, the reaper) must not bring its
        // record back.
        if !self.map().contains_key(&rec.id) {
            return;
        }
        if let Err(e) = self.mgr.db.put(TASKS, &rec.id, &rec) {
            tracing::error!(task = %rec.id, error = %agentd_runtime::error_chain(&e), "failed to persist task");
        }
    }

    /// Writes the record and says whether that worked (for changes a request waits on).
    fn persist_checked(&self, task: &Task) -> Result<()> {
        let rec = task.snapshot();
        self.mgr.db.put(TASKS, &rec.id, &rec).map_err(Error::from)
    }

    /// Queues an event (`kind` plus the fields of `data`) for the task's log; the writer
    /// thread appends it and wakes readers. Never blocks. A deleted task logs nothing.
    fn emit(&self, task: &Task, kind: &str, data: serde_json::Value) {
        if !self.map().contains_key(&task.id) {
            return;
        }
        self.events
            .send(&task.events, self.events_path(&task.id), kind, data);
    }

    /// Logs a connection attempt `n` of task `id` made through the egress proxy.
    pub fn note_egress(&self, id: &str, n: u32, entry: &crate::egress::EgressEntry) {
        let Ok(task) = self.get(id) else { return };
        self.emit(
            &task,
            "egress",
            serde_json::json!({"attempt": n, "method": entry.method, "host": entry.host, "port": entry.port,
                "allowed": entry.allowed, "reason": entry.reason, "bytes_out": entry.bytes_out, "bytes_in": entry.bytes_in}),
        );
    }

    /// Changes a field of attempt `n` in memory only (saved with the next [`Self::update`] or
    /// state change).
    fn update_unsaved(&self, task: &Task, n: u32, f: impl FnOnce(&mut Attempt)) {
        let mut r = task.record.lock().expect("task record lock");
        if let Some(a) = r.attempts.iter_mut().find(|a| a.n == n) {
            f(a);
        }
    }

    /// Changes a field of attempt `n` and persists the task.
    fn update(&self, task: &Task, n: u32, f: impl FnOnce(&mut Attempt)) {
        {
            let mut r = task.record.lock().expect("task record lock");
            if let Some(a) = r.attempts.iter_mut().find(|a| a.n == n) {
                f(a);
            }
        }
        self.persist(task);
    }

    /// Moves attempt `n` to `state`, recomputes the task's state, and says so in events.
    fn set_attempt_state(&self, task: &Task, n: u32, state: TaskState, detail: Option<&str>) {
        let (changed, task_state, round) = {
            let mut r = task.record.lock().expect("task record lock");
            let mut changed = false;
            let mut round = 0;
            if let Some(a) = r.attempts.iter_mut().find(|a| a.n == n) {
                changed = a.state != state;
                a.state = state;
                round = a.round;
                if state.is_terminal() && a.finished_at.is_none() {
                    a.finished_at = Some(now_ms());
                    a.timings.total_ms = a.started_at.map(|s| now_ms().saturating_sub(s));
                }
            }
            let before = r.state;
            r.state = r.derived_state();
            if r.state.is_terminal() && r.finished_at.is_none() {
                r.finished_at = Some(now_ms());
            } else if !r.state.is_terminal() {
                // Reopened by a follow-up: the grace period starts at its new end.
                r.finished_at = None;
            }
            (changed, (before != r.state).then_some(r.state), round)
        };
        self.persist(task);
        if changed {
            let mut data =
                serde_json::json!({"attempt": n, "state": state.as_str(), "round": round});
            if let Some(d) = detail {
                data["detail"] = d.into();
            }
            self.emit(task, "attempt.state", data);
        }
        if let Some(s) = task_state {
            self.emit(task, "task.state", serde_json::json!({"state": s.as_str()}));
        }
    }

    /// Resolves once agentd is stopping.
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.mgr.stopping()
    }

    /// Stores an uploaded workspace tar; returns its id for `workspace.upload`.
    pub async fn upload(&self, spooled: &Path) -> Result<(String, WorkspaceInfo)> {
        let id = random_hex(12);
        let path = self.upload_path(&id);
        let p2 = path.clone();
        let src = spooled.to_path_buf();
        let info = tokio::task::spawn_blocking(move || {
            std::fs::rename(&src, &p2)
                .map_err(|e| Error::internal(format!("failed to store the upload: {e}")))?;
            crate::workspace::check_upload(&p2).map_err(|e| {
                let _ = std::fs::remove_file(&p2);
                Error::Invalid(e.to_string())
            })
        })
        .await
        .map_err(Error::internal)??;
        tracing::info!(upload = %id, entries = info.entries, bytes = info.bytes, "workspace uploaded");
        Ok((id, info))
    }

    /// Validates a task, prepares its workspace, stores it and starts it.
    /// `tcp`: the request came over TCP (a git URL may then reach public addresses only,
    /// unless `git_allow_networks` says otherwise).
    pub async fn create(self: &Arc<Self>, mut req: CreateTask, tcp: bool) -> Result<TaskRecord> {
        if req.prompt.trim().is_empty() {
            return Err(Error::Invalid("prompt must not be empty".into()));
        }
        if req.prompt.len() > MAX_PROMPT_BYTES {
            return Err(Error::Invalid(format!(
                "prompt is longer than {MAX_PROMPT_BYTES} bytes"
            )));
        }
        let agents = req.agents.unwrap_or(1);
        if agents == 0 || agents > MAX_AGENTS {
            return Err(Error::Invalid(format!(
                "agents must be between 1 and {MAX_AGENTS}"
            )));
        }
        if let Some(t) = req.timeout_secs {
            if t == 0 || t > MAX_TASK_TIMEOUT_SECS {
                return Err(Error::Invalid(format!(
                    "timeout_secs must be between 1 and {MAX_TASK_TIMEOUT_SECS}"
                )));
            }
        }
        if req
            .wait_timeout_secs
            .is_some_and(|t| t > MAX_TASK_TIMEOUT_SECS)
        {
            return Err(Error::Invalid(format!(
                "wait_timeout_secs must be at most {MAX_TASK_TIMEOUT_SECS}"
            )));
        }
        if let Some(r) = req.max_rounds {
            if r == 0 || r > MAX_ROUNDS {
                return Err(Error::Invalid(format!(
                    "max_rounds must be between 1 and {MAX_ROUNDS}"
                )));
            }
            if req.check.is_none() {
                return Err(Error::Invalid(
                    "max_rounds needs a check command (rounds repeat while the check fails)".into(),
                ));
            }
        }
        if let Some(c) = &req.check {
            if c.trim().is_empty() || c.contains('\0') {
                return Err(Error::Invalid(
                    "check must be a non-empty shell command".into(),
                ));
            }
        }
        if req.grace_secs.is_some_and(|g| g > MAX_GRACE_SECS) {
            return Err(Error::Invalid(format!(
                "grace_secs must be at most {MAX_GRACE_SECS}"
            )));
        }
        if let Some(t) = req.check_timeout_secs {
            if t == 0 || t > MAX_CHECK_TIMEOUT_SECS {
                return Err(Error::Invalid(format!(
                    "check_timeout_secs must be between 1 and {MAX_CHECK_TIMEOUT_SECS}"
                )));
            }
            if req.check.is_none() {
                return Err(Error::Invalid(
                    "check_timeout_secs needs a check command".into(),
                ));
            }
        }
        if let Some(ex) = &req.diff_exclude {
            validate_diff_exclude(ex)?;
        }
        if let Some(s) = &req.setup {
            setup::validate(s)?;
        }
        crate::opencode::check_permissions(&req.permissions).map_err(Error::Invalid)?;
        if let Some(n) = &req.network {
            crate::egress::compile(
                n,
                &self.mgr.config.egress_presets,
                self.mgr.config.egress_open,
            )
            .map_err(Error::Invalid)?;
        }
        if let Some(t) = req.setup_timeout_secs {
            if t == 0 || t > MAX_TASK_TIMEOUT_SECS {
                return Err(Error::Invalid(format!(
                    "setup_timeout_secs must be between 1 and {MAX_TASK_TIMEOUT_SECS}"
                )));
            }
            if req.setup.is_none() {
                return Err(Error::Invalid(
                    "setup_timeout_secs needs a setup command".into(),
                ));
            }
        }
        crate::sandbox::validate_model(req.model.as_deref())?;
        self.mgr.require_llm()?;
        if let Some(model) = &req.model {
            self.mgr.check_model(model).await?;
        }
        // The config's default budget for a task that gives none.
        if req.budget.is_none() {
            req.budget = self
                .mgr
                .config
                .task_budget_tokens
                .map(|t| crate::sandbox::Budget {
                    tokens: Some(t),
                    ..Default::default()
                });
        }
        self.mgr
            .check_budget(req.budget.as_ref(), req.model.as_deref())?;
        req.workspace
            .validate()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        self.mgr.limits(&req.limits)?;
        self.check_image(req.image.as_deref(), None)?;

        let mut req = req;
        let id = random_hex(6);
        let dir = self.task_dir(&id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(Error::internal)?;
        let tar = dir.join("workspace.tar");
        let prepared = self
            .prepare_workspace(&req.workspace, &dir, &tar, tcp)
            .await;
        // The repository's own environment fills what the request leaves open.
        let environment = match prepared {
            Ok(_) if req.ignore_environment => Ok(None),
            Ok(_) => {
                let t = tar.clone();
                tokio::task::spawn_blocking(move || environment::read(&t))
                    .await
                    .map_err(Error::internal)
                    .and_then(|r| r.map_err(|e| Error::Invalid(e.to_string())))
            }
            Err(_) => Ok(None),
        };
        let checked = environment.and_then(|env| {
            if let Some(env) = &env {
                if req.image.is_none() && env.image.is_some() {
                    self.check_image(env.image.as_deref(), Some(&env.file))?;
                    req.image = env.image.clone();
                }
                if req.setup.is_none() {
                    if let Some(s) = &env.setup {
                        setup::validate(s).map_err(|e| {
                            Error::Invalid(format!("the workspace's {}: {e}", env.file))
                        })?;
                        req.setup = Some(s.clone());
                        req.setup_timeout_secs = req.setup_timeout_secs.or(env.setup_timeout_secs);
                    }
                }
            }
            Ok(env)
        });
        let (info, environment) = match (prepared, checked) {
            (Ok(info), Ok(env)) => (info, env),
            (Err(e), _) | (_, Err(e)) => {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Err(e);
            }
        };
        if let Some(env) = &environment {
            tracing::info!(task = %id, file = %env.file, image = ?env.image, setup = env.setup.is_some(), "the workspace defines its environment");
        }
        let record = TaskRecord {
            id: id.clone(),
            request: req,
            environment,
            workspace: info,
            state: TaskState::Queued,
            created_at: now_ms(),
            started_at: None,
            finished_at: None,
            attempts: (1..=agents).map(Attempt::new).collect(),
            prepared: None,
            stop: None,
            sandboxes_removed: false,
            deleting: false,
            budget_grants: 0,
            budget_unlimited: false,
        };
        let task = Task::new(record, 0);
        self.map().insert(id.clone(), task.clone());
        self.persist(&task);
        self.emit(
            &task,
            "task.state",
            serde_json::json!({"state": "queued", "agents": agents}),
        );
        tracing::info!(task = %id, agents, "task created");
        tokio::spawn(self.clone().run(task.clone()));
        Ok(task.snapshot())
    }

    /// Checks that `image` (if any) can be used: the default image is built on first use,
    /// any other must be in the store now. `file`: the workspace file that named it.
    fn check_image(&self, image: Option<&str>, file: Option<&str>) -> Result<()> {
        let Some(image) = image else { return Ok(()) };
        if image == crate::default_image::NAME || self.mgr.store.resolve(image).is_ok() {
            return Ok(());
        }
        let named = match file {
            Some(f) => {
                format!("the workspace's {f} names image {image:?}, which agentd does not have")
            }
            None => format!("unknown image {image:?}"),
        };
        Err(Error::Invalid(format!(
            "{named}: pull or import it first (POST /v1/images/pull, agentd image pull|import){}",
            if file.is_some() {
                ", or give image in the request"
            } else {
                ""
            }
        )))
    }

    async fn prepare_workspace(
        &self,
        spec: &WorkspaceSpec,
        dir: &Path,
        tar: &Path,
        tcp: bool,
    ) -> Result<WorkspaceInfo> {
        let bad = |e: crate::workspace::WorkspaceError| match e {
            crate::workspace::WorkspaceError::Write(e) => Error::internal(e),
            crate::workspace::WorkspaceError::Forbidden(m) => Error::Forbidden(m),
            other => Error::Invalid(other.to_string()),
        };
        if let Some(path) = &spec.path {
            let (p, t, x) = (PathBuf::from(path), tar.to_path_buf(), spec.exclude.clone());
            return tokio::task::spawn_blocking(move || {
                crate::workspace::archive_host_dir(&p, &t, &x)
            })
            .await
            .map_err(Error::internal)?
            .map_err(bad);
        }
        if let Some(upload) = &spec.upload {
            let src = self.upload_path(upload);
            if tokio::fs::rename(&src, tar).await.is_err() {
                return Err(Error::Invalid(format!(
                    "no uploaded workspace {upload:?} (each upload serves one task; POST /v1/workspaces again)"
                )));
            }
            let t = tar.to_path_buf();
            return tokio::task::spawn_blocking(move || crate::workspace::check_upload(&t))
                .await
                .map_err(Error::internal)?
                .map_err(bad);
        }
        let url = spec.git.as_deref().unwrap_or_default();
        let pin = if tcp {
            Some(
                crate::workspace::pin_git_url(url, &self.mgr.config.git_allow_networks)
                    .await
                    .map_err(bad)?,
            )
        } else {
            None
        };
        let _slot = self.git_slot()?;
        crate::workspace::archive_git(url, spec.git_ref.as_deref(), &spec.exclude, dir, tar, pin)
            .await
            .map_err(bad)
    }

    /// Runs (or resumes) every unfinished attempt of a task, then reaps nothing: the reaper
    /// deletes the sandboxes after the grace period.
    async fn run(self: Arc<Self>, task: Arc<Task>) {
        {
            let mut r = task.record.lock().expect("task record lock");
            if r.started_at.is_none() {
                r.started_at = Some(now_ms());
            }
        }
        self.persist(&task);
        let rec = task.snapshot();
        let pending = |a: &Attempt| !a.state.is_terminal() && a.sandbox.is_none();
        if Self::shares_setup(&rec) && rec.attempts.iter().any(pending) {
            let deadline_ms = rec
                .started_at
                .unwrap_or_else(now_ms)
                .saturating_add(u64::try_from(rec.timeout().as_millis()).unwrap_or(u64::MAX));
            if let Err((state, why)) = self.prepare(&task, deadline_ms).await {
                for a in rec.attempts.iter().filter(|a| !a.state.is_terminal()) {
                    self.finish_attempt(&task, a.n, state, Some(why.clone()));
                }
            }
        }
        let rec = task.snapshot();
        let mut handles = Vec::new();
        for a in rec.attempts.iter().filter(|a| !a.state.is_terminal()) {
            handles.push((a.n, tokio::spawn(self.clone().attempt(task.clone(), a.n))));
        }
        for (n, h) in handles {
            if let Err(e) = h.await {
                // A bug, not the agent's doing: the attempt must still end.
                tracing::error!(task = %rec.id, attempt = n, error = %e, "attempt task failed");
                self.finish_attempt(
                    &task,
                    n,
                    TaskState::Failed,
                    Some("internal error; see agentd's log".into()),
                );
            }
        }
        let rec = task.snapshot();
        if rec.state.is_terminal() {
            self.emit(
                &task,
                "task.finished",
                serde_json::json!({"state": rec.state.as_str()}),
            );
            tracing::info!(task = %rec.id, state = rec.state.as_str(), "task finished");
        }
    }

    /// One attempt, bounded by the task's time limit and cancellation.
    async fn attempt(self: Arc<Self>, task: Arc<Task>, n: u32) {
        let rec = task.snapshot();
        self.update(&task, n, |a| {
            if a.started_at.is_none() {
                a.started_at = Some(now_ms());
            }
        });
        let outcome = tokio::select! {
            o = self.clone().drive(&task, n) => Ok(o),
            s = prepare::stop_signal(task.stop_tx.subscribe()) => Err(s),
            _ = self.time_limit(&task, n) => Err(TaskState::TimedOut),
        };
        if let Err(s) = outcome {
            // The task stops with it, unless another attempt's time limit was paused while
            // it waited for a person (that one has time left) or a follow-up reopened this
            // one alone.
            let now = now_ms();
            let own_limit = self.attempt_snapshot(&task, n).limit_from.is_some()
                || task
                    .snapshot()
                    .attempts
                    .iter()
                    .any(|a| a.n != n && !a.state.is_terminal() && a.waited_ms(now) > 0);
            if s != TaskState::TimedOut || !own_limit {
                prepare::set_stop(&task, s);
            }
            // A create under way finishes on its own (and records its sandbox): wait for it,
            // so that the sandbox is stopped below rather than left running.
            let waited = Instant::now();
            while task.creating.lock().expect("creating lock").contains(&n)
                && waited.elapsed() < Duration::from_secs(180)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let sb = self
            .attempt_snapshot(&task, n)
            .sandbox
            .and_then(|id| self.mgr.get(&id).ok());
        match outcome {
            // A success is one only with its diff: without it the result would be lost.
            Ok(Outcome::Succeeded) => match self.collect_diff(&task, n, sb.as_ref()).await {
                Ok(stats) => {
                    if stats.bytes == 0 {
                        let note = if rec.request.check.is_some() {
                            "the check passed, and the agent changed nothing (the diff is empty)"
                        } else {
                            "the agent changed nothing (the diff is empty)"
                        };
                        self.update(&task, n, |a| a.note = Some(note.into()));
                    }
                    self.finish_attempt(&task, n, TaskState::Succeeded, None);
                }
                Err(why) => self.finish_attempt(&task, n, TaskState::Failed, Some(why)),
            },
            Ok(Outcome::Failed(why)) => {
                // A refusal of the gateway's is why, whatever OpenCode made of it.
                let spent = sb.as_ref().and_then(|s| {
                    budget_spent(&s.snapshot())
                        .or_else(|| self.spend(&rec.id, &s.snapshot().id)?.spent())
                });
                let why = match spent {
                    Some(spent) => format!("{spent}; {why}"),
                    None => why,
                };
                let why = match self.collect_diff(&task, n, sb.as_ref()).await {
                    Ok(_) => why,
                    Err(diff) => format!("{why}; and no diff: {diff}"),
                };
                self.finish_attempt(&task, n, TaskState::Failed, Some(why));
            }
            Ok(Outcome::Lost(why)) => self.finish_attempt(&task, n, TaskState::Failed, Some(why)),
            Err(state) => {
                let why = if state == TaskState::TimedOut {
                    let a = self.attempt_snapshot(&task, n);
                    let waited = a.waited_ms(now_ms()) / 1000;
                    let mut why = format!(
                        "the task's time limit ({} s) passed",
                        rec.timeout().as_secs()
                    );
                    if a.state == TaskState::Waiting {
                        why.push_str(
                            " while the agent waited for a person to answer a permission request",
                        );
                    }
                    if waited > 0 {
                        why.push_str(&format!(
                            " ({waited} s of waiting for a person paused it, {} s at most)",
                            rec.wait_timeout().as_secs()
                        ));
                    }
                    why
                } else {
                    "cancelled".to_string()
                };
                if let Some(sb) = &sb {
                    // Stop the agent, keep what it did, then stop the sandbox.
                    if let (Some(session), Ok(agent)) =
                        (self.attempt_snapshot(&task, n).session, self.agent(sb))
                    {
                        let _ = agent.abort(&session).await;
                    }
                    // Best effort: what the agent did so far, if it can be read in time.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(30),
                        self.collect_diff(&task, n, Some(sb)),
                    )
                    .await;
                    self.mgr.stop(sb, &why).await;
                }
                self.finish_attempt(&task, n, state, Some(why));
            }
        }
        // A finished attempt's sandbox is kept for its grace period (a person may look, or
        // send a follow-up): hibernated meanwhile (its OpenCode stopped, its memory free; paused
        // if OpenCode still works), so it takes no CPU and little memory. A follow-up wakes its
        // OpenCode; any other use only resumes it.
        if let Some(sb) = sb.filter(|s| s.snapshot().state == SandboxState::Ready) {
            if self.attempt_snapshot(&task, n).state.is_terminal() {
                if let Err(e) = self.mgr.hibernate_or_pause(&sb).await {
                    tracing::debug!(task = %rec.id, attempt = n, error = %e, "could not pause a finished attempt's sandbox");
                }
            }
        }
    }

    /// Resolves when attempt `n` runs out of time: its deadline moves while it waits for a
    /// person (see [`TaskRecord::deadline_ms`]), so it is looked at again at least every
    /// second.
    async fn time_limit(&self, task: &Task, n: u32) {
        loop {
            let now = now_ms();
            let deadline = task
                .snapshot()
                .deadline_ms(&self.attempt_snapshot(task, n), now);
            if now >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis((deadline - now).min(1000))).await;
        }
    }

    /// Marks attempt `n` waiting for a person (its time limit paused) or not.
    pub(super) fn set_waiting(&self, task: &Task, n: u32, waiting: bool, detail: Option<&str>) {
        let now = now_ms();
        self.update(task, n, |a| match (waiting, a.waiting_since) {
            (true, None) => a.waiting_since = Some(now),
            (false, Some(s)) => {
                a.waited_ms = a.waited_ms.saturating_add(now.saturating_sub(s));
                a.waiting_since = None;
            }
            _ => {}
        });
        let state = if waiting {
            TaskState::Waiting
        } else {
            TaskState::Running
        };
        self.set_attempt_state(task, n, state, detail);
    }

    fn finish_attempt(&self, task: &Task, n: u32, state: TaskState, why: Option<String>) {
        let usage = self.attempt_usage(task, n);
        let now = now_ms();
        self.update(task, n, |a| {
            if let Some(s) = a.waiting_since.take() {
                a.waited_ms = a.waited_ms.saturating_add(now.saturating_sub(s));
            }
            if let Some(u) = usage {
                a.usage = u;
            }
            if why.is_some() {
                a.error = why.clone();
            }
        });
        self.set_attempt_state(task, n, state, why.as_deref());
    }

    fn attempt_usage(&self, task: &Task, n: u32) -> Option<Usage> {
        let sb = self.attempt_snapshot(task, n).sandbox?;
        self.mgr.get(&sb).ok().map(|s| s.snapshot().usage)
    }

    fn attempt_snapshot(&self, task: &Task, n: u32) -> Attempt {
        task.snapshot()
            .attempts
            .into_iter()
            .find(|a| a.n == n)
            .unwrap_or_else(|| Attempt::new(n))
    }

    /// The attempt's steps; each one is persisted, so a resumed attempt skips what is done.
    async fn drive(self: Arc<Self>, task: &Arc<Task>, n: u32) -> Outcome {
        let rec = task.snapshot();
        let a = self.attempt_snapshot(task, n);
        let begun = Instant::now();

        // 1. The sandbox.
        let sb = match &a.sandbox {
            Some(id) => match self.mgr.get(id) {
                Ok(sb) if sb.snapshot().state.is_live() => sb,
                Ok(sb) => {
                    let why = sb
                        .snapshot()
                        .exit
                        .map(|e| e.reason)
                        .unwrap_or_else(|| "it ended".into());
                    return Outcome::Lost(format!("the attempt's sandbox ended: {why}"));
                }
                Err(_) => return Outcome::Lost("the attempt's sandbox is gone".into()),
            },
            None => {
                self.set_attempt_state(task, n, TaskState::Starting, None);
                task.creating.lock().expect("creating lock").insert(n);
                let (me, t2, rec2) = (self.clone(), task.clone(), rec.clone());
                let created = tokio::spawn(async move {
                    let r = me.create_sandbox(&t2, &rec2, n).await;
                    if let Ok(sb) = &r {
                        let ms = ms(begun.elapsed());
                        me.update(&t2, n, |a| {
                            a.sandbox = Some(sb.snapshot().id);
                            a.timings.sandbox_ms = Some(ms);
                        });
                    }
                    t2.creating.lock().expect("creating lock").remove(&n);
                    r
                })
                .await;
                match created {
                    Ok(Ok(sb)) => sb,
                    Ok(Err(why)) => return Outcome::Lost(why),
                    Err(e) => return Outcome::Lost(format!("the sandbox create failed: {e}")),
                }
            }
        };
        let sandbox_id = sb.snapshot().id;
        self.emit(
            task,
            "attempt.sandbox",
            serde_json::json!({"attempt": n, "sandbox": sandbox_id}),
        );

        // 2. OpenCode ready, then the workspace and its baseline commit.
        let ready_wait = Instant::now();
        if let Err(why) = sb.wait_ready().await {
            return Outcome::Lost(why);
        }
        if a.baseline.is_none() {
            let ready_ms = ms(ready_wait.elapsed());
            let t = Instant::now();
            match self.put_workspace(&rec, &sb).await {
                Ok((baseline, source)) => {
                    let ws_ms = ms(t.elapsed());
                    self.update(task, n, |a| {
                        a.baseline = Some(baseline);
                        a.source = source;
                        a.timings.opencode_ready_ms = Some(ready_ms);
                        a.timings.workspace_ms = Some(ws_ms);
                    });
                }
                Err(why) => return Outcome::Failed(why),
            }
        }
        if let Some(setup) = &rec.request.setup {
            if self.attempt_snapshot(task, n).setup.is_none() {
                let deadline_ms = task
                    .snapshot()
                    .deadline_ms(&self.attempt_snapshot(task, n), now_ms());
                if let Err(why) = self.setup(task, n, &sb, setup, deadline_ms).await {
                    return why;
                }
            }
        }

        // 3. The session.
        let session = match self.attempt_snapshot(task, n).session {
            Some(s) => s,
            None => {
                let title = format!("agentd task {} attempt {n}", rec.id);
                let made = match self.agent(&sb) {
                    Ok(agent) => agent.create_session(&title).await,
                    Err(e) => Err(e),
                };
                match made {
                    Ok(s) => {
                        self.update(task, n, |a| a.session = Some(s.clone()));
                        s
                    }
                    Err(e) => return Outcome::Failed(format!("OpenCode refused a session: {e}")),
                }
            }
        };

        // 4. Rounds: the agent works until idle, then the check.
        let max_rounds = rec.max_rounds();
        loop {
            let a = self.attempt_snapshot(task, n);
            let round = a.round;
            if a.state != TaskState::Checking {
                self.set_attempt_state(task, n, TaskState::Running, None);
                let r = self.agent_round(task, n, &sb, &session, &rec, None).await;
                if let Err(o) = self.with_more_budget(task, n, &sb, &session, &rec, r).await {
                    return o;
                }
            }
            // A person's follow-ups, sent as the agent's turn ended: each batch is one more
            // turn before the check.
            while let Some((text, count)) = self.follow_ups(task, n) {
                self.set_attempt_state(task, n, TaskState::Running, Some("a follow-up"));
                let r = self
                    .agent_round(task, n, &sb, &session, &rec, Some((&text, count)))
                    .await;
                if let Err(o) = self.with_more_budget(task, n, &sb, &session, &rec, r).await {
                    return o;
                }
            }
            let Some(check) = rec.request.check.clone() else {
                return Outcome::Succeeded;
            };
            self.set_attempt_state(task, n, TaskState::Checking, None);
            let deadline_ms = task
                .snapshot()
                .deadline_ms(&self.attempt_snapshot(task, n), now_ms());
            let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()).max(1000));
            let limit = Duration::from_secs(
                rec.request
                    .check_timeout_secs
                    .unwrap_or(DEFAULT_CHECK_TIMEOUT_SECS),
            );
            let t = Instant::now();
            let out = match self
                .mgr
                .exec_collect(
                    &sb,
                    // stderr into stdout: the output keeps its order.
                    vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        format!("{{\n{check}\n}} 2>&1"),
                    ],
                    Some(WORKSPACE_DIR),
                    left.min(limit),
                    CHECK_OUTPUT_TAIL,
                )
                .await
            {
                Ok(o) => o,
                Err(e) => return Outcome::Lost(format!("the check could not run: {e}")),
            };
            let result = attempt::check_result("check", round, &out, limit, left, t.elapsed());
            let (passed, timed_out) = (result.passed, result.timed_out);
            self.update(task, n, |a| {
                a.timings.checks_ms.push(result.duration_ms);
                a.check = Some(result.clone());
            });
            self.emit(
                task,
                "check",
                serde_json::json!({"attempt": n, "round": round, "exit_code": result.exit_code, "passed": passed, "timed_out": timed_out, "output": result.output}),
            );
            let next = match attempt::after_check(&result, max_rounds, limit) {
                attempt::Next::Succeeded => return Outcome::Succeeded,
                attempt::Next::Failed(why) => return Outcome::Failed(why),
                attempt::Next::Round(next) => next,
            };
            // The next round: the same session gets the check's output.
            self.update(task, n, |a| a.round = next);
            self.set_attempt_state(
                task,
                n,
                TaskState::Running,
                Some("the check failed: its output goes back to the agent"),
            );
        }
    }

    /// A round's result, and while it is a failure of a spent budget a person gave more
    /// for, the rounds that tell the agent to go on.
    async fn with_more_budget(
        &self,
        task: &Arc<Task>,
        n: u32,
        sb: &Arc<Sandbox>,
        session: &str,
        rec: &TaskRecord,
        mut r: std::result::Result<(), Outcome>,
    ) -> std::result::Result<(), Outcome> {
        while matches!(r, Err(Outcome::Failed(_))) && self.more_budget(task, n, sb).await {
            self.set_attempt_state(task, n, TaskState::Running, Some("more budget"));
            r = self
                .agent_round(task, n, sb, session, rec, Some((budget::GO_ON, 0)))
                .await;
        }
        r
    }

    /// Creates the sandbox of attempt `n` (on the prepared layer, if the task has one), or
    /// with `n` 0 the preparation's (no OpenCode), waiting (queued) while agentd is at a
    /// quota.
    async fn create_sandbox(
        &self,
        task: &Arc<Task>,
        rec: &TaskRecord,
        n: u32,
    ) -> std::result::Result<Arc<Sandbox>, String> {
        let grace = rec.request.grace_secs.unwrap_or(self.mgr.config.task_grace);
        let mut labels = rec.request.labels.clone();
        let prepare = n == 0;
        labels.insert(TASK_LABEL.into(), rec.id.clone());
        // 0 is the preparation: its setup and egress events say attempt 0 too.
        labels.insert(ATTEMPT_LABEL.into(), n.to_string());
        let cache = prepare
            .then(|| {
                self.held_caches
                    .lock()
                    .expect("cache lock")
                    .get(&rec.id)
                    .map(|c| c.dir.clone())
            })
            .flatten();
        let base_layer = rec
            .prepared
            .as_ref()
            .filter(|p| !prepare && p.state == model::PreparedState::Ready)
            .map(|_| self.layer_path(&rec.id));
        let req = CreateSandbox {
            image: rec.request.image.clone(),
            limits: rec.request.limits.clone(),
            // The task drives the sandbox; its time limit and the grace period bound it, and
            // the TTL is the backstop should agentd lose track of it.
            idle_timeout_secs: Some(0),
            ttl_secs: Some(
                rec.timeout()
                    .as_secs()
                    .saturating_add(grace)
                    .saturating_add(600)
                    .min(crate::daemon::config::MAX_SANDBOX_TIMEOUT_SECS),
            ),
            labels,
            opencode: Some(!prepare),
            model: rec.request.model.clone().filter(|_| !prepare),
            // The sandbox's part: what it may spend alone (asking for more and the total of
            // all attempts are the task's).
            budget: rec.request.budget.clone().filter(|_| !prepare).map(|b| {
                crate::sandbox::Budget {
                    tokens: b.tokens,
                    cost: b.cost,
                    ..Default::default()
                }
            }),
            permissions: rec.request.permissions.clone(),
            base_layers: base_layer.into_iter().collect(),
            cache,
            network: rec
                .request
                .network
                .clone()
                .map(crate::sandbox::NetworkRequest::Policy),
            ..CreateSandbox::default()
        };
        let mut waiting = false;
        loop {
            if task.stop_tx.borrow().is_some() {
                return Err("stopped before its sandbox was made".into());
            }
            match self.mgr.create(req.clone()).await {
                Ok(r) => return self.mgr.get(&r.id).map_err(|e| e.to_string()),
                Err(Error::Quota(msg)) => {
                    // Finished attempts keep their sandboxes for inspection, but not at the
                    // cost of one that wants to work (else agents > max_sandboxes would wait
                    // for their own task's end).
                    if self.release_finished_sandbox().await {
                        continue;
                    }
                    if !waiting {
                        waiting = true;
                        self.set_attempt_state(task, n, TaskState::Queued, Some(&msg));
                    }
                    tokio::time::sleep(QUOTA_RETRY).await;
                }
                Err(Error::Internal(detail)) => {
                    tracing::error!(task = %rec.id, attempt = n, error = %detail, "sandbox create failed");
                    return Err(format!("agentd could not create the sandbox: {detail}"));
                }
                Err(e) => return Err(format!("the sandbox could not be created: {e}")),
            }
            if waiting {
                self.set_attempt_state(task, n, TaskState::Starting, None);
                waiting = false;
            }
        }
    }

    /// Deletes the live sandbox of the attempt (of any task) that finished first; whether
    /// there was one.
    async fn release_finished_sandbox(&self) -> bool {
        let mut oldest: Option<(u64, Arc<Task>, Arc<Sandbox>)> = None;
        for task in self.list() {
            for a in task.snapshot().attempts {
                let (Some(done), Some(id)) = (a.finished_at, a.sandbox) else {
                    continue;
                };
                let Ok(sb) = self.mgr.get(&id) else { continue };
                if sb.snapshot().state.is_live() && oldest.as_ref().is_none_or(|o| done < o.0) {
                    oldest = Some((done, task.clone(), sb));
                }
            }
        }
        let Some((_, task, sb)) = oldest else {
            return false;
        };
        let id = sb.snapshot().id;
        tracing::info!(task = %task.snapshot().id, sandbox = %id, "removing a finished attempt's sandbox to make room");
        self.emit(
            &task,
            "attempt.sandbox_removed",
            serde_json::json!({"sandbox": id, "reason": "room for another attempt"}),
        );
        self.mgr.delete(&sb).await.is_ok()
    }

    /// Cancels a task's unfinished attempts.
    pub fn cancel(&self, task: &Arc<Task>) -> Result<()> {
        let rec = task.snapshot();
        if rec.state.is_terminal() {
            return Err(Error::Conflict(format!(
                "task {} is {} already",
                rec.id,
                rec.state.as_str()
            )));
        }
        {
            let mut r = task.record.lock().expect("task record lock");
            r.stop = Some(TaskState::Cancelled);
        }
        self.persist(task);
        self.emit(task, "cancel", serde_json::json!({}));
        task.stop_tx.send_replace(Some(TaskState::Cancelled));
        Ok(())
    }

    /// Cancels (if needed) and forgets a task: its sandboxes, events, diffs and record.
    /// Accepts a delete: the record says `deleting` (durably) and the removal runs on its own,
    /// so a client that gives up waiting leaves nothing half done; a restart resumes it.
    pub fn delete(self: &Arc<Self>, task: &Arc<Task>) -> Result<TaskRecord> {
        let first = {
            let mut r = task.record.lock().expect("task record lock");
            let first = !r.deleting;
            r.deleting = true;
            first
        };
        if first {
            if let Err(e) = self.persist_checked(task) {
                task.record.lock().expect("task record lock").deleting = false;
                return Err(e);
            }
            tokio::spawn(self.clone().finish_delete(task.clone()));
        }
        Ok(task.snapshot())
    }

    /// Cancels the task if it runs, waits for its attempts, removes its sandboxes, record,
    /// events and results.
    async fn finish_delete(self: Arc<Self>, task: Arc<Task>) {
        let rec = task.snapshot();
        if !rec.state.is_terminal() {
            let _ = self.cancel(&task);
            // The attempts stop their sandboxes and finish; wait for that (bounded).
            let mut rx = task.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(60), async {
                while !task.snapshot().state.is_terminal() {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
        }
        self.remove_sandboxes(&task).await;
        // Out of the map first (stragglers then write nothing), then the record: a crash after
        // it leaves only a dir that the next start removes.
        self.map().remove(&rec.id);
        if let Err(e) = self.mgr.db.delete(TASKS, &rec.id) {
            tracing::error!(task = %rec.id, error = %e, "cannot delete the task's record; it stays 'deleting' and the next start retries");
            self.map().insert(rec.id.clone(), task.clone());
            return;
        }
        // The prepared layer in it is a tree a sandbox wrote: removed without recursion.
        let dir = self.task_dir(&rec.id);
        let _ = tokio::task::spawn_blocking(move || agentd_runtime::tree::remove_tree(&dir)).await;
        tracing::info!(task = %rec.id, "task deleted");
    }

    async fn remove_sandboxes(&self, task: &Arc<Task>) {
        for a in task.snapshot().attempts {
            if let Some(sb) = a.sandbox.and_then(|id| self.mgr.get(&id).ok()) {
                let _ = self.mgr.delete(&sb).await;
            }
        }
        task.record
            .lock()
            .expect("task record lock")
            .sandboxes_removed = true;
        self.persist(task);
        self.remove_prepared(task).await;
    }

    /// After a start: load the tasks, resume the unfinished ones, delete task sandboxes no
    /// attempt owns (a crash between the create and the record), drop stale uploads.
    pub async fn reconcile(self: &Arc<Self>) -> anyhow::Result<()> {
        let records: Vec<TaskRecord> = self.mgr.db.list(TASKS)?;
        if let Some(c) = &self.caches {
            // blocking-ok: reconcile runs once at start, before the API listens.
            c.reconcile();
        }
        let mut owned = HashSet::new();
        let mut resume = Vec::new();
        for rec in records {
            for a in &rec.attempts {
                if let Some(s) = &a.sandbox {
                    owned.insert(s.clone());
                }
            }
            if let Some(s) = rec.prepared.as_ref().and_then(|p| p.sandbox.as_ref()) {
                owned.insert(s.clone());
            }
            let (last, last_kind) = events::repair_events(&self.events_path(&rec.id));
            let task = Task::new(rec.clone(), last);
            if last_kind.as_deref() == Some("task.finished") {
                task.events
                    .finished
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            self.map().insert(rec.id.clone(), task.clone());
            if !rec.state.is_terminal() {
                resume.push(task);
            } else if last_kind.as_deref() != Some("task.finished") {
                // Finished just before a crash: readers wait for this event.
                self.emit(
                    &task,
                    "task.finished",
                    serde_json::json!({"state": rec.state.as_str()}),
                );
            }
        }
        for sb in self.mgr.list() {
            let r = sb.snapshot();
            if r.labels.contains_key(TASK_LABEL) && !owned.contains(&r.id) {
                tracing::info!(sandbox = %r.id, "removing a task sandbox no attempt owns");
                let _ = self.mgr.delete(&sb).await;
            }
        }
        for task in self.list() {
            if task.snapshot().deleting {
                tracing::info!(task = %task.snapshot().id, "resuming the task's deletion");
                tokio::spawn(self.clone().finish_delete(task));
            }
        }
        // Dirs of tasks without a record (deleted before a crash).
        // blocking-ok: reconcile runs once at start, before the API listens.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                // Git volumes a clone or push in progress at the crash left mounted.
                // blocking-ok: at start, as above.
                for r in crate::workspace::remove_git_volumes(&e.path()) {
                    tracing::info!("removed {r} (a crash interrupted its clone or push)");
                }
                let name = e.file_name().to_string_lossy().into_owned();
                if name != "uploads" && self.get(&name).is_err() && e.path().is_dir() {
                    // blocking-ok: at start, as above (a prepared layer in it is a tree a
                    // sandbox wrote: removed without recursion).
                    let _ = agentd_runtime::tree::remove_tree(&e.path());
                }
            }
        }
        for task in resume {
            if task.snapshot().deleting {
                continue;
            }
            tracing::info!(task = %task.snapshot().id, "resuming task");
            self.emit(&task, "task.resumed", serde_json::json!({}));
            tokio::spawn(self.clone().run(task));
        }
        // Uploads no task took within a day.
        // blocking-ok: at start, before the API listens.
        if let Ok(entries) = std::fs::read_dir(self.dir.join("uploads")) {
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(24 * 3600));
                if old {
                    // blocking-ok: at start, as above.
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// Deletes the sandboxes of tasks finished longer than their grace period ago; runs
    /// until the process ends.
    pub async fn reaper(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = now_ms();
            for task in self.list() {
                let r = task.snapshot();
                let grace = r.request.grace_secs.unwrap_or(self.mgr.config.task_grace);
                let due = r
                    .finished_at
                    .is_some_and(|f| now.saturating_sub(f) >= grace.saturating_mul(1000));
                if r.state.is_terminal() && !r.sandboxes_removed && due {
                    tracing::info!(task = %r.id, "grace period over: removing the task's sandboxes");
                    self.remove_sandboxes(&task).await;
                } else if r.sandboxes_removed && r.prepared.as_ref().is_some_and(|p| !p.removed) {
                    // A sandbox still held the layer: try again.
                    self.remove_prepared(&task).await;
                }
            }
        }
    }

    /// Prometheus text: tasks by state, attempts by state.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        let all = [
            TaskState::Queued,
            TaskState::Starting,
            TaskState::Running,
            TaskState::Waiting,
            TaskState::Checking,
            TaskState::Succeeded,
            TaskState::Failed,
            TaskState::Cancelled,
            TaskState::TimedOut,
        ];
        let mut tasks: BTreeMap<&str, u64> = all.iter().map(|s| (s.as_str(), 0)).collect();
        let mut attempts = tasks.clone();
        for t in self.list() {
            let r = t.snapshot();
            *tasks.entry(r.state.as_str()).or_default() += 1;
            for a in &r.attempts {
                *attempts.entry(a.state.as_str()).or_default() += 1;
            }
        }
        let mut out = String::new();
        for (name, help, counts) in [
            ("agentd_tasks", "Tasks by state.", &tasks),
            ("agentd_task_attempts", "Task attempts by state.", &attempts),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (state, n) in counts {
                let _ = writeln!(out, "{name}{{state=\"{state}\"}} {n}");
            }
        }
        out
    }

    /// Events of a task with ids above `after`, read from its log.
    pub async fn events_after(&self, id: &str, after: u64) -> Vec<serde_json::Value> {
        let data = tokio::fs::read(self.events_path(id))
            .await
            .unwrap_or_default();
        data.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
            .filter(|v| v["id"].as_u64().is_some_and(|i| i > after))
            .collect()
    }
}

/// The prompt of the next round after a failed check.
fn follow_up(check: &str, result: Option<&CheckResult>) -> String {
    let (code, output) = result
        .map(|r| {
            (
                if r.timed_out {
                    "a timeout (it ran too long and was killed)".to_string()
                } else {
                    r.exit_code
                        .map_or("no exit status (killed)".to_string(), |c| {
                            format!("exit status {c}")
                        })
                },
                r.output.clone(),
            )
        })
        .unwrap_or_default();
    format!(
        "The check command failed with {code}:\n\n    {check}\n\nThe end of its output:\n\n```\n{}\n```\n\nFix the problem so that the check passes.",
        output.trim_end()
    )
}

/// What went wrong with a command run in a sandbox: how it ended and the end of its stderr.
fn failure(command: &str, out: &crate::sandbox::ExecOutput, limit: Duration) -> String {
    let how = if out.timed_out {
        format!("was killed after {} s", limit.as_secs())
    } else if let Some(e) = &out.error {
        e.clone()
    } else {
        match out.code {
            Some(c) => format!("exited with status {c}"),
            None => "ended without an exit status".into(),
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = tail(stderr.trim(), 1024);
    if stderr.is_empty() {
        format!("`{command}` {how}")
    } else {
        format!("`{command}` {how}: {stderr}")
    }
}

/// What a task's attempts spent together, and its total budget (for the gateway, which
/// refuses an attempt's sandbox once it is spent).
#[derive(Debug, Clone)]
pub struct TaskSpend {
    /// Tokens of all attempts.
    pub tokens: u64,
    /// Their cost.
    pub cost: f64,
    /// The total token budget (with what a person gave).
    pub total_tokens: Option<u64>,
    /// The total cost budget (with what a person gave).
    pub total_cost: Option<f64>,
}

impl TaskSpend {
    /// `budget_exhausted: ...` when it is spent.
    pub fn spent(&self) -> Option<String> {
        if let Some(b) = self.total_tokens.filter(|b| self.tokens >= *b) {
            return Some(format!(
                "budget_exhausted: the task's token budget of {b} is spent ({} used by its attempts together)",
                self.tokens
            ));
        }
        self.total_cost.filter(|b| self.cost >= *b).map(|b| {
            format!(
                "budget_exhausted: the task's cost budget of {b} is spent ({:.4} used by its attempts together)",
                self.cost
            )
        })
    }
}

impl TaskManager {
    /// What the attempts of task `id` spent together, when it has a total budget and
    /// `sandbox` is one of its attempts' (a sandbox carrying the task's label is not enough).
    ///
    /// Called for every gateway request of a task's sandbox: it reads the few fields it needs
    /// under the locks instead of copying the task's and the sandboxes' whole records.
    pub fn spend(&self, id: &str, sandbox: &str) -> Option<TaskSpend> {
        let task = self.get(id).ok()?;
        // Each attempt's sandbox (while it has one) and the usage its record last took.
        let (attempts, total_tokens, total_cost, grants) = {
            let r = task.record.lock().expect("task record lock");
            let b = r.request.budget.as_ref()?;
            if r.budget_unlimited || (b.total_tokens.is_none() && b.total_cost.is_none()) {
                return None;
            }
            if !r
                .attempts
                .iter()
                .any(|a| a.sandbox.as_deref() == Some(sandbox))
            {
                return None;
            }
            let attempts: Vec<(Option<String>, u64, f64)> = r
                .attempts
                .iter()
                .map(|a| (a.sandbox.clone(), a.usage.tokens(), a.usage.cost))
                .collect();
            (attempts, b.total_tokens, b.total_cost, r.budget_grants)
        };
        let (mut tokens, mut cost) = (0, 0.0);
        for (sb, recorded_tokens, recorded_cost) in attempts {
            // A live sandbox's counters are newer than what its attempt recorded.
            let live = sb.and_then(|s| self.mgr.get(&s).ok()).map(|s| {
                let r = s.record.lock().expect("sandbox record lock");
                (r.usage.tokens(), r.usage.cost)
            });
            let (t, c) = live.unwrap_or((recorded_tokens, recorded_cost));
            tokens += t;
            cost += c;
        }
        let times = 1 + u64::from(grants);
        Some(TaskSpend {
            tokens,
            cost,
            total_tokens: total_tokens.map(|t| t.saturating_mul(times)),
            total_cost: total_cost.map(|c| c * times as f64),
        })
    }
}

/// `budget_exhausted: ...` when sandbox `rec` has used its token or cost budget.
fn budget_spent(rec: &crate::sandbox::SandboxRecord) -> Option<String> {
    let used = rec.usage.tokens();
    if let Some(budget) = rec.budget_tokens.filter(|b| used >= *b) {
        return Some(format!(
            "budget_exhausted: the attempt's token budget of {budget} is spent ({used} used)"
        ));
    }
    let cost = rec.usage.cost;
    rec.budget_cost.filter(|b| cost >= *b).map(|budget| {
        format!("budget_exhausted: the attempt's cost budget of {budget} is spent ({cost:.4} used)")
    })
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::git::{exclude_file, sh_quote};
    use super::*;

    fn attempt(n: u32, state: TaskState, size: Option<u64>) -> Attempt {
        let mut a = Attempt::new(n);
        a.state = state;
        a.diff = size.map(|s| DiffStats {
            additions: s,
            ..DiffStats::default()
        });
        a
    }

    #[test]
    fn test_rank_passing_first_then_smaller_diffs() {
        let v = vec![
            attempt(1, TaskState::Failed, Some(1)),
            attempt(2, TaskState::Succeeded, Some(50)),
            attempt(3, TaskState::Failed, Some(0)),
            attempt(4, TaskState::Succeeded, Some(5)),
            attempt(5, TaskState::Failed, None),
            attempt(6, TaskState::Failed, Some(9)),
        ];
        let order: Vec<u32> = rank(&v).iter().map(|a| a.n).collect();
        assert_eq!(order, [4, 2, 1, 6, 3, 5]);
    }

    #[test]
    fn test_derived_state() {
        let mut r = TaskRecord {
            id: "t".into(),
            request: CreateTask::default(),
            environment: None,
            workspace: WorkspaceInfo::default(),
            state: TaskState::Queued,
            created_at: 0,
            started_at: None,
            finished_at: None,
            attempts: vec![Attempt::new(1), Attempt::new(2)],
            prepared: None,
            stop: None,
            sandboxes_removed: false,
            deleting: false,
            budget_grants: 0,
            budget_unlimited: false,
        };
        assert_eq!(r.derived_state(), TaskState::Queued);
        r.attempts[0].state = TaskState::Starting;
        assert_eq!(r.derived_state(), TaskState::Starting);
        r.attempts[1].state = TaskState::Checking;
        assert_eq!(r.derived_state(), TaskState::Running);
        r.attempts[0].state = TaskState::Failed;
        r.attempts[1].state = TaskState::Cancelled;
        r.stop = Some(TaskState::Cancelled);
        assert_eq!(r.derived_state(), TaskState::Cancelled);
        r.stop = None;
        assert_eq!(r.derived_state(), TaskState::Failed);
        r.attempts[1].state = TaskState::Succeeded;
        assert_eq!(r.derived_state(), TaskState::Succeeded);
        // Waiting for a person shows when nothing else works.
        r.attempts[0].state = TaskState::Waiting;
        r.attempts[1].state = TaskState::Starting;
        assert_eq!(r.derived_state(), TaskState::Waiting);
        r.attempts[1].state = TaskState::Running;
        assert_eq!(r.derived_state(), TaskState::Running);
    }

    /// Waiting for a person moves an attempt's deadline, up to the wait timeout; a follow-up
    /// counts from its own start.
    #[test]
    fn test_deadline_pauses_while_waiting() {
        let r = TaskRecord {
            id: "t".into(),
            request: CreateTask {
                timeout_secs: Some(10),
                wait_timeout_secs: Some(3),
                ..CreateTask::default()
            },
            environment: None,
            workspace: WorkspaceInfo::default(),
            state: TaskState::Running,
            created_at: 0,
            started_at: Some(1_000),
            finished_at: None,
            attempts: vec![],
            prepared: None,
            stop: None,
            sandboxes_removed: false,
            deleting: false,
            budget_grants: 0,
            budget_unlimited: false,
        };
        let mut a = Attempt::new(1);
        assert_eq!(r.deadline_ms(&a, 2_000), 11_000);
        a.waited_ms = 1_000;
        a.waiting_since = Some(5_000);
        assert_eq!(r.deadline_ms(&a, 6_000), 13_000);
        // 1 s + 4 s waited, credited 3 s at most.
        assert_eq!(r.deadline_ms(&a, 9_000), 14_000);
        a.limit_from = Some(50_000);
        a.waited_ms = 0;
        a.waiting_since = None;
        assert_eq!(r.deadline_ms(&a, 50_000), 60_000);
    }

    #[test]
    fn test_diff_stats_and_tail() {
        let patch = b"diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1,2 @@\n-old\n+new\n+more\ndiff --git a/y b/y\nnew file mode 100644\n";
        assert_eq!(
            diff_stats(patch),
            DiffStats {
                files: 2,
                additions: 2,
                deletions: 1,
                bytes: patch.len() as u64
            }
        );
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("abc", 10), "abc");
        let f = follow_up(
            "make test",
            Some(&CheckResult {
                round: 1,
                exit_code: Some(2),
                passed: false,
                output: "boom\n".into(),
                duration_ms: 1,
                timed_out: false,
            }),
        );
        assert!(f.contains("exit status 2") && f.contains("make test") && f.contains("boom"));
        let f = follow_up(
            "make test",
            Some(&CheckResult {
                round: 1,
                exit_code: Some(137),
                passed: false,
                output: "agentd: the check timed out after 5 s and was killed\n".into(),
                duration_ms: 5000,
                timed_out: true,
            }),
        );
        assert!(
            f.contains("timeout") && f.contains("timed out after 5 s"),
            "{f}"
        );
        assert!(validate_diff_exclude(&["a\nb".into()]).is_err());
        assert!(validate_diff_exclude(&["".into()]).is_err());
        assert!(validate_diff_exclude(&["target/".into(), "*.pyc".into()]).is_ok());
        let mut req = CreateTask::default();
        assert!(exclude_file(&req).contains("\n__pycache__/\n"));
        req.diff_exclude = Some(vec!["only/".into()]);
        let ex = exclude_file(&req);
        assert!(
            ex.contains("\nonly/\n") && !ex.contains("__pycache__"),
            "{ex}"
        );
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn test_create_task_refuses_unknown_fields() {
        let e = serde_json::from_str::<CreateTask>(
            r#"{"prompt":"x","workspace":{"path":"/a"},"agent":2}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `agent`"), "{e}");
    }
}
