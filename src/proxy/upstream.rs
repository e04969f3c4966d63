//! Resolving and dialing the upstream of an allowed CONNECT.
//!
//! The address check and the connect use the same resolved addresses: the gateway never
//! resolves a name twice, so a DNS answer that changes between check and use (rebinding)
//! cannot slip an internal address past the check.
//!
//! Names go to hickory's async resolver (the system's resolv.conf and hosts file, or
//! `[dns] nameservers`), whose cache keeps each answer for its TTL. Around it, [`Resolver`]
//! keeps one lookup in flight per name (later askers wait for its answer), remembers every
//! failure, a lookup that ran out of time included, for `NEGATIVE_TTL`, and runs at most
//! `MAX_IN_FLIGHT` lookups at once. A lookup is a future that ends by its caller's deadline,
//! never a thread: a black-holed name server costs one bounded query per name and stalls
//! nothing else.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::Name;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::config::Dns;
use crate::policy::address::is_blocked;
use crate::policy::{Host, Policy, Reason, Target};

/// How long a failed lookup is remembered, so a storm of tunnels to a dead name costs one.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// At most this many lookups run at once; beyond it a lookup waits for a slot, within its
/// deadline. Each is a future and two UDP sockets (A and AAAA), so the bound is on sockets
/// and name-server load, not threads.
const MAX_IN_FLIGHT: usize = 256;
/// At most this many failures are remembered; when full, the oldest is forgotten first.
const MAX_FAILURES: usize = 10_000;

/// Why the upstream could not be reached; each maps to one refusal reason.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("resolves to the blocked address {0}")]
    PrivateAddress(IpAddr),
    #[error("DNS lookup failed: {0}")]
    Dns(LookupError),
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
            // Out of descriptors for the upstream socket: the gateway's limit, not the upstream's.
            DialError::Unreachable(e) if matches!(e.raw_os_error(), Some(24 | 23)) => Reason::Overloaded,
            DialError::Unreachable(_) => Reason::UpstreamUnreachable,
            DialError::Timeout => Reason::UpstreamTimeout,
        }
    }
}

/// Why a name did not resolve. Cheap to clone: one answer goes to every merged asker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The name server's answer (no such name, a server failure, no addresses), or no way to
    /// ask it.
    #[error("{0}")]
    Failed(Arc<str>),
    /// No answer within the connect timeout. Remembered like any failure.
    #[error("no answer within the connect timeout")]
    TimedOut,
    /// Every lookup slot stayed taken until the deadline. Not the name's fault: not remembered.
    #[error("no free lookup slot within the connect timeout")]
    Busy,
}

type Answer = Result<Arc<[IpAddr]>, LookupError>;

/// Merged, bounded lookups with remembered failures, around hickory's resolver.
pub struct Resolver {
    dns: TokioResolver,
    slots: Semaphore,
    state: Mutex<State>,
}

struct State {
    /// Names being looked up, each with the channel its leader will publish the answer on.
    in_flight: HashMap<Arc<str>, watch::Receiver<Option<Answer>>>,
    failures: Failures,
}

impl Resolver {
    /// Ask `dns.nameservers`, or the system's name servers (resolv.conf) when none are set;
    /// the hosts file first either way. A query waits at most half of `connect_timeout` for
    /// an answer before it is sent again, so one lost datagram does not fail the lookup.
    pub fn new(dns: &Dns, connect_timeout: Duration) -> Result<Resolver, NetError> {
        let with_servers = |servers: &[SocketAddr]| {
            let config = ResolverConfig::from_name_servers(servers.iter().map(|addr| name_server(*addr)).collect());
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        };
        let mut builder = if dns.nameservers.is_empty() {
            match TokioResolver::builder_tokio() {
                Ok(builder) => builder,
                // What the C library does without resolv.conf, or with one that names no
                // server: ask the local host. A resolv.conf that names servers but cannot be
                // read is an error, not a reason to ask elsewhere.
                Err(e) if !names_a_server(Path::new("/etc/resolv.conf")) => {
                    tracing::warn!(error = %e, "no name server in /etc/resolv.conf; asking 127.0.0.1:53");
                    with_servers(&[SocketAddr::from(([127, 0, 0, 1], 53))])
                }
                Err(e) => return Err(e),
            }
        } else {
            with_servers(&dns.nameservers)
        };
        tune(builder.options_mut(), connect_timeout);
        Ok(Resolver::around(builder.build()?))
    }

