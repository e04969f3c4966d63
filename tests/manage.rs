//! Managing apps through the admin API, as a script or a console does: create, replace and
//! delete with preconditions, one entry at a time, validation errors as field paths, dry
//! runs, roles, and a proxy that enforces a write as soon as it is answered.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::*;
use serde_json::{Value, json};

const EDITOR: &str = "editor-token";
const VIEWER: &str = "viewer-token";

/// A gateway with `apps_dir`, app `shop` in it, app `main` in the main file, an editor and a
/// viewer.
async fn setup() -> (Origin, TestGateway) {
    let origin = Origin::start(&["api.shop.example", "new.shop.example"]).await;
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
admin_token = "root-token"

[policy]
apps_dir = "apps"

[resolve]
"api.shop.example" = "{o}"
"new.shop.example" = "{o}"

[[app]]
id = "main"

{users}"#,
        o = origin.addr,
        users = admin_user("ed", "editor", EDITOR) + &admin_user("vera", "viewer", VIEWER),
    );
    let shop = "[[app]]\nid = \"shop\"\nserver_domains = [\"api.shop.example\"]\n";
    let gw = TestGateway::start_with_apps(&text, &[("shop.toml", shop)]).await;
    (origin, gw)
}

/// One admin request with extra headers: (status, headers, JSON body or null).
async fn call(
    admin: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
    token: &str,
) -> (u16, HashMap<String, String>, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let answer = send_raw(admin, &request).await;
    let json = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    (answer.status, answer.headers, json)
}

#[tokio::test]
async fn create_replace_and_delete_with_each_precondition() {
    let (_origin, gw) = setup().await;
    let admin = gw.admin();
    let app = json!({"name": "New", "server_domains": [{"domain": "new.shop.example", "remark": "launch"}]});
    let (status, _, body) = call(admin, "PUT", "/v1/apps/fresh", &[], Some(app.clone()), EDITOR).await;
    assert_eq!(status, 428, "{body}");
    let create = [("If-None-Match", "*")];
    let (status, headers, body) = call(admin, "PUT", "/v1/apps/fresh", &create, Some(app.clone()), EDITOR).await;
    assert_eq!((status, headers["etag"].as_str(), body["revision"].as_u64()), (201, "\"1\"", Some(1)), "{body}");
    // in force before the answer: the proxy already lets it through
    assert_eq!(connect_as(gw.addr(), "fresh", "x", "new.shop.example:443").await.reason(), "whitelisted");
    assert_eq!(body["generation"].as_u64(), Some(2));
    let (status, _, body) = call(admin, "PUT", "/v1/apps/fresh", &create, Some(app.clone()), EDITOR).await;
    assert_eq!((status, body["revision"].as_u64()), (412, Some(1)));

    let (status, headers, body) = call(admin, "GET", "/v1/apps/fresh", &[], None, VIEWER).await;
    assert_eq!((status, headers["etag"].as_str()), (200, "\"1\""));
    assert_eq!(body["server_domains"][0]["remark"], "launch");
    let replaced = json!({"server_domains": ["api.shop.example"], "action": "report"});
    let (status, _, body) = call(admin, "PUT", "/v1/apps/fresh", &[], Some(replaced.clone()), EDITOR).await;
    assert_eq!(status, 428, "{body}");
    let (status, _, body) =
        call(admin, "PUT", "/v1/apps/fresh", &[("If-Match", "\"1\"")], Some(replaced.clone()), EDITOR).await;
    assert_eq!((status, body["revision"].as_u64()), (200, Some(2)), "{body}");
    let (status, headers, body) =
        call(admin, "PUT", "/v1/apps/fresh", &[("If-Match", "\"1\"")], Some(replaced), EDITOR).await;
    assert_eq!((status, body["revision"].as_u64(), headers["etag"].as_str()), (412, Some(2), "\"2\""));

    let (status, _, _) = call(admin, "DELETE", "/v1/apps/fresh", &[], None, EDITOR).await;
    assert_eq!(status, 428);
    let (status, headers, _) = call(admin, "DELETE", "/v1/apps/fresh", &[("If-Match", "\"2\"")], None, EDITOR).await;
    assert_eq!(status, 204);
    assert!(headers.contains_key("x-gateway-generation"));
    assert_eq!(connect_as(gw.addr(), "fresh", "x", "api.shop.example:443").await.reason(), "unknown_app");
    assert!(!gw.dir.path().join("apps/fresh.toml").exists());
}

