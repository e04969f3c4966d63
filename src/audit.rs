//! The record of every change made through the management API: who, when, from where, what
//! the app was before and after, and for refused writes why. The file store keeps it as JSON
//! lines in one append-only file beside `apps_dir` (`apps.audit.jsonl` for `apps/`), each line
//! written whole and synced before the change is made; at [`ROTATE_AT`] the file moves to the
//! next free `….N` (1, 2, …: none is ever deleted) and a new one begins. An app's history is
//! read back from all of them. Tokens are never recorded.

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::AppDoc;

/// The size at which the audit file is rotated.
pub const ROTATE_AT: u64 = 16 * 1024 * 1024;

/// One change, or one refused attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub time: String,
    pub app: String,
    /// The revision the change made (for a refused attempt, the revision it found).
    pub revision: Option<u64>,
    pub user: String,
    pub client: String,
    /// `create`, `replace`, `delete`, `action`, `add`, `edit`, `remove`, `rollback`.
    pub change: String,
    /// `applied`, `dry_run`, `precondition_failed`, `invalid`, `conflict`.
    pub outcome: String,
    pub before: Option<AppDoc>,
    pub after: Option<AppDoc>,
}

impl Record {
    pub fn now() -> String {
        humantime::format_rfc3339_millis(SystemTime::now()).to_string()
    }
}

/// The audit file of a store.
pub struct AuditLog {
    path: PathBuf,
    /// Appends one at a time, so lines never interleave.
    append: Mutex<()>,
    /// Every app's history as last read, kept up to date with this log's own appends and read
    /// again whenever the file is not the one it was read from (another writer appended, or it
    /// was rotated): an import of many apps reads the log once, not once an app.
    index: Mutex<Option<Index>>,
}

/// The applied changes of each app (oldest first), and which file, at what length, they are of.
struct Index {
    file: FileId,
    by_app: HashMap<String, Vec<Record>>,
    /// Each app's highest revision ever given to a change, made or not: never given again.
    highest: HashMap<String, u64>,
}

/// A file as far as appends are concerned: its inode and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    inode: u64,
    len: u64,
}

