//! Sandbox networking: one bridge owned by agentd, one veth pair per sandbox.
//!
//! The bridge has the subnet's first address; agentd reaches each sandbox's servers (OpenCode)
//! through it, and sandboxes reach agentd's LLM gateway on it. Every sandbox port is
//! *isolated* (`brport/isolated`): isolated ports cannot exchange frames, so sandbox A cannot
//! reach sandbox B, only the bridge itself. IPv4 forwarding is off on the bridge
//! (`conf/<bridge>/forwarding = 0`), so nothing a sandbox sends is routed beyond the host even
//! when the host forwards between other interfaces. Sandboxes get no default route, except in
//! network mode open, whose traffic agentd's NAT chain redirects to agentd itself (a userspace
//! NAT, `egress::open`): still nothing is routed. IPv6 is disabled on the bridge.
//!
//! Ownership: the bridge outlives agentd's restarts (running sandboxes stay attached to it);
//! a sandbox's pair is created by its shim between create and start (`NetworkMode::Veth`, the
//! sandbox end born inside its namespace) and dies with that namespace.
//! [`Network::remove_link`] deletes a pair that survived, and [`Network::leftover_links`]
//! lists pairs that belong to no live sandbox after a crash.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use agentd_runtime::netlink;

/// A connection counted against its sandbox's (its address's) share of a server on the
/// bridge (the gateway, the egress proxy); the count drops when it is dropped.
pub struct PeerSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peer: IpAddr,
}

impl PeerSlot {
    /// A slot for `peer`, unless it holds `max` already. A std mutex: one map update.
    pub fn take(
        counts: &Arc<Mutex<HashMap<IpAddr, usize>>>,
        peer: IpAddr,
        max: usize,
    ) -> Option<PeerSlot> {
        let mut map = counts.lock().expect("peer counts lock");
        let n = map.entry(peer).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            counts: counts.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().expect("peer counts lock");
        if let Some(n) = map.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

/// Accepts connections on `listener` for ever, at most `max` at once and `max_per` from one
/// address (one sandbox), each handled by `handle` on a task of its own; a connection over a
/// bound is reset at once. `what` names the server in the log.
pub async fn serve_bounded<F, Fut>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    max: usize,
    max_per: usize,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let all = Arc::new(tokio::sync::Semaphore::new(max));
    let per: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "{what}: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = all.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "{what}: at {max} connections, refused one");
            let _ = stream.set_zero_linger();
            continue;
        };
        let Some(slot) = PeerSlot::take(&per, peer.ip(), max_per) else {
            tracing::debug!(%peer, "{what}: too many connections from one sandbox");
            let _ = stream.set_zero_linger();
            continue;
        };
        let job = handle(stream, peer);
        tokio::spawn(async move {
            let _held = (permit, slot);
            job.await;
        });
    }
}

