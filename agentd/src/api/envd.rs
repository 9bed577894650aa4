//! E2B's envd (the agent inside an E2B sandbox), served by agentd from outside the sandbox for
//! E2B's SDKs (see [`super::e2b`]): `process.Process` and `filesystem.Filesystem` over the
//! Connect protocol ([`super::connect`]), `GET`/`POST /files`, `GET /health`.
//!
//! Commands are detached processes ([`crate::sandbox::procs`]): they outlive the request that
//! started them. Their pids are agentd's numbers for them, not pids inside the sandbox. Files
//! are reached from the host below the sandbox's own root (`/proc/<init>/root`, so `/tmp`
//! and its other mounts are there too) with `openat2(RESOLVE_IN_ROOT)`: no link the sandbox
//! planted leads out. The Linux user is the one `Authorization: Basic <user>:` (or the
//! `username` parameter of `/files`) names, from the sandbox's `/etc/passwd`; E2B's default
//! name `user` and no name at all mean the sandbox's own user.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hyper::body::Frame;
use hyper::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::connect::{self, ConnectError, Envelopes};
use super::{full, Body, Req};
use crate::sandbox::procs::{ProcEvent, ProcSpec};
use crate::sandbox::{Manager, Sandbox};

/// The envd version agentd answers as: commands with stdin (0.3.0), a default user (0.4.0),
/// closing stdin (0.5.2), octet-stream uploads (0.5.7). Not file metadata (0.6.2) nor later.
pub const ENVD_VERSION: &str = "0.5.7";

/// Largest file upload.
const MAX_UPLOAD: u64 = 1 << 30;
/// Most entries a directory listing returns.
const MAX_ENTRIES: usize = 10_000;
/// Largest `/etc/passwd` or `/etc/group` read.
const MAX_ID_FILE: u64 = 1 << 20;

type Reply = Response<Body>;

/// Answers one envd request for sandbox `sb` (already authorised).
pub async fn serve(mgr: &Arc<Manager>, sb: Arc<Sandbox>, path: &str, req: Req) -> Reply {
    let method = req.method().clone();
    match (method, path) {
        (Method::GET, "/health") => Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(super::empty())
            .expect("a valid response"),
        (Method::GET, "/files") => files_get(mgr, &sb, req).await.unwrap_or_else(|e| e),
        (Method::POST, "/files") => files_post(mgr, &sb, req).await.unwrap_or_else(|e| e),
        (Method::POST, p) if p.starts_with("/process.Process/") => {
            let m = p.trim_start_matches("/process.Process/").to_string();
            rpc(process(mgr, &sb, &m, req).await)
        }
        (Method::POST, p) if p.starts_with("/filesystem.Filesystem/") => {
            let m = p.trim_start_matches("/filesystem.Filesystem/").to_string();
            rpc(filesystem(mgr, &sb, &m, req).await)
        }
        _ => plain_error(
            StatusCode::NOT_FOUND,
            &format!("envd has no {path} (agentd serves process.Process, filesystem.Filesystem, /files and /health)"),
        ),
    }
}

fn rpc(r: Result<Reply, ConnectError>) -> Reply {
    r.unwrap_or_else(|e| connect::unary_error(&e))
}

/// envd's HTTP errors: `{"code": status, "message"}`.
fn plain_error(status: StatusCode, message: &str) -> Reply {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(full(
            serde_json::to_vec(&json!({"code": status.as_u16(), "message": message}))
                .expect("JSON values serialise"),
        ))
        .expect("a valid response")
}

fn bad(message: impl Into<String>) -> ConnectError {
    ConnectError::new("invalid_argument", message)
}

// ---- users ----------------------------------------------------------------------------

/// The user a request names (`Authorization: Basic <name>:`), if any.
fn basic_user(req: &Req) -> Option<String> {
    let v = req
        .headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let b64 = v.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let name = s.split(':').next().unwrap_or_default();
    (!name.is_empty()).then(|| name.to_string())
}

/// Reads a small file of the sandbox's (`/etc/passwd`, `/etc/group`): name -> (id, gid, home).
fn id_file(root: &File, path: &str) -> BTreeMap<String, (u32, u32, String)> {
    let mut text = String::new();
    if let Ok(f) = crate::sandbox::fs::open_in_root(
        root,
        Path::new(path),
        libc::O_RDONLY | libc::O_NONBLOCK,
        0,
    ) {
        if f.metadata().is_ok_and(|m| m.is_file()) {
            let _ = f.take(MAX_ID_FILE).read_to_string(&mut text);
        }
    }
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let id = f.get(2)?.parse().ok()?;
            let gid = f.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
            Some((
                f[0].to_string(),
                (id, gid, f.get(5).unwrap_or(&"/").to_string()),
            ))
        })
        .collect()
}

