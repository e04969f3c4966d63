//! The admin listener: metrics, health, reload, the `/v1` API and the web console.
//!
//! It is a separate listener so that operators can firewall it apart from the proxy port.
//! `/metrics`, `/healthz` and `/readyz` are always open (scrapers and probes carry no
//! secrets), and so are the console's static files (`/`, `/console/…`: the page signs in with
//! a token it then sends to the API); with `admin_token` or `[[admin_user]]`s set, every
//! other path needs `Authorization: Bearer <token>` of a user whose role allows it (viewer:
//! read, check, decisions and events, and a miniapp container's scope calls; editor: and
//! change apps, answer prompts, change consent settings; admin: and reload, roll back). The
//! auth code exchange authenticates with the app's secret instead (see `scopes.rs`).
//! It keeps answering while the proxy drains on shutdown, so `/readyz` can say 503.
//!
//! It is bounded like the proxy: at most [`MAX_CONNECTIONS`] connections (more are closed at
//! once), a request head within [`HEAD_TIMEOUT`], a body of at most [`MAX_BODY`] within
//! [`BODY_TIMEOUT`]. Browsers are kept from being used against it: a request for anything
//! but the three open paths must name the listener by an IP address, `localhost` or one of
//! `admin_hosts` in its `Host` (a DNS-rebound name is refused), and a state-changing request
//! that carries a foreign `Origin` (a page elsewhere posting to it) is refused.

