//! E2B's API on agentd's TCP listener, under `/e2b`, so that programs written for E2B's
//! official SDKs run against agentd with only environment variables changed:
//! `E2B_API_URL=http://HOST:PORT/e2b`, `E2B_SANDBOX_URL=http://HOST:PORT/e2b`,
//! `E2B_API_KEY=<agentd's token>` (also accepted as `e2b_<token>`).
//!
//! - The control plane (E2B's OpenAPI: `/sandboxes`, `/v2/sandboxes`, timeout, connect, pause,
//!   resume) maps onto agentd's sandboxes: `templateID` is an agentd image (`base`: agentd's
//!   default image), `timeout` the sandbox's TTL from now, `metadata` its labels, `envVars`
//!   its environment; `allow_internet_access: true` is network mode `open` (unset or false:
//!   `none`, agentd's default). Sandboxes are made without OpenCode. Authorised by
//!   `X-API-KEY` (or `Authorization: Bearer`) holding agentd's token.
//! - The data plane (envd, [`super::envd`]) is picked by the `E2b-Sandbox-Id` header (the SDKs
//!   send it with `E2B_SANDBOX_URL`), authorised by that sandbox's envd access token
//!   (`X-Access-Token`, derived from agentd's token and the sandbox id: nothing to store) or
//!   by agentd's token. A paused sandbox is resumed by its use.
//!
//! Errors are E2B's shape: `{"code": <status>, "message"}`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use sha2::Digest as _;

use super::{full, Body, Origin, Req};
use crate::sandbox::{
    CreateSandbox, Manager, NetworkRequest, Sandbox, SandboxRecord, SandboxState,
};

/// Where the E2B API is served.
pub const PREFIX: &str = "/e2b";
/// The port E2B's SDKs name for envd.
const ENVD_PORT: &str = "49983";
/// The same, as a number: `49983-{id}.{origin_base}` is the sandbox's envd.
pub const ENVD_PORT_NUMBER: u16 = 49983;
/// How long a create waits for its sandbox to be ready.
const READY_WAIT: Duration = Duration::from_secs(60);
/// E2B's default sandbox timeout, seconds.
const DEFAULT_TIMEOUT: u64 = 300;
/// Longest timeout a sandbox may be given, seconds (E2B's own limit: 24 h).
const MAX_TIMEOUT: u64 = 86_400;

type Reply = Response<Body>;

/// Whether `path` is the E2B API's.
pub fn is_e2b(path: &str) -> bool {
    path == PREFIX || path.starts_with("/e2b/")
}

fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    let v = json!({"code": status.as_u16(), "message": message.into()});
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_vec(&v).expect("JSON values serialise")))
        .expect("a valid response")
}

