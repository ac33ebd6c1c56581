//! Approval by the client's user, inside the protocol (`approval: user`, 2026-07-28 clients
//! that declared elicitation).
//!
//! The call is answered with `resultType: "input_required"`: an elicitation asking the user to
//! approve it, and a `requestState` only this agent can have made — `mcpw1.<payload>.<mac>`,
//! the payload (base64url JSON) naming a nonce, the server, the tool, the sha256 of the
//! canonical arguments, the caller, the policy's sha256 and an expiry, the MAC an
//! HMAC-SHA256 of it under a key this process drew at start and never wrote anywhere. The
//! retry must carry the same arguments and an accepted answer; each nonce is accepted once.
//! The spent nonces are in memory too: a state from another run (before a restart or a
//! hand-over) fails the MAC, so none can be replayed to an agent that never saw it spent.
//!
//! A server's own multi-round-trip is kept whole: when the call that needs approval already
//! carries a server's `requestState` and `inputResponses`, they travel inside the payload and
//! are put back when the approved retry is forwarded.
//!
//! Written by hand: the format is a MAC over a small JSON payload (ring's HMAC, base64); no
//! token library is needed for that, and JWT's algorithm choices are a risk we do not need.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use ring::{hmac, rand::SecureRandom};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The key of mcpwarden's own entry in `inputRequests` / `inputResponses`.
pub const INPUT_KEY: &str = "mcpwarden_approval";
/// How a state this node made begins.
const PREFIX: &str = "mcpw1.";
/// Default lifetime of a state: the user reads and answers a dialog.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(300);
/// At most this many unexpired accepted nonces are remembered, on the node and per caller;
/// past it, retries are refused (forgetting one early would let it be replayed).
const MAX_NONCES: usize = 65_536;
const MAX_NONCES_PER_CALLER: usize = 4_096;

/// Fills `buf` from the kernel's random source.
pub fn random(buf: &mut [u8]) {
    if ring::rand::SystemRandom::new().fill(buf).is_err() {
        // getrandom(2) does not fail on Linux once the pool is initialised; if it did, the
        // ids and nonces must still not be guessable from each other.
        let _ = getrandom_fallback(buf);
    }
}

fn getrandom_fallback(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// What a state binds the retry to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding<'a> {
    pub server: &'a str,
    pub tool: &'a str,
    pub args_sha256: &'a str,
    /// The caller's `grant` key (pod UID or cgroup id).
    pub caller: &'a str,
    pub policy_sha256: &'a str,
}

#[derive(Serialize, Deserialize)]
struct Payload {
    n: String,
    s: String,
    t: String,
    a: String,
    c: String,
    p: String,
    /// Expiry, seconds since the epoch.
    e: u64,
    /// A server's own `requestState` and `inputResponses`, put back on the approved retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    is: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ir: Option<Value>,
}

/// An approved retry: what to forward in place of mcpwarden's state and answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Approved {
    pub server_state: Option<Value>,
    pub server_responses: Option<Value>,
}

/// Why a retry was not approved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The user answered, and not with an approval (declined, cancelled, or `approve` not
    /// true); else the state or the call is wrong (forged, replayed, expired, moved).
    pub by_user: bool,
    pub reason: String,
}

impl Rejected {
    fn state(reason: impl Into<String>) -> Rejected {
        Rejected {
            by_user: false,
            reason: reason.into(),
        }
    }
}

/// The spent nonces: each with its state's expiry and its caller, counted per caller so that
/// one caller cannot fill the table for everyone.
#[derive(Default)]
struct Spent {
    nonces: HashMap<String, (u64, String)>,
    per_caller: HashMap<String, usize>,
    /// When expired nonces were last dropped (at most once a second, not on every retry).
    pruned: u64,
}

impl Spent {
    fn prune(&mut self, now: u64) {
        if self.pruned == now {
            return;
        }
        self.pruned = now;
        let per_caller = &mut self.per_caller;
        self.nonces.retain(|_, (exp, caller)| {
            let keep = *exp >= now;
            if !keep {
                if let Some(n) = per_caller.get_mut(caller.as_str()) {
                    *n = n.saturating_sub(1);
                }
            }
            keep
        });
        per_caller.retain(|_, n| *n > 0);
    }
}

/// The node's key and the nonces accepted so far (shared by the workers).
pub struct UserApprovals {
    key: hmac::Key,
    used: Mutex<Spent>,
}

