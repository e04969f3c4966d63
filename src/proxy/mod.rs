//! The hot path: listeners, connections, CONNECT handling, upstream dialing, tunnels.
//!
//! [`Gateway::bind`] opens every proxy listener; [`Gateway::run`] accepts until its shutdown
//! future completes, then stops accepting, lets open tunnels finish for `shutdown_grace`,
//! closes what is left and returns. Each accepted connection takes a `max_connections`
//! permit first (or is answered `503 overloaded` unread), is served by hyper's HTTP/1.1
//! server with upgrades, and each CONNECT goes through [`connect::handle`].

mod connect;
pub mod response;
pub mod tunnel;
pub mod upstream;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{AccessLog, AccessRecord};
use crate::config::{Config, ListenerSpec};
use crate::policy::{Reason, Verdict};
use connect::ConnContext;
use upstream::Resolver;

/// Request heads larger than this are refused by hyper (431) before any parsing work.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Connections turned away at the limit are each given at most this long to read the 503.
const OVERLOAD_LINGER: Duration = Duration::from_secs(1);
/// At most this many turned-away connections linger at once; beyond it they are just closed.
const MAX_LINGERING: usize = 256;

/// The live config every connection reads one snapshot of.
pub type LiveConfig = Arc<ArcSwap<Config>>;

/// State shared by every listener, connection and tunnel.
pub(crate) struct Shared {
    pub live: LiveConfig,
    pub resolver: Resolver,
    pub log: AccessLog,
    /// Fires when shutdown starts: stop accepting, close idle keep-alive connections.
    pub stop: CancellationToken,
    /// Fires when the shutdown grace has run out: close every tunnel.
    pub abort: CancellationToken,
    pub tracker: TaskTracker,
    overloaded_response: Vec<u8>,
    lingering: Arc<Semaphore>,
}

/// A bound, not yet running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    listeners: Vec<(TcpListener, ListenerSpec)>,
    permits: Arc<Semaphore>,
}

impl Gateway {
    /// Bind every proxy listener of `config` and make it generation 1.
    pub async fn bind(mut config: Config, log: AccessLog) -> io::Result<Gateway> {
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for spec in &config.listeners {
            let listener = TcpListener::bind(spec.listen)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", spec.listen)))?;
            listeners.push((listener, spec.clone()));
        }
        config.generation = 1;
        let permits = Arc::new(Semaphore::new(config.limits.max_connections));
        let shared = Arc::new(Shared {
            live: Arc::new(ArcSwap::from_pointee(config)),
            resolver: Resolver::default(),
            log,
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            tracker: TaskTracker::new(),
            overloaded_response: response::overloaded_bytes(),
            lingering: Arc::new(Semaphore::new(MAX_LINGERING)),
        });
        Ok(Gateway { shared, listeners, permits })
    }

    /// The bound proxy addresses, `server.listen` first, then each `[[listener]]` in order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|(l, _)| l.local_addr().ok()).collect()
    }

    /// The live config, for reloads.
    pub fn live(&self) -> LiveConfig {
        self.shared.live.clone()
    }

    /// Serve until `shutdown` completes, then drain (see the module docs).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Gateway { shared, listeners, permits } = self;
        for (listener, spec) in listeners {
            shared.tracker.spawn(accept_loop(listener, spec, shared.clone(), permits.clone()));
        }
        shutdown.await;
        let grace = shared.live.load().limits.shutdown_grace;
        tracing::info!(grace = ?grace, "shutting down: no new connections, draining tunnels");
        shared.stop.cancel();
        shared.tracker.close();
        if tokio::time::timeout(grace, shared.tracker.wait()).await.is_err() {
            tracing::info!("shutdown grace over: closing the remaining tunnels");
            shared.abort.cancel();
            shared.tracker.wait().await;
        }
    }
}

async fn accept_loop(listener: TcpListener, spec: ListenerSpec, shared: Arc<Shared>, permits: Arc<Semaphore>) {
    let mut backoff = Duration::from_millis(5);
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
            Err(e) => {
                // Out of file descriptors (EMFILE/ENFILE) or a transient failure: back off
                // instead of spinning, so established tunnels keep the CPU.
                tracing::warn!(error = %e, listen = %spec.listen, "accept failed; backing off {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let ctx = ConnContext {
                    shared: shared.clone(),
                    binding: spec.binding.clone(),
                    client,
                    permit: Arc::new(permit),
                };
                shared.tracker.spawn(serve_connection(stream, Arc::new(ctx)));
            }
            Err(_) => turn_away(stream, client, &shared),
        }
    }
}

/// Serve one client connection: HTTP/1.1 with upgrades, until it closes or shutdown.
async fn serve_connection(stream: TcpStream, ctx: Arc<ConnContext>) {
    let _ = stream.set_nodelay(true);
    let header_timeout = ctx.shared.live.load().limits.header_timeout;
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

/// Answer a connection over `max_connections` with 503 without reading its request.
fn turn_away(stream: TcpStream, client: SocketAddr, shared: &Arc<Shared>) {
    let _ = stream.try_write(&shared.overloaded_response);
    shared.log.record(AccessRecord {
        ts: std::time::SystemTime::now(),
        app: None,
        channel: None,
        client,
        host: None,
        port: None,
        decision: Verdict::Deny,
        reason: Reason::Overloaded,
        rule: None,
        status: Reason::Overloaded.status(),
        upstream: None,
        bytes_up: 0,
        bytes_down: 0,
        duration_ms: 0,
        generation: shared.live.load().generation,
        closed_by: None,
    });
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
