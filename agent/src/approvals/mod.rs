//! Calls held for a human decision (`action: require_approval`).
//!
//! The registry ([`Approvals`]) is shared by the workers, which hold calls in it, and by those
//! who decide them: the admin socket (`mcpwarden approvals`), the `Approval` resources of a
//! cluster (`k8s::approvals`) and nothing else. It knows no sockets and no policy: a held
//! call's worker waits on its [`Held`], and on approval decides the call again itself.
//!
//! | file | what |
//! |---|---|
//! | [`user`] | approval by the client's user inside the protocol (2026-07-28): the signed `requestState` |
//! | [`webhook`] | announcing pending approvals to a URL, signed |
//!
//! Every pending approval is bounded: in total and per caller (`approvals.max_pending`,
//! `approvals.max_pending_per_caller`), and in time (the rule's `approval.timeout`, else
//! `approvals.timeout_s`). A held call that times out, is cancelled by its client or whose
//! client goes is removed here at once: a decision that comes later finds nothing to approve,
//! so nothing held is forwarded after it was given up.

pub mod user;
pub mod webhook;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};

/// Default time a call is held (below the common 60 s client request timeouts).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(45);
/// Default bound on pending approvals, on the node.
pub const DEFAULT_MAX_PENDING: usize = 64;
/// Default bound on pending approvals of one caller (pod, or cgroup outside pods).
pub const DEFAULT_MAX_PENDING_PER_CALLER: usize = 4;

/// `approvals:` in the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub timeout: Duration,
    pub max_pending: usize,
    pub max_pending_per_caller: usize,
    pub webhook: Option<webhook::Settings>,
    /// The node's name, in summaries (an `Approval` resource names its node).
    pub node: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            timeout: DEFAULT_TIMEOUT,
            max_pending: DEFAULT_MAX_PENDING,
            max_pending_per_caller: DEFAULT_MAX_PENDING_PER_CALLER,
            webhook: None,
            node: String::new(),
        }
    }
}

/// Who called, as an approver sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CallerSummary {
    pub cgroup_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    pub pid: u32,
    pub uid: u32,
    pub comm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// What an approver is shown of a held call.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Short and random: what `approve` and `deny` name.
    pub id: String,
    pub node: String,
    pub requested_at: String,
    /// Seconds left when listed.
    pub expires_in_s: u64,
    pub caller: CallerSummary,
    pub server: String,
    pub tool: String,
    pub arg_keys: Vec<String>,
    pub args_sha256: String,
    /// Only when the rule sets `approval.show_arguments: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<serde_json::Value>,
    /// The rule that holds it (`/tools/<name>/action`) and its reason.
    pub rule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub policy: String,
    /// An approval also approves the same tool for this caller for this long (the rule's
    /// `approval.remember`; `--for` overrides it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remember_s: Option<u64>,
}

/// How an approver reached the agent.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// `mcpwarden approvals` over the admin socket.
    #[default]
    Cli,
    /// An `Approval` resource in the cluster.
    Resource,
    /// The client's user, answering mcpwarden's elicitation (2026-07-28).
    User,
    /// An earlier approval given `--for` (or the rule's `remember`).
    Remembered,
}

/// Who decided, as audited.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Approver {
    pub via: Via,
    /// Admin socket: the peer's credentials (`SO_PEERCRED`, `SO_PEERGROUPS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gids: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `Approval` resource: the Kubernetes user the admission policy recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `--as NAME`: what the approver says they are (not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_as: Option<String>,
    /// The approver's cgroup (admin socket), for the self-approval check; not audited.
    #[serde(skip)]
    pub cgroup_id: Option<u64>,
    /// The approver's pod, read from its cgroup path; not audited.
    #[serde(skip)]
    pub pod_uid: Option<String>,
}

/// A decision on a held call.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub approved: bool,
    pub by: Approver,
    pub reason: Option<String>,
    /// Approved: remembered for this long.
    pub remember: Option<Duration>,
}

/// Why a decision was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("no pending approval {0} (decided, timed out or abandoned)")]
    NotFound(String),
    #[error("approval {0} refused: {1} (a workload must not approve itself)")]
    SelfApproval(String, &'static str),
    #[error("approval {0}: its call was abandoned by its client")]
    Abandoned(String),
}

/// What the registry tells those who publish pending approvals (webhook, `Approval` resources).
#[derive(Debug, Clone)]
pub enum Notice {
    Pending(Arc<Summary>),
    /// Decided, timed out or abandoned: `outcome` is the audit's step name.
    Closed {
        id: String,
        outcome: &'static str,
    },
}

