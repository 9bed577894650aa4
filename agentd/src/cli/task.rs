//! `agentd task ...`: hand a prompt and a workspace to agents through a running daemon, watch
//! them work (one line per attempt, redrawn in place on a terminal), and read the results.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use hyper::Method;

use crate::api::types::{TaskList, TaskResult, TaskView};
use crate::cli::sandbox::{call, check, check_as, send};
use crate::sandbox::Usage;
use crate::task::{CheckResult, DiffStats, TaskState};

/// `agentd task` arguments.
#[derive(Debug, Args)]
pub struct TaskArgs {
    /// The daemon's API socket.
    #[arg(long, env = "AGENTD_SOCKET", default_value = crate::daemon::config::DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: TaskCommand,
}

#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing would only obscure the clap definition"
)]
enum TaskCommand {
    /// Start a task, show its progress, then print the best attempt's diff.
    Run {
        /// The workspace: a directory on this host.
        #[arg(long, required_unless_present = "git", conflicts_with = "git")]
        workspace: Option<PathBuf>,
        /// The workspace: a git URL agentd's host can reach.
        #[arg(long)]
        git: Option<String>,
        /// Branch, tag or commit of --git.
        #[arg(long = "ref", requires = "git")]
        git_ref: Option<String>,
        /// Leave out paths with this relative path or name, e.g. target (repeatable).
        #[arg(long)]
        exclude: Vec<String>,
        /// Parallel agents, each in its own sandbox.
        #[arg(long, default_value_t = 1)]
        agents: u32,
        /// Command run in /workspace after each round; exit 0 passes.
        #[arg(long)]
        check: Option<String>,
        /// Most rounds per agent while the check fails [default: 3].
        #[arg(long)]
        max_rounds: Option<u32>,
        /// Seconds the check may run before it is killed [default: 600].
        #[arg(long)]
        check_timeout: Option<u64>,
        /// Command run once in /workspace before the agent starts (e.g. `npm ci`); a
        /// failure fails the attempt [default: the workspace's .agentd.toml or devcontainer].
        #[arg(long)]
        setup: Option<String>,
        /// Seconds the setup may run before it is killed [default: 1800].
        #[arg(long)]
        setup_timeout: Option<u64>,
        /// Run the setup in each agent's sandbox instead of once for all (for a setup that
        /// starts services: processes do not carry over from the shared one).
        #[arg(long)]
        setup_per_agent: bool,
        /// Leave the workspace's .agentd.toml and devcontainer.json unread.
        #[arg(long)]
        ignore_environment: bool,
        /// Let the agents (and the setup and check) reach this host (`example.org`,
        /// `*.example.org`, `host:port`) or preset through agentd's egress proxy (repeatable;
        /// implies network mode allowlist).
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// Network mode of the agents, setup and check: none (only the LLM gateway),
        /// allowlist (the --allow hosts, through agentd's proxy) or open (any public address
        /// through agentd's NAT; DNS works) [default: none, or allowlist with --allow].
        #[arg(long, value_parser = ["none", "allowlist", "open"])]
        network: Option<String>,
        /// Make the agents ask before using this OpenCode tool (`bash`, `edit`, `webfetch`,
        /// ...; repeatable): answer at the terminal while attached, or with `agentd task
        /// approve` (`agentd task approvals` lists what waits).
        #[arg(long = "ask")]
        ask: Vec<String>,
        /// Forbid the agents this OpenCode tool (repeatable).
        #[arg(long = "deny")]
        deny: Vec<String>,
        /// Leave files matching this git pattern out of the diff (repeatable; replaces the
        /// default list of caches and build outputs; `--diff-exclude ''` for none).
        #[arg(long)]
        diff_exclude: Vec<String>,
        /// Time limit of the task, seconds [default: 3600].
        #[arg(long)]
        timeout: Option<u64>,
        /// Model [default: agentd's].
        #[arg(long)]
        model: Option<String>,
        /// Each attempt's LLM budget in tokens (prompt + completion); past it the attempt
        /// fails with budget_exhausted, or, run at a terminal, you are asked for more (once:
        /// one more budget, always: no limit, reject: it fails) [default: none].
        #[arg(long)]
        budget_tokens: Option<u64>,
        /// Each attempt's LLM budget in agentd's llm_currency (priced models only); past it
        /// the attempt fails with budget_exhausted [default: none].
        #[arg(long)]
        budget_cost: Option<f64>,
        /// All attempts' LLM budget in tokens together (each attempt is refused once they
        /// spent it) [default: none].
        #[arg(long)]
        total_budget_tokens: Option<u64>,
        /// Image [default: opencode].
        #[arg(long)]
        image: Option<String>,
        /// Memory limit per sandbox, e.g. 2g.
        #[arg(long)]
        memory: Option<String>,
        /// CPU limit per sandbox in cores.
        #[arg(long)]
        cpus: Option<f64>,
        /// Seconds the sandboxes are kept after the task ends.
        #[arg(long)]
        grace: Option<u64>,
        /// Print the task id and return at once.
        #[arg(long)]
        detach: bool,
        /// What the agents are asked to do.
        prompt: String,
    },
    /// List tasks.
    Ls,
    /// Show a task and its attempts.
    Show {
        /// Task id.
        id: String,
    },
    /// Print an attempt's patch (default: the best one).
    Diff {
        /// Task id.
        id: String,
        /// Attempt number.
        attempt: Option<u32>,
    },
    /// Put an attempt's change (default: the best one) into a local git repository as a
    /// commit on a new branch; the working tree and the current branch are not touched.
    Apply {
        /// Task id.
        id: String,
        /// Attempt number.
        attempt: Option<u32>,
        /// The branch to create [default: agentd/ID-N].
        #[arg(long)]
        branch: Option<String>,
        /// The repository [default: the current directory].
        #[arg(long, default_value = ".")]
        repo: PathBuf,
        /// The commit to branch from [default: the commit the workspace was at, when this
        /// repository has it; else HEAD].
        #[arg(long)]
        base: Option<String>,
    },
    /// Push an attempt's change (default: the best one) to the task's git repository (a git
    /// URL workspace) as a new branch, with the credentials file agentd was given.
    Push {
        /// Task id.
        id: String,
        /// Attempt number.
        attempt: Option<u32>,
        /// The branch to create there [default: agentd/ID-N].
        #[arg(long)]
        branch: Option<String>,
    },
    /// Follow a task as it runs: what the agents write, each tool call with its output,
    /// approvals to answer, checks and states, from the start (until it ends; ^C stops
    /// watching, not the task).
    Watch {
        /// Task id.
        id: String,
        /// Only this attempt.
        #[arg(long)]
        attempt: Option<u64>,
    },
    /// What the task's agents wait for: permission requests to answer with `approve`.
    Approvals {
        /// Task id.
        id: String,
    },
    /// Answer a permission request (`agentd task approvals` lists them): let it run once
    /// (the default), always, or reject it.
    Approve {
        /// Task id.
        id: String,
        /// The request's id.
        request: String,
        /// Let this call and the same kind run from now on.
        #[arg(long, conflicts_with = "reject")]
        always: bool,
        /// Refuse it.
        #[arg(long)]
        reject: bool,
        /// What the agent is told when it is refused.
        #[arg(long, requires = "reject")]
        message: Option<String>,
    },
    /// Tell an attempt's agent something (a follow-up in its session): sent when its turn
    /// ends, before the check; a finished attempt whose sandbox is still kept runs again for
    /// it (the agent, the check, the diff).
    Say {
        /// Task id.
        id: String,
        /// Attempt number.
        attempt: u32,
        /// The message (`-`: read it from stdin).
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Cancel a task.
    Cancel {
        /// Task id.
        id: String,
    },
    /// Delete tasks, their sandboxes and results.
    Rm {
        /// Task ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// Runs an `agentd task` subcommand.
pub fn run(args: TaskArgs) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

fn valid_id(id: &str) -> anyhow::Result<&str> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        bail!("{id:?} is not a task id");
    }
    Ok(id)
}

/// `GET path` as the wire type `T`.
async fn get_as<T: serde::de::DeserializeOwned>(sock: &PathBuf, path: &str) -> anyhow::Result<T> {
    check_as(&call(sock, Method::GET, path, None, None).await?)
}

async fn run_async(args: TaskArgs) -> anyhow::Result<u8> {
    let sock = &args.socket;
    match args.command {
        TaskCommand::Run {
            workspace,
            git,
            git_ref,
            exclude,
            agents,
            check: check_cmd,
            max_rounds,
            check_timeout,
            setup,
            setup_timeout,
            setup_per_agent,
            ignore_environment,
            allow,
            network,
            ask,
            deny,
            diff_exclude,
            timeout,
            model,
            budget_tokens,
            budget_cost,
            total_budget_tokens,
            image,
            memory,
            cpus,
            grace,
            detach,
            prompt,
        } => {
            let mut ws = crate::workspace::WorkspaceSpec {
                exclude,
                ..Default::default()
            };
            match (&workspace, git.clone()) {
                (Some(dir), _) => {
                    // Absolute, but not resolved: agentd itself follows only symlinks root
                    // owns (resolving here, as root, would hide a link another user planted).
                    let abs = std::path::absolute(dir)
                        .with_context(|| format!("workspace {}", dir.display()))?;
                    ws.path = Some(abs.to_string_lossy().into_owned());
                }
                (None, Some(url)) => {
                    ws.git = Some(url);
                    ws.git_ref = git_ref;
                }
                (None, None) => bail!("give --workspace DIR or --git URL"),
            }
            let body = crate::cli::sandbox::without_nulls(serde_json::to_value(
                crate::task::CreateTask {
                    prompt,
                    workspace: ws,
                    agents: Some(agents),
                    check: check_cmd,
                    max_rounds,
                    check_timeout_secs: check_timeout,
                    setup,
                    setup_timeout_secs: setup_timeout,
                    setup_once: setup_per_agent.then_some(false),
                    ignore_environment,
                    network: crate::cli::sandbox::network_policy(network.as_deref(), allow)?,
                    permissions: ask
                        .into_iter()
                        .map(|t| (t, crate::opencode::Permission::Ask))
                        .chain(
                            deny.into_iter()
                                .map(|t| (t, crate::opencode::Permission::Deny)),
                        )
                        .collect(),
                    // `--diff-exclude ''` alone: no exclusions at all.
                    diff_exclude: (!diff_exclude.is_empty())
                        .then(|| diff_exclude.into_iter().filter(|p| !p.is_empty()).collect()),
                    timeout_secs: timeout,
                    model,
                    budget: (budget_tokens.is_some()
                        || budget_cost.is_some()
                        || total_budget_tokens.is_some())
                    .then_some(crate::sandbox::Budget {
                        tokens: budget_tokens,
                        cost: budget_cost,
                        total_tokens: total_budget_tokens,
                        total_cost: None,
                        // A person at the terminal is asked for more when it is spent.
                        ask: (!detach && !args.json && std::io::stdin().is_terminal())
                            .then_some(true),
                    }),
                    image,
                    grace_secs: grace,
                    limits: crate::sandbox::LimitsRequest {
                        memory: memory.map(crate::sandbox::SizeValue::Text),
                        cpus,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )?);
            let v: TaskView = check_as(
                &call(
                    sock,
                    Method::POST,
                    "/v1/tasks",
                    Some((body.to_string().into_bytes(), "application/json")),
                    None,
                )
                .await?,
            )?;
            let id = v.id;
            if detach {
                println!("{id}");
                return Ok(0);
            }
            eprintln!(
                "task {id}: {agents} agent{} on {} ({} files); Ctrl-C cancels",
                if agents == 1 { "" } else { "s" },
                workspace
                    .as_ref()
                    .map(|w| w.display().to_string())
                    .or(git)
                    .unwrap_or_default(),
                v.workspace.entries
            );
            follow(sock, &id, agents, args.json).await?;
            let result: TaskResult = get_as(sock, &format!("/v1/tasks/{id}/result")).await?;
            if args.json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                print_result(&id, &result);
            }
            Ok(if result.state == TaskState::Succeeded {
                0
            } else {
                1
            })
        }
        TaskCommand::Ls => {
            let v: TaskList = get_as(sock, "/v1/tasks").await?;
            if args.json {
                println!("{}", serde_json::to_string(&v)?);
                return Ok(0);
            }
            println!(
                "{:<14} {:<10} {:>6} {:>6} {:>6} {:>8}  PROMPT",
                "ID", "STATE", "AGENTS", "ROUNDS", "TOOLS", "TOKENS"
            );
            for t in v.tasks {
                let tokens = t.usage.prompt_tokens + t.usage.completion_tokens;
                let prompt: String = t.prompt.replace('\n', " ").chars().take(50).collect();
                println!(
                    "{:<14} {:<10} {:>6} {:>6} {:>6} {:>8}  {}",
                    t.id,
                    state_name(&t.state),
                    t.agents,
                    t.rounds,
                    t.tool_calls,
                    tokens,
                    prompt
                );
            }
            Ok(0)
        }
        TaskCommand::Show { id } => {
            let id = valid_id(&id)?;
            let v: TaskView = get_as(sock, &format!("/v1/tasks/{id}")).await?;
            if args.json {
                println!("{}", serde_json::to_string(&v)?);
                return Ok(0);
            }
            println!("task {id}: {}", state_name(&v.state));
            println!("prompt: {}", v.prompt);
            for a in v.attempts.unwrap_or_default() {
                println!(
                    "  {}",
                    attempt_line(&Line {
                        n: a.attempt,
                        state: a.state,
                        round: a.round,
                        tool_calls: a.tool_calls,
                        usage: &a.usage,
                        diff: a.diff.as_ref(),
                        check: a.check.as_ref(),
                    })
                );
                if let Some(e) = a.error {
                    println!("    error: {e}");
                }
            }
            Ok(0)
        }
        TaskCommand::Diff { id, attempt } => {
            let id = valid_id(&id)?;
            let n = match attempt {
                Some(n) => n,
                None => best_attempt(sock, id, |a| a.diff.is_some(), "has a diff").await?,
            };
            std::io::stdout().write_all(&attempt_diff(sock, id, n).await?)?;
            Ok(0)
        }
        TaskCommand::Apply {
            id,
            attempt,
            branch,
            repo,
            base,
        } => {
            let id = valid_id(&id)?;
            let view: TaskView = get_as(sock, &format!("/v1/tasks/{id}")).await?;
            let n = match attempt {
                Some(n) => n,
                None => best_attempt(sock, id, |a| a.has_patch, "changed anything").await?,
            };
            let a = view
                .attempts
                .iter()
                .flatten()
                .find(|a| a.attempt == n)
                .with_context(|| format!("task {id} has no attempt {n}"))?;
            if !a.has_patch {
                bail!(
                    "attempt {n} of task {id} changed nothing{}",
                    a.error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                );
            }
            let patch = attempt_diff(sock, id, n).await?;
            let branch = branch.unwrap_or_else(|| format!("agentd/{id}-{n}"));
            let message = crate::task::commit_message(id, n, &view.prompt);
            let source = a
                .source_commit
                .as_deref()
                .filter(|s| crate::task::is_commit_id(s));
            let done = super::apply::apply(&super::apply::Apply {
                repo: &repo,
                branch: &branch,
                base: base.as_deref(),
                source,
                message: &message,
                patch: &patch,
            })?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"branch": branch, "commit": done.commit, "base": done.base})
                );
            } else {
                println!(
                    "branch {branch}: commit {} on {}{}\n  see it: git -C {} log -p {}..{branch}",
                    super::apply::short(&done.commit),
                    super::apply::short(&done.base),
                    if done.from_source {
                        " (the commit the workspace was at)"
                    } else {
                        ""
                    },
                    repo.display(),
                    super::apply::short(&done.base),
                );
            }
            Ok(0)
        }
        TaskCommand::Push {
            id,
            attempt,
            branch,
        } => {
            let id = valid_id(&id)?;
            let n = match attempt {
                Some(n) => n,
                None => best_attempt(sock, id, |a| a.has_patch, "changed anything").await?,
            };
            let body = serde_json::to_vec(&serde_json::json!({"branch": branch}))?;
            let path = format!("/v1/tasks/{id}/attempts/{n}/push");
            let reply = call(
                sock,
                Method::POST,
                &path,
                Some((body, "application/json")),
                None,
            )
            .await?;
            let v = check(&reply)?;
            if args.json {
                println!("{v}");
            } else {
                println!(
                    "pushed attempt {n} to {} as branch {} (commit {})",
                    v["remote"].as_str().unwrap_or(""),
                    v["branch"].as_str().unwrap_or(""),
                    v["commit"].as_str().unwrap_or("")
                );
            }
            Ok(0)
        }
        TaskCommand::Cancel { id } => {
            cancel(sock, valid_id(&id)?).await?;
            Ok(0)
        }
        TaskCommand::Watch { id, attempt } => {
            let id = valid_id(&id)?.to_string();
            watch(sock, &id, attempt).await?;
            Ok(0)
        }
        TaskCommand::Approvals { id } => {
            let id = valid_id(&id)?;
            let reply = call(
                sock,
                Method::GET,
                &format!("/v1/tasks/{id}/approvals"),
                None,
                None,
            )
            .await?;
            let v = check(&reply)?;
            let list = v["approvals"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("nothing waits for an answer");
            }
            for a in list {
                let patterns: Vec<&str> = a["patterns"]
                    .as_array()
                    .map(|p| p.iter().filter_map(|s| s.as_str()).collect())
                    .unwrap_or_default();
                println!(
                    "{}  attempt {}  {}: {}",
                    a["id"].as_str().unwrap_or_default(),
                    a["attempt"],
                    a["permission"].as_str().unwrap_or_default(),
                    patterns.join(" ")
                );
            }
            Ok(0)
        }
        TaskCommand::Approve {
            id,
            request,
            always,
            reject,
            message,
        } => {
            let id = valid_id(&id)?;
            let reply = if reject {
                "reject"
            } else if always {
                "always"
            } else {
                "once"
            };
            let body = crate::cli::sandbox::without_nulls(
                serde_json::json!({"reply": reply, "message": message}),
            );
            let path = format!(
                "/v1/tasks/{id}/approvals/{}",
                url::form_urlencoded::byte_serialize(request.as_bytes()).collect::<String>()
            );
            let r = call(
                sock,
                Method::POST,
                &path,
                Some((body.to_string().into_bytes(), "application/json")),
                None,
            )
            .await?;
            let a = check(&r)?;
            println!(
                "answered {} ({}) of attempt {}: {reply}",
                request,
                a["permission"].as_str().unwrap_or_default(),
                a["attempt"]
            );
            Ok(0)
        }
        TaskCommand::Say { id, attempt, text } => {
            let id = valid_id(&id)?;
            let text = if text == ["-"] {
                let mut s = String::new();
                std::io::Read::read_to_string(
                    &mut std::io::Read::take(
                        std::io::stdin(),
                        crate::task::follow_up::MAX_MESSAGE as u64 + 1,
                    ),
                    &mut s,
                )?;
                s
            } else {
                text.join(" ")
            };
            let body = serde_json::json!({ "text": text });
            let r = call(
                sock,
                Method::POST,
                &format!("/v1/tasks/{id}/attempts/{attempt}/messages"),
                Some((body.to_string().into_bytes(), "application/json")),
                None,
            )
            .await?;
            let v = check(&r)?;
            if v["reopened"] == true {
                println!("attempt {attempt} runs again for it (follow it: agentd task watch {id} --attempt {attempt})");
            } else {
                println!(
                    "queued for attempt {attempt}: its agent gets it when its turn ends ({} waiting)",
                    v["pending"]
                );
            }
            Ok(0)
        }
        TaskCommand::Rm { ids } => {
            for id in ids {
                let id = valid_id(&id)?;
                let reply =
                    call(sock, Method::DELETE, &format!("/v1/tasks/{id}"), None, None).await?;
                if !reply.status.is_success() {
                    check(&reply)?;
                }
                // The daemon deletes in the background (cancel, sandboxes, files): wait for it.
                let started = std::time::Instant::now();
                loop {
                    let r = call(sock, Method::GET, &format!("/v1/tasks/{id}"), None, None).await?;
                    if r.status == hyper::StatusCode::NOT_FOUND {
                        break;
                    }
                    if started.elapsed() > std::time::Duration::from_secs(300) {
                        bail!("task {id} is still being deleted after 300 s (see agentd's log)");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                println!("{id}");
            }
            Ok(0)
        }
    }
}

