//! Every operation of the API, written once: [`router`] routes them and the OpenAPI document
//! ([`super::openapi`]) lists them, both from the one table the `routes!` macro makes, so a
//! route cannot exist without its documentation or the other way round.
//!
//! Paths are axum's: `{name}` is one segment (percent-decoded), `{*name}` the rest of the
//! path; the document writes both as `{name}`. A GET route answers HEAD too. A known path
//! with another method is a 405 naming the methods it takes; anything else is a 404.

use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath, Path};
use axum::http::request::Parts;
use axum::routing::{on, MethodFilter};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::error::ApiError;
use super::openapi::schema_of;
use super::{images, llm, openapi, pools, sandboxes, tasks, types};
use crate::sandbox::Manager;

/// A JSON Schema, made when the document is.
pub type Schema = fn() -> serde_json::Value;

/// One operation: a method on a path, what it takes and what it answers.
pub struct Route {
    /// The method, upper case.
    pub method: &'static str,
    /// The path as axum routes it.
    pub path: &'static str,
    /// The query parameters (the properties of this schema), if any.
    pub query: Option<Schema>,
    /// The request body's media types and their schemas (none: no body).
    pub input: &'static [(&'static str, Schema)],
    /// The status of a success.
    pub status: u16,
    /// The success's media types and their schemas (none: no body, or not agentd's to say).
    pub output: &'static [(&'static str, Schema)],
    /// One line for the document.
    pub summary: &'static str,
}

impl Route {
    /// The path as the OpenAPI document writes it (`{*rest}` → `{rest}`).
    pub fn doc_path(&self) -> String {
        doc_path(self.path)
    }
}

const JSON: &str = "application/json";
const NDJSON: &str = "application/x-ndjson";
const TAR: &str = "application/x-tar";
const OCTETS: &str = "application/octet-stream";

/// Bytes.
fn binary() -> serde_json::Value {
    serde_json::json!({"type": "string", "format": "binary"})
}

/// Text.
fn text() -> serde_json::Value {
    serde_json::json!({"type": "string"})
}

macro_rules! routes {
    ($(
        $method:ident $path:literal => $handler:path,
        query $query:expr,
        in [$($ict:ident: $ischema:expr),*],
        out $status:literal [$($oct:ident: $oschema:expr),*],
        $summary:literal;
    )*) => {
        /// Every operation, in the document's order.
        pub static ROUTES: &[Route] = &[
            $(Route {
                method: stringify!($method),
                path: $path,
                query: $query,
                input: &[$(($ict, $ischema)),*],
                status: $status,
                output: &[$(($oct, $oschema)),*],
                summary: $summary,
            },)*
        ];

        /// The router of every operation in [`ROUTES`].
        pub fn router() -> Router<Arc<Manager>> {
            Router::new()
                $(.route($path, on(MethodFilter::$method, $handler)))*
                .fallback(no_route)
                .layer(axum::middleware::from_fn(label_route))
        }
    };
}

