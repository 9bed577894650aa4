//! The workspace as a git repository inside an attempt's sandbox: extracting it to
//! `/workspace` and committing the baseline (with `diff_exclude` in the repository's
//! `info/exclude`), and the diff against that baseline once the agent is done. Every git
//! command runs in the sandbox, as the sandbox's user; its output is data.

use std::sync::Arc;

use super::*;

impl TaskManager {
    /// Extracts the workspace to `/workspace` and commits it; returns the baseline commit
    /// and, when the workspace was a repository with commits, the commit it was at.
    pub(super) async fn put_workspace(
        &self,
        rec: &TaskRecord,
        sb: &Arc<Sandbox>,
    ) -> std::result::Result<(String, Option<String>), String> {
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
            echo \"source $(git rev-parse -q --verify HEAD || true)\"\n\
            ex=$(git rev-parse --git-path info/exclude)\n\
            mkdir -p \"$(dirname \"$ex\")\"\n\
            printf '%s' {} >> \"$ex\"\n\
            git add -A\n\
            git -c user.name=agentd -c user.email=agentd@localhost -c commit.gpgsign=false \
              commit -q --allow-empty --no-verify -m 'agentd baseline'\n\
            git rev-parse HEAD\n",
            sh_quote(&exclude_file(&rec.request))
        );
        let (sha, stdout) = self
            .commit_in_sandbox(sb, script, "the baseline commit")
            .await
            .map_err(|e| format!("{e} (is git in the image?)"))?;
        // What the sandbox says is data: only a commit id is kept.
        let source = stdout
            .lines()
            .find_map(|l| l.strip_prefix("source "))
            .map(str::trim)
            .filter(|s| is_commit_id(s))
            .map(String::from);
        Ok((sha, source))
    }

    /// Commits what the setup changed on top of the baseline; the new baseline.
    pub(super) async fn commit_setup(
        &self,
        sb: &Arc<Sandbox>,
    ) -> std::result::Result<String, String> {
        let script = "set -e\ngit add -A\n\
            git -c user.name=agentd -c user.email=agentd@localhost -c commit.gpgsign=false \
              commit -q --allow-empty --no-verify -m 'agentd setup'\n\
            git rev-parse HEAD\n";
        let (sha, _) = self
            .commit_in_sandbox(sb, script.into(), "committing the setup's changes")
            .await?;
        Ok(sha)
    }

    /// Runs `script` (which ends by printing a commit id) in `/workspace`: the commit and
    /// all it printed, or why it failed (`what` names the step).
    async fn commit_in_sandbox(
        &self,
        sb: &Arc<Sandbox>,
        script: String,
        what: &str,
    ) -> std::result::Result<(String, String), String> {
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
            .map_err(|e| format!("{what} could not run: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let sha = stdout.lines().last().unwrap_or_default().trim().to_string();
        if out.code != Some(0) || !is_commit_id(&sha) {
            return Err(format!(
                "{what} failed: {}",
                failure("git add -A && git commit", &out, GIT_IN_SANDBOX_TIMEOUT)
            ));
        }
        Ok((sha, stdout))
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

/// Whether `s` has the shape of a full commit id (SHA-1 or SHA-256).
pub fn is_commit_id(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The longest first line of the prompt a commit subject keeps.
const SUBJECT_CHARS: usize = 60;

/// The longest prompt a commit message quotes, bytes.
const MESSAGE_PROMPT_BYTES: usize = 4096;

/// The commit message for attempt `n` of task `id`: a subject naming the task and the
/// prompt's first line, then the prompt (its end if long).
pub fn commit_message(id: &str, n: u32, prompt: &str) -> String {
    let first = prompt.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let first = first.trim();
    let mut subject: String = first.chars().take(SUBJECT_CHARS).collect();
    if subject.len() < first.len() {
        subject.push_str("...");
    }
    let quoted = if prompt.len() > MESSAGE_PROMPT_BYTES {
        let mut cut = MESSAGE_PROMPT_BYTES;
        while !prompt.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}\n[...]", &prompt[..cut])
    } else {
        prompt.trim_end().to_string()
    };
    format!("agentd task {id}/{n}: {subject}\n\nPrompt:\n\n{quoted}\n\nMade by attempt {n} of agentd task {id}.\n")
}

/// Attempt `n`'s patch as one `git format-patch` message (an mbox `git am` takes):
/// `message` from [`commit_message`], `date_ms` the commit's date, `patch` the diff.
pub fn mbox(message: &str, date_ms: u64, patch: &[u8]) -> Vec<u8> {
    let (subject, body) = message.split_once("\n\n").unwrap_or((message, ""));
    let date =
        httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_millis(date_ms));
    let mut out = format!(
        "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n\
         From: agentd <agentd@localhost>\n\
         Date: {date}\n\
         Subject: [PATCH] {}\n\
         MIME-Version: 1.0\n\
         Content-Type: text/plain; charset=UTF-8\n\
         Content-Transfer-Encoding: 8bit\n\n\
         {}\n---\n",
        encode_header(subject),
        // A line of body that looks like a new message's start would split the mbox.
        body.trim_end().replace("\nFrom ", "\n>From ")
    )
    .into_bytes();
    out.extend_from_slice(patch);
    if !patch.ends_with(b"\n") && !patch.is_empty() {
        out.push(b'\n');
    }
    out.extend_from_slice(b"-- \nagentd\n\n");
    out
}

/// A header value as RFC 2047 asks: ASCII as is, anything else base64 in UTF-8.
fn encode_header(s: &str) -> String {
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return s.to_string();
    }
    use base64::Engine as _;
    format!(
        "=?UTF-8?B?{}?=",
        base64::engine::general_purpose::STANDARD.encode(s)
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_commit_message_names_the_task_and_quotes_the_prompt() {
        let m = commit_message("abc123", 2, "\n  fix the parser\nit drops the last line\n");
        assert!(
            m.starts_with("agentd task abc123/2: fix the parser\n\nPrompt:\n\n"),
            "{m}"
        );
        assert!(m.contains("it drops the last line"), "{m}");
        let long = "x".repeat(100);
        let m = commit_message("abc123", 1, &long);
        assert_eq!(
            m.lines().next().unwrap(),
            format!("agentd task abc123/1: {}...", "x".repeat(SUBJECT_CHARS))
        );
        let huge = "é".repeat(MESSAGE_PROMPT_BYTES);
        let m = commit_message("abc123", 1, &huge);
        assert!(m.len() < MESSAGE_PROMPT_BYTES + 300, "{}", m.len());
        assert!(m.contains("[...]"));
    }

    #[test]
    fn test_mbox_is_one_format_patch_message() {
        let m = commit_message("abc123", 1, "grüße\nFrom here on, fix it");
        let patch = b"diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n";
        let out = String::from_utf8(mbox(&m, 0, patch)).unwrap();
        let mut lines = out.lines();
        assert_eq!(
            lines.next().unwrap(),
            "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001"
        );
        assert!(
            out.contains("\nDate: Thu, 01 Jan 1970 00:00:00 GMT\n"),
            "{out}"
        );
        // Not ASCII: the subject is RFC 2047 encoded.
        assert!(out.contains("\nSubject: [PATCH] =?UTF-8?B?"), "{out}");
        // A body line that would start a new message is escaped.
        assert!(out.contains("\n>From here on"), "{out}");
        assert!(out.contains("\n---\ndiff --git a/x b/x\n"), "{out}");
        assert!(out.ends_with("+b\n-- \nagentd\n\n"), "{out}");
    }

    #[test]
    fn test_commit_ids() {
        assert!(is_commit_id(&"a".repeat(40)));
        assert!(is_commit_id(&"0".repeat(64)));
        assert!(!is_commit_id(&"a".repeat(39)));
        assert!(!is_commit_id(&"g".repeat(40)));
        assert!(!is_commit_id("HEAD"));
    }
}
