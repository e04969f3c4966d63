//! `GET /v1/apps/{id}/decisions` and `GET /v1/events`: what the proxy refused lately (and
//! what the policy in force decides for it now), and what happens as it happens.
//!
//! The event stream is server-sent events: `decision` (a refusal or would-be refusal),
//! `change` (an app written through the API) and `reload` (a new generation, whatever made
//! it), each a JSON data line; `lagged` when the reader fell so far behind that events were
//! skipped. A stream holds an admin connection for as long as it is read, so at most
//! [`MAX_STREAMS`] are open at once (more are `503` with `Retry-After`), leaving the rest of
//! the connection limit to everything else. Streams end when the gateway begins to shut down.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::{Body, error, json_response};
use crate::decisions::GroupView;
use crate::policy::{Policy, Target, parse_host};
use crate::proxy::Shared;

/// Event streams open at once.
pub const MAX_STREAMS: usize = 16;
/// A comment line this often keeps proxies from timing a quiet stream out, and finds
/// readers that went away.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Chunks written ahead of a slow reader; past it, the reader lags on the broadcast instead.
const BUFFERED: usize = 16;

/// The open event streams' slots.
pub(crate) struct StreamSlots(Arc<Semaphore>);

impl Default for StreamSlots {
    fn default() -> StreamSlots {
        StreamSlots(Arc::new(Semaphore::new(MAX_STREAMS)))
    }
}

/// `GET /v1/apps/{id}/decisions`: the app's recent refusals, grouped, last seen first.
pub(crate) fn decisions(shared: &Shared, policy: &Policy, id: &str) -> Response<Body> {
    if policy.app(id).is_none() {
        return error(StatusCode::NOT_FOUND, &format!("no app {id:?}"));
    }
    let groups: Vec<Value> = shared
        .decisions
        .groups(id)
        .iter()
        .map(|group| {
            let mut view = serde_json::to_value(GroupView::from(group)).unwrap_or_default();
            // What the policy in force decides for it now (after an Allow, say).
            let now = parse_host(&group.host)
                .map(|host| policy.decide(id, group.channel, &Target { host, port: group.port }).verdict.as_str())
                .unwrap_or("deny");
            view["now"] = json!(now);
            view
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "app": id, "decisions": groups }))
}

/// `GET /v1/events[?app=ID]`: the event stream, of one app's events (and reloads) if asked.
pub(crate) fn stream(shared: &Shared, slots: &StreamSlots, app: Option<String>) -> Response<Body> {
    if shared.unready.is_cancelled() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the gateway is shutting down");
    }
    let Ok(slot) = slots.0.clone().try_acquire_owned() else {
        let mut response = error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{MAX_STREAMS} event streams are open already; retry later"),
        );
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("5"));
        return response;
    };
    let events = shared.events.subscribe();
    let (chunks, rx) = mpsc::channel(BUFFERED);
    tokio::spawn(forward(events, chunks, app, shared.unready.clone(), slot));
    let mut response = Response::new(http_body_util::Either::Right(EventStream(rx)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Copy the events that concern `app` to the stream's body until the reader goes away or
/// the gateway shuts down.
async fn forward(
    mut events: tokio::sync::broadcast::Receiver<crate::events::Event>,
    chunks: mpsc::Sender<Bytes>,
    app: Option<String>,
    closing: tokio_util::sync::CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut chunk = Bytes::from_static(b": miniapp-gateway events\nretry: 2000\n\n");
    loop {
        tokio::select! {
            _ = closing.cancelled() => return,
            sent = chunks.send(chunk) => if sent.is_err() { return },
        }
        chunk = loop {
            tokio::select! {
                _ = closing.cancelled() => return,
                _ = chunks.closed() => return,
                _ = keepalive.tick() => break Bytes::from_static(b": keep-alive\n\n"),
                received = events.recv() => match received {
                    Ok(event) if event.concerns(app.as_deref()) => break Bytes::from(event.to_sse()),
                    Ok(_) => {}
                    Err(RecvError::Lagged(skipped)) => {
                        break Bytes::from(format!("event: lagged\ndata: {{\"skipped\":{skipped}}}\n\n"));
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        };
    }
}

/// The body of an event stream: chunks as [`forward`] writes them; it ends when that does.
pub(crate) struct EventStream(mpsc::Receiver<Bytes>);

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}
