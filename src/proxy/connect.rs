//! One request on a proxy connection: decide, dial, answer, then splice.
//!
//! Every refusal is answered before a byte reaches the upstream; only a CONNECT that passed
//! every step and whose upstream is already connected gets `200`, and the connected stream
//! moves into the tunnel task that hyper's upgrade hands the client socket to.

use std::convert::Infallible;

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_LENGTH, HeaderValue, RETRY_AFTER, TRANSFER_ENCODING};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::client_hello::{Peek, read_client_hello};
use super::registry::{Credential, OpenTunnel, Registration, TlsCheck};
use super::response::{self, Body};
use super::tunnel::{self, ByteCounters, Closed, Stops, Transferred};
use super::upstream::dial;
use super::{ConnectionSlot, Shared, Snapshot};
use crate::access_log::AccessRecord;
use crate::config::{Binding, Config};
use crate::decisions::Refusal;
use crate::identity::{CertIdentity, IdentityError, Proof, identify};
use crate::policy::{
    Action, Channel, FirstRecord, Policy, Reason, Target, Verdict, after_first_record, parse_authority,
};

/// Per-connection context shared by the requests a keep-alive connection carries.
pub(crate) struct ConnContext {
    pub shared: Arc<Shared>,
    pub binding: Option<Binding>,
    /// A verified client certificate that names an app, on TLS listeners.
    pub cert: Option<ClientCert>,
    pub client: SocketAddr,
    /// Held by the connection and by each of its tunnels: the `max_connections` slot.
    pub slot: Arc<ConnectionSlot>,
}

/// A client certificate verified at the handshake, checked again when a reload changes the
/// policy: a connection whose certificate no longer verifies under the new `client_ca` gets no
/// further CONNECTs.
pub(crate) struct ClientCert {
    pub identity: CertIdentity,
    pub chain: Arc<[CertificateDer<'static>]>,
    /// The generation it was last verified under.
    verified_under: AtomicU64,
}

impl ClientCert {
    pub fn new(identity: CertIdentity, chain: &[CertificateDer<'_>], generation: u64) -> ClientCert {
        let chain = chain.iter().map(|cert| cert.clone().into_owned()).collect();
        ClientCert { identity, chain, verified_under: AtomicU64::new(generation) }
    }

    /// Whether it verifies under the `[tls]` of `config` (checked once per generation).
    fn verifies_under(&self, config: &Config) -> bool {
        if self.verified_under.load(Ordering::Relaxed) == config.generation {
            return true;
        }
        let verified = crate::tls::client_chain_verifies(config.tls.as_ref(), &self.chain);
        if verified {
            self.verified_under.store(config.generation, Ordering::Relaxed);
        }
        verified
    }
}

/// What is known of a request so far, for its access log line, its counter and its body.
struct Attempt<'s> {
    snapshot: &'s Snapshot,
    started: Instant,
    client: SocketAddr,
    /// The id the client claimed (logged), and the app whose rules applied (counted).
    app: Option<Box<str>>,
    counted_app: Option<Box<str>>,
    channel: Option<Channel>,
    host: Option<Box<str>>,
    port: Option<u16>,
}

impl Attempt<'_> {
    fn target_text(&self) -> String {
        match (&self.host, self.port) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_string(),
            _ => String::new(),
        }
    }

    fn record(&self, decision: Verdict, reason: Reason, rule: Option<String>, status: u16) -> AccessRecord {
        let mut record = AccessRecord::new(self.client, self.snapshot.config.generation, decision, reason, status);
        record.app = self.app.clone();
        record.channel = self.channel;
        record.host = self.host.clone();
        record.port = self.port;
        record.rule = rule;
        record.duration_ms = self.started.elapsed().as_millis() as u64;
        record
    }

    fn count(&self, verdict: Verdict, reason: Reason) {
        self.snapshot.counters.count(self.counted_app.as_deref(), self.channel, verdict, reason);
    }

    /// Keep a refusal (or would-be refusal) among the app's recent decisions.
    fn note(&self, shared: &Shared, decision: Verdict, reason: Reason) {
        let (Some(app), Some(channel), Some(host), Some(port)) =
            (self.counted_app.as_deref(), self.channel, self.host.as_deref(), self.port)
        else {
            return;
        };
        let refusal = Refusal { app, channel, host, port, decision, reason };
        note_refusal(shared, &self.snapshot.config.policy, &refusal);
    }

    /// Count, log and answer a refusal whose message is the reason's standard sentence.
    fn refuse(&self, ctx: &ConnContext, reason: Reason, rule: Option<String>) -> Response<Body> {
        let app = self.app.as_deref().unwrap_or("-");
        let message = reason.message(app, self.channel.unwrap_or(Channel::Request), &self.target_text());
        self.refuse_with(ctx, reason, rule, &message)
    }

    fn refuse_with(&self, ctx: &ConnContext, reason: Reason, rule: Option<String>, message: &str) -> Response<Body> {
        self.count(Verdict::Deny, reason);
        self.note(&ctx.shared, Verdict::Deny, reason);
        ctx.shared.log.record(self.record(Verdict::Deny, reason, rule, reason.status()));
        response::refusal(reason, self.app.as_deref(), self.channel, self.host.as_deref(), self.port, message)
    }
}

