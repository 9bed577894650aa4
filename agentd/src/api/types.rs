//! The API's answers as types: handlers serialize these, the OpenAPI document's response
//! schemas come from them, and the CLI reads them. Request bodies are the services' own
//! types ([`crate::sandbox::CreateSandbox`], [`crate::task::CreateTask`]) or small ones
//! next to their handlers.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::egress::{EgressEntry, NetworkPolicy};
use crate::sandbox::{ExitInfo, SandboxRecord, SandboxState, Usage};
use crate::task::model::{
    Attempt, CheckResult, DiffStats, SetupResult, TaskRecord, TaskState, Timings,
};
use crate::workspace::WorkspaceSpec;

/// `GET /v1/health`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// agentd's version.
    pub version: String,
}

/// A sandbox's limits.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LimitsView {
    /// Memory limit, bytes.
    pub memory_bytes: u64,
    /// CPU limit in cores (none: unlimited).
    pub cpus: Option<f64>,
    /// Most tasks (none: unlimited).
    pub pids: Option<u64>,
    /// Size of the writable layer, bytes (none: unbounded).
    pub disk_bytes: Option<u64>,
}

/// A sandbox, as the API shows it (never its secrets).
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct SandboxView {
    /// Id (12 hex chars).
    pub id: String,
    /// Its unique name, if it has one.
    pub name: Option<String>,
    /// The image as requested.
    pub image: String,
    /// The image's manifest digest.
    pub image_digest: String,
    /// Where it is in its life.
    pub state: SandboxState,
    /// Unix time (ms) of its creation.
    pub created_at: u64,
    /// Unix time (ms) it became ready.
    pub ready_at: Option<u64>,
    /// Its address on agentd's bridge.
    pub address: String,
    /// Its limits.
    pub limits: LimitsView,
    /// Idle timeout, seconds (0: never).
    pub idle_timeout_secs: u64,
    /// Lifetime limit, seconds.
    pub ttl_secs: Option<u64>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// It runs an OpenCode server.
    pub opencode: bool,
    /// Tokens through the LLM gateway.
    pub usage: Usage,
    /// Its token budget, if it has one.
    pub budget_tokens: Option<u64>,
    /// Its cost budget (in agentd's `llm_currency`), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_cost: Option<f64>,
    /// How it ended, once it has.
    pub exit: Option<ExitInfo>,
    /// What it may reach beyond agentd.
    #[serde(default)]
    pub network: NetworkPolicy,
    /// Its setup command and, once it ended, how it went.
    #[serde(default)]
    pub setup: Option<crate::sandbox::SandboxSetup>,
    /// Its processes are frozen (`POST .../pause`; the next request that uses it resumes it).
    #[serde(default)]
    pub paused: bool,
    /// Unix time (ms) since when it is paused.
    #[serde(default)]
    pub paused_at: Option<u64>,
    /// Its OpenCode is hibernated (`POST .../hibernate`), or being hibernated: stopped, its
    /// memory free, started again by the next request to OpenCode (an exec, files, another
    /// port or SSH only resume the sandbox: `paused` false, OpenCode still asleep).
    #[serde(default)]
    pub hibernated: bool,
    /// What its idle timeout does.
    #[serde(default)]
    pub idle_action: crate::sandbox::IdleAction,
}

