//! Pause, hibernate and resume. A paused sandbox's processes are frozen by its cgroup's freezer
//! (v1 `freezer.state`, v2 `cgroup.freeze`): they get no CPU and do nothing until thawed;
//! their memory stays where it is (this host has no swap, and nothing else frees a frozen
//! process's anonymous memory). A hibernated sandbox is paused too, but its OpenCode was stopped
//! first (the sandbox's init keeps the sandbox, see `agentd_runtime::init`), so its memory is
//! free; its sessions stay in its database on the sandbox's disk, and a resume starts it again
//! (its start, ~2-3 s, instead of a thaw's fraction of a millisecond). The record says since
//! when (`paused_at`) and whether OpenCode sleeps, so a restart of agentd finds both as the
//! kernel kept them.
//!
//! Any request that uses a paused sandbox (the API's exec, files, proxy and ports, its
//! origins, SSH, a task's follow-up) resumes it first ([`Manager::wake`]); reading its status
//! or stats does not. Only a request to OpenCode itself (its proxy, its port, a task's
//! follow-up, `resume`) wakes a hibernated OpenCode: an exec, files, another port or SSH
//! thaw the sandbox and leave OpenCode asleep (they do not need it, and are spared its
//! start); the sandbox then runs with `hibernated` still set, and its next idle spell only
//! freezes it again. A stop thaws it first (a frozen process cannot take a signal) and leaves
//! a hibernated OpenCode asleep.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{now_ms, Manager, Result, Sandbox, SandboxState};
use crate::error::Error;

/// How long OpenCode may take to exit after SIGTERM when it is hibernated; then it is killed.
const HIBERNATE_GRACE: Duration = Duration::from_secs(5);
/// How long the init may take to reap it after SIGKILL.
const HIBERNATE_KILL_WAIT: Duration = Duration::from_secs(5);
/// The directories whose OpenCode sessions are checked before a hibernation: OpenCode's own
/// (its working directory) and the workspace that tasks use.
const OPENCODE_DIRS: [&str; 2] = ["", "/workspace"];

/// What a hibernation took.
#[derive(Debug, Clone, Copy)]
pub struct Hibernation {
    /// From asking the init to stop OpenCode to its reaping (zero when it slept already).
    pub stop: Duration,
    /// The freezer's time.
    pub freezer: Duration,
}

/// What a resume took.
#[derive(Debug, Clone, Copy)]
pub struct Resumed {
    /// The freezer's time.
    pub freezer: Duration,
    /// From starting a hibernated OpenCode again to its first answer.
    pub opencode: Option<Duration>,
}

/// The record of `sb` if it is ready (not being stopped), else the conflict saying it cannot
/// be `what` (paused, hibernated).
fn ready_for(sb: &Sandbox, what: &str) -> Result<super::SandboxRecord> {
    let rec = sb.snapshot();
    if rec.state != SandboxState::Ready || rec.exit.is_some() {
        return Err(Error::Conflict(format!(
            "sandbox {} is {}: only a ready sandbox can be {what}",
            rec.id,
            rec.state.as_str()
        )));
    }
    Ok(rec)
}

impl Manager {
    /// Freezes sandbox `sb`; how long the freezer took (zero when it was paused already).
    pub async fn pause(&self, sb: &Arc<Sandbox>) -> Result<Duration> {
        let _one = sb.freezer.lock().await;
        let rec = ready_for(sb, "paused")?;
        self.pause_locked(sb, &rec).await
    }

    /// [`Manager::pause`], for a caller that holds the freezer lock and read `rec` under it.
    async fn pause_locked(&self, sb: &Sandbox, rec: &super::SandboxRecord) -> Result<Duration> {
        if rec.paused_at.is_some() {
            return Ok(Duration::ZERO);
        }
        let took = self.freeze(&rec.id, true).await?;
        sb.record.lock().expect("sandbox record lock").paused_at = Some(now_ms());
        // Kept before it is said: a frozen sandbox whose record forgot it would never be
        // resumed by a request after a restart. Undone if it cannot be kept.
        if let Err(e) = self.persist(sb) {
            sb.record.lock().expect("sandbox record lock").paused_at = None;
            let _ = self.freeze(&rec.id, false).await;
            return Err(e);
        }
        tracing::info!(sandbox = %rec.id, ms = took.as_secs_f64() * 1000.0, "paused");
        Ok(took)
    }

