//! Configuration: the TOML schema, its validation into typed values, and loading.
//!
//! [`load`] reads the config file and every `*.toml` in its `apps_dir`, deserializes them with
//! spans ([`schema`]), and validates everything in one pass (`validate`), collecting every
//! error as `PATH:LINE:COL: message` rather than stopping at the first. A [`Config`] that comes
//! out is complete and consistent; nothing downstream re-checks it.

pub mod schema;
mod validate;
pub mod watch;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::policy::{Channel, Policy};

/// The default config path, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/gateway.toml";

/// A loaded, validated configuration: one immutable snapshot of everything reloadable.
#[derive(Debug)]
pub struct Config {
    /// Counts successful loads in a running gateway (1 for the first); 0 until it is served.
    pub generation: u64,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// `apps_dir`, resolved against the config file's directory, when set.
    pub apps_dir: Option<PathBuf>,
    /// The other files the config was loaded from: `[tls]` and `admin_token_file`.
    pub other_files: Vec<PathBuf>,
    pub server: Server,
    pub limits: Limits,
    /// `server.listen` first, then every `[[listener]]`.
    pub listeners: Vec<ListenerSpec>,
    pub require_https: bool,
    pub verify_tls: bool,
    /// `[tls]`: the server config of TLS listeners, loaded and checked with the rest.
    pub tls: Option<TlsSettings>,
    /// `[dns]`: read at start only (the resolver lives as long as the gateway).
    pub dns: Dns,
    /// `[scopes]`: consent prompts, auth codes and the platforms' rules.
    pub scopes: crate::scopes::Settings,
    /// `[store]`: read at start only (the store's connections live as long as the gateway).
    pub store: StoreSettings,
    pub policy: Policy,
}

/// The loaded `[store]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreSettings {
    /// The main file and `apps_dir`: the embedded default.
    #[default]
    Files,
    Postgres(PostgresSettings),
}

/// `[store] backend = "postgres"`.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresSettings {
    /// The connection URL as written (without a password), or from `MINIAPP_GATEWAY_DATABASE_URL`.
    pub url: String,
    /// From `password_file` or `MINIAPP_GATEWAY_DATABASE_PASSWORD`, when either is set.
    pub password: Option<String>,
    /// `ca`: the database server's CA certificate, for `sslmode` other than `disable`.
    pub ca: Option<PathBuf>,
    /// The last good snapshot, for starts while the store is down.
    pub cache: PathBuf,
    pub poll_interval: Duration,
    /// Connections the management API's writes and reads share.
    pub pool_size: usize,
    /// Whether `/readyz` stays 200 while the store is unreachable (the last good policy is
    /// still enforced).
    pub ready_without_store: bool,
}

impl fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &redacted_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "…"))
            .field("ca", &self.ca)
            .field("cache", &self.cache)
            .field("poll_interval", &self.poll_interval)
            .field("pool_size", &self.pool_size)
            .field("ready_without_store", &self.ready_without_store)
            .finish()
    }
}

/// A connection URL (or `key=value` string) as it may be shown: any password replaced by `***`.
pub fn redacted_url(url: &str) -> String {
    let hide = |text: &str| -> String {
        // password=VALUE in a query string or a key=value string (VALUE quoted or not)
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find("password=") {
            let (before, after) = rest.split_at(at + "password=".len());
            out.push_str(before);
            out.push_str("***");
            let end = if let Some(quoted) = after.strip_prefix('\'') {
                quoted.find('\'').map_or(after.len(), |i| i + 2)
            } else {
                after.find([' ', '&']).unwrap_or(after.len())
            };
            rest = &after[end..];
        }
        out.push_str(rest);
        out
    };
    let Some((scheme, rest)) = url.split_once("://") else { return hide(url) };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    format!("{scheme}://{authority}{}", hide(tail))
}

/// The environment variable that holds the connection URL when `[store] url` is not set (a
/// password in it is allowed: it does not come from the TOML).
pub const DATABASE_URL_ENV: &str = "MINIAPP_GATEWAY_DATABASE_URL";