routes! {
    GET "/v1/health" => health, query None, in [], out 200 [JSON: schema_of::<types::Health>],
        "Liveness and version";
    GET "/metrics" => metrics, query None, in [], out 200 [TEXT_METRICS: text],
        "Prometheus metrics (text)";
    GET "/v1/openapi.json" => openapi::serve, query None, in [], out 200 [JSON: openapi::any_object],
        "This document";
    GET "/v1/sandboxes" => sandboxes::list, query Some(schema_of::<types::ListQuery>), in [],
        out 200 [JSON: schema_of::<types::SandboxList>],
        "List sandboxes";
    POST "/v1/sandboxes" => sandboxes::create, query None, in [JSON: schema_of::<crate::sandbox::CreateSandbox>],
        out 201 [JSON: schema_of::<types::SandboxView>],
        "Create a sandbox; returns once it runs (state starting or ready)";
    GET "/v1/sandboxes/{id}" => sandboxes::inspect, query None, in [],
        out 200 [JSON: schema_of::<types::SandboxView>],
        "Inspect a sandbox (state, limits, token usage, exit)";
    DELETE "/v1/sandboxes/{id}" => sandboxes::delete, query None, in [], out 204 [],
        "Stop and forget a sandbox";
    POST "/v1/sandboxes/{id}/stop" => sandboxes::stop, query None, in [],
        out 200 [JSON: schema_of::<types::SandboxView>],
        "Stop a sandbox (SIGTERM, then SIGKILL after 10 s)";
    POST "/v1/sandboxes/{id}/exec" => sandboxes::exec_route, query None, in [JSON: schema_of::<types::ExecRequest>],
        out 200 [NDJSON: schema_of::<types::ExecLine>],
        "Run a command; output streams as JSON lines {stream,data} while it runs, then {exit_code,timed_out,oom_killed}; with \"stdin\": true the bytes after the JSON body and a newline are its stdin; a client that disconnects kills it";
    GET "/v1/sandboxes/{id}/exec/ws" => sandboxes::exec_ws, query None, in [], out 101 [],
        "Interactive exec over a WebSocket (with a terminal, or with streamed stdin): the first text message is the request {command, tty, cols, rows, env, cwd, uid, timeout_secs}; then binary messages are stdin and text messages controls ({\"resize\": {cols, rows}}, {\"eof\": true}); agentd sends the output as binary messages (without a terminal, a first byte 1 for stdout or 2 for stderr) and at the end {exit_code, timed_out, oom_killed}; a client that goes away kills the process";
    GET "/v1/sandboxes/{id}/logs" => sandboxes::logs_route, query Some(schema_of::<types::LogsQuery>), in [],
        out 200 [NDJSON: schema_of::<types::ExecLine>],
        "stdout/stderr as JSON lines";
    GET "/v1/sandboxes/{id}/egress" => sandboxes::egress, query None, in [],
        out 200 [JSON: schema_of::<types::EgressView>],
        "The sandbox's egress policy and its newest connections through the proxy (host, port, allowed, bytes)";
    PUT "/v1/sandboxes/{id}/egress" => sandboxes::set_egress, query None, in [JSON: schema_of::<types::EgressRequest>],
        out 200 [JSON: schema_of::<types::EgressView>],
        "Replace a running allowlist sandbox's allow list; the next connection follows it";
    GET "/v1/sandboxes/{id}/stats" => sandboxes::stats_route, query None, in [],
        out 200 [JSON: schema_of::<types::Stats>],
        "Memory, CPU and task counts";
    GET "/v1/sandboxes/{id}/files" => sandboxes::files, query Some(schema_of::<types::FilesQuery>), in [],
        out 200 [OCTETS: binary, TAR: binary],
        "Download a file, or a tar of a directory";
    POST "/v1/sandboxes/{id}/fork" => sandboxes::fork_route, query None,
        in [JSON: schema_of::<types::ForkRequest>], out 201 [JSON: schema_of::<types::ForkView>],
        "New sandboxes from a sandbox's current files (frozen while they are copied): same image, limits, network, labels and OpenCode; its /tmp and processes do not carry over";
    GET "/v1/sandboxes/{id}/llm" => sandboxes::llm_route, query None, in [],
        out 200 [JSON: schema_of::<types::LlmLog>],
        "The LLM gateway's audit log of a sandbox: per request the model, tokens, latency, status and retries (never the prompt), the newest 1,000; its usage and budget";
    POST "/v1/sandboxes/{id}/snapshot" => sandboxes::snapshot_route, query None,
        in [JSON: schema_of::<types::SnapshotRequest>], out 201 [JSON: schema_of::<types::SnapshotView>],
        "Store a sandbox's files as an image (frozen while they are copied; a paused sandbox stays paused): its image with the sandbox's writable layer, and the layers it was stacked on, as new layers; /tmp and processes do not carry over";
    POST "/v1/sandboxes/{id}/pause" => sandboxes::pause_route, query None, in [],
        out 200 [JSON: schema_of::<types::Paused>],
        "Pause a sandbox: its processes frozen (no CPU) until it is resumed, or until a request uses it (exec, files, proxy, ports, origins, SSH)";
    POST "/v1/sandboxes/{id}/hibernate" => sandboxes::hibernate_route, query None, in [],
        out 200 [JSON: schema_of::<types::Hibernated>],
        "Hibernate an OpenCode sandbox: its OpenCode stopped (its memory freed; its sessions stay on the sandbox's disk) and the rest paused; resumed, or the next request that uses it, starts OpenCode again (seconds). 409 while OpenCode works on a session";
    POST "/v1/sandboxes/{id}/resume" => sandboxes::resume_route, query None, in [],
        out 200 [JSON: schema_of::<types::Paused>],
        "Resume a paused sandbox (nothing to do when it is not paused); a hibernated one's OpenCode is started and answers before this does";
    GET "/v1/sandboxes/{id}/dir" => sandboxes::dir_route, query Some(schema_of::<types::FilesQuery>), in [],
        out 200 [JSON: schema_of::<types::DirList>],
        "List a directory: names, kinds, sizes, modes, times (links not followed; 10,000 entries at most)";
    GET "/v1/sandboxes/{id}/ports" => sandboxes::ports_route, query None, in [],
        out 200 [JSON: schema_of::<types::PortList>],
        "The TCP ports that listen inside (open one with a ticket's ?port= or /ports/{port}/)";
    PUT "/v1/sandboxes/{id}/files" => sandboxes::files, query Some(schema_of::<types::FilesQuery>),
        in [OCTETS: binary, TAR: binary], out 200 [JSON: schema_of::<types::Uploaded>],
        "Upload a file, or with Content-Type application/x-tar a tar extracted into the directory";
    GET "/v1/sandboxes/{id}/opencode" => sandboxes::opencode, query None, in [], out 200 [],
        "The sandbox's OpenCode server's root";
    GET "/v1/sandboxes/{id}/opencode/{*path}" => sandboxes::opencode, query None, in [], out 200 [],
        "Any request to the sandbox's OpenCode server (SSE included)";
    POST "/v1/sandboxes/{id}/opencode/{*path}" => sandboxes::opencode, query None, in [], out 200 [],
        "Any request to the sandbox's OpenCode server";
    PUT "/v1/sandboxes/{id}/opencode/{*path}" => sandboxes::opencode, query None, in [], out 200 [],
        "Any request to the sandbox's OpenCode server";
    PATCH "/v1/sandboxes/{id}/opencode/{*path}" => sandboxes::opencode, query None, in [], out 200 [],
        "Any request to the sandbox's OpenCode server";
    DELETE "/v1/sandboxes/{id}/opencode/{*path}" => sandboxes::opencode, query None, in [], out 200 [],
        "Any request to the sandbox's OpenCode server";
    GET "/v1/sandboxes/{id}/ports/{port}" => sandboxes::port, query None, in [], out 200 [],
        "The root of a port inside the sandbox (HTTP, SSE, WebSocket), without credentials";
    GET "/v1/sandboxes/{id}/ports/{port}/{*path}" => sandboxes::port, query None, in [], out 200 [],
        "Any request to a port inside the sandbox (HTTP, SSE, WebSocket)";
    POST "/v1/sandboxes/{id}/ports/{port}/{*path}" => sandboxes::port, query None, in [], out 200 [],
        "Any request to a port inside the sandbox";
    PUT "/v1/sandboxes/{id}/ports/{port}/{*path}" => sandboxes::port, query None, in [], out 200 [],
        "Any request to a port inside the sandbox";
    PATCH "/v1/sandboxes/{id}/ports/{port}/{*path}" => sandboxes::port, query None, in [], out 200 [],
        "Any request to a port inside the sandbox";
    DELETE "/v1/sandboxes/{id}/ports/{port}/{*path}" => sandboxes::port, query None, in [], out 200 [],
        "Any request to a port inside the sandbox";
    POST "/v1/sandboxes/{id}/tickets" => sandboxes::ticket, query Some(schema_of::<types::TicketQuery>), in [],
        out 201 [JSON: schema_of::<types::TicketView>],
        "A one-use ticket (60 s) that a browser exchanges for a session cookie on one of the sandbox's origins: open the url";
    GET "/v1/sandboxes/{id}/attach" => sandboxes::attach, query None, in [],
        out 200 [JSON: schema_of::<types::AttachView>],
        "How opencode attach reaches the sandbox's OpenCode through agentd (its origin and attach password)";
    GET "/v1/llm" => llm::status, query None, in [], out 200 [JSON: schema_of::<types::LlmStatus>],
        "The LLM gateway: its upstreams (never their keys), the default model, prices, budgets, and what all sandboxes spent today (UTC)";
    GET "/v1/pools" => pools::list, query None, in [], out 200 [JSON: schema_of::<crate::sandbox::pool::PoolList>],
        "Warm pools: size, ready and starting sandboxes, hits, misses, refills";
    PUT "/v1/pools" => pools::set, query None, in [JSON: schema_of::<crate::sandbox::pool::SetPool>],
        out 200 [JSON: schema_of::<crate::sandbox::pool::PoolView>],
        "Set a warm pool's size (kept across restarts; 0 empties it): sandboxes of the image started ahead, OpenCode ready and paused, taken by creates and task attempts that ask for no env, network, permissions, setup or disk limit of their own";
    GET "/v1/images" => images::list, query None, in [], out 200 [JSON: schema_of::<types::ImageList>],
        "List images";
    POST "/v1/images/pull" => images::pull, query None, in [JSON: schema_of::<types::PullRequest>],
        out 200 [NDJSON: schema_of::<types::PullLine>],
        "Pull an image; progress as JSON lines, the last {event: complete|error}";
    POST "/v1/images/import" => images::import, query Some(schema_of::<types::ImportQuery>),
        in [TAR: binary, JSON: schema_of::<types::ImportRequest>],
        out 201 [JSON: schema_of::<types::ImageList>],
        "Import an OCI layout or docker-archive tar: the body (Content-Type application/x-tar, ?name=), or on the Unix socket only {path} of a host file";
    GET "/v1/images/{*name}" => images::inspect, query None, in [], out 200 [JSON: schema_of::<types::ImageView>],
        "Inspect an image (a name with slashes percent-encoded, or not)";
    DELETE "/v1/images/{*name}" => images::remove, query None, in [], out 200 [JSON: schema_of::<types::Removed>],
        "Remove an image";
    POST "/v1/workspaces" => tasks::upload_workspace, query None, in [TAR: binary, OCTETS: binary],
        out 201 [JSON: schema_of::<types::UploadedWorkspace>],
        "Upload a workspace tar for a task; returns {upload} for workspace.upload (one task each)";
    GET "/v1/tasks" => tasks::list, query None, in [], out 200 [JSON: schema_of::<types::TaskList>],
        "List tasks";
    POST "/v1/tasks" => tasks::create, query None, in [JSON: schema_of::<crate::task::CreateTask>],
        out 201 [JSON: schema_of::<types::TaskView>],
        "Create a task: prompt + workspace (path, upload or git) + agents, check, max_rounds, timeout_secs";
    GET "/v1/tasks/{id}" => tasks::inspect, query None, in [], out 200 [JSON: schema_of::<types::TaskView>],
        "Inspect a task: state, counters, attempts";
    DELETE "/v1/tasks/{id}" => tasks::delete, query None, in [], out 202 [JSON: schema_of::<types::TaskView>],
        "Delete a task, its sandboxes and results: 202 with state deleting at once (cancelled first if running), then 404 once gone; resumed after a restart";
    POST "/v1/tasks/{id}/cancel" => tasks::cancel, query None, in [], out 202 [JSON: schema_of::<types::TaskView>],
        "Cancel a task: sessions aborted, diffs kept, sandboxes stopped";
    GET "/v1/tasks/{id}/events" => tasks::events_route, query Some(schema_of::<types::EventsQuery>), in [],
        out 200 [SSE: text],
        "Progress as server-sent events until task.finished; resume with Last-Event-ID (or ?after=)";
    GET "/v1/tasks/{id}/approvals" => tasks::approvals, query None, in [],
        out 200 [JSON: schema_of::<types::ApprovalList>],
        "What the task's agents ask permission for (tools the task's permissions set to ask), waiting for a person";
    POST "/v1/tasks/{id}/approvals/{request}" => tasks::approve, query None,
        in [JSON: schema_of::<crate::task::approvals::Answer>],
        out 200 [JSON: schema_of::<crate::task::approvals::Approval>],
        "Answer a permission request: once, always or reject (with a message for the agent)";
    GET "/v1/tasks/{id}/result" => tasks::result_route, query None, in [], out 200 [JSON: schema_of::<types::TaskResult>],
        "Attempts ranked (passing checks first, then smaller diffs) with messages, checks, patches, usage, timings";
    GET "/v1/tasks/{id}/attempts/{n}/diff" => tasks::diff_route, query None, in [], out 200 [DIFF: text],
        "Attempt n's patch against the baseline (text/x-diff, for git apply)";
    GET "/v1/tasks/{id}/attempts/{n}/patch" => tasks::patch_route, query None, in [], out 200 [MBOX: text],
        "Attempt n's change as a git format-patch message (application/mbox, for git am): the task and its prompt in the commit message";
    POST "/v1/tasks/{id}/attempts/{n}/push" => tasks::push_route, query None,
        in [JSON: schema_of::<types::PushRequest>], out 200 [JSON: schema_of::<crate::task::Pushed>],
        "Push attempt n's change to the task's git repository (a git-URL workspace) as a new branch, with agentd's git credentials file";
    POST "/v1/ui/tickets" => super::ui::ticket_route, query None, in [],
        out 201 [JSON: schema_of::<types::UiTicket>],
        "A one-use login link for the web UI (60 s): what `agentd ui` prints";
    POST "/v1/tasks/{id}/attempts/{n}/messages" => tasks::say_route, query None,
        in [JSON: schema_of::<crate::task::follow_up::FollowUp>],
        out 202 [JSON: schema_of::<crate::task::follow_up::Said>],
        "A person's follow-up to attempt n's agent: sent when its turn ends (before the check); a finished attempt whose sandbox is kept runs again for it (the check and the diff too)";
}

