//! The workspace as a git repository inside an attempt's sandbox: extracting it to
//! `/workspace` and committing the baseline (with `diff_exclude` in the repository's
//! `info/exclude`), and the diff against that baseline once the agent is done. Every git
//! command runs in the sandbox, as the sandbox's user; its output is data.

use std::sync::Arc;

use super::*;

impl TaskManager {
    /// Extracts the workspace to `/workspace` and commits it; returns the baseline commit.
    pub(super) async fn put_workspace(
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

    /// Reads the diff against the baseline and stores it; its stats, or why there is none
    /// (the command, how it ended, the end of its stderr).
    pub(super) async fn collect_diff(
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
}

/// Checks `diff_exclude` patterns: they become lines of `.git/info/exclude`.
pub(super) fn validate_diff_exclude(patterns: &[String]) -> Result<()> {
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
pub(super) fn exclude_file(request: &CreateTask) -> String {
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
pub(super) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
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