    fn around(dns: TokioResolver) -> Resolver {
        let state = State { in_flight: HashMap::new(), failures: Failures::new(NEGATIVE_TTL, MAX_FAILURES) };
        Resolver { dns, slots: Semaphore::new(MAX_IN_FLIGHT), state: Mutex::new(state) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The addresses of `host` (a normalized name), by `deadline` at the latest. Joins the
    /// lookup of `host` already in flight, if any; answers a recent failure from memory.
    pub async fn lookup(&self, host: &str, deadline: Instant) -> Answer {
        loop {
            let mut pending = match self.turn(host) {
                Turn::Remembered(error) => return Err(error),
                Turn::Lead(host, publish) => return self.lead(host, publish, deadline).await,
                Turn::Follow(pending) => pending,
            };
            match tokio::time::timeout_at(deadline, pending.wait_for(Option::is_some)).await {
                Err(_) => return Err(LookupError::TimedOut),
                Ok(Ok(answer)) => {
                    if let Some(answer) = answer.as_ref() {
                        return answer.clone();
                    }
                }
                // The leader's caller went away before an answer: ask again.
                Ok(Err(_)) => {}
            }
        }
    }

    /// What this asker of `host` does, decided under the lock (never held across an await).
    fn turn(&self, host: &str) -> Turn {
        let mut state = self.state();
        if let Some(error) = state.failures.get(host, Instant::now()) {
            return Turn::Remembered(error);
        }
        if let Some(pending) = state.in_flight.get(host) {
            return Turn::Follow(pending.clone());
        }
        let (publish, pending) = watch::channel(None);
        let host: Arc<str> = host.into();
        state.in_flight.insert(host.clone(), pending);
        Turn::Lead(host, publish)
    }

    /// Run the lookup for everyone waiting on `host`, remember a failure, publish the answer.
    async fn lead(&self, host: Arc<str>, publish: watch::Sender<Option<Answer>>, deadline: Instant) -> Answer {
        let mut leader = Leader { resolver: self, host, publish, finished: false };
        let answer = self.query(&leader.host, deadline).await;
        leader.finish(&answer);
        answer
    }

    async fn query(&self, host: &str, deadline: Instant) -> Answer {
        let started = Instant::now();
        let Ok(Ok(_slot)) = tokio::time::timeout_at(deadline, self.slots.acquire()).await else {
            return Err(LookupError::Busy);
        };
        // A lookup left less than half its time by the wait for a slot says little about the
        // name: its timeout is not remembered against it.
        let fair =
            deadline.saturating_duration_since(Instant::now()) * 2 >= deadline.saturating_duration_since(started);
        // Fully qualified: the name is asked as it is, never with a search domain appended.
        let mut name = Name::from_ascii(host).map_err(|e| LookupError::Failed(e.to_string().into()))?;
        name.set_fqdn(true);
        match tokio::time::timeout_at(deadline, self.dns.lookup_ip(name)).await {
            Err(_) if fair => Err(LookupError::TimedOut),
            Err(_) => Err(LookupError::Busy),
            Ok(Err(e)) => Err(LookupError::Failed(e.to_string().into())),
            Ok(Ok(found)) => {
                let ips: Vec<IpAddr> = found.iter().collect();
                if ips.is_empty() { Err(LookupError::Failed("no addresses".into())) } else { Ok(ips.into()) }
            }
        }
    }
}

enum Turn {
    /// A failure still remembered.
    Remembered(LookupError),
    /// Run the lookup (already registered as in flight) and publish its answer.
    Lead(Arc<str>, watch::Sender<Option<Answer>>),
    /// Wait for the answer of the lookup in flight.
    Follow(watch::Receiver<Option<Answer>>),
}

/// The lookup of one name in flight. Dropped unfinished (its caller went away), it takes the
/// name out of `in_flight` first; then its channel drops and wakes the followers to ask again.
struct Leader<'a> {
    resolver: &'a Resolver,
    host: Arc<str>,
    publish: watch::Sender<Option<Answer>>,
    finished: bool,
}

impl Leader<'_> {
    /// Under one lock, so no asker can start a second lookup in between: the name leaves
    /// `in_flight` and a failure is remembered. Then the followers get the answer.
    fn finish(&mut self, answer: &Answer) {
        {
            let mut state = self.resolver.state();
            state.in_flight.remove(&self.host);
            if let Err(error) = answer
                && *error != LookupError::Busy
            {
                state.failures.insert(self.host.clone(), error.clone(), Instant::now());
            }
        }
        self.finished = true;
        self.publish.send_replace(Some(answer.clone()));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.resolver.state().in_flight.remove(&self.host);
        }
    }
}

