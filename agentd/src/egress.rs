//! Egress on a leash: what a sandbox may reach beyond agentd.
//!
//! A sandbox has no route beyond the bridge, and agentd's firewall chain lets it reach only
//! the gateway and this proxy on the host, so a tool that ignores the proxy fails at once
//! (no route, no DNS); mode `open` is agentd's userspace NAT ([`open`]). In `allowlist` mode the sandbox's environment names this proxy
//! (`HTTP_PROXY`, `HTTPS_PROXY`, lower case too, `NO_PROXY` for the gateway), and the proxy
//! forwards `CONNECT host:port` (HTTPS and anything tunnelled) and plain `http://` requests
//! to hosts on the sandbox's allow list, resolving names itself (no DNS in the sandbox) and
//! connecting to an address it checked: internal addresses (loopback, private, link-local,
//! metadata) are refused unless the admin allows their networks (`egress_allow_networks`).
//! A refusal is a `403` whose body names the host and how to allow it, for the agent to read.
//!
//! The sandbox is known by its source address: sandboxes cannot change their address (no
//! CAP_NET_ADMIN) and bridge ports are isolated. Every connection lands in the sandbox's
//! egress log (bounded, in memory) and in metrics. Bounded: connections in all and per
//! sandbox, the request head's size and time, connect time, idle time.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::sandbox::{now_ms, Manager};

pub mod open;

/// Most proxied connections at once.
const MAX_CONNECTIONS: usize = 1024;
/// Most proxied connections of one sandbox at once (package managers open a few dozen).
const MAX_CONNECTIONS_PER_SANDBOX: usize = 64;
/// Largest request head (request line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// Time to send the request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to resolve and connect upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A tunnel with no byte either way for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Entries kept in a sandbox's egress log (the newest).
pub const LOG_ENTRIES: usize = 512;
/// Most allow-list entries of a sandbox.
pub const MAX_ALLOW: usize = 256;

/// What a sandbox may reach.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    /// Nothing but agentd's LLM gateway.
    #[default]
    None,
    /// Hosts on the allow list, through agentd's HTTP(S) proxy.
    Allowlist,
    /// Any public address, through agentd's NAT (TCP, and DNS through agentd's relay).
    Open,
}

impl EgressMode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EgressMode::None => "none",
            EgressMode::Allowlist => "allowlist",
            EgressMode::Open => "open",
        }
    }
}

/// A sandbox's egress policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    /// `none` (default: only the LLM gateway), `allowlist` (the hosts in `allow`, through
    /// agentd's proxy) or `open` (any public address: TCP through agentd's NAT, DNS through
    /// its relay; internal addresses refused).
    #[serde(default)]
    pub mode: EgressMode,
    /// Hosts (`example.org`, `*.example.org` for its subdomains, `host:port`; ports 80 and
    /// 443 when none is given) or preset names from agentd's `egress_presets`.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// One allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The host (lower case), or the domain after `*.`.
    host: String,
    /// `*.host`: any subdomain of `host` (not `host` itself).
    wildcard: bool,
    /// The one port allowed; `None`: 80 and 443.
    port: Option<u16>,
}

impl std::str::FromStr for Rule {
    type Err = String;
    fn from_str(s: &str) -> Result<Rule, String> {
        let bad = || format!("{s:?} is not a host, *.domain or host:port");
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (
                h,
                Some(p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?),
            ),
            _ => (s, None),
        };
        let (wildcard, host) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host),
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !valid_host(&host) {
            return Err(bad());
        }
        Ok(Rule {
            host,
            wildcard,
            port,
        })
    }
}

impl Rule {
    /// Whether the rule lets a sandbox reach `host:port` (`host` in lower case).
    fn allows(&self, host: &str, port: u16) -> bool {
        let port_ok = match self.port {
            Some(p) => p == port,
            None => port == 80 || port == 443,
        };
        let host_ok = if self.wildcard {
            host.strip_suffix(self.host.as_str())
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.'))
        } else {
            host == self.host
        };
        port_ok && host_ok
    }
}

