//! `cargo xtask bench unpack`: unpacking a multi-layer Debian image (about 170 MB uncompressed,
//! 8,700 files, made with mmdebstrap and umoci) with agentd and with `umoci unpack`, side by
//! side and interleaved, on the same disk, from the same compressed blobs in the page cache.
//!
//! agentd makes every layer durable (one syncfs per layer) before it becomes visible; umoci
//! syncs nothing, so a third row times `umoci unpack` followed by `sync`. Before every run the
//! previous result is deleted and the disk synced, untimed.
//!
//! It also measures what the second sandbox of an already-unpacked image costs to get its
//! rootfs (lower dirs from the store + upper/work dirs + one overlay mount), for this image and
//! for a one-file busybox image: the cost should not grow with the image's size.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{cargo, output, run};

/// Measured runs per unpacker (each takes seconds).
const RUNS: usize = 5;
/// Image tag of the benchmark image in its layout.
const TAG: &str = "deb";

/// Runs the unpack benchmark and prints the table.
pub fn unpack() -> anyhow::Result<()> {
    for tool in ["umoci", "mmdebstrap"] {
        if which(tool).is_none() {
            bail!("{tool} not found (apt-get install {tool})");
        }
    }
    run(cargo().args(["build", "--release", "-p", "agentd", "--bin", "agentd"]))?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "agentd-images",
        "--example",
        "prepare_rootfs",
    ]))?;
    let release = crate::target_dir().join("release");
    let agentd = release.join("agentd");
    let bench = crate::target_dir().join("bench/unpack");
    fs::create_dir_all(&bench)?;
    let layout = debian_layout(&bench)?;
    let busybox = busybox_layout(&bench)?;

    let state = bench.join("state");
    let _ = fs::remove_dir_all(&state);
    let store = state.join("images");
    let agentd_image = |args: &[&str]| {
        let mut c = Command::new(&agentd);
        c.arg("image").arg("--state-dir").arg(&state).args(args);
        c
    };
    run(&mut agentd_image(&[
        "import",
        "--no-unpack",
        "--name",
        "bench:deb",
        &layout.to_string_lossy(),
    ]))?;
    run(&mut agentd_image(&[
        "import",
        "--name",
        "bench:busybox",
        &busybox.to_string_lossy(),
    ]))?;
    let uncompressed = du(&{
        run(&mut agentd_image(&["unpack", "bench:deb"]))?;
        store.join("layers")
    })?;

    let bundle = bench.join("umoci-bundle");
    let image = format!("{}:{TAG}", layout.display());
    let mut agentd_times = Vec::new();
    let mut umoci_times = Vec::new();
    let mut umoci_sync_times = Vec::new();
    for i in 0..RUNS {
        eprintln!("run {}/{RUNS}", i + 1);
        // agentd: drop the unpacked layers, keep the blobs.
        clear(&store.join("layers/sha256"))?;
        agentd_times.push(timed(
            agentd_image(&["unpack", "bench:deb"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?);
        clear(&bundle)?;
        umoci_times.push(timed(
            Command::new("umoci")
                .args(["unpack", "--image", &image])
                .arg(&bundle)
                .stdout(Stdio::null()),
        )?);
        clear(&bundle)?;
        umoci_sync_times.push(timed(Command::new("sh").arg("-c").arg(format!(
            "umoci unpack --image '{image}' '{}' >/dev/null && sync",
            bundle.display()
        )))?);
    }
    clear(&bundle)?;
    let _ = fs::remove_dir(&bundle);

    let a = median(&mut agentd_times);
    println!();
    println!(
        "unpack of a {}-layer Debian image ({:.0} MB unpacked), {RUNS} runs each, interleaved",
        layer_count(&layout)?,
        uncompressed as f64 / 1e6
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>18}",
        "unpacker", "median s", "min s", "max s", "ratio to agentd"
    );
    for (name, times) in [
        ("agentd image unpack", &mut agentd_times),
        ("umoci unpack", &mut umoci_times),
        ("umoci unpack + sync", &mut umoci_sync_times),
    ] {
        let m = median(times);
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>10.2} {:>18.2}",
            name,
            m.as_secs_f64(),
            times[0].as_secs_f64(),
            times[times.len() - 1].as_secs_f64(),
            m.as_secs_f64() / a.as_secs_f64()
        );
    }

    println!();
    println!("rootfs of one more sandbox of an unpacked image (lower dirs + upper/work + overlay mount), 200 runs");
    println!(
        "{:<28} {:>10} {:>10} {:>8} {:>12}",
        "image", "median ms", "p90 ms", "layers", "unpacked MB"
    );
    let prepare = release.join("examples/prepare_rootfs");
    for (name, image) in [
        ("debian (mmdebstrap)", "bench:deb"),
        ("busybox (one file)", "bench:busybox"),
    ] {
        let out = output(Command::new(&prepare).arg(&store).arg(image).arg("200"))?;
        let fields: Vec<f64> = out
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        let [median_us, p90_us, layers] = fields[..] else {
            bail!("prepare_rootfs printed {out:?}")
        };
        let json: serde_json::Value =
            serde_json::from_str(&output(&mut agentd_image(&["inspect", image]))?)?;
        let mut size = 0;
        for layer in json["layers"].as_array().context("inspect has layers")? {
            size += du(Path::new(
                layer["unpacked"].as_str().context("layer is unpacked")?,
            ))?;
        }
        println!(
            "{:<28} {:>10.3} {:>10.3} {:>8} {:>12.1}",
            name,
            median_us / 1000.0,
            p90_us / 1000.0,
            layers,
            size as f64 / 1e6
        );
    }
    Ok(())
}