const TEXT_METRICS: &str = "text/plain";
const SSE: &str = "text/event-stream";
const DIFF: &str = "text/x-diff";
const MBOX: &str = "application/mbox";

/// An axum path as the OpenAPI document writes it: `{*rest}` → `{rest}`.
fn doc_path(axum_path: &str) -> String {
    axum_path.replace("{*", "{")
}

/// The route a request matched (its documented path), for metrics: a response carries it
/// back to [`super::handle`]. Arbitrary paths count as `unmatched`, so clients cannot grow
/// the metrics' label set.
#[derive(Clone)]
pub struct Matched(pub String);

/// Notes the route a request matched on its response.
async fn label_route(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let matched = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| Matched(doc_path(m.as_str())));
    let mut response = next.run(req).await;
    if let Some(m) = matched {
        response.extensions_mut().insert(m);
    }
    response
}

/// A path's parameters as `T`; a value that does not decode is a 400 in agentd's error shape.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(t)) => Ok(Params(t)),
            Err(e) => Err(ApiError::BadRequest(format!("bad path: {}", e.body_text()))),
        }
    }
}

/// The query as `T`; one that does not decode is a 400 in agentd's error shape.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(t)) => Ok(Query(t)),
            Err(e) => Err(ApiError::BadRequest(format!(
                "bad query: {}",
                e.body_text()
            ))),
        }
    }
}

