//! Detached processes: commands in a sandbox that outlive the request that started them
//! (E2B's background commands). Each has a number of its own (per sandbox), an optional tag,
//! its stdin (a pipe or its terminal) kept open for later input, and its output sent to
//! whoever follows it at the moment (none, one or several followers); output nobody follows
//! is dropped, as E2B's envd does. A follower that does not read holds the output back (the
//! process then waits on its pipe) rather than losing it. A process leaves the table when it
//! ends; it ends with its sandbox at the latest.
//!
//! Bounded: [`MAX_PER_SANDBOX`] processes per sandbox, [`MAX_FOLLOWERS`] followers each.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::{Manager, Sandbox};
use crate::error::Error;
use crate::exec::{ExecEnd, Pty, StartedExec, Stream};

/// Most detached processes at once in one sandbox.
pub const MAX_PER_SANDBOX: usize = 256;
/// Most followers of one process.
pub const MAX_FOLLOWERS: usize = 16;

/// What a detached process runs.
#[derive(Debug, Clone, Default)]
pub struct ProcSpec {
    /// The program.
    pub cmd: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub envs: BTreeMap<String, String>,
    /// Working directory (the sandbox's when `None`).
    pub cwd: Option<String>,
    /// A name to find it by.
    pub tag: Option<String>,
    /// Uid inside (the sandbox's user when `None`).
    pub uid: Option<u32>,
    /// A pipe for stdin (else /dev/null), unless it has a terminal.
    pub stdin: bool,
    /// A terminal of this size (cols, rows): stdin, stdout and stderr.
    pub pty: Option<(u16, u16)>,
}

/// What a follower gets.
#[derive(Debug, Clone)]
pub enum ProcEvent {
    /// Output on stdout.
    Stdout(Bytes),
    /// Output on stderr.
    Stderr(Bytes),
    /// Output of its terminal.
    Pty(Bytes),
    /// Its end (the last event).
    End(ExecEnd),
}

/// One detached process.
pub struct Proc {
    /// Its number in its sandbox.
    pub pid: u32,
    /// What it runs.
    pub spec: ProcSpec,
    /// The shim's id of it (for signals).
    exec_id: u64,
    /// Its input, until closed.
    stdin: tokio::sync::Mutex<Option<mpsc::Sender<Bytes>>>,
    /// Its terminal, if it has one.
    pty: Option<Pty>,
    /// Who follows its output now.
    followers: Mutex<Vec<mpsc::Sender<ProcEvent>>>,
    /// Its end, once it ended.
    end: watch::Sender<Option<ExecEnd>>,
}

impl Proc {
    /// Follows its output from now on; the last event is its end. `None` when it has as
    /// many followers as it takes.
    pub fn follow(&self) -> Option<mpsc::Receiver<ProcEvent>> {
        let (tx, rx) = mpsc::channel(16);
        let mut f = self.followers.lock().expect("lock");
        f.retain(|s| !s.is_closed());
        if f.len() >= MAX_FOLLOWERS {
            return None;
        }
        // Ended already: the end alone (and not while the end is being sent to the others).
        if let Some(end) = self.end.borrow().clone() {
            let _ = tx.try_send(ProcEvent::End(end));
            return Some(rx);
        }
        f.push(tx);
        Some(rx)
    }

    /// Sends bytes to its stdin (or its terminal); an error when its input is closed.
    pub async fn input(&self, data: Bytes) -> Result<(), Error> {
        let tx = self.stdin.lock().await.clone();
        match tx {
            Some(tx) => tx
                .send(data)
                .await
                .map_err(|_| Error::Conflict(format!("process {}'s input is closed", self.pid))),
            None => Err(Error::Conflict(format!(
                "process {} has no open stdin (start it with stdin)",
                self.pid
            ))),
        }
    }

    /// Closes its stdin (EOF). A terminal's input stays open: ^D is the terminal's EOF.
    pub async fn close_stdin(&self) {
        if self.pty.is_none() {
            self.stdin.lock().await.take();
        }
    }

    /// Resizes its terminal.
    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), Error> {
        match &self.pty {
            Some(p) => p
                .resize(cols, rows)
                .map_err(|e| Error::internal(format!("resizing the terminal: {e}"))),
            None => Err(Error::Invalid(format!(
                "process {} has no terminal",
                self.pid
            ))),
        }
    }

    /// Whether it has a terminal.
    pub fn has_pty(&self) -> bool {
        self.pty.is_some()
    }
}

/// The detached processes of every sandbox.
#[derive(Default)]
pub struct Procs {
    /// By sandbox id, then number. A std mutex: never held across an await.
    table: Mutex<HashMap<String, BTreeMap<u32, Arc<Proc>>>>,
    next: AtomicU32,
}

