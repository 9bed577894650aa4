//! Where a sandbox's cgroups live, what they report, and how to remove them when their owner is
//! gone.
//!
//! libcontainer creates the cgroups and writes the limits (its v1 manager on hybrid hosts like
//! ours, its v2 manager on a pure unified host). This module reads them back (stats, OOM
//! kills), changes a running sandbox's limits, freezes it, and removes leftovers of sandboxes whose shim died. It only ever touches directories
//! under our project parent (`<root>/<controller>/<parent>/<id>` on v1, `<root>/<parent>/<id>`
//! on v2), never a cgroup someone else created.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The cgroup parent every sandbox cgroup is created under.
pub const DEFAULT_CGROUP_PARENT: &str = "agentd";

/// Where cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How long [`remove`] waits for a cgroup's processes to die before giving up.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors from reading or removing cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file could not be read or written.
    #[error("cgroup file {path} failed")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Processes stayed in the cgroup after being killed.
    #[error("processes remain in cgroup {0} after SIGKILL")]
    Busy(PathBuf),
    /// The freezer did not reach the state asked for in time.
    #[error("the freezer {0} did not finish in time")]
    Freeze(PathBuf),
}

type Result<T> = std::result::Result<T, CgroupError>;

/// Which cgroup interface the host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupVersion {
    /// Legacy or hybrid: one hierarchy per controller.
    V1,
    /// Pure unified hierarchy.
    V2,
}

/// Detects the host's cgroup setup the way libcontainer does: unified only when the root itself
/// is a cgroup2 mount.
pub fn detect() -> CgroupVersion {
    if Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    }
}

/// Starts, on a thread of its own, the kernel's wait that the sandbox's first cgroup move would
/// otherwise pay on its critical path, and returns at once.
///
/// On cgroup v1 every write to `cgroup.procs` or `tasks` takes the threadgroup rwsem for
/// writing, and after a quiet spell that first waits an RCU grace period (`rcu_sync_enter`:
/// 7.8 ms median here, 6-16 ms); the lock then stays on its slow path until a grace period after
/// the last move, so moves close together wait once. libcontainer's first move (the
/// intermediate process into the sandbox's cgroups) comes 6-8 ms after `agentd run` or a
/// create begins (the shim's start, libcontainer's mount lookups), so a move made now has
/// served most of the wait by then.
///
/// The thread moves itself (`tasks`: one thread, not its process) into the sandboxes' parent
/// cgroup of one v1 hierarchy, under the project parent we own, and exits there; nothing else
/// of the caller moves and no cgroup of someone else is written. It creates nothing: where the
/// parent does not exist yet (the first sandbox under it), the move fails and the sandbox's
/// own move waits, so a run that fails before its sandbox exists leaves no cgroup behind.
/// Skipped on a v2 host (a parent with controllers enabled holds no tasks; not
/// measured there), for a parent that is not a plain relative path, and when the write fails
/// (not root): then the sandbox's own move waits, as before.
///
/// One such thread at a time: while one waits, the kernel's wait has begun and another would
/// add a thread and nothing else, so a flood of creates starts no more than one. The writer
/// holds the cgroup mutex through the grace period (so cgroup mkdir and rmdir on the host wait
/// meanwhile), as libcontainer's own move does: this moves that hold earlier, it adds none.
pub fn prime_attach(parent: &str) {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    use std::sync::atomic::{AtomicBool, Ordering};
    static PRIMING: AtomicBool = AtomicBool::new(false);
    // Only below a parent of ours: an empty one would be the hierarchy's root cgroup.
    let plain = Path::new(parent)
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if detect() != CgroupVersion::V1 || parent.is_empty() || !plain {
        return;
    }
    let Some(dir) = ["pids", "freezer", "devices"]
        .iter()
        .map(|c| Path::new(CGROUP_ROOT).join(c))
        .find(|root| root.join("tasks").exists())
        .map(|root| root.join(parent))
    else {
        return;
    };
    if PRIMING.swap(true, Ordering::AcqRel) {
        return;
    }
    // The thread starts with every signal blocked, so that none meant for the process (the
    // Ctrl-C that `agentd run` forwards to its shim) is taken by it.
    let mut old = SigSet::empty();
    let blocked = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), Some(&mut old));
    let spawned = thread::Builder::new()
        .name("cgroup-prime".into())
        .spawn(move || {
            let moved = fs::write(dir.join("tasks"), nix::unistd::gettid().to_string());
            PRIMING.store(false, Ordering::Release);
            if let Err(e) = moved {
                tracing::debug!(dir = %dir.display(), "cgroup move ahead failed: {e}");
            }
        });
    if blocked.is_ok() {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
    if let Err(e) = spawned {
        PRIMING.store(false, Ordering::Release);
        tracing::debug!("cannot start the cgroup move ahead: {e}");
    }
}

