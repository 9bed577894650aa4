//! Harness for `agentd serve`: a daemon on temp dirs with its own bridge, subnet and cgroup
//! parent; a small HTTP/1.1 client over its Unix socket; and a mock LLM upstream that speaks
//! OpenAI's streaming chat-completions protocol with a scripted conversation.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A response from the daemon.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// The (de-chunked) body.
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON (Null if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..pos]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        data = &data[pos + 2..];
        if size == 0 || data.len() < size {
            out.extend_from_slice(&data[..size.min(data.len())]);
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

/// Like [`request`], but `None` instead of a panic when the daemon is not there or the
/// connection breaks (for tests that kill the daemon under load).
pub fn try_request(socket: &Path, method: &str, path: &str, body: Option<&[u8]>) -> Option<Reply> {
    try_request_with(socket, method, path, body, Duration::from_secs(60))
}

fn try_request_with(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Option<Reply> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let body = body.unwrap_or(b"");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: agentd\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    if !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        return None;
    }
    Some(parse_response(&raw))
}

/// Writes one request (Connection: close, with `extra` header lines) on `s` and reads the whole
/// response.
fn exchange(
    mut s: impl Read + Write,
    extra: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    content_type: &str,
) -> Reply {
    let body = body.unwrap_or(b"");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: agentd\r\nConnection: close\r\n{extra}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        panic!(
            "{method} {path}: no complete answer: {e}; got {:?}",
            String::from_utf8_lossy(&raw)
        );
    }
    parse_response(&raw)
}

/// Sends one request over TCP with a bearer token (Connection: close) and reads the whole
/// response.
pub fn tcp_request(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    content_type: &str,
) -> Reply {
    let s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let auth = format!("Authorization: Bearer {token}\r\n");
    exchange(s, &auth, method, path, body, content_type)
}

/// Sends one request over a Unix socket (Connection: close) and reads the whole response.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    content_type: &str,
) -> Reply {
    let s =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    exchange(s, "", method, path, body, content_type)
}

fn parse_response(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let rest = &raw[split + 4..];
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Reply {
        status,
        body: if chunked {
            dechunk(rest)
        } else {
            rest.to_vec()
        },
    }
}

/// A running `agentd serve`.
pub struct Daemon {
    /// State dir (a temp dir).
    pub state: tempfile::TempDir,
    /// The API socket.
    pub socket: PathBuf,
    /// Image store.
    pub images: PathBuf,
    /// Bridge name.
    pub bridge: String,
    /// Cgroup parent.
    pub cgroup_parent: String,
    /// Extra flags.
    pub extra: Vec<String>,
    /// Sequence number of this daemon in the test process.
    seq: u64,
    child: Option<Child>,
}

static DAEMONS: AtomicU64 = AtomicU64::new(0);

impl Daemon {
    /// Starts a daemon on temp dirs using `images` as its image store, with `extra` flags.
    pub fn start(images: &Path, extra: &[&str]) -> Daemon {
        let state = tempfile::Builder::new()
            .prefix("agentd-serve-")
            .tempdir_in("/var/tmp")
            .unwrap();
        Daemon::start_in(state, images, extra)
    }

