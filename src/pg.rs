//! The PostgreSQL store (`[store] backend = "postgres"`): connecting to the database, and the
//! schema migrations that ship in the binary.
//!
//! [`PgStore`] keeps the apps there behind the same [`Store`] interface as the files. Migrations
//! run in one transaction under a transaction-scoped advisory lock, so replicas
//! that start together apply each one exactly once and the others wait, then find nothing
//! left to do. A database whose schema is newer than this binary knows is refused: an old
//! replica must not write into tables a newer one has changed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::audit::Record;
use crate::config::PostgresSettings;
use crate::store::{AppDoc, Place, Rendered, Store, Stored, WriteError};

/// The schema, one step at a time: (version, SQL). Never edit a step that has shipped; add one.
pub const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE SEQUENCE gateway_change;
     CREATE TABLE gateway_apps (
         id text PRIMARY KEY,
         revision bigint NOT NULL,
         -- the app's [[app]] table as config text; NULL: deleted (kept, so replicas see it)
         definition text,
         -- the gateway_change value of the app's last change
         change bigint NOT NULL,
         changed_at timestamptz NOT NULL DEFAULT now()
     );
     CREATE INDEX gateway_apps_change ON gateway_apps (change);
     CREATE TABLE gateway_audit (
         seq bigserial PRIMARY KEY,
         app text NOT NULL,
         revision bigint,
         outcome text NOT NULL,
         record jsonb NOT NULL
     );
     CREATE INDEX gateway_audit_app ON gateway_audit (app, seq);",
)];

/// The key of the advisory lock that migrations and every change take. Changes take it before
/// `nextval('gateway_change')` and hold it to their commit, so change numbers become visible
/// in the order they were given: a replica that has read every change up to N never later
/// finds one below N appear.
const LOCK_KEY: i64 = 0x6d69_6e69_6170_7067; // "miniappg"

/// How long a connection attempt may take before the database counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("the database did not answer within {0:?}")]
    Timeout(Duration),
    #[error(
        "the database's schema is at version {found}, newer than this gateway knows ({known}): \
         run a gateway at least as new as the one that migrated it"
    )]
    NewerSchema { found: i32, known: i32 },
    #[error("{0}")]
    Settings(String),
}

impl PgError {
    /// Whether the database could not be reached or could not serve now (rather than refusing
    /// what was asked): the connection failed, closed or timed out, or the server is shutting
    /// down, starting up, full, read-only after a failover, or timed the statement out.
    pub fn is_unavailable(&self) -> bool {
        match self {
            PgError::Timeout(_) => true,
            PgError::Db(e) => match e.as_db_error() {
                Some(db) => {
                    let code = db.code().code();
                    // 08: connection exceptions; 57P01-57P03: shutting down, cannot connect
                    // now; 53300: too many connections; 25006: read-only (a standby after a
                    // failover); 55P03: lock not available; 57014: statement timed out
                    code.starts_with("08")
                        || code.starts_with("57P0")
                        || ["53300", "25006", "55P03", "57014"].contains(&code)
                }
                // Not an answer of the server: the connection closed, or failed at the socket.
                // (A password missing, a certificate refused: those are settings, not outages.)
                None => e.is_closed() || io_failure(e),
            },
            PgError::NewerSchema { .. } | PgError::Settings(_) => false,
        }
    }

    /// As an I/O error: [`std::io::ErrorKind::NotConnected`] when the database is unreachable
    /// (the admin API answers `503` to those).
    pub fn into_io(self) -> std::io::Error {
        let kind = if self.is_unavailable() { std::io::ErrorKind::NotConnected } else { std::io::ErrorKind::Other };
        std::io::Error::new(kind, self)
    }
}

