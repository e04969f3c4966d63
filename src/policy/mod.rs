//! The policy: who may reach what, decided without any I/O.
//!
//! A [`Policy`] is an immutable snapshot built from a validated config. [`Policy::decide`] is a
//! pure function of (snapshot, app, channel, target) that returns a [`Decision`] carrying its
//! verdict, its reason and the rule that matched; the proxy adds only what needs the network
//! (address checks after resolution, upstream failures). Lookups are hash lookups: one for
//! the app, then one per label of the host in each list consulted.

pub mod address;
pub mod entry;
pub mod host;
pub mod list;
pub mod target;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use entry::{Entry, EntryError, Pattern, PortRule, parse_entry};
pub use host::{Host, HostError, normalize_host, parse_host};
pub use list::DomainList;
pub use target::{Target, TargetError, parse_authority};

/// Which of an app's two whitelists a connection is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// Network APIs (request, upload, download, sockets): the server domain whitelist.
    Request,
    /// Pages in the web-view component: the WebView domain whitelist.
    Webview,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Request => "request",
            Channel::Webview => "webview",
        }
    }

    pub fn parse(raw: &str) -> Option<Channel> {
        if raw.eq_ignore_ascii_case("request") {
            Some(Channel::Request)
        } else if raw.eq_ignore_ascii_case("webview") {
            Some(Channel::Webview)
        } else {
            None
        }
    }

    fn list_kind(self) -> ListKind {
        match self {
            Channel::Request => ListKind::ServerDomains,
            Channel::Webview => ListKind::WebviewDomains,
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An app's permission control switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Refuse what the app's lists do not allow.
    #[default]
    Enforce,
    /// Record the refusal that enforce would make, and let the tunnel through.
    Report,
    /// Let every well-formed, authenticated HTTPS tunnel through.
    Open,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Enforce => "enforce",
            Action::Report => "report",
            Action::Open => "open",
        }
    }
}

/// What happens to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// Let through, but recorded as the refusal `reason` names (an app in `report` mode).
    Report,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Report => "report",
        }
    }
}

/// Why: the machine-readable reason of every decision, allowed or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Whitelisted,
    GlobalAllow,
    Open,
    MalformedRequest,
    AuthRequired,
    BadCredentials,
    UnknownApp,
    IpLiteral,
    GlobalDeny,
    NotWhitelisted,
    PrivateAddress,
    DnsFailure,
    UpstreamUnreachable,
    UpstreamTimeout,
    Overloaded,
    HttpsRequired,
    NotAProxyRequest,
    NotTls,
    SniMismatch,
    Revoked,
    /// Too many failed authentications from this client address lately.
    AuthRateLimited,
}