    /// As [`Daemon::start`], with the state in `state` (prepared by the test, e.g. a small
    /// filesystem mounted there).
    pub fn start_in(state: tempfile::TempDir, images: &Path, extra: &[&str]) -> Daemon {
        let n = DAEMONS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let mut d = Daemon {
            socket: state.path().join("agentd.sock"),
            images: images.to_path_buf(),
            bridge: format!("adt{}{n}", pid % 100_000),
            cgroup_parent: format!("agentd-test/serve-{pid}-{n}"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            seq: n,
            state,
            child: None,
        };
        d.spawn();
        d
    }

    /// `agentd <subcommand>` with this daemon's settings (dirs, socket, bridge, subnet, cgroup
    /// parent, the extra flags).
    fn command(&self, subcommand: &str) -> Command {
        // A subnet of its own per daemon of this test process (each has its own bridge).
        let n = (std::process::id() % 50) * 4 + u32::try_from(self.seq % 4).unwrap_or(0) + 20;
        let mut cmd = Command::new(crate::bin("agentd"));
        cmd.arg(subcommand)
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--images-dir")
            .arg(&self.images)
            .arg("--socket")
            .arg(&self.socket)
            .args(["--bridge", &self.bridge])
            .args(["--subnet", &format!("10.211.{n}.0/24")])
            .args(["--cgroup-parent", &self.cgroup_parent])
            .args(&self.extra)
            .env("AGENTD_SHIM", crate::bin("agentd-shim"));
        cmd
    }

    /// Runs `agentd teardown` with this daemon's settings and `extra` flags.
    pub fn teardown(&self, extra: &[&str]) -> std::process::Output {
        self.command("teardown").args(extra).output().unwrap()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.path().join("agentd.log"))
            .unwrap();
        let mut cmd = self.command("serve");
        cmd.env("AGENTD_LOG", "info,agentd=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(cmd.spawn().unwrap());
        let start = Instant::now();
        loop {
            // The socket is bound before the state is reconciled: it may accept and not yet
            // answer.
            let health = try_request_with(
                &self.socket,
                "GET",
                "/v1/health",
                None,
                Duration::from_secs(2),
            );
            if health.is_some_and(|r| r.status == 200) {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agentd serve exited ({st}):\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "agentd did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid of sandbox `id`'s shim: the `agentd-shim` process working in its state dir.
    pub fn shim_pid(&self, id: &str) -> Option<i32> {
        let dir = self.state.path().join("sandboxes").join(id);
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let cwd = std::fs::read_link(e.path().join("cwd")).ok()?;
            (comm.trim() == "agentd-shim" && cwd == dir).then_some(pid)
        })
    }

    /// Deletes every sandbox through the API (each must answer 204, or 404 when its owner
    /// removed it meanwhile: a deleted task's sandboxes go on their own) and checks that
    /// nothing of them is left on the host.
    pub fn delete_all_and_check_clean(&self) {
        self.empty_pools();
        let list = self.call("GET", "/v1/sandboxes", None).json();
        for s in list["sandboxes"].as_array().unwrap() {
            let id = s["id"].as_str().unwrap();
            let r = self.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
            // A sandbox leaves the list only once it is stopped and its resources are gone,
            // so one removed meanwhile leaves nothing for the check below to miss.
            assert!(
                r.status == 204 || r.status == 404,
                "{id}: {} {}",
                r.status,
                r.text()
            );
        }
        let left = self.leftovers();
        assert!(left.is_empty(), "leftovers: {left:#?}");
    }

    /// Sets every warm pool's size to 0 and waits (30 s at most) until their sandboxes are
    /// gone: pooled sandboxes are not listed, so deleting the listed ones would leave them.
    pub fn empty_pools(&self) {
        let pools = |d: &Daemon| {
            d.call("GET", "/v1/pools", None).json()["pools"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        };
        for p in pools(self) {
            if p["size"] != 0 {
                let body = serde_json::json!({"image": p["image"], "size": 0});
                let _ = self.call("PUT", "/v1/pools", Some(body));
            }
        }
        let start = Instant::now();
        while pools(self)
            .iter()
            .any(|p| p["ready"] != 0 || p["starting"] != 0)
            && start.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The API token of its TCP listener (made at its first start with `--listen`).
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.state.path().join("api-token"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// agentd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("agentd.log")).unwrap_or_default()
    }

    /// Sends `signal` to the daemon, waits for it to exit, and starts it again.
    pub fn restart(&mut self, signal: i32) {
        self.kill(signal);
        self.spawn();
    }

    /// Starts the daemon again after [`Daemon::kill`].
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// Sends `signal` and waits for the daemon to exit.
    pub fn kill(&mut self, signal: i32) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap());
            let _ =
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::try_from(signal).unwrap());
            let _ = c.wait();
        }
    }

    /// A request to the API. A daemon that answers nothing fails the test with its log (it
    /// may have exited).
    pub fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> Reply {
        let b = body.map(|v| v.to_string().into_bytes());
        let socket = self.socket.clone();
        let (m, p) = (method.to_string(), path.to_string());
        match std::panic::catch_unwind(move || {
            request(&socket, &m, &p, b.as_deref(), "application/json")
        }) {
            Ok(r) => r,
            Err(e) => {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{method} {path}: {why}\nagentd's log:\n{}", self.log())
            }
        }
    }