impl From<&SandboxRecord> for SandboxView {
    fn from(r: &SandboxRecord) -> Self {
        SandboxView {
            id: r.id.clone(),
            name: r.name.clone(),
            image: r.image.clone(),
            image_digest: r.image_digest.clone(),
            state: r.state,
            created_at: r.created_at,
            ready_at: r.ready_at,
            address: r.address.to_string(),
            limits: LimitsView {
                memory_bytes: r.memory_bytes,
                cpus: r.cpus,
                pids: r.pids,
                disk_bytes: r.disk_bytes,
            },
            idle_timeout_secs: r.idle_timeout_secs,
            ttl_secs: r.ttl_secs,
            labels: r.labels.clone(),
            opencode: r.opencode.is_some(),
            usage: r.usage.clone(),
            budget_tokens: r.budget_tokens,
            budget_cost: r.budget_cost,
            exit: r.exit.clone(),
            network: r.network.clone(),
            setup: r.setup.clone(),
            paused: r.paused_at.is_some(),
            paused_at: r.paused_at,
            // A stopped sandbox's OpenCode sleeps no more: nothing of it is left.
            hibernated: r.hibernated && r.state.is_live(),
            idle_action: r.idle_action,
        }
    }
}

/// `GET` and `PUT /v1/sandboxes/{id}/egress`: the policy and the newest connections.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct EgressView {
    /// The policy.
    pub network: NetworkPolicy,
    /// Connections through the proxy, oldest first (the newest 512 since agentd started).
    pub log: Vec<EgressEntry>,
}

/// `PUT /v1/sandboxes/{id}/egress`: a new allow list (mode allowlist only).
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressRequest {
    /// Hosts (`example.org`, `*.example.org`, `host:port`) or preset names.
    #[schemars(length(max = 256))]
    pub allow: Vec<String>,
}

/// `GET /v1/sandboxes`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct SandboxList {
    /// The sandboxes.
    pub sandboxes: Vec<SandboxView>,
}

/// `GET /v1/sandboxes/{id}/stats`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Stats {
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// Most memory used, bytes (if the cgroup version tells).
    pub memory_peak_bytes: Option<u64>,
    /// CPU time, microseconds.
    pub cpu_usec: u64,
    /// Tasks now.
    pub pids: u64,
    /// Periods the CPU limit throttled it.
    pub cpu_throttled_periods: u64,
}

/// One line of an exec's output stream (`application/x-ndjson`): output while it runs, then
/// its end; or an error line when agentd stops.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
pub struct ExecLine {
    /// `stdout` or `stderr`, on an output line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// The output (UTF-8; invalid bytes replaced), on an output line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The exit status (128+N for signal N), on the last line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// It was killed at its timeout, on the last line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out: Option<bool>,
    /// The OOM killer killed it, on the last line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_killed: Option<bool>,
    /// What went wrong, if something did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `PUT /v1/sandboxes/{id}/files`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Uploaded {
    /// Where it went.
    pub path: String,
    /// Entries written (1 for a file).
    pub entries: u64,
}

/// A layer of an image.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LayerView {
    /// Digest of the blob.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Compressed size, bytes.
    pub size: u64,
    /// Digest of the uncompressed tar.
    pub diff_id: String,
}

/// An image in agentd's store.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ImageView {
    /// Its name.
    pub name: String,
    /// Manifest digest.
    pub manifest: String,
    /// The index it was chosen from, if any.
    pub index: Option<String>,
    /// Config blob digest.
    pub config_digest: String,
    /// os/arch[/variant].
    pub platform: String,
    /// Bytes of its layers (compressed).
    pub size: u64,
    /// Unix time (s) it was stored.
    pub added: u64,
    /// Its layers, bottom first.
    pub layers: Vec<LayerView>,
}

impl From<&agentd_images::ImageRecord> for ImageView {
    fn from(r: &agentd_images::ImageRecord) -> Self {
        ImageView {
            name: r.name.clone(),
            manifest: r.manifest.to_string(),
            index: r.index.as_ref().map(ToString::to_string),
            config_digest: r.config.to_string(),
            platform: r.platform.clone(),
            size: r.size(),
            added: r.added,
            layers: r
                .layers
                .iter()
                .map(|l| LayerView {
                    digest: l.digest.to_string(),
                    media_type: l.media_type.clone(),
                    size: l.size,
                    diff_id: l.diff_id.to_string(),
                })
                .collect(),
        }
    }
}

