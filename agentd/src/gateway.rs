//! The LLM gateway: the provider endpoint on the bridge address that sandboxes' OpenCode
//! servers use. Each upstream of agentd's ([`upstream`]) is served at `/{name}/v1/...` (the
//! first also at `/v1/...`) in its own protocol: OpenAI chat completions, OpenAI Responses or
//! Anthropic Messages, streamed or not. The gateway forwards a request with the upstream's key
//! in the header that upstream expects (the key never enters a sandbox), retries 429 and 5xx
//! within a bound, refuses what a sandbox's budget or the model allowlist does not allow (in
//! the provider's own error shape, which the agent's SDK shows), and counts input and output
//! tokens per sandbox from each protocol's usage fields.
//!
//! A request is accepted only with the per-sandbox gateway token (a bearer token, or
//! Anthropic's `x-api-key`) *and* from that sandbox's address (a sandbox cannot spend another's
//! budget by stealing its token). For streamed chat completions the gateway asks the upstream
//! for usage in the last chunk (`stream_options.include_usage`); every stream's usage is read
//! from its events as they pass.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub mod audit;
pub mod spend;
pub mod upstream;

use upstream::{Api, Kind, LlmUpstream};

use crate::api::conn;
use crate::api::error::ApiError;
use crate::api::{json, Body, BoxError};
use crate::net::PeerSlot;
use crate::sandbox::{Manager, Sandbox};

/// Largest request body (prompts with long histories: a 200k-token conversation with tool
/// definitions is a few MiB).
pub const MAX_REQUEST: usize = 16 << 20;
/// Most chat requests one sandbox has in flight at once (OpenCode sends one or two): bodies
/// are held in agentd's memory, outside any sandbox's cgroup, while they are forwarded.
pub const MAX_REQUESTS_PER_SANDBOX: usize = 4;

/// Serves the gateway on `listener` until the process ends.
pub async fn serve(mgr: Arc<Manager>, listener: TcpListener) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .build()
        .expect("an HTTP client without custom settings builds");
    let limit = conn::Listener::new("gateway", conn::MAX_GATEWAY_CONNECTIONS);
    let per_sandbox: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let mut backoff = conn::Backoff::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                limit.accept_failed(&e, &mut backoff).await;
                continue;
            }
        };
        backoff = conn::Backoff::default();
        let Some(slot) = limit.admit() else {
            continue;
        };
        // One sandbox cannot take every slot: a few connections each are what OpenCode uses.
        let Some(mine) = PeerSlot::take(
            &per_sandbox,
            peer.ip(),
            conn::MAX_GATEWAY_CONNECTIONS_PER_SANDBOX,
        ) else {
            tracing::debug!(%peer, "gateway: too many connections from one sandbox");
            continue;
        };
        let mgr = mgr.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let _slots = (slot, mine);
            let service = hyper::service::service_fn(move |req| {
                let mgr = mgr.clone();
                let client = client.clone();
                async move {
                    let (upstream, api) = route(&mgr.config.llm, req.uri().path());
                    let shape = upstream.as_ref().map_or(Kind::OpenaiCompatible, |u| u.kind);
                    let r = handle(&mgr, &client, peer, req, upstream, api).await;
                    Ok::<_, std::convert::Infallible>(r.unwrap_or_else(|e| {
                        error_response(shape, e.status(), e.code(), &e.to_string())
                    }))
                }
            });
            let _ = conn::http1()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// What a path asks for: `/{upstream}/v1/REST` or `/v1/REST` (the first upstream), and REST
/// as an API (`None`: `/models` or nothing the gateway serves).
fn route(upstreams: &[LlmUpstream], path: &str) -> (Option<LlmUpstream>, Option<Api>) {
    let path = path.trim_end_matches('/');
    let (first, tail) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path.trim_start_matches('/'), ""));
    // `/v1/REST`, or `/NAME/v1/REST`: whole segments (an upstream may be named `v1x`).
    let (upstream, rest) = if first == "v1" {
        (upstreams.first(), format!("/{tail}"))
    } else {
        let u = upstreams.iter().find(|u| u.name == first);
        match tail.split_once('/') {
            Some(("v1", rest)) if u.is_some() => (u, format!("/{rest}")),
            _ if u.is_some() && tail == "v1" => (u, String::new()),
            _ => (None, String::new()),
        }
    };
    (upstream.cloned(), Api::from_path(&rest))
}