    /// Polls a sandbox until its state is `state` (or it ended), returning its JSON.
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let v = self
                .call("GET", &format!("/v1/sandboxes/{id}"), None)
                .json();
            if v["state"] == state || v["state"] == "exited" || v["state"] == "stopped" {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "sandbox {id} not {state} after {timeout:?}: {v}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Creates a plain sandbox (no OpenCode) of the opencode image; its id.
    pub fn plain_sandbox(&self) -> String {
        let r = self.call(
            "POST",
            "/v1/sandboxes",
            Some(serde_json::json!({"image": "opencode", "opencode": false})),
        );
        assert_eq!(r.status, 201, "{}\n{}", r.text(), self.log());
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// Runs a command in a sandbox: (exit code, stdout, stderr).
    pub fn exec(&self, id: &str, cmd: &[&str]) -> (i64, String, String) {
        let r = self.call(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(serde_json::json!({"command": cmd, "timeout_secs": 60})),
        );
        assert_eq!(r.status, 200, "exec: {}", r.text());
        let (mut out, mut err, mut code) = (String::new(), String::new(), -1);
        for line in r.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_slice(line).unwrap();
            match v["stream"].as_str() {
                Some("stdout") => out.push_str(v["data"].as_str().unwrap()),
                Some("stderr") => err.push_str(v["data"].as_str().unwrap()),
                _ => code = v["exit_code"].as_i64().unwrap_or(-1),
            }
        }
        (code, out, err)
    }

    /// What of this daemon's sandboxes is still on the host: cgroups, mounts, veths, state.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for c in crate::cgroup_parents(&self.cgroup_parent) {
            for e in std::fs::read_dir(&c).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    left.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
        let state = self.state.path().to_str().unwrap().to_string();
        for l in std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
        {
            if l.contains(&state) {
                left.push(format!("mount {l}"));
            }
        }
        for e in std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            let master = std::fs::read_link(e.path().join("master")).ok();
            if master.is_some_and(|m| m.ends_with(&self.bridge)) {
                left.push(format!("veth {name}"));
            }
        }
        for e in std::fs::read_dir(self.state.path().join("sandboxes"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name() != ".lock" {
                left.push(format!("state dir {}", e.path().display()));
            }
        }
        left.extend(crate::loop_devices_left(self.state.path()));
        left
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Remove every sandbox through the API (the daemon owns them), then stop it and
        // remove the bridge and cgroup parents the test made.
        if self.child.is_some() {
            self.empty_pools();
            let list = self.call("GET", "/v1/sandboxes", None).json();
            for s in list["sandboxes"].as_array().cloned().unwrap_or_default() {
                let id = s["id"].as_str().unwrap_or_default();
                let _ = self.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
            }
        }
        self.kill(libc::SIGTERM);
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let chain = format!("AGENTD-{}", self.bridge);
        let _ = Command::new("iptables")
            .args(["-w", "-D", "INPUT", "-i", &self.bridge, "-j", &chain])
            .output();
        let _ = Command::new("iptables").args(["-w", "-F", &chain]).output();
        let _ = Command::new("iptables").args(["-w", "-X", &chain]).output();
        let nat = format!("AGENTD-NAT-{}", self.bridge);
        let _ = Command::new("iptables")
            .args([
                "-w",
                "-t",
                "nat",
                "-D",
                "PREROUTING",
                "-i",
                &self.bridge,
                "-j",
                &nat,
            ])
            .output();
        let _ = Command::new("iptables")
            .args(["-w", "-t", "nat", "-F", &nat])
            .output();
        let _ = Command::new("iptables")
            .args(["-w", "-t", "nat", "-X", &nat])
            .output();
        for c in crate::cgroup_parents(&self.cgroup_parent) {
            let _ = std::fs::remove_dir(&c);
            if let Some(p) = c.parent() {
                let _ = std::fs::remove_dir(p);
            }
        }
    }
}

