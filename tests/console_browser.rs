//! The console in a real browser: headless Chromium driven through chromedriver (WebDriver)
//! against a real gateway on loopback, clicking as an operator would.
//!
//! Needs Debian's `chromium` and `chromium-driver`. Without them the test says so and passes,
//! unless `MINIAPP_REQUIRE_BROWSER=1` (set by `.ci/run`, which installs both) makes it a
//! failure. With `MINIAPP_SCREENSHOTS=DIR` it also writes the README's screenshots into DIR
//! (relative to the crate), e.g. `MINIAPP_SCREENSHOTS=docs cargo test --test console_browser`.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const ADMIN: &str = "admin-token";
const VIEWER: &str = "viewer-token";

/// The first of `names` that runs with `--version`.
fn program(names: &[&'static str]) -> Option<&'static str> {
    names.iter().copied().find(|bin| Command::new(bin).arg("--version").output().is_ok_and(|out| out.status.success()))
}

/// chromedriver on a free loopback port, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    async fn start(program: &str) -> Driver {
        use std::os::unix::process::CommandExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(program)
            .arg(format!("--port={port}"))
            // its own process group, which the browsers it starts join: ended together
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = Driver { child, port };
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "chromedriver did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        driver
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver and any browser it left (a test that failed before closing its session)
        if let Ok(group) = i32::try_from(self.child.id()) {
            // SAFETY: kill only sends a signal, to the process group this test started.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Chromium session with a fresh profile.
async fn browser(driver: &Driver, chromium: &str, profile: &std::path::Path) -> Client {
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ];
    let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    let binary = which(chromium);
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("goog:chromeOptions".to_owned(), json!({ "binary": binary, "args": args }));
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session")
}

/// The full path of a program on PATH.
fn which(program: &str) -> String {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(program)).find(|path| path.is_file()))
        .map_or_else(|| program.to_owned(), |path| path.display().to_string())
}

/// The page, with waits that give up after [`WAIT`].
struct Page {
    client: Client,
    screenshots: Option<std::path::PathBuf>,
}

impl Page {
    async fn find(&self, css: &str) -> Element {
        self.client.wait().at_most(WAIT).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"))
    }

