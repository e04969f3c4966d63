//! Splicing an established tunnel, with an idle timeout and byte counts.
//!
//! `copy_bidirectional` moves the bytes (and propagates half-closes); thin wrappers note each
//! read's size and time, so the idle watchdog and the access log see the traffic without a
//! second copy loop.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Both sides finished (or one failed): the normal end.
    Finished,
    IdleTimeout,
    Shutdown,
    /// A reload took away the permission the tunnel was opened under.
    Revoked,
    /// The client's first bytes were not a TLS ClientHello for the CONNECT host.
    TlsCheck,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::Finished => "peer",
            Closed::IdleTimeout => "idle_timeout",
            Closed::Shutdown => "shutdown",
            Closed::Revoked => "revoked",
            Closed::TlsCheck => "tls_check",
        }
    }
}

/// Bytes moved by a tunnel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Client to upstream.
    pub up: u64,
    /// Upstream to client.
    pub down: u64,
}

#[derive(Default)]
struct Activity {
    up: AtomicU64,
    down: AtomicU64,
    /// Milliseconds since the tunnel started, at the last read on either side.
    last_ms: AtomicU64,
}

/// A stream whose reads are counted into one direction of an [`Activity`] and into the
/// gateway-wide byte counter of that direction.
struct Metered<S> {
    inner: S,
    activity: Arc<Activity>,
    upstream_bound: bool,
    start: Instant,
    total: IntCounter,
}

/// The gateway-wide byte counters a tunnel adds to as bytes move.
#[derive(Clone)]
pub struct ByteCounters {
    pub upstream: IntCounter,
    pub downstream: IntCounter,
}

/// What can end a tunnel from outside.
pub struct Stops<'a> {
    /// The shutdown grace is over.
    pub abort: &'a CancellationToken,
    /// A reload revoked the tunnel's permission.
    pub revoke: &'a CancellationToken,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            let counter = if self.upstream_bound { &self.activity.up } else { &self.activity.down };
            counter.fetch_add(read, Ordering::Relaxed);
            self.total.inc_by(read);
            let elapsed = self.start.elapsed().as_millis() as u64;
            self.activity.last_ms.store(elapsed, Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Move bytes both ways until both sides close, the tunnel is idle for `idle`, or one of
/// `stops` fires. Returns how it ended and what moved.
pub async fn splice<C, U>(
    client: C,
    upstream: U,
    idle: Duration,
    stops: Stops<'_>,
    bytes: &ByteCounters,
) -> (Closed, Transferred)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let activity = Arc::new(Activity::default());
    let mut client = Metered {
        inner: client,
        activity: activity.clone(),
        upstream_bound: true,
        start,
        total: bytes.upstream.clone(),
    };
    let mut upstream = Metered {
        inner: upstream,
        activity: activity.clone(),
        upstream_bound: false,
        start,
        total: bytes.downstream.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    let closed = loop {
        let last = Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
        let deadline = start + last + idle;
        tokio::select! {
            _ = &mut copy => break Closed::Finished,
            _ = stops.abort.cancelled() => break Closed::Shutdown,
            _ = stops.revoke.cancelled() => break Closed::Revoked,
            _ = tokio::time::sleep_until(deadline) => {
                let last = Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
                if Instant::now() >= start + last + idle {
                    break Closed::IdleTimeout;
                }
            }
        }
    };
    let moved = Transferred { up: activity.up.load(Ordering::Relaxed), down: activity.down.load(Ordering::Relaxed) };
    (closed, moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    fn counters() -> ByteCounters {
        let up = IntCounter::new("up", "up").unwrap();
        let down = IntCounter::new("down", "down").unwrap();
        ByteCounters { upstream: up, downstream: down }
    }

    async fn run(
        client: tokio::io::DuplexStream,
        upstream: tokio::io::DuplexStream,
        idle: Duration,
        abort: CancellationToken,
        revoke: CancellationToken,
        bytes: ByteCounters,
    ) -> (Closed, Transferred) {
        splice(client, upstream, idle, Stops { abort: &abort, revoke: &revoke }, &bytes).await
    }

    #[tokio::test]
    async fn counts_bytes_both_ways_and_ends_when_both_sides_close() {
        let (client, mut client_peer) = duplex(1024);
        let (upstream, mut upstream_peer) = duplex(1024);
        let bytes = counters();
        let totals = bytes.clone();
        let task = tokio::spawn(run(
            client,
            upstream,
            Duration::from_secs(60),
            CancellationToken::new(),
            CancellationToken::new(),
            bytes,
        ));
        client_peer.write_all(b"hello upstream").await.unwrap();
        let mut got = [0u8; 14];
        upstream_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello upstream");
        upstream_peer.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        client_peer.read_exact(&mut got).await.unwrap();
        drop(client_peer);
        drop(upstream_peer);
        let (closed, moved) = task.await.unwrap();
        assert_eq!(closed, Closed::Finished);
        assert_eq!(moved, Transferred { up: 14, down: 2 });
        assert_eq!((totals.upstream.get(), totals.downstream.get()), (14, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_tunnel_is_closed() {
        let (client, mut client_peer) = duplex(1024);
        let (upstream, _upstream_peer) = duplex(1024);
        let task = tokio::spawn(run(
            client,
            upstream,
            Duration::from_secs(300),
            CancellationToken::new(),
            CancellationToken::new(),
            counters(),
        ));
        tokio::time::sleep(Duration::from_secs(200)).await;
        client_peer.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_secs(200)).await;
        assert!(!task.is_finished(), "activity at 200s pushes the deadline to 500s");
        let (closed, moved) = task.await.unwrap();
        assert_eq!(closed, Closed::IdleTimeout);
        assert_eq!(moved.up, 1);
    }

    #[tokio::test]
    async fn abort_and_revoke_close_the_tunnel() {
        let (stop, other) = (CancellationToken::new(), CancellationToken::new());
        stop.cancel();
        let (client, _c) = duplex(64);
        let (upstream, _u) = duplex(64);
        let (closed, _) = run(client, upstream, Duration::from_secs(60), stop.clone(), other.clone(), counters()).await;
        assert_eq!(closed, Closed::Shutdown);
        let (client, _c) = duplex(64);
        let (upstream, _u) = duplex(64);
        let (closed, _) = run(client, upstream, Duration::from_secs(60), other, stop, counters()).await;
        assert_eq!(closed, Closed::Revoked);
    }
}