impl Reason {
    pub const ALL: [Reason; 21] = [
        Reason::Whitelisted,
        Reason::GlobalAllow,
        Reason::Open,
        Reason::MalformedRequest,
        Reason::AuthRequired,
        Reason::BadCredentials,
        Reason::UnknownApp,
        Reason::IpLiteral,
        Reason::GlobalDeny,
        Reason::NotWhitelisted,
        Reason::PrivateAddress,
        Reason::DnsFailure,
        Reason::UpstreamUnreachable,
        Reason::UpstreamTimeout,
        Reason::Overloaded,
        Reason::HttpsRequired,
        Reason::NotAProxyRequest,
        Reason::NotTls,
        Reason::SniMismatch,
        Reason::Revoked,
        Reason::AuthRateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Whitelisted => "whitelisted",
            Reason::GlobalAllow => "global_allow",
            Reason::Open => "open",
            Reason::MalformedRequest => "malformed_request",
            Reason::AuthRequired => "auth_required",
            Reason::BadCredentials => "bad_credentials",
            Reason::UnknownApp => "unknown_app",
            Reason::IpLiteral => "ip_literal",
            Reason::GlobalDeny => "global_deny",
            Reason::NotWhitelisted => "not_whitelisted",
            Reason::PrivateAddress => "private_address",
            Reason::DnsFailure => "dns_failure",
            Reason::UpstreamUnreachable => "upstream_unreachable",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::Overloaded => "overloaded",
            Reason::HttpsRequired => "https_required",
            Reason::NotAProxyRequest => "not_a_proxy_request",
            Reason::NotTls => "not_tls",
            Reason::SniMismatch => "sni_mismatch",
            Reason::Revoked => "revoked",
            Reason::AuthRateLimited => "auth_rate_limited",
        }
    }

    /// The HTTP status a refusal with this reason answers with.
    pub fn status(self) -> u16 {
        match self {
            Reason::Whitelisted | Reason::GlobalAllow | Reason::Open => 200,
            Reason::MalformedRequest | Reason::NotAProxyRequest => 400,
            Reason::AuthRequired | Reason::BadCredentials => 407,
            Reason::DnsFailure | Reason::UpstreamUnreachable => 502,
            Reason::UpstreamTimeout => 504,
            Reason::Overloaded => 503,
            Reason::AuthRateLimited => 429,
            Reason::UnknownApp
            | Reason::IpLiteral
            | Reason::GlobalDeny
            | Reason::NotWhitelisted
            | Reason::PrivateAddress
            | Reason::HttpsRequired
            | Reason::NotTls
            | Reason::SniMismatch
            | Reason::Revoked => 403,
        }
    }

    /// The sentence a person reads in the JSON body, `explain` and the text log.
    pub fn message(self, app: &str, channel: Channel, target: &str) -> String {
        let list = match channel {
            Channel::Request => "server domain whitelist",
            Channel::Webview => "WebView domain whitelist",
        };
        match self {
            Reason::Whitelisted => format!("{target} is on the {list} of app {app}"),
            Reason::GlobalAllow => format!("{target} is on the global allow list"),
            Reason::Open => format!("app {app} has permission control switched off (action = \"open\")"),
            Reason::MalformedRequest => format!("malformed request: {target}"),
            Reason::AuthRequired => "no app identity: send Proxy-Authorization: Basic base64(APPID:TOKEN)".to_owned(),
            Reason::BadCredentials => format!("wrong or malformed credentials for app {app}"),
            Reason::UnknownApp => format!("app {app} is not configured"),
            Reason::IpLiteral => format!("{target} is an IP address; whitelists name hosts"),
            Reason::GlobalDeny => format!("{target} is on the global deny list"),
            Reason::NotWhitelisted => format!("{target} is not on the {list} of app {app}"),
            Reason::PrivateAddress => {
                format!("{target} resolves to a private, loopback or otherwise internal address")
            }
            Reason::DnsFailure => format!("{target} could not be resolved"),
            Reason::UpstreamUnreachable => format!("{target} refused or failed the connection"),
            Reason::UpstreamTimeout => format!("{target} did not accept the connection in time"),
            Reason::Overloaded => "the gateway is at its connection limit".to_owned(),
            Reason::HttpsRequired => {
                "plain HTTP is not proxied: use https:// (the client then sends CONNECT)".to_owned()
            }
            Reason::NotAProxyRequest => {
                "this is a proxy port: send CONNECT host:port, or set HTTPS_PROXY to it".to_owned()
            }
            Reason::NotTls => format!("the tunnel to {target} did not begin with a TLS ClientHello"),
            Reason::SniMismatch => format!("the TLS server name in the tunnel is not {target}"),
            Reason::Revoked => format!("{target} is no longer allowed for app {app}"),
            Reason::AuthRateLimited => {
                "too many failed authentications from this address; try again in a second".to_owned()
            }
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an API call is or is not allowed (`/v1/check` with `api`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiReason {
    ApiWhitelisted,
    ApiNotWhitelisted,
    Open,
}

impl ApiReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiReason::ApiWhitelisted => "api_whitelisted",
            ApiReason::ApiNotWhitelisted => "api_not_whitelisted",
            ApiReason::Open => "open",
        }
    }
}

