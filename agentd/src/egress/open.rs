//! Network mode `open`: a sandbox reaches any public address, through agentd.
//!
//! The host does not route for sandboxes (IPv4 forwarding stays off on the bridge, and agentd
//! never turns on the host's `ip_forward`). Instead an open sandbox gets a default route via
//! the bridge, and agentd's NAT chain (`nat` table, `PREROUTING` from the bridge) redirects
//! what it sends: TCP to any address but the bridge's and the subnet's goes to agentd's NAT
//! port, UDP to port 53 anywhere goes to agentd's DNS relay on the same port number. agentd
//! reads a redirected connection's original destination (`SO_ORIGINAL_DST`), checks it like
//! the proxy checks a resolved name (internal addresses, and this host's own, are refused
//! unless the admin lists their networks in `egress_allow_networks`), connects from the
//! host and copies bytes both ways: a userspace NAT. A refusal resets the connection at once
//! and lands in the sandbox's egress log like every connection. The DNS relay hands an open
//! sandbox's queries to the host's first resolver and answers anything else `REFUSED`.
//! Other UDP and ICMP go nowhere (no forwarding).
//!
//! A sandbox in mode none or allowlist has no default route, so it never reaches these; if
//! one did, the sandbox is known by its source address as for the proxy and refused.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::{finish, splice, EgressEntry, EgressMode, CONNECT_TIMEOUT};
use crate::net::PeerSlot;
use crate::sandbox::{now_ms, Manager};

/// Most NAT connections at once.
const MAX_CONNECTIONS: usize = 1024;
/// Most NAT connections of one sandbox at once.
const MAX_CONNECTIONS_PER_SANDBOX: usize = 128;
/// Most DNS queries waiting for the upstream resolver at once.
const MAX_QUERIES: usize = 256;
/// Most DNS queries of one sandbox waiting at once.
const MAX_QUERIES_PER_SANDBOX: usize = 32;
/// Time the upstream resolver has to answer.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest DNS message relayed (EDNS0's usual buffer size is 1232-4096).
const MAX_DNS: usize = 4096;
/// Where the host's resolvers are named.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Where the sandbox's `/etc/resolv.conf` comes from in mode open (a file in the state dir,
/// naming the bridge's address).
pub fn resolv_conf(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("net").join("resolv.conf")
}

/// Writes [`resolv_conf`] for a bridge at `bridge_addr` (at every start: the subnet may
/// change).
pub fn write_resolv_conf(
    state_dir: &std::path::Path,
    bridge_addr: Ipv4Addr,
) -> std::io::Result<()> {
    let path = resolv_conf(state_dir);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("part");
    std::fs::write(
        &tmp,
        format!("# written by agentd: DNS goes through agentd's relay\nnameserver {bridge_addr}\n"),
    )?;
    std::fs::rename(&tmp, &path)
}

/// Serves the NAT port until the process ends.
pub async fn serve_tcp(mgr: Arc<Manager>, listener: TcpListener) {
    crate::net::serve_bounded(
        listener,
        "egress nat",
        MAX_CONNECTIONS,
        MAX_CONNECTIONS_PER_SANDBOX,
        move |stream, peer| {
            let mgr = mgr.clone();
            async move { handle(&mgr, stream, peer).await }
        },
    )
    .await;
}

/// Closes `stream` with a reset: the client sees its connection refused at once.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn handle(mgr: &Arc<Manager>, stream: TcpStream, peer: SocketAddr) {
    let Some(sb) = mgr.by_address(peer.ip()) else {
        reset(stream);
        return;
    };
    let (id, mode) = {
        let r = sb.record.lock().expect("sandbox record lock");
        (r.id.clone(), r.network.mode)
    };
    let dst = match rustix::net::sockopt::ip_original_dst(&stream) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "egress nat: no original destination");
            reset(stream);
            return;
        }
    };
    let mut entry = EgressEntry {
        time: now_ms(),
        method: "TCP".into(),
        host: dst.ip().to_string(),
        port: dst.port(),
        allowed: false,
        reason: None,
        bytes_out: 0,
        bytes_in: 0,
    };
    let refusal = if mode != EgressMode::Open {
        Some(format!(
            "sandbox {id} has network mode {}, not open",
            mode.as_str()
        ))
    } else {
        refused(*dst.ip(), &mgr.config.egress_allow_networks).await
    };
    if let Some(why) = refusal {
        entry.reason = Some(why);
        finish(mgr, &sb, entry);
        reset(stream);
        return;
    }
    let upstream = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect(SocketAddr::V4(dst)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            entry.reason = Some(format!("cannot connect to {dst}: {e}"));
            finish(mgr, &sb, entry);
            reset(stream);
            return;
        }
        Err(_) => {
            entry.reason = Some(format!("{dst} did not answer in {CONNECT_TIMEOUT:?}"));
            finish(mgr, &sb, entry);
            reset(stream);
            return;
        }
    };
    entry.allowed = true;
    let (out, inn) = splice(stream, upstream).await;
    entry.bytes_out = out;
    entry.bytes_in = inn;
    finish(mgr, &sb, entry);
}

