//! A state kept as a JSON snapshot plus a log of changes, so that a save costs what changed,
//! not the size of the state (the lifecycle's books and the store's upload records grow with
//! the number of snapshots: 200,000 snapshots make megabytes).
//!
//! `meta/NAME.json` is the whole state as of its `epoch` (written atomically and durably);
//! `meta/NAME.log` holds one line per save since, `{"epoch": E, "changes": [...]}`, appended
//! (and synced, when asked). Loading reads the snapshot, then applies the log's lines while
//! their epoch is the snapshot's, stopping at the first line that does not parse (a torn
//! write). When the log outgrows the snapshot, the owner writes a new snapshot of the next
//! epoch and the log is emptied; a crash between the two leaves lines of the old epoch, which
//! are ignored. A write that fails makes the next save a compaction (a part of the failed
//! line may be in the file, and lines after it would not be read).

use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The log is folded into a new snapshot once it is this much larger than the snapshot...
const COMPACT_RATIO: u64 = 2;
/// ... and at least this large.
const COMPACT_MIN: u64 = 1 << 20;

pub struct StateLog<C> {
    json: PathBuf,
    log: PathBuf,
    inner: parking_lot::Mutex<Inner>,
    _change: PhantomData<fn(C)>,
}

struct Inner {
    file: Option<std::fs::File>,
    epoch: u64,
    bytes: u64,
    snapshot_bytes: u64,
    broken: bool,
}

/// The snapshot's form: the state's own fields plus the epoch.
#[derive(Serialize)]
struct Snapshot<'a, T> {
    epoch: u64,
    #[serde(flatten)]
    state: &'a T,
}

#[derive(Deserialize)]
struct Loaded<T> {
    #[serde(default)]
    epoch: u64,
    #[serde(flatten)]
    state: T,
}

/// A log line: written with a slice of changes, read as a `Vec`.
#[derive(Serialize, Deserialize)]
struct Line<L> {
    epoch: u64,
    changes: L,
}

