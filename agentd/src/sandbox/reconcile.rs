//! After agentd starts: the records meet what is left on the host. Live shims are
//! reattached, dead ones cleaned up, leftovers of crashed creates removed.

use super::*;

impl Manager {
    /// After a start: load the records, reattach to live shims, end the sandboxes whose shim
    /// died, and remove what belongs to no live sandbox.
    pub async fn reconcile(self: &Arc<Self>) -> anyhow::Result<()> {
        let records: Vec<SandboxRecord> = self.db.list(SANDBOXES)?;
        let mut live_ids = Vec::new();
        for rec in records {
            let sb = Sandbox::new(rec.clone());
            self.map().insert(rec.id.clone(), sb.clone());
            if !rec.state.is_live() {
                continue;
            }
            let client = self.runtime.client(&rec.id);
            let runtime = self.runtime.clone();
            let id = rec.id.clone();
            // A dead shim is found without waiting on its socket (a helper it left may hold
            // the listener and never answer).
            let alive = tokio::task::spawn_blocking(move || {
                runtime
                    .shim_alive(&id)
                    .then(|| client.state().ok())
                    .flatten()
            })
            .await
            .unwrap_or(None);
            match alive {
                Some((_, SandboxStatus::Running)) => {
                    tracing::info!(sandbox = %rec.id, "reattached");
                    live_ids.push(rec.id.clone());
                    let resting = rec.paused_at.is_some() || rec.hibernated;
                    if rec.opencode.is_some() && rec.state == SandboxState::Ready && resting {
                        // Paused or hibernated (a warm pool's, a finished task's): its OpenCode
                        // cannot answer now. It stays ready; the use that resumes it wakes a
                        // hibernated OpenCode and waits for its answer.
                    } else if rec.opencode.is_some() {
                        // Check OpenCode again in the background.
                        self.set_state(&sb, SandboxState::Starting, |_| {});
                    } else if rec.setup.as_ref().is_some_and(|s| s.result.is_none()) {
                        // Its setup had not ended: it runs again.
                        self.set_state(&sb, SandboxState::Starting, |_| {});
                    } else if rec.state == SandboxState::Creating {
                        // Its create finished but the lazy write of `ready` was lost.
                        self.set_state(&sb, SandboxState::Ready, |r| r.ready_at = Some(now_ms()));
                    }
                    self.clone().supervise(sb).await;
                }
                Some(_) => self.finish(&sb, None).await,
                None => {
                    self.finish(&sb, Some("agentd found its shim gone at start"))
                        .await;
                    if let Some(exit) = &mut sb.record.lock().expect("lock").exit {
                        exit.reason = "the sandbox's shim died while agentd was down".into();
                    }
                    // Exited, not stopped: nobody asked for it.
                    self.set_state(&sb, SandboxState::Exited, |_| {});
                }
            }
        }
        // Sandbox dirs of no live record (a crash mid-create): clean up.
        // blocking-ok: reconcile runs once at start, before the API listens.
        if let Ok(entries) = std::fs::read_dir(self.config.sandboxes_dir()) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().to_string();
                // The state root's own lock file and anything else that is no sandbox id.
                if agentd_runtime::spec::validate_id(&id).is_err() {
                    continue;
                }
                if !live_ids.contains(&id) {
                    let client = self.runtime.client(&id);
                    let cleaned = if self.runtime.shim_alive(&id) {
                        // blocking-ok: at start, before the API listens (as above).
                        client.delete()
                    } else {
                        // blocking-ok: at start, before the API listens (as above).
                        self.runtime.cleanup(&id)
                    };
                    if let Err(err) = cleaned {
                        tracing::warn!(sandbox = %id, error = %agentd_runtime::error_chain(&err), "leftover cleanup failed");
                    }
                    tracing::info!(sandbox = %id, "removed leftovers of a sandbox");
                }
            }
        }
        for link in self.net.leftover_links(&live_ids) {
            if let Ok(index) = agentd_runtime::netlink::link_index(&link) {
                let _ = agentd_runtime::netlink::delete_link(index);
                tracing::info!(link, "removed a leftover veth");
            }
        }
        Ok(())
    }
}