/// The environment variable that holds the database password when `password_file` is not set.
pub const DATABASE_PASSWORD_ENV: &str = "MINIAPP_GATEWAY_DATABASE_PASSWORD";

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    /// The bearer token of the admin listener: `admin_token`, or the contents of
    /// `admin_token_file` (read at every load, so a reload rotates it).
    pub admin_token: Option<String>,
    /// Names (besides IP literals and `localhost`) that browsers may use to reach the admin
    /// listener: any other `Host` is refused, which defeats DNS rebinding.
    pub admin_hosts: Vec<String>,
    /// Who may use the admin API: every `[[admin_user]]`, and `admin_token` as the user
    /// `admin` with the role `admin`. Empty: the admin API is open (to those who can reach it).
    pub admin_users: Vec<AdminUser>,
    /// `workers`: N > 0 serves the proxy listeners on N event loops (default 1), each a thread
    /// of its own, so that a connection and its tunnel stay on the thread that accepted it;
    /// with N > 1 each loop has its own `SO_REUSEPORT` listener per proxy listener. 0 serves
    /// them on the main work-stealing runtime, beside the admin listener.
    pub workers: usize,
}

/// What an admin user may do; each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read apps and history, check URLs and APIs.
    Viewer,
    /// And change apps.
    Editor,
    /// And reload, and roll back.
    Admin,
}

impl Role {
    pub fn parse(raw: &str) -> Option<Role> {
        match raw {
            "viewer" => Some(Role::Viewer),
            "editor" => Some(Role::Editor),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Admin => "admin",
        }
    }
}

/// A user of the admin API, known by the SHA-256 of its bearer token (the token itself is
/// never in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUser {
    pub name: String,
    pub token_sha256: [u8; 32],
    pub role: Role,
    /// `apps`: a miniapp container's user, which makes scope calls (that record consent) for
    /// these apps only, and reads their consent only. `None`: not bound to apps.
    pub apps: Option<Vec<Box<str>>>,
}

/// The SHA-256 of a bearer token, as `[[admin_user]].token_sha256` holds it.
pub fn token_sha256(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    /// After SIGTERM, keep accepting this long with `/readyz` already 503 (load balancers and
    /// Kubernetes endpoints take a moment to stop sending), then stop accepting and drain.
    pub shutdown_delay: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            connect_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(30),
            shutdown_delay: Duration::ZERO,
        }
    }
}

/// A proxy listener and, for a `[[listener]]` with `app`, the identity its traffic carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub listen: SocketAddr,
    pub binding: Option<Binding>,
    /// Served over TLS with `[tls]` (an HTTPS proxy).
    pub tls: bool,
}

/// The loaded `[tls]` section.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub server: std::sync::Arc<rustls::ServerConfig>,
    /// The verifier of client certificates against `client_ca`, when set. Kept beside the
    /// server config so that a reload can check the certificates of open connections again.
    pub client_verifier: Option<std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

/// The loaded `[dns]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    /// Asked over UDP (TCP for long answers); empty: the system's resolv.conf.
    pub nameservers: Vec<SocketAddr>,
}

/// A fixed identity: every connection on the listener is this app on this channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub app: Box<str>,
    pub channel: Channel,
}

/// One problem in one file, at one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
    /// A file could not be read (rather than being invalid): such a failure may pass by
    /// itself (out of descriptors, a writer that would not stop), so it is worth retrying.
    pub unreadable: bool,
}

impl ConfigError {
    /// An error about a whole file (or the load itself), pointed at its start.
    pub fn whole_file(path: &Path, message: String) -> ConfigError {
        ConfigError { path: path.to_path_buf(), line: 1, col: 1, message, unreadable: false }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.path.display(), self.line, self.col, self.message)
    }
}

/// Every problem found in a config, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

pub use validate::AppsCache;

/// Load and validate the config at `path` (and its `apps_dir`).
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    Loader::new(path).load()
}

