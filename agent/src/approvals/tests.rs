use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

fn settings(max: usize, per_caller: usize) -> Settings {
    Settings {
        timeout: Duration::from_secs(5),
        max_pending: max,
        max_pending_per_caller: per_caller,
        webhook: None,
        node: "node-a".to_owned(),
    }
}

fn request(caller: &str, cgroup_id: u64, request_id: &str) -> HoldRequest {
    HoldRequest {
        summary: Summary {
            caller: CallerSummary {
                cgroup_id,
                pod_uid: Some(format!("uid-{caller}")),
                ..CallerSummary::default()
            },
            server: "payments".to_owned(),
            tool: "pay".to_owned(),
            ..Summary::default()
        },
        caller_key: caller.to_owned(),
        caller_user: Some(format!("system:serviceaccount:ns:{caller}")),
        caller_in_pod: true,
        request_id: request_id.to_owned(),
        session: "session:s".to_owned(),
        timeout: None,
    }
}

fn cli(cgroup_id: u64) -> Approver {
    Approver {
        via: Via::Cli,
        uid: Some(0),
        cgroup_id: Some(cgroup_id),
        ..Approver::default()
    }
}

#[tokio::test]
async fn approved_denied_and_remembered() {
    let a = Approvals::new(settings(8, 8));
    let mut held = a.hold(request("pod:a", 10, "1")).expect("held");
    assert_eq!(a.list().len(), 1);
    assert_eq!(a.list()[0].node, "node-a");
    let id = held.id().to_owned();
    a.decide(
        &id,
        true,
        Some("ok".into()),
        Some(Duration::from_secs(60)),
        cli(99),
    )
    .expect("decided");
    match held.wait().await {
        Waited::Decided(r) => assert!(r.approved && r.reason.as_deref() == Some("ok")),
        other => panic!("{other:?}"),
    }
    assert!(a.list().is_empty());
    assert_eq!(
        a.remembered("pod:a", "payments", "pay")
            .and_then(|by| by.uid),
        Some(0),
        "remembered with who approved"
    );
    assert!(a.remembered("pod:b", "payments", "pay").is_none());
    assert!(a.remembered("pod:a", "payments", "other").is_none());
    // Decided once: a second decision finds nothing.
    assert_eq!(
        a.decide(&id, false, None, None, cli(99)).err(),
        Some(DecideError::NotFound(id.clone()))
    );

    let mut held = a.hold(request("pod:a", 10, "2")).expect("held");
    let id = held.id().to_owned();
    a.decide(&id, false, None, None, cli(99)).expect("denied");
    assert!(matches!(held.wait().await, Waited::Decided(r) if !r.approved));
}

#[tokio::test]
async fn a_workload_cannot_approve_itself() {
    let a = Approvals::new(settings(8, 8));
    let audited = Arc::new(Mutex::new(Vec::new()));
    {
        let audited = audited.clone();
        a.on_refused(Box::new(move |s, by, why| {
            audited
                .lock()
                .unwrap()
                .push((s.id.clone(), by.via, why.to_owned()));
        }));
    }
    let held = a.hold(request("pod:a", 10, "1")).expect("held");
    let id = held.id().to_owned();
    let same_cgroup = a.decide(&id, true, None, None, cli(10));
    assert!(matches!(
        same_cgroup,
        Err(DecideError::SelfApproval(_, w)) if w.contains("cgroup")
    ));
    let same_pod = Approver {
        pod_uid: Some("uid-pod:a".to_owned()),
        ..cli(11)
    };
    assert!(matches!(
        a.decide(&id, true, None, None, same_pod),
        Err(DecideError::SelfApproval(_, w)) if w.contains("own pod")
    ));
    let own_sa = Approver {
        via: Via::Resource,
        user: Some("system:serviceaccount:ns:pod:a".to_owned()),
        ..Approver::default()
    };
    assert!(matches!(
        a.decide(&id, true, None, None, own_sa),
        Err(DecideError::SelfApproval(_, w)) if w.contains("own service account")
    ));
    // Still pending after the refusals, each audited.
    assert_eq!(a.list().len(), 1);
    let audited = audited.lock().unwrap().clone();
    assert_eq!(audited.len(), 3, "{audited:?}");
    assert!(audited
        .iter()
        .all(|(i, _, why)| *i == id && why.contains("approve itself")));
    assert_eq!(audited[2].1, Via::Resource);
}

