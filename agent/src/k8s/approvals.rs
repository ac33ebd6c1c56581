//! `Approval` resources (`approvals.mcpwarden.io/v1alpha1`): held calls decided from the
//! cluster, without exec into the agent's pod. RBAC on the resource says who may decide; the
//! ValidatingAdmissionPolicy `mcpwarden-approvals` (deploy/kustomize/base/approvals.yaml) makes
//! `spec.decidedBy` the name of the user who set the decision and keeps what the agent wrote
//! unchanged, so that an approver cannot rewrite what they approve.
//!
//! Two tasks, both off the data path:
//!
//! - the publisher: each pending approval of the registry becomes an `Approval` named by its id,
//!   in the agent's namespace, labelled `mcpwarden.io/node=<node>`. When the call is closed
//!   (decided by anyone, timed out, abandoned) its outcome is written to `status.state` and the
//!   object deleted: the audit log keeps the record. Best effort: a request that fails for a
//!   transient reason is retried a few times with backoff, then given up; the admin socket
//!   (`mcpwarden approvals`) decides held calls whatever the API server does.
//! - the watcher: this node's `Approval`s (kube-runtime's watcher, by label). An object whose
//!   `spec.decision` is set and whose call is pending here decides it, as
//!   `Approver { via: Resource, user: spec.decidedBy }`. A decision the registry refuses (the
//!   caller's own service account decided) or that cannot be read (a bad `spec.for`) is marked
//!   `status.state: refused` with the reason in `status.message`, and left: the admission policy
//!   lets an approver replace a refused decision, and the agent reads the new one. An object
//!   whose call is not pending here is not this agent's to decide (another agent on the node
//!   during a hand-over, or one left behind by a restart); once past its `spec.expiresAt` (no
//!   call is held longer) it is deleted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams,
};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::task::{JoinHandle, JoinSet};

use super::backoff;
use crate::approvals::{Approvals, Approver, DecideError, Notice, Summary, Via};

pub const GROUP: &str = "mcpwarden.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "Approval";
pub const PLURAL: &str = "approvals";
/// The label naming the node whose agent holds the call (see [`node_label`]).
pub const NODE_LABEL: &str = "mcpwarden.io/node";
/// Who the agent's requests are recorded as in `managedFields`.
const FIELD_MANAGER: &str = "mcpwarden";

/// How many times a create or delete is tried before it is given up.
const ATTEMPTS: u32 = 5;
/// At most this many creations and deletions in flight; notices beyond are dropped.
const MAX_IN_FLIGHT: usize = 64;
/// Arguments shown in an `Approval` at most (serialised); larger ones are left out, and
/// `spec.argumentsOmitted` says so (etcd keeps objects of 1.5 MiB at most).
const ARGUMENTS_MAX: usize = 64 * 1024;
/// An object whose call is not pending here is deleted this long after its `spec.expiresAt`.
const STALE_GRACE: Duration = Duration::from_secs(60);
/// ... or, without a readable `spec.expiresAt`, this long after it was first seen.
const STALE_UNDATED: Duration = Duration::from_secs(600);
/// How often objects past their expiry are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The `Approval` resource, for `Api::<DynamicObject>::namespaced_with`.
pub fn api_resource() -> ApiResource {
    ApiResource {
        group: GROUP.to_owned(),
        version: VERSION.to_owned(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: KIND.to_owned(),
        plural: PLURAL.to_owned(),
    }
}

/// Starts the publisher and the watcher of this node's `Approval`s in `namespace`; they run
/// until the returned tasks are aborted. Call it within a Tokio runtime.
pub fn start(
    client: Client,
    namespace: String,
    node: String,
    approvals: Arc<Approvals>,
) -> Vec<JoinHandle<()>> {
    let api: Api<DynamicObject> = Api::namespaced_with(client, &namespace, &api_resource());
    let label = node_label(&node);
    // Subscribed before anything can be held after this returns: no notice is missed.
    let notices = approvals.subscribe();
    tracing::info!(
        namespace,
        node,
        "pending approvals are published as Approval resources ({PLURAL}.{GROUP}) and decided from them"
    );
    vec![
        tokio::spawn(publish(api.clone(), node, approvals.clone(), notices)),
        tokio::spawn(watch(api, label, approvals)),
    ]
}

/// The value of [`NODE_LABEL`] for `node`: the node's name when it is a valid label value (at
/// most 63 characters: most node names are), else its first 52 characters and a hash.
pub fn node_label(node: &str) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let ends_ok = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
    };
    if node.len() <= 63 && node.chars().all(allowed) && ends_ok(node) {
        return node.to_owned();
    }
    let hash = crate::policy::sha256_hex(node.as_bytes());
    let prefix: String = node.chars().filter(|c| allowed(*c)).take(52).collect();
    let prefix = prefix.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if prefix.is_empty() {
        hash[..10].to_owned()
    } else {
        format!("{prefix}-{}", &hash[..10])
    }
}