fn api_error(e: super::error::ApiError) -> Reply {
    let message = e.body(0)["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    error(e.status(), message)
}

fn reply(status: StatusCode, v: &serde_json::Value) -> Reply {
    super::json(status, v)
}

fn no_content() -> Reply {
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(super::empty())
        .expect("a valid response")
}

fn header<'a>(req: &'a Req, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The header E2B's clients send a sandbox's traffic access token in.
pub const TRAFFIC_HEADER: &str = "e2b-traffic-access-token";

/// The envd access token of sandbox `id`: derived from agentd's token, so it needs no storage
/// and changes with the token. It controls the sandbox (commands, files).
pub fn envd_token(token: &str, id: &str) -> String {
    derived(b"agentd e2b envd", token, id)
}

/// The traffic access token of sandbox `id`: opens its ports' origins (`get_host`) and nothing
/// else, so it can be handed to whoever should see a preview.
pub fn traffic_token(token: &str, id: &str) -> String {
    derived(b"agentd e2b traffic", token, id)
}

fn derived(kind: &[u8], token: &str, id: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(kind);
    h.update(b"\0");
    h.update(token.as_bytes());
    h.update(b"\0");
    h.update(id.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the request carries agentd's token (`X-API-KEY`, as is or `e2b_`-prefixed, or a
/// bearer token).
fn has_api_key(req: &Req, token: &str) -> bool {
    let eq = |g: &str| crate::sandbox::constant_time_eq(g.as_bytes(), token.as_bytes());
    let key = header(req, "x-api-key").map(|k| k.strip_prefix("e2b_").unwrap_or(k));
    let bearer = header(req, "authorization").and_then(|v| v.strip_prefix("Bearer "));
    key.is_some_and(eq) || bearer.is_some_and(eq)
}

/// Answers one request below [`PREFIX`].
pub async fn serve(mgr: &Arc<Manager>, origin: &Origin, req: Req) -> Reply {
    let path = req.uri().path()[PREFIX.len()..].to_string();
    let path = if path.is_empty() {
        "/".to_string()
    } else {
        path
    };
    let token = origin.token.as_deref().map(String::as_str);
    let api_ok = token.is_none_or(|t| has_api_key(&req, t));
    if let Some(id) = header(&req, "e2b-sandbox-id").map(str::to_string) {
        if let Some(port) = header(&req, "e2b-sandbox-port") {
            if port != ENVD_PORT {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("agentd serves envd's port {ENVD_PORT} here; reach port {port} through the sandbox's origin {port}-{id}.<origin_base>"),
                );
            }
        }
        return envd(mgr, origin, &id, &path, req).await;
    }
    if !api_ok {
        return error(
            StatusCode::UNAUTHORIZED,
            "the E2B API needs agentd's token as X-API-KEY (E2B_API_KEY)",
        );
    }
    let domain = domain(mgr, &req);
    let method = req.method().clone();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let envd = token.map(|t| t.to_string());
    let ctx = Ctx {
        mgr,
        domain,
        token: envd,
    };
    ctx.route(method, &parts, &path, req).await
}

/// envd of sandbox `name` (its id, or its name), picked by the `E2b-Sandbox-Id` header or by
/// the host `49983-{id}.{origin_base}` ([`super::origins`]); `path` is envd's own.
pub async fn envd(mgr: &Arc<Manager>, origin: &Origin, name: &str, path: &str, req: Req) -> Reply {
    let token = origin.token.as_deref().map(String::as_str);
    let api_ok = token.is_none_or(|t| has_api_key(&req, t));
    // Tokens are derived from the id; a sandbox named by its name has the same one.
    let id = mgr
        .get(name)
        .map_or_else(|_| name.to_string(), |s| s.snapshot().id);
    let envd_ok = token.is_none_or(|t| {
        header(&req, "x-access-token").is_some_and(|g| {
            crate::sandbox::constant_time_eq(g.as_bytes(), envd_token(t, &id).as_bytes())
        })
    });
    if !api_ok && !envd_ok {
        return error(
            StatusCode::UNAUTHORIZED,
            "envd needs the sandbox's X-Access-Token (its envdAccessToken) or agentd's token",
        );
    }
    let sb = match live(mgr, &id) {
        Ok(sb) => sb,
        // E2B's proxy answers 502 for a sandbox that is not running (stopped, deleted, never
        // there): the SDKs read it so (`is_running` is false).
        Err(r) if r.status() == StatusCode::NOT_FOUND => {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("sandbox {id} is not running"),
            )
        }
        Err(r) => return *r,
    };
    sb.touch();
    // envd's commands and files do not need a hibernated OpenCode.
    if let Err(e) = mgr.wake(&sb, false).await {
        return api_error(e.into());
    }
    super::envd::serve(mgr, sb, path, req).await
}

impl Ctx<'_> {
    /// The control plane.
    async fn route(&self, method: Method, parts: &[&str], path: &str, req: Req) -> Reply {
        let (mgr, ctx) = (self.mgr, self);
        match (method, parts) {
            (Method::POST, ["sandboxes"] | ["v2", "sandboxes"]) => ctx.create(req).await,
            (Method::GET, ["sandboxes"]) => ctx.list(&req, true),
            (Method::GET, ["v2", "sandboxes"]) => ctx.list(&req, false),
            (Method::GET, ["sandboxes", id]) => match live(mgr, id) {
                Ok(sb) => reply(StatusCode::OK, &ctx.detail(&sb.snapshot())),
                Err(r) => *r,
            },
            (Method::DELETE, ["sandboxes", id]) => match mgr.get(id) {
                Ok(sb) => match mgr.delete(&sb).await {
                    Ok(()) => no_content(),
                    Err(e) => api_error(e.into()),
                },
                Err(e) => api_error(e.into()),
            },
            (Method::POST, ["sandboxes", id, "timeout" | "refreshes"]) => {
                let secs = match timeout_of(req).await {
                    Ok(t) => t.unwrap_or(DEFAULT_TIMEOUT),
                    Err(r) => return *r,
                };
                match live(mgr, id).map(|sb| mgr.set_timeout(&sb, secs)) {
                    Ok(Ok(_)) => no_content(),
                    Ok(Err(e)) => api_error(e.into()),
                    Err(r) => *r,
                }
            }
            (Method::POST, ["sandboxes", id, "connect" | "resume"] | ["v2", "sandboxes", id, "connect"]) => {
                let resume = parts.last() == Some(&"resume");
                let secs = match timeout_of(req).await {
                    Ok(t) => t,
                    Err(r) => return *r,
                };
                let sb = match live(mgr, id) {
                    Ok(sb) => sb,
                    Err(r) => return *r,
                };
                let was_paused = sb.snapshot().paused_at.is_some();
                if resume && !was_paused {
                    return error(StatusCode::CONFLICT, format!("sandbox {id} is not paused"));
                }
                // E2B's clients use envd, not OpenCode: a hibernated one sleeps on until a
                // request goes to it.
                if let Err(e) = mgr.wake(&sb, false).await {
                    return api_error(e.into());
                }
                if let Some(secs) = secs {
                    if let Err(e) = mgr.set_timeout(&sb, secs) {
                        return api_error(e.into());
                    }
                }
                let status = if was_paused {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                reply(status, &ctx.sandbox(&sb.snapshot()))
            }
            (Method::POST, ["sandboxes", id, "fork"]) => {
                #[derive(Deserialize, Default)]
                #[serde(default)]
                struct Fork {
                    count: Option<u32>,
                    timeout: Option<u64>,
                }
                let f: Fork = match optional_json(req).await {
                    Ok(f) => f,
                    Err(r) => return *r,
                };
                if let Err(r) = checked_timeout(f.timeout) {
                    return *r;
                }
                let sb = match live(mgr, id) {
                    Ok(sb) => sb,
                    Err(r) => return *r,
                };
                // agentd's fork: the parent frozen while its files are copied, each fork on them.
                let forked = match mgr.fork(&sb, f.count.unwrap_or(1)).await {
                    Ok(f) => f,
                    Err(e) => return api_error(e.into()),
                };
                let mut out = Vec::new();
                for rec in &forked.sandboxes {
                    let Ok(child) = mgr.get(&rec.id) else {
                        out.push(json!({"error": {"code": 500, "message": format!("fork {} vanished", rec.id)}}));
                        continue;
                    };
                    let ready = tokio::time::timeout(READY_WAIT, child.wait_ready()).await;
                    let timed = mgr.set_timeout(&child, f.timeout.unwrap_or(DEFAULT_TIMEOUT));
                    match (ready, timed) {
                        (Ok(Ok(())), Ok(r)) => out.push(json!({ "sandbox": ctx.sandbox(&r) })),
                        (Ok(Err(why)), _) => out.push(json!({"error": {"code": 500, "message": format!("fork {} did not start: {why}", rec.id)}})),
                        (Err(_), _) => out.push(json!({"error": {"code": 504, "message": format!("fork {} was not ready in time", rec.id)}})),
                        (_, Err(e)) => out.push(json!({"error": {"code": 500, "message": e.to_string()}})),
                    }
                }
                reply(StatusCode::CREATED, &serde_json::Value::Array(out))
            }
            (Method::POST, ["sandboxes", id, "pause"]) => match live(mgr, id) {
                Ok(sb) if sb.snapshot().paused_at.is_some() => {
                    error(StatusCode::CONFLICT, format!("sandbox {id} is paused already"))
                }
                Ok(sb) => match mgr.pause(&sb).await {
                    Ok(_) => no_content(),
                    Err(e) => api_error(e.into()),
                },
                Err(r) => *r,
            },
            (m, _) => error(
                StatusCode::NOT_IMPLEMENTED,
                format!("{m} {PREFIX}{path} is not part of agentd's E2B API (see README: Point your E2B code at agentd)"),
            ),
        }
    }
}

/// A live sandbox: one that stopped (its timeout passed) is gone for E2B's clients (404), as
/// in E2B; agentd's own API still shows it until it is deleted.
fn live(mgr: &Manager, id: &str) -> Result<Arc<Sandbox>, Box<Reply>> {
    match mgr.get(id) {
        Ok(sb) if sb.snapshot().state.is_live() => Ok(sb),
        Ok(sb) => Err(Box::new(error(
            StatusCode::NOT_FOUND,
            format!(
                "sandbox {id} is {} (its timeout passed, or it was stopped)",
                sb.snapshot().state.as_str()
            ),
        ))),
        Err(e) => Err(Box::new(api_error(e.into()))),
    }
}

/// `{"timeout": seconds}` of a request (absent or empty body: `None`).
async fn timeout_of(req: Req) -> Result<Option<u64>, Box<Reply>> {
    #[derive(Deserialize, Default)]
    struct T {
        timeout: Option<u64>,
        duration: Option<u64>,
    }
    let t: T = optional_json(req).await?;
    checked_timeout(t.timeout.or(t.duration))
}

/// A JSON body that may be absent (empty: `T::default()`), at most [`super::MAX_JSON_BODY`].
async fn optional_json<T: serde::de::DeserializeOwned + Default>(
    req: Req,
) -> Result<T, Box<Reply>> {
    let body = super::read_body(req, super::MAX_JSON_BODY)
        .await
        .map_err(|e| Box::new(api_error(e)))?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {e}"),
        ))
    })
}

