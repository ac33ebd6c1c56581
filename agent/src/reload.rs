//! Loading the policy files, and reloading them and the config while the agent runs.
//!
//! Every policy file has one slot holding its current [`Engine`]; the [`Routing`] (each
//! server's default file and the bindings) points at slots and is itself swapped whole when the
//! config changes. Readers (the interceptor) never take a lock: they load an `Arc`.
//!
//! Reloads happen on a thread of their own, woken by file-system events in the directories of
//! the watched files (editors and Kubernetes ConfigMaps replace files by renaming, so whole
//! directories are watched, not inodes) and by SIGHUP. A file whose bytes did not change is not
//! parsed again. A file that fails to load leaves the previous policy in force; the error is
//! logged and audited with file, line and column. Counters survive when their name and scope
//! do ([`Engine::reloaded`]).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;

use crate::audit::{AuditLog, Event, PolicyRef, Record};
use crate::config::{Config, Flags};
use crate::journal::FileJournal;
use crate::policy::bindings::{Binding, EngineSlot, Routing};
use crate::policy::{sha256_hex, Engine, Policy, PolicyError};

/// How often the reload thread looks whether a counter journal wants compacting.
const COMPACT_CHECK: Duration = Duration::from_secs(30);

/// Events closer together than this are handled as one reload (an editor's save is several).
const SETTLE: Duration = Duration::from_millis(200);

/// The policies in force, and how to reload them.
pub struct Policies {
    routing: Arc<ArcSwap<Routing>>,
    /// Every policy file loaded so far, by path as configured.
    slots: Mutex<HashMap<PathBuf, Arc<EngineSlot>>>,
    audit: Arc<AuditLog>,
    /// What the running agent was started with: servers cannot change without a restart.
    servers: Vec<(String, String)>,
    /// Where each policy file's counter journal lives (`<state_dir>/counters`).
    journal_dir: PathBuf,
    journals: Mutex<Vec<(Arc<EngineSlot>, Arc<FileJournal>)>>,
    /// When each file's version in force took effect (RFC 3339), for `mcpwarden status`.
    loaded_at: Mutex<HashMap<PathBuf, String>>,
    /// The errors of the reload in progress (`file:line:col: message`), for the admin API.
    errors: Mutex<Vec<String>>,
    /// Told which tool names the policies list after each reload (the `tool` label).
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
}

impl Policies {
    /// Loads every policy file the config names. Any error stops the start.
    pub fn load(config: &Config, audit: Arc<AuditLog>) -> Result<Policies> {
        let policies = Policies {
            routing: Arc::new(ArcSwap::from_pointee(Routing {
                defaults: Vec::new(),
                bindings: Vec::new(),
                identity_wait: config.identity_wait,
            })),
            slots: Mutex::default(),
            audit,
            servers: server_names(config),
            journal_dir: config.ca.state_dir.join("counters"),
            journals: Mutex::default(),
            loaded_at: Mutex::default(),
            errors: Mutex::default(),
            metrics: std::sync::OnceLock::new(),
        };
        let routing = policies.routing_for(config)?;
        policies.routing.store(Arc::new(routing));
        for slot in policies.slots().values() {
            for warning in slot.load().policy().warnings() {
                tracing::warn!(
                    file = slot.load().policy().source().file,
                    rule = warning.pointer,
                    "{}",
                    warning.message
                );
            }
        }
        Ok(policies)
    }

