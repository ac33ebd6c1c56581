//! MCP sessions seen by the interceptor, shared by every worker: a session's messages arrive
//! on several connections (a POST per message, a GET stream for the server's messages), which
//! may be served by different workers.
//!
//! A session is keyed by its server and its id: `Mcp-Session-Id` for Streamable HTTP, the
//! `session_id`/`sessionId` query parameter of the POST endpoint announced on a 2024-11-05
//! HTTP+SSE stream. It holds the calls forwarded and not yet answered (so a result arriving on
//! another stream, or a cancellation, is attributed to its call in the audit log), the revision
//! the session negotiated, and for HTTP+SSE the way to write into the client's GET stream
//! (refusals of POSTed calls are delivered there, as the server would deliver them).
//!
//! Bounded: at most [`MAX_SESSIONS`] sessions (the least recently used goes first) and
//! [`MAX_PENDING`] unanswered calls per session (the oldest goes first, recorded as such).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use bytes::Bytes;
use lru::LruCache;
use serde_json::Value;

use crate::audit::{Event, Head, Record};

/// Sessions kept at most.
pub const MAX_SESSIONS: usize = 16 * 1024;
/// Unanswered calls kept per session at most.
pub const MAX_PENDING: usize = 1024;
/// Events queued for injection into one HTTP+SSE stream at most.
pub const INJECT_QUEUE: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub server: usize,
    pub id: String,
}

