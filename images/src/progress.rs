//! Progress of pulls and imports, reported as events to whoever drives them (a CLI progress
//! display, the daemon's event stream). The library never prints.

use crate::digest::Digest;
use crate::unpack::UnpackStats;

/// One step of a pull or import.
#[derive(Debug, Clone)]
pub enum ProgressEvent {
    /// The manifest is known: these layers (digest, size) will be fetched or found.
    Resolved {
        name: String,
        manifest: Digest,
        layers: Vec<(Digest, u64)>,
    },
    /// A layer download started.
    LayerStart { digest: Digest, size: u64 },
    /// Bytes of a layer downloaded so far.
    LayerBytes {
        digest: Digest,
        done: u64,
        total: u64,
    },
    /// A layer blob is in the store (`cached`: it already was).
    LayerDone { digest: Digest, cached: bool },
    /// A layer is being unpacked.
    UnpackStart { digest: Digest },
    /// A layer is unpacked (`stats` is `None` if it already was).
    UnpackDone {
        digest: Digest,
        stats: Option<UnpackStats>,
    },
    /// The image is recorded under `name`.
    Done { name: String, manifest: Digest },
}

/// Receives progress events; called from several tasks at once.
pub trait Progress: Send + Sync {
    /// Handles one event.
    fn event(&self, event: ProgressEvent);
}

/// Discards progress.
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&self, _event: ProgressEvent) {}
}
