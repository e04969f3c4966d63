//! Whitelist entries: the restricted grammar an operator writes in a domain list.
//!
//! An entry is not a URL. It names a host pattern and a port rule, optionally behind an
//! `https://` or `wss://` scheme, and nothing else: no path, query, userinfo, IP address or
//! stray wildcard. Each refusal says exactly what to remove, because operators copy entries
//! out of mini-program consoles and browsers.

use std::fmt;

use super::host::{Host, HostError, normalize_host, parse_host};
use super::target::{TargetError, parse_port};

/// What hosts an entry covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// `api.shop.example`: that host only.
    Exact(Box<str>),
    /// `*.shop.example`: any subdomain at any depth, not `shop.example` itself.
    Subdomains(Box<str>),
    /// `.shop.example`: `shop.example` and any subdomain.
    Domain(Box<str>),
}

impl Pattern {
    /// The normalized name the pattern is anchored on (the key it is stored under).
    pub fn anchor(&self) -> &str {
        match self {
            Pattern::Exact(name) | Pattern::Subdomains(name) | Pattern::Domain(name) => name,
        }
    }
}

/// Which ports an entry covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRule {
    Only(u16),
    Any,
}

impl PortRule {
    pub fn allows(self, port: u16) -> bool {
        match self {
            PortRule::Only(only) => only == port,
            PortRule::Any => true,
        }
    }
}

/// One parsed whitelist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub pattern: Pattern,
    pub ports: PortRule,
    /// Whether it was written as `wss://` (kept only to print the entry back).
    pub websocket: bool,
    /// The operator's note, shown by `/v1/apps`; never used for matching.
    pub remark: Option<Box<str>>,
}

impl fmt::Display for Entry {
    /// The canonical spelling: what `explain`, `/v1/apps` and the access log show.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.websocket {
            f.write_str("wss://")?;
        }
        match &self.pattern {
            Pattern::Exact(name) => f.write_str(name)?,
            Pattern::Subdomains(name) => write!(f, "*.{name}")?,
            Pattern::Domain(name) => write!(f, ".{name}")?,
        }
        match self.ports {
            PortRule::Only(443) if !self.websocket => Ok(()),
            PortRule::Only(port) => write!(f, ":{port}"),
            PortRule::Any => Ok(()),
        }
    }
}

/// Why an entry was refused; the message is what `check` prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("only https:// and wss:// entries are allowed")]
    InsecureScheme,
    #[error("unsupported scheme {0:?}: only https:// and wss:// entries are allowed")]
    UnknownScheme(String),
    #[error("an entry must not contain userinfo (user@)")]
    Userinfo,
    #[error("an entry must not contain a path")]
    Path,
    #[error("an entry must not contain a query")]
    Query,
    #[error("an entry must not contain a fragment")]
    Fragment,
    #[error("IP addresses are not allowed; name the host")]
    IpAddress,
    #[error("localhost is not allowed")]
    Localhost,
    #[error("a wildcard is only allowed as a whole leading label (*.example.com)")]
    Wildcard,
    #[error("the port must be a number from 1 to 65535")]
    Port,
    #[error("empty label in host")]
    EmptyLabel,
    #[error("invalid host: {0}")]
    Host(HostError),
}

/// Parse one whitelist entry as written in the config.
pub fn parse_entry(raw: &str) -> Result<Entry, EntryError> {
    let (websocket, rest) = match raw.split_once("://") {
        Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
            "https" => (false, rest),
            "wss" => (true, rest),
            "http" | "ws" => return Err(EntryError::InsecureScheme),
            _ => return Err(EntryError::UnknownScheme(scheme.to_owned())),
        },
        None => (false, raw),
    };
    if rest.contains('@') {
        return Err(EntryError::Userinfo);
    }
    if rest.contains('#') {
        return Err(EntryError::Fragment);
    }
    if rest.contains('?') {
        return Err(EntryError::Query);
    }
    if rest.contains(['/', '\\']) {
        return Err(EntryError::Path);
    }
    if rest.starts_with('[') {
        return Err(EntryError::IpAddress);
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (host, Some(parse_port(port).map_err(|_: TargetError| EntryError::Port)?)),
        None => (rest, None),
    };
    let ports = match (port, websocket) {
        (Some(port), _) => PortRule::Only(port),
        (None, false) => PortRule::Only(443),
        (None, true) => PortRule::Any,
    };
    let pattern = parse_pattern(host)?;
    Ok(Entry { pattern, ports, websocket, remark: None })
}

