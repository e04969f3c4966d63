//! What the console is built on, without a browser: each app's recent refusals after real
//! refused CONNECTs, the server-sent event stream and its filter, roles, and the console's
//! files with their security headers.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const EDITOR: &str = "editor-token";
const VIEWER: &str = "viewer-token";

/// A gateway with apps `shop` (enforce), `rep` (report) and `other` in apps_dir, an editor
/// and a viewer; every name the tests connect to resolves to `origin`.
async fn setup() -> (Origin, TestGateway) {
    let origin = Origin::start(&["api.shop.example", "evil.example", "m.evil.example"]).await;
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[policy]
apps_dir = "apps"

[resolve]
"api.shop.example" = "{o}"
"evil.example" = "{o}"
"m.evil.example" = "{o}"
"other.example" = "{o}"

{users}"#,
        o = origin.addr,
        users = admin_user("ed", "editor", EDITOR) + &admin_user("vera", "viewer", VIEWER),
    );
    let apps = [
        ("shop.toml", "[[app]]\nid = \"shop\"\nserver_domains = [\"api.shop.example\"]\n"),
        ("rep.toml", "[[app]]\nid = \"rep\"\naction = \"report\"\n"),
        ("other.toml", "[[app]]\nid = \"other\"\n"),
    ];
    let gw = TestGateway::start_with_apps(&text, &apps).await;
    (origin, gw)
}

async fn decisions(admin: SocketAddr, app: &str, token: &str) -> (u16, Value) {
    admin_json(admin, "GET", &format!("/v1/apps/{app}/decisions"), None, Some(token)).await
}

/// The group of `host:port` on `channel` in a decisions answer.
fn group<'a>(answer: &'a Value, channel: &str, host: &str, port: u64) -> &'a Value {
    answer["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["channel"] == channel && g["host"] == host && g["port"] == port)
        .unwrap_or_else(|| panic!("no {channel} {host}:{port} in {answer}"))
}

#[tokio::test]
async fn refused_connects_are_kept_per_app_grouped_by_host() {
    let (origin, gw) = setup().await;
    let (proxy, admin) = (gw.addr(), gw.admin());
    let (status, body) = decisions(admin, "shop", VIEWER).await;
    assert_eq!((status, body["decisions"].as_array().map(Vec::len)), (200, Some(0)));

    assert_eq!(connect_as(proxy, "shop", "x", "evil.example:443").await.reason(), "not_whitelisted");
    assert_eq!(connect_as(proxy, "shop", "x", "evil.example:443").await.reason(), "not_whitelisted");
    assert_eq!(connect_as(proxy, "shop", "x", "m.evil.example:8443").await.reason(), "not_whitelisted");
    let webview = [("Proxy-Authorization", basic("shop", "x")), ("X-Miniapp-Channel", "webview".to_owned())];
    let webview: Vec<(&str, &str)> = webview.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(connect(proxy, "m.evil.example:443", &webview).await.reason(), "not_whitelisted");
    assert_eq!(connect_as(proxy, "shop", "x", "10.0.0.1:443").await.reason(), "ip_literal");
    // allowed (and a real TLS client through the tunnel): never kept
    let allowed = connect_as(proxy, "shop", "x", "api.shop.example:443").await;
    assert_eq!(allowed.status, 200);
    let mut tls = tls_over(allowed.stream, &origin.ca, "api.shop.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");
    // another app's refusal is that app's
    assert_eq!(connect_as(proxy, "other", "x", "other.example:443").await.reason(), "not_whitelisted");
    // an id that names no app is not kept anywhere
    assert_eq!(connect_as(proxy, "ghost", "x", "evil.example:443").await.reason(), "unknown_app");

    let (status, body) = decisions(admin, "shop", VIEWER).await;
    assert_eq!(status, 200);
    assert_eq!(body["decisions"].as_array().unwrap().len(), 4, "{body}");
    let evil = group(&body, "request", "evil.example", 443);
    assert_eq!((evil["count"].as_u64(), evil["decision"].as_str()), (Some(2), Some("deny")));
    assert_eq!((evil["reason"].as_str(), evil["list"].as_str()), (Some("not_whitelisted"), Some("server_domains")));
    assert_eq!((evil["entry"].as_str(), evil["wildcard"].as_str()), (Some("https://evil.example"), None));
    let sub = group(&body, "request", "m.evil.example", 8443);
    assert_eq!(sub["entry"], "https://m.evil.example:8443");
    assert_eq!(sub["wildcard"], "https://*.evil.example:8443");
    let page = group(&body, "webview", "m.evil.example", 443);
    assert_eq!(
        (page["list"].as_str(), page["wildcard"].as_str()),
        (Some("webview_domains"), Some("https://*.evil.example"))
    );
    let ip = group(&body, "request", "10.0.0.1", 443);
    assert_eq!((ip["reason"].as_str(), ip["entry"].as_str()), (Some("ip_literal"), None), "no entry allows an IP");
    assert!(body["decisions"].as_array().unwrap().iter().all(|g| g["host"] != "api.shop.example"));
    let (_, other) = decisions(admin, "other", VIEWER).await;
    assert_eq!(other["decisions"][0]["host"], "other.example");

    // what the console's Allow does: add the offered entry, and the proxy lets the host through
    let add = json!({ "entry": evil["entry"] }).to_string();
    let (status, _) = admin_json(admin, "POST", "/v1/apps/shop/server_domains", Some(&add), Some(EDITOR)).await;
    assert_eq!(status, 201);
    let answer = connect_as(proxy, "shop", "x", "evil.example:443").await;
    assert_eq!((answer.status, answer.reason()), (200, "whitelisted"));
    let (_, body) = decisions(admin, "shop", VIEWER).await;
    assert_eq!(group(&body, "request", "evil.example", 443)["now"], "allow", "what the policy says now");
    assert_eq!(group(&body, "request", "m.evil.example", 8443)["now"], "deny");

    assert_eq!(decisions(admin, "ghost", VIEWER).await.0, 404);
}