/// The `Approval` published for a pending approval (`summary` as the registry holds it).
pub fn object(summary: &Summary, node: &str, expires_at: SystemTime) -> DynamicObject {
    let mut o = DynamicObject::new(&summary.id, &api_resource()).data(json!({
        "spec": spec(summary, node, expires_at),
    }));
    o.metadata = ObjectMeta {
        name: Some(summary.id.clone()),
        labels: Some([(NODE_LABEL.to_owned(), node_label(node))].into()),
        ..ObjectMeta::default()
    };
    o
}

/// The agent's part of the spec: what is held, by whom, why and until when.
fn spec(summary: &Summary, node: &str, expires_at: SystemTime) -> Value {
    let c = &summary.caller;
    let caller = json!({
        "pod": c.pod,
        "namespace": c.namespace,
        "podUid": c.pod_uid,
        "serviceAccount": c.service_account,
        "container": c.container,
        "cgroup": c.cgroup,
        "cgroupId": c.cgroup_id,
        "pid": c.pid,
        "uid": c.uid,
        "comm": c.comm,
    });
    let (arguments, omitted) = match &summary.arguments {
        None => (None, None),
        Some(a) => {
            let size = serde_json::to_vec(a).map_or(usize::MAX, |v| v.len());
            if size <= ARGUMENTS_MAX {
                (Some(a.clone()), None)
            } else {
                let why = format!(
                    "{size} bytes of arguments, more than the {ARGUMENTS_MAX} an Approval shows: \
                     `mcpwarden approvals list --json` on the node shows them"
                );
                (None, Some(why))
            }
        }
    };
    let node = if summary.node.is_empty() {
        node
    } else {
        &summary.node
    };
    without_nulls(json!({
        "node": node,
        "server": summary.server,
        "tool": summary.tool,
        "caller": without_nulls(caller),
        "argKeys": summary.arg_keys,
        "argsSha256": summary.args_sha256,
        "arguments": arguments,
        "argumentsOmitted": omitted,
        "rule": summary.rule,
        "reason": summary.reason,
        "policy": summary.policy,
        "rememberSeconds": summary.remember_s,
        "requestedAt": summary.requested_at,
        "expiresAt": humantime::format_rfc3339_seconds(expires_at).to_string(),
    }))
}

