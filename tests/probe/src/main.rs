//! agentd-probe: a static binary that runs inside a sandbox and reports what it can and cannot
//! do, as `key=value` lines on stdout. The end-to-end tests parse them; the probe itself judges
//! nothing.
//!
//! Modes:
//! - `report`: identity, namespaces, seccomp state, capabilities, visible processes, /sys.
//! - `syscalls`: tries each syscall the default seccomp profile denies, with arguments that
//!   cannot have an effect even if the call were allowed, and reports the errno.
//! - `zombies`: orphans a child, lets it exit, and counts zombies PID 1 failed to reap.
//! - `burn SECS`: spins for SECS of wall time, then reports the CPU time it got.
//! - `alloc MIB`: allocates and touches MIB mebibytes.
//! - `forkbomb SECS`: forks for SECS or until refused 200 times, counting both, then waits.
//! - `orphan`: helper for `zombies` (starts `sleep-ms 200` and exits at once).
//! - `sleep-ms MS`: sleeps.
//!
//! It has no dependencies (built with `-C target-feature=+crt-static` it runs in any rootfs), so
//! the few libc functions it needs are declared here.

use std::ffi::c_long;
use std::fs;
use std::time::{Duration, Instant};

extern "C" {
    fn syscall(number: c_long, ...) -> c_long;
    fn __errno_location() -> *mut i32;
}

/// x86_64 syscall numbers (the probe only runs on the test host's architecture).
const SYSCALLS: &[(&str, c_long)] = &[
    ("mount", 165),
    ("umount2", 166),
    ("ptrace", 101),
    ("kexec_load", 246),
    ("kexec_file_load", 320),
    ("bpf", 321),
    ("init_module", 175),
    ("finit_module", 313),
    ("delete_module", 176),
    ("keyctl", 250),
    ("add_key", 248),
    ("request_key", 249),
    ("userfaultfd", 323),
    ("perf_event_open", 298),
    ("open_by_handle_at", 304),
    ("pivot_root", 155),
    ("swapon", 167),
    ("swapoff", 168),
    ("reboot", 169),
    ("setns", 308),
];

const SYS_UNSHARE: c_long = 272;
const CLONE_NEWUSER: c_long = 0x1000_0000;

/// Calls syscall `nr` with arguments chosen to be harmless (null pointers, bad fds, invalid
/// commands); returns 0 or the errno.
fn try_syscall(name: &str, nr: c_long) -> i32 {
    let (a, b, c, d, e): (c_long, c_long, c_long, c_long, c_long) = match name {
        // PTRACE_PEEKDATA on pid -1: ESRCH if allowed.
        "ptrace" => (2, -1, 0, 0, 0),
        // Bad fds where an fd is expected.
        "kexec_file_load" | "finit_module" | "open_by_handle_at" | "setns" => (-1, -1, 0, 0, 0),
        // Invalid commands or flags.
        "bpf" | "keyctl" | "userfaultfd" => (-1, 0, 0, 0, 0),
        "perf_event_open" => (0, 0, -1, -1, 0),
        // Bad magic numbers: EINVAL if allowed.
        "reboot" => (0, 0, 0, 0, 0),
        _ => (0, 0, 0, 0, 0),
    };
    // SAFETY: every argument is a null pointer, a negative fd or an invalid command, so the
    // kernel returns an error without reading or writing our memory.
    let ret = unsafe { syscall(nr, a, b, c, d, e) };
    if ret < 0 {
        errno()
    } else {
        0
    }
}

fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's life.
    unsafe { *__errno_location() }
}

fn status_field(name: &str) -> String {
    fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

fn pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn report() {
    println!(
        "hostname={}",
        fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "uid={}",
        status_field("Uid:").split_whitespace().next().unwrap_or("")
    );
    let map = fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    println!(
        "uid_map={}",
        map.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    println!("seccomp={}", status_field("Seccomp:"));
    println!("no_new_privs={}", status_field("NoNewPrivs:"));
    println!("cap_eff={}", status_field("CapEff:"));
    println!("cap_bnd={}", status_field("CapBnd:"));
    let p = pids();
    println!("visible_pids={}", p.len());
    let init = fs::read("/proc/1/cmdline").unwrap_or_default();
    println!(
        "pid1={}",
        String::from_utf8_lossy(&init).replace('\0', " ").trim()
    );
    let sys_write = fs::write("/sys/kernel/uevent_helper", "x");
    println!(
        "sys_write={}",
        sys_write
            .map(|_| "ok".to_string())
            .unwrap_or_else(|e| format!("{}", e.raw_os_error().unwrap_or(0)))
    );
    let sys_ro = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split_whitespace().nth(4) == Some("/sys")
                && l.split_whitespace()
                    .nth(5)
                    .is_some_and(|o| o.split(',').any(|x| x == "ro"))
        });
    println!("sys_ro={sys_ro}");
    let devs: Vec<String> = fs::read_dir("/dev")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut devs = devs;
    devs.sort();
    println!("dev={}", devs.join(","));
    println!(
        "kcore_size={}",
        fs::metadata("/proc/kcore").map(|m| m.len()).unwrap_or(0)
    );
    let tmp = fs::write("/tmp/probe-write", "x").is_ok();
    println!("tmp_writable={tmp}");
}

