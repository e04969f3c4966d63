//! Scope authorization through the real admin listener, as a miniapp container and a test
//! rig use it: the platforms' documented cases, the prompters (a real webhook on port 0
//! included), auth codes, and consent that outlives reloads and restarts but not its app.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const EDITOR: &str = "editor-token";
/// A miniapp container's user: a viewer bound to the test's apps (all but `other`).
const VIEWER: &str = "viewer-token";
/// A viewer bound to no app: it reads, and records no consent.
const MONITOR: &str = "monitor-token";

const USERS: &str = r#"
[[user]]
id = "alice"
nickname = "Al"
name = "Alice Liddell"
login_id = "alice@example.com"
avatar = "https://img.example/alice.png"
gender = "F"

[[user]]
id = "bob"
nickname = "Bobby"

[[user]]
id = "2088000000000001"
nickname = "Ada"
"#;

const APPS: &[(&str, &str)] = &[
    (
        "wx.toml",
        "[[app]]\nid = \"wx\"\nname = \"WeShop\"\nplatform = \"wechat\"\napi_whitelist = [\"getLocation\", \"getUserInfo\", \"login\"]\n",
    ),
    (
        "sa.toml",
        "[[app]]\nid = \"sa\"\nplatform = \"superapp\"\nsecret = \"sa-secret\"\napi_whitelist = [\"scan\", \"getLocation\"]\n",
    ),
    ("other.toml", "[[app]]\nid = \"other\"\nplatform = \"superapp\"\nsecret = \"other-secret\"\n"),
    ("mp.toml", "[[app]]\nid = \"mp\"\naction = \"open\"\napi_whitelist = [\"scan\"]\n"),
    ("rep.toml", "[[app]]\nid = \"rep\"\naction = \"report\"\napi_whitelist = [\"scan\"]\n"),
    ("cam.toml", "[[app]]\nid = \"cam\"\nname = \"Cam Shop\"\napi_whitelist = [\"scan\", \"chooseImage\"]\n"),
];

/// A gateway with the apps above, an editor and a viewer, and `[scopes]` as `scopes` says.
async fn gateway(scopes: &str) -> TestGateway {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[policy]
apps_dir = "apps"

[scopes]
users = "users.toml"
{scopes}

[[scopes.scope]]
platform = "mpaas"
scope = "camera"
title = "Camera for {{app}}"
text = "{{app}} scans codes with your camera."

[[admin_user]]
name = "ed"
token_sha256 = "{editor}"
role = "editor"

[[admin_user]]
name = "rig"
token_sha256 = "{viewer}"
role = "viewer"
apps = ["wx", "sa", "mp", "rep", "cam", "ghost"]

[[admin_user]]
name = "mon"
token_sha256 = "{monitor}"
role = "viewer"
"#,
        editor = token_hash(EDITOR),
        viewer = token_hash(VIEWER),
        monitor = token_hash(MONITOR)
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("apps")).unwrap();
    for (name, app) in APPS {
        std::fs::write(dir.path().join("apps").join(name), app).unwrap();
    }
    std::fs::write(dir.path().join("users.toml"), USERS).unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    TestGateway::start_at(dir, path).await
}

