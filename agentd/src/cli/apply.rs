//! `agentd task apply`: an attempt's change becomes a commit on a new branch of a local git
//! repository. Plumbing only (`read-tree`, `apply --cached`, `write-tree`, `commit-tree`,
//! `update-ref`) on an index of its own, so the working tree, the real index and the current
//! branch are never touched and no hook runs. The patch came from a sandbox: `git apply`
//! refuses paths outside the tree and under `.git`, and nothing is checked out.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context};

/// Where the change goes and how it is described.
pub struct Apply<'a> {
    /// The repository (any directory inside its work tree, or a bare repository).
    pub repo: &'a Path,
    /// The branch to create.
    pub branch: &'a str,
    /// The commit to branch from, as the user gave it.
    pub base: Option<&'a str>,
    /// The commit the workspace was at, if it was a repository.
    pub source: Option<&'a str>,
    /// The commit message.
    pub message: &'a str,
    /// The patch (`git diff --binary` against the workspace's baseline).
    pub patch: &'a [u8],
}

/// What was made.
pub struct Applied {
    /// The new commit.
    pub commit: String,
    /// The commit it sits on.
    pub base: String,
    /// Whether the base is the workspace's own commit (else HEAD or `--base`).
    pub from_source: bool,
}

/// Makes the branch; refuses when it exists or the patch does not apply to the base.
pub fn apply(a: &Apply<'_>) -> anyhow::Result<Applied> {
    let git_dir = PathBuf::from(
        text(&git(
            a.repo,
            &["rev-parse", "--absolute-git-dir"],
            None,
            &[],
        )?)
        .with_context(|| format!("{} is not in a git repository", a.repo.display()))?,
    );
    if !git(
        a.repo,
        &["check-ref-format", "--branch", a.branch],
        None,
        &[],
    )?
    .status
    .success()
    {
        bail!("{:?} is not a valid branch name", a.branch);
    }
    let refname = format!("refs/heads/{}", a.branch);
    if git(
        a.repo,
        &["rev-parse", "-q", "--verify", &refname],
        None,
        &[],
    )?
    .status
    .success()
    {
        bail!(
            "branch {} exists already in {}: name another with --branch",
            a.branch,
            a.repo.display()
        );
    }
    let commit_of = |rev: &str| -> anyhow::Result<Option<String>> {
        let spec = format!("{rev}^{{commit}}");
        text(&git(
            a.repo,
            &["rev-parse", "-q", "--verify", &spec],
            None,
            &[],
        )?)
        .map_or(Ok(None), |s| Ok(Some(s)))
    };
    let (base, from_source) = match (a.base, a.source) {
        (Some(b), _) => (
            commit_of(b)?.with_context(|| format!("--base {b:?} is not a commit here"))?,
            false,
        ),
        (None, Some(src)) if commit_of(src)?.is_some() => (src.to_string(), true),
        (None, _) => (
            commit_of("HEAD")?.context(
                "the repository has no commit to branch from (HEAD is unborn): commit first or give --base",
            )?,
            false,
        ),
    };

    // An index of our own, removed whatever happens.
    let scratch = Scratch(vec![
        git_dir.join(format!("agentd-apply-{}.index", std::process::id())),
        git_dir.join(format!("agentd-apply-{}.patch", std::process::id())),
    ]);
    let index = scratch.0[0].to_string_lossy().into_owned();
    let env = [("GIT_INDEX_FILE", index.as_str())];
    std::fs::write(&scratch.0[1], a.patch).context("failed to write the patch for git")?;
    must(a.repo, &["read-tree", &base], None, &env)?;
    let patch_path = scratch.0[1].to_string_lossy().into_owned();
    let applied = git(
        a.repo,
        &["apply", "--cached", "--whitespace=nowarn", &patch_path],
        None,
        &env,
    )?;
    if !applied.status.success() {
        bail!(
            "the change does not apply to {}{}: {}\n(the workspace had changes not committed there? \
             give --base, or take the patch with `agentd task diff`)",
            short(&base),
            if from_source { " (the workspace's commit)" } else { "" },
            String::from_utf8_lossy(&applied.stderr).trim()
        );
    }
    let tree =
        text(&must(a.repo, &["write-tree"], None, &env)?).context("git write-tree said nothing")?;
    // The agent wrote the change; the committer is the user when git knows them.
    let mut ident = vec![
        ("GIT_AUTHOR_NAME", "agentd"),
        ("GIT_AUTHOR_EMAIL", "agentd@localhost"),
    ];
    if !git(a.repo, &["var", "GIT_COMMITTER_IDENT"], None, &[])?
        .status
        .success()
    {
        ident.push(("GIT_COMMITTER_NAME", "agentd"));
        ident.push(("GIT_COMMITTER_EMAIL", "agentd@localhost"));
    }
    let commit = text(&must(
        a.repo,
        &["commit-tree", &tree, "-p", &base, "-F", "-"],
        Some(a.message.as_bytes()),
        &ident,
    )?)
    .context("git commit-tree said nothing")?;
    // The empty old value: created only if it still does not exist.
    must(
        a.repo,
        &[
            "update-ref",
            "-m",
            "agentd task apply",
            &refname,
            &commit,
            "",
        ],
        None,
        &[],
    )?;
    Ok(Applied {
        commit,
        base,
        from_source,
    })
}

/// Files removed when dropped.
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Runs `git args` in `repo` with `stdin` fed and `env` set.
fn git(
    repo: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    env: &[(&str, &str)],
) -> anyhow::Result<Output> {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(repo)
        .args(args)
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("failed to run git (is it installed and on PATH?)")?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Small (a commit message): git reads it all before it writes anything.
        pipe.write_all(data).context("failed to write to git")?;
    }
    child.wait_with_output().context("failed to wait for git")
}

/// [`git`] that must succeed.
fn must(
    repo: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    env: &[(&str, &str)],
) -> anyhow::Result<Output> {
    let out = git(repo, args, stdin, env)?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// The first line of a successful git's stdout.
fn text(out: &Output) -> Option<String> {
    out.status
        .success()
        .then(|| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
}

/// A commit id as people read it.
pub fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}
