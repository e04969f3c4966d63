//! Splicing an established tunnel, with an idle timeout and byte counts.
//!
//! Plain TCP on both sides (the common case) goes through [`splice_tcp`]: each direction
//! waits for readiness holding no buffer, and takes a large one only while bytes flow. An idle
//! tunnel therefore costs its two sockets and a few hundred bytes of task state, while a bulk
//! transfer moves up to [`BURST`] bytes per system call. Anything else (a client on a TLS
//! listener) goes through `copy_bidirectional` with thin wrappers that count and time reads.
//! Either way the idle watchdog, revocation and shutdown see the same activity record.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
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

/// Bytes moved each way. They double as the idle watchdog's evidence of activity, so the hot
/// path never reads a clock.
#[derive(Default)]
struct Activity {
    up: AtomicU64,
    down: AtomicU64,
}

impl Activity {
    fn total(&self) -> u64 {
        self.up.load(Ordering::Relaxed) + self.down.load(Ordering::Relaxed)
    }
}

/// The watchdog looks at the byte counts this many times per idle timeout; a tunnel is
/// closed between 1 and 1 + 1/IDLE_CHECKS idle timeouts after its last byte.
const IDLE_CHECKS: u32 = 4;

/// A stream whose reads are counted into one direction of an [`Activity`] and into the
/// gateway-wide byte counter of that direction.
struct Metered<S> {
    inner: S,
    activity: Arc<Activity>,
    upstream_bound: bool,
    total: IntCounter,
}

/// The gateway-wide byte counters a tunnel adds to as bytes move.
#[derive(Clone)]
pub struct ByteCounters {
    pub upstream: IntCounter,
    pub downstream: IntCounter,
}

/// What can end a tunnel from outside.
///
/// `revoke` must be a child of `abort` (`abort.child_token()`): the watchdog then waits on the
/// one token, and tells the two apart by whether `abort` fired.
pub struct Stops<'a> {
    /// The shutdown grace is over.
    pub abort: &'a CancellationToken,
    /// This tunnel must end: a reload revoked its permission, or (as a child) shutdown.
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

/// The largest read a TCP tunnel makes at once (and the buffer it holds while bytes flow).
pub const BURST: usize = 64 * 1024;

/// Burst buffers kept per worker thread between uses. Allocating and freeing 64 KiB on every
/// readiness event was an eighth of the gateway's instructions under load (callgrind); a
/// small pool keeps that off the hot path while idle tunnels still hold no buffer.
const POOLED_PER_THREAD: usize = 8;

thread_local! {
    static BURST_POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A burst buffer from this thread's pool (or a new one), returned to the pool of whichever
/// thread drops it.
struct BurstBuffer(Vec<u8>);

impl BurstBuffer {
    fn take() -> BurstBuffer {
        let pooled = BURST_POOL.with(|pool| pool.borrow_mut().pop());
        BurstBuffer(pooled.unwrap_or_else(|| Vec::with_capacity(BURST)))
    }
}

impl Drop for BurstBuffer {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.0);
        buf.clear();
        // `try_with`: a buffer dropped while its thread shuts down is simply freed.
        let _ = BURST_POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOLED_PER_THREAD {
                pool.push(buf);
            }
        });
    }
}

/// Move bytes both ways between two TCP sockets until both sides close, the tunnel is idle
/// for `idle`, or one of `stops` fires. Half-closes are passed on.
pub async fn splice_tcp(
    mut client: TcpStream,
    mut upstream: TcpStream,
    idle: Duration,
    stops: Stops<'_>,
    bytes: &ByteCounters,
) -> (Closed, Transferred) {
    let activity = Activity::default();
    let (client_read, mut client_write) = client.split();
    let (upstream_read, mut upstream_write) = upstream.split();
    let up = pump(&client_read, &mut upstream_write, &activity.up, &bytes.upstream);
    let down = pump(&upstream_read, &mut client_write, &activity.down, &bytes.downstream);
    // A failure either way (a reset, a write to a closed socket) ends both at once; an end of
    // stream is only a half-close, passed on, and the other direction carries on.
    let both = async {
        let _ = tokio::try_join!(up, down);
    };
    let closed = watch(both, &activity, idle, stops).await;
    let moved = Transferred { up: activity.up.load(Ordering::Relaxed), down: activity.down.load(Ordering::Relaxed) };
    (closed, moved)
}

