//! Step 2b of a call: the calls the policy holds for an approval (`action: require_approval`)
//! are approved, refused or handed to their client's user before anything is audited as
//! forwarded.
//!
//! - **Operator** (the default): the call waits in [`crate::approvals::Approvals`] until an
//!   approver decides (`mcpwarden approvals`, an `Approval` resource), it times out, its
//!   client cancels it or goes. Approved, it is decided again against the policy in force
//!   then ([`crate::policy::Engine::decide_approved_call`]: only now are its limits counted);
//!   anything else refuses it. An approval given `--for` a while covers the caller's next
//!   calls of that tool without asking.
//! - **User** (`approval: user`, a 2026-07-28 client that declared elicitation): the call is
//!   answered `input_required` with an elicitation and a signed `requestState`
//!   ([`crate::approvals::user`]); the retry that carries an accepted answer is decided again
//!   and forwarded as the original call.
//!
//! Every step writes an `approval` record.

use std::{sync::Arc, time::Duration};

use serde_json::Value;

use super::{
    call::{Judged, ScopeKeys},
    choose::Chosen,
    conn::Conn,
    context::Routed,
    session::Session,
};
use crate::{
    approvals::{
        user::{self, Binding},
        Approver, CallerSummary, HoldRequest, Summary, Via, Waited,
    },
    audit::{ApprovalPart, Event, Head, Record},
    mcp,
    policy::{ApprovalMode, Call, Decision, Outcome},
};

/// How often a held call whose client sent a progress token hears that it still waits.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where a held call's progress notifications go.
pub(super) enum ProgressSink {
    /// HTTP+SSE: the session's GET stream, where its answers go too.
    Legacy(Arc<Session>),
    /// Streamable HTTP: the SSE stream this request is answered on.
    Stream(tokio::sync::mpsc::Sender<bytes::Bytes>),
}

impl ProgressSink {
    fn send(&self, event: bytes::Bytes) {
        match self {
            ProgressSink::Legacy(s) => {
                s.inject(event);
            }
            // Full: this notification is skipped, the next one tells the same.
            ProgressSink::Stream(tx) => {
                let _ = tx.try_send(event);
            }
        }
    }
}

impl Conn {
    /// Resolves every held call of `judged`: `Allow` (approved and decided again), a refusal
    /// with the reason, or (user approval) mcpwarden's `input_required` answer. `user_ok`:
    /// the body may be answered `input_required` (a single message, not HTTP+SSE). Returns the
    /// policy the calls were decided against last (an approval re-chooses it: a reload may
    /// have changed it).
    pub(super) async fn approve_held(
        &self,
        routed: Routed<'_>,
        chosen: Chosen,
        mut judged: Vec<Judged>,
        user_ok: bool,
        sink: Option<&ProgressSink>,
        keys: &ScopeKeys,
    ) -> (Chosen, Vec<Judged>) {
        let mut waits = Vec::new();
        for (i, j) in judged.iter_mut().enumerate() {
            let Some(approval) = j.held_for().cloned() else {
                continue;
            };
            let user = approval.mode == ApprovalMode::User
                && j.msg.stateless_2026
                && j.msg.elicitation
                && user_ok;
            if user {
                self.ask_user(routed, &chosen, j, keys, approval.timeout);
            } else {
                waits.push((i, approval));
            }
        }
        if waits.is_empty() {
            return (chosen, judged);
        }
        // Held concurrently (a batch may hold several); each resolves to approved or not.
        let outcomes = futures_util::future::join_all(waits.iter().map(|(i, approval)| {
            let j = &judged[*i];
            self.wait_for_operator(routed, &chosen, j, approval, keys, sink)
        }))
        .await;
        let approved_any = outcomes.iter().any(Option::is_none);
        let chosen = if approved_any {
            // Decided again against the policy in force now.
            self.choose_policy(routed).await
        } else {
            chosen
        };
        let now = std::time::Instant::now();
        for ((i, _), refused) in waits.into_iter().zip(outcomes) {
            let j = &mut judged[i];
            j.decision = Some(match refused {
                Some(refusal) => refusal,
                None => self.decide_approved(&chosen, j, keys, now),
            });
        }
        (chosen, judged)
    }

