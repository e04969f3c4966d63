//! The PostgreSQL store (`[store] backend = "postgres"`): connecting to the database, and the
//! schema migrations that ship in the binary.
//!
//! Migrations run in one transaction under a transaction-scoped advisory lock, so replicas
//! that start together apply each one exactly once and the others wait, then find nothing
//! left to do. A database whose schema is newer than this binary knows is refused: an old
//! replica must not write into tables a newer one has changed.

use std::sync::Arc;

use tokio_postgres::{Client, NoTls};

use crate::config::PostgresSettings;

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
