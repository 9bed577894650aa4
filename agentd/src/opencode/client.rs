//! A typed client of the OpenCode server in a sandbox, for the calls agentd makes itself
//! (a task's agent): sessions, prompts, status, messages, aborts and the event stream. Every
//! request carries the server's Basic credentials and is scoped to one directory; every
//! answer is bounded (64 MiB, 30 s) and is data, never trusted beyond its fields.

use std::net::Ipv4Addr;
use std::time::Duration;

use http_body_util::BodyExt;

/// How long a request (other than the event stream) may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest JSON answer read.
const MAX_ANSWER: usize = 64 << 20;

/// The HTTP client agentd reaches sandboxes with.
pub type Http = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    crate::http::Body,
>;

/// One sandbox's OpenCode, as seen from agentd.
#[derive(Clone)]
pub struct Client {
    http: Http,
    /// `http://ADDRESS:PORT`.
    base: String,
    /// The `Authorization` header.
    auth: String,
    /// The directory requests are scoped to, percent-encoded.
    directory: String,
}

impl Client {
    /// The OpenCode listening at `address` with `password`, for `directory` (empty: the
    /// directory OpenCode runs in).
    pub fn new(http: &Http, address: Ipv4Addr, password: &str, directory: &str) -> Client {
        Client {
            http: http.clone(),
            base: format!("http://{address}:{}", super::PORT),
            auth: super::basic_auth(password),
            directory: url::form_urlencoded::byte_serialize(directory.as_bytes()).collect(),
        }
    }

