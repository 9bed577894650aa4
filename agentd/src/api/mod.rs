//! The HTTP API: listeners, authentication, routing by `(method, path segments)`, and the
//! shared response helpers. One file per resource holds its handlers.
//!
//! The Unix socket is root-only (mode 0600 in a 0700 dir); on TCP every request needs
//! `Authorization: Bearer <token>`. Request bodies are capped; errors are
//! `{"error":{"code","message"}}` with the status of [`error::ApiError`].

pub mod conn;
pub mod error;
pub mod files;
pub mod images;
pub mod openapi;
pub mod proxy;
pub mod sandboxes;
pub mod tasks;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, UnixListener};

use crate::sandbox::Manager;
use error::ApiError;

pub use crate::http::{channel_body, empty, full, Body, BoxError, FrameSender};

/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 1 << 20;

static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

/// One JSON value as a line of a JSON-lines (`application/x-ndjson`) body.
pub fn json_line(v: &serde_json::Value) -> Result<hyper::body::Frame<Bytes>, BoxError> {
    let mut b = serde_json::to_vec(v).expect("a JSON value serializes");
    b.push(b'\n');
    Ok(hyper::body::Frame::data(Bytes::from(b)))
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_vec(value).expect("json")))
        .expect("valid response")
}

/// Where a request came from.
#[derive(Clone)]
pub struct Origin {
    /// The bearer token TCP requests must carry; `None` on the Unix socket.
    pub token: Option<Arc<String>>,
}

/// Reads a JSON body of at most [`MAX_JSON_BODY`] bytes into `T` (unknown fields refused).
pub async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let bytes = read_body(req, MAX_JSON_BODY).await?;
    if bytes.is_empty() {
        return Err(ApiError::BadRequest("a JSON body is required".into()));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Reads a whole body of at most `limit` bytes.
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(req.into_body(), limit);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::TooLarge(format!(
                "the request body is larger than {limit} bytes"
            )))
        }
        Err(e) => Err(ApiError::BadRequest(format!(
            "failed to read the body: {e}"
        ))),
    }
}

/// A request body spooled to a file in `<state>/tmp` (removed when dropped): large uploads
/// are never held in agentd's memory.
pub struct Spooled(pub std::path::PathBuf);

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Streams the request body into a new file under `<state>/tmp`, at most `limit` bytes (413
/// beyond); a full disk is a 507. Returns the file and the body's size.
pub async fn spool_body(
    mgr: &Manager,
    req: Request<Incoming>,
    limit: u64,
) -> Result<(Spooled, u64), ApiError> {
    use tokio::io::AsyncWriteExt;
    let dir = mgr.config.state_dir.join("tmp");
    tokio::fs::create_dir_all(&dir).await.map_err(io_error)?;
    let spooled = Spooled(dir.join(format!("upload-{}", crate::sandbox::random_hex(8))));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&spooled.0)
        .await
        .map_err(io_error)?;
    let mut body = req.into_body();
    let mut size = 0u64;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::BadRequest(format!("failed to read the body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        size += data.len() as u64;
        if size > limit {
            return Err(ApiError::TooLarge(format!(
                "the request body is larger than {limit} bytes"
            )));
        }
        file.write_all(&data).await.map_err(io_error)?;
    }
    file.sync_all().await.map_err(io_error)?;
    Ok((spooled, size))
}

/// An I/O error of agentd's own writes: a full disk is a 507 that says so, anything else a 500.
pub fn io_error(e: std::io::Error) -> ApiError {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        ApiError::InsufficientStorage(
            "agentd's disk is full: nothing was stored; free space on the state dir's filesystem and retry".into(),
        )
    } else {
        ApiError::internal(e)
    }
}

