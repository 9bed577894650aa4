//! The Connect protocol (connectrpc.com's, JSON codec), as E2B's envd speaks it: unary calls
//! are a JSON body in and out (errors: an HTTP status and `{"code","message"}`); streaming
//! calls frame each message as an envelope (1 byte of flags, a 4-byte big-endian length, the
//! JSON) and end the response with an end-of-stream envelope (flag 2) carrying the error, if
//! any. Compressed envelopes are refused (agentd never offers compression).

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::{Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::ApiError;
use super::{full, Body, Req};

/// Largest message accepted in a request.
pub const MAX_MESSAGE: usize = 4 << 20;

/// The flag of an end-of-stream envelope.
const END_STREAM: u8 = 2;
/// The flag of a compressed envelope.
const COMPRESSED: u8 = 1;

/// A Connect error: its code (`not_found`, ...) and message.
#[derive(Debug, Clone)]
pub struct ConnectError {
    /// The Connect code.
    pub code: &'static str,
    /// What happened.
    pub message: String,
}

impl ConnectError {
    /// An error with `code`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ConnectError {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status of a unary call that failed with it.
    pub fn status(&self) -> StatusCode {
        match self.code {
            "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            "permission_denied" => StatusCode::FORBIDDEN,
            "not_found" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" => StatusCode::CONFLICT,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "unimplemented" => StatusCode::NOT_IMPLEMENTED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
            "canceled" => StatusCode::from_u16(499).expect("a valid status"),
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code, "message": self.message})
    }
}

impl From<ApiError> for ConnectError {
    fn from(e: ApiError) -> Self {
        let code = match e.status().as_u16() {
            400 => "invalid_argument",
            401 => "unauthenticated",
            403 => "permission_denied",
            404 => "not_found",
            409 => "failed_precondition",
            413 | 429 | 507 => "resource_exhausted",
            501 => "unimplemented",
            502 | 503 => "unavailable",
            504 => "deadline_exceeded",
            _ => "internal",
        };
        // The API's own message (an internal error's details stay in agentd's log).
        let message = e.body(0)["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        ConnectError::new(code, message)
    }
}

impl From<crate::error::Error> for ConnectError {
    fn from(e: crate::error::Error) -> Self {
        ApiError::from(e).into()
    }
}

/// A unary call's answer.
pub fn unary<T: Serialize>(v: &T) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_vec(v).expect("JSON values serialise")))
        .expect("a valid response")
}

/// A unary call's error.
pub fn unary_error(e: &ConnectError) -> Response<Body> {
    Response::builder()
        .status(e.status())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(full(
            serde_json::to_vec(&e.json()).expect("JSON values serialise"),
        ))
        .expect("a valid response")
}

/// One message as an envelope.
pub fn envelope<T: Serialize>(v: &T) -> Bytes {
    frame(0, &serde_json::to_vec(v).expect("JSON values serialise"))
}

/// The end of a stream: fine, or with `error`.
pub fn end_of_stream(error: Option<&ConnectError>) -> Bytes {
    let v = match error {
        Some(e) => serde_json::json!({"error": e.json()}),
        None => serde_json::json!({}),
    };
    frame(
        END_STREAM,
        &serde_json::to_vec(&v).expect("JSON values serialise"),
    )
}

fn frame(flags: u8, json: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + json.len());
    b.extend_from_slice(&[flags]);
    b.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_be_bytes());
    b.extend_from_slice(json);
    b.freeze()
}

/// The start of a streaming response (its status is always 200; errors end the stream).
pub fn stream_response(body: Body) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/connect+json")
        .body(body)
        .expect("a valid response")
}

/// What a server stream sends.
pub struct ServerStream {
    /// The first message.
    pub first: serde_json::Value,
    /// The keepalive message, sent every `ping` while nothing else is.
    pub keepalive: serde_json::Value,
    /// How often, if the client asked.
    pub ping: Option<std::time::Duration>,
    /// The error the stream ends with when its source ends first.
    pub lost: &'static str,
}

impl ServerStream {
    /// A streaming response: the first message, then `message(item)` for each item of `rx`
    /// (a stream that says an item was the last one ends there, fine), with keepalives. A
    /// client that goes away ends the stream's task; what feeds `rx` is not its business.
    pub fn respond<T: Send + 'static>(
        self,
        mut rx: tokio::sync::mpsc::Receiver<T>,
        message: impl Fn(&T) -> (serde_json::Value, bool) + Send + 'static,
    ) -> Response<Body> {
        let (tx, body) =
            tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, super::BoxError>>(16);
        tokio::spawn(async move {
            let send = |b: Bytes| {
                let tx = tx.clone();
                async move { tx.send(Ok(hyper::body::Frame::data(b))).await.is_ok() }
            };
            if !send(envelope(&self.first)).await {
                return;
            }
            let period = self.ping.unwrap_or(std::time::Duration::from_secs(3600));
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tokio::select! {
                    item = rx.recv() => {
                        let Some(item) = item else {
                            let e = ConnectError::new("unavailable", self.lost);
                            send(end_of_stream(Some(&e))).await;
                            return;
                        };
                        let (m, last) = message(&item);
                        if !send(envelope(&m)).await {
                            return;
                        }
                        if last {
                            send(end_of_stream(None)).await;
                            return;
                        }
                    }
                    _ = tick.tick(), if self.ping.is_some() => {
                        if !send(envelope(&self.keepalive)).await {
                            return;
                        }
                    }
                }
            }
        });
        stream_response(crate::http::channel_body(body))
    }
}

