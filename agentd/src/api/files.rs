//! `GET/PUT /v1/sandboxes/{id}/files?path=`: download a file (or a tar of a directory),
//! upload a file (or a tar into a directory). The rootfs is reached through
//! [`crate::sandbox::fs`], which never follows what the sandbox planted.
//!
//! Only the overlay rootfs is reachable: the sandbox's private tmpfs mounts (/tmp, /dev/shm)
//! are not.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Frame;
use hyper::{Method, Response, StatusCode};

use super::error::ApiError;
use super::{Body, BoxError};
use crate::sandbox::fs::{append_dir, extract_tar, open_in_root, write_file};
use crate::sandbox::{ActiveGuard, Manager, Sandbox};

/// Largest upload.
pub const MAX_UPLOAD: usize = 1 << 30;

pub(crate) fn io_api(path: &str, e: io::Error) -> ApiError {
    match e.kind() {
        io::ErrorKind::NotFound => ApiError::NotFound(format!("{path}: no such file or directory")),
        io::ErrorKind::PermissionDenied => {
            ApiError::BadRequest(format!("{path}: permission denied"))
        }
        _ => ApiError::BadRequest(format!("{path}: {e}")),
    }
}

pub(crate) async fn handle(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    path: String,
    req: super::Req,
) -> Result<Response<Body>, ApiError> {
    if !path.starts_with('/') {
        return Err(ApiError::BadRequest("path must be absolute".into()));
    }
    let (rootfs, owner) = mgr.rootfs(&sb)?;
    // blocking-ok: opening the mounted rootfs's root dir is a lookup of a cached inode.
    let root = File::open(&rootfs)
        .map_err(|e| mgr.shim_failed(&sb, "opening the sandbox's files", &e.to_string()))?;
    let _guard = ActiveGuard::new(sb.clone());
    if req.method() == Method::GET {
        return download(root, path).await;
    }
    let is_tar = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-tar"));
    // Spooled to agentd's own disk first: an upload is never held in memory.
    let (body, _) = super::spool_body(mgr, req, MAX_UPLOAD as u64).await?;
    let p2 = path.clone();
    let written = tokio::task::spawn_blocking(move || {
        let data = io::BufReader::new(File::open(&body.0)?);
        if is_tar {
            extract_tar(&root, Path::new(&p2), data, owner)
        } else {
            write_file(&root, Path::new(&p2), data, owner).map(|()| 1)
        }
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| io_api(&path, e))?;
    Ok(super::json(
        StatusCode::OK,
        &super::types::Uploaded {
            path,
            entries: written as u64,
        },
    ))
}

async fn download(root: File, path: String) -> Result<Response<Body>, ApiError> {
    let p2 = path.clone();
    let opened = tokio::task::spawn_blocking(move || -> io::Result<(File, bool)> {
        let f = open_in_root(&root, Path::new(&p2), libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
        let meta = f.metadata()?;
        if meta.is_dir() {
            return Ok((f, true));
        }
        if !meta.is_file() {
            return Err(io::Error::other("not a regular file or directory"));
        }
        Ok((f, false))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| io_api(&path, e))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
    let (file, is_dir) = opened;
    let content_type = if is_dir {
        "application/x-tar"
    } else {
        "application/octet-stream"
    };
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter { tx };
        let result = if is_dir {
            let mut builder = tar::Builder::new(&mut w);
            let r = append_dir(&mut builder, file);
            r.and_then(|()| builder.finish())
        } else {
            let mut file = file;
            io::copy(&mut file, &mut w).map(|_| ())
        };
        if let Err(e) = result {
            let _ = w.tx.blocking_send(Err(Box::new(e)));
        }
    });
    Ok(Response::builder()
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(super::channel_body(rx))
        .expect("valid response"))
}

struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx
            .blocking_send(Ok(Frame::data(Bytes::copy_from_slice(buf))))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
