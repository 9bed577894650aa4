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
fn wants_websocket(headers: &hyper::HeaderMap) -> bool {
    let has = |name: hyper::header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(hyper::header::UPGRADE, "websocket") && has(hyper::header::CONNECTION, "upgrade")
}

pub(crate) async fn opencode(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    mut req: super::Req,
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
    // Rebuild the path from the raw request so that encoded characters stay as they were.
    let raw_path = req.uri().path().to_string();
    let prefix_end = raw_path
        .match_indices('/')
        .nth(4)
        .map(|(i, _)| i)
        .unwrap_or(raw_path.len());
    let mut upstream_path = raw_path[prefix_end..].to_string();
    if upstream_path.is_empty() {
        upstream_path.push('/');
    }
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let uri: hyper::Uri = format!(
        "http://{}:{}{upstream_path}{query}",
        rec.address,
        crate::opencode::PORT
    )
    .parse()
    .map_err(|e| ApiError::BadRequest(format!("bad path: {e}")))?;

    let guard = ActiveGuard::new(sb.clone());
    let websocket = wants_websocket(req.headers());
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(HOST);
    parts.headers.remove(AUTHORIZATION);
    parts.headers.remove(hyper::header::COOKIE);
    parts.headers.insert(
        AUTHORIZATION,
        crate::opencode::basic_auth(&secrets.password)
            .parse()
            .expect("valid header"),
    );
    parts.uri = uri;
    parts.version = hyper::Version::HTTP_11;
    let body = body
        .map_err(|e| -> super::BoxError { Box::new(e) })
        .boxed_unsync();
    if let Some(client_upgrade) = client_upgrade {
        return tunnel(rec, parts, client_upgrade, guard).await;
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
    parts.headers.remove(hyper::header::SET_COOKIE);
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
        tokio::net::TcpStream::connect((rec.address, crate::opencode::PORT)),
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
        format!("{}:{}", rec.address, crate::opencode::PORT)
            .parse()
            .expect("valid"),
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
