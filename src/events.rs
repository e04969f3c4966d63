//! What happens on the gateway, as it happens: refusals, app changes and reloads, for the
//! admin listener's server-sent event stream (`GET /v1/events`) and so for the console.
//!
//! A bounded broadcast channel: publishing never waits, whoever reads too slowly misses
//! events (and is told how many) instead of holding up the proxy. An event is rendered once,
//! and only while someone listens: with no stream open, publishing costs a counter read.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

/// Events kept for readers that fall behind; beyond it the slowest skip ahead.
pub const CAPACITY: usize = 1024;

/// One event, rendered for every reader.
#[derive(Debug, Clone)]
pub struct Event {
    /// The app it concerns; `None` for what concerns every app (a reload).
    pub app: Option<Arc<str>>,
    /// The SSE event name: `decision`, `change` or `reload`.
    pub kind: &'static str,
    /// The JSON data line.
    pub data: Arc<str>,
}

/// The gateway's event channel.
pub struct Events {
    sender: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Events {
        Events { sender: broadcast::Sender::new(CAPACITY) }
    }
}

impl Events {
    /// Publish `kind` about `app`; `data` is rendered only when some stream is open.
    pub fn publish<T: Serialize>(&self, app: Option<&str>, kind: &'static str, data: impl FnOnce() -> T) {
        if self.sender.receiver_count() == 0 {
            return;
        }
        let Ok(data) = serde_json::to_string(&data()) else { return };
        // An error only says that the last reader left meanwhile.
        let _ = self.sender.send(Event { app: app.map(Arc::from), kind, data: data.into() });
    }

    /// A new reader, seeing what is published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }
}

impl Event {
    /// Whether a stream filtered to `app` (or not filtered) shows it.
    pub fn concerns(&self, app: Option<&str>) -> bool {
        match (app, &self.app) {
            (None, _) | (_, None) => true,
            (Some(wanted), Some(app)) => &**app == wanted,
        }
    }

    /// The event in the text/event-stream format.
    pub fn to_sse(&self) -> String {
        format!("event: {}\ndata: {}\n\n", self.kind, self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_rendered_without_a_reader() {
        let events = Events::default();
        events.publish(Some("demo"), "decision", || -> u8 { panic!("rendered with nobody listening") });
        let mut reader = events.subscribe();
        events.publish(Some("demo"), "decision", || serde_json::json!({"host": "evil.example"}));
        let event = reader.try_recv().unwrap();
        assert_eq!(event.to_sse(), "event: decision\ndata: {\"host\":\"evil.example\"}\n\n");
        assert!(event.concerns(Some("demo")) && event.concerns(None) && !event.concerns(Some("other")));
    }

    #[test]
    fn a_slow_reader_skips_ahead_and_never_holds_up_the_writer() {
        let events = Events::default();
        let mut reader = events.subscribe();
        for i in 0..CAPACITY + 10 {
            events.publish(None, "reload", || i);
        }
        assert!(matches!(reader.try_recv(), Err(broadcast::error::TryRecvError::Lagged(10))));
        assert_eq!(&*reader.try_recv().unwrap().data, "10");
    }
}
