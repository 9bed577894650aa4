//! agentd: the daemon and its command-line client.
//!
//! Layout:
//! - [`run`]: `agentd run`, the one-shot, daemonless mode for CI runners.
//!
//! The daemon (`agentd serve`, HTTP API, images, OpenCode) builds on these; see the issues.

pub mod run;
