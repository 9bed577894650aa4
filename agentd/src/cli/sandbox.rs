//! `agentd sandbox ...`: the command-line client of a running daemon, over its Unix socket
//! (`--socket` or `AGENTD_SOCKET`). Tables for people, `--json` for scripts.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::api::types::{ExecLine, ExecRequest, SandboxList, SandboxView, Stats};
use crate::sandbox::SandboxState;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// `agentd sandbox` arguments.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// The daemon's API socket.
    #[arg(long, env = "AGENTD_SOCKET", default_value = crate::daemon::config::DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: SandboxCommand,
}

#[derive(Debug, Subcommand)]
enum SandboxCommand {
    /// Create a sandbox.
    Create {
        /// Image [default: opencode].
        #[arg(long)]
        image: Option<String>,
        /// Unique name.
        #[arg(long)]
        name: Option<String>,
        /// Memory limit, e.g. 2g.
        #[arg(long)]
        memory: Option<String>,
        /// CPU limit in cores.
        #[arg(long)]
        cpus: Option<f64>,
        /// Most tasks.
        #[arg(long)]
        pids: Option<u64>,
        /// Size of the writable layer, e.g. 20g [default: the daemon's sandbox_disk].
        #[arg(long)]
        disk: Option<String>,
        /// Environment variable KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Label KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Idle timeout in seconds (0: never).
        #[arg(long)]
        idle_timeout: Option<u64>,
        /// Lifetime in seconds.
        #[arg(long)]
        ttl: Option<u64>,
        /// Do not start OpenCode even if the image has it.
        #[arg(long)]
        no_opencode: bool,
        /// Command run once in the image's working directory before the sandbox is ready; a
        /// failure stops the sandbox.
        #[arg(long)]
        setup: Option<String>,
        /// Let the sandbox reach this host (`example.org`, `*.example.org`, `host:port`) or
        /// preset through agentd's egress proxy (repeatable; implies network mode allowlist).
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// Network mode: none (only the LLM gateway), allowlist (the --allow hosts, through
        /// agentd's proxy) or open (any public address through agentd's NAT; DNS works)
        /// [default: none, or allowlist with --allow].
        #[arg(long, value_parser = ["none", "allowlist", "open"])]
        network: Option<String>,
        /// Wait until the sandbox is ready (OpenCode answers).
        #[arg(long)]
        wait: bool,
        /// Command of a plain sandbox (default: it idles until stopped).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List sandboxes.
    Ls,
    /// Show one sandbox.
    Inspect {
        /// Id or name.
        id: String,
    },
    /// Run a command in a sandbox; exits with its status.
    Exec {
        /// Id or name.
        id: String,
        /// Keep stdin open: what this command reads goes to the process (over a WebSocket).
        #[arg(short = 'i', long)]
        interactive: bool,
        /// On a terminal (the local one in raw mode; its size follows the window).
        #[arg(short = 't', long)]
        tty: bool,
        /// Working directory.
        #[arg(long)]
        cwd: Option<String>,
        /// Kill it after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Environment variable KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// A login shell (or COMMAND) on a terminal in the sandbox; its exit status is this
    /// command's.
    Shell {
        /// Id or name.
        id: String,
        /// Working directory.
        #[arg(long)]
        cwd: Option<String>,
        /// Environment variable KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Uid inside [default: the sandbox's user].
        #[arg(long)]
        uid: Option<u32>,
        /// The command [default: bash -l if the image has bash, else sh -l].
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// OpenCode's terminal UI on the sandbox's OpenCode, through agentd's TCP listener: runs
    /// `opencode attach` (from PATH) with the sandbox's attach password, or prints how to.
    Attach {
        /// Id or name.
        id: String,
        /// Print the command instead of running it.
        #[arg(long)]
        print: bool,
    },
    /// Print a sandbox's output.
    Logs {
        /// Id or name.
        id: String,
        /// Keep following until the sandbox ends.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Resource usage.
    Stats {
        /// Id or name.
        id: String,
    },
    /// Copy a file: `ID:/path LOCAL` downloads, `LOCAL ID:/path` uploads.
    Cp {
        /// Source.
        src: String,
        /// Destination.
        dst: String,
    },
    /// Store a sandbox's files as an image (it is frozen while they are copied).
    Snapshot {
        /// Id or name.
        id: String,
        /// The image's name (`name[:tag]`; stored as `localhost/name[:tag]`).
        image: String,
    },
    /// New sandboxes from a sandbox's current files (same image, limits, network, labels).
    Fork {
        /// Id or name.
        id: String,
        /// How many (at most 16).
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Pause a sandbox: its processes frozen, no CPU, until resume or the next use of it.
    Pause {
        /// Id or name.
        id: String,
    },
    /// Hibernate an OpenCode sandbox: OpenCode stopped (its memory freed, its sessions kept),
    /// the rest paused; the next request to OpenCode starts it again (seconds), while an
    /// exec, files or SSH only resume the sandbox.
    Hibernate {
        /// Id or name.
        id: String,
    },
    /// Resume a paused or hibernated sandbox.
    Resume {
        /// Id or name.
        id: String,
    },
    /// Stop a sandbox (its record stays until rm).
    Stop {
        /// Id or name.
        id: String,
    },
    /// Stop and remove sandboxes.
    Rm {
        /// Ids or names.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// A callback that sees a streamed body chunk by chunk.
pub(crate) type ChunkFn<'a> = &'a mut dyn FnMut(&[u8]);

/// A response: status and body.
pub(crate) struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// The body (empty when streamed to a callback).
    pub body: Bytes,
}

/// What to tell a user whose connection to the socket failed: a permission problem is not a
/// daemon that is down.
pub(crate) fn connect_error(socket: &std::path::Path, e: &std::io::Error) -> String {
    let denied = e.kind() == std::io::ErrorKind::PermissionDenied
        || (!nix::unistd::geteuid().is_root()
            && socket
                .parent()
                .is_some_and(|d| std::fs::read_dir(d).is_err() && d.exists()));
    if denied {
        format!(
            "cannot connect to agentd at {}: the socket is root-only, run this with sudo",
            socket.display()
        )
    } else {
        format!(
            "cannot reach agentd at {} ({e}): is `agentd serve` running? (set --socket or AGENTD_SOCKET)",
            socket.display()
        )
    }
}

/// Sends one request over the socket; `on_chunk` sees a streamed body as it arrives.
pub(crate) async fn call(
    socket: &PathBuf,
    method: Method,
    path: &str,
    body: Option<(Vec<u8>, &str)>,
    mut on_chunk: Option<ChunkFn<'_>>,
) -> anyhow::Result<Reply> {
    let resp = send(socket, method, path, body).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut all = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            match on_chunk.as_mut() {
                Some(f) if status.is_success() => f(&data),
                _ => all.extend_from_slice(&data),
            }
        }
    }
    Ok(Reply {
        status,
        body: Bytes::from(all),
    })
}

/// Sends one request over the socket; the response's body is the caller's to read.
pub(crate) async fn send(
    socket: &PathBuf,
    method: Method,
    path: &str,
    body: Option<(Vec<u8>, &str)>,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| anyhow::anyhow!(connect_error(socket, &e)))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "agentd");
    let payload = match body {
        Some((b, ct)) => {
            req = req.header("content-type", ct);
            b
        }
        None => Vec::new(),
    };
    Ok(sender
        .send_request(req.body(Full::new(Bytes::from(payload)))?)
        .await?)
}

pub(crate) fn check(reply: &Reply) -> anyhow::Result<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_slice(&reply.body).unwrap_or(serde_json::Value::Null);
    if !reply.status.is_success() {
        let msg = v["error"]["message"].as_str().unwrap_or("request failed");
        bail!("{msg} (HTTP {})", reply.status.as_u16());
    }
    Ok(v)
}

/// A request body without the fields left unset (the API's defaults apply to them).
pub(crate) fn without_nulls(mut v: serde_json::Value) -> serde_json::Value {
    if let serde_json::Value::Object(m) = &mut v {
        m.retain(|_, v| !v.is_null());
        for v in m.values_mut() {
            *v = without_nulls(v.take());
        }
    }
    v
}

fn kv_map(
    items: &[String],
    what: &str,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut m = serde_json::Map::new();
    for it in items {
        let (k, v) = it
            .split_once('=')
            .with_context(|| format!("{what} {it:?} is not KEY=VALUE"))?;
        m.insert(k.to_string(), serde_json::Value::String(v.to_string()));
    }
    Ok(m)
}

/// A checked reply as the wire type `T`.
pub(crate) fn check_as<T: serde::de::DeserializeOwned>(reply: &Reply) -> anyhow::Result<T> {
    serde_json::from_value(check(reply)?)
        .context("agentd's answer is not what this CLI expects (a different agentd version?)")
}

fn print_table(items: &[SandboxView]) {
    println!(
        "{:<14} {:<16} {:<10} {:<16} {:<12} NAME",
        "ID", "IMAGE", "STATE", "ADDRESS", "TOKENS"
    );
    for s in items {
        // A live sandbox's state says also whether it is paused or its OpenCode sleeps.
        let state = match (s.hibernated, s.paused) {
            (true, _) => "hibernated",
            (false, true) => "paused",
            (false, false) => s.state.as_str(),
        };
        println!(
            "{:<14} {:<16} {:<10} {:<16} {:<12} {}",
            s.id,
            s.image,
            state,
            s.address,
            s.usage.prompt_tokens + s.usage.completion_tokens,
            s.name.as_deref().unwrap_or("-"),
        );
    }
}

/// Runs an `agentd sandbox` subcommand.
pub fn run(args: SandboxArgs) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: SandboxArgs) -> anyhow::Result<u8> {
    let sock = &args.socket;
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_./~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    match args.command {
        SandboxCommand::Create {
            image,
            name,
            memory,
            cpus,
            pids,
            disk,
            env,
            labels,
            idle_timeout,
            ttl,
            no_opencode,
            setup,
            allow,
            network,
            wait,
            command,
        } => {
            use crate::sandbox::{CreateSandbox, LimitsRequest, SizeValue};
            let to_map = |items: &[String], what: &str| -> anyhow::Result<_> {
                Ok(kv_map(items, what)?
                    .into_iter()
                    .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
                    .collect())
            };
            let body = without_nulls(serde_json::to_value(CreateSandbox {
                image,
                name,
                env: to_map(&env, "--env")?,
                labels: to_map(&labels, "--label")?,
                limits: LimitsRequest {
                    memory: memory.map(SizeValue::Text),
                    cpus,
                    pids,
                    disk: disk.map(SizeValue::Text),
                },
                idle_timeout_secs: idle_timeout,
                ttl_secs: ttl,
                opencode: no_opencode.then_some(false),
                command: (!command.is_empty()).then_some(command),
                network: network_policy(network.as_deref(), allow)?
                    .map(crate::sandbox::NetworkRequest::Policy),
                setup,
                ..CreateSandbox::default()
            })?);
            let reply = call(
                sock,
                Method::POST,
                "/v1/sandboxes",
                Some((body.to_string().into_bytes(), "application/json")),
                None,
            )
            .await?;
            let mut v: SandboxView = check_as(&reply)?;
            let id = v.id.clone();
            if wait {
                let start = std::time::Instant::now();
                // OpenCode's start, and the setup's own time limit if it has one.
                let patience = 180 + v.setup.as_ref().map_or(0, |s| s.timeout_secs);
                while matches!(v.state, SandboxState::Starting | SandboxState::Creating) {
                    if start.elapsed() > std::time::Duration::from_secs(patience) {
                        bail!("sandbox {id} is not ready after {patience} s");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    v = check_as(
                        &call(
                            sock,
                            Method::GET,
                            &format!("/v1/sandboxes/{id}"),
                            None,
                            None,
                        )
                        .await?,
                    )?;
                }
                if v.state != SandboxState::Ready {
                    bail!(
                        "sandbox {id} is {}: {}",
                        v.state.as_str(),
                        v.exit.as_ref().map_or("", |e| e.reason.as_str())
                    );
                }
            }
            if args.json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{id}");
            }
            Ok(0)
        }
        SandboxCommand::Ls => {
            let v: SandboxList =
                check_as(&call(sock, Method::GET, "/v1/sandboxes", None, None).await?)?;
            if args.json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                print_table(&v.sandboxes);
            }
            Ok(0)
        }
        SandboxCommand::Inspect { id } => {
            let v = check(
                &call(
                    sock,
                    Method::GET,
                    &format!("/v1/sandboxes/{}", enc(&id)),
                    None,
                    None,
                )
                .await?,
            )?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(0)
        }
        SandboxCommand::Stats { id } => {
            let v: Stats = check_as(
                &call(
                    sock,
                    Method::GET,
                    &format!("/v1/sandboxes/{}/stats", enc(&id)),
                    None,
                    None,
                )
                .await?,
            )?;
            if args.json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "memory {} MiB  cpu {:.2} s  tasks {}",
                    v.memory_bytes >> 20,
                    v.cpu_usec as f64 / 1e6,
                    v.pids
                );
            }
            Ok(0)
        }
        SandboxCommand::Snapshot { id, image } => {
            let path = format!("/v1/sandboxes/{}/snapshot", enc(&id));
            let v = post_json(sock, &path, serde_json::json!({ "name": image })).await?;
            if args.json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "{}  {}  ({} layers added; {} files, {} bytes; frozen {:.0} ms, {:.0} ms in all)",
                    v["image"]["name"].as_str().unwrap_or_default(),
                    v["image"]["manifest"].as_str().unwrap_or_default(),
                    v["layers_added"],
                    v["files"],
                    v["bytes"],
                    v["frozen_ms"].as_f64().unwrap_or(0.0),
                    v["total_ms"].as_f64().unwrap_or(0.0)
                );
            }
            Ok(0)
        }
        SandboxCommand::Fork { id, count } => {
            let path = format!("/v1/sandboxes/{}/fork", enc(&id));
            let v = post_json(sock, &path, serde_json::json!({ "count": count })).await?;
            if args.json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                for s in v["sandboxes"].as_array().into_iter().flatten() {
                    println!("{}", s["id"].as_str().unwrap_or_default());
                }
                eprintln!(
                    "{} files, {} bytes copied; {id} frozen {:.0} ms",
                    v["files"],
                    v["bytes"],
                    v["copy_ms"].as_f64().unwrap_or(0.0)
                );
            }
            Ok(0)
        }
        SandboxCommand::Pause { id } => pause_or_resume(sock, &enc(&id), "pause").await,
        SandboxCommand::Resume { id } => pause_or_resume(sock, &enc(&id), "resume").await,
        SandboxCommand::Hibernate { id } => hibernate(sock, &enc(&id)).await,
        SandboxCommand::Stop { id } => {
            check(
                &call(
                    sock,
                    Method::POST,
                    &format!("/v1/sandboxes/{}/stop", enc(&id)),
                    None,
                    None,
                )
                .await?,
            )?;
            Ok(0)
        }
        SandboxCommand::Rm { ids } => {
            for id in ids {
                let reply = call(
                    sock,
                    Method::DELETE,
                    &format!("/v1/sandboxes/{}", enc(&id)),
                    None,
                    None,
                )
                .await?;
                if !reply.status.is_success() {
                    check(&reply)?;
                }
                println!("{id}");
            }
            Ok(0)
        }
        SandboxCommand::Attach { id, print } => {
            let reply = call(
                sock,
                Method::GET,
                &format!("/v1/sandboxes/{}/attach", enc(&id)),
                None,
                None,
            )
            .await?;
            let v = check(&reply)?;
            let Some(url) = v["url"].as_str() else {
                bail!("agentd does not listen on TCP: start it with --listen ADDR to attach");
            };
            let password = v["password"].as_str().unwrap_or_default();
            let have = std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("opencode").is_file()));
            if print || !have {
                if !have && !print {
                    eprintln!("agentd: opencode is not on PATH; run this where it is:");
                }
                println!("OPENCODE_SERVER_PASSWORD={password} opencode attach {url}");
                return Ok(0);
            }
            // The password goes in the environment, not on a command line others can read.
            use std::os::unix::process::CommandExt;
            let e = std::process::Command::new("opencode")
                .args(["attach", url])
                .env("OPENCODE_SERVER_PASSWORD", password)
                .exec();
            bail!("cannot run opencode: {e}")
        }
        SandboxCommand::Shell {
            id,
            cwd,
            env,
            uid,
            command,
        } => {
            let request = without_nulls(serde_json::json!({
                "command": command,
                "env": kv_map(&env, "--env")?,
                "cwd": cwd,
                "uid": uid,
            }));
            crate::cli::terminal::run(sock, &enc(&id), request, true).await
        }
        SandboxCommand::Exec {
            id,
            interactive,
            tty,
            cwd,
            timeout,
            env,
            command,
        } => {
            if interactive || tty {
                let request = without_nulls(serde_json::json!({
                    "command": command,
                    "env": kv_map(&env, "--env")?,
                    "cwd": cwd,
                    "timeout_secs": timeout,
                }));
                return crate::cli::terminal::run(sock, &enc(&id), request, tty).await;
            }
            let env = kv_map(&env, "--env")?
                .into_iter()
                .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
                .collect();
            let body = without_nulls(serde_json::to_value(ExecRequest {
                command,
                env,
                cwd,
                timeout_secs: timeout,
                uid: None,
                stdin: false,
            })?);
            let mut code = 0u8;
            let mut pending = Vec::new();
            let json_out = args.json;
            let mut on = |chunk: &[u8]| {
                pending.extend_from_slice(chunk);
                while let Some(p) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=p).collect();
                    if json_out {
                        let _ = std::io::stdout().write_all(&line);
                        continue;
                    }
                    let Ok(v) = serde_json::from_slice::<ExecLine>(&line) else {
                        continue;
                    };
                    let data = v.data.as_deref().unwrap_or("").as_bytes();
                    match v.stream.as_deref() {
                        Some("stdout") => {
                            let _ = std::io::stdout().write_all(data);
                        }
                        Some("stderr") => {
                            let _ = std::io::stderr().write_all(data);
                        }
                        _ => {
                            if let Some(c) = v.exit_code {
                                code = u8::try_from(c.clamp(0, 255)).unwrap_or(255);
                            } else if let Some(e) = &v.error {
                                eprintln!("agentd: {e}");
                                code = crate::cli::run::EXIT_AGENTD_ERROR;
                            }
                            if v.timed_out == Some(true) {
                                eprintln!("agentd: the command timed out and was killed");
                            }
                        }
                    }
                }
            };
            let reply = call(
                sock,
                Method::POST,
                &format!("/v1/sandboxes/{}/exec", enc(&id)),
                Some((body.to_string().into_bytes(), "application/json")),
                Some(&mut on),
            )
            .await?;
            check(&reply)?;
            let _ = std::io::stdout().flush();
            Ok(code)
        }
        SandboxCommand::Logs { id, follow } => {
            let mut pending = Vec::new();
            let mut on = |chunk: &[u8]| {
                pending.extend_from_slice(chunk);
                while let Some(p) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=p).collect();
                    let Ok(v) = serde_json::from_slice::<ExecLine>(&line) else {
                        continue;
                    };
                    let data = v.data.as_deref().unwrap_or("").as_bytes();
                    let _ = if v.stream.as_deref() == Some("stderr") {
                        std::io::stderr().write_all(data)
                    } else {
                        std::io::stdout().write_all(data)
                    };
                }
            };
            let path = format!("/v1/sandboxes/{}/logs?follow={follow}", enc(&id));
            let reply = call(sock, Method::GET, &path, None, Some(&mut on)).await?;
            check(&reply)?;
            Ok(0)
        }
        SandboxCommand::Cp { src, dst } => {
            if let Some((id, path)) = src.split_once(':').filter(|(i, _)| !i.contains('/')) {
                let url = format!("/v1/sandboxes/{}/files?path={}", enc(id), enc(path));
                let reply = call(sock, Method::GET, &url, None, None).await?;
                if !reply.status.is_success() {
                    check(&reply)?;
                }
                std::fs::write(&dst, &reply.body)
                    .with_context(|| format!("failed to write {dst}"))?;
                Ok(0)
            } else if let Some((id, path)) = dst.split_once(':').filter(|(i, _)| !i.contains('/')) {
                let data = std::fs::read(&src).with_context(|| format!("failed to read {src}"))?;
                let url = format!("/v1/sandboxes/{}/files?path={}", enc(id), enc(path));
                check(
                    &call(
                        sock,
                        Method::PUT,
                        &url,
                        Some((data, "application/octet-stream")),
                        None,
                    )
                    .await?,
                )?;
                Ok(0)
            } else {
                bail!("one of SRC and DST must be ID:/path")
            }
        }
    }
}

