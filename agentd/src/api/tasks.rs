//! `/v1/tasks`: create, list, inspect, events (SSE, resumable with `Last-Event-ID`), result,
//! per-attempt diffs, cancel, delete; and `/v1/workspaces` for uploaded workspace tars.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};

use super::error::ApiError;
use super::{json, read_json, Body};
use crate::task::{CreateTask, Task, TaskManager};

/// Seconds between keep-alive comments on an idle event stream.
const KEEPALIVE: Duration = Duration::from_secs(15);

fn service(mgr: &crate::sandbox::Manager) -> Result<Arc<TaskManager>, ApiError> {
    mgr.tasks
        .get()
        .cloned()
        .ok_or_else(|| ApiError::Unavailable("tasks are not available yet".into()))
}

/// `/v1/workspaces`: upload a tar for `workspace.upload`.
pub(crate) async fn dispatch_workspaces(
    mgr: &Arc<crate::sandbox::Manager>,
    method: &Method,
    segs: &[&str],
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let tasks = service(mgr)?;
    match (method, segs) {
        (&Method::POST, []) => {
            let (body, size) = super::spool_body(mgr, req, super::files::MAX_UPLOAD as u64).await?;
            if size == 0 {
                return Err(ApiError::BadRequest(
                    "the body is empty: send the workspace as a tar".into(),
                ));
            }
            let (id, info) = tasks.upload(&body.0).await?;
            Ok(json(
                StatusCode::CREATED,
                &serde_json::json!({"upload": id, "entries": info.entries, "bytes": info.bytes}),
            ))
        }
        _ => Err(ApiError::MethodNotAllowed(
            "POST a tar to /v1/workspaces".into(),
        )),
    }
}

/// `/v1/tasks/...`; `tcp` says the request came over TCP (host paths are refused there).
pub(crate) async fn dispatch(
    mgr: &Arc<crate::sandbox::Manager>,
    method: &Method,
    segs: &[&str],
    req: Request<Incoming>,
    tcp: bool,
) -> Result<Response<Body>, ApiError> {
    let tasks = service(mgr)?;
    match (method, segs) {
        (&Method::GET, []) => {
            let items: Vec<serde_json::Value> = tasks
                .list()
                .iter()
                .map(|t| {
                    let mut v = t.snapshot().view();
                    if let Some(o) = v.as_object_mut() {
                        o.remove("attempts");
                    }
                    v
                })
                .collect();
            Ok(json(StatusCode::OK, &serde_json::json!({ "tasks": items })))
        }
        (&Method::POST, []) => {
            let body: CreateTask = read_json(req).await?;
            if tcp && body.workspace.path.is_some() {
                return Err(ApiError::Forbidden(
                    "workspace.path (a host directory) is accepted on agentd's Unix socket only; over TCP upload a tar to POST /v1/workspaces and give workspace.upload, or give workspace.git".into(),
                ));
            }
            let rec = tasks.create(body, tcp).await?;
            Ok(json(StatusCode::CREATED, &rec.view()))
        }
        (_, []) => Err(ApiError::MethodNotAllowed(
            "use GET or POST on /v1/tasks".into(),
        )),
        (_, [id, rest @ ..]) => {
            let task = tasks.get(id)?;
            match (method, rest) {
                (&Method::GET, []) => Ok(json(StatusCode::OK, &task.snapshot().view())),
                (&Method::DELETE, []) => {
                    let rec = tasks.delete(&task)?;
                    Ok(json(StatusCode::ACCEPTED, &rec.view()))
                }
                (&Method::POST, ["cancel"]) => {
                    if task.snapshot().deleting {
                        return Err(ApiError::Conflict(format!("task {id} is being deleted")));
                    }
                    tasks.cancel(&task)?;
                    Ok(json(StatusCode::ACCEPTED, &task.snapshot().view()))
                }
                (&Method::GET, ["events"]) => Ok(events(tasks, task, &req)),
                (&Method::GET, ["result"]) => result(&tasks, &task).await,
                (&Method::GET, ["attempts", n, "diff"]) => diff(&tasks, &task, n).await,
                _ => Err(ApiError::NotFound(format!(
                    "no route {method} /v1/tasks/{id}/{}",
                    rest.join("/")
                ))),
            }
        }
    }
}