/// A call to hold.
#[derive(Debug, Clone)]
pub struct HoldRequest {
    /// Filled but for `id`, `node`, `requested_at` and `expires_in_s`.
    pub summary: Summary,
    /// The caller's `grant` key (pod or cgroup): per-caller bound and `remember`.
    pub caller_key: String,
    /// Kubernetes user of the caller's service account (`system:serviceaccount:NS:SA`).
    pub caller_user: Option<String>,
    /// The caller runs in a pod (by its cgroup), known or not: a Kubernetes approver cannot be
    /// told apart from it while its service account is unknown.
    pub caller_in_pod: bool,
    /// The JSON-RPC id and the session (`session` scope key: the MCP session, or the
    /// connection), so that a `notifications/cancelled` finds it and no other.
    pub request_id: String,
    pub session: String,
    pub timeout: Option<Duration>,
}

struct Entry {
    summary: Arc<Summary>,
    caller_key: String,
    caller_user: Option<String>,
    caller_in_pod: bool,
    request_id: String,
    session: String,
    deadline: Instant,
    tx: oneshot::Sender<Resolution>,
}

#[derive(Default)]
struct State {
    pending: HashMap<String, Entry>,
    per_caller: HashMap<String, usize>,
    /// (caller key, server, tool) → until when an approval given `--for` holds, and who gave it.
    remembered: HashMap<(String, String, String), (Instant, Approver)>,
}

impl State {
    fn remove(&mut self, id: &str) -> Option<Entry> {
        let e = self.pending.remove(id)?;
        if let Some(n) = self.per_caller.get_mut(&e.caller_key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_caller.remove(&e.caller_key);
            }
        }
        Some(e)
    }
}

/// Writes the audit record of an approver refused ([`DecideError::SelfApproval`]): the
/// call's summary, who tried, why.
pub type RefusedAuditor = Box<dyn Fn(&Summary, &Approver, &str) + Send + Sync>;

/// The node's pending approvals.
pub struct Approvals {
    settings: Settings,
    state: Mutex<State>,
    notices: broadcast::Sender<Notice>,
    refused: std::sync::OnceLock<RefusedAuditor>,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Approvals")
            .field("pending", &self.lock().pending.len())
            .finish()
    }
}

/// How a held call's wait ended.
#[derive(Debug)]
pub enum Waited {
    Decided(Resolution),
    TimedOut,
    /// Its client cancelled it (`notifications/cancelled`).
    Cancelled,
}

impl Approvals {
    pub fn new(settings: Settings) -> Arc<Approvals> {
        Arc::new(Approvals {
            settings,
            state: Mutex::new(State::default()),
            notices: broadcast::channel(256).0,
            refused: std::sync::OnceLock::new(),
        })
    }

    /// Who audits refused approvers, whichever way they came (admin socket, resource). Set
    /// once, at start.
    pub fn on_refused(&self, auditor: RefusedAuditor) {
        let _ = self.refused.set(auditor);
    }

