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
    server: Child,
    _dir: tempfile::TempDir,
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
        let server = Command::new(bin.join("postgres"))
            .args(["-D", data.to_str().unwrap(), "-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("unix_socket_directories={}", dir.path().display()), "-c", "fsync=off"])
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        let pg = Postgres { port, server, _dir: dir };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "postgres did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(pg)
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
        // SIGINT: PostgreSQL's fast shutdown.
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(self.server.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.server.wait();
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
    // and `run` says the store is not served yet instead of starting without apps
    drop(pg);
    let text = std::fs::read_to_string(&config).unwrap().replace("gateway:secret@", "gateway@");
    std::fs::write(&config, text).unwrap();
    let out = gateway(&["run", "-c", config.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("is not served yet"));
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
    let store = std::sync::Arc::new(miniapp_gateway::pg::PgStore::connect(&settings, &config).await.unwrap());
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
        // a delete keeps the row (replicas see it) and its number
        store.put(&store.render("shop", None, 3), Some(&back), &record("shop", 3, "applied")).unwrap();
        assert_eq!(store.place("shop").unwrap(), Place::Free);
        assert_eq!(store.next_revision("shop", None).unwrap(), 4);
    })
    .await
    .unwrap();
}
