//! Resolving and dialing the upstream of an allowed CONNECT.
//!
//! The address check and the connect use the same resolved addresses: the gateway never
//! resolves a name twice, so a DNS answer that changes between check and use (rebinding)
//! cannot slip an internal address past the check.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::net::TcpStream;

use crate::policy::address::is_blocked;
use crate::policy::{Host, Policy, Reason, Target};

/// How long a successful lookup is reused. The system resolver does not expose TTLs, so this
/// is a short, fixed bound that still spares getaddrinfo on every tunnel.
const POSITIVE_TTL: Duration = Duration::from_secs(30);
/// How long a failed lookup is remembered, so a storm of tunnels to a dead name costs one.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// At most this many names are cached. When full, expired entries are swept; if none has
/// expired the answer is used but not cached, so a flood of unique names cannot grow it.
const MAX_CACHED: usize = 10_000;

/// Why the upstream could not be reached; each maps to one refusal reason.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("resolves to the blocked address {0}")]
    PrivateAddress(IpAddr),
    #[error("DNS lookup failed: {0}")]
    Dns(String),
    #[error("connect failed: {0}")]
    Unreachable(io::Error),
    #[error("connect timed out")]
    Timeout,
}

impl DialError {
    pub fn reason(&self) -> Reason {
        match self {
            DialError::PrivateAddress(_) => Reason::PrivateAddress,
            DialError::Dns(_) => Reason::DnsFailure,
            DialError::Unreachable(_) => Reason::UpstreamUnreachable,
            DialError::Timeout => Reason::UpstreamTimeout,
        }
    }
}

#[derive(Clone)]
struct Cached {
    answer: Result<Arc<[IpAddr]>, String>,
    expires: Instant,
}

/// The system resolver (getaddrinfo: `/etc/hosts`, then DNS) behind a small TTL cache.
pub struct Resolver {
    cache: DashMap<Box<str>, Cached>,
    capacity: usize,
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::with_capacity(MAX_CACHED)
    }
}

impl Resolver {
    pub fn with_capacity(capacity: usize) -> Resolver {
        Resolver { cache: DashMap::new(), capacity }
    }

    pub async fn lookup(&self, host: &str) -> Result<Arc<[IpAddr]>, String> {
        let now = Instant::now();
        if let Some(hit) = self.cache.get(host)
            && hit.expires > now
        {
            return hit.answer.clone();
        }
        let answer = match tokio::net::lookup_host((host, 0)).await {
            Ok(addrs) => {
                let ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                if ips.is_empty() { Err("no addresses".to_owned()) } else { Ok(Arc::from(ips)) }
            }
            Err(e) => Err(e.to_string()),
        };
        let ttl = if answer.is_ok() { POSITIVE_TTL } else { NEGATIVE_TTL };
        if self.cache.len() >= self.capacity {
            self.cache.retain(|_, cached| cached.expires > now);
        }
        if self.cache.len() < self.capacity {
            self.cache.insert(host.into(), Cached { answer: answer.clone(), expires: now + ttl });
        }
        answer
    }
}

/// Resolve `target` (`[resolve]` first), check every address, then connect within `timeout`
/// (DNS included). Returns the stream and the address it is connected to.
pub async fn dial(
    policy: &Policy,
    resolver: &Resolver,
    target: &Target<'_>,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let port = target.port;
    let addrs: Vec<SocketAddr> = match &target.host {
        Host::Name(name) => match policy.resolve_override(name, port) {
            // Overrides are the operator's own statement, trusted even when private.
            Some(addr) => vec![addr],
            None => {
                let ips = tokio::time::timeout_at(deadline, resolver.lookup(name))
                    .await
                    .map_err(|_| DialError::Dns("timed out".to_owned()))?
                    .map_err(DialError::Dns)?;
                check_addresses(policy, &ips)?;
                ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()
            }
        },
        Host::Ip(ip) => {
            check_addresses(policy, &[*ip])?;
            vec![SocketAddr::new(*ip, port)]
        }
    };
    connect_any(&addrs, deadline).await
}

fn check_addresses(policy: &Policy, ips: &[IpAddr]) -> Result<(), DialError> {
    if !policy.blocks_private_addresses() {
        return Ok(());
    }
    match ips.iter().find(|ip| is_blocked(**ip)) {
        Some(ip) => Err(DialError::PrivateAddress(*ip)),
        None => Ok(()),
    }
}

/// Try each address in order until one connects or the deadline passes.
async fn connect_any(
    addrs: &[SocketAddr],
    deadline: tokio::time::Instant,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let mut last_error = None;
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Err(DialError::Timeout),
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, *addr));
            }
            Ok(Err(e)) => last_error = Some(e),
        }
    }
    Err(DialError::Unreachable(last_error.unwrap_or_else(|| io::Error::other("no address to connect to"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_cache_never_grows_past_its_capacity() {
        // numeric names: getaddrinfo answers them without DNS
        let resolver = Resolver::with_capacity(2);
        for name in ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"] {
            let answer = resolver.lookup(name).await.unwrap();
            assert_eq!(answer[0].to_string(), name, "an uncached answer is still used");
        }
        assert_eq!(resolver.cache.len(), 2);
        assert!(resolver.cache.contains_key("127.0.0.1"), "fresh entries are kept");
    }
}