    /// Audits a refused approver (also used for one whose cgroup could not be read).
    pub fn audit_refused(&self, summary: &Summary, by: &Approver, why: &str) {
        if let Some(audit) = self.refused.get() {
            audit(summary, by, why);
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it leaves nothing half-updated that matters more than
        // refusing every approval from then on.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Pending and closed approvals, for the webhook and the `Approval` resources.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// Who approved this caller's calls of `tool` on `server` for a while (`--for`, the rule's
    /// `remember`), if that approval still holds.
    pub fn remembered(&self, caller_key: &str, server: &str, tool: &str) -> Option<Approver> {
        let mut st = self.lock();
        let key = (caller_key.to_owned(), server.to_owned(), tool.to_owned());
        match st.remembered.get(&key) {
            Some((until, by)) if *until > Instant::now() => Some(by.clone()),
            Some(_) => {
                st.remembered.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Holds a call. Err: why it cannot be held (the bounds), to refuse it with.
    pub fn hold(self: &Arc<Self>, req: HoldRequest) -> Result<Held, String> {
        // At most a day (rules and the config are checked for that; this only guards the sum).
        let timeout = req
            .timeout
            .unwrap_or(self.settings.timeout)
            .min(Duration::from_secs(86_400));
        let now = Instant::now();
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        if st.pending.len() >= self.settings.max_pending {
            return Err(format!(
                "approval not requested: {} calls already wait for approval on this node \
                 (approvals.max_pending)",
                st.pending.len()
            ));
        }
        let mine = st.per_caller.get(&req.caller_key).copied().unwrap_or(0);
        if mine >= self.settings.max_pending_per_caller {
            return Err(format!(
                "approval not requested: this caller already has {mine} calls waiting for \
                 approval (approvals.max_pending_per_caller)"
            ));
        }
        let mut id = new_id();
        while st.pending.contains_key(&id) {
            id = new_id();
        }
        let mut summary = req.summary;
        summary.id = id.clone();
        summary.node = self.settings.node.clone();
        summary.requested_at =
            humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        summary.expires_in_s = timeout.as_secs();
        let summary = Arc::new(summary);
        *st.per_caller.entry(req.caller_key.clone()).or_insert(0) += 1;
        st.pending.insert(
            id.clone(),
            Entry {
                summary: summary.clone(),
                caller_key: req.caller_key,
                caller_user: req.caller_user,
                caller_in_pod: req.caller_in_pod,
                request_id: req.request_id,
                session: req.session,
                deadline: now + timeout,
                tx,
            },
        );
        drop(st);
        let _ = self.notices.send(Notice::Pending(summary.clone()));
        Ok(Held {
            id,
            summary,
            rx,
            deadline: now + timeout,
            approvals: self.clone(),
            open: true,
        })
    }

    /// Every pending approval, the oldest first.
    pub fn list(&self) -> Vec<Summary> {
        let now = Instant::now();
        let st = self.lock();
        let mut out: Vec<(Instant, Summary)> = st
            .pending
            .values()
            .map(|e| {
                let mut s = (*e.summary).clone();
                s.expires_in_s = e.deadline.saturating_duration_since(now).as_secs();
                (e.deadline, s)
            })
            .collect();
        out.sort_by_key(|(d, _)| *d);
        out.into_iter().map(|(_, s)| s).collect()
    }

    /// How many calls are held now.
    pub fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// How long until the last pending approval times out (a hand-over's drain waits for it).
    pub fn longest_wait(&self) -> Duration {
        let now = Instant::now();
        self.lock()
            .pending
            .values()
            .map(|e| e.deadline.saturating_duration_since(now))
            .max()
            .unwrap_or_default()
    }

    /// One pending approval.
    pub fn get(&self, id: &str) -> Option<Arc<Summary>> {
        self.lock().pending.get(id).map(|e| e.summary.clone())
    }

    /// Approves or denies a held call. The call's worker audits the decision and, on approval,
    /// decides the call again against the policy in force now.
    pub fn decide(
        &self,
        id: &str,
        approved: bool,
        reason: Option<String>,
        remember: Option<Duration>,
        by: Approver,
    ) -> Result<Arc<Summary>, DecideError> {
        let mut st = self.lock();
        let Some(e) = st.pending.get(id) else {
            return Err(DecideError::NotFound(id.to_owned()));
        };
        if let Some(why) = self_approval(e, &by) {
            let summary = e.summary.clone();
            drop(st);
            let err = DecideError::SelfApproval(id.to_owned(), why);
            self.audit_refused(&summary, &by, &err.to_string());
            return Err(err);
        }
        let Some(e) = st.remove(id) else {
            return Err(DecideError::NotFound(id.to_owned()));
        };
        let remember = remember
            .or(e.summary.remember_s.map(Duration::from_secs))
            .filter(|_| approved)
            .map(|d| d.min(Duration::from_secs(86_400)));
        let summary = e.summary.clone();
        let key = (
            e.caller_key.clone(),
            e.summary.server.clone(),
            e.summary.tool.clone(),
        );
        // Sent under the lock: a waiter whose deadline passes meanwhile takes the lock to
        // remove its entry, finds it gone, and then finds this decision waiting for it.
        let sent = e.tx.send(Resolution {
            approved,
            by: by.clone(),
            reason,
            remember,
        });
        if sent.is_err() {
            // Its client went between our look-up and now: nothing is forwarded, nothing
            // remembered.
            return Err(DecideError::Abandoned(id.to_owned()));
        }
        if let Some(d) = remember {
            let now = Instant::now();
            st.remembered.retain(|_, (until, _)| *until > now);
            st.remembered.insert(key, (now + d, by));
        }
        Ok(summary)
    }

    /// A client's `notifications/cancelled` for a held call: it is given up. `session`: the
    /// canceller's MCP session; `None` for a client without one (its cancellation comes on
    /// another connection than the held request), which matches its calls in any.
    pub fn cancel(
        &self,
        caller_key: &str,
        server: &str,
        session: Option<&str>,
        request_id: &str,
    ) -> bool {
        let mut st = self.lock();
        let id = st
            .pending
            .iter()
            .find(|(_, e)| {
                e.caller_key == caller_key
                    && e.summary.server == server
                    && session.is_none_or(|s| e.session == s)
                    && e.request_id == request_id
            })
            .map(|(id, _)| id.clone());
        match id {
            // Dropping the sender wakes the call with `Waited::Cancelled`.
            Some(id) => st.remove(&id).is_some(),
            None => false,
        }
    }

    fn closed(&self, id: &str, outcome: &'static str) {
        let _ = self.notices.send(Notice::Closed {
            id: id.to_owned(),
            outcome,
        });
    }
}

/// How a listing names a caller: its pod (namespace/name), else its cgroup and process.
pub fn caller_name(c: &CallerSummary) -> String {
    match (&c.namespace, &c.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => format!(
            "{} ({} pid {})",
            c.cgroup.as_deref().unwrap_or("?"),
            c.comm,
            c.pid
        ),
    }
}

/// `mcpwarden approvals list`: one line per held call.
pub fn render(list: &[Summary]) -> String {
    use std::fmt::Write;
    if list.is_empty() {
        return "no calls wait for approval\n".to_owned();
    }
    let mut out = String::new();
    for s in list {
        let _ = writeln!(
            out,
            "{}  {:>4}s left  {}  {}/{}  args [{}] sha256 {}",
            s.id,
            s.expires_in_s,
            caller_name(&s.caller),
            s.server,
            s.tool,
            s.arg_keys.join(", "),
            s.args_sha256.get(..12).unwrap_or(&s.args_sha256),
        );
        if let Some(reason) = &s.reason {
            let _ = writeln!(out, "          rule {}: {reason}", s.rule);
        }
        if let Some(args) = &s.arguments {
            let _ = writeln!(out, "          arguments {args}");
        }
    }
    out
}

/// Why `by` may not decide the held call `e`: it is the caller's own cgroup, pod, uid (but
/// root's), or a service account of the caller's namespace; or the caller is in a pod whose
/// service account is not known, so a Kubernetes approver cannot be told apart from it.
fn self_approval(e: &Entry, by: &Approver) -> Option<&'static str> {
    let caller = &e.summary.caller;
    if by.cgroup_id.is_some_and(|c| c == caller.cgroup_id) {
        return Some("the approver is in the caller's own cgroup");
    }
    if let (Some(a), Some(b)) = (&by.pod_uid, &caller.pod_uid) {
        if a == b {
            return Some("the approver is in the caller's own pod");
        }
    }
    if by.via == Via::Cli && by.uid.is_some_and(|u| u != 0 && u == caller.uid) {
        return Some("the approver runs as the caller's own uid");
    }
    if let Some(user) = &by.user {
        if e.caller_user.as_deref() == Some(user.as_str()) {
            return Some("the approver is the caller's own service account");
        }
        if let Some(ns) = &caller.namespace {
            if user.starts_with(&format!("system:serviceaccount:{ns}:")) {
                return Some("the approver is a service account of the caller's namespace");
            }
        }
        if e.caller_in_pod && e.caller_user.is_none() {
            return Some(
                "the caller's pod is not known yet, so a Kubernetes approver cannot be told apart \
                 from it",
            );
        }
    }
    None
}

/// Eight characters of Crockford's base32 (no i, l, o, u): 40 bits, short to type.
fn new_id() -> String {
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let mut bytes = [0u8; 8];
    user::random(&mut bytes);
    bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 31)]))
        .collect()
}

