//! Per-sandbox origins: a request whose `Host` is `{sandbox}.{base}` goes to the sandbox's
//! OpenCode (its web UI works as is), `{port}-{sandbox}.{base}` to that port in the sandbox
//! (HTTP, SSE, WebSocket). `{sandbox}` is the id, or the name when it is a DNS label; `base`
//! is `origin_base` (default `localhost`: browsers resolve `*.localhost` to loopback without
//! DNS). Every other `Host` is agentd's API.
//!
//! Who may, on the TCP listener (the Unix socket is root's and needs nothing):
//! - API clients with agentd's bearer token;
//! - a browser with the sandbox's session cookie, got by opening a URL with a ticket
//!   (`POST /v1/sandboxes/{id}/tickets`: one use, 60 s) that agentd exchanges for an HttpOnly,
//!   SameSite=Lax, host-only cookie and a redirect without the ticket; the main token never
//!   goes into a URL. A request that relies on the cookie and changes something (not GET,
//!   HEAD or OPTIONS) or opens a WebSocket must come from the sandbox's own origin when it
//!   names one (`Origin`): another sandbox's page is same-site under the same base and must
//!   not drive this one;
//! - `opencode attach` (Basic auth, any user name) with the sandbox's attach password
//!   (`GET /v1/sandboxes/{id}/attach`), on the sandbox's OpenCode origin only.
//!
//! agentd's credentials never reach the sandbox: `Authorization` and agentd's cookie are
//! removed, OpenCode's own Basic credentials are added for its origin.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::header::{AUTHORIZATION, COOKIE, HOST, LOCATION, SET_COOKIE};
use hyper::{HeaderMap, Response, StatusCode};

use super::error::ApiError;
use super::{Body, Origin, Req};
use crate::sandbox::{constant_time_eq, Manager, Sandbox};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "agentd_sandbox";
/// The query parameter that carries a ticket.
pub const TICKET_PARAM: &str = "agentd_ticket";
/// How long a ticket may wait to be used.
pub const TICKET_TTL: Duration = Duration::from_secs(60);
/// How long a browser session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most tickets and sessions kept (each kind; the oldest go first).
const MAX_ENTRIES: usize = 10_000;

/// Tickets and sessions, in memory (a restart asks browsers for a new ticket).
#[derive(Default)]
struct Store {
    tickets: HashMap<String, (String, Instant)>,
    sessions: HashMap<String, (String, Instant)>,
}

fn store() -> &'static Mutex<Store> {
    static STORE: std::sync::OnceLock<Mutex<Store>> = std::sync::OnceLock::new();
    STORE.get_or_init(Mutex::default)
}

/// Keeps at most [`MAX_ENTRIES`] unexpired entries, then adds one.
fn insert(
    map: &mut HashMap<String, (String, Instant)>,
    key: String,
    sandbox: String,
    ttl: Duration,
) {
    let now = Instant::now();
    map.retain(|_, (_, until)| *until > now);
    if map.len() >= MAX_ENTRIES {
        if let Some(oldest) = map
            .iter()
            .min_by_key(|(_, (_, u))| *u)
            .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
    }
    map.insert(key, (sandbox, now + ttl));
}

/// A new ticket for sandbox `id`.
pub fn new_ticket(id: &str) -> String {
    let t = crate::sandbox::random_hex(24);
    let mut s = store().lock().expect("origins lock");
    insert(&mut s.tickets, t.clone(), id.to_string(), TICKET_TTL);
    t
}

/// Uses ticket `t` for sandbox `id` (or another scope, such as the web UI's): a new
/// session, or `None`.
pub(crate) fn redeem(t: &str, id: &str) -> Option<String> {
    let mut s = store().lock().expect("origins lock");
    let (sandbox, until) = s.tickets.remove(t)?;
    if sandbox != id || until <= Instant::now() {
        return None;
    }
    let session = crate::sandbox::random_hex(24);
    insert(
        &mut s.sessions,
        session.clone(),
        id.to_string(),
        SESSION_TTL,
    );
    Some(session)
}

