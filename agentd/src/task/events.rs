//! A task's events log: JSON lines in `<state>/tasks/<id>/events.jsonl`, each with an id
//! (1, 2, ...) that SSE readers resume from. One writer thread appends the events of every
//! task in the order they were emitted, so no async worker ever waits on the file and ids
//! are file order; readers are woken after the line is written.
//!
//! Crash rules: a line is whole or torn; a torn last line is cut at the next start
//! ([`repair_events`]), and a task that finished just before a crash gets its
//! `task.finished` again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};

use crate::sandbox::now_ms;

/// Most bytes of a task's events file. Past it, only the events that tell the task's course
/// (states, checks, diffs, the end) are written; what an agent or its sandbox says or does
/// (`tool`, `error`, `message`, `setup.output`, `egress`, which a hostile sandbox could send
/// without end) is dropped, and one `events.dropped` event says so.
pub const MAX_EVENTS_BYTES: u64 = 64 << 20;

/// What a task's events file holds so far.
#[derive(Default)]
struct Counts {
    /// Its size, read from the file at the first event after a start.
    bytes: Option<u64>,
    /// Events dropped past [`MAX_EVENTS_BYTES`].
    dropped: u64,
}

impl Counts {
    /// The event to write for one of `kind` when the file holds `bytes`: itself, the one
    /// `events.dropped` notice, or nothing (dropped).
    fn admit<'a>(
        &mut self,
        bytes: u64,
        kind: &'a str,
        data: serde_json::Value,
    ) -> Option<(&'a str, serde_json::Value)> {
        if bytes < MAX_EVENTS_BYTES || !droppable(kind) {
            return Some((kind, data));
        }
        self.dropped += 1;
        (self.dropped == 1).then(|| {
            ("events.dropped", serde_json::json!({"message": format!(
                "the events log reached {MAX_EVENTS_BYTES} bytes: from here on only states, checks, diffs and the end are logged"
            )}))
        })
    }
}

/// A task's log, shared by the task and the writer thread.
pub(super) struct Log {
    /// The task's id.
    id: String,
    /// Id of the last event written; SSE readers wait on it.
    pub(super) tx: tokio::sync::watch::Sender<u64>,
    /// `task.finished` is in the log: readers past it end their streams.
    pub(super) finished: AtomicBool,
    /// Bytes and drops; only the writer thread takes it.
    counts: Mutex<Counts>,
}

impl Log {
    /// The log of task `id`, whose last event is `last`.
    pub(super) fn new(id: &str, last: u64) -> Log {
        Log {
            id: id.to_string(),
            tx: tokio::sync::watch::channel(last).0,
            finished: AtomicBool::new(false),
            counts: Mutex::new(Counts::default()),
        }
    }
}

/// One event on its way to a log.
struct Job {
    log: Arc<Log>,
    path: PathBuf,
    kind: String,
    data: serde_json::Value,
}

/// Most events waiting for the writer before what an agent says or does (`tool`, `error`,
/// `message`) is dropped at once: a sandbox whose OpenCode sends events faster than they are
/// written cannot grow agentd's memory. The events that tell a task's course are always
/// queued (a task has a bounded number of them).
const MAX_QUEUED: usize = 10_000;

/// Whether an event of `kind` is what an agent says or does (dropped first).
fn droppable(kind: &str) -> bool {
    matches!(
        kind,
        "tool" | "text" | "error" | "message" | "setup.output" | "egress"
    )
}

/// The handle of the writer thread (it ends when the handle is dropped).
pub(super) struct EventWriter {
    tx: std::sync::mpsc::Sender<Job>,
    /// Events sent and not yet written.
    queued: Arc<AtomicUsize>,
}

impl EventWriter {
    /// Starts the writer thread.
    pub(super) fn start() -> std::io::Result<EventWriter> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let writer = EventWriter {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
        };
        let queued = writer.queued.clone();
        std::thread::Builder::new()
            .name("agentd-events".into())
            .spawn(move || {
                for job in rx {
                    write(job);
                    queued.fetch_sub(1, Ordering::SeqCst);
                }
            })?;
        Ok(writer)
    }

    /// Queues an event for `task`'s log at `path` (or drops an agent's event while
    /// [`MAX_QUEUED`] wait).
    pub(super) fn send(&self, log: &Arc<Log>, path: PathBuf, kind: &str, data: serde_json::Value) {
        if droppable(kind) && self.queued.load(Ordering::SeqCst) >= MAX_QUEUED {
            tracing::debug!(task = %log.id, kind, "the events writer is behind: an agent event is dropped");
            return;
        }
        let job = Job {
            log: log.clone(),
            path,
            kind: kind.to_string(),
            data,
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(job).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            tracing::error!("the task events writer is gone: an event is lost");
        }
    }
}

