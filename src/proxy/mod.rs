//! The hot path: listeners, connections, CONNECT handling, upstream dialing, tunnels.
//!
//! [`Gateway::bind`] opens every proxy listener (and the admin listener); [`Gateway::run`]
//! accepts until its shutdown future completes, then stops accepting, lets open tunnels
//! finish for `shutdown_grace`, closes what is left and returns. Each accepted connection
//! takes a `max_connections` permit first (or is answered `503 overloaded` unread), is served
//! by hyper's HTTP/1.1 server with upgrades, and each request goes through
//! `connect::handle` against one [`Snapshot`] of the live config.

pub mod client_hello;
mod connect;
pub(crate) mod registry;
pub mod response;
pub mod tunnel;
pub mod upstream;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{AccessLog, AccessRecord};
use crate::config::{Config, ListenerSpec, Loader};
use crate::decisions::RecentDecisions;
use crate::events::Events;
use crate::identity::CertIdentity;
use crate::metrics::{Metrics, RequestCounters};
use crate::policy::{Reason, Verdict};
use crate::reload::Reloader;
use crate::throttle::AuthThrottle;
use connect::{ClientCert, ConnContext};
use registry::Tunnels;
use upstream::Resolver;

/// Request heads larger than this are refused by hyper (431) before any parsing work.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Connections turned away at the limit are each given at most this long to read the 503.
const OVERLOAD_LINGER: Duration = Duration::from_secs(1);
/// At most this many turned-away connections linger at once; beyond it they are just closed.
const MAX_LINGERING: usize = 256;

/// One generation of everything a request reads: the config and its counter cache.
pub struct Snapshot {
    pub config: Config,
    pub(crate) counters: RequestCounters,
}

impl Snapshot {
    pub fn new(config: Config, metrics: &Metrics) -> Snapshot {
        let counters = RequestCounters::new(metrics, &config.policy);
        Snapshot { config, counters }
    }
}

/// The live snapshot: one `load` per request, a `store` per successful reload.
pub type LiveSnapshot = Arc<ArcSwap<Snapshot>>;

/// State shared by every listener, connection and tunnel.
pub(crate) struct Shared {
    pub live: LiveSnapshot,
    pub resolver: Resolver,
    pub log: AccessLog,
    pub metrics: Metrics,
    /// Fires when shutdown is asked for: `/readyz` says 503 from then on.
    pub unready: CancellationToken,
    /// Fires when the shutdown delay is over: stop accepting, close idle keep-alive
    /// connections, drain.
    pub stop: CancellationToken,
    /// Fires when the shutdown grace has run out: close every tunnel.
    pub abort: CancellationToken,
    pub tracker: TaskTracker,
    pub tunnels: Tunnels,
    /// Failed proxy authentication per client address.
    pub auth_throttle: AuthThrottle,
    /// Each app's recent refusals (`GET /v1/apps/{id}/decisions`).
    pub decisions: RecentDecisions,
    /// Refusals, app changes and reloads as they happen (`GET /v1/events`).
    pub events: Events,
    /// Consent records, prompts and auth codes: kept across reloads.
    pub scopes: Arc<crate::scopes::service::ScopeService>,
    /// The bound address of `server.listen` (what the PAC file names).
    pub proxy_addr: SocketAddr,
    /// Whether the admin listener runs (a reload may not remove its token then).
    pub admin_running: bool,
    /// Whether a proxy listener runs over TLS (a reload may not remove `[tls]` then).
    pub tls_running: bool,
    /// When each event loop last turned (`/healthz`).
    pub loops: Heartbeats,
    overloaded_response: Vec<u8>,
    lingering: Arc<Semaphore>,
}

/// How often an event loop notes that it turns.
const BEAT_EVERY: Duration = Duration::from_secs(1);
/// An event loop that has not turned for this long is stalled: `/healthz` answers 503, so
/// that a liveness probe restarts a gateway whose proxy no longer serves (the admin listener
/// runs on the main runtime and would answer regardless).
pub(crate) const STALLED_AFTER: Duration = Duration::from_secs(10);

/// When each of the `workers` event loops last turned.
pub(crate) struct Heartbeats {
    epoch: std::time::Instant,
    /// Milliseconds since `epoch`, one per loop.
    beats: Box<[AtomicU64]>,
}

