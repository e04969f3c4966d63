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

use tokio_postgres::{Client, NoTls};

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

/// The key of the advisory lock that migrations (and, later, writes) take.
const LOCK_KEY: i64 = 0x6d69_6e69_6170_7067; // "miniappg"

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error(
        "the database's schema is at version {found}, newer than this gateway knows ({known}): \
         run a gateway at least as new as the one that migrated it"
    )]
    NewerSchema { found: i32, known: i32 },
    #[error("{0}")]
    Settings(String),
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

/// Connect once, as `settings` say; the connection is driven by a task of its own until the
/// client is dropped.
pub async fn connect(settings: &PostgresSettings) -> Result<Client, PgError> {
    let mut config: tokio_postgres::Config =
        settings.url.parse().map_err(|e| PgError::Settings(format!("url: {e}")))?;
    if let Some(password) = &settings.password {
        config.password(password);
    }
    let client = match config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => {
            let (client, connection) = config.connect(NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "database connection closed");
                }
            });
            client
        }
        _ => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(settings)?);
            let (client, connection) = config.connect(tls).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "database connection closed");
                }
            });
            client
        }
    };
    Ok(client)
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

/// The apps of the management API in PostgreSQL: one row an app (`definition` NULL once it
/// is deleted, so that replicas see the delete), and the audit rows beside it. Every change is
/// one transaction under the advisory lock: the audit row, the app's row with the next value
/// of `gateway_change`, and a `NOTIFY` that wakes the replicas. Its methods block: call them
/// off the async workers (`spawn_blocking`), as the admin API does.
pub struct PgStore {
    /// The main config file (apps defined there are read-only).
    config: PathBuf,
    client: tokio::sync::Mutex<Client>,
    runtime: tokio::runtime::Handle,
}

/// The channel the stores `NOTIFY` on a change.
pub const CHANNEL: &str = "gateway_apps";

impl PgStore {
    /// Connect, and bring the schema up to date.
    pub async fn connect(settings: &PostgresSettings, config: &Path) -> Result<PgStore, PgError> {
        let mut client = connect(settings).await?;
        migrate(&mut client).await?;
        Ok(PgStore {
            config: config.to_path_buf(),
            client: tokio::sync::Mutex::new(client),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    fn run<T>(&self, work: impl std::future::Future<Output = Result<T, PgError>>) -> std::io::Result<T> {
        self.runtime.block_on(work).map_err(std::io::Error::other)
    }
}

fn revision_of(row: &tokio_postgres::Row) -> u64 {
    u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store for PgStore {
    fn place(&self, id: &str) -> std::io::Result<Place> {
        let row = self.run(async {
            let client = self.client.lock().await;
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
        let rows = self.run(async {
            let client = self.client.lock().await;
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
        let row = self.run(async {
            let client = self.client.lock().await;
            let sql = "SELECT greatest(
                           (SELECT max(revision) FROM gateway_apps WHERE id = $1),
                           (SELECT max(revision) FROM gateway_audit WHERE app = $1 AND outcome <> 'dry_run'))";
            Ok(client.query_one(sql, &[&id]).await?)
        })?;
        let highest = row.get::<_, Option<i64>>(0).unwrap_or(0);
        Ok(u64::try_from(highest).unwrap_or(0).saturating_add(1))
    }

    fn note(&self, record: &Record) -> std::io::Result<()> {
        let value = serde_json::to_value(record).map_err(std::io::Error::other)?;
        self.run(async {
            let client = self.client.lock().await;
            let revision = record.revision.map(to_i64);
            let sql = "INSERT INTO gateway_audit (app, revision, outcome, record) VALUES ($1, $2, $3, $4)";
            client.execute(sql, &[&record.app, &revision, &record.outcome, &value]).await?;
            Ok(())
        })
    }

    fn put(&self, rendered: &Rendered, current: Option<&Stored>, record: &Record) -> Result<(), WriteError> {
        let value = serde_json::to_value(record).map_err(std::io::Error::other)?;
        let outcome = self.runtime.block_on(async {
            let mut client = self.client.lock().await;
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]).await?;
            let now = tx
                .query_opt("SELECT revision, definition FROM gateway_apps WHERE id = $1 FOR UPDATE", &[&record.app])
                .await?;
            let found =
                now.as_ref().and_then(|row| row.get::<_, Option<String>>(1).map(|text| (revision_of(row), text)));
            let expected = current.map(|stored| (stored.revision, stored.text.clone()));
            if found != expected {
                return Ok::<bool, PgError>(false);
            }
            let revision = record.revision.map(to_i64);
            tx.execute(
                "INSERT INTO gateway_audit (app, revision, outcome, record) VALUES ($1, $2, $3, $4)",
                &[&record.app, &revision, &record.outcome, &value],
            )
            .await?;
            tx.execute(
                "INSERT INTO gateway_apps (id, revision, definition, change, changed_at)
                 VALUES ($1, $2, $3, nextval('gateway_change'), now())
                 ON CONFLICT (id) DO UPDATE SET revision = $2, definition = $3,
                     change = nextval('gateway_change'), changed_at = now()",
                &[&record.app, &revision.unwrap_or(0), &rendered.text],
            )
            .await?;
            tx.execute(&format!("NOTIFY {CHANNEL}"), &[]).await?;
            tx.commit().await?;
            Ok(true)
        });
        match outcome {
            Ok(true) => Ok(()),
            Ok(false) => Err(WriteError::Changed),
            Err(e) => Err(WriteError::Io(std::io::Error::other(e))),
        }
    }

    fn restore(&self, _rendered: &Rendered, previous: Option<&Stored>, record: &Record) -> std::io::Result<()> {
        let value = serde_json::to_value(record).map_err(std::io::Error::other)?;
        self.run(async {
            let mut client = self.client.lock().await;
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]).await?;
            let revision = record.revision.map(to_i64);
            tx.execute(
                "INSERT INTO gateway_audit (app, revision, outcome, record) VALUES ($1, $2, $3, $4)",
                &[&record.app, &revision, &record.outcome, &value],
            )
            .await?;
            // Back to what it was, as a change of its own (replicas may have taken the one undone).
            let text = previous.map(|stored| stored.text.clone());
            let kept = previous.map_or(revision.unwrap_or(0), |stored| to_i64(stored.revision));
            tx.execute(
                "UPDATE gateway_apps SET revision = $2, definition = $3, change = nextval('gateway_change'),
                     changed_at = now() WHERE id = $1",
                &[&record.app, &kept, &text],
            )
            .await?;
            tx.execute(&format!("NOTIFY {CHANNEL}"), &[]).await?;
            tx.commit().await?;
            Ok(())
        })
    }
}
