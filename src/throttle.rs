//! Failed authentication, rate-limited per client address and app.
//!
//! Each (client address, app claimed) pair has a token bucket of [`BURST`] failures that
//! refills at [`REFILL_PER_SECOND`]; an IPv6 client counts by its /64, which one host usually
//! owns whole. A pair whose bucket is empty is refused `429` whatever it presents, so a token
//! cannot be guessed at line rate, while a client that mistyped a few times never notices.
//! Keying by app as well keeps one misconfigured miniapp from locking out the others that
//! share its address (a sidecar on loopback, an office behind NAT). Only failures take from a
//! bucket; an address that never failed costs one atomic load.

use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Failures a client may make in a row before it is slowed down.
pub const BURST: f64 = 10.0;
/// Failures per second a client may keep making after its burst.
pub const REFILL_PER_SECOND: f64 = 1.0;
/// Pairs tracked at most. When full, pairs whose buckets are full again are forgotten (at
/// most once a second); if that frees nothing, new pairs share one overflow bucket: under a
/// flood from that many addresses new clients are slowed together rather than not at all.
const MAX_TRACKED: usize = 65_536;
/// The bucket new pairs share while the map is full.
const OVERFLOW: Key = (IpAddr::V4(Ipv4Addr::UNSPECIFIED), u64::MAX);

/// (client address or /64, hash of the app claimed).
type Key = (IpAddr, u64);

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

/// The failure buckets of one listener.
#[derive(Debug, Default)]
pub struct AuthThrottle {
    buckets: DashMap<Key, Bucket>,
    /// `buckets.len()`, kept apart so that the common case (nobody failed) takes no lock.
    tracked: AtomicUsize,
    sweeping: AtomicBool,
}

/// The key of a client claiming `app`: its IPv4 address or the /64 of its IPv6 address.
fn key(ip: IpAddr, app: &str) -> Key {
    let ip = match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    };
    (ip, foldhash::fast::FixedState::with_seed(0).hash_one(app))
}

impl AuthThrottle {
    /// Whether `ip` may try to authenticate as `app` now; when not, how long until it may.
    /// `app` is the id claimed (`""` when none could be read).
    pub fn check(&self, ip: IpAddr, app: &str) -> Result<(), Duration> {
        self.check_at(ip, app, Instant::now())
    }

    /// Note a failed authentication by `ip` claiming `app`.
    pub fn failed(&self, ip: IpAddr, app: &str) {
        self.failed_at(ip, app, Instant::now());
    }

    fn check_at(&self, ip: IpAddr, app: &str, now: Instant) -> Result<(), Duration> {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let key = key(ip, app);
        let bucket = self.buckets.get(&key).map(|b| *b).or_else(|| {
            (self.tracked.load(Ordering::Relaxed) >= MAX_TRACKED).then(|| self.buckets.get(&OVERFLOW).map(|b| *b))?
        });
        let Some(bucket) = bucket else { return Ok(()) };
        let tokens = bucket.refilled(now);
        if tokens >= 1.0 { Ok(()) } else { Err(Duration::from_secs_f64((1.0 - tokens) / REFILL_PER_SECOND)) }
    }

    fn failed_at(&self, ip: IpAddr, app: &str, now: Instant) {
        let mut key = key(ip, app);
        if !self.buckets.contains_key(&key) && self.tracked.load(Ordering::Relaxed) >= MAX_TRACKED {
            self.sweep(now);
            if self.tracked.load(Ordering::Relaxed) >= MAX_TRACKED {
                key = OVERFLOW;
            }
        }
        let mut bucket = self.buckets.entry(key).or_insert_with(|| {
            self.tracked.fetch_add(1, Ordering::Relaxed);
            Bucket { tokens: BURST, updated: now }
        });
        bucket.tokens = (bucket.refilled(now) - 1.0).max(0.0);
        bucket.updated = now;
    }

    /// Forget the pairs whose buckets are full again; one sweep at a time.
    fn sweep(&self, now: Instant) {
        if self.sweeping.swap(true, Ordering::Acquire) {
            return;
        }
        self.buckets.retain(|_, bucket| bucket.refilled(now) < BURST);
        self.tracked.store(self.buckets.len(), Ordering::Relaxed);
        self.sweeping.store(false, Ordering::Release);
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
            assert!(throttle.check_at(ip, "demo", start).is_ok());
            throttle.failed_at(ip, "demo", start);
        }
        let wait = throttle.check_at(ip, "demo", start).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(throttle.check_at("192.0.2.8".parse().unwrap(), "demo", start).is_ok(), "other clients go on");
        assert!(throttle.check_at(ip, "shop", start).is_ok(), "other apps from the same address go on");
        let later = start + Duration::from_millis(1_100);
        assert!(throttle.check_at(ip, "demo", later).is_ok(), "one more try after a second");
        throttle.failed_at(ip, "demo", later);
        assert!(throttle.check_at(ip, "demo", later).is_err());
    }

    #[test]
    fn an_ipv6_client_is_its_slash_64() {
        let throttle = AuthThrottle::default();
        let now = Instant::now();
        for i in 0..BURST as u32 {
            throttle.failed_at(format!("2001:db8:1:2::{i:x}").parse().unwrap(), "demo", now);
        }
        assert!(throttle.check_at("2001:db8:1:2:ffff::1".parse().unwrap(), "demo", now).is_err());
        assert!(throttle.check_at("2001:db8:1:3::1".parse().unwrap(), "demo", now).is_ok());
    }

    #[test]
    fn a_full_map_sweeps_then_shares_an_overflow_bucket() {
        let throttle = AuthThrottle::default();
        let now = Instant::now();
        for i in 0..(MAX_TRACKED as u32) {
            throttle.failed_at(IpAddr::V4(i.into()), "demo", now);
        }
        assert_eq!(throttle.buckets.len(), MAX_TRACKED);
        // nobody's bucket has refilled: newcomers share the overflow bucket, and are slowed
        for _ in 0..BURST as usize {
            throttle.failed_at("198.51.100.1".parse().unwrap(), "demo", now);
        }
        assert_eq!(throttle.buckets.len(), MAX_TRACKED + 1);
        assert!(throttle.check_at("198.51.100.2".parse().unwrap(), "demo", now).is_err(), "fails closed");
        // eleven seconds on, every bucket is full again: the next newcomer sweeps them away
        throttle.failed_at("198.51.100.3".parse().unwrap(), "demo", now + Duration::from_secs(11));
        assert_eq!(throttle.buckets.len(), 1);
    }
}
