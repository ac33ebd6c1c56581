//! Held calls decided through `Approval` resources (`mcpwarden::k8s::approvals`), against the
//! Kubernetes API server stand-in (`mcpwarden_tests::apiserver`): the agent's registry of held
//! calls and its publisher and watcher, with a kube client made from the stand-in's kubeconfig
//! as the agent makes it. No eBPF, no privileges: calls are held in the registry directly, as
//! the interceptor holds them.
//!
//! What an approver does is `ApiServer::patch_approval_as`: `kubectl patch --type merge` as
//! that user, admitted as the ValidatingAdmissionPolicy `mcpwarden-approvals` admits it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use mcpwarden::approvals::{
    Approvals, CallerSummary, Held, HoldRequest, Settings, Summary, Via, Waited,
};
use mcpwarden_tests::apiserver::ApiServer;
use mcpwarden_tests::wait_for;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);
const NS: &str = "mcpwarden";
const NODE: &str = "node-a";
const CALLER_KEY: &str = "pod:3f1c2a9e-8d4b-4c1e-9a7f-0b5e6d2c1a44";
const CALLER_USER: &str = "system:serviceaccount:payments:agent-sa";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The agent's kube client configuration for the stand-in (a kubeconfig file, kube's own
/// retries off as in `k8s::start`).
fn config_from(rt: &tokio::runtime::Runtime, api: &ApiServer) -> Config {
    rt.block_on(async {
        let kc = Kubeconfig::read_from(api.kubeconfig()).expect("read the kubeconfig");
        let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kube Config from the kubeconfig");
        config.default_retry = false;
        config
    })
}

/// A call of `pay` on `payments` by pod payments/agent-1 (service account agent-sa).
fn request(request_id: &str, timeout: Option<Duration>) -> HoldRequest {
    HoldRequest {
        summary: Summary {
            caller: CallerSummary {
                cgroup_id: 4242,
                cgroup: Some("/kubepods/pod3f1c2a9e/abc".to_owned()),
                pid: 1234,
                uid: 0,
                comm: "python3".to_owned(),
                pod: Some("agent-1".to_owned()),
                namespace: Some("payments".to_owned()),
                pod_uid: Some("3f1c2a9e-8d4b-4c1e-9a7f-0b5e6d2c1a44".to_owned()),
                service_account: Some("agent-sa".to_owned()),
                container: Some("main".to_owned()),
            },
            server: "payments".to_owned(),
            tool: "pay".to_owned(),
            arg_keys: vec!["amount".to_owned(), "to".to_owned()],
            args_sha256: "ab".repeat(32),
            arguments: Some(json!({"amount": 120, "to": "acme"})),
            rule: "/tools/pay/action".to_owned(),
            reason: Some("payments need a human".to_owned()),
            policy: "policy.json".to_owned(),
            ..Summary::default()
        },
        caller_key: CALLER_KEY.to_owned(),
        caller_user: Some(CALLER_USER.to_owned()),
        caller_in_pod: true,
        request_id: request_id.to_owned(),
        session: "session-1".to_owned(),
        timeout,
    }
}

/// The stand-in, a registry of held calls, and the agent's `Approval` tasks between them.
struct Rig {
    api: ApiServer,
    approvals: Arc<Approvals>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    rt: tokio::runtime::Runtime,
}

impl Rig {
    fn new(tag: &str) -> Rig {
        Rig::with(ApiServer::start(tag))
    }

    /// With objects already in `api` (what an earlier run left).
    fn with(api: ApiServer) -> Rig {
        let rt = runtime();
        let approvals = Approvals::new(Settings {
            node: NODE.to_owned(),
            timeout: Duration::from_secs(30),
            ..Settings::default()
        });
        let config = config_from(&rt, &api);
        let tasks = {
            // The client's buffer task and the agent's tasks run on the rig's runtime.
            let _guard = rt.enter();
            let client = Client::try_from(config).expect("kube Client");
            mcpwarden::k8s::approvals::start(
                client,
                NS.to_owned(),
                NODE.to_owned(),
                approvals.clone(),
            )
        };
        Rig {
            api,
            approvals,
            tasks,
            rt,
        }
    }