    /// The decision of an approved call against `chosen` (an unresolved identity still refuses).
    fn decide_approved(
        &self,
        chosen: &Chosen,
        j: &Judged,
        keys: &ScopeKeys,
        now: std::time::Instant,
    ) -> Decision {
        if let Some(unresolved) = &chosen.unresolved {
            return unresolved.clone();
        }
        chosen.engine.decide_approved_call(
            &Call {
                tool: j.msg.tool.as_deref().unwrap_or_default(),
                arguments: j.msg.arguments.as_ref(),
            },
            &keys.scope(),
            now,
        )
    }

    /// Operator approval: remembered, or held until decided. `None`: approved; else the refusal.
    async fn wait_for_operator(
        &self,
        routed: Routed<'_>,
        chosen: &Chosen,
        j: &Judged,
        approval: &crate::policy::Approval,
        keys: &ScopeKeys,
        sink: Option<&ProgressSink>,
    ) -> Option<Decision> {
        let tool = j.msg.tool.as_deref().unwrap_or_default();
        let server = routed.server.name.as_str();
        // Only held calls get here; anything else is refused, never let through.
        let Some(held_by) = j.decision.as_ref() else {
            return Some(refused(
                &Decision {
                    outcome: Outcome::ApprovalRequired,
                    rule: String::new(),
                    reason: None,
                    would: None,
                    reservation: None,
                    approval: None,
                },
                "approval state lost".to_owned(),
            ));
        };
        if let Some(by) = self.shared.approvals.remembered(&keys.grant, server, tool) {
            // Who approved it for a while, recorded as such.
            let part = ApprovalPart {
                by: Some(Approver {
                    via: Via::Remembered,
                    ..by
                }),
                ..step(None, "remembered", "operator")
            };
            self.audit_step(&j.head, held_by, part, None);
            return None;
        }
        let request = HoldRequest {
            summary: self.summary(routed, chosen, j, held_by, approval),
            caller_key: keys.grant.clone(),
            caller_user: chosen.pod.as_deref().map(|p| {
                format!(
                    "system:serviceaccount:{}:{}",
                    p.meta.namespace, p.meta.service_account
                )
            }),
            caller_in_pod: chosen.in_pod,
            request_id: j.msg.id.as_ref().map(Value::to_string).unwrap_or_default(),
            session: keys.session.clone(),
            timeout: approval.timeout,
        };
        let mut held = match self.shared.approvals.hold(request) {
            Ok(h) => h,
            Err(why) => return Some(refused(held_by, why)),
        };
        let id = held.id().to_owned();
        self.audit_step(
            &j.head,
            held_by,
            step(Some(&id), "requested", "operator"),
            None,
        );
        // Given up if this future is dropped (the client went): `Held` removes itself, and
        // this guard writes the record.
        let mut guard = Abandoned {
            conn: self,
            head: j.head.clone(),
            rule: held_by.rule.clone(),
            id: id.clone(),
            armed: true,
        };
        let progress = j.msg.progress_token.as_ref().zip(sink);
        let waited = {
            let wait = held.wait();
            tokio::pin!(wait);
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            tick.tick().await;
            let mut n = 0u64;
            loop {
                tokio::select! {
                    w = &mut wait => break w,
                    _ = tick.tick() => {
                        if let Some((token, sink)) = progress {
                            n += 1;
                            let note = mcp::progress_notification(
                                token,
                                n,
                                &format!("waiting for approval {id}"),
                            );
                            sink.send(mcp::message_event(&note));
                        }
                    }
                }
            }
        };
        guard.armed = false;
        match waited {
            Waited::Decided(r) if r.approved => {
                let remember = r.remember.map(|d| d.as_secs());
                let part = ApprovalPart {
                    by: Some(r.by.clone()),
                    remember_s: remember,
                    ..step(Some(&id), "approved", "operator")
                };
                self.audit_step(&j.head, held_by, part, r.reason.as_deref());
                None
            }
            Waited::Decided(r) => {
                let part = ApprovalPart {
                    by: Some(r.by.clone()),
                    ..step(Some(&id), "denied", "operator")
                };
                self.audit_step(&j.head, held_by, part, r.reason.as_deref());
                let who = who(&r.by);
                Some(refused(
                    held_by,
                    match r.reason.as_deref() {
                        Some(why) => format!("approval denied by {who}: {why}"),
                        None => format!("approval denied by {who}"),
                    },
                ))
            }
            Waited::TimedOut => {
                self.audit_step(
                    &j.head,
                    held_by,
                    step(Some(&id), "timed_out", "operator"),
                    None,
                );
                Some(refused(held_by, "approval timed out".to_owned()))
            }
            Waited::Cancelled => {
                self.audit_step(
                    &j.head,
                    held_by,
                    step(Some(&id), "abandoned", "operator"),
                    None,
                );
                Some(refused(
                    held_by,
                    "approval abandoned: the client cancelled the call".to_owned(),
                ))
            }
        }
    }