/// A path with an `{id}` and a `{port}`.
#[derive(Deserialize)]
pub struct IdPort {
    /// A sandbox's id or name.
    pub id: String,
    /// A port inside it.
    pub port: u16,
}

/// A path with an `{id}`.
#[derive(Deserialize)]
pub struct Id {
    /// A sandbox's or a task's id (a sandbox's name works too).
    pub id: String,
}

/// Paths no route matches.
async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no route {method} {}; see GET /v1/openapi.json",
        uri.path()
    ))
}

/// `GET /v1/health`.
async fn health() -> axum::response::Response<super::Body> {
    super::json(
        hyper::StatusCode::OK,
        &serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}),
    )
}

/// `GET /metrics`.
async fn metrics(
    axum::extract::State(mgr): axum::extract::State<Arc<Manager>>,
) -> axum::response::Response<super::Body> {
    let mut by_state = std::collections::BTreeMap::new();
    for s in ["creating", "starting", "ready", "exited", "stopped"] {
        by_state.insert(s, 0);
    }
    let (mut paused, mut hibernated) = (0u64, 0u64);
    for sb in mgr.list() {
        let rec = sb.snapshot();
        *by_state.entry(rec.state.as_str()).or_default() += 1;
        paused += u64::from(rec.paused_at.is_some() && rec.state.is_live());
        hibernated += u64::from(rec.hibernated && rec.state.is_live());
    }
    let mut text = mgr.metrics.render(&by_state);
    text.push_str(&format!(
        "# HELP agentd_sandboxes_paused Live sandboxes whose processes are frozen.\n# TYPE agentd_sandboxes_paused gauge\nagentd_sandboxes_paused {paused}\n# HELP agentd_sandboxes_hibernated Live sandboxes whose OpenCode is hibernated (stopped until the next request to it).\n# TYPE agentd_sandboxes_hibernated gauge\nagentd_sandboxes_hibernated {hibernated}\n"
    ));
    text.push_str(&mgr.render_pool_metrics());
    if let Some(tasks) = mgr.tasks.get() {
        text.push_str(&tasks.render_metrics());
    }
    axum::response::Response::builder()
        .header(hyper::header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(super::full(text))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tower::ServiceExt;

    async fn label_of(router: &Router, path: &str) -> (u16, Option<String>) {
        let req = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let r = router.clone().oneshot(req).await.unwrap();
        (
            r.status().as_u16(),
            r.extensions().get::<Matched>().map(|m| m.0.clone()),
        )
    }

    /// Metrics count requests by route pattern (a rest-of-path `{*p}` written `{p}`, as the
    /// document does); a path no route has, however random, carries no label (`unmatched`).
    #[tokio::test]
    async fn test_requests_are_labelled_by_their_route_pattern() {
        let router: Router = Router::new()
            .route("/v1/things/{id}", get(|| async { "ok" }))
            .route("/v1/things/{id}/raw/{*path}", get(|| async { "ok" }))
            .fallback(no_route)
            .layer(axum::middleware::from_fn(label_route));
        assert_eq!(
            label_of(&router, "/v1/things/abc").await,
            (200, Some("/v1/things/{id}".into()))
        );
        assert_eq!(
            label_of(&router, "/v1/things/abc/raw/x/y%2Fz").await,
            (200, Some("/v1/things/{id}/raw/{path}".into()))
        );
        assert_eq!(label_of(&router, "/v1/random-7f3a/x").await, (404, None));
    }
}