    /// Holds a call; its wait runs on the rig's runtime.
    fn hold(&self, request_id: &str, timeout: Option<Duration>) -> Waiting {
        let held = self
            .approvals
            .hold(request(request_id, timeout))
            .expect("held");
        Waiting::new(&self.rt, held)
    }

    /// Waits until the call's `Approval` exists (as the watcher has seen it: marked pending).
    fn published(&self, id: &str) -> Value {
        wait_for(WAIT, || {
            self.api
                .approval(NS, id)
                .filter(|a| a.pointer("/status/state").is_some())
        })
        .unwrap_or_else(|| {
            panic!(
                "no Approval {NS}/{id} marked pending within {WAIT:?}; stored: {:?}",
                self.api.approvals(NS)
            )
        })
    }

    fn gone(&self, id: &str) {
        let gone = wait_for(WAIT, || self.api.approval(NS, id).is_none().then_some(()));
        assert!(
            gone.is_some(),
            "Approval {NS}/{id} still there after {WAIT:?}: {:?}",
            self.api.approval(NS, id)
        );
    }

    fn decide_as(&self, id: &str, user: &str, spec: Value) -> Value {
        self.api
            .patch_approval_as(NS, id, user, json!({ "spec": spec }))
            .unwrap_or_else(|e| panic!("{user} patching Approval {id}: {e}"))
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A held call whose wait runs on the runtime.
struct Waiting {
    id: String,
    done: std::sync::mpsc::Receiver<Waited>,
}

impl Waiting {
    fn new(rt: &tokio::runtime::Runtime, mut held: Held) -> Waiting {
        let id = held.id().to_owned();
        let (tx, done) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let _ = tx.send(held.wait().await);
        });
        Waiting { id, done }
    }

    fn outcome(&self) -> Waited {
        self.done
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("call {} not decided within {WAIT:?}", self.id))
    }

    fn still_waiting(&self) -> bool {
        matches!(
            self.done.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Empty)
        )
    }
}