/// Which list a rule came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    ServerDomains,
    WebviewDomains,
    GlobalAllow,
    GlobalDeny,
}

impl ListKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListKind::ServerDomains => "server_domains",
            ListKind::WebviewDomains => "webview_domains",
            ListKind::GlobalAllow => "global_allow",
            ListKind::GlobalDeny => "global_deny",
        }
    }
}

/// The entry that decided: `server_domains[0]`, and the entry itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule<'p> {
    pub list: ListKind,
    pub index: u16,
    pub entry: &'p Entry,
}

impl fmt::Display for Rule<'_> {
    /// `server_domains[0]`: the list and position, as the access log records it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.list.as_str(), self.index)
    }
}

/// The longest app id (AppIds of the mini-program platforms are well under this).
pub const MAX_APP_ID_LEN: usize = 64;

/// Whether `id` can name an app: 1 to 64 characters of `A-Z a-z 0-9 _ - .`. The same rule
/// holds for ids in the config and ids clients present, so a client-supplied id that fails it
/// can match no app and is never echoed into logs or metrics.
pub fn is_valid_app_id(id: &str) -> bool {
    (1..=MAX_APP_ID_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// One configured miniapp.
#[derive(Debug, Clone)]
pub struct App {
    pub id: Box<str>,
    pub name: Option<String>,
    pub token: Option<Box<str>>,
    pub action: Action,
    pub server_domains: DomainList,
    pub webview_domains: DomainList,
    pub api_whitelist: HashSet<Box<str>>,
    /// The `api_whitelist` entries in the config's order, with their remarks (for views).
    pub api_entries: Vec<(Box<str>, Option<Box<str>>)>,
    /// Whose consent rules apply to its scopes.
    pub platform: crate::scopes::rules::Platform,
    /// What its backend presents to exchange an auth code.
    pub secret: Option<Box<str>>,
}

impl App {
    pub fn list(&self, channel: Channel) -> &DomainList {
        match channel {
            Channel::Request => &self.server_domains,
            Channel::Webview => &self.webview_domains,
        }
    }
}

/// The outcome of [`Policy::decide`].
#[derive(Debug, Clone, Copy)]
pub struct Decision<'p> {
    pub verdict: Verdict,
    pub reason: Reason,
    /// The app whose rules applied (the `unknown_app` fallback for an unknown id).
    pub app: Option<&'p App>,
    pub rule: Option<Rule<'p>>,
}

impl<'p> Decision<'p> {
    fn refuse(reason: Reason, app: Option<&'p App>, rule: Option<Rule<'p>>) -> Self {
        Decision { verdict: Verdict::Deny, reason, app, rule }
    }

    /// Apply the app's action to a refusal it is allowed to relax.
    fn refuse_by_action(reason: Reason, app: &'p App) -> Self {
        let verdict = match app.action {
            Action::Enforce => Verdict::Deny,
            Action::Report => Verdict::Report,
            Action::Open => {
                return Decision { verdict: Verdict::Allow, reason: Reason::Open, app: Some(app), rule: None };
            }
        };
        Decision { verdict, reason, app: Some(app), rule: None }
    }
}

/// What the first bytes of an established tunnel turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstRecord<'a> {
    /// A TLS ClientHello, with its server name (SNI) if it sent one.
    ClientHello(Option<&'a str>),
    /// Anything else: plaintext, another TLS record, a malformed or truncated ClientHello.
    NotTls,
}

/// The decision on a tunnel once its first record is known (with `verify_tls`): the
/// ClientHello must name the CONNECT host. A failure refuses the tunnel, except for an app in
/// `report` mode, which records it (keeping an earlier would-be refusal if it had one).
pub fn after_first_record(
    decision: (Verdict, Reason),
    action: Action,
    target: &Target<'_>,
    first: FirstRecord<'_>,
) -> (Verdict, Reason) {
    let failure = match first {
        FirstRecord::ClientHello(server_name) if target.is_named_by(server_name) => return decision,
        FirstRecord::ClientHello(_) => Reason::SniMismatch,
        FirstRecord::NotTls => Reason::NotTls,
    };
    match (action, decision.0) {
        (Action::Report, Verdict::Allow) => (Verdict::Report, failure),
        (Action::Report, _) => decision,
        _ => (Verdict::Deny, failure),
    }
}

/// Where `[resolve]` sends a host instead of DNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolveOverride {
    pub ip: IpAddr,
    /// Replaces the CONNECT port when set.
    pub port: Option<u16>,
}