/// Who a request acts as inside: uid, gid, home.
#[derive(Debug, Clone)]
struct User {
    uid: u32,
    gid: u32,
    home: String,
}

async fn user_of(
    mgr: &Manager,
    sb: &Sandbox,
    name: Option<String>,
) -> Result<(File, User, (u32, u32)), ConnectError> {
    let (root, owner) = mgr.live_root(sb).await.map_err(ConnectError::from)?;
    let base = mgr.config.id_base;
    let own = sb.snapshot().user;
    tokio::task::spawn_blocking(move || {
        let passwd = id_file(&root, "/etc/passwd");
        let home_of = |uid: u32| {
            passwd
                .values()
                .find(|(u, _, _)| *u == uid)
                .map_or_else(|| "/".to_string(), |(_, _, h)| h.clone())
        };
        let user = match name.as_deref() {
            // E2B's default user name: the sandbox's own user here.
            None | Some("user") => User {
                uid: own.0,
                gid: own.1,
                home: home_of(own.0),
            },
            Some(n) => match passwd.get(n) {
                Some((uid, gid, home)) => User {
                    uid: *uid,
                    gid: *gid,
                    home: home.clone(),
                },
                None => {
                    return Err(bad(format!(
                        "the sandbox has no user {n:?} (in its /etc/passwd)"
                    )))
                }
            },
        };
        let ids = if user.uid == own.0 {
            owner
        } else {
            (base + user.uid, base + user.gid)
        };
        Ok((root, user, ids))
    })
    .await
    .map_err(|e| ConnectError::new("internal", e.to_string()))?
}

/// An absolute path: a relative one is below the user's home.
fn absolute(user: &User, p: &str) -> Result<PathBuf, ConnectError> {
    if p.is_empty() {
        return Err(bad("a path is required"));
    }
    if p.contains('\0') {
        return Err(bad("a path cannot contain NUL"));
    }
    let path = if p.starts_with('/') {
        PathBuf::from(p)
    } else {
        Path::new(&user.home).join(p)
    };
    // `..` is resolved lexically (the kernel would keep it below the root anyway).
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    Ok(out)
}

