//! `miniapp-gateway apps export | diff | import`: the GitOps and migration path.
//!
//! `export` writes every app of a config (the main file's, and `apps_dir`'s or the PostgreSQL
//! store's). `diff FILE` shows what importing FILE would change, and `import FILE` makes it so,
//! directly in the config's store (`apps_dir` files or the database, each write atomic and
//! audited as user `import`); running gateways pick the changes up like any other (the file
//! watcher, or the store's notification). Nothing is written unless every change validates with
//! check's rules; apps not in FILE are kept unless `--prune` is given. Exporting from a config on
//! one store and importing into a config on the other moves apps between them.

use std::fmt::Write as _;
use std::path::Path;

use crate::audit::Record;
use crate::config::{self, Config};
use crate::pg::PgStore;
use crate::store::{AppDoc, FileStore, Place, Step, Store, parse_apps, plan, read_all};

/// How `apps export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `[[app]]` tables, tokens included: a complete copy.
    Toml,
    /// `{"apps": [...]}` as the admin API shows apps (no tokens: `has_token` instead).
    Json,
}

fn load(config_path: &Path) -> Result<Config, String> {
    config::load(config_path).map_err(|errors| format!("invalid config:\n{errors}"))
}

/// A config's store, opened: its apps, and a loader that checks changes against them.
struct Opened {
    config: Config,
    store: Box<dyn Store>,
    /// Every app of the config: the main file's, then the store's.
    current: Vec<AppDoc>,
    loader: config::Loader,
    /// The PostgreSQL store's connections run here (its methods block on it).
    _runtime: Option<tokio::runtime::Runtime>,
}

fn open(config_path: &Path, upgrade: bool) -> Result<Opened, String> {
    let config = load(config_path)?;
    let mut loader = config::Loader::new(&config.path);
    match &config.store {
        config::StoreSettings::Files => {
            let current = read_all(&config.path, config.apps_dir.as_deref()).map_err(|e| e.to_string())?;
            let store = Box::new(FileStore::new(&config.path, config.apps_dir.as_deref()));
            Ok(Opened { config, store, current, loader, _runtime: None })
        }
        config::StoreSettings::Postgres(settings) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start a runtime: {e}"))?;
            // Only an import upgrades the schema: reading must not move a fleet's schema on.
            let store = runtime
                .block_on(PgStore::connect(settings, &config.path, upgrade))
                .map_err(|e| format!("the store {}: {e}", config::redacted_url(&settings.url)))?;
            let apps = store.apps().map_err(|e| format!("cannot read the store's apps: {e}"))?;
            let mut current = read_all(&config.path, None).map_err(|e| e.to_string())?;
            for (id, text) in apps.iter() {
                current.extend(parse_apps(text).map_err(|e| format!("the store's app {id:?}: {e}"))?);
            }
            loader.set_store_apps(apps);
            Ok(Opened { config, store: Box::new(store), current, loader, _runtime: Some(runtime) })
        }
    }
}

/// Every app of the config, in `format`.
pub fn export(config_path: &Path, format: Format) -> Result<String, String> {
    let Opened { config, current: docs, .. } = open(config_path, false)?;
    Ok(match format {
        Format::Json => {
            let docs: Vec<AppDoc> = docs
                .into_iter()
                .map(|mut doc| {
                    doc.has_token = doc.token.as_ref().is_some_and(Option::is_some);
                    doc.has_secret = doc.secret.as_ref().is_some_and(Option::is_some);
                    doc
                })
                .collect();
            let mut text = serde_json::to_string_pretty(&serde_json::json!({ "apps": docs })).unwrap_or_default();
            text.push('\n');
            text
        }
        Format::Toml => {
            let store = FileStore::new(&config.path, config.apps_dir.as_deref());
            let mut text = String::new();
            for doc in &docs {
                let rendered = store.render(&doc.id, Some(doc), 1);
                // each app without the revision line the store adds to its own files
                let body = rendered.text.unwrap_or_default();
                text.push_str(body.split_once('\n').map_or("", |(_, rest)| rest));
                text.push('\n');
            }
            text
        }
    })
}

/// The steps importing `file` into `opened` would take.
fn steps(opened: &Opened, file: &Path, prune: bool) -> Result<Vec<Step>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let incoming = parse_apps(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    plan(opened.store.as_ref(), &opened.current, &incoming, prune).map_err(|e| e.to_string())
}