/// Settings that shape decisions for every app.
#[derive(Debug, Clone)]
pub struct GlobalRules {
    pub global_deny: DomainList,
    pub global_allow: DomainList,
    /// The app whose rules apply to unknown app ids; `None` refuses them.
    pub unknown_app: Option<Box<str>>,
    pub block_private_addresses: bool,
    /// `[resolve]`: host → (port → override; `None` port for "any port").
    pub resolve: HashMap<Box<str>, Vec<(Option<u16>, ResolveOverride)>>,
}

/// An immutable, validated policy snapshot.
#[derive(Debug, Clone)]
pub struct Policy {
    apps: HashMap<Box<str>, Arc<App>, foldhash::fast::RandomState>,
    rules: GlobalRules,
}

impl Policy {
    /// Build a policy from validated parts. Validation (duplicate ids, a fallback that names
    /// an app) is the config module's job; here a dangling fallback simply refuses.
    pub fn new(apps: impl IntoIterator<Item = Arc<App>>, rules: GlobalRules) -> Self {
        let apps = apps.into_iter().map(|app| (app.id.clone(), app)).collect();
        Policy { apps, rules }
    }

    pub fn app(&self, id: &str) -> Option<&App> {
        self.apps.get(id).map(|app| &**app)
    }

    pub fn apps(&self) -> impl Iterator<Item = &App> {
        self.apps.values().map(|app| &**app)
    }

    pub fn app_count(&self) -> usize {
        self.apps.len()
    }

    pub fn entry_count(&self) -> usize {
        self.apps.values().map(|a| a.server_domains.len() + a.webview_domains.len()).sum::<usize>()
            + self.rules.global_allow.len()
            + self.rules.global_deny.len()
    }

    /// The app whose rules govern `app_id`: itself, or the `unknown_app` fallback.
    pub fn effective_app(&self, app_id: &str) -> Option<&App> {
        self.apps
            .get(app_id)
            .or_else(|| self.rules.unknown_app.as_deref().and_then(|id| self.apps.get(id)))
            .map(|app| &**app)
    }

