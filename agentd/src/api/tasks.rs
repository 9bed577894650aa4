//! `/v1/tasks`: create, list, inspect, events (SSE, resumable with `Last-Event-ID`), result,
//! per-attempt diffs, cancel, delete; and `/v1/workspaces` for uploaded workspace tars.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::Extension;
use bytes::Bytes;
use hyper::body::Frame;
use hyper::{Response, StatusCode};
use serde::Deserialize;

use super::error::ApiError;
use super::routes::{Id, Params, Query};
use super::types::{EventsQuery, RankedAttempt, TaskList, TaskResult, TaskView, UploadedWorkspace};
use super::{json, read_json, Body, Origin, Req};
use crate::sandbox::Manager;
use crate::task::{CreateTask, Task, TaskManager};

/// Seconds between keep-alive comments on an idle event stream.
const KEEPALIVE: Duration = Duration::from_secs(15);

fn service(mgr: &crate::sandbox::Manager) -> Result<Arc<TaskManager>, ApiError> {
    mgr.tasks
        .get()
        .cloned()
        .ok_or_else(|| ApiError::Unavailable("tasks are not available yet".into()))
}

/// A handler's answer.
type Reply = Result<Response<Body>, ApiError>;

/// A task's attempt in a path.
#[derive(Deserialize)]
pub(crate) struct Attempt {
    id: String,
    n: String,
}

/// A task's approval request in a path.
#[derive(Deserialize)]
pub(crate) struct Request {
    id: String,
    request: String,
}

/// `GET /v1/tasks/{id}/approvals`.
pub(crate) async fn approvals(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    let (tasks, task) = named(&mgr, &p.id)?;
    let approvals = tasks.approvals(&task).await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "approvals": approvals }),
    ))
}

/// `POST /v1/tasks/{id}/approvals/{request}`.
pub(crate) async fn approve(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Request>,
    req: Req,
) -> Reply {
    let (tasks, task) = named(&mgr, &p.id)?;
    let answer: crate::task::approvals::Answer = read_json(req).await?;
    let approval = tasks.approve(&task, &p.request, answer).await?;
    Ok(json(StatusCode::OK, &approval))
}

/// `POST /v1/workspaces`: upload a tar for `workspace.upload`.
pub(crate) async fn upload_workspace(State(mgr): State<Arc<Manager>>, req: Req) -> Reply {
    let tasks = service(&mgr)?;
    let (body, size) = super::spool_body(&mgr, req, super::files::MAX_UPLOAD as u64).await?;
    if size == 0 {
        return Err(ApiError::BadRequest(
            "the body is empty: send the workspace as a tar".into(),
        ));
    }
    let (id, info) = tasks.upload(&body.0).await?;
    Ok(json(
        StatusCode::CREATED,
        &UploadedWorkspace {
            upload: id,
            entries: info.entries,
            bytes: info.bytes,
        },
    ))
}

/// `GET /v1/tasks`.
pub(crate) async fn list(State(mgr): State<Arc<Manager>>) -> Reply {
    let tasks = service(&mgr)?;
    let tasks = tasks
        .list()
        .iter()
        .map(|t| TaskView::of(&t.snapshot(), false))
        .collect();
    Ok(json(StatusCode::OK, &TaskList { tasks }))
}

/// `POST /v1/tasks`; over TCP host paths are refused.
pub(crate) async fn create(
    State(mgr): State<Arc<Manager>>,
    Extension(origin): Extension<Origin>,
    req: Req,
) -> Reply {
    let tasks = service(&mgr)?;
    let tcp = origin.token.is_some();
    let body: CreateTask = read_json(req).await?;
    if tcp && body.workspace.path.is_some() {
        return Err(ApiError::Forbidden(
            "workspace.path (a host directory) is accepted on agentd's Unix socket only; over TCP upload a tar to POST /v1/workspaces and give workspace.upload, or give workspace.git".into(),
        ));
    }
    let rec = tasks.create(body, tcp).await?;
    Ok(json(StatusCode::CREATED, &TaskView::of(&rec, true)))
}

/// The task service and the task a path names.
fn named(mgr: &Manager, id: &str) -> Result<(Arc<TaskManager>, Arc<Task>), ApiError> {
    let tasks = service(mgr)?;
    let task = tasks.get(id)?;
    Ok((tasks, task))
}

/// `GET /v1/tasks/{id}`.
pub(crate) async fn inspect(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    let (_, task) = named(&mgr, &p.id)?;
    Ok(json(StatusCode::OK, &TaskView::of(&task.snapshot(), true)))
}

/// `DELETE /v1/tasks/{id}`.
pub(crate) async fn delete(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    let (tasks, task) = named(&mgr, &p.id)?;
    let rec = tasks.delete(&task)?;
    Ok(json(StatusCode::ACCEPTED, &TaskView::of(&rec, true)))
}

/// `POST /v1/tasks/{id}/cancel`.
pub(crate) async fn cancel(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    let (tasks, task) = named(&mgr, &p.id)?;
    if task.snapshot().deleting {
        return Err(ApiError::Conflict(format!(
            "task {} is being deleted",
            p.id
        )));
    }
    tasks.cancel(&task)?;
    Ok(json(
        StatusCode::ACCEPTED,
        &TaskView::of(&task.snapshot(), true),
    ))
}

