//! Where apps live and where edits go.
//!
//! The management API reads and writes apps through a [`Store`]; the policy the proxy reads is
//! never touched here: a write becomes a new snapshot through the ordinary reload path, so a
//! file edit and an API edit are one mechanism. [`FileStore`] is the embedded store: one app
//! per file, `apps_dir/<id>.toml`, written atomically (a new file, synced, renamed over the old
//! one, the directory synced), with the app's revision in the file's first line. Apps defined
//! anywhere else (the main config, a file holding several apps) are read-only through it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::schema::{RawApp, RawAppsFile, RawEntry};
use crate::policy::Action;

/// A whitelist entry as the API shows it, and takes it: `"api.shop.example"` or
/// `{"domain": "…", "remark": "…"}`, as in the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "EntryInput")]
pub struct EntryDoc {
    pub domain: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remark: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EntryInput {
    Bare(String),
    Full(FullEntry),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FullEntry {
    domain: String,
    #[serde(default)]
    remark: Option<String>,
}

impl From<EntryInput> for EntryDoc {
    fn from(input: EntryInput) -> EntryDoc {
        match input {
            EntryInput::Bare(domain) => EntryDoc { domain, remark: None },
            EntryInput::Full(FullEntry { domain, remark }) => EntryDoc { domain, remark },
        }
    }
}

/// An app as the API shows and takes it: the `[[app]]` table of the config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppDoc {
    #[serde(default)]
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The proxy password. Never shown (`has_token` is); on a write, absent keeps the current
    /// one, `null` removes it, a string sets it.
    #[serde(default, skip_serializing, deserialize_with = "some_or_null")]
    pub token: Option<Option<String>>,
    /// Shown, not taken: a write's `has_token` is ignored (`token` decides).
    #[serde(default)]
    pub has_token: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    #[serde(default)]
    pub server_domains: Vec<EntryDoc>,
    #[serde(default)]
    pub webview_domains: Vec<EntryDoc>,
    #[serde(default)]
    pub api_whitelist: Vec<String>,
    /// Whose consent rules apply: `mpaas` (absent), `wechat` or `superapp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// The secret the app's backend exchanges auth codes with. Never shown (`has_secret` is);
    /// on a write, absent keeps the current one, `null` removes it, a string sets it.
    #[serde(default, skip_serializing, deserialize_with = "some_or_null")]
    pub secret: Option<Option<String>>,
    /// Shown, not taken (`secret` decides).
    #[serde(default)]
    pub has_secret: bool,
    /// What a `GET` shows besides the app (its revision, the generation after a write): taken
    /// and ignored, so that an app read can be written back as it is.
    #[serde(default, rename = "revision", skip_serializing)]
    pub ignored_revision: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "generation", skip_serializing)]
    pub ignored_generation: Option<serde::de::IgnoredAny>,
}

impl PartialEq for AppDoc {
    fn eq(&self, other: &AppDoc) -> bool {
        (&self.id, &self.name, &self.token, self.has_token, self.action)
            == (&other.id, &other.name, &other.token, other.has_token, other.action)
            && (&self.server_domains, &self.webview_domains, &self.api_whitelist)
                == (&other.server_domains, &other.webview_domains, &other.api_whitelist)
            && (&self.platform, &self.secret, self.has_secret) == (&other.platform, &other.secret, other.has_secret)
    }
}

impl Eq for AppDoc {}

/// `"token": null` as `Some(None)`, distinct from an absent field (`None`).
fn some_or_null<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(de).map(Some)
}

/// An app and its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub doc: AppDoc,
    pub revision: u64,
    /// The file's text as read: a write is refused if it changed meanwhile (a hand edit).
    pub text: String,
}

/// Where an app is defined, as far as writes are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// Not defined anywhere: a write may create it.
    Free,
    /// In a file of its own that the store writes.
    Writable(Box<Stored>),
    /// Somewhere the store does not write (the main config, a file with other apps).
    ReadOnly(PathBuf),
}

