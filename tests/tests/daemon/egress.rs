//! Egress on a leash: a sandbox in allowlist mode reaches the hosts on its list through
//! agentd's proxy (CONNECT and plain HTTP), a denied host gets a 403 that says how to allow
//! it, a connection that bypasses the proxy fails at once, DNS fails inside, internal
//! addresses stay refused, the list of a running sandbox can change, and every connection
//! is in its egress log and in metrics. The only outside host reached is the npm registry
//! this machine installs packages from (its name read from npm's own configuration).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentd_tests::daemon::Daemon;
use agentd_tests::require_sandbox_support;
use serde_json::json;

use super::{plain, small_daemon, store};

/// An HTTP server on the host's loopback that answers `hello from the host` and keeps the
/// request heads it saw.
fn host_server() -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap_or(0) == 1 {
                head.push(b[0]);
            }
            s2.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\nConnection: close\r\n\r\nhello from the host\n",
            );
        }
    });
    (port, seen)
}

/// The host of the npm registry this machine uses, as npm itself reports it.
fn registry_host() -> String {
    let out = std::process::Command::new("npm")
        .args(["config", "get", "registry"])
        .output()
        .expect("npm (the test reads the registry host from its configuration)");
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let host = url
        .split("://")
        .nth(1)
        .and_then(|r| r.split(['/', ':']).next())
        .unwrap_or_default()
        .to_string();
    assert!(!host.is_empty(), "npm config get registry said {url:?}");
    host
}

/// A raw request to the proxy from inside sandbox `id`: the first `lines` lines of the answer
/// (all of it when the proxy closes first), and how long it took.
fn via_proxy(d: &Daemon, id: &str, proxy: &str, request: &str) -> (String, Duration) {
    let (host, port) = proxy.split_once(':').unwrap();
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{port} || exit 9\nprintf '{}' >&3\ntimeout 15 head -c 2000 <&3\n",
        request.replace('\r', "\\r").replace('\n', "\\n")
    );
    let t = Instant::now();
    let (_, out, _) = d.exec(id, &["bash", "-c", &script]);
    (out, t.elapsed())
}