impl Heartbeats {
    fn new(loops: usize) -> Heartbeats {
        Heartbeats { epoch: std::time::Instant::now(), beats: (0..loops).map(|_| AtomicU64::new(0)).collect() }
    }

    fn beat(&self, index: usize) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.beats[index].store(now, Ordering::Relaxed);
    }

    /// The first loop that has not turned for `after`, and for how long.
    pub fn stalled(&self, after: Duration) -> Option<(usize, Duration)> {
        self.stalled_at(self.epoch.elapsed(), after)
    }

    fn stalled_at(&self, now: Duration, after: Duration) -> Option<(usize, Duration)> {
        self.beats.iter().enumerate().find_map(|(index, beat)| {
            let since = now.saturating_sub(Duration::from_millis(beat.load(Ordering::Relaxed)));
            (since >= after).then_some((index, since))
        })
    }
}

/// A client connection's `max_connections` slot; it also keeps the active gauge.
pub(crate) struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl ConnectionSlot {
    fn new(permit: OwnedSemaphorePermit, gauge: &prometheus::IntGauge) -> ConnectionSlot {
        gauge.inc();
        ConnectionSlot { _permit: permit, gauge: gauge.clone() }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A bound, not yet running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    /// With `workers = 0`: the proxy listeners, served on the main runtime.
    listeners: Vec<(TcpListener, ListenerSpec)>,
    /// Every proxy listener's address, and whether it is served over TLS.
    addrs: Vec<(SocketAddr, bool)>,
    /// With `workers` > 0: the event loops, started, each waiting for `run` to let it accept.
    workers: Vec<Worker>,
    admin: Option<TcpListener>,
    permits: Arc<Semaphore>,
    reloader: Arc<Reloader>,
}

impl Gateway {
    /// Bind every listener of `config` and make it generation 1. `loader` is what loaded it;
    /// reloads go through it (and its cache).
    pub async fn bind(mut config: Config, loader: Loader, log: AccessLog) -> io::Result<Gateway> {
        let workers = config.server.workers;
        let mut listeners = Vec::with_capacity(config.listeners.len());
        let mut spares: Vec<Vec<(TcpListener, ListenerSpec)>> = (1..workers).map(|_| Vec::new()).collect();
        for spec in &config.listeners {
            if workers <= 1 {
                // One event loop: a listener nobody else can join.
                listeners.push((bind(spec.listen).await?, spec.clone()));
                continue;
            }
            let first = bind_shared(spec.listen)?;
            let addr = first.local_addr()?; // port 0 resolved: the others join this one
            listeners.push((first, spec.clone()));
            for spare in &mut spares {
                spare.push((bind_shared(addr)?, spec.clone()));
            }
        }
        let addrs = listeners
            .iter()
            .map(|(listener, spec)| Ok((listener.local_addr()?, spec.tls)))
            .collect::<io::Result<Vec<_>>>()?;
        let proxy_addr = addrs[0].0;
        let admin = match config.server.admin_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        config.generation = 1;
        if let Some(dir) = &config.apps_dir {
            // What writers killed between their temporary file and its rename left behind.
            match crate::store::remove_stale_temporaries(dir, Duration::from_secs(60)) {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, apps_dir = %dir.display(), "removed stale temporary files"),
                Err(e) => tracing::warn!(error = %e, apps_dir = %dir.display(), "cannot clean up temporary files"),
            }
        }
        let metrics = Metrics::new();
        metrics.register(Box::new(log.dropped_counter()));
        metrics.connections_max.set(config.limits.max_connections as i64);
        let permits = Arc::new(Semaphore::new(config.limits.max_connections));
        let resolver = Resolver::new(&config.dns, config.limits.connect_timeout)
            .map_err(|e| io::Error::other(format!("cannot set up DNS ([dns] or /etc/resolv.conf): {e}")))?;
        let scopes = crate::scopes::service::ScopeService::open(&config.scopes, metrics.scope_decisions.clone())?;
        // Apps deleted while the gateway was down take their consent records with them.
        scopes.forget_apps_not_in(&config.policy);
        let snapshot = Snapshot::new(config, &metrics);
        crate::reload::publish(&metrics, &snapshot);
        let shared = Arc::new(Shared {
            live: Arc::new(ArcSwap::from_pointee(snapshot)),
            resolver,
            log,
            metrics,
            unready: CancellationToken::new(),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            tracker: TaskTracker::new(),
            tunnels: Tunnels::default(),
            auth_throttle: AuthThrottle::default(),
            decisions: RecentDecisions::default(),
            events: Events::default(),
            scopes: Arc::new(scopes),
            proxy_addr,
            admin_running: admin.is_some(),
            tls_running: listeners.iter().any(|(_, spec)| spec.tls),
            loops: Heartbeats::new(workers),
            overloaded_response: response::overloaded_bytes(),
            lingering: Arc::new(Semaphore::new(MAX_LINGERING)),
        });
        let reloader = Arc::new(Reloader::new(shared.clone(), loader));
        // The event loops start here, so that one that cannot start fails the start of the
        // gateway rather than leave its listeners closed; they accept once `run` says so.
        let mut loops = Vec::with_capacity(workers);
        if workers > 0 {
            for (i, set) in std::iter::once(std::mem::take(&mut listeners)).chain(spares).enumerate() {
                let worker = spawn_worker(i, set, shared.clone(), permits.clone())
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot start event loop {i}: {e}")))?;
                loops.push(worker);
            }
        }
        Ok(Gateway { shared, listeners, addrs, workers: loops, admin, permits, reloader })
    }

    /// The bound proxy addresses, `server.listen` first, then each `[[listener]]` in order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.iter().map(|(addr, _)| *addr).collect()
    }

    /// The bound proxy addresses that are served over TLS.
    pub fn tls_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.iter().filter(|(_, tls)| *tls).map(|(addr, _)| *addr).collect()
    }

    /// The bound admin address, when `admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// What reloads the config: SIGHUP, the file watcher and `POST /-/reload` all call it.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// Serve until `shutdown` completes, then drain (see the module docs). The admin listener
    /// keeps answering while the tunnels drain (`/readyz` says 503), and stops last.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Gateway { shared, listeners, addrs: _, workers, admin, permits, reloader } = self;
        // Should this future be dropped before it ends (its task aborted), stop everything it
        // started, the event loops' threads included.
        let mut hard_stop = HardStopOnDrop(Some(shared.clone()));
        let admin_stop = CancellationToken::new();
        let admin_task = admin.map(|listener| {
            let serve = crate::admin::serve(listener, shared.clone(), reloader.clone(), admin_stop.clone());
            tokio::spawn(serve)
        });
        for (listener, spec) in listeners {
            shared.tracker.spawn(accept_loop(listener, spec, shared.clone(), permits.clone()));
        }
        let mut threads = Vec::new();
        for (index, worker) in workers.into_iter().enumerate() {
            shared.loops.beat(index);
            let _ = worker.go.send(());
            threads.push(worker.thread);
        }
        shutdown.await;
        shared.unready.cancel();
        let limits = shared.live.load().config.limits;
        if !limits.shutdown_delay.is_zero() {
            tracing::info!(delay = ?limits.shutdown_delay, "shutting down: /readyz is 503; still accepting for the delay");
            tokio::time::sleep(limits.shutdown_delay).await;
        }
        let grace = limits.shutdown_grace;
        tracing::info!(grace = ?grace, "shutting down: no new connections, draining tunnels");
        shared.stop.cancel();
        shared.tracker.close();
        if tokio::time::timeout(grace, shared.tracker.wait()).await.is_err() {
            tracing::info!("shutdown grace over: closing the remaining tunnels");
            shared.abort.cancel();
            shared.tracker.wait().await;
        }
        admin_stop.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        // The workers end once everything they served has drained (just now).
        let _ = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await;
        hard_stop.0 = None;
    }
}

