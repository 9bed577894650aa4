//! `/v1/sandboxes/{id}/opencode/{path}`: any request, forwarded to the sandbox's OpenCode
//! server with its credentials, bodies streamed both ways (SSE included).
//!
//! What reaches the sandbox: the method, path, query, body and end-to-end headers of the
//! client's request. What does not: the client's `Authorization` (agentd's own bearer token
//! must never reach a hostile sandbox; agentd puts OpenCode's Basic credentials there), its
//! `Cookie` (cookies of agentd's origin are not the sandbox's), `Host`, hop-by-hop headers and
//! any header the `Connection` header names. What comes back is OpenCode's response, which is
//! untrusted data: it is passed through, not interpreted, without hop-by-hop headers and
//! without `Set-Cookie` (a sandbox must not set cookies on agentd's origin).
//!
//! A WebSocket upgrade (OpenCode's PTY, its live UI) goes to OpenCode on a connection of its
//! own; when OpenCode switches protocols, agentd answers the client's upgrade with OpenCode's
//! handshake headers and copies bytes both ways until either side closes (256 such tunnels
//! at once; the sandbox counts as active meanwhile).

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Request, Response};

use super::error::ApiError;
use super::Body;
use crate::sandbox::{ActiveGuard, Manager, Sandbox, SandboxState};

/// Headers that describe one connection, not the request (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, and first the headers that `Connection` names as such.
pub fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    let named: Vec<hyper::header::HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| hyper::header::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for h in named {
        headers.remove(h);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
}

/// Most WebSocket tunnels through the proxy at once.
const MAX_TUNNELS: usize = 256;

static TUNNELS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_TUNNELS);

/// Whether `headers` ask to switch to the WebSocket protocol.
pub(crate) fn wants_websocket(headers: &hyper::HeaderMap) -> bool {
    let has = |name: hyper::header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(hyper::header::UPGRADE, "websocket") && has(hyper::header::CONNECTION, "upgrade")
}

/// Where a proxied request goes in the sandbox.
pub(crate) struct Upstream {
    /// The port on the sandbox's address.
    pub port: u16,
    /// The path and query to ask for there.
    pub path_and_query: String,
    /// `Authorization` to send (OpenCode's credentials), if any.
    pub authorization: Option<String>,
    /// Cookies go both ways, but agentd's own (a sandbox's origin, not agentd's API).
    pub sandbox_origin: bool,
}

/// `/v1/sandboxes/{id}/opencode/{path}`: to the sandbox's OpenCode, with its credentials.
pub(crate) async fn opencode(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    req: super::Req,
) -> Result<Response<Body>, ApiError> {
    let raw_path = req.uri().path().to_string();
    let path_and_query = below(&raw_path, 4, req.uri().query());
    opencode_at(mgr, sb, req, path_and_query, false).await
}

/// The raw path without its first `segments` segments (`/` if nothing is left), and the query:
/// encoded characters stay as they were.
pub(crate) fn below(raw_path: &str, segments: usize, query: Option<&str>) -> String {
    let end = raw_path
        .match_indices('/')
        .nth(segments)
        .map(|(i, _)| i)
        .unwrap_or(raw_path.len());
    let mut p = raw_path[end..].to_string();
    if p.is_empty() {
        p.push('/');
    }
    if let Some(q) = query {
        p.push('?');
        p.push_str(q);
    }
    p
}