impl Procs {
    /// The live processes of sandbox `id`.
    pub fn list(&self, id: &str) -> Vec<Arc<Proc>> {
        self.table
            .lock()
            .expect("lock")
            .get(id)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Sandbox `id`'s process number `pid`, or the one tagged `tag`.
    pub fn find(&self, id: &str, pid: Option<u32>, tag: Option<&str>) -> Result<Arc<Proc>, Error> {
        let t = self.table.lock().expect("lock");
        let found = t.get(id).and_then(|m| match (pid, tag) {
            (Some(p), _) => m.get(&p).cloned(),
            (None, Some(tag)) => m
                .values()
                .find(|p| p.spec.tag.as_deref() == Some(tag))
                .cloned(),
            (None, None) => None,
        });
        found.ok_or_else(|| match (pid, tag) {
            (Some(p), _) => Error::NotFound(format!("no running process {p} in sandbox {id}")),
            (None, Some(t)) => {
                Error::NotFound(format!("no running process tagged {t:?} in sandbox {id}"))
            }
            (None, None) => Error::Invalid("name a process by pid or tag".into()),
        })
    }
}

impl Manager {
    /// Starts a detached process in `sb` (see the module's doc); `follow` gets its output from
    /// the start (so nothing it writes first is missed).
    pub async fn start_proc(
        self: &Arc<Self>,
        sb: &Arc<Sandbox>,
        spec: ProcSpec,
    ) -> Result<(Arc<Proc>, mpsc::Receiver<ProcEvent>), Error> {
        let id = sb.snapshot().id;
        if self.procs.list(&id).len() >= MAX_PER_SANDBOX {
            return Err(Error::Quota(format!(
                "sandbox {id} runs {MAX_PER_SANDBOX} processes started through the API already"
            )));
        }
        if let Some(tag) = &spec.tag {
            if self.procs.find(&id, None, Some(tag)).is_ok() {
                return Err(Error::Conflict(format!(
                    "a process tagged {tag:?} runs in sandbox {id} already"
                )));
            }
        }
        let mut args = vec![spec.cmd.clone()];
        args.extend(spec.args.iter().cloned());
        let request = agentd_runtime::ExecRequest {
            args,
            env: spec.envs.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: spec.cwd.as_ref().map(Into::into),
            uid: spec.uid,
        };
        let (started, pty): (StartedExec, Option<Pty>) = match spec.pty {
            Some((cols, rows)) => {
                let (s, p) = self
                    .start_pty_exec(sb, request, cols, rows)
                    .await
                    .map_err(Error::Unavailable)?;
                (s, Some(p))
            }
            None => (
                self.start_exec(&id, request, spec.stdin)
                    .await
                    .map_err(Error::Unavailable)?,
                None,
            ),
        };
        let (stdin_tx, stdin_rx) = if spec.stdin || pty.is_some() {
            let (tx, rx) = mpsc::channel::<Bytes>(16);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let pid = self.procs.next.fetch_add(1, Ordering::Relaxed) % 1_000_000 + 1;
        let proc = Arc::new(Proc {
            pid,
            spec,
            exec_id: started.exec_id(),
            stdin: tokio::sync::Mutex::new(stdin_tx),
            pty,
            followers: Mutex::new(Vec::new()),
            end: watch::channel(None).0,
        });
        let first = proc.follow().expect("a new process has no followers");
        self.procs
            .table
            .lock()
            .expect("lock")
            .entry(id.clone())
            .or_default()
            .insert(pid, proc.clone());
        let me = self.clone();
        let p = proc.clone();
        tokio::spawn(async move { me.follow_proc(id, p, started, stdin_rx).await });
        Ok((proc, first))
    }

    /// Reads a detached process's output to its followers until it ends.
    async fn follow_proc(
        self: Arc<Self>,
        id: String,
        proc: Arc<Proc>,
        started: StartedExec,
        stdin: Option<mpsc::Receiver<Bytes>>,
    ) {
        let (out_tx, mut out_rx) = mpsc::channel::<(Stream, Bytes)>(16);
        let run = self.run_exec(started, stdin, None, out_tx);
        tokio::pin!(run);
        let pty = proc.pty.is_some();
        let event = |stream: Stream, data: Bytes| match (pty, stream) {
            (true, _) => ProcEvent::Pty(data),
            (false, Stream::Stdout) => ProcEvent::Stdout(data),
            (false, Stream::Stderr) => ProcEvent::Stderr(data),
        };
        let mut open = true;
        let end = loop {
            tokio::select! {
                end = &mut run => break end,
                chunk = out_rx.recv(), if open => match chunk {
                    Some((s, d)) => send_all(&proc, event(s, d)).await,
                    None => open = false,
                },
            }
        };
        while let Ok((s, d)) = out_rx.try_recv() {
            send_all(&proc, event(s, d)).await;
        }
        // Out of the table first: a follow from now on gets the end alone.
        if let Some(m) = self.procs.table.lock().expect("lock").get_mut(&id) {
            m.remove(&proc.pid);
        }
        proc.end.send_replace(Some(end.clone()));
        send_all(&proc, ProcEvent::End(end)).await;
        proc.followers.lock().expect("lock").clear();
        let mut t = self.procs.table.lock().expect("lock");
        if t.get(&id).is_some_and(BTreeMap::is_empty) {
            t.remove(&id);
        }
    }

    /// Sends `signal` to a detached process of sandbox `id`.
    pub async fn signal_proc(&self, id: &str, proc: &Proc, signal: i32) -> Result<(), Error> {
        let client = self.runtime.client(id);
        let exec_id = proc.exec_id;
        tokio::task::spawn_blocking(move || client.kill_exec(exec_id, signal))
            .await
            .map_err(Error::internal)?
            .map_err(|e| Error::Conflict(format!("cannot signal process {}: {e}", proc.pid)))
    }
}

/// Sends one event to every follower still there (each at its own pace).
async fn send_all(proc: &Proc, ev: ProcEvent) {
    let followers: Vec<_> = proc.followers.lock().expect("lock").clone();
    for f in followers {
        let _ = f.send(ev.clone()).await;
    }
}