/// Validate config text as if it were the file at `path` (its `apps_dir` is still read from
/// disk, relative to `path`).
pub fn load_str(path: &Path, text: String) -> Result<Config, ConfigErrors> {
    validate::load_text(path, text, &mut AppsCache::default())
}

/// The apps of a PostgreSQL store as a replica holds them: each app's definition (its
/// `[[app]]` table as config text) by id.
pub type StoreApps = Arc<BTreeMap<String, Arc<str>>>;

pub use validate::store_source;

/// Loads one config file again and again, re-validating only the `apps_dir` files (or store
/// apps) that changed since the last load.
#[derive(Debug, Clone)]
pub struct Loader {
    path: PathBuf,
    cache: AppsCache,
    /// With the PostgreSQL store: its apps as last read, loaded with the config's own.
    store_apps: Option<StoreApps>,
}

impl Loader {
    pub fn new(path: &Path) -> Loader {
        Loader { path: path.to_path_buf(), cache: AppsCache::default(), store_apps: None }
    }

    pub fn load(&mut self) -> Result<Config, ConfigErrors> {
        validate::load(&self.path, &mut self.cache, self.store_apps.clone())
    }

    /// The store's apps the next loads take (the PostgreSQL store's replica sets them).
    pub fn set_store_apps(&mut self, apps: StoreApps) {
        self.store_apps = Some(apps);
    }

    /// Validate the config as it would be with each `apps_dir` file of `changes` holding its
    /// text (or removed, for `None`), changing nothing: writes checked, together, before they
    /// are made.
    pub fn load_candidate(&self, changes: &[(PathBuf, Option<String>)]) -> Result<Config, ConfigErrors> {
        validate::load_candidate(&self.path, &mut self.cache.clone(), self.store_apps.clone(), changes)
    }
}

/// A file whose modification time is at least this old is taken as written whole.
const SETTLED_AGE: Duration = Duration::from_millis(200);
/// Between two reads of a file that is still being written.
const REREAD_PAUSE: Duration = Duration::from_millis(50);
/// Reads of a file before giving up on it ever holding still (about a second).
const MAX_READS: usize = 20;

/// Read a config file that a writer may be in the middle of (`render > gateway.toml`
/// truncates first and writes after). A file is taken once it is the same size and age before
/// and after the read, and either has not been modified for `SETTLED_AGE` or reads the same
/// twice in a row; otherwise it is read again. Files at rest, the usual case, are read once.
pub fn read_settled(path: &Path) -> std::io::Result<String> {
    let stamp = |meta: &std::fs::Metadata| (meta.len(), meta.modified().ok());
    let mut previous: Option<String> = None;
    for _ in 0..MAX_READS {
        let before = std::fs::metadata(path)?;
        let text = std::fs::read_to_string(path)?;
        let after = std::fs::metadata(path)?;
        let still = stamp(&before) == stamp(&after) && after.len() == text.len() as u64;
        let at_rest = after.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age >= SETTLED_AGE);
        if still && (at_rest || previous.as_deref() == Some(text.as_str())) {
            return Ok(text);
        }
        previous = Some(text);
        std::thread::sleep(REREAD_PAUSE);
    }
    Err(std::io::Error::other(format!("it kept changing over {MAX_READS} reads; is something still writing it?")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_never_shown() {
        use super::redacted_url;
        assert_eq!(
            redacted_url("postgres://gw:s3cr:et@db:5432/gw?sslmode=require"),
            "postgres://gw:***@db:5432/gw?sslmode=require"
        );
        assert_eq!(
            redacted_url("postgres://gw@db/gw?password=x&sslmode=disable"),
            "postgres://gw@db/gw?password=***&sslmode=disable"
        );
        assert_eq!(redacted_url("host=db user=gw password='a b' dbname=gw"), "host=db user=gw password=*** dbname=gw");
        assert_eq!(redacted_url("host=db password=x"), "host=db password=***");
        assert_eq!(redacted_url("postgres://gw@db/gw"), "postgres://gw@db/gw");
    }
}
