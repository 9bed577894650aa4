//! The `agentd` binary: subcommands over the library. Errors print as one line and map to
//! exit status 125, so they never look like the sandboxed command's own status.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// agentd: a self-hostable sandbox runtime for AI coding agents.
#[derive(Parser)]
#[command(name = "agentd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one command in a sandbox made from a rootfs dir or an image (no daemon needed).
    Run(Box<agentd::cli::run::RunArgs>),
    /// Manage OCI images: pull, import, export, ls, inspect, rm, prune, verify.
    Image(agentd::cli::image::ImageArgs),
    /// Run the daemon: the HTTP API, sandboxes with OpenCode, the LLM gateway.
    Serve(Box<agentd::daemon::config::ServeArgs>),
    /// Manage sandboxes through a running daemon.
    Sandbox(agentd::cli::sandbox::SandboxArgs),
    /// Hand a prompt and a workspace to agents through a running daemon; see their results.
    Task(agentd::cli::task::TaskArgs),
    /// Warm pools: list them, or keep SIZE sandboxes of IMAGE started ahead
    /// (`agentd pool opencode 4`).
    Pool(agentd::cli::pool::PoolArgs),
    /// The LLM gateway: upstreams (never their keys), prices, budgets, today's spend.
    Llm(agentd::cli::llm::LlmArgs),
    /// Print a one-use login link for the web UI (agentd serve --listen serves it).
    Ui(agentd::cli::ui::UiArgs),
    /// Remove what `agentd serve` set up on this host (sandboxes, bridge, firewall chain,
    /// cgroups; the state dir too with --purge). The daemon must be stopped.
    Teardown(Box<agentd::daemon::teardown::TeardownArgs>),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            if !e.use_stderr() {
                // --help and --version.
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line, as every other agentd error: clap's first line names the problem.
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("agentd: {first} (see agentd --help)");
            return ExitCode::from(agentd::cli::run::EXIT_AGENTD_ERROR);
        }
    };
    if let Command::Serve(args) = cli.command {
        return match agentd::daemon::serve::run(*args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("agentd: {e:#}");
                ExitCode::from(agentd::cli::run::EXIT_AGENTD_ERROR)
            }
        };
    }
    // A CLI whose output goes to a pipe that closes (`agentd image ls | head`) ends quietly,
    // as other command-line tools do, instead of panicking in println!.
    // SAFETY: signal() with SIG_DFL installs no handler code; it runs before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AGENTD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(args) => agentd::cli::run::run(*args),
        Command::Image(args) => agentd::cli::image::run(args),
        Command::Sandbox(args) => agentd::cli::sandbox::run(args),
        Command::Task(args) => agentd::cli::task::run(args),
        Command::Ui(args) => agentd::cli::ui::run(args),
        Command::Pool(args) => agentd::cli::pool::run(args),
        Command::Llm(args) => agentd::cli::llm::run(args),
        Command::Teardown(args) => agentd::daemon::teardown::run(*args),
        Command::Serve(_) => unreachable!("handled above"),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("agentd: {e:#}");
            ExitCode::from(agentd::cli::run::EXIT_AGENTD_ERROR)
        }
    }
}