/// A call forwarded and not yet answered: the head of the record its answer will write. The
/// exchange and the session may both hold it (a result, a cancellation or a disconnect can each
/// come first); clones share `closed`, so its record is closed exactly once.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Shared with the call's decision record.
    pub head: Arc<Head>,
    pub started: Instant,
    /// A `tools/list` request: its result is filtered whatever it looks like.
    pub listing: bool,
    /// The quota the call took: given back if the upstream certainly did not run it.
    pub quota: Option<crate::policy::Reservation>,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Pending {
    pub fn new(
        head: Arc<Head>,
        started: Instant,
        listing: bool,
        quota: Option<crate::policy::Reservation>,
    ) -> Pending {
        Pending {
            head,
            started,
            listing,
            quota,
            closed: Arc::default(),
        }
    }

    /// The record of the call's answer (or of why none came), stamped now.
    pub fn response(&self) -> Record {
        Record::new(Event::Response, self.head.clone())
    }

    /// Gives the call's quota back (the upstream did not run it) and notes it in `rec`.
    pub fn release_quota(&self, rec: &mut Record) {
        if let Some(quota) = &self.quota {
            quota.release();
            rec.quota_released = Some(true);
        }
    }

    /// True for the one caller that gets to close this call's record.
    pub fn claim(&self) -> bool {
        !self.closed.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A JSON-RPC id as a map key (`1` and `"1"` are different ids).
pub fn id_key(id: &Value) -> String {
    id.to_string()
}

#[derive(Debug)]
pub struct Session {
    /// By id; the least recently added goes first when the bound is reached.
    pending: Mutex<LruCache<String, Pending>>,
    revision: Mutex<Option<String>>,
    /// HTTP+SSE: events to write into the client's GET stream, between whole events.
    inject: Option<tokio::sync::mpsc::Sender<Bytes>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves the data consistent; a panic elsewhere does not
    // make it unusable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for Session {
    fn default() -> Self {
        Session {
            // Unbounded as a cache (it would allocate its bound up front for every session);
            // `add_pending` keeps it within MAX_PENDING.
            pending: Mutex::new(LruCache::unbounded()),
            revision: Mutex::default(),
            inject: None,
        }
    }
}

impl Session {
    /// Remember a forwarded call; returns a call pushed out to stay within [`MAX_PENDING`].
    pub fn add_pending(&self, id: &Value, p: Pending) -> Option<Pending> {
        let mut map = lock(&self.pending);
        map.put(id_key(id), p);
        if map.len() <= MAX_PENDING {
            return None;
        }
        map.pop_lru().map(|(_, p)| p)
    }

    /// The call `id`, left in place (its late answer then finds it closed, not unknown).
    pub fn pending(&self, id: &Value) -> Option<Pending> {
        lock(&self.pending).peek(&id_key(id)).cloned()
    }

    pub fn take_pending(&self, id: &Value) -> Option<Pending> {
        lock(&self.pending).pop(&id_key(id))
    }

    /// Every unanswered call, oldest first (the session is ending).
    pub fn drain_pending(&self) -> Vec<Pending> {
        let mut map = lock(&self.pending);
        let mut all = Vec::with_capacity(map.len());
        while let Some((_, p)) = map.pop_lru() {
            all.push(p);
        }
        all
    }

    /// The ids of unanswered `tools/list` requests.
    pub fn listing_ids(&self) -> Vec<Value> {
        lock(&self.pending)
            .iter()
            .filter(|(_, p)| p.listing && !p.is_closed())
            .filter_map(|(_, p)| p.head.id().cloned())
            .collect()
    }

    pub fn revision(&self) -> Option<String> {
        lock(&self.revision).clone()
    }

    pub fn set_revision(&self, r: String) {
        *lock(&self.revision) = Some(r);
    }

    /// HTTP+SSE: queue an event for the client's stream. False when the stream is gone or
    /// its queue is full.
    pub fn inject(&self, event: Bytes) -> bool {
        self.inject
            .as_ref()
            .is_some_and(|tx| tx.try_send(event).is_ok())
    }

    pub fn is_legacy(&self) -> bool {
        self.inject.is_some()
    }
}

/// Every session, shared by the workers.
pub struct Sessions {
    /// The least recently used goes first when the bound is reached.
    map: Mutex<LruCache<SessionKey, Arc<Session>>>,
    /// HTTP+SSE sessions in `map`: while there are none, POSTs need not look (and take the lock
    /// the workers share) to find out.
    legacy: std::sync::atomic::AtomicUsize,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            // Grows as sessions come; `insert` keeps it within MAX_SESSIONS.
            map: Mutex::new(LruCache::unbounded()),
            legacy: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl Sessions {
    pub fn get(&self, key: &SessionKey) -> Option<Arc<Session>> {
        lock(&self.map).get(key).cloned()
    }

    /// The session for a Streamable HTTP id, created if new.
    pub fn streamable(&self, key: SessionKey) -> Arc<Session> {
        if let Some(s) = self.get(&key) {
            return s;
        }
        let s = Arc::new(Session::default());
        self.insert(key, s.clone());
        s
    }

    /// Whether any HTTP+SSE session is known.
    pub fn any_legacy(&self) -> bool {
        self.legacy.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// A new HTTP+SSE session; the receiver feeds the client's GET stream.
    pub fn legacy(&self, key: SessionKey) -> (Arc<Session>, tokio::sync::mpsc::Receiver<Bytes>) {
        let (tx, rx) = tokio::sync::mpsc::channel(INJECT_QUEUE);
        let s = Arc::new(Session {
            inject: Some(tx),
            ..Session::default()
        });
        self.insert(key, s.clone());
        (s, rx)
    }

    fn insert(&self, key: SessionKey, s: Arc<Session>) {
        let mut map = lock(&self.map);
        let gone = map.put(key, s.clone());
        self.counted(Some(&s), gone.as_ref());
        if map.len() > MAX_SESSIONS {
            let gone = map.pop_lru().map(|(_, old)| old);
            self.counted(None, gone.as_ref());
        }
    }

    /// Keep the HTTP+SSE count: `added` went into the map, `removed` left it.
    fn counted(&self, added: Option<&Arc<Session>>, removed: Option<&Arc<Session>>) {
        use std::sync::atomic::Ordering::Relaxed;
        if added.is_some_and(|s| s.is_legacy()) {
            self.legacy.fetch_add(1, Relaxed);
        }
        if removed.is_some_and(|s| s.is_legacy()) {
            self.legacy.fetch_sub(1, Relaxed);
        }
    }

    /// Forget a session (DELETE, or its HTTP+SSE stream ended). Only `which` is removed, not a
    /// newer session that took over the key.
    pub fn remove(&self, key: &SessionKey, which: Option<&Arc<Session>>) {
        let mut map = lock(&self.map);
        let same = match (map.peek(key), which) {
            (Some(s), Some(w)) => Arc::ptr_eq(s, w),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if same {
            let gone = map.pop(key);
            self.counted(None, gone.as_ref());
        }
    }

    #[cfg(test)]
    pub fn count(&self) -> usize {
        lock(&self.map).len()
    }
}

/// Tools designations learnt from one server's listings: which arguments its tools mirror into
/// `Mcp-Param-*` headers. Bounded: a listing replaces what a tool had; at most
/// [`MAX_DESIGNATED_TOOLS`] tools are remembered.
#[derive(Default)]
pub struct ParamTable {
    tools: Mutex<HashMap<String, Vec<crate::mcp::Designation>>>,
}

pub const MAX_DESIGNATED_TOOLS: usize = 10_000;

impl ParamTable {
    pub fn learn(&self, found: &[(String, Vec<crate::mcp::Designation>)]) {
        if found.is_empty() {
            return;
        }
        let mut tools = lock(&self.tools);
        for (name, d) in found {
            // A tool listed without designations is known too: no Mcp-Param-* header fits it.
            if tools.len() < MAX_DESIGNATED_TOOLS || tools.contains_key(name) {
                tools.insert(name.clone(), d.clone());
            }
        }
    }

    /// `None`: this tool's listing was never seen.
    pub fn get(&self, tool: &str) -> Option<Vec<crate::mcp::Designation>> {
        lock(&self.tools).get(tool).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_is_bounded_oldest_first() {
        let s = Session::default();
        let p = || Pending::new(Arc::default(), Instant::now(), false, None);
        for i in 0..MAX_PENDING as u64 {
            assert!(s.add_pending(&Value::from(i), p()).is_none());
        }
        assert!(s.add_pending(&Value::from("x"), p()).is_some());
        assert!(s.take_pending(&Value::from(0)).is_none(), "the oldest went");
        assert!(s.take_pending(&Value::from(1)).is_some());
        assert!(
            s.take_pending(&Value::from("1")).is_none(),
            "ids keep their type"
        );
    }

    #[test]
    fn remove_leaves_a_newer_session_alone() {
        let sessions = Sessions::default();
        let key = SessionKey {
            server: 0,
            id: "a".into(),
        };
        let (old, _rx) = sessions.legacy(key.clone());
        let (_new, _rx2) = sessions.legacy(key.clone());
        assert!(sessions.any_legacy());
        sessions.remove(&key, Some(&old));
        assert_eq!(sessions.count(), 1);
        sessions.remove(&key, None);
        assert_eq!(sessions.count(), 0);
        assert!(!sessions.any_legacy(), "the count follows the map");
    }
}
