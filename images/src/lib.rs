//! OCI images for agentd. This crate never executes anything: it turns image references and
//! archives into verified blobs and unpacked layer directories that the runtime stacks as
//! overlayfs lower dirs.
//!
//! Layout:
//! - [`digest`]: sha256 digests, hashing readers and writers.
//! - [`reference`]: image references with Docker Hub's defaults.
//! - [`config`]: manifests, indexes and image configs (OCI and Docker schema 2).
//! - [`store`]: the content store (blobs, unpacked layers, the image index), locking, GC.
//! - [`unpack`]: layer tar -> directory, with whiteouts as overlayfs expects them.
//! - [`registry`]: pulls over the OCI distribution API.
//! - [`layout`]: OCI layout and docker-archive import, OCI layout export.
//! - [`progress`]: progress events for callers to display.

pub mod commit;
pub mod config;
pub mod digest;
pub mod layout;
pub mod progress;
pub mod reference;
pub mod registry;
pub mod store;
mod sys;
pub mod unpack;

pub use config::{ImageConfig, Platform};
pub use digest::Digest;
pub use layout::LayoutError;
pub use progress::{NoProgress, Progress, ProgressEvent};
pub use reference::Reference;
pub use registry::{PullError, PullOptions};
pub use store::{ImageRecord, ImageRootfs, Store, StoreError};
pub use unpack::{UnpackError, UnpackOptions, UnpackStats};

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    #[error(transparent)]
    Reference(#[from] reference::ReferenceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Unpack(#[from] UnpackError),
}
