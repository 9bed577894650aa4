//! `/v1/images`: list, inspect, pull (progress streamed as JSON lines), import from a host
//! path, delete. Layers are unpacked with the sandboxes' id offset, ready for sandboxes.

use std::sync::Arc;

use axum::extract::State;
use axum::Extension;
use bytes::Bytes;
use hyper::body::Frame;
use hyper::{Response, StatusCode};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::routes::{Params, Query};
use super::types::{ImageList, ImageView, ImportQuery, ImportRequest, PullRequest, Removed};
use super::{json, read_json, Body, BoxError, Origin, Req};
use crate::sandbox::Manager;
use agentd_images::{Platform, Progress, ProgressEvent, PullOptions, Reference, UnpackOptions};

/// Largest image archive accepted as a request body.
pub const MAX_IMPORT_BYTES: u64 = 64 << 30;

/// Whether an import request carries the archive as its body (rather than a JSON host path).
fn is_archive(req: &Req) -> bool {
    let ct = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    ct.starts_with("application/x-tar") || ct.starts_with("application/octet-stream")
}

/// The first line of a message, at most 300 bytes (error chains of a parser may quote what
/// they parsed).
fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or_default();
    let mut end = line.len().min(300);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_string()
}

fn store_err(e: agentd_images::StoreError) -> ApiError {
    match e {
        agentd_images::StoreError::UnknownImage(_) => {
            ApiError::NotFound(agentd_runtime::error_chain(&e))
        }
        other => ApiError::internal(agentd_runtime::error_chain(&other)),
    }
}

struct ChannelProgress(mpsc::Sender<Result<Frame<Bytes>, BoxError>>);

impl Progress for ChannelProgress {
    fn event(&self, event: ProgressEvent) {
        let v = match event {
            ProgressEvent::Resolved {
                name,
                manifest,
                layers,
            } => serde_json::json!({
                "event": "resolved", "name": name, "manifest": manifest.to_string(),
                "layers": layers.iter().map(|(d, s)| serde_json::json!({"digest": d.to_string(), "size": s})).collect::<Vec<_>>(),
            }),
            ProgressEvent::LayerStart { digest, size } => {
                serde_json::json!({"event": "layer_start", "digest": digest.to_string(), "size": size})
            }
            // Byte counts come often; a client that wants a bar reads them, others skip them.
            ProgressEvent::LayerBytes {
                digest,
                done,
                total,
            } => {
                serde_json::json!({"event": "layer_bytes", "digest": digest.to_string(), "done": done, "total": total})
            }
            ProgressEvent::LayerDone { digest, cached } => {
                serde_json::json!({"event": "layer_done", "digest": digest.to_string(), "cached": cached})
            }
            ProgressEvent::UnpackStart { digest } => {
                serde_json::json!({"event": "unpack_start", "digest": digest.to_string()})
            }
            ProgressEvent::UnpackDone { digest, .. } => {
                serde_json::json!({"event": "unpack_done", "digest": digest.to_string()})
            }
            ProgressEvent::Done { name, manifest } => {
                serde_json::json!({"event": "done", "name": name, "manifest": manifest.to_string()})
            }
        };
        // Progress is best effort: a slow client loses byte counts, not the pull.
        let _ = self.0.try_send(super::json_line(&v));
    }
}

/// A handler's answer.
type Reply = Result<Response<Body>, ApiError>;

/// How images are unpacked for this daemon's sandboxes.
fn unpack_options(mgr: &Manager) -> UnpackOptions {
    UnpackOptions {
        id_offset: mgr.config.id_base,
        ..UnpackOptions::default()
    }
}

/// `GET /v1/images`.
pub(crate) async fn list(State(mgr): State<Arc<Manager>>) -> Reply {
    let store = mgr.store.clone();
    let images = tokio::task::spawn_blocking(move || store.images())
        .await
        .map_err(ApiError::internal)?
        .map_err(store_err)?;
    let images = images.iter().map(ImageView::from).collect();
    Ok(json(StatusCode::OK, &ImageList { images }))
}