/// The policy `--network` and `--allow` ask for (`None`: agentd's default, mode none);
/// `--allow` alone implies allowlist.
pub fn network_policy(
    mode: Option<&str>,
    allow: Vec<String>,
) -> anyhow::Result<Option<crate::egress::NetworkPolicy>> {
    use crate::egress::EgressMode;
    let mode = match mode {
        None if allow.is_empty() => return Ok(None),
        None | Some("allowlist") => EgressMode::Allowlist,
        Some("open") => EgressMode::Open,
        Some("none") => EgressMode::None,
        Some(other) => bail!("--network must be none, allowlist or open, not {other:?}"),
    };
    if mode != EgressMode::Allowlist && !allow.is_empty() {
        bail!(
            "--allow needs network mode allowlist, not {} (drop --network or --allow)",
            mode.as_str()
        );
    }
    Ok(Some(crate::egress::NetworkPolicy { mode, allow }))
}

/// POSTs `body` to `path`; the answer, or the API's error.
async fn post_json(
    sock: &PathBuf,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let body = serde_json::to_vec(&body)?;
    check(
        &call(
            sock,
            Method::POST,
            path,
            Some((body, "application/json")),
            None,
        )
        .await?,
    )
}

/// `agentd sandbox hibernate ID` (`id` already escaped for a path).
async fn hibernate(sock: &PathBuf, id: &str) -> anyhow::Result<u8> {
    let v = check(
        &call(
            sock,
            Method::POST,
            &format!("/v1/sandboxes/{id}/hibernate"),
            None,
            None,
        )
        .await?,
    )?;
    println!(
        "{id}: hibernated (OpenCode stopped in {:.0} ms, the freezer took {:.1} ms)",
        v["stop_ms"].as_f64().unwrap_or(0.0),
        v["freezer_ms"].as_f64().unwrap_or(0.0)
    );
    Ok(0)
}

/// `agentd sandbox pause|resume ID` (`id` already escaped for a path).
async fn pause_or_resume(sock: &PathBuf, id: &str, what: &str) -> anyhow::Result<u8> {
    let v = check(
        &call(
            sock,
            Method::POST,
            &format!("/v1/sandboxes/{id}/{what}"),
            None,
            None,
        )
        .await?,
    )?;
    println!(
        "{id}: {} (the freezer took {:.1} ms{})",
        if v["sandbox"]["paused"] == true {
            "paused"
        } else {
            "running"
        },
        v["freezer_ms"].as_f64().unwrap_or(0.0),
        match v["opencode_ms"].as_f64() {
            Some(ms) => format!(", OpenCode woke in {ms:.0} ms"),
            None => String::new(),
        }
    );
    Ok(0)
}
