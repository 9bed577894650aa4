//! A sandbox with its own network namespace starts with `lo` down, so even 127.0.0.1 is
//! unreachable inside. The shim brings it up between create and start, from a forked child
//! that joins the namespace: the sandbox's root has no CAP_NET_ADMIN to do it itself, and the
//! shim must stay in the host's namespace. With a [`VethConfig`] the shim also creates the
//! sandbox's veth pair then (its `eth0` born inside the namespace, the host end an isolated
//! port of the caller's bridge) and configures `eth0`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use nix::sched::CloneFlags;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::spec::VethConfig;

/// The name of the veth end inside a sandbox.
pub const SANDBOX_LINK: &str = "eth0";

/// Sets up the network namespace of process `pid`: `lo` up and, with `veth`, moves that link
/// in as `eth0` with its address, up. A default route only when the config names a gateway;
/// without one the sandbox reaches its subnet (the bridge's address) and nothing else.
pub fn configure(pid: Pid, veth: Option<&VethConfig>) -> io::Result<()> {
    if let Some(v) = veth {
        let bridge = crate::netlink::link_index(&v.bridge)
            .map_err(|e| io::Error::new(e.kind(), format!("bridge {}: {e}", v.bridge)))?;
        crate::netlink::create_veth(&v.host, SANDBOX_LINK, bridge, Some(pid.as_raw()))
            .map_err(|e| io::Error::new(e.kind(), format!("veth {}: {e}", v.host)))?;
        // Isolated ports exchange no frames with each other, only with the bridge itself.
        let isolated = format!("/sys/class/net/{}/brport/isolated", v.host);
        tracing::debug!(path = %isolated, "isolating the bridge port");
        std::fs::write(&isolated, "1")
            .and_then(|()| crate::netlink::set_up(crate::netlink::link_index(&v.host)?))
            .map_err(|e| io::Error::new(e.kind(), format!("veth {}: {e}", v.host)))?;
    }
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    tracing::debug!(pid = pid.as_raw(), "configuring the sandbox's netns");
    // SAFETY: the shim is single-threaded (it never starts threads: see agentd-shim.rs), so
    // the child is a full copy with no lock held by another thread; the child only calls
    // setns, socket, ioctl and _exit.
    match unsafe { fork() }.map_err(io::Error::from)? {
        ForkResult::Child => {
            let code = match set_lo_up(&ns).and_then(|()| veth.map_or(Ok(()), set_veth_up)) {
                Ok(()) => 0,
                Err(e) => {
                    // The shim's stderr is its log.
                    eprintln!("agentd-shim: network setup in the sandbox failed: {e}");
                    1
                }
            };
            // SAFETY: _exit ends the child without running the parent's atexit handlers or
            // destructors twice.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => match waitpid(child, None).map_err(io::Error::from)? {
            WaitStatus::Exited(_, 0) => Ok(()),
            other => Err(io::Error::other(format!(
                "network setup in the sandbox's namespace failed ({other:?})"
            ))),
        },
    }
}

fn set_lo_up(ns: &File) -> io::Result<()> {
    nix::sched::setns(ns, CloneFlags::CLONE_NEWNET)?;
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value (empty name, no flags).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into `req`, a valid,
    // exclusively borrowed ifreq; `sock` is an open socket.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFFLAGS the flags member of the union is the initialised one.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
    }
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// In the sandbox's namespace (after `setns`): address and up for `eth0`.
fn set_veth_up(v: &VethConfig) -> io::Result<()> {
    let index = crate::netlink::link_index(SANDBOX_LINK)?;
    crate::netlink::add_ipv4(index, v.address, v.prefix_len)?;
    crate::netlink::set_up(index)?;
    match v.gateway {
        Some(gw) => crate::netlink::add_default_route(index, gw),
        None => Ok(()),
    }
}