/// Where apps live and where edits go. Reads see what is on the store now (which the policy
/// in force catches up with on the next reload).
pub trait Store: Send + Sync {
    /// Where `id` is defined, and its current state when the store can write it.
    fn place(&self, id: &str) -> std::io::Result<Place>;
    /// What the store would write for `doc` at `revision`: checked by the caller before it
    /// is written (`None`: the app is removed).
    fn render(&self, id: &str, doc: Option<&AppDoc>, revision: u64) -> Rendered;
    /// Make `rendered` the app's definition, if the app is still as `read` (its file's text
    /// then; `None`: it had none). A change made meanwhile is [`WriteError::Changed`].
    fn write(&self, id: &str, rendered: &Rendered, read: Option<&str>) -> Result<(), WriteError>;
}

/// Why a write was not made.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the app's file changed since it was read (an edit by hand?)")]
    Changed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// An app's definition as text, with the field path of each line (so that a validation error
/// at `FILE:LINE:COL` can be told as `server_domains[3].domain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The file it goes to.
    pub file: PathBuf,
    /// `None`: the app is removed.
    pub text: Option<String>,
    /// The field path of each line (1-based line `n` at index `n - 1`).
    pub lines: Vec<String>,
}

impl Rendered {
    /// The field path of a validation error at `line` with `message`.
    pub fn field_at(&self, line: usize, message: &str) -> String {
        let path = line.checked_sub(1).and_then(|i| self.lines.get(i)).cloned().unwrap_or_default();
        if path.ends_with("].domain") && message.starts_with("the remark of") {
            return path.replace("].domain", "].remark");
        }
        path
    }
}

/// The first line of a file the store wrote: `# revision N`, then why it is there.
const REVISION_MARK: &str = "# revision ";

/// The file store: `apps_dir/<id>.toml`.
pub struct FileStore {
    /// The main config file (apps defined there are read-only).
    config: PathBuf,
    apps_dir: Option<PathBuf>,
}

impl FileStore {
    pub fn new(config: &Path, apps_dir: Option<&Path>) -> FileStore {
        FileStore { config: config.to_path_buf(), apps_dir: apps_dir.map(Path::to_path_buf) }
    }

    fn file_of(&self, id: &str) -> Option<PathBuf> {
        self.apps_dir.as_ref().map(|dir| dir.join(format!("{id}.toml")))
    }

    /// The first file (the main config, then `apps_dir` in order) that defines `id`.
    fn defining_file(&self, id: &str) -> std::io::Result<Option<PathBuf>> {
        let mut files = vec![self.config.clone()];
        if let Some(dir) = &self.apps_dir {
            files.extend(apps_files(dir).unwrap_or_default());
        }
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else { continue };
            let Ok(parsed) = toml::from_str::<RawAppsFile>(&text) else { continue };
            if parsed.app.iter().any(|app| app.id.get_ref() == id) {
                return Ok(Some(file));
            }
        }
        Ok(None)
    }
}

/// The revision of a file: the one its first line records when the rest is what the store
/// wrote (the line also holds the rest's SHA-256); one more when it was edited by hand since;
/// 1 for a file the store never wrote.
fn revision_of(text: &str) -> u64 {
    let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
    let Some(mark) = first.strip_prefix(REVISION_MARK) else { return 1 };
    let revision: Option<u64> = mark.split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse().ok());
    let Some(revision) = revision else { return 1 };
    let written = mark.split_whitespace().nth(1).and_then(|field| field.strip_prefix("sha256="));
    if written.is_some_and(|hash| hash.trim_end_matches(':') == body_hash(rest)) {
        revision
    } else {
        revision.saturating_add(1)
    }
}

