//! Watching the config for changes.
//!
//! Editors save by writing a new file and renaming it over the old one, and Kubernetes
//! updates a mounted ConfigMap by swapping a `..data` symlink; either way the file that was
//! watched is gone. So the watcher watches the *directories* (the config file's, and
//! `apps_dir`), keeps the events that concern the config (its name, a `*.toml` in
//! `apps_dir`, or a Kubernetes `..` entry), lets a burst of them settle, and then asks for one
//! reload. After every reload the set of watched directories is refreshed, because
//! `apps_dir` may have changed or been re-created.

use std::ffi::OsString;
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

/// A running directory watcher that sends `()` when the config may have changed. Dropping it
/// stops watching.
pub struct ConfigWatcher {
    watcher: RecommendedWatcher,
    watching: Vec<PathBuf>,
    set: std::sync::Arc<std::sync::RwLock<WatchSet>>,
}

impl ConfigWatcher {
    /// Watch `set`; settled change notifications arrive on the returned receiver.
    pub fn start(set: WatchSet) -> notify::Result<(ConfigWatcher, mpsc::UnboundedReceiver<()>)> {
        let (raw_tx, raw_rx) = mpsc::unbounded_channel::<()>();
        let shared_set = std::sync::Arc::new(std::sync::RwLock::new(set.clone()));
        let filter = shared_set.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) => {
                if matches!(event.kind, EventKind::Access(_)) {
                    return;
                }
                let set = filter.read().unwrap_or_else(|poisoned| poisoned.into_inner());
                if event.paths.iter().any(|p| set.concerns(p)) {
                    let _ = raw_tx.send(());
                }
            }
            Err(e) => tracing::warn!(error = %e, "config watcher error"),
        })?;
        let mut this = ConfigWatcher { watcher, watching: Vec::new(), set: shared_set };
        this.update(set);
        Ok((this, settle(raw_rx)))
    }

    /// Watch a new set of directories (after a reload changed `apps_dir`, or to re-attach a
    /// directory that was deleted and re-created).
    pub fn update(&mut self, set: WatchSet) {
        for dir in self.watching.drain(..) {
            let _ = self.watcher.unwatch(&dir);
        }
        for dir in set.dirs() {
            match self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => self.watching.push(dir.to_path_buf()),
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory"),
            }
        }
        *self.set.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = set;
    }
}

/// Collapse bursts: forward one `()` once no event has arrived for [`SETTLE`].
fn settle(mut raw: mpsc::UnboundedReceiver<()>) -> mpsc::UnboundedReceiver<()> {
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
}
