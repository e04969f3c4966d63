//! Who is asking: the app and channel of a CONNECT.
//!
//! The first source that applies wins: a listener bound to an app (`[[listener]]` with
//! `app`), then a verified client certificate ([`CertIdentity`]), then
//! `Proxy-Authorization: Basic base64(APPID:TOKEN)`. The channel is fixed by a listener
//! binding or a `miniapp://APPID/CHANNEL` certificate, else taken from `X-Miniapp-Channel`,
//! else `request`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hyper::HeaderMap;
use hyper::header::PROXY_AUTHORIZATION;
use subtle::ConstantTimeEq;

use crate::config::Binding;
use crate::policy::{Channel, Policy, is_valid_app_id};

/// The header a client names its channel with.
pub const CHANNEL_HEADER: &str = "x-miniapp-channel";

/// An identified client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub app: Box<str>,
    pub channel: Channel,
    pub proof: Proof,
}

/// What established an identity (a reload checks it again for the tunnels it opened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    Listener,
    Certificate,
    /// The password of `Proxy-Authorization: Basic`.
    Token(Box<str>),
}

/// Why no identity could be established.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no Proxy-Authorization")]
    Missing,
    /// A malformed header, or a wrong token for an app that has one. Carries the app id when
    /// one could be read, for the log.
    #[error("bad credentials")]
    BadCredentials { app: Option<Box<str>> },
    #[error("X-Miniapp-Channel must be request or webview")]
    BadChannel,
    /// Two `Proxy-Authorization` headers: which one counts would be a guess.
    #[error("more than one Proxy-Authorization header")]
    Ambiguous,
}

/// The app a verified client certificate names, and the channel if it fixes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub app: Box<str>,
    pub channel: Option<Channel>,
}

/// Establish the identity of a request on a listener with an optional fixed `binding`, over
/// a connection whose client certificate (if any, and verified) named `cert`.
pub fn identify(
    binding: Option<&Binding>,
    cert: Option<&CertIdentity>,
    headers: &HeaderMap,
    policy: &Policy,
) -> Result<Identity, IdentityError> {
    if let Some(binding) = binding {
        return Ok(Identity { app: binding.app.clone(), channel: binding.channel, proof: Proof::Listener });
    }
    let header_channel = || match headers.get(CHANNEL_HEADER) {
        None => Ok(Channel::Request),
        Some(value) => value.to_str().ok().and_then(Channel::parse).ok_or(IdentityError::BadChannel),
    };
    if let Some(cert) = cert {
        let channel = match cert.channel {
            Some(channel) => channel,
            None => header_channel()?,
        };
        return Ok(Identity { app: cert.app.clone(), channel, proof: Proof::Certificate });
    }
    let channel = header_channel()?;
    let mut values = headers.get_all(PROXY_AUTHORIZATION).iter();
    let header = values.next().ok_or(IdentityError::Missing)?;
    if values.next().is_some() {
        return Err(IdentityError::Ambiguous);
    }
    let (app, token) = parse_basic(header.as_bytes()).ok_or(IdentityError::BadCredentials { app: None })?;
    if !is_valid_app_id(&app) {
        return Err(IdentityError::BadCredentials { app: None });
    }
    if !token_accepted(policy, &app, &token) {
        return Err(IdentityError::BadCredentials { app: Some(app.into()) });
    }
    Ok(Identity { app: app.into(), channel, proof: Proof::Token(token.into()) })
}

/// Whether `token` is a right password for `app`: the app's token when it has one (compared
/// in constant time), anything otherwise.
pub fn token_accepted(policy: &Policy, app: &str, token: &str) -> bool {
    match policy.app(app).and_then(|a| a.token.as_deref()) {
        Some(expected) => bool::from(expected.as_bytes().ct_eq(token.as_bytes())),
        None => true,
    }
}

