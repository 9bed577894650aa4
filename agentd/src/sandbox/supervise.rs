//! A running sandbox's life after its create: its supervision (its exit, OpenCode's
//! readiness), stop, finish (logs kept, the shim's delete or a cleanup after a dead shim, the
//! veth), delete, and the reaper of idle and expired sandboxes.

use super::*;

impl Manager {
    /// Starts watching a running sandbox: its exit, and for OpenCode its readiness.
    pub(super) async fn supervise(self: Arc<Self>, sb: Arc<Sandbox>) {
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
            tokio::spawn(self.start_up(sb));
        }
    }

    /// A starting sandbox becomes ready: OpenCode answers (if it runs one), then its setup
    /// (if any, and not run to its end yet) passes.
    async fn start_up(self: Arc<Self>, sb: Arc<Sandbox>) {
        if sb.snapshot().opencode.is_some() && !self.clone().wait_opencode(sb.clone()).await {
            return;
        }
        let rec = sb.snapshot();
        if let Some(setup) = rec.setup.filter(|s| s.result.is_none()) {
            let t = Instant::now();
            let limit = Duration::from_secs(setup.timeout_secs);
            let out = self
                .exec_collect(
                    &sb,
                    vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        format!("{{\n{}\n}} 2>&1", setup.command),
                    ],
                    None,
                    limit,
                    SETUP_OUTPUT_TAIL,
                )
                .await;
            let out = match out {
                Ok(o) => o,
                Err(e) => {
                    // Stopped or gone meanwhile: nothing more to do.
                    tracing::debug!(sandbox = %rec.id, error = %e, "setup did not run");
                    return;
                }
            };
            let result = setup_result(&out, limit, t.elapsed());
            let passed = result.passed;
            let why = (!passed).then(|| setup_failure(&result, limit));
            self.set_state(&sb, SandboxState::Starting, |r| {
                if let Some(s) = &mut r.setup {
                    s.result = Some(result);
                }
            });
            if let Some(why) = why {
                tracing::info!(sandbox = %rec.id, "setup failed: stopping the sandbox");
                self.stop(&sb, &why).await;
                return;
            }
        }
        if sb.snapshot().state == SandboxState::Starting {
            self.set_state(&sb, SandboxState::Ready, |r| r.ready_at = Some(now_ms()));
        }
    }

    /// Waits for OpenCode's health check; whether it answered (else the sandbox is stopped).
    async fn wait_opencode(self: Arc<Self>, sb: Arc<Sandbox>) -> bool {
        let rec = sb.snapshot();
        if self
            .opencode_answers(&sb, crate::opencode::READY_TIMEOUT)
            .await
        {
            let started = rec.created_at;
            self.metrics
                .observe_ready(Duration::from_millis(now_ms().saturating_sub(started)));
            tracing::info!(sandbox = %rec.id, "opencode ready");
            return true;
        }
        if !sb.snapshot().state.is_live() {
            return false;
        }
        tracing::warn!(sandbox = %rec.id, "opencode did not become ready in time");
        self.stop(&sb, "opencode did not answer its health check in time")
            .await;
        false
    }

    /// Whether the sandbox's OpenCode answers its health check within `limit` (asked every
    /// 50 ms); `false` at once when the sandbox ends. `true` for a sandbox without OpenCode.
    pub(super) async fn opencode_answers(&self, sb: &Sandbox, limit: Duration) -> bool {
        let rec = sb.snapshot();
        let Some(secrets) = rec.opencode.clone() else {
            return true;
        };
        let uri: hyper::Uri = match format!(
            "http://{}:{}/global/health",
            rec.address,
            crate::opencode::PORT
        )
        .parse()
        {
            Ok(u) => u,
            Err(_) => return false,
        };
        let auth = crate::opencode::basic_auth(&secrets.password);
        let deadline = Instant::now() + limit;
        let mut state_rx = sb.state_tx.subscribe();
        while Instant::now() < deadline {
            if !sb.snapshot().state.is_live() {
                return false;
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
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = state_rx.changed() => {}
            }
        }
        false
    }

    /// Stops a live sandbox: SIGTERM, then everything is killed after [`STOP_GRACE`].
    pub async fn stop(&self, sb: &Arc<Sandbox>, reason: &str) {
        let rec = sb.snapshot();
        if !rec.state.is_live() {
            return;
        }
        tracing::info!(sandbox = %rec.id, reason, "stopping sandbox");
        // A frozen process takes no signal: thawed first (a hibernated OpenCode stays asleep).
        if let Err(e) = self.thaw(sb, false).await {
            tracing::warn!(sandbox = %rec.id, error = %e, "could not thaw a paused sandbox before stopping it");
        }
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
        if !sb.snapshot().base_layers.is_empty() {
            // The last fork on a fork layer gone: the layer goes too.
            self.sweep_forks().await;
        }
        Ok(())
    }

    /// Stops sandboxes idle or past their TTL; runs until the process ends.
    pub async fn reaper(self: Arc<Self>) {
        let mut rounds = 0u64;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            rounds += 1;
            if rounds % 60 == 1 {
                // Fork layers nobody stacks on any more (a crash may have left some).
                self.sweep_forks().await;
            }
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
                let idle_for = |times: u64| {
                    rec.idle_timeout_secs > 0
                        && sb.active.load(Ordering::Relaxed) == 0
                        && rec
                            .idle_timeout_secs
                            .checked_mul(1000 * times)
                            .is_some_and(|ms| idle_ms > ms)
                };
                let pausing = rec.idle_action != crate::sandbox::IdleAction::Stop;
                let reason = if rec.ttl_secs.is_some_and(|t| {
                    t.checked_mul(1000)
                        .is_some_and(|ms| now.saturating_sub(rec.created_at) > ms)
                }) {
                    Some("ttl expired")
                } else if pausing
                    && rec.paused_at.is_none()
                    && rec.state == SandboxState::Ready
                    && idle_for(1)
                {
                    // Idle: paused (or hibernated) first, stopped once idle twice as long.
                    let me = self.clone();
                    let hibernate = rec.idle_action == crate::sandbox::IdleAction::Hibernate;
                    tokio::spawn(async move {
                        let done = if hibernate {
                            me.hibernate_or_pause(&sb).await.map(drop)
                        } else {
                            me.pause(&sb).await.map(drop)
                        };
                        if let Err(e) = done {
                            tracing::warn!(error = %e, "idle pause failed");
                        }
                    });
                    continue;
                } else if idle_for(if pausing { 2 } else { 1 }) {
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
}

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

/// Bytes of a sandbox setup's output kept (its end).
const SETUP_OUTPUT_TAIL: usize = 8 * 1024;

/// A setup's result from its run (`limit`: its time limit; `took`: how long it ran).
fn setup_result(out: &ExecOutput, limit: Duration, took: Duration) -> SetupResult {
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.timed_out {
        output.push_str(&format!(
            "\nagentd: the setup timed out after {} s and was killed\n",
            limit.as_secs()
        ));
    }
    if let Some(e) = &out.error {
        output.push_str(&format!("agentd: {e}\n"));
    }
    SetupResult {
        exit_code: out.code,
        passed: out.code == Some(0) && !out.timed_out,
        output: crate::text::tail(&output, SETUP_OUTPUT_TAIL),
        duration_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        timed_out: out.timed_out,
    }
}

/// How a command with time limit `limit` ended, for messages.
pub fn how_it_ended(timed_out: bool, exit_code: Option<i32>, limit: Duration) -> String {
    match (timed_out, exit_code) {
        (true, _) => format!("timed out after {} s", limit.as_secs()),
        (false, Some(c)) => format!("exit status {c}"),
        (false, None) => "no exit status".into(),
    }
}

/// Why a setup (a sandbox's or a task attempt's) failed: how it ended and the end of its
/// output.
pub fn setup_failure(r: &SetupResult, limit: Duration) -> String {
    format!(
        "the setup failed ({}); its output ends with:\n{}",
        how_it_ended(r.timed_out, r.exit_code, limit),
        crate::text::tail(&r.output, 2048)
    )
}
