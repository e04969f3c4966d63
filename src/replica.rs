//! A replica of the PostgreSQL store: how a gateway with `[store] backend = "postgres"` keeps
//! the apps it enforces equal to the database's.
//!
//! At start the replica reads every app (after bringing the schema up to date) and writes them
//! to its cache file; if the database cannot be reached it starts from that file instead, the
//! last good snapshot, and refuses to start only with neither. Then one task keeps a listening
//! connection (`LISTEN gateway_apps`): each notification, each `poll_interval` (notifications
//! are not durable: one sent while the connection was down is lost) and each reconnection
//! read the rows changed after the last change number read, which the store hands out in
//! commit order. Only those apps are validated again (the loader keeps the others), the new
//! policy is swapped in like any reload, and open tunnels are decided again. While the
//! database is away the last good policy stays in force, reconnection backs off from
//! [`MIN_BACKOFF`] to [`MAX_BACKOFF`], and writes through the admin API fail with `503`.
//!
//! A reload for any other reason (SIGHUP, the watcher, `POST /-/reload`, an API write) reads
//! the store's changes first too, so the write a replica just made is in force on it when the
//! API answers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client};

use crate::config::{ConfigErrors, PostgresSettings, StoreApps};
use crate::metrics::Metrics;
use crate::pg::{self, PgError, PgStore};
use crate::reload::{Reloader, Trigger};

/// The first wait before reconnecting to a database that went away; it doubles each time.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The least time between two writes of the cache file: with thousands of apps it is megabytes,
/// not worth writing for every one of a burst of changes (the newest snapshot is always the one
/// written, so the file is at most this much behind the policy in force).
const CACHE_EVERY: Duration = Duration::from_secs(1);
/// What the cache file says it is, so that a file of another kind is never taken for it.
const CACHE_FORMAT: &str = "miniapp-gateway store cache 1";

/// The replica of one gateway. See the module docs.
pub struct Replica {
    settings: PostgresSettings,
    store: Arc<PgStore>,
    synced: tokio::sync::Mutex<Synced>,
    status: std::sync::Mutex<State>,
    /// The snapshot the cache writer is to write next (the newest wins).
    cache: watch::Sender<Option<Arc<CacheSnapshot>>>,
}

/// What the replica has read from the store.
struct Synced {
    /// The store's apps as last read (what the loader takes).
    apps: StoreApps,
    /// The newest change number read.
    change: i64,
    /// The connection reads go over: the listening one while it is up.
    client: Option<Client>,
    /// The change number of the snapshot last handed to the cache writer.
    cached: i64,
}

/// What the replica knows of itself, for the metrics, `/readyz` and `/v1/status`.
#[derive(Debug, Clone)]
struct State {
    /// The change number whose apps are in force.
    enforced: i64,
    /// The newest change number read from the store.
    newest: i64,
    up: bool,
    /// Whether the apps in force are the store's newest, with a listener to hear of the next.
    current: bool,
    /// When the replica last knew it was current (for a start from the cache: when the cache
    /// was written).
    current_at: SystemTime,
    /// Whether the replica started from its cache file and has not reached the store since.
    from_cache: bool,
}

/// What `/v1/status` shows of the store.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub backend: &'static str,
    /// The store's change number whose apps are in force.
    pub revision: i64,
    /// The newest change number this replica has read.
    pub newest: i64,
    pub up: bool,
    pub lag_seconds: f64,
    pub from_cache: bool,
}

/// The cache file: the last good snapshot of the store's apps, with its change number.
#[derive(Serialize, Deserialize)]
struct CacheFile<A> {
    format: String,
    change: i64,
    /// Unix seconds.
    saved_at: u64,
    apps: A,
}

struct CacheSnapshot {
    change: i64,
    apps: StoreApps,
}

/// Why a replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot use the store: {0}")]
    Store(PgError),
    #[error("cannot reach the store ({store}), and cannot start from its cache {}: {cache}", .path.display())]
    NoCache { store: PgError, path: PathBuf, cache: String },
}

