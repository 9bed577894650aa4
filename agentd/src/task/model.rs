//! What a task is: its request, its attempts and their states, check results, diff stats,
//! the record that is persisted, and the order results are shown in. Data only: the service
//! that drives tasks is the parent module.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use std::time::Duration;

use super::{DEFAULT_MAX_ROUNDS, DEFAULT_TASK_TIMEOUT_SECS, DEFAULT_WAIT_TIMEOUT_SECS};
use crate::sandbox::{LimitsRequest, Usage};
use crate::workspace::{WorkspaceInfo, WorkspaceSpec};

/// Where a task or an attempt is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting: not started, or agentd is at its sandbox or memory quota.
    Queued,
    /// The sandbox is made, OpenCode starts, the workspace goes in.
    Starting,
    /// The agent works.
    Running,
    /// The agent waits for a person to answer a permission request (the time limit is
    /// paused meanwhile, up to `wait_timeout_secs`).
    Waiting,
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
            TaskState::Waiting => "waiting",
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
    /// Each attempt's LLM budget: once its sandbox's usage reaches it, the gateway refuses
    /// its requests and the attempt fails with `budget_exhausted` [default: none].
    #[serde(default)]
    pub budget: Option<crate::sandbox::Budget>,
    /// OpenCode's permission per tool (`{"bash": "ask"}`): `allow`, `ask` (the attempt waits
    /// for an approval: `GET /v1/tasks/{id}/approvals`) or `deny` [default: edit, bash and
    /// webfetch allowed].
    #[serde(default)]
    pub permissions: std::collections::BTreeMap<String, crate::opencode::Permission>,
    /// Limits of each sandbox.
    #[serde(default)]
    pub limits: LimitsRequest,
    /// Time limit of the whole task, seconds [default: 3600]. A follow-up message to a
    /// finished attempt gets this much again.
    pub timeout_secs: Option<u64>,
    /// How long an attempt may wait for a person (a permission request) without its time
    /// limit running, seconds in all; 0 lets the time limit run while it waits [default:
    /// 86400].
    pub wait_timeout_secs: Option<u64>,
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
    /// Shell command run once in `/workspace` after the workspace lands and before the
    /// agent starts (e.g. `pip install -e .`, `npm ci`); its output is streamed as
    /// `setup.output` events; a failure fails the attempt with its output. What it changes
    /// is part of the baseline, not of the diff [default: the workspace's `.agentd.toml` or
    /// devcontainer, if any].
    pub setup: Option<String>,
    /// Seconds the setup may run before it is killed (the attempt then fails) [default: 1800].
    pub setup_timeout_secs: Option<u64>,
    /// Run the setup once, in a sandbox of its own (with the repository's dependency cache),
    /// and start every agent from a copy-on-write layer of what it left in the rootfs (not
    /// `/tmp`, not its processes); false runs it in each agent's sandbox [default: true].
    pub setup_once: Option<bool>,
    /// What the sandboxes (agent, setup and check) may reach beyond agentd [default: mode
    /// none, only the LLM gateway].
    pub network: Option<crate::egress::NetworkPolicy>,
    /// Leave the workspace's `.agentd.toml` and devcontainer definition unread.
    #[serde(default)]
    pub ignore_environment: bool,
    /// Git exclude patterns (`.gitignore` syntax) for files left out of the diff, on top of
    /// the workspace's own `.gitignore` [default: [`DEFAULT_DIFF_EXCLUDE`], well-known caches
    /// and build outputs; `[]` for none].
    pub diff_exclude: Option<Vec<String>>,
}

/// The check's result of one round.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
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

pub use crate::sandbox::SetupResult;

/// Size of a diff.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
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
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct Timings {
    /// Request to sandbox running.
    pub sandbox_ms: Option<u64>,
    /// Sandbox running to OpenCode answering.
    pub opencode_ready_ms: Option<u64>,
    /// Workspace extracted and committed as the baseline.
    pub workspace_ms: Option<u64>,
    /// The setup command, and committing what it changed into the baseline.
    #[serde(default)]
    pub setup_ms: Option<u64>,
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
    /// The commit the workspace was at when it was a git repository (the baseline's
    /// parent): where `agentd task apply` branches from.
    #[serde(default)]
    pub source: Option<String>,
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
    /// The setup's result, once it ran to its end.
    #[serde(default)]
    pub setup: Option<SetupResult>,
    /// The diff's size (the patch is a file in the task's dir).
    pub diff: Option<DiffStats>,
    /// Why it failed, or a problem on the way.
    pub error: Option<String>,
    /// Something to know about a success (e.g. that the agent changed nothing).
    #[serde(default)]
    pub note: Option<String>,
    /// Unix ms since when it waits for a person, while it does.
    #[serde(default)]
    pub waiting_since: Option<u64>,
    /// Ms it waited for a person before `waiting_since`.
    #[serde(default)]
    pub waited_ms: u64,
    /// Unix ms its time limit counts from, when not the task's start (a follow-up's).
    #[serde(default)]
    pub limit_from: Option<u64>,
    /// Follow-up messages not yet sent to its agent (`POST
    /// /v1/tasks/{id}/attempts/{n}/messages`).
    #[serde(default)]
    pub follow_ups: Vec<String>,
    /// Its spent budget waiting for a person (a `budget` approval), and the answer once given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_ask: Option<BudgetAsk>,
    /// How many times a person was asked for more budget.
    #[serde(default)]
    pub budget_asks: u32,
}