impl Default for UserApprovals {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for UserApprovals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserApprovals(..)")
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl UserApprovals {
    /// A fresh random key, in this process only.
    pub fn new() -> UserApprovals {
        let mut key = [0u8; 32];
        random(&mut key);
        Self::with_key(&key)
    }

    pub fn with_key(bytes: &[u8]) -> UserApprovals {
        UserApprovals {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
            used: Mutex::new(Spent::default()),
        }
    }

    /// A new state for `binding`, valid for `expiry`, carrying the server's own round-trip.
    pub fn issue(
        &self,
        binding: &Binding<'_>,
        expiry: Duration,
        server_state: Option<Value>,
        server_responses: Option<Value>,
    ) -> String {
        let mut nonce = [0u8; 16];
        random(&mut nonce);
        let payload = Payload {
            n: hex(&nonce),
            s: binding.server.to_owned(),
            t: binding.tool.to_owned(),
            a: binding.args_sha256.to_owned(),
            c: binding.caller.to_owned(),
            p: binding.policy_sha256.to_owned(),
            e: unix_now() + expiry.as_secs(),
            is: server_state,
            ir: server_responses,
        };
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).unwrap_or_default());
        let mac = hmac::sign(&self.key, body.as_bytes());
        format!("{PREFIX}{body}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
    }

    /// Whether a `requestState` is one of ours (else it is the server's: passed through).
    pub fn is_ours(state: &str) -> bool {
        state.starts_with(PREFIX)
    }

    /// Checks a retry's state and answer. Err: why it is refused.
    pub fn verify(
        &self,
        state: &str,
        binding: &Binding<'_>,
        answer: Option<&Value>,
    ) -> Result<Approved, Rejected> {
        let rest = state
            .strip_prefix(PREFIX)
            .ok_or_else(|| Rejected::state("the requestState is not mcpwarden's"))?;
        let malformed = || Rejected::state("the requestState is malformed");
        let (body, mac) = rest.split_once('.').ok_or_else(malformed)?;
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| malformed())?;
        hmac::verify(&self.key, body.as_bytes(), &mac).map_err(|_| {
            Rejected::state(
                "the requestState was not made by this agent (or by one before a restart or \
                 hand-over), or was altered: call the tool again",
            )
        })?;
        let payload: Payload = URL_SAFE_NO_PAD
            .decode(body)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(malformed)?;
        let now = unix_now();
        if payload.e < now {
            return Err(Rejected::state("the approval expired: call the tool again"));
        }
        let same =
            payload.s == binding.server && payload.t == binding.tool && payload.c == binding.caller;
        if !same {
            return Err(Rejected::state("the requestState belongs to another call"));
        }
        if payload.a != binding.args_sha256 {
            return Err(Rejected::state(
                "the arguments changed since they were approved: call the tool again",
            ));
        }
        if payload.p != binding.policy_sha256 {
            return Err(Rejected::state(
                "the policy changed since the approval was asked: call the tool again",
            ));
        }
        let accepted = answer.is_some_and(|a| {
            a.get("action").and_then(Value::as_str) == Some("accept")
                && a.pointer("/content/approve") == Some(&Value::Bool(true))
        });
        // The nonce is spent by any verified answer, accepted or not: a declined state cannot
        // be answered again.
        {
            let mut used = self
                .used
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if used.nonces.contains_key(&payload.n) {
                return Err(Rejected::state("the requestState was already used"));
            }
            used.prune(now);
            if used.nonces.len() >= MAX_NONCES {
                return Err(Rejected::state(
                    "too many approvals answered recently on this node: try again later",
                ));
            }
            let mine = used.per_caller.entry(payload.c.clone()).or_insert(0);
            if *mine >= MAX_NONCES_PER_CALLER {
                return Err(Rejected::state(
                    "too many approvals answered recently by this caller: try again later",
                ));
            }
            *mine += 1;
            used.nonces
                .insert(payload.n.clone(), (payload.e, payload.c.clone()));
        }
        if !accepted {
            let action = answer.and_then(|a| a.get("action")).and_then(Value::as_str);
            return Err(Rejected {
                by_user: answer.is_some(),
                reason: match action {
                    Some("decline") => "the user declined the call".to_owned(),
                    Some("cancel") => "the user cancelled the approval".to_owned(),
                    Some(_) | None if answer.is_some() => {
                        "the user did not approve the call".to_owned()
                    }
                    _ => format!("the retry carries no answer to {INPUT_KEY}"),
                },
            });
        }
        Ok(Approved {
            server_state: payload.is,
            server_responses: payload.ir,
        })
    }
}