/// `GET /v1/images`, and what `POST /v1/images/import` stored.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ImageList {
    /// The images.
    pub images: Vec<ImageView>,
}

/// `DELETE /v1/images/{name}`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Removed {
    /// The image's name.
    pub removed: String,
}

/// One line of a pull's progress (`application/x-ndjson`). The last is `complete` (with the
/// image) or `error`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct PullLine {
    /// `resolved`, `layer_start`, `layer_progress`, `layer_done`, `unpack_start`,
    /// `unpack_done`, `done`, `complete` or `error`.
    pub event: String,
    /// The rest of the event's fields.
    #[serde(flatten)]
    pub fields: BTreeMap<String, serde_json::Value>,
}

/// `POST /v1/workspaces`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct UploadedWorkspace {
    /// The id to give as `workspace.upload` (one task each).
    pub upload: String,
    /// Entries in the tar.
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
}

/// A task's workspace.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceView {
    /// Where it came from, as requested.
    pub source: WorkspaceSpec,
    /// Entries (files, dirs, symlinks).
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Special files left out.
    pub skipped: u64,
    /// Entries left out by `exclude`.
    pub excluded: u64,
}

/// One agent's try at a task.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct AttemptView {
    /// 1-based number.
    pub attempt: u32,
    /// Where it is.
    pub state: TaskState,
    /// Its sandbox, once made.
    pub sandbox: Option<String>,
    /// The current (or last) round, from 1.
    pub round: u32,
    /// Tool calls the agent made.
    pub tool_calls: u64,
    /// Tokens through the gateway.
    pub usage: Usage,
    /// Unix ms of its start.
    pub started_at: Option<u64>,
    /// Unix ms of its end.
    pub finished_at: Option<u64>,
    /// Where its time went.
    pub timings: Timings,
    /// The agent's last message.
    pub final_message: Option<String>,
    /// The last check.
    pub check: Option<CheckResult>,
    /// The setup's result, once it ran.
    #[serde(default)]
    pub setup: Option<SetupResult>,
    /// The diff's size.
    pub diff: Option<DiffStats>,
    /// It changed something.
    pub has_patch: bool,
    /// The commit the workspace was at, when it was a git repository: `agentd task apply`
    /// branches from it.
    #[serde(default)]
    pub source_commit: Option<String>,
    /// Why it failed, or a problem on the way.
    pub error: Option<String>,
    /// Something to know about a success.
    pub note: Option<String>,
    /// Ms it waited for a person (permission requests), its time limit paused meanwhile.
    #[serde(default)]
    pub waited_ms: u64,
    /// Follow-up messages not yet sent to its agent.
    #[serde(default)]
    pub follow_ups_pending: u64,
}

impl From<&Attempt> for AttemptView {
    fn from(a: &Attempt) -> Self {
        AttemptView {
            attempt: a.n,
            state: a.state,
            sandbox: a.sandbox.clone(),
            round: a.round,
            tool_calls: a.tool_calls,
            usage: a.usage.clone(),
            started_at: a.started_at,
            finished_at: a.finished_at,
            timings: a.timings.clone(),
            final_message: a.final_message.clone(),
            check: a.check.clone(),
            setup: a.setup.clone(),
            diff: a.diff.clone(),
            has_patch: a.diff.as_ref().is_some_and(|d| d.bytes > 0),
            source_commit: a.source.clone(),
            error: a.error.clone(),
            note: a.note.clone(),
            waited_ms: a.waited_ms(crate::sandbox::now_ms()),
            follow_ups_pending: a.follow_ups.len() as u64,
        }
    }
}

/// A task's state on the wire: a task's states, and `deleting` once a delete is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskStateView {
    /// Waiting.
    Queued,
    /// Sandboxes start.
    Starting,
    /// Agents work.
    Running,
    /// Agents wait for a person (a permission request) and nothing else runs.
    Waiting,
    /// Checks run.
    Checking,
    /// Done, with an attempt that succeeded.
    Succeeded,
    /// Done, none succeeded.
    Failed,
    /// Cancelled.
    Cancelled,
    /// The time limit passed.
    TimedOut,
    /// Being deleted.
    Deleting,
}

