//! `agentd ui`: a one-use login link for the web UI, for the person at this host.

use std::path::PathBuf;

use clap::Args;
use hyper::Method;

use crate::cli::sandbox::{call, check};

/// `agentd ui`.
#[derive(Args)]
pub struct UiArgs {
    /// The daemon's API socket.
    #[arg(long, env = "AGENTD_SOCKET", default_value = crate::daemon::config::DEFAULT_SOCKET)]
    socket: PathBuf,
}

pub fn run(args: UiArgs) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let r = call(&args.socket, Method::POST, "/v1/ui/tickets", None, None).await?;
        let v = check(&r)?;
        println!("{}", v["url"].as_str().unwrap_or_default());
        eprintln!(
            "open it in a browser within {} s (it works once); later logins take agentd's token",
            v["expires_in_secs"]
        );
        Ok(0)
    })
}