/// Options on top of resolv.conf's (or the defaults): the hosts file first, as getaddrinfo
/// does; A and AAAA asked in parallel, IPv4 addresses tried first, since the dial tries them
/// in order within one deadline and an unroutable IPv6 path would spend it.
fn tune(options: &mut ResolverOpts, connect_timeout: Duration) {
    options.use_hosts_file = ResolveHosts::Always;
    options.timeout = options.timeout.min(connect_timeout / 2).max(Duration::from_millis(100));
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
}

/// Whether a resolv.conf names a name server.
fn names_a_server(resolv_conf: &Path) -> bool {
    std::fs::read_to_string(resolv_conf)
        .is_ok_and(|text| text.lines().any(|line| line.trim_start().starts_with("nameserver")))
}

/// A `[dns]` name server: UDP, and TCP for answers too long for a datagram, on its port.
fn name_server(addr: SocketAddr) -> NameServerConfig {
    let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
        .into_iter()
        .map(|mut connection| {
            connection.port = addr.port();
            connection
        })
        .collect();
    NameServerConfig::new(addr.ip(), true, connections)
}

/// Recent failures. They all live for one TTL, so insertion order is expiry order: a queue
/// beside the map finds the expired (and, when full, the oldest) at its front, and each insert
/// evicts in amortized O(1), never by scanning.
struct Failures {
    ttl: Duration,
    capacity: usize,
    by_name: HashMap<Arc<str>, Failure>,
    /// Every insert in order, with its sequence number; an entry whose number no longer
    /// matches the map's was overwritten by a later failure of the same name.
    order: VecDeque<(Arc<str>, u64)>,
    next_seq: u64,
}

struct Failure {
    error: LookupError,
    expires: Instant,
    seq: u64,
}

impl Failures {
    fn new(ttl: Duration, capacity: usize) -> Failures {
        Failures { ttl, capacity: capacity.max(1), by_name: HashMap::new(), order: VecDeque::new(), next_seq: 0 }
    }

    fn get(&self, host: &str, now: Instant) -> Option<LookupError> {
        self.by_name.get(host).filter(|f| f.expires > now).map(|f| f.error.clone())
    }

