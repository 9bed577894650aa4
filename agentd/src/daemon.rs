//! The wiring of the daemon: its configuration (flags, environment, TOML: one struct), `agentd
//! serve` (state, reconcile, listeners, shutdown) and `agentd teardown` (what serve set up on
//! the host, removed). Services read [`config::Config`]; nothing else here is theirs to use.

pub mod config;
pub mod serve;
pub mod teardown;