/// One answer of the mock LLM to a request that offers tools.
#[derive(Debug, Clone)]
pub enum Turn {
    /// A final text answer (the agent's turn ends).
    Text(String),
    /// A `bash` tool call running `command`.
    Bash(String),
    /// An error status, with a `Retry-After` of so many seconds if given (OpenAI's error
    /// body).
    Fail(u16, Option<u64>),
}

/// Decides the mock's answer from the request (the whole chat-completions JSON).
pub type Script = Arc<dyn Fn(&serde_json::Value) -> Turn + Send + Sync>;

/// A mock LLM upstream on 127.0.0.1 with a scripted conversation, speaking each provider
/// protocol OpenCode uses, streamed as the real ones stream: OpenAI chat completions
/// (`/v1/chat/completions`), OpenAI Responses (`/v1/responses`) and Anthropic Messages
/// (`/v1/messages`). Requests without tools (titles) get a short text; every other request
/// gets what the script says: a `bash` tool call, a final text or an error.
///
/// Usage reported: chat completions 42 prompt + 7 completion tokens (when asked with
/// `stream_options.include_usage`); Responses 30 input + 5 output; Messages 20 input + 2
/// cache-creation + 3 cache-read, 6 output.
pub struct MockLlm {
    /// Base URL (`http://127.0.0.1:N/v1`).
    pub base_url: String,
    /// Requests served.
    pub requests: Arc<AtomicU64>,
    /// Every request body, in arrival order.
    pub log: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    /// Every request's path and the credential headers it came with, in arrival order.
    pub seen: Arc<std::sync::Mutex<Vec<Seen>>>,
}

/// A request's path and credential headers, as the mock upstream saw them.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// Method and path, e.g. `POST /v1/messages`.
    pub request: String,
    /// `Authorization`.
    pub authorization: Option<String>,
    /// `x-api-key`.
    pub x_api_key: Option<String>,
    /// `anthropic-version`.
    pub anthropic_version: Option<String>,
}

/// Whether the request's last message is a tool result (the tool call was made), in any of
/// the three protocols.
pub fn last_is_tool(req: &serde_json::Value) -> bool {
    if let Some(input) = req["input"].as_array() {
        return input
            .last()
            .is_some_and(|i| i["type"] == "function_call_output");
    }
    req["messages"]
        .as_array()
        .and_then(|m| m.last())
        .is_some_and(|m| {
            m["role"] == "tool"
                || m["content"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|p| p["type"] == "tool_result"))
        })
}

/// The text of the request's last user message.
pub fn last_user_text(req: &serde_json::Value) -> String {
    let list = req["messages"].as_array().or(req["input"].as_array());
    list.and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .map(|m| match &m["content"] {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_default()
}

impl MockLlm {
    /// The default script: a bash tool call running `command`, then "All done: the file is
    /// written." once the tool result arrives.
    pub fn start(command: &str) -> MockLlm {
        let command = command.to_string();
        MockLlm::scripted(move |req| {
            if last_is_tool(req) {
                Turn::Text("All done: the file is written.".into())
            } else {
                Turn::Bash(command.clone())
            }
        })
    }

    /// A mock answering tool-offering requests with `script`.
    pub fn scripted(
        script: impl Fn(&serde_json::Value) -> Turn + Send + Sync + 'static,
    ) -> MockLlm {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicU64::new(0));
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let script: Script = Arc::new(script);
        let (count, log2, seen2) = (requests.clone(), log.clone(), seen.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (count, log, seen, script) =
                    (count.clone(), log2.clone(), seen2.clone(), script.clone());
                std::thread::spawn(move || {
                    let _ = serve_llm(stream, &script, &count, &log, &seen);
                });
            }
        });
        MockLlm {
            base_url: format!("http://127.0.0.1:{port}/v1"),
            requests,
            log,
            seen,
        }
    }

    /// Every request body so far.
    pub fn requests_seen(&self) -> Vec<serde_json::Value> {
        self.log.lock().unwrap().clone()
    }

    /// Every request's path and credentials so far.
    pub fn headers_seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// The models the mock LLM lists at `GET /v1/models` (agentd's default model name first).
pub const MOCK_MODELS: &[&str] = &["default", "mock", "mock-large"];

