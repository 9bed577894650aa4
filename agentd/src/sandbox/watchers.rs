//! Watched directories (E2B's filesystem watchers): inotify, from the host, on a directory of
//! a sandbox's as its processes see it. The directory (and, when recursive, each directory
//! below it) is opened with `openat2(RESOLVE_IN_ROOT)` below the sandbox's root and watched
//! through that descriptor (`/proc/self/fd/N`), so no link the sandbox planted leads the
//! watch out. Events are names relative to the watched directory.
//!
//! Owner: a watch ends when its reader goes (the stream's client, or the polled watcher's
//! removal or [`POLL_IDLE`] without a poll) or when its sandbox stops; its inotify descriptor
//! goes with it. Bounded: [`MAX_WATCHERS`] per sandbox, [`MAX_DIRS`] directories per watch,
//! [`MAX_QUEUED`] events waiting for a poll (older ones are dropped, and counted).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::fs::inotify::{self, ReadFlags, WatchFlags};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::{Manager, Sandbox};
use crate::error::Error;

/// Most watchers at once in one sandbox.
pub const MAX_WATCHERS: usize = 64;
/// Most directories one recursive watch follows.
pub const MAX_DIRS: usize = 4096;
/// Most events a polled watcher keeps until it is polled.
pub const MAX_QUEUED: usize = 10_000;
/// A polled watcher nobody polls for this long is removed.
pub const POLL_IDLE: Duration = Duration::from_secs(600);

/// What happened to a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    /// Created.
    Create,
    /// Written.
    Write,
    /// Removed.
    Remove,
    /// Renamed (from or to the name).
    Rename,
    /// Its mode or owner changed.
    Chmod,
}

/// One event: a name relative to the watched directory, and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The name, relative to the watched directory.
    pub name: String,
    /// What happened.
    pub kind: WatchKind,
}

/// A watcher whose events wait for polls.
struct Polled {
    sandbox: String,
    events: Arc<Mutex<(VecDeque<WatchEvent>, Instant)>>,
    /// Ends the watch when dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The polled watchers, by id.
#[derive(Default)]
pub struct Watchers {
    polled: Mutex<HashMap<String, Polled>>,
    /// Live watches per sandbox (streamed and polled).
    live: Mutex<HashMap<String, usize>>,
}

impl Watchers {
    /// The events of polled watcher `id` of sandbox `sandbox` since its last poll.
    pub fn poll(&self, sandbox: &str, id: &str) -> Result<Vec<WatchEvent>, Error> {
        let p = self.polled.lock().expect("lock");
        let w = p
            .get(id)
            .filter(|w| w.sandbox == sandbox)
            .ok_or_else(|| Error::NotFound(format!("no watcher {id} in sandbox {sandbox}")))?;
        let mut q = w.events.lock().expect("lock");
        q.1 = Instant::now();
        Ok(q.0.drain(..).collect())
    }

    /// Removes polled watcher `id` (its watch ends).
    pub fn remove(&self, sandbox: &str, id: &str) -> Result<(), Error> {
        let mut p = self.polled.lock().expect("lock");
        match p.get(id) {
            Some(w) if w.sandbox == sandbox => {
                p.remove(id);
                Ok(())
            }
            _ => Err(Error::NotFound(format!(
                "no watcher {id} in sandbox {sandbox}"
            ))),
        }
    }
}

/// The directories of one watch (its inotify descriptor is the caller's).
struct Watch {
    /// Watch descriptor -> directory relative to the watched one ("" for itself).
    dirs: HashMap<i32, PathBuf>,
    root: File,
    top: PathBuf,
    recursive: bool,
}

const FLAGS: WatchFlags = WatchFlags::CREATE
    .union(WatchFlags::CLOSE_WRITE)
    .union(WatchFlags::MODIFY)
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::ATTRIB)
    .union(WatchFlags::ONLYDIR)
    .union(WatchFlags::EXCL_UNLINK);

impl Watch {
    /// Watches `rel` (below the watched dir), and what is below it when recursive.
    fn add(&mut self, inot: BorrowedFd<'_>, rel: &Path) -> std::io::Result<()> {
        let mut todo = vec![rel.to_path_buf()];
        while let Some(rel) = todo.pop() {
            if self.dirs.len() >= MAX_DIRS {
                return Ok(());
            }
            let dir = super::fs::open_in_root(
                &self.root,
                &self.top.join(&rel),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )?;
            // The descriptor names the directory opened in the sandbox's root: no path of the
            // sandbox's is resolved on the host.
            let wd = inotify::add_watch(inot, format!("/proc/self/fd/{}", dir.as_raw_fd()), FLAGS)?;
            self.dirs.insert(wd, rel.clone());
            if self.recursive {
                let (entries, _) = super::fs::list_dir(&self.root, &self.top.join(&rel), MAX_DIRS)?;
                for e in entries.into_iter().filter(|e| e.kind == "dir") {
                    todo.push(rel.join(e.name));
                }
            }
        }
        Ok(())
    }

