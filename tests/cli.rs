//! The command line as an operator uses it: `check`, `explain`, and `run` until SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_miniapp-gateway");

fn gateway(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).env_remove("MINIAPP_GATEWAY_CONFIG").output().unwrap()
}

fn shipped_config() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml").display().to_string()
}

#[test]
fn check_accepts_the_shipped_config() {
    let out = gateway(&["check", "-c", &shipped_config()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok: 1 apps, 5 entries\n");
}

#[test]
fn check_reports_every_error_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        r#"[policy]
unknown_app = "ghost"

[[app]]
id = "demo"
server_domains = [
  "http://api.shop.example",
  "https://api.shop.example/v1",
  "login.*.shop.example",
  "https://api.shop.example:70000",
]
webview_domains = ["localhost", "a.example", "A.example"]

[[app]]
id = "demo"
"#,
    )
    .unwrap();
    let out = gateway(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let p = path.display();
    let expected = [
        format!(r#"{p}:2:15: unknown_app = "ghost" names no app (use "deny" or an app id)"#),
        format!(
            r#"{p}:7:3: "http://api.shop.example" in server_domains: only https:// and wss:// entries are allowed"#
        ),
        format!(r#"{p}:8:3: "https://api.shop.example/v1" in server_domains: an entry must not contain a path"#),
        format!(
            r#"{p}:9:3: "login.*.shop.example" in server_domains: a wildcard is only allowed as a whole leading label (*.example.com)"#
        ),
        format!(
            r#"{p}:10:3: "https://api.shop.example:70000" in server_domains: the port must be a number from 1 to 65535"#
        ),
        format!(r#"{p}:12:20: "localhost" in webview_domains: localhost is not allowed"#),
        format!(r#"{p}:12:46: "A.example" duplicates webview_domains[1]"#),
        format!(r#"{p}:15:6: duplicate app id "demo" (first defined at {p}:5:6)"#),
    ];
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().collect::<Vec<_>>(), expected);
}

#[test]
fn check_reports_syntax_errors_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("syntax.toml");
    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:8080\"\nbogus = true\n").unwrap();
    let out = gateway(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with(&format!("{}:3:1: unknown field `bogus`", path.display())), "{stderr}");
    let out = gateway(&["check", "-c", "/nonexistent/gateway.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("/nonexistent/gateway.toml:1:1: cannot read the config file")
    );
}

#[test]
fn explain_prints_the_decision_and_exits_by_it() {
    let config = shipped_config();
    let out = gateway(&["explain", "-c", &config, "--app", "demo", "https://api.shop.example/v1/items"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "allow whitelisted server_domains[0] \"api.shop.example\"\n");
    let out = gateway(&["explain", "-c", &config, "--app", "demo", "https://evil.example/"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "deny not_whitelisted: evil.example:443 is not on the server domain whitelist of app demo\n"
    );
    let out = gateway(&["explain", "-c", &config, "--app", "demo", "--channel", "webview", "https://m.shop.example/"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "allow whitelisted webview_domains[0] \"*.shop.example\"\n");
    let out = gateway(&["explain", "-c", &config, "--app", "demo", "http://api.shop.example/"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("deny https_required: "));
    let out = gateway(&["explain", "-c", &config, "--app", "demo", "not a url"]);
    assert_eq!(out.status.code(), Some(2));
    let out = gateway(&["explain", "-c", "/nonexistent.toml", "--app", "demo", "https://a.example/"]);
    assert_eq!(out.status.code(), Some(2));
    let out = gateway(&["explain", "-c", &config, "--app", "demo", "--channel", "sockets", "https://a.example/"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A gateway process on port 0; its addresses are read from the startup line.
struct Process {
    child: Child,
    proxy: std::net::SocketAddr,
    admin: Option<std::net::SocketAddr>,
    /// The console's URL as the startup line names it.
    console: String,
}

impl Process {
    fn start(config: &Path) -> Process {
        let mut command = Command::new(BIN);
        command.args(["run", "-c", config.to_str().unwrap()]);
        Process::spawn(command)
    }

    /// Start it with at most `limit` file descriptors (the shell's `ulimit -n`).
    fn start_with_descriptor_limit(config: &Path, limit: u32) -> Process {
        let mut command = Command::new("sh");
        let script = format!("ulimit -n {limit} && exec \"$0\" run -c \"$1\"");
        command.args(["-c", &script, BIN, config.to_str().unwrap()]);
        Process::spawn(command)
    }

    fn spawn(mut command: Command) -> Process {
        let mut child = command.env("RUST_LOG", "info").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (found, startup) = std::sync::mpsc::channel();
        // Read stderr on a thread (and keep draining it, so the child never blocks on a full
        // pipe); the first line naming `listen=` is the startup line.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listen=").nth(1) {
                    let proxy = rest.split([',', ' ']).next().unwrap_or_default().to_owned();
                    let field = |name: &str| {
                        line.split(&format!(" {name}="))
                            .nth(1)
                            .and_then(|a| a.split(' ').next())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let _ = found.send((proxy, field("admin"), field("console")));
                }
            }
        });
        let (proxy, admin, console) = startup.recv_timeout(WAIT).expect("no startup line from the gateway");
        let proxy = proxy.parse().unwrap();
        let admin = admin.parse().ok();
        Process { child, proxy, admin, console }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the gateway did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stdout(&mut self) -> String {
        let mut out = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut out).unwrap();
        out
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn process_config(dir: &Path, origin: std::net::SocketAddr, grace: &str) -> std::path::PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[limits]\nshutdown_grace = \"{grace}\"\n[resolve]\n\"api.shop.example\" = \"{origin}\"\n\
             [[app]]\nid = \"demo\"\nserver_domains = [\"api.shop.example\"]\n"
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_drains_open_tunnels() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Process::start(&process_config(dir.path(), origin.addr, "30s"));
    let answer = connect_as(gw.proxy, "demo", "x", "api.shop.example:443").await;
    assert_eq!(answer.status, 200);
    let mut tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");

    gw.signal("TERM");
    // new connections are refused once the listener is closed
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(gw.proxy).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // the open tunnel still carries traffic
    assert_eq!(https_request(&mut tls, "GET", "/bytes/100000", b"").await.len(), 100_000);
    assert!(gw.child.try_wait().unwrap().is_none(), "exited with a tunnel open");
    drop(tls);
    let status = gw.wait_exit(WAIT);
    assert!(status.success(), "{status}");
    let log = gw.stdout();
    let line: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!((line["reason"].as_str(), line["closed_by"].as_str()), (Some("whitelisted"), Some("peer")));
    assert!(line["bytes_down"].as_u64().unwrap() > 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_still_open_after_the_grace_are_closed() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Process::start(&process_config(dir.path(), origin.addr, "300ms"));
    let answer = connect_as(gw.proxy, "demo", "x", "api.shop.example:443").await;
    assert_eq!(answer.status, 200);
    let _tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
    gw.signal("INT");
    let status = gw.wait_exit(WAIT);
    assert!(status.success(), "{status}");
    let log = gw.stdout();
    let line: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(line["closed_by"], "shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_startup_line_names_the_console_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n").unwrap();
    let gw = Process::start(&path);
    let admin = gw.admin.expect("the startup line names the admin address");
    assert_eq!(gw.console, format!("http://{admin}/console/"));
    let (status, headers, page) = admin_request(admin, "GET", "/console/", None, None).await;
    assert_eq!((status, headers["content-type"].as_str()), (200, "text/html; charset=utf-8"));
    assert!(String::from_utf8(page).unwrap().contains("<title>miniapp-gateway console</title>"));
    let other = tempfile::tempdir().unwrap();
    let without = Process::start(&process_config(other.path(), "127.0.0.1:1".parse().unwrap(), "1s"));
    assert_eq!((without.admin, without.console.as_str()), (None, "off"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = process_config(dir.path(), origin.addr, "1s");
    let text =
        std::fs::read_to_string(&path).unwrap().replace("[server]\n", "[server]\nadmin_listen = \"127.0.0.1:0\"\n");
    std::fs::write(&path, text).unwrap();
    let gw = Process::start(&path);
    let admin = gw.admin.expect("the startup line names the admin address");
    let generation = || async {
        let (_, _, body) = admin_request(admin, "GET", "/metrics", None, None).await;
        metric_value(&String::from_utf8(body).unwrap(), "gateway_config_generation")
    };
    assert_eq!(generation().await, 1.0);
    gw.signal("HUP");
    let deadline = Instant::now() + WAIT;
    while generation().await != 2.0 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learn_turns_a_recorded_report_log_into_entries() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let mut resolve = String::new();
    for host in ["api.shop.example", "img.cdn.example", "m.shop.example", "a.static.example"] {
        resolve.push_str(&format!("\"{host}\" = \"{}\"\n", origin.addr));
    }
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[limits]\nshutdown_grace = \"1s\"\n[resolve]\n{resolve}\
             [[app]]\nid = \"shop\"\naction = \"report\"\nserver_domains = [\"api.shop.example\"]\n"
        ),
    )
    .unwrap();
    let mut gw = Process::start(&path);
    let webview = [("Proxy-Authorization", basic("shop", "x")), ("X-Miniapp-Channel", "webview".to_owned())];
    let webview: Vec<(&str, &str)> = webview.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for (target, headers) in [
        ("api.shop.example:443", None),
        ("img.cdn.example:443", None),
        ("img.cdn.example:443", None),
        ("a.static.example:8443", None),
        ("m.shop.example:443", Some(&webview)),
    ] {
        let answer = match headers {
            Some(headers) => connect(gw.proxy, target, headers).await,
            None => connect_as(gw.proxy, "shop", "x", target).await,
        };
        assert_eq!(answer.status, 200, "{target}");
    }
    gw.signal("TERM");
    assert!(gw.wait_exit(WAIT).success());
    let log = dir.path().join("access.log");
    std::fs::write(&log, gw.stdout()).unwrap();

    let out = gateway(&["learn", log.to_str().unwrap(), "--wildcard", "static.example"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let learned = String::from_utf8(out.stdout).unwrap();
    let body: Vec<&str> = learned.lines().skip_while(|l| !l.starts_with("[[app]]")).collect();
    assert_eq!(
        body,
        [
            "[[app]]",
            "id = \"shop\"",
            "server_domains = [",
            "  \"https://*.static.example:8443\",                 # 1 tunnel",
            "  \"https://img.cdn.example\",                       # 2 tunnels",
            "]",
            "webview_domains = [",
            "  \"https://m.shop.example\",                        # 1 tunnel",
            "]",
        ],
        "{learned}"
    );
    // the whitelisted tunnel carried no TLS: report mode recorded `not_tls`, which no entry fixes
    let header = "# learned from 5 access log lines: 5 report decisions, 1 apps\n\
                  # not learnable: 1 report lines with reason not_tls\n";
    assert!(learned.starts_with(header), "{learned}");
    let out = gateway(&["learn", "/nonexistent.log"]);
    assert_eq!(out.status.code(), Some(2));
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // after the command: state is field 3; utime and stime are fields 14 and 15
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ is 100 on Linux
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_it_answers_overloaded_without_spinning_and_recovers() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Process::start_with_descriptor_limit(&process_config(dir.path(), origin.addr, "1s"), 64);
    // Hold connections until the gateway has no descriptor left for another.
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(tokio::net::TcpStream::connect(gw.proxy).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut overloaded = 0;
    for _ in 0..20 {
        let answer = connect_as(gw.proxy, "demo", "x", "api.shop.example:443").await;
        if (answer.status, answer.reason()) == (503, "overloaded") {
            overloaded += 1;
        }
    }
    assert!(overloaded >= 15, "{overloaded} of 20 CONNECTs were answered 503 overloaded");
    // Out of descriptors with a connection waiting in the backlog: no busy loop.
    let _waiting = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let before = cpu_seconds(gw.child.id());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_seconds(gw.child.id()) - before;
    assert!(used < 0.5, "the gateway used {used} s of CPU in 2 s while out of descriptors");
    // Descriptors back: it serves again.
    drop(held);
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = connect_as(gw.proxy, "demo", "x", "api.shop.example:443").await;
        if answer.status == 200 {
            let mut tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
            assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");
            break;
        }
        assert!(Instant::now() < deadline, "it did not recover: {} {}", answer.status, answer.reason());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_makes_it_unready_and_it_keeps_accepting_for_the_shutdown_delay() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = process_config(dir.path(), origin.addr, "5s");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[server]\n", "[server]\nadmin_listen = \"127.0.0.1:0\"\n")
        .replace("[limits]\n", "[limits]\nshutdown_delay = \"5s\"\n");
    std::fs::write(&path, text).unwrap();
    let mut gw = Process::start(&path);
    let admin = gw.admin.unwrap();
    assert_eq!(admin_request(admin, "GET", "/readyz", None, None).await.0, 200);
    gw.signal("TERM");
    let deadline = Instant::now() + WAIT;
    while admin_request(admin, "GET", "/readyz", None, None).await.0 != 503 {
        assert!(Instant::now() < deadline, "/readyz stayed 200 after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // unready, and still accepting: clients that have not heard yet are served
    let answer = connect_as(gw.proxy, "demo", "x", "api.shop.example:443").await;
    assert_eq!(answer.status, 200);
    drop(answer);
    let status = gw.wait_exit(WAIT);
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Process::start(&process_config(dir.path(), origin.addr, "60s"));
    let answer = connect_as(gw.proxy, "demo", "x", "api.shop.example:443").await;
    let _tls = tls_over(answer.stream, &origin.ca, "api.shop.example").await;
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(gw.child.try_wait().unwrap().is_none(), "draining its open tunnel for up to 60 s");
    gw.signal("INT");
    let status = gw.wait_exit(Duration::from_secs(5));
    assert!(!status.success(), "a second signal is an abrupt exit: {status}");
}

/// Every file `certs DIR --app demo` writes, with its bytes.
fn dev_cert_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    ["ca.crt", "ca.key", "gateway.crt", "gateway.key", "demo.crt", "demo.key"]
        .into_iter()
        .map(|file| (file.to_owned(), std::fs::read(dir.join(file)).unwrap()))
        .collect()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn certs_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("dev");
    let out = gateway(&["certs", certs.to_str().unwrap(), "--app", "demo"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first = dev_cert_files(&certs);

    let out = gateway(&["certs", certs.to_str().unwrap(), "--app", "demo"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8(out.stderr).unwrap();
    for (file, _) in &first {
        assert!(stderr.contains(&certs.join(file).display().to_string()), "{file} not named: {stderr}");
    }
    assert!(stderr.contains("invalidates every certificate it signed"), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(dev_cert_files(&certs), first, "a refused run changed the files");

    // One existing file among new ones is enough to refuse, and nothing else is written.
    let partial = dir.path().join("partial");
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join("demo.crt"), "mine").unwrap();
    let out = gateway(&["certs", partial.to_str().unwrap(), "--app", "demo"]);
    assert_eq!(out.status.code(), Some(1));
    let left: Vec<_> = std::fs::read_dir(&partial).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["demo.crt"]);
    assert_eq!(std::fs::read(partial.join("demo.crt")).unwrap(), b"mine");
}

#[test]
fn certs_force_replaces_keys_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = gateway(&["certs", dir.path().to_str().unwrap(), "--app", "demo"]);
    assert!(out.status.success());
    let first = dev_cert_files(dir.path());
    for key in ["ca.key", "gateway.key", "demo.key"] {
        assert_eq!(mode(&dir.path().join(key)), 0o600, "{key}");
        std::fs::set_permissions(dir.path().join(key), std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    let out = gateway(&["certs", dir.path().to_str().unwrap(), "--app", "demo", "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let second = dev_cert_files(dir.path());
    for ((file, before), (_, after)) in first.iter().zip(&second) {
        assert_ne!(before, after, "{file} was not replaced");
        let expected = if file.ends_with(".key") { 0o600 } else { 0o644 };
        assert_eq!(mode(&dir.path().join(file)), expected, "{file}");
    }
    // no temporary file is left behind
    let mut names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["ca.crt", "ca.key", "demo.crt", "demo.key", "gateway.crt", "gateway.key"]);
}

#[test]
fn certs_never_writes_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("dev");
    std::fs::create_dir(&certs).unwrap();
    let precious = dir.path().join("precious");
    std::fs::write(&precious, "do not touch").unwrap();
    std::os::unix::fs::symlink(&precious, certs.join("ca.key")).unwrap();
    // a dangling one: following it would create the file it points at
    let elsewhere = dir.path().join("elsewhere.key");
    std::os::unix::fs::symlink(&elsewhere, certs.join("gateway.key")).unwrap();

    let out = gateway(&["certs", certs.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains(&certs.join("ca.key").display().to_string()), "{stderr}");
    assert!(stderr.contains(&certs.join("gateway.key").display().to_string()), "{stderr}");
    assert!(!certs.join("ca.crt").exists());

    let out = gateway(&["certs", certs.to_str().unwrap(), "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "do not touch");
    assert!(!elsewhere.exists(), "a dangling symlink was followed");
    for key in ["ca.key", "gateway.key"] {
        let path = certs.join(key);
        assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_file(), "{key} is still a symlink");
        assert_eq!(mode(&path), 0o600);
        assert!(std::fs::read_to_string(&path).unwrap().starts_with("-----BEGIN PRIVATE KEY-----"));
    }
}

#[test]
fn apps_export_then_import_is_a_no_op_and_a_bad_import_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("apps")).unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "[policy]\napps_dir = \"apps\"\n\n[[app]]\nid = \"main\"\nserver_domains = [\"a.example\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("apps/shop.toml"),
        "[[app]]\nid = \"shop\"\ntoken = \"t\"\nserver_domains = [{ domain = \"b.example\", remark = \"B\" }]\n",
    )
    .unwrap();
    let c = config.to_str().unwrap();
    for format in ["toml", "json"] {
        let out = gateway(&["apps", "export", "-c", c, "--format", format]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let export = dir.path().join(format!("export.{format}"));
        std::fs::write(&export, &out.stdout).unwrap();
        let diff = gateway(&["apps", "diff", "-c", c, export.to_str().unwrap(), "--prune"]);
        assert_eq!(String::from_utf8(diff.stdout).unwrap(), "0 changes\n", "{format}");
    }
    // a changed and a new app: the diff says so, the import makes it so
    let text = std::fs::read_to_string(dir.path().join("export.toml")).unwrap();
    let changed = text.replace("\"b.example\"", "\"c.example\"") + "[[app]]\nid = \"fresh\"\n";
    let file = dir.path().join("changed.toml");
    std::fs::write(&file, changed).unwrap();
    let diff = gateway(&["apps", "diff", "-c", c, file.to_str().unwrap()]);
    let diff = String::from_utf8(diff.stdout).unwrap();
    assert_eq!(diff, "~ shop: server_domains +c.example -b.example\n+ fresh (new)\n2 changes\n");
    let import = gateway(&["apps", "import", "-c", c, file.to_str().unwrap()]);
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
    assert_eq!(String::from_utf8(gateway(&["check", "-c", c]).stdout).unwrap(), "ok: 3 apps, 2 entries\n");
    let shop = std::fs::read_to_string(dir.path().join("apps/shop.toml")).unwrap();
    assert!(shop.starts_with("# revision 2") && shop.contains("token = \"t\""), "{shop}");
    assert!(std::fs::read_to_string(dir.path().join("apps.audit.jsonl")).unwrap().contains("\"user\":\"import\""));
    // one invalid app: nothing at all is written
    let bad = std::fs::read_to_string(&file).unwrap().replace("\"c.example\"", "\"http://d.example\"")
        + "[[app]]\nid = \"another\"\n";
    std::fs::write(&file, bad).unwrap();
    let before = std::fs::read(dir.path().join("apps/shop.toml")).unwrap();
    let import = gateway(&["apps", "import", "-c", c, file.to_str().unwrap()]);
    assert_eq!(import.status.code(), Some(1));
    assert!(String::from_utf8(import.stderr).unwrap().contains("only https:// and wss:// entries are allowed"));
    assert_eq!(std::fs::read(dir.path().join("apps/shop.toml")).unwrap(), before);
    assert!(!dir.path().join("apps/another.toml").exists());
}

#[test]
fn an_import_killed_at_any_moment_leaves_every_app_whole() {
    const APPS: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("apps")).unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, "[policy]\napps_dir = \"apps\"\n").unwrap();
    let c = config.to_str().unwrap();
    // Two versions of every app; each import moves all of them to the other one.
    let version = |v: usize| -> String {
        (0..APPS)
            .map(|i| {
                format!(
                    "[[app]]\nid = \"app{i}\"\nserver_domains = [{{ domain = \"v{v}.app{i}.example\", remark = \"{}\" }}]\n",
                    "r".repeat(150)
                )
            })
            .collect()
    };
    let files = [dir.path().join("v0.toml"), dir.path().join("v1.toml")];
    for (v, file) in files.iter().enumerate() {
        std::fs::write(file, version(v)).unwrap();
    }
    let import = gateway(&["apps", "import", "-c", c, files[0].to_str().unwrap()]);
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
    let started = Instant::now();
    let import = gateway(&["apps", "import", "-c", c, files[1].to_str().unwrap()]);
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
    let whole = started.elapsed();

    // Twelve rounds, and more (up to 40) until three kills have landed between two writes.
    let (mut killed_midway, mut rounds) = (0, 0);
    for round in 0..40u32 {
        if round >= 12 && killed_midway >= 3 {
            break;
        }
        rounds += 1;
        let file = &files[round as usize % 2];
        let mut child = Command::new(BIN)
            .args(["apps", "import", "-c", c, file.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // SIGKILL at moments spread over the time a whole import took.
        std::thread::sleep(whole * (2 * (round % 12) + 1) / 24);
        let _ = child.kill();
        let _ = child.wait();

        // Every app file is one whole version or the other, and the config loads.
        let mut versions = [0; 2];
        for i in 0..APPS {
            let text = std::fs::read_to_string(dir.path().join(format!("apps/app{i}.toml"))).unwrap();
            let v = usize::from(text.contains(&format!("\"v1.app{i}.example\"")));
            assert!(text.contains(&format!("\"v{v}.app{i}.example\"")) && text.ends_with("]\n"), "{text}");
            versions[v] += 1;
        }
        if versions[0] > 0 && versions[1] > 0 {
            killed_midway += 1;
        }
        let check = gateway(&["check", "-c", c]);
        assert!(check.status.success(), "round {round}: {}", String::from_utf8_lossy(&check.stderr));
    }
    eprintln!("{killed_midway} of {rounds} imports were killed between two apps' writes (a whole import: {whole:?})");
    assert!(killed_midway > 0, "no kill landed between two writes: the test showed nothing");

    // The history reads past anything a kill cut short, and the next import completes.
    let import = gateway(&["apps", "import", "-c", c, files[1].to_str().unwrap()]);
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
    let check = gateway(&["check", "-c", c]);
    assert_eq!(String::from_utf8(check.stdout).unwrap(), format!("ok: {APPS} apps, {APPS} entries\n"));
    let diff = gateway(&["apps", "diff", "-c", c, files[1].to_str().unwrap()]);
    assert_eq!(String::from_utf8(diff.stdout).unwrap(), "0 changes\n");
}
