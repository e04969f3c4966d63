//! Failed authentication, rate-limited per client address.
//!
//! Each client address (an IPv6 client by its /64, which one host usually owns whole) has a
//! token bucket of [`BURST`] failures that refills at [`REFILL_PER_SECOND`]. A client whose
//! bucket is empty is refused `429` before its credentials are even looked at, so a token
//! cannot be guessed at line rate, while a client that mistyped a few times never notices.
//! Only failures take from the bucket; successes cost nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures a client may make in a row before it is slowed down.
pub const BURST: f64 = 10.0;
/// Failures per second a client may keep making after its burst.
pub const REFILL_PER_SECOND: f64 = 1.0;
/// Addresses tracked at most. When full, addresses whose buckets are full again are
/// forgotten (at most once a second); if none is, a new address goes untracked rather than
/// growing the map: an attacker with that many addresses is a job for a firewall.
const MAX_TRACKED: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (self.tokens + elapsed * REFILL_PER_SECOND).min(BURST)
    }
}

/// The per-address failure buckets of one listener.
#[derive(Debug)]
pub struct AuthThrottle {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    last_sweep: Mutex<Option<Instant>>,
}

impl Default for AuthThrottle {
    fn default() -> Self {
        AuthThrottle { buckets: Mutex::new(HashMap::new()), last_sweep: Mutex::new(None) }
    }
}

/// The key of a client: its IPv4 address, or the /64 of its IPv6 address.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

impl AuthThrottle {
    /// Whether `ip` may try to authenticate now; when not, how long until it may.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        self.check_at(ip, Instant::now())
    }

    /// Note a failed authentication by `ip`.
    pub fn failed(&self, ip: IpAddr) {
        self.failed_at(ip, Instant::now());
    }

    fn check_at(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match buckets.get(&client_key(ip)) {
            Some(bucket) => {
                let tokens = bucket.refilled(now);
                if tokens >= 1.0 { Ok(()) } else { Err(Duration::from_secs_f64((1.0 - tokens) / REFILL_PER_SECOND)) }
            }
            None => Ok(()),
        }
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) {
        let key = client_key(ip);
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !buckets.contains_key(&key) && buckets.len() >= MAX_TRACKED {
            let mut last_sweep = self.last_sweep.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if last_sweep.is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1)) {
                *last_sweep = Some(now);
                buckets.retain(|_, bucket| bucket.refilled(now) < BURST);
            }
            if buckets.len() >= MAX_TRACKED {
                return;
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket { tokens: BURST, updated: now });
        bucket.tokens = (bucket.refilled(now) - 1.0).max(0.0);
        bucket.updated = now;
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_failures_then_one_a_second() {
        let throttle = AuthThrottle::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let start = Instant::now();
        for _ in 0..BURST as usize {
            assert!(throttle.check_at(ip, start).is_ok());
            throttle.failed_at(ip, start);
        }
        let wait = throttle.check_at(ip, start).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(throttle.check_at("192.0.2.8".parse().unwrap(), start).is_ok(), "other clients are not slowed");
        let later = start + Duration::from_millis(1_100);
        assert!(throttle.check_at(ip, later).is_ok(), "one more try after a second");
        throttle.failed_at(ip, later);
        assert!(throttle.check_at(ip, later).is_err());
    }

    #[test]
    fn an_ipv6_client_is_its_slash_64() {
        let throttle = AuthThrottle::default();
        let now = Instant::now();
        for i in 0..BURST as u32 {
            throttle.failed_at(format!("2001:db8:1:2::{i:x}").parse().unwrap(), now);
        }
        assert!(throttle.check_at("2001:db8:1:2:ffff::1".parse().unwrap(), now).is_err());
        assert!(throttle.check_at("2001:db8:1:3::1".parse().unwrap(), now).is_ok());
    }

    #[test]
    fn the_map_never_grows_past_its_bound() {
        let throttle = AuthThrottle::default();
        let now = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 100) {
            throttle.failed_at(IpAddr::V4(i.into()), now);
        }
        assert_eq!(throttle.tracked(), MAX_TRACKED);
        // a second on, every bucket is full again: the next new address sweeps them away
        throttle.failed_at("198.51.100.1".parse().unwrap(), now + Duration::from_secs(11));
        assert_eq!(throttle.tracked(), 1);
    }
}