/// What importing `file` would change, one line an app; the last line counts them.
pub fn diff(config_path: &Path, file: &Path, prune: bool) -> Result<String, String> {
    let steps = steps(&open(config_path, false)?, file, prune)?;
    let mut out = String::new();
    for step in &steps {
        let _ = match step {
            Step::Create(doc) => writeln!(out, "+ {} (new)", doc.id),
            Step::Replace(before, after) => writeln!(out, "~ {}: {}", after.id, after.describe_change(before)),
            Step::Delete(id) => writeln!(out, "- {id}"),
            Step::ReadOnly(id, file) => writeln!(out, "! {id}: defined in {}, not written by import", file.display()),
        };
    }
    let _ = writeln!(out, "{} change{}", steps.len(), if steps.len() == 1 { "" } else { "s" });
    Ok(out)
}

/// Import `file`: validate the config as it would be with every change made, then make them,
/// each through the store (atomic, and audited as user `import`); returns what was done.
pub fn import(config_path: &Path, file: &Path, prune: bool) -> Result<String, String> {
    let opened = open(config_path, true)?;
    let steps = steps(&opened, file, prune)?;
    let store = opened.store.as_ref();
    if let Some(Step::ReadOnly(id, defined)) = steps.iter().find(|s| matches!(s, Step::ReadOnly(..))) {
        return Err(format!(
            "app {id:?} is defined in {}, which import does not write: move it to apps_dir/{id}.toml first",
            defined.display()
        ));
    }
    let mut writes = Vec::new();
    let mut problems = String::new();
    for step in &steps {
        let (id, doc, before) = match step {
            Step::Create(doc) => (doc.id.as_str(), Some(doc), None),
            Step::Replace(before, doc) => (doc.id.as_str(), Some(doc), Some(before.as_ref())),
            Step::Delete(id) => (id.as_str(), None, None),
            Step::ReadOnly(..) => continue,
        };
        let current = match store.place(id).map_err(|e| e.to_string())? {
            Place::Writable(stored) => Some(*stored),
            _ => None,
        };
        let doc = doc.map(|doc| {
            let mut doc = doc.clone();
            let current_doc = current.as_ref().map(|stored| &stored.doc);
            doc.token = Some(doc.token_after(current_doc));
            doc.secret = Some(doc.secret_after(current_doc));
            doc
        });
        if let Some(doc) = &doc
            && doc.has_token
            && doc.token.as_ref().is_none_or(Option::is_none)
        {
            let _ = writeln!(problems, "app {id:?} had a token, which a JSON export does not hold: import TOML");
            continue;
        }
        let revision = store.next_revision(id, current.as_ref()).map_err(|e| e.to_string())?;
        let rendered = store.render(id, doc.as_ref(), revision);
        let before = before.cloned().or_else(|| current.as_ref().map(|stored| stored.doc.clone()));
        writes.push((id.to_owned(), rendered, current, before, doc, revision));
    }
    // The whole import is checked as one: two apps that are each fine alone may not be together.
    let changes: Vec<_> =
        writes.iter().map(|(_, rendered, ..)| (rendered.file.clone(), rendered.text.clone())).collect();
    if let Err(errors) = opened.loader.load_candidate(&changes) {
        let _ = writeln!(problems, "{errors}");
    }
    if !problems.is_empty() {
        return Err(format!("nothing was imported:\n{}", problems.trim_end()));
    }
    let mut out = String::new();
    for (id, rendered, current, before, after, revision) in &writes {
        let change = match (before, after) {
            (None, _) => "create",
            (_, None) => "delete",
            _ => "replace",
        };
        let mut after = after.clone();
        if let Some(after) = &mut after {
            after.has_token = after.token.as_ref().is_some_and(Option::is_some);
        }
        let record = Record {
            time: Record::now(),
            app: id.clone(),
            revision: Some(*revision),
            user: "import".to_owned(),
            client: "cli".to_owned(),
            change: change.to_owned(),
            outcome: "applied".to_owned(),
            before: before.clone(),
            after,
        };
        store
            .put(rendered, current.as_ref(), &record)
            .map_err(|e| format!("{out}cannot write {}: {e}; the rest was not imported", rendered.file.display()))?;
        let _ = writeln!(out, "{change} {id} (revision {revision})");
    }
    let _ = writeln!(out, "{} change{} imported", writes.len(), if writes.len() == 1 { "" } else { "s" });
    Ok(out)
}
