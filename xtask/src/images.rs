//! `cargo xtask images [--store STATE_DIR]`: builds the recipes in `rootfs-builder/recipes/`
//! into agentd's image store (default `/var/lib/agentd`), each tagged with its recipe's name.

use std::path::PathBuf;

use anyhow::Context;

use crate::{cargo, project_root, run};

/// The recipes built, in order.
const RECIPES: &[&str] = &["minimal", "opencode", "python"];

/// Builds every recipe into the store.
pub fn images(args: &[&str]) -> anyhow::Result<()> {
    let store = match args {
        [] => PathBuf::from("/var/lib/agentd"),
        ["--store", dir] => PathBuf::from(dir),
        _ => anyhow::bail!("usage: cargo xtask images [--store STATE_DIR]"),
    };
    let root = project_root();
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "rootfs-builder",
        "--bin",
        "rootfs-builder",
    ]))?;
    let builder = crate::target_dir().join("release/rootfs-builder");
    for name in RECIPES {
        let recipe = root
            .join("rootfs-builder/recipes")
            .join(format!("{name}.toml"));
        run(std::process::Command::new(&builder)
            .arg("build")
            .arg(&recipe)
            .arg("--store")
            .arg(&store)
            .args(["--tag", name]))
        .with_context(|| format!("cannot build the {name} image"))?;
    }
    Ok(())
}