/// Server-sent events: every event after `Last-Event-ID` (or `?after=`), then new ones as
/// they happen, until `task.finished`.
fn events(tasks: Arc<TaskManager>, task: Arc<Task>, req: &Request<Incoming>) -> Response<Body> {
    let after = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| super::query_param(req, "after"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let id = task.snapshot().id;
        let mut last = after;
        let mut seen = task.subscribe();
        loop {
            seen.borrow_and_update();
            let mut finished = false;
            for ev in tasks.events_after(&id, last).await {
                let n = ev["id"].as_u64().unwrap_or(last);
                let kind = ev["type"].as_str().unwrap_or("message").to_string();
                finished |= kind == "task.finished";
                let frame = format!("id: {n}\nevent: {kind}\ndata: {ev}\n\n");
                if tx.send(Ok(Frame::data(Bytes::from(frame)))).await.is_err() {
                    return;
                }
                last = n;
            }
            // The end: task.finished sent now, or seen by this client before it reconnected.
            if finished || task.read_to_end(last) || tasks.get(&id).is_err() {
                return;
            }
            tokio::select! {
                r = seen.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(KEEPALIVE) => {
                    if tx.send(Ok(Frame::data(Bytes::from_static(b": keepalive\n\n")))).await.is_err() {
                        return;
                    }
                }
                _ = tx.closed() => return,
                () = tasks.stopping() => {
                    let line = format!("event: error\ndata: {}\n\n", serde_json::json!({"message": super::sandboxes::STOPPING}));
                    let _ = tx.send(Ok(Frame::data(Bytes::from(line)))).await;
                    return;
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "text/event-stream")
        .header(hyper::header::CACHE_CONTROL, "no-cache")
        .body(super::channel_body(rx))
        .expect("valid response")
}

/// The attempts, best first, with their messages, checks, diffs (inline when text), usage
/// and timings.
async fn result(tasks: &TaskManager, task: &Task) -> Result<Response<Body>, ApiError> {
    let rec = task.snapshot();
    let mut attempts = Vec::new();
    let mut with_patch = Vec::new();
    for (i, a) in crate::task::rank(&rec.attempts).into_iter().enumerate() {
        let has_patch = a.diff.as_ref().is_some_and(|d| d.bytes > 0);
        if has_patch {
            with_patch.push(a.n);
        }
        let patch = match a.diff {
            Some(_) => tokio::fs::read(tasks.diff_path(&rec.id, a.n))
                .await
                .ok()
                .and_then(|b| String::from_utf8(b).ok()),
            None => None,
        };
        attempts.push(serde_json::json!({
            "rank": i + 1,
            "attempt": a.n,
            "state": a.state.as_str(),
            "sandbox": a.sandbox,
            "rounds": a.round,
            "tool_calls": a.tool_calls,
            "final_message": a.final_message,
            "check": a.check,
            "diff": a.diff,
            "has_patch": has_patch,
            "patch": patch,
            "patch_url": a.diff.as_ref().map(|_| format!("/v1/tasks/{}/attempts/{}/diff", rec.id, a.n)),
            "usage": a.usage,
            "timings": a.timings,
            "error": a.error,
            "note": a.note,
        }));
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "id": rec.id,
            "state": rec.state.as_str(),
            "finished": rec.state.is_terminal(),
            "attempts_with_patch": with_patch,
            "attempts": attempts,
        }),
    ))
}

/// Attempt `n`'s patch, as `git apply` takes it.
async fn diff(tasks: &TaskManager, task: &Task, n: &str) -> Result<Response<Body>, ApiError> {
    let rec = task.snapshot();
    let n: u32 = n
        .parse()
        .ok()
        .filter(|n| rec.attempts.iter().any(|a| a.n == *n))
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "task {} has attempts 1 to {}",
                rec.id,
                rec.attempts.len()
            ))
        })?;
    let data = match tokio::fs::read(tasks.diff_path(&rec.id, n)).await {
        Ok(d) => d,
        Err(_) => {
            return Err(ApiError::NotFound(format!(
                "attempt {n} of task {} has no diff (yet): see its error in GET /v1/tasks/{}",
                rec.id, rec.id
            )))
        }
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "text/x-diff")
        .body(super::full(data))
        .expect("valid response"))
}
