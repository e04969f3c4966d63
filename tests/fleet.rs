//! The PostgreSQL store against a real PostgreSQL server: the machine's `postgres` binaries,
//! a cluster made with `initdb` in a temporary directory, on a free loopback port, run as an
//! unprivileged user (PostgreSQL refuses root), with password authentication, stopped at the
//! end of each test.
//!
//! Needs PostgreSQL's server binaries (`postgresql` from Debian). Without them the tests say so
//! and pass, unless `MINIAPP_REQUIRE_POSTGRES=1` (set by `.ci/run`, which installs them) makes
//! them a failure.

mod common;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_miniapp-gateway");
const PASSWORD: &str = "fleet-test-password";

/// Where `initdb` and `postgres` are: on `PATH`, or Debian's versioned directory.
fn server_binaries() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file());
    on_path.or_else(|| {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(Result::ok)
            .map(|entry| entry.path().join("bin"))
            .filter(|bin| bin.join("initdb").is_file())
            .collect();
        versions.sort();
        versions.pop()
    })
}

/// The uid and gid to run PostgreSQL as: ours, or, as root, those of the `postgres` user (or
/// `nobody`).
fn unprivileged() -> (u32, u32) {
    // SAFETY: getuid/getgid only read the process's ids.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if uid != 0 {
        return (uid, gid);
    }
    for name in ["postgres", "nobody"] {
        let name = std::ffi::CString::new(name).unwrap();
        // SAFETY: getpwnam reads the user database; the result is copied out at once.
        let entry = unsafe { libc::getpwnam(name.as_ptr()) };
        if !entry.is_null() {
            // SAFETY: non-null, as checked.
            return unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
        }
    }
    panic!("running as root, with no postgres or nobody user to run PostgreSQL as");
}

/// A PostgreSQL server of the test's own.
struct Postgres {
    port: u16,
    server: Option<Child>,
    bin: PathBuf,
    data: PathBuf,
    owner: (u32, u32),
    dir: tempfile::TempDir,
}

