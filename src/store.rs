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

use crate::audit::{AuditLog, Record};
use crate::config::schema::{RawApp, RawAppsFile, RawEntry};
use crate::policy::Action;

/// A whitelist entry as the API shows it, and takes it: `"api.shop.example"` or
/// `{"domain": "…", "remark": "…"}`, as in the config. In `api_whitelist` the value's key is
/// `api` ([`api_entries`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "EntryInput")]
pub struct EntryDoc {
    #[serde(rename = "domain")]
    pub value: String,
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
            EntryInput::Bare(value) => EntryDoc { value, remark: None },
            EntryInput::Full(FullEntry { domain, remark }) => EntryDoc { value: domain, remark },
        }
    }
}

/// `api_whitelist` entries in JSON: `"shop.pay"` or `{"api": "shop.pay", "remark": "…"}`.
pub mod api_entries {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::EntryDoc;

    #[derive(Serialize)]
    struct Shown<'a> {
        api: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        remark: Option<&'a str>,
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Taken {
        Bare(String),
        Full(Full),
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Full {
        api: String,
        #[serde(default)]
        remark: Option<String>,
    }

    pub fn serialize<S: Serializer>(entries: &[EntryDoc], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(entries.iter().map(|e| Shown { api: &e.value, remark: e.remark.as_deref() }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<EntryDoc>, D::Error> {
        let taken = Vec::<Taken>::deserialize(deserializer)?;
        Ok(taken
            .into_iter()
            .map(|entry| match entry {
                Taken::Bare(value) => EntryDoc { value, remark: None },
                Taken::Full(Full { api, remark }) => EntryDoc { value: api, remark },
            })
            .collect())
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
    #[serde(default, with = "api_entries")]
    pub api_whitelist: Vec<EntryDoc>,
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
    /// For a definition changed by hand since the store wrote it: a hash of its text. Two
    /// hand edits in a row have the same revision number (neither is recorded yet), so the
    /// entity tag carries the hash too, and a write made against the first is refused.
    pub edited: Option<String>,
}

impl Stored {
    /// The entity tag of this state of the app, without its quotes: `N`, or `N-<hash>` for a
    /// definition changed by hand.
    pub fn tag(&self) -> String {
        match &self.edited {
            Some(hash) => format!("{}-{hash}", self.revision),
            None => self.revision.to_string(),
        }
    }
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

/// Where apps live and where edits go, with their history. Reads see what is on the store now
/// (which the policy in force catches up with on the next reload). Nothing here knows about
/// HTTP: the admin API and `apps import` drive it the same way (find the app, render the new
/// definition, validate it with check's rules, put it), whatever the store keeps it in.
pub trait Store: Send + Sync {
    /// Where `id` is defined, and its current state when the store can write it.
    fn place(&self, id: &str) -> std::io::Result<Place>;
    /// The app's definition as the config's text for `doc` at `revision` (`None`: the app is
    /// removed): what a change is validated as, before [`Store::put`] makes it.
    fn render(&self, id: &str, doc: Option<&AppDoc>, revision: u64) -> Rendered;
    /// The app's applied changes, newest first, with any the store sees that nobody recorded
    /// (a hand edit) on top.
    fn history(&self, id: &str) -> std::io::Result<Vec<Record>>;
    /// The revision a change to `id` makes: past every revision the app ever had, even one
    /// it had before it was deleted.
    fn next_revision(&self, id: &str, current: Option<&Stored>) -> std::io::Result<u64>;
    /// Keep the record of an attempt that changed nothing (refused, a dry run).
    fn note(&self, record: &Record) -> std::io::Result<()>;
    /// Make `rendered` the app's definition, if the app is still as `current` was read, and
    /// keep `record` of it: the record is kept before the change is made, so a change is never
    /// in force without one. A change made meanwhile is [`WriteError::Changed`].
    fn put(&self, rendered: &Rendered, current: Option<&Stored>, record: &Record) -> Result<(), WriteError>;
    /// Undo a [`Store::put`] whose change could not be put in force: the app goes back to
    /// `previous`, and `record` (its outcome says why) takes the change out of the history.
    fn restore(&self, rendered: &Rendered, previous: Option<&Stored>, record: &Record) -> std::io::Result<()>;
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
        match path.rsplit_once("].") {
            Some((entry, _)) if message.starts_with("the remark of") => format!("{entry}].remark"),
            _ => path,
        }
    }
}

/// The first line of a file the store wrote: `# revision N`, then why it is there.
const REVISION_MARK: &str = "# revision ";

/// The file store: `apps_dir/<id>.toml`, and the audit log beside `apps_dir`.
pub struct FileStore {
    /// The main config file (apps defined there are read-only).
    config: PathBuf,
    apps_dir: Option<PathBuf>,
    audit: Option<AuditLog>,
}

impl FileStore {
    pub fn new(config: &Path, apps_dir: Option<&Path>) -> FileStore {
        let audit = apps_dir.map(AuditLog::beside);
        FileStore { config: config.to_path_buf(), apps_dir: apps_dir.map(Path::to_path_buf), audit }
    }

    /// Keep `record` in the audit log (a store without `apps_dir` writes nothing, so keeps none).
    fn append(&self, record: &Record) -> std::io::Result<()> {
        match &self.audit {
            Some(log) => log.append(record).inspect_err(|e| {
                tracing::error!(error = %e, file = %log.path().display(), "cannot write the audit log");
            }),
            None => Ok(()),
        }
    }

    /// When the file of app `id` was last modified (a hand edit's time), or now.
    fn edited_at(&self, id: &str) -> String {
        let modified = self.file_of(id).and_then(|file| std::fs::metadata(file).ok()?.modified().ok());
        modified.map_or_else(Record::now, |time| humantime::format_rfc3339_millis(time).to_string())
    }

    /// The recorded changes of `id`, newest first (without a hand edit since).
    fn recorded(&self, id: &str) -> std::io::Result<Vec<Record>> {
        self.audit.as_ref().map_or(Ok(Vec::new()), |log| log.history(id))
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
    match written_revision(text) {
        Some((revision, true)) => revision,
        Some((revision, false)) => revision.saturating_add(1),
        None => 1,
    }
}

/// The revision a file's first line records, and whether the rest is still what the store
/// wrote; `None` for a file without the line.
fn written_revision(text: &str) -> Option<(u64, bool)> {
    let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
    let mark = first.strip_prefix(REVISION_MARK)?;
    let revision: u64 = mark.split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse().ok())?;
    let written = mark.split_whitespace().nth(1).and_then(|field| field.strip_prefix("sha256="));
    Some((revision, written.is_some_and(|hash| hash.trim_end_matches(':') == body_hash(rest))))
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
                .map(|entry| EntryDoc { value: entry.get_ref().domain.clone(), remark: entry.get_ref().remark.clone() })
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
            api_whitelist: raw
                .api_whitelist
                .iter()
                .flatten()
                .map(|api| EntryDoc { value: api.get_ref().name.clone(), remark: api.get_ref().remark.clone() })
                .collect(),
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

/// An app's `[[app]]` table as config text, every value on a line of its own, with the field
/// path of each line (so that a validation error at a line can be told as a field).
pub fn definition(doc: &AppDoc) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut lines = Vec::new();
    let mut line = |text: &mut String, content: String, path: &str| {
        text.push_str(&content);
        text.push('\n');
        lines.push(path.to_owned());
    };
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
    let lists = [
        ("server_domains", "domain", &doc.server_domains),
        ("webview_domains", "domain", &doc.webview_domains),
        ("api_whitelist", "api", &doc.api_whitelist),
    ];
    for (list, field, entries) in lists {
        line(&mut text, format!("{list} = ["), list);
        for (i, entry) in entries.iter().enumerate() {
            let value = match &entry.remark {
                Some(remark) => format!("  {{ {field} = {}, remark = {} }},", quoted(&entry.value), quoted(remark)),
                None => format!("  {},", quoted(&entry.value)),
            };
            line(&mut text, value, &format!("{list}[{i}].{field}"));
        }
        line(&mut text, "]".to_owned(), list);
    }
    if let Some(platform) = &doc.platform {
        line(&mut text, format!("platform = {}", quoted(platform)), "platform");
    }
    if let Some(Some(secret)) = &doc.secret {
        line(&mut text, format!("secret = {}", quoted(secret)), "secret");
    }
    (text, lines)
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
                        let pristine = matches!(written_revision(&text), Some((_, true)));
                        let edited = (!pristine).then(|| body_hash(&text));
                        return Ok(Place::Writable(Box::new(Stored { doc, revision, text, edited })));
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
        let (body, mut lines) = definition(doc);
        let header = format!(
            "{REVISION_MARK}{revision} sha256={}: kept by the admin API; edits by hand are fine (comments are not kept)",
            body_hash(&body)
        );
        lines.insert(0, String::new()); // the revision line
        Rendered { file, text: Some(format!("{header}\n{body}")), lines }
    }

    fn history(&self, id: &str) -> std::io::Result<Vec<Record>> {
        let mut records = self.recorded(id)?;
        if let Place::Writable(stored) = self.place(id)?
            && let Some(edit) = hand_edit(&stored, &records, self.edited_at(id))
        {
            records.insert(0, edit);
        }
        Ok(records)
    }

    fn next_revision(&self, id: &str, current: Option<&Stored>) -> std::io::Result<u64> {
        // The audit log remembers the highest revision, also of a deleted app, and of one whose
        // file lost its first line.
        let audited = match &self.audit {
            Some(log) => log.highest_revision(id)?,
            None => None,
        };
        Ok(current.map(|stored| stored.revision).max(audited).unwrap_or(0).saturating_add(1))
    }

    fn note(&self, record: &Record) -> std::io::Result<()> {
        self.append(record)
    }

    fn put(&self, rendered: &Rendered, current: Option<&Stored>, record: &Record) -> Result<(), WriteError> {
        let dir = rendered.file.parent().unwrap_or(Path::new("."));
        // Held from the check to the rename: another process writing this store (an import, a
        // replica on a shared volume) waits, and a hand edit made since the read is not lost.
        let _lock = lock_dir(dir)?;
        let now = match std::fs::read_to_string(&rendered.file) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        if now.as_deref() != current.map(|stored| stored.text.as_str()) {
            return Err(WriteError::Changed);
        }
        // A hand edit since the last recorded change goes into the record first, as a change
        // by `file`; then this change, before it is made.
        if let Some(stored) = current
            && let Some(edit) = hand_edit(stored, &self.recorded(&record.app)?, self.edited_at(&record.app))
        {
            self.append(&edit)?;
        }
        self.append(record)?;
        let made = match &rendered.text {
            None => std::fs::remove_file(&rendered.file).and_then(|()| std::fs::File::open(dir)?.sync_all()),
            Some(text) => write_atomically(&rendered.file, text.as_bytes()),
        };
        if let Err(e) = made {
            let _ = self.append(&Record {
                outcome: "write_failed".to_owned(),
                before: None,
                after: None,
                ..record.clone()
            });
            return Err(e.into());
        }
        Ok(())
    }

    fn restore(&self, rendered: &Rendered, previous: Option<&Stored>, record: &Record) -> std::io::Result<()> {
        let _lock = lock_dir(rendered.file.parent().unwrap_or(Path::new(".")))?;
        self.append(record)?;
        match previous {
            Some(stored) => write_atomically(&rendered.file, stored.text.as_bytes()),
            None => std::fs::remove_file(&rendered.file),
        }
    }
}

/// What a store's temporary files end with: a writer that died before its rename leaves one.
pub const TEMP_SUFFIX: &str = ".tmp";

#[cfg(not(test))]
fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)
}

/// The unit tests' rename, which fails on demand to show what a failed rename leaves.
#[cfg(test)]
fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    if tests::FAIL_RENAME.with(std::cell::Cell::get) {
        return Err(std::io::Error::other("rename failed (on purpose)"));
    }
    std::fs::rename(from, to)
}

/// Remove the temporary files that writers which died before their rename left in `dir` (those
/// older than `age`: a live writer's is seconds old at most); returns how many. Run at start.
pub fn remove_stale_temporaries(dir: &Path, age: std::time::Duration) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !(name.starts_with('.') && name.ends_with(TEMP_SUFFIX) && name.contains(".toml.")) {
            continue;
        }
        // One that vanished meanwhile (its writer renamed it) is no longer ours to remove.
        let old = entry.metadata().ok().and_then(|meta| meta.modified().ok()).and_then(|time| time.elapsed().ok());
        if old.is_some_and(|elapsed| elapsed >= age) {
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// The change by `file` that an app's file shows when it was edited by hand since the last
/// recorded change (`records`, newest first): its revision is past the last one recorded.
fn hand_edit(stored: &Stored, records: &[Record], time: String) -> Option<Record> {
    let last = records.first();
    if last.and_then(|record| record.revision).is_some_and(|recorded| stored.revision <= recorded) {
        return None;
    }
    let mut after = stored.doc.clone();
    after.token = None; // never recorded
    Some(Record {
        time,
        app: after.id.clone(),
        revision: Some(stored.revision),
        user: "file".to_owned(),
        client: String::new(),
        change: if last.is_some() { "edit" } else { "create" }.to_owned(),
        outcome: "applied".to_owned(),
        before: last.and_then(|record| record.after.clone()),
        after: Some(after),
    })
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
    let temp = dir.join(format!(".{name}.{nonce}{TEMP_SUFFIX}"));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)?;
    let written = out.write_all(bytes).and_then(|()| out.sync_all());
    if let Err(e) = written.and_then(|()| rename(&temp, file)) {
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
    lock_file(&dir.join(".lock"))
}

/// An exclusive lock (flock) on the file at `path`, made owner-only if it is new, held until
/// the file returned is dropped.
pub fn lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(path)?;
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
            let mut out: Vec<String> = b.iter().filter(|e| !a.contains(e)).map(|e| format!("+{}", e.value)).collect();
            out.extend(a.iter().filter(|e| !b.contains(e)).map(|e| format!("-{}", e.value)));
            out
        };
        for (key, a, b) in [
            ("server_domains", &before.server_domains, &self.server_domains),
            ("webview_domains", &before.webview_domains, &self.webview_domains),
            ("api_whitelist", &before.api_whitelist, &self.api_whitelist),
        ] {
            let changed = lists(a, b);
            if !changed.is_empty() {
                parts.push(format!("{key} {}", changed.join(" ")));
            }
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

    thread_local! {
        /// Makes [`super::rename`] fail in this test's thread.
        pub static FAIL_RENAME: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn record(id: &str, revision: u64) -> Record {
        Record {
            time: Record::now(),
            app: id.into(),
            revision: Some(revision),
            user: "ed".into(),
            client: "test".into(),
            change: "replace".into(),
            outcome: "applied".into(),
            before: None,
            after: None,
        }
    }

    fn stored(store: &FileStore, id: &str) -> Stored {
        let Place::Writable(stored) = store.place(id).unwrap() else { panic!("{id} is not writable") };
        *stored
    }

    fn temporaries(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .count()
    }

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
                EntryDoc { value: "api.shop.example".into(), remark: None },
                EntryDoc { value: "https://img.shop.example:8443".into(), remark: Some("CDN\nline".into()) },
            ],
            webview_domains: vec![],
            api_whitelist: vec![EntryDoc { value: "shop.pay".into(), remark: Some("payments".into()) }],
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
        store.put(&rendered, None, &record("shop", 7)).unwrap();
        let stored = stored(&store, "shop");
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
        store.put(&store.render("shop", Some(&doc()), 3), None, &record("shop", 3)).unwrap();
        let read = stored(&store, "shop");
        // edited by hand after the read
        let edited = format!("{}# a note by hand\n", read.text);
        std::fs::write(&file, &edited).unwrap();
        let now = stored(&store, "shop");
        assert_eq!(now.revision, 4, "the revision line no longer matches the body");
        assert_eq!(store.next_revision("shop", Some(&now)).unwrap(), 5);
        let history: Vec<(Option<u64>, String)> =
            store.history("shop").unwrap().into_iter().map(|r| (r.revision, r.user)).collect();
        assert_eq!(history, [(Some(4), "file".to_owned()), (Some(3), "ed".to_owned())]);
        let next = store.render("shop", Some(&doc()), 5);
        assert!(matches!(store.put(&next, Some(&read), &record("shop", 5)), Err(WriteError::Changed)));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), edited, "the hand edit is kept");
        store.put(&next, Some(&now), &record("shop", 5)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600, "it may hold a token");
        assert_eq!(temporaries(&dir.path().join("apps")), 0);
        // the hand edit was recorded for good, before the change that followed it
        let history: Vec<(Option<u64>, String)> =
            store.recorded("shop").unwrap().into_iter().map(|r| (r.revision, r.user)).collect();
        assert_eq!(history, [(Some(5), "ed".to_owned()), (Some(4), "file".to_owned()), (Some(3), "ed".to_owned())]);
    }

    #[test]
    fn a_failed_rename_leaves_the_old_file_and_no_history() {
        let (dir, store) = store();
        let file = dir.path().join("apps/shop.toml");
        store.put(&store.render("shop", Some(&doc()), 1), None, &record("shop", 1)).unwrap();
        let before = stored(&store, "shop");
        let mut changed = doc();
        changed.action = Some(Action::Open);
        let next = store.render("shop", Some(&changed), 2);
        FAIL_RENAME.with(|fail| fail.set(true));
        let failed = store.put(&next, Some(&before), &record("shop", 2));
        FAIL_RENAME.with(|fail| fail.set(false));
        assert!(matches!(failed, Err(WriteError::Io(_))), "{failed:?}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), before.text, "the old file is intact");
        assert_eq!(temporaries(&dir.path().join("apps")), 0, "the temporary file is gone");
        let revisions: Vec<Option<u64>> = store.history("shop").unwrap().iter().map(|r| r.revision).collect();
        assert_eq!(revisions, [Some(1)], "the change that was not made is not in the history");
        assert_eq!(
            store.next_revision("shop", Some(&before)).unwrap(),
            3,
            "the number of the change not made is not given again"
        );
    }

    #[test]
    fn a_restored_change_leaves_the_history() {
        let (dir, store) = store();
        store.put(&store.render("shop", Some(&doc()), 1), None, &record("shop", 1)).unwrap();
        let before = stored(&store, "shop");
        let next = store.render("shop", None, 2);
        store.put(&next, Some(&before), &record("shop", 2)).unwrap();
        assert!(!dir.path().join("apps/shop.toml").exists());
        let undone = Record { outcome: "reload_failed".into(), ..record("shop", 2) };
        store.restore(&next, Some(&before), &undone).unwrap();
        assert_eq!(stored(&store, "shop"), before);
        let revisions: Vec<Option<u64>> = store.history("shop").unwrap().iter().map(|r| r.revision).collect();
        assert_eq!(revisions, [Some(1)]);
    }

    #[test]
    fn only_old_temporary_files_are_removed() {
        let (dir, _store) = store();
        let apps = dir.path().join("apps");
        std::fs::write(apps.join(".shop.toml.0011223344556677.tmp"), "[[app]]\nid = \"sh").unwrap();
        std::fs::write(apps.join("notes.tmp"), "mine").unwrap();
        assert_eq!(remove_stale_temporaries(&apps, std::time::Duration::from_secs(60)).unwrap(), 0, "too new");
        assert_eq!(remove_stale_temporaries(&apps, std::time::Duration::ZERO).unwrap(), 1);
        assert!(apps.join("notes.tmp").exists(), "not a store's");
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
