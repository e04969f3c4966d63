//! The web console: a small static front end under `/console/`, embedded in the binary (it
//! works on a host with no way out), that speaks only the documented `/v1` API with the
//! token its user signs in with. Its files are served to anyone who reaches the listener
//! (they hold no secrets); everything they show comes through the API and its roles.
//!
//! Every admin answer carries a strict Content-Security-Policy (scripts and styles from the
//! listener itself only, none inline; no framing), `X-Content-Type-Options: nosniff` and
//! `Referrer-Policy: no-referrer`, so the console's own pages are no way in either.

use hyper::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, HeaderValue, LOCATION, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use hyper::{Response, StatusCode};

use super::{Body, respond};

/// Where the console lives; `GET /` redirects here.
pub const PATH: &str = "/console/";

/// The policy of every admin answer.
pub const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'";

/// The console's files: (name under `/console/`, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("", "text/html; charset=utf-8", include_bytes!("console/index.html")),
    ("console.js", "text/javascript; charset=utf-8", include_bytes!("console/console.js")),
    ("api.js", "text/javascript; charset=utf-8", include_bytes!("console/api.js")),
    ("console.css", "text/css; charset=utf-8", include_bytes!("console/console.css")),
    ("icon.svg", "image/svg+xml", include_bytes!("console/icon.svg")),
];

/// The answer to `GET path` when it is the console's: its page, a file, or the redirect
/// from `/`; `None` for every other path.
pub(crate) fn serve(path: &str) -> Option<Response<Body>> {
    if path == "/" || path == "/console" {
        let mut response = respond(StatusCode::FOUND, "text/plain; charset=utf-8", format!("{PATH}\n").into_bytes());
        response.headers_mut().insert(LOCATION, HeaderValue::from_static(PATH));
        return Some(response);
    }
    let name = path.strip_prefix(PATH)?;
    let found = ASSETS.iter().find(|(asset, _, _)| *asset == name);
    let mut response = match found {
        Some((_, content_type, bytes)) => respond(StatusCode::OK, content_type, bytes.to_vec()),
        None => super::error(StatusCode::NOT_FOUND, &format!("no console file {name:?}")),
    };
    // Revalidated each time: an upgraded gateway serves its own console at once.
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(response)
}

/// Add the security headers every admin answer carries.
pub(crate) fn secure(mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers_mut();
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY_VALUE));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}
