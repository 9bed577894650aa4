//! `agentd teardown`: removes what `agentd serve` set up on the host, for an uninstall or a
//! fresh start: every sandbox left (their shims, mounts, disks, cgroups), the veths and the
//! bridge, the firewall chain and its jump, the cgroup parents; the state dir (database,
//! images, logs) only with `--purge`. It reads the same flags, environment and config file as
//! `serve`, so it finds the same bridge and dirs, and refuses while that daemon runs.

use std::os::unix::net::UnixStream;

use agentd_runtime::{Runtime, SandboxCgroup};
use anyhow::{bail, Context};
use clap::Args;

use crate::daemon::config::{Config, ServeArgs};

/// `agentd teardown`.
#[derive(Debug, Args)]
pub struct TeardownArgs {
    /// Also remove the state dir: the database, tasks' results, images and logs.
    #[arg(long)]
    pub purge: bool,
    /// The daemon's settings (the same flags, environment and config file as `agentd serve`).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Runs `agentd teardown`; prints what it removed.
pub fn run(args: TeardownArgs) -> anyhow::Result<u8> {
    if !nix::unistd::geteuid().is_root() {
        bail!("agentd teardown needs root (it removes a bridge, firewall rules and cgroups)");
    }
    let config = Config::load(args.serve)?;
    if UnixStream::connect(&config.socket).is_ok() {
        bail!(
            "agentd is running (its socket {} answers): stop it first, then run teardown again",
            config.socket.display()
        );
    }
    let mut removed = Vec::new();
    let sandboxes = config.sandboxes_dir();
    if sandboxes.is_dir() {
        let runtime = Runtime::new(&sandboxes).with_cgroup_parent(config.cgroup_parent.clone());
        for id in runtime.list().context("cannot list the sandboxes")? {
            // A paused sandbox (or a warm pool's) is thawed first: frozen processes take no
            // signal, so the shim's delete would wait for them in vain. A cgroup without a
            // freezer state (gone, or never frozen) makes this a no-op.
            let _ = runtime.cgroup(&id).freeze(false);
            // The shim removes everything of a live sandbox; after a dead shim, cleanup does.
            let deleted = runtime.shim_alive(&id) && runtime.client(&id).delete().is_ok();
            if !deleted {
                runtime
                    .cleanup(&id)
                    .with_context(|| format!("cannot remove sandbox {id}"))?;
            }
            removed.push(format!("sandbox {id}"));
        }
    }
    // Dependency caches a crash left mounted (the sandboxes that used them are gone now).
    removed.extend(crate::cache::Caches::unmount_all(&config.state_dir));
    // Git volumes of a clone or push a crash interrupted.
    if let Ok(tasks) = std::fs::read_dir(config.state_dir.join("tasks")) {
        for t in tasks.flatten() {
            removed.extend(crate::workspace::remove_git_volumes(&t.path()));
        }
    }
    removed.extend(crate::net::Network::teardown(&config.bridge)?);
    removed.extend(
        SandboxCgroup::remove_parent_dirs(&config.cgroup_parent)
            .into_iter()
            .map(|d| format!("cgroup {}", d.display())),
    );
    let _ = std::fs::remove_file(&config.socket);
    if args.purge && config.state_dir.exists() {
        agentd_runtime::tree::remove_tree(&config.state_dir)
            .with_context(|| format!("cannot remove {}", config.state_dir.display()))?;
        removed.push(format!("state dir {}", config.state_dir.display()));
    }
    if removed.is_empty() {
        println!("nothing of agentd's was left on this host");
    }
    for r in &removed {
        println!("removed {r}");
    }
    Ok(0)
}