async fn handle(
    mgr: &Arc<Manager>,
    client: &reqwest::Client,
    peer: SocketAddr,
    req: Request<Incoming>,
    upstream: Option<LlmUpstream>,
    api: Option<Api>,
) -> Result<Response<Body>, ApiError> {
    let IpAddr::V4(from) = peer.ip() else {
        return Err(ApiError::Unauthorized("IPv4 sandboxes only".into()));
    };
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &hyper::header::HeaderValue| v.to_str().ok())
    };
    let token = header(hyper::header::AUTHORIZATION.as_str())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| header("x-api-key"))
        .unwrap_or("")
        .to_string();
    let sb = mgr
        .by_gateway_token(&token, from)
        .ok_or_else(|| ApiError::Unauthorized("unknown gateway token for this address".into()))?;
    sb.touch();
    let path = req.uri().path().trim_end_matches('/').to_string();
    let serves = "POST /{upstream}/v1/chat/completions, /responses or /messages (as the upstream's kind speaks) and GET /{upstream}/v1/models";
    let Some(upstream) = upstream else {
        return Err(ApiError::NotFound(format!(
            "the gateway serves {serves}; {path} names no upstream of agentd's ({})",
            mgr.config
                .llm
                .iter()
                .map(|u| u.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    match (req.method(), api) {
        (&Method::GET, None) if path.ends_with("/v1/models") => {
            Ok(models_list(mgr, &upstream, &sb))
        }
        (&Method::POST, Some(api)) if upstream.kind.serves(api) => {
            forward(mgr, client, sb, req, upstream, api).await
        }
        _ => Err(ApiError::NotFound(format!(
            "the gateway serves {serves}, not {} {path} (upstream {:?} is {})",
            req.method(),
            upstream.name,
            upstream.kind.as_str()
        ))),
    }
}

/// `GET /v1/models`: the models a sandbox may ask this upstream for (its allowlist, or the
/// sandbox's own model), in a list both OpenAI's and Anthropic's clients read.
fn models_list(mgr: &Manager, upstream: &LlmUpstream, sb: &Sandbox) -> Response<Body> {
    let rec = sb.snapshot();
    let mine = rec.model.as_deref().unwrap_or(&mgr.config.llm_model);
    let ids = upstream::models_for(&mgr.config.llm, upstream, mine);
    let data: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "type": "model", "display_name": id, "owned_by": "agentd"}))
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({"object": "list", "data": data, "has_more": false}),
    )
}

