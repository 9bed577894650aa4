//! agentd's web UI: static assets embedded in the binary (no build step, no CDN; vendored
//! libraries pinned and checked by their hashes), served at `/` and `/ui/...`, and the
//! browser's login.
//!
//! Who may, on the TCP listener:
//! - `POST /ui/login` with agentd's token (a form or JSON), or `GET /ui/login?ticket=T` with a
//!   one-use ticket of 60 s (`POST /v1/ui/tickets`, what `agentd ui` prints as a link), gets a
//!   session cookie `agentd_ui`: random, HttpOnly, SameSite=Strict, host-only, 12 h, in memory.
//! - With that cookie, the browser may call the API ([`allows`]): reads (GET, HEAD) as is; a
//!   change must carry the header `X-Agentd-CSRF: 1` (a form or an `<img>` of another site
//!   cannot set it, and a cross-origin `fetch` that sets it needs a CORS preflight agentd never
//!   grants) and, when the browser names one, come from the UI's own origin; a WebSocket
//!   must come from the UI's own origin (`Origin`: browsers send cookies with WebSockets
//!   whatever the site). When the browser says where a request comes from
//!   (`Sec-Fetch-Site`), only `same-origin` (and `none`: a URL opened directly) may use the
//!   session at all, reads included. The session never opens the API's proxy paths
//!   (`/v1/sandboxes/{id}/opencode`, `/ports`): the UI opens those on the sandbox's origins with
//!   a ticket. Sandboxes' origins are other hosts: the host-only cookie never reaches them, and
//!   their pages are refused by those checks.
//! - Every UI page has a strict Content Security Policy: scripts only from agentd itself (no
//!   inline script), connections only to agentd, no framing. Styles may be inline (xterm.js
//!   writes its own `<style>`).

use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HOST, LOCATION, ORIGIN, SET_COOKIE};
use hyper::{HeaderMap, Method, Response, StatusCode};

use super::{Body, Origin, Req};
use crate::sandbox::{constant_time_eq, Manager};

/// The UI session's cookie.
pub const UI_COOKIE: &str = "agentd_ui";
/// The header a cookie-authenticated change must carry.
pub const CSRF_HEADER: &str = "x-agentd-csrf";
/// The scope of UI tickets and sessions in the origins' store.
const UI_SCOPE: &str = "@ui";

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; font-src 'self'; connect-src 'self'; frame-ancestors 'none'; \
    base-uri 'none'; form-action 'self'";

/// An embedded file: its path under `/ui/`, its type and its bytes.
struct Asset {
    path: &'static str,
    kind: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "index.html",
        kind: "text/html; charset=utf-8",
        body: include_bytes!("../../ui/index.html"),
    },
    Asset {
        path: "app.js",
        kind: "text/javascript; charset=utf-8",
        body: include_bytes!("../../ui/app.js"),
    },
    Asset {
        path: "diff.js",
        kind: "text/javascript; charset=utf-8",
        body: include_bytes!("../../ui/diff.js"),
    },
    Asset {
        path: "style.css",
        kind: "text/css; charset=utf-8",
        body: include_bytes!("../../ui/style.css"),
    },
    Asset {
        path: "vendor/xterm.js",
        kind: "text/javascript; charset=utf-8",
        body: include_bytes!("../../ui/vendor/xterm.js"),
    },
    Asset {
        path: "vendor/xterm.css",
        kind: "text/css; charset=utf-8",
        body: include_bytes!("../../ui/vendor/xterm.css"),
    },
    Asset {
        path: "vendor/addon-fit.js",
        kind: "text/javascript; charset=utf-8",
        body: include_bytes!("../../ui/vendor/addon-fit.js"),
    },
];

/// Bytes of every asset a page loads (reported in the UI test).
pub fn bundle_bytes() -> usize {
    ASSETS.iter().map(|a| a.body.len()).sum()
}