/// How a replica started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From the database, at this change number.
    Database(i64),
    /// From the cache file, at this change number, written this many seconds ago.
    Cache(i64, u64),
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Replica {
    /// Read the store's apps (migrating its schema first), or the cache file if the store
    /// cannot be reached. Returns the replica, the apps to load and where they came from.
    pub async fn open(
        settings: &PostgresSettings,
        config: &Path,
    ) -> Result<(Arc<Replica>, StoreApps, Origin), OpenError> {
        let store = Arc::new(PgStore::new(settings, config, tokio::runtime::Handle::current()));
        let read = async {
            let mut client = pg::connect(settings).await?;
            pg::bounded(pg::migrate(&mut client)).await?;
            let changes = pg::bounded(pg::read_changes(&mut client, None)).await?;
            Ok::<_, PgError>((client, changes))
        };
        let (synced, state, origin) = match read.await {
            Ok((client, changes)) => {
                let apps: BTreeMap<String, Arc<str>> =
                    changes.rows.into_iter().filter_map(|row| Some((row.id, Arc::from(row.definition?)))).collect();
                let synced = Synced {
                    apps: Arc::new(apps),
                    change: changes.newest,
                    client: Some(client),
                    cached: changes.newest,
                };
                let state = State {
                    enforced: changes.newest,
                    newest: changes.newest,
                    up: true,
                    current: false,
                    current_at: SystemTime::now(),
                    from_cache: false,
                };
                (synced, state, Origin::Database(changes.newest))
            }
            Err(e) if !e.is_unavailable() => return Err(OpenError::Store(e)),
            Err(e) => {
                let cache = settings.cache.clone();
                let loaded = tokio::task::spawn_blocking(move || read_cache(&cache)).await;
                let (change, saved_at, apps) = match loaded {
                    Ok(Ok(found)) => found,
                    Ok(Err(cache)) => return Err(OpenError::NoCache { store: e, path: settings.cache.clone(), cache }),
                    Err(join) => {
                        let cache = join.to_string();
                        return Err(OpenError::NoCache { store: e, path: settings.cache.clone(), cache });
                    }
                };
                tracing::warn!(error = %e, "the store cannot be reached");
                let synced = Synced { apps, change, client: None, cached: change };
                let state = State {
                    enforced: change,
                    newest: change,
                    up: false,
                    current: false,
                    current_at: UNIX_EPOCH + Duration::from_secs(saved_at),
                    from_cache: true,
                };
                (synced, state, Origin::Cache(change, unix_now().saturating_sub(saved_at)))
            }
        };
        let apps = synced.apps.clone();
        let snapshot =
            (!state.from_cache).then(|| Arc::new(CacheSnapshot { change: synced.change, apps: apps.clone() }));
        let replica = Replica {
            settings: settings.clone(),
            store,
            synced: tokio::sync::Mutex::new(synced),
            status: std::sync::Mutex::new(state),
            cache: watch::channel(None).0,
        };
        if let Some(snapshot) = snapshot {
            // Written before serving, so that a restart right after finds it.
            let path = replica.settings.cache.clone();
            match tokio::task::spawn_blocking(move || write_cache(&path, &snapshot)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, cache = %replica.settings.cache.display(), "cannot write the store's cache")
                }
                Err(e) => tracing::warn!(error = %e, "cannot write the store's cache"),
            }
        }
        Ok((Arc::new(replica), apps, origin))
    }

    /// The store the admin API writes to.
    pub fn store(&self) -> Arc<dyn crate::store::Store> {
        self.store.clone()
    }

    /// Attach to `reloader` and keep the policy in step with the store from now on, in a task
    /// of its own (and another that writes the cache file).
    pub fn spawn(self: &Arc<Self>, reloader: Arc<Reloader>) -> tokio::task::JoinHandle<()> {
        reloader.attach(self.clone());
        self.publish(&reloader.shared().metrics);
        let mut snapshots = self.cache.subscribe();
        let path = self.settings.cache.clone();
        tokio::spawn(async move {
            while snapshots.changed().await.is_ok() {
                let Some(snapshot) = snapshots.borrow_and_update().clone() else { continue };
                let path = path.clone();
                match tokio::task::spawn_blocking(move || write_cache(&path, &snapshot)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the store's cache"),
                    Err(e) => tracing::warn!(error = %e, "cannot write the store's cache"),
                }
                tokio::time::sleep(CACHE_EVERY).await;
            }
        });
        let replica = self.clone();
        tokio::spawn(async move { replica.run(reloader).await })
    }

    /// The store's state as this replica sees it.
    pub fn status(&self) -> Status {
        let state = self.state();
        Status {
            backend: "postgres",
            revision: state.enforced,
            newest: state.newest,
            up: state.up,
            lag_seconds: lag(&state),
            from_cache: state.from_cache,
        }
    }

    /// Whether `/readyz` may say ready: the store answers, or `ready_without_store` is set.
    pub fn ready(&self) -> bool {
        self.settings.ready_without_store || self.state().up
    }

    fn state(&self) -> State {
        self.status.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn update(&self, metrics: &Metrics, change: impl FnOnce(&mut State)) {
        let mut state = self.status.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let was_up = state.up;
        change(&mut state);
        if state.up {
            state.from_cache = false;
        }
        if state.current {
            state.current_at = SystemTime::now();
        }
        if was_up != state.up {
            if state.up {
                tracing::info!(revision = state.enforced, "the store answers again");
            } else {
                tracing::warn!(revision = state.enforced, "the store cannot be reached; the policy in force stays");
            }
        }
        drop(state);
        self.publish(metrics);
    }

    /// Set the `gateway_store_*` gauges (the lag as of now: `/metrics` calls this first).
    pub(crate) fn publish(&self, metrics: &Metrics) {
        let state = self.state();
        metrics.store_revision.set(state.enforced);
        metrics.store_up.set(i64::from(state.up));
        metrics.store_sync_lag.set(lag(&state));
    }

    /// Listen, read and apply, reconnect: for as long as the gateway runs.
    async fn run(&self, reloader: Arc<Reloader>) {
        let metrics = reloader.shared().metrics.clone();
        let mut backoff = MIN_BACKOFF;
        let mut poll = tokio::time::interval(self.settings.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.reset();
        let mut messages: Option<mpsc::UnboundedReceiver<AsyncMessage>> = None;
        loop {
            let Some(listening) = messages.as_mut() else {
                match self.listen().await {
                    Ok(receiver) => {
                        messages = Some(receiver);
                        backoff = MIN_BACKOFF;
                        // Whatever changed while nobody listened.
                        let _ = self.sync(&reloader, Trigger::Store).await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, ?backoff, "cannot listen to the store");
                        self.update(&metrics, |state| {
                            state.up = !e.is_unavailable() && state.up;
                            state.current = false;
                        });
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
                continue;
            };
            tokio::select! {
                message = listening.recv() => match message {
                    Some(AsyncMessage::Notification(_)) => {
                        // One read for every notification already queued.
                        while listening.try_recv().is_ok() {}
                        let _ = self.sync(&reloader, Trigger::Store).await;
                    }
                    Some(_) => {}
                    None => {
                        tracing::warn!("the store's notification connection closed; reconnecting");
                        messages = None;
                        self.update(&metrics, |state| state.current = false);
                        continue;
                    }
                },
                _ = poll.tick() => {
                    let _ = self.sync(&reloader, Trigger::Store).await;
                }
            }
            if !self.state().up {
                // The read failed: listen again (after the backoff) before trusting the quiet.
                messages = None;
            }
        }
    }

    /// Connect a listening connection, and make it the one reads go over.
    async fn listen(&self) -> Result<mpsc::UnboundedReceiver<AsyncMessage>, PgError> {
        let (client, receiver) = pg::connect_listening(&self.settings).await?;
        pg::bounded(async { Ok(client.batch_execute(&format!("LISTEN {}", pg::CHANNEL)).await?) }).await?;
        self.synced.lock().await.client = Some(client);
        Ok(receiver)
    }

    /// Read the store's changes and put them in force: for `Trigger::Store` only when there
    /// are any; for any other trigger a reload in any case (with the apps as last read when
    /// the store cannot be reached).
    pub(crate) async fn sync(&self, reloader: &Reloader, trigger: Trigger) -> Result<u64, ConfigErrors> {
        let metrics = &reloader.shared().metrics;
        let mut synced = self.synced.lock().await;
        let started = std::time::Instant::now();
        let read = self.read(&mut synced).await;
        let listening = synced.client.is_some();
        let changed = match read {
            Ok(changed) => {
                let newest = synced.change;
                self.update(metrics, |state| {
                    state.up = true;
                    state.newest = newest;
                    state.current = listening && changed.is_none() && state.enforced == newest;
                });
                changed
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the store's changes");
                self.update(metrics, |state| {
                    state.up = false;
                    state.current = false;
                });
                None
            }
        };
        // Nothing new, and what was read is in force: a write made here that the store's
        // notification already put in force needs no second reload.
        let enforced = self.state().enforced;
        let in_force = enforced == synced.change && enforced >= self.store.last_written();
        if changed.is_none() && (trigger == Trigger::Store || (trigger == Trigger::Write && in_force)) {
            return Ok(reloader.shared().live.load().config.generation);
        }
        let count = changed.as_ref().map_or(0, |(_, count)| *count);
        let apps = changed.map(|(apps, _)| apps);
        if let Some(apps) = &apps {
            synced.apps = apps.clone();
        }
        let result = reloader.reload_with(trigger, apps).await;
        let change = synced.change;
        if let Ok(generation) = result {
            // Still under the lock: a later sync cannot finish first and be overwritten.
            let up = self.state().up;
            self.update(metrics, |state| {
                state.enforced = change;
                state.current = up && listening && state.newest == change;
            });
            if change > synced.cached {
                // The snapshot in force, for a start while the database is away.
                synced.cached = change;
                let apps = synced.apps.clone();
                self.cache.send_replace(Some(Arc::new(CacheSnapshot { change, apps })));
            }
            if count > 0 {
                // read, validate, build and swap: what the replica spent on the change
                let took_ms = started.elapsed().as_secs_f64() * 1000.0;
                tracing::info!(revision = change, changed = count, generation, took_ms, "store changes in force");
                reloader.shared().events.publish(None, "store", || {
                    serde_json::json!({ "revision": change, "generation": generation, "changed": count, "took_ms": took_ms })
                });
            }
        }
        result
    }

    /// Whether every change this replica's store committed is in force here (an admin write
    /// answers success only then).
    pub fn writes_in_force(&self) -> bool {
        self.state().enforced >= self.store.last_written()
    }

    /// Read the rows changed since the last read into a new set of apps (`None`: nothing
    /// changed), with how many rows changed.
    async fn read(&self, synced: &mut Synced) -> Result<Option<(StoreApps, usize)>, PgError> {
        if synced.client.as_ref().is_none_or(Client::is_closed) {
            synced.client = None;
            synced.client = Some(pg::connect(&self.settings).await?);
        }
        let client = synced.client.as_mut().expect("connected above");
        let mut read = pg::bounded(pg::read_changes(client, Some(synced.change))).await;
        let mut whole = false;
        if let Ok(changes) = &read
            && changes.newest < synced.change
        {
            tracing::warn!(
                newest = changes.newest,
                read = synced.change,
                "the store's newest change is older than one this replica read (restored from a backup?): reading it whole"
            );
            read = pg::bounded(pg::read_changes(client, None)).await;
            whole = true;
        }
        let changes = match read {
            Ok(changes) => changes,
            Err(e) => {
                if e.is_unavailable() {
                    synced.client = None;
                }
                return Err(e);
            }
        };
        if changes.rows.is_empty() && !whole {
            return Ok(None);
        }
        let count = changes.rows.len();
        let mut apps = if whole { BTreeMap::new() } else { (*synced.apps).clone() };
        for row in changes.rows {
            match row.definition {
                Some(text) => apps.insert(row.id, Arc::from(text)),
                None => apps.remove(&row.id),
            };
        }
        synced.change = changes.newest;
        Ok(Some((Arc::new(apps), count)))
    }
}

/// Seconds since the replica last knew it was current; 0 while it is.
fn lag(state: &State) -> f64 {
    if state.current {
        return 0.0;
    }
    state.current_at.elapsed().map_or(0.0, |d| d.as_secs_f64())
}

/// The cache file's change number, when it was saved, and its apps; or why it cannot be used.
fn read_cache(path: &Path) -> Result<(i64, u64, StoreApps), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let file: CacheFile<BTreeMap<String, String>> =
        serde_json::from_str(&text).map_err(|e| format!("not a store cache file: {e}"))?;
    if file.format != CACHE_FORMAT {
        return Err(format!("not a store cache file (format {:?})", file.format));
    }
    let apps = file.apps.into_iter().map(|(id, text)| (id, Arc::from(text))).collect();
    Ok((file.change, file.saved_at, Arc::new(apps)))
}

/// Write the cache file whole or not at all.
fn write_cache(path: &Path, snapshot: &CacheSnapshot) -> std::io::Result<()> {
    let apps: BTreeMap<&str, &str> = snapshot.apps.iter().map(|(id, text)| (id.as_str(), &**text)).collect();
    let file = CacheFile { format: CACHE_FORMAT.to_owned(), change: snapshot.change, saved_at: unix_now(), apps };
    let bytes = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    crate::store::write_atomically(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_file_reads_back_what_was_written_and_refuses_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache").join("apps.json");
        let apps: BTreeMap<String, Arc<str>> = [("shop".to_owned(), Arc::from("[[app]]\nid = \"shop\"\n"))].into();
        write_cache(&path, &CacheSnapshot { change: 42, apps: Arc::new(apps.clone()) }).unwrap();
        let (change, saved_at, read) = read_cache(&path).unwrap();
        assert_eq!((change, &*read), (42, &apps));
        assert!(unix_now().abs_diff(saved_at) < 60);
        std::fs::write(&path, "{\"apps\": {}}").unwrap();
        assert!(read_cache(&path).unwrap_err().starts_with("not a store cache file"));
        std::fs::write(&path, "{\"format\":\"x\",\"change\":1,\"saved_at\":0,\"apps\":{}}").unwrap();
        assert_eq!(read_cache(&path).unwrap_err(), "not a store cache file (format \"x\")");
        assert!(read_cache(&dir.path().join("missing.json")).is_err());
    }
}