/// Whether an error without a database code came from the socket (refused, reset, timed out).
fn io_failure(error: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// What the database said (its message, not only "db error"), or what failed on the way.
fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("the database refused: {} ({})", db.message(), db.code().code());
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// How long a statement may run, and a transaction wait for a lock, on the server.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long any one use of a connection (a query, a transaction) may take here, whatever the
/// network does: past it the database counts as unavailable and the connection is dropped.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(15);

/// The connection settings of `settings`, with the password, a connect timeout, TCP
/// keepalives and a user timeout (a partitioned network is noticed in seconds, not after the
/// kernel's retransmissions), and server-side limits: no statement runs, waits for a lock or
/// leaves a transaction idle (holding the store's lock) for long.
fn connect_config(settings: &PostgresSettings) -> Result<tokio_postgres::Config, PgError> {
    let mut config: tokio_postgres::Config =
        settings.url.parse().map_err(|e| PgError::Settings(format!("url: {e}")))?;
    if let Some(password) = &settings.password {
        config.password(password);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.keepalives(true).keepalives_idle(Duration::from_secs(10)).keepalives_interval(Duration::from_secs(5));
    config.tcp_user_timeout(Duration::from_secs(10));
    if config.get_options().is_none() {
        let statement = STATEMENT_TIMEOUT.as_millis();
        config.options(format!(
            "-c statement_timeout={statement} -c lock_timeout={statement} -c idle_in_transaction_session_timeout={}",
            QUERY_TIMEOUT.as_millis() * 2
        ));
    }
    config.application_name("miniapp-gateway");
    Ok(config)
}

/// `work`, or [`PgError::Timeout`] after [`QUERY_TIMEOUT`].
pub async fn bounded<T>(work: impl std::future::Future<Output = Result<T, PgError>>) -> Result<T, PgError> {
    tokio::time::timeout(QUERY_TIMEOUT, work).await.map_err(|_| PgError::Timeout(QUERY_TIMEOUT))?
}

/// Connect once, as `settings` say; the connection is driven by a task of its own until the
/// client is dropped.
pub async fn connect(settings: &PostgresSettings) -> Result<Client, PgError> {
    let (client, mut messages) = connect_listening(settings).await?;
    // Nobody listens on this connection: its messages are notices only.
    tokio::spawn(async move { while messages.recv().await.is_some() {} });
    Ok(client)
}

/// Connect, and hand every asynchronous message of the connection (notifications, notices) to
/// the receiver; the receiver ends when the connection does.
pub async fn connect_listening(
    settings: &PostgresSettings,
) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>), PgError> {
    let config = connect_config(settings)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let attempt = async {
        let client = match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => {
                let (client, connection) = config.connect(NoTls).await?;
                tokio::spawn(drive(connection, tx));
                client
            }
            _ => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(settings)?);
                let (client, connection) = config.connect(tls).await?;
                tokio::spawn(drive(connection, tx));
                client
            }
        };
        Ok::<Client, PgError>(client)
    };
    let limit = config.get_connect_timeout().copied().unwrap_or(CONNECT_TIMEOUT) + Duration::from_secs(1);
    let client = tokio::time::timeout(limit, attempt).await.map_err(|_| PgError::Timeout(limit))??;
    Ok((client, rx))
}

/// Poll a connection to its end, passing its messages on.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    messages: tokio::sync::mpsc::UnboundedSender<AsyncMessage>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(message)) => {
                let _ = messages.send(message);
            }
            Some(Err(e)) => {
                tracing::debug!(error = %describe(&e), "database connection closed");
                return;
            }
            None => return,
        }
    }
}

