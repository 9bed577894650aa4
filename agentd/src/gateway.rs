//! The LLM gateway: an OpenAI-compatible endpoint on the bridge address that sandboxes'
//! OpenCode servers use as their provider. It forwards chat-completions requests (streaming
//! or not) to the upstream configured in agentd, with the upstream's API key, which therefore
//! never enters a sandbox, and counts prompt and completion tokens per sandbox.
//!
//! A request is accepted only with the per-sandbox gateway token *and* from that sandbox's
//! address (a sandbox cannot spend another's budget by stealing its token). For streamed
//! requests the gateway asks the upstream for usage in the last chunk
//! (`stream_options.include_usage`) and reads it from the `data:` lines as they pass.

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
                    let r = handle(&mgr, &client, peer, req).await;
                    Ok::<_, std::convert::Infallible>(r.unwrap_or_else(|e| {
                        // OpenAI's error shape, which OpenCode's provider understands.
                        json(
                            e.status(),
                            &serde_json::json!({"error": {"message": e.to_string(), "type": e.code()}}),
                        )
                    }))
                }
            });
            let _ = conn::http1()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    mgr: &Arc<Manager>,
    client: &reqwest::Client,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let IpAddr::V4(from) = peer.ip() else {
        return Err(ApiError::Unauthorized("IPv4 sandboxes only".into()));
    };
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let sb = mgr
        .by_gateway_token(&token, from)
        .ok_or_else(|| ApiError::Unauthorized("unknown gateway token for this address".into()))?;
    sb.touch();
    let path = req.uri().path().trim_end_matches('/').to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/models") => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"object": "list", "data": [{"id": mgr.config.llm_model, "object": "model", "owned_by": "agentd"}]}),
        )),
        (&Method::POST, "/v1/chat/completions") => chat(mgr, client, sb, req).await,
        _ => Err(ApiError::NotFound(format!(
            "the gateway serves POST /v1/chat/completions and GET /v1/models, not {} {path}",
            req.method()
        ))),
    }
}

async fn chat(
    mgr: &Arc<Manager>,
    client: &reqwest::Client,
    sb: Arc<Sandbox>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let Some(upstream) = mgr.config.llm.clone() else {
        return Err(ApiError::Unavailable(
            "agentd has no LLM upstream configured: set llm_base_url (and llm_api_key_file)".into(),
        ));
    };
    let Some(_in_flight) = InFlight::take(&sb) else {
        return Err(ApiError::Quota(format!(
            "this sandbox already has {MAX_REQUESTS_PER_SANDBOX} requests in flight to the LLM gateway"
        )));
    };
    let bytes = crate::api::read_body(req, MAX_REQUEST).await?;
    let rec = sb.snapshot();
    let (forward, streaming, model) = with_usage_requested(&bytes, rec.model.as_deref())?;
    drop(bytes);
    if rec.pool.is_some() {
        // A warm pool's sandbox warming its OpenCode up (nobody's prompt): answered here,
        // no upstream, no tokens.
        return Ok(warm_up_answer(streaming));
    }
    if let Some(budget) = rec.budget_tokens {
        let used = rec.usage.prompt_tokens + rec.usage.completion_tokens;
        if used >= budget {
            audit::record(&sb, audit::Entry::refused(&model, "budget_exhausted"));
            // 402, not 429: clients retry a 429, and no retry will find budget.
            return Ok(openai_error(
                StatusCode::PAYMENT_REQUIRED,
                "budget_exhausted",
                &format!("this sandbox's token budget is spent: {used} of {budget} tokens used; ask its owner for a larger budget"),
            ));
        }
    }
    let started = std::time::Instant::now();
    let forward = Bytes::from(forward);
    let mut retries = 0u32;
    let resp = loop {
        let mut request = client
            .post(format!("{}/chat/completions", upstream.base_url))
            .header("content-type", "application/json")
            .body(forward.clone());
        if let Some(key) = &upstream.api_key {
            request = request.bearer_auth(key);
        }
        let sent = request.send().await;
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
                let mut entry = audit::Entry::refused(&model, "upstream_unreachable");
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
        model,
        status: status.as_u16(),
        streaming,
        prompt_tokens: 0,
        completion_tokens: 0,
        latency_ms: 0,
        retries,
        error: None,
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
                let (p, c) = usage_of(&v);
                record(mgr, &sb, &entry.model, p, c);
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
                    let (p, c) = usage_of(&v);
                    if p + c > 0 {
                        usage = (p, c);
                    }
                }
            }
            usage
        };
        let ((), (prompt, completion)) = tokio::join!(forward, parse);
        record(&mgr, &sb, &entry.model, prompt, completion);
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
/// OpenAI's chat-completions shapes.
fn warm_up_answer(streaming: bool) -> Response<Body> {
    let usage = serde_json::json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0});
    let (content_type, body) = if streaming {
        let chunk = |delta: serde_json::Value,
                     finish: serde_json::Value,
                     usage: Option<&serde_json::Value>| {
            let mut v = serde_json::json!({
                "id": "agentd-warm-up", "object": "chat.completion.chunk", "created": 0,
                "model": "agentd-warm-up",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            });
            if let Some(u) = usage {
                v["usage"] = u.clone();
            }
            format!("data: {v}\n\n")
        };
        let body = format!(
            "{}{}data: [DONE]\n\n",
            chunk(
                serde_json::json!({"role": "assistant", "content": "ok"}),
                serde_json::Value::Null,
                None
            ),
            chunk(
                serde_json::json!({}),
                serde_json::json!("stop"),
                Some(&usage)
            ),
        );
        ("text/event-stream", body)
    } else {
        let v = serde_json::json!({
            "id": "agentd-warm-up", "object": "chat.completion", "created": 0,
            "model": "agentd-warm-up",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": usage,
        });
        ("application/json", v.to_string())
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", content_type)
        .body(crate::api::full(body))
        .expect("valid response")
}