mod apps;
mod console;
mod events;
mod scopes;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{
    AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue, ORIGIN, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{AdminUser, Role, token_sha256};
use crate::policy::{App, Channel, DomainList, Host, Verdict, parse_authority, parse_host};
use crate::proxy::Shared;
use crate::reload::{Reloader, Trigger};
use crate::throttle::AuthThrottle;

/// The OpenAPI document of every `/v1` route (`src/admin/openapi.json`, checked against the
/// running gateway by `tests/openapi.rs`).
const OPENAPI: &str = include_str!("openapi.json");

/// Where the web console is served (`GET /` redirects there).
pub const CONSOLE_PATH: &str = console::PATH;

/// Request bodies are small JSON documents.
pub const MAX_BODY: usize = 64 * 1024;
/// Admin connections served at once; a connection beyond it is closed unread.
pub const MAX_CONNECTIONS: usize = 64;
/// A request head must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// At shutdown, how long a response in flight may take to finish before its connection is
/// closed anyway.
const CLOSING_GRACE: Duration = Duration::from_secs(1);
/// A request body must arrive within this.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Every answer is a whole body, but for the event stream.
pub(crate) type Body = http_body_util::Either<Full<Bytes>, events::EventStream>;

/// A whole body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Either::Left(Full::new(bytes.into()))
}

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    reloader: Arc<Reloader>,
    stop: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let state = Arc::new(AdminState::default());
    loop {
        let (stream, client) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%client, "admin connection limit reached; closing");
            continue;
        };
        let local = stream.local_addr().unwrap_or(client);
        let (shared, reloader, stop, state) = (shared.clone(), reloader.clone(), stop.clone(), state.clone());
        tracker.spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let caller = Caller { client, local, state: state.clone() };
                let (shared, reloader) = (shared.clone(), reloader.clone());
                async move { Ok::<_, Infallible>(console::secure(route(req, &shared, &reloader, &caller).await)) }
            });
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(HEAD_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    // Finish the response in flight (an event stream's last chunk included:
                    // its body ended when the gateway turned unready), then close.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSING_GRACE, conn).await;
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// What the admin listener keeps between requests.
#[derive(Default)]
struct AdminState {
    /// Failed authentication per client address.
    throttle: AuthThrottle,
    /// Wrong app secrets at the code exchange, apart: an app backend guessing does not lock
    /// out the operators and containers that share its address.
    exchange_throttle: AuthThrottle,
    /// App writes, one at a time.
    writes: apps::WriteLock,
    /// Event streams open at once (each holds a connection for as long as it is read).
    streams: events::StreamSlots,
}

/// Who is calling, and where they reached the listener.
struct Caller {
    client: SocketAddr,
    /// The listener's own address on this connection.
    local: SocketAddr,
    state: Arc<AdminState>,
}

async fn route(req: Request<Incoming>, shared: &Shared, reloader: &Reloader, caller: &Caller) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => {
            if let Some(replica) = reloader.replica() {
                replica.publish(&shared.metrics);
            }
            return respond(StatusCode::OK, "text/plain; version=0.0.4", shared.metrics.render());
        }
        (&Method::GET, "/healthz") => {
            return match shared.loops.stalled(crate::proxy::STALLED_AFTER) {
                None => text(StatusCode::OK, "ok\n"),
                Some((index, since)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("event loop {index} has not turned for {} s\n", since.as_secs()),
                ),
            };
        }
        (&Method::GET, "/readyz") => {
            return if shared.unready.is_cancelled() {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else if reloader.replica().is_some_and(|replica| !replica.ready()) {
                // ready_without_store = false: this replica's policy may be falling behind.
                text(StatusCode::SERVICE_UNAVAILABLE, "the store cannot be reached\n")
            } else {
                text(StatusCode::OK, "ready\n")
            };
        }
        _ => {}
    }
    let snapshot = shared.live.load_full();
    if let Err(refusal) = browser_guard(&req, &snapshot.config.server.admin_hosts) {
        return refusal;
    }
    if matches!(method, Method::GET | Method::HEAD)
        && let Some(page) = console::serve(&path)
    {
        return page;
    }
    // The app backend's call: it authenticates with the app's secret, not a bearer token.
    if (&method, path.as_str()) == (&Method::POST, "/v1/auth-codes/exchange") {
        return scopes::exchange(req, &shared.scopes, &snapshot.config, caller).await;
    }
    let user = match authenticate(&req, &snapshot.config.server.admin_users, caller, shared) {
        Ok(user) => user,
        Err(refusal) => return refusal,
    };
    let needed = match (&method, path.as_str()) {
        (&Method::POST, "/-/reload") => Role::Admin,
        (&Method::POST, p) if p.starts_with("/v1/apps/") && p.ends_with("/rollback") => Role::Admin,
        (&Method::GET, _) | (&Method::POST, "/v1/check") => Role::Viewer,
        // A container's calls, which may record consent (what the configured prompter
        // answers): a user bound to the app (`apps = [...]`, checked below), or an editor.
        (&Method::POST, "/v1/scopes/decide" | "/v1/scopes/authorize" | "/v1/auth-codes")
            if user.is_some_and(|user| user.apps.is_some()) =>
        {
            Role::Viewer
        }
        (&Method::POST, "/v1/scopes/decide" | "/v1/scopes/authorize" | "/v1/auth-codes") => Role::Editor,
        // Stating the user's answer: openSetting, a rig answering a prompt.
        (&Method::PUT, "/v1/scopes/settings") => Role::Editor,
        (&Method::POST, p) if p.starts_with("/v1/scopes/prompts/") => Role::Editor,
        (_, p) if p.starts_with("/v1/apps/") => Role::Editor,
        // Anything not named above (a route added later, a method nobody serves) is closed
        // to all but admins until it is.
        _ => Role::Admin,
    };
    if let Some(user) = user
        && user.role < needed
    {
        let message = format!(
            "user {} ({}) may not do this: it needs the {} role",
            user.name,
            user.role.as_str(),
            needed.as_str()
        );
        tracing::info!(user = %user.name, role = user.role.as_str(), %method, path, client = %caller.client, "admin request refused");
        return error(StatusCode::FORBIDDEN, &message);
    }
    let policy = &snapshot.config.policy;
    // The apps a container's user may act for (scope calls and consent reads).
    let bound = user.and_then(|user| user.apps.as_deref());
    match (&method, path.as_str()) {
        (&Method::POST, "/-/reload") => {
            let user = user.map_or("anonymous", |u| u.name.as_str());
            tracing::info!(user, client = %caller.client, "reload asked for");
            reload(reloader).await
        }
        (&Method::GET, "/v1/apps") => {
            let query = match ListQuery::parse(req.uri().query().unwrap_or("")) {
                Ok(query) => query,
                Err(refusal) => return refusal,
            };
            let mut apps: Vec<&App> = policy
                .apps()
                .filter(|app| query.after.as_deref().is_none_or(|after| &*app.id > after))
                .filter(|app| query.matches(app))
                .collect();
            apps.sort_by(|a, b| a.id.cmp(&b.id));
            let next = (apps.len() > query.limit).then(|| apps[query.limit - 1].id.to_string());
            let apps: Vec<AppView<'_>> = apps.into_iter().take(query.limit).map(AppView::new).collect();
            let body = json!({ "generation": snapshot.config.generation, "apps": apps, "next": next });
            json_response(StatusCode::OK, &body)
        }
        (&Method::GET, p) if p.starts_with("/v1/apps/") && p.ends_with("/history") => {
            let id = &p["/v1/apps/".len()..p.len() - "/history".len()];
            apps::history(reloader, id).await
        }
        (&Method::GET, p) if p.starts_with("/v1/apps/") && p.ends_with("/decisions") => {
            let id = &p["/v1/apps/".len()..p.len() - "/decisions".len()];
            events::decisions(shared, policy, id)
        }
        (&Method::GET, "/v1/events") => {
            let app = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .find(|(key, _)| key == "app")
                .map(|(_, app)| app.into_owned())
                .filter(|app| !app.is_empty());
            events::stream(shared, &caller.state.streams, app)
        }
        (&Method::GET, "/v1/status") => {
            let store = match reloader.replica() {
                Some(replica) => serde_json::to_value(replica.status()).unwrap_or_default(),
                None => json!({ "backend": "files" }),
            };
            let body = json!({
                "version": env!("CARGO_PKG_VERSION"),
                "generation": snapshot.config.generation,
                "apps": policy.app_count(),
                "store": store,
            });
            json_response(StatusCode::OK, &body)
        }
        (&Method::GET, "/v1/me") => {
            let (name, role) = user.map_or((None, Role::Admin), |user| (Some(user.name.as_str()), user.role));
            json_response(StatusCode::OK, &json!({ "user": name, "role": role.as_str(), "auth": user.is_some() }))
        }
        (&Method::GET, p) if p.starts_with("/v1/apps/") => {
            let id = &p["/v1/apps/".len()..];
            if let Some(stored) = apps::get(reloader, policy, id).await {
                return stored;
            }
            match policy.app(id) {
                Some(app) => json_response(StatusCode::OK, &AppView::new(app)),
                None => error(StatusCode::NOT_FOUND, &format!("no app {id:?}")),
            }
        }
        (_, p) if p.starts_with("/v1/apps/") => {
            let rest = &p["/v1/apps/".len()..];
            let (id, rest) = rest.split_once('/').unwrap_or((rest, ""));
            let (id, rest) = (id.to_owned(), rest.to_owned());
            let who = apps::Who {
                user: user.map_or_else(|| "anonymous".to_owned(), |user| user.name.clone()),
                client: caller.client.to_string(),
            };
            apps::write(req, shared, reloader, &caller.state.writes, &who, &id, &rest).await
        }
        (&Method::POST, "/v1/check") => check(req, policy, reloader).await,
        (&Method::POST, "/v1/scopes/decide") => scopes::decide(req, &shared.scopes, &snapshot.config, bound).await,
        (&Method::POST, "/v1/scopes/authorize") => {
            scopes::authorize(req, &shared.scopes, &snapshot.config, bound).await
        }
        (&Method::GET, "/v1/scopes/settings") => scopes::settings(&req, &shared.scopes, &snapshot.config, bound),
        (&Method::PUT, "/v1/scopes/settings") => {
            let who = user.map_or("anonymous", |u| u.name.as_str());
            scopes::change_setting(req, &shared.scopes, &snapshot.config, who).await
        }
        (&Method::GET, "/v1/scopes/prompts") => scopes::prompts(&req, &shared.scopes, bound),
        (&Method::POST, p) if p.starts_with("/v1/scopes/prompts/") => {
            let id = p["/v1/scopes/prompts/".len()..].to_owned();
            let who = user.map_or("anonymous", |u| u.name.as_str());
            scopes::answer(req, &shared.scopes, &id, who).await
        }
        (&Method::GET, "/v1/scopes/history") => scopes::history(&req, &shared.scopes, bound),
        (&Method::POST, "/v1/auth-codes") => scopes::issue_code(req, &shared.scopes, &snapshot.config, bound).await,
        (&Method::GET, "/v1/openapi.json") => respond(StatusCode::OK, "application/json", OPENAPI.as_bytes().to_vec()),
        (&Method::GET, "/proxy.pac") => {
            let proxy = pac_proxy(&req, &shared.proxy_addr, caller.local.ip());
            let pac = format!(
                "// miniapp-gateway: every request through the gateway, which refuses plain HTTP.\n\
                 function FindProxyForURL(url, host) {{\n  return \"PROXY {proxy}\";\n}}\n"
            );
            respond(StatusCode::OK, "application/x-ns-proxy-autoconfig", pac.into_bytes())
        }
        (
            _,
            "/-/reload"
            | "/v1/check"
            | "/v1/scopes/decide"
            | "/v1/scopes/authorize"
            | "/v1/auth-codes"
            | "/v1/auth-codes/exchange",
        ) => method_not_allowed(&method, "POST"),
        (_, "/v1/scopes/settings") => method_not_allowed(&method, "GET, PUT"),
        (
            _,
            "/v1/apps" | "/v1/openapi.json" | "/v1/events" | "/v1/me" | "/v1/status" | "/proxy.pac" | "/metrics"
            | "/healthz" | "/readyz" | "/v1/scopes/prompts" | "/v1/scopes/history",
        ) => method_not_allowed(&method, "GET"),
        _ => error(StatusCode::NOT_FOUND, &format!("no admin path {path}")),
    }
}

