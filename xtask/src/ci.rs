//! `cargo xtask ci`: the full check, as CI runs it.

use crate::cargo;

/// rustfmt, clippy, every test on the host, then the cgroup v2 tests in a VM.
pub fn run() -> anyhow::Result<()> {
    crate::run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    crate::run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // One test at a time: the sandbox tests measure cpu and memory, and the machine has 2 cores.
    // Privileged end-to-end tests skip themselves on a machine that cannot run them; in CI
    // that is a failure instead.
    crate::run(
        cargo()
            .args(["test", "--workspace", "--", "--test-threads=1"])
            .env("AGENTD_E2E", "1"),
    )?;
    crate::vm::run()
}
