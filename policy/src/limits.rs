//! Sliding-window quota state.
//!
//! Each counter keeps, per scope key, a log of what it admitted: when, and how much (1 for a
//! call, the `increment_from` value for spend quotas). A limit `{window, max}` admits an amount
//! only if the amounts logged at most `window` ago plus the new one stay within `max`, so no
//! closed interval of one window's length ever holds more than `max`. Windows slide with each
//! call; they are not aligned to the calendar.
//!
//! A call's limits are checked and recorded as one step under one lock (all or none), and each
//! admission can be taken back ([`Reservation::release`]) when the upstream certainly did not
//! run the call.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::load::Counter;
use super::schema::Scope;

/// How many admission checks pass between sweeps of idle scope keys.
const SWEEP_EVERY: u32 = 1024;

/// A spend-quota log keeps at most this many entries per key; beyond it the two oldest are
/// merged into the newer one's instant, which can only over-count (never admit more).
const MAX_WEIGHTED_ENTRIES: usize = 4096;

/// Where a store's admissions and releases are written as they happen, so that an agent
/// restarted after a crash rebuilds the windows ([`Engine::restore`](super::Engine::restore))
/// instead of handing back what was spent. Called under the store's lock, in order; the agent
/// implements it (a file), this crate does no I/O.
pub trait Journal: Send + Sync + std::fmt::Debug {
    /// An admission of `amount` to counter `counter` (`scope`, a limit scope's name) for `key`,
    /// named `serial` (unique in this process).
    fn admitted(&self, counter: &str, scope: &str, key: &str, amount: f64, serial: u64);
    /// The admission `serial` was taken back.
    fn released(&self, serial: u64);
    /// Replace everything written so far by `live`: the admissions that still count, with
    /// their serials (compaction; called under the store's lock, so nothing is told meanwhile).
    fn rewrite(&self, live: &[(u64, Restored)]);
}

/// An admission of an earlier agent process, to log again: how long ago it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    pub counter: String,
    /// A limit scope's name (`grant`, `process`, `session`, `server`).
    pub scope: String,
    pub key: String,
    pub amount: f64,
    pub age: Duration,
}

/// Admission logs of every counter of one policy file. Survives reloads: counters whose name
/// and scope are unchanged keep their logs.
#[derive(Debug, Default)]
pub(super) struct CounterStore {
    /// Told of every admission and release.
    journal: Option<Arc<dyn Journal>>,
    /// Indexed like [`Policy::counters`](super::Policy).
    counters: Vec<CounterLogs>,
    /// Checks since the last sweep.
    since_sweep: u32,
    /// Names each admission, so that a reservation can take back exactly its own.
    next_serial: u64,
    /// The latest instant any check used. A caller that read the clock before a later caller
    /// took the lock is decided at this instant instead: admissions are then logged in order,
    /// and pruning by the newest instant never drops what an older instant's window would need.
    latest: Option<Instant>,
    /// Bumped by each [`CounterStore::fit`]: counter indices of an older policy are stale.
    generation: u64,
}

/// One counter's logs, by scope key.
#[derive(Debug)]
struct CounterLogs {
    name: String,
    scope: Scope,
    /// Admissions older than this cannot count against any limit.
    retention: Duration,
    /// For counters that only ever add 1: no limit needs more than this many of the newest
    /// admissions (a full window of `max` entries already refuses everything). `None` for spend
    /// quotas, whose amounts can be fractions.
    capacity: Option<usize>,
    /// Admissions per scope key, oldest first. Never empty: a log that empties is removed.
    by_key: HashMap<String, VecDeque<Entry>>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    at: Instant,
    amount: f64,
    serial: u64,
}

/// What one limit of a call asks for.
#[derive(Debug)]
pub(super) struct Want<'a> {
    /// Index into the store's counters.
    pub counter: usize,
    /// The scope key of the caller for this counter.
    pub key: &'a str,
    pub window: Duration,
    pub max: f64,
    /// What this call adds to the counter.
    pub amount: f64,
}

/// Admissions a call made, to be taken back if the upstream never ran it.
#[derive(Debug, Clone)]
pub struct Reservation {
    store: Arc<Mutex<CounterStore>>,
    entries: Vec<Reserved>,
    at: Instant,
}

#[derive(Debug, Clone)]
struct Reserved {
    counter: String,
    scope: Scope,
    key: String,
    serial: u64,
}

impl Reservation {
    /// The instant the call was admitted at (the decision's `now`, or later if another call
    /// was decided at a later instant first).
    pub fn at(&self) -> Instant {
        self.at
    }

