//! What every listener of agentd (the API's socket and TCP port, the LLM gateway) does with
//! connections, so that no client can use up agentd's file descriptors: a cap on open
//! connections (one past it is accepted and closed at once), a header-read timeout (which is
//! also the idle timeout of a kept-alive connection: hyper starts it whenever it waits for a
//! request head), and a back-off with a rate-limited log line when accept itself fails (e.g.
//! EMFILE), instead of a loop that spins and floods the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a client may take to send a request's headers, and how long a kept-alive
/// connection may sit idle between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most open connections on the API's TCP listener.
pub const MAX_TCP_CONNECTIONS: usize = 512;
/// Most open connections on the API's Unix socket (root only, but a runaway script counts).
pub const MAX_UNIX_CONNECTIONS: usize = 512;
/// Most open connections to the LLM gateway, from all sandboxes.
pub const MAX_GATEWAY_CONNECTIONS: usize = 2048;
/// Most open connections to the LLM gateway from one sandbox (OpenCode uses a handful).
pub const MAX_GATEWAY_CONNECTIONS_PER_SANDBOX: usize = 32;
/// Longest pause after a failed accept.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per this interval about failed accepts or refused connections.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// One listener's connection cap and its bookkeeping.
pub struct Listener {
    /// Its name in logs.
    name: &'static str,
    /// One permit per open connection.
    slots: Arc<Semaphore>,
    /// Connections refused at the cap since the last log line.
    refused: AtomicU64,
    /// Accept errors since the last log line.
    failed: AtomicU64,
    /// When the last line was logged. A std mutex: read and set, never across an await.
    last_log: std::sync::Mutex<Option<Instant>>,
}

impl Listener {
    /// A listener named `name` with at most `max` open connections.
    pub fn new(name: &'static str, max: usize) -> Arc<Listener> {
        Arc::new(Listener {
            name,
            slots: Arc::new(Semaphore::new(max)),
            refused: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last_log: std::sync::Mutex::new(None),
        })
    }

    /// A slot for a new connection, or `None` at the cap (the caller closes it).
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.slots.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                self.maybe_log(None);
                None
            }
        }
    }

    /// Open connections now.
    pub fn open(&self, max: usize) -> usize {
        max - self.slots.available_permits()
    }

    /// After a failed accept: logs (rate-limited) and waits `backoff`, which doubles up to a
    /// second; a successful accept resets it to [`Backoff::default`].
    pub async fn accept_failed(&self, error: &std::io::Error, backoff: &mut Backoff) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.maybe_log(Some(error));
        tokio::time::sleep(backoff.0).await;
        backoff.0 = (backoff.0 * 2).min(MAX_BACKOFF);
    }

    fn maybe_log(&self, error: Option<&std::io::Error>) {
        let mut last = self.last_log.lock().expect("log lock");
        if last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let refused = self.refused.swap(0, Ordering::Relaxed);
        let failed = self.failed.swap(0, Ordering::Relaxed);
        match error {
            Some(e) => {
                tracing::warn!(listener = self.name, error = %e, failed, refused, "accept failed; backing off")
            }
            None => tracing::warn!(
                listener = self.name,
                refused,
                failed,
                "connection limit reached: closing new connections"
            ),
        }
    }
}

/// The pause before the next accept after a failure.
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(10))
    }
}

/// The HTTP/1 server settings every listener uses.
pub fn http1() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(1 << 20);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_cap_and_backoff() {
        let l = Listener::new("test", 2);
        let a = l.admit().unwrap();
        let _b = l.admit().unwrap();
        assert!(l.admit().is_none());
        assert_eq!(l.open(2), 2);
        drop(a);
        assert!(l.admit().is_some());
        let mut b = Backoff::default();
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        l.accept_failed(&e, &mut b).await;
        assert_eq!(b.0, Duration::from_millis(20));
        for _ in 0..10 {
            b.0 = (b.0 * 2).min(MAX_BACKOFF);
        }
        assert_eq!(b.0, MAX_BACKOFF);
    }
}
