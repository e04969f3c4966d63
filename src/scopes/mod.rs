//! Scope authorization: which device and user-data APIs a miniapp may use with the user's
//! consent, decided for the miniapp containers that ask.
//!
//! [`rules`] holds the platforms' rules and the state machine, with no I/O. [`service`] keeps
//! what the rules read and write: consent records in a file (written atomically, kept across
//! reloads and restarts, dropped with the app), the prompts waiting for an answer (from the
//! configured [`Prompter`]: always allow, always deny, a webhook, or a test rig through the
//! API), auth codes, and the consent history. The admin listener's `/v1/scopes/*` and
//! `/v1/auth-codes*` routes call it.

pub mod rules;
pub mod service;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rules::{Profiles, UserField};

/// The default of `prompt_timeout`.
pub const DEFAULT_PROMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// The default of `code_ttl`: long enough for a backend round trip, short enough to be useless
/// once leaked.
pub const DEFAULT_CODE_TTL: Duration = Duration::from_secs(300);
/// The default consent file, relative to the config file.
pub const DEFAULT_CONSENT_FILE: &str = "consent.json";

/// The loaded `[scopes]` section.
#[derive(Debug, Clone)]
pub struct Settings {
    pub prompter: Prompter,
    /// How long a prompt waits for its answer; unanswered, the call fails and nothing is
    /// recorded.
    pub prompt_timeout: Duration,
    /// How long an auth code may be exchanged.
    pub code_ttl: Duration,
    /// Where consent records are kept (read at start only).
    pub consent_file: PathBuf,
    pub users: Arc<UserDirectory>,
    pub profiles: Arc<Profiles>,
}

impl Settings {
    /// The settings of a config without `[scopes]`, beside the config file `config`.
    pub fn defaults(config: &std::path::Path) -> Settings {
        Settings {
            prompter: Prompter::Pending,
            prompt_timeout: DEFAULT_PROMPT_TIMEOUT,
            code_ttl: DEFAULT_CODE_TTL,
            consent_file: config.parent().unwrap_or(std::path::Path::new(".")).join(DEFAULT_CONSENT_FILE),
            users: Arc::default(),
            profiles: Arc::default(),
        }
    }
}

/// Who answers a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompter {
    /// Every prompt is answered "allow" at once.
    Allow,
    /// Every prompt is answered "deny" at once.
    Deny,
    /// Prompts wait for `POST /v1/scopes/prompts/{id}` (a test rig, or the container itself).
    Pending,
    /// The host's own dialog: `POST {app,user,scope,title,text}` to it, `{"answer"}` back.
    Webhook(WebhookUrl),
}

impl Prompter {
    pub fn as_str(&self) -> &'static str {
        match self {
            Prompter::Allow => "allow",
            Prompter::Deny => "deny",
            Prompter::Pending => "pending",
            Prompter::Webhook(_) => "webhook",
        }
    }
}

/// A plain-HTTP webhook address, taken apart for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    pub host: String,
    pub port: u16,
    /// The path and query.
    pub path: String,
}

impl WebhookUrl {
    /// Parse an `http://HOST[:PORT]/PATH` URL (the webhook is the host's own service, on its
    /// own machine or network: no TLS).
    pub fn parse(raw: &str) -> Result<WebhookUrl, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("webhook_url {raw:?} is not a URL: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!("webhook_url must be an http:// URL (no TLS to the host's dialog), not {raw:?}"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("webhook_url must not carry a user or password".to_owned());
        }
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or("webhook_url needs a host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        let mut path = url.path().to_owned();
        if let Some(query) = url.query() {
            path.push('?');
            path.push_str(query);
        }
        Ok(WebhookUrl { host, port, path })
    }
}

/// The users auth codes are exchanged against: user id → the fields the directory holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserDirectory {
    users: HashMap<String, BTreeMap<UserField, String>>,
}

impl UserDirectory {
    pub fn insert(&mut self, id: String, fields: BTreeMap<UserField, String>) -> bool {
        self.users.insert(id, fields).is_none()
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The value of `field` for user `id`: `user_id` is the id itself, `hash_login_id` the
    /// SHA-256 of the login id; `None` when the directory has no such user or value.
    pub fn field(&self, id: &str, field: UserField) -> Option<String> {
        let user = self.users.get(id)?;
        match field {
            UserField::UserId => Some(id.to_owned()),
            UserField::HashLoginId => user.get(&UserField::LoginId).map(|login| {
                let digest = ring::digest::digest(&ring::digest::SHA256, login.as_bytes());
                digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
            }),
            other => user.get(&other).cloned(),
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.users.contains_key(id)
    }
}
