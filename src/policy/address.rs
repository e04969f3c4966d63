//! The address ranges a tunnel may never reach, whatever name led to them.
//!
//! These are the ranges Smokescreen blocks: the host itself, private networks, link-local
//! (cloud metadata lives at 169.254.169.254), carrier-grade NAT, multicast, broadcast, and
//! every IPv6 form that embeds an IPv4 address and so could smuggle one of the above.

use std::net::IpAddr;
use std::sync::LazyLock;

use ipnet::IpNet;

static BLOCKED: LazyLock<Vec<IpNet>> = LazyLock::new(|| {
    [
        "0.0.0.0/8",       // "this network", unspecified
        "10.0.0.0/8",      // RFC 1918
        "100.64.0.0/10",   // carrier-grade NAT
        "127.0.0.0/8",     // loopback
        "169.254.0.0/16",  // link-local, cloud metadata
        "172.16.0.0/12",   // RFC 1918
        "192.0.0.0/24",    // IETF protocol assignments
        "192.0.2.0/24",    // documentation
        "192.168.0.0/16",  // RFC 1918
        "198.18.0.0/15",   // benchmarking
        "198.51.100.0/24", // documentation
        "203.0.113.0/24",  // documentation
        "224.0.0.0/4",     // multicast
        "240.0.0.0/4",     // reserved, and 255.255.255.255 broadcast
        "::/128",          // unspecified
        "::1/128",         // loopback
        "::/96",           // IPv4-compatible (deprecated)
        "::ffff:0:0/96",   // IPv4-mapped
        "64:ff9b::/96",    // NAT64
        "64:ff9b:1::/48",  // local-use NAT64
        "100::/64",        // discard-only
        "2001::/32",       // Teredo
        "2001:db8::/32",   // documentation
        "2002::/16",       // 6to4
        "fc00::/7",        // unique local
        "fe80::/10",       // link-local
        "fec0::/10",       // site-local (deprecated)
        "ff00::/8",        // multicast
    ]
    .iter()
    .map(|net| net.parse().expect("the blocked ranges are valid CIDR"))
    .collect()
});

/// True when a tunnel must not be opened to `ip`.
pub fn is_blocked(ip: IpAddr) -> bool {
    BLOCKED.iter().any(|net| net.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_what_smokescreen_blocks() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "127.255.255.254",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "2001:0:4136:e378::1",
        ] {
            assert!(is_blocked(ip.parse().unwrap()), "{ip} should be blocked");
        }
    }

    #[test]
    fn lets_public_addresses_through() {
        for ip in ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "2a00:1450::1"] {
            assert!(!is_blocked(ip.parse().unwrap()), "{ip} should be allowed");
        }
    }
}