/// Bind `addr` with `SO_REUSEPORT`, so that every worker can listen on it.
fn bind_shared(addr: SocketAddr) -> io::Result<TcpListener> {
    let listen = || {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    listen().map_err(|e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// An event loop's thread, started by [`Gateway::bind`].
struct Worker {
    /// Sent by [`Gateway::run`]: start accepting. Dropped unsent (the gateway dropped before
    /// it ran): the thread ends.
    go: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// Stops the gateway hard (no new connections, every tunnel closed) if [`Gateway::run`] is
/// dropped before it has drained.
struct HardStopOnDrop(Option<Arc<Shared>>);

impl Drop for HardStopOnDrop {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.unready.cancel();
            shared.stop.cancel();
            shared.abort.cancel();
            shared.tracker.close();
        }
    }
}

/// Worker `index`: a thread with an event loop of its own that, once told to go, accepts on
/// `listeners` and serves every connection it accepts, tunnel included, on that thread; it
/// runs until the gateway has drained. Everything else (the policy snapshot,
/// `max_connections`, metrics, the access log, revocation, shutdown) is shared with the rest
/// of the gateway as it is.
fn spawn_worker(
    index: usize,
    listeners: Vec<(TcpListener, ListenerSpec)>,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
) -> io::Result<Worker> {
    // Moved off this runtime's reactor, onto the worker's.
    let listeners = listeners
        .into_iter()
        .map(|(listener, spec)| Ok((listener.into_std()?, spec)))
        .collect::<io::Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (go, start) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name(format!("gw-worker-{index}")).spawn(move || {
        runtime.block_on(async move {
            if start.await.is_err() {
                return;
            }
            // Not tracked: it beats while the loop drains, and ends with the loop.
            let beats = shared.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(BEAT_EVERY);
                loop {
                    every.tick().await;
                    beats.loops.beat(index);
                }
            });
            for (listener, spec) in listeners {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        shared.tracker.spawn(accept_loop(listener, spec, shared.clone(), permits.clone()));
                    }
                    Err(e) => tracing::error!(worker = index, error = %e, "cannot listen in a worker"),
                }
            }
            shared.tracker.wait().await;
        });
    })?;
    Ok(Worker { go, thread })
}

