//! Hot reload as an operator sees it: saves picked up by the watcher, Kubernetes ConfigMap
//! swaps, broken saves that change nothing, and tunnels revoked by a reload.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;

fn config(origin: std::net::SocketAddr, server_domains: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[resolve]
"api.shop.example" = "{origin}"
"img.shop.example" = "{origin}"
"new.shop.example" = "{origin}"

[[app]]
id = "demo"
server_domains = [{server_domains}]
"#
    )
}

/// CONNECT until the answer's reason is `reason`, or give up after [`WAIT`].
async fn wait_for_reason(gw: &TestGateway, target: &str, reason: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let answer = connect_as(gw.addr(), "demo", "x", target).await;
        if answer.reason() == reason || tokio::time::Instant::now() > deadline {
            return answer.reason().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_editor_style_save_changes_decisions() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr, r#""api.shop.example""#)).await;
    assert_eq!(connect_as(gw.addr(), "demo", "x", "new.shop.example:443").await.reason(), "not_whitelisted");
    assert_eq!(gw.metric("gateway_config_generation").await, 1.0);

    gw.save_config(&config(origin.addr, r#""api.shop.example", "new.shop.example""#));
    assert_eq!(wait_for_reason(&gw, "new.shop.example:443", "whitelisted").await, "whitelisted");
    assert_eq!(gw.metric("gateway_config_generation").await, 2.0);
    assert_eq!(gw.metric(r#"gateway_config_reloads_total{result="success"}"#).await, 1.0);
    assert_eq!(gw.metric(r#"gateway_config_reloads_total{result="failure"}"#).await, 0.0);
    let line = gw.log.wait_for(|l| l["host"] == "new.shop.example" && l["decision"] == "deny").await;
    assert_eq!(line["generation"], 1);
}

#[tokio::test]
async fn a_kubernetes_configmap_swap_changes_decisions() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    // The layout the kubelet writes: a timestamped directory, `..data` pointing at it, and
    // each key a symlink through `..data`.
    let publish = |version: &str, text: &str| {
        let versioned = root.join(format!("..{version}"));
        std::fs::create_dir(&versioned).unwrap();
        std::fs::write(versioned.join("gateway.toml"), text).unwrap();
        let tmp = root.join("..data_tmp");
        std::os::unix::fs::symlink(Path::new(&format!("..{version}")), &tmp).unwrap();
        std::fs::rename(&tmp, root.join("..data")).unwrap();
    };
    publish("2026_11_21_05_00_00.000000001", &config(origin.addr, r#""api.shop.example""#));
    std::os::unix::fs::symlink("..data/gateway.toml", root.join("gateway.toml")).unwrap();
    let path = root.join("gateway.toml");
    let gw = TestGateway::start_at(dir, path).await;
    assert_eq!(connect_as(gw.addr(), "demo", "x", "new.shop.example:443").await.reason(), "not_whitelisted");

    publish("2026_11_21_05_01_00.000000002", &config(origin.addr, r#""new.shop.example""#));
    assert_eq!(wait_for_reason(&gw, "new.shop.example:443", "whitelisted").await, "whitelisted");
    assert_eq!(connect_as(gw.addr(), "demo", "x", "api.shop.example:443").await.reason(), "not_whitelisted");
    assert_eq!(gw.metric("gateway_config_generation").await, 2.0);
}

#[tokio::test]
async fn a_broken_save_keeps_the_running_policy() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr, r#""api.shop.example""#)).await;

    let broken = config(origin.addr, r#""api.shop.example", "http://new.shop.example""#);
    gw.save_config(&broken);
    assert_eq!(gw.wait_metric(r#"gateway_config_reloads_total{result="failure"}"#, 1.0).await, 1.0);
    assert_eq!(gw.metric("gateway_config_generation").await, 1.0);
    assert_eq!(connect_as(gw.addr(), "demo", "x", "api.shop.example:443").await.reason(), "whitelisted");
    assert_eq!(connect_as(gw.addr(), "demo", "x", "new.shop.example:443").await.reason(), "not_whitelisted");

    let (status, body) = admin_json(gw.admin(), "POST", "/-/reload", None, None).await;
    assert_eq!(status, 422);
    let error = body["error"].as_str().unwrap();
    let expected = format!(
        "{}:13:39: \"http://new.shop.example\" in server_domains: only https:// and wss:// entries are allowed",
        gw.path.display()
    );
    assert_eq!(error, expected);
    assert_eq!(gw.metric(r#"gateway_config_reloads_total{result="failure"}"#).await, 2.0);

    // a half-written file (a syntax error) and a vanished file are failures too, never an
    // empty policy
    gw.save_config("[[app]]\nid = \"demo\"\nserver_domains = [\"api.shop");
    assert_eq!(gw.wait_metric(r#"gateway_config_reloads_total{result="failure"}"#, 3.0).await, 3.0);
    std::fs::remove_file(&gw.path).unwrap();
    let (status, body) = admin_json(gw.admin(), "POST", "/-/reload", None, None).await;
    assert_eq!(status, 422);
    assert!(body["error"].as_str().unwrap().contains("cannot read the config file"));
    assert_eq!(connect_as(gw.addr(), "demo", "x", "api.shop.example:443").await.reason(), "whitelisted");
    assert_eq!(gw.metric("gateway_config_generation").await, 1.0);

    // and the next good save is picked up
    gw.save_config(&config(origin.addr, r#""new.shop.example""#));
    assert_eq!(wait_for_reason(&gw, "new.shop.example:443", "whitelisted").await, "whitelisted");
    assert_eq!(gw.metric("gateway_config_generation").await, 2.0);
}

#[tokio::test]
async fn a_reload_closes_only_the_tunnels_it_revokes() {
    let origin = Origin::start(&["api.shop.example", "img.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr, r#""api.shop.example", "img.shop.example""#)).await;
    let kept = connect_as(gw.addr(), "demo", "x", "api.shop.example:443").await;
    let revoked = connect_as(gw.addr(), "demo", "x", "img.shop.example:443").await;
    assert_eq!((kept.status, revoked.status), (200, 200));
    let mut kept = tls_over(kept.stream, &origin.ca, "api.shop.example").await;
    let mut revoked = tls_over(revoked.stream, &origin.ca, "img.shop.example").await;
    assert_eq!(https_request(&mut revoked, "GET", "/", b"").await, b"hello from origin");
    assert_eq!(gw.metric("gateway_tunnels_active").await, 2.0);

    gw.save_config(&config(origin.addr, r#""api.shop.example""#));
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, revoked.read(&mut buf)).await.expect("the revoked tunnel stayed open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(https_request(&mut kept, "GET", "/bytes/5000", b"").await.len(), 5000);

    let line = gw.log.wait_for(|l| l["host"] == "img.shop.example").await;
    assert_eq!((line["decision"].as_str(), line["reason"].as_str()), (Some("deny"), Some("revoked")));
    assert_eq!(line["closed_by"], "revoked");
    let revoked_sample = r#"gateway_requests_total{app="demo",channel="request",decision="deny",reason="revoked"}"#;
    assert_eq!(gw.metric(revoked_sample).await, 1.0);
    assert_eq!(gw.metric("gateway_tunnels_active").await, 1.0);
}

#[tokio::test]
async fn apps_dir_files_are_watched() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("apps")).unwrap();
    let app = |domain: &str| format!("[[app]]\nid = \"shop\"\nserver_domains = [\"{domain}\"]\n");
    std::fs::write(dir.path().join("apps/shop.toml"), app("api.shop.example")).unwrap();
    let main = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[policy]\napps_dir = \"apps\"\n\
         [resolve]\n\"api.shop.example\" = \"{o}\"\n\"new.shop.example\" = \"{o}\"\n",
        o = origin.addr
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, main).unwrap();
    let apps = dir.path().join("apps");
    let gw = TestGateway::start_at(dir, path).await;
    assert_eq!(connect_as(gw.addr(), "shop", "x", "new.shop.example:443").await.reason(), "not_whitelisted");
    let tmp = apps.join(".shop.toml.tmp");
    std::fs::write(&tmp, app("new.shop.example")).unwrap();
    std::fs::rename(&tmp, apps.join("shop.toml")).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while connect_as(gw.addr(), "shop", "x", "new.shop.example:443").await.reason() != "whitelisted" {
        assert!(tokio::time::Instant::now() < deadline, "the apps_dir change was not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gw.metric("gateway_apps_loaded").await, 1.0);
}