async fn forward(
    mgr: &Arc<Manager>,
    client: &reqwest::Client,
    sb: Arc<Sandbox>,
    req: Request<Incoming>,
    upstream: LlmUpstream,
    api: Api,
) -> Result<Response<Body>, ApiError> {
    let shape = upstream.kind;
    // Anthropic's SDK says which API version it speaks (and which betas it uses): the
    // upstream must hear the same.
    let anthropic_headers: Vec<(&'static str, String)> = ["anthropic-version", "anthropic-beta"]
        .into_iter()
        .filter_map(|h| {
            let v = req.headers().get(h)?.to_str().ok()?;
            (v.len() <= 1024).then(|| (h, v.to_string()))
        })
        .collect();
    let Some(_in_flight) = InFlight::take(&sb) else {
        return Err(ApiError::Quota(format!(
            "this sandbox already has {MAX_REQUESTS_PER_SANDBOX} requests in flight to the LLM gateway"
        )));
    };
    let bytes = crate::api::read_body(req, MAX_REQUEST).await?;
    let rec = sb.snapshot();
    // A claimed pooled sandbox's model replaces what its OpenCode (started for the pool's
    // default model, on the same upstream) asks for.
    let set_model = rec
        .model
        .as_deref()
        .and_then(|m| upstream::resolve(&mgr.config.llm, m))
        .map(|(_, m)| m);
    let (forward, streaming, model) = with_usage_requested(&bytes, set_model, api)?;
    // The model is the sandbox's to write (up to the body's size): checked and priced whole,
    // but kept in the audit log, 1,000 entries a sandbox, as its first 200 characters.
    let label: String = model.chars().take(200).collect();
    let prompt = if mgr.config.llm_log_prompts {
        audit::last_message(&bytes)
    } else {
        None
    };
    drop(bytes);
    if rec.pool.is_some() {
        // A warm pool's sandbox warming its OpenCode up (nobody's prompt): answered here,
        // no upstream, no tokens.
        return Ok(warm_up_answer(api, streaming));
    }
    let price = mgr
        .config
        .llm_prices
        .get(&(upstream.name.clone(), model.clone()))
        .copied();
    // A task attempt's sandbox also spends from the task's total budget.
    let task = rec
        .labels
        .get(crate::task::TASK_LABEL)
        .and_then(|t| mgr.tasks.get()?.spend(t, &rec.id));
    if let Some((status, code, message)) = refusal(mgr, &rec, task, &upstream, &model, price) {
        let mut entry = audit::Entry::refused(&label, code, status.as_u16());
        entry.prompt = prompt;
        audit::record(&sb, entry);
        return Ok(error_response(shape, status, code, &message));
    }
    let started = std::time::Instant::now();
    let forward = Bytes::from(forward);
    let mut retries = 0u32;
    let resp = loop {
        let request = client
            .post(format!("{}{}", upstream.base_url, api.path()))
            .header("content-type", "application/json")
            .body(forward.clone());
        let sent = authorized(request, &upstream, &anthropic_headers)
            .send()
            .await;
        let wait = match &sent {
            Ok(r) if retries < MAX_RETRIES && retryable(r.status().as_u16()) => {
                Some(retry_after(r.headers()).unwrap_or_else(|| backoff(retries)))
            }
            _ => None,
        };
        match (sent, wait) {
            (Ok(_), Some(wait)) => {
                retries += 1;
                tracing::debug!(sandbox = %rec.id, retries, wait_ms = wait.as_millis() as u64, "the LLM upstream asked to retry");
                tokio::time::sleep(wait).await;
            }
            (Ok(r), None) => break r,
            (Err(e), _) => {
                let mut entry = audit::Entry::refused(&label, "upstream_unreachable", 502);
                entry.prompt = prompt;
                entry.latency_ms = started.elapsed().as_millis() as u64;
                entry.retries = retries;
                audit::record(&sb, entry);
                return Err(ApiError::BadGateway(format!(
                    "the LLM upstream failed: {e}"
                )));
            }
        }
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut entry = audit::Entry {
        at_ms: crate::sandbox::now_ms(),
        model: label,
        status: status.as_u16(),
        streaming,
        prompt_tokens: 0,
        completion_tokens: 0,
        latency_ms: 0,
        retries,
        error: None,
        prompt,
    };
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    if !streaming || !status.is_success() {
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ApiError::BadGateway(format!("the LLM upstream failed: {e}")))?;
        if status.is_success() {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                let mut usage = (0, 0);
                observe_usage(api, &v, &mut usage);
                let (p, c) = usage;
                record(mgr, &sb, &upstream, &entry.model, price, p, c);
                (entry.prompt_tokens, entry.completion_tokens) = (p, c);
            }
        }
        entry.latency_ms = started.elapsed().as_millis() as u64;
        audit::record(&sb, entry);
        return Ok(Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(crate::api::full(bytes))
            .expect("valid response"));
    }
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(64);
    let mgr = mgr.clone();
    tokio::spawn(async move {
        // Counted until the stream ends.
        let _in_flight = _in_flight;
        // The bytes go to the sandbox as they come; a copy of each chunk goes to the event
        // parser, which keeps the last usage it sees. A stream the parser gives up on is
        // still forwarded whole.
        let (parse_tx, mut parse_rx) = mpsc::channel::<Result<Bytes, String>>(16);
        let forward = async move {
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(Box::new(e))).await;
                        break;
                    }
                };
                let _ = parse_tx.send(Ok(chunk.clone())).await;
                if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                    break;
                }
            }
        };
        let parse = async move {
            let mut events = crate::http::sse_events(
                futures_util::stream::poll_fn(move |cx| parse_rx.poll_recv(cx)),
                crate::http::MAX_SSE_EVENT,
            );
            let mut usage = (0, 0);
            while let Some(Ok(event)) = events.next().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&event.data) {
                    observe_usage(api, &v, &mut usage);
                }
            }
            usage
        };
        let ((), (prompt, completion)) = tokio::join!(forward, parse);
        record(
            &mgr,
            &sb,
            &upstream,
            &entry.model,
            price,
            prompt,
            completion,
        );
        (entry.prompt_tokens, entry.completion_tokens) = (prompt, completion);
        entry.latency_ms = started.elapsed().as_millis() as u64;
        audit::record(&sb, entry);
    });
    Ok(Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-cache")
        .body(crate::api::channel_body(rx))
        .expect("valid response"))
}