/// `POST /-/reload`: the new generation, or every error with the old policy kept.
async fn reload(reloader: &Reloader) -> Response<Body> {
    match reloader.reload(Trigger::Admin).await {
        Ok(generation) => json_response(StatusCode::OK, &json!({ "generation": generation })),
        Err(errors) => json_response(StatusCode::UNPROCESSABLE_ENTITY, &json!({ "error": errors.to_string() })),
    }
}

/// The admin user a request is from, by its bearer token; `Ok(None)` when no user is
/// configured (the admin API is then open to whoever reaches it). Wrong tokens are counted and
/// rate-limited per address like the proxy's; a request without any is not a guess (it is
/// what a browser sends first) and is only told to authenticate.
#[allow(clippy::result_large_err)]
fn authenticate<'u>(
    req: &Request<Incoming>,
    users: &'u [AdminUser],
    caller: &Caller,
    shared: &Shared,
) -> Result<Option<&'u AdminUser>, Response<Body>> {
    if users.is_empty() {
        return Ok(None);
    }
    if let Err(wait) = caller.state.throttle.check(caller.client.ip(), "") {
        let mut response =
            error(StatusCode::TOO_MANY_REQUESTS, "too many failed authentications from this address; wait");
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(wait.as_secs() + 1));
        return Err(response);
    }
    let presented = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|value| {
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    let hash = presented.map(token_sha256);
    if let Some(user) = hash.and_then(|hash| users.iter().find(|user| bool::from(user.token_sha256.ct_eq(&hash)))) {
        return Ok(Some(user));
    }
    if req.headers().contains_key(AUTHORIZATION) {
        caller.state.throttle.failed(caller.client.ip(), "");
        shared.metrics.auth_failures_admin.inc();
    }
    let mut response = error(StatusCode::UNAUTHORIZED, "this admin path needs Authorization: Bearer <token>");
    response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"miniapp-gateway\""));
    Err(response)
}