#[tokio::test]
async fn report_mode_keeps_its_would_be_refusals() {
    let (_origin, gw) = setup().await;
    let answer = connect_as(gw.addr(), "rep", "x", "evil.example:443").await;
    assert_eq!((answer.status, answer.decision(), answer.reason()), (200, "report", "not_whitelisted"));
    let (_, body) = decisions(gw.admin(), "rep", VIEWER).await;
    let evil = group(&body, "request", "evil.example", 443);
    assert_eq!((evil["decision"].as_str(), evil["count"].as_u64()), (Some("report"), Some(1)));
    assert_eq!(evil["entry"], "https://evil.example");
}

/// A server-sent event stream read off a raw connection.
struct EventStream {
    stream: TcpStream,
    text: String,
    read_up_to: usize,
}

impl EventStream {
    /// `GET /v1/events{query}`: the status, headers, and the stream when it is one.
    async fn open(admin: SocketAddr, query: &str, token: Option<&str>) -> (u16, HashMap<String, String>, EventStream) {
        let mut stream = TcpStream::connect(admin).await.unwrap();
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let request = format!(
            "GET /v1/events{query} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n{auth}Accept: text/event-stream\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let (head, rest) = tokio::time::timeout(WAIT, read_head(&mut stream)).await.unwrap().unwrap().unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let headers = head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let text = String::from_utf8_lossy(&rest).into_owned();
        (status, headers, EventStream { stream, text, read_up_to: 0 })
    }

    /// Read more; false at the end of the connection.
    async fn read_more(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await.expect("the stream went quiet").unwrap();
        self.text.push_str(&String::from_utf8_lossy(&chunk[..n]));
        n > 0
    }

    /// The data of the next `kind` event. (Each event is written in one chunk, so its text
    /// is whole between the chunk framing.)
    async fn next(&mut self, kind: &str) -> Value {
        let marker = format!("event: {kind}\ndata: ");
        loop {
            if let Some(at) = self.text[self.read_up_to..].find(&marker) {
                let start = self.read_up_to + at + marker.len();
                if let Some(len) = self.text[start..].find('\n') {
                    self.read_up_to = start + len;
                    return serde_json::from_str(&self.text[start..start + len]).unwrap();
                }
            }
            assert!(self.read_more().await, "the stream ended before a {kind} event: {}", self.text);
        }
    }

    /// Read to the end of the response: the last chunk, then the close.
    async fn ends(&mut self) {
        while self.read_more().await {}
        assert!(self.text.ends_with("0\r\n\r\n"), "the stream did not end its response: {:?}", self.text);
    }
}

#[tokio::test]
async fn the_event_stream_carries_the_decisions_and_changes_of_the_app_asked_for() {
    let (_origin, gw) = setup().await;
    let (proxy, admin) = (gw.addr(), gw.admin());
    let (status, headers, mut shop) = EventStream::open(admin, "?app=shop", Some(VIEWER)).await;
    assert_eq!((status, headers["content-type"].as_str()), (200, "text/event-stream"));
    let (status, _, mut all) = EventStream::open(admin, "", Some(VIEWER)).await;
    assert_eq!(status, 200);

    assert_eq!(connect_as(proxy, "other", "x", "other.example:443").await.reason(), "not_whitelisted");
    assert_eq!(connect_as(proxy, "shop", "x", "evil.example:443").await.reason(), "not_whitelisted");
    let event = shop.next("decision").await;
    assert_eq!((event["app"].as_str(), event["host"].as_str()), (Some("shop"), Some("evil.example")), "filtered");
    assert_eq!((event["reason"].as_str(), event["decision"].as_str()), (Some("not_whitelisted"), Some("deny")));
    assert_eq!((event["channel"].as_str(), event["port"].as_u64()), (Some("request"), Some(443)));
    assert_eq!(all.next("decision").await["app"], "other", "unfiltered: every app, in order");
    assert_eq!(all.next("decision").await["app"], "shop");

    let add = json!({ "entry": "https://evil.example", "remark": "seen refused" }).to_string();
    let (status, _) = admin_json(admin, "POST", "/v1/apps/shop/server_domains", Some(&add), Some(EDITOR)).await;
    assert_eq!(status, 201);
    // the write's reload (which concerns every app), then the change it made
    let reload = shop.next("reload").await;
    let change = shop.next("change").await;
    assert_eq!((change["app"].as_str(), change["change"].as_str()), (Some("shop"), Some("add")));
    assert_eq!((change["user"].as_str(), change["revision"].as_u64()), (Some("ed"), Some(2)));
    assert_eq!(reload["generation"], change["generation"]);
}

#[tokio::test]
async fn event_streams_are_bounded_and_end_when_the_gateway_shuts_down() {
    let (_origin, mut gw) = setup().await;
    let admin = gw.admin();
    let mut streams = Vec::new();
    for _ in 0..16 {
        let (status, _, stream) = EventStream::open(admin, "", Some(VIEWER)).await;
        assert_eq!(status, 200);
        streams.push(stream);
    }
    let (status, headers, _) = EventStream::open(admin, "", Some(VIEWER)).await;
    assert_eq!((status, headers.get("retry-after").map(String::as_str)), (503, Some("5")), "the 17th stream");
    // the rest of the admin listener still answers
    assert_eq!(admin_json(admin, "GET", "/v1/apps", None, Some(VIEWER)).await.0, 200);
    let closed = streams.pop().unwrap();
    drop(closed);
    let reopened = loop {
        // a slot comes back once its stream's reader notices the close
        let (status, _, stream) = EventStream::open(admin, "", Some(VIEWER)).await;
        if status == 200 {
            break stream;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    streams.push(reopened);

    let stopped = gw.shutdown();
    for stream in &mut streams {
        stream.ends().await;
    }
    tokio::time::timeout(WAIT, stopped).await.unwrap().unwrap();
}

#[tokio::test]
async fn decisions_events_and_me_need_a_viewer_and_allowing_needs_an_editor() {
    let (_origin, gw) = setup().await;
    let admin = gw.admin();
    for path in ["/v1/apps/shop/decisions", "/v1/me"] {
        assert_eq!(admin_request(admin, "GET", path, None, None).await.0, 401, "{path}");
        assert_eq!(admin_request(admin, "GET", path, None, Some("guess")).await.0, 401, "{path}");
        assert_eq!(admin_request(admin, "GET", path, None, Some(VIEWER)).await.0, 200, "{path}");
    }
    assert_eq!(EventStream::open(admin, "?app=shop", None).await.0, 401);
    assert_eq!(EventStream::open(admin, "?app=shop", Some("guess")).await.0, 401);
    let (_, me) = admin_json(admin, "GET", "/v1/me", None, Some(VIEWER)).await;
    assert_eq!(me, json!({"user": "vera", "role": "viewer", "auth": true}));
    let (_, me) = admin_json(admin, "GET", "/v1/me", None, Some(EDITOR)).await;
    assert_eq!(me["role"], "editor");
    let add = r#"{"entry":"https://evil.example"}"#;
    let (status, body) = admin_json(admin, "POST", "/v1/apps/shop/server_domains", Some(add), Some(VIEWER)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("user vera (viewer) may not do this: it needs the editor role"))
    );
    assert_eq!(
        admin_json(admin, "POST", "/v1/apps/shop/rollback", Some(r#"{"revision":1}"#), Some(EDITOR)).await.0,
        403
    );

    // with no admin user at all the API is open, and says so
    let open = TestGateway::start("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n").await;
    let (status, me) = admin_json(open.admin(), "GET", "/v1/me", None, None).await;
    assert_eq!((status, me), (200, json!({"user": null, "role": "admin", "auth": false})));
}

#[tokio::test]
async fn the_console_is_served_with_a_strict_content_security_policy() {
    let (_origin, gw) = setup().await;
    let admin = gw.admin();
    let (status, headers, _) = admin_request(admin, "GET", "/", None, None).await;
    assert_eq!((status, headers["location"].as_str()), (302, "/console/"));
    let files = [
        ("/console/", "text/html; charset=utf-8"),
        ("/console/console.js", "text/javascript; charset=utf-8"),
        ("/console/api.js", "text/javascript; charset=utf-8"),
        ("/console/console.css", "text/css; charset=utf-8"),
        ("/console/icon.svg", "image/svg+xml"),
    ];
    for (path, content_type) in files {
        // no token needed for the files themselves: they hold no data
        let (status, headers, body) = admin_request(admin, "GET", path, None, None).await;
        assert_eq!((status, headers["content-type"].as_str()), (200, content_type), "{path}");
        assert!(!body.is_empty());
        let csp = &headers["content-security-policy"];
        for directive in ["default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
    }
    // the page needs no inline script, style or handler, which the policy would block
    let (_, _, page) = admin_request(admin, "GET", "/console/", None, None).await;
    let page = String::from_utf8(page).unwrap();
    assert!(page.contains(r#"<script type="module" src="/console/console.js"></script>"#));
    assert_eq!(page.matches("<script").count(), 1, "one script, by src");
    assert!(!page.contains("<style") && !page.contains(" style="), "no inline style");
    let handlers = page.match_indices(" on").filter(|(at, _)| {
        let name: String = page[at + 3..].chars().take_while(char::is_ascii_lowercase).collect();
        !name.is_empty() && page[at + 3 + name.len()..].starts_with('=')
    });
    assert_eq!(handlers.count(), 0, "no inline event handler");
    // every asset is in the binary: nothing loads from elsewhere
    for (path, _) in files {
        let (_, _, body) = admin_request(admin, "GET", path, None, None).await;
        let text = String::from_utf8(body).unwrap();
        for outside in ["src=\"http", "href=\"http", "url(", "@import", "from \"http", "fetch(\"http", "//cdn"] {
            assert!(!text.contains(outside), "{path} loads something from elsewhere: {outside}");
        }
    }
    let (status, headers, _) = admin_request(admin, "GET", "/console/nothing.js", None, None).await;
    assert_eq!((status, headers["x-content-type-options"].as_str()), (404, "nosniff"));
    // the API's answers carry the headers too
    let (_, headers, _) = admin_request(admin, "GET", "/v1/me", None, Some(VIEWER)).await;
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(headers["content-security-policy"].contains("frame-ancestors 'none'"));
}