    /// Hibernates sandbox `sb`: stops its OpenCode (SIGTERM, SIGKILL after
    /// [`HIBERNATE_GRACE`]) and pauses the rest. Refused while OpenCode works on a session or
    /// a request of its is at the LLM gateway (that work would be lost).
    pub async fn hibernate(&self, sb: &Arc<Sandbox>) -> Result<Hibernation> {
        let _one = sb.freezer.lock().await;
        let rec = ready_for(sb, "hibernated")?;
        let Some(secrets) = rec.opencode.clone() else {
            return Err(Error::Conflict(format!(
                "sandbox {} runs no OpenCode: only an OpenCode sandbox can be hibernated (pause it instead)",
                rec.id
            )));
        };
        if rec.hibernated {
            // OpenCode sleeps already; the rest is frozen unless it is paused still (an exec,
            // files or SSH thawed it without waking OpenCode).
            let freezer = self.pause_locked(sb, &rec).await?;
            return Ok(Hibernation {
                stop: Duration::ZERO,
                freezer,
            });
        }
        // Said first: a request that comes from now on waits for this lock in `wake` (and then
        // wakes OpenCode) instead of reaching an OpenCode that is about to stop.
        {
            let mut r = sb.record.lock().expect("sandbox record lock");
            r.hibernated = true;
            r.paused_at.get_or_insert_with(now_ms);
        }
        // Paused: thawed, so that OpenCode can be asked and can exit.
        let thawed = match rec.paused_at {
            Some(_) => self.freeze(&rec.id, false).await.map(drop),
            None => Ok(()),
        };
        let refused = match thawed {
            Err(e) => Some(e),
            Ok(()) => match self.opencode_busy(sb, &secrets.password).await {
                Some(why) => Some(Error::Conflict(format!(
                    "sandbox {}: {why}; hibernating would lose that work (wait for it, abort the session, or pause the sandbox instead)",
                    rec.id
                ))),
                // Kept before it is done (see `hibernated`).
                None => self.persist(sb).err(),
            },
        };
        if let Some(e) = refused {
            {
                let mut r = sb.record.lock().expect("sandbox record lock");
                r.hibernated = false;
                r.paused_at = rec.paused_at;
            }
            if rec.paused_at.is_some() {
                let _ = self.freeze(&rec.id, true).await;
            }
            return Err(e);
        }
        let t = Instant::now();
        let stopped = self.stop_opencode(&rec.id).await;
        let stop = t.elapsed();
        let froze = match stopped {
            Ok(()) => self.freeze(&rec.id, true).await,
            Err(e) => Err(e),
        };
        match froze {
            Ok(freezer) => {
                tracing::info!(sandbox = %rec.id, stop_ms = stop.as_secs_f64() * 1000.0, "hibernated");
                Ok(Hibernation { stop, freezer })
            }
            Err(e) => {
                // Undone: OpenCode started again, the sandbox up and not paused (or stopped
                // when that fails too).
                tracing::warn!(sandbox = %rec.id, error = %e, "hibernate failed: waking OpenCode again");
                let _ = self.freeze(&rec.id, false).await;
                if self.start_opencode(sb).await.is_ok() {
                    let _ = self.persist(sb);
                }
                Err(e)
            }
        }
    }

    /// Hibernates `sb` when it runs OpenCode and OpenCode is idle, else pauses it (its work
    /// kept, frozen); whether it was hibernated.
    pub async fn hibernate_or_pause(&self, sb: &Arc<Sandbox>) -> Result<bool> {
        if sb.snapshot().opencode.is_some() {
            match self.hibernate(sb).await {
                Ok(_) => return Ok(true),
                Err(Error::Conflict(why)) => {
                    tracing::info!(why, "not hibernated: pausing instead")
                }
                Err(e) => tracing::warn!(error = %e, "hibernate failed: pausing instead"),
            }
        }
        self.pause(sb).await.map(|_| false)
    }

    /// Why the sandbox's OpenCode is not idle, if it is not: a request of its at the LLM
    /// gateway, an open request to the sandbox, or a session that is busy (or OpenCode did not
    /// answer about its sessions).
    async fn opencode_busy(&self, sb: &Sandbox, password: &str) -> Option<String> {
        if sb.gateway_requests.load(Ordering::SeqCst) > 0 {
            return Some("its OpenCode has a request at the LLM gateway".into());
        }
        let open = sb.active.load(Ordering::Relaxed);
        if open > 0 {
            return Some(format!(
                "{open} request(s) to it are open (the proxy, exec, files or SSH; an open event stream counts)"
            ));
        }
        let address = sb.snapshot().address;
        for dir in OPENCODE_DIRS {
            let oc = crate::opencode::client::Client::new(&self.http, address, password, dir);
            match oc.busy_sessions().await {
                Ok(busy) if busy.is_empty() => {}
                Ok(busy) => return Some(format!("its OpenCode works on session {}", busy[0])),
                Err(e) => return Some(format!("its OpenCode did not say whether it works ({e})")),
            }
        }
        None
    }

