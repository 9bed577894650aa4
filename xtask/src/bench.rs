//! `cargo xtask bench start`: placeholder replaced below.

pub fn start() -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
