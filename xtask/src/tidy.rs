//! Tidy checks, run by plain `cargo test`.
