//! Reloading the config while serving.
//!
//! SIGHUP, the file watcher, a periodic check and `POST /-/reload` all end in
//! [`Reloader::reload`]: load and validate a complete new config beside the running one, and
//! either swap it in as the next generation or change nothing. A config that would take away
//! what a running listener depends on (the admin token, `[tls]`) is refused like an invalid
//! one: that needs a restart. After a swap, every registered tunnel is decided again, as a
//! whole, under the new policy, and those it refuses are revoked (closed, logged with reason
//! `revoked`).
//!
//! The watcher can miss changes (a file outside the watched directories, such as `[tls]` or
//! `admin_token_file`, or events lost some other way), so every [`REHASH_EVERY`] the files
//! the config was loaded from are looked at again (size, modification time and identity:
//! cheap even for thousands of apps files) and a difference from the last reload reloads.

use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use crate::config::watch::{ConfigWatcher, WatchSet, settle};
use crate::config::{Config, ConfigError, ConfigErrors, Loader};
use crate::metrics::Metrics;
use crate::proxy::{Shared, Snapshot};

/// How often the watcher's directories are checked for having been deleted and re-created.
pub const REPAIR_EVERY: Duration = Duration::from_secs(1);
/// How often the config's files are checked for changes that no event reported.
pub const REHASH_EVERY: Duration = Duration::from_secs(30);

/// What asked for a reload (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    Watcher,
    /// The periodic check found a file changed.
    Periodic,
    Admin,
    /// An app written through the admin API (with the PostgreSQL store: a reload only if the
    /// store's notification has not already put the write in force).
    Write,
    /// The PostgreSQL store changed (a notification, or the periodic poll found changes).
    Store,
}

pub struct Reloader {
    shared: Arc<Shared>,
    /// The loader and its cache of validated `apps_dir` files. Held for the whole reload, so
    /// reloads run one at a time and generations are assigned in order.
    loader: tokio::sync::Mutex<Loader>,
    /// The fingerprint of the config's files as the last reload found them.
    last_seen: std::sync::Mutex<u64>,
    /// The store of the config in force, kept while its files stay the same (it keeps an index
    /// of the audit log).
    store: std::sync::Mutex<Option<StoreFor>>,
    /// With `[store] backend = "postgres"`: the replica that keeps the store's apps.
    replica: std::sync::OnceLock<Arc<crate::replica::Replica>>,
}

/// A store, and the config file and `apps_dir` it was made for.
struct StoreFor {
    files: (PathBuf, Option<PathBuf>),
    store: Arc<dyn crate::store::Store>,
}

/// Set the gauges that describe the snapshot in force.
pub(crate) fn publish(metrics: &Metrics, snapshot: &Snapshot) {
    metrics.config_generation.set(snapshot.config.generation as i64);
    metrics.apps_loaded.set(snapshot.config.policy.app_count() as i64);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    metrics.last_reload_success.set(now);
}

/// The settings a reload cannot apply to a running gateway, that differ between two configs.
fn restart_only_changes(running: &Config, loaded: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if running.listeners != loaded.listeners {
        changed.push("listeners");
    }
    if running.server.admin_listen != loaded.server.admin_listen {
        changed.push("admin_listen");
    }
    if running.server.workers != loaded.server.workers {
        changed.push("workers");
    }
    if running.limits.max_connections != loaded.limits.max_connections {
        changed.push("max_connections");
    }
    if running.dns != loaded.dns {
        changed.push("dns");
    }
    if running.scopes.consent_file != loaded.scopes.consent_file {
        changed.push("scopes.consent_file");
    }
    if running.store != loaded.store {
        changed.push("store");
    }
    changed
}

/// What a loaded config would take away from listeners that are running: a reload may rotate
/// the admin token and the `[tls]` files, but not remove them.
fn removals(running: &Config, loaded: &Config, shared: &Shared) -> Vec<String> {
    let mut problems = Vec::new();
    let users = |config: &Config| !config.server.admin_users.is_empty();
    if shared.admin_running && users(running) && !users(loaded) {
        problems.push(
            "refusing to remove admin_token (and every [[admin_user]]) while the admin listener runs: that would \
             open it to anyone; restart to turn admin authentication off"
                .to_owned(),
        );
    }
    if shared.tls_running && loaded.tls.is_none() {
        problems.push("refusing to remove [tls] while TLS listeners run on it; restart to turn TLS off".to_owned());
    }
    problems
}

/// A fingerprint of the files `config` was loaded from (the config file, every `*.toml` of
/// `apps_dir`, `[tls]` and `admin_token_file`): their size, modification time and identity,
/// and which files `apps_dir` holds.
fn fingerprint(config: &Config) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    let mut stamp = |path: &Path| {
        path.hash(&mut hasher);
        if let Ok(meta) = std::fs::metadata(path) {
            (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino(), meta.dev()).hash(&mut hasher);
        }
    };
    stamp(&config.path);
    for file in &config.other_files {
        stamp(file);
    }
    if let Some(dir) = &config.apps_dir {
        stamp(dir);
        if let Ok(listing) = std::fs::read_dir(dir) {
            let mut files: Vec<_> = listing
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
                .collect();
            files.sort();
            for file in &files {
                stamp(file);
            }
        }
    }
    hasher.finish()
}

