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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::db::TASKS;
use crate::error::Error;
use crate::sandbox::{
    now_ms, random_hex, CreateSandbox, LimitsRequest, Manager, Sandbox, SandboxState, Usage,
};
use crate::workspace::{WorkspaceInfo, WorkspaceSpec};

type Result<T> = std::result::Result<T, Error>;

/// A task's time limit when the request gives none, seconds.
pub const DEFAULT_TASK_TIMEOUT_SECS: u64 = 3600;
/// Longest task time limit, seconds.
pub const MAX_TASK_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
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
/// How long a request to OpenCode (other than the event stream) may take.
const OPENCODE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the baseline commit and the diff may take.
const GIT_IN_SANDBOX_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a round's event stream may be opened again after OpenCode closed it.
const MAX_EVENT_RECONNECTS: u32 = 5;
/// Pause between tries of a sandbox create refused by a quota.
const QUOTA_RETRY: Duration = Duration::from_secs(2);

/// Where a task or an attempt is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting: not started, or agentd is at its sandbox or memory quota.
    Queued,
    /// The sandbox is made, OpenCode starts, the workspace goes in.
    Starting,
    /// The agent works.
    Running,
    /// The check command runs.
    Checking,
    /// Done: the agent finished (and the check passed).
    Succeeded,
    /// Done: an error, or the check still failed after the last round.
    Failed,
    /// Cancelled by a request.
    Cancelled,
    /// The task's time limit passed.
    TimedOut,
}

impl TaskState {
    /// Whether nothing more happens.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled | TaskState::TimedOut
        )
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Checking => "checking",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::TimedOut => "timed_out",
        }
    }
}

/// `POST /v1/tasks`: a prompt and a workspace handed to agents. Also its JSON Schema in the
/// OpenAPI document.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    /// What the agents are asked to do.
    pub prompt: String,
    /// Where the files come from.
    pub workspace: WorkspaceSpec,
    /// Image of the sandboxes [default: opencode].
    pub image: Option<String>,
    /// Model [default: agentd's `llm_model`].
    pub model: Option<String>,
    /// Limits of each sandbox.
    #[serde(default)]
    pub limits: LimitsRequest,
    /// Time limit of the whole task, seconds [default: 3600].
    pub timeout_secs: Option<u64>,
    /// Parallel agents, each in its own sandbox [default: 1].
    pub agents: Option<u32>,
    /// Shell command run in `/workspace` after each round; exit 0 passes.
    pub check: Option<String>,
    /// Most rounds per agent (with a check) [default: 3].
    pub max_rounds: Option<u32>,
    /// Seconds the sandboxes are kept after the task ends [default: agentd's `task_grace`].
    pub grace_secs: Option<u64>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Seconds the check may run before it is killed (that round's check then fails)
    /// [default: 600].
    pub check_timeout_secs: Option<u64>,
    /// Git exclude patterns (`.gitignore` syntax) for files left out of the diff, on top of
    /// the workspace's own `.gitignore` [default: [`DEFAULT_DIFF_EXCLUDE`], well-known caches
    /// and build outputs; `[]` for none].
    pub diff_exclude: Option<Vec<String>>,
}

/// The check's result of one round.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckResult {
    /// The round it followed.
    pub round: u32,
    /// Exit status (`None`: lost or killed at the time limit).
    pub exit_code: Option<i32>,
    /// Exit status 0.
    pub passed: bool,
    /// The end of its output (stderr goes to stdout, so the order is kept).
    pub output: String,
    /// How long it ran, ms.
    pub duration_ms: u64,
    /// It was killed at `check_timeout_secs`.
    #[serde(default)]
    pub timed_out: bool,
}

/// Size of a diff.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiffStats {
    /// Files changed.
    pub files: u64,
    /// Lines added.
    pub additions: u64,
    /// Lines removed.
    pub deletions: u64,
    /// Bytes of the patch.
    pub bytes: u64,
}

/// Where an attempt's time went, ms.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Timings {
    /// Request to sandbox running.
    pub sandbox_ms: Option<u64>,
    /// Sandbox running to OpenCode answering.
    pub opencode_ready_ms: Option<u64>,
    /// Workspace extracted and committed as the baseline.
    pub workspace_ms: Option<u64>,
    /// Each round's agent time (prompt to idle).
    pub rounds_ms: Vec<u64>,
    /// Each check's time.
    pub checks_ms: Vec<u64>,
    /// Collecting the diff.
    pub diff_ms: Option<u64>,
    /// Attempt start to end.
    pub total_ms: Option<u64>,
}

/// One agent's try at the task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based number.
    pub n: u32,
    /// Where it is.
    pub state: TaskState,
    /// Its sandbox, once made.
    pub sandbox: Option<String>,
    /// Its OpenCode session.
    pub session: Option<String>,
    /// The baseline commit in `/workspace`.
    pub baseline: Option<String>,
    /// The current (or last) round, from 1.
    pub round: u32,
    /// The last round whose prompt was sent.
    pub prompted: u32,
    /// Tool calls the agent made.
    pub tool_calls: u64,
    /// Tokens through the gateway.
    pub usage: Usage,
    /// Unix ms of its start and end.
    pub started_at: Option<u64>,
    /// Unix ms of its end.
    pub finished_at: Option<u64>,
    /// Where its time went.
    pub timings: Timings,
    /// The agent's last message (its end if long).
    pub final_message: Option<String>,
    /// The last check.
    pub check: Option<CheckResult>,
    /// The diff's size (the patch is a file in the task's dir).
    pub diff: Option<DiffStats>,
    /// Why it failed, or a problem on the way.
    pub error: Option<String>,
    /// Something to know about a success (e.g. that the agent changed nothing).
    #[serde(default)]
    pub note: Option<String>,
}