/// The best ranked attempt of task `id` for which `fits` holds; an error saying no attempt
/// `what` otherwise.
async fn best_attempt(
    sock: &PathBuf,
    id: &str,
    fits: impl Fn(&crate::api::types::RankedAttempt) -> bool,
    what: &str,
) -> anyhow::Result<u32> {
    let r: TaskResult = get_as(sock, &format!("/v1/tasks/{id}/result")).await?;
    r.attempts
        .iter()
        .find(|a| fits(a))
        .map(|a| a.attempt)
        .with_context(|| format!("no attempt of task {id} {what}"))
}

/// Attempt `n`'s patch.
async fn attempt_diff(sock: &PathBuf, id: &str, n: u32) -> anyhow::Result<Vec<u8>> {
    let reply = call(
        sock,
        Method::GET,
        &format!("/v1/tasks/{id}/attempts/{n}/diff"),
        None,
        None,
    )
    .await?;
    if !reply.status.is_success() {
        check(&reply)?;
    }
    Ok(reply.body.to_vec())
}

async fn cancel(sock: &PathBuf, id: &str) -> anyhow::Result<()> {
    let path = format!("/v1/tasks/{id}/cancel");
    check(&call(sock, Method::POST, &path, None, None).await?)?;
    Ok(())
}

/// What a line about an attempt shows.
struct Line<'a> {
    n: u32,
    state: TaskState,
    round: u32,
    tool_calls: u64,
    usage: &'a Usage,
    diff: Option<&'a DiffStats>,
    check: Option<&'a CheckResult>,
}