fn parse_pattern(host: &str) -> Result<Pattern, EntryError> {
    let (make, name): (fn(Box<str>) -> Pattern, &str) = if let Some(rest) = host.strip_prefix("*.") {
        (Pattern::Subdomains, rest)
    } else if let Some(rest) = host.strip_prefix('.') {
        (Pattern::Domain, rest)
    } else {
        (Pattern::Exact, host)
    };
    if name.contains('*') || host == "*" {
        return Err(EntryError::Wildcard);
    }
    if name.starts_with('.') || name.is_empty() {
        return Err(EntryError::EmptyLabel);
    }
    if let Ok(Host::Ip(_)) = parse_host(name) {
        return Err(EntryError::IpAddress);
    }
    let normalized = normalize_host(name).map_err(|e| match e {
        HostError::EmptyLabel | HostError::Empty => EntryError::EmptyLabel,
        other => EntryError::Host(other),
    })?;
    if normalized == "localhost" || normalized.ends_with(".localhost") {
        return Err(EntryError::Localhost);
    }
    Ok(make(normalized.into_owned().into_boxed_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(raw: &str) -> Entry {
        parse_entry(raw).unwrap_or_else(|e| panic!("{raw:?}: {e}"))
    }

    #[test]
    fn scheme_and_port_rules() {
        let e = entry("https://api.shop.example");
        assert_eq!(e.pattern, Pattern::Exact("api.shop.example".into()));
        assert_eq!(e.ports, PortRule::Only(443));
        assert_eq!(entry("api.shop.example"), e);
        assert_eq!(entry("HTTPS://API.shop.example."), e);
        assert_eq!(entry("https://api.shop.example:8443").ports, PortRule::Only(8443));
        assert_eq!(entry("wss://ws.shop.example").ports, PortRule::Any);
        assert_eq!(entry("wss://ws.shop.example:9000").ports, PortRule::Only(9000));
    }

    #[test]
    fn wildcard_forms() {
        assert_eq!(entry("*.shop.example").pattern, Pattern::Subdomains("shop.example".into()));
        assert_eq!(entry("https://*.shop.example").pattern, Pattern::Subdomains("shop.example".into()));
        assert_eq!(entry(".shop.example").pattern, Pattern::Domain("shop.example".into()));
        assert_eq!(entry("*.bücher.example").pattern, Pattern::Subdomains("xn--bcher-kva.example".into()));
    }

    #[test]
    fn canonical_spelling() {
        for (raw, shown) in [
            ("https://API.shop.example", "api.shop.example"),
            ("https://img.shop.example:8443", "img.shop.example:8443"),
            ("wss://ws.shop.example", "wss://ws.shop.example"),
            ("wss://ws.shop.example:443", "wss://ws.shop.example:443"),
            ("*.shop.example", "*.shop.example"),
            (".shop.example:8443", ".shop.example:8443"),
        ] {
            assert_eq!(entry(raw).to_string(), shown);
        }
    }

    #[test]
    fn refusals_name_the_problem() {
        let cases = [
            ("http://api.shop.example", EntryError::InsecureScheme),
            ("ws://api.shop.example", EntryError::InsecureScheme),
            ("ftp://api.shop.example", EntryError::UnknownScheme("ftp".into())),
            ("https://user@api.shop.example", EntryError::Userinfo),
            ("https://api.shop.example/path", EntryError::Path),
            ("https://api.shop.example?q=1", EntryError::Query),
            ("https://api.shop.example#x", EntryError::Fragment),
            ("https://10.0.0.1", EntryError::IpAddress),
            ("https://[::1]:443", EntryError::IpAddress),
            ("127.1", EntryError::IpAddress),
            ("１２７.０.０.１", EntryError::IpAddress),
            ("localhost", EntryError::Localhost),
            ("api.localhost", EntryError::Localhost),
            ("https://api.shop.example:0", EntryError::Port),
            ("https://api.shop.example:65536", EntryError::Port),
            ("https://api.shop.example:", EntryError::Port),
            ("login.*.shop.example", EntryError::Wildcard),
            ("*x.example", EntryError::Wildcard),
            ("*", EntryError::Wildcard),
            ("*.*.example", EntryError::Wildcard),
            ("api..shop.example", EntryError::EmptyLabel),
            ("..shop.example", EntryError::EmptyLabel),
            ("*.", EntryError::EmptyLabel),
            ("", EntryError::EmptyLabel),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_entry(raw), Err(want), "{raw:?}");
        }
    }
}
