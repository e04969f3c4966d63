//! Faults and attacks: reloads that must not apply an accident, tunnels that a reload must
//! reach wherever they are in their setup, hostile requests and clients, and an admin
//! listener that a flood or a web page cannot take over.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "admin-secret";

/// A config with an admin token, the origin behind `[resolve]`, and app `demo` allowed
/// `server_domains`, with `token` and `extra` lines in `[policy]`.
fn config(origin: std::net::SocketAddr, server_domains: &str, token: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
admin_token = "{TOKEN}"

[limits]
connect_timeout = "8s"

[policy]
{extra}

[resolve]
"api.shop.example" = "{origin}"
"img.shop.example" = "{origin}"

[[app]]
id = "demo"
token = "{token}"
action = "enforce"
server_domains = [{server_domains}]
"#
    )
}

async fn reload(gw: &TestGateway) -> (u16, serde_json::Value) {
    admin_json(gw.admin(), "POST", "/-/reload", None, Some(TOKEN)).await
}

// ---- reloads that must never apply an accident ----

#[tokio::test]
async fn a_config_file_emptied_in_place_is_a_failed_reload() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr, r#""api.shop.example""#, "one", "")).await;
    // `render > gateway.toml`: truncated in place, the rest never written
    std::fs::File::create(&gw.path).unwrap();
    assert_eq!(gw.wait_metric(r#"gateway_config_reloads_total{result="failure"}"#, 1.0).await, 1.0);
    let (status, body) = reload(&gw).await;
    assert_eq!(status, 422, "the admin token still holds: {body}");
    assert!(body["error"].as_str().unwrap().contains("the config file is empty"), "{body}");
    let (status, _) = admin_json(gw.admin(), "POST", "/-/reload", None, None).await;
    assert_eq!(status, 401, "the admin listener did not open up");
    assert_eq!(connect_as(gw.addr(), "demo", "one", "api.shop.example:443").await.reason(), "whitelisted");
    assert_eq!(gw.metric("gateway_apps_loaded").await, 1.0);
}

#[tokio::test]
async fn an_apps_file_emptied_in_place_is_a_failed_reload() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let main = config(origin.addr, r#""img.shop.example""#, "one", r#"apps_dir = "apps""#);
    let shop = "[[app]]\nid = \"shop\"\nserver_domains = [\"api.shop.example\"]\n";
    let gw = TestGateway::start_with_apps(&main, &[("shop.toml", shop)]).await;
    std::fs::File::create(gw.dir.path().join("apps/shop.toml")).unwrap();
    assert_eq!(gw.wait_metric(r#"gateway_config_reloads_total{result="failure"}"#, 1.0).await, 1.0);
    let (status, body) = reload(&gw).await;
    assert_eq!(status, 422);
    assert!(body["error"].as_str().unwrap().contains("shop.toml:1:1: this apps file is empty"), "{body}");
    assert_eq!(connect_as(gw.addr(), "shop", "x", "api.shop.example:443").await.reason(), "whitelisted");
}

#[tokio::test]
async fn a_reload_may_rotate_the_admin_token_but_not_remove_it() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr, r#""api.shop.example""#, "one", "")).await;
    let without =
        config(origin.addr, r#""api.shop.example""#, "one", "").replace(&format!("admin_token = \"{TOKEN}\""), "");
    std::fs::write(&gw.path, &without).unwrap();
    let (status, body) = reload(&gw).await;
    assert_eq!(status, 422);
    assert!(body["error"].as_str().unwrap().contains("refusing to remove admin_token"), "{body}");
    let (status, _) = admin_json(gw.admin(), "GET", "/v1/apps", None, None).await;
    assert_eq!(status, 401);

    let rotated = config(origin.addr, r#""api.shop.example""#, "one", "").replace(TOKEN, "rotated-secret");
    std::fs::write(&gw.path, &rotated).unwrap();
    let (status, _) = reload(&gw).await;
    assert_eq!(status, 200);
    let (status, _) = admin_json(gw.admin(), "GET", "/v1/apps", None, Some("rotated-secret")).await;
    assert_eq!(status, 200);
    let (status, _) = admin_json(gw.admin(), "GET", "/v1/apps", None, Some(TOKEN)).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_change_no_event_reported_is_found_by_the_periodic_check() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let dir = tempfile::tempdir().unwrap();
    // the token file lives outside the watched directories, as a mounted Secret does
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin-token");
    std::fs::write(&token_file, "first-token\n").unwrap();
    let text = config(origin.addr, r#""api.shop.example""#, "one", "").replace(
        &format!("admin_token = \"{TOKEN}\""),
        &format!("admin_token_file = {:?}", token_file.display().to_string()),
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let gw = TestGateway::start_at(dir, path).await;
    let _periodic = miniapp_gateway::reload::spawn_watcher_every(
        gw.reloader.clone(),
        Duration::from_millis(100),
        Duration::from_millis(200),
    );
    let (status, _) = admin_json(gw.admin(), "GET", "/v1/apps", None, Some("first-token")).await;
    assert_eq!(status, 200);
    std::fs::write(&token_file, "second-token\n").unwrap();
    assert_eq!(gw.wait_metric("gateway_config_generation", 2.0).await, 2.0);
    let (status, _) = admin_json(gw.admin(), "GET", "/v1/apps", None, Some("second-token")).await;
    assert_eq!(status, 200);
    assert_eq!(gw.metric("gateway_config_watcher_up").await, 1.0);
}

// ---- tunnels a reload must reach ----

#[tokio::test]
async fn a_reload_during_the_dial_refuses_the_connect() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let (slow, _fillers, _listener) = blackhole().await;
    let allowed = config(origin.addr, r#""api.shop.example", "slow.shop.example""#, "one", "")
        .replace("[resolve]\n", &format!("[resolve]\n\"slow.shop.example\" = \"{slow}\"\n"));
    let gw = TestGateway::start(&allowed).await;
    let proxy = gw.addr();
    let dialling = tokio::spawn(async move { connect_as(proxy, "demo", "one", "slow.shop.example:443").await });
    // Long enough for the CONNECT to be decided and dialling (it then waits out its 8 s).
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::write(&gw.path, allowed.replace(r#", "slow.shop.example""#, "")).unwrap();
    assert_eq!(reload(&gw).await.0, 200);
    // without the re-check this waits out connect_timeout (8 s) and answers 504
    let answer = dialling.await.unwrap();
    assert_eq!((answer.status, answer.reason()), (403, "revoked"));
}

#[tokio::test]
async fn a_reload_during_the_client_hello_wait_closes_the_tunnel_before_a_byte_passes() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let allowed = config(origin.addr, r#""api.shop.example""#, "one", "");
    let gw = TestGateway::start(&allowed).await;
    let answer = connect_as(gw.addr(), "demo", "one", "api.shop.example:443").await;
    assert_eq!(answer.status, 200);
    std::fs::write(&gw.path, allowed.replace(r#"server_domains = ["api.shop.example"]"#, "server_domains = []"))
        .unwrap();
    assert_eq!(reload(&gw).await.0, 200);
    let mut stream = answer.stream;
    let _ = stream.write_all(b"\x16\x03\x01").await; // the start of a ClientHello, too late
    closed_by_gateway(&mut stream).await;
    assert_eq!(origin.bytes_received.load(Ordering::SeqCst), 0, "no byte reached the origin");
    let line = gw.log.wait_for(|l| l["status"] == 200 && l["host"] == "api.shop.example").await;
    assert_eq!((line["decision"].as_str(), line["reason"].as_str()), (Some("deny"), Some("revoked")));
}

#[tokio::test]
async fn rotating_an_apps_token_revokes_the_tunnels_opened_with_the_old_one() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let allowed = config(origin.addr, r#""api.shop.example""#, "one", "");
    let gw = TestGateway::start(&allowed).await;
    let answer = connect_as(gw.addr(), "demo", "one", "api.shop.example:443").await;
    let mut tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");
    std::fs::write(&gw.path, allowed.replace(r#"token = "one""#, r#"token = "two""#)).unwrap();
    assert_eq!(reload(&gw).await.0, 200);
    closed_by_gateway(&mut tls).await;
    let line = gw.log.wait_for(|l| l["closed_by"] == "revoked").await;
    assert_eq!(line["reason"], "revoked");
    let two = connect_as(gw.addr(), "demo", "two", "api.shop.example:443").await;
    assert_eq!(two.status, 200);
}

#[tokio::test]
async fn changing_resolve_or_the_private_block_revokes_the_tunnels_it_would_refuse() {
    let origin = Origin::start(&["api.shop.example", "img.shop.example"]).await;
    let elsewhere = Origin::start(&["api.shop.example"]).await;
    let base = config(origin.addr, r#""api.shop.example", "img.shop.example""#, "one", "verify_tls = false");
    let gw = TestGateway::start(&base).await;
    let mut api = connect_as(gw.addr(), "demo", "one", "api.shop.example:443").await.stream;
    let mut img = connect_as(gw.addr(), "demo", "one", "img.shop.example:443").await.stream;
    // [resolve] now sends api.shop.example elsewhere: its tunnel is to the wrong address
    let moved = base.replace(
        &format!("\"api.shop.example\" = \"{}\"", origin.addr),
        &format!("\"api.shop.example\" = \"{}\"", elsewhere.addr),
    );
    std::fs::write(&gw.path, &moved).unwrap();
    assert_eq!(reload(&gw).await.0, 200);
    closed_by_gateway(&mut api).await;
    // img.shop.example loses its override: its loopback address is now a private one
    let dropped = moved.replace(&format!("\"img.shop.example\" = \"{}\"\n", origin.addr), "");
    std::fs::write(&gw.path, &dropped).unwrap();
    assert_eq!(reload(&gw).await.0, 200);
    closed_by_gateway(&mut img).await;
    assert_eq!(
        gw.metric(r#"gateway_requests_total{app="demo",channel="request",decision="deny",reason="revoked"}"#).await,
        2.0
    );
}

#[tokio::test]
async fn a_tunnel_let_through_by_report_mode_is_revoked_when_the_app_enforces() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let reporting = config(origin.addr, r#""api.shop.example""#, "one", "")
        .replace(r#"action = "enforce""#, r#"action = "report""#);
    let gw = TestGateway::start(&reporting).await;
    let answer = connect_as(gw.addr(), "demo", "one", "api.shop.example:443").await;
    let mut tunnel = answer.stream;
    // TLS for another name: report mode records sni_mismatch and lets it through
    tunnel.write_all(&client_hello("img.shop.example")).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while origin.bytes_received.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "report mode let nothing through");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::write(&gw.path, reporting.replace(r#"action = "report""#, r#"action = "enforce""#)).unwrap();
    assert_eq!(reload(&gw).await.0, 200);
    closed_by_gateway(&mut tunnel).await;
    let closed = gw.log.wait_for(|l| l["closed_by"] == "revoked").await;
    assert_eq!((closed["decision"].as_str(), closed["reason"].as_str()), (Some("deny"), Some("revoked")));
}

#[tokio::test]
async fn turning_on_the_private_block_revokes_tunnels_to_private_addresses() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let open = config(origin.addr, "", "one", "block_private_addresses = false\nverify_tls = false")
        .replace(r#"action = "enforce""#, r#"action = "open""#);
    let gw = TestGateway::start(&open).await;
    let answer = connect_as(gw.addr(), "demo", "one", &origin.addr.to_string()).await;
    assert_eq!((answer.status, answer.reason()), (200, "open"));
    let mut tunnel = answer.stream;
    std::fs::write(&gw.path, open.replace("block_private_addresses = false", "block_private_addresses = true"))
        .unwrap();
    assert_eq!(reload(&gw).await.0, 200);
    closed_by_gateway(&mut tunnel).await;
}

// ---- hostile requests ----

#[tokio::test]
async fn connect_and_client_hello_in_one_write_pass() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr, r#""api.shop.example""#, "one", "")).await;
    let hello = client_hello("api.shop.example");
    let mut request = format!(
        "CONNECT api.shop.example:443 HTTP/1.1\r\nHost: api.shop.example:443\r\nProxy-Authorization: {}\r\n\r\n",
        basic("demo", "one")
    )
    .into_bytes();
    request.extend_from_slice(&hello);
    let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let answer = read_answer(stream).await;
    assert_eq!(answer.status, 200);
    let deadline = tokio::time::Instant::now() + WAIT;
    while origin.bytes_received.load(Ordering::SeqCst) < hello.len() {
        assert!(tokio::time::Instant::now() < deadline, "the ClientHello did not reach the origin");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_connect_with_a_body_or_two_credentials_is_malformed() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr, r#""api.shop.example""#, "one", "")).await;
    let auth = basic("demo", "one");
    let with_length =
        connect(gw.addr(), "api.shop.example:443", &[("Proxy-Authorization", &auth), ("Content-Length", "5")]).await;
    assert_eq!((with_length.status, with_length.reason()), (400, "malformed_request"));
    let other = basic("demo", "guess");
    let twice =
        connect(gw.addr(), "api.shop.example:443", &[("Proxy-Authorization", &other), ("Proxy-Authorization", &auth)])
            .await;
    assert_eq!((twice.status, twice.reason()), (400, "malformed_request"));
    assert!(twice.json()["message"].as_str().unwrap().contains("more than one Proxy-Authorization"));
    assert_eq!(origin.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn failed_authentication_is_rate_limited_per_address_and_app() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let text = config(origin.addr, r#""api.shop.example""#, "one", "");
    let gw =
        TestGateway::start(&format!("{text}\n[[app]]\nid = \"shop\"\nserver_domains = [\"api.shop.example\"]\n")).await;
    // Guess until slowed down: ten in a row, or a few more if the machine is slow enough for
    // the bucket to refill meanwhile.
    let mut failures = 0;
    let limited = loop {
        let answer = connect_as(gw.addr(), "demo", "guess", "api.shop.example:443").await;
        if answer.status != 407 {
            break answer;
        }
        failures += 1;
        assert!(failures <= 20, "never slowed down");
    };
    assert_eq!((limited.status, limited.reason()), (429, "auth_rate_limited"));
    assert!(failures >= 10);
    // plain HTTP is no way around it
    let plain = format!(
        "GET http://api.shop.example/ HTTP/1.1\r\nHost: api.shop.example\r\nProxy-Authorization: {}\r\n\r\n",
        basic("demo", "one")
    );
    assert_eq!(send_raw(gw.addr(), &plain).await.reason(), "auth_rate_limited");
    let right = connect_as(gw.addr(), "demo", "one", "api.shop.example:443").await;
    assert_eq!(right.reason(), "auth_rate_limited", "even a right guess waits");
    assert!(right.headers.contains_key("retry-after"));
    assert_eq!(gw.metric(r#"gateway_auth_failures_total{listener="proxy"}"#).await, f64::from(failures));
    // another app from the same address is not held up
    assert_eq!(connect_as(gw.addr(), "shop", "x", "api.shop.example:443").await.status, 200);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(connect_as(gw.addr(), "demo", "one", "api.shop.example:443").await.status, 200);
}

// ---- the admin listener ----

#[tokio::test]
async fn stalled_admin_bodies_cannot_hold_the_gateway() {
    raise_open_files_limit(5_000);
    let origin = Origin::start(&["api.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr, r#""api.shop.example""#, "one", "")).await;
    let admin = gw.admin();
    let head = format!(
        "POST /v1/check HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 65536\r\n\r\n"
    );
    let mut stalled = Vec::new();
    for _ in 0..2_000 {
        let Ok(mut stream) = TcpStream::connect(admin).await else { break };
        let _ = stream.write_all(head.as_bytes()).await;
        stalled.push(stream);
    }
    assert_eq!(stalled.len(), 2_000);
    // the proxy answers while they stall
    let answer = connect_as(gw.addr(), "demo", "one", "api.shop.example:443").await;
    let mut tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");
    // and the admin listener turned the flood away: most of them are closed at once
    let mut closed = 0;
    for stream in &mut stalled {
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(2), stream.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert!(closed >= 2_000 - miniapp_gateway::admin::MAX_CONNECTIONS, "only {closed} of 2,000 were closed");
}

#[tokio::test]
async fn an_admin_body_over_the_limit_is_413() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr, r#""api.shop.example""#, "one", "")).await;
    let big = "x".repeat(miniapp_gateway::admin::MAX_BODY + 1);
    let (status, _) = admin_json(gw.admin(), "POST", "/v1/check", Some(&big), Some(TOKEN)).await;
    assert_eq!(status, 413);
}

#[tokio::test]
async fn browsers_cannot_be_turned_against_the_admin_listener() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr, r#""api.shop.example""#, "one", "")).await;
    let admin = gw.admin();
    let request = |host: &str, extra: &str| {
        format!(
            "POST /-/reload HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    // a DNS-rebound name
    assert_eq!(send_raw(admin, &request("evil.example", "")).await.status, 421);
    // a page elsewhere posting to the listener
    let foreign = request(&admin.to_string(), "Origin: https://evil.example\r\n");
    assert_eq!(send_raw(admin, &foreign).await.status, 403);
    let cross_site = request(&admin.to_string(), "Sec-Fetch-Site: cross-site\r\n");
    assert_eq!(send_raw(admin, &cross_site).await.status, 403);
    // its own origin, localhost and the bare address are fine
    let own = request(&admin.to_string(), &format!("Origin: http://{admin}\r\n"));
    assert_eq!(send_raw(admin, &own).await.status, 200);
    assert_eq!(send_raw(admin, &request(&format!("localhost:{}", admin.port()), "")).await.status, 200);
    // probes and scrapers are never asked
    let probe = "GET /readyz HTTP/1.1\r\nHost: gateway.internal\r\nConnection: close\r\n\r\n";
    assert_eq!(send_raw(admin, probe).await.status, 200);
}

#[tokio::test]
async fn failed_admin_authentication_is_rate_limited() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr, r#""api.shop.example""#, "one", "")).await;
    let mut failures = 0;
    while admin_json(gw.admin(), "GET", "/v1/apps", None, Some("guess")).await.0 == 401 {
        failures += 1;
        assert!(failures <= 20, "never slowed down");
    }
    assert!(failures >= 10);
    assert_eq!(admin_json(gw.admin(), "GET", "/v1/apps", None, Some(TOKEN)).await.0, 429);
    assert_eq!(gw.metric(r#"gateway_auth_failures_total{listener="admin"}"#).await, f64::from(failures));
}

#[tokio::test]
async fn a_pac_file_never_echoes_a_hostile_host() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let text = config(origin.addr, r#""api.shop.example""#, "one", "")
        .replace("listen = \"127.0.0.1:0\"\nadmin_listen", "listen = \"0.0.0.0:0\"\nadmin_listen")
        .replace(&format!("admin_token = \"{TOKEN}\"\n"), "admin_hosts = [\"gw.example\"]\n");
    let gw = TestGateway::start(&text).await;
    let port = gw.addr().port();
    let pac = |host: &str| {
        let request = format!("GET /proxy.pac HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let admin = gw.admin();
        async move {
            let answer = send_raw(admin, &request).await;
            (answer.status, String::from_utf8(answer.body).unwrap())
        }
    };
    let (status, body) = pac("gw.example:9090").await;
    assert_eq!(status, 200);
    assert!(body.contains(&format!("\"PROXY gw.example:{port}\"")), "{body}");
    let (status, body) = pac("127.0.0.1:9090").await;
    assert_eq!(status, 200);
    assert!(body.contains(&format!("\"PROXY 127.0.0.1:{port}\"")), "{body}");
    // a Host that is not a host never reaches the JavaScript
    let (status, body) = pac("x\";alert(1);//").await;
    assert_ne!(status, 200);
    assert!(!body.contains("alert"), "{body}");
}

// ---- metrics ----

#[tokio::test]
async fn the_series_of_a_removed_app_disappear() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let base = config(origin.addr, r#""api.shop.example""#, "one", "");
    let with_shop = format!("{base}\n[[app]]\nid = \"shop\"\nserver_domains = [\"api.shop.example\"]\n");
    let gw = TestGateway::start(&with_shop).await;
    let answer = connect_as(gw.addr(), "shop", "x", "api.shop.example:443").await;
    let mut tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");
    let series = r#"gateway_requests_total{app="shop",channel="request",decision="allow",reason="whitelisted"}"#;
    assert_eq!(gw.wait_metric(series, 1.0).await, 1.0);
    // a reload that keeps the app (the file as it is): its series now date from an
    // earlier generation than the one that removes it
    assert_eq!(reload(&gw).await.0, 200);
    std::fs::write(&gw.path, &base).unwrap();
    assert_eq!(reload(&gw).await.0, 200);
    let (_, _, body) = admin_request(gw.admin(), "GET", "/metrics", None, None).await;
    let text = String::from_utf8(body).unwrap();
    assert!(!text.contains(r#"app="shop""#), "{text}");
    assert!(text.contains("gateway_access_log_dropped_total 0"), "{text}");
}