#[test]
fn a_pending_call_is_published_and_approved_from_its_resource() {
    let rig = Rig::new("approvals-approve");
    let call = rig.hold("1", None);
    let object = rig.published(&call.id);

    assert_eq!(object["apiVersion"], "mcpwarden.io/v1alpha1");
    assert_eq!(object["kind"], "Approval");
    assert_eq!(object["metadata"]["labels"]["mcpwarden.io/node"], NODE);
    assert_eq!(object["status"]["state"], "pending");
    let spec = &object["spec"];
    assert_eq!(spec["node"], NODE);
    assert_eq!(spec["tool"], "pay");
    assert_eq!(spec["server"], "payments");
    assert_eq!(spec["caller"]["pod"], "agent-1");
    assert_eq!(spec["caller"]["namespace"], "payments");
    assert_eq!(spec["caller"]["serviceAccount"], "agent-sa");
    assert_eq!(spec["caller"]["pid"], 1234);
    assert_eq!(spec["caller"]["comm"], "python3");
    assert_eq!(spec["argKeys"], json!(["amount", "to"]));
    assert_eq!(spec["argsSha256"], "ab".repeat(32));
    assert_eq!(spec["arguments"], json!({"amount": 120, "to": "acme"}));
    assert_eq!(spec["rule"], "/tools/pay/action");
    assert_eq!(spec["reason"], "payments need a human");
    assert!(spec.get("decision").is_none());
    let expires = spec["expiresAt"].as_str().expect("expiresAt");
    let expires = parse_rfc3339(expires);
    let now = SystemTime::now();
    assert!(
        expires > now + Duration::from_secs(20) && expires < now + Duration::from_secs(32),
        "expiresAt {:?} is not about the call's 30 s timeout from now",
        spec["expiresAt"]
    );
    let created = rig.api.wait_for_request(
        |s| {
            s.verb == "create"
                && s.path == format!("/apis/mcpwarden.io/v1alpha1/namespaces/{NS}/approvals")
        },
        WAIT,
    );
    assert_eq!(created.status, 201);
    assert!(
        rig.approvals.get(&call.id).is_some(),
        "publishing decides nothing"
    );

    rig.decide_as(
        &call.id,
        "alice",
        json!({"decision": "approve", "decidedBy": "alice", "decisionReason": "ticket 7",
               "for": "10m"}),
    );
    match call.outcome() {
        Waited::Decided(r) => {
            assert!(r.approved);
            assert_eq!(r.by.via, Via::Resource);
            assert_eq!(r.by.user.as_deref(), Some("alice"));
            assert_eq!(r.reason.as_deref(), Some("ticket 7"));
            assert_eq!(r.remember, Some(Duration::from_secs(600)));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        rig.approvals
            .remembered(CALLER_KEY, "payments", "pay")
            .is_some_and(|by| by.user.as_deref() == Some("alice")),
        "approved for 10m by alice: the caller's next calls of the tool are approved"
    );
    // Closed: its outcome written, then deleted.
    rig.gone(&call.id);
    let deleted = rig.api.wait_for_request(
        |s| s.verb == "delete" && s.path.ends_with(&format!("/approvals/{}", call.id)),
        WAIT,
    );
    assert_eq!(deleted.status, 200);
    assert!(rig
        .api
        .requests()
        .iter()
        .any(|s| s.verb == "patch" && s.path.ends_with(&format!("/approvals/{}/status", call.id))));
}

/// RFC 3339 with `Z`, seconds precision (what the agent writes), to a time.
fn parse_rfc3339(text: &str) -> SystemTime {
    assert!(text.len() == 20 && text.ends_with('Z'), "{text}");
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

#[test]
fn a_denial_resolves_the_call_denied() {
    let rig = Rig::new("approvals-deny");
    let call = rig.hold("1", None);
    rig.published(&call.id);
    rig.decide_as(
        &call.id,
        "bob",
        json!({"decision": "deny", "decidedBy": "bob", "decisionReason": "not today"}),
    );
    match call.outcome() {
        Waited::Decided(r) => {
            assert!(!r.approved);
            assert_eq!(r.by.via, Via::Resource);
            assert_eq!(r.by.user.as_deref(), Some("bob"));
            assert_eq!(r.reason.as_deref(), Some("not today"));
        }
        other => panic!("{other:?}"),
    }
    assert!(rig
        .approvals
        .remembered(CALLER_KEY, "payments", "pay")
        .is_none());
    rig.gone(&call.id);
}

#[test]
fn the_callers_own_service_account_is_refused_and_another_approver_may_decide() {
    let rig = Rig::new("approvals-self");
    let call = rig.hold("1", None);
    rig.published(&call.id);

    // The admission policy makes decidedBy the requester: nobody decides in another's name.
    let forged = rig.api.patch_approval_as(
        NS,
        &call.id,
        "mallory",
        json!({"spec": {"decision": "approve", "decidedBy": "alice"}}),
    );
    assert!(
        forged.as_ref().is_err_and(|e| e.contains("Forbidden")),
        "{forged:?}"
    );
    // ... nor rewrites what is approved.
    let rewritten = rig.api.patch_approval_as(
        NS,
        &call.id,
        "alice",
        json!({"spec": {"tool": "refund", "decision": "approve", "decidedBy": "alice"}}),
    );
    assert!(
        rewritten.as_ref().is_err_and(|e| e.contains("Forbidden")),
        "{rewritten:?}"
    );

    // The caller's own service account may patch approvals, but not approve its own call.
    rig.decide_as(
        &call.id,
        CALLER_USER,
        json!({"decision": "approve", "decidedBy": CALLER_USER}),
    );
    let refused = wait_for(WAIT, || {
        rig.api
            .approval(NS, &call.id)
            .filter(|a| a["status"]["state"] == "refused")
    })
    .unwrap_or_else(|| panic!("not marked refused: {:?}", rig.api.approval(NS, &call.id)));
    let message = refused["status"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("service account"), "{message}");
    assert!(rig.approvals.get(&call.id).is_some(), "still pending");
    assert!(call.still_waiting(), "the call still waits");

    // A refused decision may be replaced (the admission policy allows it only then).
    rig.decide_as(
        &call.id,
        "alice",
        json!({"decision": "approve", "decidedBy": "alice"}),
    );
    match call.outcome() {
        Waited::Decided(r) => {
            assert!(r.approved);
            assert_eq!(r.by.user.as_deref(), Some("alice"));
            assert_eq!(r.remember, None, "no `for`, and the rule remembers nothing");
        }
        other => panic!("{other:?}"),
    }
    rig.gone(&call.id);
}

#[test]
fn a_bad_duration_is_refused_and_the_decision_may_be_replaced() {
    let rig = Rig::new("approvals-for");
    let call = rig.hold("1", None);
    rig.published(&call.id);
    // Within the CRD's pattern, beyond the agent's limit (24 h).
    rig.decide_as(
        &call.id,
        "alice",
        json!({"decision": "approve", "decidedBy": "alice", "for": "48h"}),
    );
    let refused = wait_for(WAIT, || {
        rig.api
            .approval(NS, &call.id)
            .filter(|a| a["status"]["state"] == "refused")
    })
    .unwrap_or_else(|| panic!("not marked refused: {:?}", rig.api.approval(NS, &call.id)));
    let message = refused["status"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("spec.for"), "{message}");
    assert!(call.still_waiting());
    assert!(rig.approvals.get(&call.id).is_some());

    // Another approver replaces the refused decision.
    rig.decide_as(
        &call.id,
        "carol",
        json!({"decision": "deny", "decidedBy": "carol", "for": null}),
    );
    match call.outcome() {
        Waited::Decided(r) => {
            assert!(!r.approved);
            assert_eq!(r.by.user.as_deref(), Some("carol"));
        }
        other => panic!("{other:?}"),
    }
    rig.gone(&call.id);
}

#[test]
fn a_call_that_times_out_or_is_dropped_takes_its_resource_with_it() {
    let rig = Rig::new("approvals-closed");
    let call = rig.hold("1", Some(Duration::from_secs(2)));
    rig.published(&call.id);
    assert!(matches!(call.outcome(), Waited::TimedOut));
    rig.gone(&call.id);

    // Its client went: the held call is dropped.
    let held = rig.approvals.hold(request("2", None)).expect("held");
    let id = held.id().to_owned();
    rig.published(&id);
    drop(held);
    rig.gone(&id);
    assert!(rig.approvals.list().is_empty());

    // A decision arriving after the close finds nothing, and nothing comes back.
    let late = rig.api.patch_approval_as(
        NS,
        &id,
        "alice",
        json!({"spec": {"decision": "approve", "decidedBy": "alice"}}),
    );
    assert!(late.is_err_and(|e| e.contains("NotFound")));
}

#[test]
fn objects_left_behind_are_deleted_once_expired_and_others_left_alone() {
    let api = ApiServer::start("approvals-stale");
    let stamp = |offset_s: i64| {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + offset_s;
        rfc3339(t)
    };
    let object = |name: &str, node: &str, expires: String| {
        json!({
            "metadata": {"name": name, "namespace": NS, "labels": {"mcpwarden.io/node": node}},
            "spec": {"node": node, "tool": "pay", "server": "payments", "caller": {"pid": 1},
                     "argKeys": [], "argsSha256": "", "rule": "/tools/pay/action",
                     "expiresAt": expires, "decision": "approve", "decidedBy": "alice"},
        })
    };
    // An earlier run's, expired two minutes ago (decided, even: nothing here holds it).
    api.apply_approval(object("stale001", NODE, stamp(-120)));
    // Another agent's on this node (a hand-over): not expired, not ours to decide or delete.
    api.apply_approval(object("peer0001", NODE, stamp(30)));
    // Another node's, expired: not this agent's to clean up.
    api.apply_approval(object("other001", "node-b", stamp(-120)));
    let rig = Rig::with(api);
    rig.gone("stale001");
    let swept = rig.api.wait_for_request(
        |s| s.verb == "delete" && s.path.ends_with("/approvals/stale001"),
        WAIT,
    );
    assert_eq!(swept.status, 200);
    // A call held now is published beside them.
    let call = rig.hold("1", None);
    rig.published(&call.id);
    assert!(rig.api.approval(NS, "peer0001").is_some());
    assert!(rig.api.approval(NS, "other001").is_some());
    assert!(
        rig.api
            .approval(NS, "peer0001")
            .unwrap()
            .get("status")
            .is_none(),
        "an object whose call is not held here is not written to"
    );
    assert!(!rig
        .api
        .requests()
        .iter()
        .any(|s| s.path.ends_with("/peer0001") || s.path.ends_with("/other001")));
}

fn rfc3339(secs: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).expect("after 1970"));
    humantime::format_rfc3339_seconds(t).to_string()
}