// ---- process --------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ProcessConfig {
    cmd: String,
    args: Vec<String>,
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PtySize {
    cols: u32,
    rows: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Pty {
    size: Option<PtySize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StartRequest {
    process: Option<ProcessConfig>,
    pty: Option<Pty>,
    tag: Option<String>,
    stdin: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Selected {
    process: Option<Selector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Input {
    stdin: Option<String>,
    pty: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SendInput {
    process: Option<Selector>,
    input: Option<Input>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SendSignal {
    process: Option<Selector>,
    signal: serde_json::Value,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Update {
    process: Option<Selector>,
    pty: Option<Pty>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamInputStart {
    process: Option<Selector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamInputData {
    input: Option<Input>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamInput {
    start: Option<StreamInputStart>,
    data: Option<StreamInputData>,
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn unb64(s: &str) -> Result<Bytes, ConnectError> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(s).ok())
        .map(Bytes::from)
        .ok_or_else(|| bad("input is not base64"))
}

fn input_bytes(i: Option<Input>) -> Result<Bytes, ConnectError> {
    let i = i.ok_or_else(|| bad("input is required"))?;
    match (i.stdin, i.pty) {
        (Some(s), _) | (None, Some(s)) => unb64(&s),
        (None, None) => Ok(Bytes::new()),
    }
}

/// The running process of sandbox `id` that a request's selector names (a pid or a tag).
fn selected(
    mgr: &Manager,
    id: &str,
    s: Option<Selector>,
) -> Result<Arc<crate::sandbox::procs::Proc>, ConnectError> {
    let s = s.ok_or_else(|| bad("process (a pid or a tag) is required"))?;
    if s.pid.is_none() && s.tag.is_none() {
        return Err(bad("process needs a pid or a tag"));
    }
    mgr.procs
        .find(id, s.pid, s.tag.as_deref())
        .map_err(ConnectError::from)
}

/// A terminal size from a request (1 to 1,000 each way).
fn pty_size(s: &PtySize) -> (u16, u16) {
    (
        u16::try_from(s.cols.clamp(1, 1000)).unwrap_or(80),
        u16::try_from(s.rows.clamp(1, 1000)).unwrap_or(24),
    )
}

/// A process event as envd's `ProcessEvent` JSON.
fn event_json(ev: &ProcEvent) -> serde_json::Value {
    match ev {
        ProcEvent::Stdout(d) => json!({"data": {"stdout": b64(d)}}),
        ProcEvent::Stderr(d) => json!({"data": {"stderr": b64(d)}}),
        ProcEvent::Pty(d) => json!({"data": {"pty": b64(d)}}),
        ProcEvent::End(end) => {
            let mut e = serde_json::Map::new();
            match end.code {
                Some(code) => {
                    e.insert("exitCode".into(), code.into());
                    e.insert("exited".into(), true.into());
                    let status = if code > 128 && code < 160 {
                        format!("exit status {code} (signal {})", code - 128)
                    } else {
                        format!("exit status {code}")
                    };
                    e.insert("status".into(), status.into());
                }
                None => {
                    e.insert("exitCode".into(), (-1).into());
                    e.insert("status".into(), "lost".into());
                }
            }
            let error = end.error.clone().or_else(|| {
                end.oom_killed
                    .then(|| "killed by the sandbox's memory limit".to_string())
            });
            if let Some(err) = error {
                e.insert("error".into(), err.into());
            }
            json!({"end": e})
        }
    }
}

/// How often a stream sends a keepalive (the client's `Keepalive-Ping-Interval`, seconds).
fn keepalive(req: &Req) -> Option<Duration> {
    req.headers()
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.clamp(1, 3600)))
}

/// Streams a process's events (after `start`) as a server-streaming response; the client
/// going away leaves the process running.
fn stream_events(
    pid: u32,
    events: tokio::sync::mpsc::Receiver<ProcEvent>,
    ping: Option<Duration>,
) -> Reply {
    connect::ServerStream {
        first: json!({"event": {"start": {"pid": pid}}}),
        keepalive: json!({"event": {"keepalive": {}}}),
        ping,
        lost: "the process was lost",
    }
    .respond(events, |ev| {
        (
            json!({ "event": event_json(ev) }),
            matches!(ev, ProcEvent::End(_)),
        )
    })
}

async fn process(
    mgr: &Arc<Manager>,
    sb: &Arc<Sandbox>,
    method: &str,
    req: Req,
) -> Result<Reply, ConnectError> {
    let id = sb.snapshot().id;
    match method {
        "Start" => {
            let name = basic_user(&req);
            let ping = keepalive(&req);
            let r: StartRequest = connect::read_request(req).await?;
            let p = r.process.ok_or_else(|| bad("process is required"))?;
            if p.cmd.is_empty() {
                return Err(bad("process.cmd is required"));
            }
            let (_, user, _) = user_of(mgr, sb, name).await?;
            let cwd = match p.cwd.as_deref() {
                Some(c) if !c.is_empty() => absolute(&user, c)?,
                _ => PathBuf::from(&user.home),
            };
            let pty = r.pty.and_then(|p| p.size).map(|s| pty_size(&s));
            let mut envs = p.envs;
            // As envd does: HOME and USER of the user it runs as.
            envs.entry("HOME".into()).or_insert(user.home.clone());
            let spec = ProcSpec {
                cmd: p.cmd,
                args: p.args,
                envs,
                cwd: Some(cwd.to_string_lossy().into_owned()),
                tag: r.tag.filter(|t| !t.is_empty()),
                uid: Some(user.uid),
                stdin: r.stdin.unwrap_or(false),
                pty,
            };
            let (proc, events) = mgr.start_proc(sb, spec).await.map_err(ConnectError::from)?;
            Ok(stream_events(proc.pid, events, ping))
        }
        "Connect" => {
            let ping = keepalive(&req);
            let r: Selected = connect::read_request(req).await?;
            let proc = selected(mgr, &id, r.process)?;
            let events = proc.follow().ok_or_else(|| {
                ConnectError::new("resource_exhausted", "the process has too many followers")
            })?;
            Ok(stream_events(proc.pid, events, ping))
        }
        "List" => {
            let _: serde_json::Value = connect::read_request(req).await?;
            let processes: Vec<serde_json::Value> = mgr
                .procs
                .list(&id)
                .iter()
                .map(|p| {
                    let mut v = json!({
                        "config": {
                            "cmd": p.spec.cmd,
                            "args": p.spec.args,
                            "envs": p.spec.envs,
                            "cwd": p.spec.cwd,
                        },
                        "pid": p.pid,
                    });
                    if let Some(t) = &p.spec.tag {
                        v["tag"] = t.clone().into();
                    }
                    v
                })
                .collect();
            Ok(connect::unary(&json!({ "processes": processes })))
        }
        "SendInput" => {
            let r: SendInput = connect::read_request(req).await?;
            let data = input_bytes(r.input)?;
            let proc = selected(mgr, &id, r.process)?;
            proc.input(data).await.map_err(ConnectError::from)?;
            Ok(connect::unary(&json!({})))
        }
        "StreamInput" => {
            let mut msgs = Envelopes::new(req);
            let first: StreamInput = msgs
                .next_as()
                .await?
                .ok_or_else(|| bad("the stream carried no start message"))?;
            let proc = selected(mgr, &id, first.start.and_then(|s| s.process))?;
            while let Some(m) = msgs.next_as::<StreamInput>().await? {
                if let Some(d) = m.data {
                    proc.input(input_bytes(d.input)?)
                        .await
                        .map_err(ConnectError::from)?;
                }
            }
            let mut body = connect::envelope(&json!({})).to_vec();
            body.extend_from_slice(&connect::end_of_stream(None));
            Ok(connect::stream_response(full(body)))
        }
        "SendSignal" => {
            let r: SendSignal = connect::read_request(req).await?;
            let signal = match &r.signal {
                serde_json::Value::String(s) if s == "SIGNAL_SIGKILL" => libc::SIGKILL,
                serde_json::Value::String(s) if s == "SIGNAL_SIGTERM" => libc::SIGTERM,
                serde_json::Value::Number(n) if n.as_i64() == Some(9) => libc::SIGKILL,
                serde_json::Value::Number(n) if n.as_i64() == Some(15) => libc::SIGTERM,
                other => {
                    return Err(bad(format!(
                        "unknown signal {other}: SIGNAL_SIGKILL or SIGNAL_SIGTERM"
                    )))
                }
            };
            let proc = selected(mgr, &id, r.process)?;
            mgr.signal_proc(&id, &proc, signal)
                .await
                .map_err(ConnectError::from)?;
            Ok(connect::unary(&json!({})))
        }
        "CloseStdin" => {
            let r: Selected = connect::read_request(req).await?;
            let proc = selected(mgr, &id, r.process)?;
            proc.close_stdin().await;
            Ok(connect::unary(&json!({})))
        }
        "Update" => {
            let r: Update = connect::read_request(req).await?;
            let proc = selected(mgr, &id, r.process)?;
            if let Some(size) = r.pty.and_then(|p| p.size) {
                let (cols, rows) = pty_size(&size);
                proc.resize(cols, rows).map_err(ConnectError::from)?;
            }
            Ok(connect::unary(&json!({})))
        }
        other => Err(ConnectError::new(
            "unimplemented",
            format!("process.Process/{other} is not served by agentd"),
        )),
    }
}

// ---- filesystem -----------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PathRequest {
    path: String,
    depth: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct WatchRequest {
    path: String,
    recursive: bool,
    #[serde(alias = "watcher_id")]
    watcher_id: String,
}

fn watch_json(e: &crate::sandbox::watchers::WatchEvent) -> serde_json::Value {
    use crate::sandbox::watchers::WatchKind;
    let kind = match e.kind {
        WatchKind::Create => "EVENT_TYPE_CREATE",
        WatchKind::Write => "EVENT_TYPE_WRITE",
        WatchKind::Remove => "EVENT_TYPE_REMOVE",
        WatchKind::Rename => "EVENT_TYPE_RENAME",
        WatchKind::Chmod => "EVENT_TYPE_CHMOD",
    };
    json!({"name": e.name, "type": kind})
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MoveRequest {
    source: String,
    destination: String,
}

/// Names of ids, from the sandbox's passwd and group files.
struct Names {
    users: BTreeMap<u32, String>,
    groups: BTreeMap<u32, String>,
}

impl Names {
    fn read(root: &File) -> Names {
        let flip = |m: BTreeMap<String, (u32, u32, String)>| {
            m.into_iter().map(|(n, (id, _, _))| (id, n)).collect()
        };
        Names {
            users: flip(id_file(root, "/etc/passwd")),
            groups: flip(id_file(root, "/etc/group")),
        }
    }
}

fn permissions(mode: u32, kind: char) -> String {
    let mut s = String::from(kind);
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (0o400 >> i) != 0 { c } else { '-' });
    }
    s
}

/// envd's `EntryInfo` of `path` (not following a last link), below `root`.
fn entry_info(
    root: &File,
    path: &Path,
    names: &Names,
    base: u32,
) -> std::io::Result<serde_json::Value> {
    let f = crate::sandbox::fs::open_in_root(root, path, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
    let st = rustix::fs::fstat(&f)?;
    let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
    let (kind, c) = match ft {
        rustix::fs::FileType::Directory => ("FILE_TYPE_DIRECTORY", 'd'),
        rustix::fs::FileType::Symlink => ("FILE_TYPE_SYMLINK", 'l'),
        _ => ("FILE_TYPE_FILE", '-'),
    };
    let uid = st.st_uid.checked_sub(base).unwrap_or(65_534);
    let gid = st.st_gid.checked_sub(base).unwrap_or(65_534);
    let name = path
        .file_name()
        .map_or_else(|| "/".to_string(), |n| n.to_string_lossy().into_owned());
    let mut v = json!({
        "name": name,
        "type": kind,
        "path": path.to_string_lossy(),
        "size": st.st_size.to_string(),
        "mode": st.st_mode & 0o7777,
        "permissions": permissions(st.st_mode, c),
        "owner": names.users.get(&uid).cloned().unwrap_or_else(|| uid.to_string()),
        "group": names.groups.get(&gid).cloned().unwrap_or_else(|| gid.to_string()),
        "modifiedTime": agentd_images::commit::rfc3339(u64::try_from(st.st_mtime).unwrap_or(0)),
    });
    if ft == rustix::fs::FileType::Symlink {
        if let Ok(t) = rustix::fs::readlinkat(&f, "", Vec::new()) {
            v["symlinkTarget"] = t.to_string_lossy().into_owned().into();
        }
    }
    Ok(v)
}

fn io_connect(path: &Path, e: std::io::Error) -> ConnectError {
    let what = format!("{}: {e}", path.display());
    match e.raw_os_error() {
        Some(libc::ENOENT) => ConnectError::new("not_found", what),
        Some(libc::EEXIST) => ConnectError::new("already_exists", what),
        Some(libc::EACCES | libc::EPERM) => ConnectError::new("permission_denied", what),
        Some(libc::ENOTDIR | libc::EISDIR | libc::EINVAL | libc::ENOTEMPTY | libc::ELOOP) => {
            ConnectError::new("invalid_argument", what)
        }
        Some(libc::ENOSPC | libc::EDQUOT) => ConnectError::new("resource_exhausted", what),
        _ => ConnectError::new("internal", what),
    }
}

/// This thread's file accesses act as `owner` (host ids) until dropped: files it creates are
/// born the user's, permissions are the user's (no capability of agentd's applies), and a
/// file system the sandbox mounted in its own user namespace (its `/tmp`), where agentd's
/// root is no user at all, takes them. `setfsuid`/`setfsgid` change the calling thread only.
struct ActingAs;

impl ActingAs {
    fn new(owner: (u32, u32)) -> Self {
        // The group first, while the thread may still change it.
        nix::unistd::setfsgid(nix::unistd::Gid::from_raw(owner.1));
        nix::unistd::setfsuid(nix::unistd::Uid::from_raw(owner.0));
        ActingAs
    }
}

impl Drop for ActingAs {
    fn drop(&mut self) {
        nix::unistd::setfsuid(nix::unistd::Uid::from_raw(0));
        nix::unistd::setfsgid(nix::unistd::Gid::from_raw(0));
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ConnectError> + Send + 'static,
) -> Result<T, ConnectError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ConnectError::new("internal", e.to_string()))?
}

/// Runs `args` in `sb` as `uid` and waits (at most 60 s); an error with its stderr if it fails.
async fn run_as(
    mgr: &Arc<Manager>,
    sb: &Arc<Sandbox>,
    uid: u32,
    args: Vec<String>,
) -> Result<(), ConnectError> {
    let (_, mut events) = mgr
        .start_proc(
            sb,
            ProcSpec {
                cmd: args[0].clone(),
                args: args[1..].to_vec(),
                uid: Some(uid),
                cwd: Some("/".into()),
                ..ProcSpec::default()
            },
        )
        .await
        .map_err(ConnectError::from)?;
    let mut stderr = Vec::new();
    let wait = async {
        while let Some(ev) = events.recv().await {
            match ev {
                ProcEvent::Stderr(d) if stderr.len() < 4096 => stderr.extend_from_slice(&d),
                ProcEvent::End(end) => return end.code,
                _ => {}
            }
        }
        None
    };
    match tokio::time::timeout(Duration::from_secs(60), wait).await {
        Ok(Some(0)) => Ok(()),
        Ok(_) => Err(ConnectError::new(
            "failed_precondition",
            String::from_utf8_lossy(&stderr).trim().to_string(),
        )),
        Err(_) => Err(ConnectError::new("deadline_exceeded", "took over 60 s")),
    }
}

async fn filesystem(
    mgr: &Arc<Manager>,
    sb: &Arc<Sandbox>,
    method: &str,
    req: Req,
) -> Result<Reply, ConnectError> {
    let name = basic_user(&req);
    let base = mgr.config.id_base;
    match method {
        "Stat" | "ListDir" | "MakeDir" | "Remove" => {
            let r: PathRequest = connect::read_request(req).await?;
            let (root, user, owner) = user_of(mgr, sb, name).await?;
            let path = absolute(&user, &r.path)?;
            match method {
                "Stat" => {
                    blocking(move || {
                        let names = Names::read(&root);
                        let e = entry_info(&root, &path, &names, base)
                            .map_err(|e| io_connect(&path, e))?;
                        Ok(connect::unary(&json!({ "entry": e })))
                    })
                    .await
                }
                "ListDir" => {
                    let depth = r.depth.unwrap_or(1).clamp(1, 32);
                    blocking(move || {
                        let names = Names::read(&root);
                        let mut entries = Vec::new();
                        let mut todo = vec![(path.clone(), 1u32)];
                        while let Some((dir, d)) = todo.pop() {
                            if entries.len() >= MAX_ENTRIES {
                                break;
                            }
                            let (list, _) = crate::sandbox::fs::list_dir(&root, &dir, MAX_ENTRIES)
                                .map_err(|e| io_connect(&dir, e))?;
                            for l in list {
                                if entries.len() >= MAX_ENTRIES {
                                    break;
                                }
                                let p = dir.join(&l.name);
                                let Ok(e) = entry_info(&root, &p, &names, base) else {
                                    continue;
                                };
                                if l.kind == "dir" && d < depth {
                                    todo.push((p, d + 1));
                                }
                                entries.push(e);
                            }
                        }
                        Ok(connect::unary(&json!({ "entries": entries })))
                    })
                    .await
                }
                "MakeDir" => {
                    blocking(move || {
                        let _as = ActingAs::new(owner);
                        if crate::sandbox::fs::open_in_root(
                            &root,
                            &path,
                            libc::O_PATH | libc::O_NOFOLLOW,
                            0,
                        )
                        .is_ok()
                        {
                            return Err(ConnectError::new(
                                "already_exists",
                                format!("{} exists", path.display()),
                            ));
                        }
                        crate::sandbox::fs::mkdir_in_root(&root, &path, owner)
                            .map_err(|e| io_connect(&path, e))?;
                        let e = entry_info(&root, &path, &Names::read(&root), base)
                            .map_err(|e| io_connect(&path, e))?;
                        Ok(connect::unary(&json!({ "entry": e })))
                    })
                    .await
                }
                _ => {
                    let p2 = path.clone();
                    blocking(move || {
                        crate::sandbox::fs::open_in_root(
                            &root,
                            &p2,
                            libc::O_PATH | libc::O_NOFOLLOW,
                            0,
                        )
                        .map(|_| ())
                        .map_err(|e| io_connect(&p2, e))
                    })
                    .await?;
                    let p = path.to_string_lossy().into_owned();
                    run_as(
                        mgr,
                        sb,
                        user.uid,
                        vec!["rm".into(), "-rf".into(), "--".into(), p],
                    )
                    .await?;
                    Ok(connect::unary(&json!({})))
                }
            }
        }
        "Move" => {
            let r: MoveRequest = connect::read_request(req).await?;
            let (root, user, owner) = user_of(mgr, sb, name).await?;
            let (src, dst) = (
                absolute(&user, &r.source)?,
                absolute(&user, &r.destination)?,
            );
            let parent = |p: &Path| -> Result<(File, std::ffi::OsString), ConnectError> {
                let name = p
                    .file_name()
                    .ok_or_else(|| bad(format!("{} names no file", p.display())))?
                    .to_os_string();
                let dir = crate::sandbox::fs::open_in_root(
                    &root,
                    p.parent().unwrap_or(Path::new("/")),
                    libc::O_RDONLY | libc::O_DIRECTORY,
                    0,
                )
                .map_err(|e| io_connect(p, e))?;
                Ok((dir, name))
            };
            let ((sd, sn), (dd, dn)) = (parent(&src)?, parent(&dst)?);
            let s2 = src.clone();
            let renamed = blocking(move || {
                let _as = ActingAs::new(owner);
                match nix::fcntl::renameat(
                    Some(sd.as_raw_fd()),
                    sn.as_os_str(),
                    Some(dd.as_raw_fd()),
                    dn.as_os_str(),
                ) {
                    Ok(()) => Ok(true),
                    // Another file system (its /tmp and its rootfs): mv copies, below.
                    Err(nix::errno::Errno::EXDEV) => Ok(false),
                    Err(e) => Err(io_connect(&s2, e.into())),
                }
            })
            .await?;
            if !renamed {
                let args = vec![
                    "mv".to_string(),
                    "--".to_string(),
                    src.to_string_lossy().into_owned(),
                    dst.to_string_lossy().into_owned(),
                ];
                run_as(mgr, sb, user.uid, args).await?;
            }
            blocking(move || {
                let e = entry_info(&root, &dst, &Names::read(&root), base)
                    .map_err(|e| io_connect(&dst, e))?;
                Ok(connect::unary(&json!({ "entry": e })))
            })
            .await
        }
        "WatchDir" | "CreateWatcher" => {
            let ping = keepalive(&req);
            let r: WatchRequest = connect::read_request(req).await?;
            let (root, user, _) = user_of(mgr, sb, name).await?;
            let path = absolute(&user, &r.path)?;
            if method == "CreateWatcher" {
                let id = mgr
                    .watch_dir_polled(sb, root, path, r.recursive)
                    .map_err(ConnectError::from)?;
                return Ok(connect::unary(&json!({ "watcherId": id })));
            }
            let events = mgr
                .watch_dir(sb, root, path, r.recursive)
                .map_err(ConnectError::from)?;
            Ok(connect::ServerStream {
                first: json!({"start": {}}),
                keepalive: json!({"keepalive": {}}),
                ping,
                lost: "the watch ended (the sandbox stopped)",
            }
            .respond(events, |ev| {
                (json!({ "filesystem": watch_json(ev) }), false)
            }))
        }
        "GetWatcherEvents" => {
            let r: WatchRequest = connect::read_request(req).await?;
            let events = mgr
                .watchers
                .poll(&sb.snapshot().id, &r.watcher_id)
                .map_err(ConnectError::from)?;
            let events: Vec<_> = events.iter().map(watch_json).collect();
            Ok(connect::unary(&json!({ "events": events })))
        }
        "RemoveWatcher" => {
            let r: WatchRequest = connect::read_request(req).await?;
            mgr.watchers
                .remove(&sb.snapshot().id, &r.watcher_id)
                .map_err(ConnectError::from)?;
            Ok(connect::unary(&json!({})))
        }
        other => Err(ConnectError::new(
            "unimplemented",
            format!("filesystem.Filesystem/{other} is not served by agentd"),
        )),
    }
}

// ---- /files ---------------------------------------------------------------------------

fn query(req: &Req) -> BTreeMap<String, String> {
    url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn connect_to_plain(e: ConnectError) -> Reply {
    plain_error(e.status(), &e.message)
}

async fn files_get(mgr: &Arc<Manager>, sb: &Arc<Sandbox>, req: Req) -> Result<Reply, Reply> {
    let q = query(&req);
    let name = q.get("username").cloned().or_else(|| basic_user(&req));
    let (root, user, _) = user_of(mgr, sb, name).await.map_err(connect_to_plain)?;
    let path =
        absolute(&user, q.get("path").map_or("", String::as_str)).map_err(connect_to_plain)?;
    let (f, len) = blocking(move || {
        let f =
            crate::sandbox::fs::open_in_root(&root, &path, libc::O_RDONLY | libc::O_NONBLOCK, 0)
                .map_err(|e| io_connect(&path, e))?;
        let m = f.metadata().map_err(|e| io_connect(&path, e))?;
        if !m.is_file() {
            return Err(bad(format!("{} is not a file", path.display())));
        }
        Ok((f, m.len()))
    })
    .await
    .map_err(connect_to_plain)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, super::BoxError>>(4);
    tokio::task::spawn_blocking(move || {
        let mut f = f.take(len);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match f.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx
                        .blocking_send(Ok(Frame::data(Bytes::copy_from_slice(&buf[..n]))))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(Box::new(e)));
                    return;
                }
            }
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
        .header(hyper::header::CONTENT_LENGTH, len)
        .body(crate::http::channel_body(rx))
        .expect("a valid response"))
}

async fn files_post(mgr: &Arc<Manager>, sb: &Arc<Sandbox>, req: Req) -> Result<Reply, Reply> {
    let q = query(&req);
    let name = q.get("username").cloned().or_else(|| basic_user(&req));
    let (root, user, owner) = user_of(mgr, sb, name).await.map_err(connect_to_plain)?;
    let root = Arc::new(root);
    if req
        .headers()
        .get(hyper::header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity")
    {
        return Err(plain_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "agentd takes uploads uncompressed: write without the SDK's gzip option",
        ));
    }
    let ct = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut written = Vec::new();
    let put = |path: PathBuf, spooled: super::Spooled| {
        let root = root.clone();
        async move {
            blocking(move || {
                // blocking-ok: in `blocking`, a spawn_blocking thread.
                let f = File::open(&spooled.0).map_err(|e| io_connect(&path, e))?;
                let _as = ActingAs::new(owner);
                if let Some(dir) = path.parent() {
                    crate::sandbox::fs::mkdir_in_root(&root, dir, owner).map_err(|e| io_connect(dir, e))?;
                }
                crate::sandbox::fs::write_file(&root, &path, f, owner).map_err(|e| io_connect(&path, e))?;
                Ok(json!({
                    "name": path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                    "type": "file",
                    "path": path.to_string_lossy(),
                }))
            })
            .await
        }
    };
    if ct.starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(&ct)
            .map_err(|e| plain_error(StatusCode::BAD_REQUEST, &e.to_string()))?;
        let mut form = multer::Multipart::new(
            http_body_util::BodyDataStream::new(req.into_body()),
            boundary,
        );
        let mut files = 0;
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| plain_error(StatusCode::BAD_REQUEST, &e.to_string()))?
        {
            files += 1;
            if files > 256 {
                return Err(plain_error(
                    StatusCode::BAD_REQUEST,
                    "at most 256 files in one upload",
                ));
            }
            let target = match (q.get("path"), field.file_name()) {
                (Some(p), _) if files == 1 => p.clone(),
                (_, Some(f)) => f.to_string(),
                _ => {
                    return Err(plain_error(
                        StatusCode::BAD_REQUEST,
                        "a file needs a path (the path parameter or the part's filename)",
                    ))
                }
            };
            let path = absolute(&user, &target).map_err(connect_to_plain)?;
            let spooled = spool_stream(mgr, field).await?;
            written.push(put(path, spooled).await.map_err(connect_to_plain)?);
        }
    } else {
        let path =
            absolute(&user, q.get("path").map_or("", String::as_str)).map_err(connect_to_plain)?;
        let (spooled, _) = super::spool_body(mgr, req, MAX_UPLOAD)
            .await
            .map_err(|e| connect_to_plain(e.into()))?;
        written.push(put(path, spooled).await.map_err(connect_to_plain)?);
    }
    Ok(connect::unary(&written))
}

/// A multipart field spooled to a file under `<state>/tmp`, at most [`MAX_UPLOAD`] bytes.
async fn spool_stream(
    mgr: &Manager,
    mut field: multer::Field<'_>,
) -> Result<super::Spooled, Reply> {
    use tokio::io::AsyncWriteExt;
    let fail = |e: std::io::Error| connect_to_plain(super::io_error(e).into());
    let dir = mgr.config.state_dir.join("tmp");
    tokio::fs::create_dir_all(&dir).await.map_err(fail)?;
    let spooled = super::Spooled(dir.join(format!("upload-{}", crate::sandbox::random_hex(8))));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&spooled.0)
        .await
        .map_err(fail)?;
    let mut size = 0u64;
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| plain_error(StatusCode::BAD_REQUEST, &e.to_string()))?
    {
        size += chunk.len() as u64;
        if size > MAX_UPLOAD {
            return Err(plain_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("a file is larger than {MAX_UPLOAD} bytes"),
            ));
        }
        file.write_all(&chunk).await.map_err(fail)?;
    }
    file.flush().await.map_err(fail)?;
    Ok(spooled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_paths_and_permissions() {
        let u = User {
            uid: 1000,
            gid: 1000,
            home: "/home/agent".into(),
        };
        assert_eq!(
            absolute(&u, "a/b").unwrap(),
            PathBuf::from("/home/agent/a/b")
        );
        assert_eq!(absolute(&u, "/x/../../etc").unwrap(), PathBuf::from("/etc"));
        assert!(absolute(&u, "").is_err());
        assert_eq!(permissions(0o40755, 'd'), "drwxr-xr-x");
        assert_eq!(permissions(0o100640, '-'), "-rw-r-----");
    }
}