    /// Wait until the text of `css` (its `textContent`, as the page set it) satisfies `test`;
    /// returns it.
    async fn text_until(&self, css: &str, test: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut last = String::new();
        loop {
            if let Ok(element) = self.client.find(Locator::Css(css)).await
                && let Ok(Some(text)) = element.prop("textContent").await
            {
                if test(&text) {
                    return text;
                }
                last = text;
            }
            assert!(tokio::time::Instant::now() < deadline, "{css} never got there; last text: {last:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until `script` (a JavaScript expression) is true.
    async fn until(&self, what: &str, script: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let value = self.client.execute(&format!("return Boolean({script});"), vec![]).await.unwrap();
            if value == Value::Bool(true) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "never: {what} ({script})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn visible(&self, css: &str) -> bool {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element.is_displayed().await.unwrap(),
            Err(_) => false,
        }
    }

    /// Click `css`, finding it again if the page re-rendered it in between (a live update).
    async fn click(&self, css: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.find(css).await.click().await {
                Ok(()) => return,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "click {css}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Click the button `label` in the row of `table` whose first cell is `first`, finding it
    /// again if the page re-rendered the table in between.
    async fn click_in_row(&self, table: &str, first: &str, label: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.row_button(table, first, label).await {
                Some(button) if button.click().await.is_ok() => return,
                found => assert!(
                    tokio::time::Instant::now() < deadline,
                    "no {label} button to click in the row {first} of {table} (found: {})",
                    found.is_some()
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let field = self.find(css).await;
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    /// The button labelled `label` in the row of `table` whose first cell is `first`.
    async fn row_button(&self, table: &str, first: &str, label: &str) -> Option<Element> {
        let rows = self.client.find_all(Locator::Css(&format!("{table} tbody tr"))).await.ok()?;
        for row in rows {
            let cell = row.find(Locator::Css("td")).await.ok()?.text().await.ok()?;
            if cell == first {
                for button in row.find_all(Locator::Css("button")).await.ok()? {
                    if button.text().await.ok()? == label {
                        return Some(button);
                    }
                }
            }
        }
        None
    }

    async fn dialog_open(&self, id: &str) -> bool {
        self.client.execute(&format!("return document.getElementById('{id}').open;"), vec![]).await.unwrap()
            == Value::Bool(true)
    }

    /// Save a screenshot as DIR/NAME.png when screenshots are asked for.
    async fn screenshot(&self, name: &str) {
        if let Some(dir) = &self.screenshots {
            std::fs::create_dir_all(dir).unwrap();
            let png = self.client.screenshot().await.unwrap();
            std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
        }
    }
}

/// The first cells (entries) of the whitelist table.
async fn entries(page: &Page) -> Vec<String> {
    let script = "return [...document.querySelectorAll('#entries tbody tr')].map(r => r.cells[0].textContent);";
    let value = page.client.execute(script, vec![]).await.unwrap();
    serde_json::from_value(value).unwrap()
}

async fn app_json(admin: SocketAddr, id: &str) -> Value {
    admin_json(admin, "GET", &format!("/v1/apps/{id}"), None, Some(ADMIN)).await.1
}

async fn setup(origin: &Origin) -> TestGateway {
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
"report.example" = "{o}"

[[admin_user]]
name = "root"
token_sha256 = "{admin}"
role = "admin"

[[admin_user]]
name = "vera"
token_sha256 = "{viewer}"
role = "viewer"
"#,
        o = origin.addr,
        admin = token_hash(ADMIN),
        viewer = token_hash(VIEWER)
    );
    let shop = "[[app]]\nid = \"shop\"\nname = \"Demo shop\"\nserver_domains = [\"https://api.shop.example\"]\n\
                webview_domains = [{ domain = \"*.shop.example\", remark = \"H5 pages\" }]\napi_whitelist = [\"shop.pay\"]\n";
    let news = "[[app]]\nid = \"news\"\nname = \"News\"\n";
    TestGateway::start_with_apps(&text, &[("shop.toml", shop), ("news.toml", news)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_manages_an_app_in_the_console() {
    let (Some(chromium), Some(chromedriver)) =
        (program(&["chromium", "chromium-browser", "google-chrome"]), program(&["chromedriver"]))
    else {
        assert!(
            std::env::var_os("MINIAPP_REQUIRE_BROWSER").is_none(),
            "Chromium and chromedriver are required but not installed"
        );
        eprintln!("skipped: no Chromium or chromedriver here (apt-get install chromium chromium-driver)");
        return;
    };
    let origin = Origin::start(&["api.shop.example", "evil.example"]).await;
    let gw = setup(&origin).await;
    let (proxy, admin) = (gw.addr(), gw.admin());
    let driver = Driver::start(chromedriver).await;
    let profile = tempfile::tempdir().unwrap();
    let client = browser(&driver, chromium, profile.path()).await;
    let screenshots =
        std::env::var_os("MINIAPP_SCREENSHOTS").map(|dir| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir));
    let page = Page { client, screenshots };

    // sign in: a wrong token is told so, the right one opens the console
    page.client.goto(&format!("http://{admin}/")).await.unwrap();
    assert_eq!(page.client.current_url().await.unwrap().path(), "/console/");
    page.type_into("#token", "not-a-token").await;
    page.click("#signin-form button[type=submit]").await;
    page.text_until("#signin-error", |t| t.contains("not one of this gateway's")).await;
    page.type_into("#token", ADMIN).await;
    page.click("#signin-form button[type=submit]").await;
    page.text_until("#who", |t| t == "root (admin)").await;

    // pick an app by searching for it, then the other
    page.type_into("#app-filter", "new").await;
    page.until("the search found news only", "document.querySelector('#app-select').options.length === 1").await;
    page.find("#app-select").await.select_by_value("news").await.unwrap();
    page.text_until("#app-id", |t| t == "news").await;
    page.type_into("#app-filter", "shop").await;
    page.until("the search found shop", "document.querySelector('#app-select').value === 'shop'").await;
    page.text_until("#app-id", |t| t == "shop").await;
    assert_eq!(page.find("#app-name").await.text().await.unwrap(), "Demo shop");
    assert_eq!(entries(&page).await, ["https://api.shop.example"]);
    page.text_until("#list-count", |t| t == "1 / 30").await;

    // add a server domain with a remark; the counter follows the remark as it is typed
    page.click("#add-entry").await;
    assert!(page.dialog_open("entry-dialog").await);
    let rules = page.find("#entry-rules").await.text().await.unwrap();
    assert!(rules.contains("Only HTTPS domains are supported") && rules.contains("1 / 30"), "{rules}");
    page.type_into("#entry-value", "https://cdn.shop.example").await;
    page.type_into("#entry-remark", "images").await;
    page.text_until("#entry-remark-count", |t| t == "6 / 200").await;
    page.click("#entry-ok").await;
    page.until("the dialog closed", "!document.getElementById('entry-dialog').open").await;
    page.until("the entry is listed", "document.querySelector('#entries').textContent.includes('cdn.shop.example')")
        .await;
    assert_eq!(entries(&page).await, ["https://api.shop.example", "https://cdn.shop.example"]);
    let cdn = &app_json(admin, "shop").await["server_domains"][1];
    assert_eq!((cdn["domain"].as_str(), cdn["remark"].as_str()), (Some("https://cdn.shop.example"), Some("images")));
    page.screenshot("console-whitelist").await;

    // a plain http:// entry: the server's message, next to the field, the dialog still open
    page.click("#add-entry").await;
    page.type_into("#entry-value", "http://plain.shop.example").await;
    page.click("#entry-ok").await;
    let message = page.text_until("#entry-value-error", |t| !t.is_empty()).await;
    assert!(message.contains("only https:// and wss:// entries are allowed"), "{message}");
    assert!(page.dialog_open("entry-dialog").await);
    assert_eq!(page.find("#entry-error").await.text().await.unwrap(), "", "not a general error");
    page.click("#entry-cancel").await;
    assert_eq!(app_json(admin, "shop").await["server_domains"].as_array().unwrap().len(), 2);

    // the 30 limit: 29 entries (written by a script: the page follows), then the 30th by hand
    let (_, headers, _) = admin_request(admin, "GET", "/v1/apps/shop", None, Some(ADMIN)).await;
    let mut doc = app_json(admin, "shop").await;
    for i in 3..=29 {
        doc["server_domains"].as_array_mut().unwrap().push(json!(format!("https://n{i}.shop.example")));
    }
    let request = format!(
        "PUT /v1/apps/shop HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nAuthorization: Bearer {ADMIN}\r\n\
         If-Match: {}\r\nContent-Length: {}\r\n\r\n{doc}",
        headers["etag"],
        doc.to_string().len()
    );
    assert_eq!(send_raw(admin, &request).await.status, 200);
    page.text_until("#list-count", |t| t == "29 / 30").await;
    page.click("#add-entry").await;
    page.text_until("#entry-rules", |t| t.contains("29 / 30 used")).await;
    page.type_into("#entry-value", "https://n30.shop.example").await;
    page.click("#entry-ok").await;
    page.text_until("#list-count", |t| t == "30 / 30").await;
    assert!(!page.find("#add-entry").await.is_enabled().await.unwrap(), "Add is off at the limit");
    page.text_until("#list-error", |t| t.contains("at most 30 entries")).await;

    // edit a remark
    page.click_in_row("#entries", "https://cdn.shop.example", "Edit").await;
    assert_eq!(
        page.find("#entry-value").await.prop("value").await.unwrap().as_deref(),
        Some("https://cdn.shop.example")
    );
    page.type_into("#entry-remark", "image CDN").await;
    page.click("#entry-ok").await;
    page.until("the remark changed", "document.querySelector('#entries').textContent.includes('image CDN')").await;
    assert_eq!(app_json(admin, "shop").await["server_domains"][1]["remark"], "image CDN");

    // delete with confirmation: Cancel keeps it, OK deletes it
    page.click_in_row("#entries", "https://n30.shop.example", "Delete").await;
    let question = page.find("#confirm-text").await.text().await.unwrap();
    assert!(question.contains("Delete https://n30.shop.example from the server domain whitelist"), "{question}");
    page.click("#confirm-cancel").await;
    assert!(entries(&page).await.contains(&"https://n30.shop.example".to_owned()));
    page.click_in_row("#entries", "https://n30.shop.example", "Delete").await;
    page.click("#confirm-ok").await;
    page.text_until("#list-count", |t| t == "29 / 30").await;
    assert!(!entries(&page).await.contains(&"https://n30.shop.example".to_owned()));

    // the other tabs
    page.click("#tab-webview_domains").await;
    page.until("the WebView list", "document.querySelector('#entries').textContent.includes('*.shop.example')").await;
    page.click("#tab-api_whitelist").await;
    page.text_until("#entries-col", |t| t == "API name").await;
    assert_eq!(entries(&page).await, ["shop.pay"]);
    page.click("#tab-server_domains").await;

    // flip the switch: report lets an unlisted host through, recorded as a would-be refusal
    page.click("input[name=action][value=report]").await;
    page.text_until("#revisions tbody tr:first-child td:nth-child(4)", |t| t.starts_with("action")).await;
    assert_eq!(app_json(admin, "shop").await["action"], "report");
    assert_eq!(connect_as(proxy, "shop", "x", "report.example:443").await.decision(), "report");
    page.click("input[name=action][value=enforce]").await;
    page.until(
        "enforce again",
        "document.querySelector('#revisions tbody tr:first-child').textContent.includes('report → enforce')",
    )
    .await;

    // test a URL, and the same on an unsaved draft
    page.type_into("#test-url", "https://api.shop.example/v1/items").await;
    page.click("#test-form button[type=submit]").await;
    page.text_until("#test-decision", |t| t == "allow").await;
    let rule = page.find("#test-rule").await.text().await.unwrap();
    assert_eq!(rule, "by server_domains[0]: https://api.shop.example");
    page.type_into("#test-url", "https://pay.partner.example/").await;
    page.click("#test-form button[type=submit]").await;
    page.text_until("#test-reason", |t| t == "not_whitelisted").await;
    page.text_until("#test-decision", |t| t == "deny").await;
    page.type_into("#test-extra", "*.partner.example").await;
    page.click("#test-form button[type=submit]").await;
    page.text_until("#test-decision", |t| t == "allow").await;
    page.text_until("#test-rule", |t| t == "by server_domains[29]: *.partner.example").await;
    assert_eq!(app_json(admin, "shop").await["server_domains"].as_array().unwrap().len(), 29, "a draft is not saved");

    // the proxy refuses a host; it shows up under refused traffic; Allow lets it through
    let revision_before_allow = app_json(admin, "shop").await["revision"].as_u64().unwrap();
    assert_eq!(connect_as(proxy, "shop", "x", "evil.example:443").await.reason(), "not_whitelisted");
    page.until("the refusal is listed", "document.querySelector('#refusals').textContent.includes('evil.example')")
        .await;
    page.client.execute("document.getElementById('test').scrollIntoView();", vec![]).await.unwrap();
    page.screenshot("console-refused").await;
    page.click_in_row("#refusals", "evil.example", "Allow").await;
    page.text_until("#allow-exact-text", |t| t == "https://evil.example").await;
    assert!(!page.visible("#allow-wildcard-choice").await, "no *.example: example is a top-level domain");
    page.click("#allow-ok").await;
    page.until(
        "the entry is listed",
        "document.querySelector('#entries').textContent.includes('https://evil.example')",
    )
    .await;
    let answer = connect_as(proxy, "shop", "x", "evil.example:443").await;
    assert_eq!((answer.status, answer.reason()), (200, "whitelisted"));
    page.text_until("#refusals tbody tr:first-child td:last-child", |t| t == "allowed now").await;
    let mut tls = tls_over(answer.stream, &origin.ca, "evil.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");

    // restore the revision before Allow: the host is refused again
    let row = format!("#revisions tbody tr[data-revision='{revision_before_allow}']");
    page.find(&row).await;
    page.client.execute("document.getElementById('refused').scrollIntoView();", vec![]).await.unwrap();
    page.screenshot("console-history").await;
    page.click(&format!("{row} button")).await;
    page.click("#confirm-ok").await;
    page.until("the entry is gone", "!document.querySelector('#entries').textContent.includes('https://evil.example')")
        .await;
    assert_eq!(connect_as(proxy, "shop", "x", "evil.example:443").await.reason(), "not_whitelisted");
    let history = page.find("#revisions tbody tr:first-child").await.text().await.unwrap();
    assert!(history.contains("rollback") && history.contains("− server domain https://evil.example"), "{history}");

    // a remark with markup is shown as the text it is
    let markup = r#"<img src=x onerror="window.pwned=1"><b>bold</b>"#;
    page.click("#add-entry").await;
    page.type_into("#entry-value", "https://markup.shop.example").await;
    page.type_into("#entry-remark", markup).await;
    page.click("#entry-ok").await;
    page.until("the entry is listed", "document.querySelector('#entries').textContent.includes('markup.shop.example')")
        .await;
    let cell = "[...document.querySelectorAll('#entries tbody tr')].find(r => r.cells[0].textContent.includes('markup')).cells[1]";
    let shown = page.client.execute(&format!("return {cell}.textContent;"), vec![]).await.unwrap();
    assert_eq!(shown, markup);
    let elements = page.client.execute(&format!("return {cell}.children.length;"), vec![]).await.unwrap();
    assert_eq!(elements, 0, "no element made of the remark");
    assert_eq!(page.client.execute("return window.pwned === undefined;", vec![]).await.unwrap(), true);

    // 400 px wide: one column, nothing wider than the window
    page.client.set_window_size(400, 900).await.unwrap();
    page.until("no sideways scrolling", "document.documentElement.scrollWidth <= window.innerWidth").await;
    page.client.set_window_size(1400, 1000).await.unwrap();

    // create an app, then delete it (after confirming)
    page.click("#new-app").await;
    page.type_into("#new-app-id", "fresh").await;
    page.type_into("#new-app-name", "Fresh app").await;
    page.click("#app-ok").await;
    page.text_until("#app-id", |t| t == "fresh").await;
    assert_eq!(page.find("#app-name").await.text().await.unwrap(), "Fresh app");
    assert_eq!(app_json(admin, "fresh").await["name"], "Fresh app");
    page.click("#delete-app").await;
    page.text_until("#confirm-text", |t| t.contains("Delete app Fresh app (fresh)")).await;
    page.click("#confirm-ok").await;
    page.text_until("#app-id", |t| t != "fresh").await;
    assert_eq!(admin_request(admin, "GET", "/v1/apps/fresh", None, Some(ADMIN)).await.0, 404);
    page.find("#app-select").await.select_by_value("shop").await.unwrap();
    page.text_until("#app-id", |t| t == "shop").await;

    // a viewer sees the same, read-only
    page.click("#sign-out").await;
    page.type_into("#token", VIEWER).await;
    page.click("#signin-form button[type=submit]").await;
    page.text_until("#who", |t| t == "vera (viewer)").await;
    page.text_until("#app-id", |t| t == "shop").await;
    page.until("the list is shown", "document.querySelector('#entries').textContent.includes('api.shop.example')")
        .await;
    assert!(!page.visible("#add-entry").await && !page.visible("#delete-app").await && !page.visible("#new-app").await);
    assert_eq!(page.client.find_all(Locator::Css("#entries button")).await.unwrap().len(), 0, "no Edit or Delete");
    assert!(!page.find("input[name=action][value=open]").await.is_enabled().await.unwrap(), "the switch is read-only");
    assert!(page.visible("#refusals").await);
    assert_eq!(page.client.find_all(Locator::Css("#refusals button, #revisions button")).await.unwrap().len(), 0);
    page.client.close().await.unwrap();
}
