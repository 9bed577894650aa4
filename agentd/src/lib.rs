//! agentd: the daemon and its command-line client.
//!
//! Services with two skins (see DESIGN.md):
//! - Services, which never import a skin (a tidy test checks it) and answer with
//!   [`error::Error`]: [`sandbox`] (the manager; [`sandbox::fs`] reaches into a rootfs without
//!   trusting it), [`exec`], [`task`] (prompts handed to agents until their checks pass),
//!   [`workspace`] (what a task's agents work on), [`opencode`] (the server in each sandbox),
//!   [`image_spec`] (what an image's config gives a sandbox), [`net`] (bridge and veths),
//!   [`db`] (state), [`metrics`], [`default_image`], [`walk`], [`text`], and [`http`] (body
//!   plumbing for everything that speaks HTTP).
//! - The HTTP skin: [`api`] (routes, wire forms, statuses from service errors) and the LLM
//!   [`gateway`] sandboxes talk to.
//! - The SSH skin, [`ssh`]: shells, commands, SFTP and port forwarding for OpenSSH and
//!   editors.
//! - The CLI skin, [`cli`]: [`cli::run`] (`agentd run`, daemonless, for CI runners),
//!   [`cli::image`] (`agentd image ...`), [`cli::sandbox`] (`agentd sandbox ...`),
//!   [`cli::task`] (`agentd task ...`).
//! - The wiring, [`daemon`]: [`daemon::serve`] (`agentd serve`: listeners, shutdown),
//!   [`daemon::config`] (one struct for flags, environment and TOML, which the services
//!   read), and [`daemon::teardown`] (`agentd teardown`: removes what `serve` set up).

pub mod agent_layer;
pub mod api;
pub mod cache;
pub mod cli;
pub mod daemon;
pub mod db;
pub mod default_image;
pub mod egress;
pub mod error;
pub mod exec;
pub mod gateway;
pub mod http;
pub mod image_spec;
pub mod metrics;
pub mod net;
pub mod opencode;
pub mod sandbox;
pub mod ssh;
pub mod task;
pub mod text;
pub mod walk;
pub mod workspace;