/// The hyper service: every request on a proxy listener comes here.
pub(crate) async fn handle(req: Request<Incoming>, ctx: Arc<ConnContext>) -> Result<Response<Body>, Infallible> {
    let snapshot = ctx.shared.live.load_full();
    let mut attempt = Attempt {
        snapshot: &snapshot,
        started: Instant::now(),
        client: ctx.client,
        app: None,
        counted_app: None,
        channel: None,
        host: None,
        port: None,
    };
    if req.method() != Method::CONNECT {
        let reason = if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            attempt.host = req.uri().host().map(Into::into);
            attempt.port =
                req.uri().port_u16().or_else(|| req.uri().scheme().map(|s| if s == "https" { 443 } else { 80 }));
            // Identify first, so the refusal's log line and counter name the app. Credentials
            // are checked (and rate-limited) as for a CONNECT; none at all is no reason to
            // withhold the answer that plain HTTP is refused.
            let policy = &snapshot.config.policy;
            match authenticate(&req, &ctx, policy, &mut attempt) {
                Ok(Some(identity)) => {
                    attempt.counted_app = policy.effective_app(&identity.app).map(|app| app.id.clone());
                    attempt.app = Some(identity.app);
                    attempt.channel = Some(identity.channel);
                }
                Ok(None) => {}
                Err(refusal) => return Ok(refusal),
            }
            Reason::HttpsRequired
        } else {
            Reason::NotAProxyRequest
        };
        return Ok(attempt.refuse(&ctx, reason, None));
    }
    Ok(connect(req, &ctx, &mut attempt).await)
}

/// Who is asking: `None` when the request carries no identity at all; a refusal for wrong,
/// ambiguous or rate-limited credentials. A client that presents a password is held to the
/// failure rate limit (per address and app claimed) before it learns whether it was right.
#[allow(clippy::result_large_err)]
fn authenticate(
    req: &Request<Incoming>,
    ctx: &ConnContext,
    policy: &crate::policy::Policy,
    attempt: &mut Attempt<'_>,
) -> Result<Option<crate::identity::Identity>, Response<Body>> {
    let cert_identity = ctx.cert.as_ref().map(|cert| &cert.identity);
    let identified = identify(ctx.binding.as_ref(), cert_identity, req.headers(), policy);
    if ctx.binding.is_none() && ctx.cert.is_none() {
        let claimed = match &identified {
            // An app without a token has nothing to guess: never held up.
            Ok(identity) if policy.app(&identity.app).is_none_or(|app| app.token.is_none()) => None,
            Ok(identity) => Some(&*identity.app),
            Err(IdentityError::BadCredentials { app }) => Some(app.as_deref().unwrap_or("")),
            Err(_) => None,
        };
        if let Some(claimed) = claimed
            && let Err(wait) = ctx.shared.auth_throttle.check(ctx.client.ip(), claimed)
        {
            let mut response = attempt.refuse(ctx, Reason::AuthRateLimited, None);
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(wait.as_secs() + 1));
            return Err(response);
        }
    }
    match identified {
        Ok(identity) => Ok(Some(identity)),
        Err(IdentityError::Missing) => Ok(None),
        Err(IdentityError::BadCredentials { app }) => {
            ctx.shared.auth_throttle.failed(ctx.client.ip(), app.as_deref().unwrap_or(""));
            ctx.shared.metrics.auth_failures_proxy.inc();
            attempt.counted_app = app.clone();
            attempt.app = app;
            Err(attempt.refuse(ctx, Reason::BadCredentials, None))
        }
        Err(e @ (IdentityError::BadChannel | IdentityError::Ambiguous)) => {
            Err(attempt.refuse_with(ctx, Reason::MalformedRequest, None, &e.to_string()))
        }
    }
}