/// To the sandbox's OpenCode (ready) at `path_and_query`, with OpenCode's credentials.
pub(crate) async fn opencode_at(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    req: super::Req,
    path_and_query: String,
    sandbox_origin: bool,
) -> Result<Response<Body>, ApiError> {
    let rec = sb.snapshot();
    let Some(secrets) = rec.opencode.clone() else {
        return Err(ApiError::BadRequest(format!(
            "sandbox {} runs no OpenCode server",
            rec.id
        )));
    };
    match rec.state {
        SandboxState::Ready => {}
        SandboxState::Starting | SandboxState::Creating => {
            return Err(ApiError::Unavailable(format!(
                "sandbox {}'s OpenCode server is starting: retry when the sandbox is ready",
                rec.id
            )))
        }
        s => {
            return Err(ApiError::Conflict(format!(
                "sandbox {} is {}",
                rec.id,
                s.as_str()
            )))
        }
    }
    forward(
        mgr,
        sb,
        req,
        Upstream {
            port: crate::opencode::PORT,
            path_and_query,
            authorization: Some(crate::opencode::basic_auth(&secrets.password)),
            sandbox_origin,
        },
    )
    .await
}

/// Any port of a live sandbox, without credentials.
pub(crate) async fn port(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    req: super::Req,
    port: u16,
    path_and_query: String,
    sandbox_origin: bool,
) -> Result<Response<Body>, ApiError> {
    let rec = sb.snapshot();
    if !matches!(rec.state, SandboxState::Ready | SandboxState::Starting) {
        return Err(ApiError::Conflict(format!(
            "sandbox {} is {}",
            rec.id,
            rec.state.as_str()
        )));
    }
    if port == 0 {
        return Err(ApiError::BadRequest("port must be 1 to 65535".into()));
    }
    forward(
        mgr,
        sb,
        req,
        Upstream {
            port,
            path_and_query,
            authorization: None,
            sandbox_origin,
        },
    )
    .await
}

/// Forwards `req` to `up` in the sandbox (a WebSocket upgrade through [`tunnel`]).
async fn forward(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    mut req: super::Req,
    up: Upstream,
) -> Result<Response<Body>, ApiError> {
    let rec = sb.snapshot();
    let uri: hyper::Uri = format!("http://{}:{}{}", rec.address, up.port, up.path_and_query)
        .parse()
        .map_err(|e| ApiError::BadRequest(format!("bad path: {e}")))?;
    let guard = ActiveGuard::new(sb.clone());
    let websocket = wants_websocket(req.headers());
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(HOST);
    parts.headers.remove(AUTHORIZATION);
    parts.headers.remove(super::e2b::TRAFFIC_HEADER);
    if up.sandbox_origin {
        super::origins::strip_own_cookie(&mut parts.headers);
    } else {
        parts.headers.remove(hyper::header::COOKIE);
    }
    if let Some(a) = &up.authorization {
        parts.headers.insert(
            AUTHORIZATION,
            a.parse()
                .map_err(|_| ApiError::internal("bad credentials header"))?,
        );
    }
    parts.uri = uri;
    parts.version = hyper::Version::HTTP_11;
    let body = body
        .map_err(|e| -> super::BoxError { Box::new(e) })
        .boxed_unsync();
    if let Some(client_upgrade) = client_upgrade {
        return tunnel(rec, up.port, parts, client_upgrade, guard).await;
    }
    let upstream = Request::from_parts(parts, body);
    let resp = mgr.http.request(upstream).await.map_err(|e| {
        ApiError::BadGateway(format!(
            "sandbox {}'s OpenCode server did not answer: {e}",
            rec.id
        ))
    })?;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    filter_set_cookie(&mut parts.headers, up.sandbox_origin);
    // The guard lives as long as the response body: a long event stream keeps the sandbox
    // from being reaped as idle.
    let body = GuardedBody {
        inner: body,
        _guard: guard,
    }
    .map_err(|e| -> super::BoxError { Box::new(e) })
    .boxed_unsync();
    Ok(Response::from_parts(parts, body))
}

