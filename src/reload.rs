//! Reloading the config while serving.
//!
//! SIGHUP, the file watcher and `POST /-/reload` all end in [`Reloader::reload`]: load and
//! validate a complete new config beside the running one, and either swap it in as the next
//! generation or change nothing. After a swap, every open tunnel is decided again under the
//! new policy, and those it refuses are revoked (closed, logged with reason `revoked`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::watch::{ConfigWatcher, WatchSet};
use crate::config::{self, Config, ConfigErrors, Loader};
use crate::metrics::Metrics;
use crate::policy::Verdict;
use crate::proxy::{Shared, Snapshot};

/// What asked for a reload (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    Watcher,
    Admin,
}

pub struct Reloader {
    shared: Arc<Shared>,
    /// The loader and its cache of validated `apps_dir` files. Held for the whole reload, so
    /// reloads run one at a time and generations are assigned in order.
    loader: tokio::sync::Mutex<Loader>,
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
    if running.limits.max_connections != loaded.limits.max_connections {
        changed.push("max_connections");
    }
    if running.dns != loaded.dns {
        changed.push("dns");
    }
    changed
}

impl Reloader {
    pub(crate) fn new(shared: Arc<Shared>, loader: Loader) -> Reloader {
        Reloader { shared, loader: tokio::sync::Mutex::new(loader) }
    }

    /// Load the config file again; swap it in and revoke what it no longer allows, or keep
    /// the running policy and return every error.
    pub async fn reload(&self, trigger: Trigger) -> Result<u64, ConfigErrors> {
        let mut loader = self.loader.lock().await;
        let current = self.shared.live.load_full();
        let path = current.config.path.clone();
        // File I/O and parsing run off the async workers; the loader (with its cache) goes
        // along and comes back.
        let mut taken = std::mem::replace(&mut *loader, Loader::new(&path));
        let loaded = tokio::task::spawn_blocking(move || {
            let result = taken.load();
            (taken, result)
        })
        .await
        .map(|(returned, result)| {
            *loader = returned;
            result
        });
        let mut config = match loaded {
            Ok(Ok(config)) => config,
            Ok(Err(errors)) => {
                self.shared.metrics.reloads_failure.inc();
                tracing::error!(
                    ?trigger,
                    generation = current.config.generation,
                    "config reload failed; the running policy stays:\n{errors}"
                );
                return Err(errors);
            }
            Err(e) => {
                self.shared.metrics.reloads_failure.inc();
                tracing::error!(?trigger, error = %e, "config reload task failed; the running policy stays");
                let error = config::ConfigError {
                    path: current.config.path.clone(),
                    line: 1,
                    col: 1,
                    message: format!("the reload task failed: {e}"),
                };
                return Err(ConfigErrors(vec![error]));
            }
        };
        let restart_only = restart_only_changes(&current.config, &config);
        if !restart_only.is_empty() {
            let changed = restart_only.join(", ");
            tracing::warn!(changed, "these settings change only on restart; the running ones stay");
        }
        config.generation = current.config.generation + 1;
        let generation = config.generation;
        let snapshot = Snapshot::new(config, &self.shared.metrics);
        publish(&self.shared.metrics, &snapshot);
        self.shared.metrics.reloads_success.inc();
        let apps = snapshot.config.policy.app_count();
        let snapshot = Arc::new(snapshot);
        self.shared.live.store(snapshot.clone());
        let revoked = self.revoke(&snapshot);
        tracing::info!(?trigger, generation, apps, revoked, "config reloaded");
        Ok(generation)
    }

    /// What the file watcher should watch for the config in force.
    pub fn watch_set(&self) -> WatchSet {
        let snapshot = self.shared.live.load();
        WatchSet::new(&snapshot.config.path, snapshot.config.apps_dir.as_deref())
    }

    /// Signal every open tunnel that `snapshot` refuses; returns how many.
    fn revoke(&self, snapshot: &Snapshot) -> usize {
        let policy = &snapshot.config.policy;
        let mut revoked = 0;
        for tunnel in self.shared.tunnels.iter() {
            let decision = policy.decide(&tunnel.app, tunnel.channel, &tunnel.target);
            if decision.verdict == Verdict::Deny {
                tunnel.revoke.cancel();
                revoked += 1;
            }
        }
        revoked
    }
}

/// Watch the config's directories and reload when they change. The watcher lives as long as
/// the returned task.
pub fn spawn_watcher(reloader: Arc<Reloader>) -> notify::Result<tokio::task::JoinHandle<()>> {
    let (mut watcher, mut changes) = ConfigWatcher::start(reloader.watch_set())?;
    Ok(tokio::spawn(async move {
        while changes.recv().await.is_some() {
            let _ = reloader.reload(Trigger::Watcher).await;
            watcher.update(reloader.watch_set());
        }
    }))
}
