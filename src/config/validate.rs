//! From raw TOML to a typed [`Config`], collecting every error with its file, line and column.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::Spanned;

use super::schema::{
    HumanDuration, RawApi, RawApp, RawAppsFile, RawConfig, RawEntry, RawScopes, RawTls, RawUsersFile, SpannedList,
};
use super::{
    AdminUser, Binding, Config, ConfigError, ConfigErrors, DATABASE_PASSWORD_ENV, DATABASE_URL_ENV, Dns, Limits,
    ListenerSpec, PostgresSettings, Role, Server, StoreApps, StoreSettings, TlsSettings,
};
use crate::policy::{
    self, Action, App, Channel, DomainList, Entry, GlobalRules, Host, Policy, ResolveOverride, parse_entry, parse_host,
};
use crate::scopes::rules::{Platform, ScopeExtension, UserField};
use crate::scopes::{Prompter, Settings as ScopeSettings, UserDirectory, WebhookUrl};
use crate::tls::{self, TlsFile};

/// How long a remark may be, in characters (the mini-program consoles' limit).
const MAX_REMARK_CHARS: usize = 200;
/// Entries are indexed by `u16`; no real list comes near this.
const MAX_LIST_LIMIT: i64 = 10_000;
/// More connections than any host has descriptors for (and far below the semaphore's limit).
const MAX_CONNECTIONS_LIMIT: i64 = 10_000_000;
/// The longest duration any setting takes: long enough for any real timeout, and far from
/// overflowing a deadline computed from it.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The global lists are the operator's, not an app's, and may be long; still bounded.
const MAX_GLOBAL_ENTRIES: usize = 10_000;
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_MAX_DOMAINS: usize = 30;
/// `[store] pool_size`: the database connections of the management API (a replica's listener
/// has one more of its own).
const DEFAULT_POOL_SIZE: usize = 4;
const MAX_POOL_SIZE: usize = 64;
/// `[server] workers`: event loops, each a thread of its own. One, as Squid and nginx: on a
/// machine the gateway shares with what it serves, one loop costs the least CPU per request
/// (BENCHMARKS.md, "CPU per request").
const DEFAULT_WORKERS: usize = 1;
const MAX_WORKERS: usize = 256;

/// Load as [`load`] would, but with the `apps_dir` file `file` holding `text` (or, for
/// `None`, absent): what the config would be after a write, checked before it is made.
pub(super) fn load_candidate(
    path: &Path,
    cache: &mut AppsCache,
    store_apps: Option<StoreApps>,
    changes: &[(PathBuf, Option<String>)],
) -> Result<Config, ConfigErrors> {
    let main = match super::read_settled(path) {
        Ok(main) => main,
        Err(e) => return Err(ConfigErrors(vec![unreadable_file(path, format!("cannot read the config file: {e}"))])),
    };
    let v = Validator { candidates: changes.iter().cloned().collect(), store_apps, ..Validator::default() };
    v.load(path, main, cache)
}

pub(super) fn load(path: &Path, cache: &mut AppsCache, store_apps: Option<StoreApps>) -> Result<Config, ConfigErrors> {
    match super::read_settled(path) {
        Ok(text) if text.trim().is_empty() => Err(ConfigErrors(vec![ConfigError::whole_file(
            path,
            "the config file is empty (truncated by a writer?); an empty file is never loaded".to_owned(),
        )])),
        Ok(text) => Validator { store_apps, ..Validator::default() }.load(path, text, cache),
        Err(e) => Err(ConfigErrors(vec![unreadable_file(path, format!("cannot read the config file: {e}"))])),
    }
}

/// The name under which the store's definition of app `id` is validated (and its errors told).
pub fn store_source(id: &str) -> PathBuf {
    PathBuf::from(format!("postgres:{id}"))
}

pub(super) fn load_text(path: &Path, text: String, cache: &mut AppsCache) -> Result<Config, ConfigErrors> {
    Validator::default().load(path, text, cache)
}

impl Validator {
    fn load(mut self, path: &Path, text: String, cache: &mut AppsCache) -> Result<Config, ConfigErrors> {
        let main = self.add_source(path.to_path_buf(), text);
        let Some(mut raw) = self.parse::<RawConfig>(main) else {
            return Err(self.into_errors());
        };
        let settings = self.app_settings(main, &raw);
        let mut apps: Vec<AppInput> =
            std::mem::take(&mut raw.app).into_iter().map(|app| AppInput::raw(main, app)).collect();
        let apps_dir = raw.policy.apps_dir.as_ref().map(|dir| resolve_relative(path, dir.get_ref()));
        if let (Some(dir), Some(spanned)) = (&apps_dir, &raw.policy.apps_dir) {
            self.read_apps_dir(main, spanned.span(), dir, settings, cache, &mut apps);
        }
        if let Some(store_apps) = self.store_apps.take() {
            self.read_store_apps(&store_apps, settings, cache, &mut apps);
        }
        let (config, fresh) = self.config(main, raw, apps, apps_dir, settings);
        self.update_cache(main, settings, cache, fresh);
        if self.errors.is_empty() { Ok(config) } else { Err(self.into_errors()) }
    }
}

/// What every app's validation depends on besides its own table: a cached app is reused
/// only while these are unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AppSettings {
    default_action: Action,
    max_server: usize,
    max_webview: usize,
}

/// Apps validated from `apps_dir` files, kept between loads so that a reload parses and
/// validates only the files whose content changed. Files are compared by a hash of their
/// text, so editors' renames, Kubernetes' symlink swaps and clock skew make no difference.
#[derive(Debug, Default, Clone)]
pub struct AppsCache {
    files: HashMap<PathBuf, CachedFile>,
}

#[derive(Debug, Clone)]
struct CachedFile {
    fingerprint: u64,
    /// The text itself: a store app whose text is the very same (shared) one is known
    /// unchanged without hashing it again.
    text: Arc<str>,
    settings: AppSettings,
    /// Each app with the span of its id, to point duplicates at it.
    apps: Vec<(Arc<App>, Range<usize>)>,
}

/// An app to validate, or one taken validated from the cache.
enum AppInput {
    Raw { source: usize, app: Box<RawApp> },
    Cached { source: usize, app: Arc<App>, id_span: Range<usize> },
}

impl AppInput {
    fn raw(source: usize, app: RawApp) -> AppInput {
        AppInput::Raw { source, app: Box::new(app) }
    }
}

fn fingerprint(text: &str) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// A file that could not be read at all.
fn unreadable_file(path: &Path, message: String) -> ConfigError {
    ConfigError { unreadable: true, ..ConfigError::whole_file(path, message) }
}

/// Where an unknown key that serde_ignored names by its dotted path (`policy.acton`,
/// `app.1.server_domain`, with `?` and `Spanned`'s private fields in between) is: the span of
/// the key, the key, and the table it is in as a field path (`policy`, `app[1]`,
/// `app[1].server_domains[0]`).
fn unknown_key_place(document: &toml::de::DeTable<'_>, path: &str) -> (Range<usize>, String, String) {
    let segments: Vec<&str> =
        path.split('.').filter(|s| *s != "?" && !s.starts_with("$__serde_spanned_private")).collect();
    let Some((key, parents)) = segments.split_last() else { return (0..0, path.to_owned(), String::new()) };
    let mut value: Option<&toml::de::DeValue<'_>> = None;
    let mut table = Some(document);
    let mut span = 0..0;
    let mut shown = String::new();
    for segment in parents {
        let next = match (value, segment.parse::<usize>()) {
            (Some(toml::de::DeValue::Array(items)), Ok(index)) => {
                shown.push_str(&format!("[{index}]"));
                items.get(index)
            }
            _ => {
                if !shown.is_empty() {
                    shown.push('.');
                }
                shown.push_str(segment);
                table.and_then(|t| t.iter().find(|(k, _)| k.get_ref().as_ref() == *segment).map(|(_, v)| v))
            }
        };
        span = next.map_or(span, |v| v.span());
        value = next.map(|v| v.get_ref());
        table = match value {
            Some(toml::de::DeValue::Table(t)) => Some(t),
            _ => None,
        };
    }
    let key_span =
        table.and_then(|t| t.iter().find(|(k, _)| k.get_ref().as_ref() == *key).map(|(k, _)| k.span())).unwrap_or(span);
    (key_span, (*key).to_owned(), shown)
}

/// 64 hex digits as 32 bytes.
fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(hash)
}

fn resolve_relative(config: &Path, relative: &str) -> PathBuf {
    let base = config.parent().unwrap_or(Path::new("."));
    base.join(relative)
}

struct Source {
    path: PathBuf,
    /// Shared with the store's apps (a replica's unchanged apps are never copied).
    text: Arc<str>,
    /// For `apps_dir` files: the content hash the cache compares.
    fingerprint: u64,
    /// Its apps were taken validated from the cache (whose entry stays as it is).
    from_cache: bool,
}

impl Source {
    /// 1-based line and column (in characters) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(&*self.text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }
}

/// One problem found, at a byte offset of a source.
struct Problem {
    source: usize,
    offset: usize,
    message: String,
    unreadable: bool,
}