/// `Basic base64(user:password)`, scheme case-insensitive, as (user, password).
fn parse_basic(header: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(header).ok()?.trim();
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use std::path::Path;

    fn policy() -> Policy {
        let text = "[[app]]\nid = \"demo\"\ntoken = \"s3cret\"\n\n[[app]]\nid = \"free\"\n";
        config::load_str(Path::new("t.toml"), text.to_owned()).unwrap().policy
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    fn basic(user_pass: &str) -> String {
        format!("Basic {}", STANDARD.encode(user_pass))
    }

    #[test]
    fn basic_auth_names_the_app_and_checks_its_token() {
        let p = policy();
        let ok = identify(None, None, &headers(&[("proxy-authorization", &basic("demo:s3cret"))]), &p).unwrap();
        assert_eq!(
            ok,
            Identity { app: "demo".into(), channel: Channel::Request, proof: Proof::Token("s3cret".into()) }
        );
        let wrong = identify(None, None, &headers(&[("proxy-authorization", &basic("demo:guess"))]), &p);
        assert_eq!(wrong, Err(IdentityError::BadCredentials { app: Some("demo".into()) }));
        let any = identify(None, None, &headers(&[("proxy-authorization", &basic("free:whatever"))]), &p);
        assert_eq!(any.unwrap().app.as_ref(), "free");
        let lower =
            identify(None, None, &headers(&[("proxy-authorization", &basic("free:x").replace("Basic", "basic"))]), &p);
        assert!(lower.is_ok());
    }

    #[test]
    fn two_proxy_authorization_headers_are_refused() {
        let p = policy();
        let mut h = HeaderMap::new();
        h.append("proxy-authorization", basic("free:x").parse().unwrap());
        h.append("proxy-authorization", basic("demo:s3cret").parse().unwrap());
        assert_eq!(identify(None, None, &h, &p), Err(IdentityError::Ambiguous));
    }

    #[test]
    fn missing_or_malformed_credentials() {
        let p = policy();
        assert_eq!(identify(None, None, &HeaderMap::new(), &p), Err(IdentityError::Missing));
        let long = basic(&format!("{}:x", "a".repeat(65)));
        for bad in [
            "Bearer abc",
            "Basic !!!",
            "Basic",
            &basic("no-colon"),
            &basic(":empty-user"),
            &basic("two\nlines:x"),
            &basic("sp ace:x"),
            &long,
        ] {
            let got = identify(None, None, &headers(&[("proxy-authorization", bad)]), &p);
            assert_eq!(got, Err(IdentityError::BadCredentials { app: None }), "{bad}");
        }
    }

    #[test]
    fn a_certificate_names_the_app_ahead_of_basic_auth() {
        let p = policy();
        let cert = CertIdentity { app: "free".into(), channel: None };
        let h = headers(&[("proxy-authorization", &basic("demo:guess")), ("x-miniapp-channel", "webview")]);
        let expected = Identity { app: "free".into(), channel: Channel::Webview, proof: Proof::Certificate };
        assert_eq!(identify(None, Some(&cert), &h, &p), Ok(expected));
        let webview = CertIdentity { app: "demo".into(), channel: Some(Channel::Webview) };
        let h = headers(&[("x-miniapp-channel", "request")]);
        assert_eq!(identify(None, Some(&webview), &h, &p).unwrap().channel, Channel::Webview);
        let binding = Binding { app: "free".into(), channel: Channel::Request };
        assert_eq!(identify(Some(&binding), Some(&webview), &h, &p).unwrap().app.as_ref(), "free");
    }

    #[test]
    fn channel_header_and_listener_binding() {
        let p = policy();
        let h = headers(&[("proxy-authorization", &basic("free:x")), ("x-miniapp-channel", "WebView")]);
        assert_eq!(identify(None, None, &h, &p).unwrap().channel, Channel::Webview);
        let h = headers(&[("proxy-authorization", &basic("free:x")), ("x-miniapp-channel", "sockets")]);
        assert_eq!(identify(None, None, &h, &p), Err(IdentityError::BadChannel));
        let binding = Binding { app: "demo".into(), channel: Channel::Webview };
        let h = headers(&[("x-miniapp-channel", "request")]);
        assert_eq!(
            identify(Some(&binding), None, &h, &p).unwrap(),
            Identity { app: "demo".into(), channel: Channel::Webview, proof: Proof::Listener }
        );
    }
}