/// A host name or an IPv4 literal: letters, digits, `-` and `.`, 1-253 bytes.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Checks a policy and expands its presets: the rules the proxy enforces. `open_enabled`:
/// the admin lets sandboxes ask for mode open (`egress_open`).
pub fn compile(
    policy: &NetworkPolicy,
    presets: &std::collections::BTreeMap<String, Vec<String>>,
    open_enabled: bool,
) -> Result<Vec<Rule>, String> {
    if policy.allow.len() > MAX_ALLOW {
        return Err(format!("network.allow has more than {MAX_ALLOW} entries"));
    }
    match policy.mode {
        EgressMode::None if !policy.allow.is_empty() => {
            return Err("network.allow needs mode allowlist (none allows nothing)".into())
        }
        EgressMode::Open if !open_enabled => {
            return Err(
                "network mode open is turned off on this agentd (egress_open = false): use allowlist with the hosts the sandbox needs"
                    .into(),
            )
        }
        EgressMode::Open if !policy.allow.is_empty() => {
            return Err("network.allow needs mode allowlist (open allows every public address)".into())
        }
        _ => {}
    }
    let mut rules = Vec::new();
    for entry in &policy.allow {
        match presets.get(entry.as_str()) {
            Some(hosts) => {
                for h in hosts {
                    rules.push(h.parse().map_err(|e| format!("preset {entry}: {e}"))?);
                }
            }
            None => rules.push(entry.parse().map_err(|e: String| {
                if presets.is_empty() {
                    e
                } else {
                    format!(
                        "{e} (presets: {})",
                        presets.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                }
            })?),
        }
    }
    Ok(rules)
}

/// One connection a sandbox asked for.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EgressEntry {
    /// Unix ms.
    pub time: u64,
    /// `CONNECT` or the plain HTTP method.
    pub method: String,
    /// The host asked for.
    pub host: String,
    /// The port.
    pub port: u16,
    /// It was let through.
    pub allowed: bool,
    /// Why not, or what failed.
    pub reason: Option<String>,
    /// Bytes from the sandbox to the host.
    pub bytes_out: u64,
    /// Bytes from the host to the sandbox.
    pub bytes_in: u64,
}

/// A sandbox's egress log: the newest [`LOG_ENTRIES`] connections.
#[derive(Default)]
pub struct EgressLog {
    /// A std mutex: pushes and copies only.
    entries: Mutex<VecDeque<EgressEntry>>,
}

impl EgressLog {
    fn push(&self, e: EgressEntry) {
        let mut q = self.entries.lock().expect("egress log lock");
        if q.len() >= LOG_ENTRIES {
            q.pop_front();
        }
        q.push_back(e);
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> Vec<EgressEntry> {
        self.entries
            .lock()
            .expect("egress log lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// Serves the proxy on `listener` until the process ends.
pub async fn serve(mgr: Arc<Manager>, listener: TcpListener) {
    crate::net::serve_bounded(
        listener,
        "egress",
        MAX_CONNECTIONS,
        MAX_CONNECTIONS_PER_SANDBOX,
        move |stream, peer| {
            let mgr = mgr.clone();
            async move { handle(&mgr, stream, peer).await }
        },
    )
    .await;
}

/// What the sandbox asked for.
#[derive(Debug, PartialEq, Eq)]
struct Ask {
    method: String,
    host: String,
    port: u16,
    /// For plain HTTP: the head to send upstream (origin-form, proxy headers removed).
    forward: Option<Vec<u8>>,
    /// Bytes after the head the client already sent.
    rest: Vec<u8>,
}

async fn handle(mgr: &Arc<Manager>, mut stream: TcpStream, peer: SocketAddr) {
    let Some(sb) = mgr.by_address(peer.ip()) else {
        let _ = refuse(&mut stream, 403, "agentd: this address is no live sandbox").await;
        return;
    };
    let (id, policy) = {
        let r = sb.record.lock().expect("sandbox record lock");
        (r.id.clone(), r.network.clone())
    };
    let ask = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(a)) => a,
        Ok(Err(why)) => {
            let _ = refuse(&mut stream, 400, &format!("agentd egress proxy: {why}")).await;
            return;
        }
        Err(_) => return,
    };
    let mut entry = EgressEntry {
        time: now_ms(),
        method: ask.method.clone(),
        host: ask.host.clone(),
        port: ask.port,
        allowed: false,
        reason: None,
        bytes_out: 0,
        bytes_in: 0,
    };
    let rules = if policy.mode == EgressMode::Allowlist {
        compile(&policy, &mgr.config.egress_presets, false).unwrap_or_default()
    } else {
        Vec::new()
    };
    if !rules.iter().any(|r| r.allows(&ask.host, ask.port)) {
        let why = format!(
            "agentd: egress to {}:{} is not allowed for sandbox {id} (network mode {}{}).\n\
             To allow it, add \"{}\" to the sandbox's network.allow (PUT /v1/sandboxes/{id}/egress, \
             or --allow {} on agentd task run / sandbox create).\n",
            ask.host,
            ask.port,
            policy.mode.as_str(),
            if policy.allow.is_empty() {
                String::new()
            } else {
                format!(", allowed: {}", policy.allow.join(", "))
            },
            if ask.port == 80 || ask.port == 443 {
                ask.host.clone()
            } else {
                format!("{}:{}", ask.host, ask.port)
            },
            ask.host,
        );
        entry.reason = Some("not on the allow list".into());
        finish(mgr, &sb, entry);
        let _ = refuse(&mut stream, 403, &why).await;
        return;
    }
    let upstream = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        connect(&ask.host, ask.port, &mgr.config.egress_allow_networks),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err((status, why))) => {
            entry.reason = Some(why.clone());
            finish(mgr, &sb, entry);
            let _ = refuse(&mut stream, status, &format!("agentd: {why}\n")).await;
            return;
        }
        Err(_) => {
            let why = format!(
                "{}:{} did not answer in {CONNECT_TIMEOUT:?}",
                ask.host, ask.port
            );
            entry.reason = Some(why.clone());
            finish(mgr, &sb, entry);
            let _ = refuse(&mut stream, 504, &format!("agentd: {why}\n")).await;
            return;
        }
    };
    entry.allowed = true;
    let mut upstream = upstream;
    let first = match &ask.forward {
        None => {
            const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";
            if stream.write_all(ESTABLISHED).await.is_err() {
                finish(mgr, &sb, entry);
                return;
            }
            ask.rest
        }
        Some(head) => {
            let mut first = head.clone();
            first.extend_from_slice(&ask.rest);
            first
        }
    };
    if !first.is_empty() {
        if upstream.write_all(&first).await.is_err() {
            finish(mgr, &sb, entry);
            return;
        }
        entry.bytes_out += first.len() as u64;
    }
    let (out, inn) = splice(stream, upstream).await;
    entry.bytes_out += out;
    entry.bytes_in += inn;
    finish(mgr, &sb, entry);
}

