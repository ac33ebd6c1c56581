//! Stopping the agent leaves nothing behind.

mod common;

use std::net::SocketAddr;

use common::*;
use mcpwarden_tests::bpf;
use serde_json::json;

/// (9) While the agent runs, its programs are attached to the cgroup (asked of the kernel with
/// bpf(BPF_PROG_QUERY), as `bpftool cgroup show` does); after SIGTERM it exits 0 and nothing
/// stays attached, and a connection from the cgroup to the endpoint goes straight to the
/// server (which now also gets the call the policy used to deny).
#[test]
fn sigterm_detaches_everything() {
    let mut rig = Rig::start("detach", 9, POLICY);
    let url = rig.server.url();

    let attached = bpf::attached(&rig.app);
    let names: Vec<&str> = attached.iter().map(|(n, _)| *n).collect();
    for want in [
        "cgroup_inet4_connect",
        "cgroup_inet6_connect",
        "cgroup_sock_ops",
        "cgroup_inet4_getpeername",
        "cgroup_inet6_getpeername",
    ] {
        assert!(
            names.contains(&want),
            "while running, {want} must be attached to {}: {attached:?}",
            rig.app.display()
        );
    }
    // Attached at --cgroup only, not at its parent.
    assert!(
        bpf::attached(rig.cg.path()).is_empty(),
        "programs attached above --cgroup: {:?}",
        bpf::attached(rig.cg.path())
    );

    // Enforcing while running.
    let run = rig.client(&["call", &url, "drop_cluster", r#"{"cluster":"prod"}"#]);
    run.assert_success();
    assert!(is_error_result(&run.json_lines()[0]), "{}", run.describe());
    assert_eq!(rig.server.calls("drop_cluster"), 0);

    let (status, killed) = rig.agent.terminate();
    assert!(
        !killed,
        "the agent did not exit within 10 s of SIGTERM\n{}",
        rig.agent.log()
    );
    assert!(
        status.success(),
        "the agent must exit 0 on SIGTERM, got {status}\n{}",
        rig.agent.log()
    );

    let after = bpf::attached(&rig.app);
    assert!(
        after.is_empty(),
        "programs still attached to {} after the agent exited: {after:?}",
        rig.app.display()
    );
    for dir in [rig.cg.path().to_path_buf(), rig.agent_cg.clone()] {
        if dir.exists() {
            let left = bpf::attached(&dir);
            assert!(
                left.is_empty(),
                "programs left attached to {}: {left:?}",
                dir.display()
            );
        }
    }

    // Now straight to the server: it sees the client's own socket, and the call the policy
    // denied goes through.
    let addr = rig.server.addr().to_string();
    let run = rig.client(&[
        "peer",
        &addr,
        "/mcp",
        &call_body(91, "drop_cluster", json!({"cluster": "prod"})),
    ]);
    run.assert_success();
    run.assert_field("peer", addr.as_str());
    assert_eq!(
        run.body_json()["result"]["content"][0]["text"],
        "dropped cluster prod",
        "{}",
        run.describe()
    );
    let local: SocketAddr = run.field("local").expect("local=").parse().unwrap();
    assert!(
        rig.server.peers().contains(&local),
        "the server did not see the client's socket {local} (peers {:?}): still redirected?",
        rig.server.peers()
    );
    assert_eq!(rig.server.calls("drop_cluster"), 1);
}