/// The first 16 hex digits of the SHA-256 of a file's body (all but its first line).
fn body_hash(body: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
    digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn entry_docs(entries: Option<&crate::config::schema::SpannedList<RawEntry>>) -> Vec<EntryDoc> {
    entries
        .map(|list| {
            list.get_ref()
                .iter()
                .map(|entry| EntryDoc {
                    domain: entry.get_ref().domain.clone(),
                    remark: entry.get_ref().remark.clone(),
                })
                .collect()
        })
        .unwrap_or_default()
}

impl AppDoc {
    fn from_raw(raw: &RawApp) -> AppDoc {
        AppDoc {
            id: raw.id.get_ref().clone(),
            name: raw.name.clone(),
            token: raw.token.as_ref().map(|token| Some(token.get_ref().clone())),
            has_token: raw.token.is_some(),
            action: raw.action,
            server_domains: entry_docs(raw.server_domains.as_ref()),
            webview_domains: entry_docs(raw.webview_domains.as_ref()),
            api_whitelist: raw.api_whitelist.iter().flatten().map(|api| api.get_ref().clone()).collect(),
            platform: raw.platform.as_ref().map(|platform| platform.get_ref().clone()),
            secret: raw.secret.as_ref().map(|secret| Some(secret.get_ref().clone())),
            has_secret: raw.secret.is_some(),
            ignored_revision: None,
            ignored_generation: None,
        }
    }

    /// The token to write: the one given, or the current one when none was given.
    pub fn token_after(&self, current: Option<&AppDoc>) -> Option<String> {
        match &self.token {
            Some(given) => given.clone(),
            None => current.and_then(|doc| doc.token.clone().flatten()),
        }
    }

    /// The secret to write: the one given, or the current one when none was given. (A
    /// rollback past a deletion has none to keep: the app then has no secret, and its auth
    /// codes cannot be exchanged until one is set, which fails closed.)
    pub fn secret_after(&self, current: Option<&AppDoc>) -> Option<String> {
        match &self.secret {
            Some(given) => given.clone(),
            None => current.and_then(|doc| doc.secret.clone().flatten()),
        }
    }
}

/// A TOML basic string on one line: quoted, with `\`, `"` and every control character
/// escaped (each rendered value stays on the line its field path names).
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Store for FileStore {
    fn place(&self, id: &str) -> std::io::Result<Place> {
        if let Some(file) = self.file_of(id) {
            match std::fs::read_to_string(&file) {
                Ok(text) => {
                    if let Ok(parsed) = toml::from_str::<RawAppsFile>(&text)
                        && let [app] = parsed.app.as_slice()
                        && app.id.get_ref() == id
                    {
                        let doc = AppDoc::from_raw(app);
                        let revision = revision_of(&text);
                        return Ok(Place::Writable(Box::new(Stored { doc, revision, text })));
                    }
                    return Ok(Place::ReadOnly(file));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(match self.defining_file(id)? {
            Some(file) => Place::ReadOnly(file),
            None if self.apps_dir.is_some() => Place::Free,
            None => Place::ReadOnly(self.config.clone()),
        })
    }

    fn render(&self, id: &str, doc: Option<&AppDoc>, revision: u64) -> Rendered {
        let file = self.file_of(id).unwrap_or_else(|| self.config.clone());
        let Some(doc) = doc else { return Rendered { file, text: None, lines: Vec::new() } };
        let mut text = String::new();
        let mut lines = Vec::new();
        let mut line = |text: &mut String, content: String, path: &str| {
            text.push_str(&content);
            text.push('\n');
            lines.push(path.to_owned());
        };
        line(&mut text, String::new(), ""); // the revision line, written below over the body
        line(&mut text, "[[app]]".to_owned(), "");
        line(&mut text, format!("id = {}", quoted(&doc.id)), "id");
        if let Some(name) = &doc.name {
            line(&mut text, format!("name = {}", quoted(name)), "name");
        }
        if let Some(Some(token)) = &doc.token {
            line(&mut text, format!("token = {}", quoted(token)), "token");
        }
        if let Some(action) = doc.action {
            line(&mut text, format!("action = \"{}\"", action.as_str()), "action");
        }
        for (key, entries) in [("server_domains", &doc.server_domains), ("webview_domains", &doc.webview_domains)] {
            line(&mut text, format!("{key} = ["), key);
            for (i, entry) in entries.iter().enumerate() {
                let value = match &entry.remark {
                    Some(remark) => format!("  {{ domain = {}, remark = {} }},", quoted(&entry.domain), quoted(remark)),
                    None => format!("  {},", quoted(&entry.domain)),
                };
                line(&mut text, value, &format!("{key}[{i}].domain"));
            }
            line(&mut text, "]".to_owned(), key);
        }
        line(&mut text, "api_whitelist = [".to_owned(), "api_whitelist");
        for (i, api) in doc.api_whitelist.iter().enumerate() {
            line(&mut text, format!("  {},", quoted(api)), &format!("api_whitelist[{i}]"));
        }
        line(&mut text, "]".to_owned(), "api_whitelist");
        if let Some(platform) = &doc.platform {
            line(&mut text, format!("platform = {}", quoted(platform)), "platform");
        }
        if let Some(Some(secret)) = &doc.secret {
            line(&mut text, format!("secret = {}", quoted(secret)), "secret");
        }
        let body = &text[1..];
        let header = format!(
            "{REVISION_MARK}{revision} sha256={}: kept by the admin API; edits by hand are fine (comments are not kept)",
            body_hash(body)
        );
        let text = format!("{header}{text}");
        Rendered { file, text: Some(text), lines }
    }

    fn write(&self, _id: &str, rendered: &Rendered, read: Option<&str>) -> Result<(), WriteError> {
        let dir = rendered.file.parent().unwrap_or(Path::new("."));
        // Held from the check to the rename: another process writing this store (an import, a
        // replica on a shared volume) waits, and a hand edit made since the read is not lost.
        let _lock = lock_dir(dir)?;
        let now = match std::fs::read_to_string(&rendered.file) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        if now.as_deref() != read {
            return Err(WriteError::Changed);
        }
        match &rendered.text {
            None => {
                std::fs::remove_file(&rendered.file)?;
                std::fs::File::open(dir)?.sync_all()?;
            }
            // Not `*.toml` while written: a reload never reads it half-written.
            Some(text) => write_atomically(&rendered.file, text.as_bytes())?,
        }
        Ok(())
    }
}

/// Replace `file` with `bytes` so that a crash leaves the old content or the new, never a
/// mix: a new owner-only (`0600`: it may hold secrets) file under a fresh temporary name
/// in the same directory, synced, renamed over `file`, and the directory synced.
pub fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut nonce = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| std::io::Error::other("no randomness for a temporary name"))?;
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let temp = dir.join(format!(".{name}.{nonce}.tmp"));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)?;
    let written = out.write_all(bytes).and_then(|()| out.sync_all());
    if let Err(e) = written.and_then(|()| std::fs::rename(&temp, file)) {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

/// The `*.toml` files of `apps_dir`, in name order.
fn apps_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

/// An exclusive lock on `dir/.lock` (flock), held until dropped.
pub fn lock_dir(dir: &Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(dir.join(".lock"))?;
    // SAFETY: flock only takes the descriptor, which `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Every app of the config at `config` with its `apps_dir` (the main file's first, then each
/// file's in name order), as documents, tokens included: what `apps export` writes.
pub fn read_all(config: &Path, apps_dir: Option<&Path>) -> std::io::Result<Vec<AppDoc>> {
    let mut files = vec![config.to_path_buf()];
    if let Some(dir) = apps_dir {
        files.extend(apps_files(dir)?);
    }
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        let parsed: RawAppsFile =
            toml::from_str(&text).map_err(|e| std::io::Error::other(format!("{}: {}", file.display(), e.message())))?;
        docs.extend(parsed.app.iter().map(AppDoc::from_raw));
    }
    Ok(docs)
}

/// Apps to import: TOML `[[app]]` tables, or JSON (`{"apps": [...]}` as `apps export
/// --format json` writes, or a bare array).
pub fn parse_apps(text: &str) -> Result<Vec<AppDoc>, String> {
    let trimmed = text.trim_start();
    let json = trimmed.starts_with('{') || (trimmed.starts_with('[') && !trimmed.starts_with("[["));
    let docs = if json {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Apps {
            Wrapped { apps: Vec<AppDoc> },
            Bare(Vec<AppDoc>),
        }
        match serde_json::from_str::<Apps>(text).map_err(|e| format!("not the JSON of apps: {e}"))? {
            Apps::Wrapped { apps } | Apps::Bare(apps) => apps,
        }
    } else {
        let parsed: RawAppsFile =
            toml::from_str(text).map_err(|e| format!("not TOML [[app]] tables: {}", e.message()))?;
        parsed.app.iter().map(AppDoc::from_raw).collect()
    };
    let mut seen = std::collections::HashSet::new();
    for doc in &docs {
        if !seen.insert(doc.id.as_str()) {
            return Err(format!("app {:?} is given twice", doc.id));
        }
    }
    Ok(docs)
}

/// What importing would do to one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Create(AppDoc),
    /// The current app, and what it becomes.
    Replace(Box<AppDoc>, AppDoc),
    /// With `--prune`: an app the import does not name.
    Delete(String),
    /// An app the store cannot write (defined in the file named).
    ReadOnly(String, PathBuf),
}

impl AppDoc {
    /// Equal as far as the config is concerned (`has_token` is derived; an absent token on
    /// the incoming side means "keep").
    fn same_as(&self, incoming: &AppDoc) -> bool {
        let mut a = self.clone();
        let mut b = incoming.clone();
        a.has_token = false;
        b.has_token = false;
        a.has_secret = false;
        b.has_secret = false;
        if b.token.is_none() {
            b.token = a.token.clone();
        }
        if b.secret.is_none() {
            b.secret = a.secret.clone();
        }
        a == b
    }

    /// A one-line account of what differs from `before`, for `apps diff`.
    pub fn describe_change(&self, before: &AppDoc) -> String {
        let mut parts = Vec::new();
        let lists = |a: &[EntryDoc], b: &[EntryDoc]| -> Vec<String> {
            let mut out: Vec<String> = b.iter().filter(|e| !a.contains(e)).map(|e| format!("+{}", e.domain)).collect();
            out.extend(a.iter().filter(|e| !b.contains(e)).map(|e| format!("-{}", e.domain)));
            out
        };
        for (key, a, b) in [
            ("server_domains", &before.server_domains, &self.server_domains),
            ("webview_domains", &before.webview_domains, &self.webview_domains),
        ] {
            let changed = lists(a, b);
            if !changed.is_empty() {
                parts.push(format!("{key} {}", changed.join(" ")));
            }
        }
        if before.api_whitelist != self.api_whitelist {
            parts.push(format!("api_whitelist {:?} -> {:?}", before.api_whitelist, self.api_whitelist));
        }
        if before.action != self.action {
            let shown = |a: Option<Action>| a.map_or("(default)", Action::as_str);
            parts.push(format!("action {} -> {}", shown(before.action), shown(self.action)));
        }
        if before.name != self.name {
            parts.push(format!("name {:?} -> {:?}", before.name, self.name));
        }
        if self.token.is_some() && before.token != self.token {
            parts.push("token changed".to_owned());
        }
        if before.platform != self.platform {
            parts.push(format!("platform {:?} -> {:?}", before.platform, self.platform));
        }
        if self.secret.is_some() && before.secret != self.secret {
            parts.push("secret changed".to_owned());
        }
        parts.join("; ")
    }
}

/// The steps that make the store hold `incoming` (and, with `prune`, nothing else).
pub fn plan(store: &dyn Store, current: &[AppDoc], incoming: &[AppDoc], prune: bool) -> std::io::Result<Vec<Step>> {
    let mut steps = Vec::new();
    for doc in incoming {
        match store.place(&doc.id)? {
            Place::Free => steps.push(Step::Create(doc.clone())),
            Place::Writable(stored) if stored.doc.same_as(doc) => {}
            Place::Writable(stored) => steps.push(Step::Replace(Box::new(stored.doc), doc.clone())),
            Place::ReadOnly(file) => {
                let unchanged = current.iter().any(|c| c.id == doc.id && c.same_as(doc));
                if !unchanged {
                    steps.push(Step::ReadOnly(doc.id.clone(), file));
                }
            }
        }
    }
    if prune {
        for doc in current.iter().filter(|c| !incoming.iter().any(|i| i.id == c.id)) {
            match store.place(&doc.id)? {
                Place::ReadOnly(file) => steps.push(Step::ReadOnly(doc.id.clone(), file)),
                _ => steps.push(Step::Delete(doc.id.clone())),
            }
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, FileStore) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("apps")).unwrap();
        let config = dir.path().join("gateway.toml");
        std::fs::write(&config, "[policy]\napps_dir = \"apps\"\n\n[[app]]\nid = \"main\"\n").unwrap();
        let store = FileStore::new(&config, Some(&dir.path().join("apps")));
        (dir, store)
    }

    fn doc() -> AppDoc {
        AppDoc {
            id: "shop".into(),
            name: Some("Shop \"quoted\"".into()),
            token: Some(Some("s3cret".into())),
            has_token: false,
            action: Some(Action::Report),
            server_domains: vec![
                EntryDoc { domain: "api.shop.example".into(), remark: None },
                EntryDoc { domain: "https://img.shop.example:8443".into(), remark: Some("CDN\nline".into()) },
            ],
            webview_domains: vec![],
            api_whitelist: vec!["shop.pay".into()],
            platform: Some("wechat".into()),
            secret: Some(Some("backend-secret".into())),
            has_secret: false,
            ignored_revision: None,
            ignored_generation: None,
        }
    }

    #[test]
    fn a_rendered_app_reads_back_the_same_with_its_revision() {
        let (_dir, store) = store();
        let rendered = store.render("shop", Some(&doc()), 7);
        store.write("shop", &rendered, None).unwrap();
        let Place::Writable(stored) = store.place("shop").unwrap() else { panic!("not writable") };
        let mut expected = doc();
        expected.has_token = true;
        expected.has_secret = true;
        assert_eq!((&stored.doc, stored.revision), (&expected, 7));
        assert_eq!(Some(&stored.text), rendered.text.as_ref());
        // every value on its own line, the remark with its newline escaped
        assert_eq!(
            rendered.field_at(9, "the remark of \"x\" is longer than 200 characters"),
            "server_domains[1].remark"
        );
        assert_eq!(
            rendered.field_at(9, "\"http://remark.example\" in server_domains: only https://"),
            "server_domains[1].domain"
        );
        assert_eq!(rendered.field_at(8, "bad"), "server_domains[0].domain");
        assert_eq!(rendered.field_at(3, "bad"), "id");
    }

    #[test]
    fn a_hand_edit_is_a_new_revision_and_is_never_written_over() {
        let (dir, store) = store();
        let file = dir.path().join("apps/shop.toml");
        store.write("shop", &store.render("shop", Some(&doc()), 3), None).unwrap();
        let Place::Writable(read) = store.place("shop").unwrap() else { panic!() };
        // edited by hand after the read
        let edited = format!("{}# a note by hand\n", read.text);
        std::fs::write(&file, &edited).unwrap();
        let Place::Writable(now) = store.place("shop").unwrap() else { panic!() };
        assert_eq!(now.revision, 4, "the revision line no longer matches the body");
        let next = store.render("shop", Some(&doc()), 4);
        assert!(matches!(store.write("shop", &next, Some(&read.text)), Err(WriteError::Changed)));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), edited, "the hand edit is kept");
        store.write("shop", &next, Some(&now.text)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600, "it may hold a token");
        let leftovers = std::fs::read_dir(dir.path().join("apps"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn apps_elsewhere_are_read_only_and_unknown_ones_free() {
        let (dir, store) = store();
        assert_eq!(store.place("main").unwrap(), Place::ReadOnly(dir.path().join("gateway.toml")));
        std::fs::write(dir.path().join("apps/pair.toml"), "[[app]]\nid = \"a\"\n[[app]]\nid = \"b\"\n").unwrap();
        assert_eq!(store.place("b").unwrap(), Place::ReadOnly(dir.path().join("apps/pair.toml")));
        assert_eq!(store.place("new").unwrap(), Place::Free);
        // a file written by hand has revision 1
        std::fs::write(dir.path().join("apps/hand.toml"), "[[app]]\nid = \"hand\"\n").unwrap();
        let Place::Writable(stored) = store.place("hand").unwrap() else { panic!() };
        assert_eq!(stored.revision, 1);
    }
}
