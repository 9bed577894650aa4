//! HTTP plumbing shared by every side that speaks HTTP: the API, the LLM gateway, and the
//! services' clients of OpenCode in sandboxes. Body types and constructors only; routing,
//! errors and wire types belong to the API.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response (and proxied request) body.
pub type Body = BoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A frame sender for a streamed body (see [`channel_body`]).
pub type FrameSender = tokio::sync::mpsc::Sender<Result<hyper::body::Frame<Bytes>, BoxError>>;

/// A body that streams whatever is sent on the channel, until every sender is dropped.
pub fn channel_body(
    mut rx: tokio::sync::mpsc::Receiver<Result<hyper::body::Frame<Bytes>, BoxError>>,
) -> Body {
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    BodyExt::boxed(http_body_util::StreamBody::new(stream))
}