#[test]
fn test_egress_allowlist_through_the_proxy() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let (port, seen) = host_server();
    let registry = registry_host();
    let preset = format!("local=localhost:{port}");
    // On this machine the registries resolve into a reserved range the proxy refuses by
    // default: the admin's setting lets it reach them (and the host server on loopback).
    let mut networks = vec!["127.0.0.1/32".to_string()];
    for a in std::net::ToSocketAddrs::to_socket_addrs(&(registry.as_str(), 443)).unwrap() {
        networks.push(format!("{}/32", a.ip()));
    }
    let networks = networks.join(",");
    let d = small_daemon(
        &images,
        &[
            "--egress-allow-networks",
            &networks,
            "--egress-preset",
            &preset,
        ],
    );
    let id = plain(
        &d,
        json!({"network": {"mode": "allowlist", "allow": ["local", registry]}}),
    );
    let v = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert_eq!(v["network"]["mode"], "allowlist", "{v:#}");
    // The proxy variables are set, for every process of the sandbox.
    let (_, env, _) = d.exec(
        &id,
        &["sh", "-c", "echo $HTTPS_PROXY $http_proxy $NO_PROXY"],
    );
    let proxy = env
        .split_whitespace()
        .next()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    assert!(env.contains("localhost"), "{env}");
    let bridge = proxy.split(':').next().unwrap().to_string();
    assert!(
        env.split_whitespace().nth(2).unwrap().starts_with(&bridge),
        "NO_PROXY names the gateway: {env}"
    );

    // Plain HTTP to an allowed host (a preset): forwarded in origin form, proxy headers
    // dropped.
    let (out, _) = via_proxy(
        &d,
        &id,
        &proxy,
        &format!("GET http://localhost:{port}/simple/x HTTP/1.1\r\nHost: localhost:{port}\r\nProxy-Authorization: Basic c2VjcmV0\r\n\r\n"),
    );
    assert!(out.contains("hello from the host"), "{out}");
    let head = seen.lock().unwrap().last().cloned().unwrap_or_default();
    assert!(head.starts_with("GET /simple/x HTTP/1.1\r\n"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("proxy-authorization"),
        "{head}"
    );

    // CONNECT to the registry this machine uses: the tunnel opens.
    let (out, _) = via_proxy(
        &d,
        &id,
        &proxy,
        &format!("CONNECT {registry}:443 HTTP/1.1\r\nHost: {registry}:443\r\n\r\n"),
    );
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "CONNECT {registry}:443: {out}\n{}",
        d.log()
    );

    // A host not on the list: 403 with what to do, never a connection.
    let (out, took) = via_proxy(
        &d,
        &id,
        &proxy,
        "CONNECT denied.example:443 HTTP/1.1\r\nHost: denied.example:443\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        out.contains("egress to denied.example:443 is not allowed")
            && out.contains(&format!("PUT /v1/sandboxes/{id}/egress"))
            && out.contains("--allow denied.example"),
        "{out}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The gateway's address is internal: on the list or not, refused (no admin network).
    let r = d.call(
        "PUT",
        &format!("/v1/sandboxes/{id}/egress"),
        Some(json!({"allow": ["local", registry, bridge.clone() + ":22"]})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (out, _) = via_proxy(
        &d,
        &id,
        &proxy,
        &format!("CONNECT {bridge}:22 HTTP/1.1\r\nHost: {bridge}\r\n\r\n"),
    );
    assert!(
        out.starts_with("HTTP/1.1 403") && out.contains("internal address"),
        "{out}"
    );

    // Around the proxy: no route, at once; no DNS.
    let (code, _, err) = d.exec(&id, &["bash", "-c", "exec 3<>/dev/tcp/192.0.2.1/443"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("unreachable"), "{err}");
    let t = Instant::now();
    let (code, _, err) = d.exec(
        &id,
        &["bash", "-c", &format!("exec 3<>/dev/tcp/{registry}/443")],
    );
    assert_ne!(code, 0, "a name resolves inside: {err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    // The list changes live: the host server is refused from the next connection.
    let r = d.call(
        "PUT",
        &format!("/v1/sandboxes/{id}/egress"),
        Some(json!({"allow": [registry]})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["network"]["allow"], json!([registry]));
    let (out, _) = via_proxy(
        &d,
        &id,
        &proxy,
        &format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    );
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    let r = d.call(
        "PUT",
        &format!("/v1/sandboxes/{id}/egress"),
        Some(json!({"allow": ["no such host!"]})),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    // The log and the metrics.
    let log = d
        .call("GET", &format!("/v1/sandboxes/{id}/egress"), None)
        .json();
    let entries = log["log"].as_array().unwrap();
    let verdicts: Vec<(String, bool)> = entries
        .iter()
        .map(|e| {
            (
                e["host"].as_str().unwrap().to_string(),
                e["allowed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            ("localhost".to_string(), true),
            (registry.clone(), true),
            ("denied.example".to_string(), false),
            (bridge.clone(), false),
            ("localhost".to_string(), false),
        ],
        "{log:#}"
    );
    assert!(entries[0]["bytes_in"].as_u64().unwrap() > 20, "{log:#}");
    let metrics = d.call("GET", "/metrics", None).text();
    assert!(
        metrics.contains("agentd_egress_connections_total{verdict=\"denied\"} 3"),
        "{metrics}"
    );

    // Mode none (the default): no proxy variables, and the proxy refuses it.
    let none = plain(&d, json!({"limits": {"memory": "512m"}}));
    let (_, env, _) = d.exec(&none, &["sh", "-c", "echo \"[$HTTPS_PROXY]\""]);
    assert_eq!(env.trim(), "[]");
    let (out, _) = via_proxy(
        &d,
        &none,
        &proxy,
        &format!("CONNECT {registry}:443 HTTP/1.1\r\n\r\n"),
    );
    assert!(
        out.starts_with("HTTP/1.1 403") && out.contains("network mode none"),
        "{out}"
    );
    let r = d.call(
        "PUT",
        &format!("/v1/sandboxes/{none}/egress"),
        Some(json!({"allow": [registry]})),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    d.delete_all_and_check_clean();
}

/// Network mode open: no proxy variables, DNS works inside (agentd's relay), TCP reaches a
/// public address directly (git over HTTPS to the registry, through agentd's NAT), internal
/// addresses and the host's own address are reset at once even when the admin allows their
/// network, and every connection is in the egress log.
#[test]
fn test_egress_open_through_agentds_nat() {
    require_sandbox_support!();
    let Some(images) = store() else { return };
    let registry = registry_host();
    let addrs: Vec<std::net::IpAddr> =
        std::net::ToSocketAddrs::to_socket_addrs(&(registry.as_str(), 443))
            .unwrap()
            .map(|a| a.ip())
            .collect();
    // The host's own address on the way to the registry.
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    probe.connect((addrs[0], 443)).unwrap();
    let host_ip = probe.local_addr().unwrap().ip();
    // The registry's addresses are in a reserved range here: the admin allows them, and the
    // host's own address too (still refused: it is the host's).
    let mut networks: Vec<String> = addrs.iter().map(|a| format!("{a}/32")).collect();
    networks.push(format!("{host_ip}/32"));
    let d = small_daemon(
        &images,
        &[
            "--egress-allow-networks",
            &networks.join(","),
            "--egress-ca-file",
            "/etc/ssl/certs/ca-certificates.crt",
        ],
    );
    let id = plain(&d, json!({"network": "open"}));
    let v = d.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert_eq!(v["network"]["mode"], "open", "{v:#}");
    let (_, out, _) = d.exec(
        &id,
        &["sh", "-c", "echo \"[$HTTPS_PROXY]\"; cat /etc/resolv.conf"],
    );
    assert!(out.starts_with("[]\n"), "no proxy in mode open: {out}");
    assert!(out.contains("nameserver 10."), "{out}");

    // A name resolves inside and its address answers: git speaks TLS and HTTP to the
    // registry (which is no git server: its answer is an HTTP error, after DNS, TCP and TLS).
    let t = Instant::now();
    let (code, _, err) = d.exec(
        &id,
        &[
            "git",
            "ls-remote",
            &format!("https://{registry}/agentd-open-mode-probe.git"),
        ],
    );
    assert_ne!(code, 0);
    assert!(
        !err.contains("Could not resolve") && !err.contains("Failed to connect"),
        "{err}\n{}",
        d.log()
    );
    assert!(
        err.contains("not found") || err.contains("returned error"),
        "the registry answered over HTTPS: {err}"
    );
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());

    // Internal and own addresses: reset at once, allowed network or not.
    for (target, port) in [
        ("169.254.169.254".to_string(), 80),
        ("10.1.2.3".to_string(), 80),
        (host_ip.to_string(), 22),
    ] {
        let t = Instant::now();
        let (code, out, err) = d.exec(
            &id,
            &[
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{target}/{port} && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"),
            ],
        );
        assert_ne!(code, 0, "{target}:{port} answered: {out}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{target}: {:?}",
            t.elapsed()
        );
        // The reset lands on the read, or on the write when it came first.
        assert!(
            err.contains("reset") || err.contains("refused") || err.contains("Broken pipe"),
            "{target}: {err}"
        );
    }

    let log = d
        .call("GET", &format!("/v1/sandboxes/{id}/egress"), None)
        .json();
    let entries = log["log"].as_array().unwrap();
    let find = |host: &str| {
        entries
            .iter()
            .find(|e| e["host"] == host)
            .unwrap_or_else(|| panic!("no entry for {host}: {log:#}"))
    };
    let git = find(&addrs[0].to_string());
    assert_eq!(git["allowed"], true, "{log:#}");
    assert_eq!(git["method"], "TCP", "{log:#}");
    assert!(
        git["bytes_in"].as_u64().unwrap() > 1000,
        "a TLS server's certificates came back: {log:#}"
    );
    let meta = find("169.254.169.254");
    assert_eq!(meta["allowed"], false);
    assert!(
        meta["reason"].as_str().unwrap().contains("internal"),
        "{log:#}"
    );
    let own = find(&host_ip.to_string());
    assert_eq!(own["allowed"], false);
    assert!(
        own["reason"].as_str().unwrap().contains("agentd's host"),
        "{log:#}"
    );

    // Mode open is the admin's to turn off; a list of hosts needs allowlist.
    let r = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"image": "opencode", "opencode": false, "network": {"mode": "open", "allow": [registry]}})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    d.delete_all_and_check_clean();
}