/// `POST /v1/images/pull`: progress as JSON lines.
pub(crate) async fn pull(State(mgr): State<Arc<Manager>>, req: Req) -> Reply {
    let unpack = unpack_options(&mgr);
    let body: PullRequest = read_json(req).await?;
    let reference: Reference = body
        .reference
        .parse()
        .map_err(|e| ApiError::BadRequest(format!("{e}")))?;
    let platform: Platform = match &body.platform {
        Some(p) => p
            .parse()
            .map_err(|e| ApiError::BadRequest(format!("{e}")))?,
        None => Platform::default(),
    };
    let options = PullOptions {
        platform,
        insecure: body.insecure,
        unpack: Some(unpack),
        ..PullOptions::default()
    };
    let (tx, rx) = mpsc::channel(256);
    let store = mgr.store.clone();
    tokio::spawn(async move {
        let progress = Arc::new(ChannelProgress(tx.clone()));
        let result = agentd_images::registry::pull(&store, &reference, &options, progress).await;
        let end = match result {
            Ok(rec) => serde_json::json!({"event": "complete", "image": ImageView::from(&rec)}),
            Err(e) => {
                serde_json::json!({"event": "error", "error": {"code": "pull_failed", "message": agentd_runtime::error_chain(&e)}})
            }
        };
        let _ = tx.send(super::json_line(&end)).await;
    });
    Ok(Response::builder()
        .header(hyper::header::CONTENT_TYPE, "application/x-ndjson")
        .body(super::channel_body(rx))
        .expect("valid response"))
}

/// `POST /v1/images/import`: an archive as the body, or a host path on the socket.
pub(crate) async fn import(
    State(mgr): State<Arc<Manager>>,
    Extension(origin): Extension<Origin>,
    Query(q): Query<ImportQuery>,
    req: Req,
) -> Reply {
    let unpack = unpack_options(&mgr);
    let tcp = origin.token.is_some();
    let archive = is_archive(&req);
    let (path, name, upload) = if archive {
        // The archive is the body, streamed to a file of agentd's own.
        let name = q.name;
        let (file, size) = super::spool_body(&mgr, req, MAX_IMPORT_BYTES).await?;
        if size == 0 {
            return Err(ApiError::BadRequest(
                "the body is empty: send the image archive (OCI layout or docker-archive tar)"
                    .into(),
            ));
        }
        (file.0.clone(), name, Some(file))
    } else {
        let body: ImportRequest = read_json(req).await?;
        // Reading host files is a privilege of the root-only socket: a TCP token must
        // not grant it (nor tell which paths exist).
        if tcp {
            return Err(ApiError::Forbidden(
                "host paths are accepted on agentd's Unix socket only: over TCP send the archive as the body (Content-Type: application/x-tar, ?name=NAME)".into(),
            ));
        }
        let path = std::path::PathBuf::from(&body.path);
        if !path.is_absolute() {
            return Err(ApiError::BadRequest(
                "path must be an absolute host path".into(),
            ));
        }
        if !path.exists() {
            return Err(ApiError::BadRequest(format!(
                "{}: no such file or directory",
                body.path
            )));
        }
        (path, body.name, None)
    };
    let store = mgr.store.clone();
    let records = tokio::task::spawn_blocking(move || {
        let recs =
            agentd_images::layout::import(&store, &path, name.as_deref(), &Platform::default())?;
        for r in &recs {
            store
                .rootfs(&r.name, &unpack)
                .map_err(agentd_images::LayoutError::from)?;
        }
        Ok::<_, agentd_images::LayoutError>(recs)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| {
        // Only agentd's own top-level message: the causes below it come from parsers
        // (tar, JSON) that quote what they read, which must never reach the client.
        tracing::debug!(error = %agentd_runtime::error_chain(&e), "image import failed");
        ApiError::BadRequest(format!(
            "not an importable image (an OCI layout, dir or tar, or a docker-archive tar): {}",
            first_line(&e.to_string())
        ))
    });
    drop(upload);
    let records = records?;
    let images = records.iter().map(ImageView::from).collect();
    Ok(json(StatusCode::CREATED, &ImageList { images }))
}

/// An image's name from the path (`{*name}`: it may hold slashes, encoded or not).
#[derive(Deserialize)]
pub(crate) struct Name {
    name: String,
}

/// `GET /v1/images/{name}`.
pub(crate) async fn inspect(State(mgr): State<Arc<Manager>>, Params(p): Params<Name>) -> Reply {
    let name = p.name;
    let store = mgr.store.clone();
    let rec = tokio::task::spawn_blocking(move || store.resolve(&name))
        .await
        .map_err(ApiError::internal)?
        .map_err(store_err)?;
    Ok(json(StatusCode::OK, &ImageView::from(&rec)))
}

/// `DELETE /v1/images/{name}`.
pub(crate) async fn remove(State(mgr): State<Arc<Manager>>, Params(p): Params<Name>) -> Reply {
    let name = p.name;
    let store = mgr.store.clone();
    let rec = tokio::task::spawn_blocking(move || store.remove_image(&name))
        .await
        .map_err(ApiError::internal)?
        .map_err(store_err)?;
    Ok(json(StatusCode::OK, &Removed { removed: rec.name }))
}