#[tokio::test]
async fn one_entry_at_a_time() {
    let (_origin, gw) = setup().await;
    let admin = gw.admin();
    let add = json!({"entry": "new.shop.example", "remark": "launch"});
    let (status, _, body) = call(admin, "POST", "/v1/apps/shop/server_domains", &[], Some(add.clone()), EDITOR).await;
    assert_eq!((status, body["revision"].as_u64()), (201, Some(2)), "{body}");
    assert_eq!(connect_as(gw.addr(), "shop", "x", "new.shop.example:443").await.reason(), "whitelisted");
    let (status, _, _) = call(admin, "POST", "/v1/apps/shop/server_domains", &[], Some(add), EDITOR).await;
    assert_eq!(status, 409);
    let edit = json!({"remark": "launched"});
    let path = "/v1/apps/shop/server_domains/new.shop.example";
    let (status, _, body) = call(admin, "PUT", path, &[], Some(edit.clone()), EDITOR).await;
    assert_eq!((status, body["server_domains"][1]["remark"].as_str()), (200, Some("launched")), "{body}");
    // an edit made against an older revision does not silently overwrite a newer one
    let (status, _, _) = call(admin, "PUT", path, &[("If-Match", "\"2\"")], Some(edit), EDITOR).await;
    assert_eq!(status, 412);
    let (status, _, _) = call(admin, "DELETE", path, &[], None, EDITOR).await;
    assert_eq!(status, 204);
    let (status, _, _) = call(admin, "DELETE", path, &[], None, EDITOR).await;
    assert_eq!(status, 404, "someone else's delete is not repeated");
    assert_eq!(connect_as(gw.addr(), "shop", "x", "new.shop.example:443").await.reason(), "not_whitelisted");
    // an entry written as a URL is addressed percent-encoded
    let url = json!({"entry": "https://img.shop.example:8443"});
    assert_eq!(call(admin, "POST", "/v1/apps/shop/server_domains", &[], Some(url), EDITOR).await.0, 201);
    let encoded = "/v1/apps/shop/server_domains/https%3A%2F%2Fimg.shop.example%3A8443";
    assert_eq!(call(admin, "DELETE", encoded, &[], None, EDITOR).await.0, 204);
    // API entries take remarks too, edited like any other entry's
    let api = json!({"entry": "shop.pay", "remark": "payments"});
    assert_eq!(call(admin, "POST", "/v1/apps/shop/api_whitelist", &[], Some(api), EDITOR).await.0, 201);
    let remark = json!({"remark": "payment sheet"});
    assert_eq!(call(admin, "PUT", "/v1/apps/shop/api_whitelist/shop.pay", &[], Some(remark), EDITOR).await.0, 200);
    let (status, _, body) =
        call(admin, "PUT", "/v1/apps/shop/action", &[], Some(json!({"action": "open"})), EDITOR).await;
    assert_eq!(
        (status, body["action"].as_str(), &body["api_whitelist"]),
        (200, Some("open"), &json!([{"api": "shop.pay", "remark": "payment sheet"}]))
    );
    assert_eq!(connect_as(gw.addr(), "shop", "x", "new.shop.example:443").await.reason(), "open");
}