    /// Takes the call's admissions back: the upstream did not run it (the connection failed,
    /// or it answered an error before any result). Idempotent; admissions already expired,
    /// merged, or dropped by a reload that changed the counter are left alone.
    pub fn release(&self) {
        let mut store = lock(&self.store);
        for r in &self.entries {
            store.remove(&r.counter, r.scope, &r.key, r.serial);
        }
    }
}

/// The store behind a lock that nobody panics under: `try_reserve` and `remove` do not panic,
/// so a poisoned store is still consistent; failing closed here would deny everything.
pub(super) fn lock(store: &Mutex<CounterStore>) -> std::sync::MutexGuard<'_, CounterStore> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CounterStore {
    /// Fits the store to a (re)loaded policy's counters: logs of counters with the same name,
    /// scope and kind (calls, or `increment_from` amounts) are kept, the others dropped; retention and capacity follow the new limits.
    pub fn fit(&mut self, counters: &[Counter]) {
        self.generation += 1;
        let mut old: Vec<CounterLogs> = std::mem::take(&mut self.counters);
        self.counters = counters
            .iter()
            .map(|c| {
                // A counter that switches between counting calls and summing amounts starts
                // afresh: its old entries mean something else.
                let by_key = old
                    .iter_mut()
                    .find(|o| {
                        o.name == c.name
                            && o.scope == c.scope
                            && o.capacity.is_some() == c.capacity.is_some()
                    })
                    .map(|o| std::mem::take(&mut o.by_key))
                    .unwrap_or_default();
                CounterLogs {
                    name: c.name.clone(),
                    scope: c.scope,
                    retention: c.retention,
                    capacity: c.capacity,
                    by_key,
                }
            })
            .collect();
    }

    /// Admits a call at `now` against all of `wants`, or against none of them.
    ///
    /// Each counter named by `wants` records once, the largest amount any of its wants asks
    /// for; each want checks that amount against its own window and max. On success the
    /// returned reservation can take the admissions back. Otherwise nothing is recorded and
    /// the error is the index (in `wants`) of the first limit without room.
    pub fn try_reserve(
        &mut self,
        store: &Arc<Mutex<CounterStore>>,
        wants: &[Want<'_>],
        now: Instant,
    ) -> Result<Option<Reservation>, usize> {
        let now = self.latest.map_or(now, |latest| latest.max(now));
        self.latest = Some(now);
        self.sweep_now_and_then(now);
        for want in wants {
            if let Some(counter) = self.counters.get_mut(want.counter) {
                counter.prune_key(want.key, now);
            }
        }
        if let Some(index) = self.first_without_room(wants, now) {
            return Err(index);
        }
        let mut entries = Vec::new();
        for (index, want) in wants.iter().enumerate() {
            // Once per counter: at its first want.
            if wants[..index].iter().any(|w| w.counter == want.counter) {
                continue;
            }
            let amount = recorded(wants, want.counter);
            let serial = self.next_serial;
            let Some(counter) = self.counters.get_mut(want.counter) else {
                continue;
            };
            if amount > 0.0 {
                self.next_serial += 1;
                counter.record(want.key, now, amount, serial);
                if let Some(j) = &self.journal {
                    j.admitted(
                        &counter.name,
                        counter.scope.as_str(),
                        want.key,
                        amount,
                        serial,
                    );
                }
                entries.push(Reserved {
                    counter: counter.name.clone(),
                    scope: counter.scope,
                    key: want.key.to_owned(),
                    serial,
                });
            }
        }
        Ok((!entries.is_empty()).then(|| Reservation {
            store: store.clone(),
            entries,
            at: now,
        }))
    }

    /// Whether [`CounterStore::try_reserve`] would admit `wants` at `now`: `Err` with the index
    /// of the first limit without room, as it would give. A pure read: nothing is recorded,
    /// pruned or swept, and the store's latest instant does not move.
    pub fn would_admit(&self, wants: &[Want<'_>], now: Instant) -> Result<(), usize> {
        let now = self.latest.map_or(now, |latest| latest.max(now));
        match self.first_without_room(wants, now) {
            Some(index) => Err(index),
            None => Ok(()),
        }
    }

    /// The index of the first of `wants` without room at `now` (already the store's decision
    /// instant). Reads the logs as pruned at `now`, whether or not they were.
    fn first_without_room(&self, wants: &[Want<'_>], now: Instant) -> Option<usize> {
        wants.iter().position(|want| {
            let used = self
                .counters
                .get(want.counter)
                .map_or(0.0, |counter| counter.counted(want.key, want.window, now));
            used + recorded(wants, want.counter) > want.max
        })
    }

    /// Every scope key with something counted in counter `id` within `window` at `now`, and
    /// how much: a pure read, for [`Engine::usage`](super::Engine::usage). Keys whose log holds
    /// only admissions outside the window (not yet pruned, or kept for a longer window of the
    /// same counter) are left out.
    pub fn usage(
        &self,
        id: usize,
        window: Duration,
        now: Instant,
    ) -> impl Iterator<Item = (&str, f64)> + '_ {
        self.counters.get(id).into_iter().flat_map(move |counter| {
            counter.by_key.keys().filter_map(move |key| {
                let used = counter.counted(key, window, now);
                (used > 0.0).then_some((key.as_str(), used))
            })
        })
    }

    /// Which [`CounterStore::fit`] the store is at.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The index of the counter `name` in `scope`, for an engine whose indices are stale.
    pub fn find(&self, name: &str, scope: Scope) -> Option<usize> {
        self.counters
            .iter()
            .position(|c| c.name == name && c.scope == scope)
    }

    /// What `key` has used of counter `id` within `window` at `now`, for `policy explain`.
    pub fn used(&self, id: usize, key: &str, window: Duration, now: Instant) -> f64 {
        self.counters
            .get(id)
            .map_or(0.0, |c| c.used_within(key, window, now))
    }

    /// From now on, tell `journal` of every admission and release.
    pub fn set_journal(&mut self, journal: Arc<dyn Journal>) {
        self.journal = Some(journal);
    }

    /// Logs admissions of an earlier process again, as made `age` before `now`; those of
    /// counters this policy no longer has, or older than any limit looks, are left out. Each
    /// is told to the journal as a new admission. Returns how many were logged.
    pub fn restore(&mut self, entries: &[Restored], now: Instant) -> usize {
        let mut sorted: Vec<&Restored> = entries.iter().collect();
        // Oldest first, so that each key's log is appended in order.
        sorted.sort_by_key(|e| std::cmp::Reverse(e.age));
        let mut logged = 0;
        for e in sorted {
            let Some(counter) = self
                .counters
                .iter_mut()
                .find(|c| c.name == e.counter && c.scope.as_str() == e.scope)
            else {
                continue;
            };
            if e.age > counter.retention || e.amount.is_nan() || e.amount <= 0.0 {
                continue;
            }
            let Some(at) = now.checked_sub(e.age) else {
                continue;
            };
            let serial = self.next_serial;
            self.next_serial += 1;
            counter.record(&e.key, at, e.amount, serial);
            if let Some(j) = &self.journal {
                j.admitted(
                    &counter.name,
                    counter.scope.as_str(),
                    &e.key,
                    e.amount,
                    serial,
                );
            }
            logged += 1;
        }
        logged
    }

    /// Hand the journal the admissions that still count at `now`, to replace what it holds.
    pub fn compact_journal(&mut self, now: Instant) {
        let Some(journal) = self.journal.clone() else {
            return;
        };
        let mut live = Vec::new();
        for counter in &mut self.counters {
            counter.sweep(now);
            for (key, log) in &counter.by_key {
                for e in log {
                    live.push((
                        e.serial,
                        Restored {
                            counter: counter.name.clone(),
                            scope: counter.scope.as_str().to_owned(),
                            key: key.clone(),
                            amount: e.amount,
                            age: now.saturating_duration_since(e.at),
                        },
                    ));
                }
            }
        }
        journal.rewrite(&live);
    }

    fn remove(&mut self, name: &str, scope: Scope, key: &str, serial: u64) {
        let Some(counter) = self
            .counters
            .iter_mut()
            .find(|c| c.name == name && c.scope == scope)
        else {
            return;
        };
        let emptied = match counter.by_key.get_mut(key) {
            Some(log) => {
                if let Some(at) = log.iter().position(|e| e.serial == serial) {
                    log.remove(at);
                    if let Some(j) = &self.journal {
                        j.released(serial);
                    }
                }
                log.is_empty()
            }
            None => false,
        };
        if emptied {
            counter.by_key.remove(key);
        }
    }

    /// Every [`SWEEP_EVERY`] checks, drops expired admissions under every key and forgets keys
    /// with none left, so that callers that went away do not hold memory.
    fn sweep_now_and_then(&mut self, now: Instant) {
        self.since_sweep += 1;
        if self.since_sweep < SWEEP_EVERY {
            return;
        }
        self.since_sweep = 0;
        for counter in &mut self.counters {
            counter.sweep(now);
        }
    }

    /// How many scope keys hold a log, over all counters.
    #[cfg(test)]
    pub fn tracked_keys(&self) -> usize {
        self.counters.iter().map(|c| c.by_key.len()).sum()
    }

    /// How many admissions are logged for `key` in counter `id`.
    #[cfg(test)]
    pub fn log_len(&self, id: usize, key: &str) -> usize {
        self.counters
            .get(id)
            .and_then(|c| c.by_key.get(key))
            .map_or(0, VecDeque::len)
    }
}

impl CounterLogs {
    /// The earliest instant still worth keeping, or `None` if every instant is (the process has
    /// not run for a whole retention period).
    fn keep_from(&self, now: Instant) -> Option<Instant> {
        now.checked_sub(self.retention)
    }

    /// Drops `key`'s expired admissions, and its log if that empties it.
    fn prune_key(&mut self, key: &str, now: Instant) {
        let Some(keep_from) = self.keep_from(now) else {
            return;
        };
        let emptied = match self.by_key.get_mut(key) {
            Some(log) => {
                drop_before(log, keep_from);
                log.is_empty()
            }
            None => false,
        };
        if emptied {
            self.by_key.remove(key);
        }
    }

    /// The sum of `key`'s admissions at most `window` old at `now` (never earlier than any
    /// logged admission: the store decides at the latest instant it has seen).
    fn used_within(&self, key: &str, window: Duration, now: Instant) -> f64 {
        let Some(log) = self.by_key.get(key) else {
            return 0.0;
        };
        let Some(start) = now.checked_sub(window) else {
            return log.iter().map(|e| e.amount).sum();
        };
        // The log is sorted by instant: the window is its tail.
        let first = log.partition_point(|e| e.at < start);
        if self.capacity.is_some() {
            // Every entry of a unit counter adds 1: count, don't sum.
            #[allow(clippy::cast_precision_loss)] // a log holds far fewer than 2^53 entries
            return (log.len() - first) as f64;
        }
        log.range(first..).map(|e| e.amount).sum()
    }

    /// What a check at `now` counts of `key`'s log within `window`: as [`Self::used_within`]
    /// after pruning at `now`, without pruning (the admissions older than the retention would
    /// be gone, so the window is cut at it).
    fn counted(&self, key: &str, window: Duration, now: Instant) -> f64 {
        self.used_within(key, window.min(self.retention), now)
    }

    /// Logs an admission, keeping the log sorted by instant and within its bound.
    fn record(&mut self, key: &str, at: Instant, amount: f64, serial: u64) {
        let entry = Entry { at, amount, serial };
        let log = self.by_key.entry(key.to_owned()).or_default();
        if log.back().is_none_or(|last| last.at <= at) {
            log.push_back(entry);
        } else {
            let index = log.partition_point(|e| e.at <= at);
            log.insert(index, entry);
        }
        match self.capacity {
            Some(capacity) => {
                while log.len() > capacity.max(1) {
                    log.pop_front();
                }
            }
            None => {
                while log.len() > MAX_WEIGHTED_ENTRIES {
                    if let (Some(oldest), Some(next)) = (log.pop_front(), log.front_mut()) {
                        next.amount += oldest.amount;
                    }
                }
            }
        }
    }

    /// Prunes every key's log and forgets keys left with none.
    fn sweep(&mut self, now: Instant) {
        if let Some(keep_from) = self.keep_from(now) {
            self.by_key.retain(|_, log| {
                drop_before(log, keep_from);
                !log.is_empty()
            });
        }
        // A HashMap does not give memory back by itself after a burst of callers; do it once
        // it is mostly empty.
        if self.by_key.capacity() > self.by_key.len().saturating_mul(4).saturating_add(64) {
            self.by_key.shrink_to_fit();
        }
    }
}

/// What a call records in `counter`: the largest amount any of its `wants` of that counter
/// asks for.
fn recorded(wants: &[Want<'_>], counter: usize) -> f64 {
    wants
        .iter()
        .filter(|w| w.counter == counter)
        .map(|w| w.amount)
        .fold(0.0_f64, f64::max)
}

/// Drops the admissions logged strictly before `keep_from`.
fn drop_before(log: &mut VecDeque<Entry>, keep_from: Instant) {
    while log.front().is_some_and(|e| e.at < keep_from) {
        log.pop_front();
    }
}