fn respond(status: StatusCode, kind: &str, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(super::full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    let set = |h: &mut HeaderMap, k: &'static str, v: &str| {
        if let Ok(v) = v.parse() {
            h.insert(k, v);
        }
    };
    set(h, "content-type", kind);
    set(h, "content-security-policy", CSP);
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "no-referrer");
    set(h, "x-frame-options", "DENY");
    set(h, "cache-control", "no-cache");
    r
}

fn redirect(to: &str, cookie: Option<String>) -> Response<Body> {
    let mut r = respond(
        StatusCode::SEE_OTHER,
        "text/plain; charset=utf-8",
        Vec::new(),
    );
    if let Ok(v) = to.parse() {
        r.headers_mut().insert(LOCATION, v);
    }
    if let Some(c) = cookie.and_then(|c| c.parse().ok()) {
        r.headers_mut().insert(SET_COOKIE, c);
    }
    r
}

fn session_cookie(session: &str) -> String {
    format!(
        "{UI_COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        super::origins::SESSION_TTL.as_secs()
    )
}

/// Whether `req` is the UI's (a page, an asset, the login); the API's paths are not.
pub fn is_ui(path: &str) -> bool {
    path == "/" || path == "/ui" || path.starts_with("/ui/")
}

/// A ticket for the UI's login link.
pub fn new_ticket() -> String {
    super::origins::new_ticket(UI_SCOPE)
}

/// Serves the UI's pages, assets and login.
pub async fn serve(origin: &Origin, req: Req) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::GET | Method::HEAD, "/" | "/ui" | "/ui/") => asset("index.html"),
        (Method::GET, "/ui/login") => {
            let ticket = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("ticket="))
                .unwrap_or("")
                .to_string();
            match super::origins::redeem(&ticket, UI_SCOPE) {
                Some(session) => redirect("/", Some(session_cookie(&session))),
                None => respond(
                    StatusCode::FORBIDDEN,
                    "text/plain; charset=utf-8",
                    b"this login link is used or expired: ask for a new one (agentd ui)\n".to_vec(),
                ),
            }
        }
        (Method::POST, "/ui/login") => login(origin, req).await,
        (Method::POST, "/ui/logout") => {
            let mut r = respond(StatusCode::NO_CONTENT, "text/plain", Vec::new());
            if let Ok(v) =
                format!("{UI_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0").parse()
            {
                r.headers_mut().insert(SET_COOKIE, v);
            }
            if let Some(s) = session_id(req.headers()) {
                super::origins::forget_session(&s);
            }
            r
        }
        (Method::GET | Method::HEAD, p) => match p.strip_prefix("/ui/") {
            Some(name) => asset(name),
            None => not_found(),
        },
        _ => respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            b"method not allowed\n".to_vec(),
        ),
    }
}

fn not_found() -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        b"not found\n".to_vec(),
    )
}

fn asset(name: &str) -> Response<Body> {
    match ASSETS.iter().find(|a| a.path == name) {
        Some(a) => {
            let mut r = respond(StatusCode::OK, a.kind, a.body.to_vec());
            if name.starts_with("vendor/") {
                // Pinned files: their contents never change under one name and version.
                if let Ok(v) = "public, max-age=86400".parse() {
                    r.headers_mut().insert(CACHE_CONTROL, v);
                }
            }
            r
        }
        None => not_found(),
    }
}