impl FileId {
    fn of(path: &Path) -> std::io::Result<Option<FileId>> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(path) {
            Ok(meta) => Ok(Some(FileId { inode: meta.ino(), len: meta.len() })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Index {
    /// Take `record` into the history of its app: an applied change is added; a failure to
    /// make it (the app's next record, with the same revision) takes it out again.
    fn take(&mut self, record: Record) {
        if matches!(record.outcome.as_str(), "applied" | "write_failed" | "reload_failed")
            && let Some(revision) = record.revision
        {
            let highest = self.highest.entry(record.app.clone()).or_default();
            *highest = (*highest).max(revision);
        }
        let records = self.by_app.entry(record.app.clone()).or_default();
        match record.outcome.as_str() {
            "applied" => records.push(record),
            // Recorded only after an `applied` line of the same change (a refusal, such as a
            // `conflict`, is recorded without one, and takes nothing out).
            "write_failed" | "reload_failed" if records.last().is_some_and(|last| last.revision == record.revision) => {
                records.pop();
            }
            _ => {}
        }
    }
}

impl AuditLog {
    /// The audit log beside `apps_dir`.
    pub fn beside(apps_dir: &Path) -> AuditLog {
        let name = apps_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "apps".into());
        let path = apps_dir.with_file_name(format!("{name}.audit.jsonl"));
        AuditLog { path, append: Mutex::new(()), index: Mutex::new(None) }
    }

    /// A log of its own at `path` (the consent history uses one).
    pub fn at(path: PathBuf) -> AuditLog {
        AuditLog { path, append: Mutex::new(()), index: Mutex::new(None) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `n`th rotated file.
    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// The rotated files, oldest first.
    fn rotations(&self) -> Vec<PathBuf> {
        (1..).map(|n| self.rotated(n)).take_while(|path| path.exists()).collect()
    }

    /// An exclusive lock (flock) on `<log>.lock`, held until dropped.
    fn lock_file(&self) -> std::io::Result<std::fs::File> {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".lock");
        crate::store::lock_file(Path::new(&name))
    }

    fn sync_dir(&self) -> std::io::Result<()> {
        let dir = self.path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    }

    /// Append `record` and sync it to disk.
    pub fn append(&self, record: &Record) -> std::io::Result<()> {
        let (before, written) = self.append_line(record)?;
        let mut index = self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match index.as_mut() {
            // The index was of the file as it was just before this line: it stays current.
            Some(current) if before == Some(current.file) => {
                current.take(record.clone());
                current.file.len += written;
            }
            _ => *index = None,
        }
        Ok(())
    }

    /// Append any record as one JSON line, and sync it to disk (a log of other records than
    /// app changes: its history is read with [`AuditLog::read_all`]).
    pub fn append_value(&self, record: &impl Serialize) -> std::io::Result<()> {
        self.append_line(record)?;
        *self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        Ok(())
    }

    /// Append `record` as one JSON line and sync it: the file as it was just before, and the
    /// bytes written.
    fn append_line(&self, record: &impl Serialize) -> std::io::Result<(Option<FileId>, u64)> {
        let _one_at_a_time = self.append.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Other processes (an import, a replica on a shared volume) append too: one at a time,
        // so that two never rotate to the same number.
        let _one_process_at_a_time = self.lock_file()?;
        if std::fs::metadata(&self.path).is_ok_and(|meta| meta.len() >= ROTATE_AT) {
            let next = u32::try_from(self.rotations().len()).unwrap_or(u32::MAX - 1) + 1;
            let rotated = self.rotated(next);
            if rotated.exists() {
                return Err(std::io::Error::other(format!("{} exists: not rotating over it", rotated.display())));
            }
            std::fs::rename(&self.path, rotated)?;
        }
        let new_file = !self.path.exists();
        let before = FileId::of(&self.path)?;
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut file = std::fs::OpenOptions::new().create(true).read(true).append(true).open(&self.path)?;
        if !ends_a_line(&mut file)? {
            line.insert(0, b'\n'); // after a line cut short by a crash: never glue onto it
        }
        file.write_all(&line)?;
        file.sync_data()?;
        if new_file {
            self.sync_dir()?; // a new file (after a rotation, too) is a change of the directory
        }
        Ok((before, line.len() as u64))
    }

    /// The applied changes of `app`, newest first. A change is recorded `applied` before it is
    /// made; one that then failed (the app's next record is `conflict`, `write_failed` or
    /// `reload_failed` with the same revision) is left out.
    pub fn history(&self, app: &str) -> std::io::Result<Vec<Record>> {
        let mut records = self.with_index(|index| index.by_app.get(app).cloned().unwrap_or_default())?;
        records.reverse();
        Ok(records)
    }

    /// The highest revision `app` was ever given, by a change made or one that failed.
    pub fn highest_revision(&self, app: &str) -> std::io::Result<Option<u64>> {
        self.with_index(|index| index.highest.get(app).copied())
    }

    /// `f` of the index, read again first if the file is not the one it was read from.
    fn with_index<T>(&self, f: impl FnOnce(&Index) -> T) -> std::io::Result<T> {
        let mut index = self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = FileId::of(&self.path)?.unwrap_or(FileId { inode: 0, len: 0 });
        let current = match index.take() {
            Some(current) if current.file == now => current,
            _ => self.read_index(now)?,
        };
        Ok(f(index.insert(current)))
    }

    /// Read every record of every file, oldest first.
    fn read_index(&self, file: FileId) -> std::io::Result<Index> {
        let mut index = Index { file, by_app: HashMap::new(), highest: HashMap::new() };
        for path in self.rotations().into_iter().chain([self.path.clone()]) {
            let opened = match std::fs::File::open(&path) {
                Ok(opened) => opened,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            // Only what was there when `file` was taken: a line appended since is read next time.
            let limit = if path == self.path { file.len } else { u64::MAX };
            for line in std::io::BufReader::new(opened.take(limit)).lines() {
                // A line cut short by a crash is skipped, not fatal.
                if let Ok(record) = serde_json::from_str::<Record>(&line?) {
                    index.take(record);
                }
            }
        }
        Ok(index)
    }

    /// Every record of the log, the rotated files' first, oldest first. A line cut short by a
    /// crash (or of another shape) is skipped, not fatal.
    pub fn read_all<T: DeserializeOwned>(&self) -> std::io::Result<Vec<T>> {
        let mut records = Vec::new();
        for path in self.rotations().into_iter().chain([self.path.clone()]) {
            let file = match std::fs::File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for line in std::io::BufReader::new(file).lines() {
                if let Ok(record) = serde_json::from_str::<T>(&line?) {
                    records.push(record);
                }
            }
        }
        Ok(records)
    }
}

/// Whether `file` is empty or ends with a newline.
fn ends_a_line(file: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if file.metadata()?.len() == 0 {
        return Ok(true);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(app: &str, revision: u64, outcome: &str) -> Record {
        Record {
            time: Record::now(),
            app: app.into(),
            revision: Some(revision),
            user: "ed".into(),
            client: "127.0.0.1:1".into(),
            change: "replace".into(),
            outcome: outcome.into(),
            before: None,
            after: None,
        }
    }

    #[test]
    fn history_is_an_apps_applied_changes_newest_first_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::beside(&dir.path().join("apps"));
        assert_eq!(log.path(), dir.path().join("apps.audit.jsonl"));
        log.append(&record("shop", 1, "applied")).unwrap();
        log.append(&record("other", 1, "applied")).unwrap();
        log.append(&record("shop", 1, "precondition_failed")).unwrap();
        std::fs::rename(log.path(), log.rotated(1)).unwrap(); // as a rotation leaves it
        log.append(&record("shop", 2, "applied")).unwrap();
        std::fs::OpenOptions::new().append(true).open(log.path()).unwrap().write_all(b"{\"time\":\"cut sh").unwrap();
        log.append(&record("shop", 3, "applied")).unwrap(); // after the cut line, on a line of its own
        // revision 4 failed to be put in force: out of the history, its number burnt
        log.append(&record("shop", 4, "applied")).unwrap();
        log.append(&record("other", 4, "applied")).unwrap();
        log.append(&record("shop", 4, "reload_failed")).unwrap();
        // a refusal (a conflict found before anything was recorded) takes nothing out
        log.append(&record("shop", 3, "conflict")).unwrap();
        let revisions: Vec<Option<u64>> = log.history("shop").unwrap().iter().map(|r| r.revision).collect();
        assert_eq!(revisions, [Some(3), Some(2), Some(1)]);
        assert_eq!(log.highest_revision("shop").unwrap(), Some(4));
        let fresh = AuditLog::beside(&dir.path().join("apps")); // read from the files alone
        assert_eq!(fresh.history("shop").unwrap().len(), 3);
        assert_eq!(fresh.highest_revision("shop").unwrap(), Some(4));
    }
}
