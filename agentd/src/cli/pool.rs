//! `agentd pool`: read the warm pools, or set one's size (`agentd pool opencode 4`).

use std::path::PathBuf;

use clap::Args;
use hyper::Method;

use crate::cli::sandbox::{call, check};

/// `agentd pool [IMAGE SIZE]`.
#[derive(Args)]
pub struct PoolArgs {
    /// The daemon's API socket.
    #[arg(long, env = "AGENTD_SOCKET", default_value = crate::daemon::config::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The image whose pool to set (with SIZE); without it, every pool is listed.
    image: Option<String>,
    /// Sandboxes to keep started ahead (0 empties the pool).
    #[arg(requires = "image")]
    size: Option<u32>,
}

pub fn run(args: PoolArgs) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let v = match (&args.image, args.size) {
            (Some(image), Some(size)) => {
                let body = serde_json::to_vec(&serde_json::json!({"image": image, "size": size}))?;
                let r = call(
                    &args.socket,
                    Method::PUT,
                    "/v1/pools",
                    Some((body, "application/json")),
                    None,
                )
                .await?;
                serde_json::json!({"pools": [check(&r)?]})
            }
            (Some(_), None) => anyhow::bail!("give the pool's size too: agentd pool IMAGE SIZE"),
            _ => check(&call(&args.socket, Method::GET, "/v1/pools", None, None).await?)?,
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(0);
        }
        println!(
            "{:<30} {:>5} {:>6} {:>9} {:>7} {:>7} {:>11}  LAST ERROR",
            "IMAGE", "SIZE", "READY", "STARTING", "HITS", "MISSES", "REFILL MS"
        );
        for p in v["pools"].as_array().into_iter().flatten() {
            println!(
                "{:<30} {:>5} {:>6} {:>9} {:>7} {:>7} {:>11}  {}",
                p["image"].as_str().unwrap_or_default(),
                p["size"],
                p["ready"],
                p["starting"],
                p["hits"],
                p["misses"],
                p["last_refill_ms"]
                    .as_u64()
                    .map_or("-".into(), |m| m.to_string()),
                p["last_error"]
                    .as_str()
                    .map(String::from)
                    .or_else(|| p["last_warm_up_error"]
                        .as_str()
                        .map(|e| format!("warm-up: {e} (pooled cold)")))
                    .unwrap_or_default()
            );
        }
        Ok(0)
    })
}