impl Postgres {
    /// Start one, or `None` (the test skips) when the binaries are missing and not required.
    fn start() -> Option<Postgres> {
        let Some(bin) = server_binaries() else {
            assert!(
                std::env::var("MINIAPP_REQUIRE_POSTGRES").is_err(),
                "MINIAPP_REQUIRE_POSTGRES is set but PostgreSQL's server binaries are not installed"
            );
            eprintln!("skipped: PostgreSQL's server binaries (initdb, postgres) are not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let (uid, gid) = unprivileged();
        // SAFETY: chown of a directory this test made.
        let owned = unsafe {
            let path = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
            libc::chown(path.as_ptr(), uid, gid)
        };
        assert_eq!(owned, 0, "chown {}", dir.path().display());
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        // SAFETY: as above, a file this test made.
        unsafe {
            let path = std::ffi::CString::new(pwfile.as_os_str().as_encoded_bytes()).unwrap();
            libc::chown(path.as_ptr(), uid, gid);
        }
        let init = Command::new(bin.join("initdb"))
            .args(["-D", data.to_str().unwrap(), "-U", "gateway", "--auth=scram-sha-256", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .uid(uid)
            .gid(gid)
            .output()
            .expect("run initdb");
        assert!(init.status.success(), "initdb: {}", String::from_utf8_lossy(&init.stderr));
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut pg = Postgres { port, server: None, bin, data, owner: (uid, gid), dir };
        pg.resume();
        Some(pg)
    }

    /// Start the server (again, on the same port and data).
    fn resume(&mut self) {
        assert!(self.server.is_none(), "already running");
        let server = Command::new(self.bin.join("postgres"))
            .args(["-D", self.data.to_str().unwrap(), "-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.path().display()))
            .uid(self.owner.0)
            .gid(self.owner.1)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        self.server = Some(server);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "postgres did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Freeze (SIGSTOP) or thaw (SIGCONT) the server and all its processes: a database that
    /// holds its connections open and answers nothing, as behind a network partition.
    fn freeze(&self, frozen: bool) {
        let Some(server) = &self.server else { return };
        let postmaster = server.id();
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // the field after the parenthesized command name: state, then the parent's pid
            let parent =
                stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if parent == Some(postmaster) {
                pids.push(pid);
            }
        }
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        for pid in pids {
            // SAFETY: signalling the server this test started and its children.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// Stop the server (fast shutdown: clients are disconnected) and wait until it has.
    fn pause(&mut self) {
        self.freeze(false);
        if let Some(mut server) = self.server.take() {
            // SAFETY: signalling the child this test started.
            unsafe { libc::kill(server.id() as libc::pid_t, libc::SIGINT) };
            let _ = server.wait();
        }
    }

    fn url(&self) -> String {
        format!("postgres://gateway@127.0.0.1:{}/postgres?sslmode=disable", self.port)
    }

    /// A gateway config whose store is this database (the password in a file beside it).
    fn config(&self, dir: &Path) -> PathBuf {
        std::fs::write(dir.join("db-password"), PASSWORD).unwrap();
        let path = dir.join("gateway.toml");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nbackend = \"postgres\"\nurl = \"{}\"\n\
             password_file = \"db-password\"\ncache = \"apps.json\"\n",
            self.url()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={} user=gateway password={PASSWORD} dbname=postgres", self.port),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connect to the test database");
        tokio::spawn(connection);
        client
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.pause();
    }
}

fn gateway(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).env_remove("MINIAPP_GATEWAY_DATABASE_PASSWORD").output().unwrap()
}

#[tokio::test]
async fn replicas_starting_together_apply_each_migration_once() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = pg.config(dir.path());
    let c = config.to_str().unwrap().to_owned();
    // Three at once, as three replicas of a Deployment starting together.
    let runs: Vec<std::thread::JoinHandle<std::process::Output>> = (0..3)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || gateway(&["store", "migrate", "-c", &c]))
        })
        .collect();
    let outputs: Vec<String> = runs
        .into_iter()
        .map(|run| {
            let out = run.join().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        })
        .collect();
    let known = miniapp_gateway::pg::MIGRATIONS.last().unwrap().0;
    let migrated = outputs.iter().filter(|out| out.starts_with("schema migrated from version 0")).count();
    assert_eq!(migrated, 1, "{outputs:?}");
    let waited = format!("schema at version {known}: nothing to do\n");
    assert_eq!(outputs.iter().filter(|out| **out == waited).count(), 2, "{outputs:?}");

    let db = pg.client().await;
    let versions: Vec<i32> = db
        .query("SELECT version FROM gateway_schema ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let expected: Vec<i32> = miniapp_gateway::pg::MIGRATIONS.iter().map(|(version, _)| *version).collect();
    assert_eq!(versions, expected, "each migration recorded once");
    let tables: i64 = db
        .query_one("SELECT count(*) FROM pg_tables WHERE tablename IN ('gateway_apps', 'gateway_audit')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 2);
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = pg.config(dir.path());
    let c = config.to_str().unwrap();
    assert!(gateway(&["store", "migrate", "-c", c]).status.success());
    pg.client().await.execute("INSERT INTO gateway_schema (version) VALUES (999)", &[]).await.unwrap();
    let out = gateway(&["store", "migrate", "-c", c]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("schema is at version 999, newer than this gateway knows"), "{stderr}");
}

#[tokio::test]
async fn a_wrong_password_or_no_database_is_a_clear_error() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = pg.config(dir.path());
    std::fs::write(dir.path().join("db-password"), "wrong").unwrap();
    let out = gateway(&["store", "migrate", "-c", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("password authentication failed"), "{stderr}");
    // the password in the URL is refused by check: it belongs in a file or the environment
    let text = std::fs::read_to_string(&config).unwrap().replace("gateway@", "gateway:secret@");
    std::fs::write(&config, text).unwrap();
    let out = gateway(&["check", "-c", config.to_str().unwrap()]);
    assert!(String::from_utf8(out.stderr).unwrap().contains("url holds a password"));
    // and `run` with a wrong password refuses to start (it is not an outage: the cache is not used)
    let text = std::fs::read_to_string(&config).unwrap().replace("gateway:secret@", "gateway@");
    std::fs::write(&config, text).unwrap();
    let out = gateway(&["run", "-c", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("cannot use the store: the database refused: password authentication failed"), "{stderr}");
    // with no database and no cache, it refuses to start rather than start with no apps
    drop(pg);
    let out = gateway(&["run", "-c", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("cannot reach the store") && stderr.contains("cannot start from its cache"), "{stderr}");
}

fn record(app: &str, revision: u64, outcome: &str) -> miniapp_gateway::audit::Record {
    miniapp_gateway::audit::Record {
        time: miniapp_gateway::audit::Record::now(),
        app: app.into(),
        revision: Some(revision),
        user: "ed".into(),
        client: "test".into(),
        change: "replace".into(),
        outcome: outcome.into(),
        before: None,
        after: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_keeps_revisions_and_history_and_refuses_a_stale_write() {
    use miniapp_gateway::store::{AppDoc, Place, Store, WriteError};
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = pg.config(dir.path());
    let text = std::fs::read_to_string(&config).unwrap() + "\n[[app]]\nid = \"main\"\n";
    std::fs::write(&config, text).unwrap();
    let miniapp_gateway::config::StoreSettings::Postgres(settings) =
        miniapp_gateway::config::load(&config).unwrap().store
    else {
        panic!("not the postgres store")
    };
    let store = std::sync::Arc::new(miniapp_gateway::pg::PgStore::connect(&settings, &config, true).await.unwrap());
    let doc = |domain: &str| -> AppDoc {
        let text = format!("[[app]]\nid = \"shop\"\nserver_domains = [{{ domain = \"{domain}\", remark = \"r\" }}]\n");
        miniapp_gateway::store::parse_apps(&text).unwrap().remove(0)
    };
    let (first, second) = (doc("a.shop.example"), doc("b.shop.example"));
    // Its methods block: off the async workers, as the admin API calls them.
    tokio::task::spawn_blocking(move || {
        assert_eq!(store.place("shop").unwrap(), Place::Free);
        assert!(matches!(store.place("main").unwrap(), Place::ReadOnly(_)), "the main config's apps are read-only");
        assert_eq!(store.next_revision("shop", None).unwrap(), 1);
        store.put(&store.render("shop", Some(&first), 1), None, &record("shop", 1, "applied")).unwrap();
        let Place::Writable(one) = store.place("shop").unwrap() else { panic!("not written") };
        assert_eq!((one.revision, one.doc.server_domains[0].value.as_str()), (1, "a.shop.example"));
        // a write made against what is no longer there is refused, and changes nothing
        let stale = store.put(&store.render("shop", Some(&second), 2), None, &record("shop", 2, "applied"));
        assert!(matches!(stale, Err(WriteError::Changed)), "{stale:?}");
        store.put(&store.render("shop", Some(&second), 2), Some(&one), &record("shop", 2, "applied")).unwrap();
        let revisions: Vec<Option<u64>> = store.history("shop").unwrap().iter().map(|r| r.revision).collect();
        assert_eq!(revisions, [Some(2), Some(1)]);
        // a change that could not be put in force goes back, and its number is spent
        store
            .restore(&store.render("shop", Some(&second), 2), Some(&one), &record("shop", 2, "reload_failed"))
            .unwrap();
        let Place::Writable(back) = store.place("shop").unwrap() else { panic!("gone") };
        assert_eq!((back.revision, back.doc.server_domains[0].value.as_str()), (1, "a.shop.example"));
        assert_eq!(store.next_revision("shop", Some(&back)).unwrap(), 3);
        let revisions: Vec<Option<u64>> = store.history("shop").unwrap().iter().map(|r| r.revision).collect();
        assert_eq!(revisions, [Some(1)], "the change undone is not in the history");
        // an undo never overwrites a change made after the one it undoes (another replica's)
        let Place::Writable(three) = ({
            store.put(&store.render("shop", Some(&second), 3), Some(&back), &record("shop", 3, "applied")).unwrap();
            store.place("shop").unwrap()
        }) else {
            panic!("gone")
        };
        let later = store.next_revision("shop", Some(&three)).unwrap();
        store.put(&store.render("shop", Some(&first), later), Some(&three), &record("shop", later, "applied")).unwrap();
        let undo =
            store.restore(&store.render("shop", Some(&second), 3), Some(&back), &record("shop", 3, "reload_failed"));
        assert!(undo.unwrap_err().to_string().contains("another change to the app came after it"));
        let Place::Writable(kept) = store.place("shop").unwrap() else { panic!("gone") };
        assert_eq!(kept.revision, later, "the later change stays");
        let back = kept;
        // a delete keeps the row (replicas see it) and its number
        let gone = store.next_revision("shop", Some(&back)).unwrap();
        store.put(&store.render("shop", None, gone), Some(&back), &record("shop", gone, "applied")).unwrap();
        assert_eq!(store.place("shop").unwrap(), Place::Free);
        assert_eq!(store.next_revision("shop", None).unwrap(), gone + 1);
    })
    .await
    .unwrap();
}

// ---- Replicas: gateways serving `backend = "postgres"`, as separate processes ----

/// A gateway process serving the test database.
struct Replica {
    child: Child,
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    /// Every line it logged so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// Names the replicas resolve to the test's TLS origin.
const HOSTS: [&str; 3] = ["api.shop.example", "cdn.shop.example", "pay.shop.example"];

/// The config of replica `name` in `dir`: its own listeners on port 0 and its own cache file,
/// the shared database, names resolved to `origin`, and `extra` lines in `[store]`.
fn replica_config(pg: &Postgres, dir: &Path, name: &str, origin: std::net::SocketAddr, extra: &str) -> PathBuf {
    std::fs::write(dir.join("db-password"), PASSWORD).unwrap();
    let resolve: String = HOSTS.iter().map(|host| format!("\"{host}\" = \"{origin}\"\n")).collect();
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n[resolve]\n{resolve}\n\
         [store]\nbackend = \"postgres\"\nurl = \"{}\"\npassword_file = \"db-password\"\n\
         cache = \"{name}-cache/apps.json\"\npoll_interval = \"300ms\"\n{extra}\n",
        pg.url()
    );
    std::fs::write(&path, text).unwrap();
    path
}

impl Replica {
    fn start(config: &Path) -> Replica {
        let mut child = Command::new(BIN)
            .args(["run", "-c", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .env_remove("MINIAPP_GATEWAY_DATABASE_PASSWORD")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (found, startup) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("miniapp-gateway started") {
                    let field = |name: &str| -> String {
                        line.split(&format!(" {name}=")).nth(1).and_then(|a| a.split(' ').next()).unwrap().to_owned()
                    };
                    let _ = found.send((field("listen"), field("admin")));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let Ok((proxy, admin)) = startup.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            panic!("no startup line from the replica:\n{}", log.lock().unwrap().join("\n"));
        };
        Replica { child, proxy: proxy.parse().unwrap(), admin: admin.parse().unwrap(), log }
    }

    async fn status(&self) -> serde_json::Value {
        let (status, body) = common::admin_json(self.admin, "GET", "/v1/status", None, None).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The store change number whose apps this replica enforces.
    async fn revision(&self) -> i64 {
        self.status().await["store"]["revision"].as_i64().unwrap()
    }

    async fn metric(&self, sample: &str) -> f64 {
        let (_, _, body) = common::admin_request(self.admin, "GET", "/metrics", None, None).await;
        common::metric_value(&String::from_utf8(body).unwrap(), sample)
    }

    /// What `CONNECT host:443` as app `shop` is answered: status and reason.
    async fn connect(&self, host: &str) -> (u16, String) {
        let answer = common::connect_as(self.proxy, "shop", "", &format!("{host}:443")).await;
        (answer.status, answer.reason().to_owned())
    }

    fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|line| line.contains(text))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait (at most 15 s) until `check` holds; `what` says what was waited for.
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(15), "waited 15 s for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Add `domain` to app `shop`'s server domains through `replica`'s admin API.
async fn add_domain(replica: &Replica, app: &str, domain: &str) -> (u16, serde_json::Value) {
    let body = format!("{{\"entry\":\"{domain}\"}}");
    common::admin_json(replica.admin, "POST", &format!("/v1/apps/{app}/server_domains"), Some(&body), None).await
}

/// Create app `app` with empty lists through `replica`'s admin API: its status.
async fn create_app(replica: &Replica, app: &str) -> u16 {
    let request = format!(
        "PUT /v1/apps/{app} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nIf-None-Match: *\r\n\
         Content-Length: 2\r\n\r\n{{}}",
        replica.admin
    );
    let answer = common::send_raw(replica.admin, &request).await;
    assert_eq!(answer.status, 201, "{}", String::from_utf8_lossy(&answer.body));
    answer.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_replica_is_enforced_by_the_others() {
    let Some(pg) = Postgres::start() else { return };
    let origin = common::Origin::start(&HOSTS).await;
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<Replica> = ["a", "b", "c"]
        .iter()
        .map(|name| Replica::start(&replica_config(&pg, dir.path(), name, origin.addr, "")))
        .collect();
    assert_eq!(create_app(&replicas[0], "shop").await, 201);
    for replica in &replicas {
        until("app shop on every replica", || async { replica.connect(HOSTS[0]).await.1 == "not_whitelisted" }).await;
    }
    let (status, written) = add_domain(&replicas[0], "shop", HOSTS[0]).await;
    assert_eq!(status, 201, "{written}");
    // in force on the replica that took it when it answers: no waiting
    assert_eq!(replicas[0].connect(HOSTS[0]).await.0, 200);
    let newest: i64 = pg.client().await.query_one("SELECT max(change) FROM gateway_apps", &[]).await.unwrap().get(0);
    for replica in &replicas[1..] {
        until("the write enforced on the other replicas", || async { replica.connect(HOSTS[0]).await.0 == 200 }).await;
        // a real tunnel, bytes through
        let answer = common::connect_as(replica.proxy, "shop", "", &format!("{}:443", HOSTS[0])).await;
        let mut tls = common::tls_over(answer.stream, &origin.ca, HOSTS[0]).await;
        assert_eq!(common::https_request(&mut tls, "GET", "/bytes/1000", b"").await.len(), 1000);
        // every replica says which store revision it enforces, and it is the store's newest
        assert_eq!(replica.revision().await, newest);
        assert_eq!(replica.metric("gateway_store_revision").await, newest as f64);
        assert_eq!(replica.metric("gateway_store_up").await, 1.0);
    }
    assert_eq!(replicas[0].revision().await, newest, "the replica that took the write enforces it when it answers");
    assert_eq!(replicas[1].connect(HOSTS[1]).await, (403, "not_whitelisted".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_writers_on_three_replicas_converge_on_one_revision_and_policy() {
    let Some(pg) = Postgres::start() else { return };
    let origin = common::Origin::start(&HOSTS).await;
    let dir = tempfile::tempdir().unwrap();
    let replicas: std::sync::Arc<Vec<Replica>> = std::sync::Arc::new(
        ["a", "b", "c"]
            .iter()
            .map(|name| Replica::start(&replica_config(&pg, dir.path(), name, origin.addr, "")))
            .collect(),
    );
    assert_eq!(create_app(&replicas[0], "shared").await, 201);
    // 16 writers, spread over the replicas: each creates an app of its own and adds an entry
    // to it and to the app they share (retrying when another replica's write came first).
    let writers: Vec<_> = (0..16)
        .map(|i| {
            let replicas = replicas.clone();
            tokio::spawn(async move {
                let replica = &replicas[i % 3];
                let own = format!("app{i}");
                assert_eq!(create_app(replica, &own).await, 201);
                for (app, domain) in
                    [(own.as_str(), format!("w{i}.own.example")), ("shared", format!("w{i}.shared.example"))]
                {
                    loop {
                        let (status, body) = add_domain(replica, app, &domain).await;
                        match status {
                            201 => break,
                            409 | 412 => tokio::task::yield_now().await,
                            _ => panic!("{status} {body}"),
                        }
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let db = pg.client().await;
    let newest: i64 = db.query_one("SELECT max(change) FROM gateway_apps", &[]).await.unwrap().get(0);
    for replica in replicas.iter() {
        until("every replica at the store's newest revision", || async { replica.revision().await == newest }).await;
    }
    let mut seen = Vec::new();
    for replica in replicas.iter() {
        let (status, mut apps) = common::admin_json(replica.admin, "GET", "/v1/apps?limit=100", None, None).await;
        assert_eq!(status, 200);
        apps.as_object_mut().unwrap().remove("generation");
        seen.push(apps);
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0], seen[2]);
    let apps = seen[0]["apps"].as_array().unwrap();
    assert_eq!(apps.len(), 17);
    let shared = apps.iter().find(|app| app["id"] == "shared").unwrap();
    assert_eq!(shared["server_domains"].as_array().unwrap().len(), 16, "{shared}");
    let rows: i64 = db.query_one("SELECT count(*) FROM gateway_apps", &[]).await.unwrap().get(0);
    assert_eq!(rows, 17);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_down_traffic_flows_writes_get_503_and_the_replicas_catch_up() {
    let Some(mut pg) = Postgres::start() else { return };
    let origin = common::Origin::start(&HOSTS).await;
    let dir = tempfile::tempdir().unwrap();
    let a = Replica::start(&replica_config(&pg, dir.path(), "a", origin.addr, ""));
    let b = Replica::start(&replica_config(&pg, dir.path(), "b", origin.addr, "ready_without_store = false"));
    assert_eq!(create_app(&a, "shop").await, 201);
    assert_eq!(add_domain(&a, "shop", HOSTS[0]).await.0, 201);
    until("b enforces the app", || async { b.connect(HOSTS[0]).await.0 == 200 }).await;

    pg.pause();
    for replica in [&a, &b] {
        until("gateway_store_up 0", || async { replica.metric("gateway_store_up").await == 0.0 }).await;
        // the last good policy stays in force
        assert_eq!(replica.connect(HOSTS[0]).await.0, 200);
        assert_eq!(replica.connect(HOSTS[1]).await, (403, "not_whitelisted".to_owned()));
        // writes wait for the store
        let (status, headers, body) = common::admin_request(
            replica.admin,
            "POST",
            "/v1/apps/shop/server_domains",
            Some(&format!("{{\"entry\":\"{}\"}}", HOSTS[1])),
            None,
        )
        .await;
        assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
        assert_eq!(headers.get("retry-after").map(String::as_str), Some("5"));
        assert!(String::from_utf8_lossy(&body).contains("the store cannot be reached"));
    }
    let status = |replica: &Replica| {
        let admin = replica.admin;
        async move { common::admin_request(admin, "GET", "/readyz", None, None).await.0 }
    };
    assert_eq!(status(&a).await, 200, "ready_without_store (the default): still ready");
    assert_eq!(status(&b).await, 503, "ready_without_store = false: not ready while the store is away");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let lag = b.metric("gateway_store_sync_lag_seconds").await;
    assert!(lag >= 1.0, "the lag grows while the store is away: {lag} {}", b.status().await);

    pg.resume();
    until("a reaches the store again", || async { a.metric("gateway_store_up").await == 1.0 }).await;
    assert_eq!(add_domain(&a, "shop", HOSTS[1]).await.0, 201);
    until("b catches up", || async { b.connect(HOSTS[1]).await.0 == 200 }).await;
    assert_eq!(b.metric("gateway_store_up").await, 1.0);
    assert_eq!(status(&b).await, 200);
    until("b's lag back to 0", || async { b.metric("gateway_store_sync_lag_seconds").await == 0.0 }).await;
    assert_eq!(a.revision().await, b.revision().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_while_the_database_is_down_serves_from_its_cache() {
    let Some(mut pg) = Postgres::start() else { return };
    let origin = common::Origin::start(&HOSTS).await;
    let dir = tempfile::tempdir().unwrap();
    let config = replica_config(&pg, dir.path(), "a", origin.addr, "");
    let a = Replica::start(&config);
    assert_eq!(create_app(&a, "shop").await, 201);
    assert_eq!(add_domain(&a, "shop", HOSTS[0]).await.0, 201);
    let revision = a.revision().await;
    let cache = dir.path().join("a-cache/apps.json");
    until("the cache holds the write", || async {
        std::fs::read_to_string(&cache).is_ok_and(|text| text.contains(HOSTS[0]))
    })
    .await;

    pg.pause();
    drop(a); // SIGKILL: no orderly stop
    let a = Replica::start(&config);
    assert!(a.logged("started from the store's cache"), "{:?}", a.log.lock().unwrap());
    assert_eq!(a.connect(HOSTS[0]).await.0, 200, "the cached policy is enforced");
    assert_eq!(a.connect(HOSTS[1]).await, (403, "not_whitelisted".to_owned()));
    let status = a.status().await;
    assert_eq!(
        (&status["store"]["from_cache"], &status["store"]["up"], status["store"]["revision"].as_i64()),
        (&serde_json::json!(true), &serde_json::json!(false), Some(revision)),
        "{status}"
    );
    // a replica with neither the store nor a cache does not start with no apps
    let fresh = replica_config(&pg, dir.path(), "fresh", origin.addr, "");
    let out = gateway(&["run", "-c", fresh.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot start from its cache"));

    pg.resume();
    until("the replica reaches the store", || async { a.status().await["store"]["up"] == true }).await;
    assert_eq!(a.status().await["store"]["from_cache"], false);
    assert_eq!(a.connect(HOSTS[0]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_notification_is_caught_by_the_poll() {
    let Some(pg) = Postgres::start() else { return };
    let origin = common::Origin::start(&HOSTS).await;
    let dir = tempfile::tempdir().unwrap();
    let a = Replica::start(&replica_config(&pg, dir.path(), "a", origin.addr, ""));
    // listening and caught up (lag 0) before the change is made
    until("a listens", || async { a.status().await["store"]["lag_seconds"] == 0.0 }).await;
    let mut db = pg.client().await;
    // A change whose notification never comes: written without NOTIFY (as if it was lost).
    let write = async |db: &mut tokio_postgres::Client, domain: &str| {
        let definition = format!("[[app]]\nid = \"shop\"\nserver_domains = [\"{domain}\"]\n");
        let tx = db.transaction().await.unwrap();
        tx.execute("SELECT pg_advisory_xact_lock(7883952290624647271)", &[]).await.unwrap();
        tx.execute(
            "INSERT INTO gateway_apps (id, revision, definition, change) VALUES ('shop', 1, $1, nextval('gateway_change'))
             ON CONFLICT (id) DO UPDATE SET definition = $1, revision = gateway_apps.revision + 1,
                 change = EXCLUDED.change",
            &[&definition],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    };
    write(&mut db, HOSTS[0]).await;
    until("the poll finds the change", || async { a.connect(HOSTS[0]).await.0 == 200 }).await;
    assert!(!a.logged("notification connection closed"), "the listener stayed up: the poll found it");

    // The listening connection killed, and a change made before it is back.
    let killed: i64 = db
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'miniapp-gateway'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 1);
    write(&mut db, HOSTS[1]).await;
    until("the change made while nobody listened", || async { a.connect(HOSTS[1]).await.0 == 200 }).await;
    assert_eq!(a.connect(HOSTS[0]).await.0, 403);
    until("listening again", || async { a.logged("notification connection closed") }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_starting_together_migrate_once() {
    let Some(pg) = Postgres::start() else { return };
    let origin = common::Origin::start(&HOSTS).await;
    let dir = tempfile::tempdir().unwrap();
    let configs =
        [replica_config(&pg, dir.path(), "a", origin.addr, ""), replica_config(&pg, dir.path(), "b", origin.addr, "")];
    let starting: Vec<_> =
        configs.iter().cloned().map(|config| std::thread::spawn(move || Replica::start(&config))).collect();
    let replicas: Vec<Replica> = starting.into_iter().map(|start| start.join().unwrap()).collect();
    let migrated = replicas.iter().filter(|replica| replica.logged("database schema migrated")).count();
    assert_eq!(migrated, 1, "exactly one of them migrated");
    let versions: i64 = pg.client().await.query_one("SELECT count(*) FROM gateway_schema", &[]).await.unwrap().get(0);
    assert_eq!(versions as usize, miniapp_gateway::pg::MIGRATIONS.len());
    for replica in &replicas {
        assert_eq!(replica.status().await["store"]["up"], true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_move_from_the_files_to_postgresql_and_back() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    // a files config with an app in apps_dir
    std::fs::create_dir(dir.path().join("apps")).unwrap();
    let files = dir.path().join("files.toml");
    std::fs::write(&files, "[policy]\napps_dir = \"apps\"\n").unwrap();
    std::fs::write(
        dir.path().join("apps/shop.toml"),
        "[[app]]\nid = \"shop\"\ntoken = \"t\"\nserver_domains = [{ domain = \"api.shop.example\", remark = \"API\" }]\n",
    )
    .unwrap();
    let export = gateway(&["apps", "export", "-c", files.to_str().unwrap()]);
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let exported = dir.path().join("export.toml");
    std::fs::write(&exported, &export.stdout).unwrap();

    let postgres = pg.config(dir.path());
    let p = postgres.to_str().unwrap();
    let diff = gateway(&["apps", "diff", "-c", p, exported.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&diff.stdout),
        "+ shop (new)\n1 change\n",
        "{}",
        String::from_utf8_lossy(&diff.stderr)
    );
    let import = gateway(&["apps", "import", "-c", p, exported.to_str().unwrap()]);
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
    assert_eq!(String::from_utf8_lossy(&import.stdout), "create shop (revision 1)\n1 change imported\n");
    // in the database, with its audit row, and the same when exported back
    let db = pg.client().await;
    let user: String =
        db.query_one("SELECT record->>'user' FROM gateway_audit WHERE app = 'shop'", &[]).await.unwrap().get(0);
    assert_eq!(user, "import");
    let back = gateway(&["apps", "export", "-c", p]);
    assert_eq!(String::from_utf8_lossy(&back.stdout), String::from_utf8_lossy(&export.stdout));
    let diff = gateway(&["apps", "diff", "-c", p, exported.to_str().unwrap(), "--prune"]);
    assert_eq!(String::from_utf8_lossy(&diff.stdout), "0 changes\n");
    // an invalid import writes nothing
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[app]]\nid = \"other\"\nserver_domains = [\"http://plain.example\"]\n").unwrap();
    assert_eq!(gateway(&["apps", "import", "-c", p, bad.to_str().unwrap()]).status.code(), Some(1));
    let rows: i64 = db.query_one("SELECT count(*) FROM gateway_apps", &[]).await.unwrap().get(0);
    assert_eq!(rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_answering_is_an_outage_not_a_hang() {
    let Some(pg) = Postgres::start() else { return };
    let origin = common::Origin::start(&HOSTS).await;
    let dir = tempfile::tempdir().unwrap();
    let a = Replica::start(&replica_config(&pg, dir.path(), "a", origin.addr, ""));
    assert_eq!(create_app(&a, "shop").await, 201);
    assert_eq!(add_domain(&a, "shop", HOSTS[0]).await.0, 201);

    // Connections stay open, nothing answers: without timeouts a write would wait for the
    // kernel's retransmissions (many minutes), holding the replica's locks.
    pg.freeze(true);
    let started = Instant::now();
    let request = format!(
        "POST /v1/apps/shop/server_domains HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{}",
        a.admin,
        HOSTS[1].len() + 12,
        format_args!("{{\"entry\":\"{}\"}}", HOSTS[1])
    );
    let answer = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(a.admin).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    };
    let answer = tokio::time::timeout(Duration::from_secs(60), answer).await;
    let waited = started.elapsed();
    pg.freeze(false);
    let answer = answer.expect("no answer to a write within 60 s");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(waited < Duration::from_secs(40), "the write waited {waited:?}");
    assert_eq!(a.connect(HOSTS[0]).await.0, 200, "the policy in force stayed");
    // and once it answers again, writes go through
    until("writes again", || async { add_domain(&a, "shop", HOSTS[1]).await.0 == 201 }).await;
    assert_eq!(a.connect(HOSTS[1]).await.0, 200);
}