    /// Decide a CONNECT by an identified app, before any network I/O.
    ///
    /// The app's action relaxes only what its own lists decide (`ip_literal`,
    /// `not_whitelisted`). The operator's gateway-wide rules (`global_deny`, and the address
    /// checks the proxy makes after resolution) hold for every app.
    pub fn decide(&self, app_id: &str, channel: Channel, target: &Target<'_>) -> Decision<'_> {
        let Some(app) = self.effective_app(app_id) else {
            return Decision::refuse(Reason::UnknownApp, None, None);
        };
        let host = match &target.host {
            Host::Ip(_) => return Decision::refuse_by_action(Reason::IpLiteral, app),
            Host::Name(name) => name.as_ref(),
        };
        if let Some(rule) = self.find(&self.rules.global_deny, ListKind::GlobalDeny, host, target.port) {
            return Decision::refuse(Reason::GlobalDeny, Some(app), Some(rule));
        }
        let kind = channel.list_kind();
        if let Some(rule) = self.find(app.list(channel), kind, host, target.port) {
            return Decision { verdict: Verdict::Allow, reason: Reason::Whitelisted, app: Some(app), rule: Some(rule) };
        }
        if let Some(rule) = self.find(&self.rules.global_allow, ListKind::GlobalAllow, host, target.port) {
            return Decision { verdict: Verdict::Allow, reason: Reason::GlobalAllow, app: Some(app), rule: Some(rule) };
        }
        Decision::refuse_by_action(Reason::NotWhitelisted, app)
    }

    /// Decide a URL the way a CONNECT to its host and port would be decided (what `explain`
    /// and `/v1/check` answer). Only `https` and `wss` URLs can be allowed; the default port
    /// is 443. Returns the decision and the normalized `host:port`.
    pub fn decide_url(&self, app_id: &str, channel: Channel, url: &str) -> Result<(Decision<'_>, String), String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("invalid URL {url:?}: {e}"))?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(format!("invalid URL {url:?}: userinfo is not allowed"));
        }
        let host = parsed.host_str().ok_or_else(|| format!("invalid URL {url:?}: no host"))?;
        let port = parsed.port_or_known_default().ok_or_else(|| format!("invalid URL {url:?}: no port"))?;
        let authority = format!("{host}:{port}");
        let target = parse_authority(&authority).map_err(|e| format!("invalid URL {url:?}: {e}"))?;
        let shown = format!("{}:{port}", target.host.to_text());
        let decision = match parsed.scheme() {
            "https" | "wss" => self.decide(app_id, channel, &target),
            _ => Decision::refuse(Reason::HttpsRequired, self.effective_app(app_id), None),
        };
        Ok((decision, shown))
    }

    /// Decide whether `app_id` may call the JSAPI `api` (its `api_whitelist`, under its
    /// action). `None` when the app is unknown and no `unknown_app` fallback applies.
    pub fn decide_api(&self, app_id: &str, api: &str) -> Option<(Verdict, ApiReason)> {
        let app = self.effective_app(app_id)?;
        Some(if app.api_whitelist.contains(api) {
            (Verdict::Allow, ApiReason::ApiWhitelisted)
        } else {
            match app.action {
                Action::Enforce => (Verdict::Deny, ApiReason::ApiNotWhitelisted),
                Action::Report => (Verdict::Report, ApiReason::ApiNotWhitelisted),
                Action::Open => (Verdict::Allow, ApiReason::Open),
            }
        })
    }

    fn find<'p>(&self, list: &'p DomainList, kind: ListKind, host: &str, port: u16) -> Option<Rule<'p>> {
        list.find(host, port).map(|index| Rule { list: kind, index, entry: &list.entries()[usize::from(index)] })
    }

    /// Where `[resolve]` sends `host:port`, if anywhere: a port-specific key beats a bare host.
    pub fn resolve_override(&self, host: &str, port: u16) -> Option<SocketAddr> {
        let rules = self.rules.resolve.get(host)?;
        let exact = rules.iter().find(|(p, _)| *p == Some(port));
        let (_, over) = exact.or_else(|| rules.iter().find(|(p, _)| p.is_none()))?;
        Some(SocketAddr::new(over.ip, over.port.unwrap_or(port)))
    }

    pub fn blocks_private_addresses(&self) -> bool {
        self.rules.block_private_addresses
    }

    /// Whether a tunnel to `target` may stay connected to `upstream`: the address `[resolve]`
    /// names for it now, or, without an override, an address the private-address block (if
    /// on) lets through. What a reload asks of tunnels connected under an older policy.
    pub fn permits_upstream(&self, target: &Target<'_>, upstream: SocketAddr) -> bool {
        let overridden = match &target.host {
            Host::Name(name) => self.resolve_override(name, target.port),
            Host::Ip(_) => None,
        };
        match overridden {
            Some(addr) => addr == upstream,
            None => !(self.rules.block_private_addresses && address::is_blocked(upstream.ip())),
        }
    }
}

#[cfg(test)]
mod tests;