/// TLS to the database: its certificate must chain to `[store] ca`.
fn client_tls(settings: &PostgresSettings) -> Result<rustls::ClientConfig, PgError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let Some(ca) = &settings.ca else {
        return Err(PgError::Settings(
            "sslmode other than disable needs [store] ca: the database server's CA certificate".to_owned(),
        ));
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| PgError::Settings(format!("ca {}: {e}", ca.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PgError::Settings(format!("ca {}: {e}", ca.display())))?;
    for cert in certs {
        roots.add(cert).map_err(|e| PgError::Settings(format!("ca {}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Settings(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// What [`migrate`] did: the schema's version before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    pub from: i32,
    pub to: i32,
}

/// The schema's version in the database: 0 when it has none yet.
pub async fn schema_version(client: &Client) -> Result<i32, PgError> {
    let exists: bool = client.query_one("SELECT to_regclass('gateway_schema') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client.query_one("SELECT coalesce(max(version), 0) FROM gateway_schema", &[]).await?.get(0))
}

/// Bring the schema up to [`MIGRATIONS`], once, whoever else is trying at the same moment.
pub async fn migrate(client: &mut Client) -> Result<Migrated, PgError> {
    let known = MIGRATIONS.last().map_or(0, |(version, _)| *version);
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS gateway_schema (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let found: i32 = tx.query_one("SELECT coalesce(max(version), 0) FROM gateway_schema", &[]).await?.get(0);
    if found > known {
        return Err(PgError::NewerSchema { found, known });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(version, _)| *version > found) {
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO gateway_schema (version) VALUES ($1)", &[version]).await?;
        tracing::info!(version, "database schema migrated");
    }
    tx.commit().await?;
    Ok(Migrated { from: found, to: known })
}

/// One app's row as a replica reads it: `definition` is `None` once the app is deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRow {
    pub id: String,
    pub definition: Option<String>,
    /// The `gateway_change` number of the app's last change.
    pub change: i64,
}

/// What a replica reads: the rows changed after the change it asked from, and the store's
/// newest change number (0 for an empty store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    pub rows: Vec<AppRow>,
    pub newest: i64,
}

/// The rows changed after change `after` (every app that exists, for `None`), read in one
/// snapshot with the newest change number. A store whose newest change is below `after` has
/// been replaced (restored from a backup, say): the caller reads it whole again.
pub async fn read_changes(client: &mut Client, after: Option<i64>) -> Result<Changes, PgError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let rows = match after {
        Some(after) => {
            let sql = "SELECT id, definition, change FROM gateway_apps WHERE change > $1 ORDER BY change";
            tx.query(sql, &[&after]).await?
        }
        None => {
            let sql = "SELECT id, definition, change FROM gateway_apps WHERE definition IS NOT NULL ORDER BY change";
            tx.query(sql, &[]).await?
        }
    };
    let newest: i64 = tx.query_one("SELECT coalesce(max(change), 0) FROM gateway_apps", &[]).await?.get(0);
    tx.commit().await?;
    let rows = rows.iter().map(|row| AppRow { id: row.get(0), definition: row.get(1), change: row.get(2) }).collect();
    Ok(Changes { rows, newest })
}

/// The apps of the management API in PostgreSQL: one row an app (`definition` NULL once it
/// is deleted, so that replicas see the delete), and the audit rows beside it. Every change is
/// one transaction under the advisory lock: the audit row, the app's row with the next value
/// of `gateway_change`, and a `NOTIFY` (its payload the change number) that wakes the
/// replicas. Its methods block: call them off the async workers (`spawn_blocking`), as the
/// admin API does. Connections are made when first needed and made again after the database
/// was away; while it is, every method fails with [`std::io::ErrorKind::NotConnected`].
pub struct PgStore {
    /// The main config file (apps defined there are read-only).
    config: PathBuf,
    settings: PostgresSettings,
    /// `pool_size` connections, each made when first needed.
    pool: Vec<tokio::sync::Mutex<Option<Client>>>,
    next: AtomicUsize,
    runtime: tokio::runtime::Handle,
    /// The change number of the last change this store committed (0: none yet).
    last_written: AtomicI64,
}

/// The channel the stores `NOTIFY` on a change.
pub const CHANNEL: &str = "gateway_apps";

impl PgStore {
    /// A store on the database of `settings`, connecting when first used. Its methods block on
    /// `runtime`: call them outside it (in `spawn_blocking`, or from a plain thread).
    pub fn new(settings: &PostgresSettings, config: &Path, runtime: tokio::runtime::Handle) -> PgStore {
        let pool = (0..settings.pool_size.max(1)).map(|_| tokio::sync::Mutex::new(None)).collect();
        PgStore {
            config: config.to_path_buf(),
            settings: settings.clone(),
            pool,
            next: AtomicUsize::new(0),
            runtime,
            last_written: AtomicI64::new(0),
        }
    }

    /// Connect, and bring the schema up to date (`upgrade`), or only create it in a database
    /// that has none (a reading command must not move a running fleet's schema on).
    pub async fn connect(settings: &PostgresSettings, config: &Path, upgrade: bool) -> Result<PgStore, PgError> {
        let mut client = connect(settings).await?;
        if upgrade || bounded(schema_version(&client)).await? == 0 {
            bounded(migrate(&mut client)).await?;
        }
        let store = PgStore::new(settings, config, tokio::runtime::Handle::current());
        *store.pool[0].lock().await = Some(client);
        Ok(store)
    }

    /// Run `work` on a connection of the pool (a free one if there is one), connecting it
    /// first if it is not; a connection the database dropped is made again next time.
    fn with_client<T>(&self, work: impl AsyncFnOnce(&mut Client) -> Result<T, PgError>) -> Result<T, PgError> {
        self.runtime.block_on(async {
            let mut slot = match self.pool.iter().find_map(|slot| slot.try_lock().ok()) {
                Some(free) => free,
                None => self.pool[self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len()].lock().await,
            };
            if slot.as_ref().is_none_or(Client::is_closed) {
                *slot = Some(connect(&self.settings).await?);
            }
            let client = slot.as_mut().expect("connected above");
            let result = bounded(work(client)).await;
            if result.as_ref().is_err_and(PgError::is_unavailable) {
                *slot = None;
            }
            result
        })
    }

    fn run<T>(&self, work: impl AsyncFnOnce(&mut Client) -> Result<T, PgError>) -> std::io::Result<T> {
        self.with_client(work).map_err(PgError::into_io)
    }

    /// The change number of the last change this store committed (0: none yet): the admin API
    /// answers a write only once the replica enforces at least this.
    pub fn last_written(&self) -> i64 {
        self.last_written.load(Ordering::SeqCst)
    }

    /// Every app the store holds: its definition by id (for `apps export` and `apps import`).
    pub fn apps(&self) -> std::io::Result<crate::config::StoreApps> {
        let changes = self.run(async |client| read_changes(client, None).await)?;
        let apps = changes.rows.into_iter().filter_map(|row| Some((row.id, Arc::from(row.definition?)))).collect();
        Ok(Arc::new(apps))
    }
}

fn revision_of(row: &tokio_postgres::Row) -> u64 {
    u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Write `record` as an audit row, within `tx`.
async fn audit(tx: &tokio_postgres::Transaction<'_>, record: &Record) -> Result<(), PgError> {
    let value = serde_json::to_value(record).map_err(|e| PgError::Settings(e.to_string()))?;
    let revision = record.revision.map(to_i64);
    let sql = "INSERT INTO gateway_audit (app, revision, outcome, record) VALUES ($1, $2, $3, $4)";
    tx.execute(sql, &[&record.app, &revision, &record.outcome, &value]).await?;
    Ok(())
}

/// Wake the replicas with change number `change` (delivered when `tx` commits).
async fn notify(tx: &tokio_postgres::Transaction<'_>, change: i64) -> Result<(), PgError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &change.to_string()]).await?;
    Ok(())
}

impl Store for PgStore {
    fn place(&self, id: &str) -> std::io::Result<Place> {
        let row = self.run(async |client| {
            Ok(client.query_opt("SELECT revision, definition FROM gateway_apps WHERE id = $1", &[&id]).await?)
        })?;
        if let Some(row) = row
            && let Some(text) = row.get::<_, Option<String>>(1)
        {
            let docs = crate::store::parse_apps(&text).map_err(std::io::Error::other)?;
            let Some(doc) = docs.into_iter().next() else {
                return Err(std::io::Error::other(format!("the database's definition of app {id:?} holds no app")));
            };
            return Ok(Place::Writable(Box::new(Stored { doc, revision: revision_of(&row), text, edited: None })));
        }
        let main = crate::store::read_all(&self.config, None)?;
        Ok(if main.iter().any(|doc| doc.id == id) { Place::ReadOnly(self.config.clone()) } else { Place::Free })
    }

    fn render(&self, id: &str, doc: Option<&AppDoc>, _revision: u64) -> Rendered {
        let file = crate::config::store_source(id);
        match doc {
            Some(doc) => {
                let (text, lines) = crate::store::definition(doc);
                Rendered { file, text: Some(text), lines }
            }
            None => Rendered { file, text: None, lines: Vec::new() },
        }
    }

    fn history(&self, id: &str) -> std::io::Result<Vec<Record>> {
        let rows = self.run(async |client| {
            // An applied change that then failed to be put in force is left out.
            let sql = "SELECT a.record FROM gateway_audit a WHERE a.app = $1 AND a.outcome = 'applied'
                       AND NOT EXISTS (SELECT 1 FROM gateway_audit f WHERE f.app = a.app AND f.revision = a.revision
                                       AND f.seq > a.seq AND f.outcome IN ('write_failed', 'reload_failed'))
                       ORDER BY a.seq DESC";
            Ok(client.query(sql, &[&id]).await?)
        })?;
        rows.iter()
            .map(|row| serde_json::from_value(row.get::<_, serde_json::Value>(0)).map_err(std::io::Error::other))
            .collect()
    }

    fn next_revision(&self, id: &str, _current: Option<&Stored>) -> std::io::Result<u64> {
        // The app's row keeps its revision after a delete, and the audit rows every number
        // given, made or failed: none is given twice.
        let row = self.run(async |client| {
            let sql = "SELECT greatest(
                           (SELECT max(revision) FROM gateway_apps WHERE id = $1),
                           (SELECT max(revision) FROM gateway_audit WHERE app = $1 AND outcome <> 'dry_run'))";
            Ok(client.query_one(sql, &[&id]).await?)
        })?;
        let highest = row.get::<_, Option<i64>>(0).unwrap_or(0);
        Ok(u64::try_from(highest).unwrap_or(0).saturating_add(1))
    }

    fn note(&self, record: &Record) -> std::io::Result<()> {
        self.run(async |client| {
            let tx = client.transaction().await?;
            audit(&tx, record).await?;
            Ok(tx.commit().await?)
        })
    }

    fn put(&self, rendered: &Rendered, current: Option<&Stored>, record: &Record) -> Result<(), WriteError> {
        let outcome = self.with_client(async |client| {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]).await?;
            let now = tx
                .query_opt("SELECT revision, definition FROM gateway_apps WHERE id = $1 FOR UPDATE", &[&record.app])
                .await?;
            let found =
                now.as_ref().and_then(|row| row.get::<_, Option<String>>(1).map(|text| (revision_of(row), text)));
            let expected = current.map(|stored| (stored.revision, stored.text.clone()));
            if found != expected {
                return Ok(false);
            }
            audit(&tx, record).await?;
            let revision = record.revision.map_or(0, to_i64);
            let change: i64 = tx
                .query_one(
                    "INSERT INTO gateway_apps (id, revision, definition, change, changed_at)
                     VALUES ($1, $2, $3, nextval('gateway_change'), now())
                     ON CONFLICT (id) DO UPDATE SET revision = EXCLUDED.revision,
                         definition = EXCLUDED.definition, change = EXCLUDED.change, changed_at = EXCLUDED.changed_at
                     RETURNING change",
                    &[&record.app, &revision, &rendered.text],
                )
                .await?
                .get(0);
            notify(&tx, change).await?;
            tx.commit().await?;
            self.last_written.fetch_max(change, Ordering::SeqCst);
            Ok(true)
        });
        match outcome {
            Ok(true) => Ok(()),
            Ok(false) => Err(WriteError::Changed),
            Err(e) => Err(WriteError::Io(e.into_io())),
        }
    }

    fn restore(&self, _rendered: &Rendered, previous: Option<&Stored>, record: &Record) -> std::io::Result<()> {
        let undone = self.run(async |client| {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]).await?;
            audit(&tx, record).await?;
            // Back to what it was, as a change of its own (replicas may have taken the one
            // undone), unless another change came after it: that one is not ours to undo.
            let written = record.revision.map_or(0, to_i64);
            let text = previous.map(|stored| stored.text.clone());
            let kept = previous.map_or(written, |stored| to_i64(stored.revision));
            let change: Option<i64> = tx
                .query_opt(
                    "UPDATE gateway_apps SET revision = $2, definition = $3, change = nextval('gateway_change'),
                         changed_at = now() WHERE id = $1 AND revision = $4 RETURNING change",
                    &[&record.app, &kept, &text, &written],
                )
                .await?
                .map(|row| row.get(0));
            if let Some(change) = change {
                notify(&tx, change).await?;
                self.last_written.fetch_max(change, Ordering::SeqCst);
            }
            tx.commit().await?;
            Ok(change.is_some())
        })?;
        if undone {
            Ok(())
        } else {
            Err(std::io::Error::other("another change to the app came after it, so it was left in place"))
        }
    }
}