/// The v1 controllers a sandbox's limits and stats use.
const V1_CONTROLLERS: [&str; 8] = [
    "memory", "cpu", "cpuacct", "pids", "cpuset", "devices", "freezer", "blkio",
];

/// The cgroups of one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxCgroup {
    version: CgroupVersion,
    /// `<parent>/<id>`, relative to a hierarchy root.
    rel: PathBuf,
}

/// Resource usage read back from a sandbox's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Memory in use now, bytes (page cache included, as the limit counts it).
    pub memory_bytes: u64,
    /// Highest memory use seen, bytes, where the kernel reports it.
    pub memory_peak_bytes: Option<u64>,
    /// CPU time used by all processes, microseconds.
    pub cpu_usec: u64,
    /// Number of tasks now.
    pub pids: u64,
    /// Times the kernel throttled the sandbox for exceeding its cpu quota.
    pub cpu_throttled_periods: u64,
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_u64(path: &Path) -> Result<u64> {
    let s = read(path)?;
    s.trim().parse().map_err(|_| CgroupError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a number: {:?}", s.trim()),
        ),
    })
}

/// The value of `key` in a flat keyed file such as `memory.events` or `cpu.stat`.
fn keyed(path: &Path, key: &str) -> Result<Option<u64>> {
    Ok(read(path)?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    }))
}

impl SandboxCgroup {
    /// The cgroups of sandbox `id` under `parent`, on this host's cgroup version.
    pub fn new(parent: &str, id: &str) -> Self {
        SandboxCgroup {
            version: detect(),
            rel: Path::new(parent).join(id),
        }
    }

