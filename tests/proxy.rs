//! The proxy as a client sees it: every row of the decision table, matching, channels,
//! listener binding, actions, bytes through, limits.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Names the origin answers for; `[resolve]` sends each of them to it.
const ORIGIN_NAMES: &[&str] = &[
    "api.shop.example",
    "img.shop.example",
    "a.cdn.shop.example",
    "x.y.cdn.shop.example",
    "help.example",
    "deep.help.example",
    "push.shop.example",
    "xn--bcher-kva.example",
    "m.shop.example",
    "status.example",
    "evil.example",
    "blocked.shop.example",
];

fn gateway_config(origin: SocketAddr, extra: &str) -> String {
    let mut resolve = String::new();
    for name in ORIGIN_NAMES {
        resolve.push_str(&format!("\"{name}\" = \"{origin}\"\n"));
    }
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[limits]
connect_timeout = "700ms"
{extra}

[policy]
global_deny = ["blocked.shop.example", "*.tracker.example"]
global_allow = ["status.example"]

[resolve]
{resolve}"down.shop.example" = "127.0.0.1:1"

[[listener]]
listen = "127.0.0.1:0"
app = "demo"
channel = "webview"

[[app]]
id = "demo"
token = "s3cret"
server_domains = [
  "https://api.shop.example",
  "img.shop.example:8443",
  "*.cdn.shop.example",
  ".help.example",
  "wss://push.shop.example",
  "bücher.example",
  "down.shop.example",
  "blocked.shop.example",
]
webview_domains = ["*.shop.example"]

[[app]]
id = "watch"
action = "report"
server_domains = ["api.shop.example"]

[[app]]
id = "free"
action = "open"
"#
    )
}

/// `config` with `lines` added to its `[server]` table.
fn with_server(config: String, lines: &str) -> String {
    config.replacen("[server]\n", &format!("[server]\n{lines}\n"), 1)
}

async fn setup() -> (Origin, TestGateway) {
    setup_with("").await
}

async fn setup_with(limits: &str) -> (Origin, TestGateway) {
    let origin = Origin::start(ORIGIN_NAMES).await;
    let gateway = TestGateway::start(&gateway_config(origin.addr, limits)).await;
    (origin, gateway)
}

async fn demo(gw: &TestGateway, target: &str) -> Answer {
    connect_as(gw.addr(), "demo", "s3cret", target).await
}

#[tokio::test]
async fn a_whitelisted_host_is_tunnelled_to_the_origin() {
    let (origin, gw) = setup().await;
    let answer = demo(&gw, "api.shop.example:443").await;
    assert_eq!(answer.status, 200);
    assert_eq!((answer.decision(), answer.reason()), ("allow", "whitelisted"));
    let mut tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");
    drop(tls);
    let line = gw.log.wait_for(|l| l["reason"] == "whitelisted").await;
    assert_eq!(line["app"], "demo");
    assert_eq!(line["channel"], "request");
    assert_eq!(line["host"], "api.shop.example");
    assert_eq!(line["port"], 443);
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["rule"], "server_domains[0]");
    assert_eq!(line["status"], 200);
    assert_eq!(line["upstream"], origin.addr.to_string());
    assert!(line["bytes_up"].as_u64().unwrap() > 0 && line["bytes_down"].as_u64().unwrap() > 17);
    assert_eq!(line["generation"], 1);
}

#[tokio::test]
async fn megabytes_arrive_intact_both_ways() {
    let (origin, gw) = setup().await;
    let answer = demo(&gw, "api.shop.example:443").await;
    let mut tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
    let size = 8 * 1024 * 1024;
    let down = https_request(&mut tls, "GET", &format!("/bytes/{size}"), b"").await;
    assert_eq!(down.len(), size);
    assert!(down.iter().enumerate().all(|(i, b)| *b == pattern(i)), "downloaded bytes differ");
    let upload: Vec<u8> = (0..5 * 1024 * 1024 + 7).map(|i| pattern(i * 7)).collect();
    let echoed = https_request(&mut tls, "POST", "/sum", &upload).await;
    assert_eq!(String::from_utf8(echoed).unwrap(), format!("{} {}", upload.len(), checksum(&upload)));
    drop(tls);
    let line = gw.log.wait_for(|l| l["reason"] == "whitelisted").await;
    assert!(line["bytes_down"].as_u64().unwrap() > size as u64);
    assert!(line["bytes_up"].as_u64().unwrap() > upload.len() as u64);
}