/// The host of a `Host` header (`name`, `name:port`, `1.2.3.4:port`, `[::1]:port`), parsed
/// as the proxy parses CONNECT targets; `None` for anything else.
fn host_of(header: &str) -> Option<Host<'static>> {
    let host = match parse_authority(header) {
        Ok(target) => target.host,
        Err(_) => parse_host(header).ok()?,
    };
    Some(match host {
        Host::Name(name) => Host::Name(name.into_owned().into()),
        Host::Ip(ip) => Host::Ip(ip),
    })
}

/// Refuse what a browser could be tricked into sending: a `Host` that is not one of the
/// listener's names (DNS rebinding), and a state-changing request from a foreign page.
#[allow(clippy::result_large_err)]
fn browser_guard(req: &Request<Incoming>, admin_hosts: &[String]) -> Result<(), Response<Body>> {
    let header = req.headers().get(HOST).and_then(|h| h.to_str().ok());
    let host = header.and_then(host_of);
    let known = match &host {
        Some(Host::Ip(_)) => true,
        Some(Host::Name(name)) => &**name == "localhost" || admin_hosts.iter().any(|h| h == &**name),
        None => false,
    };
    if !known {
        let message = "the Host of this request is not a name of this admin listener: use its IP address or \
                       localhost, or add the name to [server].admin_hosts";
        return Err(error(StatusCode::MISDIRECTED_REQUEST, message));
    }
    let changes_state = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let cross_site = req.headers().get("sec-fetch-site").is_some_and(|site| site.as_bytes() == b"cross-site");
    let foreign_origin = req.headers().get(ORIGIN).is_some_and(|origin| {
        let origin = origin.to_str().unwrap_or("");
        let same = header.is_some_and(|host| origin == format!("http://{host}") || origin == format!("https://{host}"));
        !same
    });
    if changes_state && (cross_site || foreign_origin) {
        return Err(error(StatusCode::FORBIDDEN, "cross-origin requests may not change the gateway"));
    }
    Ok(())
}

