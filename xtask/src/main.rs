//! Project automation, run as `cargo xtask <command>`:
//!
//! - `ci`: everything CI checks: rustfmt, clippy with `-D warnings`, the whole test suite (as
//!   root, cgroup v1 or v2, whatever the host has), then `vm-test`.
//! - `vm-test`: the cgroup and isolation tests again inside a throw-away pure cgroup v2 VM
//!   (QEMU with software emulation, a Debian kernel, a busybox initramfs).
//! - `bench start`: create+start+wait+delete of `/bin/true`, agentd against crun, runc, bwrap.
//! - `bench unpack`: unpacking a multi-layer Debian image, agentd against `umoci unpack`.
//! - `bench sandbox`: the daemon: create latency against crun, OpenCode readiness against a
//!   bare `opencode serve`, memory per sandbox, 50 creates at once.
//! - `bench pool`: create -> OpenCode ready claimed from a warm pool against a cold create,
//!   and a one-round task with an instant LLM with and without the pool.
//! - `bench density`: host memory per idle OpenCode sandbox (running, paused), as it is,
//!   with a small JavaScriptCore heap, and with KSM page merging.
//! - `images`: builds the recipes of `rootfs-builder/recipes/` into agentd's image store.
//!
//! xtask uses no product crate: it shells out to cargo, qemu and the peers.

mod bench;
mod bench_density;
mod bench_pool;
mod bench_sandbox;
mod bench_setup;
mod bench_unpack;
mod ci;
mod images;
mod vm;

#[cfg(test)]
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

const USAGE: &str =
    "usage: cargo xtask <ci | vm-test | bench start | bench unpack | bench sandbox | bench pool | bench density | bench setup | images [--store DIR]>";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["ci"] => ci::run(),
        ["vm-test"] => vm::run(),
        ["bench", "start"] => bench::start(),
        ["bench", "unpack"] => bench_unpack::unpack(),
        ["bench", "sandbox"] => bench_sandbox::sandbox(),
        ["bench", "pool"] => bench_pool::pool(),
        ["bench", "density"] => bench_density::density(),
        ["bench", "setup"] => bench_setup::setup(),
        ["images", rest @ ..] => images::images(rest),
        ["bench", ..] => bail!("unknown benchmark; {USAGE}"),
        _ => bail!("{USAGE}"),
    }
}

/// The workspace root.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
}

/// Where cargo puts its builds: `CARGO_TARGET_DIR` (relative to the project's root when
/// relative), else `target/` in it.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => project_root().join(d),
        _ => project_root().join("target"),
    }
}

/// The cargo that runs us.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(project_root());
    c
}

/// Runs a command, failing with its name when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("$ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed with {status}", show(cmd));
    }
    Ok(())
}

/// Runs a command and returns its stdout.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed with {}: {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Builds the static probe that runs inside sandboxes; returns its path.
pub fn build_probe() -> anyhow::Result<PathBuf> {
    let target = project_root().join("target").join("probe");
    run(cargo()
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "agentd-probe",
            "--target-dir",
        ])
        .arg(&target)
        .env("RUSTFLAGS", "-C target-feature=+crt-static"))?;
    Ok(target.join("release").join("agentd-probe"))
}