fn syscalls() {
    for (name, nr) in SYSCALLS {
        println!("{name}={}", try_syscall(name, *nr));
    }
    // Last: if allowed, it would move the probe into a new user namespace (harmless, it exits).
    // SAFETY: unshare takes only a flags integer.
    let ret = unsafe { syscall(SYS_UNSHARE, CLONE_NEWUSER) };
    println!("unshare_newuser={}", if ret < 0 { errno() } else { 0 });
}

/// Opens a socket of each family (type, family number) and reports 0 or the errno.
fn sockets() {
    const SYS_SOCKET: c_long = 41;
    const SYS_CLOSE: c_long = 3;
    let (stream, dgram, seqpacket): (c_long, c_long, c_long) = (1, 2, 5);
    let families: [(&str, c_long, c_long); 8] = [
        ("unix", 1, stream),
        ("inet", 2, stream),
        ("netlink", 16, dgram),
        ("packet", 17, dgram),
        ("alg", 38, seqpacket),
        ("vsock", 40, stream),
        ("key", 15, 3),
        ("appletalk", 5, dgram),
    ];
    for (name, family, kind) in families {
        // SAFETY: socket takes three integers and returns a new fd or an error; the fd is
        // closed at once.
        let fd = unsafe { syscall(SYS_SOCKET, family, kind, 0 as c_long) };
        if fd >= 0 {
            // SAFETY: fd is the socket just opened, owned by nobody else.
            unsafe { syscall(SYS_CLOSE, fd) };
            println!("{name}=0");
        } else {
            println!("{name}={}", errno());
        }
    }
}

fn zombies() {
    let me = std::env::current_exe()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "/probe".into());
    let status = std::process::Command::new(&me).arg("orphan").status();
    println!(
        "orphan_helper={}",
        status.map(|s| s.success()).unwrap_or(false)
    );
    std::thread::sleep(Duration::from_millis(1200));
    let mut zombies = 0;
    for pid in pids() {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the parenthesised command name.
        if let Some(rest) = stat.rsplit_once(')') {
            if rest.1.trim_start().starts_with('Z') {
                zombies += 1;
            }
        }
    }
    println!("zombies={zombies}");
}

fn cpu_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|r| r.1.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 overall, 12 and 13 after the command name.
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    ticks / 100.0
}

fn burn(secs: f64) {
    let start = Instant::now();
    let mut x: u64 = 1;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..10_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
    }
    println!("burn_sink={}", x % 2);
    println!("cpu_seconds={:.3}", cpu_seconds());
    println!("wall_seconds={:.3}", start.elapsed().as_secs_f64());
}

fn alloc(mib: usize) {
    let mut blocks = Vec::new();
    for i in 0..mib {
        let mut v = vec![0u8; 1 << 20];
        for j in (0..v.len()).step_by(4096) {
            v[j] = (i + j) as u8;
        }
        blocks.push(v);
    }
    println!("allocated_mib={}", blocks.len());
}

/// Starts long-sleeping copies of itself as fast as it can for SECS, never giving up when a
/// fork fails (a shell would exit on the first failure), and reports how it went.
fn forkbomb(secs: f64) {
    let me = std::env::current_exe()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let start = Instant::now();
    let (mut spawned, mut failed) = (0u64, 0u64);
    let mut children = Vec::new();
    // Fork until SECS pass or the limit has refused us many times (the point is made).
    while start.elapsed().as_secs_f64() < secs && failed < 200 {
        match std::process::Command::new(&me)
            .args(["sleep-ms", "120000"])
            .spawn()
        {
            Ok(c) => {
                spawned += 1;
                children.push(c);
            }
            Err(_) => {
                failed += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    println!("spawned={spawned}");
    println!("fork_failures={failed}");
    // Leave the children running: the test looks at the cgroup while they live.
    std::thread::sleep(Duration::from_secs(120));
}

/// A small web app on `port` of `addr`: answers every request with its path and the cookies
/// it got, and sets two cookies (one host-only, one for the whole `localhost` domain).
fn http(port: u16, addr: &str) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind((addr, port)).expect("bind");
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
            match c.read(&mut b) {
                Ok(1) => head.push(b[0]),
                _ => break,
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
        let cookie = text
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("cookie")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        let body = format!("hello from port {port} path={path} cookie=[{cookie}]\n");
        let _ = write!(
            c,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nSet-Cookie: app=1; Path=/\r\nSet-Cookie: wide=1; Domain=localhost; Path=/\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("report") => report(),
        Some("sockets") => sockets(),
        Some("syscalls") => syscalls(),
        Some("zombies") => zombies(),
        Some("burn") => burn(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1.0)),
        Some("alloc") => alloc(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64)),
        Some("forkbomb") => forkbomb(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2.0)),
        Some("orphan") => {
            let me = std::env::current_exe()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Started and never waited for: once we exit it is re-parented to PID 1.
            let _ = std::process::Command::new(me)
                .args(["sleep-ms", "200"])
                .spawn();
        }
        Some("http") => http(
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8080),
            args.get(3).map_or("0.0.0.0", String::as_str),
        ),
        Some("sleep-ms") => std::thread::sleep(Duration::from_millis(
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100),
        )),
        _ => {
            eprintln!("usage: agentd-probe report|syscalls|zombies|burn SECS|alloc MIB");
            std::process::exit(2);
        }
    }
}
