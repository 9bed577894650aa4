//! `agentd serve`: load the config, open the state, reconcile, and serve the API and the LLM
//! gateway until SIGTERM or SIGINT. Shutting down leaves every sandbox running: their shims
//! are separate processes, and the next start reattaches to them.

use anyhow::Context;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use tokio::net::{TcpListener, UnixListener};

use crate::daemon::config::{Config, LogFormat, ServeArgs};
use crate::sandbox::Manager;

/// How long the runtime waits for blocking work when agentd stops.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The daemon's log: stderr, where a line that cannot be written (a full disk under a log
/// file) is dropped. An error here would make tracing-subscriber report it with `eprintln!`,
/// which panics when stderr fails: the thread that logged (a request, a lock holder) would
/// die with it.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Loads the config, installs the log subscriber and runs the daemon.
pub fn run(args: ServeArgs) -> anyhow::Result<u8> {
    let config = Config::load(args)?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr);
    let _ = match config.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "agentd serve needs root (it creates namespaces, cgroups, mounts and a bridge)"
        );
    }
    raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let result = rt.block_on(serve(config));
    // Blocking calls still under way (a shim call waiting for an exec to end) are not waited
    // for: the process exits, which releases the database, and the shims run on.
    rt.shutdown_timeout(SHUTDOWN_GRACE);
    result?;
    Ok(0)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let socket = config.socket.clone();
    let unix = bind_socket(&socket)?;
    let tcp = match config.listen {
        None => None,
        Some(addr) => {
            let token = load_or_make_token(&config)?;
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("failed to listen on {addr}"))?;
            tracing::info!(%addr, token_file = %config.token_file.display(), "API on TCP (bearer token required)");
            Some((l, token))
        }
    };
    if config.llm.is_empty() {
        tracing::warn!("no LLM upstream (--llm-base-url or --llm-upstream): OpenCode sandboxes and tasks will be refused until one is set");
    }
    let ssh = match config.ssh_listen {
        None => None,
        Some(addr) => {
            let key = crate::ssh::host_key(&config.state_dir)?;
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("failed to listen for SSH on {addr} (ssh_listen)"))?;
            Some((l, key))
        }
    };
    let mgr = tokio::task::spawn_blocking(move || Manager::new(config)).await??;
    mgr.reconcile().await?;
    let gw_addr = (mgr.net.bridge_addr, mgr.config.gateway_port);
    let gateway = TcpListener::bind(gw_addr).await.with_context(|| {
        format!(
            "failed to listen on the gateway address {}:{}",
            gw_addr.0, gw_addr.1
        )
    })?;
    tokio::spawn(crate::gateway::serve(mgr.clone(), gateway));
    let egress_addr = (mgr.net.bridge_addr, mgr.config.egress_port);
    let egress = TcpListener::bind(egress_addr).await.with_context(|| {
        format!(
            "failed to listen on the egress proxy address {}:{} (egress_port)",
            egress_addr.0, egress_addr.1
        )
    })?;
    tokio::spawn(crate::egress::serve(mgr.clone(), egress));
    if mgr.config.egress_open {
        let nat_addr = (mgr.net.bridge_addr, mgr.config.egress_nat_port);
        let what = || {
            format!(
                "failed to listen on network mode open's address {}:{} (egress_nat_port; egress_open = false turns the mode off)",
                nat_addr.0, nat_addr.1
            )
        };
        let nat = TcpListener::bind(nat_addr).await.with_context(what)?;
        let dns = tokio::net::UdpSocket::bind(nat_addr)
            .await
            .with_context(what)?;
        tokio::spawn(crate::egress::open::serve_tcp(mgr.clone(), nat));
        tokio::spawn(crate::egress::open::serve_dns(mgr.clone(), dns));
    }
    tokio::spawn(mgr.clone().reaper());
    if let Some((listener, key)) = ssh {
        tokio::spawn(crate::ssh::serve(mgr.clone(), listener, key));
    }
    let tasks = crate::task::TaskManager::new(mgr.clone())?;
    let _ = mgr.tasks.set(tasks.clone());
    tasks.reconcile().await?;
    tokio::spawn(tasks.reaper());
    tokio::spawn(mgr.clone().pool_keeper());
    // blocking-ok: one read of a sysfs file at start, before agentd serves anything.
    let ksm = std::fs::read_to_string("/sys/kernel/mm/ksm/run").unwrap_or_default();
    if mgr.config.memory_merge && ksm.trim() != "1" {
        tracing::warn!("memory_merge is on but the kernel's KSM is off, so nothing is merged: echo 1 > /sys/kernel/mm/ksm/run");
    }
    tracing::info!(socket = %socket.display(), state_dir = %mgr.config.state_dir.display(), "agentd serving");
    crate::api::serve(mgr.clone(), unix, tcp, shutdown_signal()).await;
    // blocking-ok: the listeners are closed; agentd is stopping.
    let _ = std::fs::remove_file(&socket);
    // Open streams end with a line saying why; a moment for those lines to go out.
    let _ = mgr.shutdown.send(true);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // What was written lazily (usage counters, today's LLM spend) is kept by a stop too.
    // blocking-ok: one commit; agentd is stopping.
    if let Err(e) = mgr.db.sync() {
        tracing::error!(error = %agentd_runtime::error_chain(&e), "failed to make the last usage counts durable");
    }
    tracing::info!("agentd stopped");
    Ok(())
}

/// Raises the open-files limit to its hard maximum: every sandbox costs agentd descriptors
/// (shim sockets, pipes, connections) and the usual soft limit of 1024 is soon reached.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => tracing::warn!(error = %e, soft, hard, "cannot raise the open-files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Binds the API socket: its dir is 0700, the socket 0600 (root only). A stale socket of a
/// dead agentd is replaced; a live one is an error.
fn bind_socket(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another agentd is serving on {} (stop it, or use --socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("failed to remove the stale {}", path.display()))?;
    }
    let l =
        UnixListener::bind(path).with_context(|| format!("failed to bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// The TCP bearer token: read from the token file, or made (random, 0600) if the file is
/// missing.
fn load_or_make_token(config: &Config) -> anyhow::Result<String> {
    let path = &config.token_file;
    if path.exists() {
        return crate::daemon::config::read_secret(path);
    }
    let token = crate::sandbox::random_hex(32);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_600()
        .open(path)
        .with_context(|| format!("failed to create the token file {}", path.display()))?;
    f.write_all(token.as_bytes())?;
    tracing::info!(token_file = %path.display(), "made a new API token");
    Ok(token)
}

trait Mode600 {
    fn mode_600(&mut self) -> &mut Self;
}

impl Mode600 for std::fs::OpenOptions {
    fn mode_600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}