/// The proxy address a PAC file names: the bound `server.listen`, or, when that is a
/// wildcard address, the host the client reached the admin listener by (when it is a valid
/// host), else the address it connected to, with the proxy port.
fn pac_proxy(req: &Request<Incoming>, listen: &SocketAddr, local: IpAddr) -> String {
    if !listen.ip().is_unspecified() {
        return listen.to_string();
    }
    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).and_then(host_of);
    match host {
        Some(Host::Name(name)) => format!("{name}:{}", listen.port()),
        Some(Host::Ip(ip)) => SocketAddr::new(ip, listen.port()).to_string(),
        None => SocketAddr::new(local, listen.port()).to_string(),
    }
}

/// `GET /v1/apps?q=TEXT&limit=N&after=ID`: apps whose id or name contains `q` (any case),
/// in id order, `limit` at a time (default 100, at most 1,000) after the id `after`.
struct ListQuery {
    q: Option<String>,
    limit: usize,
    after: Option<String>,
}

impl ListQuery {
    #[allow(clippy::result_large_err)] // a refusal is the response itself, once per request
    fn parse(query: &str) -> Result<ListQuery, Response<Body>> {
        let mut list = ListQuery { q: None, limit: 100, after: None };
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "q" if !value.is_empty() => list.q = Some(value.to_lowercase()),
                "limit" => match value.parse::<usize>() {
                    Ok(limit @ 1..=1_000) => list.limit = limit,
                    _ => return Err(error(StatusCode::BAD_REQUEST, "limit is a number from 1 to 1000")),
                },
                "after" if !value.is_empty() => list.after = Some(value.into_owned()),
                _ => {}
            }
        }
        Ok(list)
    }

    fn matches(&self, app: &App) -> bool {
        let Some(q) = &self.q else { return true };
        app.id.to_lowercase().contains(q) || app.name.as_deref().is_some_and(|name| name.to_lowercase().contains(q))
    }
}

/// The app of a check: an id, or a draft app (not saved).
#[derive(Deserialize)]
#[serde(untagged)]
enum AppRef {
    Id(String),
    Draft(Box<crate::store::AppDoc>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    app: AppRef,
    channel: Option<Channel>,
    url: Option<String>,
    api: Option<String>,
}

/// Read a request body of at most [`MAX_BODY`] bytes within [`BODY_TIMEOUT`].
#[allow(clippy::result_large_err)]
pub(crate) async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, &format!("the body may be at most {MAX_BODY} bytes"));
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), MAX_BODY).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(error(StatusCode::BAD_REQUEST, &format!("cannot read the body: {e}"))),
        Err(_) => Err(error(StatusCode::REQUEST_TIMEOUT, "the body did not arrive in time")),
    }
}