async fn connect(mut req: Request<Incoming>, ctx: &ConnContext, attempt: &mut Attempt<'_>) -> Response<Body> {
    let snapshot = attempt.snapshot;
    let config = &snapshot.config;
    let policy = &config.policy;
    let raw_target = match (req.uri().scheme(), req.uri().path_and_query(), req.uri().authority()) {
        (None, None, Some(authority)) => authority.as_str().to_owned(),
        _ => {
            let message = format!("CONNECT needs an authority-form target (host:port), not {}", req.uri());
            return attempt.refuse_with(ctx, Reason::MalformedRequest, None, &message);
        }
    };
    let target = match parse_authority(&raw_target) {
        Ok(target) => target,
        Err(e) => {
            let message = format!("malformed CONNECT target {raw_target:?}: {e}");
            return attempt.refuse_with(ctx, Reason::MalformedRequest, None, &message);
        }
    };
    attempt.host = Some(target.host.to_text().into());
    attempt.port = Some(target.port);
    if req.headers().contains_key(CONTENT_LENGTH) || req.headers().contains_key(TRANSFER_ENCODING) {
        // Whatever follows the head is the tunnel; a body would make its first bytes ambiguous.
        let message = "a CONNECT request has no body: Content-Length and Transfer-Encoding are not allowed";
        return attempt.refuse_with(ctx, Reason::MalformedRequest, None, message);
    }

    if let Some(cert) = &ctx.cert
        && !cert.verifies_under(config)
    {
        attempt.app = Some(cert.identity.app.clone());
        let message = "the client certificate no longer verifies under [tls].client_ca; reconnect with a valid one";
        let mut response = attempt.refuse_with(ctx, Reason::BadCredentials, None, message);
        response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let identity = match authenticate(&req, ctx, policy, attempt) {
        Ok(Some(identity)) => identity,
        Ok(None) => return attempt.refuse(ctx, Reason::AuthRequired, None),
        Err(refusal) => return refusal,
    };
    attempt.app = Some(identity.app.clone());
    attempt.channel = Some(identity.channel);

    let decision = policy.decide(&identity.app, identity.channel, &target);
    attempt.counted_app = decision.app.map(|app| app.id.clone());
    let rule = decision.rule.map(|r| r.to_string());
    if decision.verdict == Verdict::Deny {
        return attempt.refuse(ctx, decision.reason, rule);
    }

    // Registered before the dial, so that a reload from here on sees it and can revoke it.
    let credential = match identity.proof {
        Proof::Listener => Credential::Listener,
        Proof::Certificate => match &ctx.cert {
            Some(cert) => Credential::Certificate(cert.chain.clone()),
            None => Credential::Listener,
        },
        Proof::Token(token) => {
            let has_token = policy.app(&identity.app).is_some_and(|app| app.token.is_some());
            Credential::Token(has_token.then_some(token))
        }
    };
    let open = OpenTunnel {
        app: identity.app.clone(),
        channel: identity.channel,
        target: Target { host: target.host.clone().into_owned(), port: target.port },
        credential,
        upstream: std::sync::OnceLock::new(),
        tls_check: std::sync::OnceLock::new(),
        revoke: ctx.shared.abort.child_token(),
    };
    let registration = Registration::new(ctx.shared.clone(), open, config.generation);
    if !registration.recheck() {
        return attempt.refuse(ctx, Reason::Revoked, rule);
    }
    let dial_started = Instant::now();
    let dialed = tokio::select! {
        biased;
        _ = registration.tunnel().revoke.cancelled() => None,
        dialed = dial(policy, &ctx.shared.resolver, &target, config.limits.connect_timeout) => Some(dialed),
    };
    let (upstream, upstream_addr) = match dialed {
        Some(Ok(connected)) => connected,
        Some(Err(e)) => {
            tracing::debug!(client = %ctx.client, target = %attempt.target_text(), error = %e, "upstream refused");
            return attempt.refuse(ctx, e.reason(), rule);
        }
        None => return attempt.refuse(ctx, Reason::Revoked, rule),
    };
    registration.connected_to(upstream_addr);
    if !registration.recheck() {
        return attempt.refuse(ctx, Reason::Revoked, rule);
    }
    let metrics = &ctx.shared.metrics;
    metrics.upstream_connect_duration.observe(dial_started.elapsed().as_secs_f64());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let tunnel = Tunnel {
        record: attempt.record(decision.verdict, decision.reason, rule, 200),
        upstream_addr,
        started: attempt.started,
        counted_app: attempt.counted_app.clone(),
    };
    let settings = TunnelSettings {
        idle: config.limits.idle_timeout,
        verify_tls: config.verify_tls,
        hello_timeout: config.limits.header_timeout,
        action: decision.app.map_or(Action::Enforce, |app| app.action),
    };
    if decision.verdict == Verdict::Report {
        attempt.note(&ctx.shared, Verdict::Report, decision.reason);
    }
    let job = run_tunnel(ctx.shared.clone(), ctx.slot.clone(), on_upgrade, upstream, tunnel, registration, settings);
    ctx.shared.tracker.spawn(job);
    response::established(decision.verdict, decision.reason)
}

/// What a tunnel task needs from the config it was decided under.
struct TunnelSettings {
    idle: Duration,
    verify_tls: bool,
    /// How long the client has to send its ClientHello (the header timeout).
    hello_timeout: Duration,
    /// The action of the app whose rules applied (report mode records TLS failures).
    action: Action,
}

/// After `200`: check the client's ClientHello, forward it, splice, and log the tunnel once
/// it ends. The decision is counted here, once its TLS check has settled it.
async fn run_tunnel(
    shared: Arc<Shared>,
    _slot: Arc<ConnectionSlot>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    mut upstream: TcpStream,
    mut tunnel: Tunnel,
    registration: Registration,
    settings: TunnelSettings,
) {
    let revoke = registration.tunnel().revoke.clone();
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(error = %e, "client went away before the tunnel started");
            tunnel.count(&shared);
            shared.log.record(tunnel.finish(Closed::Finished, Transferred::default()));
            return;
        }
    };
    // A plain-TCP client is taken back out of hyper, for the buffer-free splice.
    let (mut client, prefix) = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => (ClientStream::Tcp(parts.io.into_inner()), parts.read_buf),
        Err(upgraded) => (ClientStream::Other(TokioIo::new(upgraded)), Bytes::new()),
    };
    // The first bytes to forward: what hyper read past the head, or the whole ClientHello.
    let mut hello = prefix.clone();
    if settings.verify_tls {
        let read = tokio::select! {
            biased;
            _ = revoke.cancelled() => None,
            read = read_client_hello(&prefix, &mut client, settings.hello_timeout) => Some(read),
        };
        let Some((bytes, peek)) = read else {
            let snapshot = shared.live.load();
            snapshot.counters.count(
                tunnel.counted_app.as_deref(),
                tunnel.record.channel,
                Verdict::Deny,
                Reason::Revoked,
            );
            shared.log.record(tunnel.finish(Closed::Revoked, Transferred::default()));
            return;
        };
        let first = match &peek {
            Peek::Hello { server_name } => FirstRecord::ClientHello(server_name.as_deref()),
            Peek::NotTls | Peek::NeedMore => FirstRecord::NotTls,
        };
        let before = (tunnel.record.decision, tunnel.record.reason);
        let (verdict, reason) = after_first_record(before, settings.action, &registration.tunnel().target, first);
        tunnel.record.decision = verdict;
        tunnel.record.reason = reason;
        if (verdict, reason) != before && verdict != Verdict::Allow {
            tunnel.note(&shared, verdict, reason);
        }
        if verdict == Verdict::Deny {
            tunnel.count(&shared);
            shared.log.record(tunnel.finish(Closed::TlsCheck, Transferred::default()));
            return;
        }
        let passed = matches!(first, FirstRecord::ClientHello(name) if registration.tunnel().target.is_named_by(name));
        registration.first_bytes(if passed { TlsCheck::Passed } else { TlsCheck::Reported });
        hello = Bytes::from(bytes);
    } else {
        registration.first_bytes(TlsCheck::Skipped);
    }
    // The last moment before a byte goes upstream: a reload since the decision (or its scan
    // having revoked the tunnel) is honoured here.
    if revoke.is_cancelled() || !registration.recheck() {
        let snapshot = shared.live.load();
        snapshot.counters.count(tunnel.counted_app.as_deref(), tunnel.record.channel, Verdict::Deny, Reason::Revoked);
        shared.log.record(tunnel.finish(Closed::Revoked, Transferred::default()));
        return;
    }
    tunnel.count(&shared);
    shared.metrics.tunnels_active.inc();
    let bytes = ByteCounters {
        upstream: shared.metrics.bytes_upstream.clone(),
        downstream: shared.metrics.bytes_downstream.clone(),
    };
    let hello_len = hello.len() as u64;
    let written = upstream.write_all(&hello).await;
    drop(hello); // not held for the tunnel's life
    let (closed, mut moved) = if let Err(e) = written {
        tracing::debug!(error = %e, "upstream went away before the ClientHello");
        (Closed::Finished, Transferred::default())
    } else {
        bytes.upstream.inc_by(hello_len);
        let stops = Stops { abort: &shared.abort, revoke: &revoke };
        match client {
            ClientStream::Tcp(client) => tunnel::splice_tcp(client, upstream, settings.idle, stops, &bytes).await,
            ClientStream::Other(client) => tunnel::splice(client, upstream, settings.idle, stops, &bytes).await,
        }
    };
    moved.up += hello_len;
    drop(registration);
    shared.metrics.tunnels_active.dec();
    shared.metrics.tunnel_duration.observe(tunnel.started.elapsed().as_secs_f64());
    if closed == Closed::Revoked {
        let snapshot = shared.live.load();
        snapshot.counters.count(tunnel.counted_app.as_deref(), tunnel.record.channel, Verdict::Deny, Reason::Revoked);
    }
    shared.log.record(tunnel.finish(closed, moved));
}