impl<C: Serialize + DeserializeOwned> StateLog<C> {
    /// Opens `DIR/meta/NAME.json` and its log, and reads the state (`apply` applies one change).
    /// Errors are sentences naming the file.
    pub fn open<T: DeserializeOwned + Default>(
        dir: &Path,
        name: &str,
        mut apply: impl FnMut(&mut T, C),
    ) -> Result<(StateLog<C>, T), String> {
        let json = dir.join("meta").join(format!("{name}.json"));
        let log = dir.join("meta").join(format!("{name}.log"));
        let (epoch, mut state) = match std::fs::read(&json) {
            Ok(b) => {
                let l: Loaded<T> =
                    serde_json::from_slice(&b).map_err(|e| format!("{} is damaged ({e})", json.display()))?;
                (l.epoch, l.state)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, T::default()),
            Err(e) => return Err(format!("cannot read {}: {e}", json.display())),
        };
        let lines = match std::fs::read(&log) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", log.display())),
        };
        for line in lines.split(|b| *b == b'\n') {
            match serde_json::from_slice::<Line<Vec<C>>>(line) {
                Ok(l) if l.epoch == epoch => l.changes.into_iter().for_each(|c| apply(&mut state, c)),
                _ => break,
            }
        }
        let inner = Inner { file: None, epoch, bytes: lines.len() as u64, snapshot_bytes: 0, broken: false };
        Ok((StateLog { json, log, inner: parking_lot::Mutex::new(inner), _change: PhantomData }, state))
    }

    /// Appends one save's changes (synced with `sync`). True when the log has outgrown the
    /// snapshot (or a write failed before): the owner should [`StateLog::compact`] now.
    pub fn append(&self, changes: &[C], sync: bool) -> Result<bool, String> {
        let mut inner = self.inner.lock();
        if changes.is_empty() || inner.broken {
            return Ok(inner.broken);
        }
        let mut line = serde_json::to_vec(&Line { epoch: inner.epoch, changes }).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let io = |e: std::io::Error| format!("cannot write {}: {e}", self.log.display());
        if inner.file.is_none() {
            inner.file = Some(crate::fsutil::open_append(&self.log).map_err(io)?);
            // The file may be new: its directory entry must survive too.
            crate::fsutil::sync_parent(&self.log).map_err(io)?;
        }
        let file = inner.file.as_mut().expect("opened above");
        let written = file.write_all(&line).and_then(|()| if sync { file.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            inner.broken = true;
            return Err(io(e));
        }
        inner.bytes += line.len() as u64;
        Ok(inner.bytes > COMPACT_MIN.max(COMPACT_RATIO * inner.snapshot_bytes))
    }

    /// Writes `state` (which must hold every change appended so far) as the snapshot of the
    /// next epoch, durably, and empties the log.
    pub fn compact<T: Serialize>(&self, state: &T) -> Result<(), String> {
        let mut inner = self.inner.lock();
        let epoch = inner.epoch + 1;
        let bytes = serde_json::to_vec(&Snapshot { epoch, state }).map_err(|e| e.to_string())?;
        crate::fsutil::replace_file(&self.json, &bytes, true)
            .map_err(|e| format!("cannot write {}: {e}", self.json.display()))?;
        inner.epoch = epoch;
        // The old lines are of the old epoch now (ignored); emptied, durably, so that lines of
        // the new epoch never follow them.
        let emptied = crate::fsutil::open_append(&self.log).and_then(|f| {
            f.set_len(0)?;
            f.sync_all()
        });
        emptied.map_err(|e| format!("cannot empty {}: {e}", self.log.display()))?;
        inner.file = None;
        inner.bytes = 0;
        inner.snapshot_bytes = bytes.len() as u64;
        inner.broken = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    type State = BTreeMap<String, u64>;

    fn apply(s: &mut State, (k, v): (String, Option<u64>)) {
        match v {
            Some(v) => s.insert(k, v),
            None => s.remove(&k),
        };
    }

    fn open(dir: &Path) -> (StateLog<(String, Option<u64>)>, State) {
        StateLog::open(dir, "t", apply).unwrap()
    }

    #[test]
    fn changes_replay_torn_lines_stop_and_old_epochs_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("meta")).unwrap();
        let (log, mut state) = open(dir.path());
        log.compact(&state).unwrap();
        for n in 0..100u64 {
            let change = (format!("k{}", n % 7), if n % 5 == 4 { None } else { Some(n) });
            apply(&mut state, change.clone());
            assert!(!log.append(&[change], n % 2 == 0).unwrap());
        }
        assert_eq!(open(dir.path()).1, state, "replayed");
        let lines = std::fs::read_to_string(dir.path().join("meta/t.log")).unwrap();
        assert_eq!(lines.lines().count(), 100, "one line per save");

        // A torn last line, and a line after it that must not be read.
        let mut f = std::fs::OpenOptions::new().append(true).open(dir.path().join("meta/t.log")).unwrap();
        f.write_all(b"{\"epoch\":1,\"changes\":[[\"k0\",").unwrap();
        f.write_all(b"\n{\"epoch\":1,\"changes\":[[\"zz\",1]]}\n").unwrap();
        assert_eq!(open(dir.path()).1, state);

        // After a compaction, the old epoch's lines are ignored (a crash before the log was
        // emptied) and new ones apply.
        let old = std::fs::read(dir.path().join("meta/t.log")).unwrap();
        log.compact(&state).unwrap();
        std::fs::write(dir.path().join("meta/t.log"), &old).unwrap();
        let (log, read) = open(dir.path());
        assert_eq!(read, state);
        std::fs::write(dir.path().join("meta/t.log"), b"").unwrap();
        log.append(&[("new".into(), Some(1))], true).unwrap();
        assert_eq!(open(dir.path()).1.get("new"), Some(&1));
    }

    #[test]
    fn a_snapshot_written_before_the_log_existed_reads_as_epoch_zero() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("meta")).unwrap();
        std::fs::write(dir.path().join("meta/t.json"), br#"{"a": 1}"#).unwrap();
        std::fs::write(dir.path().join("meta/t.log"), b"{\"epoch\":0,\"changes\":[[\"b\",2]]}\n").unwrap();
        let (_, state) = open(dir.path());
        assert_eq!(state, State::from([("a".into(), 1), ("b".into(), 2)]));
    }
}