/// A state's wire name.
fn state_name<T: serde::Serialize>(s: &T) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// One attempt as a line: state, round, tools, tokens, diff, check.
fn attempt_line(a: &Line<'_>) -> String {
    let mut line = format!(
        "attempt {:<2} {:<10} round {}  tools {}  tokens {}",
        a.n,
        a.state.as_str(),
        a.round,
        a.tool_calls,
        a.usage.prompt_tokens + a.usage.completion_tokens
    );
    if let Some(d) = a.diff {
        line.push_str(&format!(
            "  diff +{} -{} in {} files",
            d.additions, d.deletions, d.files
        ));
    }
    if let Some(c) = a.check {
        line.push_str(if c.passed {
            "  check passed"
        } else {
            "  check failed"
        });
    }
    line
}

/// Live state of one attempt for the progress display.
#[derive(Default)]
struct Progress {
    state: String,
    round: u64,
    tools: u64,
    last: String,
}

/// Follows the task's events until it finishes; Ctrl-C cancels the task (and keeps following
/// until the cancellation is done).
async fn follow(sock: &PathBuf, id: &str, agents: u32, json: bool) -> anyhow::Result<()> {
    let tty = std::io::stderr().is_terminal() && !json;
    let mut progress: BTreeMap<u64, Progress> = (1..=u64::from(agents))
        .map(|n| {
            (
                n,
                Progress {
                    state: "queued".into(),
                    round: 1,
                    ..Progress::default()
                },
            )
        })
        .collect();
    let started = std::time::Instant::now();
    let mut drawn = 0usize;
    // A person at the terminal answers the agents' permission requests as they come.
    let asked: Asked = Default::default();
    let interactive = !json && std::io::stdin().is_terminal();
    // Read by the reconnect loop while the callback holds its borrow: cells.
    let last_id = std::cell::Cell::new(0u64);
    let finished = std::cell::Cell::new(false);
    let mut on = |data: &str| {
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(data) else {
            return;
        };
        last_id.set(ev["id"].as_u64().unwrap_or(last_id.get()));
        if json {
            println!("{ev}");
        }
        let kind = ev["type"].as_str().unwrap_or_default();
        if kind == "task.finished" {
            finished.set(true);
        }
        let n = ev["attempt"].as_u64().unwrap_or(0);
        let line = match (kind, progress.get_mut(&n)) {
            ("attempt.state", Some(p)) => {
                p.state = ev["state"].as_str().unwrap_or("?").to_string();
                p.round = ev["round"].as_u64().unwrap_or(p.round);
                Some(format!("attempt {n}: {} (round {})", p.state, p.round))
            }
            ("tool", Some(p)) => {
                p.tools = ev["tool_calls"].as_u64().unwrap_or(p.tools);
                let title = ev["title"].as_str().unwrap_or("");
                if !title.is_empty() {
                    p.last = format!("{}: {title}", ev["tool"].as_str().unwrap_or("tool"));
                }
                None
            }
            ("check", Some(p)) => {
                p.last = if ev["passed"] == true {
                    "check passed".into()
                } else {
                    format!("check failed (exit {})", ev["exit_code"])
                };
                Some(format!("attempt {n}: {}", p.last))
            }
            ("setup", Some(p)) => {
                p.last = match ev["state"].as_str() {
                    Some("running") => "setup running".into(),
                    Some("passed") => format!("setup done in {} ms", ev["duration_ms"]),
                    _ if ev["timed_out"] == true => "setup timed out".into(),
                    _ => format!("setup failed (exit {})", ev["exit_code"]),
                };
                Some(format!("attempt {n}: {}", p.last))
            }
            ("setup.output", Some(p)) => {
                // The last line of what the setup prints, as progress.
                if let Some(l) = ev["text"]
                    .as_str()
                    .and_then(|t| t.lines().rfind(|l| !l.trim().is_empty()))
                {
                    p.last = format!("setup: {}", l.trim());
                }
                None
            }
            // The setup shared by every agent (a task with several): attempt 0.
            ("setup", None) if n == 0 => Some(match ev["state"].as_str() {
                Some("running") => "setup running (once, for every agent)".into(),
                Some("passed") => format!("setup done in {} ms", ev["duration_ms"]),
                _ if ev["timed_out"] == true => "setup timed out".into(),
                _ => format!("setup failed (exit {})", ev["exit_code"]),
            }),
            ("prepare", None) if ev["state"] == "ready" => Some(format!(
                "every agent starts from the prepared workspace ({} files, {} bytes, kept in {} ms)",
                ev["files"], ev["bytes"], ev["layer_ms"]
            )),
            ("error", Some(p)) => {
                p.last = format!("error: {}", ev["message"].as_str().unwrap_or(""));
                Some(format!("attempt {n}: {}", p.last))
            }
            ("approval", _) if ev["state"] == "asked" => {
                let request = ev["request"].as_str().unwrap_or_default().to_string();
                let question = format!(
                    "attempt {n} asks to use {}: {}",
                    ev["permission"].as_str().unwrap_or("a tool"),
                    ev["patterns"]
                        .as_array()
                        .map(|p| p.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" "))
                        .unwrap_or_default(),
                );
                let how = if interactive {
                    asked.lock().expect("asked lock").push_back(request.clone());
                    "allow it? [o]nce, [a]lways, [r]eject (Enter after the letter)".to_string()
                } else {
                    format!("answer: agentd task approve {id} {request} [--always | --reject]")
                };
                if !json {
                    // Below the progress block, which is drawn again under it.
                    let _ = writeln!(std::io::stderr(), "{question}\n    {how}");
                    drawn = 0;
                }
                None
            }
            ("approval", _) if ev["state"] == "replied" => {
                let request = ev["request"].as_str().unwrap_or_default();
                asked
                    .lock()
                    .expect("asked lock")
                    .retain(|r| r != request);
                Some(format!("attempt {n}: request {request} answered {}", ev["reply"].as_str().unwrap_or("")))
            }
            _ => None,
        };
        if json {
            return;
        }
        let mut err = std::io::stderr().lock();
        if tty {
            // Redraw the block of attempt lines in place.
            if drawn > 0 {
                let _ = write!(err, "\x1b[{drawn}A");
            }
            let secs = started.elapsed().as_secs();
            for (n, p) in &progress {
                let mut last = p.last.replace('\n', " ");
                last.truncate(60);
                let _ = writeln!(
                    err,
                    "\x1b[2K  attempt {n:<2} {:<10} round {:<2} tools {:<3} {secs:>4}s  {last}",
                    p.state, p.round, p.tools
                );
            }
            drawn = progress.len();
        } else if let Some(l) = line {
            let _ = writeln!(err, "{l}");
        }
    };
    let answering = async {
        if interactive {
            answer_from_terminal(sock, id, &asked).await;
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        r = stream_events(sock, id, &last_id, &finished, &mut on, OnCtrlC::CancelTask) => r,
        () = answering => Ok(()),
    }
}