impl Reloader {
    pub(crate) fn new(shared: Arc<Shared>, loader: Loader) -> Reloader {
        let last_seen = fingerprint(&shared.live.load().config);
        Reloader {
            shared,
            loader: tokio::sync::Mutex::new(loader),
            last_seen: std::sync::Mutex::new(last_seen),
            store: std::sync::Mutex::new(None),
            replica: std::sync::OnceLock::new(),
        }
    }

    /// Keep the store's apps through `replica` from now on (once, right after the bind).
    pub fn attach(&self, replica: Arc<crate::replica::Replica>) {
        if self.replica.set(replica).is_err() {
            tracing::warn!("a second store replica was attached; the first stays");
        }
    }

    /// The replica of the PostgreSQL store, when the config uses it.
    pub fn replica(&self) -> Option<&Arc<crate::replica::Replica>> {
        self.replica.get()
    }

    /// Whether every app change this gateway wrote is in force on it (always, with files; with
    /// the PostgreSQL store, not while it wrote a change it could not read back yet).
    pub fn writes_in_force(&self) -> bool {
        self.replica.get().is_none_or(|replica| replica.writes_in_force())
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn fail(&self, trigger: Trigger, generation: u64, errors: ConfigErrors) -> Result<u64, ConfigErrors> {
        self.shared.metrics.reloads_failure.inc();
        tracing::error!(?trigger, generation, "config reload failed; the running policy stays:\n{errors}");
        Err(errors)
    }

    /// Load the config file again (with the PostgreSQL store: after reading the store's
    /// changes, when it answers); swap it in and revoke what it no longer allows, or keep the
    /// running policy and return every error.
    pub async fn reload(&self, trigger: Trigger) -> Result<u64, ConfigErrors> {
        match self.replica.get() {
            Some(replica) => replica.sync(self, trigger).await,
            None => self.reload_with(trigger, None).await,
        }
    }

    /// [`Reloader::reload`], with the store's apps replaced by `store_apps` when given (they
    /// stay the loader's even when the load fails: what the store holds is what the next load
    /// must take).
    pub(crate) async fn reload_with(
        &self,
        trigger: Trigger,
        store_apps: Option<crate::config::StoreApps>,
    ) -> Result<u64, ConfigErrors> {
        let mut loader = self.loader.lock().await;
        if let Some(apps) = store_apps {
            loader.set_store_apps(apps);
        }
        let current = self.shared.live.load_full();
        let path = current.config.path.clone();
        // File I/O and parsing run off the async workers; the loader (with its cache) goes
        // along and comes back. The fingerprint is taken before the files are read, so a
        // change made during the load is seen by the next periodic check.
        let mut taken = std::mem::replace(&mut *loader, Loader::new(&path));
        let running = current.clone();
        let started = std::time::Instant::now();
        let loaded = tokio::task::spawn_blocking(move || {
            let print = fingerprint(&running.config);
            let result = taken.load();
            (taken, print, result)
        })
        .await
        .map(|(returned, print, result)| {
            *loader = returned;
            // A config that could not be read (out of descriptors, a writer that would not
            // stop) is tried again by the periodic check; one that is invalid is not, until
            // its files change again.
            let unreadable = result.as_ref().is_err_and(|errors| errors.0.iter().any(|error| error.unreadable));
            if !unreadable {
                *self.last_seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = print;
            }
            result
        });
        let generation = current.config.generation;
        let mut config = match loaded {
            Ok(Ok(config)) => config,
            Ok(Err(errors)) => return self.fail(trigger, generation, errors),
            Err(e) => {
                let message = format!("the reload task failed: {e}");
                let error = ConfigError::whole_file(&path, message);
                return self.fail(trigger, generation, ConfigErrors(vec![error]));
            }
        };
        let removed = removals(&current.config, &config, &self.shared);
        if !removed.is_empty() {
            let errors = removed.into_iter().map(|message| ConfigError::whole_file(&path, message)).collect();
            return self.fail(trigger, generation, ConfigErrors(errors));
        }
        let restart_only = restart_only_changes(&current.config, &config);
        if !restart_only.is_empty() {
            let changed = restart_only.join(", ");
            tracing::warn!(changed, "these settings change only on restart; the running ones stay");
        }
        config.generation = generation + 1;
        let generation = config.generation;
        let snapshot = Snapshot::new(config, &self.shared.metrics);
        publish(&self.shared.metrics, &snapshot);
        self.shared.metrics.reloads_success.inc();
        let apps = snapshot.config.policy.app_count();
        let snapshot = Arc::new(snapshot);
        self.shared.live.store(snapshot.clone());
        let revoked = self.shared.tunnels.revoke_refused(&snapshot.config);
        current.counters.forget_apps_not_in(&snapshot.config.policy);
        self.shared.scopes.forget_apps_not_in(&snapshot.config.policy);
        let took_ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(?trigger, generation, apps, revoked, took_ms, "config reloaded");
        self.shared.events.publish(None, "reload", || serde_json::json!({ "generation": generation, "apps": apps }));
        Ok(generation)
    }

    /// Validate the config as it would be with each `apps_dir` file of `changes` holding its
    /// text (or removed), with check's rules and the apps already validated; changes nothing.
    pub async fn check_candidate(&self, changes: Vec<(PathBuf, Option<String>)>) -> Result<Config, ConfigErrors> {
        let loader = self.loader.lock().await.clone();
        let checked = tokio::task::spawn_blocking(move || loader.load_candidate(&changes));
        checked.await.unwrap_or_else(|e| {
            let message = format!("the check failed: {e}");
            Err(ConfigErrors(vec![ConfigError::whole_file(Path::new(""), message)]))
        })
    }

    /// Reload if the config's files changed since the last reload looked at them: a watcher
    /// event for a change that a reload already took (the admin API's own write) makes no new
    /// generation.
    pub async fn reload_if_changed(&self, trigger: Trigger) {
        let config = self.shared.live.load_full();
        let print = tokio::task::spawn_blocking(move || fingerprint(&config.config)).await;
        let last = *self.last_seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if print.is_ok_and(|print| print != last) {
            let _ = self.reload(trigger).await;
        }
    }

    /// The store of the config in force: where the management API reads and writes apps.
    pub fn store(&self) -> Arc<dyn crate::store::Store> {
        if let Some(replica) = self.replica.get() {
            return replica.store();
        }
        let files = self.config_files();
        let mut kept = self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match kept.as_ref() {
            Some(kept) if kept.files == files => kept.store.clone(),
            _ => {
                let store: Arc<dyn crate::store::Store> =
                    Arc::new(crate::store::FileStore::new(&files.0, files.1.as_deref()));
                *kept = Some(StoreFor { files, store: store.clone() });
                store
            }
        }
    }

    /// The config file and `apps_dir` of the config in force.
    pub fn config_files(&self) -> (PathBuf, Option<PathBuf>) {
        let snapshot = self.shared.live.load();
        (snapshot.config.path.clone(), snapshot.config.apps_dir.clone())
    }

    /// What the file watcher should watch for the config in force.
    pub fn watch_set(&self) -> WatchSet {
        let snapshot = self.shared.live.load();
        WatchSet::new(&snapshot.config.path, snapshot.config.apps_dir.as_deref())
    }
}

/// Watch the config's directories and reload when they change; check every [`REPAIR_EVERY`]
/// that the watches are alive, and every [`REHASH_EVERY`] that the files are as last loaded.
/// Runs as long as the returned task. A watcher that cannot start (or stops) is reported by
/// `gateway_config_watcher_up` and retried; the periodic check goes on regardless.
pub fn spawn_watcher(reloader: Arc<Reloader>) -> tokio::task::JoinHandle<()> {
    spawn_watcher_every(reloader, REPAIR_EVERY, REHASH_EVERY)
}

/// [`spawn_watcher`] with other periods (tests use short ones).
pub fn spawn_watcher_every(reloader: Arc<Reloader>, repair: Duration, rehash: Duration) -> tokio::task::JoinHandle<()> {
    let (raw_tx, raw_rx) = mpsc::unbounded_channel();
    // Started before this returns, so that a change made right after is seen.
    let mut watcher = ConfigWatcher::start(reloader.watch_set(), raw_tx.clone())
        .inspect_err(|e| tracing::error!(error = %e, "cannot watch the config; retrying every {repair:?}"))
        .ok();
    let mut reported_down = watcher.is_none();
    tokio::spawn(async move {
        let mut changes = settle(raw_rx);
        let mut repair_tick = tokio::time::interval(repair);
        repair_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rehash_tick = tokio::time::interval(rehash);
        rehash_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rehash_tick.reset();
        let up = reloader.shared.metrics.config_watcher_up.clone();
        loop {
            let mut reload = false;
            match &mut watcher {
                None => match ConfigWatcher::start(reloader.watch_set(), raw_tx.clone()) {
                    Ok(started) => {
                        if reported_down {
                            tracing::info!("config watcher started");
                            reload = true; // it may have missed changes while it was down
                        }
                        watcher = Some(started);
                    }
                    Err(e) if !reported_down => {
                        tracing::error!(error = %e, "cannot watch the config; retrying every {repair:?}");
                        reported_down = true;
                    }
                    Err(_) => {}
                },
                Some(running) => {
                    // A reload by SIGHUP or the admin API may have moved apps_dir.
                    running.update(reloader.watch_set());
                    reload = running.repair();
                }
            }
            let watching = watcher.as_ref().is_some_and(ConfigWatcher::watching_all);
            up.set(i64::from(watching));
            if reload {
                let _ = reloader.reload(Trigger::Watcher).await;
            }
            tokio::select! {
                changed = changes.recv() => {
                    if changed.is_none() {
                        return;
                    }
                    reloader.reload_if_changed(Trigger::Watcher).await;
                    if let Some(running) = &mut watcher {
                        running.update(reloader.watch_set());
                    }
                }
                _ = repair_tick.tick() => {}
                _ = rehash_tick.tick() => reloader.reload_if_changed(Trigger::Periodic).await,
            }
        }
    })
}
