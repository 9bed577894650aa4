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
        "net.rs",
        "db.rs",
        "metrics.rs",
        "default_image.rs",
        "image_spec.rs",
        "walk.rs",
        "error.rs",
        "http.rs",
    ];
    let skins = [
        "crate::api",
        "crate::cli",
        "crate::serve",
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