/// Permission requests asked while attached, oldest first.
type Asked = std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>;

/// Answers the oldest request in `asked` with each line typed at the terminal (`o`, `a`,
/// `r`).
async fn answer_from_terminal(sock: &PathBuf, id: &str, asked: &Asked) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(8);
    // A thread of its own: a read of the terminal cannot be cancelled, and a detached thread
    // does not keep the process from ending.
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        let reply = match line.trim().to_ascii_lowercase().as_str() {
            "o" | "once" | "y" | "yes" => "once",
            "a" | "always" => "always",
            "r" | "reject" | "n" | "no" => "reject",
            "" => continue,
            _ => {
                eprintln!("answer o (once), a (always) or r (reject)");
                continue;
            }
        };
        let Some(request) = asked.lock().expect("asked lock").front().cloned() else {
            eprintln!("nothing waits for an answer");
            continue;
        };
        let path = format!(
            "/v1/tasks/{id}/approvals/{}",
            url::form_urlencoded::byte_serialize(request.as_bytes()).collect::<String>()
        );
        let body = serde_json::json!({ "reply": reply }).to_string();
        let answered = call(
            sock,
            Method::POST,
            &path,
            Some((body.into_bytes(), "application/json")),
            None,
        )
        .await
        .map_err(|e| format!("{e:#}"))
        .and_then(|r| check(&r).map(drop).map_err(|e| format!("{e:#}")));
        match answered {
            Ok(()) => {
                asked.lock().expect("asked lock").retain(|r| *r != request);
                eprintln!("answered {request}: {reply}");
            }
            Err(e) => eprintln!("could not answer {request}: {e}"),
        }
    }
}

