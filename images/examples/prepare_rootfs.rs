//! Measures what the second sandbox of an already-unpacked image costs to get its rootfs:
//! resolving the image's lower dirs in the store, making a per-sandbox upper and work dir, and
//! one overlayfs mount(2) (then unmounting and removing them, untimed). Used by
//! `cargo xtask bench unpack`; prints the median and p90 in microseconds.
//!
//! usage: prepare_rootfs STORE_DIR IMAGE RUNS

use std::time::{Duration, Instant};

use agentd_images::{Store, UnpackOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, store, image, runs] = args.as_slice() else {
        anyhow::bail!("usage: prepare_rootfs STORE_DIR IMAGE RUNS");
    };
    let runs: usize = runs.parse()?;
    let store = Store::open(store)?;
    let work = tempfile::tempdir()?;
    let mut times = Vec::with_capacity(runs);
    let mut layers = 0;
    for i in 0..runs {
        let dir = work.path().join(format!("sandbox-{i}"));
        let (upper, workdir, merged) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
        let started = Instant::now();
        let rootfs = store.rootfs(image, &UnpackOptions::default())?;
        for d in [&upper, &workdir, &merged] {
            std::fs::create_dir_all(d)?;
        }
        let lowers: Vec<String> = rootfs
            .lower_dirs
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lowers.join(":"),
            upper.display(),
            workdir.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )?;
        times.push(started.elapsed());
        layers = lowers.len();
        nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH)?;
        std::fs::remove_dir_all(&dir)?;
    }
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{} {} {layers}",
        us(times[runs / 2]),
        us(times[runs * 9 / 10])
    );
    Ok(())
}
