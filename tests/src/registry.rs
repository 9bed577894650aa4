//! A real OCI registry on loopback for image tests: Debian's `docker-registry` on 127.0.0.1,
//! optionally behind a small authenticating proxy (HTTP basic, or bearer tokens issued by a
//! token endpoint as Docker Hub does) that also counts blob downloads. Images are made with
//! third-party tools (`umoci`, `skopeo`) from OCI layouts.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// True if the tools the image tests need are installed; prints what is missing otherwise.
pub fn tools_available() -> bool {
    let missing: Vec<&str> = ["docker-registry", "skopeo", "umoci"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    eprintln!(
        "SKIPPED: {} not installed (.ci/run installs them)",
        missing.join(", ")
    );
    // Under AGENTD_E2E=1 a test that cannot run fails.
    crate::required_or_skip();
    false
}

/// Picks a free loopback port (bind :0, read the port, release it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `docker-registry` with its storage in a temp dir; killed (by PID) on drop.
pub struct Registry {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry and waits until it answers `/v2/`.
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let addr = format!("127.0.0.1:{port}");
        wait_http(&addr, "/v2/");
        Registry {
            addr,
            child,
            _dir: dir,
        }
    }

    /// Copies an image into the registry with skopeo (`source` is a skopeo transport reference
    /// such as `oci:/dir:tag`), `--all` so indexes keep every platform.
    pub fn push(&self, source: &str, repo_tag: &str) {
        let out = Command::new("skopeo")
            .args([
                "copy",
                "--all",
                "--quiet",
                "--dest-tls-verify=false",
                source,
            ])
            .arg(format!("docker://{}/{repo_tag}", self.addr))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_http(addr: &str, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            );
            let mut line = String::new();
            if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("HTTP/1.1") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "nothing answers on {addr}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// How the proxy authenticates clients.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Anyone may pull.
    None,
    /// HTTP basic with these credentials on every request.
    Basic { user: String, password: String },
    /// Bearer tokens from `/token` (which takes basic credentials), as Docker Hub does.
    Token { user: String, password: String },
}

/// An authenticating, counting reverse proxy in front of a registry.
pub struct Proxy {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// Blob GETs seen, by digest.
    pub blob_gets: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Starts a proxy to `upstream` (`host:port`).
    pub fn start(upstream: &str, auth: Auth) -> Proxy {
        Self::start_throttled(upstream, auth, None)
    }

    /// Starts a proxy that pauses `pause` after every MiB of response body (to make a download
    /// last long enough to interrupt it).
    pub fn start_throttled(upstream: &str, auth: Auth, pause: Option<Duration>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let blob_gets = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let token = format!("tok-{}", std::process::id());
        let (upstream, counts, stop2, addr2) = (
            upstream.to_string(),
            blob_gets.clone(),
            stop.clone(),
            addr.clone(),
        );
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (upstream, auth, counts, token, addr) = (
                    upstream.clone(),
                    auth.clone(),
                    counts.clone(),
                    token.clone(),
                    addr2.clone(),
                );
                thread::spawn(move || {
                    let _ = serve(conn, &upstream, &auth, &counts, &token, &addr, pause);
                });
            }
        });
        Proxy {
            addr,
            blob_gets,
            stop,
        }
    }

    /// Total blob GETs.
    pub fn total_blob_gets(&self) -> usize {
        self.blob_gets.lock().unwrap().values().sum()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr); // wake the accept loop
    }
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// Handles one connection (one request; `Connection: close` both ways keeps this simple).
fn serve(
    mut conn: TcpStream,
    upstream: &str,
    auth: &Auth,
    counts: &Mutex<HashMap<String, usize>>,
    token: &str,
    addr: &str,
    pause: Option<Duration>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        headers.push(line.trim_end().to_string());
    }
    let authorization = headers
        .iter()
        .find_map(|h| {
            h.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let respond = |conn: &mut TcpStream, status: &str, extra: &str, body: &str| {
        write!(conn, "HTTP/1.1 {status}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
    };
    match auth {
        Auth::None => {}
        Auth::Basic { user, password } => {
            if authorization != format!("Basic {}", basic(user, password)) {
                return respond(
                    &mut conn,
                    "401 Unauthorized",
                    "WWW-Authenticate: Basic realm=\"test\"\r\n",
                    r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
                );
            }
        }
        Auth::Token { user, password } => {
            if path.starts_with("/token") {
                if authorization != format!("Basic {}", basic(user, password)) {
                    return respond(
                        &mut conn,
                        "401 Unauthorized",
                        "",
                        r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
                    );
                }
                return respond(
                    &mut conn,
                    "200 OK",
                    "",
                    &format!(r#"{{"token":"{token}","expires_in":300}}"#),
                );
            }
            if authorization != format!("Bearer {token}") {
                let challenge = format!(
                    "WWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"test-registry\",scope=\"repository:test:pull\"\r\n"
                );
                return respond(
                    &mut conn,
                    "401 Unauthorized",
                    &challenge,
                    r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
                );
            }
        }
    }
    if method == "GET" && path.contains("/blobs/") {
        let digest = path.rsplit('/').next().unwrap_or_default().to_string();
        *counts.lock().unwrap().entry(digest).or_default() += 1;
    }
    let mut up = TcpStream::connect(upstream)?;
    write!(up, "{request_line}")?;
    for h in &headers {
        let name = h.split(':').next().unwrap_or("").to_ascii_lowercase();
        if name != "connection" && name != "authorization" && name != "host" {
            write!(up, "{h}\r\n")?;
        }
    }
    write!(up, "Host: {upstream}\r\nConnection: close\r\n\r\n")?;
    let mut up_reader = BufReader::new(up);
    let mut status = String::new();
    up_reader.read_line(&mut status)?;
    conn.write_all(status.as_bytes())?;
    loop {
        let mut line = String::new();
        up_reader.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if !line.to_ascii_lowercase().starts_with("connection:") {
            conn.write_all(line.as_bytes())?;
        }
    }
    conn.write_all(b"Connection: close\r\n\r\n")?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = up_reader.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        conn.write_all(&buf[..n])?;
        if let Some(pause) = pause {
            thread::sleep(pause.mul_f64(n as f64 / f64::from(1u32 << 20)));
        }
    }
}

/// Runs a command, failing the test with its stderr if it fails.
#[track_caller]
pub fn run_tool(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An OCI layout made with umoci, grown one layer at a time from a bundle's rootfs.
pub struct Layout {
    /// The layout dir.
    pub dir: PathBuf,
    bundle: PathBuf,
    tag: String,
}

impl Layout {
    /// `umoci init` + `umoci new` of an empty image `tag` in `dir`.
    pub fn new(dir: &Path, tag: &str) -> Layout {
        run_tool(Command::new("umoci").args(["init", "--layout"]).arg(dir));
        run_tool(
            Command::new("umoci")
                .args(["new", "--image"])
                .arg(format!("{}:{tag}", dir.display())),
        );
        let bundle = dir.with_extension("bundle");
        run_tool(
            Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:{tag}", dir.display()))
                .arg(&bundle),
        );
        Layout {
            dir: dir.to_path_buf(),
            bundle,
            tag: tag.to_string(),
        }
    }

    /// A second image `tag` in the existing layout `dir`.
    pub fn new_in(dir: &Path, tag: &str) -> Layout {
        run_tool(
            Command::new("umoci")
                .args(["new", "--image"])
                .arg(format!("{}:{tag}", dir.display())),
        );
        let bundle = dir.with_extension(format!("{tag}.bundle"));
        run_tool(
            Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:{tag}", dir.display()))
                .arg(&bundle),
        );
        Layout {
            dir: dir.to_path_buf(),
            bundle,
            tag: tag.to_string(),
        }
    }

    /// The rootfs to change before the next [`Layout::commit`].
    pub fn rootfs(&self) -> PathBuf {
        self.bundle.join("rootfs")
    }

    /// `umoci repack`: the changes since the last commit become a layer (deletions become
    /// whiteouts).
    pub fn commit(&self) {
        run_tool(
            Command::new("umoci")
                .args(["repack", "--refresh-bundle", "--image"])
                .arg(self.image())
                .arg(&self.bundle),
        );
    }

    /// Adds a tar verbatim as a layer (`umoci raw add-layer`), for entries such as opaque
    /// markers that repack does not write.
    pub fn add_layer_tar(&self, tar: &Path) {
        run_tool(
            Command::new("umoci")
                .args(["raw", "add-layer", "--image"])
                .arg(self.image())
                .arg(tar),
        );
    }

    /// `dir:tag`, as umoci names the image.
    pub fn image(&self) -> String {
        format!("{}:{}", self.dir.display(), self.tag)
    }

    /// `oci:dir:tag`, as skopeo names it.
    pub fn skopeo_ref(&self) -> String {
        format!("oci:{}:{}", self.dir.display(), self.tag)
    }

    /// `umoci unpack` of the image into `bundle`; returns the rootfs path.
    pub fn umoci_unpack(&self, bundle: &Path) -> PathBuf {
        run_tool(
            Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(self.image())
                .arg(bundle),
        );
        bundle.join("rootfs")
    }
}

/// One filesystem entry as the parity check compares it.
#[derive(Debug, PartialEq, Eq)]
pub struct TreeEntry {
    /// `f`, `d`, `l`, `c`, `b`, `p` or `s`.
    pub kind: char,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Symlink target, or the file's content digest.
    pub content: String,
}

/// Walks a tree (not following symlinks) into path -> entry, for comparing two unpacks.
pub fn tree(root: &Path) -> std::collections::BTreeMap<String, TreeEntry> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let ft = meta.file_type();
            let (kind, content) = if ft.is_symlink() {
                (
                    'l',
                    std::fs::read_link(&path).unwrap().display().to_string(),
                )
            } else if ft.is_dir() {
                stack.push(path.clone());
                ('d', String::new())
            } else if ft.is_file() {
                let mut f = std::fs::File::open(&path).unwrap();
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes).unwrap();
                (
                    'f',
                    format!("{} bytes, fnv {:016x}", bytes.len(), fnv(&bytes)),
                )
            } else if ft.is_char_device() {
                ('c', meta.rdev().to_string())
            } else if ft.is_block_device() {
                ('b', meta.rdev().to_string())
            } else if ft.is_fifo() {
                ('p', String::new())
            } else {
                ('s', String::new())
            };
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            out.insert(
                rel,
                TreeEntry {
                    kind,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    content,
                },
            );
        }
    }
    out
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
