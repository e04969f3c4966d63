//! Failed authentication, rate-limited per client address and per (address, app).
//!
//! Two token buckets stand in front of every password a client presents: one for its address
//! (an IPv6 client counts by its /64, which one host usually owns whole) that allows
//! [`ADDRESS_BURST`] failures and refills at [`ADDRESS_REFILL`] a second, so no address can
//! guess at line rate across many apps; and one for the (address, app claimed) pair, with
//! [`APP_BURST`] failures refilling at [`APP_REFILL`] a second, so one misconfigured miniapp
//! behind a shared address (a sidecar on loopback, an office behind NAT) slows down only
//! itself. A client whose bucket is empty is refused `429` whatever it presents; only failures
//! take from a bucket. An address that never failed costs one atomic load.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Failures one (address, app) pair may make in a row before it is slowed down.
pub const APP_BURST: f64 = 10.0;
/// Failures a second a pair may go on making after its burst.
pub const APP_REFILL: f64 = 1.0;
/// Failures one address may make in a row, whatever apps it claims.
pub const ADDRESS_BURST: f64 = 50.0;
/// Failures a second an address may go on making after its burst.
pub const ADDRESS_REFILL: f64 = 5.0;
/// Buckets kept at most, for addresses and for pairs each. When a map is full, buckets that
/// are full again are forgotten, at most once a second; if that frees nothing, new keys go
/// untracked (and a warning says so) rather than locking out clients that never failed: a
/// flood from that many addresses is a job for a firewall.
const MAX_TRACKED: usize = 65_536;

/// (client address or /64, hash of the app claimed; 0 for the address's own bucket).
type Key = (IpAddr, u64);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// One kind of bucket: its size and refill rate, and the buckets themselves.
#[derive(Debug)]
struct Buckets {
    burst: f64,
    refill: f64,
    map: DashMap<Key, Bucket>,
    /// `map.len()`, kept apart so that the common case (nobody failed) takes no lock.
    tracked: AtomicUsize,
    /// Milliseconds since `epoch` of the last sweep.
    last_sweep: AtomicU64,
}

impl Buckets {
    fn new(burst: f64, refill: f64) -> Buckets {
        Buckets { burst, refill, map: DashMap::new(), tracked: AtomicUsize::new(0), last_sweep: AtomicU64::new(0) }
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        (bucket.tokens + elapsed * self.refill).min(self.burst)
    }

    fn check(&self, key: Key, now: Instant) -> Result<(), Duration> {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let Some(bucket) = self.map.get(&key).map(|b| *b) else { return Ok(()) };
        let tokens = self.refilled(bucket, now);
        if tokens >= 1.0 { Ok(()) } else { Err(Duration::from_secs_f64((1.0 - tokens) / self.refill)) }
    }

    fn failed(&self, key: Key, now: Instant, epoch: Instant) {
        if !self.map.contains_key(&key) && self.tracked.load(Ordering::Relaxed) >= MAX_TRACKED {
            self.sweep(now, epoch);
            if self.tracked.load(Ordering::Relaxed) >= MAX_TRACKED {
                tracing::warn!(tracked = MAX_TRACKED, "too many clients failing authentication to track them all");
                return;
            }
        }
        let mut bucket = self.map.entry(key).or_insert_with(|| {
            self.tracked.fetch_add(1, Ordering::Relaxed);
            Bucket { tokens: self.burst, updated: now }
        });
        bucket.tokens = (self.refilled(*bucket, now) - 1.0).max(0.0);
        bucket.updated = now;
    }

    /// Forget the buckets that are full again; at most once a second.
    fn sweep(&self, now: Instant, epoch: Instant) {
        let now_ms = u64::try_from(now.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX);
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < 1_000
            || self.last_sweep.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        self.map.retain(|_, bucket| {
            let keep = self.refilled(*bucket, now) < self.burst;
            if !keep {
                self.tracked.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
    }
}

/// The failure buckets of one listener.
#[derive(Debug)]
pub struct AuthThrottle {
    addresses: Buckets,
    pairs: Buckets,
    epoch: Instant,
}

impl Default for AuthThrottle {
    fn default() -> Self {
        AuthThrottle {
            addresses: Buckets::new(ADDRESS_BURST, ADDRESS_REFILL),
            pairs: Buckets::new(APP_BURST, APP_REFILL),
            epoch: Instant::now(),
        }
    }
}

/// A client's address key: its IPv4 address or the /64 of its IPv6 address.
fn address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

fn pair(ip: IpAddr, app: &str) -> Key {
    // 0 is the address's own bucket; no app hashes there in practice, and one that did would
    // only share the address's limit.
    (address(ip), foldhash::fast::FixedState::with_seed(0).hash_one(app) | 1)
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
        self.addresses.check((address(ip), 0), now)?;
        self.pairs.check(pair(ip, app), now)
    }

    fn failed_at(&self, ip: IpAddr, app: &str, now: Instant) {
        self.addresses.failed((address(ip), 0), now, self.epoch);
        self.pairs.failed(pair(ip, app), now, self.epoch);
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
        for _ in 0..APP_BURST as usize {
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
    fn an_address_is_limited_across_apps() {
        let throttle = AuthThrottle::default();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let now = Instant::now();
        for i in 0..ADDRESS_BURST as usize {
            throttle.failed_at(ip, &format!("app{i}"), now);
        }
        assert!(throttle.check_at(ip, "another", now).is_err(), "guessing many apps' tokens is limited too");
    }

    #[test]
    fn an_ipv6_client_is_its_slash_64() {
        let throttle = AuthThrottle::default();
        let now = Instant::now();
        for i in 0..APP_BURST as u32 {
            throttle.failed_at(format!("2001:db8:1:2::{i:x}").parse().unwrap(), "demo", now);
        }
        assert!(throttle.check_at("2001:db8:1:2:ffff::1".parse().unwrap(), "demo", now).is_err());
        assert!(throttle.check_at("2001:db8:1:3::1".parse().unwrap(), "demo", now).is_ok());
    }

    #[test]
    fn a_full_map_sweeps_at_most_once_a_second_and_never_locks_out_the_innocent() {
        let throttle = AuthThrottle::default();
        let now = Instant::now() + Duration::from_secs(5);
        for i in 0..(MAX_TRACKED as u32) {
            throttle.failed_at(IpAddr::V4(i.into()), "demo", now);
        }
        assert_eq!(throttle.pairs.map.len(), MAX_TRACKED);
        // nothing has refilled: a newcomer's failure is not tracked, and nobody new is refused
        throttle.failed_at("198.51.100.1".parse().unwrap(), "demo", now);
        assert_eq!(throttle.pairs.map.len(), MAX_TRACKED);
        assert!(throttle.check_at("198.51.100.2".parse().unwrap(), "demo", now).is_ok());
        // within the same second no second sweep runs, even once the buckets have refilled
        throttle.failed_at("198.51.100.3".parse().unwrap(), "demo", now + Duration::from_millis(500));
        assert_eq!(throttle.pairs.map.len(), MAX_TRACKED);
        // eleven seconds on, every bucket is full again: the next newcomer sweeps them away
        throttle.failed_at("198.51.100.4".parse().unwrap(), "demo", now + Duration::from_secs(11));
        assert_eq!(throttle.pairs.map.len(), 1);
        assert_eq!(throttle.pairs.tracked.load(Ordering::Relaxed), 1);
    }
}
