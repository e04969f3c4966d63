//! What a client is told: refusals with `X-Gateway-*` headers and a JSON body.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue, PROXY_AUTHENTICATE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::policy::{Channel, Reason, Verdict};

pub type Body = Full<Bytes>;

pub const DECISION_HEADER: &str = "x-gateway-decision";
pub const REASON_HEADER: &str = "x-gateway-reason";
pub const REALM: &str = "Basic realm=\"miniapp-gateway\"";

/// The JSON body of a refusal.
#[derive(Debug, Serialize)]
pub struct RefusalBody<'a> {
    pub decision: &'static str,
    pub reason: &'static str,
    pub app: Option<&'a str>,
    pub channel: Option<&'static str>,
    pub host: Option<&'a str>,
    pub port: Option<u16>,
    pub message: &'a str,
}

/// Build the response for a refusal.
pub fn refusal(
    reason: Reason,
    app: Option<&str>,
    channel: Option<Channel>,
    host: Option<&str>,
    port: Option<u16>,
    message: &str,
) -> Response<Body> {
    let body = RefusalBody {
        decision: Verdict::Deny.as_str(),
        reason: reason.as_str(),
        app,
        channel: channel.map(Channel::as_str),
        host,
        port,
        message,
    };
    let mut json = serde_json::to_vec(&body).unwrap_or_default();
    json.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(json)));
    *response.status_mut() = StatusCode::from_u16(reason.status()).unwrap_or(StatusCode::FORBIDDEN);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(DECISION_HEADER, HeaderValue::from_static("deny"));
    headers.insert(REASON_HEADER, HeaderValue::from_static(reason.as_str()));
    if reason.status() == 407 {
        headers.insert(PROXY_AUTHENTICATE, HeaderValue::from_static(REALM));
    }
    response
}

/// `200 Connection established`, with the decision that let the tunnel through.
pub fn established(verdict: Verdict, reason: Reason) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    response.extensions_mut().insert(hyper::ext::ReasonPhrase::from_static(b"Connection established"));
    let headers = response.headers_mut();
    headers.insert(DECISION_HEADER, HeaderValue::from_static(verdict.as_str()));
    headers.insert(REASON_HEADER, HeaderValue::from_static(reason.as_str()));
    response
}

/// The bytes sent to a connection refused before it is read (over `max_connections`).
pub fn overloaded_bytes() -> Vec<u8> {
    let message = Reason::Overloaded.message("", Channel::Request, "");
    let body = RefusalBody {
        decision: "deny",
        reason: Reason::Overloaded.as_str(),
        app: None,
        channel: None,
        host: None,
        port: None,
        message: &message,
    };
    let mut json = serde_json::to_vec(&body).unwrap_or_default();
    json.push(b'\n');
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\n{DECISION_HEADER}: deny\r\n{REASON_HEADER}: overloaded\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        json.len()
    )
    .into_bytes();
    out.extend_from_slice(&json);
    out
}