#[tokio::test]
async fn matching_exact_wildcard_dot_port_case_dot_and_punycode() {
    let (_origin, gw) = setup().await;
    let allowed = [
        ("api.shop.example:443", "server_domains[0]"),
        ("API.Shop.Example:443", "server_domains[0]"),
        ("api.shop.example.:443", "server_domains[0]"),
        ("img.shop.example:8443", "server_domains[1]"),
        ("a.cdn.shop.example:443", "server_domains[2]"),
        ("x.y.cdn.shop.example:443", "server_domains[2]"),
        ("help.example:443", "server_domains[3]"),
        ("deep.help.example:443", "server_domains[3]"),
        ("push.shop.example:443", "server_domains[4]"),
        ("push.shop.example:9000", "server_domains[4]"),
        ("xn--bcher-kva.example:443", "server_domains[5]"),
        ("XN--BCHER-KVA.example:443", "server_domains[5]"),
    ];
    for (target, rule) in allowed {
        let answer = demo(&gw, target).await;
        assert_eq!((answer.status, answer.reason()), (200, "whitelisted"), "{target}");
        drop(answer); // the tunnel's line is written when it closes
        gw.log
            .wait_for(|l| l["rule"] == rule && l["port"] == target.rsplit(':').next().unwrap().parse::<u16>().unwrap())
            .await;
    }
    let refused = [
        "api.shop.example:8443",
        "img.shop.example:443",
        "cdn.shop.example:443",
        "evilapi.shop.example:443",
        "api.shop.example.evil.example:443",
        "evilhelp.example:443",
        "help.example.evil.example:443",
        "shop.example:443",
        "api-shop.example:443",
        "bucher.example:443",
    ];
    for target in refused {
        let answer = demo(&gw, target).await;
        assert_eq!((answer.status, answer.reason()), (403, "not_whitelisted"), "{target}");
        let body = answer.json();
        assert_eq!(body["decision"], "deny");
        assert_eq!(body["app"], "demo");
        assert_eq!(body["channel"], "request");
    }
}