    /// User approval: a retry with mcpwarden's state is checked and, accepted, decided again;
    /// any other call is answered `input_required`.
    fn ask_user(
        &self,
        routed: Routed<'_>,
        chosen: &Chosen,
        j: &mut Judged,
        keys: &ScopeKeys,
        timeout: Option<Duration>,
    ) {
        let Some(held_by) = j.decision.clone() else {
            return;
        };
        let tool = j.msg.tool.clone().unwrap_or_default();
        let args_sha256 = j.msg.args_sha256.clone().unwrap_or_default();
        let binding = Binding {
            server: &routed.server.name,
            tool: &tool,
            args_sha256: &args_sha256,
            caller: &keys.grant,
            policy_sha256: &chosen.engine.policy().source().sha256,
        };
        let ours = match &j.msg.request_state {
            Some(Value::String(s)) if user::UserApprovals::is_ours(s) => Some(s.clone()),
            _ => None,
        };
        if let Some(state) = ours {
            let answer = j
                .msg
                .input_responses
                .as_ref()
                .and_then(|r| r.get(user::INPUT_KEY));
            match self.shared.user_approvals.verify(&state, &binding, answer) {
                Ok(approved) => {
                    let part = ApprovalPart {
                        by: the_user(),
                        ..step(None, "approved", "user")
                    };
                    self.audit_step(&j.head, &held_by, part, None);
                    j.decision =
                        Some(self.decide_approved(chosen, j, keys, std::time::Instant::now()));
                    j.round_trip = Some((approved.server_state, approved.server_responses));
                }
                Err(rejected) => {
                    let name = if rejected.by_user {
                        "denied"
                    } else {
                        "refused"
                    };
                    let why = rejected.reason;
                    let part = ApprovalPart {
                        by: the_user(),
                        ..step(None, name, "user")
                    };
                    self.audit_step(&j.head, &held_by, part, Some(&why));
                    j.decision = Some(refused(&held_by, why));
                }
            }
            return;
        }
        let state = self.shared.user_approvals.issue(
            &binding,
            timeout.unwrap_or(user::DEFAULT_EXPIRY),
            j.msg.request_state.clone(),
            j.msg.input_responses.clone(),
        );
        let Some(id) = j.msg.id.as_ref() else {
            return;
        };
        let request = user::input_request(
            &routed.server.name,
            &tool,
            held_by.reason.as_deref(),
            j.msg.arguments.as_ref().unwrap_or(&Value::Null),
        );
        let requests = serde_json::json!({ user::INPUT_KEY: request });
        j.answer = Some(mcp::input_required_response(id, &requests, &state));
        self.audit_step(&j.head, &held_by, step(None, "requested", "user"), None);
        j.decision = Some(refused(
            &held_by,
            "approval asked of the client's user (input_required)".to_owned(),
        ));
    }

