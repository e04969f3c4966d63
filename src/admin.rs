//! The admin listener: metrics, health, reload and the `/v1` API.
//!
//! It is a separate listener so that operators can firewall it apart from the proxy port.
//! `/metrics`, `/healthz` and `/readyz` are always open (scrapers and probes carry no
//! secrets); with `admin_token` set, every other path needs `Authorization: Bearer <token>`.
//! It keeps answering while the proxy drains on shutdown, so `/readyz` can say 503.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::policy::{App, Channel, DomainList, Verdict};
use crate::proxy::Shared;
use crate::reload::{Reloader, Trigger};

/// Request bodies (only `/v1/check` has one) are small JSON documents.
const MAX_BODY: usize = 64 * 1024;

type Body = Full<Bytes>;

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    reloader: Arc<Reloader>,
    stop: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
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
        let (shared, reloader, stop) = (shared.clone(), reloader.clone(), stop.clone());
        tracker.spawn(async move {
            let service = service_fn(move |req| {
                let (shared, reloader) = (shared.clone(), reloader.clone());
                async move { Ok::<_, Infallible>(route(req, &shared, &reloader).await) }
            });
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(std::time::Duration::from_secs(10));
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {}
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn route(req: Request<Incoming>, shared: &Shared, reloader: &Reloader) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => {
            return respond(StatusCode::OK, "text/plain; version=0.0.4", shared.metrics.render());
        }
        (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            return if shared.stop.is_cancelled() {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else {
                text(StatusCode::OK, "ready\n")
            };
        }
        _ => {}
    }
    let snapshot = shared.live.load_full();
    if let Some(token) = snapshot.config.server.admin_token.as_deref()
        && !bearer_matches(&req, token)
    {
        let mut response = error(StatusCode::UNAUTHORIZED, "this admin path needs Authorization: Bearer <admin_token>");
        response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"miniapp-gateway\""));
        return response;
    }
    let policy = &snapshot.config.policy;
    match (&method, path.as_str()) {
        (&Method::POST, "/-/reload") => match reloader.reload(Trigger::Admin).await {
            Ok(generation) => json_response(StatusCode::OK, &json!({ "generation": generation })),
            Err(errors) => json_response(StatusCode::UNPROCESSABLE_ENTITY, &json!({ "error": errors.to_string() })),
        },
        (&Method::GET, "/v1/apps") => {
            let mut apps: Vec<&App> = policy.apps().collect();
            apps.sort_by(|a, b| a.id.cmp(&b.id));
            let apps: Vec<AppView<'_>> = apps.into_iter().map(AppView::new).collect();
            json_response(StatusCode::OK, &json!({ "generation": snapshot.config.generation, "apps": apps }))
        }
        (&Method::GET, p) if p.starts_with("/v1/apps/") => {
            let id = &p["/v1/apps/".len()..];
            match policy.app(id) {
                Some(app) => json_response(StatusCode::OK, &AppView::new(app)),
                None => error(StatusCode::NOT_FOUND, &format!("no app {id:?}")),
            }
        }
        (&Method::POST, "/v1/check") => check(req, policy).await,
        (&Method::GET, "/proxy.pac") => {
            let proxy = pac_proxy(&req, &shared.proxy_addr);
            let pac = format!(
                "// miniapp-gateway: every request through the gateway, which refuses plain HTTP.\n\
                 function FindProxyForURL(url, host) {{\n  return \"PROXY {proxy}\";\n}}\n"
            );
            respond(StatusCode::OK, "application/x-ns-proxy-autoconfig", pac.into_bytes())
        }
        (_, "/-/reload" | "/v1/check" | "/v1/apps" | "/proxy.pac" | "/metrics" | "/healthz" | "/readyz") => {
            error(StatusCode::METHOD_NOT_ALLOWED, &format!("{method} is not allowed on {path}"))
        }
        _ => error(StatusCode::NOT_FOUND, &format!("no admin path {path}")),
    }
}

fn bearer_matches(req: &Request<Incoming>, token: &str) -> bool {
    let Some(value) = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let Some((scheme, presented)) = value.trim().split_once(' ') else { return false };
    scheme.eq_ignore_ascii_case("bearer") && bool::from(presented.trim().as_bytes().ct_eq(token.as_bytes()))
}

/// The proxy address a PAC file names: the bound `server.listen`, or, when that is a
/// wildcard address, the host the client reached the admin listener by, with the proxy port.
fn pac_proxy(req: &Request<Incoming>, listen: &std::net::SocketAddr) -> String {
    if !listen.ip().is_unspecified() {
        return listen.to_string();
    }
    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    format!("{host}:{}", listen.port())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    app: String,
    channel: Option<Channel>,
    url: Option<String>,
    api: Option<String>,
}

async fn check(req: Request<Incoming>, policy: &crate::policy::Policy) -> Response<Body> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("cannot read the body: {e}")),
    };
    let request: CheckRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            let message = format!("malformed JSON: {e}; send {{\"app\",\"channel\",\"url\"}} or {{\"app\",\"api\"}}");
            return error(StatusCode::BAD_REQUEST, &message);
        }
    };
    match (&request.url, &request.api) {
        (Some(url), None) => {
            let channel = request.channel.unwrap_or(Channel::Request);
            match policy.decide_url(&request.app, channel, url) {
                Ok((decision, target)) => {
                    let app = decision.app.map_or(request.app.as_str(), |a| &a.id);
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
            let (verdict, reason) = match policy.decide_api(&request.app, api) {
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
    server_domains: Vec<EntryView>,
    webview_domains: Vec<EntryView>,
    api_whitelist: BTreeSet<&'a str>,
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
            server_domains: entries(&app.server_domains),
            webview_domains: entries(&app.webview_domains),
            api_whitelist: app.api_whitelist.iter().map(|a| &**a).collect(),
        }
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body.as_bytes().to_vec())
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &json!({ "error": message }))
}
