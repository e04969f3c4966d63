//! DNS as an operator sees it when a name server black-holes every query: CONNECTs to names
//! it should answer fail with `502 dns_failure` within `connect_timeout`, and nothing else
//! waits on them: not a reload, not a `[resolve]` name.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hickory_resolver::proto::op::Message;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

/// CONNECTs fired at black-holed names, all waiting for DNS at once; half of them ask for one
/// name, each of the others for a name of its own. At its peak the test process (client,
/// gateway and name server in one) holds about four descriptors per CONNECT, so where the open
/// files limit cannot be raised far enough the storm is made smaller to fit it.
const STORM: usize = 600;
/// The most CONNECTs opening their connection at one time: a burst of 600 SYNs would overflow
/// the proxy listener's accept queue, and a kernel may answer that with a reset.
const OPENING: usize = 32;
/// How long the checks beside the storm may take. The issue asks for well under a second;
/// the machine running the tests is shared and noisy, so the guard leaves a wide margin. It
/// stays below `connect_timeout`, so a check queued behind the storm's lookups cannot pass.
const GUARD: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: &str = "7s";

/// A name server on 127.0.0.1 (UDP and TCP on one port) that reads every query and answers
/// none.
struct BlackHole {
    addr: SocketAddr,
    /// The name of every query read over UDP.
    asked: Arc<Mutex<Vec<String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl BlackHole {
    async fn start() -> BlackHole {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            // The same port for TCP, as a name server has; taken already now and then: retry.
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let seen = asked.clone();
        let datagrams = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, _)) = udp.recv_from(&mut buf).await {
                if let Ok(query) = Message::from_vec(&buf[..n]) {
                    seen.lock().unwrap().extend(query.queries.iter().map(|q| q.name().to_ascii()));
                }
            }
        });
        let streams = tokio::spawn(async move {
            let mut held = JoinSet::new();
            while let Ok((mut stream, _)) = tcp.accept().await {
                held.spawn(async move {
                    let mut sink = [0u8; 1024];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                });
            }
        });
        BlackHole { addr, asked, tasks: vec![datagrams, streams] }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

fn config(dns: SocketAddr, origin: SocketAddr) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[limits]
connect_timeout = "{CONNECT_TIMEOUT}"

[dns]
nameservers = ["{dns}"]

[resolve]
"api.shop.example" = "{origin}"

[[app]]
id = "demo"
token = "s3cret"
server_domains = ["*.blackhole.example", "api.shop.example"]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_name_server_stalls_nothing_else() {
    let files = raise_open_files_limit(5_000);
    let storm_size = STORM.min((files.saturating_sub(400) / 5) as usize);
    assert!(storm_size >= 100, "an open files limit of {files} leaves room for only {storm_size} CONNECTs");
    let one_name = storm_size / 2;
    let origin = Origin::start(&["api.shop.example"]).await;
    let hole = BlackHole::start().await;
    let gw = TestGateway::start(&config(hole.addr, origin.addr)).await;
    let proxy = gw.addr();

    let started = Instant::now();
    let answered = Arc::new(AtomicUsize::new(0));
    let mut storm = JoinSet::new();
    let opening = Arc::new(Semaphore::new(OPENING));
    for i in 0..storm_size {
        let target =
            if i < one_name { "same.blackhole.example:443".to_owned() } else { format!("n{i}.blackhole.example:443") };
        let (answered, opening) = (answered.clone(), opening.clone());
        storm.spawn(async move {
            let permit = opening.acquire_owned().await.unwrap();
            let stream = TcpStream::connect(proxy).await;
            drop(permit);
            let auth = basic("demo", "s3cret");
            let answer = connect_over(stream.unwrap(), &target, &[("Proxy-Authorization", &auth)]).await;
            answered.fetch_add(1, Ordering::SeqCst);
            (answer.status, answer.reason().to_owned(), started.elapsed())
        });
    }
    // The storm's lookups are in flight once the name server has read some of them.
    let in_flight = tokio::time::timeout(GUARD, async {
        while hole.asked().len() < storm_size / 6 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(in_flight.is_ok(), "the name server was asked {} times", hole.asked().len());

    let reload_started = Instant::now();
    let (status, _, body) = tokio::time::timeout(GUARD, admin_request(gw.admin(), "POST", "/-/reload", None, None))
        .await
        .expect("a reload beside the storm completes");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let reload_took = reload_started.elapsed();

    let tunnel_started = Instant::now();
    let reply = tokio::time::timeout(GUARD, async {
        let answer = connect_as(proxy, "demo", "s3cret", "api.shop.example:443").await;
        assert_eq!((answer.status, answer.reason()), (200, "whitelisted"));
        let mut tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
        https_request(&mut tls, "GET", "/", b"").await
    })
    .await
    .expect("a [resolve] CONNECT beside the storm completes");
    assert_eq!(reply, b"hello from origin");
    let tunnel_took = tunnel_started.elapsed();
    // Each storm CONNECT waits for DNS until its deadline, so none can have been answered
    // yet: the checks ran beside the lookups, not after them.
    assert_eq!(answered.load(Ordering::SeqCst), 0, "the storm was over before the checks were done");

    // Bounded: `connect_timeout` after the last CONNECT was sent, with room for a slow machine.
    let slowest = tokio::time::timeout(Duration::from_secs(30), async {
        let mut slowest = Duration::ZERO;
        while let Some(answer) = storm.join_next().await {
            let (status, reason, took) = answer.unwrap();
            assert_eq!((status, reason.as_str()), (502, "dns_failure"));
            slowest = slowest.max(took);
        }
        slowest
    })
    .await
    .expect("every storm CONNECT is answered");
    let asked = hole.asked();
    eprintln!(
        "beside {storm_size} CONNECTs to a black hole: reload {reload_took:?}, [resolve] CONNECT + TLS \
         {tunnel_took:?}; slowest refusal {slowest:?}; {} queries read, {} for the one name; \
         open files limit {files}",
        asked.len(),
        asked.iter().filter(|name| *name == "same.blackhole.example.").count()
    );

    // One lookup for the one name: A and AAAA, each sent again by the resolver while
    // unanswered; nowhere near one query per CONNECT.
    let queries = asked.iter().filter(|name| *name == "same.blackhole.example.").count();
    assert!((1..30).contains(&queries), "{one_name} CONNECTs to one name made {queries} queries");
    assert!(!asked.iter().any(|name| name.starts_with("api.shop.example")), "[resolve] names never reach DNS");
    let sample = r#"gateway_requests_total{app="demo",channel="request",decision="deny",reason="dns_failure"}"#;
    assert_eq!(gw.wait_metric(sample, storm_size as f64).await, storm_size as f64);
}