#[test]
fn publishing_retries_while_the_api_server_is_down_and_the_cli_still_decides() {
    let rig = Rig::new("approvals-down");
    // Let the watcher list first (what it would have done long before).
    rig.api.wait_for_request(|s| s.is_watch(), WAIT);
    rig.api.set_unavailable(true);
    let call = rig.hold("1", None);
    rig.api
        .wait_for_request(|s| s.verb == "create" && s.status == 503, WAIT);
    rig.api.set_unavailable(false);
    let object = wait_for(WAIT, || rig.api.approval(NS, &call.id))
        .expect("published once the API server is back");
    assert_eq!(object["spec"]["tool"], "pay");

    // While the API server is down, the admin socket still decides (here: the registry).
    rig.api.set_unavailable(true);
    let other = rig.hold("2", None);
    rig.approvals
        .decide(
            &other.id,
            true,
            None,
            None,
            mcpwarden::approvals::Approver {
                via: Via::Cli,
                uid: Some(0),
                ..Default::default()
            },
        )
        .expect("decided over the admin socket");
    assert!(matches!(other.outcome(), Waited::Decided(r) if r.approved && r.by.via == Via::Cli));
    rig.api.set_unavailable(false);
    // Nothing is published for a call decided before it could be; the first one is still there.
    rig.published(&call.id);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(rig.api.approval(NS, &other.id).is_none());
    assert!(rig.api.approval(NS, &call.id).is_some());
}

