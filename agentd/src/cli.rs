//! The CLI skin: each command of the `agentd` binary that is not the daemon. `run` works
//! without a daemon (CI runners); `image` works on the image store directly; `sandbox` and
//! `task` are clients of the daemon's API over its socket (or TCP with a token).

mod apply;
pub mod image;
pub mod llm;
pub mod pool;
pub mod run;
pub mod sandbox;
pub mod task;
mod terminal;
pub mod ui;