/// `POST /ui/login`: agentd's token (a form field `token` or JSON `{"token": ...}`) for a
/// session cookie. Compared in constant time; a wrong token waits a second.
async fn login(origin: &Origin, req: Req) -> Response<Body> {
    let Some(token) = &origin.token else {
        // The Unix socket needs no login, and no browser reaches it.
        return respond(
            StatusCode::BAD_REQUEST,
            "text/plain; charset=utf-8",
            b"the web UI is on the TCP listener\n".to_vec(),
        );
    };
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let body = match super::read_body(req, 4096).await {
        Ok(b) => b,
        Err(_) => {
            return respond(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain; charset=utf-8",
                b"too large\n".to_vec(),
            )
        }
    };
    let given = if is_json {
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_string))
    } else {
        url::form_urlencoded::parse(&body)
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    }
    .unwrap_or_default();
    if !constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        return respond(
            StatusCode::UNAUTHORIZED,
            "application/json",
            serde_json::to_vec(&serde_json::json!({"error": {"code": "unauthorized", "message": "that is not agentd's token (its token_file holds it; or open the link `agentd ui` prints)"}}))
                .unwrap_or_default(),
        );
    }
    let session = super::origins::new_session(UI_SCOPE);
    let mut r = respond(
        StatusCode::OK,
        "application/json",
        b"{\"ok\":true}".to_vec(),
    );
    if let Ok(v) = session_cookie(&session).parse() {
        r.headers_mut().insert(SET_COOKIE, v);
    }
    r
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    super::origins::cookies(headers)
        .find(|(k, _)| *k == UI_COOKIE)
        .map(|(_, v)| v.to_string())
}

/// Whether `Origin`, when the browser sent one, is this request's own host.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|h| !host.is_empty() && h.eq_ignore_ascii_case(host))
}

/// Whether an API request without agentd's token may go on with the UI's session cookie
/// (see the module's doc).
pub fn allows(req: &Req) -> bool {
    let headers = req.headers();
    let Some(session) = session_id(headers) else {
        return false;
    };
    // The UI reaches a sandbox's OpenCode and ports on their own origins (a ticket), never
    // through the API's proxy paths: the session does not open those.
    let mut parts = req.uri().path().split('/').skip(4);
    if req.uri().path().starts_with("/v1/sandboxes/") {
        match (parts.next(), parts.next()) {
            (Some("opencode"), _) | (Some("ports"), Some(_)) => return false,
            _ => {}
        }
    }
    // A browser says where a request comes from: only the UI's own pages (or a URL typed or
    // opened directly) use the session; another site's or a sandbox origin's page does not,
    // not even to read.
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if !matches!(site, "same-origin" | "none") {
            return false;
        }
    }
    if !super::origins::session_valid(&session, UI_SCOPE) {
        return false;
    }
    if super::proxy::wants_websocket(headers) {
        // Browsers always name the page's origin on a WebSocket.
        return headers.contains_key(ORIGIN) && same_origin(headers);
    }
    match *req.method() {
        Method::GET | Method::HEAD => true,
        _ => headers.get(CSRF_HEADER).is_some_and(|v| v == "1") && same_origin(headers),
    }
}

/// The login link's URL for the listener `listen` (a wildcard address becomes loopback).
pub fn login_url(listen: std::net::SocketAddr, ticket: &str) -> String {
    let host = match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    format!("http://{host}:{}/ui/login?ticket={ticket}", listen.port())
}