/// An attempt's spent budget, asked about (`GET /v1/tasks/{id}/approvals` lists it as the
/// permission `budget`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BudgetAsk {
    /// The request's id (`budget-N-K`: attempt N, its K-th ask).
    pub id: String,
    /// What is spent, in words.
    pub spent: String,
    /// The answer, once given.
    pub answer: Option<crate::task::approvals::Reply>,
}

impl Attempt {
    pub(super) fn new(n: u32) -> Attempt {
        Attempt {
            n,
            state: TaskState::Queued,
            sandbox: None,
            session: None,
            baseline: None,
            source: None,
            round: 1,
            prompted: 0,
            tool_calls: 0,
            usage: Usage::default(),
            started_at: None,
            finished_at: None,
            timings: Timings::default(),
            final_message: None,
            check: None,
            setup: None,
            diff: None,
            error: None,
            note: None,
            waiting_since: None,
            waited_ms: 0,
            limit_from: None,
            follow_ups: Vec::new(),
            budget_ask: None,
            budget_asks: 0,
        }
    }

    /// Ms it waited for a person, so far.
    pub fn waited_ms(&self, now_ms: u64) -> u64 {
        self.waited_ms
            .saturating_add(self.waiting_since.map_or(0, |s| now_ms.saturating_sub(s)))
    }
}

/// Where a task's shared preparation is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PreparedState {
    /// The workspace and the setup are being put in place.
    Running,
    /// Its layer is ready: the attempts start from it.
    Ready,
    /// It failed (and so did the attempts).
    Failed,
}

/// The preparation the attempts of a task with a setup share: the workspace and the setup,
/// run once in a sandbox of its own; what they left in its rootfs becomes a layer every
/// attempt's sandbox starts from, copy-on-write.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct Prepared {
    /// Where it is.
    pub state: PreparedState,
    /// The sandbox it runs in (deleted once its layer is taken, or once it failed).
    pub sandbox: Option<String>,
    /// The baseline commit in `/workspace`, setup included.
    pub baseline: Option<String>,
    /// The commit the workspace was at, when it was a git repository.
    pub source: Option<String>,
    /// The setup's result.
    pub setup: Option<SetupResult>,
    /// Request to sandbox running, ms.
    pub sandbox_ms: Option<u64>,
    /// Workspace extracted and committed, ms.
    pub workspace_ms: Option<u64>,
    /// The setup and its commit, ms.
    pub setup_ms: Option<u64>,
    /// Copying the sandbox's files into the layer, ms.
    pub layer_ms: Option<u64>,
    /// Files (and links) in the layer.
    pub layer_files: Option<u64>,
    /// Bytes of file content in the layer.
    pub layer_bytes: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// The setup had the repository's dependency cache: true when an earlier setup filled
    /// it, false when it was made now [absent: no cache].
    #[serde(default)]
    pub cache_reused: Option<bool>,
    /// The layer is gone (every sandbox that used it is).
    #[serde(default)]
    pub removed: bool,
}

impl Prepared {
    pub(super) fn new() -> Prepared {
        Prepared {
            state: PreparedState::Running,
            sandbox: None,
            baseline: None,
            source: None,
            setup: None,
            sandbox_ms: None,
            workspace_ms: None,
            setup_ms: None,
            layer_ms: None,
            layer_files: None,
            layer_bytes: None,
            error: None,
            cache_reused: None,
            removed: false,
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
    /// The environment the workspace defined (what of it the request left open was used).
    #[serde(default)]
    pub environment: Option<super::environment::Environment>,
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
    /// The shared preparation (a task with a setup).
    #[serde(default)]
    pub prepared: Option<Prepared>,
    /// Cancelled or timed out: what the unfinished attempts end as.
    pub stop: Option<TaskState>,
    /// The sandboxes were deleted after the grace period.
    pub sandboxes_removed: bool,
    /// A DELETE was accepted: the task is being removed (resumed after a restart).
    #[serde(default)]
    pub deleting: bool,
    /// Times a person gave the task's total budget once more.
    #[serde(default)]
    pub budget_grants: u32,
    /// A person lifted the task's total budget.
    #[serde(default)]
    pub budget_unlimited: bool,
}

impl TaskRecord {
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_secs(
            self.request
                .timeout_secs
                .unwrap_or(DEFAULT_TASK_TIMEOUT_SECS),
        )
    }

    /// How long waiting for a person may pause an attempt's time limit.
    pub(crate) fn wait_timeout(&self) -> Duration {
        Duration::from_secs(
            self.request
                .wait_timeout_secs
                .unwrap_or(DEFAULT_WAIT_TIMEOUT_SECS),
        )
    }

    /// Unix ms at which attempt `a` runs out of time: its time limit from the task's start
    /// (or its follow-up's), plus what it waited for a person (up to the wait timeout).
    pub(crate) fn deadline_ms(&self, a: &Attempt, now_ms: u64) -> u64 {
        let from = a.limit_from.or(self.started_at).unwrap_or(now_ms);
        let limit = u64::try_from(self.timeout().as_millis()).unwrap_or(u64::MAX);
        let credit = a
            .waited_ms(now_ms)
            .min(u64::try_from(self.wait_timeout().as_millis()).unwrap_or(u64::MAX));
        from.saturating_add(limit).saturating_add(credit)
    }

    pub(crate) fn max_rounds(&self) -> u32 {
        if self.request.check.is_some() {
            self.request.max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS)
        } else {
            1
        }
    }

    /// The state the attempts add up to.
    pub(super) fn derived_state(&self) -> TaskState {
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
        } else if states.contains(&TaskState::Waiting) {
            TaskState::Waiting
        } else if states.contains(&TaskState::Starting) {
            TaskState::Starting
        } else {
            TaskState::Queued
        }
    }
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