/// `GET /v1/tasks/{id}/events`.
pub(crate) async fn events_route(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Id>,
    Query(q): Query<EventsQuery>,
    headers: hyper::HeaderMap,
) -> Reply {
    let (tasks, task) = named(&mgr, &p.id)?;
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest("Last-Event-ID must be an event id (a number)".into())
                })?,
        ),
    };
    Ok(events(tasks, task, last_event_id.or(q.after).unwrap_or(0)))
}

/// `GET /v1/tasks/{id}/result`.
pub(crate) async fn result_route(State(mgr): State<Arc<Manager>>, Params(p): Params<Id>) -> Reply {
    let (tasks, task) = named(&mgr, &p.id)?;
    result(&tasks, &task).await
}

/// `GET /v1/tasks/{id}/attempts/{n}/diff`.
pub(crate) async fn diff_route(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Attempt>,
) -> Reply {
    let (tasks, task) = named(&mgr, &p.id)?;
    diff(&tasks, &task, &p.n).await
}

/// `GET /v1/tasks/{id}/attempts/{n}/patch`.
pub(crate) async fn patch_route(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Attempt>,
) -> Reply {
    let (tasks, task) = named(&mgr, &p.id)?;
    let (n, data) = read_diff(&tasks, &task, &p.n).await?;
    let rec = task.snapshot();
    let date = rec
        .attempts
        .iter()
        .find(|a| a.n == n)
        .and_then(|a| a.finished_at)
        .unwrap_or(rec.created_at);
    let message = crate::task::commit_message(&rec.id, n, &rec.request.prompt);
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/mbox")
        .body(super::full(crate::task::mbox(&message, date, &data)))
        .expect("valid response"))
}

/// `POST /v1/tasks/{id}/attempts/{n}/push`: attempt `n`'s change as a new branch of the
/// task's git repository.
pub(crate) async fn push_route(
    State(mgr): State<Arc<Manager>>,
    Extension(origin): Extension<Origin>,
    Params(p): Params<Attempt>,
    req: Req,
) -> Reply {
    let (tasks, task) = named(&mgr, &p.id)?;
    let tcp = origin.token.is_some();
    let body: super::types::PushRequest = read_json(req).await?;
    let n: u32 =
        p.n.parse()
            .map_err(|_| ApiError::NotFound(format!("no attempt {:?} of task {}", p.n, p.id)))?;
    let pushed = tasks.push(&task, n, body.branch, tcp).await?;
    Ok(json(StatusCode::OK, &pushed))
}

/// `POST /v1/tasks/{id}/attempts/{n}/messages`: a follow-up to attempt `n`'s agent.
pub(crate) async fn say_route(
    State(mgr): State<Arc<Manager>>,
    Params(p): Params<Attempt>,
    req: Req,
) -> Reply {
    let (tasks, task) = named(&mgr, &p.id)?;
    let body: crate::task::follow_up::FollowUp = read_json(req).await?;
    let n: u32 =
        p.n.parse()
            .map_err(|_| ApiError::NotFound(format!("no attempt {:?} of task {}", p.n, p.id)))?;
    let said = tasks.say(&task, n, body.text).await?;
    Ok(json(StatusCode::ACCEPTED, &said))
}

/// Server-sent events: every event after `Last-Event-ID` (or `?after=`), then new ones as
/// they happen, until `task.finished`.
fn events(tasks: Arc<TaskManager>, task: Arc<Task>, after: u64) -> Response<Body> {
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
            // The end: task.finished sent now (unless a follow-up reopened the task since), or
            // seen by this client before it reconnected.
            if (finished && task.snapshot().state.is_terminal())
                || task.read_to_end(last)
                || tasks.get(&id).is_err()
            {
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
        attempts.push(RankedAttempt {
            rank: i as u32 + 1,
            attempt: a.n,
            state: a.state,
            sandbox: a.sandbox.clone(),
            rounds: a.round,
            tool_calls: a.tool_calls,
            final_message: a.final_message.clone(),
            check: a.check.clone(),
            setup: a.setup.clone(),
            diff: a.diff.clone(),
            has_patch,
            patch,
            patch_url: a
                .diff
                .as_ref()
                .map(|_| format!("/v1/tasks/{}/attempts/{}/diff", rec.id, a.n)),
            usage: a.usage.clone(),
            timings: a.timings.clone(),
            error: a.error.clone(),
            note: a.note.clone(),
        });
    }
    Ok(json(
        StatusCode::OK,
        &TaskResult {
            id: rec.id.clone(),
            state: rec.state,
            finished: rec.state.is_terminal(),
            attempts_with_patch: with_patch,
            attempts,
        },
    ))
}

/// Attempt `n`'s patch, as `git apply` takes it.
async fn diff(tasks: &TaskManager, task: &Task, n: &str) -> Result<Response<Body>, ApiError> {
    let (_, data) = read_diff(tasks, task, n).await?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "text/x-diff")
        .body(super::full(data))
        .expect("valid response"))
}

/// Attempt `n` (as the path gave it) and its stored patch.
async fn read_diff(tasks: &TaskManager, task: &Task, n: &str) -> Result<(u32, Vec<u8>), ApiError> {
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
    Ok((n, data))
}