/// The answer to a pooled sandbox's warm-up prompt: one short text, streamed if asked, in
/// the shapes of `api`.
fn warm_up_answer(api: Api, streaming: bool) -> Response<Body> {
    let (content_type, body) = match (api, streaming) {
        (_, true) => (
            "text/event-stream",
            sse(&warm_up_events(api))
        ),
        (Api::Chat, false) => (
            "application/json",
            serde_json::json!({
                "id": "agentd-warm-up", "object": "chat.completion", "created": 0,
                "model": "agentd-warm-up",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            })
            .to_string(),
        ),
        (Api::Responses, false) => ("application/json", responses_done("ok").to_string()),
        (Api::Messages, false) => (
            "application/json",
            serde_json::json!({
                "id": "msg_agentd_warm_up", "type": "message", "role": "assistant",
                "model": "agentd-warm-up", "content": [{"type": "text", "text": "ok"}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            })
            .to_string(),
        ),
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", content_type)
        .body(crate::api::full(body))
        .expect("valid response")
}

/// A finished Responses API response with one text.
fn responses_done(text: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "resp_agentd_warm_up", "object": "response", "created_at": 0,
        "status": "completed", "model": "agentd-warm-up",
        "output": [{"type": "message", "id": "msg_agentd_warm_up", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
    })
}

/// The streamed warm-up answer's events (name, data) in `api`'s protocol.
fn warm_up_events(api: Api) -> Vec<(Option<&'static str>, serde_json::Value)> {
    match api {
        Api::Chat => {
            let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
                serde_json::json!({
                    "id": "agentd-warm-up", "object": "chat.completion.chunk", "created": 0,
                    "model": "agentd-warm-up",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                })
            };
            let mut last = chunk(serde_json::json!({}), serde_json::json!("stop"));
            last["usage"] =
                serde_json::json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0});
            vec![
                (
                    None,
                    chunk(
                        serde_json::json!({"role": "assistant", "content": "ok"}),
                        serde_json::Value::Null,
                    ),
                ),
                (None, last),
            ]
        }
        Api::Responses => {
            let done = responses_done("ok");
            let mut created = done.clone();
            created["status"] = "in_progress".into();
            created["output"] = serde_json::json!([]);
            let item = done["output"][0].clone();
            vec![
                (
                    Some("response.created"),
                    serde_json::json!({"type": "response.created", "response": created}),
                ),
                (
                    Some("response.output_item.added"),
                    serde_json::json!({"type": "response.output_item.added", "output_index": 0,
                    "item": {"type": "message", "id": "msg_agentd_warm_up", "role": "assistant", "status": "in_progress", "content": []}}),
                ),
                (
                    Some("response.output_text.delta"),
                    serde_json::json!({"type": "response.output_text.delta", "item_id": "msg_agentd_warm_up",
                    "output_index": 0, "content_index": 0, "delta": "ok"}),
                ),
                (
                    Some("response.output_item.done"),
                    serde_json::json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
                ),
                (
                    Some("response.completed"),
                    serde_json::json!({"type": "response.completed", "response": done}),
                ),
            ]
        }
        Api::Messages => vec![
            (
                Some("message_start"),
                serde_json::json!({"type": "message_start", "message": {
                "id": "msg_agentd_warm_up", "type": "message", "role": "assistant", "model": "agentd-warm-up",
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}),
            ),
            (
                Some("content_block_start"),
                serde_json::json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ),
            (
                Some("content_block_delta"),
                serde_json::json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "ok"}}),
            ),
            (
                Some("content_block_stop"),
                serde_json::json!({"type": "content_block_stop", "index": 0}),
            ),
            (
                Some("message_delta"),
                serde_json::json!({"type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 0}}),
            ),
            (
                Some("message_stop"),
                serde_json::json!({"type": "message_stop"}),
            ),
        ],
    }
}

/// Server-sent events: `event:` when named, `data:` with the JSON; chat completions end with
/// `[DONE]`.
fn sse(events: &[(Option<&str>, serde_json::Value)]) -> String {
    let mut out = String::new();
    for (name, data) in events {
        if let Some(n) = name {
            out.push_str(&format!("event: {n}\n"));
        }
        out.push_str(&format!("data: {data}\n\n"));
    }
    if events.iter().all(|(n, _)| n.is_none()) {
        out.push_str("data: [DONE]\n\n");
    }
    out
}

