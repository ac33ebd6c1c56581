//! Operating a running agent: the admin socket (status, reload, explain, health; never on TCP),
//! the metrics listener (`/metrics`, `/healthz`, `/readyz`), and the CLI's side of both.
//!
//! | file | what |
//! |---|---|
//! | [`socket`] | the admin socket: a Unix socket speaking HTTP/1.1, peers checked by credentials |
//! | [`listener`] | the metrics listener: TCP, three read-only paths |
//! | [`health`] | liveness and readiness |
//! | [`status`] | what `mcpwarden status` shows, and its rendering |
//! | [`client`] | the CLI's requests to the admin socket |
//!
//! Neither server knows the agent's internals: `app` implements [`Control`] over the parts it
//! assembled.

pub mod client;
pub mod health;
pub mod listener;
pub mod socket;
pub mod status;

use serde::{Deserialize, Serialize};

/// Default admin socket.
pub const DEFAULT_SOCKET: &str = "/run/mcpwarden/admin.sock";
/// Default metrics listener: the host's loopback.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9478";

/// What the admin API asks of the running agent.
pub trait Control: Send + Sync + 'static {
    fn status(&self) -> status::Status;
    /// Re-read the policies and the config now; waits for the outcome.
    fn reload(&self) -> Reloaded;
    /// Decide a call against the live policy and counters, without counting it.
    fn explain(&self, query: &ExplainQuery) -> Result<serde_json::Value, String>;
    fn health(&self) -> health::Report;
    /// A peer the admin socket refused, for the audit log.
    fn refused(&self, pid: u32, uid: u32, reason: &str);
    /// The calls held for an approval on this node, the oldest first.
    fn approvals(&self) -> Vec<crate::approvals::Summary>;
    /// Approve or deny a held call, as `peer`. Err: the HTTP status and why not (404 no such
    /// approval, 403 the approver is the caller's own workload, 400 a bad `for`, 409 its
    /// client went).
    fn decide(
        &self,
        decision: &Decide,
        peer: &Peer,
    ) -> Result<crate::approvals::Summary, (u16, String)>;
}

/// The admin socket's peer, from the kernel (`SO_PEERCRED`, `SO_PEERGROUPS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// `mcpwarden approvals approve|deny`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Decide {
    pub id: String,
    pub approve: bool,
    #[serde(default)]
    pub reason: Option<String>,
    /// `--for`: approve the same tool for the same caller for this long ("10m").
    #[serde(default, rename = "for")]
    pub for_: Option<String>,
    /// `--as NAME`: recorded as `claimed_as`.
    #[serde(default, rename = "as")]
    pub as_: Option<String>,
}

/// The outcome of a reload asked for on the admin socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reloaded {
    /// Files (and the config's routing) that changed and are in force now.
    pub changed: usize,
    /// `file:line:col: message` of each file that failed to load (the previous version stays).
    pub errors: Vec<String>,
}

/// `mcpwarden policy explain` against the running agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExplainQuery {
    /// The server whose default policy decides (by name); or
    #[serde(default)]
    pub server: Option<String>,
    /// a policy file the agent has loaded (its path as configured).
    #[serde(default)]
    pub policy: Option<String>,
    pub tool: String,
    #[serde(default)]
    pub arguments: Option<serde_json::Value>,
    /// Limit scope keys: `grant`, `process`, `session`, `namespace`, `service_account`.
    #[serde(default)]
    pub grant: Option<String>,
    #[serde(default)]
    pub process: Option<String>,
    #[serde(default)]
    pub session: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub service_account: Option<String>,
}