async fn check(req: Request<Incoming>, policy: &crate::policy::Policy, reloader: &Reloader) -> Response<Body> {
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(refusal) => return refusal,
    };
    let request: CheckRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            let message = format!("malformed JSON: {e}; send {{\"app\",\"channel\",\"url\"}} or {{\"app\",\"api\"}}");
            return error(StatusCode::BAD_REQUEST, &message);
        }
    };
    // A draft (an app object rather than an id) is decided as if it were saved.
    let drafted;
    let (policy, app_id) = match request.app {
        AppRef::Id(id) => (policy, id),
        AppRef::Draft(doc) => {
            let id = doc.id.clone();
            drafted = match apps::draft(reloader, *doc).await {
                Ok(config) => config,
                Err(refusal) => return refusal,
            };
            (&drafted.policy, id)
        }
    };
    match (&request.url, &request.api) {
        (Some(url), None) if url.is_empty() => error(StatusCode::BAD_REQUEST, "url is empty"),
        (None, Some(api)) if api.is_empty() => error(StatusCode::BAD_REQUEST, "api is empty: send an API name"),
        (Some(url), None) => {
            let channel = request.channel.unwrap_or(Channel::Request);
            match policy.decide_url(&app_id, channel, url) {
                Ok((decision, target)) => {
                    let app = decision.app.map_or(app_id.as_str(), |a| &a.id);
                    json_response(
                        StatusCode::OK,
                        &json!({
                            "decision": decision.verdict.as_str(),
                            "reason": decision.reason.as_str(),
                            "rule": decision.rule.map(|r| r.to_string()),
                            "message": decision.reason.message(app, channel, &target),
                        }),
                    )
                }
                Err(e) => error(StatusCode::BAD_REQUEST, &e),
            }
        }
        (None, Some(api)) => {
            let (verdict, reason) = match policy.decide_api(&app_id, api) {
                Some((verdict, reason)) => (verdict.as_str(), reason.as_str()),
                None => (Verdict::Deny.as_str(), "unknown_app"),
            };
            json_response(StatusCode::OK, &json!({ "decision": verdict, "reason": reason }))
        }
        _ => error(StatusCode::BAD_REQUEST, "send exactly one of \"url\" and \"api\""),
    }
}

/// An app as `/v1/apps` shows it: everything but the token itself.
#[derive(Serialize)]
struct AppView<'a> {
    id: &'a str,
    name: Option<&'a str>,
    action: &'static str,
    has_token: bool,
    /// The policy's view has no revision (the store's does: `GET /v1/apps/{id}`).
    revision: Option<u64>,
    server_domains: Vec<EntryView>,
    webview_domains: Vec<EntryView>,
    api_whitelist: Vec<ApiView<'a>>,
    platform: &'static str,
    has_secret: bool,
}

#[derive(Serialize)]
struct ApiView<'a> {
    api: &'a str,
    remark: Option<&'a str>,
}

#[derive(Serialize)]
struct EntryView {
    domain: String,
    remark: Option<String>,
}

impl<'a> AppView<'a> {
    fn new(app: &'a App) -> AppView<'a> {
        let entries = |list: &DomainList| {
            list.entries()
                .iter()
                .map(|e| EntryView { domain: e.to_string(), remark: e.remark.as_deref().map(str::to_owned) })
                .collect()
        };
        AppView {
            id: &app.id,
            name: app.name.as_deref(),
            action: app.action.as_str(),
            has_token: app.token.is_some(),
            revision: None,
            server_domains: entries(&app.server_domains),
            webview_domains: entries(&app.webview_domains),
            api_whitelist: app
                .api_entries
                .iter()
                .map(|(api, remark)| ApiView { api, remark: remark.as_deref() })
                .collect(),
            platform: app.platform.as_str(),
            has_secret: app.secret.is_some(),
        }
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn text(status: StatusCode, body: impl Into<Vec<u8>>) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body.into())
}

pub(crate) fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

/// `405` for `method`, with the methods the path takes (`allow`).
pub(crate) fn method_not_allowed(method: &Method, allow: &'static str) -> Response<Body> {
    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, &format!("{method} is not allowed here; use {allow}"));
    response.headers_mut().insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
    response
}

pub(crate) fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &json!({ "error": message }))
}