fn serve_llm(
    stream: std::net::TcpStream,
    script: &Script,
    count: &AtomicU64,
    log: &std::sync::Mutex<Vec<serde_json::Value>>,
    seen: &std::sync::Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut len = 0usize;
        let mut s = Seen {
            request: line
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" "),
            ..Seen::default()
        };
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            if h == "\r\n" || h.is_empty() {
                break;
            }
            let Some((name, value)) = h.split_once(':') else {
                continue;
            };
            let value = Some(value.trim().to_string());
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = value.as_deref().unwrap_or("0").parse().unwrap_or(0),
                "authorization" => s.authorization = value,
                "x-api-key" => s.x_api_key = value,
                "anthropic-version" => s.anthropic_version = value,
                _ => {}
            }
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        let path = s.request.split(' ').nth(1).unwrap_or_default().to_string();
        seen.lock().unwrap().push(s);
        let mut w = stream.try_clone()?;
        if line.starts_with("GET ") && line.contains("/models") {
            let list = serde_json::json!({"object": "list", "data": MOCK_MODELS.iter()
                .map(|m| serde_json::json!({"id": m, "object": "model", "type": "model", "owned_by": "mock"})).collect::<Vec<_>>()})
            .to_string();
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{list}",
                list.len()
            )?;
            w.flush()?;
            continue;
        }
        count.fetch_add(1, Ordering::Relaxed);
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        log.lock().unwrap().push(req.clone());
        let has_tools = req["tools"].as_array().is_some_and(|t| !t.is_empty());
        let turn = if has_tools {
            script(&req)
        } else {
            Turn::Text("Mock title".into())
        };
        let protocol = if path.ends_with("/messages") {
            Protocol::Messages
        } else if path.ends_with("/responses") {
            Protocol::Responses
        } else {
            Protocol::Chat
        };
        if let Turn::Fail(status, retry_after) = turn {
            let body = match protocol {
                Protocol::Messages => serde_json::json!({"type": "error", "error": {"type": "overloaded_error", "message": "mock failure"}}),
                _ => serde_json::json!({"error": {"message": "mock failure", "type": "server_error", "code": null}}),
            }
            .to_string();
            let retry = retry_after.map_or(String::new(), |s| format!("Retry-After: {s}\r\n"));
            write!(
                w,
                "HTTP/1.1 {status} Mock\r\nContent-Type: application/json\r\n{retry}Content-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            w.flush()?;
            continue;
        }
        let include_usage = req["stream_options"]["include_usage"] == true;
        let out = match protocol {
            Protocol::Chat => chat_events(&turn, include_usage),
            Protocol::Responses => responses_events(&turn),
            Protocol::Messages => messages_events(&turn),
        };
        write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {}\r\n\r\n{out}",
            out.len()
        )?;
        w.flush()?;
    }
}

#[derive(Clone, Copy)]
enum Protocol {
    Chat,
    Responses,
    Messages,
}

/// The `bash` tool call's arguments.
fn bash_args(command: &str) -> String {
    serde_json::json!({"command": command, "description": "Write the file"}).to_string()
}

/// An OpenAI chat-completions stream.
fn chat_events(turn: &Turn, include_usage: bool) -> String {
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        serde_json::json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": "mock",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut events = Vec::new();
    match turn {
        Turn::Text(text) => {
            events.push(chunk(
                serde_json::json!({"role": "assistant", "content": text}),
                None,
            ));
            events.push(chunk(serde_json::json!({}), Some("stop")));
        }
        Turn::Bash(command) => {
            events.push(chunk(serde_json::json!({"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": "call_mock_1", "type": "function", "function": {"name": "bash", "arguments": ""}}]}), None));
            events.push(chunk(
                serde_json::json!({"tool_calls": [{"index": 0, "function": {"arguments": bash_args(command)}}]}),
                None,
            ));
            events.push(chunk(serde_json::json!({}), Some("tool_calls")));
        }
        Turn::Fail(..) => unreachable!("answered before"),
    }
    if include_usage {
        events.push(serde_json::json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": "mock",
            "choices": [], "usage": {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49}}));
    }
    let mut out = String::new();
    for e in events {
        out.push_str(&format!("data: {e}\n\n"));
    }
    out.push_str("data: [DONE]\n\n");
    out
}