impl From<TaskState> for TaskStateView {
    fn from(s: TaskState) -> Self {
        match s {
            TaskState::Queued => TaskStateView::Queued,
            TaskState::Starting => TaskStateView::Starting,
            TaskState::Running => TaskStateView::Running,
            TaskState::Waiting => TaskStateView::Waiting,
            TaskState::Checking => TaskStateView::Checking,
            TaskState::Succeeded => TaskStateView::Succeeded,
            TaskState::Failed => TaskStateView::Failed,
            TaskState::Cancelled => TaskStateView::Cancelled,
            TaskState::TimedOut => TaskStateView::TimedOut,
        }
    }
}

/// A task, as the API shows it.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct TaskView {
    /// Id (12 hex chars).
    pub id: String,
    /// Where it is.
    pub state: TaskStateView,
    /// What the agents are asked to do.
    pub prompt: String,
    /// Its workspace.
    pub workspace: WorkspaceView,
    /// Image of its sandboxes.
    pub image: String,
    /// Model, if the request named one.
    pub model: Option<String>,
    /// Parallel agents.
    pub agents: u64,
    /// The check command.
    pub check: Option<String>,
    /// The setup command.
    #[serde(default)]
    pub setup: Option<String>,
    /// What the workspace's `.agentd.toml` or devcontainer defined (the request's own
    /// fields win over it).
    #[serde(default)]
    pub environment: Option<crate::task::environment::Environment>,
    /// What its sandboxes may reach beyond agentd.
    #[serde(default)]
    pub network: NetworkPolicy,
    /// Most rounds per agent.
    pub max_rounds: u32,
    /// Time limit, seconds.
    pub timeout_secs: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Unix ms.
    pub created_at: u64,
    /// Unix ms of the first start.
    pub started_at: Option<u64>,
    /// Unix ms.
    pub finished_at: Option<u64>,
    /// Rounds of all attempts.
    pub rounds: u64,
    /// Tool calls of all attempts.
    pub tool_calls: u64,
    /// Tokens (and cost) of all attempts, also by model.
    pub usage: Usage,
    /// The setup run once for every agent (a task with a setup), and the layer the
    /// attempts start from (left out of lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<crate::task::Prepared>,
    /// The attempts (left out of lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptView>>,
}

impl TaskView {
    /// The view of `t`, with its attempts or without.
    pub fn of(t: &TaskRecord, with_attempts: bool) -> TaskView {
        let usage = t.attempts.iter().fold(Usage::default(), |mut acc, a| {
            acc.add(&a.usage);
            acc
        });
        TaskView {
            id: t.id.clone(),
            state: if t.deleting {
                TaskStateView::Deleting
            } else {
                t.state.into()
            },
            prompt: t.request.prompt.clone(),
            workspace: WorkspaceView {
                source: t.request.workspace.clone(),
                entries: t.workspace.entries,
                bytes: t.workspace.bytes,
                skipped: t.workspace.skipped,
                excluded: t.workspace.excluded,
            },
            image: t
                .request
                .image
                .clone()
                .unwrap_or_else(|| crate::sandbox::DEFAULT_IMAGE.to_string()),
            model: t.request.model.clone(),
            agents: t.attempts.len() as u64,
            check: t.request.check.clone(),
            setup: t.request.setup.clone(),
            environment: t.environment.clone(),
            network: t.request.network.clone().unwrap_or_default(),
            max_rounds: t.max_rounds(),
            timeout_secs: t.timeout().as_secs(),
            labels: t.request.labels.clone(),
            created_at: t.created_at,
            started_at: t.started_at,
            finished_at: t.finished_at,
            rounds: t.attempts.iter().map(|a| u64::from(a.round)).sum(),
            tool_calls: t.attempts.iter().map(|a| a.tool_calls).sum(),
            usage,
            prepared: t.prepared.clone().filter(|_| with_attempts),
            attempts: with_attempts.then(|| t.attempts.iter().map(AttemptView::from).collect()),
        }
    }
}