/// What ^C does while a task's events are followed.
enum OnCtrlC {
    /// Cancel the task (and follow it to its end).
    CancelTask,
    /// Stop following; the task goes on.
    StopWatching,
}

/// Hands task `id`'s events after `last_id` to `on` until `finished` is set (by `on`, at
/// `task.finished`), resuming after the last event when the connection drops or the daemon
/// restarts.
async fn stream_events(
    sock: &PathBuf,
    id: &str,
    last_id: &std::cell::Cell<u64>,
    finished: &std::cell::Cell<bool>,
    on: &mut dyn FnMut(&str),
    ctrl_c: OnCtrlC,
) -> anyhow::Result<()> {
    loop {
        let path = format!("/v1/tasks/{id}/events?after={}", last_id.get());
        let streamed = tokio::select! {
            r = read_events(sock, &path, on) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        };
        match (streamed, &ctrl_c) {
            (None, OnCtrlC::StopWatching) => return Ok(()),
            (None, OnCtrlC::CancelTask) => {
                eprintln!("cancelling task {id} ...");
                // Already finished (409) is fine: the stream ends by itself.
                cancel(sock, id).await.ok();
            }
            (Some(Ok(reply)), _) if !reply.status.is_success() => {
                check(&reply)?;
            }
            (Some(Ok(_)), _) => {}
            (Some(Err(e)), _) => {
                eprintln!("lost the event stream ({e:#}); reconnecting");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        if finished.get() {
            return Ok(());
        }
    }
}

/// Prints task `id`'s events as a transcript until it ends.
async fn watch(sock: &PathBuf, id: &str, only: Option<u64>) -> anyhow::Result<()> {
    let last_id = std::cell::Cell::new(0u64);
    let finished = std::cell::Cell::new(false);
    // The attempt whose text is being written (a header line when it changes).
    let mut writing: Option<u64> = None;
    let mut on = |data: &str| {
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(data) else {
            return;
        };
        last_id.set(ev["id"].as_u64().unwrap_or(last_id.get()));
        let kind = ev["type"].as_str().unwrap_or_default();
        if kind == "task.finished" {
            finished.set(true);
        }
        let n = ev["attempt"].as_u64();
        if only.is_some() && n.is_some() && n != only {
            return;
        }
        let n = n.unwrap_or(0);
        let s = |k: &str| ev[k].as_str().unwrap_or_default().to_string();
        let mut out = std::io::stdout().lock();
        if kind == "text" {
            if writing != Some(n) {
                let _ = writeln!(out, "\n[attempt {n}]");
                writing = Some(n);
            }
            let _ = write!(out, "{}", s("text"));
            let _ = out.flush();
            return;
        }
        let line = match kind {
            "task.state" => format!("task: {}", s("state")),
            "attempt.state" => format!("attempt {n}: {} (round {})", s("state"), ev["round"]),
            "tool" if ev.get("output").is_some() => {
                let output = s("output");
                let shown: Vec<&str> = output.lines().rev().take(12).collect();
                let mut l = format!(
                    "attempt {n}: {} {} [{}]",
                    ev["tool"].as_str().unwrap_or("tool"),
                    s("title"),
                    s("status")
                );
                for o in shown.iter().rev() {
                    l.push_str(&format!("\n    | {o}"));
                }
                l
            }
            "approval" if ev["state"] == "asked" => format!(
                "attempt {n} asks to use {}: {}\n    answer: agentd task approve {id} {} [--always | --reject]",
                s("permission"),
                ev["patterns"]
                    .as_array()
                    .map(|p| p.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" "))
                    .unwrap_or_default(),
                s("request")
            ),
            "approval" if ev["state"] == "replied" => {
                format!("attempt {n}: request {} answered {}", s("request"), s("reply"))
            }
            "check" => {
                if ev["passed"] == true {
                    format!("attempt {n}: check passed")
                } else {
                    format!("attempt {n}: check failed (exit {})", ev["exit_code"])
                }
            }
            "setup" => format!("attempt {n}: setup {}", s("state")),
            "error" => format!("attempt {n}: error: {}", s("message")),
            "diff" => format!("attempt {n}: diff of {} files", ev["files"]),
            "follow_up" => format!("attempt {n}: a follow-up ({})", s("state")),
            "task.finished" => format!("task finished: {}", s("state")),
            _ => return,
        };
        if writing.is_some() {
            let _ = writeln!(out);
            writing = None;
        }
        let _ = writeln!(out, "{line}");
    };
    stream_events(
        sock,
        id,
        &last_id,
        &finished,
        &mut on,
        OnCtrlC::StopWatching,
    )
    .await
}

/// Reads the server-sent events of `path`, handing each event's data to `on`; an error answer
/// comes back as the reply.
async fn read_events(
    sock: &PathBuf,
    path: &str,
    on: &mut dyn FnMut(&str),
) -> anyhow::Result<crate::cli::sandbox::Reply> {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    let resp = send(sock, Method::GET, path, None).await?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.into_body().collect().await?.to_bytes();
        return Ok(crate::cli::sandbox::Reply { status, body });
    }
    let mut events = crate::http::sse_events(
        resp.into_body().into_data_stream(),
        crate::http::MAX_SSE_EVENT,
    );
    while let Some(event) = events.next().await {
        on(&event
            .map_err(|e| anyhow::anyhow!("the event stream broke: {e}"))?
            .data);
    }
    Ok(crate::cli::sandbox::Reply {
        status,
        body: Default::default(),
    })
}

fn print_result(id: &str, result: &TaskResult) {
    eprintln!("task {id}: {}", result.state.as_str());
    for a in &result.attempts {
        let line = Line {
            n: a.attempt,
            state: a.state,
            round: a.rounds,
            tool_calls: a.tool_calls,
            usage: &a.usage,
            diff: a.diff.as_ref(),
            check: a.check.as_ref(),
        };
        eprintln!("  #{} {}", a.rank, attempt_line(&line));
        if let Some(e) = &a.error {
            eprintln!("     {e}");
        }
        if let Some(note) = &a.note {
            eprintln!("     note: {note}");
        }
    }
    match result.attempts.iter().find(|a| a.has_patch) {
        Some(best) => {
            if let Some(m) = &best.final_message {
                eprintln!("\nattempt {} says: {}", best.attempt, m.trim());
            }
            eprintln!(
                "\nthe diff of attempt {} follows; the others: agentd task diff {id} N\n",
                best.attempt
            );
            match &best.patch {
                Some(p) => print!("{p}"),
                None => eprintln!(
                    "(not text: agentd task diff {id} {} > attempt.patch)",
                    best.attempt
                ),
            }
        }
        None => eprintln!("no attempt changed anything"),
    }
}
