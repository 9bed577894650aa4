//! Pushing an attempt's change to the task's git repository as a new branch (opt-in, for
//! git-URL workspaces): the commit is made on the host from the stored patch on top of the
//! workspace's commit ([`crate::workspace::push_patch`]), with the credentials file agentd
//! was given; nothing of it reaches a sandbox.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::*;

/// An attempt's change, pushed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct Pushed {
    /// The repository (as the task gave it).
    pub remote: String,
    /// The branch made there.
    pub branch: String,
    /// Its commit.
    pub commit: String,
}

/// Whether `b` is a branch name git takes and a caller may choose: letters, digits, `.`,
/// `_`, `-` and `/`, no empty or dot-led component, no `..`, no `.lock` end, 200 bytes at most.
pub fn valid_branch(b: &str) -> bool {
    !b.is_empty()
        && b.len() <= 200
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'/'))
        && !b.starts_with('-')
        && !b.contains("..")
        && !b.ends_with(".lock")
        && b.split('/').all(|c| !c.is_empty() && !c.starts_with('.'))
}

impl TaskManager {
    /// Pushes attempt `n`'s change to the task's repository as `branch` (default
    /// `agentd/<task>-<n>`), which must not exist there. `tcp`: asked for over TCP (git then
    /// connects only to the checked address, as for the workspace's clone).
    pub async fn push(
        &self,
        task: &Arc<Task>,
        n: u32,
        branch: Option<String>,
        tcp: bool,
    ) -> Result<Pushed> {
        let rec = task.snapshot();
        let Some(url) = rec.request.workspace.git.clone() else {
            return Err(Error::Invalid(format!(
                "task {} has no git URL workspace to push to: for a local repository use `agentd task apply {} {n}`",
                rec.id, rec.id
            )));
        };
        let a = rec.attempts.iter().find(|a| a.n == n).ok_or_else(|| {
            Error::NotFound(format!(
                "task {} has attempts 1 to {}",
                rec.id,
                rec.attempts.len()
            ))
        })?;
        if a.diff.as_ref().is_none_or(|d| d.bytes == 0) {
            return Err(Error::Conflict(format!(
                "attempt {n} of task {} has no change to push (state {})",
                rec.id,
                a.state.as_str()
            )));
        }
        let Some(source) = a.source.clone().filter(|s| git::is_commit_id(s)) else {
            return Err(Error::Conflict(format!(
                "attempt {n} of task {} does not know the workspace's commit",
                rec.id
            )));
        };
        let branch = branch.unwrap_or_else(|| format!("agentd/{}-{n}", rec.id));
        if !valid_branch(&branch) {
            return Err(Error::Invalid(format!(
                "branch {branch:?}: give letters, digits, '.', '_', '-' and '/' (no '..', no empty or dot-led part)"
            )));
        }
        let bad = |e: crate::workspace::WorkspaceError| match e {
            crate::workspace::WorkspaceError::Write(e) => Error::internal(e),
            crate::workspace::WorkspaceError::Forbidden(m) => Error::Forbidden(m),
            crate::workspace::WorkspaceError::Git { what, detail } => {
                Error::Conflict(format!("git {what} failed: {detail}"))
            }
            other => Error::Invalid(other.to_string()),
        };
        let pin = if tcp {
            Some(
                crate::workspace::pin_git_url(&url, &self.mgr.config.git_allow_networks)
                    .await
                    .map_err(bad)?,
            )
        } else {
            None
        };
        let _slot = self.git_slot()?;
        let scratch = self
            .task_dir(&rec.id)
            .join(format!("push-{}", crate::sandbox::random_hex(4)));
        tokio::fs::create_dir_all(&scratch)
            .await
            .map_err(Error::internal)?;
        let message = git::commit_message(&rec.id, n, &rec.request.prompt);
        let patch = self.diff_path(&rec.id, n);
        let pushed = crate::workspace::push_patch(
            crate::workspace::Push {
                url: &url,
                source: &source,
                patch: &patch,
                message: &message,
                branch: &branch,
                credentials: self.mgr.config.git_credentials.as_deref(),
                pin,
            },
            &scratch,
        )
        .await;
        let _ = tokio::fs::remove_dir_all(&scratch).await;
        let commit = pushed.map_err(bad)?;
        self.emit(
            task,
            "attempt.pushed",
            serde_json::json!({"attempt": n, "branch": branch, "commit": commit}),
        );
        tracing::info!(task = %rec.id, attempt = n, branch, commit, "pushed");
        Ok(Pushed {
            remote: url,
            branch,
            commit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_branch_names() {
        for ok in ["agentd/abc-1", "fix/b", "a.b_c-d"] {
            assert!(valid_branch(ok), "{ok}");
        }
        for bad in [
            "", "-x", "a..b", "a//b", "a/", "/a", ".a", "a/.b", "x.lock", "a b", "a:b", "a~1",
            "a^", "@{",
        ] {
            assert!(!valid_branch(bad), "{bad}");
        }
    }
}