/// `POST /v1/tasks/{id}/attempts/{n}/push`.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    /// The branch to make in the task's repository; it must not exist there
    /// [default: agentd/<task>-<n>].
    pub branch: Option<String>,
}

/// `GET /v1/tasks`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct TaskList {
    /// The tasks, without their attempts.
    pub tasks: Vec<TaskView>,
}

/// One attempt in a task's result.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct RankedAttempt {
    /// 1 is best.
    pub rank: u32,
    /// The attempt's number.
    pub attempt: u32,
    /// Where it ended (or is).
    pub state: TaskState,
    /// Its sandbox.
    pub sandbox: Option<String>,
    /// Rounds it ran.
    pub rounds: u32,
    /// Tool calls the agent made.
    pub tool_calls: u64,
    /// The agent's last message.
    pub final_message: Option<String>,
    /// The last check.
    pub check: Option<CheckResult>,
    /// The setup's result, once it ran.
    #[serde(default)]
    pub setup: Option<SetupResult>,
    /// The diff's size.
    pub diff: Option<DiffStats>,
    /// It changed something.
    pub has_patch: bool,
    /// The patch, when it is text.
    pub patch: Option<String>,
    /// Where the patch is served.
    pub patch_url: Option<String>,
    /// Tokens through the gateway.
    pub usage: Usage,
    /// Where its time went.
    pub timings: Timings,
    /// Why it failed.
    pub error: Option<String>,
    /// Something to know about a success.
    pub note: Option<String>,
}

/// `GET /v1/tasks/{id}/result`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct TaskResult {
    /// The task's id.
    pub id: String,
    /// Its state.
    pub state: TaskState,
    /// Nothing more will change.
    pub finished: bool,
    /// Attempts with a non-empty patch.
    pub attempts_with_patch: Vec<u32>,
    /// The attempts, best first.
    pub attempts: Vec<RankedAttempt>,
}

/// An error: `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ErrorDetail {
    /// A stable code (`bad_request`, `not_found`, `quota_exceeded`, ...).
    pub code: String,
    /// What happened and what to do.
    pub message: String,
}

/// `POST /v1/sandboxes/{id}/exec`: the JSON at the start of the body.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Command and arguments.
    #[schemars(length(min = 1), inner(length(min = 1)))]
    pub command: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute).
    #[schemars(regex(pattern = "^/"))]
    pub cwd: Option<String>,
    /// Seconds before the process is killed [default: none].
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_secs: Option<u64>,
    /// Uid inside the sandbox [default: the sandbox's user].
    pub uid: Option<u32>,
    /// The bytes after the JSON request (and one newline) are the process's stdin
    /// [default: false, stdin is /dev/null].
    #[serde(default)]
    pub stdin: bool,
}

/// `POST /v1/images/pull`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    /// Image reference.
    #[schemars(length(min = 1))]
    pub reference: String,
    /// Platform, os/arch[/variant].
    pub platform: Option<String>,
    /// Allow plain HTTP to a registry that is not on loopback.
    #[serde(default)]
    pub insecure: bool,
}

/// `POST /v1/images/import` with a JSON body: a host path, on the Unix socket only.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// Host path of an OCI layout (dir or tar) or a docker-archive tar.
    pub path: String,
    /// Name to record the image under.
    pub name: Option<String>,
}

/// `GET /v1/sandboxes` query.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListQuery {
    /// Only sandboxes with this label: `key=value`, or `key` for any value.
    pub label: Option<String>,
}

/// Which output of a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// Its stdout.
    Stdout,
    /// Its stderr.
    Stderr,
    /// Both.
    #[default]
    Both,
}