    fn request(&self, method: hyper::Method, path: &str) -> hyper::http::request::Builder {
        let sep = if path.contains('?') { '&' } else { '?' };
        // No directory: OpenCode's own (its working directory).
        let uri = if self.directory.is_empty() {
            format!("{}{path}", self.base)
        } else {
            format!("{}{path}{sep}directory={}", self.base, self.directory)
        };
        hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::AUTHORIZATION, &self.auth)
    }

    /// A request with an optional JSON body; the JSON answer (`null` when empty or not JSON).
    async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let mut req = self.request(method, path);
        let payload = match body {
            Some(v) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                crate::http::full(serde_json::to_vec(&v).expect("json"))
            }
            None => crate::http::empty(),
        };
        let req = req.body(payload).map_err(|e| e.to_string())?;
        let (status, bytes) = tokio::time::timeout(TIMEOUT, async {
            let resp = self.http.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        })
        .await
        .map_err(|_| "no answer in time".to_string())??;
        if !status.is_success() {
            let text = crate::text::tail(&String::from_utf8_lossy(&bytes), 300);
            return Err(format!("HTTP {}: {text}", status.as_u16()));
        }
        Ok(serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    /// A new session titled `title`; its id.
    pub async fn create_session(&self, title: &str) -> Result<String, String> {
        let v = self
            .call(
                hyper::Method::POST,
                "/session",
                Some(serde_json::json!({ "title": title })),
            )
            .await?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "OpenCode made no session".to_string())
    }

    /// Sends `text` as the session's next prompt; returns once OpenCode took it.
    pub async fn prompt(&self, session: &str, text: &str) -> Result<(), String> {
        let body = serde_json::json!({"parts": [{"type": "text", "text": text}]});
        self.call(
            hyper::Method::POST,
            &format!("/session/{session}/prompt_async"),
            Some(body),
        )
        .await
        .map(drop)
    }

    /// Whether the session is idle (not busy or retrying); `false` when OpenCode does not
    /// answer.
    pub async fn is_idle(&self, session: &str) -> bool {
        match self.call(hyper::Method::GET, "/session/status", None).await {
            Ok(v) => !matches!(v[session]["type"].as_str(), Some("busy" | "retry")),
            Err(_) => false,
        }
    }

    /// The sessions (of this directory) that are busy or retrying.
    pub async fn busy_sessions(&self) -> Result<Vec<String>, String> {
        let v = self
            .call(hyper::Method::GET, "/session/status", None)
            .await?;
        let map = v
            .as_object()
            .ok_or("OpenCode's session status is not an object")?;
        Ok(map
            .iter()
            .filter(|(_, s)| matches!(s["type"].as_str(), Some("busy" | "retry")))
            .map(|(id, _)| id.clone())
            .collect())
    }

    /// The text of the session's last assistant message with any text.
    pub async fn last_message(&self, session: &str) -> Option<String> {
        let v = self
            .call(
                hyper::Method::GET,
                &format!("/session/{session}/message"),
                None,
            )
            .await
            .ok()?;
        v.as_array()?
            .iter()
            .rev()
            .filter(|m| m["info"]["role"] == "assistant")
            .map(|m| {
                m["parts"]
                    .as_array()
                    .map(|parts| {
                        parts
                            .iter()
                            .filter(|p| p["type"] == "text")
                            .filter_map(|p| p["text"].as_str())
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default()
            })
            .find(|t| !t.trim().is_empty())
    }

    /// The permission requests waiting for a person (OpenCode's `GET /permission`), at most
    /// 100.
    pub async fn permissions(&self) -> Result<Vec<serde_json::Value>, String> {
        let v = self.call(hyper::Method::GET, "/permission", None).await?;
        Ok(v.as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .take(100)
            .collect())
    }

    /// Answers permission request `id`: `once`, `always` or `reject` (with a message for
    /// the agent when rejecting).
    pub async fn reply_permission(
        &self,
        id: &str,
        reply: &str,
        message: Option<&str>,
    ) -> Result<(), String> {
        let mut body = serde_json::json!({ "reply": reply });
        if let Some(m) = message {
            body["message"] = m.into();
        }
        self.call(
            hyper::Method::POST,
            &format!("/permission/{id}/reply"),
            Some(body),
        )
        .await
        .map(drop)
    }

    /// Deletes a session (its messages included).
    pub async fn delete_session(&self, session: &str) -> Result<(), String> {
        self.call(hyper::Method::DELETE, &format!("/session/{session}"), None)
            .await
            .map(drop)
    }

    /// Stops what the session's agent is doing.
    pub async fn abort(&self, session: &str) -> Result<(), String> {
        self.call(
            hyper::Method::POST,
            &format!("/session/{session}/abort"),
            Some(serde_json::json!({})),
        )
        .await
        .map(drop)
    }

    /// The server's event stream, once its first event arrived (the server subscribed us).
    pub async fn events(&self) -> Result<Events, String> {
        let req = self
            .request(hyper::Method::GET, "/event")
            .header(hyper::header::ACCEPT, "text/event-stream")
            .body(crate::http::empty())
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| "no answer in time".to_string())?
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status().as_u16()));
        }
        let mut events = Events {
            inner: crate::http::sse_events(
                BodyExt::into_data_stream(resp.into_body()),
                crate::http::MAX_SSE_EVENT,
            ),
        };
        // The first event (server.connected) says the subscription is in place.
        match tokio::time::timeout(TIMEOUT, events.next()).await {
            Ok(Some(_)) => Ok(events),
            _ => Err("no first event".into()),
        }
    }
}

/// OpenCode's server-sent events, one JSON `data` payload at a time.
pub struct Events {
    inner: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<crate::http::SseEvent, String>> + Send>,
    >,
}

impl Events {
    /// The next event's data as JSON (events whose data is not JSON are skipped); `None` when
    /// the stream ends or breaks.
    pub async fn next(&mut self) -> Option<serde_json::Value> {
        use futures_util::StreamExt;
        loop {
            match self.inner.next().await? {
                Ok(ev) => {
                    if let Ok(v) = serde_json::from_str(&ev.data) {
                        return Some(v);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "OpenCode's event stream broke");
                    return None;
                }
            }
        }
    }
}
