//! HTTP plumbing shared by every side that speaks HTTP: the API, the LLM gateway, and the
//! services' clients of OpenCode in sandboxes. Body types and constructors only; routing,
//! errors and wire types belong to the API.

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response (and proxied request) body.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

/// A frame sender for a streamed body (see [`channel_body`]).
pub type FrameSender = tokio::sync::mpsc::Sender<Result<hyper::body::Frame<Bytes>, BoxError>>;

/// A body that streams whatever is sent on the channel, until every sender is dropped.
pub fn channel_body(
    mut rx: tokio::sync::mpsc::Receiver<Result<hyper::body::Frame<Bytes>, BoxError>>,
) -> Body {
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    BodyExt::boxed_unsync(http_body_util::StreamBody::new(stream))
}

/// Most bytes of one server-sent event (all its lines up to the blank line that ends it).
pub const MAX_SSE_EVENT: usize = 16 << 20;

/// One server-sent event.
pub type SseEvent = eventsource_stream::Event;

/// The server-sent events of a byte stream, parsed by `eventsource-stream`. A peer that sends
/// more than `max_event` bytes without ending an event (a blank line) ends the stream with an
/// error: every stream agentd reads comes from a sandbox or an upstream, so the parser's buffer
/// must not grow without bound.
pub fn sse_events<S, E>(
    body: S,
    max_event: usize,
) -> std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<SseEvent, String>> + Send>>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;
    // Bytes since the last blank line, and the last two bytes seen (a boundary may straddle
    // chunks). `\n\n`, `\r\n\r\n` and `\r\r` all end an event; counting from any `\n\n` or
    // `\r\r` is enough for a bound.
    let guarded = body.scan((0usize, [0u8; 2], false), move |state, item| {
        let (since, last, failed) = state;
        if *failed {
            return std::future::ready(None);
        }
        let out = match item {
            Err(e) => Err(e.to_string()),
            Ok(chunk) => {
                for &b in chunk.iter() {
                    *since += 1;
                    let boundary = (b == b'\n' && (last[1] == b'\n' || *last == *b"\n\r"))
                        || (b == b'\r' && last[1] == b'\r');
                    if boundary {
                        *since = 0;
                    }
                    *last = [last[1], b];
                }
                if *since > max_event {
                    *failed = true;
                    Err(format!("an event of more than {max_event} bytes"))
                } else {
                    Ok(chunk)
                }
            }
        };
        std::future::ready(Some(out))
    });
    Box::pin(guarded.eventsource().map(|r| r.map_err(|e| e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn events(chunks: &[&'static [u8]], max: usize) -> Vec<Result<(String, String), String>> {
        let stream = futures_util::stream::iter(
            chunks
                .iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c)))
                .collect::<Vec<_>>(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(
            sse_events(stream, max)
                .map(|r| r.map(|e| (e.event, e.data)))
                .collect(),
        )
    }

    #[test]
    fn test_sse_events_across_chunks() {
        let got = events(
            &[
                b"data: {\"a\":",
                b"1}\n\nevent: x\r\ndata: 2\r\n",
                b"\r\n: comment\n\n",
            ],
            1024,
        );
        assert_eq!(
            got,
            [
                Ok((String::from("message"), String::from("{\"a\":1}"))),
                Ok((String::from("x"), String::from("2")))
            ]
        );
    }

    #[test]
    fn test_sse_event_without_end_is_cut() {
        let got = events(
            &[b"data: 1\n\n", b"data: xxxxxxxx\n", b"data: yyyyyyyy\n"],
            20,
        );
        assert_eq!(
            got.first(),
            Some(&Ok((String::from("message"), String::from("1"))))
        );
        assert!(
            got.last()
                .is_some_and(|r| r.as_ref().is_err_and(|e| e.contains("more than 20 bytes"))),
            "{got:?}"
        );
    }
}