/// Sends a WebSocket handshake (`parts`, already stripped and credentialed) to the sandbox's
/// OpenCode on a connection of its own and, if it switches protocols, joins the client's
/// upgraded connection to it.
async fn tunnel(
    rec: crate::sandbox::SandboxRecord,
    port: u16,
    mut parts: hyper::http::request::Parts,
    client_upgrade: hyper::upgrade::OnUpgrade,
    guard: ActiveGuard,
) -> Result<Response<Body>, ApiError> {
    let permit = TUNNELS.try_acquire().map_err(|_| {
        ApiError::Unavailable(format!(
            "{MAX_TUNNELS} WebSocket tunnels are open: retry when one ends"
        ))
    })?;
    let unreachable = |e: &dyn std::fmt::Display| {
        ApiError::BadGateway(format!(
            "sandbox {}'s OpenCode server did not answer: {e}",
            rec.id
        ))
    };
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::net::TcpStream::connect((rec.address, port)),
    )
    .await
    .map_err(|_| unreachable(&"no connection in 10 s"))?
    .map_err(|e| unreachable(&e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
    tokio::spawn(conn.with_upgrades());
    // The handshake's own headers go on (hop-by-hop ones were stripped above).
    parts
        .headers
        .insert(hyper::header::CONNECTION, "upgrade".parse().expect("valid"));
    parts
        .headers
        .insert(hyper::header::UPGRADE, "websocket".parse().expect("valid"));
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse()
        .map_err(|e| ApiError::BadRequest(format!("bad path: {e}")))?;
    parts.headers.insert(
        hyper::header::HOST,
        format!("{}:{port}", rec.address).parse().expect("valid"),
    );
    let req = Request::from_parts(parts, http_body_util::Empty::<bytes::Bytes>::new());
    let mut resp = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(&e))?;
    if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        // A refusal (404, 401, ...): OpenCode's answer as it is.
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(hyper::header::SET_COOKIE);
        let body = GuardedBody {
            inner: body,
            _guard: guard,
        }
        .map_err(|e| -> super::BoxError { Box::new(e) })
        .boxed_unsync();
        return Ok(Response::from_parts(parts, body));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let id = rec.id.clone();
    tokio::spawn(async move {
        let _held = (permit, guard);
        let (client, upstream) = match tokio::join!(client_upgrade, upstream_upgrade) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(sandbox = %id, error = %e, "websocket tunnel: upgrade failed");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut upstream = hyper_util::rt::TokioIo::new(upstream);
        let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        tracing::debug!(sandbox = %id, ?copied, "websocket tunnel closed");
    });
    let (mut parts, _) = resp.into_parts();
    parts.headers.remove(hyper::header::SET_COOKIE);
    Ok(Response::from_parts(parts, super::empty()))
}

/// Keeps a sandbox's `Set-Cookie` only on its own origin, and there only host-only cookies
/// (no `Domain`: a cookie for the base domain would reach other sandboxes' origins) that are
/// not agentd's.
fn filter_set_cookie(headers: &mut hyper::HeaderMap, sandbox_origin: bool) {
    let kept: Vec<hyper::header::HeaderValue> = if sandbox_origin {
        headers
            .get_all(hyper::header::SET_COOKIE)
            .iter()
            .filter(|v| {
                v.to_str().is_ok_and(|s| {
                    let name = s.split('=').next().unwrap_or("").trim();
                    name != super::origins::SESSION_COOKIE
                        && !s
                            .split(';')
                            .skip(1)
                            .any(|a| a.trim().to_ascii_lowercase().starts_with("domain"))
                })
            })
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    headers.remove(hyper::header::SET_COOKIE);
    for v in kept {
        headers.append(hyper::header::SET_COOKIE, v);
    }
}

/// A body that holds an [`ActiveGuard`] until it is dropped.
struct GuardedBody {
    inner: Incoming,
    _guard: ActiveGuard,
}

impl hyper::body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_strip_hop_by_hop_removes_headers_connection_names() {
        let mut h = hyper::HeaderMap::new();
        h.insert("connection", "close, X-Secret".parse().unwrap());
        h.append("connection", "x-other".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("x-other", "1".parse().unwrap());
        h.insert("keep-alive", "5".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-kept"]);
    }
}
