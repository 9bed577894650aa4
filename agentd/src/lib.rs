//! agentd: the daemon and its command-line client.
//!
//! Layout:
//! - [`run`]: `agentd run`, the one-shot, daemonless mode for CI runners.
//! - [`image`]: `agentd image ...`, the image store (pull, import, export, ls, rm, prune).
//! - [`serve`]: `agentd serve`, the daemon: [`config`], [`db`] (state), [`sandbox`] (the
//!   manager), [`net`] (bridge and veths), [`opencode`] (the server in each sandbox),
//!   [`api`] (HTTP), [`gateway`] (the LLM gateway), [`metrics`], [`task`] (prompts handed to
//!   agents until their checks pass) and [`workspace`] (what a task's agents work on).
//! - [`client`]: `agentd sandbox ...`, the CLI client of the API; [`task_client`]:
//!   `agentd task ...`.

pub mod api;
pub mod client;
pub mod config;
pub mod db;
pub mod default_image;
pub mod exec;
pub mod gateway;
pub mod image;
pub mod metrics;
pub mod net;
pub mod opencode;
pub mod run;
pub mod sandbox;
pub mod serve;
pub mod task;
pub mod task_client;
pub mod walk;
pub mod workspace;