#[derive(Default)]
struct Validator {
    sources: Vec<Source>,
    /// Files read besides the config and `apps_dir` files: `[tls]` and `admin_token_file`.
    other_files: Vec<PathBuf>,
    /// An `apps_dir` file taken as holding this text (or as absent) instead of what is on
    /// disk: a write being checked.
    candidates: BTreeMap<PathBuf, Option<String>>,
    /// The apps of the PostgreSQL store, as the replica last read them: each validated as a
    /// file of its own, [`store_source`].
    store_apps: Option<StoreApps>,
    /// (source, byte offset, message)
    errors: Vec<Problem>,
}

/// Where an app was defined, to point a duplicate at the first definition.
struct Origin {
    source: usize,
    offset: usize,
}

impl Validator {
    fn add_source(&mut self, path: PathBuf, text: impl Into<Arc<str>>) -> usize {
        self.sources.push(Source { path, text: text.into(), fingerprint: 0, from_cache: false });
        self.sources.len() - 1
    }

    fn error(&mut self, source: usize, span: Range<usize>, message: impl Into<String>) {
        self.errors.push(Problem { source, offset: span.start, message: message.into(), unreadable: false });
    }

    /// An error that a file named at `span` could not be read.
    fn unreadable(&mut self, source: usize, span: Range<usize>, message: impl Into<String>) {
        self.errors.push(Problem { source, offset: span.start, message: message.into(), unreadable: true });
    }

    fn into_errors(mut self) -> ConfigErrors {
        self.errors.sort_by_key(|problem| (problem.source, problem.offset));
        let errors = self
            .errors
            .iter()
            .map(|problem| {
                let src = &self.sources[problem.source];
                let (line, col) = src.position(problem.offset);
                let message = problem.message.clone();
                ConfigError { path: src.path.clone(), line, col, message, unreadable: problem.unreadable }
            })
            .collect();
        ConfigErrors(errors)
    }