/// Keep `refusal` in its app's recent decisions and publish it, if the app is one the policy
/// knows (a claimed id that names no app is not worth a table).
fn note_refusal(shared: &Shared, policy: &Policy, refusal: &Refusal<'_>) {
    if policy.app(refusal.app).is_none() {
        return;
    }
    let now = SystemTime::now();
    shared.decisions.note(refusal, now);
    shared.events.publish(Some(refusal.app), "decision", || {
        serde_json::json!({
            "app": refusal.app,
            "channel": refusal.channel,
            "host": refusal.host,
            "port": refusal.port,
            "decision": refusal.decision.as_str(),
            "reason": refusal.reason.as_str(),
            "time": humantime::format_rfc3339_millis(now).to_string(),
        })
    });
}

/// The client side of a tunnel: the raw socket when the proxy listener is plain TCP, hyper's
/// upgraded stream otherwise (a TLS listener).
enum ClientStream {
    Tcp(TcpStream),
    Other(TokioIo<hyper::upgrade::Upgraded>),
}

impl tokio::io::AsyncRead for ClientStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(stream) => std::pin::Pin::new(stream).poll_read(cx, buf),
            ClientStream::Other(stream) => std::pin::Pin::new(stream).poll_read(cx, buf),
        }
    }
}

/// An established tunnel's log line, completed when it closes.
struct Tunnel {
    record: AccessRecord,
    upstream_addr: SocketAddr,
    started: Instant,
    counted_app: Option<Box<str>>,
}

