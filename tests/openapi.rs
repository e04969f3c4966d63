//! The OpenAPI document against the running gateway: every documented route is called, every
//! answer's status must be one the document lists for that route, and every JSON answer must
//! fit the schema the document gives for it.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::*;
use serde_json::{Value, json};

/// `#/components/...` references resolved in `doc`.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.trim_start_matches('#');
            resolve(doc, doc.pointer(pointer).unwrap_or_else(|| panic!("dangling {reference}")))
        }
        None => value,
    }
}

/// Whether `value` fits `schema` (the subset of JSON Schema the document uses); the reason
/// when it does not.
fn fits(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if value.is_null() && schema.get("nullable") == Some(&json!(true)) {
        return Ok(());
    }
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        return if options.iter().any(|option| fits(doc, option, value, at).is_ok()) {
            Ok(())
        } else {
            Err(format!("{at}: {value} fits none of oneOf"))
        };
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        return Err(format!("{at}: {value} is not one of {allowed:?}"));
    }
    let Some(kind) = schema.get("type").and_then(Value::as_str) else { return Ok(()) };
    let matches = match kind {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_u64() || value.is_i64(),
        "boolean" => value.is_boolean(),
        other => panic!("schema type {other} at {at}"),
    };
    if !matches {
        return Err(format!("{at}: {value} is not a {kind}"));
    }
    if let Some(object) = value.as_object() {
        for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            let name = required.as_str().unwrap();
            if !object.contains_key(name) {
                return Err(format!("{at}: required {name} missing from {value}"));
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (name, item) in object {
            match properties.and_then(|p| p.get(name)) {
                Some(property) => fits(doc, property, item, &format!("{at}.{name}"))?,
                None if schema.get("additionalProperties") == Some(&json!(false)) => {
                    return Err(format!("{at}: {name} is not documented"));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(schema)) = (value.as_array(), schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            fits(doc, schema, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// One request, checked against the document: its (template, method) must be documented, the
/// status listed, the request body fit the documented one and the answer its schema.
struct Contract {
    doc: Value,
    admin: SocketAddr,
    called: BTreeSet<(String, String)>,
    /// The statuses seen, by (template, method).
    seen: BTreeSet<(String, String, u16)>,
    /// Whether the request being made has a body the document refuses.
    malformed: bool,
}

impl Contract {
    async fn call(&mut self, method: &str, template: &str, path: &str, headers: &str, body: Option<Value>) -> u16 {
        let operation = self.doc["paths"][template]
            .get(method.to_lowercase())
            .unwrap_or_else(|| panic!("{method} {template} is not documented"))
            .clone();
        if let Some(body) = &body {
            let schema = &operation["requestBody"]["content"]["application/json"]["schema"];
            // A body the document refuses must be refused by the gateway too (400 or 422).
            self.malformed = fits(&self.doc, schema, body, "request").is_err();
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        // The admin's token and the listener's address, unless the call names its own.
        let mut headers = headers.to_owned();
        if !headers.contains("Authorization:") {
            headers.push_str(&format!("Authorization: Bearer {ROOT}\r\n"));
        }
        if !headers.contains("Host:") {
            headers.push_str(&format!("Host: {}\r\n", self.admin));
        }
        let request = format!(
            "{method} {path} HTTP/1.1\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let answer = send_raw(self.admin, &request).await;
        let status = answer.status.to_string();
        let documented = resolve(
            &self.doc,
            operation["responses"].get(&status).unwrap_or_else(|| {
                panic!("{method} {path} answered {status}, not documented: {}", String::from_utf8_lossy(&answer.body))
            }),
        );
        if let Some(schema) = documented.pointer("/content/application~1json/schema") {
            let value: Value = serde_json::from_slice(&answer.body)
                .unwrap_or_else(|e| panic!("{method} {path} answered {status} without JSON: {e}"));
            fits(&self.doc, schema, &value, "answer").unwrap_or_else(|e| panic!("{method} {path} ({status}): {e}"));
        }
        if std::mem::take(&mut self.malformed) {
            assert!(
                matches!(answer.status, 400 | 422),
                "{method} {path}: a body the document refuses was answered {}",
                answer.status
            );
        }
        self.called.insert((template.to_owned(), method.to_lowercase()));
        self.seen.insert((template.to_owned(), method.to_lowercase(), answer.status));
        answer.status
    }
}

const ROOT: &str = "root-token";
const VIEWER: &str = "viewer-token";

#[tokio::test]
async fn every_route_answers_as_the_openapi_document_says() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nadmin_token = \"{ROOT}\"\n\n\
         [policy]\napps_dir = \"apps\"\n\n[scopes]\nusers = \"users.toml\"\n\n\
         [resolve]\n\"api.shop.example\" = \"{}\"\n\n[[app]]\nid = \"main\"\nplatform = \"superapp\"\n\
         secret = \"main-secret\"\napi_whitelist = [\"scan\"]\n\n\
         [[admin_user]]\nname = \"vera\"\nrole = \"viewer\"\ntoken_sha256 = \"{}\"\n",
        origin.addr,
        token_hash(VIEWER)
    );
    let shop = "[[app]]\nid = \"shop\"\nserver_domains = [\"api.shop.example\"]\n";
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("apps")).unwrap();
    std::fs::write(dir.path().join("apps/shop.toml"), shop).unwrap();
    std::fs::write(dir.path().join("users.toml"), "[[user]]\nid = \"alice\"\nnickname = \"Al\"\n").unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let gw = TestGateway::start_at(dir, path).await;

    let (status, _, served) = admin_request(gw.admin(), "GET", "/v1/openapi.json", None, Some(ROOT)).await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_slice(&served).unwrap();
    let committed: Value = serde_json::from_str(include_str!("../src/admin/openapi.json")).unwrap();
    assert_eq!(doc, committed, "the served document is the committed one");
    let mut api = Contract { doc, admin: gw.admin(), called: BTreeSet::new(), seen: BTreeSet::new(), malformed: false };

    let app = "/v1/apps/{id}";
    let list = "/v1/apps/{id}/{list}";
    let entry = "/v1/apps/{id}/{list}/{entry}";
    assert_eq!(api.call("GET", "/v1/apps", "/v1/apps?q=o&limit=1", "", None).await, 200);
    assert_eq!(api.call("GET", app, "/v1/apps/shop", "", None).await, 200);
    assert_eq!(api.call("GET", app, "/v1/apps/main", "", None).await, 200);
    assert_eq!(api.call("GET", app, "/v1/apps/ghost", "", None).await, 404);
    let fresh =
        json!({"name": "Fresh", "server_domains": ["api.shop.example", {"domain": "b.example", "remark": "B"}]});
    assert_eq!(api.call("PUT", app, "/v1/apps/fresh", "", Some(fresh.clone())).await, 428);
    assert_eq!(
        api.call("PUT", app, "/v1/apps/fresh?dry_run=true", "If-None-Match: *\r\n", Some(fresh.clone())).await,
        200
    );
    assert_eq!(api.call("PUT", app, "/v1/apps/fresh", "If-None-Match: *\r\n", Some(fresh.clone())).await, 201);
    assert_eq!(api.call("PUT", app, "/v1/apps/fresh", "If-Match: \"9\"\r\n", Some(fresh.clone())).await, 412);
    assert_eq!(api.call("PUT", app, "/v1/apps/fresh", "If-Match: \"1\"\r\n", Some(fresh)).await, 200);
    let bad = json!({"server_domains": ["http://b.example"]});
    assert_eq!(api.call("PUT", app, "/v1/apps/fresh", "If-Match: \"2\"\r\n", Some(bad)).await, 422);
    assert_eq!(api.call("PUT", app, "/v1/apps/main", "If-Match: \"1\"\r\n", Some(json!({}))).await, 409);
    assert_eq!(
        api.call("PUT", "/v1/apps/{id}/action", "/v1/apps/fresh/action", "", Some(json!({"action": "report"}))).await,
        200
    );
    let add = json!({"entry": "c.example", "remark": "C"});
    assert_eq!(api.call("POST", list, "/v1/apps/fresh/server_domains", "", Some(add.clone())).await, 201);
    assert_eq!(api.call("POST", list, "/v1/apps/fresh/server_domains", "", Some(add)).await, 409);
    assert_eq!(
        api.call("POST", list, "/v1/apps/fresh/api_whitelist", "", Some(json!({"entry": "shop.pay"}))).await,
        201
    );
    let edit = json!({"remark": null});
    assert_eq!(api.call("PUT", entry, "/v1/apps/fresh/server_domains/c.example", "", Some(edit.clone())).await, 200);
    assert_eq!(api.call("PUT", entry, "/v1/apps/fresh/server_domains/z.example", "", Some(edit)).await, 404);
    assert_eq!(api.call("DELETE", entry, "/v1/apps/fresh/server_domains/c.example", "", None).await, 204);
    assert_eq!(api.call("GET", "/v1/apps/{id}/history", "/v1/apps/fresh/history", "", None).await, 200);
    let rollback = "/v1/apps/{id}/rollback";
    assert_eq!(api.call("POST", rollback, "/v1/apps/fresh/rollback", "", Some(json!({"revision": 1}))).await, 200);
    assert_eq!(api.call("POST", rollback, "/v1/apps/fresh/rollback", "", Some(json!({"revision": 99}))).await, 404);
    let check = json!({"app": "fresh", "channel": "request", "url": "https://b.example/"});
    assert_eq!(api.call("POST", "/v1/check", "/v1/check", "", Some(check)).await, 200);
    // a draft of an app the API may not write (the main config's) is refused as its writes are
    let main_draft = json!({"app": {"id": "main"}, "api": "scan"});
    assert_eq!(api.call("POST", "/v1/check", "/v1/check", "", Some(main_draft)).await, 409);
    let draft = json!({"app": {"id": "draft", "server_domains": ["d.example"]}, "api": "shop.pay"});
    assert_eq!(api.call("POST", "/v1/check", "/v1/check", "", Some(draft)).await, 200);
    assert_eq!(api.call("DELETE", app, "/v1/apps/fresh", "", None).await, 428);
    assert_eq!(api.call("DELETE", app, "/v1/apps/fresh", "If-Match: \"8\"\r\n", None).await, 204);
    assert_eq!(api.call("GET", "/v1/openapi.json", "/v1/openapi.json", "", None).await, 200);
    assert_eq!(api.call("GET", "/v1/me", "/v1/me", "", None).await, 200);
    assert_eq!(api.call("GET", "/v1/status", "/v1/status", "", None).await, 200);
    let decisions = "/v1/apps/{id}/decisions";
    assert_eq!(connect_as(gw.addr(), "shop", "x", "evil.example:443").await.reason(), "not_whitelisted");
    assert_eq!(api.call("GET", decisions, "/v1/apps/shop/decisions", "", None).await, 200);
    assert_eq!(api.call("GET", decisions, "/v1/apps/ghost/decisions", "", None).await, 404);
    assert_eq!(api.call("GET", "/v1/events", "/v1/events?app=shop", "", None).await, 200);

    let decide = "/v1/scopes/decide";
    let open = json!({"app": "main", "user": "u", "api": "scan", "wait": false});
    assert_eq!(api.call("POST", decide, decide, "", Some(open)).await, 200);
    assert_eq!(
        api.call("POST", decide, decide, "", Some(json!({"app": "ghost", "user": "u", "api": "scan"}))).await,
        404
    );
    assert_eq!(api.call("POST", decide, decide, "", Some(json!({"app": "main", "user": "u"}))).await, 400);
    let prompts = "/v1/scopes/prompts";
    assert_eq!(api.call("GET", prompts, "/v1/scopes/prompts?app=main", "", None).await, 200);
    let (_, _, listed) = admin_request(gw.admin(), "GET", prompts, None, Some(ROOT)).await;
    let listed: Value = serde_json::from_slice(&listed).unwrap();
    let answer = format!("/v1/scopes/prompts/{}", listed["prompts"][0]["id"].as_str().unwrap());
    let template = "/v1/scopes/prompts/{prompt}";
    assert_eq!(api.call("POST", template, &answer, "", Some(json!({"answer": "allow"}))).await, 200);
    assert_eq!(api.call("POST", template, &answer, "", Some(json!({"answer": "allow"}))).await, 404);
    let authorize = "/v1/scopes/authorize";
    let scope = |scope: &str| json!({"app": "main", "user": "u", "scope": scope});
    assert_eq!(api.call("POST", authorize, authorize, "", Some(scope("camera"))).await, 200);
    assert_eq!(api.call("POST", authorize, authorize, "", Some(scope("nope"))).await, 422);
    assert_eq!(
        api.call("POST", authorize, authorize, "", Some(json!({"app": "ghost", "user": "u", "scope": "camera"}))).await,
        404
    );
    assert_eq!(api.call("POST", authorize, authorize, "", Some(json!({"app": "main", "user": "u"}))).await, 400);
    let settings = "/v1/scopes/settings";
    assert_eq!(api.call("GET", settings, "/v1/scopes/settings?app=main&user=u", "", None).await, 200);
    assert_eq!(api.call("GET", settings, "/v1/scopes/settings?app=main", "", None).await, 400);
    assert_eq!(api.call("GET", settings, "/v1/scopes/settings?app=ghost&user=u", "", None).await, 404);
    let change = |app: &str, scope: &str| json!({"app": app, "user": "u", "scope": scope, "state": "denied"});
    assert_eq!(api.call("PUT", settings, settings, "", Some(change("main", "camera"))).await, 200);
    assert_eq!(api.call("PUT", settings, settings, "", Some(change("main", "auth_base"))).await, 422);
    assert_eq!(api.call("PUT", settings, settings, "", Some(change("ghost", "camera"))).await, 404);
    assert_eq!(
        api.call(
            "PUT",
            settings,
            settings,
            "",
            Some(json!({"app": "main", "user": "", "scope": "camera", "state": "denied"}))
        )
        .await,
        400
    );
    let history = "/v1/scopes/history";
    assert_eq!(api.call("GET", history, "/v1/scopes/history?app=main&user=u", "", None).await, 200);
    assert_eq!(api.call("GET", history, history, "", None).await, 400);
    let codes = "/v1/auth-codes";
    let ask = |user: &str, scope: &str| json!({"app": "main", "user": user, "scopes": [scope]});
    assert_eq!(api.call("POST", codes, codes, "", Some(ask("alice", "auth_base"))).await, 200);
    assert_eq!(api.call("POST", codes, codes, "", Some(ask("carol", "auth_base"))).await, 404);
    assert_eq!(api.call("POST", codes, codes, "", Some(ask("alice", "camera"))).await, 422);
    assert_eq!(api.call("POST", codes, codes, "", Some(json!({"app": "main", "user": "alice"}))).await, 400);
    let no_wait = json!({"app": "main", "user": "alice", "scopes": ["USER_NICKNAME"], "wait": false});
    assert_eq!(api.call("POST", codes, codes, "", Some(no_wait)).await, 200);
    let (_, _, issued) =
        admin_request(gw.admin(), "POST", codes, Some(&ask("alice", "auth_base").to_string()), Some(ROOT)).await;
    let code: Value = serde_json::from_slice::<Value>(&issued).unwrap()["code"].clone();
    let exchange = "/v1/auth-codes/exchange";
    let with = |secret: &str| json!({"app": "main", "secret": secret, "code": code});
    assert_eq!(api.call("POST", exchange, exchange, "", Some(with("wrong"))).await, 401);
    assert_eq!(api.call("POST", exchange, exchange, "", Some(with("main-secret"))).await, 200);
    assert_eq!(api.call("POST", exchange, exchange, "", Some(with("main-secret"))).await, 400);

    // Who may: no token, a viewer's write, a Host that is not the listener's.
    let viewer = format!("Authorization: Bearer {VIEWER}\r\n");
    assert_eq!(api.call("GET", "/v1/apps", "/v1/apps", "Authorization: Bearer nope\r\n", None).await, 401);
    assert_eq!(api.call("GET", app, "/v1/apps/shop", &viewer, None).await, 200);
    let add = json!({"entry": "e.example"});
    assert_eq!(api.call("POST", list, "/v1/apps/shop/server_domains", &viewer, Some(add)).await, 403);
    assert_eq!(api.call("GET", app, "/v1/apps/shop", "Host: evil.example\r\n", None).await, 421);
    // Failed authentications from one address are throttled.
    let mut throttled = false;
    for _ in 0..100 {
        if api.call("GET", app, "/v1/apps/shop", "Authorization: Bearer guess\r\n", None).await == 429 {
            throttled = true;
            break;
        }
    }
    assert!(throttled, "100 wrong tokens in a row were never throttled");
    let statuses: BTreeSet<u16> = api.seen.iter().map(|(.., status)| *status).collect();
    for status in [401, 403, 421, 429] {
        assert!(statuses.contains(&status), "no answer was {status}");
    }

    let documented: BTreeSet<(String, String)> = api.doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "parameters")
                .map(|method| (path.clone(), method.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let missed: Vec<_> = documented.difference(&api.called).collect();
    assert!(missed.is_empty(), "documented but never called: {missed:?}");
}