    /// Deserialize a source, reporting every unknown key (not only the first) at its place.
    fn parse<T: DeserializeOwned>(&mut self, source: usize) -> Option<T> {
        let text = &self.sources[source].text;
        let mut unknown = Vec::new();
        let parsed = toml::Deserializer::parse(text)
            .and_then(|de| serde_ignored::deserialize(de, |path| unknown.push(path.to_string())));
        let mut found = Vec::new();
        if !unknown.is_empty()
            && let Ok(document) = toml::de::DeTable::parse(text)
        {
            for path in &unknown {
                let (span, key, table) = unknown_key_place(document.get_ref(), path);
                let message = match table.as_str() {
                    "" => format!("unknown field `{key}`"),
                    table => format!("unknown field `{key}` in {table}"),
                };
                found.push((span, message));
            }
        }
        for (span, message) in found {
            self.error(source, span, message);
        }
        match parsed {
            Ok(value) if unknown.is_empty() => Some(value),
            Ok(_) => None,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let message = e.message().trim_end().to_owned();
                self.error(source, span, message);
                None
            }
        }
    }

    fn location(&self, origin: &Origin) -> String {
        let src = &self.sources[origin.source];
        let (line, col) = src.position(origin.offset);
        format!("{}:{line}:{col}", src.path.display())
    }

    fn app_settings(&mut self, main: usize, raw: &RawConfig) -> AppSettings {
        AppSettings {
            default_action: raw.policy.action.unwrap_or_default(),
            max_server: self.list_limit(main, raw.policy.max_server_domains.as_ref()),
            max_webview: self.list_limit(main, raw.policy.max_webview_domains.as_ref()),
        }
    }

    fn read_apps_dir(
        &mut self,
        main: usize,
        span: Range<usize>,
        dir: &Path,
        settings: AppSettings,
        cache: &AppsCache,
        apps: &mut Vec<AppInput>,
    ) {
        let listing = match std::fs::read_dir(dir) {
            Ok(listing) => listing,
            Err(e) => {
                self.unreadable(main, span, format!("cannot read apps_dir {}: {e}", dir.display()));
                return;
            }
        };
        let mut files: Vec<PathBuf> = listing
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "toml") && path.is_file())
            .collect();
        files.retain(|file| !self.candidates.contains_key(file));
        files.extend(self.candidates.iter().filter(|(_, text)| text.is_some()).map(|(file, _)| file.clone()));
        files.sort();
        for file in files {
            let candidate = self.candidates.get(&file).cloned().flatten();
            let read = match candidate {
                Some(text) => Ok(text),
                None => super::read_settled(&file),
            };
            self.take_apps_text(file, read.map(Arc::from), None, settings, cache, apps);
        }
    }

    /// The store's apps, each as a file of its own, with the changes being checked in place.
    fn read_store_apps(
        &mut self,
        store_apps: &StoreApps,
        settings: AppSettings,
        cache: &AppsCache,
        apps: &mut Vec<AppInput>,
    ) {
        let mut ids: Vec<&String> = store_apps.keys().collect();
        let changed: Vec<String> = self
            .candidates
            .iter()
            .filter(|(_, text)| text.is_some())
            .filter_map(|(file, _)| file.to_str()?.strip_prefix("postgres:").map(str::to_owned))
            .collect();
        ids.extend(changed.iter().filter(|id| !store_apps.contains_key(*id)));
        ids.sort();
        for id in ids {
            let file = store_source(id);
            let text: Arc<str> = match self.candidates.get(&file) {
                Some(Some(text)) => Arc::from(text.as_str()),
                Some(None) => continue, // removed by the change being checked
                None => store_apps[id].clone(),
            };
            self.take_apps_text(file, Ok(text), Some(id), settings, cache, apps);
        }
    }

    /// Take the apps of one file's text (from the cache when it is unchanged); `one` names the
    /// only app the text may define (a store's definition of that app).
    fn take_apps_text(
        &mut self,
        file: PathBuf,
        read: std::io::Result<Arc<str>>,
        one: Option<&str>,
        settings: AppSettings,
        cache: &AppsCache,
        apps: &mut Vec<AppInput>,
    ) {
        match read {
            Ok(text) if text.trim().is_empty() => {
                let source = self.add_source(file, text);
                let message = "this apps file is empty (truncated by a writer?); delete it to remove its apps";
                self.error(source, 0..0, message);
            }
            Ok(text) => {
                let (print, cached) = match cache.files.get(&file).filter(|c| c.settings == settings) {
                    Some(c) if Arc::ptr_eq(&c.text, &text) => (c.fingerprint, Some(c.apps.clone())),
                    Some(c) => {
                        let print = fingerprint(&text);
                        (print, (c.fingerprint == print).then(|| c.apps.clone()))
                    }
                    None => (fingerprint(&text), None),
                };
                let source = self.add_source(file, text);
                self.sources[source].fingerprint = print;
                self.sources[source].from_cache = cached.is_some();
                if let Some(cached) = cached {
                    apps.extend(cached.into_iter().map(|(app, id_span)| AppInput::Cached { source, app, id_span }));
                } else if let Some(parsed) = self.parse::<RawAppsFile>(source) {
                    if let Some(id) = one
                        && (parsed.app.len() != 1 || parsed.app.iter().any(|app| app.id.get_ref() != id))
                    {
                        self.error(source, 0..0, format!("the store's definition of app {id:?} must be that one app"));
                        return;
                    }
                    apps.extend(parsed.app.into_iter().map(|app| AppInput::raw(source, app)));
                }
            }
            Err(e) => {
                let source = self.add_source(file, String::new());
                self.unreadable(source, 0..0, format!("cannot read the apps file: {e}"));
            }
        }
    }

    /// Put every `apps_dir` file that validated without an error into the cache, next to the
    /// files that were taken from it; files that are gone or broken drop out.
    fn update_cache(
        &self,
        main: usize,
        settings: AppSettings,
        cache: &mut AppsCache,
        apps: Vec<(usize, Arc<App>, Range<usize>)>,
    ) {
        let mut broken = vec![false; self.sources.len()];
        for problem in &self.errors {
            broken[problem.source] = true;
        }
        // Entries of files still here, fine and unchanged stay as they are (with thousands of
        // apps, rebuilding the whole cache would cost more than the change); the others go.
        let fine = |i: &usize| *i > main && !broken[*i];
        let kept: std::collections::HashSet<&Path> = (0..self.sources.len())
            .filter(|i| fine(i) && self.sources[*i].from_cache)
            .map(|i| self.sources[i].path.as_path())
            .collect();
        cache.files.retain(|path, _| kept.contains(path.as_path()));
        let mut fresh: HashMap<usize, CachedFile> = (0..self.sources.len())
            .filter(|i| fine(i) && !self.sources[*i].from_cache)
            .map(|i| {
                let src = &self.sources[i];
                (i, CachedFile { fingerprint: src.fingerprint, text: src.text.clone(), settings, apps: Vec::new() })
            })
            .collect();
        for (source, app, id_span) in apps {
            if let Some(file) = fresh.get_mut(&source) {
                file.apps.push((app, id_span));
            }
        }
        for (source, file) in fresh {
            cache.files.insert(self.sources[source].path.clone(), file);
        }
    }

    /// Validate everything into a [`Config`]; also returns every app with its source and id
    /// span, for the cache.
    #[allow(clippy::type_complexity)]
    fn config(
        &mut self,
        main: usize,
        raw: RawConfig,
        inputs: Vec<AppInput>,
        apps_dir: Option<PathBuf>,
        settings: AppSettings,
    ) -> (Config, Vec<(usize, Arc<App>, Range<usize>)>) {
        let server = self.server(main, &raw);
        let limits = self.limits(main, &raw);
        let p = &raw.policy;
        let AppSettings { default_action, max_server, max_webview } = settings;

        let require_https = p.require_https.as_ref().is_none_or(|flag| {
            if !flag.get_ref() {
                self.error(
                    main,
                    flag.span(),
                    "require_https = false is not supported: plain-HTTP forwarding is not implemented",
                );
            }
            true
        });
        let verify_tls = p.verify_tls.as_ref().is_none_or(|flag| *flag.get_ref());
        let tls = raw.tls.as_ref().and_then(|tls| self.tls(main, tls.get_ref()));

        let global_deny = self.domain_list(main, p.global_deny.as_ref(), "global_deny", MAX_GLOBAL_ENTRIES);
        let global_allow = self.domain_list(main, p.global_allow.as_ref(), "global_allow", MAX_GLOBAL_ENTRIES);

        let resolve = self.resolve(main, &raw);
        let dns = self.dns(main, &raw);
        let scopes = self.scopes(main, &raw.scopes);
        let store = self.store(main, &raw);
        let mut apps: Vec<(usize, Arc<App>, Range<usize>)> = Vec::with_capacity(inputs.len());
        let mut seen: HashMap<String, Origin> = HashMap::with_capacity(inputs.len());
        for input in inputs {
            let (source, id, id_span) = match &input {
                AppInput::Raw { source, app } => (*source, app.id.get_ref().as_str(), app.id.span()),
                AppInput::Cached { source, app, id_span } => (*source, &*app.id, id_span.clone()),
            };
            if let Some(first) = seen.get(id) {
                let message = format!("duplicate app id {id:?} (first defined at {})", self.location(first));
                self.error(source, id_span, message);
                continue;
            }
            seen.insert(id.to_owned(), Origin { source, offset: id_span.start });
            let app = match input {
                AppInput::Cached { app, .. } => Some(app),
                AppInput::Raw { app, .. } => {
                    self.app(source, &app, default_action, max_server, max_webview).map(Arc::new)
                }
            };
            if let Some(app) = app {
                apps.push((source, app, id_span));
            }
        }

        let unknown_app = match &p.unknown_app {
            None => None,
            Some(name) if name.get_ref() == "deny" => None,
            Some(name) => {
                let id = name.get_ref().as_str();
                if !seen.contains_key(id) {
                    self.error(
                        main,
                        name.span(),
                        format!("unknown_app = {id:?} names no app (use \"deny\" or an app id)"),
                    );
                } else if apps.iter().any(|(_, app, _)| &*app.id == id && app.token.is_some()) {
                    // An unknown id presents no token of that app, so the fallback would hand
                    // the app's rules to anyone: the token would protect nothing.
                    self.error(
                        main,
                        name.span(),
                        format!(
                            "unknown_app = {id:?} names an app with a token; unknown ids cannot present it, so \
                             they would get its rules without one: name an app without a token"
                        ),
                    );
                }
                Some(id.into())
            }
        };

        let mut listeners = vec![ListenerSpec { listen: server.listen, binding: None, tls: raw.tls.is_some() }];
        for listener in &raw.listener {
            let listen = self.socket_addr(main, &listener.listen, "listen");
            let wants_tls = listener.tls.as_ref().is_some_and(|tls| *tls.get_ref());
            if let Some(flag) = listener.tls.as_ref().filter(|_| wants_tls && raw.tls.is_none()) {
                self.error(main, flag.span(), "tls = true needs a [tls] section with cert and key");
            }
            if listener.channel.is_some() && listener.app.is_none() {
                self.error(main, listener.listen.span(), "a [[listener]] with a channel must also name its app");
            }
            let binding = listener.app.as_ref().map(|app| {
                if !seen.contains_key(app.get_ref().as_str()) {
                    self.error(main, app.span(), format!("[[listener]] app {:?} names no app", app.get_ref()));
                }
                Binding { app: app.get_ref().as_str().into(), channel: listener.channel.unwrap_or(Channel::Request) }
            });
            if listen.port() != 0 && listeners.iter().any(|l| l.listen == listen) {
                self.error(main, listener.listen.span(), format!("{listen} is already a proxy listener"));
            }
            listeners.push(ListenerSpec { listen, binding, tls: wants_tls });
        }

        let rules = GlobalRules {
            global_deny,
            global_allow,
            unknown_app,
            block_private_addresses: p.block_private_addresses.unwrap_or(true),
            resolve,
        };
        let config = Config {
            generation: 0,
            path: self.sources[main].path.clone(),
            apps_dir,
            other_files: std::mem::take(&mut self.other_files),
            server,
            limits,
            listeners,
            require_https,
            verify_tls,
            tls,
            dns,
            scopes,
            store,
            policy: Policy::new(apps.iter().map(|(_, app, _)| app.clone()), rules),
        };
        (config, apps)
    }

    /// Load `[tls]`: the files are read now, so a bad path or key is a config error with a
    /// position, at `check` and at reload alike.
    fn tls(&mut self, main: usize, raw: &RawTls) -> Option<TlsSettings> {
        let path = self.sources[main].path.clone();
        let cert = resolve_relative(&path, raw.cert.get_ref());
        let key = resolve_relative(&path, raw.key.get_ref());
        let client_ca = raw.client_ca.as_ref().map(|ca| resolve_relative(&path, ca.get_ref()));
        self.other_files.extend([cert.clone(), key.clone()].into_iter().chain(client_ca.clone()));
        match tls::server_config(&cert, &key, client_ca.as_deref()) {
            Ok(settings) => Some(settings),
            Err((file, message)) => {
                let (span, named) = match file {
                    TlsFile::Cert => (raw.cert.span(), Some(&cert)),
                    TlsFile::Key => (raw.key.span(), Some(&key)),
                    TlsFile::ClientCa => {
                        (raw.client_ca.as_ref().map_or(raw.cert.span(), Spanned::span), client_ca.as_ref())
                    }
                };
                // A file that is not there (yet: a rotation in progress) may come; a bad one stays bad.
                if named.is_some_and(|file| !file.exists()) {
                    self.unreadable(main, span, message);
                } else {
                    self.error(main, span, message);
                }
                None
            }
        }
    }

    /// `[scopes]`: the prompter, the timeouts, the user directory (read now, so `check` and a
    /// reload report its errors with their positions) and the operator's scope extensions.
    fn scopes(&mut self, main: usize, raw: &RawScopes) -> ScopeSettings {
        let path = self.sources[main].path.clone();
        let mut settings = ScopeSettings::defaults(&path);
        let webhook = raw.webhook_url.as_ref().and_then(|url| match WebhookUrl::parse(url.get_ref()) {
            Ok(parsed) => Some(parsed),
            Err(message) => {
                self.error(main, url.span(), message);
                None
            }
        });
        if let Some(prompter) = &raw.prompter {
            settings.prompter = match prompter.get_ref().as_str() {
                "allow" => Prompter::Allow,
                "deny" => Prompter::Deny,
                "pending" => Prompter::Pending,
                "webhook" => match (webhook, &raw.webhook_url) {
                    (Some(url), _) => Prompter::Webhook(url),
                    (None, Some(_)) => Prompter::Pending, // its error is reported above
                    (None, None) => {
                        self.error(main, prompter.span(), "prompter = \"webhook\" needs a webhook_url");
                        Prompter::Pending
                    }
                },
                _ => {
                    self.error(main, prompter.span(), "prompter must be allow, deny, pending or webhook");
                    Prompter::Pending
                }
            };
        }
        for (key, value, target) in [
            ("prompt_timeout", raw.prompt_timeout.as_ref(), &mut settings.prompt_timeout),
            ("code_ttl", raw.code_ttl.as_ref(), &mut settings.code_ttl),
        ] {
            *target = self.duration(main, value, key, *target);
        }
        if let Some(file) = &raw.consent_file {
            settings.consent_file = resolve_relative(&path, file.get_ref());
        }
        if let Some(users) = &raw.users {
            settings.users = std::sync::Arc::new(self.users(main, users));
        }
        let mut profiles = crate::scopes::rules::Profiles::default();
        for ext in &raw.scope {
            let Some(platform) = Platform::parse(ext.platform.get_ref()) else {
                self.error(main, ext.platform.span(), "platform must be mpaas, wechat or superapp");
                continue;
            };
            let mut fields = Vec::new();
            for field in ext.fields.iter().flatten() {
                match UserField::parse(field.get_ref()) {
                    Some(parsed) => fields.push(parsed),
                    None => {
                        let names: Vec<&str> = UserField::ALL.iter().map(|f| f.as_str()).collect();
                        let message =
                            format!("unknown user field {:?}; the fields are {}", field.get_ref(), names.join(", "));
                        self.error(main, field.span(), message);
                    }
                }
            }
            let extension = ScopeExtension {
                platform,
                scope: ext.scope.get_ref().clone(),
                apis: ext.apis.iter().flatten().map(|api| api.get_ref().clone()).collect(),
                title: ext.title.clone(),
                text: ext.text.clone(),
                fields,
                device: ext.device,
            };
            if let Err(e) = profiles.get_mut(platform).extend(&extension) {
                self.error(main, ext.scope.span(), format!("[[scopes.scope]] {:?}: {e}", ext.scope.get_ref()));
            }
        }
        settings.profiles = std::sync::Arc::new(profiles);
        settings
    }

    /// The user directory named by `[scopes].users`.
    fn users(&mut self, main: usize, file: &Spanned<String>) -> UserDirectory {
        let path = resolve_relative(&self.sources[main].path, file.get_ref());
        self.other_files.push(path.clone());
        let mut directory = UserDirectory::default();
        let text = match super::read_settled(&path) {
            Ok(text) => text,
            Err(e) => {
                self.unreadable(main, file.span(), format!("cannot read the user directory {}: {e}", path.display()));
                return directory;
            }
        };
        let source = self.add_source(path, text);
        let Some(parsed) = self.parse::<RawUsersFile>(source) else { return directory };
        for user in parsed.user {
            let id = user.id.get_ref();
            if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
                self.error(source, user.id.span(), "a user id is 1 to 128 characters, without control characters");
                continue;
            }
            let fields = [
                (UserField::Nickname, user.nickname),
                (UserField::Name, user.name),
                (UserField::LoginId, user.login_id),
                (UserField::Avatar, user.avatar),
                (UserField::Gender, user.gender),
                (UserField::Birthday, user.birthday),
                (UserField::Nationality, user.nationality),
                (UserField::ContactInfo, user.contact_info),
            ]
            .into_iter()
            .filter_map(|(field, value)| value.map(|value| (field, value)))
            .collect();
            if !directory.insert(id.clone(), fields) {
                self.error(source, user.id.span(), format!("duplicate user id {id:?}"));
            }
        }
        directory
    }

    fn server(&mut self, main: usize, raw: &RawConfig) -> Server {
        let listen = match &raw.server.listen {
            Some(listen) => self.socket_addr(main, listen, "listen"),
            None => DEFAULT_LISTEN.parse().expect("the default listen address is valid"),
        };
        let admin_listen = raw.server.admin_listen.as_ref().map(|a| self.socket_addr(main, a, "admin_listen"));
        let admin_token = raw.server.admin_token.as_ref().map(|token| {
            if token.get_ref().is_empty() {
                self.error(
                    main,
                    token.span(),
                    "admin_token must not be empty (remove it to disable admin authentication)",
                );
            } else if token.get_ref().trim() != token.get_ref() {
                // Clients' bearer tokens are read trimmed: this one could never match.
                self.error(main, token.span(), "admin_token must not begin or end with whitespace");
            }
            token.get_ref().clone()
        });
        let admin_token = match (&raw.server.admin_token_file, admin_token) {
            (None, token) => token,
            (Some(file), Some(_)) => {
                self.error(main, file.span(), "set admin_token or admin_token_file, not both");
                None
            }
            (Some(file), None) => {
                let path = resolve_relative(&self.sources[main].path, file.get_ref());
                self.other_files.push(path.clone());
                match super::read_settled(&path) {
                    Ok(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
                    Ok(_) => {
                        self.error(main, file.span(), format!("admin_token_file {} is empty", path.display()));
                        None
                    }
                    Err(e) => {
                        self.unreadable(
                            main,
                            file.span(),
                            format!("cannot read admin_token_file {}: {e}", path.display()),
                        );
                        None
                    }
                }
            }
        };
        let mut admin_hosts = Vec::new();
        for host in raw.server.admin_hosts.iter().flatten() {
            match parse_host(host.get_ref()) {
                Ok(Host::Name(name)) => admin_hosts.push(name.into_owned()),
                _ => self.error(
                    main,
                    host.span(),
                    format!(
                        "admin_hosts entry {:?} must be a host name (IP addresses are always accepted)",
                        host.get_ref()
                    ),
                ),
            }
        }
        let admin_users = self.admin_users(main, raw, admin_token.as_deref());
        let workers = match &raw.server.workers {
            None => DEFAULT_WORKERS,
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(n @ 0..=MAX_WORKERS) => n,
                _ => {
                    self.error(
                        main,
                        n.span(),
                        format!("workers must be 0 (the proxy on the main runtime) to {MAX_WORKERS}"),
                    );
                    0
                }
            },
        };
        Server { listen, admin_listen, admin_token, admin_hosts, admin_users, workers }
    }

    /// `[[admin_user]]` tables, and `admin_token` as the user `admin`.
    fn admin_users(&mut self, main: usize, raw: &RawConfig, admin_token: Option<&str>) -> Vec<AdminUser> {
        let mut users: Vec<AdminUser> = Vec::with_capacity(raw.admin_user.len() + 1);
        if let Some(token) = admin_token {
            let hash = super::token_sha256(token);
            users.push(AdminUser { name: "admin".to_owned(), token_sha256: hash, role: Role::Admin, apps: None });
        }
        for user in &raw.admin_user {
            let name = user.name.get_ref();
            if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
                self.error(main, user.name.span(), "an admin user's name is 1 to 64 characters, without spaces");
            } else if users.iter().any(|u| &u.name == name) {
                let message = if name == "admin" && admin_token.is_some() {
                    "admin user \"admin\" is already admin_token's user; name this one otherwise".to_owned()
                } else {
                    format!("duplicate admin user {name:?}")
                };
                self.error(main, user.name.span(), message);
            }
            let role = Role::parse(user.role.get_ref()).unwrap_or_else(|| {
                self.error(main, user.role.span(), "role must be viewer, editor or admin");
                Role::Viewer
            });
            let Some(hash) = parse_sha256(user.token_sha256.get_ref()).filter(|hash| *hash != super::token_sha256(""))
            else {
                self.error(
                    main,
                    user.token_sha256.span(),
                    "token_sha256 must be 64 hex digits, the SHA-256 of a token that is not empty (`miniapp-gateway \
                     token` makes both)",
                );
                continue;
            };
            if users.iter().any(|u| u.token_sha256 == hash) {
                self.error(main, user.token_sha256.span(), "two admin users have the same token");
                continue;
            }
            let apps = user.apps.as_ref().map(|apps| {
                for app in apps.iter().filter(|app| !policy::is_valid_app_id(app.get_ref())) {
                    self.error(
                        main,
                        app.span(),
                        format!("app id {:?} must be 1 to 64 characters of A-Z a-z 0-9 _ - .", app.get_ref()),
                    );
                }
                apps.iter().map(|app| app.get_ref().as_str().into()).collect()
            });
            users.push(AdminUser { name: name.clone(), token_sha256: hash, role, apps });
        }
        users
    }

    fn socket_addr(&mut self, source: usize, raw: &Spanned<String>, key: &str) -> SocketAddr {
        raw.get_ref().parse().unwrap_or_else(|_| {
            self.error(
                source,
                raw.span(),
                format!("{key} must be IP:PORT (e.g. \"127.0.0.1:8080\" or \"[::1]:8080\"), not {:?}", raw.get_ref()),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    fn limits(&mut self, main: usize, raw: &RawConfig) -> Limits {
        let l = &raw.limits;
        let defaults = Limits::default();
        let max_connections = match &l.max_connections {
            None => defaults.max_connections,
            Some(n) if (1..=MAX_CONNECTIONS_LIMIT).contains(n.get_ref()) => {
                usize::try_from(*n.get_ref()).unwrap_or(defaults.max_connections)
            }
            Some(n) => {
                self.error(main, n.span(), format!("max_connections must be from 1 to {MAX_CONNECTIONS_LIMIT}"));
                defaults.max_connections
            }
        };
        Limits {
            max_connections,
            connect_timeout: self.duration(
                main,
                l.connect_timeout.as_ref(),
                "connect_timeout",
                defaults.connect_timeout,
            ),
            header_timeout: self.duration(main, l.header_timeout.as_ref(), "header_timeout", defaults.header_timeout),
            idle_timeout: self.duration(main, l.idle_timeout.as_ref(), "idle_timeout", defaults.idle_timeout),
            shutdown_grace: self.duration(main, l.shutdown_grace.as_ref(), "shutdown_grace", defaults.shutdown_grace),
            shutdown_delay: self.duration(main, l.shutdown_delay.as_ref(), "shutdown_delay", defaults.shutdown_delay),
        }
    }

    fn duration(
        &mut self,
        main: usize,
        raw: Option<&Spanned<HumanDuration>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        match raw {
            None => default,
            Some(d) if d.get_ref().0.is_zero() && !key.starts_with("shutdown_") => {
                self.error(main, d.span(), format!("{key} must be longer than zero"));
                default
            }
            Some(d) if d.get_ref().0 > MAX_DURATION => {
                self.error(main, d.span(), format!("{key} must be at most 7 days"));
                default
            }
            Some(d) => d.get_ref().0,
        }
    }

    fn list_limit(&mut self, main: usize, raw: Option<&Spanned<i64>>) -> usize {
        match raw {
            None => DEFAULT_MAX_DOMAINS,
            Some(n) if (1..=MAX_LIST_LIMIT).contains(n.get_ref()) => {
                usize::try_from(*n.get_ref()).unwrap_or(DEFAULT_MAX_DOMAINS)
            }
            Some(n) => {
                self.error(main, n.span(), format!("list limits must be from 1 to {MAX_LIST_LIMIT}"));
                DEFAULT_MAX_DOMAINS
            }
        }
    }

    fn app(
        &mut self,
        source: usize,
        raw: &RawApp,
        default_action: Action,
        max_server: usize,
        max_webview: usize,
    ) -> Option<App> {
        let id = raw.id.get_ref();
        let valid_id = policy::is_valid_app_id(id);
        if !valid_id {
            self.error(source, raw.id.span(), format!("app id {id:?} must be 1 to 64 characters of A-Z a-z 0-9 _ - ."));
        }
        let token = raw.token.as_ref().map(|token| {
            if token.get_ref().is_empty() {
                self.error(source, token.span(), "token must not be empty (remove it to accept any password)");
            }
            token.get_ref().as_str().into()
        });
        let server_domains = self.domain_list(source, raw.server_domains.as_ref(), "server_domains", max_server);
        let webview_domains = self.domain_list(source, raw.webview_domains.as_ref(), "webview_domains", max_webview);
        let mut api_whitelist = HashSet::new();
        let mut api_entries = Vec::new();
        for api in raw.api_whitelist.iter().flatten() {
            let RawApi { name, remark } = api.get_ref();
            self.remark(source, api.span(), name, remark.as_deref());
            if name.is_empty() || name.chars().any(char::is_whitespace) {
                self.error(source, api.span(), format!("API name {name:?} must be non-empty, without spaces"));
            } else if !api_whitelist.insert(name.as_str().into()) {
                self.error(source, api.span(), format!("duplicate API {name:?} in api_whitelist"));
            } else {
                api_entries.push((name.as_str().into(), remark.as_deref().map(Into::into)));
            }
        }
        let platform = raw.platform.as_ref().map_or(Platform::default(), |platform| {
            Platform::parse(platform.get_ref()).unwrap_or_else(|| {
                self.error(source, platform.span(), "platform must be mpaas, wechat or superapp");
                Platform::default()
            })
        });
        let secret = raw.secret.as_ref().map(|secret| {
            let text = secret.get_ref();
            if text.is_empty() || text.trim() != text {
                let message = "secret must not be empty or begin or end with whitespace (remove it: no auth codes)";
                self.error(source, secret.span(), message);
            }
            text.as_str().into()
        });
        valid_id.then(|| App {
            id: id.as_str().into(),
            name: raw.name.clone(),
            token,
            action: raw.action.unwrap_or(default_action),
            server_domains,
            webview_domains,
            api_whitelist,
            api_entries,
            platform,
            secret,
        })
    }

    /// An entry's remark is at most [`MAX_REMARK_CHARS`] characters.
    fn remark(&mut self, source: usize, span: std::ops::Range<usize>, entry: &str, remark: Option<&str>) {
        if remark.is_some_and(|remark| remark.chars().count() > MAX_REMARK_CHARS) {
            self.error(source, span, format!("the remark of {entry:?} is longer than {MAX_REMARK_CHARS} characters"));
        }
    }

    fn domain_list(&mut self, source: usize, raw: Option<&SpannedList<RawEntry>>, key: &str, max: usize) -> DomainList {
        let Some(raw) = raw else {
            return DomainList::default();
        };
        if raw.get_ref().len() > max {
            self.error(
                source,
                raw.span(),
                format!("{key} has {} entries; at most {max} are allowed", raw.get_ref().len()),
            );
        }
        let mut entries: Vec<Entry> = Vec::with_capacity(raw.get_ref().len());
        // Each valid entry's index in the file, to name the first copy of a duplicate.
        let mut positions: Vec<usize> = Vec::with_capacity(raw.get_ref().len());
        for (position, item) in raw.get_ref().iter().take(max).enumerate() {
            let RawEntry { domain, remark } = item.get_ref();
            self.remark(source, item.span(), domain, remark.as_deref());
            match parse_entry(domain) {
                Ok(mut entry) => {
                    entry.remark = remark.as_deref().map(Into::into);
                    if let Some(first) =
                        entries.iter().position(|e| e.pattern == entry.pattern && e.ports == entry.ports)
                    {
                        let first = positions[first];
                        self.error(source, item.span(), format!("{domain:?} duplicates {key}[{first}]"));
                    } else {
                        entries.push(entry);
                        positions.push(position);
                    }
                }
                Err(e) => self.error(source, item.span(), format!("{domain:?} in {key}: {e}")),
            }
        }
        DomainList::new(entries)
    }

    fn resolve(&mut self, main: usize, raw: &RawConfig) -> HashMap<Box<str>, Vec<(Option<u16>, ResolveOverride)>> {
        let mut resolve: HashMap<Box<str>, Vec<(Option<u16>, ResolveOverride)>> = HashMap::new();
        for (key, value) in &raw.resolve {
            let Some((host, port)) = self.resolve_key(key) else {
                self.error(
                    main,
                    value.span(),
                    format!("[resolve] key {key:?} must be host or host:port (a name, not an address)"),
                );
                continue;
            };
            let target = value.get_ref();
            let over = if let Ok(addr) = target.parse::<SocketAddr>() {
                ResolveOverride { ip: addr.ip(), port: Some(addr.port()) }
            } else if let Ok(ip) = target.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
                ResolveOverride { ip, port: None }
            } else {
                self.error(main, value.span(), format!("[resolve] value {target:?} must be ip or ip:port"));
                continue;
            };
            if over.port == Some(0) {
                self.error(main, value.span(), "[resolve] port must be from 1 to 65535");
                continue;
            }
            let rules = resolve.entry(host.into()).or_default();
            if rules.iter().any(|(p, _)| *p == port) {
                self.error(main, value.span(), format!("[resolve] {key:?} is given twice"));
            }
            rules.push((port, over));
        }
        resolve
    }

    fn store(&mut self, main: usize, raw: &RawConfig) -> StoreSettings {
        let s = &raw.store;
        let backend = s.backend.as_ref().map_or("files", |b| b.get_ref().as_str());
        let postgres_only = [
            s.url.as_ref().map(|v| ("url", v.span())),
            s.password_file.as_ref().map(|v| ("password_file", v.span())),
            s.ca.as_ref().map(|v| ("ca", v.span())),
            s.cache.as_ref().map(|v| ("cache", v.span())),
            s.poll_interval.as_ref().map(|v| ("poll_interval", v.span())),
            s.pool_size.as_ref().map(|v| ("pool_size", v.span())),
        ];
        match backend {
            "files" => {
                for (key, span) in postgres_only.into_iter().flatten() {
                    self.error(main, span, format!("{key} is a setting of backend = \"postgres\""));
                }
                return StoreSettings::Files;
            }
            "postgres" => {}
            other => {
                let span = s.backend.as_ref().map_or(0..0, |b| b.span());
                self.error(main, span, format!("backend {other:?} is not a store: files or postgres"));
                return StoreSettings::Files;
            }
        }
        let backend_span = s.backend.as_ref().map_or(0..0, |b| b.span());
        if let Some(dir) = &raw.policy.apps_dir {
            self.error(
                main,
                dir.span(),
                "apps_dir and backend = \"postgres\" exclude each other: the apps are in the database",
            );
        }
        let from_env = std::env::var(DATABASE_URL_ENV).ok().filter(|url| !url.trim().is_empty());
        let url = match (&s.url, from_env) {
            // From the environment (a Kubernetes Secret): a password in it is kept out of the TOML.
            (None, Some(url)) => match url.parse::<tokio_postgres::Config>() {
                Ok(_) => url,
                Err(e) => {
                    let message = format!("{DATABASE_URL_ENV} is not a PostgreSQL connection URL: {e}");
                    self.error(main, backend_span.clone(), message);
                    String::new()
                }
            },
            (None, None) => {
                self.error(
                    main,
                    backend_span.clone(),
                    format!("backend = \"postgres\" needs url = \"postgres://user@host/db\" (or {DATABASE_URL_ENV})"),
                );
                String::new()
            }
            (Some(url), _) => {
                match url.get_ref().parse::<tokio_postgres::Config>() {
                    Err(e) => self.error(main, url.span(), format!("url is not a PostgreSQL connection URL: {e}")),
                    Ok(parsed) if parsed.get_password().is_some() => self.error(
                        main,
                        url.span(),
                        format!("url holds a password: put it in password_file or {DATABASE_PASSWORD_ENV}"),
                    ),
                    Ok(_) => {}
                }
                url.get_ref().clone()
            }
        };
        let path = self.sources[main].path.clone();
        let password = match &s.password_file {
            Some(file) => {
                let file = resolve_relative(&path, file.get_ref());
                self.other_files.push(file.clone());
                match std::fs::read_to_string(&file) {
                    Ok(text) => Some(text.trim_end_matches(['\r', '\n']).to_owned()),
                    Err(e) => {
                        let span = s.password_file.as_ref().map_or(0..0, |f| f.span());
                        self.unreadable(main, span, format!("cannot read password_file {}: {e}", file.display()));
                        None
                    }
                }
            }
            None => std::env::var(DATABASE_PASSWORD_ENV).ok(),
        };
        let ca = s.ca.as_ref().map(|ca| {
            let ca = resolve_relative(&path, ca.get_ref());
            self.other_files.push(ca.clone());
            ca
        });
        // TLS to the database is rustls, which always verifies the server against `ca` (what
        // libpq calls verify-full): sslmode is disable or require, never prefer's fallback.
        if let Ok(parsed) = url.parse::<tokio_postgres::Config>() {
            use tokio_postgres::config::SslMode;
            let span = s.url.as_ref().map_or(backend_span.clone(), |u| u.span());
            match parsed.get_ssl_mode() {
                SslMode::Disable => {}
                SslMode::Require if ca.is_some() => {}
                SslMode::Require => self.error(
                    main,
                    span,
                    "sslmode=require needs ca = \"…\": the CA certificate the database server's certificate is checked against",
                ),
                _ => self.error(
                    main,
                    span,
                    "the url's sslmode (prefer when it names none) may fall back to plain text: use sslmode=require \
                     with ca (the server's certificate is verified, as verify-full), or sslmode=disable",
                ),
            }
        }
        let cache = match &s.cache {
            Some(cache) => resolve_relative(&path, cache.get_ref()),
            None => {
                self.error(
                    main,
                    backend_span,
                    "backend = \"postgres\" needs cache = \"…/apps.json\": the last good snapshot, for starts while the database is down",
                );
                PathBuf::new()
            }
        };
        let poll_interval = match &s.poll_interval {
            None => Duration::from_secs(5),
            Some(d) if d.get_ref().0 >= Duration::from_millis(100) => d.get_ref().0,
            Some(d) => {
                self.error(main, d.span(), "poll_interval must be at least 100ms");
                Duration::from_secs(5)
            }
        };
        let pool_size = match &s.pool_size {
            None => DEFAULT_POOL_SIZE,
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(n @ 1..=MAX_POOL_SIZE) => n,
                _ => {
                    self.error(main, n.span(), format!("pool_size must be 1 to {MAX_POOL_SIZE} connections"));
                    DEFAULT_POOL_SIZE
                }
            },
        };
        StoreSettings::Postgres(PostgresSettings {
            url,
            password,
            ca,
            cache,
            poll_interval,
            pool_size,
            ready_without_store: s.ready_without_store.unwrap_or(true),
        })
    }

    fn dns(&mut self, main: usize, raw: &RawConfig) -> Dns {
        let Some(list) = &raw.dns.nameservers else {
            return Dns::default();
        };
        if list.get_ref().is_empty() {
            self.error(main, list.span(), "nameservers must name at least one server (remove it for the system's)");
        }
        let mut nameservers = Vec::with_capacity(list.get_ref().len());
        for server in list.get_ref() {
            match server.get_ref().parse::<SocketAddr>() {
                Ok(addr) if addr.port() == 0 => {
                    self.error(main, server.span(), "a name server's port must be from 1 to 65535");
                }
                Ok(addr) => nameservers.push(addr),
                Err(_) => self.error(
                    main,
                    server.span(),
                    format!(
                        "nameservers must be IP:PORT (e.g. \"10.0.0.53:53\" or \"[::1]:53\"), not {:?}",
                        server.get_ref()
                    ),
                ),
            }
        }
        Dns { nameservers }
    }

    fn resolve_key(&self, key: &str) -> Option<(String, Option<u16>)> {
        let (host, port) = match key.rsplit_once(':') {
            Some((host, port)) => (host, Some(policy::target::parse_port(port).ok()?)),
            None => (key, None),
        };
        match parse_host(host).ok()? {
            Host::Name(name) => Some((name.into_owned(), port)),
            Host::Ip(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match load_text(Path::new("gw.toml"), text.to_owned(), &mut AppsCache::default()) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn scopes_settings_are_checked_where_they_are() {
        let text = "[scopes]\nprompter = \"ask\"\nprompt_timeout = \"0s\"\nwebhook_url = \"https://hook.example/p\"\n\n\
                    [[scopes.scope]]\nplatform = \"alipay\"\nscope = \"camera\"\n\n\
                    [[scopes.scope]]\nplatform = \"mpaas\"\nscope = \"album\"\napis = [\"scan\"]\n\n\
                    [[scopes.scope]]\nplatform = \"superapp\"\nscope = \"USER_PHONE\"\nfields = [\"phone\"]\n\n\
                    [[app]]\nid = \"a\"\nplatform = \"weixin\"\nsecret = \"\"\n";
        assert_eq!(
            errors(text),
            [
                "gw.toml:2:12: prompter must be allow, deny, pending or webhook",
                "gw.toml:3:18: prompt_timeout must be longer than zero",
                "gw.toml:4:15: webhook_url must be an http:// URL (no TLS to the host's dialog), not \"https://hook.example/p\"",
                "gw.toml:7:12: platform must be mpaas, wechat or superapp",
                r#"gw.toml:12:9: [[scopes.scope]] "album": API "scan" is already covered by scope "camera" of mpaas; an API needs one scope"#,
                r#"gw.toml:17:9: [[scopes.scope]] "USER_PHONE": a new scope needs apis (a device scope) or fields (a user-information scope)"#,
                r#"gw.toml:18:11: unknown user field "phone"; the fields are user_id, nickname, name, login_id, hash_login_id, avatar, gender, birthday, nationality, contact_info"#,
                "gw.toml:22:12: platform must be mpaas, wechat or superapp",
                "gw.toml:23:10: secret must not be empty or begin or end with whitespace (remove it: no auth codes)",
            ]
        );
        assert_eq!(
            errors("[scopes]\nprompter = \"webhook\"\n"),
            ["gw.toml:2:12: prompter = \"webhook\" needs a webhook_url"]
        );
        assert_eq!(
            errors(
                "[scopes]\nconsent = \"x\"\n\n[[scopes.scope]]\nplatform = \"mpaas\"\nscope = \"camera\"\ntitel = \"t\"\n"
            ),
            ["gw.toml:2:1: unknown field `consent` in scopes", "gw.toml:7:1: unknown field `titel` in scopes.scope[0]"]
        );
    }

    #[test]
    fn the_user_directory_is_read_and_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("gateway.toml");
        std::fs::write(&main, "[scopes]\nusers = \"users.toml\"\nprompter = \"webhook\"\nwebhook_url = \"http://127.0.0.1:7000/prompt?x=1\"\n").unwrap();
        let missing = load(&main, &mut AppsCache::default(), None).unwrap_err();
        assert!(
            missing.0[0].unreadable && missing.0[0].message.starts_with("cannot read the user directory"),
            "{missing}"
        );
        let users = dir.path().join("users.toml");
        std::fs::write(&users, "[[user]]\nid = \"u1\"\nnick = \"x\"\n\n[[user]]\nid = \"u1\"\n").unwrap();
        let err = load(&main, &mut AppsCache::default(), None).unwrap_err().to_string();
        assert!(err.contains("users.toml:3:1: unknown field `nick` in user[0]"), "{err}");
        std::fs::write(&users, "[[user]]\nid = \"u1\"\nnickname = \"x\"\n\n[[user]]\nid = \"u1\"\n").unwrap();
        let err = load(&main, &mut AppsCache::default(), None).unwrap_err().to_string();
        assert!(err.ends_with("users.toml:6:6: duplicate user id \"u1\""), "{err}");
        std::fs::write(&users, "[[user]]\nid = \"u1\"\nnickname = \"x\"\nlogin_id = \"l\"\n").unwrap();
        let config = load(&main, &mut AppsCache::default(), None).unwrap();
        let directory = &config.scopes.users;
        assert_eq!(directory.field("u1", UserField::Nickname).as_deref(), Some("x"));
        assert_eq!(directory.field("u1", UserField::UserId).as_deref(), Some("u1"));
        assert_eq!(directory.field("u1", UserField::Name), None);
        assert_eq!(directory.field("u2", UserField::UserId), None);
        assert!(config.other_files.contains(&users), "a change to it is noticed and reloaded");
        let Prompter::Webhook(url) = &config.scopes.prompter else { panic!("{:?}", config.scopes.prompter) };
        assert_eq!((url.host.as_str(), url.port, url.path.as_str()), ("127.0.0.1", 7000, "/prompt?x=1"));
        assert_eq!(config.scopes.consent_file, dir.path().join("consent.json"));
    }

    #[test]
    fn a_file_of_comments_is_a_valid_config_with_defaults() {
        let text = "# nothing but defaults\n".to_owned();
        let config = load_text(Path::new("gw.toml"), text, &mut AppsCache::default()).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.limits.max_connections, 10_000);
        assert_eq!(config.policy.app_count(), 0);
    }

    #[test]
    fn every_error_is_reported_with_its_position() {
        let text = r#"
[[app]]
id = "demo"
server_domains = [
  "http://api.shop.example",
  "https://10.0.0.1",
  { domain = "*x.shop.example", remark = "bad wildcard" },
]

[[app]]
id = "demo"
"#;
        assert_eq!(
            errors(text),
            [
                r#"gw.toml:5:3: "http://api.shop.example" in server_domains: only https:// and wss:// entries are allowed"#,
                r#"gw.toml:6:3: "https://10.0.0.1" in server_domains: IP addresses are not allowed; name the host"#,
                r#"gw.toml:7:3: "*x.shop.example" in server_domains: a wildcard is only allowed as a whole leading label (*.example.com)"#,
                r#"gw.toml:11:6: duplicate app id "demo" (first defined at gw.toml:3:6)"#,
            ]
        );
    }

    #[test]
    fn every_unknown_key_is_reported_where_it_is() {
        let text = "[policy]\nacton = \"report\"\n\n[[app]]\nid = \"a\"\n\n[[app]]\nid = \"b\"\nserver_domain = [\"b.example\"]\nserver_domains = [{ domain = \"c.example\", remrk = \"x\" }]\n";
        assert_eq!(
            errors(text),
            [
                "gw.toml:2:1: unknown field `acton` in policy",
                "gw.toml:9:1: unknown field `server_domain` in app[1]",
                "gw.toml:10:43: unknown field `remrk` in app[1].server_domains[0]",
            ]
        );
    }

    #[test]
    fn api_entries_take_remarks_with_the_domains_rules() {
        let long = "r".repeat(201);
        let text = format!(
            "[[app]]\nid = \"a\"\napi_whitelist = [\"shop.pay\", {{ api = \"shop.share\", remark = \"{long}\" }}, \
             {{ api = \"shop.pay\" }}, {{ api = \"x\", remrk = \"y\" }}, {{ remark = \"z\" }}]\n"
        );
        let errors = errors(&text);
        assert_eq!(errors.len(), 2, "{errors:?}"); // a table without `api` stops the parse there
        assert!(errors[1].contains("missing field `api`"), "{errors:?}");
        let text = text.replace(", { remark = \"z\" }", "");
        assert_eq!(super::tests::errors(&text), ["gw.toml:3:303: unknown field `remrk` in app[0].api_whitelist[3]"]);
        let text = text.replace(", { api = \"x\", remrk = \"y\" }", "");
        assert_eq!(
            super::tests::errors(&text),
            [
                r#"gw.toml:3:30: the remark of "shop.share" is longer than 200 characters"#,
                r#"gw.toml:3:268: duplicate API "shop.pay" in api_whitelist"#,
            ]
        );
        let config = load_text(
            Path::new("gw.toml"),
            "[[app]]\nid = \"a\"\napi_whitelist = [{ api = \"shop.pay\", remark = \"pay\" }]\n".into(),
            &mut AppsCache::default(),
        )
        .unwrap();
        assert_eq!(config.policy.app("a").unwrap().api_entries, [("shop.pay".into(), Some("pay".into()))]);
    }

    #[test]
    fn the_store_section_is_checked_where_it_is() {
        let config = load_text(Path::new("gw.toml"), String::new(), &mut AppsCache::default()).unwrap();
        assert_eq!(config.store, StoreSettings::Files);
        let text = "[store]\nbackend = \"postgres\"\nurl = \"postgres://gw@db.internal/gateway?sslmode=disable\"\n\
                    cache = \"cache/apps.json\"\npoll_interval = \"2s\"\n";
        let config = load_text(Path::new("/etc/gw/gw.toml"), text.to_owned(), &mut AppsCache::default()).unwrap();
        let StoreSettings::Postgres(pg) = config.store else { panic!("not postgres") };
        assert_eq!(
            (pg.cache.as_path(), pg.poll_interval, pg.pool_size, pg.ready_without_store),
            (Path::new("/etc/gw/cache/apps.json"), Duration::from_secs(2), 4, true)
        );
        assert_eq!(
            errors(
                "[policy]\napps_dir = \"apps\"\n\n[store]\nbackend = \"postgres\"\nurl = \"postgres://gw:pw@db/gateway\"\n\
                 poll_interval = \"1ms\"\npool_size = 0\n"
            ),
            [
                "gw.toml:2:12: cannot read apps_dir apps: No such file or directory (os error 2)",
                r#"gw.toml:2:12: apps_dir and backend = "postgres" exclude each other: the apps are in the database"#,
                r#"gw.toml:5:11: backend = "postgres" needs cache = "…/apps.json": the last good snapshot, for starts while the database is down"#,
                "gw.toml:6:7: url holds a password: put it in password_file or MINIAPP_GATEWAY_DATABASE_PASSWORD",
                "gw.toml:6:7: the url's sslmode (prefer when it names none) may fall back to plain text: use \
                 sslmode=require with ca (the server's certificate is verified, as verify-full), or sslmode=disable",
                "gw.toml:7:17: poll_interval must be at least 100ms",
                "gw.toml:8:13: pool_size must be 1 to 64 connections",
            ]
        );
        assert_eq!(
            errors("[store]\nbackend = \"etcd\"\n"),
            [r#"gw.toml:2:11: backend "etcd" is not a store: files or postgres"#]
        );
        assert_eq!(
            errors("[store]\nurl = \"postgres://db/gateway\"\n"),
            [r#"gw.toml:2:7: url is a setting of backend = "postgres""#]
        );
    }

    #[test]
    fn unknown_keys_and_bad_types_are_errors() {
        assert_eq!(errors("[server]\nlisten = \"127.0.0.1:8080\"\nlisen = 1\n").len(), 1);
        assert!(errors("[server]\nlisen = 1\n")[0].starts_with("gw.toml:2:1: unknown field `lisen`"));
        assert_eq!(errors("verbose = true\n"), ["gw.toml:1:1: unknown field `verbose`"]);
        assert!(errors("[limits]\nconnect_timeout = \"soon\"\n")[0].starts_with("gw.toml:2:19: invalid duration"));
    }

    #[test]
    fn lists_are_bounded_and_deduplicated() {
        let many: Vec<String> = (0..31).map(|i| format!("\"a{i}.shop.example\"")).collect();
        let text = format!("[[app]]\nid = \"demo\"\nserver_domains = [{}]\n", many.join(", "));
        assert_eq!(errors(&text), ["gw.toml:3:18: server_domains has 31 entries; at most 30 are allowed"]);
        let text = "[[app]]\nid = \"demo\"\nwebview_domains = [\"a.example\", \"https://A.example:443\"]\n";
        assert_eq!(errors(text), [r#"gw.toml:3:33: "https://A.example:443" duplicates webview_domains[0]"#]);
        // the first copy is named by its place in the file, invalid entries before it counted
        let text = "[[app]]\nid = \"demo\"\nwebview_domains = [\"http://x.example\", \"a.example\", \"a.example\"]\n";
        assert_eq!(errors(text)[1], r#"gw.toml:3:53: "a.example" duplicates webview_domains[1]"#);
        let remark = "r".repeat(201);
        let text =
            format!("[[app]]\nid = \"demo\"\nserver_domains = [{{ domain = \"a.example\", remark = \"{remark}\" }}]\n");
        assert_eq!(errors(&text), [r#"gw.toml:3:19: the remark of "a.example" is longer than 200 characters"#]);
    }

    #[test]
    fn global_lists_are_bounded_too() {
        let many: Vec<String> = (0..10_001).map(|i| format!("\"h{i}.example\"")).collect();
        let text = format!("[policy]\nglobal_deny = [{}]\n", many.join(", "));
        assert_eq!(errors(&text), ["gw.toml:2:15: global_deny has 10001 entries; at most 10000 are allowed"]);
    }

    #[test]
    fn references_must_name_an_app() {
        let text = "[policy]\nunknown_app = \"ghost\"\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\napp = \"phantom\"\n";
        assert_eq!(
            errors(text),
            [
                r#"gw.toml:2:15: unknown_app = "ghost" names no app (use "deny" or an app id)"#,
                r#"gw.toml:6:7: [[listener]] app "phantom" names no app"#,
            ]
        );
    }

    #[test]
    fn the_unknown_app_fallback_may_not_name_an_app_with_a_token() {
        let text = "[policy]\nunknown_app = \"demo\"\n\n[[app]]\nid = \"demo\"\ntoken = \"s3cret\"\n";
        let found = errors(text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with(r#"gw.toml:2:15: unknown_app = "demo" names an app with a token"#), "{found:?}");
        assert!(errors("[policy]\nunknown_app = \"demo\"\n\n[[app]]\nid = \"demo\"\n").is_empty());
    }

    #[test]
    fn values_that_would_overflow_are_refused() {
        assert_eq!(
            errors("[limits]\nmax_connections = 9223372036854775807\n"),
            ["gw.toml:2:19: max_connections must be from 1 to 10000000"]
        );
        assert_eq!(
            errors("[limits]\nidle_timeout = \"584542046090y\"\n"),
            ["gw.toml:2:16: idle_timeout must be at most 7 days"]
        );
        assert!(errors("[limits]\nshutdown_delay = \"0s\"\nshutdown_grace = \"7d\"\n").is_empty());
    }

    #[test]
    fn an_empty_file_is_never_a_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, "  \n").unwrap();
        let err = load(&path, &mut AppsCache::default(), None).unwrap_err();
        assert!(
            err.to_string().ends_with(
                "gateway.toml:1:1: the config file is empty (truncated by a writer?); an empty file is never loaded"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_file_still_being_written_is_read_once_it_holds_still() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, "[server]\n").unwrap();
        let writer_path = path.clone();
        let writer = std::thread::spawn(move || {
            // a slow writer: a line every 30 ms for a quarter of a second
            let mut file = std::fs::OpenOptions::new().append(true).open(writer_path).unwrap();
            for _ in 0..8 {
                std::thread::sleep(Duration::from_millis(30));
                std::io::Write::write_all(&mut file, b"# more\n").unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(10));
        let text = super::super::read_settled(&path).unwrap();
        writer.join().unwrap();
        assert_eq!(text, format!("[server]\n{}", "# more\n".repeat(8)), "read before the writer finished");
    }

    #[test]
    fn admin_users_are_checked() {
        let hash = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"; // "password"
        let text = format!(
            "[server]\nadmin_token = \"t\"\n\n[[admin_user]]\nname = \"alice\"\ntoken_sha256 = \"{hash}\"\nrole = \"editor\"\n\n\
             [[admin_user]]\nname = \"admin\"\ntoken_sha256 = \"{hash}\"\nrole = \"root\"\n\n\
             [[admin_user]]\nname = \"bob\"\ntoken_sha256 = \"abc\"\nrole = \"viewer\"\n"
        );
        assert_eq!(
            errors(&text),
            [
                r#"gw.toml:10:8: admin user "admin" is already admin_token's user; name this one otherwise"#,
                "gw.toml:11:16: two admin users have the same token",
                "gw.toml:12:8: role must be viewer, editor or admin",
                "gw.toml:16:16: token_sha256 must be 64 hex digits, the SHA-256 of a token that is not empty (`miniapp-gateway token` makes both)",
            ]
        );
        let text = format!(
            "[[admin_user]]\nname = \"alice\"\ntoken_sha256 = \"{}\"\nrole = \"editor\"\n",
            hash.to_uppercase()
        );
        let config = load_text(Path::new("gw.toml"), text, &mut AppsCache::default()).unwrap();
        let alice = &config.server.admin_users[0];
        assert_eq!((alice.name.as_str(), alice.role), ("alice", Role::Editor));
        assert_eq!(alice.token_sha256, super::super::token_sha256("password"));
    }

    #[test]
    fn a_file_that_cannot_be_read_is_told_from_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("gateway.toml");
        std::fs::write(&main, "[tls]\ncert = \"gw.crt\"\nkey = \"gw.key\"\n").unwrap();
        let missing = load(&main, &mut AppsCache::default(), None).unwrap_err();
        assert!(missing.0.iter().all(|e| e.unreadable), "{missing}");
        std::fs::write(dir.path().join("gw.crt"), "not a certificate").unwrap();
        std::fs::write(dir.path().join("gw.key"), "not a key").unwrap();
        let bad = load(&main, &mut AppsCache::default(), None).unwrap_err();
        assert!(bad.0.iter().all(|e| !e.unreadable), "{bad}");
        let unknown = load(&dir.path().join("absent.toml"), &mut AppsCache::default(), None).unwrap_err();
        assert!(unknown.0[0].unreadable);
    }

    #[test]
    fn tls_files_are_loaded_at_check_time() {
        let text = "[tls]\ncert = \"missing.crt\"\nkey = \"missing.key\"\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\ntls = true\n";
        let found = errors(text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("gw.toml:2:8: cannot read certificates from missing.crt"), "{found:?}");
        let found = errors("[[listener]]\nlisten = \"127.0.0.1:0\"\ntls = true\n");
        assert_eq!(found, ["gw.toml:3:7: tls = true needs a [tls] section with cert and key"]);
    }

    #[test]
    fn resolve_overrides_are_parsed() {
        let text = "[resolve]\n\"API.shop.example\" = \"127.0.0.1:9443\"\n\"img.shop.example:8443\" = \"::1\"\n";
        let config = load_text(Path::new("gw.toml"), text.to_owned(), &mut AppsCache::default()).unwrap();
        assert_eq!(config.policy.resolve_override("api.shop.example", 443), Some("127.0.0.1:9443".parse().unwrap()));
        assert_eq!(config.policy.resolve_override("img.shop.example", 8443), Some("[::1]:8443".parse().unwrap()));
        assert_eq!(config.policy.resolve_override("img.shop.example", 443), None);
        assert_eq!(errors("[resolve]\n\"10.0.0.1\" = \"127.0.0.1\"\n").len(), 1);
        assert_eq!(errors("[resolve]\n\"a.example\" = \"nowhere\"\n").len(), 1);
    }

    #[test]
    fn dns_nameservers_are_ip_and_port() {
        let text = "[dns]\nnameservers = [\"127.0.0.1:5353\", \"[::1]:53\"]\n";
        let config = load_text(Path::new("gw.toml"), text.to_owned(), &mut AppsCache::default()).unwrap();
        assert_eq!(config.dns.nameservers, ["127.0.0.1:5353".parse().unwrap(), "[::1]:53".parse().unwrap()]);
        let config = load_text(Path::new("gw.toml"), String::new(), &mut AppsCache::default()).unwrap();
        assert!(config.dns.nameservers.is_empty(), "no [dns]: the system's name servers");
        assert_eq!(
            errors("[dns]\nnameservers = [\"127.0.0.1\", \"ns.example:53\", \"10.0.0.53:0\"]\n"),
            [
                r#"gw.toml:2:16: nameservers must be IP:PORT (e.g. "10.0.0.53:53" or "[::1]:53"), not "127.0.0.1""#,
                r#"gw.toml:2:29: nameservers must be IP:PORT (e.g. "10.0.0.53:53" or "[::1]:53"), not "ns.example:53""#,
                "gw.toml:2:46: a name server's port must be from 1 to 65535",
            ]
        );
        assert_eq!(
            errors("[dns]\nnameservers = []\n"),
            ["gw.toml:2:15: nameservers must name at least one server (remove it for the system's)"]
        );
        assert!(errors("[dns]\nservers = []\n")[0].starts_with("gw.toml:2:1: unknown field `servers`"));
    }

    #[test]
    fn apps_dir_files_are_loaded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("apps")).unwrap();
        std::fs::write(dir.path().join("apps/a.toml"), "[[app]]\nid = \"a\"\nserver_domains = [\"a.example\"]\n")
            .unwrap();
        std::fs::write(dir.path().join("apps/b.toml"), "[[app]]\nid = \"a\"\n").unwrap();
        std::fs::write(dir.path().join("apps/notes.txt"), "not toml").unwrap();
        let main = dir.path().join("gateway.toml");
        std::fs::write(&main, "[policy]\napps_dir = \"apps\"\n").unwrap();
        let err = load(&main, &mut AppsCache::default(), None).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert!(err.0[0].to_string().contains("b.toml:2:6: duplicate app id \"a\" (first defined at "), "{err}");
        std::fs::remove_file(dir.path().join("apps/b.toml")).unwrap();
        let config = load(&main, &mut AppsCache::default(), None).unwrap();
        assert_eq!(config.policy.app_count(), 1);
    }

    fn apps_dir_fixture() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("apps")).unwrap();
        for name in ["a", "b", "c"] {
            let text =
                format!("[[app]]\nid = \"{name}\"\nserver_domains = [\"{name}.example\", \"x.{name}.example\"]\n");
            std::fs::write(dir.path().join(format!("apps/{name}.toml")), text).unwrap();
        }
        let main = dir.path().join("gateway.toml");
        std::fs::write(&main, "[policy]\napps_dir = \"apps\"\n").unwrap();
        (dir, main)
    }

    fn app_ptr(config: &Config, id: &str) -> *const App {
        config.policy.app(id).unwrap()
    }

    #[test]
    fn a_reload_reuses_the_apps_of_unchanged_files() {
        let (dir, main) = apps_dir_fixture();
        let mut cache = AppsCache::default();
        let first = load(&main, &mut cache, None).unwrap();
        std::fs::write(dir.path().join("apps/b.toml"), "[[app]]\nid = \"b\"\nserver_domains = [\"new.example\"]\n")
            .unwrap();
        let second = load(&main, &mut cache, None).unwrap();
        assert_eq!(app_ptr(&first, "a"), app_ptr(&second, "a"), "unchanged: the validated app is reused");
        assert_eq!(app_ptr(&first, "c"), app_ptr(&second, "c"));
        assert_ne!(app_ptr(&first, "b"), app_ptr(&second, "b"), "changed: validated again");
        assert_eq!(second.policy.app("b").unwrap().server_domains.entries()[0].to_string(), "new.example");
        std::fs::remove_file(dir.path().join("apps/c.toml")).unwrap();
        let third = load(&main, &mut cache, None).unwrap();
        assert!(third.policy.app("c").is_none());
        assert_eq!(cache.files.len(), 2);
    }

    #[test]
    fn the_cache_never_hides_an_error() {
        let (dir, main) = apps_dir_fixture();
        let mut cache = AppsCache::default();
        load(&main, &mut cache, None).unwrap();
        // a limit the cached apps break
        std::fs::write(&main, "[policy]\napps_dir = \"apps\"\nmax_server_domains = 1\n").unwrap();
        assert_eq!(load(&main, &mut cache, None).unwrap_err().0.len(), 3);
        std::fs::write(&main, "[policy]\napps_dir = \"apps\"\n").unwrap();
        load(&main, &mut cache, None).unwrap();
        // a new file that repeats a cached id
        std::fs::write(dir.path().join("apps/d.toml"), "[[app]]\nid = \"a\"\n").unwrap();
        let err = load(&main, &mut cache, None).unwrap_err();
        assert!(err.to_string().contains("d.toml:2:6: duplicate app id \"a\" (first defined at "), "{err}");
        std::fs::remove_file(dir.path().join("apps/d.toml")).unwrap();
        // a broken file is not cached: it fails until it is fixed
        std::fs::write(
            dir.path().join("apps/b.toml"),
            "[[app]]\nid = \"b\"\nserver_domains = [\"http://b.example\"]\n",
        )
        .unwrap();
        assert!(load(&main, &mut cache, None).is_err());
        assert!(load(&main, &mut cache, None).is_err());
        std::fs::write(dir.path().join("apps/b.toml"), "[[app]]\nid = \"b\"\n").unwrap();
        assert!(load(&main, &mut cache, None).is_ok());
    }
}
