//! The LLM gateway: an OpenAI-compatible endpoint on the bridge address that sandboxes'
//! OpenCode servers use as their provider. It forwards chat-completions requests (streaming
//! or not) to the upstream configured in agentd, with the upstream's API key, which therefore
//! never enters a sandbox, and counts prompt and completion tokens per sandbox.
//!
//! A request is accepted only with the per-sandbox gateway token *and* from that sandbox's
//! address (a sandbox cannot spend another's budget by stealing its token). For streamed
//! requests the gateway asks the upstream for usage in the last chunk
//! (`stream_options.include_usage`) and reads it from the `data:` lines as they pass.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::api::error::ApiError;
use crate::api::{json, Body, BoxError};
use crate::sandbox::{Manager, Sandbox};

/// Largest request body (prompts with long histories).
pub const MAX_REQUEST: usize = 32 << 20;

/// Serves the gateway on `listener` until the process ends.
pub async fn serve(mgr: Arc<Manager>, listener: TcpListener) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .build()
        .expect("an HTTP client without custom settings builds");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "gateway accept failed");
                continue;
            }
        };
        let mgr = mgr.clone();
        let client = client.clone();
        tokio::spawn(async move {
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
            let _ = hyper::server::conn::http1::Builder::new()
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
    let bytes = crate::api::read_body(req, MAX_REQUEST).await?;
    let mut body: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))?;
    let streaming = body
        .get("stream")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    if streaming {
        if let Some(obj) = body.as_object_mut() {
            let opts = obj
                .entry("stream_options")
                .or_insert_with(|| serde_json::json!({}));
            if let Some(o) = opts.as_object_mut() {
                o.insert("include_usage".into(), serde_json::Value::Bool(true));
            }
        }
    }
    let mut request = client
        .post(format!("{}/chat/completions", upstream.base_url))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).expect("json"));
    if let Some(key) = &upstream.api_key {
        request = request.bearer_auth(key);
    }
    let resp = request
        .send()
        .await
        .map_err(|e| ApiError::BadGateway(format!("the LLM upstream failed: {e}")))?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
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
                record(mgr, &sb, p, c);
            }
        }
        return Ok(Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(crate::api::full(bytes))
            .expect("valid response"));
    }
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(64);
    let mgr = mgr.clone();
    tokio::spawn(async move {
        let mut stream = resp.bytes_stream();
        let mut pending = Vec::new();
        let (mut prompt, mut completion) = (0, 0);
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(Box::new(e))).await;
                    break;
                }
            };
            pending.extend_from_slice(&chunk);
            while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                if let Some(data) = line.strip_prefix(b"data:") {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data.trim_ascii()) {
                        let (p, c) = usage_of(&v);
                        if p + c > 0 {
                            (prompt, completion) = (p, c);
                        }
                    }
                }
            }
            if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                break;
            }
        }
        record(&mgr, &sb, prompt, completion);
    });
    Ok(Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-cache")
        .body(crate::api::channel_body(rx))
        .expect("valid response"))
}

/// The model ids the upstream's `GET <base>/models` lists; `None` when it does not answer
/// that with OpenAI's list shape within a few seconds (then nothing is refused for it).
pub async fn upstream_models(upstream: &crate::config::LlmUpstream) -> Option<Vec<String>> {
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

fn record(mgr: &Manager, sb: &Sandbox, prompt: u64, completion: u64) {
    mgr.add_usage(sb, prompt, completion);
    mgr.metrics.count_tokens(prompt, completion);
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
    fn test_usage_of() {
        let v = serde_json::json!({"usage": {"prompt_tokens": 12, "completion_tokens": 3}});
        assert_eq!(usage_of(&v), (12, 3));
        assert_eq!(usage_of(&serde_json::json!({"choices": []})), (0, 0));
    }
}