/// A sandbox timeout a request asks for, refused beyond [`MAX_TIMEOUT`].
fn checked_timeout(t: Option<u64>) -> Result<Option<u64>, Box<Reply>> {
    match t {
        Some(s) if s > MAX_TIMEOUT => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("timeout is at most {MAX_TIMEOUT} s"),
        ))),
        other => Ok(other),
    }
}

/// The `domain` E2B's SDKs build hosts from (`{port}-{id}.{domain}`): agentd's origin base
/// with the port the client reached agentd on.
fn domain(mgr: &Manager, req: &Req) -> String {
    let port = header(req, "host")
        .and_then(|h| h.rsplit_once(':'))
        .map(|(_, p)| p.to_string());
    match port {
        Some(p) => format!("{}:{p}", mgr.config.origin_base),
        None => mgr.config.origin_base.clone(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<u64>,
    metadata: Option<BTreeMap<String, String>>,
    env_vars: Option<BTreeMap<String, String>>,
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    auto_pause: Option<bool>,
    network: Option<serde_json::Value>,
}

struct Ctx<'a> {
    mgr: &'a Arc<Manager>,
    domain: String,
    token: Option<String>,
}

impl Ctx<'_> {
    fn access_token(&self, id: &str) -> serde_json::Value {
        match &self.token {
            Some(t) => envd_token(t, id).into(),
            None => serde_json::Value::Null,
        }
    }

    fn traffic(&self, id: &str) -> serde_json::Value {
        match &self.token {
            Some(t) => traffic_token(t, id).into(),
            None => serde_json::Value::Null,
        }
    }

    /// E2B's `Sandbox`.
    fn sandbox(&self, r: &SandboxRecord) -> serde_json::Value {
        json!({
            "templateID": r.image,
            "sandboxID": r.id,
            "clientID": "agentd",
            "envdVersion": super::envd::ENVD_VERSION,
            "envdAccessToken": self.access_token(&r.id),
            "trafficAccessToken": self.traffic(&r.id),
            "domain": self.domain,
        })
    }

    fn state(r: &SandboxRecord) -> &'static str {
        if r.paused_at.is_some() {
            "paused"
        } else {
            "running"
        }
    }

    /// The labels E2B shows as metadata (not agentd's own).
    fn metadata(r: &SandboxRecord) -> BTreeMap<String, String> {
        r.labels
            .iter()
            .filter(|(k, _)| !k.starts_with("agentd."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn listed(&self, r: &SandboxRecord) -> serde_json::Value {
        // Whole cpus, at least 1: the value is clamped to 1..=1024 before the cast.
        #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
        let cpus = r.cpus.map_or(1, |c| c.ceil().clamp(1.0, 1024.0) as u32);
        let started = r.created_at / 1000;
        let end = started + r.ttl_secs.unwrap_or(0);
        json!({
            "templateID": r.image,
            "sandboxID": r.id,
            "clientID": "agentd",
            "startedAt": agentd_images::commit::rfc3339(started),
            "endAt": agentd_images::commit::rfc3339(end),
            "cpuCount": cpus,
            "memoryMB": r.memory_bytes >> 20,
            "diskSizeMB": r.disk_bytes.unwrap_or(0) >> 20,
            "state": Self::state(r),
            "envdVersion": super::envd::ENVD_VERSION,
            "metadata": Self::metadata(r),
        })
    }

    /// E2B's `SandboxDetail`.
    fn detail(&self, r: &SandboxRecord) -> serde_json::Value {
        let mut v = self.listed(r);
        v["envdAccessToken"] = self.access_token(&r.id);
        v["domain"] = self.domain.clone().into();
        v
    }

    async fn create(&self, req: Req) -> Reply {
        let body = match super::read_body(req, super::MAX_JSON_BODY).await {
            Ok(b) => b,
            Err(e) => return api_error(e),
        };
        let n: NewSandbox = match serde_json::from_slice(&body) {
            Ok(n) => n,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
        };
        if n.auto_pause == Some(true) {
            return error(
                StatusCode::BAD_REQUEST,
                "autoPause is not supported by agentd (a sandbox's timeout deletes it)",
            );
        }
        // Rules agentd would not enforce are refused, not dropped: a sandbox with fewer
        // restrictions than asked for is worse than none.
        let rules = ["allowOut", "denyOut", "rules", "egressProxy", "dnsServers"];
        if let Some(net) = n.network.as_ref().and_then(|v| v.as_object()) {
            if let Some(k) = rules.iter().find(|k| {
                net.get(**k)
                    .is_some_and(|v| !v.is_null() && v != &json!([]) && v != &json!({}))
            }) {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("network.{k} is not supported by agentd's E2B API: use allow_internet_access (true: agentd's open mode; false: none), or agentd's own API for an allowlist"),
                );
            }
        }
        let image = match n.template_id.as_str() {
            "" => return error(StatusCode::BAD_REQUEST, "templateID is required"),
            "base" => crate::sandbox::DEFAULT_IMAGE.to_string(),
            t => t.to_string(),
        };
        let timeout = match checked_timeout(n.timeout) {
            Ok(t) => t.unwrap_or(DEFAULT_TIMEOUT),
            Err(r) => return *r,
        };
        let mode = if n.allow_internet_access == Some(true) {
            crate::egress::EgressMode::Open
        } else {
            crate::egress::EgressMode::None
        };
        let request = CreateSandbox {
            image: Some(image),
            env: n.env_vars.unwrap_or_default(),
            labels: n.metadata.unwrap_or_default(),
            ttl_secs: Some(timeout),
            opencode: Some(false),
            network: Some(NetworkRequest::Mode(mode)),
            ..CreateSandbox::default()
        };
        let rec = match self.mgr.create(request).await {
            Ok(r) => r,
            Err(e) => return api_error(e.into()),
        };
        let sb: Arc<Sandbox> = match self.mgr.get(&rec.id) {
            Ok(sb) => sb,
            Err(e) => return api_error(e.into()),
        };
        match tokio::time::timeout(READY_WAIT, sb.wait_ready()).await {
            Ok(Ok(())) => reply(StatusCode::CREATED, &self.sandbox(&sb.snapshot())),
            Ok(Err(why)) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("sandbox {} did not start: {why}", rec.id),
            ),
            Err(_) => error(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "sandbox {} was not ready within {} s",
                    rec.id,
                    READY_WAIT.as_secs()
                ),
            ),
        }
    }

    fn list(&self, req: &Req, running_only: bool) -> Reply {
        let q: BTreeMap<String, String> =
            url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        // `metadata` is itself a query string: `k1=v1&k2=v2`.
        let wanted: Vec<(String, String)> = q
            .get("metadata")
            .map(|m| {
                url::form_urlencoded::parse(m.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        let states: Vec<&str> = match q.get("state") {
            Some(s) => s.split(',').collect(),
            None if running_only => vec!["running"],
            None => vec!["running", "paused"],
        };
        let limit = q
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(100)
            .clamp(1, 1000);
        let skip = q
            .get("nextToken")
            .and_then(|t| t.parse::<usize>().ok())
            .unwrap_or(0);
        let mut all: Vec<SandboxRecord> = self
            .mgr
            .list()
            .iter()
            .map(|s| s.snapshot())
            // Not a warm pool's (nobody's until claimed), nor one still being made.
            .filter(|r| r.pool.is_none())
            .filter(|r| r.state.is_live() && r.state != SandboxState::Creating)
            .filter(|r| states.contains(&Self::state(r)))
            .filter(|r| wanted.iter().all(|(k, v)| r.labels.get(k) == Some(v)))
            .filter(|r| q.get("template").is_none_or(|t| &r.image == t))
            .collect();
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        let page: Vec<serde_json::Value> = all
            .iter()
            .skip(skip)
            .take(limit)
            .map(|r| self.listed(r))
            .collect();
        let mut resp = reply(StatusCode::OK, &serde_json::Value::Array(page));
        if skip + limit < all.len() {
            if let Ok(v) = hyper::header::HeaderValue::from_str(&(skip + limit).to_string()) {
                resp.headers_mut().insert("x-next-token", v);
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_envd_tokens_differ_by_sandbox_and_token() {
        let a = envd_token("t1", "s1");
        assert_eq!(a.len(), 64);
        assert_eq!(a, envd_token("t1", "s1"));
        assert_ne!(a, envd_token("t1", "s2"));
        assert_ne!(a, envd_token("t2", "s1"));
        assert_ne!(a, traffic_token("t1", "s1"));
        assert!(is_e2b("/e2b/sandboxes") && is_e2b("/e2b") && !is_e2b("/e2bx"));
    }
}