async fn call(admin: SocketAddr, method: &str, path: &str, body: Option<Value>, token: &str) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, _, bytes) = admin_request(admin, method, path, body.as_deref(), Some(token)).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn decide(admin: SocketAddr, body: Value) -> Value {
    let (status, answer) = call(admin, "POST", "/v1/scopes/decide", Some(body), VIEWER).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

fn verdict(answer: &Value) -> (&str, &str, bool) {
    (answer["decision"].as_str().unwrap(), answer["reason"].as_str().unwrap(), answer["prompted"].as_bool().unwrap())
}

async fn setting(admin: SocketAddr, app: &str, user: &str, scope: &str) -> String {
    let (status, body) = call(admin, "GET", &format!("/v1/scopes/settings?app={app}&user={user}"), None, VIEWER).await;
    assert_eq!(status, 200, "{body}");
    body["scopes"][scope].as_str().unwrap().to_owned()
}

async fn pending(admin: SocketAddr) -> Vec<Value> {
    let (status, body) = call(admin, "GET", "/v1/scopes/prompts", None, VIEWER).await;
    assert_eq!(status, 200);
    body["prompts"].as_array().unwrap().clone()
}

/// Wait until a prompt is pending; the first one.
async fn wait_for_prompt(admin: SocketAddr) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(prompt) = pending(admin).await.into_iter().next() {
            return prompt;
        }
        assert!(tokio::time::Instant::now() < deadline, "no prompt appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn wechat_denial_sticks_until_open_setting_grants() {
    let gw = gateway("prompter = \"pending\"").await;
    let admin = gw.admin();
    let ask = json!({"app": "wx", "user": "alice", "api": "getLocation"});
    let waiting = tokio::spawn(decide(admin, ask.clone()));
    let prompt = wait_for_prompt(admin).await;
    assert_eq!((prompt["app"].as_str(), prompt["scope"].as_str()), (Some("wx"), Some("scope.userLocation")));
    assert!(prompt["text"].as_str().unwrap().contains("WeShop"), "{prompt}");
    let id = prompt["id"].as_str().unwrap();
    let (status, _) =
        call(admin, "POST", &format!("/v1/scopes/prompts/{id}"), Some(json!({"answer": "deny"})), EDITOR).await;
    assert_eq!(status, 200);
    let answer = waiting.await.unwrap();
    assert_eq!(verdict(&answer), ("deny", "scope_denied", true));
    assert_eq!(answer["guide"], "openSetting");

    // denied sticks: no prompt again, the call fails at once
    let again = decide(admin, ask.clone()).await;
    assert_eq!(verdict(&again), ("deny", "scope_denied", false));
    assert_eq!(again["guide"], "openSetting");
    assert!(pending(admin).await.is_empty());
    assert_eq!(setting(admin, "wx", "alice", "scope.userLocation").await, "denied");
    assert_eq!(setting(admin, "wx", "bob", "scope.userLocation").await, "not_asked", "consent is per user");

    // the settings page turns it on
    let change = json!({"app": "wx", "user": "alice", "scope": "scope.userLocation", "state": "granted"});
    let (status, _) = call(admin, "PUT", "/v1/scopes/settings", Some(change.clone()), VIEWER).await;
    assert_eq!(status, 403, "a viewer may not state the user's answer");
    let (status, settings) = call(admin, "PUT", "/v1/scopes/settings", Some(change), EDITOR).await;
    assert_eq!((status, settings["scopes"]["scope.userLocation"].as_str()), (200, Some("granted")));
    assert_eq!(verdict(&decide(admin, ask).await), ("allow", "scope_granted", false));

    let (_, history) = call(admin, "GET", "/v1/scopes/history?app=wx", None, VIEWER).await;
    let changes: Vec<(&str, &str, &str)> = history["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["after"].as_str().unwrap(), c["cause"].as_str().unwrap(), c["by"].as_str().unwrap()))
        .collect();
    assert_eq!(changes, [("granted", "setting", "ed"), ("denied", "prompt", "ed")]);
    let (_, app_history) = call(admin, "GET", "/v1/apps/wx/history", None, VIEWER).await;
    assert_eq!(app_history["consent_history"], "/v1/scopes/history?app=wx");
    let sample = r#"gateway_scope_decisions_total{app="wx",decision="deny",scope="scope.userLocation"}"#;
    assert_eq!(gw.metric(sample).await, 2.0);
    let sample = r#"gateway_scope_decisions_total{app="wx",decision="allow",scope="scope.userLocation"}"#;
    assert_eq!(gw.metric(sample).await, 1.0);
}

#[tokio::test]
async fn superapp_denial_fails_now_and_prompts_again() {
    let gw = gateway("prompter = \"deny\"").await;
    let admin = gw.admin();
    for _ in 0..2 {
        let answer = decide(admin, json!({"app": "sa", "user": "alice", "api": "scan"})).await;
        assert_eq!(verdict(&answer), ("deny", "scope_denied", true), "asked every time");
        assert_eq!(answer["guide"], Value::Null);
    }
    // the same prompter on WeChat asks once
    let first = decide(admin, json!({"app": "wx", "user": "alice", "api": "getLocation"})).await;
    let second = decide(admin, json!({"app": "wx", "user": "alice", "api": "getLocation"})).await;
    assert_eq!((verdict(&first).2, verdict(&second).2), (true, false));
    assert_eq!(setting(admin, "sa", "alice", "camera").await, "denied");
}

#[tokio::test]
async fn both_levels_are_needed() {
    let gw = gateway("prompter = \"allow\"").await;
    let admin = gw.admin();
    let ask = |system: &str| json!({"app": "sa", "user": "alice", "api": "scan", "system_permission": system});
    // the user consents, the host's system permission still refuses
    let answer = decide(admin, ask("denied")).await;
    assert_eq!(verdict(&answer), ("deny", "system_permission_denied", true));
    assert_eq!(setting(admin, "sa", "alice", "camera").await, "granted");
    assert_eq!(verdict(&decide(admin, ask("granted")).await), ("allow", "scope_granted", false));
    let forever = decide(admin, ask("denied_forever")).await;
    assert_eq!(verdict(&forever), ("deny", "system_permission_denied", false));
    assert_eq!(forever["guide"], "showAuthGuide");
    // "don't ask again" fails at once: the user is not asked at all
    let bob = json!({"app": "sa", "user": "bob", "api": "scan", "system_permission": "denied_forever"});
    let answer = decide(admin, bob).await;
    assert_eq!(
        (verdict(&answer), answer["guide"].as_str()),
        (("deny", "system_permission_denied", false), Some("showAuthGuide"))
    );
    assert_eq!(setting(admin, "sa", "bob", "camera").await, "not_asked");
}

#[tokio::test]
async fn auth_base_is_granted_without_a_prompt() {
    let gw = gateway("prompter = \"pending\"\nprompt_timeout = \"60s\"").await;
    let admin = gw.admin();
    let ask = json!({"app": "sa", "user": "bob", "scopes": ["auth_base"]});
    let (status, issued) = call(admin, "POST", "/v1/auth-codes", Some(ask), VIEWER).await;
    assert_eq!(
        (status, issued["decision"].as_str(), issued["prompted"].as_bool()),
        (200, Some("allow"), Some(false)),
        "{issued}"
    );
    assert!(pending(admin).await.is_empty());
    let exchange = json!({"app": "sa", "secret": "sa-secret", "code": issued["code"]});
    let (status, user) = call(admin, "POST", "/v1/auth-codes/exchange", Some(exchange), "none").await;
    assert_eq!((status, &user["fields"]), (200, &json!({"user_id": "bob"})), "{user}");
    assert_eq!(setting(admin, "sa", "bob", "auth_base").await, "granted");
    let change = json!({"app": "sa", "user": "bob", "scope": "auth_base", "state": "denied"});
    assert_eq!(call(admin, "PUT", "/v1/scopes/settings", Some(change), EDITOR).await.0, 422);
}

#[tokio::test]
async fn switch_off_needs_no_consent_and_report_only_records() {
    let gw = gateway("prompter = \"pending\"").await;
    let admin = gw.admin();
    let answer = decide(admin, json!({"app": "mp", "user": "alice", "api": "scan"})).await;
    assert_eq!(verdict(&answer), ("allow", "no_consent_needed", false));
    assert_eq!(answer["scope"], "camera");
    let off_list = decide(admin, json!({"app": "mp", "user": "alice", "api": "chooseImage"})).await;
    assert_eq!(verdict(&off_list), ("deny", "api_not_whitelisted", false), "the API whitelist still applies");
    let system = json!({"app": "mp", "user": "alice", "api": "scan", "system_permission": "denied"});
    assert_eq!(verdict(&decide(admin, system).await).1, "system_permission_denied", "the host's level stays");
    let report = decide(admin, json!({"app": "rep", "user": "alice", "api": "scan"})).await;
    assert_eq!(verdict(&report), ("report", "consent_required", false));
    assert!(pending(admin).await.is_empty(), "report asks nobody");
    assert_eq!(setting(admin, "rep", "alice", "camera").await, "not_asked");
    let sample = r#"gateway_scope_decisions_total{app="rep",decision="report",scope="camera"}"#;
    assert_eq!(gw.metric(sample).await, 1.0);
}

#[tokio::test]
async fn an_api_off_the_whitelist_is_refused_before_any_scope_question() {
    let gw = gateway("prompter = \"pending\"").await;
    let admin = gw.admin();
    let answer = decide(admin, json!({"app": "wx", "user": "alice", "api": "saveImageToPhotosAlbum"})).await;
    assert_eq!(verdict(&answer), ("deny", "api_not_whitelisted", false));
    assert!(pending(admin).await.is_empty(), "nobody was asked");
    assert_eq!(setting(admin, "wx", "alice", "scope.writePhotosAlbum").await, "not_asked");
    // an API that needs no scope goes by the whitelist alone
    let plain = decide(admin, json!({"app": "wx", "user": "alice", "api": "login"})).await;
    assert_eq!((verdict(&plain), &plain["scope"]), (("allow", "no_consent_needed", false), &Value::Null));
    let (status, _) =
        call(admin, "POST", "/v1/scopes/decide", Some(json!({"app": "ghost", "user": "a", "api": "x"})), VIEWER).await;
    assert_eq!(status, 404);
    let sample = r#"gateway_scope_decisions_total{app="wx",decision="deny",scope="scope.writePhotosAlbum"}"#;
    assert_eq!(gw.metric(sample).await, 1.0);
}

/// A host's dialog on port 0: answers by user (`yes` allows, `no` denies, anyone else is left
/// waiting), and keeps what it was sent.
async fn webhook() -> (SocketAddr, Arc<Mutex<Vec<Value>>>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let kept = kept.clone();
            tokio::spawn(async move {
                let Ok(Some((head, mut body))) = read_head(&mut stream).await else { return };
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                while body.len() < len {
                    let mut chunk = [0u8; 1024];
                    let n = stream.read(&mut chunk).await.unwrap();
                    body.extend_from_slice(&chunk[..n]);
                }
                let asked: Value = serde_json::from_slice(&body).unwrap();
                kept.lock().unwrap().push(asked.clone());
                let answer = match asked["user"].as_str() {
                    Some("yes") => "allow",
                    Some("no") => "deny",
                    _ => {
                        // the user never answers
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                };
                let body = json!({ "answer": answer }).to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    (addr, seen, task)
}

#[tokio::test]
async fn the_webhook_prompter_allows_denies_and_times_out() {
    let (hook, seen, _server) = webhook().await;
    let gw =
        gateway(&format!("prompter = \"webhook\"\nwebhook_url = \"http://{hook}/prompt\"\nprompt_timeout = \"1s\""))
            .await;
    let admin = gw.admin();
    let yes = decide(admin, json!({"app": "cam", "user": "yes", "api": "scan"})).await;
    assert_eq!(verdict(&yes), ("allow", "scope_granted", true));
    let asked = seen.lock().unwrap()[0].clone();
    assert_eq!(
        (&asked["app"], &asked["user"], &asked["scope"], &asked["title"], &asked["text"]),
        (
            &json!("cam"),
            &json!("yes"),
            &json!("camera"),
            &json!("Camera for Cam Shop"),
            &json!("Cam Shop scans codes with your camera.")
        )
    );
    let no = decide(admin, json!({"app": "cam", "user": "no", "api": "chooseImage"})).await;
    assert_eq!(verdict(&no), ("deny", "scope_denied", true));
    let late = decide(admin, json!({"app": "cam", "user": "late", "api": "scan"})).await;
    assert_eq!(verdict(&late), ("deny", "prompt_timeout", false));
    assert_eq!(seen.lock().unwrap().len(), 3, "the webhook was asked");
    assert_eq!(setting(admin, "cam", "late", "camera").await, "not_asked", "a timeout records nothing");
    assert!(pending(admin).await.is_empty());
    assert_eq!(setting(admin, "cam", "yes", "camera").await, "granted");
    assert_eq!(setting(admin, "cam", "no", "camera").await, "denied");
    let (_, history) = call(admin, "GET", "/v1/scopes/history?app=cam", None, VIEWER).await;
    let users: Vec<&str> = history["changes"].as_array().unwrap().iter().map(|c| c["user"].as_str().unwrap()).collect();
    assert_eq!(users, ["no", "yes"]);
    assert!(history["changes"].as_array().unwrap().iter().all(|c| c["by"] == "webhook"));
}

#[tokio::test]
async fn a_rig_answers_a_pending_prompt() {
    let gw = gateway("prompter = \"pending\"").await;
    let admin = gw.admin();
    let ask = json!({"app": "cam", "user": "alice", "scope": "camera"});
    let waiting = tokio::spawn(async move { call(admin, "POST", "/v1/scopes/authorize", Some(ask), VIEWER).await });
    let prompt = wait_for_prompt(admin).await;
    assert_eq!(
        (prompt["user"].as_str(), prompt["title"].as_str(), prompt["text"].as_str()),
        (Some("alice"), Some("Camera for Cam Shop"), Some("Cam Shop scans codes with your camera."))
    );
    let path = format!("/v1/scopes/prompts/{}", prompt["id"].as_str().unwrap());
    assert_eq!(call(admin, "POST", &path, Some(json!({"answer": "allow"})), VIEWER).await.0, 403);
    let (status, answered) = call(admin, "POST", &path, Some(json!({"answer": "allow"})), EDITOR).await;
    assert_eq!((status, answered["state"].as_str()), (200, Some("granted")));
    let (status, authorized) = waiting.await.unwrap();
    assert_eq!(
        (status, authorized["state"].as_str(), authorized["prompted"].as_bool()),
        (200, Some("granted"), Some(true))
    );
    assert_eq!(call(admin, "POST", &path, Some(json!({"answer": "deny"})), EDITOR).await.0, 404, "answered once");

    // without waiting: the prompt comes back to show, and the answer is recorded when given
    let ask = json!({"app": "cam", "user": "bob", "api": "scan", "wait": false});
    let open = decide(admin, ask.clone()).await;
    assert_eq!(verdict(&open), ("prompt", "consent_required", false));
    assert_eq!(open["prompt"]["title"], "Camera for Cam Shop");
    let path = format!("/v1/scopes/prompts/{}", open["prompt"]["id"].as_str().unwrap());
    assert_eq!(call(admin, "POST", &path, Some(json!({"answer": "deny"})), EDITOR).await.0, 200);
    assert_eq!(verdict(&decide(admin, ask).await), ("deny", "scope_denied", false), "mPaaS keeps a denial");
}

async fn issue(admin: SocketAddr, app: &str, user: &str, scopes: &[&str]) -> (u16, Value) {
    call(admin, "POST", "/v1/auth-codes", Some(json!({"app": app, "user": user, "scopes": scopes})), VIEWER).await
}

async fn exchange(admin: SocketAddr, app: &str, secret: &str, code: &Value) -> (u16, Value) {
    let body = json!({"app": app, "secret": secret, "code": code});
    call(admin, "POST", "/v1/auth-codes/exchange", Some(body), "unused").await
}

#[tokio::test]
async fn an_auth_code_is_single_use_for_its_own_app_and_yields_only_the_consented_fields() {
    let gw = gateway("prompter = \"allow\"").await;
    let admin = gw.admin();
    let (status, first) = issue(admin, "sa", "alice", &["USER_NICKNAME", "USER_AVATAR"]).await;
    assert_eq!((status, first["prompted"].as_bool()), (200, Some(true)), "{first}");
    let code = &first["code"];
    assert_eq!(exchange(admin, "sa", "wrong", code).await.0, 401);
    assert_eq!(exchange(admin, "ghost", "sa-secret", code).await.0, 401);
    let (status, user) = exchange(admin, "sa", "sa-secret", code).await;
    assert_eq!(status, 200, "a wrong secret does not burn the code: {user}");
    assert_eq!(user["fields"], json!({"nickname": "Al", "avatar": "https://img.example/alice.png"}));
    assert_eq!(user["user"], "alice");
    let (status, replay) = exchange(admin, "sa", "sa-secret", code).await;
    assert_eq!((status, replay["reason"].as_str()), (400, Some("code_unknown")));

    let (_, second) = issue(admin, "sa", "alice", &["auth_user", "HASH_LOGIN_ID"]).await;
    let (status, stolen) = exchange(admin, "other", "other-secret", &second["code"]).await;
    assert_eq!((status, stolen["reason"].as_str()), (400, Some("code_other_app")));
    let (status, after) = exchange(admin, "sa", "sa-secret", &second["code"]).await;
    assert_eq!((status, after["reason"].as_str()), (400, Some("code_unknown")), "void once presented elsewhere");

    let (_, third) = issue(admin, "sa", "alice", &["auth_user", "HASH_LOGIN_ID"]).await;
    let (_, user) = exchange(admin, "sa", "sa-secret", &third["code"]).await;
    let hash = "ff8d9819fc0e12bf0d24892e45987e249a28dce836a85cad60e28eaaa8c6d976"; // sha256("alice@example.com")
    assert_eq!(
        user["fields"],
        json!({"user_id": "alice", "nickname": "Al", "avatar": "https://img.example/alice.png", "gender": "F", "hash_login_id": hash})
    );
    // refusals: a denied scope, a device scope, a user not in the directory, another platform
    let change = json!({"app": "sa", "user": "bob", "scope": "USER_NAME", "state": "denied"});
    let _ = call(admin, "PUT", "/v1/scopes/settings", Some(change), EDITOR).await;
    let (status, again) = issue(admin, "sa", "bob", &["USER_NAME"]).await;
    assert_eq!((status, again["decision"].as_str()), (200, Some("allow")), "SuperApp asks again after a denial");
    assert_eq!(issue(admin, "sa", "alice", &["camera"]).await.0, 422);
    assert_eq!(issue(admin, "sa", "carol", &["USER_NAME"]).await.0, 404);
    assert_eq!(issue(admin, "wx", "alice", &["scope.userInfo"]).await.0, 422);
}

#[tokio::test]
async fn an_auth_code_expires() {
    let gw = gateway("prompter = \"allow\"\ncode_ttl = \"1s\"").await;
    let admin = gw.admin();
    let (status, issued) = issue(admin, "sa", "bob", &["USER_NICKNAME"]).await;
    assert_eq!((status, issued["expires_in"].as_u64()), (200, Some(1)));
    // issued before the answer came: 1.5 s after it, the code is past its TTL whatever the load
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, expired) = exchange(admin, "sa", "sa-secret", &issued["code"]).await;
    assert_eq!((status, expired["reason"].as_str()), (400, Some("code_expired")));
}

#[tokio::test]
async fn consent_survives_reloads_and_restarts_and_goes_with_its_app() {
    let mut gw = gateway("prompter = \"pending\"").await;
    let admin = gw.admin();
    let change = json!({"app": "wx", "user": "alice", "scope": "scope.userLocation", "state": "denied"});
    assert_eq!(call(admin, "PUT", "/v1/scopes/settings", Some(change), EDITOR).await.0, 200);
    let consent_file = gw.dir.path().join("consent.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&consent_file).unwrap().permissions().mode() & 0o777, 0o600);
    let (status, _, _) = admin_request(admin, "POST", "/-/reload", None, Some(EDITOR)).await;
    assert_eq!(status, 403, "reload needs an admin");
    gw.reloader.reload(miniapp_gateway::reload::Trigger::Admin).await.unwrap();
    assert_eq!(setting(admin, "wx", "alice", "scope.userLocation").await, "denied", "kept across a reload");

    gw.shutdown().await.unwrap();
    let dir = std::mem::replace(&mut gw.dir, tempfile::tempdir().unwrap());
    let path = gw.path.clone();
    drop(gw);
    let gw = TestGateway::start_at(dir, path).await;
    let admin = gw.admin();
    assert_eq!(setting(admin, "wx", "alice", "scope.userLocation").await, "denied", "kept across a restart");
    let ask = json!({"app": "wx", "user": "alice", "api": "getLocation"});
    assert_eq!(verdict(&decide(admin, ask).await), ("deny", "scope_denied", false));

    // deleting the miniapp deletes its records; a new app of the same id starts afresh
    let (status, headers, _) = admin_request(admin, "GET", "/v1/apps/wx", None, Some(VIEWER)).await;
    assert_eq!(status, 200);
    let delete = format!(
        "DELETE /v1/apps/wx HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nAuthorization: Bearer {EDITOR}\r\nIf-Match: {}\r\nContent-Length: 0\r\n\r\n",
        headers["etag"]
    );
    assert_eq!(send_raw(admin, &delete).await.status, 204);
    let kept = std::fs::read_to_string(gw.dir.path().join("consent.json")).unwrap();
    assert!(!kept.contains("\"wx\""), "{kept}");
    let create = format!(
        "PUT /v1/apps/wx HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nAuthorization: Bearer {EDITOR}\r\nIf-None-Match: *\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n{body}",
        len = APP_WX.len(),
        body = APP_WX
    );
    assert_eq!(send_raw(admin, &create).await.status, 201);
    assert_eq!(setting(admin, "wx", "alice", "scope.userLocation").await, "not_asked");
    let (_, history) = call(admin, "GET", "/v1/scopes/history?app=wx&user=alice", None, VIEWER).await;
    assert_eq!(history["changes"][0]["cause"], "app_deleted");
    // the platform and the secret go through check's rules like every other field
    let bad = r#"{"platform": "weixin", "secret": " padded"}"#;
    let (_, headers, _) = admin_request(admin, "GET", "/v1/apps/wx", None, Some(VIEWER)).await;
    let replace = format!(
        "PUT /v1/apps/wx HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nAuthorization: Bearer {EDITOR}\r\nIf-Match: {}\r\nContent-Length: {}\r\n\r\n{bad}",
        headers["etag"],
        bad.len()
    );
    let answer = send_raw(admin, &replace).await;
    let errors: Value = serde_json::from_slice(&answer.body).unwrap();
    let paths: Vec<&str> = errors["errors"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!((answer.status, paths), (422, vec!["platform", "secret"]), "{errors}");
}

const APP_WX: &str = r#"{"platform": "wechat", "api_whitelist": ["getLocation"]}"#;

#[tokio::test]
async fn calls_beyond_the_waiting_limit_get_the_prompt_at_once_and_a_rig_can_still_answer() {
    let gw = gateway("prompter = \"pending\"\nprompt_timeout = \"60s\"").await;
    let admin = gw.admin();
    let limit = miniapp_gateway::scopes::service::MAX_WAITING_CALLS;
    let waiting: Vec<_> = (0..limit)
        .map(|i| tokio::spawn(decide(admin, json!({"app": "cam", "user": format!("u{i}"), "api": "scan"}))))
        .collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    while pending(admin).await.len() < limit {
        assert!(tokio::time::Instant::now() < deadline, "the waiting calls did not all prompt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let beyond = decide(admin, json!({"app": "cam", "user": "late", "api": "scan"})).await;
    assert_eq!(verdict(&beyond), ("prompt", "consent_required", false));
    assert_eq!(beyond["prompt"]["user"], "late");
    for prompt in pending(admin).await {
        let path = format!("/v1/scopes/prompts/{}", prompt["id"].as_str().unwrap());
        assert_eq!(call(admin, "POST", &path, Some(json!({"answer": "allow"})), EDITOR).await.0, 200);
    }
    for call in waiting {
        assert_eq!(verdict(&call.await.unwrap()), ("allow", "scope_granted", true));
    }
}

#[tokio::test]
async fn the_example_container_shim_runs_its_scenario() {
    if std::process::Command::new("python3").arg("--version").output().is_err() {
        eprintln!("skipped: no python3 to run examples/scope_shim.py");
        return;
    }
    let gw = gateway("prompter = \"pending\"").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/scope_shim.py");
    let admin = format!("http://{}", gw.admin());
    let run =
        tokio::process::Command::new("python3").args([script, "--admin", &admin, "--token", EDITOR, "demo"]).output();
    let out = tokio::time::timeout(Duration::from_secs(60), run).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = |label: &str| -> Value {
        let prefix = format!("{label}: ");
        let found =
            stdout.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("{label}?\n{stdout}"));
        serde_json::from_str(found).unwrap()
    };
    assert_eq!(verdict(&line("shimwx getLocation")), ("deny", "scope_denied", false));
    assert_eq!(verdict(&line("shimwx getLocation after openSetting")), ("allow", "scope_granted", false));
    assert_eq!(line("shimsuper scan, camera denied for good by the host")["guide"], "showAuthGuide");
    assert_eq!(verdict(&line("shimsuper scan, camera allowed by the host")), ("allow", "scope_granted", false));
    assert_eq!(line("backend exchange (200)")["fields"], json!({"nickname": "Ada"}));
    assert_eq!(line("backend exchange again (400)")["reason"], "code_unknown");
}

#[tokio::test]
async fn a_container_acts_for_its_own_apps_and_a_plain_viewer_records_no_consent() {
    let gw = gateway("prompter = \"pending\"").await;
    let admin = gw.admin();
    let ask = json!({"app": "wx", "user": "alice", "api": "getLocation", "wait": false});
    // a viewer bound to no app may not make the calls that record consent
    for (path, body) in [
        ("/v1/scopes/decide", ask.clone()),
        ("/v1/scopes/authorize", json!({"app": "wx", "user": "alice", "scope": "scope.userLocation", "wait": false})),
        ("/v1/auth-codes", json!({"app": "sa", "user": "alice", "scopes": ["auth_base"]})),
    ] {
        let (status, answer) = call(admin, "POST", path, Some(body), MONITOR).await;
        assert_eq!(status, 403, "{path}: {answer}");
    }
    // the container's user may, for its own apps only
    assert_eq!(call(admin, "POST", "/v1/scopes/decide", Some(ask), VIEWER).await.0, 200);
    let elsewhere = json!({"app": "other", "user": "alice", "scopes": ["auth_base"]});
    let (status, answer) = call(admin, "POST", "/v1/auth-codes", Some(elsewhere), VIEWER).await;
    assert_eq!(status, 403, "{answer}");
    for path in
        ["/v1/scopes/history?app=other", "/v1/scopes/settings?app=other&user=alice", "/v1/scopes/prompts?app=other"]
    {
        assert_eq!(call(admin, "GET", path, None, VIEWER).await.0, 403, "{path}");
    }
    // and it sees only its own apps' prompts; the plain viewer sees them all
    let (_, mine) = call(admin, "GET", "/v1/scopes/prompts", None, VIEWER).await;
    assert!(mine["prompts"].as_array().unwrap().iter().all(|p| p["app"] != "other"));
    let (status, _) = call(admin, "GET", "/v1/scopes/prompts", None, MONITOR).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn one_user_holds_a_few_codes_and_wrong_secrets_lock_out_no_operator() {
    let gw = gateway("prompter = \"allow\"").await;
    let admin = gw.admin();
    let mut codes = Vec::new();
    for _ in 0..6 {
        let (status, issued) = issue(admin, "sa", "alice", &["auth_base"]).await;
        assert_eq!(status, 200, "{issued}");
        codes.push(issued["code"].clone());
    }
    // the sixth voided the oldest: asking again and again fills nothing
    assert_eq!(exchange(admin, "sa", "sa-secret", &codes[0]).await.1["reason"], "code_unknown");
    assert_eq!(exchange(admin, "sa", "sa-secret", &codes[5]).await.0, 200);
    // wrong secrets are throttled at the exchange, and only there
    let mut throttled = false;
    for _ in 0..100 {
        if exchange(admin, "sa", "guess", &codes[4]).await.0 == 429 {
            throttled = true;
            break;
        }
    }
    assert!(throttled, "wrong secrets were never throttled");
    assert_eq!(call(admin, "GET", "/v1/apps", None, EDITOR).await.0, 200, "an operator on the same address is not");
}

#[tokio::test]
async fn one_apps_callers_cannot_take_every_prompt() {
    let gw = gateway("prompter = \"pending\"").await;
    let admin = gw.admin();
    let ask = |app: &str, user: String| json!({"app": app, "user": user, "api": "getLocation", "wait": false});
    let cap = miniapp_gateway::scopes::service::MAX_PENDING_PROMPTS_PER_APP;
    for n in 0..cap {
        assert_eq!(decide(admin, ask("wx", format!("u{n}"))).await["decision"], "prompt");
    }
    let over = decide(admin, ask("wx", "one-more".into())).await;
    assert_eq!((over["decision"].as_str(), over["reason"].as_str()), (Some("deny"), Some("prompt_failed")), "{over}");
    // another app still asks its users
    assert_eq!(decide(admin, ask("sa", "alice".into())).await["decision"], "prompt");
}
