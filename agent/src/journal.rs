//! The counter journal: every rate-limit admission and release of a policy file, appended to
//! `<state_dir>/counters/<file id>.jsonl` before the call is forwarded, so that an agent
//! restarted after any stop — kill -9 and OOM kills included — rebuilds each window instead of
//! handing back what was spent.
//!
//! A line is `{"t":UNIX_MS,"n":SERIAL,"c":COUNTER,"s":SCOPE,"k":KEY,"a":AMOUNT}` (an
//! admission) or `{"r":SERIAL}` (its release). At start the file is read back, each admission
//! not released is logged again with its age, and the file is replaced (atomically, by rename)
//! by one holding only those; it is compacted the same way once it grows past
//! [`COMPACT_AFTER`] lines. What can be lost: lines the kernel had not written to disk when the
//! machine itself went down (the file is not synced per call), and admissions older than the
//! longest window, which count for nothing anyway.

use std::{
    fs,
    io::{BufRead, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex, PoisonError,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::policy::{Journal, Restored};

/// Lines after which the journal asks to be compacted.
pub const COMPACT_AFTER: u64 = 100_000;

/// One policy file's journal.
#[derive(Debug)]
pub struct FileJournal {
    path: PathBuf,
    file: Mutex<fs::File>,
    lines: AtomicU64,
    /// The first write error is logged; later ones are not (they would repeat per call).
    failed: AtomicBool,
}

impl FileJournal {
    /// The journal of the policy file `policy` in `dir`: what an earlier process wrote there,
    /// as admissions to log again, and a journal writing a new file that [`FileJournal::commit`]
    /// puts in place of the old one once they are logged (until then the old one stays).
    pub fn open(dir: &Path, policy: &Path) -> Result<(FileJournal, Vec<Restored>)> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} 0700", dir.display()))?;
        let id = crate::policy::sha256_hex(policy.as_os_str().as_encoded_bytes());
        let path = dir.join(format!("{}.jsonl", &id[..16]));
        let restored = match fs::File::open(&path) {
            Ok(f) => read(std::io::BufReader::new(f), SystemTime::now()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let file = create(&tmp_path(&path))?;
        Ok((
            FileJournal {
                path,
                file: Mutex::new(file),
                lines: AtomicU64::new(0),
                failed: AtomicBool::new(false),
            },
            restored,
        ))
    }

    /// Put the new file in place of the old one.
    pub fn commit(&self) -> Result<()> {
        let file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        file.sync_all()
            .with_context(|| format!("syncing {}", tmp_path(&self.path).display()))?;
        fs::rename(tmp_path(&self.path), &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))
    }

    /// Whether the file has grown enough to be compacted.
    pub fn wants_compaction(&self) -> bool {
        self.lines.load(Ordering::Relaxed) > COMPACT_AFTER
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&self, line: &Value) {
        let mut text = line.to_string();
        text.push('\n');
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = file.write_all(text.as_bytes()) {
            if !self.failed.swap(true, Ordering::Relaxed) {
                tracing::error!(file = %self.path.display(), error = %e, "cannot write the counter journal: a restart would forget what was spent since");
            }
            return;
        }
        self.lines.fetch_add(1, Ordering::Relaxed);
    }
}

impl Journal for FileJournal {
    fn admitted(&self, counter: &str, scope: &str, key: &str, amount: f64, serial: u64) {
        self.append(&json!({
            "t": unix_ms(SystemTime::now()),
            "n": serial,
            "c": counter,
            "s": scope,
            "k": key,
            "a": amount,
        }));
    }

    fn released(&self, serial: u64) {
        self.append(&json!({ "r": serial }));
    }

    fn rewrite(&self, live: &[(u64, Restored)]) {
        let now = SystemTime::now();
        let written = (|| -> Result<fs::File> {
            let tmp = tmp_path(&self.path);
            let mut f = create(&tmp)?;
            let mut text = String::new();
            for (serial, r) in live {
                let at = now.checked_sub(r.age).unwrap_or(now);
                text.push_str(
                    &json!({"t": unix_ms(at), "n": serial, "c": r.counter, "s": r.scope, "k": r.key, "a": r.amount})
                        .to_string(),
                );
                text.push('\n');
            }
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            Ok(f)
        })();
        match written {
            Ok(f) => {
                *self.file.lock().unwrap_or_else(PoisonError::into_inner) = f;
                self.lines.store(live.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %format!("{e:#}"), "cannot compact the counter journal; it keeps growing");
            }
        }
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".new");
    PathBuf::from(p)
}

fn create(path: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The admissions of a journal that were not released, with their ages at `now`. Lines that
/// cannot be read (a line cut short by a crash) are skipped.
fn read(r: impl BufRead, now: SystemTime) -> Vec<Restored> {
    let mut admitted: Vec<(u64, Restored)> = Vec::new();
    let mut released = std::collections::HashSet::new();
    for line in r.lines().map_while(Result::ok) {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(serial) = v.get("r").and_then(Value::as_u64) {
            released.insert(serial);
            continue;
        }
        let (Some(t), Some(serial), Some(c), Some(s), Some(k), Some(a)) = (
            v.get("t").and_then(Value::as_u64),
            v.get("n").and_then(Value::as_u64),
            v.get("c").and_then(Value::as_str),
            v.get("s").and_then(Value::as_str),
            v.get("k").and_then(Value::as_str),
            v.get("a").and_then(Value::as_f64),
        ) else {
            continue;
        };
        let at = UNIX_EPOCH + Duration::from_millis(t);
        admitted.push((
            serial,
            Restored {
                counter: c.to_owned(),
                scope: s.to_owned(),
                key: k.to_owned(),
                amount: a,
                // A time ahead of now (the clock was set back) counts as now: never less.
                age: now.duration_since(at).unwrap_or(Duration::ZERO),
            },
        ));
    }
    admitted
        .into_iter()
        .filter(|(serial, _)| !released.contains(serial))
        .map(|(_, r)| r)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admissions_not_released_are_read_back_with_their_age() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let text = concat!(
            r#"{"t":990000,"n":0,"c":"scan","s":"grant","k":"pod:a","a":1.0}"#,
            "\n",
            r#"{"t":995000,"n":1,"c":"scan","s":"grant","k":"pod:a","a":1.0}"#,
            "\n",
            r#"{"r":0}"#,
            "\n",
            r#"{"t":1005000,"n":2,"c":"spend","s":"process","k":"pid:7","a":2.5}"#,
            "\n",
            r#"{"t":999000,"n":3,"c":"sc"#,
        );
        let got = read(std::io::Cursor::new(text), now);
        assert_eq!(
            got,
            [
                Restored {
                    counter: "scan".into(),
                    scope: "grant".into(),
                    key: "pod:a".into(),
                    amount: 1.0,
                    age: Duration::from_secs(5),
                },
                Restored {
                    counter: "spend".into(),
                    scope: "process".into(),
                    key: "pid:7".into(),
                    amount: 2.5,
                    age: Duration::ZERO,
                },
            ]
        );
    }

    #[test]
    fn a_journal_is_replaced_on_commit_and_compacted_by_rewrite() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mcpwarden-journal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let policy = Path::new("/etc/mcpwarden/policy.json");
        let (j, restored) = FileJournal::open(&dir, policy)?;
        assert!(restored.is_empty());
        j.admitted("scan", "grant", "pod:a", 1.0, 0);
        j.admitted("scan", "grant", "pod:a", 1.0, 1);
        j.released(0);
        j.commit()?;
        let (j2, restored) = FileJournal::open(&dir, policy)?;
        assert_eq!(restored.len(), 1, "{restored:?}");
        assert_eq!(
            fs::read_to_string(j.path())?.lines().count(),
            3,
            "the old file stays until commit"
        );
        j2.rewrite(&[(9, restored[0].clone())]);
        let text = fs::read_to_string(j2.path())?;
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains(r#""n":9"#), "{text}");
        let mode = fs::metadata(j2.path())?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
