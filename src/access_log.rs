//! The access log: one line per decision, written off the hot path.
//!
//! Connection tasks hand a finished [`AccessRecord`] to a bounded channel; a dedicated thread
//! formats and writes it, so a slow stdout never stalls a tunnel. When the channel is full a
//! record is dropped and counted rather than blocking the proxy. The thread writes in batches
//! (see [`BATCH_WINDOW`]), so a busy gateway wakes it a hundred times a second rather than
//! once per connection.

use std::io::Write;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::policy::{Channel, Reason, Verdict};

/// How many records may wait for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// Once a record arrives, the writer waits this long for more and then writes them all in one
/// call. Waking the thread for every record cost a futex call and a context switch per
/// connection; now a busy gateway wakes it once per window, and an idle one not at all. A line
/// reaches the log at most this much later. (The queue holds 16,384 records per window: 1.6
/// million a second.)
pub const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// How access log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// One line for people.
    Text,
}

/// What a decision (or a finished tunnel) leaves in the log.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    pub ts: SystemTime,
    pub app: Option<Box<str>>,
    pub channel: Option<Channel>,
    pub client: SocketAddr,
    pub host: Option<Box<str>>,
    pub port: Option<u16>,
    pub decision: Verdict,
    pub reason: Reason,
    pub rule: Option<String>,
    pub status: u16,
    pub upstream: Option<SocketAddr>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    pub generation: u64,
    /// Why an established tunnel ended: `client`, `upstream`, `idle_timeout`, `shutdown`, …
    pub closed_by: Option<&'static str>,
}

#[derive(Serialize)]
struct JsonLine<'a> {
    ts: String,
    app: Option<&'a str>,
    channel: Option<&'static str>,
    client: String,
    host: Option<&'a str>,
    port: Option<u16>,
    decision: &'static str,
    reason: &'static str,
    rule: Option<&'a str>,
    status: u16,
    upstream: Option<String>,
    bytes_up: u64,
    bytes_down: u64,
    duration_ms: u64,
    generation: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    closed_by: Option<&'static str>,
}

impl AccessRecord {
    /// A decision about `client`, stamped now; everything else starts empty.
    pub fn new(client: SocketAddr, generation: u64, decision: Verdict, reason: Reason, status: u16) -> AccessRecord {
        AccessRecord {
            ts: SystemTime::now(),
            app: None,
            channel: None,
            client,
            host: None,
            port: None,
            decision,
            reason,
            rule: None,
            status,
            upstream: None,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
            generation,
            closed_by: None,
        }
    }

    fn write_json(&self, out: &mut impl Write) -> std::io::Result<()> {
        let line = JsonLine {
            ts: humantime::format_rfc3339_millis(self.ts).to_string(),
            app: self.app.as_deref(),
            channel: self.channel.map(Channel::as_str),
            client: self.client.to_string(),
            host: self.host.as_deref(),
            port: self.port,
            decision: self.decision.as_str(),
            reason: self.reason.as_str(),
            rule: self.rule.as_deref(),
            status: self.status,
            upstream: self.upstream.map(|u| u.to_string()),
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            duration_ms: self.duration_ms,
            generation: self.generation,
            closed_by: self.closed_by,
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")
    }

    fn write_text(&self, out: &mut impl Write) -> std::io::Result<()> {
        write!(
            out,
            "{} {} {} {}/{} {}:{} status={} rule={} up={} down={} {}ms client={}",
            humantime::format_rfc3339_millis(self.ts),
            self.decision.as_str(),
            self.reason.as_str(),
            self.app.as_deref().unwrap_or("-"),
            self.channel.map_or("-", Channel::as_str),
            self.host.as_deref().unwrap_or("-"),
            self.port.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            self.status,
            self.rule.as_deref().unwrap_or("-"),
            self.bytes_up,
            self.bytes_down,
            self.duration_ms,
            self.client,
        )?;
        if let Some(closed_by) = self.closed_by {
            write!(out, " closed_by={closed_by}")?;
        }
        out.write_all(b"\n")
    }
}

/// The sending side: cheap to clone, shared by every connection.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<AccessRecord>,
    /// `gateway_access_log_dropped_total`, registered by the gateway with its metrics.
    dropped: IntCounter,
}

/// The writer thread; [`AccessLogWriter::finish`] waits until every queued line is written.
#[derive(Debug)]
pub struct AccessLogWriter {
    thread: JoinHandle<()>,
}

impl AccessLog {
    /// The counter of dropped records, to register with the gateway's metrics.
    pub fn dropped_counter(&self) -> IntCounter {
        self.dropped.clone()
    }

