//! Tidy checks, run by plain `cargo test`: conventions that are cheap to check and easy to
//! forget.

use std::fs;
use std::path::{Path, PathBuf};

use crate::project_root;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() {
            if name != "target" && name != ".git" {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn all_rust_files() -> Vec<PathBuf> {
    let mut v = Vec::new();
    rust_files(&project_root(), &mut v);
    assert!(v.len() > 10, "found too few Rust files: {v:?}");
    v
}

#[test]
fn test_every_rust_file_starts_with_a_module_doc() {
    for f in all_rust_files() {
        let text = fs::read_to_string(&f).unwrap();
        assert!(
            text.starts_with("//!"),
            "{} must start with a //! comment saying what it owns",
            f.display()
        );
    }
}

#[test]
fn test_every_unsafe_block_has_a_safety_comment() {
    for f in all_rust_files() {
        if f.ends_with("tidy.rs") {
            continue;
        }
        let text = fs::read_to_string(&f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let opens_block = code.contains("unsafe {") || code.trim_end().ends_with("unsafe");
            if !opens_block || code.contains("unsafe fn") || code.contains("unsafe extern") {
                continue;
            }
            let start = i.saturating_sub(8);
            let has_safety = lines[start..=i].iter().any(|l| l.contains("SAFETY:"));
            assert!(
                has_safety,
                "{}:{}: unsafe without a // SAFETY: comment",
                f.display(),
                i + 1
            );
        }
    }
}

#[test]
fn test_every_crate_uses_the_workspace_lints() {
    let root = project_root();
    for krate in ["runtime", "agentd", "tests", "tests/probe", "xtask"] {
        let manifest = fs::read_to_string(root.join(krate).join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains("[lints]\nworkspace = true"),
            "{krate}/Cargo.toml must have [lints] workspace = true"
        );
    }
}

#[test]
fn test_no_open_ended_version_requirements() {
    let manifest = fs::read_to_string(project_root().join("Cargo.toml")).unwrap();
    assert!(
        !manifest.contains(">="),
        "pin dependency versions; no >= requirements"
    );
}

#[test]
fn test_readme_test_command_matches_ci() {
    // .ci/run runs the command README gives; both must stay in step.
    let root = project_root();
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let ci = fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(
        readme.contains("cargo xtask ci"),
        "README must give the test command"
    );
    assert!(
        ci.contains("cargo xtask ci"),
        ".ci/run must run README's test command"
    );
}

/// agentd's services never import its skins: the HTTP API (`api/`) and the CLI (`cli/`,
/// `main`), nor the daemon's wiring (`serve`). A service answers with
/// its own error (`crate::error::Error`); the API maps it to a status.
#[test]
fn test_agentd_services_import_no_skin() {
    let src = project_root().join("agentd/src");
    let services = [
        "sandbox.rs",
        "sandbox",
        "task.rs",
        "task",
        "exec.rs",
        "workspace.rs",
        "opencode.rs",
        "opencode",
        "daemon/config.rs",
        "net.rs",
        "egress.rs",
        "agent_layer.rs",
        "cache.rs",
        "db.rs",
        "metrics.rs",
        "default_image.rs",
        "image_spec.rs",
        "walk.rs",
        "text.rs",
        "error.rs",
        "http.rs",
    ];
    let skins = [
        "crate::api",
        "crate::cli",
        "crate::ssh",
        "crate::daemon::serve",
        "crate::daemon::teardown",
        "crate::main",
        "ApiError",
    ];
    let mut files = Vec::new();
    for s in services {
        let p = src.join(s);
        if p.is_dir() {
            rust_files(&p, &mut files);
        } else {
            assert!(p.is_file(), "{} is gone: update this list", p.display());
            files.push(p);
        }
    }
    let mut found = Vec::new();
    for f in &files {
        let text = fs::read_to_string(f).unwrap();
        for (i, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for skin in skins {
                if line.contains(skin) {
                    found.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "services import a skin:\n{}",
        found.join("\n")
    );
}

/// Calls that block the thread on the file system or the clock.
const BLOCKING: [&str; 14] = [
    "client.delete()",
    "client.kill(",
    "client.stats()",
    "client.state()",
    ".cleanup(&",
    "std::fs::",
    "File::open(",
    "File::create(",
    "OpenOptions::new()",
    ".read_to_end(",
    ".read_to_string(",
    ".sync_all()",
    "std::thread::sleep(",
    ".write_all(",
];

/// The blocking calls written in the body of an `async fn` of `text`, outside the closures
/// given to `spawn_blocking` or a thread, and not marked `// blocking-ok: why` on their line
/// or the line above. A brace-counting scan, not a parser: good enough for rustfmt'ed code.
fn blocking_in_async(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if !l.contains("async fn ") || l.trim_start().starts_with("//") {
            i += 1;
            continue;
        }
        let (mut depth, mut started, mut off_thread) = (0i64, false, Vec::<i64>::new());
        let mut j = i;
        while j < lines.len() {
            let t = lines[j];
            if t.contains("spawn_blocking")
                || t.contains("thread::spawn")
                || t.contains("thread::Builder")
            {
                off_thread.push(depth);
            }
            for ch in t.chars() {
                match ch {
                    '{' => {
                        depth += 1;
                        started = true;
                    }
                    '}' => {
                        depth -= 1;
                        if off_thread.last().is_some_and(|d| depth <= *d) {
                            off_thread.pop();
                        }
                    }
                    _ => {}
                }
            }
            let code = t.trim_start();
            let marked =
                t.contains("blocking-ok:") || (j > 0 && lines[j - 1].contains("blocking-ok:"));
            if j > i
                && off_thread.is_empty()
                && !code.starts_with("//")
                && !t.contains(".await")
                && !t.contains("tokio::fs::")
                && !marked
                && BLOCKING.iter().any(|b| t.contains(b))
            {
                found.push((j + 1, code.to_string()));
            }
            if started && depth == 0 {
                break;
            }
            j += 1;
        }
        i = j + 1;
    }
    found
}

/// The daemon never blocks an async worker on the disk: file I/O in an `async fn` runs in
/// `spawn_blocking` (or its own thread), or says why it may not (`// blocking-ok: why`).
/// The CLI is left out: it is one user's process with nothing else to serve.
#[test]
fn test_agentd_blocks_no_async_worker() {
    let mut files = Vec::new();
    rust_files(&project_root().join("agentd/src"), &mut files);
    let mut found = Vec::new();
    for f in files
        .iter()
        .filter(|f| !f.components().any(|c| c.as_os_str() == "cli"))
    {
        let text = fs::read_to_string(f).unwrap();
        // Unit tests block as they like.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (line, call) in blocking_in_async(code) {
            found.push(format!("{}:{line}: {call}", f.display()));
        }
    }
    assert!(
        found.is_empty(),
        "blocking calls on an async worker (move them into spawn_blocking, or mark them \
         `// blocking-ok: why`):\n{}",
        found.join("\n")
    );
}

#[test]
fn test_blocking_in_async_finds_what_it_should() {
    let text = "async fn a() {\n    let x = std::fs::read(p);\n    tokio::task::spawn_blocking(move || {\n        std::fs::write(p, b);\n    })\n    .await;\n    // blocking-ok: a tiny read\n    let y = std::fs::read(q);\n    f.write_all(b).await;\n}\nfn b() {\n    std::fs::read(p);\n}\n";
    let found: Vec<usize> = blocking_in_async(text)
        .into_iter()
        .map(|(l, _)| l)
        .collect();
    assert_eq!(found, vec![2]);
}