/// `POST /v1/sandboxes/{id}/fork`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// How many sandboxes [default: 1; at most 16].
    pub count: Option<u32>,
}

/// What a fork made.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ForkView {
    /// The new sandboxes (labelled `agentd.fork_of`).
    pub sandboxes: Vec<SandboxView>,
    /// Files (and links) copied from the parent's writable layer.
    pub files: u64,
    /// Bytes of file content copied.
    pub bytes: u64,
    /// How long the parent was frozen while its files were copied, ms.
    pub copy_ms: f64,
    /// The whole request, ms.
    pub total_ms: f64,
}

/// `GET /v1/llm`: the LLM gateway's setup and today's spend.
#[derive(Debug, Serialize, JsonSchema)]
pub struct LlmStatus {
    /// The upstreams, the first being the one a plain model name goes to.
    pub upstreams: Vec<UpstreamView>,
    /// The model of a sandbox or task that names none.
    pub default_model: String,
    /// The currency of prices and costs.
    pub currency: String,
    /// Prices per million tokens, by model as sandboxes name it.
    pub prices: BTreeMap<String, PriceView>,
    /// What all sandboxes spent today (UTC).
    pub today: crate::gateway::spend::DayUsage,
    /// The daily token budget of all sandboxes together, if any.
    pub daily_tokens: Option<u64>,
    /// The daily cost budget of all sandboxes together, if any.
    pub daily_cost: Option<f64>,
    /// A task attempt's token budget when the task gives none, if any.
    pub task_budget_tokens: Option<u64>,
    /// The audit logs keep prompts.
    pub log_prompts: bool,
}

/// One LLM upstream (its key is never shown).
#[derive(Debug, Serialize, JsonSchema)]
pub struct UpstreamView {
    /// Its name: the OpenCode provider and the `UPSTREAM/` of model names.
    pub name: String,
    /// `openai-compatible`, `openai` or `anthropic`.
    pub kind: String,
    /// Where the gateway sends its requests.
    pub base_url: String,
    /// agentd has a key for it.
    pub has_key: bool,
    /// Its allowlist (empty: what its `/models` lists).
    pub models: Vec<String>,
}

/// A price per million tokens.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PriceView {
    /// Per million input tokens.
    pub input: f64,
    /// Per million output tokens.
    pub output: f64,
}

/// `GET /v1/sandboxes/{id}/llm`: the gateway's audit log of a sandbox.
#[derive(Debug, Serialize, JsonSchema)]
pub struct LlmLog {
    /// Its token usage so far.
    pub usage: Usage,
    /// Its token budget, if it has one.
    pub budget_tokens: Option<u64>,
    /// Its cost budget, if it has one.
    pub budget_cost: Option<f64>,
    /// The currency of costs.
    pub currency: String,
    /// Its newest requests (at most 1,000), oldest first; prompts are kept only when agentd
    /// runs with `llm_log_prompts`.
    pub requests: Vec<crate::gateway::audit::Entry>,
}

/// `POST /v1/sandboxes/{id}/snapshot`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The new image's name (`name[:tag]`, stored as `localhost/name[:tag]`, or a full
    /// reference); an existing image of that name is refused.
    pub name: String,
}

/// What a snapshot stored.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct SnapshotView {
    /// The new image: the sandbox's image with the sandbox's files as layers on top.
    pub image: ImageView,
    /// Layers added on top of the sandbox's image.
    pub layers_added: usize,
    /// Files (and links) copied from the sandbox's writable layer.
    pub files: u64,
    /// Bytes of file content copied.
    pub bytes: u64,
    /// How long the sandbox was frozen while its files were copied, ms.
    pub frozen_ms: f64,
    /// The whole request, ms.
    pub total_ms: f64,
}