#[test]
fn the_stand_in_serves_approvals_as_a_custom_resource() {
    use futures::StreamExt;
    use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
    use kube::runtime::watcher::{self, watcher};

    let api = ApiServer::start("approvals-crd");
    let rt = runtime();
    let config = config_from(&rt, &api);
    rt.block_on(async {
        let client = Client::try_from(config).expect("kube Client");
        let ar = mcpwarden::k8s::approvals::api_resource();
        let approvals: Api<DynamicObject> = Api::namespaced_with(client, NS, &ar);
        let mut events = watcher(
            approvals.clone(),
            watcher::Config::default().labels("mcpwarden.io/node=node-a"),
        )
        .boxed();
        assert_eq!(next_event(&mut events).await, "Init");
        assert_eq!(next_event(&mut events).await, "InitDone");

        let new = |name: &str, node: &str| {
            let mut o = DynamicObject::new(name, &ar).data(json!({
                "spec": {"tool": "pay"},
                "status": {"state": "approved"},
            }));
            o.metadata.labels = Some([("mcpwarden.io/node".to_owned(), node.to_owned())].into());
            o
        };
        let created = approvals
            .create(&PostParams::default(), &new("a1", "node-a"))
            .await
            .expect("created");
        assert_eq!(created.metadata.namespace.as_deref(), Some(NS));
        assert_eq!(created.metadata.generation, Some(1));
        assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
        assert!(
            created.data.get("status").is_none(),
            "status is not set by a create"
        );
        assert_eq!(next_event(&mut events).await, "Apply(a1)");
        match approvals
            .create(&PostParams::default(), &new("a1", "node-a"))
            .await
        {
            Err(kube::Error::Api(s)) => {
                assert!(s.is_already_exists(), "{s:?}");
                assert_eq!(s.code, 409);
            }
            other => panic!("a second create: {other:?}"),
        }
        // Another node's: not in this watch.
        approvals
            .create(&PostParams::default(), &new("b1", "node-b"))
            .await
            .expect("created");

        let pp = PatchParams::default();
        let status = approvals
            .patch_status(
                "a1",
                &pp,
                &Patch::Merge(json!({"status": {"state": "pending"}, "spec": {"tool": "x"}})),
            )
            .await
            .expect("status patched");
        assert_eq!(status.data["status"]["state"], "pending");
        assert_eq!(
            status.data["spec"]["tool"], "pay",
            "/status changes only status"
        );
        assert_eq!(status.metadata.generation, Some(1));
        assert_eq!(next_event(&mut events).await, "Apply(a1)");
        let patched = approvals
            .patch(
                "a1",
                &pp,
                &Patch::Merge(json!({"status": {"state": "x"}, "spec": {"decision": "approve"}})),
            )
            .await
            .expect("patched");
        assert_eq!(
            patched.data["status"]["state"], "pending",
            "status needs /status"
        );
        assert_eq!(patched.data["spec"]["decision"], "approve");
        assert_eq!(patched.metadata.generation, Some(2));
        assert_eq!(next_event(&mut events).await, "Apply(a1)");

        let deleted = approvals
            .delete("a1", &DeleteParams::default())
            .await
            .expect("deleted");
        assert!(
            deleted.is_left(),
            "the deleted object, as for custom resources"
        );
        assert_eq!(next_event(&mut events).await, "Delete(a1)");
        match approvals.delete("a1", &DeleteParams::default()).await {
            Err(kube::Error::Api(s)) => assert!(s.is_not_found(), "{s:?}"),
            other => panic!("a second delete: {other:?}"),
        }
        assert!(approvals.get_opt("a1").await.expect("get").is_none());
        assert!(approvals.get_opt("b1").await.expect("get").is_some());
    });
    let verbs: Vec<(String, u16)> = api
        .requests()
        .iter()
        .filter(|s| s.verb == "create" || s.verb == "delete")
        .map(|s| (s.verb.clone(), s.status))
        .collect();
    assert_eq!(
        verbs,
        [
            ("create".to_owned(), 201),
            ("create".to_owned(), 409),
            ("create".to_owned(), 201),
            ("delete".to_owned(), 200),
            ("delete".to_owned(), 404)
        ]
    );
}