/// `POST /v1/ui/tickets`: a one-use login link for the web UI.
pub(crate) async fn ticket_route(
    axum::extract::State(mgr): axum::extract::State<std::sync::Arc<Manager>>,
) -> Result<Response<Body>, super::error::ApiError> {
    let Some(listen) = mgr.config.listen else {
        return Err(super::error::ApiError::Conflict(
            "the web UI is served on the TCP listener: start agentd serve with --listen 127.0.0.1:7070".into(),
        ));
    };
    let ticket = new_ticket();
    Ok(super::json(
        StatusCode::CREATED,
        &super::types::UiTicket {
            url: login_url(listen, &ticket),
            expires_in_secs: super::origins::TICKET_TTL.as_secs(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vendored files are the pinned releases (npm `@xterm/xterm` 5.5.0, `@xterm/addon-fit`
    /// 0.10.0), and the page's integrity attributes match them.
    #[test]
    fn test_vendored_files_are_pinned() {
        use base64::Engine;
        use sha2::{Digest, Sha384};
        let html = std::str::from_utf8(include_bytes!("../../ui/index.html")).unwrap();
        for a in ASSETS.iter().filter(|a| a.path.starts_with("vendor/")) {
            let sum = base64::engine::general_purpose::STANDARD.encode(Sha384::digest(a.body));
            let want = format!("/ui/{}\" integrity=\"sha384-{sum}\"", a.path);
            assert!(html.contains(&want), "index.html lacks {want}");
        }
        let pins = include_str!("../../ui/vendor/PINS");
        for a in ASSETS.iter().filter(|a| a.path.starts_with("vendor/")) {
            let sum = base64::engine::general_purpose::STANDARD.encode(Sha384::digest(a.body));
            assert!(
                pins.contains(&format!("sha384-{sum}")),
                "{} is not the pinned file",
                a.path
            );
        }
    }

    #[test]
    fn test_login_url_and_origin_checks() {
        assert_eq!(
            login_url("0.0.0.0:7070".parse().unwrap(), "t"),
            "http://127.0.0.1:7070/ui/login?ticket=t"
        );
        let mut h = HeaderMap::new();
        h.insert(HOST, "127.0.0.1:7070".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(ORIGIN, "http://127.0.0.1:7070".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(ORIGIN, "http://3000-abc.localhost:7070".parse().unwrap());
        assert!(!same_origin(&h));
        assert!(is_ui("/") && is_ui("/ui/app.js") && !is_ui("/v1/tasks"));
    }
}

#[cfg(test)]
mod session_tests {
    use super::*;

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Req {
        let mut b = hyper::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    /// What the UI's session opens: reads from its own pages, changes with the header and its
    /// origin, never another site's or a sandbox page's requests, never the proxy paths.
    #[test]
    fn test_what_the_session_allows() {
        let s = super::super::origins::new_session(UI_SCOPE);
        let cookie = format!("{UI_COOKIE}={s}");
        let host = ("host", "127.0.0.1:7070");
        let c = ("cookie", cookie.as_str());
        assert!(allows(&req("GET", "/v1/tasks", &[host, c])));
        assert!(!allows(&req(
            "GET",
            "/v1/tasks",
            &[host, ("cookie", "agentd_ui=nope")]
        )));
        assert!(allows(&req(
            "GET",
            "/v1/tasks",
            &[host, c, ("sec-fetch-site", "same-origin")]
        )));
        assert!(!allows(&req(
            "GET",
            "/v1/tasks",
            &[host, c, ("sec-fetch-site", "same-site")]
        )));
        assert!(!allows(&req(
            "GET",
            "/v1/tasks",
            &[host, c, ("sec-fetch-site", "cross-site")]
        )));
        assert!(!allows(&req("POST", "/v1/tasks/x/cancel", &[host, c])));
        assert!(allows(&req(
            "POST",
            "/v1/tasks/x/cancel",
            &[
                host,
                c,
                ("x-agentd-csrf", "1"),
                ("origin", "http://127.0.0.1:7070")
            ]
        )));
        assert!(!allows(&req(
            "POST",
            "/v1/tasks/x/cancel",
            &[
                host,
                c,
                ("x-agentd-csrf", "1"),
                ("origin", "http://3000-x.localhost:7070")
            ]
        )));
        assert!(!allows(&req(
            "GET",
            "/v1/sandboxes/abc/opencode/session",
            &[host, c]
        )));
        assert!(!allows(&req(
            "GET",
            "/v1/sandboxes/abc/ports/3000/",
            &[host, c]
        )));
        // The list of ports is no proxy path.
        assert!(allows(&req("GET", "/v1/sandboxes/abc/ports", &[host, c])));
        let ws = [host, c, ("connection", "upgrade"), ("upgrade", "websocket")];
        assert!(!allows(&req("GET", "/v1/sandboxes/abc/exec/ws", &ws)));
        let mut own = ws.to_vec();
        own.push(("origin", "http://127.0.0.1:7070"));
        assert!(allows(&req("GET", "/v1/sandboxes/abc/exec/ws", &own)));
    }
}
