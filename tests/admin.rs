//! The admin listener and the metrics as an operator and a scraper see them.

mod common;

use common::*;

fn config(origin: std::net::SocketAddr, admin_token: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{admin_token}

[resolve]
"api.shop.example" = "{origin}"

[[app]]
id = "demo"
name = "Demo shop"
token = "s3cret"
server_domains = ["https://api.shop.example", {{ domain = "img.shop.example:8443", remark = "image CDN" }}]
webview_domains = [{{ domain = "*.shop.example", remark = "H5 pages" }}]
api_whitelist = ["shop.pay", {{ api = "shop.share", remark = "share sheet" }}]

[[app]]
id = "watch"
action = "report"
"#
    )
}

async fn setup(admin_token: &str) -> (Origin, TestGateway) {
    let origin = Origin::start(&["api.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr, admin_token)).await;
    (origin, gw)
}

#[tokio::test]
async fn health_readiness_and_every_metric_name() {
    let (_origin, gw) = setup("").await;
    let (status, _, body) = admin_request(gw.admin(), "GET", "/healthz", None, None).await;
    assert_eq!((status, body.as_slice()), (200, b"ok\n".as_slice()));
    let (status, _, _) = admin_request(gw.admin(), "GET", "/readyz", None, None).await;
    assert_eq!(status, 200);
    let (status, headers, body) = admin_request(gw.admin(), "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"].starts_with("text/plain"));
    let text = String::from_utf8(body).unwrap();
    for name in [
        "gateway_connections_active",
        "gateway_tunnels_active",
        "gateway_tunnel_duration_seconds",
        "gateway_upstream_connect_duration_seconds",
        "gateway_config_generation",
        "gateway_config_last_reload_success_timestamp_seconds",
        "gateway_apps_loaded",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing from\n{text}");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(metric_value(&text, &format!("gateway_build_info{{version=\"{version}\"}}")), 1.0);
    assert_eq!(metric_value(&text, "gateway_apps_loaded"), 2.0);
    assert_eq!(metric_value(&text, "gateway_config_generation"), 1.0);
    assert!(metric_value(&text, "gateway_config_last_reload_success_timestamp_seconds") > 1.7e9);
    assert_eq!(metric_value(&text, r#"gateway_config_reloads_total{result="success"}"#), 0.0);
    assert!(text.contains(r#"gateway_config_reloads_total{result="failure"} 0"#));
    assert!(text.contains(r#"gateway_tunnel_bytes_total{direction="upstream"} 0"#));
}

#[tokio::test]
async fn counters_move_by_exactly_the_requests_made() {
    let (origin, gw) = setup("").await;
    for _ in 0..3 {
        let answer = connect_as(gw.addr(), "demo", "s3cret", "api.shop.example:443").await;
        let mut tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
        assert_eq!(https_request(&mut tls, "GET", "/bytes/1000", b"").await.len(), 1000);
    }
    for _ in 0..2 {
        assert_eq!(connect_as(gw.addr(), "demo", "s3cret", "evil.example:443").await.reason(), "not_whitelisted");
    }
    assert_eq!(connect(gw.addr(), "api.shop.example:443", &[]).await.reason(), "auth_required");
    assert_eq!(connect_as(gw.addr(), "demo", "wrong", "api.shop.example:443").await.reason(), "bad_credentials");
    let watched = connect_as(gw.addr(), "watch", "x", "api.shop.example:443").await;
    assert_eq!(watched.reason(), "not_whitelisted");
    let mut tls = tls_over(watched.stream, &origin.ca, "api.shop.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");
    drop(tls);
    let webview = [("Proxy-Authorization", basic("demo", "s3cret")), ("X-Miniapp-Channel", "webview".to_owned())];
    let headers: Vec<(&str, &str)> = webview.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let answer = connect(gw.addr(), "api.shop.example:443", &headers).await;
    assert_eq!(answer.reason(), "whitelisted");
    let mut tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");
    drop(tls);

    let expect = [
        (r#"{app="demo",channel="request",decision="allow",reason="whitelisted"}"#, 3.0),
        (r#"{app="demo",channel="request",decision="deny",reason="not_whitelisted"}"#, 2.0),
        (r#"{app="",channel="",decision="deny",reason="auth_required"}"#, 1.0),
        (r#"{app="demo",channel="",decision="deny",reason="bad_credentials"}"#, 1.0),
        (r#"{app="watch",channel="request",decision="report",reason="not_whitelisted"}"#, 1.0),
        (r#"{app="demo",channel="webview",decision="allow",reason="whitelisted"}"#, 1.0),
    ];
    // a tunnel's decision is counted once its TLS check has passed
    gw.wait_metric(&format!("gateway_requests_total{}", expect[5].0), 1.0).await;
    let (_, _, body) = admin_request(gw.admin(), "GET", "/metrics", None, None).await;
    let text = String::from_utf8(body).unwrap();
    for (labels, value) in expect {
        assert_eq!(metric_value(&text, &format!("gateway_requests_total{labels}")), value, "{labels}");
    }
    let samples = text.lines().filter(|l| l.starts_with("gateway_requests_total{")).count();
    assert_eq!(samples, expect.len(), "no other label combination was counted:\n{text}");
    assert_eq!(metric_value(&text, "gateway_upstream_connect_duration_seconds_count"), 5.0);
    // three tunnels moved more than 1000 bytes down each; they close as the clients go away
    assert!(metric_value(&text, r#"gateway_tunnel_bytes_total{direction="downstream"}"#) > 3000.0);
    assert!(metric_value(&text, r#"gateway_tunnel_bytes_total{direction="upstream"}"#) > 0.0);
    assert_eq!(gw.wait_metric("gateway_tunnels_active", 0.0).await, 0.0);
    assert_eq!(gw.wait_metric("gateway_tunnel_duration_seconds_count", 5.0).await, 5.0);
    // admin connections are not proxy connections: every client has gone
    assert_eq!(gw.wait_metric("gateway_connections_active", 0.0).await, 0.0);
}

#[tokio::test]
async fn apps_are_listed_without_their_tokens() {
    let (_origin, gw) = setup("").await;
    let (status, body) = admin_json(gw.admin(), "GET", "/v1/apps", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["generation"], 1);
    let ids: Vec<&str> = body["apps"].as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["demo", "watch"]);
    let (status, demo) = admin_json(gw.admin(), "GET", "/v1/apps/demo", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(
        demo,
        serde_json::json!({
            "id": "demo", "name": "Demo shop", "action": "enforce", "has_token": true, "revision": null,
            "platform": "mpaas", "has_secret": false,
            "server_domains": [
                {"domain": "api.shop.example", "remark": null},
                {"domain": "img.shop.example:8443", "remark": "image CDN"}
            ],
            "webview_domains": [{"domain": "*.shop.example", "remark": "H5 pages"}],
            "api_whitelist": [{"api": "shop.pay", "remark": null}, {"api": "shop.share", "remark": "share sheet"}]
        })
    );
    assert!(!demo.to_string().contains("s3cret"));
    let (status, body) = admin_json(gw.admin(), "GET", "/v1/apps/nobody", None, None).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("no app \"nobody\"")));
}

#[tokio::test]
async fn check_answers_for_urls_and_apis() {
    let (_origin, gw) = setup("").await;
    let check = |body: &'static str| admin_json(gw.admin(), "POST", "/v1/check", Some(body), None);
    let (status, body) = check(r#"{"app":"demo","channel":"request","url":"https://API.shop.example/v1/items"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(body["decision"], "allow");
    assert_eq!(body["reason"], "whitelisted");
    assert_eq!(body["rule"], "server_domains[0]");
    let (_, body) = check(r#"{"app":"demo","url":"https://evil.example/"}"#).await;
    assert_eq!(
        body,
        serde_json::json!({"decision": "deny", "reason": "not_whitelisted", "rule": null,
            "message": "evil.example:443 is not on the server domain whitelist of app demo"})
    );
    let (_, body) = check(r#"{"app":"demo","channel":"webview","url":"wss://m.shop.example"}"#).await;
    assert_eq!((body["decision"].as_str(), body["rule"].as_str()), (Some("allow"), Some("webview_domains[0]")));
    let (_, body) = check(r#"{"app":"demo","url":"http://api.shop.example/"}"#).await;
    assert_eq!(body["reason"], "https_required");
    let (_, body) = check(r#"{"app":"watch","url":"https://evil.example/"}"#).await;
    assert_eq!((body["decision"].as_str(), body["reason"].as_str()), (Some("report"), Some("not_whitelisted")));

    let (_, body) = check(r#"{"app":"demo","api":"shop.pay"}"#).await;
    assert_eq!(body, serde_json::json!({"decision": "allow", "reason": "api_whitelisted"}));
    let (_, body) = check(r#"{"app":"demo","api":"shop.refund"}"#).await;
    assert_eq!(body, serde_json::json!({"decision": "deny", "reason": "api_not_whitelisted"}));
    let (_, body) = check(r#"{"app":"nobody","api":"shop.pay"}"#).await;
    assert_eq!(body, serde_json::json!({"decision": "deny", "reason": "unknown_app"}));

    for bad in [
        r#"{"app":"demo""#,
        r#"{"app":"demo"}"#,
        r#"{"app":"demo","url":"https://a.example","api":"x"}"#,
        r#"{"app":"demo","url":"::"}"#,
        r#"{"app":"demo","url":"https://a.example","extra":1}"#,
    ] {
        let (status, body) = admin_json(gw.admin(), "POST", "/v1/check", Some(bad), None).await;
        assert_eq!(status, 400, "{bad}");
        assert!(body["error"].is_string());
    }
    let (status, _) = admin_json(gw.admin(), "GET", "/v1/check", None, None).await;
    assert_eq!(status, 405);
    let (status, _) = admin_json(gw.admin(), "GET", "/nowhere", None, None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_admin_token_guards_everything_but_metrics_and_health() {
    let (_origin, gw) = setup(r#"admin_token = "adm1n""#).await;
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (status, _, _) = admin_request(gw.admin(), "GET", path, None, None).await;
        assert_eq!(status, 200, "{path}");
    }
    for (method, path) in [
        ("GET", "/v1/apps"),
        ("GET", "/v1/apps/demo"),
        ("POST", "/-/reload"),
        ("POST", "/v1/check"),
        ("GET", "/proxy.pac"),
    ] {
        let (status, headers, _) = admin_request(gw.admin(), method, path, None, None).await;
        assert_eq!(status, 401, "{path}");
        assert_eq!(headers["www-authenticate"], "Bearer realm=\"miniapp-gateway\"");
        let (status, _, _) = admin_request(gw.admin(), method, path, None, Some("guess")).await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, body) = admin_json(gw.admin(), "GET", "/v1/apps", None, Some("adm1n")).await;
    assert_eq!((status, body["apps"].as_array().map(Vec::len)), (200, Some(2)));
    let (status, body) = admin_json(gw.admin(), "POST", "/-/reload", None, Some("adm1n")).await;
    assert_eq!((status, body["generation"].as_u64()), (200, Some(2)));
    assert_eq!(gw.metric(r#"gateway_config_reloads_total{result="success"}"#).await, 1.0);
}

#[tokio::test]
async fn the_pac_file_points_at_the_proxy() {
    let (_origin, gw) = setup("").await;
    let (status, headers, body) = admin_request(gw.admin(), "GET", "/proxy.pac", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/x-ns-proxy-autoconfig");
    let pac = String::from_utf8(body).unwrap();
    assert!(pac.contains("function FindProxyForURL(url, host)"), "{pac}");
    assert!(pac.contains(&format!("return \"PROXY {}\";", gw.addr())), "{pac}");
}

#[tokio::test]
async fn readyz_turns_503_when_shutdown_starts() {
    let (origin, mut gw) = setup("").await;
    let answer = connect_as(gw.addr(), "demo", "s3cret", "api.shop.example:443").await;
    let mut tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
    let draining = gw.shutdown();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _, body) = admin_request(gw.admin(), "GET", "/readyz", None, None).await;
        if status == 503 {
            assert_eq!(body, b"shutting down\n");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "/readyz never turned 503");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // the tunnel keeps working while the gateway drains, and the drain ends when it closes
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");
    drop(tls);
    tokio::time::timeout(WAIT, draining).await.expect("the drain did not end").unwrap();
}

/// Every `gateway_*` and `process_*` name in a file.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for prefix in ["gateway_", "process_"] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let before_ok = at == 0 || !rest.as_bytes()[at - 1].is_ascii_alphanumeric();
            let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if before_ok {
                names.insert(name.clone());
            }
            rest = &rest[at + name.len()..];
        }
    }
    names
}

#[tokio::test]
async fn the_dashboard_and_alerts_name_only_exported_metrics() {
    let (origin, gw) = setup("").await;
    let answer = connect_as(gw.addr(), "demo", "s3cret", "api.shop.example:443").await;
    let mut tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");
    drop(tls);
    gw.wait_metric("gateway_tunnel_duration_seconds_count", 1.0).await;
    let (_, _, body) = admin_request(gw.admin(), "GET", "/metrics", None, None).await;
    let exposition = String::from_utf8(body).unwrap();
    let exported: std::collections::BTreeSet<&str> =
        exposition.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["deploy/grafana/dashboard.json", "deploy/prometheus/alerts.yml"] {
        let names = metric_names(&std::fs::read_to_string(root.join(file)).unwrap());
        assert!(names.len() >= 5, "{file} names {names:?}");
        for name in names {
            assert!(exported.contains(name.as_str()), "{file} uses {name}, which the gateway does not export");
        }
    }
}

/// The demo admin token the shipped config admits (and the README names).
const DEMO_TOKEN: &str = "console-demo-token";

/// The shipped config, on port 0.
fn shipped_config_on_port_0() -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/gateway.toml")).unwrap();
    let text = text.replace("127.0.0.1:8080\"", "127.0.0.1:0\"").replace("127.0.0.1:8081\"", "127.0.0.1:0\"");
    assert!(text.contains("admin_listen = \"127.0.0.1:9090\""), "the shipped config runs the admin listener");
    text.replace("admin_listen = \"127.0.0.1:9090\"", "admin_listen = \"127.0.0.1:0\"")
}

/// A gateway on the shipped config (its apps_dir copied beside it), on port 0.
async fn shipped_gateway() -> TestGateway {
    let shipped_apps = concat!(env!("CARGO_MANIFEST_DIR"), "/config/apps");
    let apps: Vec<(String, String)> = std::fs::read_dir(shipped_apps)
        .unwrap()
        .map(|file| {
            let file = file.unwrap();
            (file.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(file.path()).unwrap())
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("apps")).unwrap();
    for (name, text) in &apps {
        std::fs::write(dir.path().join("apps").join(name), text).unwrap();
    }
    let users = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/users.toml")).unwrap();
    std::fs::write(dir.path().join("users.toml"), users).unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, shipped_config_on_port_0()).unwrap();
    TestGateway::start_at(dir, path).await
}

#[tokio::test]
async fn the_shipped_config_answers_the_readme_admin_examples() {
    let gw = shipped_gateway().await;
    let admin = gw.admin();
    let (status, _, body) = admin_request(admin, "GET", "/healthz", None, None).await;
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));
    let (status, body) = admin_json(admin, "POST", "/-/reload", None, Some(DEMO_TOKEN)).await;
    assert_eq!((status, body["generation"].as_u64()), (200, Some(2)));
    let (status, body) = admin_json(admin, "GET", "/v1/apps/demo", None, Some(DEMO_TOKEN)).await;
    assert_eq!((status, body["name"].as_str()), (200, Some("Demo shop")));
    assert_eq!(body["server_domains"][1]["remark"], "image CDN");
    let check = r#"{"app":"demo","channel":"webview","url":"https://m.shop.example/cart"}"#;
    let (status, body) = admin_json(admin, "POST", "/v1/check", Some(check), Some(DEMO_TOKEN)).await;
    assert_eq!(
        (status, body["decision"].as_str(), body["rule"].as_str()),
        (200, Some("allow"), Some("webview_domains[0]"))
    );
    let (status, body) =
        admin_json(admin, "POST", "/v1/check", Some(r#"{"app":"demo","api":"shop.refund"}"#), Some(DEMO_TOKEN)).await;
    assert_eq!((status, body["reason"].as_str()), (200, Some("api_not_whitelisted")));
    let (status, _, body) = admin_request(admin, "GET", "/proxy.pac", None, Some(DEMO_TOKEN)).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8(body).unwrap().contains(&format!("PROXY {}", gw.addr())));
    let (_, _, body) = admin_request(admin, "GET", "/metrics", None, None).await;
    assert_eq!(metric_value(&String::from_utf8(body).unwrap(), "gateway_config_generation"), 2.0);
}

#[tokio::test]
async fn a_plain_http_refusal_names_the_app_that_asked() {
    let (_origin, gw) = setup("").await;
    let request = format!(
        "GET http://api.shop.example/ HTTP/1.1\r\nHost: api.shop.example\r\nProxy-Authorization: {}\r\n\r\n",
        basic("demo", "s3cret")
    );
    let answer = send_raw(gw.addr(), &request).await;
    assert_eq!((answer.status, answer.reason()), (403, "https_required"));
    assert_eq!(answer.json()["app"], "demo");
    let line = gw.log.wait_for(|l| l["reason"] == "https_required").await;
    assert_eq!((line["app"].as_str(), line["channel"].as_str()), (Some("demo"), Some("request")));
    let series = r#"gateway_requests_total{app="demo",channel="request",decision="deny",reason="https_required"}"#;
    assert_eq!(gw.metric(series).await, 1.0);
}

#[tokio::test]
async fn admin_users_are_known_by_their_tokens_hash_and_held_to_their_roles() {
    let origin = Origin::start(&["api.shop.example"]).await;
    // what `miniapp-gateway token` puts in the config: the SHA-256 of each token
    let text = format!(
        "{}\n[[admin_user]]\nname = \"vera\"\ntoken_sha256 = \"{}\"\nrole = \"viewer\"\n\n\
         [[admin_user]]\nname = \"ed\"\ntoken_sha256 = \"{}\"\nrole = \"editor\"\n",
        config(origin.addr, "admin_token = \"root-token\""),
        token_hash("viewer-token"),
        token_hash("editor-token")
    );
    let gw = TestGateway::start(&text).await;
    let admin = gw.admin();
    for token in ["viewer-token", "editor-token", "root-token"] {
        let (status, _) = admin_json(admin, "GET", "/v1/apps", None, Some(token)).await;
        assert_eq!(status, 200, "{token} may read");
    }
    let (status, body) = admin_json(admin, "POST", "/-/reload", None, Some("viewer-token")).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "user vera (viewer) may not do this: it needs the admin role");
    assert_eq!(admin_json(admin, "POST", "/-/reload", None, Some("editor-token")).await.0, 403);
    assert_eq!(admin_json(admin, "POST", "/-/reload", None, Some("root-token")).await.0, 200);
    assert_eq!(admin_json(admin, "GET", "/v1/apps", None, Some("nobody")).await.0, 401);
    assert_eq!(admin_json(admin, "GET", "/v1/apps", None, None).await.0, 401);
}

#[test]
fn the_token_command_prints_a_token_and_the_entry_that_admits_it() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_miniapp-gateway"))
        .args(["token", "--name", "alice", "--role", "editor"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let token = text.lines().nth(1).unwrap();
    assert_eq!(token.len(), 64, "{text}");
    let entry = &text[text.find("[[admin_user]]").unwrap()..];
    let config = miniapp_gateway::config::load_str(std::path::Path::new("t.toml"), entry.to_owned()).unwrap();
    let user = &config.server.admin_users[0];
    assert_eq!((user.name.as_str(), user.role), ("alice", miniapp_gateway::config::Role::Editor));
    assert_eq!(user.token_sha256, miniapp_gateway::config::token_sha256(token));
}

/// An admin request with a body and extra headers, on the shipped config (with its demo token).
async fn send_admin(admin: std::net::SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> Answer {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nAuthorization: Bearer {DEMO_TOKEN}\r\n\
         {headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    send_raw(admin, &request).await
}

#[tokio::test]
async fn the_shipped_config_answers_the_readme_management_examples() {
    let gw = shipped_gateway().await;
    let admin = gw.admin();
    let created = send_admin(
        admin,
        "PUT",
        "/v1/apps/news",
        "If-None-Match: *\r\n",
        r#"{"name":"News","server_domains":[{"domain":"https://api.news.example","remark":"feed"}]}"#,
    )
    .await;
    assert_eq!((created.status, created.json()["revision"].as_u64()), (201, Some(1)));
    let add = r#"{"entry":"https://img.news.example","remark":"images"}"#;
    assert_eq!(send_admin(admin, "POST", "/v1/apps/news/server_domains", "", add).await.status, 201);
    let plain =
        send_admin(admin, "POST", "/v1/apps/news/server_domains", "", r#"{"entry":"http://plain.news.example"}"#).await;
    assert_eq!((plain.status, plain.json()["errors"][0]["path"].as_str()), (422, Some("server_domains[2].domain")));
    let dry = send_admin(
        admin,
        "POST",
        "/v1/apps/news/server_domains?dry_run=true",
        "",
        r#"{"entry":"https://cdn.news.example"}"#,
    )
    .await;
    assert_eq!((dry.status, dry.json()["dry_run"].as_bool()), (200, Some(true)));
    let path = "/v1/apps/news/server_domains/https%3A%2F%2Fimg.news.example";
    assert_eq!(send_admin(admin, "DELETE", path, "", "").await.status, 204);
    let action = send_admin(admin, "PUT", "/v1/apps/news/action", "", r#"{"action":"report"}"#).await;
    assert_eq!((action.status, action.json()["revision"].as_u64()), (200, Some(4)));
    let stale = send_admin(admin, "PUT", "/v1/apps/news", "If-Match: \"1\"\r\n", r#"{"name":"News"}"#).await;
    assert_eq!((stale.status, stale.json()["revision"].as_u64()), (412, Some(4)));
    let history = send_admin(admin, "GET", "/v1/apps/news/history", "", "").await.json();
    let changes: Vec<&str> =
        history["revisions"].as_array().unwrap().iter().map(|r| r["change"].as_str().unwrap()).collect();
    assert_eq!(changes, ["action", "remove", "add", "create"]);
    let back = send_admin(admin, "POST", "/v1/apps/news/rollback", "", r#"{"revision":2}"#).await;
    assert_eq!((back.status, back.json()["revision"].as_u64()), (200, Some(5)));
    assert_eq!(back.json()["server_domains"][1]["remark"], "images");
    let file = std::fs::read_to_string(gw.dir.path().join("apps/news.toml")).unwrap();
    assert!(file.starts_with("# revision 5 sha256="), "{file}");
}
