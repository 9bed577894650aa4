//! A minimal rtnetlink client: the few link and address operations sandboxes need (a bridge,
//! veth pairs, moving a link into a sandbox's network namespace, IPv4 addresses, a default
//! route).
//!
//! Forking `ip(8)` costs milliseconds per call (MACHINE.md); a netlink request costs
//! microseconds. Each call opens a `NETLINK_ROUTE` socket, sends one request with `NLM_F_ACK`
//! and reads the kernel's acknowledgement, whose error code becomes the `io::Error`. The
//! socket acts in the network namespace of the calling thread.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// Constants of <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>, <linux/veth.h>.
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_PID: u16 = 19;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const IFF_UP: u32 = 0x1;
/// sizeof(struct ifinfomsg).
const IFINFOMSG_LEN: usize = 16;

/// A netlink request being built: header, fixed part, attributes (nested ones included).
struct Message {
    buf: Vec<u8>,
    /// Offsets of the nested attributes still open.
    nests: Vec<usize>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl Message {
    fn new(kind: u16, flags: u16) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish()
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        Message {
            buf,
            nests: Vec::new(),
        }
    }

    /// Appends a `struct ifinfomsg` (family AF_UNSPEC).
    fn ifinfo(&mut self, index: i32, flags: u32, change: u32) -> &mut Self {
        self.buf.extend_from_slice(&[0, 0, 0, 0]); // family, pad, type
        self.buf.extend_from_slice(&index.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&change.to_ne_bytes());
        self
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = u16::try_from(4 + data.len()).expect("netlink attribute too long");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    fn attr_str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(kind, &data)
    }

    fn begin(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self
    }