/// One direction: wait until `from` is readable (holding nothing), then read and write in
/// bursts until it would block. Ends when `from` reaches end of stream (passing the
/// half-close on to `to`) or either side fails.
async fn pump(from: &ReadHalf<'_>, to: &mut WriteHalf<'_>, moved: &AtomicU64, total: &IntCounter) -> io::Result<()> {
    loop {
        from.readable().await?;
        let mut burst = BurstBuffer::take();
        let buf = &mut burst.0;
        loop {
            buf.clear();
            match read_available(from, buf) {
                Ok(0) => {
                    let _ = to.shutdown().await;
                    return Ok(());
                }
                Ok(n) => {
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                    total.inc_by(n as u64);
                    to.write_all(buf).await?;
                    if buf.len() < buf.capacity() {
                        break; // drained, and the readiness is cleared: wait for more
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Read what `from` holds into `buf`'s spare capacity. A read that leaves room has drained the
/// socket (TCP hands over everything queued, up to the buffer's size), so the readiness is
/// cleared then and there rather than by one more read that would only return `WouldBlock`
/// (one of the three calls a direction made per small message). Bytes that arrive later
/// raise a new readiness event, which a clear from before them does not erase. (Tokio's own
/// `poll_read` clears readiness the same way.)
fn read_available(from: &ReadHalf<'_>, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut read = 0;
    let outcome = from.as_ref().try_io(Interest::READABLE, || {
        read = from.try_read_buf(buf)?;
        if read > 0 && buf.len() < buf.capacity() {
            Err(io::ErrorKind::WouldBlock.into()) // tells tokio to clear the readiness
        } else {
            Ok(read)
        }
    });
    match outcome {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && read > 0 => Ok(read),
        other => other,
    }
}

/// Run `transfer` until it ends, no byte has moved for `idle`, or a stop fires.
async fn watch(transfer: impl Future<Output = ()>, activity: &Activity, idle: Duration, stops: Stops<'_>) -> Closed {
    tokio::pin!(transfer);
    let check = idle / IDLE_CHECKS;
    let mut seen = activity.total();
    let mut quiet_checks = 0;
    loop {
        tokio::select! {
            // Polled in order, revocation first: a revoked tunnel must not move one more burst
            // (one atomic load per wake-up).
            biased;
            _ = stops.revoke.cancelled() => {
                return if stops.abort.is_cancelled() { Closed::Shutdown } else { Closed::Revoked };
            }
            _ = &mut transfer => return Closed::Finished,
            _ = tokio::time::sleep(check) => {
                let now = activity.total();
                if now == seen {
                    quiet_checks += 1;
                    if quiet_checks >= IDLE_CHECKS {
                        return Closed::IdleTimeout;
                    }
                } else {
                    seen = now;
                    quiet_checks = 0;
                }
            }
        }
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
    let activity = Arc::new(Activity::default());
    let mut client =
        Metered { inner: client, activity: activity.clone(), upstream_bound: true, total: bytes.upstream.clone() };
    let mut upstream =
        Metered { inner: upstream, activity: activity.clone(), upstream_bound: false, total: bytes.downstream.clone() };
    let copy = async {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    };
    let closed = watch(copy, &activity, idle, stops).await;
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
        assert!(!task.is_finished(), "activity at 200s pushes the close past 500s");
        let (closed, moved) = task.await.unwrap();
        assert_eq!(closed, Closed::IdleTimeout);
        assert_eq!(moved.up, 1);
    }

    #[tokio::test]
    async fn abort_and_revoke_close_the_tunnel() {
        let abort = CancellationToken::new();
        let revoke = abort.child_token();
        abort.cancel();
        let (client, _c) = duplex(64);
        let (upstream, _u) = duplex(64);
        let (closed, _) = run(client, upstream, Duration::from_secs(60), abort, revoke, counters()).await;
        assert_eq!(closed, Closed::Shutdown);
        let abort = CancellationToken::new();
        let revoke = abort.child_token();
        revoke.cancel();
        let (client, _c) = duplex(64);
        let (upstream, _u) = duplex(64);
        let (closed, _) = run(client, upstream, Duration::from_secs(60), abort.clone(), revoke, counters()).await;
        assert_eq!(closed, Closed::Revoked);
        assert!(!abort.is_cancelled(), "revoking one tunnel shuts nothing else down");
    }

    /// Two connected loopback socket pairs: (client peer, client side, upstream side, upstream peer).
    async fn socket_pairs() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client_peer = TcpStream::connect(addr).await.unwrap();
        let (client_side, _) = listener.accept().await.unwrap();
        let upstream_side = TcpStream::connect(addr).await.unwrap();
        let (upstream_peer, _) = listener.accept().await.unwrap();
        (client_peer, client_side, upstream_side, upstream_peer)
    }

    /// A TCP splice with a minute's idle timeout and nothing to stop it.
    fn spawn_splice_tcp(
        client: TcpStream,
        upstream: TcpStream,
        bytes: ByteCounters,
    ) -> tokio::task::JoinHandle<(Closed, Transferred)> {
        tokio::spawn(async move {
            let (abort, revoke) = (CancellationToken::new(), CancellationToken::new());
            let stops = Stops { abort: &abort, revoke: &revoke };
            splice_tcp(client, upstream, Duration::from_secs(60), stops, &bytes).await
        })
    }

    #[tokio::test]
    async fn tcp_splice_moves_bulk_bytes_and_passes_half_closes_on() {
        let (mut client_peer, client, upstream, mut upstream_peer) = socket_pairs().await;
        let bytes = counters();
        let totals = bytes.clone();
        let task = spawn_splice_tcp(client, upstream, bytes);
        let payload: Vec<u8> = (0..3 * BURST + 17).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client_peer.write_all(&sent).await.unwrap();
            client_peer.shutdown().await.unwrap(); // half-close: done sending, still reading
            let mut answer = Vec::new();
            client_peer.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let mut received = Vec::new();
        upstream_peer.read_to_end(&mut received).await.unwrap(); // ends: the half-close arrived
        assert_eq!(received, payload);
        upstream_peer.write_all(b"done").await.unwrap();
        drop(upstream_peer);
        assert_eq!(writer.await.unwrap(), b"done");
        let (closed, moved) = task.await.unwrap();
        assert_eq!(closed, Closed::Finished);
        assert_eq!(moved, Transferred { up: payload.len() as u64, down: 4 });
        assert_eq!((totals.upstream.get(), totals.downstream.get()), (payload.len() as u64, 4));
    }

    /// Request/response exchanges of every size around the burst: each one is answered only
    /// after the whole of it arrived, so a readiness cleared too early would stall it.
    #[tokio::test]
    async fn tcp_splice_keeps_up_with_exchanges_of_every_size() {
        let (mut client_peer, client, upstream, mut upstream_peer) = socket_pairs().await;
        let task = spawn_splice_tcp(client, upstream, counters());
        let sizes = [1, 2, 100, 1500, BURST - 1, BURST, BURST + 1, 2 * BURST, 7, 3 * BURST - 5];
        let echo = tokio::spawn(async move {
            for size in sizes {
                let mut request = vec![0u8; size];
                upstream_peer.read_exact(&mut request).await.unwrap();
                upstream_peer.write_all(&request[..size.min(10)]).await.unwrap();
            }
        });
        let exchanges = async {
            for size in sizes {
                client_peer.write_all(&vec![size as u8; size]).await.unwrap();
                let mut answer = vec![0u8; size.min(10)];
                client_peer.read_exact(&mut answer).await.unwrap();
                assert!(answer.iter().all(|&b| b == size as u8));
            }
        };
        // A guard against a hang, not a speed check: the exchanges take milliseconds.
        tokio::time::timeout(Duration::from_secs(60), exchanges).await.expect("every exchange completes");
        echo.await.unwrap();
        drop(client_peer);
        let (closed, moved) = task.await.unwrap();
        assert_eq!(closed, Closed::Finished);
        assert_eq!(moved.up, sizes.iter().map(|&s| s as u64).sum::<u64>());
    }

    #[tokio::test]
    async fn a_reset_on_one_side_closes_the_other_at_once() {
        let (client_peer, client, upstream, mut upstream_peer) = socket_pairs().await;
        let task = spawn_splice_tcp(client, upstream, counters());
        client_peer.set_zero_linger().unwrap(); // close with RST
        drop(client_peer);
        // A guard against a hang: without the fix the tunnel waits for its minute of idleness.
        let (closed, _) = tokio::time::timeout(Duration::from_secs(10), task).await.expect("closed promptly").unwrap();
        assert_eq!(closed, Closed::Finished);
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), upstream_peer.read(&mut buf)).await.unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "the upstream side was closed: {read:?}");
    }

    #[tokio::test]
    async fn an_idle_tcp_tunnel_is_closed() {
        let (_client_peer, client, upstream, _upstream_peer) = socket_pairs().await;
        let (abort, revoke) = (CancellationToken::new(), CancellationToken::new());
        let stops = Stops { abort: &abort, revoke: &revoke };
        let (closed, _) = splice_tcp(client, upstream, Duration::from_millis(50), stops, &counters()).await;
        assert_eq!(closed, Closed::IdleTimeout);
    }
}