#[tokio::test]
async fn every_validation_error_as_a_field_path_and_a_dry_run_changes_nothing() {
    let (_origin, gw) = setup().await;
    let admin = gw.admin();
    let bad = json!({
        "server_domains": ["api.shop.example", "http://x.example", {"domain": "y.example", "remark": "r".repeat(201)}],
        "webview_domains": ["*"],
        "api_whitelist": ["shop.pay", {"api": "shop.share", "remark": "s".repeat(201)}, "shop pay"]
    });
    // shop.toml was written by hand: its tag is its revision and a hash of its content
    let (_, headers, _) = call(admin, "GET", "/v1/apps/shop", &[], None, VIEWER).await;
    let tag = headers["etag"].clone();
    let (status, _, body) = call(admin, "PUT", "/v1/apps/shop", &[("If-Match", tag.as_str())], Some(bad), EDITOR).await;
    assert_eq!(status, 422, "{body}");
    let errors: Vec<(String, String)> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["path"].as_str().unwrap().to_owned(), e["message"].as_str().unwrap().to_owned()))
        .collect();
    let paths: Vec<&str> = errors.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "server_domains[1].domain",
            "server_domains[2].remark",
            "webview_domains[0].domain",
            "api_whitelist[1].remark",
            "api_whitelist[2].api"
        ]
    );
    assert!(errors[0].1.contains("only https:// and wss:// entries are allowed"), "{errors:?}");

    let before = std::fs::read(gw.dir.path().join("apps/shop.toml")).unwrap();
    let add = json!({"entry": "new.shop.example"});
    let (status, _, body) =
        call(admin, "POST", "/v1/apps/shop/server_domains?dry_run=true", &[], Some(add), EDITOR).await;
    assert_eq!((status, body["dry_run"].as_bool(), body["app"]["revision"].as_u64()), (200, Some(true), Some(2)));
    assert_eq!(std::fs::read(gw.dir.path().join("apps/shop.toml")).unwrap(), before);
    assert_eq!(connect_as(gw.addr(), "shop", "x", "new.shop.example:443").await.reason(), "not_whitelisted");
    assert_eq!(gw.metric("gateway_config_generation").await, 1.0);
}

#[tokio::test]
async fn concurrent_adds_all_land_exactly_once() {
    let (_origin, gw) = setup().await;
    let admin = gw.admin();
    let adds = (0..16).map(|i| {
        tokio::spawn(async move {
            let add = json!({"entry": format!("h{i}.shop.example")});
            call(admin, "POST", "/v1/apps/shop/server_domains", &[], Some(add), EDITOR).await.0
        })
    });
    for add in adds.collect::<Vec<_>>() {
        assert_eq!(add.await.unwrap(), 201);
    }
    let (_, _, body) = call(admin, "GET", "/v1/apps/shop", &[], None, VIEWER).await;
    let mut domains: Vec<&str> =
        body["server_domains"].as_array().unwrap().iter().map(|e| e["domain"].as_str().unwrap()).collect();
    domains.sort();
    let mut expected: Vec<String> = (0..16).map(|i| format!("h{i}.shop.example")).collect();
    expected.push("api.shop.example".to_owned());
    expected.sort();
    assert_eq!(domains, expected);
    assert_eq!(body["revision"].as_u64(), Some(17));
}

#[tokio::test]
async fn apps_of_the_main_file_are_read_only_and_viewers_cannot_write() {
    let (_origin, gw) = setup().await;
    let admin = gw.admin();
    let add = json!({"entry": "new.shop.example"});
    let (status, _, body) = call(admin, "POST", "/v1/apps/main/server_domains", &[], Some(add.clone()), EDITOR).await;
    assert_eq!(status, 409);
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("gateway.toml") && message.contains("apps_dir/main.toml"), "{message}");
    let (status, _, body) = call(admin, "POST", "/v1/apps/shop/server_domains", &[], Some(add), VIEWER).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(call(admin, "GET", "/v1/apps/shop", &[], None, VIEWER).await.0, 200);
}

