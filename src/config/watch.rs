//! Watching the config for changes.
//!
//! Editors save by writing a new file and renaming it over the old one, and Kubernetes
//! updates a mounted ConfigMap by swapping a `..data` symlink; either way the file that was
//! watched is gone. So the watcher watches the *directories* (the config file's, and
//! `apps_dir`), keeps the events that concern the config (its name, a `*.toml` in
//! `apps_dir`, or a Kubernetes `..` entry), lets a burst of them settle, and then asks for one
//! reload. After every reload the set of watched directories is refreshed, because
//! `apps_dir` may have changed or been re-created.
//!
//! Events can be lost: the kernel's queue overflows (an event that asks for a rescan), or a
//! watched directory is deleted and re-created (its watch dies with the old directory). The
//! first asks for a reload like any change; the second is found by [`ConfigWatcher::repair`],
//! which the reloader calls every second and which re-attaches the watch to the directory now
//! at that path. What neither catches, a periodic check of the files themselves does (see
//! `crate::reload`).

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// How long events must stop arriving before the reload: an editor's write-and-rename or a
/// ConfigMap swap is several events in a few milliseconds.
pub const SETTLE: Duration = Duration::from_millis(250);

/// What to watch for one config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSet {
    config_dir: PathBuf,
    config_name: OsString,
    apps_dir: Option<PathBuf>,
}

impl WatchSet {
    pub fn new(config_path: &Path, apps_dir: Option<&Path>) -> WatchSet {
        let config_dir = match config_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let config_name = config_path.file_name().map(OsString::from).unwrap_or_default();
        WatchSet { config_dir, config_name, apps_dir: apps_dir.map(Path::to_path_buf) }
    }

    fn dirs(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.config_dir.as_path()).chain(self.apps_dir.as_deref())
    }

    /// Whether a change at `path` can change the config.
    fn concerns(&self, path: &Path) -> bool {
        let Some(name) = path.file_name() else { return false };
        let kubernetes = name.to_string_lossy().starts_with("..");
        let parent = path.parent().unwrap_or(Path::new(""));
        let in_dir = |dir: &Path| parent == dir || same_dir(parent, dir);
        let apps_dir_itself = self.apps_dir.as_deref().is_some_and(|dir| path == dir);
        apps_dir_itself
            || (in_dir(&self.config_dir) && (name == self.config_name.as_os_str() || kubernetes))
            || self.apps_dir.as_deref().is_some_and(|dir| {
                in_dir(dir) && (kubernetes || Path::new(name).extension().is_some_and(|e| e == "toml"))
            })
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Whether a watcher event asks for a reload: a change to a file of the config, or a sign that
/// events were lost (a rescan request, an event naming no path).
fn wants_reload(event: &notify::Event, set: &WatchSet) -> bool {
    if event.need_rescan() {
        return true;
    }
    !matches!(event.kind, EventKind::Access(_))
        && (event.paths.is_empty() || event.paths.iter().any(|p| set.concerns(p)))
}

/// The identity of a directory: a directory deleted and re-created at the same path is a
/// different one, and the watch on the old one is dead.
fn dir_identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir).ok().filter(|m| m.is_dir()).map(|m| (m.dev(), m.ino()))
}

/// A running directory watcher that sends `()` when the config may have changed. Dropping it
/// stops watching.
pub struct ConfigWatcher {
    watcher: RecommendedWatcher,
    /// Each directory of the set, and the identity of the directory the watch is on (`None`
    /// when it could not be watched).
    watching: Vec<(PathBuf, Option<(u64, u64)>)>,
    set: std::sync::Arc<std::sync::RwLock<WatchSet>>,
    /// Watched directories that events said were removed or moved away: their watches are
    /// dead even if a new directory (which may reuse the inode number) is at the path now.
    lost: std::sync::Arc<std::sync::Mutex<Vec<PathBuf>>>,
}

