//! Sliding-window rate-limit state.
//!
//! Each counter keeps, per scope key, a log of the instants at which calls
//! were admitted. A limit `{window, max}` admits a call only if fewer than
//! `max` logged admissions are at most `window` old, so no closed interval of
//! one window's length ever holds more than `max` admissions. Windows slide
//! with each call; they are not aligned to the calendar.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::load::{Counter, Limit};

/// How many admission checks pass between sweeps of idle scope keys.
const SWEEP_EVERY: u32 = 1024;

/// Admission logs of every counter of one policy.
#[derive(Debug)]
pub(super) struct CounterStore {
    /// Indexed like [`Policy::counters`](super::Policy).
    counters: Vec<CounterLogs>,
    /// Checks since the last sweep.
    since_sweep: u32,
}

/// One counter's logs, by scope key.
#[derive(Debug)]
struct CounterLogs {
    /// Admissions older than this cannot count against any limit.
    retention: Duration,
    /// No limit needs more than this many of the newest admissions.
    capacity: usize,
    /// Admission instants per scope key, oldest first. Never empty: a log
    /// that empties is removed.
    by_key: HashMap<String, VecDeque<Instant>>,
}

impl CounterStore {
    /// Empty logs for the given counters.
    pub fn new(counters: &[Counter]) -> CounterStore {
        CounterStore {
            counters: counters
                .iter()
                .map(|counter| CounterLogs {
                    retention: counter.retention,
                    capacity: counter.capacity,
                    by_key: HashMap::new(),
                })
                .collect(),
            since_sweep: 0,
        }
    }

    /// Admits a call at `now` for scope key `key` against all of `limits`,
    /// or against none of them.
    ///
    /// `used` lists the distinct counters that `limits` name. If every limit
    /// has room, `now` is recorded once in each of those counters and the
    /// call is admitted. Otherwise nothing is recorded and the error is the
    /// index (in `limits`) of the first limit that is full.
    pub fn try_admit(
        &mut self,
        limits: &[Limit],
        used: &[usize],
        key: &str,
        now: Instant,
    ) -> Result<(), usize> {
        self.sweep_now_and_then(now);

        for &id in used {
            if let Some(counter) = self.counters.get_mut(id) {
                counter.prune_key(key, now);
            }
        }

        for (index, limit) in limits.iter().enumerate() {
            let admitted = self.counters.get(limit.counter).map_or(0, |counter| {
                counter.admitted_within(key, limit.window.duration(), now)
            });
            if u64::try_from(admitted).unwrap_or(u64::MAX) >= limit.max {
                return Err(index);
            }
        }

        for &id in used {
            if let Some(counter) = self.counters.get_mut(id) {
                counter.record(key, now);
            }
        }
        Ok(())
    }

    /// Every [`SWEEP_EVERY`] checks, drops expired admissions under every
    /// key and forgets keys with none left, so that callers that went away
    /// do not hold memory.
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
    /// The earliest instant still worth keeping, or `None` if every instant
    /// is (the process has not run for a whole retention period).
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

    /// How many of `key`'s admissions are at most `window` old at `now`.
    /// Admissions logged with a later instant than `now` (a caller that
    /// read the clock earlier but got the lock later) count as inside.
    fn admitted_within(&self, key: &str, window: Duration, now: Instant) -> usize {
        let Some(log) = self.by_key.get(key) else {
            return 0;
        };
        match now.checked_sub(window) {
            Some(start) => log.len() - log.partition_point(|t| *t < start),
            None => log.len(),
        }
    }

    /// Logs an admission at `now`, keeping the log sorted and no longer than
    /// `capacity`.
    fn record(&mut self, key: &str, now: Instant) {
        if !self.by_key.contains_key(key) {
            self.by_key.insert(key.to_owned(), VecDeque::new());
        }
        let Some(log) = self.by_key.get_mut(key) else {
            return;
        };
        if log.back().is_none_or(|last| *last <= now) {
            log.push_back(now);
        } else {
            let at = log.partition_point(|t| *t <= now);
            log.insert(at, now);
        }
        while log.len() > self.capacity {
            log.pop_front();
        }
        if log.is_empty() {
            self.by_key.remove(key);
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
        // A HashMap does not give memory back by itself after a burst of
        // callers; do it once it is mostly empty.
        if self.by_key.capacity() > self.by_key.len().saturating_mul(4).saturating_add(64) {
            self.by_key.shrink_to_fit();
        }
    }
}

/// Drops the admissions logged strictly before `keep_from`.
fn drop_before(log: &mut VecDeque<Instant>, keep_from: Instant) {
    while log.front().is_some_and(|t| *t < keep_from) {
        log.pop_front();
    }
}