    fn insert(&mut self, host: Arc<str>, error: LookupError, now: Instant) {
        while let Some((name, seq)) = self.order.front() {
            let current = self.by_name.get(name).filter(|f| f.seq == *seq);
            let stale = current.is_none_or(|f| f.expires <= now);
            if !stale && self.order.len() < self.capacity {
                break;
            }
            if current.is_some() {
                self.by_name.remove(name);
            }
            self.order.pop_front();
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        self.order.push_back((host.clone(), seq));
        self.by_name.insert(host, Failure { error, expires: now + self.ttl, seq });
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
                let ips = resolver.lookup(name, deadline).await.map_err(DialError::Dns)?;
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
    use std::net::Ipv4Addr;

    use hickory_resolver::proto::op::{Message, ResponseCode};
    use hickory_resolver::proto::rr::rdata::{A, SOA};
    use hickory_resolver::proto::rr::{RData, Record, RecordType};
    use tokio::net::UdpSocket;
    use tokio::task::JoinSet;

    use super::*;

    const ANSWER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

    /// How the stub name server answers.
    #[derive(Clone, Copy)]
    enum Behaviour {
        /// After a delay: `ANSWER` for A queries, no records for others.
        AnswerAfter(Duration),
        NxDomain,
        /// Reads every query, answers none (a black hole).
        Silent,
        /// At once for names beginning with `alive.`, like `AnswerAfter`; never for others.
        OnlyAlive,
    }

    /// A UDP name server on 127.0.0.1 that records every query it reads.
    struct StubDns {
        addr: SocketAddr,
        queries: Arc<Mutex<Vec<(String, RecordType)>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for StubDns {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl StubDns {
        async fn start(behaviour: Behaviour) -> StubDns {
            let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
            let addr = socket.local_addr().unwrap();
            let queries = Arc::new(Mutex::new(Vec::new()));
            let seen = queries.clone();
            let task = tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((n, client)) = socket.recv_from(&mut buf).await else { return };
                    let Ok(request) = Message::from_vec(&buf[..n]) else { continue };
                    for query in &request.queries {
                        seen.lock().unwrap().push((query.name().to_ascii(), query.query_type()));
                    }
                    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
                    response.metadata.recursion_desired = request.metadata.recursion_desired;
                    response.metadata.recursion_available = true;
                    response.add_queries(request.queries.clone());
                    let alive = request.queries.iter().all(|q| q.name().to_ascii().starts_with("alive."));
                    let delay = match behaviour {
                        Behaviour::Silent => continue,
                        Behaviour::OnlyAlive if !alive => continue,
                        Behaviour::NxDomain => {
                            response.metadata.response_code = ResponseCode::NXDomain;
                            Duration::ZERO
                        }
                        Behaviour::AnswerAfter(_) | Behaviour::OnlyAlive => {
                            for query in &request.queries {
                                if query.query_type() == RecordType::A {
                                    let record = Record::from_rdata(query.name().clone(), 60, RData::A(A(ANSWER)));
                                    response.add_answer(record);
                                } else {
                                    // No such records: the zone's SOA says how long that holds.
                                    response.add_authority(soa(query.name()));
                                }
                            }
                            if let Behaviour::AnswerAfter(delay) = behaviour { delay } else { Duration::ZERO }
                        }
                    };
                    let socket = socket.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = socket.send_to(&response.to_vec().unwrap(), client).await;
                    });
                }
            });
            StubDns { addr, queries, task }
        }

        fn queries(&self) -> Vec<(String, RecordType)> {
            self.queries.lock().unwrap().clone()
        }

        fn asked(&self, name: &str) -> usize {
            self.queries().iter().filter(|(asked, _)| asked == name).count()
        }