impl Tunnel {
    /// Keep a refusal that the TLS check made among the app's recent decisions.
    fn note(&self, shared: &Shared, decision: Verdict, reason: Reason) {
        let record = &self.record;
        let (Some(app), Some(channel), Some(host), Some(port)) =
            (self.counted_app.as_deref(), record.channel, record.host.as_deref(), record.port)
        else {
            return;
        };
        let refusal = Refusal { app, channel, host, port, decision, reason };
        note_refusal(shared, &shared.live.load().config.policy, &refusal);
    }

    /// Count the tunnel's decision as it stands.
    fn count(&self, shared: &Shared) {
        let snapshot = shared.live.load();
        let record = &self.record;
        snapshot.counters.count(self.counted_app.as_deref(), record.channel, record.decision, record.reason);
    }

    fn finish(mut self, closed: Closed, moved: Transferred) -> AccessRecord {
        self.record.ts = SystemTime::now();
        self.record.upstream = Some(self.upstream_addr);
        self.record.bytes_up = moved.up;
        self.record.bytes_down = moved.down;
        self.record.duration_ms = self.started.elapsed().as_millis() as u64;
        self.record.closed_by = Some(closed.as_str());
        if closed == Closed::Revoked {
            self.record.decision = Verdict::Deny;
            self.record.reason = Reason::Revoked;
        }
        self.record
    }
}