/// `POST /v1/sandboxes/{id}/pause` and `/resume`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Paused {
    /// The sandbox now.
    pub sandbox: SandboxView,
    /// How long the freezer took, ms (0: nothing to do).
    pub freezer_ms: f64,
    /// A resume of a hibernated sandbox: how long its OpenCode took to start and answer, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opencode_ms: Option<f64>,
}

/// `POST /v1/sandboxes/{id}/hibernate`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Hibernated {
    /// The sandbox now.
    pub sandbox: SandboxView,
    /// How long its OpenCode took to exit and be reaped, ms (0: it slept already).
    pub stop_ms: f64,
    /// How long the freezer took, ms.
    pub freezer_ms: f64,
}

/// `GET /v1/sandboxes/{id}/dir`: a directory's entries.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct DirList {
    /// The directory.
    pub path: String,
    /// Its entries, by name (10,000 at most).
    pub entries: Vec<crate::sandbox::fs::DirEntry>,
    /// It has more entries than listed.
    pub truncated: bool,
}

/// `GET /v1/sandboxes/{id}/ports`: the TCP ports that listen inside.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct PortList {
    /// The ports, in order.
    pub ports: Vec<crate::exec::Listening>,
}

/// `POST /v1/ui/tickets`: a login link for the web UI.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct UiTicket {
    /// Open it in a browser (once, within `expires_in_secs`).
    pub url: String,
    /// Seconds the link stays valid.
    pub expires_in_secs: u64,
}

/// `GET /v1/tasks/{id}/approvals`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ApprovalList {
    /// The requests waiting for a person, of every running attempt.
    pub approvals: Vec<crate::task::approvals::Approval>,
}

/// `POST /v1/sandboxes/{id}/tickets` query.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TicketQuery {
    /// A port inside the sandbox: the ticket opens that port's origin [default: the
    /// sandbox's OpenCode].
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
}

/// A ticket for one of a sandbox's origins.
#[derive(Debug, Serialize, JsonSchema)]
pub struct TicketView {
    /// The ticket: one use, within `expires_in_secs`.
    pub ticket: String,
    /// Seconds left to use it.
    pub expires_in_secs: u64,
    /// The origin's host (`{sandbox}.{base}` or `{port}-{sandbox}.{base}`).
    pub host: String,
    /// The URL to open in a browser (agentd's TCP listener), when agentd listens on TCP.
    pub url: Option<String>,
}

/// How `opencode attach` reaches a sandbox's OpenCode through agentd.
#[derive(Debug, Serialize, JsonSchema)]
pub struct AttachView {
    /// The sandbox's OpenCode through agentd's TCP listener (`/v1/sandboxes/{id}/opencode`:
    /// no DNS needed), when agentd listens on TCP.
    pub url: Option<String>,
    /// The sandbox's OpenCode origin (`{id}.{origin_base}`), where DNS (or a browser)
    /// resolves it, when agentd listens on TCP.
    pub origin_url: Option<String>,
    /// Basic auth user name (any is accepted).
    pub username: String,
    /// Basic auth password: this sandbox's attach password (not OpenCode's own).
    pub password: String,
    /// The command to run, when agentd listens on TCP.
    pub command: Option<String>,
}

/// `GET /v1/sandboxes/{id}/logs` query.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct LogsQuery {
    /// Keep streaming until the sandbox ends [default: false].
    #[serde(default)]
    pub follow: bool,
    /// Which output [default: both].
    #[serde(default)]
    pub stream: LogStream,
}

/// `/v1/sandboxes/{id}/files` query.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct FilesQuery {
    /// The absolute path inside the sandbox.
    #[schemars(regex(pattern = "^/"))]
    pub path: String,
}

/// `POST /v1/images/import` query.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ImportQuery {
    /// Name to record an imported archive under.
    pub name: Option<String>,
}

/// `GET /v1/tasks/{id}/events` query.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct EventsQuery {
    /// Events after this id (the `Last-Event-ID` header wins).
    pub after: Option<u64>,
}