#[tokio::test]
async fn the_app_list_is_searched_and_paged() {
    let (_origin, gw) = setup().await;
    let admin = gw.admin();
    for i in 0..5 {
        let app = json!({"name": format!("Store {i}")});
        let create = [("If-None-Match", "*")];
        assert_eq!(call(admin, "PUT", &format!("/v1/apps/s{i}"), &create, Some(app), EDITOR).await.0, 201);
    }
    let (_, _, page) = call(admin, "GET", "/v1/apps?q=STORE&limit=2", &[], None, VIEWER).await;
    let ids = |page: &Value| -> Vec<String> {
        page["apps"].as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!((ids(&page), page["next"].as_str()), (vec!["s0".to_owned(), "s1".to_owned()], Some("s1")));
    let (_, _, page) = call(admin, "GET", "/v1/apps?q=store&limit=2&after=s3", &[], None, VIEWER).await;
    assert_eq!((ids(&page), page["next"].as_str()), (vec!["s4".to_owned()], None));
    let (_, _, page) = call(admin, "GET", "/v1/apps?q=hop", &[], None, VIEWER).await;
    assert_eq!(ids(&page), ["shop"]);
}

#[tokio::test]
async fn history_lists_every_change_and_rollback_restores_one() {
    let (_origin, gw) = setup().await;
    let admin = gw.admin();
    let add = json!({"entry": "new.shop.example", "remark": "launch"});
    assert_eq!(call(admin, "POST", "/v1/apps/shop/server_domains", &[], Some(add), EDITOR).await.0, 201);
    let action = json!({"action": "report"});
    assert_eq!(call(admin, "PUT", "/v1/apps/shop/action", &[], Some(action.clone()), EDITOR).await.0, 200);
    // refused and dry-run writes are audited, but are no revisions
    assert_eq!(call(admin, "PUT", "/v1/apps/shop/action", &[("If-Match", "\"1\"")], Some(action), EDITOR).await.0, 412);

    let (status, _, body) = call(admin, "GET", "/v1/apps/shop/history", &[], None, VIEWER).await;
    assert_eq!(status, 200);
    let revisions = body["revisions"].as_array().unwrap();
    let summary: Vec<(u64, &str, &str)> = revisions
        .iter()
        .map(|r| (r["revision"].as_u64().unwrap(), r["change"].as_str().unwrap(), r["user"].as_str().unwrap()))
        .collect();
    // shop.toml was written by hand: its first revision is a change by `file`
    assert_eq!(summary, [(3, "action", "ed"), (2, "add", "ed"), (1, "create", "file")]);
    assert_eq!(revisions[1]["before"]["server_domains"].as_array().unwrap().len(), 1);
    assert_eq!(revisions[1]["after"]["server_domains"][1]["remark"], "launch");

    // back to revision 2 (before the switch): an editor may not, an admin may
    let back = json!({"revision": 2});
    assert_eq!(call(admin, "POST", "/v1/apps/shop/rollback", &[], Some(back.clone()), EDITOR).await.0, 403);
    let (status, _, body) = call(admin, "POST", "/v1/apps/shop/rollback", &[], Some(back), "root-token").await;
    assert_eq!((status, body["revision"].as_u64(), body["action"].as_str()), (200, Some(4), None), "{body}");
    assert_eq!(connect_as(gw.addr(), "shop", "x", "new.shop.example:443").await.reason(), "whitelisted");
    let (_, _, body) = call(admin, "GET", "/v1/apps/shop/history", &[], None, VIEWER).await;
    assert_eq!(body["revisions"][0]["change"], "rollback");
    assert_eq!(body["revisions"][0]["user"], "admin");
    assert_eq!(gw.metric(r#"gateway_app_changes_total{action="rollback"}"#).await, 1.0);
    let missing = json!({"revision": 99});
    assert_eq!(call(admin, "POST", "/v1/apps/shop/rollback", &[], Some(missing), "root-token").await.0, 404);

    let audit = std::fs::read_to_string(gw.dir.path().join("apps.audit.jsonl")).unwrap();
    let outcomes: Vec<String> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["outcome"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(outcomes, ["applied", "applied", "applied", "precondition_failed", "applied"]);
    let with_token = json!({"token": "sekret-password", "server_domains": ["api.shop.example"]});
    let create = [("If-None-Match", "*")];
    let (status, _, body) = call(admin, "PUT", "/v1/apps/locked", &create, Some(with_token), EDITOR).await;
    assert_eq!((status, body["has_token"].as_bool()), (201, Some(true)));
    assert!(body.get("token").is_none(), "a token is never shown");
    assert_eq!(connect_as(gw.addr(), "locked", "wrong", "api.shop.example:443").await.reason(), "bad_credentials");
    let audit = std::fs::read_to_string(gw.dir.path().join("apps.audit.jsonl")).unwrap();
    assert!(!audit.contains("sekret-password"), "no token is ever recorded");
}

#[tokio::test]
async fn a_draft_app_is_checked_without_being_saved() {
    let (_origin, gw) = setup().await;
    let admin = gw.admin();
    let draft = json!({"app": {"id": "draft", "webview_domains": ["*.shop.example"]}, "channel": "webview", "url": "https://m.shop.example/"});
    let (status, _, body) = call(admin, "POST", "/v1/check", &[], Some(draft), VIEWER).await;
    assert_eq!(
        (status, body["decision"].as_str(), body["rule"].as_str()),
        (200, Some("allow"), Some("webview_domains[0]")),
        "{body}"
    );
    let bad = json!({"app": {"id": "draft", "server_domains": ["http://x.example"]}, "url": "https://x.example/"});
    let (status, _, body) = call(admin, "POST", "/v1/check", &[], Some(bad), VIEWER).await;
    assert_eq!((status, body["errors"][0]["path"].as_str()), (422, Some("server_domains[0].domain")), "{body}");
    assert!(!gw.dir.path().join("apps/draft.toml").exists());
    assert_eq!(call(admin, "GET", "/v1/apps/draft", &[], None, VIEWER).await.0, 404);
}

#[tokio::test]
async fn revisions_are_never_reused_and_tokens_never_restored_from_records() {
    let (_origin, gw) = setup().await;
    let admin = gw.admin();
    let create = [("If-None-Match", "*")];
    let locked = json!({"token": "pw", "server_domains": ["api.shop.example"]});
    assert_eq!(call(admin, "PUT", "/v1/apps/y", &create, Some(locked), EDITOR).await.0, 201);
    assert_eq!(call(admin, "DELETE", "/v1/apps/y", &[("If-Match", "\"1\"")], None, EDITOR).await.0, 204);
    // restoring revision 1 would bring the app back without its token: refused
    let (status, _, body) =
        call(admin, "POST", "/v1/apps/y/rollback", &[], Some(json!({"revision": 1})), "root-token").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(connect_as(gw.addr(), "y", "anything", "api.shop.example:443").await.reason(), "unknown_app");
    // created again, it does not start over at revision 1
    let (status, headers, _) = call(admin, "PUT", "/v1/apps/y", &create, Some(json!({"token": "pw2"})), EDITOR).await;
    assert_eq!((status, headers["etag"].as_str()), (201, "\"3\""));
    // what a GET shows can be written back as it is
    let (_, _, shown) = call(admin, "GET", "/v1/apps/y", &[], None, VIEWER).await;
    let (status, _, body) = call(admin, "PUT", "/v1/apps/y", &[("If-Match", "\"3\"")], Some(shown), EDITOR).await;
    assert_eq!((status, body["has_token"].as_bool()), (200, Some(true)), "{body}");
    // a dry run is asked for exactly
    let add = json!({"entry": "new.shop.example"});
    assert_eq!(call(admin, "POST", "/v1/apps/y/server_domains?dry_run=1", &[], Some(add), EDITOR).await.0, 400);
    assert_eq!(connect_as(gw.addr(), "y", "pw2", "new.shop.example:443").await.reason(), "not_whitelisted");
}

#[tokio::test]
async fn edits_by_hand_show_up_in_the_history_as_changes_by_file() {
    let (_origin, gw) = setup().await;
    let admin = gw.admin();
    let add = json!({"entry": "new.shop.example"});
    assert_eq!(call(admin, "POST", "/v1/apps/shop/server_domains", &[], Some(add), EDITOR).await.0, 201);
    // an operator edits the file by hand: a remark on the new entry
    let file = gw.dir.path().join("apps/shop.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace("\"new.shop.example\",", "{ domain = \"new.shop.example\", remark = \"by hand\" },"),
    )
    .unwrap();
    let (_, headers, body) = call(admin, "GET", "/v1/apps/shop", &[], None, VIEWER).await;
    assert_eq!(body["revision"], 3, "a hand edit is the next revision");
    let first_edit = headers["etag"].clone();
    assert!(first_edit.starts_with("\"3-"), "and its tag names its content: {first_edit}");
    // a second hand edit has the same revision number (neither is recorded yet) but not the
    // same tag: a write made against the first is refused
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("remark = \"by hand\"", "remark = \"by hand, twice\"")).unwrap();
    let (_, headers, body) = call(admin, "GET", "/v1/apps/shop", &[], None, VIEWER).await;
    let second_edit = headers["etag"].clone();
    assert_eq!((body["revision"].as_u64(), second_edit != first_edit), (Some(3), true), "{second_edit}");
    let stale = json!({"action": "open"});
    let (status, headers, _) =
        call(admin, "PUT", "/v1/apps/shop/action", &[("If-Match", first_edit.as_str())], Some(stale), EDITOR).await;
    assert_eq!((status, &headers["etag"]), (412, &second_edit));
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("remark = \"by hand, twice\"", "remark = \"by hand\"")).unwrap();
    let (_, _, body) = call(admin, "GET", "/v1/apps/shop/history", &[], None, VIEWER).await;
    let newest = &body["revisions"][0];
    assert_eq!(
        (newest["revision"].as_u64(), newest["user"].as_str(), newest["change"].as_str()),
        (Some(3), Some("file"), Some("edit"))
    );
    assert_eq!(newest["after"]["server_domains"][1]["remark"], "by hand");
    // the next API write records it for good, then itself
    let action = json!({"action": "report"});
    let (_, headers, _) = call(admin, "GET", "/v1/apps/shop", &[], None, VIEWER).await;
    let tag = headers["etag"].clone();
    assert_eq!(tag, first_edit, "the same content, the same tag");
    assert_eq!(
        call(admin, "PUT", "/v1/apps/shop/action", &[("If-Match", tag.as_str())], Some(action), EDITOR).await.0,
        200
    );
    let (_, _, body) = call(admin, "GET", "/v1/apps/shop/history", &[], None, VIEWER).await;
    let users: Vec<(u64, &str)> = body["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["revision"].as_u64().unwrap(), r["user"].as_str().unwrap()))
        .collect();
    assert_eq!(users, [(4, "ed"), (3, "file"), (2, "ed"), (1, "file")]);
}

#[tokio::test]
async fn a_start_removes_what_a_writer_killed_before_its_rename_left() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("apps")).unwrap();
    std::fs::write(dir.path().join("apps/shop.toml"), "[[app]]\nid = \"shop\"\n").unwrap();
    // A temporary file as a writer killed between writing and renaming it leaves one, from
    // before the start, and one being written right now by a live writer.
    let stale = dir.path().join("apps/.shop.toml.00112233aabbccdd.tmp");
    std::fs::write(&stale, "[[app]]\nid = \"shop\"\nserver_domains = [\"half").unwrap();
    let ten_minutes_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(600);
    std::fs::File::options().write(true).open(&stale).unwrap().set_modified(ten_minutes_ago).unwrap();
    let live = dir.path().join("apps/.shop.toml.8899aabbccddeeff.tmp");
    std::fs::write(&live, "[[app]]\n").unwrap();
    let path = dir.path().join("gateway.toml");
    let config =
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n[policy]\napps_dir = \"apps\"\n";
    std::fs::write(&path, config).unwrap();
    let gw = TestGateway::start_at(dir, path).await;
    assert!(!stale.exists(), "the stale temporary file is removed at start");
    assert!(live.exists(), "a live writer's is left alone");
    assert_eq!(gw.metric("gateway_apps_loaded").await, 1.0);
}

#[tokio::test]
async fn an_api_write_is_one_generation_not_one_more_when_the_watcher_sees_its_file() {
    let (_origin, gw) = setup().await;
    let admin = gw.admin();
    let add = json!({"entry": "new.shop.example"});
    let (status, _, body) = call(admin, "POST", "/v1/apps/shop/server_domains", &[], Some(add), EDITOR).await;
    assert_eq!(status, 201, "{body}");
    let generation = body["generation"].as_f64().unwrap();
    // The watcher sees the file the write replaced (its events come within ~200 ms); the
    // change is already in force, so it makes no generation of its own.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    assert_eq!(gw.metric("gateway_config_generation").await, generation);
    // while a hand edit still reloads
    let file = gw.dir.path().join("apps/shop.toml");
    let text = std::fs::read_to_string(&file).unwrap().replace("new.shop.example", "newer.shop.example");
    std::fs::write(&file, text).unwrap();
    assert_eq!(gw.wait_metric("gateway_config_generation", generation + 1.0).await, generation + 1.0);
}