#[tokio::test]
async fn bounded_in_total_and_per_caller() {
    let a = Approvals::new(settings(3, 2));
    let _h1 = a.hold(request("pod:a", 10, "1")).expect("held");
    let _h2 = a.hold(request("pod:a", 10, "2")).expect("held");
    let e = a.hold(request("pod:a", 10, "3")).err().unwrap_or_default();
    assert!(e.contains("max_pending_per_caller"), "{e}");
    let _h3 = a.hold(request("pod:b", 11, "1")).expect("held");
    let e = a.hold(request("pod:c", 12, "1")).err().unwrap_or_default();
    assert!(e.contains("approvals.max_pending"), "{e}");
    drop(_h1);
    assert!(a.hold(request("pod:c", 12, "1")).is_ok());
}

#[tokio::test(start_paused = true)]
async fn timed_out_abandoned_and_cancelled_are_gone() {
    let a = Approvals::new(settings(8, 8));
    let mut notices = a.subscribe();
    let mut held = a.hold(request("pod:a", 10, "1")).expect("held");
    let id = held.id().to_owned();
    assert!(matches!(notices.recv().await, Ok(Notice::Pending(s)) if s.id == id));
    // The deadline is on the std clock: a paused tokio clock still fires timeout_at.
    let wait = tokio::time::timeout(Duration::from_secs(60), held.wait()).await;
    assert!(matches!(wait, Ok(Waited::TimedOut)), "{wait:?}");
    assert!(a.list().is_empty());
    assert!(matches!(
        a.decide(&id, true, None, None, cli(99)),
        Err(DecideError::NotFound(_))
    ));
    assert!(matches!(
        notices.recv().await,
        Ok(Notice::Closed {
            outcome: "timed_out",
            ..
        })
    ));

    let held = a.hold(request("pod:a", 10, "2")).expect("held");
    let id = held.id().to_owned();
    drop(held);
    assert!(a.list().is_empty());
    assert!(matches!(
        a.decide(&id, true, None, None, cli(99)),
        Err(DecideError::NotFound(_))
    ));

    let mut held = a.hold(request("pod:a", 10, "3")).expect("held");
    assert!(!a.cancel("pod:b", "payments", Some("session:s"), "3"));
    assert!(!a.cancel("pod:a", "payments", Some("session:other"), "3"));
    assert!(a.cancel("pod:a", "payments", Some("session:s"), "3"));
    assert!(matches!(held.wait().await, Waited::Cancelled));
    // A client without a session cancels from another connection: any of its calls with
    // that id.
    let mut held = a.hold(request("pod:a", 10, "4")).expect("held");
    assert!(!a.cancel("pod:b", "payments", None, "4"));
    assert!(a.cancel("pod:a", "payments", None, "4"));
    assert!(matches!(held.wait().await, Waited::Cancelled));
}

#[tokio::test]
async fn neighbours_and_unknown_pods_cannot_approve_either() {
    let a = Approvals::new(settings(8, 8));
    // A caller outside pods, uid 1000: an approver with the same uid in another cgroup (a
    // delegated subtree it controls) is refused; root is not.
    let mut outside = request("cgroup:10", 10, "1");
    outside.summary.caller.uid = 1000;
    outside.summary.caller.pod_uid = None;
    outside.caller_user = None;
    outside.caller_in_pod = false;
    let held = a.hold(outside).expect("held");
    let same_uid = Approver {
        uid: Some(1000),
        ..cli(99)
    };
    let refused = a.decide(held.id(), true, None, None, same_uid);
    assert!(
        matches!(&refused, Err(DecideError::SelfApproval(_, w)) if w.contains("uid")),
        "{refused:?}"
    );
    assert!(a.decide(held.id(), true, None, None, cli(99)).is_ok());

    // A caller in a pod of namespace ns: another service account of ns is refused.
    let mut in_ns = request("pod:a", 11, "2");
    in_ns.summary.caller.namespace = Some("ns".to_owned());
    let held = a.hold(in_ns).expect("held");
    let neighbour = Approver {
        via: Via::Resource,
        user: Some("system:serviceaccount:ns:other".to_owned()),
        ..Approver::default()
    };
    let refused = a.decide(held.id(), true, None, None, neighbour);
    assert!(
        matches!(&refused, Err(DecideError::SelfApproval(_, w)) if w.contains("namespace")),
        "{refused:?}"
    );

    // A caller in a pod the node does not know yet: no Kubernetes approver can be told apart.
    let mut unknown = request("cgroup:12", 12, "3");
    unknown.caller_user = None;
    let held = a.hold(unknown).expect("held");
    let alice = Approver {
        via: Via::Resource,
        user: Some("alice".to_owned()),
        ..Approver::default()
    };
    let refused = a.decide(held.id(), true, None, None, alice);
    assert!(
        matches!(&refused, Err(DecideError::SelfApproval(_, w)) if w.contains("not known yet")),
        "{refused:?}"
    );
    // An operator on the node can still decide it.
    assert!(a.decide(held.id(), false, None, None, cli(99)).is_ok());
}
