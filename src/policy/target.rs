//! The target of a CONNECT: `host:port` in authority form, nothing more.
//!
//! Parsing is strict because everything after it trusts the result: a port is mandatory and
//! in 1–65535, userinfo and paths are refused, and the host is classified (name or address)
//! and normalized here, once.

use super::host::{Host, HostError, normalize_host, parse_host};

/// A parsed, normalized CONNECT target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub host: Host<'a>,
    pub port: u16,
}

impl Target<'_> {
    /// Whether a TLS ClientHello's server name (SNI) names this target's host. An IP target
    /// never matches: SNI cannot carry an address.
    pub fn is_named_by(&self, server_name: Option<&str>) -> bool {
        match (&self.host, server_name.map(normalize_host)) {
            (Host::Name(host), Some(Ok(sni))) => *host == sni,
            _ => false,
        }
    }
}

/// Why a CONNECT target was refused as malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the target must be host:port")]
    MissingPort,
    #[error("the port must be a number from 1 to 65535")]
    BadPort,
    #[error("the target must not carry userinfo")]
    Userinfo,
    #[error("the target must be host:port, without scheme, path or query")]
    NotAuthority,
    #[error("{0}")]
    Host(#[from] HostError),
}

/// Parse a CONNECT request target (`api.shop.example:443`, `[2001:db8::1]:443`).
pub fn parse_authority(raw: &str) -> Result<Target<'_>, TargetError> {
    // One pass for what must not be there and where the port starts.
    let (mut userinfo, mut not_authority, mut colons, mut last_colon) = (false, false, 0, None);
    for (i, &b) in raw.as_bytes().iter().enumerate() {
        match b {
            b'@' => userinfo = true,
            b'/' | b'?' | b'#' | b'\\' => not_authority = true,
            b':' => (colons, last_colon) = (colons + 1, Some(i)),
            _ => {}
        }
    }
    if userinfo {
        return Err(TargetError::Userinfo);
    }
    if not_authority {
        return Err(TargetError::NotAuthority);
    }
    let colon = last_colon.ok_or(TargetError::MissingPort)?;
    let (host, port) = (&raw[..colon], &raw[colon + 1..]);
    let bracketed = host.starts_with('[');
    if bracketed != host.ends_with(']') || (!bracketed && colons > 1) {
        return Err(TargetError::NotAuthority);
    }
    let port = parse_port(port)?;
    let host = parse_host(host)?;
    Ok(Target { host, port })
}

/// A decimal port from 1 to 65535, digits only (no sign, no spaces).
pub fn parse_port(raw: &str) -> Result<u16, TargetError> {
    if raw.is_empty() {
        return Err(TargetError::MissingPort);
    }
    if raw.len() > 5 {
        return Err(TargetError::BadPort);
    }
    let mut value: u32 = 0;
    for b in raw.bytes() {
        if !b.is_ascii_digit() {
            return Err(TargetError::BadPort);
        }
        value = value * 10 + u32::from(b - b'0');
    }
    match u16::try_from(value) {
        Ok(0) | Err(_) => Err(TargetError::BadPort),
        Ok(port) => Ok(port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use std::net::IpAddr;

    #[test]
    fn parses_names_and_addresses() {
        let t = parse_authority("API.Shop.Example.:8443").unwrap();
        assert_eq!(t.host, Host::Name(Cow::Borrowed("api.shop.example")));
        assert_eq!(t.port, 8443);
        let t = parse_authority("[::1]:443").unwrap();
        assert_eq!(t.host, Host::Ip("::1".parse::<IpAddr>().unwrap()));
        let t = parse_authority("127.0.0.1:443").unwrap();
        assert_eq!(t.host, Host::Ip("127.0.0.1".parse::<IpAddr>().unwrap()));
    }

    #[test]
    fn server_names_are_compared_normalized() {
        let t = parse_authority("api.shop.example:443").unwrap();
        assert!(t.is_named_by(Some("api.shop.example")));
        assert!(t.is_named_by(Some("API.shop.example.")));
        assert!(!t.is_named_by(Some("cdn.shop.example")));
        assert!(!t.is_named_by(Some("api.shop.example.evil.example")));
        assert!(!t.is_named_by(None));
        let ip = parse_authority("93.184.216.34:443").unwrap();
        assert!(!ip.is_named_by(Some("93.184.216.34")));
        let idn = parse_authority("xn--bcher-kva.example:443").unwrap();
        assert!(idn.is_named_by(Some("bücher.example")));
    }

    #[test]
    fn refuses_malformed_targets() {
        let cases = [
            ("api.shop.example", TargetError::MissingPort),
            ("api.shop.example:", TargetError::MissingPort),
            ("api.shop.example:0", TargetError::BadPort),
            ("api.shop.example:65536", TargetError::BadPort),
            ("api.shop.example:+443", TargetError::BadPort),
            ("api.shop.example:044300", TargetError::BadPort),
            ("user:pw@api.shop.example:443", TargetError::Userinfo),
            ("api.shop.example:443/x", TargetError::NotAuthority),
            ("::1:443", TargetError::NotAuthority),
            ("[::1:443", TargetError::NotAuthority),
            (":443", TargetError::Host(HostError::Empty)),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_authority(raw), Err(want), "{raw:?}");
        }
    }
}
