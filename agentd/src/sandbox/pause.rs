//! Pause and resume: a paused sandbox's processes are frozen by its cgroup's freezer (v1
//! `freezer.state`, v2 `cgroup.freeze`): they get no CPU and do nothing until thawed; their
//! memory stays where it is. The record says since when (`paused_at`), so a restart of agentd
//! finds it paused as the kernel kept it.
//!
//! Any request that uses a paused sandbox (the API's exec, files, proxy and ports, its
//! origins, SSH, a task's follow-up) resumes it first ([`Manager::wake`]); reading its status
//! or stats does not. A stop thaws it first (a frozen process cannot take a signal).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{now_ms, Manager, Result, Sandbox, SandboxState};
use crate::error::Error;

impl Manager {
    /// Freezes sandbox `sb`; how long the freezer took (zero when it was paused already).
    pub async fn pause(&self, sb: &Arc<Sandbox>) -> Result<Duration> {
        let _one = sb.freezer.lock().await;
        let rec = sb.snapshot();
        if rec.state != SandboxState::Ready || rec.exit.is_some() {
            return Err(Error::Conflict(format!(
                "sandbox {} is {}: only a ready sandbox can be paused",
                rec.id,
                rec.state.as_str()
            )));
        }
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

    /// Thaws sandbox `sb`; how long the freezer took, or `None` when it was not paused.
    pub async fn resume(&self, sb: &Arc<Sandbox>) -> Result<Option<Duration>> {
        let _one = sb.freezer.lock().await;
        let rec = sb.snapshot();
        if rec.paused_at.is_none() {
            return Ok(None);
        }
        if !rec.state.is_live() {
            sb.record.lock().expect("sandbox record lock").paused_at = None;
            return Ok(None);
        }
        let took = self.freeze(&rec.id, false).await?;
        sb.record.lock().expect("sandbox record lock").paused_at = None;
        // A record that still says paused only makes the next request resume a running
        // sandbox (a no-op for the freezer): the failure is logged by persist.
        let _ = self.persist(sb);
        tracing::info!(sandbox = %rec.id, ms = took.as_secs_f64() * 1000.0, "resumed");
        Ok(Some(took))
    }

    /// Resumes `sb` if it is paused: a request is about to use it.
    pub async fn wake(&self, sb: &Arc<Sandbox>) -> Result<()> {
        if sb
            .record
            .lock()
            .expect("sandbox record lock")
            .paused_at
            .is_none()
        {
            return Ok(());
        }
        self.resume(sb).await.map(drop)
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