/// Logs and counts a finished connection.
fn finish(mgr: &Manager, sb: &crate::sandbox::Sandbox, entry: EgressEntry) {
    tracing::debug!(host = %entry.host, port = entry.port, allowed = entry.allowed, bytes_out = entry.bytes_out, bytes_in = entry.bytes_in, "egress");
    mgr.metrics
        .count_egress(entry.allowed, entry.bytes_out + entry.bytes_in);
    // A task's sandbox: the connection is one of the task's events too.
    let labels = sb.snapshot().labels;
    if let (Some(tasks), Some(task), Some(n)) = (
        mgr.tasks.get(),
        labels.get(crate::task::TASK_LABEL),
        labels
            .get(crate::task::ATTEMPT_LABEL)
            .and_then(|n| n.parse::<u32>().ok()),
    ) {
        tasks.note_egress(task, n, &entry);
    }
    sb.egress.push(entry);
}

/// Reads the request head: `CONNECT host:port` or a plain request with an absolute URL.
async fn read_head(stream: &mut TcpStream) -> Result<Ask, String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            return Err("the connection closed before the request head ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(ask) = parse_head(&buf)? {
            return Ok(ask);
        }
        if buf.len() > MAX_HEAD {
            return Err(format!("the request head is larger than {MAX_HEAD} bytes"));
        }
    }
}

/// Parses a request head; `None` while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Ask>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("not an HTTP request: {e}")),
    };
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    let rest = buf[len..].to_vec();
    if method == "CONNECT" {
        let (host, port) = split_authority(target, None)?;
        return Ok(Some(Ask {
            method,
            host,
            port,
            forward: None,
            rest,
        }));
    }
    let Some(after) = target.strip_prefix("http://") else {
        return Err(format!(
            "{method} {target}: a proxy request needs an absolute http:// URL (https goes through CONNECT)"
        ));
    };
    let (authority, path) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, "/"),
    };
    if authority.contains('@') {
        return Err("credentials in the URL are not forwarded".into());
    }
    let (host, port) = split_authority(authority, Some(80))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if name.starts_with("proxy-") || name == "connection" || name == "keep-alive" {
            continue;
        }
        head.extend_from_slice(h.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(h.value);
        head.extend_from_slice(b"\r\n");
    }
    // One request per connection: the proxy does not parse what follows.
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Some(Ask {
        method,
        host,
        port,
        forward: Some(head),
        rest,
    }))
}