/// The `inputRequests` entry asking the user to approve a call.
pub fn input_request(server: &str, tool: &str, reason: Option<&str>, arguments: &Value) -> Value {
    let mut message =
        format!("mcpwarden: the agent wants to call the tool \"{tool}\" on {server}.");
    if let Some(r) = reason {
        message.push_str(&format!(" Policy: {r}."));
    }
    message.push_str(&format!(" Arguments: {arguments}. Approve this call?"));
    json!({
        "method": "elicitation/create",
        "params": {
            "mode": "form",
            "message": message,
            "requestedSchema": {
                "type": "object",
                "properties": {
                    "approve": {
                        "type": "boolean",
                        "title": "Approve",
                        "description": format!("Let this call to {tool} run once"),
                    }
                },
                "required": ["approve"],
            }
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding<'a>(args: &'a str) -> Binding<'a> {
        Binding {
            server: "payments",
            tool: "pay",
            args_sha256: args,
            caller: "pod:1",
            policy_sha256: "p1",
        }
    }

    fn yes() -> Value {
        json!({"action": "accept", "content": {"approve": true}})
    }

    #[test]
    fn accepted_once_and_bound_to_its_call() {
        let u = UserApprovals::with_key(&[7; 32]);
        let s = u.issue(&binding("h1"), DEFAULT_EXPIRY, None, None);
        assert!(UserApprovals::is_ours(&s));
        // Changed arguments, another tool, another caller, another policy: refused, and the
        // nonce is not spent by them.
        assert!(u.verify(&s, &binding("h2"), Some(&yes())).is_err());
        let other = Binding {
            caller: "pod:2",
            ..binding("h1")
        };
        assert!(u.verify(&s, &other, Some(&yes())).is_err());
        let reloaded = Binding {
            policy_sha256: "p2",
            ..binding("h1")
        };
        assert!(u.verify(&s, &reloaded, Some(&yes())).is_err());
        assert_eq!(
            u.verify(&s, &binding("h1"), Some(&yes())),
            Ok(Approved {
                server_state: None,
                server_responses: None
            })
        );
        let again = u.verify(&s, &binding("h1"), Some(&yes()));
        assert!(again.is_err_and(|e| !e.by_user && e.reason.contains("already used")));
    }

    #[test]
    fn tampered_declined_foreign_and_expired_are_refused() {
        let u = UserApprovals::with_key(&[7; 32]);
        let s = u.issue(&binding("h1"), DEFAULT_EXPIRY, None, None);
        // Flip one character of the payload.
        let mut t: Vec<char> = s.chars().collect();
        let i = PREFIX.len() + 3;
        t[i] = if t[i] == 'A' { 'B' } else { 'A' };
        let t: String = t.into_iter().collect();
        assert!(u
            .verify(&t, &binding("h1"), Some(&yes()))
            .is_err_and(|e| !e.by_user && e.reason.contains("altered")));
        let declined = json!({"action": "decline"});
        assert!(u
            .verify(&s, &binding("h1"), Some(&declined))
            .is_err_and(|e| e.by_user && e.reason.contains("declined")));
        // Declined spends it.
        assert!(u.verify(&s, &binding("h1"), Some(&yes())).is_err());
        let other_node = UserApprovals::with_key(&[8; 32]);
        let s = other_node.issue(&binding("h1"), DEFAULT_EXPIRY, None, None);
        assert!(u.verify(&s, &binding("h1"), Some(&yes())).is_err());
        let s = u.issue(&binding("h1"), Duration::ZERO, None, None);
        std::thread::sleep(Duration::from_millis(1100));
        assert!(u
            .verify(&s, &binding("h1"), Some(&yes()))
            .is_err_and(|e| e.reason.contains("expired")));
    }

    #[test]
    fn a_servers_round_trip_travels_inside() {
        let u = UserApprovals::with_key(&[7; 32]);
        let s = u.issue(
            &binding("h1"),
            DEFAULT_EXPIRY,
            Some(json!("server-state")),
            Some(json!({"confirm": {"action": "accept"}})),
        );
        let got = u.verify(&s, &binding("h1"), Some(&yes()));
        assert_eq!(
            got.map(|a| (a.server_state, a.server_responses)),
            Ok((
                Some(json!("server-state")),
                Some(json!({"confirm": {"action": "accept"}}))
            ))
        );
    }

    #[test]
    fn another_run_s_states_are_refused() {
        let a = UserApprovals::new();
        let b = UserApprovals::new();
        let s = a.issue(&binding("h1"), DEFAULT_EXPIRY, None, None);
        assert!(b
            .verify(&s, &binding("h1"), Some(&yes()))
            .is_err_and(|e| e.reason.contains("restart")));
        assert!(a.verify(&s, &binding("h1"), Some(&yes())).is_ok());
    }
}