    /// What an approver is shown.
    fn summary(
        &self,
        routed: Routed<'_>,
        chosen: &Chosen,
        j: &Judged,
        held_by: &Decision,
        approval: &crate::policy::Approval,
    ) -> Summary {
        let c = &self.caller;
        let pod = chosen.pod.as_deref();
        Summary {
            caller: CallerSummary {
                cgroup_id: c.cgroup_id,
                cgroup: c.cgroup.as_deref().map(str::to_owned),
                pid: c.pid,
                uid: c.uid,
                comm: c.comm.clone(),
                pod: pod.map(|p| p.meta.name.clone()),
                namespace: pod.map(|p| p.meta.namespace.clone()),
                pod_uid: pod
                    .map(|p| p.meta.uid.clone())
                    .or_else(|| c.workload.pod_uid.clone()),
                service_account: pod.map(|p| p.meta.service_account.clone()),
                container: pod.and_then(|p| p.meta.container.clone()),
            },
            server: routed.server.name.clone(),
            tool: j.msg.tool.clone().unwrap_or_default(),
            arg_keys: j.msg.arg_keys.clone(),
            args_sha256: j.msg.args_sha256.clone().unwrap_or_default(),
            arguments: approval
                .show_arguments
                .then(|| j.msg.arguments.clone())
                .flatten(),
            rule: held_by.rule.clone(),
            reason: held_by.reason.clone(),
            policy: chosen.engine.policy().source().file.clone(),
            remember_s: approval.remember.map(|d| d.as_secs()),
            ..Summary::default()
        }
    }

    /// An `approval` record of the call whose records start with `head`.
    fn audit_step(
        &self,
        head: &Arc<Head>,
        held_by: &Decision,
        part: ApprovalPart,
        reason: Option<&str>,
    ) {
        self.write_audit(&step_record(head, &held_by.rule, part, reason));
    }
}

/// One step of an approval, without an approver (who is added where one decided).
fn step(id: Option<&str>, step: &'static str, mode: &'static str) -> ApprovalPart {
    ApprovalPart {
        id: id.map(str::to_owned),
        step,
        mode,
        by: None,
        remember_s: None,
    }
}

/// The user who answered mcpwarden's elicitation.
fn the_user() -> Option<Approver> {
    Some(Approver {
        via: Via::User,
        ..Approver::default()
    })
}

fn step_record(head: &Arc<Head>, rule: &str, part: ApprovalPart, reason: Option<&str>) -> Record {
    let mut rec = Record::new(Event::Approval, head.clone());
    rec.rule = Some(rule.to_owned());
    rec.reason = reason.map(str::to_owned);
    rec.approval = Some(part);
    rec
}

/// The refusal of a held call that was not approved: audited as `require_approval`.
fn refused(held_by: &Decision, reason: String) -> Decision {
    Decision {
        outcome: Outcome::ApprovalRequired,
        rule: held_by.rule.clone(),
        reason: Some(reason),
        would: None,
        reservation: None,
        approval: None,
    }
}

/// How the refusal names an approver.
fn who(by: &Approver) -> String {
    if let Some(user) = &by.user {
        return user.clone();
    }
    match (&by.claimed_as, by.uid) {
        (Some(name), Some(uid)) => format!("{name} (uid {uid})"),
        (None, Some(uid)) => format!("uid {uid}"),
        (Some(name), None) => name.clone(),
        (None, None) => "an approver".to_owned(),
    }
}

/// Writes the `abandoned` record of a held call whose client went before it was decided.
struct Abandoned<'a> {
    conn: &'a Conn,
    head: Arc<Head>,
    rule: String,
    id: String,
    armed: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            let rec = step_record(
                &self.head,
                &self.rule,
                step(Some(&self.id), "abandoned", "operator"),
                Some("the client went before the call was decided"),
            );
            self.conn.write_audit_deferred(&rec);
        }
    }
}