    /// What the interceptor reads.
    pub fn routing(&self) -> Arc<ArcSwap<Routing>> {
        self.routing.clone()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Arc<EngineSlot>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The slot of `path`, loading the file if it is new.
    fn slot(&self, path: &Path) -> Result<Arc<EngineSlot>, PolicyError> {
        if let Some(slot) = self.slots().get(path) {
            return Ok(slot.clone());
        }
        let policy = Policy::load(path)?;
        tracing::info!(file = %path.display(), sha256 = policy.source().sha256, "policy loaded");
        let engine = Engine::new(policy);
        self.stamp(path);
        let slot_journal = self.journal(&engine, path);
        let slot = Arc::new(ArcSwap::from_pointee(engine));
        if let Some(j) = slot_journal {
            self.journals
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((slot.clone(), j));
        }
        self.slots().insert(path.to_owned(), slot.clone());
        Ok(slot)
    }

    /// Give `engine` the journal of `path`, after logging again what an earlier process
    /// admitted and did not release. A journal that cannot be opened leaves the counters in
    /// memory only, and says so.
    fn journal(&self, engine: &Engine, path: &Path) -> Option<Arc<FileJournal>> {
        let opened = FileJournal::open(&self.journal_dir, path).and_then(|(j, restored)| {
            let j = Arc::new(j);
            engine.set_journal(j.clone());
            let n = engine.restore(&restored, std::time::Instant::now());
            j.commit()?;
            if n > 0 {
                tracing::info!(file = %path.display(), admissions = n, journal = %j.path().display(), "rate-limit counters restored from the journal");
            }
            Ok(j)
        });
        match opened {
            Ok(j) => Some(j),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %format!("{e:#}"), "cannot keep a counter journal: a restart would forget what this policy's limits counted");
                None
            }
        }
    }

    /// Compact the counter journals that grew past their bound.
    pub fn compact_journals(&self) {
        let journals = self
            .journals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for (slot, j) in journals {
            if j.wants_compaction() {
                slot.load().compact_journal(std::time::Instant::now());
            }
        }
    }

    /// The routing a config describes, loading policy files not loaded yet.
    fn routing_for(&self, config: &Config) -> Result<Routing, PolicyError> {
        let defaults = config
            .servers
            .iter()
            .map(|s| self.slot(&s.policy))
            .collect::<Result<Vec<_>, _>>()?;
        let bindings = config
            .bindings
            .iter()
            .map(|b| {
                Ok(Binding {
                    selector: b.selector.clone(),
                    policy: b.policy.clone(),
                    slot: self.slot(&b.policy)?,
                })
            })
            .collect::<Result<Vec<_>, PolicyError>>()?;
        Ok(Routing {
            defaults,
            bindings,
            identity_wait: config.identity_wait,
        })
    }

    /// Re-reads every policy file in use, and the config when there is one. Returns how many
    /// files changed (including the config's routing).
    pub fn reload(&self, flags: &Flags) -> usize {
        // The errors of this reload only (`reload_now` reports them).
        self.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        let mut changed = 0;
        if flags.config.is_some() {
            match Config::assemble(flags.clone()) {
                Ok(config) if server_names(&config) != self.servers => {
                    self.failed(
                        flags.config.as_deref(),
                        "the config's servers changed: a running agent keeps its servers; restart it to apply",
                    );
                }
                Ok(config) => match self.routing_for(&config) {
                    Ok(routing) => {
                        if !same_routing(&self.routing.load(), &routing) {
                            self.routing.store(Arc::new(routing));
                            changed += 1;
                            tracing::info!("config reloaded: bindings and server policies updated");
                            self.loaded_record(flags.config.as_deref(), None);
                        }
                    }
                    Err(e) => self.failed(Some(Path::new(&e.file)), &e.to_string()),
                },
                Err(e) => self.failed(flags.config.as_deref(), &format!("{e:#}")),
            }
        }
        // Files no longer referenced are forgotten; the others re-read.
        let in_use: Vec<PathBuf> = {
            let routing = self.routing.load();
            let mut paths: Vec<PathBuf> =
                routing.bindings.iter().map(|b| b.policy.clone()).collect();
            let slots = self.slots();
            for (path, slot) in slots.iter() {
                if routing.defaults.iter().any(|d| Arc::ptr_eq(d, slot)) {
                    paths.push(path.clone());
                }
            }
            paths
        };
        self.slots().retain(|path, _| in_use.contains(path));
        let slots: Vec<(PathBuf, Arc<EngineSlot>)> = self
            .slots()
            .iter()
            .map(|(p, s)| (p.clone(), s.clone()))
            .collect();
        for (path, slot) in slots {
            changed += usize::from(self.reload_file(&path, &slot));
        }
        if let Some(m) = self.metrics.get() {
            m.set_tools(&self.listed_tools());
        }
        changed
    }

    /// Re-reads one policy file; true when a new policy took effect.
    fn reload_file(&self, path: &Path, slot: &EngineSlot) -> bool {
        let current = slot.load_full();
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                self.failed(
                    Some(path),
                    &format!("{}:0:0: cannot read policy file: {e}", path.display()),
                );
                return false;
            }
        };
        if sha256_hex(&bytes) == current.policy().source().sha256 {
            return false;
        }
        match Policy::parse_bytes(&bytes, &path.display().to_string()) {
            Ok(policy) => {
                for warning in policy.warnings() {
                    tracing::warn!(file = %path.display(), rule = warning.pointer, "{}", warning.message);
                }
                let engine = Engine::reloaded(policy, &current);
                tracing::info!(
                    file = %path.display(),
                    sha256 = engine.policy().source().sha256,
                    "policy reloaded"
                );
                self.loaded_record(Some(path), Some(engine.policy()));
                slot.store(Arc::new(engine));
                self.stamp(path);
                true
            }
            Err(e) => {
                self.failed(Some(path), &e.to_string());
                false
            }
        }
    }

    fn loaded_record(&self, file: Option<&Path>, policy: Option<&Policy>) {
        let mut rec = Record::bare(Event::PolicyReload);
        rec.policy = match policy {
            Some(p) => Some(PolicyRef {
                file: p.source().file.clone(),
                sha256: p.source().sha256.clone(),
            }),
            None => file.map(file_ref),
        };
        rec.reason = Some("loaded: in force from now on".to_owned());
        self.write(&rec);
    }

    fn stamp(&self, path: &Path) {
        self.loaded_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(path.to_owned(), crate::audit::now());
    }

    /// Every policy file in force: path, version, when it took effect, mode.
    pub fn status(&self) -> Vec<crate::admin::status::PolicyInfo> {
        let stamps = self
            .loaded_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut out: Vec<_> = self
            .slots()
            .iter()
            .map(|(path, slot)| {
                let engine = slot.load();
                let policy = engine.policy();
                crate::admin::status::PolicyInfo {
                    file: path.display().to_string(),
                    sha256: policy.source().sha256.clone(),
                    loaded_at: stamps.get(path).cloned().unwrap_or_default(),
                    mode: if policy.is_dry_run() {
                        "dry_run"
                    } else {
                        "enforce"
                    }
                    .to_owned(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.file.cmp(&b.file));
        out
    }

    /// The limit counters of every policy, the fullest first, at most `max`.
    pub fn usage(&self, max: usize) -> Vec<crate::admin::status::CounterUse> {
        let now = std::time::Instant::now();
        let mut out: Vec<crate::admin::status::CounterUse> = self
            .slots()
            .iter()
            .flat_map(|(path, slot)| {
                let file = path.display().to_string();
                slot.load().usage(now, max).into_iter().map(move |u| {
                    crate::admin::status::CounterUse {
                        policy: file.clone(),
                        counter: u.counter,
                        scope: u.scope,
                        key: u.key,
                        rule: u.rule,
                        used: u.used,
                        max: u.max,
                        window_secs: u.window_secs,
                    }
                })
            })
            .collect();
        let fullness = |c: &crate::admin::status::CounterUse| {
            if c.max > 0.0 {
                c.used / c.max
            } else {
                f64::INFINITY
            }
        };
        out.sort_by(|a, b| fullness(b).total_cmp(&fullness(a)));
        out.truncate(max);
        out
    }

    /// The tool names the loaded policies list literally.
    pub fn listed_tools(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .slots()
            .values()
            .flat_map(|slot| slot.load().policy().listed_tools())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// After each reload, tell `metrics` which tool names the policies list.
    pub fn set_metrics(&self, metrics: Arc<crate::metrics::Metrics>) {
        metrics.set_tools(&self.listed_tools());
        let _ = self.metrics.set(metrics);
    }

    /// The engine of a loaded policy file (as configured), or of a server's default policy.
    pub fn engine(&self, server: Option<&str>, file: Option<&str>) -> Result<Arc<Engine>, String> {
        match (server, file) {
            (_, Some(file)) => self
                .slots()
                .iter()
                .find(|(p, _)| p.as_path() == Path::new(file))
                .map(|(_, s)| s.load_full())
                .ok_or_else(|| format!("no policy file {file} is loaded by the agent")),
            (Some(name), None) => {
                let index = self
                    .servers
                    .iter()
                    .position(|(n, _)| n == name)
                    .ok_or_else(|| format!("no server named {name}"))?;
                self.routing
                    .load()
                    .defaults
                    .get(index)
                    .map(|s| s.load_full())
                    .ok_or_else(|| format!("server {name} has no policy"))
            }
            (None, None) if self.servers.len() == 1 => self
                .routing
                .load()
                .defaults
                .first()
                .map(|s| s.load_full())
                .ok_or_else(|| "the server has no policy".to_owned()),
            (None, None) => Err(format!(
                "several servers ({}): name one with --server, or a policy file with --policy",
                self.servers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Reload now and say what happened.
    pub fn reload_now(&self, flags: &Flags) -> crate::admin::Reloaded {
        let changed = self.reload(flags);
        crate::admin::Reloaded {
            changed,
            errors: std::mem::take(
                &mut *self.errors.lock().unwrap_or_else(PoisonError::into_inner),
            ),
        }
    }

    /// A file that failed to load: the previous policy stays in force.
    fn failed(&self, file: Option<&Path>, error: &str) {
        self.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(error.to_owned());
        tracing::error!(
            error,
            "reload failed: the previous policy and config stay in force"
        );
        let mut rec = Record::bare(Event::PolicyReload);
        rec.policy = file.map(file_ref);
        rec.reason = Some(format!(
            "{error} (not loaded: the previous version stays in force)"
        ));
        self.write(&rec);
    }

    fn write(&self, rec: &Record) {
        if let Err(e) = self.audit.write(rec) {
            tracing::error!(error = %e, "writing an audit record failed");
        }
    }

    /// The files to watch: the config and every policy file.
    fn watched(&self, flags: &Flags) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.slots().keys().cloned().collect();
        files.extend(flags.config.clone());
        files
    }
}

/// Whether `audit` (a file, not `-`) is in a directory the watcher of [`spawn`] watches: an
/// inotify watch on a directory reports every write to every file in it.
pub fn shares_watched_dir(policies: &Policies, flags: &Flags, audit: &Path) -> bool {
    in_watched_dir(&policies.watched(flags), audit)
}

/// Whether `file` (not `-`, standard output) is in the directory of one of `watched`.
fn in_watched_dir(watched: &[PathBuf], file: &Path) -> bool {
    file != Path::new("-") && watched.iter().any(|f| dir_of(f) == dir_of(file))
}

/// The directory watched for `file`.
fn dir_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// What the reload thread is asked to do.
#[derive(Debug)]
pub enum Msg {
    /// Re-read the files (a file changed, or SIGHUP).
    Reload,
    /// Re-read them now and send back what happened (the admin socket).
    ReloadNow(mpsc::Sender<crate::admin::Reloaded>),
    Stop,
}

/// Reloads on file changes and on each [`Msg::Reload`] sent to the returned channel (SIGHUP),
/// until [`Msg::Stop`].
///
/// # Errors
///
/// The watcher could not be set up (inotify limits).
pub fn spawn(
    policies: Arc<Policies>,
    flags: Flags,
) -> Result<(mpsc::Sender<Msg>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<Msg>();
    let events = tx.clone();
    // The names of the watched files: other files in their directories (an audit log kept
    // beside the policy, say) change all the time and must not cause reloads.
    let names: Arc<Mutex<HashSet<OsString>>> = Arc::default();
    let wanted = names.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let wanted = wanted.lock().unwrap_or_else(PoisonError::into_inner);
        if event.paths.iter().any(|p| concerns(p, &wanted)) {
            let _ = events.send(Msg::Reload);
        }
    })
    .context("starting the policy file watcher")?;
    let mut dirs: Vec<PathBuf> = Vec::new();
    let watch_dirs = move |watcher: &mut notify::RecommendedWatcher,
                           dirs: &mut Vec<PathBuf>,
                           files: Vec<PathBuf>| {
        {
            let mut names = names.lock().unwrap_or_else(PoisonError::into_inner);
            names.clear();
            names.extend(
                files
                    .iter()
                    .filter_map(|f| f.file_name().map(OsString::from)),
            );
        }
        for file in files {
            let dir = dir_of(&file);
            if dirs.contains(&dir) {
                continue;
            }
            use notify::Watcher as _;
            match watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => dirs.push(dir),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch this directory: its files reload on SIGHUP only")
                }
            }
        }
    };
    watch_dirs(&mut watcher, &mut dirs, policies.watched(&flags));
    let thread = std::thread::Builder::new()
        .name("mcpwarden-reload".into())
        .spawn(move || {
            loop {
                match rx.recv_timeout(COMPACT_CHECK) {
                    Ok(Msg::Reload) => {}
                    Ok(Msg::ReloadNow(reply)) => {
                        let _ = reply.send(policies.reload_now(&flags));
                        watch_dirs(&mut watcher, &mut dirs, policies.watched(&flags));
                        continue;
                    }
                    Ok(Msg::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        policies.compact_journals();
                        continue;
                    }
                }
                // Let a burst of events settle, then reload once.
                loop {
                    match rx.recv_timeout(SETTLE) {
                        Ok(Msg::Reload) => {}
                        Ok(Msg::ReloadNow(reply)) => {
                            let _ = reply.send(policies.reload_now(&flags));
                        }
                        Ok(Msg::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        Err(mpsc::RecvTimeoutError::Timeout) => break,
                    }
                }
                policies.reload(&flags);
                // A reloaded config may name files in new directories.
                watch_dirs(&mut watcher, &mut dirs, policies.watched(&flags));
            }
        })
        .context("starting the reload thread")?;
    Ok((tx, thread))
}

/// A file as the audit log names it: its path and the sha256 of what it holds now (empty when it
/// cannot be read).
fn file_ref(path: &Path) -> PolicyRef {
    PolicyRef {
        file: path.display().to_string(),
        sha256: std::fs::read(path)
            .map(|b| sha256_hex(&b))
            .unwrap_or_default(),
    }
}

/// Whether an event on `path` may change a watched file: the file itself, or a Kubernetes
/// ConfigMap's `..data` link and `..<timestamp>` directories, which are swapped to update
/// every file of the volume at once.
fn concerns(path: &Path, names: &HashSet<OsString>) -> bool {
    path.file_name()
        .is_some_and(|name| names.contains(name) || name.to_string_lossy().starts_with(".."))
}

fn server_names(config: &Config) -> Vec<(String, String)> {
    config
        .servers
        .iter()
        .map(|s| (s.name.clone(), s.url.raw.clone()))
        .collect()
}

/// Whether two routings point at the same slots with the same selectors.
fn same_routing(a: &Routing, b: &Routing) -> bool {
    a.identity_wait == b.identity_wait
        && a.defaults.len() == b.defaults.len()
        && a.defaults
            .iter()
            .zip(&b.defaults)
            .all(|(x, y)| Arc::ptr_eq(x, y))
        && a.bindings.len() == b.bindings.len()
        && a.bindings
            .iter()
            .zip(&b.bindings)
            .all(|(x, y)| Arc::ptr_eq(&x.slot, &y.slot) && x.selector == y.selector)
}

#[cfg(test)]
mod tests {
    use super::{concerns, in_watched_dir};
    use std::collections::HashSet;
    use std::ffi::OsString;
    use std::path::{Path, PathBuf};

    #[test]
    fn an_audit_log_beside_a_watched_file_is_noticed() {
        let watched = vec![
            PathBuf::from("/etc/mcpwarden/policy.json"),
            PathBuf::from("config.yaml"),
        ];
        assert!(in_watched_dir(
            &watched,
            Path::new("/etc/mcpwarden/audit.jsonl")
        ));
        assert!(
            in_watched_dir(&watched, Path::new("audit.jsonl")),
            "both in ."
        );
        assert!(!in_watched_dir(
            &watched,
            Path::new("/var/log/mcpwarden/audit.jsonl")
        ));
        assert!(!in_watched_dir(&watched, Path::new("-")), "standard output");
        assert!(!in_watched_dir(
            &[],
            Path::new("/etc/mcpwarden/audit.jsonl")
        ));
    }

    #[test]
    fn only_watched_files_and_configmap_swaps_cause_reloads() {
        let names: HashSet<OsString> = ["policy.json", "mcpwarden.yaml"]
            .into_iter()
            .map(OsString::from)
            .collect();
        assert!(concerns(Path::new("/etc/mcpwarden/policy.json"), &names));
        assert!(concerns(Path::new("policy.json"), &names));
        assert!(concerns(Path::new("/etc/mcpwarden/..data"), &names));
        assert!(concerns(
            Path::new("/etc/mcpwarden/..2026_11_24_23_00_00.123"),
            &names
        ));
        assert!(!concerns(Path::new("/etc/mcpwarden/audit.jsonl"), &names));
        assert!(!concerns(
            Path::new("/etc/mcpwarden/.policy.json.swp"),
            &names
        ));
    }
}
