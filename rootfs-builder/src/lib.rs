//! rootfs-builder: builds the OCI images agentd runs, from TOML recipes, without Docker or any
//! daemon, reproducibly (sorted entries, fixed mtimes from `SOURCE_DATE_EPOCH`, normalised
//! owners, fixed gzip headers), writing through `agentd-images`' types.
//!
//! Layout:
//! - [`recipe`]: the recipe format, parsing and validation (errors name the line).
//! - [`layer`]: reproducible layer tars, and unpacking Debian packages into them.
//! - [`build`]: steps to layers (cached), config, manifest; output as an OCI layout, a tar of
//!   one, or into agentd's image store.
//! - [`lock`]: a step's `packages` resolved to their pinned closure in a lock file.
//! - [`embedded`]: the recipes compiled into the crate (agentd's default image).

pub mod build;
pub mod embedded;
pub mod layer;
pub mod lock;
pub mod recipe;

pub use build::{
    build, import_into, write_layout, write_store, BuildError, BuildEvent, BuildOptions, BuiltImage,
};
pub use recipe::{Recipe, RecipeError};