/// The benchmark image: an mmdebstrap minbase root as layer 1; layer 2 deletes the docs
/// (whiteouts) and adds 1,000 files; layer 3 replaces the locales dir (opaque) and adds a file.
fn debian_layout(bench: &Path) -> anyhow::Result<PathBuf> {
    let layout = bench.join("debian.oci");
    if layout.join("index.json").exists() {
        return Ok(layout);
    }
    let tarball = bench.join("debian.tar");
    if !tarball.exists() {
        eprintln!(
            "building a Debian minbase root with mmdebstrap (once; cached in {})",
            bench.display()
        );
        let tmp = bench.join("debian.tar.tmp");
        run(Command::new("mmdebstrap")
            .args(["--variant=minbase", "--quiet", "bookworm"])
            .arg(&tmp))?;
        fs::rename(&tmp, &tarball)?;
    }
    let building = bench.join("debian.oci.tmp");
    let bundle = bench.join("debian.bundle");
    let _ = fs::remove_dir_all(&building);
    let _ = fs::remove_dir_all(&bundle);
    let image = format!("{}:{TAG}", building.display());
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&building))?;
    run(Command::new("umoci").args(["new", "--image", &image]))?;
    run(Command::new("umoci")
        .args(["raw", "add-layer", "--image", &image])
        .arg(&tarball))?;
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle)
        .stdout(Stdio::null()))?;
    let rootfs = bundle.join("rootfs");
    run(Command::new("sh")
        .arg("-ec")
        .arg("rm -rf usr/share/doc/* && mkdir -p opt/bench && for i in $(seq 1 1000); do echo $i > opt/bench/$i; done")
        .current_dir(&rootfs))?;
    run(Command::new("umoci")
        .args(["repack", "--refresh-bundle", "--image", &image])
        .arg(&bundle))?;
    run(Command::new("sh")
        .arg("-ec")
        .arg("rm -rf usr/share/locale && mkdir -p usr/share/locale && echo C > usr/share/locale/locale.alias && cp /bin/busybox opt/bench/busybox")
        .current_dir(&rootfs))?;
    run(Command::new("umoci")
        .args(["repack", "--refresh-bundle", "--image", &image])
        .arg(&bundle))?;
    fs::remove_dir_all(&bundle)?;
    fs::rename(&building, &layout)?;
    Ok(layout)
}

fn busybox_layout(bench: &Path) -> anyhow::Result<PathBuf> {
    let layout = bench.join("busybox.oci");
    if layout.join("index.json").exists() {
        return Ok(layout);
    }
    let busybox = which("busybox").context("busybox not found (apt-get install busybox-static)")?;
    let bundle = bench.join("busybox.bundle");
    let _ = fs::remove_dir_all(&layout);
    let _ = fs::remove_dir_all(&bundle);
    let image = format!("{}:{TAG}", layout.display());
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout))?;
    run(Command::new("umoci").args(["new", "--image", &image]))?;
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle)
        .stdout(Stdio::null()))?;
    fs::create_dir_all(bundle.join("rootfs/bin"))?;
    fs::copy(busybox, bundle.join("rootfs/bin/busybox"))?;
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle))?;
    fs::remove_dir_all(&bundle)?;
    Ok(layout)
}

fn layer_count(layout: &Path) -> anyhow::Result<usize> {
    let out = output(
        Command::new("umoci")
            .args(["stat", "--json", "--image"])
            .arg(format!("{}:{TAG}", layout.display())),
    )?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    Ok(json["history"]
        .as_array()
        .map_or(0, |h| h.iter().filter(|e| e["empty_layer"] != true).count()))
}

/// Deletes a tree (untimed) and syncs, so each run starts from a quiet disk.
fn clear(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        for entry in fs::read_dir(path)? {
            let p = entry?.path();
            if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
        }
        if path.ends_with("umoci-bundle") {
            fs::remove_dir(path)?;
        }
    }
    Command::new("sync").status()?;
    Ok(())
}

fn timed(cmd: &mut Command) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let took = started.elapsed();
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(took)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn du(path: &Path) -> anyhow::Result<u64> {
    let out = output(Command::new("du").args(["-sb"]).arg(path))?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du printed no size")
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .ok()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