    fn end(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("unbalanced netlink nesting");
        let len = u16::try_from(self.buf.len() - start).expect("netlink attribute too long");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// Sends the request and waits for the kernel's acknowledgement.
    fn send(&mut self) -> io::Result<()> {
        assert!(self.nests.is_empty(), "unbalanced netlink nesting");
        let len = u32::try_from(self.buf.len()).expect("netlink message too long");
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        let sock = open_socket()?;
        // SAFETY: the buffer is valid for its length; send does not keep the pointer.
        let sent = unsafe {
            libc::send(
                sock.as_raw_fd(),
                self.buf.as_ptr().cast(),
                self.buf.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = [0u8; 4096];
        loop {
            // SAFETY: the buffer is valid for writes of its length.
            let n =
                unsafe { libc::recv(sock.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            let n = usize::try_from(n).unwrap_or(0);
            // An ack is an NLMSG_ERROR message whose error is 0 (success) or -errno.
            if n >= 20 && u16::from_ne_bytes([reply[4], reply[5]]) == NLMSG_ERROR {
                let code = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
                return if code == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
            if n == 0 {
                return Err(io::Error::other("netlink socket closed without an ack"));
            }
        }
    }
}

fn open_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; a non-negative result is a new fd we own.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The index of link `name` in the calling thread's network namespace.
pub fn link_index(name: &str) -> io::Result<i32> {
    let c = CString::new(name).map_err(|_| io::Error::other("link name contains NUL"))?;
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    i32::try_from(index).map_err(|_| io::Error::other("link index out of range"))
}

/// Whether link `name` exists.
pub fn link_exists(name: &str) -> bool {
    link_index(name).is_ok()
}

/// Creates bridge `name` (down). Fails with `AlreadyExists` if a link of that name exists.
pub fn create_bridge(name: &str) -> io::Result<()> {
    tracing::debug!(name, "netlink: creating bridge");
    Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
        .ifinfo(0, 0, 0)
        .attr_str(IFLA_IFNAME, name)
        .begin(IFLA_LINKINFO)
        .attr_str(IFLA_INFO_KIND, "bridge")
        .end()
        .send()
}

/// Creates the veth pair `host` - `peer`, with `host` attached to bridge `master` and, with
/// `peer_netns_pid`, `peer` created directly in the network namespace of that process.
///
/// Creating the peer in its namespace costs microseconds; moving an existing link there
/// (RTM_NEWLINK with IFLA_NET_NS_PID on the link) waits for an RCU grace period (about 20 ms
/// measured here).
pub fn create_veth(
    host: &str,
    peer: &str,
    master: i32,
    peer_netns_pid: Option<i32>,
) -> io::Result<()> {
    tracing::debug!(
        host,
        peer,
        master,
        ?peer_netns_pid,
        "netlink: creating veth pair"
    );
    let mut m = Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
    m.ifinfo(0, 0, 0)
        .attr_str(IFLA_IFNAME, host)
        .attr(IFLA_MASTER, &master.to_ne_bytes())
        .begin(IFLA_LINKINFO)
        .attr_str(IFLA_INFO_KIND, "veth")
        .begin(IFLA_INFO_DATA)
        .begin(VETH_INFO_PEER);
    // The peer's attributes follow its own ifinfomsg inside VETH_INFO_PEER.
    m.buf.extend_from_slice(&[0u8; IFINFOMSG_LEN]);
    m.attr_str(IFLA_IFNAME, peer);
    if let Some(pid) = peer_netns_pid {
        m.attr(IFLA_NET_NS_PID, &pid.to_ne_bytes());
    }
    m.end().end().end().send()
}

/// Brings link `index` up.
pub fn set_up(index: i32) -> io::Result<()> {
    tracing::debug!(index, "netlink: link up");
    Message::new(RTM_NEWLINK, 0)
        .ifinfo(index, IFF_UP, IFF_UP)
        .send()
}

/// Sets the MAC address of link `index`.
pub fn set_mac(index: i32, mac: [u8; 6]) -> io::Result<()> {
    Message::new(RTM_NEWLINK, 0)
        .ifinfo(index, 0, 0)
        .attr(IFLA_ADDRESS, &mac)
        .send()
}

/// Deletes link `index` (for a veth, both ends go).
pub fn delete_link(index: i32) -> io::Result<()> {
    tracing::debug!(index, "netlink: deleting link");
    Message::new(RTM_DELLINK, 0).ifinfo(index, 0, 0).send()
}

/// Adds `addr/prefix` to link `index`. An address the link already has is not an error.
pub fn add_ipv4(index: i32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
    tracing::debug!(index, %addr, prefix, "netlink: adding address");
    let index = u32::try_from(index).map_err(|_| io::Error::other("bad link index"))?;
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    let broadcast = Ipv4Addr::from(u32::from(addr) | !mask);
    let mut m = Message::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL);
    // struct ifaddrmsg: family, prefixlen, flags, scope (universe), index.
    m.buf
        .extend_from_slice(&[libc::AF_INET as u8, prefix, 0, 0]);
    m.buf.extend_from_slice(&index.to_ne_bytes());
    match m
        .attr(IFA_LOCAL, &addr.octets())
        .attr(IFA_ADDRESS, &addr.octets())
        .attr(IFA_BROADCAST, &broadcast.octets())
        .send()
    {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Adds the IPv4 default route via `gateway` on link `index` (the link must be up and have an
/// address on the gateway's subnet).
pub fn add_default_route(index: i32, gateway: Ipv4Addr) -> io::Result<()> {
    tracing::debug!(index, %gateway, "netlink: adding the default route");
    let index = u32::try_from(index).map_err(|_| io::Error::other("bad link index"))?;
    let mut m = Message::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL);
    // struct rtmsg: family, dst_len (0: default), src_len, tos, table, protocol, scope, type,
    // flags (u32).
    m.buf.extend_from_slice(&[
        libc::AF_INET as u8,
        0,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
    ]);
    m.buf.extend_from_slice(&0u32.to_ne_bytes());
    m.attr(RTA_GATEWAY, &gateway.octets())
        .attr(RTA_OIF, &index.to_ne_bytes())
        .send()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_nested_attribute_lengths() {
        let mut m = Message::new(RTM_NEWLINK, 0);
        m.ifinfo(0, 0, 0)
            .begin(IFLA_LINKINFO)
            .attr_str(IFLA_INFO_KIND, "veth")
            .end();
        // header 16 + ifinfomsg 16, then LINKINFO (4) holding KIND (4 + "veth\0" padded to 8).
        assert_eq!(m.buf.len(), 16 + 16 + 4 + 12);
        assert_eq!(u16::from_ne_bytes([m.buf[32], m.buf[33]]), 16);
        assert_eq!(u16::from_ne_bytes([m.buf[36], m.buf[37]]), 9);
    }
}
