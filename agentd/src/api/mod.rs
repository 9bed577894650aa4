//! The HTTP API: listeners, authentication, the axum router of [`routes`] (the one table
//! of operations, which the OpenAPI document comes from too), the wire types of [`types`],
//! and the shared response helpers. One file per resource holds its handlers.
//!
//! The Unix socket is root-only (mode 0600 in a 0700 dir); on TCP every request needs
//! `Authorization: Bearer <token>`. Request bodies are capped; errors are
//! `{"error":{"code","message"}}` with the status of [`error::ApiError`].

pub mod conn;
pub mod connect;
pub mod e2b;
pub mod envd;
pub mod error;
pub mod files;
pub mod images;
pub mod llm;
pub mod openapi;
pub mod origins;
pub mod pools;
pub mod proxy;
pub mod routes;
pub mod sandboxes;
pub mod tasks;
pub mod terminal;
pub mod types;
pub mod ui;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, UnixListener};
use tower::ServiceExt;

use crate::sandbox::Manager;
use error::ApiError;

pub use crate::http::{channel_body, empty, full, Body, BoxError, FrameSender};

/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 1 << 20;

/// A request as handlers get it (its body streams in).
pub type Req = axum::extract::Request;

static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

/// One JSON value as a line of a JSON-lines (`application/x-ndjson`) body.
pub fn json_line<T: serde::Serialize>(v: &T) -> Result<hyper::body::Frame<Bytes>, BoxError> {
    let mut b = serde_json::to_vec(v).expect("a JSON value serializes");
    b.push(b'\n');
    Ok(hyper::body::Frame::data(Bytes::from(b)))
}

/// A JSON response.
pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
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
pub async fn read_json<T: DeserializeOwned>(req: Req) -> Result<T, ApiError> {
    let bytes = read_body(req, MAX_JSON_BODY).await?;
    if bytes.is_empty() {
        return Err(ApiError::BadRequest("a JSON body is required".into()));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Reads a whole body of at most `limit` bytes.
pub async fn read_body<B>(req: Request<B>, limit: usize) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
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
pub async fn spool_body(mgr: &Manager, req: Req, limit: u64) -> Result<(Spooled, u64), ApiError> {
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

/// Answers one request: authentication, then the router ([`routes::router`]), then the
/// error body (with the request id), the `405`'s message and the metrics.
pub async fn handle(
    mgr: &Arc<Manager>,
    router: Router,
    origin: Origin,
    req: Request<Incoming>,
) -> Response<Body> {
    let request_id = REQUEST_IDS.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // A sandbox's origin (by Host): its own credentials, its own answers.
    let req = match origins::serve(mgr, &origin, req.map(axum::body::Body::new)).await {
        Ok(response) => {
            mgr.metrics
                .count_request("sandbox origin", response.status().as_u16());
            return response;
        }
        Err(req) => req,
    };
    // E2B's API (its own authentication: X-API-KEY, envd access tokens).
    if e2b::is_e2b(&path) {
        let response = e2b::serve(mgr, &origin, req).await;
        mgr.metrics.count_request("e2b", response.status().as_u16());
        return response;
    }
    // The web UI's pages, assets and login.
    if ui::is_ui(&path) {
        let response = ui::serve(&origin, req).await;
        mgr.metrics.count_request("ui", response.status().as_u16());
        return response;
    }
    let mut req = req;
    if let Some(token) = &origin.token {
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| crate::sandbox::constant_time_eq(g.as_bytes(), token.as_bytes()))
            && !origins::attach_allows(mgr, &path, req.headers())
            && !ui::allows(&req)
        {
            let e = ApiError::Unauthorized(
                "this endpoint needs Authorization: Bearer <token> (see agentd's token_file)"
                    .into(),
            );
            mgr.metrics.count_request("unknown", e.status().as_u16());
            return json(e.status(), &e.body(request_id));
        }
    }
    req.extensions_mut().insert(origin);
    let response = match router.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let (mut parts, body) = response.into_parts();
    let route = parts
        .extensions
        .remove::<routes::Matched>()
        .map_or_else(|| "unmatched".to_string(), |m| m.0);
    let error = parts.extensions.remove::<ApiError>().or_else(|| {
        // The router's own 405 (a known path, another method): say which methods it takes.
        (parts.status == StatusCode::METHOD_NOT_ALLOWED).then(|| {
            let allow = parts
                .headers
                .get(hyper::header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .replace(',', ", ");
            ApiError::MethodNotAllowed(format!("{method} is not allowed on {path}: use {allow}"))
        })
    });
    let response = match error {
        Some(e) => {
            parts.headers.insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            parts.status = e.status();
            // The router sized the empty body it made; this one is another size.
            parts.headers.remove(hyper::header::CONTENT_LENGTH);
            let body = serde_json::to_vec(&e.body(request_id)).expect("json");
            Response::from_parts(parts, full(body))
        }
        None => Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync()),
    };
    mgr.metrics
        .count_request(&route, response.status().as_u16());
    tracing::debug!(request_id, %method, path, status = response.status().as_u16(), "request");
    response
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
    let router = routes::router().with_state(mgr.clone());
    let unix_loop = {
        let mgr = mgr.clone();
        let router = router.clone();
        async move {
            let limit = conn::Listener::new("socket", conn::MAX_UNIX_CONNECTIONS);
            let mut backoff = conn::Backoff::default();
            loop {
                match unix.accept().await {
                    Ok((stream, _)) => {
                        backoff = conn::Backoff::default();
                        // At the cap the connection is dropped (closed) at once.
                        if let Some(slot) = limit.admit() {
                            spawn_conn(
                                mgr.clone(),
                                router.clone(),
                                Origin { token: None },
                                stream,
                                slot,
                            );
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
                        spawn_conn(mgr.clone(), router.clone(), origin, stream, slot);
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
    router: Router,
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
            let router = router.clone();
            let origin = origin.clone();
            async move { Ok::<_, Infallible>(handle(&mgr, router, origin, req).await) }
        });
        if let Err(e) = conn::http1()
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
            .await
        {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}