/// The next event of a watch of approvals, described (`Apply(NAME)`, ...).
async fn next_event(
    events: &mut (impl futures::Stream<
        Item = Result<
            kube::runtime::watcher::Event<kube::api::DynamicObject>,
            kube::runtime::watcher::Error,
        >,
    > + Unpin),
) -> String {
    use futures::StreamExt;
    use kube::runtime::watcher::Event;
    let e = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch goes on")
        .expect("no watch error");
    match e {
        Event::Init => "Init".to_owned(),
        Event::InitDone => "InitDone".to_owned(),
        Event::InitApply(o) => format!("InitApply({})", o.metadata.name.unwrap_or_default()),
        Event::Apply(o) => format!("Apply({})", o.metadata.name.unwrap_or_default()),
        Event::Delete(o) => format!("Delete({})", o.metadata.name.unwrap_or_default()),
    }
}

#[test]
fn the_kubernetes_watches_start_the_approvals_in_the_configured_namespace() {
    // As the agent starts them (`k8s::start` with the registry in `Watches::approvals`): in the
    // client's default namespace (the kubeconfig's `default`; in a pod, the pod's), or in
    // `kubernetes.approvals_namespace`.
    for (setting, namespace) in [
        (None, "default"),
        (Some("team-approvals"), "team-approvals"),
    ] {
        let api = ApiServer::start("approvals-watches");
        let rt = runtime();
        let config = config_from(&rt, &api);
        let approvals = Approvals::new(Settings {
            node: NODE.to_owned(),
            ..Settings::default()
        });
        let (_kube, tasks) = {
            let _guard = rt.enter();
            mcpwarden::k8s::start(mcpwarden::k8s::Watches {
                config,
                settings: mcpwarden::k8s::Settings {
                    mode: mcpwarden::k8s::Mode::On,
                    node_name: Some(NODE.to_owned()),
                    approvals_namespace: setting.map(str::to_owned),
                    ..Default::default()
                },
                pods: Arc::new(mcpwarden::identity::Pods::new(Duration::from_secs(60))),
                backends: mcpwarden::k8s::Backends::default(),
                services: Vec::new(),
                approvals: Some(approvals.clone()),
            })
            .expect("watches started")
        };
        let call = Waiting::new(&rt, approvals.hold(request("1", None)).expect("held"));
        let object = wait_for(WAIT, || api.approval(namespace, &call.id)).unwrap_or_else(|| {
            panic!(
                "no Approval {namespace}/{} within {WAIT:?} (setting {setting:?})",
                call.id
            )
        });
        assert_eq!(object["spec"]["tool"], "pay");
        approvals
            .decide(
                &call.id,
                false,
                None,
                None,
                mcpwarden::approvals::Approver::default(),
            )
            .expect("denied");
        assert!(matches!(call.outcome(), Waited::Decided(r) if !r.approved));
        let gone = wait_for(WAIT, || {
            api.approval(namespace, &call.id).is_none().then_some(())
        });
        assert!(gone.is_some(), "deleted once decided");
        for t in tasks {
            t.abort();
        }
    }
}
