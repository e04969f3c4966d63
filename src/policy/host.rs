//! Host names as the policy compares them.
//!
//! Every host that reaches a whitelist, from a config entry or from a CONNECT line, goes
//! through [`normalize_host`] first, so that `API.Shop.Example.`, `api.shop.example` and the
//! Unicode and punycode spellings of an internationalized name all compare equal. Matching is
//! then plain string equality on whole labels, which is what keeps `evilshop.example` away
//! from `*.shop.example`.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use idna::AsciiDenyList;

/// The longest host name DNS can carry, in its dotted text form.
pub const MAX_HOST_LEN: usize = 253;
/// The longest single DNS label.
pub const MAX_LABEL_LEN: usize = 63;

/// Everything but letters, digits, hyphen, dot and underscore. Underscores are not valid in
/// host names by the letter of RFC 952, but real service names use them and browsers accept
/// them, so refusing them would only break legitimate traffic.
const DENIED_ASCII: AsciiDenyList = AsciiDenyList::new(true, " !\"#$%&'()*+,/:;<=>?@[\\]^`{|}~");

/// Why a host name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the host is empty")]
    Empty,
    #[error("the host has an empty label")]
    EmptyLabel,
    #[error("a label of the host is longer than {MAX_LABEL_LEN} characters")]
    LabelTooLong,
    #[error("the host is longer than {MAX_HOST_LEN} characters")]
    TooLong,
    #[error("the host is not a valid domain name")]
    Invalid,
}

/// The host of a target: a domain name in normalized form, or an IP address literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host<'a> {
    Name(Cow<'a, str>),
    Ip(IpAddr),
}

impl Host<'_> {
    /// The host as it is logged and compared: the normalized name, or the address.
    pub fn to_text(&self) -> Cow<'_, str> {
        match self {
            Host::Name(name) => Cow::Borrowed(name),
            Host::Ip(ip) => Cow::Owned(ip.to_string()),
        }
    }

    pub fn into_owned(self) -> Host<'static> {
        match self {
            Host::Name(name) => Host::Name(Cow::Owned(name.into_owned())),
            Host::Ip(ip) => Host::Ip(ip),
        }
    }
}

/// Classify and normalize a host as written in a CONNECT target or a URL authority:
/// `[v6]` and anything WHATWG would read as IPv4 (`127.1`, `0x7f000001`) become addresses,
/// everything else must be a valid domain name and is normalized.
///
/// The IPv4 test runs on the *normalized* name, as WHATWG's host parser does: IDNA maps
/// fullwidth digits and drops ignorable code points, so `１２７.０.０.１` is `127.0.0.1`.
pub fn parse_host(raw: &str) -> Result<Host<'_>, HostError> {
    if let Some(inner) = raw.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or(HostError::Invalid)?;
        return inner.parse::<Ipv6Addr>().map(|ip| Host::Ip(IpAddr::V6(ip))).map_err(|_| HostError::Invalid);
    }
    let name = normalize_host(raw)?;
    if looks_like_ipv4(&name) {
        return parse_ipv4_like(&name).map(|ip| Host::Ip(IpAddr::V4(ip))).ok_or(HostError::Invalid);
    }
    Ok(Host::Name(name))
}

/// Lowercase, drop one trailing dot, convert internationalized labels to punycode and check
/// the result is a DNS name (no empty labels, label and total lengths within DNS limits).
///
/// Names that are already in normal form are returned borrowed: that is the common case on
/// the hot path and costs no allocation.
pub fn normalize_host(raw: &str) -> Result<Cow<'_, str>, HostError> {
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    if trimmed.is_empty() {
        return Err(HostError::Empty);
    }
    if is_normal_form(trimmed.as_bytes()) {
        return Ok(Cow::Borrowed(trimmed));
    }
    let normalized = if is_plain_lowercase_ascii(trimmed) {
        Cow::Borrowed(trimmed)
    } else {
        idna::domain_to_ascii_cow(trimmed.as_bytes(), DENIED_ASCII).map_err(|_| HostError::Invalid)?
    };
    check_dns_shape(&normalized)?;
    Ok(normalized)
}

/// The hot path's test, in one pass: a name that is already a valid DNS name in normal form
/// (lowercase ASCII letters, digits, `-`, `_`; non-empty labels of at most 63 bytes; no
/// punycode label; at most 253 bytes). Anything else, valid or not, takes the full path, so
/// the errors reported are the same either way.
fn is_normal_form(name: &[u8]) -> bool {
    if name.is_empty() || name.len() > MAX_HOST_LEN {
        return false;
    }
    let mut label_start = 0;
    for (i, &b) in name.iter().enumerate() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => {}
            b'.' => {
                if !is_plain_label(&name[label_start..i]) {
                    return false;
                }
                label_start = i + 1;
            }
            _ => return false,
        }
    }
    is_plain_label(&name[label_start..])
}

fn is_plain_label(label: &[u8]) -> bool {
    (1..=MAX_LABEL_LEN).contains(&label.len()) && !label.starts_with(b"xn--")
}

/// True when the name needs no IDNA processing: lowercase letters, digits, `-`, `_`, `.`,
/// and no label that claims to be punycode (those are validated by the IDNA crate).
fn is_plain_lowercase_ascii(name: &str) -> bool {
    name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with("xn--")
        && !name.contains(".xn--")
}

fn check_dns_shape(name: &str) -> Result<(), HostError> {
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    if name.len() > MAX_HOST_LEN {
        return Err(HostError::TooLong);
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(HostError::LabelTooLong);
        }
    }
    Ok(())
}

