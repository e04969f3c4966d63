//! The config file as written: serde structs that keep the span of every value that
//! validation may need to point at. Unknown keys are not refused here, where serde would stop
//! at the first: the validator collects every key these structs ignore and reports each one
//! at its position.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::policy::{Action, Channel};

pub type SpannedList<T> = Spanned<Vec<Spanned<T>>>;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub policy: RawPolicy,
    #[serde(default)]
    pub resolve: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub dns: RawDns,
    #[serde(default)]
    pub listener: Vec<RawListener>,
    pub tls: Option<Spanned<RawTls>>,
    #[serde(default)]
    pub app: Vec<RawApp>,
    #[serde(default)]
    pub admin_user: Vec<RawAdminUser>,
    #[serde(default)]
    pub scopes: RawScopes,
    #[serde(default)]
    pub store: RawStore,
}

/// `[store]`: where the apps of the management API live.
#[derive(Debug, Default, Deserialize)]
pub struct RawStore {
    pub backend: Option<Spanned<String>>,
    pub url: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
    pub ca: Option<Spanned<String>>,
    pub cache: Option<Spanned<String>>,
    pub poll_interval: Option<Spanned<HumanDuration>>,
    pub pool_size: Option<Spanned<i64>>,
    pub ready_without_store: Option<bool>,
}

/// `[scopes]`: who answers consent prompts, and the platforms' rules extended.
#[derive(Debug, Default, Deserialize)]
pub struct RawScopes {
    pub prompter: Option<Spanned<String>>,
    pub webhook_url: Option<Spanned<String>>,
    pub prompt_timeout: Option<Spanned<HumanDuration>>,
    pub code_ttl: Option<Spanned<HumanDuration>>,
    pub users: Option<Spanned<String>>,
    pub consent_file: Option<Spanned<String>>,
    #[serde(default)]
    pub scope: Vec<RawScopeExtension>,
}

/// `[[scopes.scope]]`: a scope added to a platform, or more APIs and another prompt for one.
#[derive(Debug, Deserialize)]
pub struct RawScopeExtension {
    pub platform: Spanned<String>,
    pub scope: Spanned<String>,
    pub apis: Option<Vec<Spanned<String>>>,
    pub title: Option<String>,
    pub text: Option<String>,
    pub fields: Option<Vec<Spanned<String>>>,
    pub device: Option<bool>,
}

/// The user directory (`[scopes].users`): `[[user]]` tables.
#[derive(Debug, Default, Deserialize)]
pub struct RawUsersFile {
    #[serde(default)]
    pub user: Vec<RawUser>,
}

/// One user of the directory: what auth codes release, field by field.
#[derive(Debug, Deserialize)]
pub struct RawUser {
    pub id: Spanned<String>,
    pub nickname: Option<String>,
    pub name: Option<String>,
    pub login_id: Option<String>,
    pub avatar: Option<String>,
    pub gender: Option<String>,
    pub birthday: Option<String>,
    pub nationality: Option<String>,
    pub contact_info: Option<String>,
}

/// `[[admin_user]]`: a named user of the admin API.
#[derive(Debug, Deserialize)]
pub struct RawAdminUser {
    pub name: Spanned<String>,
    pub token_sha256: Spanned<String>,
    pub role: Spanned<String>,
    /// A miniapp container's user: the apps it may act for in scope calls.
    pub apps: Option<Vec<Spanned<String>>>,
}

/// A file in `apps_dir`: nothing but `[[app]]` tables.
#[derive(Debug, Default, Deserialize)]
pub struct RawAppsFile {
    #[serde(default)]
    pub app: Vec<RawApp>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawServer {
    pub listen: Option<Spanned<String>>,
    pub admin_listen: Option<Spanned<String>>,
    pub admin_token: Option<Spanned<String>>,
    pub admin_token_file: Option<Spanned<String>>,
    pub admin_hosts: Option<Vec<Spanned<String>>>,
    pub workers: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLimits {
    pub max_connections: Option<Spanned<i64>>,
    pub connect_timeout: Option<Spanned<HumanDuration>>,
    pub header_timeout: Option<Spanned<HumanDuration>>,
    pub idle_timeout: Option<Spanned<HumanDuration>>,
    pub shutdown_grace: Option<Spanned<HumanDuration>>,
    pub shutdown_delay: Option<Spanned<HumanDuration>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawPolicy {
    pub action: Option<Action>,
    pub require_https: Option<Spanned<bool>>,
    pub verify_tls: Option<Spanned<bool>>,
    pub block_private_addresses: Option<bool>,
    pub unknown_app: Option<Spanned<String>>,
    pub max_server_domains: Option<Spanned<i64>>,
    pub max_webview_domains: Option<Spanned<i64>>,
    pub global_deny: Option<SpannedList<RawEntry>>,
    pub global_allow: Option<SpannedList<RawEntry>>,
    pub apps_dir: Option<Spanned<String>>,
}

/// `[dns]`: name servers to ask instead of the system's.
#[derive(Debug, Default, Deserialize)]
pub struct RawDns {
    pub nameservers: Option<SpannedList<String>>,
}

#[derive(Debug, Deserialize)]
pub struct RawListener {
    pub listen: Spanned<String>,
    pub app: Option<Spanned<String>>,
    pub channel: Option<Channel>,
    pub tls: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
pub struct RawTls {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub client_ca: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
pub struct RawApp {
    pub id: Spanned<String>,
    pub name: Option<String>,
    pub token: Option<Spanned<String>>,
    pub action: Option<Action>,
    pub server_domains: Option<SpannedList<RawEntry>>,
    pub webview_domains: Option<SpannedList<RawEntry>>,
    pub api_whitelist: Option<Vec<Spanned<RawApi>>>,
    pub platform: Option<Spanned<String>>,
    pub secret: Option<Spanned<String>>,
}

/// A whitelist entry: `"api.shop.example"` or `{ domain = "…", remark = "…" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    pub domain: String,
    pub remark: Option<String>,
}

/// An `api_whitelist` entry: `"shop.pay"` or `{ api = "…", remark = "…" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawApi {
    pub name: String,
    pub remark: Option<String>,
}

impl<'de> Deserialize<'de> for RawEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (domain, remark) = deserializer.deserialize_any(EntryVisitor { key: "domain" })?;
        Ok(RawEntry { domain, remark })
    }
}

impl<'de> Deserialize<'de> for RawApi {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (name, remark) = deserializer.deserialize_any(EntryVisitor { key: "api" })?;
        Ok(RawApi { name, remark })
    }
}

/// A list entry with a remark: a string, or a table of `key` and `remark`.
struct EntryVisitor {
    key: &'static str,
}

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = (String, Option<String>);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, r#"a string or a table {{ {} = "…", remark = "…" }}"#, self.key)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
        Ok((value.to_owned(), None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut value = None;
        let mut remark = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == self.key && value.is_none() {
                value = Some(map.next_value::<String>()?);
            } else if key == "remark" && remark.is_none() {
                remark = Some(map.next_value::<String>()?);
            } else if key == self.key || key == "remark" {
                return Err(de::Error::custom(format!("duplicate key `{key}`")));
            } else {
                // reported by the validator, with the other unknown keys
                map.next_value::<de::IgnoredAny>()?;
            }
        }
        let value = value.ok_or_else(|| de::Error::missing_field(self.key))?;
        Ok((value, remark))
    }
}

/// A humantime duration ("250ms", "5s", "5m").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map(HumanDuration).map_err(|e| {
            de::Error::custom(format!("invalid duration {text:?} ({e}); write e.g. \"250ms\", \"5s\", \"5m\""))
        })
    }
}
