//! agentd: the daemon and its command-line client.
//!
//! Layout:
//! - [`run`]: `agentd run`, the one-shot, daemonless mode for CI runners.
//! - [`image`]: `agentd image ...`, the image store (pull, import, export, ls, rm, prune).
//!
//! The daemon (`agentd serve`, HTTP API, OpenCode) builds on these; see the issues.

pub mod image;
pub mod run;