/// A new session for `scope` (the web UI's login with the token).
pub(crate) fn new_session(scope: &str) -> String {
    let session = crate::sandbox::random_hex(24);
    let mut s = store().lock().expect("origins lock");
    insert(
        &mut s.sessions,
        session.clone(),
        scope.to_string(),
        SESSION_TTL,
    );
    session
}

/// Whether `session` is a live session of `scope`.
pub(crate) fn session_valid(session: &str, scope: &str) -> bool {
    let s = store().lock().expect("origins lock");
    s.sessions
        .get(session)
        .is_some_and(|(sc, until)| sc == scope && *until > Instant::now())
}

/// Ends `session` (a logout).
pub(crate) fn forget_session(session: &str) {
    store()
        .lock()
        .expect("origins lock")
        .sessions
        .remove(session);
}

fn session_of(headers: &HeaderMap, id: &str) -> bool {
    let s = store().lock().expect("origins lock");
    cookies(headers).any(|(k, v)| {
        k == SESSION_COOKIE
            && s.sessions
                .get(v)
                .is_some_and(|(sb, until)| sb == id && *until > Instant::now())
    })
}

/// The cookies a request carries, as (name, value).
pub(crate) fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
}

/// Removes agentd's cookie from a request going to a sandbox (its other cookies are its own).
pub fn strip_own_cookie(headers: &mut HeaderMap) {
    let rest: Vec<String> = cookies(headers)
        .filter(|(k, _)| *k != SESSION_COOKIE)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    headers.remove(COOKIE);
    if !rest.is_empty() {
        if let Ok(v) = rest.join("; ").parse() {
            headers.insert(COOKIE, v);
        }
    }
}

/// The sandbox and port a `Host` names under `base`: `(port, sandbox)`; `None` when it is
/// not a sandbox origin.
pub fn parse_host(host: &str, base: &str) -> Option<(Option<u16>, String)> {
    let host = host.trim().to_ascii_lowercase();
    // Without the port (IPv6 literals are never sandbox origins).
    let name = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
        _ => host.as_str(),
    };
    let name = name.trim_end_matches('.');
    let label = name.strip_suffix(base)?.strip_suffix('.')?;
    if label.is_empty() || label.contains('.') {
        return None;
    }
    if let Some((p, rest)) = label.split_once('-') {
        if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) {
            let port = p.parse::<u16>().ok().filter(|p| *p > 0)?;
            return (!rest.is_empty()).then(|| (Some(port), rest.to_string()));
        }
    }
    Some((None, label.to_string()))
}

/// The origin's host for `sandbox` (and `port`) under `base`.
pub fn host_for(sandbox: &str, port: Option<u16>, base: &str) -> String {
    match port {
        Some(p) => format!("{p}-{sandbox}.{base}"),
        None => format!("{sandbox}.{base}"),
    }
}

/// How the request proved it may use the origin.
#[derive(Debug, PartialEq, Eq)]
enum Credential {
    /// The Unix socket, or agentd's token.
    Api,
    /// The sandbox's session cookie.
    Cookie,
    /// The sandbox's attach password.
    Attach,
    /// E2B's traffic access token (a port's origin only).
    Traffic,
}

fn credential(
    origin: &Origin,
    headers: &HeaderMap,
    sb: &Sandbox,
    opencode_origin: bool,
) -> Option<Credential> {
    let Some(token) = &origin.token else {
        return Some(Credential::Api);
    };
    let auth = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    if let Some(given) = auth.and_then(|a| a.strip_prefix("Bearer ")) {
        if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return Some(Credential::Api);
        }
    }
    if opencode_origin && attach_password_given(headers, sb) {
        return Some(Credential::Attach);
    }
    let traffic = headers
        .get(super::e2b::TRAFFIC_HEADER)
        .and_then(|v| v.to_str().ok());
    if let Some(given) = traffic.filter(|_| !opencode_origin) {
        let want = super::e2b::traffic_token(token, &sb.snapshot().id);
        if constant_time_eq(given.as_bytes(), want.as_bytes()) {
            return Some(Credential::Traffic);
        }
    }
    session_of(headers, &sb.snapshot().id).then_some(Credential::Cookie)
}