/// `host:port` (or `host` with `default`) in lower case, checked.
fn split_authority(a: &str, default: Option<u16>) -> Result<(String, u16), String> {
    let (host, port) = match a.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{a:?}: bad port"))?,
        ),
        None => (a, default.ok_or_else(|| format!("{a:?}: no port"))?),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if !valid_host(&host) {
        return Err(format!(
            "{a:?} is not a host name (IPv6 literals are not proxied)"
        ));
    }
    Ok((host, port))
}

/// Resolves `host` once and, if every address is public (or in `allowed`), connects to the
/// first of them that answers; `Err((status, why))` otherwise.
async fn connect(
    host: &str,
    port: u16,
    allowed: &[crate::workspace::Network],
) -> Result<TcpStream, (u16, String)> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| (502, format!("{host} does not resolve: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err((502, format!("{host} has no address")));
    }
    for a in &addrs {
        if crate::workspace::is_internal(a.ip()) && !allowed.iter().any(|n| n.contains(a.ip())) {
            return Err((
                403,
                format!(
                    "{host} is {}, an internal address sandboxes do not reach (an admin can allow its network with egress_allow_networks)",
                    a.ip()
                ),
            ));
        }
    }
    let mut last = String::new();
    for a in &addrs {
        match TcpStream::connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    Err((502, format!("cannot connect to {host}:{port} ({last})")))
}

/// Copies both ways until both ends are done or nothing moves for [`IDLE_TIMEOUT`]; the
/// bytes copied each way (sandbox to host, host to sandbox).
async fn splice(client: TcpStream, upstream: TcpStream) -> (u64, u64) {
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    tokio::join!(pump(cr, uw), pump(ur, cw))
}

/// Copies `from` to `to` until the end, an error or [`IDLE_TIMEOUT`] of silence.
async fn pump(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) -> u64 {
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        let n = match tokio::time::timeout(IDLE_TIMEOUT, from.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total += n as u64;
    }
    let _ = to.shutdown().await;
    total
}

/// Answers with `status` and a text body, then closes.
async fn refuse(stream: &mut TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        502 => "Bad Gateway",
        _ => "Gateway Timeout",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Where the CA bundle of [`install_ca`] is mounted in allowlist sandboxes (a directory).
pub const CA_MOUNT: &str = "/etc/agentd-ca";

/// Largest CA bundle accepted.
const MAX_CA_BYTES: u64 = 4 << 20;

/// The state dir's copy of the admin's CA bundle (mounted read-only into allowlist
/// sandboxes), if there is one.
pub fn ca_dir(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("egress-ca")
}

/// Copies the admin's CA bundle `file` into the state dir (a copy agentd owns: the file
/// given may change or go), or removes an old copy when none is given. Checked: a regular
/// file of PEM certificates, at most 4 MiB.
pub fn install_ca(
    state_dir: &std::path::Path,
    file: Option<&std::path::Path>,
) -> std::io::Result<()> {
    let dir = ca_dir(state_dir);
    let Some(file) = file else {
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    };
    let meta = std::fs::metadata(file)?;
    if !meta.is_file() || meta.len() > MAX_CA_BYTES {
        return Err(std::io::Error::other(format!(
            "{} must be a PEM file of at most {MAX_CA_BYTES} bytes",
            file.display()
        )));
    }
    let pem = std::fs::read(file)?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(std::io::Error::other(format!(
            "{} holds no PEM certificate",
            file.display()
        )));
    }
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join("ca.pem.part");
    std::fs::write(&tmp, &pem)?;
    std::fs::rename(&tmp, dir.join("ca.pem"))
}

/// The variables that make the usual tools trust the bundle at [`CA_MOUNT`].
pub fn ca_env() -> Vec<String> {
    let pem = format!("{CA_MOUNT}/ca.pem");
    [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "PIP_CERT",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
        "NODE_EXTRA_CA_CERTS",
        "NPM_CONFIG_CAFILE",
        "CARGO_HTTP_CAINFO",
    ]
    .iter()
    .map(|k| format!("{k}={pem}"))
    .collect()
}

/// The proxy variables a sandbox in allowlist mode gets (`proxy`: `host:port` of this proxy,
/// `gateway`: the gateway's host, reached directly).
pub fn proxy_env(proxy: &str, gateway: &str) -> Vec<String> {
    let url = format!("http://{proxy}");
    let no = format!("{gateway},localhost,127.0.0.1");
    let mut env = Vec::new();
    for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        env.push(format!("{k}={url}"));
    }
    env.push(format!("NO_PROXY={no}"));
    env.push(format!("no_proxy={no}"));
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn allows(rule: &str, host: &str, port: u16) -> bool {
        rule.parse::<Rule>().unwrap().allows(host, port)
    }

    #[test]
    fn test_rules() {
        assert!(allows("example.org", "example.org", 443));
        assert!(allows("Example.ORG.", "example.org", 80));
        assert!(!allows("example.org", "example.org", 22));
        assert!(!allows("example.org", "www.example.org", 443));
        assert!(allows("*.example.org", "www.example.org", 443));
        assert!(allows("*.example.org", "a.b.example.org", 443));
        assert!(!allows("*.example.org", "example.org", 443));
        assert!(!allows("*.example.org", "badexample.org", 443));
        assert!(allows("example.org:8443", "example.org", 8443));
        assert!(!allows("example.org:8443", "example.org", 443));
        for bad in [
            "",
            "a b",
            "exa_mple.org",
            "host:0",
            "host:x",
            "-a.org",
            "a..org",
            "*",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn test_policies_compile_with_presets() {
        let presets = [(
            "pkgs".to_string(),
            vec!["a.example".to_string(), "*.b.example".to_string()],
        )]
        .into_iter()
        .collect();
        let p = |mode, allow: &[&str]| NetworkPolicy {
            mode,
            allow: allow.iter().map(|s| s.to_string()).collect(),
        };
        let rules = compile(
            &p(EgressMode::Allowlist, &["pkgs", "c.example:8080"]),
            &presets,
            true,
        )
        .unwrap();
        assert_eq!(rules.len(), 3);
        assert!(
            compile(&p(EgressMode::None, &["a.example"]), &presets, true)
                .unwrap_err()
                .contains("allowlist")
        );
        assert!(compile(&p(EgressMode::Open, &[]), &presets, true)
            .unwrap()
            .is_empty());
        assert!(compile(&p(EgressMode::Open, &[]), &presets, false)
            .unwrap_err()
            .contains("egress_open = false"));
        assert!(
            compile(&p(EgressMode::Open, &["a.example"]), &presets, true)
                .unwrap_err()
                .contains("allowlist")
        );
        assert!(
            compile(&p(EgressMode::Allowlist, &["not a host"]), &presets, true)
                .unwrap_err()
                .contains("presets: pkgs")
        );
    }

    #[test]
    fn test_ca_bundles_are_checked_and_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let not_pem = tmp.path().join("x.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        assert!(install_ca(&state, Some(&not_pem))
            .unwrap_err()
            .to_string()
            .contains("no PEM certificate"));
        let pem = tmp.path().join("ca.pem");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        install_ca(&state, Some(&pem)).unwrap();
        assert!(ca_dir(&state).join("ca.pem").is_file());
        install_ca(&state, None).unwrap();
        assert!(
            !ca_dir(&state).exists(),
            "no bundle given: the old copy goes"
        );
        assert!(ca_env().contains(&"SSL_CERT_FILE=/etc/agentd-ca/ca.pem".to_string()));
    }

    #[test]
    fn test_heads() {
        let a =
            parse_head(b"CONNECT Example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\nhello")
                .unwrap()
                .unwrap();
        assert_eq!(
            (a.method.as_str(), a.host.as_str(), a.port),
            ("CONNECT", "example.org", 443)
        );
        assert_eq!(a.rest, b"hello");
        assert!(a.forward.is_none());
        assert_eq!(
            parse_head(b"CONNECT example.org:443 HTTP/1.1\r\n").unwrap(),
            None
        );
        let a = parse_head(
            b"GET http://example.org/simple/?q=1 HTTP/1.1\r\nHost: example.org\r\nProxy-Authorization: x\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!((a.host.as_str(), a.port), ("example.org", 80));
        assert_eq!(
            String::from_utf8(a.forward.unwrap()).unwrap(),
            "GET /simple/?q=1 HTTP/1.1\r\nHost: example.org\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        for bad in [
            &b"GET /relative HTTP/1.1\r\n\r\n"[..],
            b"GET https://example.org/ HTTP/1.1\r\n\r\n",
            b"GET http://user:pw@example.org/ HTTP/1.1\r\n\r\n",
            b"CONNECT example.org HTTP/1.1\r\n\r\n",
            b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01 tls",
        ] {
            assert!(
                parse_head(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