/// Runs `iptables -w ARGS`; whether it succeeded (a rule or chain already gone is a `false`,
/// not an error: removals use it).
fn iptables_ok(args: &[&str]) -> bool {
    std::process::Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Prefix of the host-side veth names ("agentd host"), followed by 10 chars of the sandbox id.
pub const HOST_PREFIX: &str = "adh";

/// The bridge and the subnet.
#[derive(Debug, Clone)]
pub struct Network {
    /// Bridge name.
    pub bridge: String,
    /// The bridge's address (first of the subnet).
    pub bridge_addr: Ipv4Addr,
    /// Subnet network address.
    pub subnet: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
}

fn write_sysctl(path: &str, value: &str) -> io::Result<()> {
    tracing::debug!(path, value, "writing sysctl");
    std::fs::write(path, value)
        .map_err(|e| io::Error::new(e.kind(), format!("failed to write {path}: {e}")))
}

impl Network {
    /// Makes sure the bridge exists, has its address, forwards nothing, and is up.
    pub fn setup(bridge: &str, subnet: Ipv4Addr, prefix_len: u8) -> io::Result<Network> {
        let net = Network {
            bridge: bridge.to_string(),
            bridge_addr: Ipv4Addr::from(u32::from(subnet) + 1),
            subnet,
            prefix_len,
        };
        if !netlink::link_exists(bridge) {
            match netlink::create_bridge(bridge) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("failed to create bridge {bridge}: {e}"),
                    ))
                }
                _ => {}
            }
        }
        let index = netlink::link_index(bridge)?;
        // Before the address goes on: no IPv6 (no link-local address either), no forwarding.
        write_sysctl(
            &format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6"),
            "1",
        )
        .ok();
        write_sysctl(&format!("/proc/sys/net/ipv4/conf/{bridge}/forwarding"), "0")?;
        netlink::add_ipv4(index, net.bridge_addr, prefix_len).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "failed to add {}/{prefix_len} to {bridge}: {e}",
                    net.bridge_addr
                ),
            )
        })?;
        netlink::set_up(index)?;
        Ok(net)
    }

    /// The name of the firewall chain that guards the host from sandboxes of this bridge.
    pub fn chain(&self) -> String {
        format!("AGENTD-{}", self.bridge)
    }

    /// The name of the `nat` chain that redirects open sandboxes' traffic to agentd.
    fn nat_chain(bridge: &str) -> String {
        format!("AGENTD-NAT-{bridge}")
    }

    /// Lets sandboxes reach only `ports` (the gateway's, the egress proxy's) and `nat_port`
    /// (TCP and UDP) on the host: packets arriving from the bridge go through agentd's own
    /// iptables chain, which accepts replies and those ports and drops the rest. Without it,
    /// any service listening on the host's 0.0.0.0 would be reachable from every sandbox at
    /// the bridge's address. With `nat_port`, agentd's `nat` chain redirects what sandboxes
    /// send beyond the subnet (TCP) and their DNS queries (UDP port 53, to any address) to
    /// that port on the bridge's address, where network mode open is served; only open
    /// sandboxes have a route beyond the subnet. The chains and their jumps belong to the
    /// bridge and are (re)made at every start; without `nat_port` the `nat` chain is removed.
    pub fn firewall(&self, ports: &[u16], nat_port: Option<u16>) -> io::Result<()> {
        let chain = self.chain();
        let ipt = |args: &[&str]| -> io::Result<bool> {
            tracing::debug!(?args, "iptables");
            let out = std::process::Command::new("iptables")
                .arg("-w")
                .args(args)
                .output()
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot run iptables ({e}): install it (apt-get install iptables); agentd uses it to keep sandboxes off the host's other ports"),
                    )
                })?;
            Ok(out.status.success())
        };
        if !ipt(&["-N", &chain])? {
            // It exists: start from an empty chain.
            if !ipt(&["-F", &chain])? {
                return Err(io::Error::other(format!(
                    "iptables: cannot flush chain {chain}"
                )));
            }
        }
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let nat = nat_port.map(|p| p.to_string());
        let mut rules: Vec<Vec<&str>> = vec![vec![
            "-A",
            &chain,
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ]];
        for port in ports.iter().chain(&nat) {
            rules.push(vec![
                "-A", &chain, "-p", "tcp", "--dport", port, "-j", "ACCEPT",
            ]);
        }
        if let Some(port) = &nat {
            rules.push(vec![
                "-A", &chain, "-p", "udp", "--dport", port, "-j", "ACCEPT",
            ]);
        }
        rules.push(vec!["-A", &chain, "-j", "DROP"]);
        for r in &rules {
            if !ipt(r)? {
                return Err(io::Error::other(format!("iptables: cannot add {r:?}")));
            }
        }
        let jump = ["INPUT", "-i", self.bridge.as_str(), "-j", chain.as_str()];
        if !ipt(&[&["-C"], &jump[..]].concat())? && !ipt(&[&["-I"], &jump[..]].concat())? {
            return Err(io::Error::other(format!(
                "iptables: cannot add the jump to {chain}"
            )));
        }
        let nat_chain = Self::nat_chain(&self.bridge);
        let Some(port) = &nat else {
            Self::remove_nat(&self.bridge);
            return Ok(());
        };
        if !ipt(&["-t", "nat", "-N", &nat_chain])? && !ipt(&["-t", "nat", "-F", &nat_chain])? {
            return Err(io::Error::other(format!(
                "iptables: cannot flush chain {nat_chain} of table nat"
            )));
        }
        let bridge_addr = self.bridge_addr.to_string();
        let subnet = format!("{}/{}", self.subnet, self.prefix_len);
        let rules: [Vec<&str>; 4] = [
            // DNS to any address: the relay (it answers only open sandboxes).
            vec![
                "-A",
                &nat_chain,
                "-p",
                "udp",
                "--dport",
                "53",
                "-j",
                "REDIRECT",
                "--to-ports",
                port,
            ],
            // The gateway, the proxy and the firewall above: untouched.
            vec!["-A", &nat_chain, "-d", &bridge_addr, "-j", "RETURN"],
            vec!["-A", &nat_chain, "-d", &subnet, "-j", "RETURN"],
            vec![
                "-A",
                &nat_chain,
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                port,
            ],
        ];
        for r in &rules {
            let r: Vec<&str> = [&["-t", "nat"][..], r].concat();
            if !ipt(&r)? {
                return Err(io::Error::other(format!("iptables: cannot add {r:?}")));
            }
        }
        let jump = [
            "-t",
            "nat",
            "PREROUTING",
            "-i",
            self.bridge.as_str(),
            "-j",
            nat_chain.as_str(),
        ];
        let with = |op: &'static str| -> Vec<&str> {
            let mut v = vec!["-t", "nat", op];
            v.extend_from_slice(&jump[2..]);
            v
        };
        if !ipt(&with("-C"))? && !ipt(&with("-I"))? {
            return Err(io::Error::other(format!(
                "iptables: cannot add the jump to {nat_chain}"
            )));
        }
        Ok(())
    }

    /// Removes the `nat` chain of `bridge` and its jump; whether there was one.
    fn remove_nat(bridge: &str) -> bool {
        let chain = Self::nat_chain(bridge);
        let ipt = iptables_ok;
        while ipt(&["-t", "nat", "-D", "PREROUTING", "-i", bridge, "-j", &chain]) {}
        ipt(&["-t", "nat", "-F", &chain]) && ipt(&["-t", "nat", "-X", &chain])
    }

    /// Removes what [`Network::setup`] and [`Network::firewall`] made for `bridge`: the jump to
    /// its chain, the chain, and the bridge (with any veth still on it). Returns what it
    /// removed, one line each; what is already gone is not an error.
    pub fn teardown(bridge: &str) -> io::Result<Vec<String>> {
        let mut removed = Vec::new();
        let chain = format!("AGENTD-{bridge}");
        let ipt = iptables_ok;
        let mut jumps = 0;
        while ipt(&["-D", "INPUT", "-i", bridge, "-j", &chain]) {
            jumps += 1;
        }
        if jumps > 0 {
            removed.push(format!("iptables: the INPUT jump to {chain}"));
        }
        if ipt(&["-F", &chain]) && ipt(&["-X", &chain]) {
            removed.push(format!("iptables: chain {chain}"));
        }
        if Self::remove_nat(bridge) {
            removed.push(format!(
                "iptables: chain {} of table nat and its jump",
                Self::nat_chain(bridge)
            ));
        }
        let bridge_net = Network {
            bridge: bridge.to_string(),
            bridge_addr: Ipv4Addr::UNSPECIFIED,
            subnet: Ipv4Addr::UNSPECIFIED,
            prefix_len: 32,
        };
        for link in bridge_net.leftover_links(&[]) {
            if let Ok(index) = netlink::link_index(&link) {
                if netlink::delete_link(index).is_ok() {
                    removed.push(format!("veth {link}"));
                }
            }
        }
        if let Ok(index) = netlink::link_index(bridge) {
            netlink::delete_link(index).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot delete bridge {bridge}: {e}"))
            })?;
            removed.push(format!("bridge {bridge}"));
        }
        Ok(removed)
    }

    /// The sandbox address with index `n` (0 is the subnet's third address).
    pub fn address(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix_len));
        // Network, bridge and broadcast addresses are not for sandboxes.
        if u64::from(n) + 3 >= size {
            return None;
        }
        Some(Ipv4Addr::from(u32::from(self.subnet) + 2 + n))
    }

    /// Name of the host end of sandbox `id`'s veth pair (the other end is born inside the
    /// sandbox's netns as `eth0`).
    pub fn link_name(id: &str) -> String {
        let short: String = id.chars().take(10).collect();
        format!("{HOST_PREFIX}{short}")
    }

    /// Deletes the veth pair of sandbox `id` if it still exists (both ends go together).
    pub fn remove_link(&self, id: &str) {
        let name = Self::link_name(id);
        if let Ok(index) = netlink::link_index(&name) {
            if let Err(e) = netlink::delete_link(index) {
                tracing::warn!(link = %name, error = %e, "failed to delete veth");
            }
        }
    }

    /// Host-side veth links on *this* bridge whose sandbox is not in `live` (ids). Links of
    /// another agentd (another bridge) are never touched.
    pub fn leftover_links(&self, live: &[String]) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
            return Vec::new();
        };
        let live: Vec<String> = live.iter().map(|id| Self::link_name(id)).collect();
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(HOST_PREFIX) && !live.contains(n))
            .filter(|n| {
                std::fs::read_link(format!("/sys/class/net/{n}/master"))
                    .is_ok_and(|m| m.file_name().is_some_and(|b| b == self.bridge.as_str()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_addresses_and_names() {
        let net = Network {
            bridge: "x".into(),
            bridge_addr: Ipv4Addr::new(10, 0, 0, 1),
            subnet: Ipv4Addr::new(10, 0, 0, 0),
            prefix_len: 29,
        };
        assert_eq!(net.address(0), Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(net.address(4), Some(Ipv4Addr::new(10, 0, 0, 6)));
        assert_eq!(net.address(5), None); // 10.0.0.7 is the broadcast address
        let h = Network::link_name("0123456789abcdef");
        assert_eq!(h, "adh0123456789");
        assert!(h.len() <= 15);
    }
}