/// An object's members without the null ones (absent, rather than null, in the resource).
fn without_nulls(mut v: Value) -> Value {
    if let Some(map) = v.as_object_mut() {
        map.retain(|_, v| !v.is_null());
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Publishing

async fn publish(
    api: Api<DynamicObject>,
    node: String,
    approvals: Arc<Approvals>,
    mut notices: broadcast::Receiver<Notice>,
) {
    let mut work = JoinSet::new();
    // Anything held before the subscription (a duplicate of a notice finds its object made).
    for s in approvals.list() {
        work.spawn(create(
            api.clone(),
            node.clone(),
            approvals.clone(),
            Arc::new(s),
        ));
    }
    loop {
        let notice = tokio::select! {
            notice = notices.recv() => notice,
            Some(_) = work.join_next(), if !work.is_empty() => continue,
        };
        if work.len() >= MAX_IN_FLIGHT {
            // Holds churning faster than the API server takes them: this notice is dropped
            // (the call can still be decided on the node; a missed close is swept).
            tracing::warn!(
                in_flight = work.len(),
                "too many Approval resource writes in flight: a notice is dropped"
            );
            continue;
        }
        match notice {
            Ok(Notice::Pending(summary)) => {
                work.spawn(create(
                    api.clone(),
                    node.clone(),
                    approvals.clone(),
                    summary,
                ));
            }
            Ok(Notice::Closed { id, outcome }) => {
                work.spawn(close(api.clone(), id, outcome));
            }
            Err(RecvError::Lagged(n)) => {
                // Publish what is pending now; objects of calls closed meanwhile are deleted
                // by the watcher's sweep once past their expiry.
                tracing::warn!(
                    missed = n,
                    "approval notices missed: publishing every pending approval again"
                );
                for s in approvals.list() {
                    work.spawn(create(
                        api.clone(),
                        node.clone(),
                        approvals.clone(),
                        Arc::new(s),
                    ));
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Publishes one pending approval, unless its call is closed first; deletes it again if the
/// call was closed while it was being made.
async fn create(
    api: Api<DynamicObject>,
    node: String,
    approvals: Arc<Approvals>,
    summary: Arc<Summary>,
) {
    let id = summary.id.clone();
    let expires_at = SystemTime::now() + Duration::from_secs(summary.expires_in_s);
    let object = object(&summary, &node, expires_at);
    let mut attempt = 0u32;
    loop {
        if approvals.get(&id).is_none() {
            return;
        }
        match create_once(&api, &object).await {
            Ok(()) => break,
            Err(e) if attempt + 1 >= ATTEMPTS || !transient(&e) => {
                tracing::warn!(
                    approval = id,
                    error = %describe(&e),
                    "cannot publish the pending approval as an Approval resource; it can be \
                     decided with `mcpwarden approvals` on the node"
                );
                return;
            }
            Err(e) => {
                tracing::debug!(approval = id, error = %e, "publishing the approval; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
        }
    }
    tracing::debug!(approval = id, "published as an Approval resource");
    if approvals.get(&id).is_none() {
        delete(&api, &id).await;
    }
}

async fn create_once(api: &Api<DynamicObject>, object: &DynamicObject) -> Result<(), kube::Error> {
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    };
    let name = object.metadata.name.clone().unwrap_or_default();
    match api.create(&pp, object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_already_exists() => {
            // Ours (an earlier attempt was made but its answer lost), or one of another run
            // that drew the same id: replaced, lest its decision decide this call.
            let current = api.get(&name).await?;
            let stamp = |o: &DynamicObject| o.data.pointer("/spec/requestedAt").cloned();
            if stamp(&current) == stamp(object) && stamp(object).is_some() {
                return Ok(());
            }
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => return Err(e),
            }
            api.create(&pp, object).await.map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// A closed call: its outcome in `status` (for `kubectl get -w`), then the object goes.
async fn close(api: Api<DynamicObject>, id: String, outcome: &'static str) {
    match set_status(&api, &id, outcome, None).await {
        Ok(()) => {}
        Err(kube::Error::Api(s)) if s.is_not_found() => {}
        Err(e) => tracing::debug!(approval = id, error = %e, "writing the approval's outcome"),
    }
    delete(&api, &id).await;
}

/// Deletes an `Approval`, retrying transient failures; absent is done.
async fn delete(api: &Api<DynamicObject>, name: &str) {
    let mut attempt = 0u32;
    loop {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => return,
            Err(kube::Error::Api(s)) if s.is_not_found() => return,
            Err(e) if attempt + 1 >= ATTEMPTS || !transient(&e) => {
                tracing::warn!(
                    approval = name,
                    error = %describe(&e),
                    "cannot delete the closed approval's Approval resource (it is deleted once \
                     past its expiry)"
                );
                return;
            }
            Err(e) => {
                tracing::debug!(approval = name, error = %e, "deleting the approval; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
        }
    }
}

/// Merge-patches `status` (the status subresource); a `None` message is removed.
async fn set_status(
    api: &Api<DynamicObject>,
    name: &str,
    state: &str,
    message: Option<&str>,
) -> Result<(), kube::Error> {
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    let patch = json!({"status": {"state": state, "message": message}});
    api.patch_status(name, &pp, &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Worth trying again: no answer, or the API server's overload and unavailability.
fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500 || s.is_conflict(),
        _ => true,
    }
}

/// An error, with what to do about the usual ones.
fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.is_not_found() => format!(
            "{e} (is the CustomResourceDefinition {PLURAL}.{GROUP} installed, and the namespace there?)"
        ),
        kube::Error::Api(s) if s.is_forbidden() => format!(
            "{e} (RBAC: the agent's Role must grant create, get, list, watch and delete on \
             {PLURAL} and patch on {PLURAL}/status; admission: an agent may create, delete and \
             mark only the approvals whose spec.node is its own node)"
        ),
        _ => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Deciding

/// What an `Approval`'s approver fields ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub approved: bool,
    /// `spec.decidedBy`: the Kubernetes user who set the decision (the admission policy checks
    /// it is the requesting user).
    pub by: String,
    pub reason: Option<String>,
    /// `spec.for`: approved, remembered this long.
    pub remember: Option<Duration>,
}

/// The decision `spec` asks for: `None` while there is none, `Err` with why it cannot be taken.
pub fn read_decision(spec: &Value) -> Option<Result<Request, String>> {
    let field = |name: &str| spec.get(name).filter(|v| !v.is_null());
    let decision = field("decision")?;
    Some((|| {
        let approved = match decision.as_str() {
            Some("approve") => true,
            Some("deny") => false,
            _ => {
                return Err(format!(
                    "spec.decision must be approve or deny, not {decision}"
                ))
            }
        };
        let by = match field("decidedBy").map(Value::as_str) {
            Some(Some(by)) if !by.trim().is_empty() => by.to_owned(),
            _ => {
                return Err(
                    "spec.decidedBy must be set with spec.decision: the approver's \
                            Kubernetes user name (kubectl auth whoami)"
                        .to_owned(),
                )
            }
        };
        let reason = match field("decisionReason") {
            None => None,
            Some(Value::String(r)) => Some(r.clone()),
            Some(other) => {
                return Err(format!("spec.decisionReason must be a string, not {other}"))
            }
        };
        let remember = match field("for") {
            None => None,
            Some(Value::String(d)) => {
                Some(crate::policy::parse_duration(d).map_err(|e| format!("spec.for: {e}"))?)
            }
            Some(other) => {
                return Err(format!(
                    "spec.for must be a duration such as \"10m\", not {other}"
                ))
            }
        };
        Ok(Request {
            approved,
            by,
            reason,
            remember,
        })
    })())
}

/// What became of an object's decision.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// None yet.
    Undecided,
    /// The call is decided.
    Decided,
    /// Not pending here (anymore): nothing to do.
    NotPending,
    /// Refused: why, for `status.message`.
    Refused(String),
}

/// Decides the held call `id` as `spec` asks.
pub fn take(approvals: &Approvals, id: &str, spec: &Value) -> Taken {
    let request = match read_decision(spec) {
        None => return Taken::Undecided,
        Some(Err(why)) => return Taken::Refused(why),
        Some(Ok(r)) => r,
    };
    // The object must describe the call held under its name: what was approved is what runs.
    if let Some(held) = approvals.get(id) {
        let same = spec.get("tool").and_then(Value::as_str) == Some(held.tool.as_str())
            && spec.get("server").and_then(Value::as_str) == Some(held.server.as_str())
            && spec.get("argsSha256").and_then(Value::as_str) == Some(held.args_sha256.as_str());
        if !same {
            return Taken::Refused(
                "this Approval does not describe the call held under its name (tool, server \
                 or arguments differ)"
                    .to_owned(),
            );
        }
    }
    let by = Approver {
        via: Via::Resource,
        user: Some(request.by.clone()),
        ..Approver::default()
    };
    match approvals.decide(id, request.approved, request.reason, request.remember, by) {
        Ok(_) => {
            tracing::info!(
                approval = id,
                approved = request.approved,
                by = request.by,
                "decided by its Approval resource"
            );
            Taken::Decided
        }
        Err(DecideError::NotFound(_) | DecideError::Abandoned(_)) => Taken::NotPending,
        Err(e @ DecideError::SelfApproval(..)) => Taken::Refused(e.to_string()),
    }
}

/// The approver's fields of a spec: a decision refused once is not tried again until one of
/// them changes.
fn approver_fields(spec: &Value) -> Value {
    json!([
        spec.get("decision"),
        spec.get("decidedBy"),
        spec.get("decisionReason"),
        spec.get("for"),
    ])
}

struct Watcher {
    api: Api<DynamicObject>,
    approvals: Arc<Approvals>,
    /// Objects whose decision was refused, with its approver fields.
    refused: HashMap<String, Value>,
    /// Objects whose call is not pending here, and when they may be deleted.
    stale: HashMap<String, SystemTime>,
}

async fn watch(api: Api<DynamicObject>, label: String, approvals: Arc<Approvals>) {
    let config = watcher::Config::default().labels(&format!("{NODE_LABEL}={label}"));
    let mut events = watcher(api.clone(), config).default_backoff().boxed();
    let mut w = Watcher {
        api,
        approvals,
        refused: HashMap::new(),
        stale: HashMap::new(),
    };
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = sweep.tick() => {
                w.sweep().await;
                continue;
            }
        };
        let Some(event) = event else {
            tracing::error!("the Approval watch ended");
            return;
        };
        match event {
            Ok(watcher::Event::Init) => {
                w.stale.clear();
            }
            Ok(watcher::Event::InitApply(o) | watcher::Event::Apply(o)) => {
                failing = false;
                w.applied(o).await;
            }
            Ok(watcher::Event::InitDone) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("watching this node's Approval resources again");
                }
                // What an earlier run left behind goes at once, not at the next tick.
                w.sweep().await;
            }
            Ok(watcher::Event::Delete(o)) => {
                let name = o.metadata.name.unwrap_or_default();
                w.refused.remove(&name);
                w.stale.remove(&name);
            }
            Err(e) => {
                failing = true;
                let text = match &e {
                    watcher::Error::InitialListFailed(k) | watcher::Error::WatchStartFailed(k) => {
                        describe(k)
                    }
                    other => other.to_string(),
                };
                tracing::warn!(
                    error = %text,
                    "watching this node's Approval resources; retrying with backoff (held calls \
                     are still decided with `mcpwarden approvals`)"
                );
            }
        }
    }
}

impl Watcher {
    async fn applied(&mut self, o: DynamicObject) {
        let Some(name) = o.metadata.name.clone() else {
            return;
        };
        // Every object seen is swept once past its expiry if it is still there then: its
        // call's `Closed` notice may have been missed (a lagging receiver).
        let sweep_at = o
            .data
            .pointer("/spec/expiresAt")
            .and_then(Value::as_str)
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .map_or(SystemTime::now() + STALE_UNDATED, |t| t + STALE_GRACE);
        self.stale.entry(name.clone()).or_insert(sweep_at);
        if self.approvals.get(&name).is_none() {
            self.refused.remove(&name);
            return;
        }
        let spec = o.data.get("spec").cloned().unwrap_or(Value::Null);
        let fields = approver_fields(&spec);
        if self.refused.get(&name) == Some(&fields) {
            return;
        }
        let state = o.data.pointer("/status/state").and_then(Value::as_str);
        match take(&self.approvals, &name, &spec) {
            Taken::Undecided if state.is_none() => {
                if let Err(e) = set_status(&self.api, &name, "pending", None).await {
                    tracing::debug!(approval = name, error = %e, "marking the approval pending");
                }
            }
            Taken::Undecided | Taken::Decided | Taken::NotPending => {}
            Taken::Refused(why) => {
                let decided_by = spec.get("decidedBy").and_then(Value::as_str);
                tracing::warn!(
                    approval = name,
                    by = decided_by,
                    reason = why,
                    "the decision of an Approval resource is refused"
                );
                self.refused.insert(name.clone(), fields);
                if let Err(e) = set_status(&self.api, &name, "refused", Some(&why)).await {
                    tracing::warn!(approval = name, error = %e, "marking the decision refused");
                }
            }
        }
    }

    /// Deletes the objects past their expiry whose call is not pending here.
    async fn sweep(&mut self) {
        let now = SystemTime::now();
        let due: Vec<String> = self
            .stale
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            if self.approvals.get(&name).is_some() {
                // Still held (a long timeout): looked at again at the next sweep.
                continue;
            }
            match self.api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(approval = name, "deleted an expired Approval resource");
                    self.stale.remove(&name);
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => {
                    self.stale.remove(&name);
                }
                // Kept: tried again at the next sweep.
                Err(e) if transient(&e) => {
                    tracing::debug!(approval = name, error = %e, "deleting an expired Approval")
                }
                // Not ours to delete (the admission policy lets an agent delete only its own
                // node's): left alone from now on.
                Err(e) => {
                    tracing::warn!(approval = name, error = %describe(&e), "cannot delete an expired Approval");
                    self.stale.remove(&name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approvals::{CallerSummary, HoldRequest, Settings};

    fn summary() -> Summary {
        Summary {
            id: "ab12cd34".to_owned(),
            node: "node-a".to_owned(),
            requested_at: "2026-01-02T03:04:05.678Z".to_owned(),
            expires_in_s: 45,
            caller: CallerSummary {
                cgroup_id: 7,
                pid: 42,
                comm: "python3".to_owned(),
                pod: Some("agent-1".to_owned()),
                namespace: Some("payments".to_owned()),
                service_account: Some("agent-sa".to_owned()),
                ..CallerSummary::default()
            },
            server: "tools".to_owned(),
            tool: "pay".to_owned(),
            arg_keys: vec!["amount".to_owned()],
            args_sha256: "0".repeat(64),
            rule: "/tools/pay/action".to_owned(),
            policy: "policy.json".to_owned(),
            ..Summary::default()
        }
    }

    #[test]
    fn the_object_names_the_call_and_its_node() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let o = object(&summary(), "node-a", at);
        assert_eq!(o.metadata.name.as_deref(), Some("ab12cd34"));
        assert_eq!(o.metadata.labels.as_ref().unwrap()[NODE_LABEL], "node-a");
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["apiVersion"], "mcpwarden.io/v1alpha1");
        assert_eq!(v["kind"], "Approval");
        let spec = &v["spec"];
        assert_eq!(spec["tool"], "pay");
        assert_eq!(spec["caller"]["pod"], "agent-1");
        assert_eq!(spec["caller"]["serviceAccount"], "agent-sa");
        assert_eq!(spec["caller"]["pid"], 42);
        assert_eq!(spec["argKeys"], json!(["amount"]));
        assert_eq!(spec["expiresAt"], "2027-01-15T08:00:00Z");
        for absent in [
            "arguments",
            "reason",
            "decision",
            "decidedBy",
            "rememberSeconds",
        ] {
            assert!(spec.get(absent).is_none(), "{absent} is absent, not null");
        }
        assert!(spec["caller"].get("container").is_none());

        let mut shown = summary();
        shown.arguments = Some(json!({"amount": 5}));
        let spec = super::spec(&shown, "node-a", at);
        assert_eq!(spec["arguments"], json!({"amount": 5}));
        shown.arguments = Some(json!({"blob": "x".repeat(ARGUMENTS_MAX)}));
        let spec = super::spec(&shown, "node-a", at);
        assert!(spec.get("arguments").is_none());
        assert!(spec["argumentsOmitted"].as_str().unwrap().contains("bytes"));
    }

    #[test]
    fn node_labels_are_valid_label_values() {
        assert_eq!(node_label("node-a"), "node-a");
        assert_eq!(
            node_label("ip-10-0-1-23.eu-west-1.compute.internal"),
            "ip-10-0-1-23.eu-west-1.compute.internal"
        );
        let long = format!("{}.example.com", "n".repeat(70));
        let l = node_label(&long);
        assert!(l.len() <= 63, "{l}");
        assert!(l.starts_with("nnnn"));
        assert_ne!(l, node_label(&format!("{}.example.org", "n".repeat(70))));
    }

    #[test]
    fn decisions_are_read_strictly() {
        assert_eq!(read_decision(&json!({"tool": "pay"})), None);
        assert_eq!(read_decision(&json!({"decision": null})), None);
        let ok = read_decision(&json!({"decision": "approve", "decidedBy": "alice",
                                        "decisionReason": "ticket 7", "for": "10m"}));
        assert_eq!(
            ok,
            Some(Ok(Request {
                approved: true,
                by: "alice".into(),
                reason: Some("ticket 7".into()),
                remember: Some(Duration::from_secs(600)),
            }))
        );
        let deny = read_decision(&json!({"decision": "deny", "decidedBy": "bob"}));
        assert!(matches!(
            deny,
            Some(Ok(Request {
                approved: false,
                remember: None,
                ..
            }))
        ));
        for (spec, says) in [
            (
                json!({"decision": "yes", "decidedBy": "a"}),
                "approve or deny",
            ),
            (json!({"decision": "approve"}), "decidedBy"),
            (
                json!({"decision": "approve", "decidedBy": " "}),
                "decidedBy",
            ),
            (
                json!({"decision": "approve", "decidedBy": "a", "for": "forever"}),
                "spec.for",
            ),
            (
                json!({"decision": "approve", "decidedBy": "a", "for": 600}),
                "spec.for",
            ),
            (
                json!({"decision": "deny", "decidedBy": "a", "decisionReason": 1}),
                "decisionReason",
            ),
        ] {
            match read_decision(&spec) {
                Some(Err(why)) => assert!(why.contains(says), "{spec}: {why}"),
                other => panic!("{spec}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_namespace_setting_defaults_to_the_agents_own() {
        let base = std::path::Path::new("/etc/mcpwarden");
        let file: crate::k8s::FileSettings =
            serde_yaml_ng::from_str("approvals_namespace: team-approvals").unwrap();
        assert_eq!(
            file.settings(base).approvals_namespace.as_deref(),
            Some("team-approvals")
        );
        let empty: crate::k8s::FileSettings =
            serde_yaml_ng::from_str("approvals_namespace: ''").unwrap();
        assert_eq!(empty.settings(base).approvals_namespace, None);
        assert_eq!(crate::k8s::Settings::default().approvals_namespace, None);
    }

    #[tokio::test]
    async fn a_service_account_cannot_approve_its_own_call() {
        let approvals = Approvals::new(Settings {
            node: "node-a".into(),
            ..Settings::default()
        });
        let held = approvals
            .hold(HoldRequest {
                summary: summary(),
                caller_key: "pod:uid-1".into(),
                caller_user: Some("system:serviceaccount:payments:agent-sa".into()),
                caller_in_pod: true,
                request_id: "1".into(),
                session: "s1".into(),
                timeout: None,
            })
            .expect("held");
        let id = held.id().to_owned();
        let s = summary();
        let own = json!({"decision": "approve",
                         "decidedBy": "system:serviceaccount:payments:agent-sa",
                         "tool": s.tool, "server": s.server, "argsSha256": s.args_sha256});
        // An object that does not describe the held call decides nothing.
        let moved = json!({"decision": "approve", "decidedBy": "alice",
                           "tool": "other", "server": s.server, "argsSha256": s.args_sha256});
        match take(&approvals, &id, &moved) {
            Taken::Refused(why) => assert!(why.contains("does not describe"), "{why}"),
            other => panic!("{other:?}"),
        }
        match take(&approvals, &id, &own) {
            Taken::Refused(why) => assert!(why.contains("service account"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(approvals.get(&id).is_some(), "still pending");
        let bad_for = json!({"decision": "approve", "decidedBy": "alice", "for": "1y"});
        assert!(matches!(take(&approvals, &id, &bad_for), Taken::Refused(_)));
        assert_eq!(take(&approvals, &id, &json!({})), Taken::Undecided);
        let alice = json!({"decision": "approve", "decidedBy": "alice",
                           "tool": s.tool, "server": s.server, "argsSha256": s.args_sha256});
        assert_eq!(take(&approvals, &id, &alice), Taken::Decided);
        assert_eq!(take(&approvals, &id, &alice), Taken::NotPending);
    }
}