#[tokio::test]
async fn a_refusal_carries_headers_and_a_json_body() {
    let (origin, gw) = setup().await;
    let answer = demo(&gw, "evil.example:443").await;
    assert_eq!(answer.status, 403);
    assert_eq!(answer.decision(), "deny");
    assert_eq!(answer.headers["content-type"], "application/json");
    assert_eq!(
        answer.json(),
        serde_json::json!({
            "decision": "deny", "reason": "not_whitelisted", "app": "demo", "channel": "request",
            "host": "evil.example", "port": 443,
            "message": "evil.example:443 is not on the server domain whitelist of app demo"
        })
    );
    let line = gw.log.wait_for(|l| l["reason"] == "not_whitelisted").await;
    assert_eq!((line["decision"].as_str(), line["status"].as_u64()), (Some("deny"), Some(403)));
    assert_eq!(origin.connections.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing reached the origin");
}

#[tokio::test]
async fn every_refusal_of_the_decision_table() {
    let (_origin, gw) = setup().await;
    let p = gw.addr();
    // parse the target
    for target in ["api.shop.example", "api.shop.example:0", "api.shop.example:99999", "user@api.shop.example:443"] {
        let answer = connect_as(p, "demo", "s3cret", target).await;
        assert_eq!((answer.status, answer.reason()), (400, "malformed_request"), "{target}");
    }
    // identity
    let answer = connect(p, "api.shop.example:443", &[]).await;
    assert_eq!((answer.status, answer.reason()), (407, "auth_required"));
    assert_eq!(answer.headers["proxy-authenticate"], "Basic realm=\"miniapp-gateway\"");
    let answer = connect_as(p, "demo", "wrong", "api.shop.example:443").await;
    assert_eq!((answer.status, answer.reason()), (407, "bad_credentials"));
    let answer = connect(p, "api.shop.example:443", &[("Proxy-Authorization", "Basic !!!")]).await;
    assert_eq!((answer.status, answer.reason()), (407, "bad_credentials"));
    // app known
    let answer = connect_as(p, "stranger", "x", "api.shop.example:443").await;
    assert_eq!((answer.status, answer.reason()), (403, "unknown_app"));
    // IP literals, in every spelling
    for target in ["93.184.216.34:443", "[2606:2800:220:1::]:443", "127.1:443", "2130706433:443"] {
        let answer = demo(&gw, target).await;
        assert_eq!((answer.status, answer.reason()), (403, "ip_literal"), "{target}");
    }
    // global deny beats the app's own list
    let answer = demo(&gw, "blocked.shop.example:443").await;
    assert_eq!((answer.status, answer.reason()), (403, "global_deny"));
    let answer = demo(&gw, "x.tracker.example:443").await;
    assert_eq!((answer.status, answer.reason()), (403, "global_deny"));
    // global allow after the app's lists
    let answer = demo(&gw, "status.example:443").await;
    assert_eq!((answer.status, answer.reason()), (200, "global_allow"));
    // whitelist
    let answer = demo(&gw, "evil.example:443").await;
    assert_eq!((answer.status, answer.reason()), (403, "not_whitelisted"));
    // upstream connect refused
    let answer = demo(&gw, "down.shop.example:443").await;
    assert_eq!((answer.status, answer.reason()), (502, "upstream_unreachable"));
}

#[tokio::test]
async fn names_resolving_to_loopback_are_refused_but_resolve_overrides_are_trusted() {
    let (origin, gw) = setup().await;
    // `localhost` resolves (via /etc/hosts) to 127.0.0.1; even an open app may not reach it.
    let answer = connect_as(gw.addr(), "free", "x", &format!("localhost:{}", origin.addr.port())).await;
    assert_eq!((answer.status, answer.reason()), (403, "private_address"));
    assert_eq!(answer.json()["host"], "localhost");
    // an IP literal of loopback, let past the lists by the open action, is refused too
    let answer = connect_as(gw.addr(), "free", "x", &format!("127.0.0.1:{}", origin.addr.port())).await;
    assert_eq!((answer.status, answer.reason()), (403, "private_address"));
    // a [resolve] override to 127.0.0.1 is the operator's word: allowed
    let answer = demo(&gw, "api.shop.example:443").await;
    assert_eq!((answer.status, answer.reason()), (200, "whitelisted"));
    // The 200 follows the gateway's connect, which the kernel completes before the origin's
    // accept returns: wait for the origin to count it.
    let deadline = tokio::time::Instant::now() + WAIT;
    while origin.connections.load(std::sync::atomic::Ordering::SeqCst) == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(origin.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_name_that_does_not_resolve_is_a_dns_failure() {
    let (_origin, gw) = setup().await;
    let answer = connect_as(gw.addr(), "free", "x", "no-such-host.invalid:443").await;
    assert_eq!((answer.status, answer.reason()), (502, "dns_failure"));
}

#[tokio::test]
async fn an_upstream_that_does_not_accept_in_time_is_a_timeout() {
    let (addr, _fillers, _listener) = blackhole().await;
    let origin = Origin::start(ORIGIN_NAMES).await;
    let config = gateway_config(origin.addr, "")
        .replace("[resolve]\n", &format!("[resolve]\n\"slow.shop.example\" = \"{addr}\"\n"))
        .replace("\"down.shop.example\",", "\"down.shop.example\", \"slow.shop.example\",");
    let gw = TestGateway::start(&config).await;
    let answer = demo(&gw, "slow.shop.example:443").await;
    assert_eq!((answer.status, answer.reason()), (504, "upstream_timeout"));
}

#[tokio::test]
async fn plain_http_and_origin_form_requests_are_refused() {
    let (_origin, gw) = setup().await;
    let answer = send_raw(gw.addr(), "GET http://api.shop.example/ HTTP/1.1\r\nHost: api.shop.example\r\n\r\n").await;
    assert_eq!((answer.status, answer.reason()), (403, "https_required"));
    assert_eq!((answer.json()["host"].as_str(), answer.json()["port"].as_u64()), (Some("api.shop.example"), Some(80)));
    let answer = send_raw(gw.addr(), "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!((answer.status, answer.reason()), (400, "not_a_proxy_request"));
}

#[tokio::test]
async fn channels_are_separate_and_listeners_fix_the_identity() {
    let (origin, gw) = setup().await;
    let webview = [("Proxy-Authorization", basic("demo", "s3cret")), ("X-Miniapp-Channel", "webview".to_owned())];
    let headers: Vec<(&str, &str)> = webview.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let answer = connect(gw.addr(), "m.shop.example:443", &headers).await;
    assert_eq!((answer.status, answer.reason()), (200, "whitelisted"));
    // the webview list does not stand in for the request list, nor the other way round
    let answer = demo(&gw, "m.shop.example:443").await;
    assert_eq!((answer.status, answer.reason()), (403, "not_whitelisted"));
    let answer = connect(gw.addr(), "help.example:443", &headers).await;
    assert_eq!((answer.status, answer.reason()), (403, "not_whitelisted"));
    assert_eq!(answer.json()["channel"], "webview");
    let answer = connect(
        gw.addr(),
        "m.shop.example:443",
        &[("Proxy-Authorization", &basic("demo", "s3cret")), ("X-Miniapp-Channel", "sockets")],
    )
    .await;
    assert_eq!((answer.status, answer.reason()), (400, "malformed_request"));

    // the bound listener is app demo on webview, with no credentials at all
    let bound = gw.addrs[1];
    let answer = connect(bound, "m.shop.example:443", &[]).await;
    assert_eq!((answer.status, answer.reason()), (200, "whitelisted"));
    let mut tls = tls_over(answer.stream, &origin.ca, "m.shop.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");
    let answer = connect(bound, "help.example:443", &[("X-Miniapp-Channel", "request")]).await;
    assert_eq!((answer.status, answer.reason()), (403, "not_whitelisted"), "the listener fixes the channel");
    let answer = connect(bound, "evil.example:443", &[("Proxy-Authorization", &basic("free", "x"))]).await;
    assert_eq!((answer.status, answer.reason()), (403, "not_whitelisted"), "the listener fixes the app");
}

#[tokio::test]
async fn report_lets_through_and_records_the_refusal_and_open_lets_through() {
    let (origin, gw) = setup().await;
    let answer = connect_as(gw.addr(), "watch", "x", "evil.example:443").await;
    assert_eq!((answer.status, answer.decision(), answer.reason()), (200, "report", "not_whitelisted"));
    let mut tls = tls_over(answer.stream, &origin.ca, "evil.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");
    drop(tls);
    let line = gw.log.wait_for(|l| l["app"] == "watch").await;
    assert_eq!(
        (line["decision"].as_str(), line["reason"].as_str(), line["status"].as_u64()),
        (Some("report"), Some("not_whitelisted"), Some(200))
    );

    let answer = connect_as(gw.addr(), "watch", "x", "api.shop.example:443").await;
    assert_eq!((answer.status, answer.decision(), answer.reason()), (200, "allow", "whitelisted"));
    let answer = connect_as(gw.addr(), "watch", "x", "blocked.shop.example:443").await;
    assert_eq!((answer.status, answer.reason()), (403, "global_deny"), "report never relaxes global_deny");

    let answer = connect_as(gw.addr(), "free", "x", "evil.example:443").await;
    assert_eq!((answer.status, answer.decision(), answer.reason()), (200, "allow", "open"));
    let answer = connect(gw.addr(), "evil.example:443", &[]).await;
    assert_eq!((answer.status, answer.reason()), (407, "auth_required"), "actions never relax authentication");
}

#[tokio::test]
async fn connections_beyond_the_limit_get_503_before_being_read() {
    let origin = Origin::start(ORIGIN_NAMES).await;
    let config = with_server(gateway_config(origin.addr, "max_connections = 1"), "admin_listen = \"127.0.0.1:0\"");
    let gw = TestGateway::start(&config).await;
    let holder = TcpStream::connect(gw.addr()).await.unwrap();
    // the gateway has accepted the first connection (on whichever loop) before the second
    assert_eq!(gw.wait_metric("gateway_connections_active", 1.0).await, 1.0);
    let answer = connect_as(gw.addr(), "demo", "s3cret", "api.shop.example:443").await;
    assert_eq!((answer.status, answer.reason()), (503, "overloaded"));
    assert_eq!(answer.json()["reason"], "overloaded");
    drop(holder);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let answer = demo(&gw, "api.shop.example:443").await;
        if answer.status == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_head_is_disconnected() {
    let (_origin, gw) = setup_with("header_timeout = \"300ms\"").await;
    let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
    stream.write_all(b"CONNECT api.shop.example:443 HTTP/1.1\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the gateway kept a stalled client connected");
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_and_logged() {
    let (origin, gw) = setup_with("idle_timeout = \"300ms\"").await;
    let answer = demo(&gw, "api.shop.example:443").await;
    let mut tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WAIT, tls.read(&mut buf)).await.expect("the idle tunnel was not closed");
    assert!(matches!(read, Ok(0) | Err(_)));
    let line = gw.log.wait_for(|l| l["reason"] == "whitelisted").await;
    assert_eq!(line["closed_by"], "idle_timeout");
}

#[tokio::test]
async fn hostile_requests_get_answers_not_panics() {
    let (_origin, gw) = setup().await;
    let hostile = [
        "CONNECT \r\n\r\n".to_owned(),
        "CONNECT [::1 HTTP/1.1\r\n\r\n".to_owned(),
        format!("CONNECT {}:443 HTTP/1.1\r\n\r\n", "a".repeat(300)),
        format!("CONNECT a.example:443 HTTP/1.1\r\nX-Big: {}\r\n\r\n", "b".repeat(20_000)),
        "CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic \u{7f}\r\n\r\n".to_owned(),
        "\u{0}\u{1}\u{2}garbage\r\n\r\n".to_owned(),
    ];
    for request in &hostile {
        let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
        let _ = stream.write_all(request.as_bytes()).await;
        let text = tokio::time::timeout(WAIT, async {
            match read_head(&mut stream).await {
                Ok(Some((head, _))) => head,
                _ => String::new(), // closed without an answer: acceptable for garbage
            }
        })
        .await
        .expect("neither an answer nor a close");
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 4"), "{request:?} got {text:?}");
    }
    // a request head over 16 KiB is refused by size
    let big = format!("CONNECT a.example:443 HTTP/1.1\r\nX-Big: {}\r\n\r\n", "b".repeat(20_000));
    let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
    let _ = stream.write_all(big.as_bytes()).await;
    let head = tokio::time::timeout(WAIT, read_head(&mut stream)).await.unwrap().unwrap().unwrap().0;
    assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
    // the gateway still serves
    let answer = demo(&gw, "api.shop.example:443").await;
    assert_eq!(answer.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_on_the_main_runtime_serves_refuses_and_drains() {
    // workers = 0: the proxy listeners on the main runtime, beside the admin listener.
    let origin = Origin::start(ORIGIN_NAMES).await;
    let config = with_server(gateway_config(origin.addr, ""), "workers = 0\nadmin_listen = \"127.0.0.1:0\"");
    let mut gw = TestGateway::start(&config).await;
    let answer = demo(&gw, "api.shop.example:443").await;
    assert_eq!(answer.status, 200);
    let mut tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/bytes/30000", b"").await.len(), 30000);
    assert_eq!(demo(&gw, "evil.example:443").await.reason(), "not_whitelisted");
    let allowed = r#"gateway_requests_total{app="demo",channel="request",decision="allow",reason="whitelisted"}"#;
    assert_eq!(gw.wait_metric(allowed, 1.0).await, 1.0);
    let denied = r#"gateway_requests_total{app="demo",channel="request",decision="deny",reason="not_whitelisted"}"#;
    assert_eq!(gw.wait_metric(denied, 1.0).await, 1.0);
    // Shutdown: new connections are refused, the open tunnel keeps working until it closes,
    // and only then does the gateway stop.
    let stopped = gw.shutdown();
    let deadline = tokio::time::Instant::now() + WAIT;
    while TcpStream::connect(gw.addr()).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting while draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(https_request(&mut tls, "GET", "/bytes/5000", b"").await.len(), 5000);
    assert!(!stopped.is_finished(), "stopped with a tunnel open");
    drop(tls);
    tokio::time::timeout(WAIT, stopped).await.expect("the drain did not end").unwrap();
}

#[tokio::test]
async fn one_event_loop_does_not_share_its_port() {
    // With one loop the listener is not SO_REUSEPORT: a second gateway started on the same
    // address by mistake fails to start instead of silently taking half the connections.
    let origin = Origin::start(ORIGIN_NAMES).await;
    let config = with_server(gateway_config(origin.addr, ""), "workers = 1");
    let gw = TestGateway::start(&config).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config.replacen("127.0.0.1:0", &gw.addr().to_string(), 1)).unwrap();
    let mut loader = miniapp_gateway::config::Loader::new(&path);
    let second = loader.load().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(second.server.workers, 1);
    let (log, _writer) = miniapp_gateway::access_log::AccessLog::start(
        miniapp_gateway::access_log::LogFormat::Json,
        Box::new(std::io::sink()),
    );
    let error = match miniapp_gateway::proxy::Gateway::bind(second, loader, log).await {
        Ok(_) => panic!("a second gateway bound {}", gw.addr()),
        Err(e) => e,
    };
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse, "{error}");
    assert!(error.to_string().contains(&format!("cannot listen on {}", gw.addr())), "{error}");
    // and the first one still serves
    assert_eq!(demo(&gw, "api.shop.example:443").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_event_loops_share_the_limit_the_policy_and_the_counters() {
    let origin = Origin::start(ORIGIN_NAMES).await;
    let config =
        with_server(gateway_config(origin.addr, "max_connections = 8"), "workers = 2\nadmin_listen = \"127.0.0.1:0\"");
    let mut gw = TestGateway::start(&config).await;
    // Tunnels from many source ports, which the kernel spreads over both loops' listeners.
    for _batch in 0..4 {
        // four at a time, well under max_connections
        gw.wait_metric("gateway_connections_active", 0.0).await;
        let mut tunnels = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (proxy, ca) = (gw.addr(), origin.ca.clone());
            tunnels.spawn(async move {
                let answer = connect_as(proxy, "demo", "s3cret", "api.shop.example:443").await;
                assert_eq!(answer.status, 200);
                let mut tls = tls_over(answer.stream, &ca, "api.shop.example").await;
                assert_eq!(https_request(&mut tls, "GET", "/bytes/20000", b"").await.len(), 20000);
            });
        }
        while let Some(done) = tunnels.join_next().await {
            done.unwrap();
        }
    }
    let workers = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|name| name.starts_with("gw-worker-"))
        })
        .count();
    assert!(workers >= 2, "two worker threads (and those of other tests' gateways): {workers}");
    let allowed = r#"gateway_requests_total{app="demo",channel="request",decision="allow",reason="whitelisted"}"#;
    assert_eq!(gw.wait_metric(allowed, 16.0).await, 16.0, "every loop counts in the same counters");
    // max_connections is one limit over all the loops
    gw.wait_metric("gateway_connections_active", 0.0).await;
    let mut holders = Vec::new();
    for _ in 0..8 {
        holders.push(TcpStream::connect(gw.addr()).await.unwrap());
    }
    gw.wait_metric("gateway_connections_active", 8.0).await;
    let answer = demo(&gw, "api.shop.example:443").await;
    assert_eq!((answer.status, answer.reason()), (503, "overloaded"));
    drop(holders);
    // (their slots come back once the loops notice the closes)
    gw.wait_metric("gateway_connections_active", 0.0).await;
    // a refusal is decided by the same policy on any loop
    assert_eq!(demo(&gw, "evil.example:443").await.reason(), "not_whitelisted");
    // and shutdown drains every loop
    let stopped = gw.shutdown();
    tokio::time::timeout(WAIT, stopped).await.expect("the workers did not stop").unwrap();
}