/// A held call, from its worker's side. Dropping it before the wait ended (its client went)
/// gives the approval up.
#[derive(Debug)]
pub struct Held {
    id: String,
    summary: Arc<Summary>,
    rx: oneshot::Receiver<Resolution>,
    deadline: Instant,
    approvals: Arc<Approvals>,
    open: bool,
}

impl Held {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Waits for a decision until the deadline.
    pub async fn wait(&mut self) -> Waited {
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let waited = match tokio::time::timeout_at(deadline, &mut self.rx).await {
            Ok(Ok(r)) => Waited::Decided(r),
            Ok(Err(_)) => Waited::Cancelled,
            Err(_) => {
                // Timed out: unless a decision won the race for the entry, it is gone now.
                let removed = self.approvals.lock().remove(&self.id).is_some();
                // Not removed here: a decision (sent under the same lock) or a cancellation
                // took it first, and its outcome is already in the channel.
                match (removed, self.rx.try_recv()) {
                    (false, Ok(r)) => Waited::Decided(r),
                    (false, Err(_)) => Waited::Cancelled,
                    (true, _) => Waited::TimedOut,
                }
            }
        };
        self.open = false;
        let outcome = match &waited {
            Waited::Decided(r) if r.approved => "approved",
            Waited::Decided(_) => "denied",
            Waited::TimedOut => "timed_out",
            Waited::Cancelled => "abandoned",
        };
        self.approvals.closed(&self.id, outcome);
        waited
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.open {
            self.approvals.lock().remove(&self.id);
            self.approvals.closed(&self.id, "abandoned");
        }
    }
}

#[cfg(test)]
mod tests;