async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Whether an accept failed for want of file descriptors.
fn out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE (24): this process's limit; ENFILE (23): the system's.
    matches!(e.raw_os_error(), Some(24 | 23))
}

/// One descriptor held back for the moment the process runs out: closing it lets the
/// accept loop take one waiting connection and answer it `503 overloaded` instead of leaving
/// it in the backlog (where it would be accepted again and again, failing each time).
struct ReserveDescriptor(Option<std::fs::File>);

impl ReserveDescriptor {
    fn new() -> ReserveDescriptor {
        ReserveDescriptor(std::fs::File::open("/dev/null").ok())
    }

    /// Free the reserve, turn one waiting connection away with it, and take it back.
    async fn turn_away_one(&mut self, listener: &TcpListener, shared: &Shared) -> bool {
        if self.0.take().is_none() {
            *self = ReserveDescriptor::new();
            return false;
        }
        let accepted = tokio::time::timeout(Duration::from_millis(10), listener.accept()).await;
        let turned_away = if let Ok(Ok((stream, client))) = accepted {
            count_overloaded(client, shared);
            let _ = stream.try_write(&shared.overloaded_response);
            // Read what the client already sent, so the close is a FIN and not a reset that
            // could destroy the answer in flight.
            let mut sink = [0u8; 4096];
            while matches!(stream.try_read(&mut sink), Ok(n) if n > 0) {}
            true
        } else {
            false
        };
        *self = ReserveDescriptor::new();
        turned_away
    }
}

async fn accept_loop(listener: TcpListener, spec: ListenerSpec, shared: Arc<Shared>, permits: Arc<Semaphore>) {
    let mut backoff = Duration::from_millis(5);
    let mut reserve = ReserveDescriptor::new();
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, client) = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(5);
                accepted
            }
            Err(e) if out_of_descriptors(&e) && reserve.turn_away_one(&listener, &shared).await => {
                tracing::warn!(error = %e, listen = %spec.listen, "out of file descriptors: answering 503 overloaded");
                // A short pause: the backlog is answered a few hundred connections a second
                // without the loop spinning on a limit that will not lift at once.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            Err(e) => {
                // Out of file descriptors with no reserve, or a transient failure: back off
                // instead of spinning, so established tunnels keep the CPU.
                tracing::warn!(error = %e, listen = %spec.listen, "accept failed; backing off {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let slot = Arc::new(ConnectionSlot::new(permit, &shared.metrics.connections_active));
                let ctx =
                    ConnContext { shared: shared.clone(), binding: spec.binding.clone(), cert: None, client, slot };
                if spec.tls {
                    shared.tracker.spawn(serve_tls_connection(stream, ctx));
                } else {
                    shared.tracker.spawn(serve_connection(stream, Arc::new(ctx)));
                }
            }
            Err(_) => turn_away(stream, client, &shared),
        }
    }
}