/// Whether `headers` carry sandbox `sb`'s attach password as Basic auth (any user name).
fn attach_password_given(headers: &HeaderMap, sb: &Sandbox) -> bool {
    use base64::Engine;
    let Some(want) = sb
        .snapshot()
        .opencode
        .map(|o| o.attach_password)
        .filter(|p| !p.is_empty())
    else {
        return false;
    };
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|d| String::from_utf8(d).ok())
        .is_some_and(|pair| {
            let given = pair.split_once(':').map_or("", |(_, p)| p);
            constant_time_eq(given.as_bytes(), want.as_bytes())
        })
}

/// Whether a TCP request to the API may go on with a sandbox's attach password instead of
/// agentd's token: only to `/v1/sandboxes/{id}/opencode[/...]` of that very sandbox (what
/// `opencode attach` asks for when no DNS resolves the sandbox's origin).
pub fn attach_allows(mgr: &Manager, path: &str, headers: &HeaderMap) -> bool {
    let mut parts = path.split('/');
    let (Some(""), Some("v1"), Some("sandboxes"), Some(id), Some("opencode")) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    mgr.get(id)
        .is_ok_and(|sb| attach_password_given(headers, &sb))
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(super::full(format!("{msg}\n").into_bytes()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().expect("valid"),
    );
    r
}

/// Serves `req` if its `Host` is a sandbox's origin; gives it back otherwise.
pub async fn serve(mgr: &Arc<Manager>, origin: &Origin, req: Req) -> Result<Response<Body>, Req> {
    let base = &mgr.config.origin_base;
    let host = req
        .headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let Some((port, name)) = host.as_deref().and_then(|h| parse_host(h, base)) else {
        return Err(req);
    };
    // E2B's envd port: agentd's envd for that sandbox (E2B's SDKs with wildcard DNS).
    if port == Some(super::e2b::ENVD_PORT_NUMBER) {
        let path = req.uri().path().to_string();
        return Ok(super::e2b::envd(mgr, origin, &name, &path, req).await);
    }
    Ok(match serve_sandbox(mgr, origin, req, port, &name).await {
        Ok(r) => r,
        Err(e) => text(e.status(), &e.to_string()),
    })
}

async fn serve_sandbox(
    mgr: &Arc<Manager>,
    origin: &Origin,
    req: Req,
    port: Option<u16>,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    let sb = mgr
        .get(name)
        .map_err(|_| ApiError::NotFound(format!("agentd has no sandbox {name:?}")))?;
    let id = sb.snapshot().id;
    // The origin a page of this sandbox's origin sends (scheme aside: a TLS front may add it).
    let own = req
        .headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    // A ticket: exchanged for the session cookie, then the same URL without it.
    if let Some(query) = req.uri().query() {
        let mut ticket = None;
        let rest: Vec<&str> = query
            .split('&')
            .filter(|kv| {
                match kv
                    .strip_prefix(TICKET_PARAM)
                    .and_then(|r| r.strip_prefix('='))
                {
                    Some(t) => {
                        ticket = Some(t.to_string());
                        false
                    }
                    None => true,
                }
            })
            .collect();
        if let Some(t) = ticket {
            let Some(session) = redeem(&t, &id) else {
                return Err(ApiError::Unauthorized(format!(
                    "this ticket is unknown, used or expired: ask for a new one (POST /v1/sandboxes/{id}/tickets)"
                )));
            };
            let mut location = req.uri().path().to_string();
            if !rest.is_empty() {
                location.push('?');
                location.push_str(&rest.join("&"));
            }
            let mut r = Response::new(super::empty());
            *r.status_mut() = StatusCode::SEE_OTHER;
            r.headers_mut().insert(
                LOCATION,
                location
                    .parse()
                    .map_err(|_| ApiError::BadRequest("bad path".into()))?,
            );
            r.headers_mut().insert(
                SET_COOKIE,
                format!(
                    "{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}",
                    SESSION_TTL.as_secs()
                )
                .parse()
                .expect("valid"),
            );
            return Ok(r);
        }
    }
    let opencode_origin = port.is_none();
    let Some(cred) = credential(origin, req.headers(), &sb, opencode_origin) else {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            &format!(
                "sandbox {id}'s origin needs agentd's bearer token, a session (open a ticket's URL: POST /v1/sandboxes/{id}/tickets) or, for opencode attach, its attach password (GET /v1/sandboxes/{id}/attach)"
            ),
        );
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            format!("Basic realm=\"agentd sandbox {id}\"")
                .parse()
                .expect("valid"),
        );
        return Ok(r);
    };
    if cred == Credential::Cookie {
        let safe = matches!(
            *req.method(),
            hyper::Method::GET | hyper::Method::HEAD | hyper::Method::OPTIONS
        );
        let upgrade = req.headers().contains_key(hyper::header::UPGRADE);
        let from = req
            .headers()
            .get(hyper::header::ORIGIN)
            .and_then(|v| v.to_str().ok());
        let same = |f: &str| {
            f.split_once("://")
                .is_some_and(|(_, h)| h.eq_ignore_ascii_case(&own))
        };
        if (!safe || upgrade) && from.is_some_and(|f| !same(f)) {
            return Err(ApiError::Forbidden(format!(
                "a request from {} may not use sandbox {id}'s session",
                from.unwrap_or_default()
            )));
        }
    }
    sb.touch();
    mgr.wake(&sb, port.is_none_or(|p| p == crate::opencode::PORT))
        .await?;
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    match port {
        None => super::proxy::opencode_at(mgr, sb, req, path_and_query, true).await,
        Some(p) => super::proxy::port(mgr, sb, req, p, path_and_query, true).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_hosts() {
        let b = "localhost";
        assert_eq!(
            parse_host("abc.localhost:7070", b),
            Some((None, "abc".into()))
        );
        assert_eq!(
            parse_host("8080-abc.LOCALHOST", b),
            Some((Some(8080), "abc".into()))
        );
        assert_eq!(
            parse_host("my-box.localhost", b),
            Some((None, "my-box".into()))
        );
        assert_eq!(parse_host("localhost:7070", b), None);
        assert_eq!(parse_host("127.0.0.1:7070", b), None);
        assert_eq!(parse_host("a.b.localhost", b), None);
        assert_eq!(parse_host("0-abc.localhost", b), None);
        assert_eq!(parse_host("99999-abc.localhost", b), None);
        assert_eq!(parse_host("xlocalhost", b), None);
        assert_eq!(
            parse_host("abc.dev.example.org", "dev.example.org"),
            Some((None, "abc".into()))
        );
        assert_eq!(host_for("abc", Some(3000), b), "3000-abc.localhost");
    }

    #[test]
    fn test_tickets_are_one_use_and_per_sandbox() {
        let t = new_ticket("sb1");
        assert!(redeem(&t, "sb2").is_none());
        let t = new_ticket("sb1");
        let s = redeem(&t, "sb1").unwrap();
        assert!(redeem(&t, "sb1").is_none());
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            format!("x=1; {SESSION_COOKIE}={s}").parse().unwrap(),
        );
        assert!(session_of(&h, "sb1"));
        assert!(!session_of(&h, "sb2"));
        strip_own_cookie(&mut h);
        assert_eq!(h.get(COOKIE).unwrap(), "x=1");
    }
}