    /// The events read now (none when nothing is pending).
    fn read(&mut self, inot: BorrowedFd<'_>) -> std::io::Result<Vec<WatchEvent>> {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16 << 10];
        let mut out = Vec::new();
        let mut new_dirs = Vec::new();
        {
            let mut r = inotify::Reader::new(inot, &mut buf);
            loop {
                let ev = match r.next() {
                    Ok(ev) => ev,
                    Err(rustix::io::Errno::AGAIN) => break,
                    Err(e) => return Err(e.into()),
                };
                let flags = ev.events();
                if flags.contains(ReadFlags::IGNORED) {
                    self.dirs.remove(&ev.wd());
                    continue;
                }
                let (Some(dir), Some(name)) = (self.dirs.get(&ev.wd()), ev.file_name()) else {
                    continue;
                };
                let rel = dir.join(name.to_string_lossy().as_ref());
                let kind = if flags.contains(ReadFlags::CREATE) {
                    WatchKind::Create
                } else if flags.intersects(ReadFlags::DELETE) {
                    WatchKind::Remove
                } else if flags.intersects(ReadFlags::MOVED_FROM | ReadFlags::MOVED_TO) {
                    WatchKind::Rename
                } else if flags.contains(ReadFlags::ATTRIB) {
                    WatchKind::Chmod
                } else {
                    WatchKind::Write
                };
                if self.recursive
                    && flags.contains(ReadFlags::ISDIR)
                    && flags.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO)
                {
                    new_dirs.push(rel.clone());
                }
                out.push(WatchEvent {
                    name: rel.to_string_lossy().into_owned(),
                    kind,
                });
            }
        }
        for d in new_dirs {
            // Gone again, or a link swapped in: not followed.
            let _ = self.add(inot, &d);
        }
        Ok(out)
    }
}

impl Manager {
    /// Watches directory `path` of `sb` (its live root `root`), below it too when
    /// `recursive`; events come on the receiver until it is dropped or the sandbox stops.
    pub fn watch_dir(
        self: &Arc<Self>,
        sb: &Sandbox,
        root: File,
        path: PathBuf,
        recursive: bool,
    ) -> Result<mpsc::Receiver<WatchEvent>, Error> {
        let id = sb.snapshot().id;
        {
            let mut live = self.watchers.live.lock().expect("lock");
            let n = live.entry(id.clone()).or_default();
            if *n >= MAX_WATCHERS {
                return Err(Error::Quota(format!(
                    "sandbox {id} has {MAX_WATCHERS} watchers already"
                )));
            }
            *n += 1;
        }
        let done = |mgr: &Manager, id: &str| {
            let mut live = mgr.watchers.live.lock().expect("lock");
            if let Some(n) = live.get_mut(id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    live.remove(id);
                }
            }
        };
        let made = (|| -> std::io::Result<(AsyncFd<OwnedFd>, Watch)> {
            let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
            let mut w = Watch {
                dirs: HashMap::new(),
                root,
                top: path.clone(),
                recursive,
            };
            w.add(fd.as_fd(), Path::new(""))?;
            // SAFETY: the OwnedFd moves into the AsyncFd, stays open and names the same
            // inotify instance until the AsyncFd drops it.
            let afd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                .map_err(std::io::Error::from)?;
            Ok((afd, w))
        })();
        let (afd, mut w) = match made {
            Ok(w) => w,
            Err(e) => {
                done(self, &id);
                return Err(match e.raw_os_error() {
                    Some(libc::ENOENT) => {
                        Error::NotFound(format!("{}: no such directory", path.display()))
                    }
                    Some(libc::ENOTDIR) => {
                        Error::Invalid(format!("{} is not a directory", path.display()))
                    }
                    _ => Error::internal(format!("watching {}: {e}", path.display())),
                });
            }
        };
        let (tx, rx) = mpsc::channel(256);
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            'watch: loop {
                tokio::select! {
                    ready = afd.readable() => {
                        let Ok(mut guard) = ready else { break };
                        let events = match w.read(afd.get_ref().as_fd()) {
                            Ok(e) => e,
                            Err(_) => break,
                        };
                        guard.clear_ready();
                        for ev in events {
                            if tx.send(ev).await.is_err() {
                                break 'watch;
                            }
                        }
                    }
                    _ = tick.tick() => {
                        let live = me.get(&id).is_ok_and(|s| s.snapshot().state.is_live());
                        if tx.is_closed() || !live {
                            break;
                        }
                    }
                }
            }
            done(&me, &id);
        });
        Ok(rx)
    }

    /// A watcher whose events wait for [`Watchers::poll`]; its id.
    pub fn watch_dir_polled(
        self: &Arc<Self>,
        sb: &Sandbox,
        root: File,
        path: PathBuf,
        recursive: bool,
    ) -> Result<String, Error> {
        let mut rx = self.watch_dir(sb, root, path, recursive)?;
        let wid = super::random_hex(12);
        let events = Arc::new(Mutex::new((VecDeque::new(), Instant::now())));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        self.watchers.polled.lock().expect("lock").insert(
            wid.clone(),
            Polled {
                sandbox: sb.snapshot().id,
                events: events.clone(),
                _stop: stop,
            },
        );
        let me = self.clone();
        let w2 = wid.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tokio::select! {
                    ev = rx.recv() => {
                        let Some(ev) = ev else { break };
                        let mut q = events.lock().expect("lock");
                        if q.0.len() >= MAX_QUEUED {
                            q.0.pop_front();
                        }
                        q.0.push_back(ev);
                    }
                    _ = &mut stopped => break,
                    _ = tick.tick() => {
                        if events.lock().expect("lock").1.elapsed() > POLL_IDLE {
                            break;
                        }
                    }
                }
            }
            // The watch ended (its sandbox stopped, or nobody polls): so does the watcher.
            me.watchers.polled.lock().expect("lock").remove(&w2);
        });
        Ok(wid)
    }
}