/// Whether a request is a streaming call (enveloped messages).
pub fn is_streaming(req: &Req) -> bool {
    req.headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/connect+"))
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConnectError> {
    let bytes = if bytes.is_empty() { b"{}" } else { bytes };
    serde_json::from_slice(bytes)
        .map_err(|e| ConnectError::new("invalid_argument", format!("invalid message: {e}")))
}

/// The request message of a unary or server-streaming call.
pub async fn read_request<T: DeserializeOwned>(req: Req) -> Result<T, ConnectError> {
    if !is_streaming(&req) {
        let body = super::read_body(req, MAX_MESSAGE)
            .await
            .map_err(ConnectError::from)?;
        return parse(&body);
    }
    match Envelopes::new(req).next().await? {
        Some(m) => parse(&m),
        None => Err(ConnectError::new(
            "invalid_argument",
            "the stream carried no request message",
        )),
    }
}

/// The messages of a client stream, read as they come.
pub struct Envelopes {
    body: axum::body::Body,
    buf: BytesMut,
    ended: bool,
}

impl Envelopes {
    /// Reads `req`'s body.
    pub fn new(req: Req) -> Self {
        Envelopes {
            body: req.into_body(),
            buf: BytesMut::new(),
            ended: false,
        }
    }

    /// The next message; `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ConnectError> {
        loop {
            if self.buf.len() >= 5 {
                let flags = self.buf[0];
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > MAX_MESSAGE {
                    return Err(ConnectError::new(
                        "resource_exhausted",
                        format!("a message is larger than {MAX_MESSAGE} bytes"),
                    ));
                }
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let msg = self.buf.split_to(len).freeze();
                    if flags & COMPRESSED != 0 {
                        return Err(ConnectError::new(
                            "unimplemented",
                            "compressed messages are not supported",
                        ));
                    }
                    if flags & END_STREAM != 0 {
                        self.ended = true;
                        return Ok(None);
                    }
                    return Ok(Some(msg));
                }
            }
            if self.ended {
                return Ok(None);
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    return Err(ConnectError::new(
                        "canceled",
                        format!("reading the request stream: {e}"),
                    ))
                }
                None => {
                    self.ended = true;
                    if !self.buf.is_empty() {
                        return Err(ConnectError::new(
                            "invalid_argument",
                            "the request stream ended inside a message",
                        ));
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// The next message as `T`.
    pub async fn next_as<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ConnectError> {
        match self.next().await? {
            Some(m) => parse(&m).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_envelopes_frame_json() {
        let b = envelope(&serde_json::json!({"a": 1}));
        assert_eq!(&b[..5], &[0, 0, 0, 0, 7]);
        assert_eq!(&b[5..], br#"{"a":1}"#);
        let e = end_of_stream(Some(&ConnectError::new("not_found", "x")));
        assert_eq!(e[0], 2);
        let v: serde_json::Value = serde_json::from_slice(&e[5..]).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
    }

    #[tokio::test]
    async fn test_envelopes_are_read_across_frames_and_bounded() {
        let mut raw = envelope(&serde_json::json!({"n": 1})).to_vec();
        raw.extend_from_slice(&envelope(&serde_json::json!({"n": 2})));
        raw.extend_from_slice(&end_of_stream(None));
        let req = hyper::Request::builder()
            .header("content-type", "application/connect+json")
            .body(axum::body::Body::from(raw))
            .unwrap();
        let mut r = Envelopes::new(req);
        let a: serde_json::Value = r.next_as().await.unwrap().unwrap();
        let b: serde_json::Value = r.next_as().await.unwrap().unwrap();
        assert_eq!((a["n"].as_u64(), b["n"].as_u64()), (Some(1), Some(2)));
        assert!(r.next().await.unwrap().is_none());
        let mut huge = vec![0u8, 0xff, 0xff, 0xff, 0xff];
        huge.extend_from_slice(b"{}");
        let req = hyper::Request::builder()
            .body(axum::body::Body::from(huge))
            .unwrap();
        let e = Envelopes::new(req).next().await.unwrap_err();
        assert_eq!(e.code, "resource_exhausted");
    }
}
