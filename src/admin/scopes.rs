//! `/v1/scopes/*` and `/v1/auth-codes*`: what a miniapp container asks about device and
//! user-data APIs, answered by the [`ScopeService`].
//!
//! Roles: a container is a viewer. `decide`, `authorize` and `auth-codes` read the rules and
//! record only what the configured prompter answers (the operator chose it), so a viewer may
//! call them. Stating an answer oneself, `PUT /v1/scopes/settings` (openSetting) and
//! `POST /v1/scopes/prompts/{id}` (a rig answering), is a write: editor. The code exchange is
//! the app backend's call and authenticates with the app's secret instead of a bearer token.

// A refusal is the response itself; these run once per admin request, far from the hot path.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::{Body, Caller, error, json_response, read_body};
use crate::config::Config;
use crate::scopes::rules::{Consent, SystemPermission};
use crate::scopes::service::{Ask, ExchangeError, ScopeService, ServiceError};

/// A user id as containers send it.
fn valid_user(user: &str) -> bool {
    !user.is_empty() && user.chars().count() <= 128 && !user.chars().any(char::is_control)
}

async fn parse<T: DeserializeOwned>(req: Request<Incoming>, shape: &str) -> Result<T, Response<Body>> {
    let body: Bytes = read_body(req).await?;
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("malformed JSON: {e}; send {shape}")))
}