/// Appends one event (`kind` plus the fields of `data`) and wakes the task's readers.
fn write(job: Job) {
    let task = &job.log;
    let mut log = task.counts.lock().expect("events counts lock");
    let bytes = *log
        .bytes
        .get_or_insert_with(|| std::fs::metadata(&job.path).map_or(0, |m| m.len()));
    let Some((kind, data)) = log.admit(bytes, &job.kind, job.data) else {
        return;
    };
    let seq = *task.tx.borrow() + 1;
    let mut ev = serde_json::json!({"id": seq, "type": kind, "time": now_ms()});
    if let (Some(obj), serde_json::Value::Object(extra)) = (ev.as_object_mut(), data) {
        obj.extend(extra);
    }
    let mut line = serde_json::to_vec(&ev).expect("an event serializes");
    line.push(b'\n');
    // Not created when the task's dir is gone (it was deleted meanwhile).
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&job.path)
        .and_then(|mut f| f.write_all(&line));
    match written {
        Ok(()) => log.bytes = Some(bytes + line.len() as u64),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::error!(task = %task.id, error = %e, "failed to write a task event");
            return;
        }
    }
    if kind == "task.finished" {
        task.finished.store(true, Ordering::SeqCst);
    }
    task.tx.send_replace(seq);
}

/// Truncates a torn last line of an events log (a crash mid-write); returns the last event's
/// id and type.
pub(super) fn repair_events(path: &Path) -> (u64, Option<String>) {
    let Ok(data) = std::fs::read(path) else {
        return (0, None);
    };
    let keep = data.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
    if keep < data.len() {
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
            let _ = f.set_len(u64::try_from(keep).unwrap_or(0));
        }
    }
    data[..keep]
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["id"].as_u64()?, v["type"].as_str().map(String::from))))
        .max_by_key(|(id, _)| *id)
        .unwrap_or((0, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the writer stuck (nobody receives), agent events stop being queued at
    /// MAX_QUEUED; the task's course events still are.
    #[test]
    fn test_a_writer_that_is_behind_drops_agent_events_only() {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let w = EventWriter {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
        };
        let log = Arc::new(Log::new("t", 0));
        let path = PathBuf::from("/nonexistent/events.jsonl");
        for _ in 0..MAX_QUEUED + 50 {
            w.send(&log, path.clone(), "tool", serde_json::json!({}));
        }
        w.send(&log, path.clone(), "message", serde_json::json!({}));
        w.send(&log, path.clone(), "attempt.state", serde_json::json!({}));
        w.send(&log, path, "task.finished", serde_json::json!({}));
        let kinds: Vec<String> = rx.try_iter().map(|j| j.kind).collect();
        assert_eq!(kinds.len(), MAX_QUEUED + 2);
        assert_eq!(&kinds[MAX_QUEUED..], ["attempt.state", "task.finished"]);
        assert_eq!(w.queued.load(Ordering::SeqCst), MAX_QUEUED + 2);
    }

    #[test]
    fn test_events_past_the_cap_keep_only_the_course() {
        let mut log = Counts::default();
        let v = serde_json::json!({});
        assert_eq!(log.admit(10, "tool", v.clone()).unwrap().0, "tool");
        let full = MAX_EVENTS_BYTES;
        assert_eq!(
            log.admit(full, "tool", v.clone()).unwrap().0,
            "events.dropped"
        );
        assert!(log.admit(full, "tool", v.clone()).is_none());
        assert!(log.admit(full, "message", v.clone()).is_none());
        assert_eq!(
            log.admit(full, "attempt.state", v.clone()).unwrap().0,
            "attempt.state"
        );
        assert_eq!(
            log.admit(full, "task.finished", v).unwrap().0,
            "task.finished"
        );
        assert_eq!(log.dropped, 3);
    }

    #[test]
    fn test_events_log_repair() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        std::fs::write(&p, "{\"id\":1}\n{\"id\":2}\n{\"id\":3,\"ty").unwrap();
        assert_eq!(repair_events(&p), (2, None));
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"id\":1}\n{\"id\":2}\n"
        );
        assert_eq!(repair_events(&dir.path().join("none")), (0, None));
    }
}
