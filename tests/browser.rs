//! A real web-view: headless Chromium whose proxy is a listener bound to app `demo` on the
//! webview channel. A page on the WebView whitelist loads through it; an unlisted one does not.
//!
//! Needs Chromium (`chromium` from Debian). Without it the test says so and passes, unless
//! `MINIAPP_REQUIRE_BROWSER=1` (set by `.ci/run`, which installs Chromium) makes it a failure.

mod common;

use std::process::Command;

use common::*;

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|bin| Command::new(bin).arg("--version").output().is_ok_and(|out| out.status.success()))
}

/// Load `url` in headless Chromium through `proxy`; returns the DOM it rendered.
fn load(browser: &str, proxy: std::net::SocketAddr, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--ignore-certificate-errors",
            "--timeout=10000",
            &format!("--user-data-dir={}", profile.path().display()),
            &format!("--proxy-server=http://{proxy}"),
            "--dump-dom",
            url,
        ])
        .output()
        .expect("run chromium");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webview_loads_whitelisted_pages_only() {
    let Some(browser) = chromium() else {
        assert!(std::env::var_os("MINIAPP_REQUIRE_BROWSER").is_none(), "Chromium is required but not installed");
        eprintln!("skipped: no Chromium on this machine (apt-get install chromium)");
        return;
    };
    let origin = Origin::start(&["m.shop.example", "evil.example"]).await;
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[resolve]
"m.shop.example" = "{o}"
"evil.example" = "{o}"
[[listener]]
listen = "127.0.0.1:0"
app = "demo"
channel = "webview"
[[app]]
id = "demo"
server_domains = ["evil.example"]
webview_domains = ["*.shop.example"]
"#,
        o = origin.addr
    );
    let gw = TestGateway::start(&config).await;
    let webview = gw.addrs[1];

    let allowed = tokio::task::spawn_blocking(move || load(browser, webview, "https://m.shop.example/")).await.unwrap();
    assert!(allowed.contains("hello from origin"), "the whitelisted page did not load: {allowed}");
    let line = gw.log.wait_for(|l| l["host"] == "m.shop.example" && l["decision"] == "allow").await;
    assert_eq!((line["app"].as_str(), line["channel"].as_str()), (Some("demo"), Some("webview")));

    // on the app's server domains, but not its WebView domains: the web-view may not load it
    let refused = tokio::task::spawn_blocking(move || load(browser, webview, "https://evil.example/")).await.unwrap();
    assert!(!refused.contains("hello from origin"), "an unlisted page loaded: {refused}");
    let line = gw.log.wait_for(|l| l["host"] == "evil.example").await;
    assert_eq!((line["decision"].as_str(), line["reason"].as_str()), (Some("deny"), Some("not_whitelisted")));
}