fn failed(e: &ServiceError) -> Response<Body> {
    let status = match e {
        ServiceError::UnknownApp(_) | ServiceError::UnknownUser(_) => StatusCode::NOT_FOUND,
        ServiceError::UnknownScope { .. } | ServiceError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        ServiceError::TooManyCodes => StatusCode::SERVICE_UNAVAILABLE,
        ServiceError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &e.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallBody {
    app: String,
    user: String,
    api: Option<String>,
    scope: Option<String>,
    scopes: Option<Vec<String>>,
    #[serde(default)]
    system_permission: SystemPermission,
    wait: Option<bool>,
}

impl CallBody {
    fn ask(&self) -> Result<Ask, Response<Body>> {
        if !valid_user(&self.user) {
            return Err(error(StatusCode::BAD_REQUEST, "user is 1 to 128 characters, without control characters"));
        }
        Ok(Ask {
            app: self.app.clone(),
            user: self.user.clone(),
            system: self.system_permission,
            wait: self.wait.unwrap_or(true),
        })
    }
}

/// The apps a user bound to apps may act for, or `None` for any.
type Bound<'a> = Option<&'a [Box<str>]>;

/// `403` when `app` is not one of the apps a bound user acts for.
fn outside(bound: Bound<'_>, app: &str) -> Option<Response<Body>> {
    bound
        .filter(|apps| !apps.iter().any(|allowed| &**allowed == app))
        .map(|_| error(StatusCode::FORBIDDEN, &format!("this user acts for its own apps (apps = [...]), not {app:?}")))
}

/// A container's call: its body, of the route's shape (`shaped`), for an app the caller may act
/// for, and what it asks.
async fn container_call(
    req: Request<Incoming>,
    shape: &str,
    bound: Bound<'_>,
    shaped: impl Fn(&CallBody) -> bool,
) -> Result<(CallBody, Ask), Response<Body>> {
    let body: CallBody = parse(req, shape).await?;
    if !shaped(&body) {
        return Err(error(StatusCode::BAD_REQUEST, &format!("send {shape}")));
    }
    if let Some(refusal) = outside(bound, &body.app) {
        return Err(refusal);
    }
    let ask = body.ask()?;
    Ok((body, ask))
}

/// `POST /v1/scopes/decide`: `{"app","user","api","system_permission"?,"wait"?}`.
pub(crate) async fn decide(
    req: Request<Incoming>,
    service: &Arc<ScopeService>,
    config: &Config,
    bound: Bound<'_>,
) -> Response<Body> {
    let shape = "{\"app\",\"user\",\"api\",\"system_permission\"?,\"wait\"?}";
    let (body, ask) =
        match container_call(req, shape, bound, |b| matches!((&b.api, &b.scope, &b.scopes), (Some(_), None, None)))
            .await
        {
            Ok(call) => call,
            Err(refusal) => return refusal,
        };
    let api = body.api.as_deref().unwrap_or_default();
    match service.decide(config, &ask, api).await {
        Ok(answer) => {
            let mut value = serde_json::to_value(&answer).unwrap_or_default();
            value["api"] = api.into();
            json_response(StatusCode::OK, &value)
        }
        Err(e) => failed(&e),
    }
}

/// `POST /v1/scopes/authorize`: `{"app","user","scope","system_permission"?,"wait"?}`.
pub(crate) async fn authorize(
    req: Request<Incoming>,
    service: &Arc<ScopeService>,
    config: &Config,
    bound: Bound<'_>,
) -> Response<Body> {
    let shape = "{\"app\",\"user\",\"scope\",\"system_permission\"?,\"wait\"?}";
    let (body, ask) =
        match container_call(req, shape, bound, |b| matches!((&b.api, &b.scope, &b.scopes), (None, Some(_), None)))
            .await
        {
            Ok(call) => call,
            Err(refusal) => return refusal,
        };
    let scope = body.scope.as_deref().unwrap_or_default();
    match service.authorize(config, &ask, scope).await {
        Ok(answer) => {
            let mut value = serde_json::to_value(&answer).unwrap_or_default();
            value["state"] = answer.state().into();
            json_response(StatusCode::OK, &value)
        }
        Err(e) => failed(&e),
    }
}

/// `POST /v1/auth-codes`: `{"app","user","scopes":[…],"wait"?}`.
pub(crate) async fn issue_code(
    req: Request<Incoming>,
    service: &Arc<ScopeService>,
    config: &Config,
    bound: Bound<'_>,
) -> Response<Body> {
    let shape = "{\"app\",\"user\",\"scopes\":[…],\"wait\"?}";
    let (body, ask) =
        match container_call(req, shape, bound, |b| matches!((&b.api, &b.scope, &b.scopes), (None, None, Some(_))))
            .await
        {
            Ok(call) => call,
            Err(refusal) => return refusal,
        };
    let scopes = body.scopes.as_deref().unwrap_or_default();
    match service.issue_code(config, &ask, scopes).await {
        Ok(value) => json_response(StatusCode::OK, &value),
        Err(e) => failed(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeBody {
    app: String,
    secret: String,
    code: String,
}

/// `POST /v1/auth-codes/exchange`: `{"app","secret","code"}`. Wrong secrets are counted and
/// rate-limited per address and app, as the proxy's tokens are.
pub(crate) async fn exchange(
    req: Request<Incoming>,
    service: &ScopeService,
    config: &Config,
    caller: &Caller,
) -> Response<Body> {
    let body: ExchangeBody = match parse(req, "{\"app\",\"secret\",\"code\"}").await {
        Ok(body) => body,
        Err(refusal) => return refusal,
    };
    let ip = caller.client.ip();
    if let Err(wait) = caller.state.exchange_throttle.check(ip, &body.app) {
        let mut response = error(StatusCode::TOO_MANY_REQUESTS, "too many wrong secrets from this address; wait");
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(wait.as_secs() + 1));
        return response;
    }
    match service.exchange(config, &body.app, &body.secret, &body.code) {
        Ok(value) => json_response(StatusCode::OK, &value),
        Err(e) => {
            let status = match e {
                ExchangeError::BadSecret => {
                    caller.state.exchange_throttle.failed(ip, &body.app);
                    StatusCode::UNAUTHORIZED
                }
                ExchangeError::UnknownCode | ExchangeError::Expired | ExchangeError::OtherApp => {
                    StatusCode::BAD_REQUEST
                }
            };
            tracing::info!(app = body.app, client = %caller.client, reason = e.reason(), "auth code exchange refused");
            json_response(status, &json!({ "error": e.to_string(), "reason": e.reason() }))
        }
    }
}

/// The query of `GET /v1/scopes/settings`, `…/prompts` and `…/history`.
/// `?app=&user=`: an app that is not a valid app id, or an empty user, is left out (and the
/// caller refuses the query).
fn query(req: &Request<Incoming>) -> (Option<String>, Option<String>) {
    let (mut app, mut user) = (None, None);
    let mut malformed = false;
    for (key, value) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match &*key {
            "app" if crate::policy::is_valid_app_id(&value) => app = Some(value.into_owned()),
            "user" if valid_user(&value) => user = Some(value.into_owned()),
            "app" | "user" => malformed = true,
            _ => {}
        }
    }
    if malformed { (None, None) } else { (app, user) }
}

/// `GET /v1/scopes/settings?app=&user=` (getSetting).
pub(crate) fn settings(
    req: &Request<Incoming>,
    service: &ScopeService,
    config: &Config,
    bound: Bound<'_>,
) -> Response<Body> {
    let (Some(app), Some(user)) = query(req) else {
        return error(StatusCode::BAD_REQUEST, "name the app and the user: ?app=ID&user=USER");
    };
    if let Some(refusal) = outside(bound, &app) {
        return refusal;
    }
    match service.settings(config, &app, &user) {
        Ok(value) => json_response(StatusCode::OK, &value),
        Err(e) => failed(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingBody {
    app: String,
    user: String,
    scope: String,
    state: Consent,
}

/// `PUT /v1/scopes/settings` (openSetting): `{"app","user","scope","state"}`.
pub(crate) async fn change_setting(
    req: Request<Incoming>,
    service: &ScopeService,
    config: &Config,
    who: &str,
) -> Response<Body> {
    let shape = "{\"app\",\"user\",\"scope\",\"state\":\"granted\"|\"denied\"|\"not_asked\"}";
    let body: SettingBody = match parse(req, shape).await {
        Ok(body) => body,
        Err(refusal) => return refusal,
    };
    if !valid_user(&body.user) {
        return error(StatusCode::BAD_REQUEST, "user is 1 to 128 characters, without control characters");
    }
    match service.change_setting(config, &body.app, &body.user, &body.scope, body.state, who) {
        Ok(value) => json_response(StatusCode::OK, &value),
        Err(e) => failed(&e),
    }
}

/// `GET /v1/scopes/prompts[?app=]`.
pub(crate) fn prompts(req: &Request<Incoming>, service: &ScopeService, bound: Bound<'_>) -> Response<Body> {
    let (app, _) = query(req);
    if let Some(refusal) = app.as_deref().and_then(|app| outside(bound, app)) {
        return refusal;
    }
    let mut prompts = service.prompts(app.as_deref());
    if let Some(apps) = bound {
        prompts.retain(|prompt| apps.iter().any(|allowed| **allowed == *prompt.app));
    }
    json_response(StatusCode::OK, &json!({ "prompts": prompts }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerBody {
    answer: PromptAnswer,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum PromptAnswer {
    Allow,
    Deny,
}

/// `POST /v1/scopes/prompts/{id}`: `{"answer":"allow"|"deny"}`.
pub(crate) async fn answer(req: Request<Incoming>, service: &Arc<ScopeService>, id: &str, who: &str) -> Response<Body> {
    let body: AnswerBody = match parse(req, "{\"answer\":\"allow\"|\"deny\"}").await {
        Ok(body) => body,
        Err(refusal) => return refusal,
    };
    let allow = body.answer == PromptAnswer::Allow;
    // The consent record is written and synced off the async workers.
    let (service, prompt, who) = (service.clone(), id.to_owned(), who.to_owned());
    let settled = tokio::task::spawn_blocking(move || service.settle(&prompt, allow, &who)).await;
    match settled.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())) {
        None => error(StatusCode::NOT_FOUND, &format!("no prompt {id:?} is waiting (answered, or timed out)")),
        Some(Err(e)) => failed(&e),
        Some(Ok(view)) => {
            let state = if allow { "granted" } else { "denied" };
            json_response(
                StatusCode::OK,
                &json!({ "id": view.id, "app": view.app, "user": view.user, "scope": view.scope, "state": state }),
            )
        }
    }
}

/// `GET /v1/scopes/history?app=[&user=]`: the consent changes of an app, newest first.
pub(crate) fn history(req: &Request<Incoming>, service: &ScopeService, bound: Bound<'_>) -> Response<Body> {
    let (Some(app), user) = query(req) else {
        return error(StatusCode::BAD_REQUEST, "name the app: ?app=ID[&user=USER]");
    };
    if let Some(refusal) = outside(bound, &app) {
        return refusal;
    }
    match service.history(&app, user.as_deref()) {
        Ok(changes) => json_response(StatusCode::OK, &json!({ "app": app, "changes": changes })),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot read the consent history: {e}")),
    }
}