impl Attempt {
    fn new(n: u32) -> Attempt {
        Attempt {
            n,
            state: TaskState::Queued,
            sandbox: None,
            session: None,
            baseline: None,
            round: 1,
            prompted: 0,
            tool_calls: 0,
            usage: Usage::default(),
            started_at: None,
            finished_at: None,
            timings: Timings::default(),
            final_message: None,
            check: None,
            diff: None,
            error: None,
            note: None,
        }
    }
}

/// A task as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Id (12 hex chars).
    pub id: String,
    /// The request, validated (the workspace as given).
    pub request: CreateTask,
    /// What the workspace holds.
    pub workspace: WorkspaceInfo,
    /// Where it is (derived from the attempts once they run).
    pub state: TaskState,
    /// Unix ms.
    pub created_at: u64,
    /// Unix ms of the first start (the time limit counts from here).
    pub started_at: Option<u64>,
    /// Unix ms.
    pub finished_at: Option<u64>,
    /// The attempts.
    pub attempts: Vec<Attempt>,
    /// Cancelled or timed out: what the unfinished attempts end as.
    pub stop: Option<TaskState>,
    /// The sandboxes were deleted after the grace period.
    pub sandboxes_removed: bool,
    /// A DELETE was accepted: the task is being removed (resumed after a restart).
    #[serde(default)]
    pub deleting: bool,
}

impl TaskRecord {
    fn timeout(&self) -> Duration {
        Duration::from_secs(
            self.request
                .timeout_secs
                .unwrap_or(DEFAULT_TASK_TIMEOUT_SECS),
        )
    }

    fn max_rounds(&self) -> u32 {
        if self.request.check.is_some() {
            self.request.max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS)
        } else {
            1
        }
    }

    /// The state the attempts add up to.
    fn derived_state(&self) -> TaskState {
        let states: Vec<TaskState> = self.attempts.iter().map(|a| a.state).collect();
        if states.iter().all(|s| s.is_terminal()) {
            if states.contains(&TaskState::Succeeded) {
                TaskState::Succeeded
            } else if let Some(s) = self.stop {
                s
            } else if states.contains(&TaskState::TimedOut) {
                TaskState::TimedOut
            } else {
                TaskState::Failed
            }
        } else if states
            .iter()
            .any(|s| matches!(s, TaskState::Running | TaskState::Checking))
        {
            TaskState::Running
        } else if states.contains(&TaskState::Starting) {
            TaskState::Starting
        } else {
            TaskState::Queued
        }
    }

    /// The public view.
    pub fn view(&self) -> serde_json::Value {
        let tokens = self.attempts.iter().fold((0, 0), |acc, a| {
            (
                acc.0 + a.usage.prompt_tokens,
                acc.1 + a.usage.completion_tokens,
            )
        });
        serde_json::json!({
            "id": self.id,
            "state": if self.deleting { "deleting" } else { self.state.as_str() },
            "prompt": self.request.prompt,
            "workspace": {"source": self.request.workspace, "entries": self.workspace.entries, "bytes": self.workspace.bytes, "skipped": self.workspace.skipped, "excluded": self.workspace.excluded},
            "image": self.request.image.as_deref().unwrap_or(crate::sandbox::DEFAULT_IMAGE),
            "model": self.request.model,
            "agents": self.attempts.len(),
            "check": self.request.check,
            "max_rounds": self.max_rounds(),
            "timeout_secs": self.timeout().as_secs(),
            "labels": self.request.labels,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "rounds": self.attempts.iter().map(|a| u64::from(a.round)).sum::<u64>(),
            "tool_calls": self.attempts.iter().map(|a| a.tool_calls).sum::<u64>(),
            "usage": {"prompt_tokens": tokens.0, "completion_tokens": tokens.1},
            "attempts": self.attempts.iter().map(attempt_view).collect::<Vec<_>>(),
        })
    }
}

fn attempt_view(a: &Attempt) -> serde_json::Value {
    serde_json::json!({
        "attempt": a.n,
        "state": a.state.as_str(),
        "sandbox": a.sandbox,
        "round": a.round,
        "tool_calls": a.tool_calls,
        "usage": a.usage,
        "started_at": a.started_at,
        "finished_at": a.finished_at,
        "timings": a.timings,
        "final_message": a.final_message,
        "check": a.check,
        "diff": a.diff,
        "has_patch": a.diff.as_ref().is_some_and(|d| d.bytes > 0),
        "error": a.error,
        "note": a.note,
    })
}

/// The order results are shown in: passing checks (succeeded) first, then attempts with a
/// non-empty diff, smaller diffs first, then by number.
pub fn rank(attempts: &[Attempt]) -> Vec<&Attempt> {
    let mut v: Vec<&Attempt> = attempts.iter().collect();
    v.sort_by_key(|a| {
        let size = a.diff.as_ref().map(|d| d.additions + d.deletions);
        (
            a.state != TaskState::Succeeded,
            size.is_none_or(|s| s == 0),
            size.unwrap_or(u64::MAX),
            a.n,
        )
    });
    v
}

/// Most bytes of a task's events file. Past it, only the events that tell the task's course
/// (states, checks, diffs, the end) are written; what an agent says or does (`tool`, `error`,
/// `message`, which a hostile OpenCode could send without end) is dropped, and one
/// `events.dropped` event says so.
pub const MAX_EVENTS_BYTES: u64 = 64 << 20;