impl ConfigWatcher {
    /// Watch `set`; change notifications (not yet settled: see [`settle`]) go to `changes`.
    pub fn start(set: WatchSet, changes: mpsc::UnboundedSender<()>) -> notify::Result<ConfigWatcher> {
        let shared_set = std::sync::Arc::new(std::sync::RwLock::new(set.clone()));
        let filter = shared_set.clone();
        let lost = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lost_seen = lost.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) => {
                let set = filter.read().unwrap_or_else(|poisoned| poisoned.into_inner());
                if matches!(event.kind, EventKind::Remove(_) | EventKind::Modify(notify::event::ModifyKind::Name(_))) {
                    let gone = event.paths.iter().filter(|p| set.dirs().any(|dir| dir == p.as_path()));
                    lost_seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).extend(gone.cloned());
                }
                if wants_reload(&event, &set) {
                    let _ = changes.send(());
                }
            }
            Err(e) => {
                // The backend could not deliver something: reload rather than trust what it missed.
                tracing::warn!(error = %e, "config watcher error; reloading to be sure");
                let _ = changes.send(());
            }
        })?;
        let mut this = ConfigWatcher { watcher, watching: Vec::new(), set: shared_set, lost };
        this.update(set);
        Ok(this)
    }

    /// Watch a new set of directories (after a reload changed `apps_dir`); nothing changes
    /// (and no event is missed) when the set is the one watched.
    pub fn update(&mut self, set: WatchSet) {
        if *self.set.read().unwrap_or_else(|poisoned| poisoned.into_inner()) == set && !self.watching.is_empty() {
            return;
        }
        for (dir, identity) in self.watching.drain(..) {
            if identity.is_some() {
                let _ = self.watcher.unwatch(&dir);
            }
        }
        for dir in set.dirs() {
            let identity = self.watch(dir);
            self.watching.push((dir.to_path_buf(), identity));
        }
        *self.set.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = set;
    }

    fn watch(&mut self, dir: &Path) -> Option<(u64, u64)> {
        let identity = dir_identity(dir)?;
        match self.watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => Some(identity),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory");
                None
            }
        }
    }

    /// Re-attach the watch of every directory that was deleted, re-created or could not be
    /// watched before. Returns whether any watch was re-attached (its directory may hold
    /// changes no event reported).
    pub fn repair(&mut self) -> bool {
        let lost = std::mem::take(&mut *self.lost.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        let mut repaired = false;
        for i in 0..self.watching.len() {
            let (dir, identity) = self.watching[i].clone();
            let now = dir_identity(&dir);
            if now.is_none() {
                if lost.contains(&dir) {
                    self.watching[i].1 = None; // gone; watched again once it is back
                }
                continue;
            }
            if now == identity && !lost.contains(&dir) {
                continue; // still the directory we watch
            }
            if identity.is_some() {
                let _ = self.watcher.unwatch(&dir);
            }
            let attached = self.watch(&dir);
            if attached.is_some() {
                tracing::info!(dir = %dir.display(), "watching the re-created directory");
                repaired = true;
            }
            self.watching[i].1 = attached;
        }
        repaired
    }

    /// Whether every directory of the set is being watched.
    pub fn watching_all(&self) -> bool {
        let lost = self.lost.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.watching
            .iter()
            .all(|(dir, identity)| identity.is_some() && dir_identity(dir) == *identity && !lost.contains(dir))
    }
}

/// Collapse bursts: forward one `()` once no event has arrived for [`SETTLE`].
pub fn settle(mut raw: mpsc::UnboundedReceiver<()>) -> mpsc::UnboundedReceiver<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while raw.recv().await.is_some() {
            loop {
                match tokio::time::timeout(SETTLE, raw.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if tx.send(()).is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_config_events_concern_the_watcher() {
        let set = WatchSet::new(Path::new("/etc/gw/gateway.toml"), Some(Path::new("/etc/gw/apps")));
        assert!(set.concerns(Path::new("/etc/gw/gateway.toml")));
        assert!(set.concerns(Path::new("/etc/gw/..data")));
        assert!(set.concerns(Path::new("/etc/gw/..2026_11_21_05_00_00.123")));
        assert!(set.concerns(Path::new("/etc/gw/apps/shop.toml")));
        assert!(set.concerns(Path::new("/etc/gw/apps")), "apps_dir deleted or re-created");
        assert!(!set.concerns(Path::new("/etc/gw/.gateway.toml.swp")));
        assert!(!set.concerns(Path::new("/etc/gw/notes.txt")));
        assert!(!set.concerns(Path::new("/etc/gw/apps/readme.md")));
        assert!(!set.concerns(Path::new("/elsewhere/gateway.toml")));
    }

    #[test]
    fn lost_events_ask_for_a_reload() {
        use notify::event::{Flag, ModifyKind};
        let set = WatchSet::new(Path::new("/etc/gw/gateway.toml"), None);
        let overflow = notify::Event::new(EventKind::Other).set_flag(Flag::Rescan);
        assert!(wants_reload(&overflow, &set), "a queue overflow");
        assert!(wants_reload(&notify::Event::new(EventKind::Any), &set), "an event naming no path");
        let unrelated = notify::Event::new(EventKind::Modify(ModifyKind::Any)).add_path("/etc/gw/notes.txt".into());
        assert!(!wants_reload(&unrelated, &set));
        let read = notify::Event::new(EventKind::Access(notify::event::AccessKind::Any))
            .add_path("/etc/gw/gateway.toml".into());
        assert!(!wants_reload(&read, &set));
    }

    #[test]
    fn a_re_created_directory_is_watched_again() {
        let dir = tempfile::tempdir().unwrap();
        let apps = dir.path().join("apps");
        std::fs::create_dir(&apps).unwrap();
        let set = WatchSet::new(&dir.path().join("gateway.toml"), Some(&apps));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut watcher = ConfigWatcher::start(set, tx).unwrap();
        assert!(watcher.watching_all());
        std::fs::remove_dir(&apps).unwrap();
        std::fs::create_dir(&apps).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while watcher.watching_all() {
            assert!(std::time::Instant::now() < deadline, "the death of the old directory's watch went unnoticed");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The reloader calls repair every second; the backend may still be dropping the old
        // watch on the first call (its removal races the new watch), so call it as it would.
        let mut repaired = false;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !(repaired && watcher.watching_all()) {
            assert!(std::time::Instant::now() < deadline, "the re-created directory is not watched");
            repaired |= watcher.repair();
            std::thread::sleep(Duration::from_millis(10));
        }
        while rx.try_recv().is_ok() {}
        std::thread::sleep(Duration::from_millis(50));
        std::fs::write(apps.join("new.toml"), "").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while rx.try_recv().is_err() {
            assert!(std::time::Instant::now() < deadline, "no event from the re-created directory");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