/// The model ids the upstream's `GET <base>/models` lists; `None` when it does not answer
/// that with OpenAI's list shape within a few seconds (then nothing is refused for it).
pub async fn upstream_models(upstream: &crate::daemon::config::LlmUpstream) -> Option<Vec<String>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .ok()?;
    let request = client.get(format!("{}/models", upstream.base_url));
    let resp = authorized(request, upstream, &[]).send().await.ok()?;
    if !resp.status().is_success() {
        tracing::debug!(
            status = resp.status().as_u16(),
            "the LLM upstream lists no models"
        );
        return None;
    }
    // A model list is small; a huge answer is not one.
    let bytes = resp.bytes().await.ok().filter(|b| b.len() < 4 << 20)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let list = v["data"]
        .as_array()?
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect();
    Some(list)
}

/// `request` with `upstream`'s key in the header its kind expects (a bearer token, or
/// Anthropic's `x-api-key`), and for Anthropic the headers the client sent of `anthropic`
/// (`anthropic-version`, `anthropic-beta`), with agentd's API version when it sent none.
fn authorized(
    mut request: reqwest::RequestBuilder,
    upstream: &LlmUpstream,
    anthropic: &[(&'static str, String)],
) -> reqwest::RequestBuilder {
    match (upstream.kind, &upstream.api_key) {
        (Kind::Anthropic, key) => {
            if let Some(key) = key {
                request = request.header("x-api-key", key);
            }
            if !anthropic.iter().any(|(h, _)| *h == "anthropic-version") {
                request = request.header("anthropic-version", upstream::ANTHROPIC_VERSION);
            }
            for (h, v) in anthropic {
                request = request.header(*h, v);
            }
            request
        }
        (_, Some(key)) => request.bearer_auth(key),
        (_, None) => request,
    }
}

/// The request body to forward, whether it asks for a stream, and the model it goes to (for
/// the allowlist, the audit log and the metrics). Only the top level is parsed (each value
/// stays the raw text it was, no tree of the body is built); a streamed chat-completions
/// request gets `stream_options.include_usage`, so that the last chunk carries the token
/// counts (the other APIs always report usage), and `model`, when given, replaces the
/// request's (the sandbox's model is agentd's to say).
fn with_usage_requested(
    body: &[u8],
    model: Option<&str>,
    api: Api,
) -> Result<(Vec<u8>, bool, String), ApiError> {
    use serde_json::value::RawValue;
    let fields: std::collections::BTreeMap<String, &RawValue> = serde_json::from_slice(body)
        .map_err(|e| {
            ApiError::BadRequest(format!("invalid JSON: a chat request is an object: {e}"))
        })?;
    let streaming = fields
        .get("stream")
        .is_some_and(|v| v.get().trim() == "true");
    let sent_to = match model {
        Some(m) => m.to_string(),
        None => fields
            .get("model")
            .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
            .unwrap_or_default(),
    };
    let ask_usage = streaming && api == Api::Chat;
    if !ask_usage && model.is_none() {
        return Ok((body.to_vec(), streaming, sent_to));
    }
    let mut options: serde_json::Map<String, serde_json::Value> = match fields.get("stream_options")
    {
        Some(raw) => serde_json::from_str(raw.get()).map_err(|e| {
            ApiError::BadRequest(format!(
                "invalid JSON: stream_options must be an object: {e}"
            ))
        })?,
        None => serde_json::Map::new(),
    };
    options.insert("include_usage".into(), serde_json::Value::Bool(true));
    let options = serde_json::to_string(&options).expect("a map serializes");
    let model = model.map(|m| serde_json::to_string(m).expect("a string serializes"));
    let mut out = Vec::with_capacity(body.len() + 64);
    out.push(b'{');
    let mut first = true;
    let mut put = |out: &mut Vec<u8>, k: &str, v: &str| {
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(
            serde_json::to_string(k)
                .expect("a key serializes")
                .as_bytes(),
        );
        out.push(b':');
        out.extend_from_slice(v.as_bytes());
    };
    for (k, v) in &fields {
        match (k.as_str(), &model) {
            ("stream_options", _) if ask_usage => {}
            ("model", Some(m)) => put(&mut out, k, m),
            _ => put(&mut out, k, v.get()),
        }
    }
    if ask_usage {
        put(&mut out, "stream_options", &options);
    }
    out.push(b'}');
    Ok((out, streaming, sent_to))
}

/// One chat request of a sandbox in flight (counted on the sandbox).
struct InFlight(Arc<Sandbox>);

impl InFlight {
    fn take(sb: &Arc<Sandbox>) -> Option<InFlight> {
        use std::sync::atomic::Ordering;
        let prev = sb.gateway_requests.fetch_add(1, Ordering::SeqCst);
        if prev >= MAX_REQUESTS_PER_SANDBOX {
            sb.gateway_requests.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(InFlight(sb.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .gateway_requests
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Most retries of one request the upstream answered 429 or 5xx.
const MAX_RETRIES: u32 = 3;
/// Longest wait a `Retry-After` may ask for (a longer one is cut to this).
const MAX_RETRY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Statuses worth another try: the upstream is busy or failed on its side.
fn retryable(status: u16) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504)
}

/// The wait a `Retry-After` (seconds, or an HTTP date) asks for, at most [`MAX_RETRY_WAIT`].
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<std::time::Duration> {
    let v = headers.get("retry-after")?.to_str().ok()?.trim();
    let wait = match v.parse::<u64>() {
        Ok(secs) => std::time::Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    };
    Some(wait.min(MAX_RETRY_WAIT))
}

/// 0.5 s, 1 s, 2 s, ... without a `Retry-After`.
fn backoff(retries: u32) -> std::time::Duration {
    std::time::Duration::from_millis(500u64 << retries.min(5)).min(MAX_RETRY_WAIT)
}

/// An error in the shape of the upstream's protocol (OpenAI's or Anthropic's), which the
/// agent's SDK reads and shows.
fn error_response(shape: Kind, status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = match shape {
        Kind::Anthropic => {
            serde_json::json!({"type": "error", "error": {"type": code, "message": message}})
        }
        Kind::Openai | Kind::OpenaiCompatible => {
            serde_json::json!({"error": {"message": message, "type": code, "code": code, "param": null}})
        }
    };
    json(status, &body)
}

/// Why agentd refuses to forward a request for `model` on `upstream` (its status, code and
/// words), if it does: a model outside the upstream's allowlist, a sandbox's spent token or
/// cost budget, an unpriced model where a cost budget applies, the daemon's spent daily
/// budget. 402 for what is spent, not 429: clients retry a 429, and no retry finds budget.
fn refusal(
    mgr: &Manager,
    rec: &crate::sandbox::SandboxRecord,
    task: Option<crate::task::TaskSpend>,
    upstream: &LlmUpstream,
    model: &str,
    price: Option<spend::Price>,
) -> Option<(StatusCode, &'static str, String)> {
    let config = &mgr.config;
    let currency = &config.llm_currency;
    if !upstream.models.is_empty() && !upstream.models.iter().any(|m| m == model) {
        return Some((
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            format!(
                "model {model:?} is not allowed on upstream {:?} (allowed: {})",
                upstream.name,
                upstream.models.join(", ")
            ),
        ));
    }
    let spent = |what: String| Some((StatusCode::PAYMENT_REQUIRED, "budget_exhausted", what));
    if let Some(budget) = rec.budget_tokens {
        let used = rec.usage.tokens();
        if used >= budget {
            return spent(format!("this sandbox's token budget is spent: {used} of {budget} tokens used; ask its owner for a larger budget"));
        }
    }
    if let Some(budget) = rec.budget_cost {
        let used = rec.usage.cost;
        if used >= budget {
            return spent(format!("this sandbox's cost budget is spent: {used:.4} of {budget} {currency} used; ask its owner for a larger budget"));
        }
    }
    if let Some(words) = task.as_ref().and_then(|t| t.spent()) {
        let words = words.trim_start_matches("budget_exhausted: ");
        return spent(format!("{words}; ask the task's owner for a larger budget"));
    }
    let task_cost = task.as_ref().is_some_and(|t| t.total_cost.is_some());
    if price.is_none()
        && (rec.budget_cost.is_some() || task_cost || config.llm_daily_cost.is_some())
    {
        return Some((
            StatusCode::FORBIDDEN,
            "no_price",
            format!("model {model:?} of upstream {:?} has no price (llm_prices), so agentd cannot count what it costs against a cost budget; use a priced model or ask the admin to price this one", upstream.name),
        ));
    }
    let today = mgr.daily.today();
    if let Some(budget) = config.llm_daily_tokens {
        if today.tokens >= budget {
            return spent(format!("agentd's daily token budget is spent: {} of {budget} tokens used on {} (UTC); it starts again at midnight UTC", today.tokens, today.day));
        }
    }
    if let Some(budget) = config.llm_daily_cost {
        if today.cost >= budget {
            return spent(format!("agentd's daily cost budget is spent: {:.4} of {budget} {currency} used on {} (UTC); it starts again at midnight UTC", today.cost, today.day));
        }
    }
    None
}

/// Counts an answered request: the sandbox's usage (by model, with its cost), today's, and
/// the metrics.
/// `price` is the model's, looked up once per request by the caller.
fn record(
    mgr: &Manager,
    sb: &Sandbox,
    upstream: &LlmUpstream,
    model: &str,
    price: Option<spend::Price>,
    prompt: u64,
    completion: u64,
) {
    let cost = price.map_or(0.0, |p| p.cost(prompt, completion));
    let named = upstream::display_name(&mgr.config.llm, upstream, model);
    mgr.add_usage(sb, &named, prompt, completion, cost);
    mgr.metrics.count_tokens(&named, prompt, completion);
}

/// Updates `usage` (input, output tokens) from one answer or stream event of `api`:
/// - chat completions: `usage.prompt_tokens` / `completion_tokens` (the last chunk's);
/// - Responses: `usage.input_tokens` / `output_tokens`, in a stream on the finishing event's
///   `response` (`response.completed`, `.incomplete`, `.failed`);
/// - Messages: `input_tokens` plus the cache tokens (`cache_creation_input_tokens`,
///   `cache_read_input_tokens`: Anthropic counts them apart from `input_tokens`) and
///   `output_tokens`; in a stream `message_start` carries the input, each `message_delta` the
///   output so far (and the input again, in newer versions).
///
/// OpenAI's input counts already include its cached tokens.
fn observe_usage(api: Api, v: &serde_json::Value, usage: &mut (u64, u64)) {
    let n = |u: &serde_json::Value, k: &str| u[k].as_u64();
    match api {
        Api::Chat => {
            let u = &v["usage"];
            let (p, c) = (n(u, "prompt_tokens"), n(u, "completion_tokens"));
            if p.unwrap_or(0) + c.unwrap_or(0) > 0 {
                *usage = (p.unwrap_or(0), c.unwrap_or(0));
            }
        }
        Api::Responses => {
            let u = if v["response"].is_object() {
                &v["response"]["usage"]
            } else {
                &v["usage"]
            };
            let (p, c) = (n(u, "input_tokens"), n(u, "output_tokens"));
            if p.unwrap_or(0) + c.unwrap_or(0) > 0 {
                *usage = (p.unwrap_or(0), c.unwrap_or(0));
            }
        }
        Api::Messages => {
            let u = if v["type"] == "message_start" {
                &v["message"]["usage"]
            } else {
                &v["usage"]
            };
            let input = [
                "input_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
            ];
            if input.iter().any(|k| n(u, k).is_some()) {
                usage.0 = input.iter().filter_map(|k| n(u, k)).sum();
            }
            if let Some(c) = n(u, "output_tokens") {
                usage.1 = c;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_usage_requested_without_a_tree_of_the_body() {
        let (out, streaming, model) = with_usage_requested(
            br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            None,
            Api::Chat,
        )
        .unwrap();
        assert!(streaming);
        assert_eq!(model, "m");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["messages"][0]["content"], "hi");
        let (out, _, _) = with_usage_requested(
            br#"{"stream":true,"stream_options":{"x":1,"include_usage":false}}"#,
            None,
            Api::Chat,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"x": 1, "include_usage": true})
        );
        let body = br#"{"stream":false,"model":"m"}"#;
        assert_eq!(
            with_usage_requested(body, None, Api::Chat).unwrap(),
            (body.to_vec(), false, "m".to_string())
        );
        assert!(with_usage_requested(b"[1]", None, Api::Chat).is_err());
        assert!(
            with_usage_requested(br#"{"stream":true,"stream_options":3}"#, None, Api::Chat)
                .is_err()
        );
        // A claimed pooled sandbox's model replaces what its OpenCode asks for.
        let (out, streaming, model) = with_usage_requested(
            br#"{"model":"pool-m","messages":[]}"#,
            Some("mine"),
            Api::Chat,
        )
        .unwrap();
        assert!(!streaming);
        assert_eq!(model, "mine");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, serde_json::json!({"model": "mine", "messages": []}));
    }

    #[test]
    fn test_routes_name_whole_segments() {
        let up = |name: &str, kind| LlmUpstream {
            name: name.into(),
            kind,
            base_url: "http://x/v1".into(),
            api_key: None,
            models: vec![],
        };
        let ups = [
            up("agentd", Kind::OpenaiCompatible),
            up("v1x", Kind::Anthropic),
        ];
        let names = |path: &str| {
            let (u, api) = route(&ups, path);
            (u.map(|u| u.name), api)
        };
        assert_eq!(
            names("/v1/chat/completions"),
            (Some("agentd".into()), Some(Api::Chat))
        );
        assert_eq!(
            names("/v1x/v1/messages"),
            (Some("v1x".into()), Some(Api::Messages))
        );
        assert_eq!(
            names("/agentd/v1/responses/"),
            (Some("agentd".into()), Some(Api::Responses))
        );
        assert_eq!(names("/agentd/v1/models"), (Some("agentd".into()), None));
        assert_eq!(names("/v1x/v2/messages"), (None, None));
        assert_eq!(names("/nobody/v1/messages"), (None, None));
        assert_eq!(names("/v1abc"), (None, None));
        assert_eq!(names("/"), (None, None));
    }

    #[test]
    fn test_other_apis_are_forwarded_as_they_are() {
        // No stream_options for the Responses and Messages APIs (they report usage anyway,
        // and an unknown field is an error there).
        let body = br#"{"model":"m","stream":true,"input":[]}"#;
        for api in [Api::Responses, Api::Messages] {
            assert_eq!(
                with_usage_requested(body, None, api).unwrap(),
                (body.to_vec(), true, "m".to_string())
            );
        }
        let (out, _, model) = with_usage_requested(body, Some("mine"), Api::Messages).unwrap();
        assert_eq!(model, "mine");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"model": "mine", "stream": true, "input": []})
        );
    }

    #[test]
    fn test_usage_from_each_protocol() {
        let mut u = (0, 0);
        let chat = serde_json::json!({"usage": {"prompt_tokens": 12, "completion_tokens": 3}});
        observe_usage(Api::Chat, &chat, &mut u);
        observe_usage(Api::Chat, &serde_json::json!({"choices": []}), &mut u);
        assert_eq!(u, (12, 3));
        let mut u = (0, 0);
        for e in [
            serde_json::json!({"type": "response.created", "response": {"usage": null}}),
            serde_json::json!({"type": "response.output_text.delta", "delta": "x"}),
            serde_json::json!({"type": "response.completed", "response": {"usage": {"input_tokens": 30, "output_tokens": 5}}}),
        ] {
            observe_usage(Api::Responses, &e, &mut u);
        }
        assert_eq!(u, (30, 5));
        let mut u = (0, 0);
        observe_usage(
            Api::Responses,
            &serde_json::json!({"usage": {"input_tokens": 2, "output_tokens": 1}}),
            &mut u,
        );
        assert_eq!(u, (2, 1));
        let mut u = (0, 0);
        for e in [
            serde_json::json!({"type": "message_start", "message": {"usage": {"input_tokens": 20, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3, "output_tokens": 1}}}),
            serde_json::json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x"}}),
            serde_json::json!({"type": "message_delta", "usage": {"output_tokens": 6}}),
            serde_json::json!({"type": "message_stop"}),
        ] {
            observe_usage(Api::Messages, &e, &mut u);
        }
        assert_eq!(u, (25, 6));
        let mut u = (0, 0);
        observe_usage(
            Api::Messages,
            &serde_json::json!({"type": "message", "usage": {"input_tokens": 4, "output_tokens": 2}}),
            &mut u,
        );
        assert_eq!(u, (4, 2));
    }

    #[test]
    fn test_warm_up_answers_are_each_protocols() {
        let chat = sse(&warm_up_events(Api::Chat));
        assert!(chat.ends_with("data: [DONE]\n\n"), "{chat}");
        let messages = sse(&warm_up_events(Api::Messages));
        assert!(
            messages.starts_with("event: message_start\ndata: {"),
            "{messages}"
        );
        assert!(!messages.contains("[DONE]"));
        let responses = sse(&warm_up_events(Api::Responses));
        assert!(
            responses.contains("event: response.completed\n"),
            "{responses}"
        );
    }
}