/// Distinct tool calls followed per attempt and round (past it they are neither counted nor
/// reported: a bound on what a sandbox can make agentd remember).
const MAX_TOOL_PARTS: usize = 100_000;

/// What a task's events file holds so far.
#[derive(Default)]
struct EventLog {
    /// Its size, read from the file at the first event after a start.
    bytes: Option<u64>,
    /// Events dropped past [`MAX_EVENTS_BYTES`].
    dropped: u64,
}

impl EventLog {
    /// The event to write for one of `kind` when the file holds `bytes`: itself, the one
    /// `events.dropped` notice, or nothing (dropped).
    fn admit<'a>(
        &mut self,
        bytes: u64,
        kind: &'a str,
        data: serde_json::Value,
    ) -> Option<(&'a str, serde_json::Value)> {
        if bytes < MAX_EVENTS_BYTES || !matches!(kind, "tool" | "error" | "message") {
            return Some((kind, data));
        }
        self.dropped += 1;
        (self.dropped == 1).then(|| {
            ("events.dropped", serde_json::json!({"message": format!(
                "the events log reached {MAX_EVENTS_BYTES} bytes: from here on only states, checks, diffs and the end are logged"
            )}))
        })
    }
}

/// A task in memory.
pub struct Task {
    /// The record; persisted on every change. A std mutex: held to read or update fields,
    /// never across an await.
    record: Mutex<TaskRecord>,
    /// Id of the last event written; SSE readers wait on it.
    events_tx: watch::Sender<u64>,
    /// Serializes appends to the events file (id order = file order) and counts its bytes.
    events_lock: Mutex<EventLog>,
    /// Set to `Cancelled`/`TimedOut` to end the running attempts.
    stop_tx: watch::Sender<Option<TaskState>>,
    /// Attempts whose sandbox create is under way (in a task of its own, which a cancel does
    /// not interrupt: a create stopped half-way would leave a sandbox nobody supervises).
    creating: Mutex<HashSet<u32>>,
    /// `task.finished` is in the events log: readers past it end their streams.
    finished_logged: std::sync::atomic::AtomicBool,
}