        /// Wait (briefly) until `name` has been asked `count` times; returns how often it was.
        async fn wait_asked(&self, name: &str, count: usize) -> usize {
            for _ in 0..100 {
                if self.asked(name) >= count {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.asked(name)
        }
    }

    fn soa(name: &Name) -> Record {
        let zone = name.base_name();
        let soa = SOA::new(zone.clone(), zone.clone(), 1, 3600, 600, 86_400, 60);
        Record::from_rdata(zone, 60, RData::SOA(soa))
    }

    fn resolver(stub: &StubDns) -> Arc<Resolver> {
        Arc::new(Resolver::new(&Dns { nameservers: vec![stub.addr] }, Duration::from_secs(5)).unwrap())
    }

    fn in_ms(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn concurrent_lookups_of_one_name_are_one_query() {
        let stub = StubDns::start(Behaviour::AnswerAfter(Duration::from_millis(200))).await;
        let resolver = resolver(&stub);
        let mut lookups = JoinSet::new();
        for _ in 0..50 {
            let resolver = resolver.clone();
            lookups.spawn(async move { resolver.lookup("merge.test", in_ms(5_000)).await });
        }
        while let Some(answer) = lookups.join_next().await {
            assert_eq!(*answer.unwrap().unwrap(), [IpAddr::from(ANSWER)]);
        }
        let mut queries = stub.queries();
        queries.sort_by_key(|(_, kind)| u16::from(*kind));
        let expected = [("merge.test.".to_owned(), RecordType::A), ("merge.test.".to_owned(), RecordType::AAAA)];
        assert_eq!(queries, expected, "one A and one AAAA query for 50 lookups");
        assert!(resolver.state().in_flight.is_empty());
        assert_eq!(*resolver.lookup("merge.test", in_ms(5_000)).await.unwrap(), [IpAddr::from(ANSWER)]);
        assert_eq!(stub.queries().len(), 2, "then answered from the cache, within the answers' TTLs");
    }

    /// Merging is what keeps the bound on lookups in flight a bound on names: a crowd asking
    /// for one black-holed name takes one slot, and other names still find one.
    #[tokio::test]
    async fn askers_of_one_name_take_one_lookup_slot() {
        let stub = StubDns::start(Behaviour::OnlyAlive).await;
        let mut resolver = Resolver::new(&Dns { nameservers: vec![stub.addr] }, Duration::from_secs(5)).unwrap();
        resolver.slots = Semaphore::new(2);
        let resolver = Arc::new(resolver);
        let mut crowd = JoinSet::new();
        for _ in 0..50 {
            let resolver = resolver.clone();
            crowd.spawn(async move { resolver.lookup("dead.test", in_ms(1_000)).await });
        }
        stub.wait_asked("dead.test.", 2).await;
        assert_eq!(*resolver.lookup("alive.test", in_ms(500)).await.unwrap(), [IpAddr::from(ANSWER)]);
        while let Some(answer) = crowd.join_next().await {
            assert_eq!(answer.unwrap(), Err(LookupError::TimedOut));
        }
    }

    #[tokio::test]
    async fn a_timeout_is_remembered_as_a_failure() {
        let stub = StubDns::start(Behaviour::Silent).await;
        let resolver = resolver(&stub);
        resolver.state().failures = Failures::new(Duration::from_secs(1), 100);
        let started = Instant::now();
        assert_eq!(resolver.lookup("dead.test", in_ms(200)).await, Err(LookupError::TimedOut));
        assert!(started.elapsed() >= Duration::from_millis(200), "the lookup ran until its deadline");
        assert_eq!(stub.wait_asked("dead.test.", 2).await, 2, "A and AAAA");

        let started = Instant::now();
        for _ in 0..20 {
            assert_eq!(resolver.lookup("dead.test", in_ms(5_000)).await, Err(LookupError::TimedOut));
        }
        assert!(started.elapsed() < Duration::from_secs(1), "answered from memory, not by waiting");
        assert_eq!(stub.asked("dead.test."), 2, "no new query while the failure is remembered");

        tokio::time::sleep_until(started + Duration::from_millis(1_100)).await;
        assert_eq!(resolver.lookup("dead.test", in_ms(100)).await, Err(LookupError::TimedOut));
        assert_eq!(stub.wait_asked("dead.test.", 4).await, 4, "asked again once forgotten");
    }

    #[tokio::test]
    async fn names_are_asked_fully_qualified() {
        let stub = StubDns::start(Behaviour::NxDomain).await;
        let search = Name::from_ascii("corp.local.").unwrap();
        let config = ResolverConfig::from_parts(Some(search.clone()), vec![search], vec![name_server(stub.addr)]);
        let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        tune(builder.options_mut(), Duration::from_secs(5));
        let resolver = Resolver::around(builder.build().unwrap());
        assert!(matches!(resolver.lookup("api.shop.example", in_ms(2_000)).await, Err(LookupError::Failed(_))));
        let names: Vec<String> = stub.queries().into_iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["api.shop.example.", "api.shop.example."], "never api.shop.example.corp.local.");
    }

    #[tokio::test]
    async fn a_cancelled_leader_hands_the_lookup_over() {
        let stub = StubDns::start(Behaviour::AnswerAfter(Duration::from_millis(150))).await;
        let resolver = resolver(&stub);
        let leader = {
            let resolver = resolver.clone();
            tokio::spawn(async move { resolver.lookup("handover.test", in_ms(5_000)).await })
        };
        stub.wait_asked("handover.test.", 2).await;
        let follower = {
            let resolver = resolver.clone();
            tokio::spawn(async move { resolver.lookup("handover.test", in_ms(5_000)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        assert_eq!(*follower.await.unwrap().unwrap(), [IpAddr::from(ANSWER)]);
        assert!(resolver.state().in_flight.is_empty());
    }

    #[tokio::test]
    async fn a_lookup_that_finds_no_free_slot_is_not_remembered() {
        let stub = StubDns::start(Behaviour::Silent).await;
        let mut resolver = Resolver::new(&Dns { nameservers: vec![stub.addr] }, Duration::from_secs(5)).unwrap();
        resolver.slots = Semaphore::new(1);
        let resolver = Arc::new(resolver);
        let holder = {
            let resolver = resolver.clone();
            tokio::spawn(async move { resolver.lookup("slow.test", in_ms(300)).await })
        };
        stub.wait_asked("slow.test.", 2).await;
        assert_eq!(resolver.lookup("fine.test", in_ms(50)).await, Err(LookupError::Busy));
        assert_eq!(holder.await.unwrap(), Err(LookupError::TimedOut));
        assert_eq!(resolver.state().failures.get("fine.test", Instant::now()), None);
        assert_eq!(resolver.lookup("fine.test", in_ms(100)).await, Err(LookupError::TimedOut));
        assert_eq!(stub.wait_asked("fine.test.", 2).await, 2, "asked once a slot was free");
    }

    #[test]
    fn remembered_failures_are_bounded_and_evicted_oldest_first() {
        let t0 = Instant::now();
        let secs = |n: u64| t0 + Duration::from_secs(n);
        let failure = || LookupError::Failed("no such name".into());
        let mut failures = Failures::new(Duration::from_secs(5), 3);
        for name in ["a", "b", "c", "d", "e"] {
            failures.insert(name.into(), failure(), t0);
            assert!(failures.by_name.len() <= 3 && failures.order.len() <= 3);
        }
        assert_eq!(failures.get("a", t0), None, "full: the oldest went first");
        assert_eq!(failures.get("b", t0), None);
        assert_eq!(failures.get("e", t0), Some(failure()));
        assert_eq!(failures.get("e", secs(5)), None, "expired");

        // An expired failure leaves the queue as soon as it reaches the front.
        failures.insert("f".into(), failure(), secs(6));
        assert_eq!((failures.by_name.len(), failures.order.len()), (1, 1));
        // A name failing again replaces its entry; its older queue slot, once at the front,
        // leaves without taking the newer entry along.
        failures.insert("g".into(), failure(), secs(7));
        failures.insert("f".into(), failure(), secs(8));
        assert_eq!((failures.by_name.len(), failures.order.len()), (2, 3));
        failures.insert("h".into(), failure(), secs(8));
        assert_eq!((failures.by_name.len(), failures.order.len()), (3, 3));
        assert_eq!(failures.get("f", secs(8)), Some(failure()));
        for i in 0..10_000 {
            failures.insert(format!("n{i}").into(), failure(), secs(12));
        }
        assert_eq!((failures.by_name.len(), failures.order.len()), (3, 3));
        assert!(failures.get("n9999", secs(12)).is_some());
    }
}