/// The query parameter `key`, percent-decoded.
pub fn query_param(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

/// Decodes `%XX` escapes and `+` (as space).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Answers one request: authentication, routing, errors, metrics.
pub async fn handle(mgr: Arc<Manager>, origin: Origin, req: Request<Incoming>) -> Response<Body> {
    let request_id = REQUEST_IDS.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let mut route = String::from("unknown");
    let result = async {
        if let Some(token) = &origin.token {
            let given = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !given
                .is_some_and(|g| crate::sandbox::constant_time_eq(g.as_bytes(), token.as_bytes()))
            {
                return Err(ApiError::Unauthorized(
                    "this endpoint needs Authorization: Bearer <token> (see agentd's token_file)"
                        .into(),
                ));
            }
        }
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        route = route_name(&segs);
        // A known path with a method it does not take: 405 naming the ones it does.
        if let Some(methods) = openapi::allowed_methods(&segs) {
            let m = method.as_str().to_ascii_lowercase();
            if !methods.contains(&m.as_str()) {
                return Err(ApiError::MethodNotAllowed(format!(
                    "{method} is not allowed on {path}: use {}",
                    methods
                        .iter()
                        .map(|m| m.to_ascii_uppercase())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        dispatch(&mgr, &method, &segs, req, origin.token.is_some()).await
    }
    .await;
    let mut response = result.unwrap_or_else(|e| json(e.status(), &e.body(request_id)));
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        if let Some(methods) = openapi::allowed_methods(&segs) {
            let allow = methods
                .iter()
                .map(|m| m.to_ascii_uppercase())
                .collect::<Vec<_>>()
                .join(", ");
            if let Ok(v) = hyper::header::HeaderValue::from_str(&allow) {
                response.headers_mut().insert(hyper::header::ALLOW, v);
            }
        }
    }
    mgr.metrics
        .count_request(&route, response.status().as_u16());
    tracing::debug!(request_id, %method, path, status = response.status().as_u16(), "request");
    response
}

/// The route pattern of a path, for metrics (ids replaced by `{id}`).
/// The route a request counts under in metrics: its pattern, or `unmatched`.
fn route_name(segs: &[&str]) -> String {
    openapi::route(segs)
        .map_or("unmatched", |(pattern, _)| pattern)
        .to_string()
}

async fn dispatch(
    mgr: &Arc<Manager>,
    method: &Method,
    segs: &[&str],
    req: Request<Incoming>,
    tcp: bool,
) -> Result<Response<Body>, ApiError> {
    match (method, segs) {
        (&Method::GET, ["v1", "health"]) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}),
        )),
        (&Method::GET, ["metrics"]) => {
            let mut by_state = std::collections::BTreeMap::new();
            for s in ["creating", "starting", "ready", "exited", "stopped"] {
                by_state.insert(s, 0);
            }
            for sb in mgr.list() {
                *by_state.entry(sb.snapshot().state.as_str()).or_default() += 1;
            }
            let mut text = mgr.metrics.render(&by_state);
            if let Some(tasks) = mgr.tasks.get() {
                text.push_str(&tasks.render_metrics());
            }
            Ok(Response::builder()
                .header(hyper::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                .body(full(text))
                .expect("valid response"))
        }
        (&Method::GET, ["v1", "openapi.json"]) => Ok(json(StatusCode::OK, &openapi::document())),
        (_, ["v1", "sandboxes", ..]) => sandboxes::dispatch(mgr, method, &segs[2..], req).await,
        (_, ["v1", "images", ..]) => images::dispatch(mgr, method, &segs[2..], req, tcp).await,
        (_, ["v1", "tasks", ..]) => tasks::dispatch(mgr, method, &segs[2..], req, tcp).await,
        (_, ["v1", "workspaces", ..]) => {
            tasks::dispatch_workspaces(mgr, method, &segs[2..], req).await
        }
        _ => Err(ApiError::NotFound(format!(
            "no route {method} /{}; see GET /v1/openapi.json",
            segs.join("/")
        ))),
    }
}

/// Serves the API on the Unix socket and, if given, on TCP (with the token) until `shutdown`
/// completes. Sandboxes are untouched by the shutdown: their shims run on.
pub async fn serve(
    mgr: Arc<Manager>,
    unix: UnixListener,
    tcp: Option<(TcpListener, String)>,
    shutdown: impl Future<Output = ()>,
) {
    let token = tcp.as_ref().map(|(_, t)| Arc::new(t.clone()));
    let unix_loop = {
        let mgr = mgr.clone();
        async move {
            let limit = conn::Listener::new("socket", conn::MAX_UNIX_CONNECTIONS);
            let mut backoff = conn::Backoff::default();
            loop {
                match unix.accept().await {
                    Ok((stream, _)) => {
                        backoff = conn::Backoff::default();
                        // At the cap the connection is dropped (closed) at once.
                        if let Some(slot) = limit.admit() {
                            spawn_conn(mgr.clone(), Origin { token: None }, stream, slot);
                        }
                    }
                    Err(e) => limit.accept_failed(&e, &mut backoff).await,
                }
            }
        }
    };
    let tcp_loop = async move {
        let Some((listener, _)) = tcp else {
            return std::future::pending::<()>().await;
        };
        let limit = conn::Listener::new("tcp", conn::MAX_TCP_CONNECTIONS);
        let mut backoff = conn::Backoff::default();
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    backoff = conn::Backoff::default();
                    if let Some(slot) = limit.admit() {
                        let origin = Origin {
                            token: token.clone(),
                        };
                        spawn_conn(mgr.clone(), origin, stream, slot);
                    }
                }
                Err(e) => limit.accept_failed(&e, &mut backoff).await,
            }
        }
    };
    tokio::select! {
        _ = unix_loop => {}
        _ = tcp_loop => {}
        _ = shutdown => tracing::info!("shutting down; sandboxes keep running"),
    }
}

fn spawn_conn<S>(
    mgr: Arc<Manager>,
    origin: Origin,
    stream: S,
    slot: tokio::sync::OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        // The slot is held as long as the connection is open.
        let _slot = slot;
        let service = hyper::service::service_fn(move |req| {
            let mgr = mgr.clone();
            let origin = origin.clone();
            async move { Ok::<_, Infallible>(handle(mgr, origin, req).await) }
        });
        if let Err(e) = conn::http1()
            .serve_connection(TokioIo::new(stream), service)
            .await
        {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_percent_decode_and_routes() {
        assert_eq!(percent_decode("a%2Fb+c%3a"), "a/b c:");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(
            route_name(&["v1", "sandboxes", "abc", "exec"]),
            "/v1/sandboxes/{id}/exec"
        );
        assert_eq!(
            route_name(&["v1", "sandboxes", "abc", "opencode", "session", "x"]),
            "/v1/sandboxes/{id}/opencode/{path}"
        );
        assert_eq!(route_name(&["v1", "anything", "random-123"]), "unmatched");
        assert_eq!(
            route_name(&["v1", "images", "docker.io/x:1"]),
            "/v1/images/{name}"
        );
    }
}