/// Why an open sandbox may not reach `ip`, if it may not: an internal address (unless the
/// admin allows its network) or one of this host's own addresses (always: they would reach
/// the host's services, agentd's API among them).
async fn refused(ip: Ipv4Addr, allowed: &[crate::workspace::Network]) -> Option<String> {
    // An address can be bound only if it is this host's own.
    if UdpSocket::bind((ip, 0)).await.is_ok() {
        return Some(format!(
            "{ip} is an address of agentd's host, which sandboxes do not reach"
        ));
    }
    let ip = IpAddr::V4(ip);
    if crate::workspace::is_internal(ip) && !allowed.iter().any(|n| n.contains(ip)) {
        return Some(format!(
            "{ip} is an internal address sandboxes do not reach (an admin can allow its network with egress_allow_networks)"
        ));
    }
    None
}

/// The host's first resolver in `/etc/resolv.conf` (port 53); 127.0.0.1 when none is named,
/// as the C library does.
pub fn host_resolver(resolv_conf: &str) -> SocketAddr {
    resolv_conf
        .lines()
        .filter_map(|l| l.split('#').next())
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                .and_then(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 53)))
}

/// `query` turned into its own answer with `rcode` (the question kept, as resolvers
/// expect), or `None` if it is no DNS query.
fn answer_with(query: &[u8], rcode: u8) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let mut a = query.to_vec();
    // QR set, opcode and RD kept, AA and TC clear; RA, Z, AD, CD clear, the code.
    a[2] = (a[2] & 0x79) | 0x80;
    a[3] = rcode & 0x0f;
    Some(a)
}

/// Serves the DNS relay on `socket` until the process ends.
pub async fn serve_dns(mgr: Arc<Manager>, socket: UdpSocket) {
    // blocking-ok: one small file read once at start.
    let conf = std::fs::read_to_string(RESOLV_CONF).unwrap_or_default();
    let upstream = host_resolver(&conf);
    tracing::info!(%upstream, "egress dns relay: the host's resolver");
    let socket = Arc::new(socket);
    let all = Arc::new(tokio::sync::Semaphore::new(MAX_QUERIES));
    let per: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let mut buf = vec![0u8; MAX_DNS];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "egress dns relay: receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let open = mgr.by_address(peer.ip()).is_some_and(|sb| {
            sb.record.lock().expect("sandbox record lock").network.mode == EgressMode::Open
        });
        if !open {
            // REFUSED: the resolver fails at once instead of waiting for a timeout.
            if let Some(a) = answer_with(&query, 5) {
                let _ = socket.send_to(&a, peer).await;
            }
            continue;
        }
        let Ok(permit) = all.clone().try_acquire_owned() else {
            continue;
        };
        let Some(slot) = PeerSlot::take(&per, peer.ip(), MAX_QUERIES_PER_SANDBOX) else {
            continue;
        };
        let socket = socket.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            let reply = match tokio::time::timeout(DNS_TIMEOUT, relay(&query, upstream)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "egress dns relay: upstream failed");
                    // SERVFAIL.
                    match answer_with(&query, 2) {
                        Some(a) => a,
                        None => return,
                    }
                }
                Err(_) => return,
            };
            let _ = socket.send_to(&reply, peer).await;
        });
    }
}

/// Sends `query` to `upstream` from a fresh socket (a random source port) and returns the
/// first answer with the query's id.
async fn relay(query: &[u8], upstream: SocketAddr) -> std::io::Result<Vec<u8>> {
    if query.len() < 12 {
        return Err(std::io::Error::other("not a DNS message"));
    }
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; MAX_DNS];
    loop {
        let n = sock.recv(&mut buf).await?;
        if n >= 12 && buf[..2] == query[..2] && buf[2] & 0x80 != 0 {
            return Ok(buf[..n].to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_host_resolver() {
        assert_eq!(
            host_resolver("# x\nsearch example\nnameserver 10.255.255.53\nnameserver 1.1.1.1\n"),
            "10.255.255.53:53".parse().unwrap()
        );
        assert_eq!(
            host_resolver("nameserver fe80::1%eth0 # link-local\n"),
            "[fe80::1]:53".parse().unwrap()
        );
        assert_eq!(host_resolver(""), "127.0.0.1:53".parse().unwrap());
    }

    #[test]
    fn test_answers() {
        // id 0xabcd, RD, one question.
        let q = [
            0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1,
        ];
        let a = answer_with(&q, 5).unwrap();
        assert_eq!(&a[..4], &[0xab, 0xcd, 0x81, 0x05]);
        assert_eq!(&a[4..], &q[4..]);
        // An answer is not answered; nor is a runt.
        assert!(answer_with(&a, 5).is_none());
        assert!(answer_with(&q[..5], 5).is_none());
    }

    #[tokio::test]
    async fn test_own_and_internal_addresses_are_refused() {
        assert!(refused(Ipv4Addr::LOCALHOST, &[])
            .await
            .unwrap()
            .contains("agentd's host"));
        let why = refused(Ipv4Addr::new(169, 254, 169, 254), &[])
            .await
            .unwrap();
        assert!(why.contains("internal"), "{why}");
        let ok: crate::workspace::Network = "169.254.0.0/16".parse().unwrap();
        assert!(refused(Ipv4Addr::new(169, 254, 169, 254), &[ok])
            .await
            .is_none());
        assert!(refused(Ipv4Addr::new(1, 1, 1, 1), &[]).await.is_none());
    }
}
