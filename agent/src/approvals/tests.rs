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
    assert!(a.remembered("pod:a", "payments", "pay"));
    assert!(!a.remembered("pod:b", "payments", "pay"));
    assert!(!a.remembered("pod:a", "payments", "other"));
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
        Err(DecideError::SelfApproval(_, "cgroup"))
    ));
    let same_pod = Approver {
        pod_uid: Some("uid-pod:a".to_owned()),
        ..cli(11)
    };
    assert!(matches!(
        a.decide(&id, true, None, None, same_pod),
        Err(DecideError::SelfApproval(_, "pod"))
    ));
    let own_sa = Approver {
        via: Via::Resource,
        user: Some("system:serviceaccount:ns:pod:a".to_owned()),
        ..Approver::default()
    };
    assert!(matches!(
        a.decide(&id, true, None, None, own_sa),
        Err(DecideError::SelfApproval(_, "service account"))
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
    assert!(!a.cancel("pod:b", "payments", "session:s", "3"));
    assert!(!a.cancel("pod:a", "payments", "session:other", "3"));
    assert!(a.cancel("pod:a", "payments", "session:s", "3"));
    assert!(matches!(held.wait().await, Waited::Cancelled));
}
