//! The access log: one line per decision, written off the hot path.
//!
//! Connection tasks hand a finished [`AccessRecord`] to a bounded channel; a dedicated thread
//! formats and writes it, so a slow stdout never stalls a tunnel. When the channel is full a
//! record is dropped and counted rather than blocking the proxy.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::policy::{Channel, Reason, Verdict};

/// How many records may wait for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

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
    dropped: Arc<AtomicU64>,
}

/// The writer thread; [`AccessLogWriter::finish`] waits until every queued line is written.
#[derive(Debug)]
pub struct AccessLogWriter {
    thread: JoinHandle<()>,
}

impl AccessLog {
    /// Start a writer thread that formats records as `format` into `out`.
    pub fn start(format: LogFormat, mut out: Box<dyn Write + Send>) -> (AccessLog, AccessLogWriter) {
        let (tx, mut rx) = mpsc::channel::<AccessRecord>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                // Each line is formatted whole and written in one call, so readers of a pipe
                // (and of a file being appended to) never see half a record.
                let mut line = Vec::with_capacity(512);
                while let Some(record) = rx.blocking_recv() {
                    let mut write = |record: &AccessRecord| {
                        line.clear();
                        match format {
                            LogFormat::Json => record.write_json(&mut line)?,
                            LogFormat::Text => record.write_text(&mut line)?,
                        }
                        out.write_all(&line)
                    };
                    let mut result = write(&record);
                    while let Ok(more) = rx.try_recv() {
                        result = result.and(write(&more));
                    }
                    if let Err(e) = result.and(out.flush()) {
                        tracing::warn!(error = %e, "cannot write the access log");
                    }
                }
            })
            .expect("spawning the access log thread");
        (AccessLog { tx, dropped: Arc::new(AtomicU64::new(0)) }, AccessLogWriter { thread })
    }

    /// Queue a record; never waits.
    pub fn record(&self, record: AccessRecord) {
        if self.tx.try_send(record).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, "access log queue full; records dropped");
            }
        }
    }
}

impl AccessLogWriter {
    /// Wait for the writer to drain; returns once every [`AccessLog`] handle is dropped.
    pub fn finish(self) {
        let _ = self.thread.join();
    }
}