    /// Start a writer thread that formats records as `format` into `out`.
    pub fn start(format: LogFormat, mut out: Box<dyn Write + Send>) -> (AccessLog, AccessLogWriter) {
        let (tx, mut rx) = mpsc::channel::<AccessRecord>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                // Whole lines are formatted into one buffer and written in one call: the log
                // is ours alone (diagnostics go to stderr), so no reader sees half a record.
                let mut batch = Vec::with_capacity(64 * 1024);
                let format_into = |batch: &mut Vec<u8>, record: &AccessRecord| match format {
                    LogFormat::Json => record.write_json(batch),
                    LogFormat::Text => record.write_text(batch),
                };
                while let Some(first) = rx.blocking_recv() {
                    std::thread::sleep(BATCH_WINDOW);
                    batch.clear();
                    let mut result = format_into(&mut batch, &first);
                    while let Ok(more) = rx.try_recv() {
                        result = result.and(format_into(&mut batch, &more));
                    }
                    if let Err(e) = result.and(out.write_all(&batch)).and(out.flush()) {
                        tracing::warn!(error = %e, "cannot write the access log");
                    }
                    if batch.capacity() > 1024 * 1024 {
                        batch = Vec::with_capacity(64 * 1024); // a burst passed; give it back
                    }
                }
            })
            .expect("spawning the access log thread");
        let dropped = IntCounter::new(
            "gateway_access_log_dropped_total",
            "Access log records dropped because the writer fell behind.",
        )
        .expect("valid metric");
        (AccessLog { tx, dropped }, AccessLogWriter { thread })
    }

    /// Queue a record; never waits.
    pub fn record(&self, record: AccessRecord) {
        if self.tx.try_send(record).is_err() {
            self.dropped.inc();
            let dropped = self.dropped.get();
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, "access log queue full; records dropped");
            }
        }
    }
}

impl AccessLogWriter {
    /// Wait for the writer to drain, once every [`AccessLog`] handle is dropped, for at most
    /// `limit` (a stuck stdout must not hold the exit forever). Whether it drained.
    pub fn finish(self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while !self.thread.is_finished() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.thread.join();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer that keeps what it is given and counts the calls that gave it.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut inner = self.0.lock().unwrap();
            inner.0.extend_from_slice(buf);
            inner.1 += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn records_arrive_whole_in_batches_and_none_is_lost_at_the_end() {
        let out = Recorder::default();
        let (log, writer) = AccessLog::start(LogFormat::Json, Box::new(out.clone()));
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        for generation in 0..2_000 {
            log.record(AccessRecord::new(client, generation, Verdict::Deny, Reason::NotWhitelisted, 403));
        }
        drop(log);
        assert!(writer.finish(Duration::from_secs(10)));
        let (bytes, writes) = out.0.lock().unwrap().clone();
        let lines: Vec<serde_json::Value> =
            String::from_utf8(bytes).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let generations: Vec<u64> = lines.iter().map(|l| l["generation"].as_u64().unwrap()).collect();
        assert_eq!(generations, (0..2_000).collect::<Vec<_>>(), "every record, once, in order");
        assert!(writes < 100, "2,000 records queued at once are written in a few calls, not {writes}");
    }

    /// A writer stuck until its gate opens (a stdout nobody reads); says when it got stuck.
    struct Stuck {
        gate: std::sync::mpsc::Receiver<()>,
        stuck: std::sync::mpsc::Sender<()>,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.stuck.send(());
            let _ = self.gate.recv();
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_writer_drops_and_counts_records_and_cannot_hold_the_exit() {
        let (open, gate) = std::sync::mpsc::channel();
        let (stuck, is_stuck) = std::sync::mpsc::channel();
        let (log, writer) = AccessLog::start(LogFormat::Json, Box::new(Stuck { gate, stuck }));
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let dropped = log.dropped_counter();
        log.record(AccessRecord::new(client, 0, Verdict::Deny, Reason::NotWhitelisted, 403));
        is_stuck.recv().unwrap();
        for generation in 0..(QUEUE as u64 + 100) {
            log.record(AccessRecord::new(client, generation, Verdict::Deny, Reason::NotWhitelisted, 403));
        }
        assert_eq!(dropped.get(), 100, "the queue holds {QUEUE}; the rest are dropped and counted");
        drop(log);
        assert!(!writer.finish(Duration::from_millis(100)), "gives up on a writer that never returns");
        drop(open);
    }
}