impl Task {
    fn new(record: TaskRecord, last_event: u64) -> Arc<Task> {
        let stop = record.stop;
        Arc::new(Task {
            record: Mutex::new(record),
            events_tx: watch::channel(last_event).0,
            events_lock: Mutex::new(EventLog::default()),
            stop_tx: watch::channel(stop).0,
            creating: Mutex::new(HashSet::new()),
            finished_logged: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A copy of the record.
    pub fn snapshot(&self) -> TaskRecord {
        self.record.lock().expect("task record lock").clone()
    }

    /// Id of the last event.
    pub fn last_event(&self) -> u64 {
        *self.events_tx.borrow()
    }

    /// Wakes when an event is written.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.events_tx.subscribe()
    }

    /// Whether a reader that has seen event `last` has seen the whole story.
    pub fn read_to_end(&self, last: u64) -> bool {
        self.finished_logged
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
}

impl TaskManager {
    /// The service over `mgr`; call [`TaskManager::reconcile`] next.
    pub fn new(mgr: Arc<Manager>) -> anyhow::Result<Arc<TaskManager>> {
        let dir = mgr.config.state_dir.join("tasks");
        std::fs::create_dir_all(dir.join("uploads"))?;
        Ok(Arc::new(TaskManager {
            mgr,
            tasks: Mutex::new(HashMap::new()),
            dir,
        }))
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

    /// Appends an event (`kind` plus the fields of `data`) to the task's log and wakes readers.
    fn emit(&self, task: &Task, kind: &str, data: serde_json::Value) {
        let id = task.snapshot().id;
        if !self.map().contains_key(&id) {
            return;
        }
        let mut log = task.events_lock.lock().expect("events lock");
        let path = self.events_path(&id);
        let bytes = *log
            .bytes
            .get_or_insert_with(|| std::fs::metadata(&path).map_or(0, |m| m.len()));
        let Some((kind, data)) = log.admit(bytes, kind, data) else {
            return;
        };
        let seq = task.last_event() + 1;
        let mut ev = serde_json::json!({"id": seq, "type": kind, "time": now_ms()});
        if let (Some(obj), serde_json::Value::Object(extra)) = (ev.as_object_mut(), data) {
            obj.extend(extra);
        }
        let mut line = serde_json::to_vec(&ev).expect("an event serializes");
        line.push(b'\n');
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&line));
        if written.is_ok() {
            log.bytes = Some(bytes + line.len() as u64);
        }
        if let Err(e) = written {
            tracing::error!(task = %id, error = %e, "failed to write a task event");
            return;
        }
        if kind == "task.finished" {
            task.finished_logged
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        task.events_tx.send_replace(seq);
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
    pub async fn create(self: &Arc<Self>, req: CreateTask, tcp: bool) -> Result<TaskRecord> {
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
        crate::sandbox::validate_model(req.model.as_deref())?;
        self.mgr.require_llm()?;
        if let Some(model) = &req.model {
            self.mgr.check_model(model).await?;
        }
        req.workspace
            .validate()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        self.mgr.limits(&req.limits)?;
        if let Some(image) = &req.image {
            // The default image is built on first use; any other must be in the store now.
            if image != crate::default_image::NAME && self.mgr.store.resolve(image).is_err() {
                return Err(Error::Invalid(format!(
                    "unknown image {image:?}: pull or import it first (POST /v1/images/pull, agentd image pull|import)"
                )));
            }
        }

        let id = random_hex(6);
        let dir = self.task_dir(&id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(Error::internal)?;
        let tar = dir.join("workspace.tar");
        let prepared = self
            .prepare_workspace(&req.workspace, &dir, &tar, tcp)
            .await;
        let info = match prepared {
            Ok(info) => info,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Err(e);
            }
        };
        let record = TaskRecord {
            id: id.clone(),
            request: req,
            workspace: info,
            state: TaskState::Queued,
            created_at: now_ms(),
            started_at: None,
            finished_at: None,
            attempts: (1..=agents).map(Attempt::new).collect(),
            stop: None,
            sandboxes_removed: false,
            deleting: false,
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
        let started = rec.started_at.unwrap_or_else(now_ms);
        let deadline_ms =
            started.saturating_add(u64::try_from(rec.timeout().as_millis()).unwrap_or(u64::MAX));
        let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
        self.update(&task, n, |a| {
            if a.started_at.is_none() {
                a.started_at = Some(now_ms());
            }
        });
        let mut stop_rx = task.stop_tx.subscribe();
        let stopped = async {
            loop {
                if let Some(s) = *stop_rx.borrow_and_update() {
                    return s;
                }
                if stop_rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        };
        let outcome = tokio::select! {
            o = self.clone().drive(&task, n, deadline_ms) => Ok(o),
            s = stopped => Err(s),
            _ = tokio::time::sleep(left) => Err(TaskState::TimedOut),
        };
        if let Err(s) = outcome {
            // A create under way finishes on its own (and records its sandbox): wait for it,
            // so that the sandbox is stopped below rather than left running.
            task.stop_tx.send_if_modified(|cur| {
                if cur.is_none() {
                    *cur = Some(s);
                    true
                } else {
                    false
                }
            });
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
                let why = match self.collect_diff(&task, n, sb.as_ref()).await {
                    Ok(_) => why,
                    Err(diff) => format!("{why}; and no diff: {diff}"),
                };
                self.finish_attempt(&task, n, TaskState::Failed, Some(why));
            }
            Ok(Outcome::Lost(why)) => self.finish_attempt(&task, n, TaskState::Failed, Some(why)),
            Err(state) => {
                let why = if state == TaskState::TimedOut {
                    format!(
                        "the task's time limit ({} s) passed",
                        rec.timeout().as_secs()
                    )
                } else {
                    "cancelled".to_string()
                };
                if let Some(sb) = &sb {
                    // Stop the agent, keep what it did, then stop the sandbox.
                    if let Some(session) = self.attempt_snapshot(&task, n).session {
                        let _ = self
                            .opencode(
                                sb,
                                hyper::Method::POST,
                                &format!("/session/{session}/abort"),
                                Some(serde_json::json!({})),
                            )
                            .await;
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
    }

    fn finish_attempt(&self, task: &Task, n: u32, state: TaskState, why: Option<String>) {
        let usage = self.attempt_usage(task, n);
        self.update(task, n, |a| {
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
    async fn drive(self: Arc<Self>, task: &Arc<Task>, n: u32, deadline_ms: u64) -> Outcome {
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
        if let Err(why) = wait_ready(&sb).await {
            return Outcome::Lost(why);
        }
        if a.baseline.is_none() {
            let ready_ms = ms(ready_wait.elapsed());
            let t = Instant::now();
            match self.put_workspace(&rec, &sb).await {
                Ok(baseline) => {
                    let ws_ms = ms(t.elapsed());
                    self.update(task, n, |a| {
                        a.baseline = Some(baseline);
                        a.timings.opencode_ready_ms = Some(ready_ms);
                        a.timings.workspace_ms = Some(ws_ms);
                    });
                }
                Err(why) => return Outcome::Failed(why),
            }
        }

        // 3. The session.
        let session = match self.attempt_snapshot(task, n).session {
            Some(s) => s,
            None => {
                let title = format!("agentd task {} attempt {n}", rec.id);
                match self
                    .opencode(
                        &sb,
                        hyper::Method::POST,
                        "/session",
                        Some(serde_json::json!({ "title": title })),
                    )
                    .await
                {
                    Ok(v) => match v["id"].as_str() {
                        Some(s) => {
                            let s = s.to_string();
                            self.update(task, n, |a| a.session = Some(s.clone()));
                            s
                        }
                        None => return Outcome::Failed("OpenCode made no session".into()),
                    },
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
                match self.agent_round(task, n, &sb, &session, &rec).await {
                    Ok(()) => {}
                    Err(o) => return o,
                }
            }
            let Some(check) = rec.request.check.clone() else {
                return Outcome::Succeeded;
            };
            self.set_attempt_state(task, n, TaskState::Checking, None);
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
            let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
            output.push_str(&String::from_utf8_lossy(&out.stderr));
            // Killed at its own limit (the task's is handled by the task's timeout).
            let timed_out = out.timed_out && limit <= left;
            if timed_out {
                if !output.is_empty() && !output.ends_with('\n') {
                    output.push('\n');
                }
                output.push_str(&format!(
                    "agentd: the check timed out after {} s and was killed\n",
                    limit.as_secs()
                ));
            }
            if let Some(e) = &out.error {
                output.push_str(&format!("agentd: {e}\n"));
            }
            let output = tail(&output, CHECK_OUTPUT_TAIL);
            let passed = out.code == Some(0) && !out.timed_out;
            let result = CheckResult {
                round,
                exit_code: out.code,
                passed,
                output,
                duration_ms: ms(t.elapsed()),
                timed_out,
            };
            self.update(task, n, |a| {
                a.timings.checks_ms.push(result.duration_ms);
                a.check = Some(result.clone());
            });
            self.emit(
                task,
                "check",
                serde_json::json!({"attempt": n, "round": round, "exit_code": result.exit_code, "passed": passed, "timed_out": timed_out, "output": result.output}),
            );
            if passed {
                return Outcome::Succeeded;
            }
            if round >= max_rounds {
                let how = if timed_out {
                    format!("timed out after {} s", limit.as_secs())
                } else {
                    match result.exit_code {
                        Some(c) => format!("exit status {c}"),
                        None => "no exit status".into(),
                    }
                };
                return Outcome::Failed(format!(
                    "the check still fails after {round} round{} (last: {how})",
                    if round == 1 { "" } else { "s" }
                ));
            }
            // The next round: the same session gets the check's output.
            self.update(task, n, |a| a.round = round + 1);
            self.set_attempt_state(
                task,
                n,
                TaskState::Running,
                Some("the check failed: its output goes back to the agent"),
            );
        }
    }

    /// Creates the attempt's sandbox, waiting (queued) while agentd is at a quota.
    async fn create_sandbox(
        &self,
        task: &Arc<Task>,
        rec: &TaskRecord,
        n: u32,
    ) -> std::result::Result<Arc<Sandbox>, String> {
        let grace = rec.request.grace_secs.unwrap_or(self.mgr.config.task_grace);
        let mut labels = rec.request.labels.clone();
        labels.insert(TASK_LABEL.into(), rec.id.clone());
        labels.insert(ATTEMPT_LABEL.into(), n.to_string());
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
                    .min(crate::config::MAX_SANDBOX_TIMEOUT_SECS),
            ),
            labels,
            opencode: Some(true),
            model: rec.request.model.clone(),
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

    /// Extracts the workspace to `/workspace` and commits it; returns the baseline commit.
    async fn put_workspace(
        &self,
        rec: &TaskRecord,
        sb: &Arc<Sandbox>,
    ) -> std::result::Result<String, String> {
        let (rootfs, owner) = self.mgr.rootfs(sb).map_err(|e| e.to_string())?;
        let tar = self.task_dir(&rec.id).join("workspace.tar");
        tokio::task::spawn_blocking(move || -> std::io::Result<usize> {
            let root = std::fs::File::open(&rootfs)?;
            let f = std::io::BufReader::new(std::fs::File::open(&tar)?);
            crate::sandbox::fs::extract_tar(&root, Path::new(WORKSPACE_DIR), f, owner)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("failed to put the workspace into the sandbox: {e}"))?;
        // As the sandbox's user: a repository already (copied with its .git) gets the
        // baseline commit on top; anything else becomes one. The diff's excludes go into the
        // repository's info/exclude first, so the baseline and every diff agree on them.
        let script = format!(
            "set -e\n\
            [ -e .git ] || git init -q\n\
            ex=$(git rev-parse --git-path info/exclude)\n\
            mkdir -p \"$(dirname \"$ex\")\"\n\
            printf '%s' {} >> \"$ex\"\n\
            git add -A\n\
            git -c user.name=agentd -c user.email=agentd@localhost -c commit.gpgsign=false \
              commit -q --allow-empty --no-verify -m 'agentd baseline'\n\
            git rev-parse HEAD\n",
            sh_quote(&exclude_file(&rec.request))
        );
        let out = self
            .mgr
            .exec_collect(
                sb,
                vec!["/bin/sh".into(), "-c".into(), script],
                Some(WORKSPACE_DIR),
                GIT_IN_SANDBOX_TIMEOUT,
                64 * 1024,
            )
            .await
            .map_err(|e| format!("the baseline commit could not run: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let sha = stdout.lines().last().unwrap_or_default().trim().to_string();
        if out.code != Some(0) || sha.len() < 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "the baseline commit failed (is git in the image?): {}",
                failure("git add -A && git commit", &out, GIT_IN_SANDBOX_TIMEOUT)
            ));
        }
        Ok(sha)
    }

    /// One round of the agent: prompt (unless a resumed round sent it already), then follow
    /// the events until the session is idle.
    async fn agent_round(
        &self,
        task: &Arc<Task>,
        n: u32,
        sb: &Arc<Sandbox>,
        session: &str,
        rec: &TaskRecord,
    ) -> std::result::Result<(), Outcome> {
        let a = self.attempt_snapshot(task, n);
        let round = a.round;
        let t = Instant::now();
        // Subscribe before prompting: the idle event cannot be missed.
        let mut events = self
            .event_stream(sb)
            .await
            .map_err(|e| Outcome::Failed(format!("OpenCode's event stream: {e}")))?;
        let mut idle_now = false;
        if a.prompted < round {
            let text = if round == 1 {
                rec.request.prompt.clone()
            } else {
                follow_up(rec.request.check.as_deref().unwrap_or(""), a.check.as_ref())
            };
            let body = serde_json::json!({"parts": [{"type": "text", "text": text}]});
            self.opencode(
                sb,
                hyper::Method::POST,
                &format!("/session/{session}/prompt_async"),
                Some(body),
            )
            .await
            .map_err(|e| Outcome::Failed(format!("OpenCode refused the prompt: {e}")))?;
            self.update(task, n, |a| a.prompted = round);
            self.emit(
                task,
                "prompt",
                serde_json::json!({"attempt": n, "round": round, "bytes": text.len()}),
            );
        } else {
            // Resumed after a restart: the session may have gone idle while nobody watched.
            idle_now = self.session_idle(sb, session).await;
        }
        let mut tools: HashMap<String, String> = HashMap::new();
        let mut counted: HashSet<String> = HashSet::new();
        let mut error: Option<String> = None;
        let mut state_rx = sb.state_tx.subscribe();
        let mut reconnects = 0;
        // A resumed round whose session is idle already has nothing to follow.
        if !idle_now {
            loop {
                let ev = tokio::select! {
                    ev = events.next() => ev,
                    _ = async {
                        while state_rx.borrow_and_update().is_live() {
                            if state_rx.changed().await.is_err() { break; }
                        }
                    } => None,
                };
                let Some(ev) = ev else {
                    // The stream ended: the sandbox is gone, or OpenCode closed it (then
                    // subscribe again and ask whether the session went idle meanwhile).
                    if sb.snapshot().state.is_live() && reconnects < MAX_EVENT_RECONNECTS {
                        reconnects += 1;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if let Ok(e) = self.event_stream(sb).await {
                            events = e;
                            if self.session_idle(sb, session).await {
                                break;
                            }
                            continue;
                        }
                    }
                    let why = sb
                        .snapshot()
                        .exit
                        .map(|e| e.reason)
                        .unwrap_or_else(|| "OpenCode's event stream ended".into());
                    return Err(Outcome::Lost(format!("the agent stopped: {why}")));
                };
                let props = &ev["properties"];
                match ev["type"].as_str().unwrap_or_default() {
                    "message.part.updated" => {
                        let part = &props["part"];
                        if part["sessionID"] != session || part["type"] != "tool" {
                            continue;
                        }
                        let pid = part["id"].as_str().unwrap_or_default().to_string();
                        let status = part["state"]["status"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string();
                        if tools.get(&pid) == Some(&status)
                            || (!tools.contains_key(&pid) && tools.len() >= MAX_TOOL_PARTS)
                        {
                            continue;
                        }
                        tools.insert(pid.clone(), status.clone());
                        if counted.insert(pid) {
                            // In memory only: the count is saved with the attempt's next
                            // state change, not with a durable commit per tool call.
                            self.update_unsaved(task, n, |a| a.tool_calls += 1);
                        }
                        let calls = self.attempt_snapshot(task, n).tool_calls;
                        let title = part["state"]["title"]
                            .as_str()
                            .or_else(|| part["state"]["input"]["description"].as_str())
                            .unwrap_or_default();
                        self.emit(
                        task,
                        "tool",
                        serde_json::json!({"attempt": n, "round": round, "tool": part["tool"], "status": status, "title": tail(title, 200), "tool_calls": calls}),
                    );
                    }
                    "session.error" => {
                        if props["sessionID"].as_str().is_some_and(|s| s != session) {
                            continue;
                        }
                        let e = &props["error"];
                        let msg = e["data"]["message"]
                            .as_str()
                            .or_else(|| e["name"].as_str())
                            .unwrap_or("unknown error");
                        error = Some(tail(msg, 1000));
                        self.emit(
                            task,
                            "error",
                            serde_json::json!({"attempt": n, "round": round, "message": error}),
                        );
                    }
                    "session.idle" if props["sessionID"] == session => break,
                    "session.status"
                        if props["sessionID"] == session && props["status"]["type"] == "idle" =>
                    {
                        break
                    }
                    _ => {}
                }
            }
        }
        let round_ms = ms(t.elapsed());
        let message = self.last_message(sb, session).await;
        let usage = sb.snapshot().usage;
        self.update(task, n, |a| {
            a.timings.rounds_ms.push(round_ms);
            a.usage = usage;
            if message.is_some() {
                a.final_message = message.clone();
            }
        });
        if let Some(m) = &message {
            self.emit(
                task,
                "message",
                serde_json::json!({"attempt": n, "round": round, "text": tail(m, 4096)}),
            );
        }
        match error {
            Some(e) => Err(Outcome::Failed(format!("the agent failed: {e}"))),
            None => Ok(()),
        }
    }

    /// Whether OpenCode reports the session idle (not busy or retrying).
    async fn session_idle(&self, sb: &Arc<Sandbox>, session: &str) -> bool {
        match self
            .opencode(sb, hyper::Method::GET, "/session/status", None)
            .await
        {
            Ok(v) => !matches!(v[session]["type"].as_str(), Some("busy" | "retry")),
            Err(_) => false,
        }
    }

    /// The text of the session's last assistant message.
    async fn last_message(&self, sb: &Arc<Sandbox>, session: &str) -> Option<String> {
        let v = self
            .opencode(
                sb,
                hyper::Method::GET,
                &format!("/session/{session}/message"),
                None,
            )
            .await
            .ok()?;
        let text = v
            .as_array()?
            .iter()
            .rev()
            .filter(|m| m["info"]["role"] == "assistant")
            .map(|m| {
                m["parts"]
                    .as_array()
                    .map(|parts| {
                        parts
                            .iter()
                            .filter(|p| p["type"] == "text")
                            .filter_map(|p| p["text"].as_str())
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default()
            })
            .find(|t| !t.trim().is_empty())?;
        Some(tail(&text, MAX_MESSAGE_BYTES))
    }

    /// Reads the diff against the baseline and stores it; its stats, or why there is none
    /// (the command, how it ended, the end of its stderr).
    async fn collect_diff(
        &self,
        task: &Arc<Task>,
        n: u32,
        sb: Option<&Arc<Sandbox>>,
    ) -> std::result::Result<DiffStats, String> {
        let a = self.attempt_snapshot(task, n);
        let Some(baseline) = a.baseline else {
            return Err("the workspace never reached the sandbox".into());
        };
        let Some(sb) = sb.filter(|sb| sb.snapshot().state.is_live()) else {
            return Err("the sandbox ended before the diff was read".into());
        };
        let t = Instant::now();
        let command = format!(
            "git add -A && git diff --cached --binary --no-color --no-ext-diff --no-renames {baseline} --"
        );
        let out = self
            .mgr
            .exec_collect(
                sb,
                vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!("set -e\n{command}\n"),
                ],
                Some(WORKSPACE_DIR),
                GIT_IN_SANDBOX_TIMEOUT,
                MAX_DIFF_BYTES + 1,
            )
            .await
            .map_err(|e| format!("the diff could not be read: {e}"))?;
        if out.code != Some(0) || out.timed_out {
            return Err(format!(
                "the diff failed: {}",
                failure(&command, &out, GIT_IN_SANDBOX_TIMEOUT)
            ));
        }
        if out.truncated || out.stdout.len() > MAX_DIFF_BYTES {
            return Err(format!(
                "the diff is larger than {MAX_DIFF_BYTES} bytes and was not kept (build outputs? see diff_exclude)"
            ));
        }
        let rec_id = task.snapshot().id;
        let stats = diff_stats(&out.stdout);
        let path = self.diff_path(&rec_id, n);
        let tmp = path.with_extension("diff.part");
        let written = tokio::fs::write(&tmp, &out.stdout)
            .await
            .and(tokio::fs::rename(&tmp, &path).await);
        if let Err(e) = written {
            tracing::error!(task = %rec_id, error = %e, "failed to store a diff");
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(format!("agentd could not store the diff: {e}"));
        }
        let ms = ms(t.elapsed());
        self.update(task, n, |a| {
            a.diff = Some(stats.clone());
            a.timings.diff_ms = Some(ms);
        });
        self.emit(
            task,
            "diff",
            serde_json::json!({"attempt": n, "files": stats.files, "additions": stats.additions, "deletions": stats.deletions, "bytes": stats.bytes}),
        );
        Ok(stats)
    }

    /// A request to a sandbox's OpenCode (scoped to the workspace); the JSON answer.
    async fn opencode(
        &self,
        sb: &Arc<Sandbox>,
        method: hyper::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> std::result::Result<serde_json::Value, String> {
        let mut req = workspace_request(sb, method, path)?;
        let payload = match body {
            Some(v) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                crate::http::full(serde_json::to_vec(&v).expect("json"))
            }
            None => crate::http::empty(),
        };
        let req = req.body(payload).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(OPENCODE_TIMEOUT, async {
            let resp = self
                .mgr
                .http
                .request(req)
                .await
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), 64 << 20)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        })
        .await
        .map_err(|_| "no answer in time".to_string())??;
        let (status, bytes) = resp;
        if !status.is_success() {
            return Err(format!(
                "HTTP {}: {}",
                status.as_u16(),
                tail(&String::from_utf8_lossy(&bytes), 300)
            ));
        }
        if bytes.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&bytes).or(Ok(serde_json::Value::Null))
    }

    /// OpenCode's event stream for the workspace, once its first event arrived (the server
    /// subscribed us).
    async fn event_stream(&self, sb: &Arc<Sandbox>) -> std::result::Result<SseReader, String> {
        let req = workspace_request(sb, hyper::Method::GET, "/event")?
            .header(hyper::header::ACCEPT, "text/event-stream")
            .body(crate::http::empty())
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(OPENCODE_TIMEOUT, self.mgr.http.request(req))
            .await
            .map_err(|_| "no answer in time".to_string())?
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status().as_u16()));
        }
        let mut reader = SseReader {
            events: crate::http::sse_events(
                http_body_util::BodyExt::into_data_stream(resp.into_body()),
                crate::http::MAX_SSE_EVENT,
            ),
        };
        // The first event (server.connected) says the subscription is in place.
        match tokio::time::timeout(OPENCODE_TIMEOUT, reader.next()).await {
            Ok(Some(_)) => Ok(reader),
            _ => Err("no first event".into()),
        }
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
        let _ = tokio::fs::remove_dir_all(self.task_dir(&rec.id)).await;
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
    }

    /// After a start: load the tasks, resume the unfinished ones, delete task sandboxes no
    /// attempt owns (a crash between the create and the record), drop stale uploads.
    pub async fn reconcile(self: &Arc<Self>) -> anyhow::Result<()> {
        let records: Vec<TaskRecord> = self.mgr.db.list(TASKS)?;
        let mut owned = HashSet::new();
        let mut resume = Vec::new();
        for rec in records {
            for a in &rec.attempts {
                if let Some(s) = &a.sandbox {
                    owned.insert(s.clone());
                }
            }
            let (last, last_kind) = repair_events(&self.events_path(&rec.id));
            let task = Task::new(rec.clone(), last);
            if last_kind.as_deref() == Some("task.finished") {
                task.finished_logged
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
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name != "uploads" && self.get(&name).is_err() && e.path().is_dir() {
                    let _ = std::fs::remove_dir_all(e.path());
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
        if let Ok(entries) = std::fs::read_dir(self.dir.join("uploads")) {
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(24 * 3600));
                if old {
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

/// Truncates a torn last line of an events log (a crash mid-write); returns the last event's
/// id and type.
fn repair_events(path: &Path) -> (u64, Option<String>) {
    let Ok(data) = std::fs::read(path) else {
        return (0, None);
    };
    let keep = data.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
    if keep < data.len() {
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
            let _ = f.set_len(u64::try_from(keep).unwrap_or(0));
        }
    }
    data[..keep]
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["id"].as_u64()?, v["type"].as_str().map(String::from))))
        .max_by_key(|(id, _)| *id)
        .unwrap_or((0, None))
}

/// A request to `path` of a sandbox's OpenCode, scoped to the workspace directory, with the
/// server's credentials.
fn workspace_request(
    sb: &Sandbox,
    method: hyper::Method,
    path: &str,
) -> std::result::Result<hyper::http::request::Builder, String> {
    let rec = sb.snapshot();
    let secrets = rec.opencode.ok_or("not an OpenCode sandbox")?;
    let sep = if path.contains('?') { '&' } else { '?' };
    let uri = format!(
        "http://{}:{}{path}{sep}directory=%2Fworkspace",
        rec.address,
        crate::opencode::PORT
    );
    Ok(hyper::Request::builder().method(method).uri(uri).header(
        hyper::header::AUTHORIZATION,
        crate::opencode::basic_auth(&secrets.password),
    ))
}

/// Waits until a sandbox's OpenCode answers.
async fn wait_ready(sb: &Arc<Sandbox>) -> std::result::Result<(), String> {
    let mut rx = sb.state_tx.subscribe();
    loop {
        let s = *rx.borrow_and_update();
        match s {
            SandboxState::Ready => return Ok(()),
            s if !s.is_live() => {
                let why = sb
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

/// Checks `diff_exclude` patterns: they become lines of `.git/info/exclude`.
fn validate_diff_exclude(patterns: &[String]) -> Result<()> {
    let (most, longest) = MAX_DIFF_EXCLUDE;
    if patterns.len() > most {
        return Err(Error::Invalid(format!(
            "diff_exclude has more than {most} patterns"
        )));
    }
    for p in patterns {
        if p.trim().is_empty() || p.len() > longest || p.chars().any(char::is_control) {
            return Err(Error::Invalid(format!(
                "diff_exclude pattern {p:?} must be 1-{longest} printable characters"
            )));
        }
    }
    Ok(())
}

/// What goes into the sandbox's `.git/info/exclude` (after what is there).
fn exclude_file(request: &CreateTask) -> String {
    let mut text = String::from("\n# agentd: left out of the task's diff\n");
    match &request.diff_exclude {
        Some(list) => list.iter().for_each(|p| {
            text.push_str(p);
            text.push('\n');
        }),
        None => DEFAULT_DIFF_EXCLUDE.iter().for_each(|p| {
            text.push_str(p);
            text.push('\n');
        }),
    }
    text
}

/// A shell word for `s` (single-quoted).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The last `max` bytes of `s` (on a char boundary).
fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Counts files and changed lines of a unified diff.
pub fn diff_stats(patch: &[u8]) -> DiffStats {
    let mut s = DiffStats {
        bytes: patch.len() as u64,
        ..DiffStats::default()
    };
    for line in patch.split(|b| *b == b'\n') {
        if line.starts_with(b"diff --git ") {
            s.files += 1;
        } else if line.starts_with(b"+++ ") || line.starts_with(b"--- ") {
        } else if line.starts_with(b"+") {
            s.additions += 1;
        } else if line.starts_with(b"-") {
            s.deletions += 1;
        }
    }
    s
}

/// OpenCode's server-sent events, one JSON `data` payload at a time.
struct SseReader {
    events: std::pin::Pin<
        Box<
            dyn futures_util::Stream<Item = std::result::Result<crate::http::SseEvent, String>>
                + Send,
        >,
    >,
}

impl SseReader {
    /// The next event's data as JSON (events whose data is not JSON are skipped); `None` when
    /// the stream ends or breaks.
    async fn next(&mut self) -> Option<serde_json::Value> {
        use futures_util::StreamExt;
        loop {
            match self.events.next().await? {
                Ok(ev) => {
                    if let Ok(v) = serde_json::from_str(&ev.data) {
                        return Some(v);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "OpenCode's event stream broke");
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
            workspace: WorkspaceInfo::default(),
            state: TaskState::Queued,
            created_at: 0,
            started_at: None,
            finished_at: None,
            attempts: vec![Attempt::new(1), Attempt::new(2)],
            stop: None,
            sandboxes_removed: false,
            deleting: false,
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
    fn test_events_log_repair() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        std::fs::write(&p, "{\"id\":1}\n{\"id\":2}\n{\"id\":3,\"ty").unwrap();
        assert_eq!(repair_events(&p), (2, None));
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"id\":1}\n{\"id\":2}\n"
        );
        assert_eq!(repair_events(&dir.path().join("none")), (0, None));
    }

    #[test]
    fn test_events_past_the_cap_keep_only_the_course() {
        let mut log = EventLog::default();
        let v = serde_json::json!({});
        assert_eq!(log.admit(10, "tool", v.clone()).unwrap().0, "tool");
        let full = MAX_EVENTS_BYTES;
        assert_eq!(
            log.admit(full, "tool", v.clone()).unwrap().0,
            "events.dropped"
        );
        assert!(log.admit(full, "tool", v.clone()).is_none());
        assert!(log.admit(full, "message", v.clone()).is_none());
        assert_eq!(
            log.admit(full, "attempt.state", v.clone()).unwrap().0,
            "attempt.state"
        );
        assert_eq!(
            log.admit(full, "task.finished", v).unwrap().0,
            "task.finished"
        );
        assert_eq!(log.dropped, 3);
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
