//! The tunnels a reload must look at.
//!
//! A CONNECT is registered as soon as the policy allows it, before its upstream is dialled,
//! and stays registered until its tunnel closes. A reload swaps the new snapshot in and then
//! re-decides every registered tunnel as a whole: the identity it was opened with (the token
//! it presented, the client certificate it verified with), the decision for its host, and the
//! address it is connected to. Those the new policy refuses are revoked. A tunnel registered
//! after the reload's scan began checks the generation itself ([`Registration::recheck`]), so
//! no tunnel slips between a decision under one generation and a scan under the next.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::config::Config;
use crate::identity;
use crate::policy::{Action, Channel, Target, Verdict};

/// How a tunnel's client proved who it is, to be checked again under a new policy.
pub(crate) enum Credential {
    /// A `[[listener]]` bound to the app (listeners change only on restart).
    Listener,
    /// A verified client certificate chain, end entity first.
    Certificate(Arc<[CertificateDer<'static>]>),
    /// `Proxy-Authorization: Basic`, with the password presented when the app had a token
    /// (`None` when it had none: any password was accepted, and none is kept).
    Token(Option<Box<str>>),
}

/// What the check of a tunnel's first bytes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsCheck {
    /// A ClientHello naming the CONNECT host.
    Passed,
    /// Not checked: `verify_tls` was off.
    Skipped,
    /// Failed, and let through because the app was in `report` mode.
    Reported,
}

/// An allowed CONNECT, from its decision until its tunnel closes.
pub(crate) struct OpenTunnel {
    pub app: Box<str>,
    pub channel: Channel,
    pub target: Target<'static>,
    pub credential: Credential,
    /// The address it is connected to, once dialled.
    pub upstream: OnceLock<SocketAddr>,
    /// What its first bytes were, once read.
    pub tls_check: OnceLock<TlsCheck>,
    /// Cancelled to revoke it (a child of the shutdown abort token).
    pub revoke: CancellationToken,
}

impl OpenTunnel {
    /// Whether the policy of `config` would allow this tunnel, all of it, now.
    pub fn permitted_by(&self, config: &Config) -> bool {
        let policy = &config.policy;
        let identity_holds = match &self.credential {
            Credential::Listener => true,
            Credential::Certificate(chain) => crate::tls::client_chain_verifies(config.tls.as_ref(), chain),
            Credential::Token(token) => identity::token_accepted(policy, &self.app, token.as_deref().unwrap_or("")),
        };
        // A tunnel that did not show a ClientHello for its host stays only while nothing
        // asks for one: `verify_tls` off, or its app in `report` mode.
        let tls_holds = match self.tls_check.get() {
            None | Some(TlsCheck::Passed) => true,
            Some(TlsCheck::Skipped | TlsCheck::Reported) => {
                !config.verify_tls || policy.effective_app(&self.app).is_some_and(|app| app.action == Action::Report)
            }
        };
        identity_holds
            && tls_holds
            && policy.decide(&self.app, self.channel, &self.target).verdict != Verdict::Deny
            && self.upstream.get().is_none_or(|addr| policy.permits_upstream(&self.target, *addr))
    }
}

/// Every registered tunnel.
#[derive(Default)]
pub(crate) struct Tunnels {
    open: DashMap<u64, Arc<OpenTunnel>>,
    next: AtomicU64,
}

impl Tunnels {
    /// Revoke every tunnel that `config` no longer permits; returns how many. Call after the
    /// new snapshot is stored.
    pub fn revoke_refused(&self, config: &Config) -> usize {
        // Pairs with the fence in `Registration::recheck`: either this scan sees a tunnel's
        // registration (and address), or that tunnel sees the new snapshot.
        fence(Ordering::SeqCst);
        // Taken out first: deciding (certificate chains are verified again) holds no lock
        // that registering or closing a tunnel waits for.
        let tunnels: Vec<Arc<OpenTunnel>> = self.open.iter().map(|entry| entry.value().clone()).collect();
        let mut revoked = 0;
        for tunnel in tunnels {
            if !tunnel.revoke.is_cancelled() && !tunnel.permitted_by(config) {
                tunnel.revoke.cancel();
                revoked += 1;
            }
        }
        revoked
    }
}

/// A tunnel's place in [`Tunnels`]; dropping it unregisters the tunnel.
pub(crate) struct Registration {
    shared: Arc<Shared>,
    id: u64,
    tunnel: Arc<OpenTunnel>,
    /// The generation whose policy made the decision (and dials the upstream).
    decided_under: u64,
}

impl Registration {
    pub fn new(shared: Arc<Shared>, tunnel: OpenTunnel, decided_under: u64) -> Registration {
        let id = shared.tunnels.next.fetch_add(1, Ordering::Relaxed);
        let tunnel = Arc::new(tunnel);
        shared.tunnels.open.insert(id, tunnel.clone());
        Registration { shared, id, tunnel, decided_under }
    }

    pub fn tunnel(&self) -> &OpenTunnel {
        &self.tunnel
    }

    /// Record the address the tunnel is connected to.
    pub fn connected_to(&self, addr: SocketAddr) {
        let _ = self.tunnel.upstream.set(addr);
    }

    /// Record what the check of the tunnel's first bytes found.
    pub fn first_bytes(&self, check: TlsCheck) {
        let _ = self.tunnel.tls_check.set(check);
    }

    /// Whether the tunnel may go on under the policy in force: true when no reload happened
    /// since its decision, else the whole tunnel is decided again. Call after registering and
    /// after every step that a reload's scan might have missed (the dial, the first bytes).
    pub fn recheck(&self) -> bool {
        fence(Ordering::SeqCst);
        let live = self.shared.live.load();
        let config = &live.config;
        let allowed = config.generation == self.decided_under || self.tunnel.permitted_by(config);
        if !allowed {
            self.tunnel.revoke.cancel();
        }
        allowed
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.tunnels.open.remove(&self.id);
    }
}