    /// Asks the init to stop OpenCode and waits until it is reaped (killed after the grace).
    async fn stop_opencode(&self, id: &str) -> Result<()> {
        let client = self.runtime.client(id);
        tokio::task::spawn_blocking(move || {
            let internal = |e: agentd_runtime::ClientError| {
                Error::internal(format!("hibernate: {}", agentd_runtime::error_chain(&e)))
            };
            client.hibernate().map_err(internal)?;
            let t = Instant::now();
            let mut killed = false;
            loop {
                if client.asleep().map_err(internal)? {
                    return Ok(());
                }
                let waited = t.elapsed();
                if !killed && waited > HIBERNATE_GRACE {
                    // Asked again while it still runs: the init kills it.
                    client.hibernate().map_err(internal)?;
                    killed = true;
                } else if waited > HIBERNATE_GRACE + HIBERNATE_KILL_WAIT {
                    return Err(Error::internal(
                        "hibernate: OpenCode was not reaped 5 s after SIGKILL",
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .await
        .map_err(Error::internal)?
    }

    /// Wakes a hibernated OpenCode (the caller thawed the sandbox and holds its freezer
    /// lock): starts it and waits for its answer; clears `paused_at` and `hibernated` (not
    /// kept: the caller persists). A sandbox whose OpenCode cannot be woken or does not answer
    /// is stopped.
    async fn start_opencode(&self, sb: &Arc<Sandbox>) -> Result<Duration> {
        // Not paused any more: the stop below must not wait for the freezer lock we hold.
        sb.record.lock().expect("sandbox record lock").paused_at = None;
        let id = sb.snapshot().id;
        let client = self.runtime.client(&id);
        let t = Instant::now();
        let woke = tokio::task::spawn_blocking(move || client.wake())
            .await
            .map_err(Error::internal)
            .and_then(|r| r.map_err(|e| Error::internal(agentd_runtime::error_chain(&e))));
        let why = match woke {
            Err(e) => format!("its OpenCode could not be woken ({e})"),
            Ok(())
                if self
                    .opencode_answers(sb, crate::opencode::READY_TIMEOUT)
                    .await =>
            {
                sb.record.lock().expect("sandbox record lock").hibernated = false;
                return Ok(t.elapsed());
            }
            Ok(()) if !sb.snapshot().state.is_live() => {
                // Stopped meanwhile (a delete, its task's end): nothing to wake any more.
                return Err(Error::Conflict(format!(
                    "sandbox {id} ended while its OpenCode was woken"
                )));
            }
            Ok(()) => "its OpenCode did not answer its health check after it was woken".into(),
        };
        tracing::warn!(sandbox = %id, why, "stopping the sandbox");
        // Boxed: a stop thaws, and a thaw may wake (this function).
        Box::pin(self.stop(sb, &why)).await;
        Err(Error::Conflict(format!("sandbox {id} was stopped: {why}")))
    }

    /// Thaws sandbox `sb` and wakes its OpenCode if it was hibernated; `None` when it was not
    /// paused.
    pub async fn resume(&self, sb: &Arc<Sandbox>) -> Result<Option<Resumed>> {
        self.thaw(sb, true).await
    }

    /// Thaws sandbox `sb`; with `wake`, starts a hibernated OpenCode again, thawed or not
    /// (else it stays asleep: a stop, an exec or files do not need it). `None` when there was
    /// nothing to do.
    pub(super) async fn thaw(&self, sb: &Arc<Sandbox>, wake: bool) -> Result<Option<Resumed>> {
        let to_do = |r: &super::SandboxRecord| r.paused_at.is_some() || (wake && r.hibernated);
        if !to_do(&sb.record.lock().expect("sandbox record lock")) {
            return Ok(None);
        }
        let _one = sb.freezer.lock().await;
        let rec = sb.snapshot();
        if !to_do(&rec) {
            return Ok(None);
        }
        if !rec.state.is_live() {
            sb.record.lock().expect("sandbox record lock").paused_at = None;
            return Ok(None);
        }
        let freezer = match rec.paused_at {
            Some(_) => self.freeze(&rec.id, false).await?,
            None => Duration::ZERO,
        };
        sb.record.lock().expect("sandbox record lock").paused_at = None;
        let opencode = if rec.hibernated && wake {
            Some(self.start_opencode(sb).await?)
        } else {
            None
        };
        // A record that still says paused only makes the next request resume a running
        // sandbox (a no-op for the freezer and for an OpenCode that is awake): the failure
        // is logged by persist.
        let _ = self.persist(sb);
        tracing::info!(sandbox = %rec.id, ms = freezer.as_secs_f64() * 1000.0, opencode_ms = ?opencode.map(|d| d.as_secs_f64() * 1000.0), "resumed");
        Ok(Some(Resumed { freezer, opencode }))
    }

    /// Resumes `sb` if it is paused: a request is about to use it. `opencode`: the request
    /// goes to OpenCode, so a hibernated OpenCode is started again and answers first; else it
    /// stays asleep. (A sandbox with nothing to do returns at once: `thaw` looks before it
    /// takes the freezer lock.)
    pub async fn wake(&self, sb: &Arc<Sandbox>, opencode: bool) -> Result<()> {
        self.thaw(sb, opencode).await.map(drop)
    }

    pub(super) async fn freeze(&self, id: &str, frozen: bool) -> Result<Duration> {
        let cgroup = self.runtime.cgroup(id);
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            cgroup.freeze(frozen).map(|()| t.elapsed())
        })
        .await
        .map_err(Error::internal)?
        .map_err(|e| Error::internal(agentd_runtime::error_chain(&e)))
    }
}
