//! One request on a proxy connection: decide, dial, answer, then splice.
//!
//! Every refusal is answered before a byte reaches the upstream; only a CONNECT that passed
//! every step and whose upstream is already connected gets `200`, and the connected stream
//! moves into the tunnel task that hyper's upgrade hands the client socket to.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;

use super::Shared;
use super::response::{self, Body};
use super::tunnel::{self, Closed, Transferred};
use super::upstream::dial;
use crate::access_log::AccessRecord;
use crate::config::{Binding, Config};
use crate::identity::{IdentityError, identify};
use crate::policy::{Channel, Reason, Verdict, parse_authority};

/// Per-connection context shared by the requests a keep-alive connection carries.
pub(crate) struct ConnContext {
    pub shared: Arc<Shared>,
    pub binding: Option<Binding>,
    pub client: SocketAddr,
    /// Held by the connection and by each of its tunnels: the `max_connections` slot.
    pub permit: Arc<tokio::sync::OwnedSemaphorePermit>,
}

/// What is known of a request so far, for its access log line and refusal body.
struct Attempt {
    started: Instant,
    client: SocketAddr,
    generation: u64,
    app: Option<Box<str>>,
    channel: Option<Channel>,
    host: Option<Box<str>>,
    port: Option<u16>,
}

impl Attempt {
    fn target_text(&self) -> String {
        match (&self.host, self.port) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_string(),
            _ => String::new(),
        }
    }

    fn record(&self, decision: Verdict, reason: Reason, rule: Option<String>, status: u16) -> AccessRecord {
        AccessRecord {
            ts: SystemTime::now(),
            app: self.app.clone(),
            channel: self.channel,
            client: self.client,
            host: self.host.clone(),
            port: self.port,
            decision,
            reason,
            rule,
            status,
            upstream: None,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: self.started.elapsed().as_millis() as u64,
            generation: self.generation,
            closed_by: None,
        }
    }

    /// Log and answer a refusal whose message is the reason's standard sentence.
    fn refuse(&self, ctx: &ConnContext, reason: Reason, rule: Option<String>) -> Response<Body> {
        let message = reason.message(
            self.app.as_deref().unwrap_or("-"),
            self.channel.unwrap_or(Channel::Request),
            &self.target_text(),
        );
        self.refuse_with(ctx, reason, rule, &message)
    }

    fn refuse_with(&self, ctx: &ConnContext, reason: Reason, rule: Option<String>, message: &str) -> Response<Body> {
        ctx.shared.log.record(self.record(Verdict::Deny, reason, rule, reason.status()));
        response::refusal(reason, self.app.as_deref(), self.channel, self.host.as_deref(), self.port, message)
    }
}

/// The hyper service: every request on a proxy listener comes here.
pub(crate) async fn handle(req: Request<Incoming>, ctx: Arc<ConnContext>) -> Result<Response<Body>, Infallible> {
    let config = ctx.shared.live.load_full();
    let mut attempt = Attempt {
        started: Instant::now(),
        client: ctx.client,
        generation: config.generation,
        app: None,
        channel: None,
        host: None,
        port: None,
    };
    if req.method() != Method::CONNECT {
        let reason = if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            attempt.host = req.uri().host().map(Into::into);
            attempt.port =
                req.uri().port_u16().or_else(|| req.uri().scheme().map(|s| if s == "https" { 443 } else { 80 }));
            Reason::HttpsRequired
        } else {
            Reason::NotAProxyRequest
        };
        return Ok(attempt.refuse(&ctx, reason, None));
    }
    Ok(connect(req, &ctx, &config, &mut attempt).await)
}

async fn connect(
    mut req: Request<Incoming>,
    ctx: &ConnContext,
    config: &Arc<Config>,
    attempt: &mut Attempt,
) -> Response<Body> {
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

    let identity = match identify(ctx.binding.as_ref(), req.headers(), policy) {
        Ok(identity) => identity,
        Err(IdentityError::Missing) => return attempt.refuse(ctx, Reason::AuthRequired, None),
        Err(IdentityError::BadCredentials { app }) => {
            attempt.app = app;
            return attempt.refuse(ctx, Reason::BadCredentials, None);
        }
        Err(e @ IdentityError::BadChannel) => {
            return attempt.refuse_with(ctx, Reason::MalformedRequest, None, &e.to_string());
        }
    };
    attempt.app = Some(identity.app.clone());
    attempt.channel = Some(identity.channel);

    let decision = policy.decide(&identity.app, identity.channel, &target);
    let rule = decision.rule.map(|r| r.to_string());
    if decision.verdict == Verdict::Deny {
        return attempt.refuse(ctx, decision.reason, rule);
    }

    let (upstream, upstream_addr) =
        match dial(policy, &ctx.shared.resolver, &target, config.limits.connect_timeout).await {
            Ok(connected) => connected,
            Err(e) => {
                tracing::debug!(client = %ctx.client, target = %attempt.target_text(), error = %e, "upstream refused");
                return attempt.refuse(ctx, e.reason(), rule);
            }
        };

    let on_upgrade = hyper::upgrade::on(&mut req);
    let tunnel = Tunnel {
        record: attempt.record(decision.verdict, decision.reason, rule, 200),
        upstream_addr,
        started: attempt.started,
    };
    let shared = ctx.shared.clone();
    let permit = ctx.permit.clone();
    let idle = config.limits.idle_timeout;
    ctx.shared.tracker.spawn(async move {
        let _permit = permit;
        let (closed, moved) = match on_upgrade.await {
            Ok(upgraded) => tunnel::splice(TokioIo::new(upgraded), upstream, idle, &shared.abort).await,
            Err(e) => {
                tracing::debug!(error = %e, "client went away before the tunnel started");
                (Closed::Finished, Transferred::default())
            }
        };
        shared.log.record(tunnel.finish(closed, moved));
    });
    response::established(decision.verdict, decision.reason)
}

/// An established tunnel's log line, completed when it closes.
struct Tunnel {
    record: AccessRecord,
    upstream_addr: SocketAddr,
    started: Instant,
}

impl Tunnel {
    fn finish(mut self, closed: Closed, moved: Transferred) -> AccessRecord {
        self.record.ts = SystemTime::now();
        self.record.upstream = Some(self.upstream_addr);
        self.record.bytes_up = moved.up;
        self.record.bytes_down = moved.down;
        self.record.duration_ms = self.started.elapsed().as_millis() as u64;
        self.record.closed_by = Some(closed.as_str());
        self.record
    }
}