/// Complete the TLS handshake of an HTTPS-proxy connection (with the server config in force,
/// so a reload rotates certificates for new connections), note the identity of a verified
/// client certificate, then serve it like any other.
async fn serve_tls_connection(stream: TcpStream, mut ctx: ConnContext) {
    let snapshot = ctx.shared.live.load_full();
    let Some(tls) = snapshot.config.tls.as_ref() else {
        tracing::warn!(client = %ctx.client, "a TLS listener without [tls] in the config in force; closing");
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let handshake = tokio::time::timeout(snapshot.config.limits.header_timeout, acceptor.accept(stream)).await;
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(client = %ctx.client, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(client = %ctx.client, "TLS handshake timed out");
            return;
        }
    };
    ctx.cert = stream.get_ref().1.peer_certificates().and_then(|chain| {
        let (app, channel) = crate::tls::certificate_identity(chain.first()?)?;
        let identity = CertIdentity { app: app.into(), channel };
        Some(ClientCert::new(identity, chain, snapshot.config.generation))
    });
    serve_connection(stream, Arc::new(ctx)).await;
}

/// Serve one client connection: HTTP/1.1 with upgrades, until it closes or shutdown.
async fn serve_connection<S>(stream: S, ctx: Arc<ConnContext>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout = ctx.shared.live.load().config.limits.header_timeout;
    let stop = ctx.shared.stop.clone();
    let service_ctx = ctx.clone();
    let service = service_fn(move |req| connect::handle(req, service_ctx.clone()));
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).max_buf_size(MAX_HEAD_BYTES);
    let conn = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(client = %ctx.client, error = %e, "connection ended with an error");
    }
}

/// Count and log a connection turned away `503 overloaded`.
fn count_overloaded(client: SocketAddr, shared: &Shared) {
    let snapshot = shared.live.load();
    snapshot.counters.count(None, None, Verdict::Deny, Reason::Overloaded);
    let status = Reason::Overloaded.status();
    let record = AccessRecord::new(client, snapshot.config.generation, Verdict::Deny, Reason::Overloaded, status);
    shared.log.record(record);
}

/// Answer a connection over `max_connections` with 503 without reading its request.
fn turn_away(stream: TcpStream, client: SocketAddr, shared: &Arc<Shared>) {
    let _ = stream.try_write(&shared.overloaded_response);
    count_overloaded(client, shared);
    // Closing at once with the request unread would reset the connection and could destroy
    // the 503 in flight; give the client a moment to read it, within a bounded budget.
    if let Ok(linger) = shared.lingering.clone().try_acquire_owned() {
        shared.tracker.spawn(async move {
            let _linger = linger;
            let mut stream = stream;
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(OVERLOAD_LINGER, async {
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_has_not_turned_for_long_enough_is_stalled() {
        let loops = Heartbeats::new(3);
        loops.beats[0].store(12_000, Ordering::Relaxed);
        loops.beats[1].store(3_500, Ordering::Relaxed);
        loops.beats[2].store(2_000, Ordering::Relaxed);
        let after = Duration::from_secs(10);
        assert_eq!(loops.stalled_at(Duration::from_millis(11_900), after), None);
        assert_eq!(loops.stalled_at(Duration::from_millis(12_000), after), Some((2, Duration::from_secs(10))));
        assert_eq!(loops.stalled_at(Duration::from_millis(14_000), after), Some((1, Duration::from_millis(10_500))));
        // no loops (workers = 0): never stalled
        assert_eq!(Heartbeats::new(0).stalled_at(Duration::from_secs(3600), after), None);
        // a fresh beat clears it
        loops.beat(1);
        loops.beat(2);
        assert_eq!(loops.stalled(after), None);
    }
}