/// The model ids the upstream's `GET <base>/models` lists; `None` when it does not answer
/// that with OpenAI's list shape within a few seconds (then nothing is refused for it).
pub async fn upstream_models(upstream: &crate::daemon::config::LlmUpstream) -> Option<Vec<String>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .ok()?;
    let mut request = client.get(format!("{}/models", upstream.base_url));
    if let Some(key) = &upstream.api_key {
        request = request.bearer_auth(key);
    }
    let resp = request.send().await.ok()?;
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

/// The request body to forward, whether it asks for a stream, and the model it goes to (for
/// the audit log and the metrics). Only the top level is parsed (each value stays the raw text
/// it was, no tree of the body is built); a streamed request gets
/// `stream_options.include_usage`, so that the last chunk carries the token counts, and
/// `model`, when given, replaces the request's (the sandbox's model is agentd's to say).
fn with_usage_requested(
    body: &[u8],
    model: Option<&str>,
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
    if !streaming && model.is_none() {
        return Ok((body.to_vec(), false, sent_to));
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
            ("stream_options", _) => {}
            ("model", Some(m)) => put(&mut out, k, m),
            _ => put(&mut out, k, v.get()),
        }
    }
    if streaming {
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

/// An error in OpenAI's shape, which the agent's SDK reads and shows.
fn openai_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(
        status,
        &serde_json::json!({"error": {"message": message, "type": code, "code": code, "param": null}}),
    )
}

fn record(mgr: &Manager, sb: &Sandbox, model: &str, prompt: u64, completion: u64) {
    mgr.add_usage(sb, prompt, completion);
    mgr.metrics.count_tokens(model, prompt, completion);
}

/// Prompt and completion tokens from an OpenAI `usage` object.
fn usage_of(v: &serde_json::Value) -> (u64, u64) {
    let u = &v["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap_or(0),
        u["completion_tokens"].as_u64().unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_usage_requested_without_a_tree_of_the_body() {
        let (out, streaming, model) = with_usage_requested(
            br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            None,
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
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"x": 1, "include_usage": true})
        );
        let body = br#"{"stream":false,"model":"m"}"#;
        assert_eq!(
            with_usage_requested(body, None).unwrap(),
            (body.to_vec(), false, "m".to_string())
        );
        assert!(with_usage_requested(b"[1]", None).is_err());
        assert!(with_usage_requested(br#"{"stream":true,"stream_options":3}"#, None).is_err());
        // A claimed pooled sandbox's model replaces what its OpenCode asks for.
        let (out, streaming, model) =
            with_usage_requested(br#"{"model":"pool-m","messages":[]}"#, Some("mine")).unwrap();
        assert!(!streaming);
        assert_eq!(model, "mine");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, serde_json::json!({"model": "mine", "messages": []}));
    }

    #[test]
    fn test_usage_of() {
        let v = serde_json::json!({"usage": {"prompt_tokens": 12, "completion_tokens": 3}});
        assert_eq!(usage_of(&v), (12, 3));
        assert_eq!(usage_of(&serde_json::json!({"choices": []})), (0, 0));
    }
}