/// WHATWG's "ends in a number" test: a host whose last label is numeric is an IPv4 address
/// to every URL parser and to `inet_aton`, so it must never be treated as a domain name.
fn looks_like_ipv4(raw: &str) -> bool {
    let trimmed = raw.as_bytes().strip_suffix(b".").unwrap_or(raw.as_bytes());
    let last = match trimmed.iter().rposition(|&b| b == b'.') {
        Some(dot) => &trimmed[dot + 1..],
        None => trimmed,
    };
    if last.is_empty() {
        return false;
    }
    if last.iter().all(u8::is_ascii_digit) {
        return true;
    }
    last.len() >= 2 && last[0] == b'0' && (last[1] | 0x20) == b'x' && last[2..].iter().all(u8::is_ascii_hexdigit)
}

/// Parse the IPv4 forms `inet_aton` accepts (1 to 4 parts, decimal, octal or hex), so that
/// `127.1` is known to be 127.0.0.1 rather than an unknown name.
fn parse_ipv4_like(raw: &str) -> Option<Ipv4Addr> {
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    let mut parts = Vec::with_capacity(4);
    for part in trimmed.split('.') {
        parts.push(parse_ipv4_number(part)?);
        if parts.len() > 4 {
            return None;
        }
    }
    let (last, leading) = parts.split_last()?;
    if leading.iter().any(|&p| p > 255) {
        return None;
    }
    let last_bits = 8 * (4 - leading.len() as u32);
    if last_bits < 32 && *last >= (1u64 << last_bits) || *last > u64::from(u32::MAX) {
        return None;
    }
    let mut value: u64 = 0;
    for (i, &p) in leading.iter().enumerate() {
        value |= p << (24 - 8 * i as u32);
    }
    value |= last;
    u32::try_from(value).ok().map(Ipv4Addr::from)
}

fn parse_ipv4_number(part: &str) -> Option<u64> {
    if part.is_empty() || part.len() > 12 {
        return None;
    }
    let (digits, radix) = if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
        (hex, 16)
    } else if part.len() > 1 && part.starts_with('0') {
        (&part[1..], 8)
    } else {
        (part, 10)
    };
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(raw: &str) -> String {
        normalize_host(raw).unwrap().into_owned()
    }

    #[test]
    fn lowercases_and_drops_one_trailing_dot() {
        assert_eq!(name("API.Shop.Example."), "api.shop.example");
        assert_eq!(name("api.shop.example"), "api.shop.example");
        assert_eq!(normalize_host("api.shop.example.."), Err(HostError::EmptyLabel));
    }

    #[test]
    fn plain_names_are_borrowed() {
        assert!(matches!(normalize_host("api.shop.example").unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn internationalized_names_become_punycode() {
        assert_eq!(name("bücher.example"), "xn--bcher-kva.example");
        assert_eq!(name("BÜCHER.example"), "xn--bcher-kva.example");
        assert_eq!(name("xn--bcher-kva.example"), "xn--bcher-kva.example");
        assert_eq!(name("XN--BCHER-KVA.example"), "xn--bcher-kva.example");
    }

    #[test]
    fn refuses_what_is_not_a_dns_name() {
        for bad in ["", ".", "a..b", ".a", "a b", "a/b", "a:b", "a@b", "a*b", "a%2eb", "a\0b"] {
            assert!(normalize_host(bad).is_err(), "{bad:?} should be refused");
        }
        let long_label = format!("{}.example", "a".repeat(64));
        assert_eq!(normalize_host(&long_label), Err(HostError::LabelTooLong));
        let long_name = ["abcdefghij"; 26].join(".");
        assert_eq!(normalize_host(&long_name), Err(HostError::TooLong));
    }

    proptest::proptest! {
        /// The one-pass check never accepts what the full path would change or refuse.
        #[test]
        fn the_fast_path_agrees_with_the_full_path(raw in "(xn--|[a-zA-Z0-9._ü-]){0,70}") {
            if is_normal_form(raw.as_bytes()) {
                let full = if is_plain_lowercase_ascii(&raw) {
                    check_dns_shape(&raw).map(|()| raw.clone())
                } else {
                    idna::domain_to_ascii_cow(raw.as_bytes(), DENIED_ASCII)
                        .map_err(|_| HostError::Invalid)
                        .map(|name| name.into_owned())
                };
                proptest::prop_assert_eq!(full, Ok(raw));
            }
        }
    }

    #[test]
    fn underscores_are_accepted() {
        assert_eq!(name("_srv.shop.example"), "_srv.shop.example");
    }

    #[test]
    fn ip_literals_in_every_spelling_are_addresses() {
        let v4 = |s| match parse_host(s) {
            Ok(Host::Ip(IpAddr::V4(ip))) => ip,
            other => panic!("{s:?} gave {other:?}"),
        };
        assert_eq!(v4("127.0.0.1"), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(v4("127.1"), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(v4("2130706433"), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(v4("0x7f000001"), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(v4("0177.0.0.1"), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(v4("10.0.0.1."), Ipv4Addr::new(10, 0, 0, 1));
        assert!(matches!(parse_host("[::1]"), Ok(Host::Ip(IpAddr::V6(_)))));
        assert!(parse_host("[::1").is_err());
        assert!(parse_host("256.0.0.1").is_err());
        assert!(parse_host("shop.example.1").is_err(), "a numeric last label is never a name");
        assert!(matches!(parse_host("1.shop.example"), Ok(Host::Name(_))));
        // found by fuzzing: IDNA turns these into IPv4 literals
        assert_eq!(v4("\u{34f}0"), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(v4("１２７.０.０.１"), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(v4("127.0.0.1\u{ad}"), Ipv4Addr::new(127, 0, 0, 1));
    }
}