    /// The cgroup version in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    fn v1(&self, controller: &str) -> PathBuf {
        Path::new(CGROUP_ROOT).join(controller).join(&self.rel)
    }

    fn v2(&self) -> PathBuf {
        Path::new(CGROUP_ROOT).join(&self.rel)
    }

    /// Every cgroup directory of this sandbox that exists now.
    pub fn existing_dirs(&self) -> Vec<PathBuf> {
        let candidates = match self.version {
            CgroupVersion::V2 => vec![self.v2()],
            CgroupVersion::V1 => {
                let mut dirs: Vec<PathBuf> = V1_CONTROLLERS.iter().map(|c| self.v1(c)).collect();
                // A v2 mount next to v1 (hybrid) may hold a cgroup too.
                dirs.push(Path::new(CGROUP_ROOT).join("unified").join(&self.rel));
                dirs
            }
        };
        let mut out: Vec<PathBuf> = Vec::new();
        for d in candidates {
            // cpu and cpuacct are often one hierarchy behind two symlinks; count it once.
            let real = fs::canonicalize(&d).unwrap_or(d.clone());
            if d.is_dir()
                && !out
                    .iter()
                    .any(|o| fs::canonicalize(o).ok().as_ref() == Some(&real))
            {
                out.push(d);
            }
        }
        out
    }

    /// Reads current usage.
    pub fn stats(&self) -> Result<Stats> {
        match self.version {
            CgroupVersion::V1 => {
                let mem = self.v1("memory");
                let throttled =
                    keyed(&self.v1("cpu").join("cpu.stat"), "nr_throttled").unwrap_or(None);
                Ok(Stats {
                    memory_bytes: read_u64(&mem.join("memory.usage_in_bytes"))?,
                    memory_peak_bytes: read_u64(&mem.join("memory.max_usage_in_bytes")).ok(),
                    cpu_usec: read_u64(&self.v1("cpuacct").join("cpuacct.usage"))? / 1000,
                    pids: read_u64(&self.v1("pids").join("pids.current"))?,
                    cpu_throttled_periods: throttled.unwrap_or(0),
                })
            }
            CgroupVersion::V2 => {
                let dir = self.v2();
                let cpu_stat = dir.join("cpu.stat");
                Ok(Stats {
                    memory_bytes: read_u64(&dir.join("memory.current"))?,
                    memory_peak_bytes: read_u64(&dir.join("memory.peak")).ok(),
                    cpu_usec: keyed(&cpu_stat, "usage_usec")?.unwrap_or(0),
                    pids: read_u64(&dir.join("pids.current"))?,
                    cpu_throttled_periods: keyed(&cpu_stat, "nr_throttled")?.unwrap_or(0),
                })
            }
        }
    }

    /// Freezes (`true`) or thaws the sandbox's processes and waits until the kernel says it
    /// is done (a frozen sandbox runs nothing and writes nothing): v1's `freezer.state`, v2's
    /// `cgroup.freeze`. A freeze not done within [`KILL_TIMEOUT`] is undone and an error.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        let (file, value) = match self.version {
            CgroupVersion::V1 => (
                self.v1("freezer").join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            ),
            CgroupVersion::V2 => (
                self.v2().join("cgroup.freeze"),
                if frozen { "1" } else { "0" },
            ),
        };
        fs::write(&file, value).map_err(|source| CgroupError::Io {
            path: file.clone(),
            source,
        })?;
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            // v1 says FREEZING until every task is frozen; v2 says so in cgroup.events.
            let done = match self.version {
                CgroupVersion::V1 => read(&file)?.trim() == value,
                CgroupVersion::V2 => {
                    keyed(&self.v2().join("cgroup.events"), "frozen")? == Some(u64::from(frozen))
                }
            };
            if done {
                return Ok(());
            }
            if Instant::now() > deadline {
                if frozen {
                    let _ = self.freeze(false);
                }
                return Err(CgroupError::Freeze(file));
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Changes the limits of a running sandbox (a warm pool's sandbox taken by a create with
    /// limits of its own): memory (no swap, as at create), cpus (`None`: no quota) and pids.
    /// A memory limit below what the sandbox uses now fails (EBUSY on v1 after reclaim; v2
    /// would OOM-kill, so it is refused here first), and nothing is changed then.
    pub fn set_limits(&self, memory_bytes: u64, cpus: Option<f64>, pids: u64) -> Result<()> {
        let write = |path: PathBuf, value: String| {
            fs::write(&path, &value).map_err(|source| CgroupError::Io { path, source })
        };
        let period = crate::spec::DEFAULT_CPU_PERIOD_US;
        #[allow(clippy::cast_possible_truncation)] // validated to 0.01..=1024 cores
        let quota = cpus.map(|c| (c * period as f64).round() as i64);
        match self.version {
            CgroupVersion::V1 => {
                let mem = self.v1("memory");
                let limit = mem.join("memory.limit_in_bytes");
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                // The kernel keeps limit <= memsw at every step: raise memsw first when
                // growing, the limit first when shrinking.
                let growing = read_u64(&limit)? <= memory_bytes;
                let has_memsw = memsw.exists();
                if growing && has_memsw {
                    write(memsw.clone(), memory_bytes.to_string())?;
                }
                write(limit, memory_bytes.to_string())?;
                if !growing && has_memsw {
                    write(memsw, memory_bytes.to_string())?;
                }
                let cpu = self.v1("cpu");
                write(cpu.join("cpu.cfs_period_us"), period.to_string())?;
                write(
                    cpu.join("cpu.cfs_quota_us"),
                    quota.unwrap_or(-1).to_string(),
                )?;
                write(self.v1("pids").join("pids.max"), pids.to_string())
            }
            CgroupVersion::V2 => {
                let dir = self.v2();
                if read_u64(&dir.join("memory.current"))? > memory_bytes {
                    return Err(CgroupError::Io {
                        path: dir.join("memory.max"),
                        source: io::Error::from_raw_os_error(libc::EBUSY),
                    });
                }
                write(dir.join("memory.max"), memory_bytes.to_string())?;
                let _ = write(dir.join("memory.swap.max"), "0".into());
                write(
                    dir.join("cpu.max"),
                    match quota {
                        Some(q) => format!("{q} {period}"),
                        None => format!("max {period}"),
                    },
                )?;
                write(dir.join("pids.max"), pids.to_string())
            }
        }
    }

    /// How many times the kernel's OOM killer killed a process of this sandbox.
    pub fn oom_kills(&self) -> Result<u64> {
        let (path, key) = match self.version {
            CgroupVersion::V1 => (self.v1("memory").join("memory.oom_control"), "oom_kill"),
            CgroupVersion::V2 => (self.v2().join("memory.events"), "oom_kill"),
        };
        Ok(keyed(&path, key)?.unwrap_or(0))
    }

    /// Kills every process left in the sandbox's cgroups and removes the directories. Used when
    /// the shim that owned the sandbox died; the normal path is libcontainer's delete.
    pub fn remove(&self) -> Result<()> {
        let dirs = self.existing_dirs();
        if dirs.is_empty() {
            return Ok(());
        }
        self.kill_all()?;
        for d in &dirs {
            tracing::debug!(path = %d.display(), "rmdir cgroup");
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CgroupError::Io {
                        path: d.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Removes the empty cgroup dirs of `parent` (a relative path like `agentd/serve`) under
    /// every controller, deepest component first; returns those removed. A dir that still
    /// holds cgroups (a live sandbox, another agentd's parent below it) stays.
    pub fn remove_parent_dirs(parent: &str) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        let mut rel = Path::new(parent);
        while let (Some(up), Some(name)) = (rel.parent(), rel.file_name()) {
            let cg = SandboxCgroup::new(&up.to_string_lossy(), &name.to_string_lossy());
            for d in cg.existing_dirs() {
                if fs::remove_dir(&d).is_ok() {
                    removed.push(d);
                }
            }
            rel = up;
        }
        removed
    }

    fn procs_file(&self) -> PathBuf {
        match self.version {
            CgroupVersion::V1 => self.v1("pids").join("cgroup.procs"),
            CgroupVersion::V2 => self.v2().join("cgroup.procs"),
        }
    }

    fn kill_all(&self) -> Result<()> {
        if self.version == CgroupVersion::V2 {
            let kill = self.v2().join("cgroup.kill");
            if kill.exists() {
                // cgroup.kill (5.14+) kills every process atomically, new forks included.
                fs::write(&kill, "1").map_err(|source| CgroupError::Io {
                    path: kill.clone(),
                    source,
                })?;
            }
        }
        // On v1, freeze first so that nothing forks or exits (freeing its pid for reuse by a
        // host process) between reading the list and signalling it.
        let freezer = self.v1("freezer").join("freezer.state");
        let frozen = self.version == CgroupVersion::V1 && fs::write(&freezer, "FROZEN").is_ok();
        let procs = self.procs_file();
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let list = match fs::read_to_string(&procs) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(source) => {
                    return Err(CgroupError::Io {
                        path: procs,
                        source,
                    })
                }
            };
            let pids: Vec<i32> = list.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if pids.is_empty() {
                return Ok(());
            }
            for pid in pids {
                // These pids are members of our sandbox's cgroup (frozen on v1), so they are
                // sandbox processes, never a host process.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if frozen {
                // Killed tasks only die once thawed.
                let _ = fs::write(&freezer, "THAWED");
            }
            if Instant::now() > deadline {
                return Err(CgroupError::Busy(procs));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_keyed_reads_the_right_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory.events");
        fs::write(&f, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n").unwrap();
        assert_eq!(keyed(&f, "oom_kill").unwrap(), Some(2));
        assert_eq!(keyed(&f, "oom").unwrap(), Some(1));
        assert_eq!(keyed(&f, "absent").unwrap(), None);
    }

    #[test]
    fn test_paths_stay_under_the_parent() {
        let cg = SandboxCgroup {
            version: CgroupVersion::V1,
            rel: Path::new("agentd").join("x1"),
        };
        assert_eq!(
            cg.v1("memory"),
            Path::new("/sys/fs/cgroup/memory/agentd/x1")
        );
        let cg = SandboxCgroup {
            version: CgroupVersion::V2,
            rel: Path::new("agentd").join("x1"),
        };
        assert_eq!(cg.v2(), Path::new("/sys/fs/cgroup/agentd/x1"));
    }
}