/// Named server-sent events.
fn named_events(events: &[(&str, serde_json::Value)]) -> String {
    let mut out = String::new();
    for (name, data) in events {
        out.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    }
    out
}

/// An OpenAI Responses stream.
fn responses_events(turn: &Turn) -> String {
    let item = match turn {
        Turn::Text(text) => {
            serde_json::json!({"type": "message", "id": "msg_mock_1", "role": "assistant",
            "status": "completed", "content": [{"type": "output_text", "text": text, "annotations": []}]})
        }
        Turn::Bash(command) => {
            serde_json::json!({"type": "function_call", "id": "fc_mock_1", "call_id": "call_mock_1",
            "name": "bash", "arguments": bash_args(command), "status": "completed"})
        }
        Turn::Fail(..) => unreachable!("answered before"),
    };
    let response = |status: &str, output: serde_json::Value, usage: serde_json::Value| {
        serde_json::json!({"id": "resp_mock_1", "object": "response", "created_at": 1, "model": "mock",
            "status": status, "output": output, "usage": usage, "incomplete_details": null})
    };
    let mut added = item.clone();
    added["status"] = "in_progress".into();
    let delta = match turn {
        Turn::Text(text) => {
            added["content"] = serde_json::json!([]);
            (
                "response.output_text.delta",
                serde_json::json!({"type": "response.output_text.delta",
                "item_id": "msg_mock_1", "output_index": 0, "content_index": 0, "delta": text}),
            )
        }
        _ => {
            added["arguments"] = "".into();
            (
                "response.function_call_arguments.delta",
                serde_json::json!({"type": "response.function_call_arguments.delta",
                "item_id": "fc_mock_1", "output_index": 0, "delta": item["arguments"]}),
            )
        }
    };
    named_events(&[
        (
            "response.created",
            serde_json::json!({"type": "response.created",
            "response": response("in_progress", serde_json::json!([]), serde_json::Value::Null)}),
        ),
        (
            "response.output_item.added",
            serde_json::json!({"type": "response.output_item.added", "output_index": 0, "item": added}),
        ),
        delta,
        (
            "response.output_item.done",
            serde_json::json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
        ),
        (
            "response.completed",
            serde_json::json!({"type": "response.completed",
            "response": response("completed", serde_json::json!([item]), serde_json::json!({
                "input_tokens": 30, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 35}))}),
        ),
    ])
}

/// An Anthropic Messages stream.
fn messages_events(turn: &Turn) -> String {
    let (block, delta, stop) = match turn {
        Turn::Text(text) => (
            serde_json::json!({"type": "text", "text": ""}),
            serde_json::json!({"type": "text_delta", "text": text}),
            "end_turn",
        ),
        Turn::Bash(command) => (
            serde_json::json!({"type": "tool_use", "id": "toolu_mock_1", "name": "bash", "input": {}}),
            serde_json::json!({"type": "input_json_delta", "partial_json": bash_args(command)}),
            "tool_use",
        ),
        Turn::Fail(..) => unreachable!("answered before"),
    };
    named_events(&[
        (
            "message_start",
            serde_json::json!({"type": "message_start", "message": {"id": "msg_mock_1", "type": "message",
            "role": "assistant", "model": "mock", "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 20, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            serde_json::json!({"type": "content_block_start", "index": 0, "content_block": block}),
        ),
        ("ping", serde_json::json!({"type": "ping"})),
        (
            "content_block_delta",
            serde_json::json!({"type": "content_block_delta", "index": 0, "delta": delta}),
        ),
        (
            "content_block_stop",
            serde_json::json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "message_delta",
            serde_json::json!({"type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": 6}}),
        ),
        ("message_stop", serde_json::json!({"type": "message_stop"})),
    ])
}

/// Reads an SSE stream from the daemon until a line contains `needle` or `timeout` passes.
/// Returns what was read.
pub fn follow_until(socket: &Path, path: &str, needle: &str, timeout: Duration) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: agentd\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    while start.elapsed() < timeout {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&seen).contains(needle) {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}
