//! 200 pods come and go: everything the agent holds for a namespace (listeners, address
//! watch, upstream pools, the namespace itself) goes with it. Alone in its test binary, so that
//! no other test's namespaces move the agent's figures. Test index 141.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::*;
use mcpwarden_tests::{
    free_addr, require_root, test_ip, wait_for, Agent, AgentOpts, PodNet, TestCgroup, TestServer,
};
use serde_json::json;

const PODS: usize = 200;
const BATCH: usize = 10;
const WARM_UP: usize = 10;

/// Open descriptors and resident memory (KiB) of process `pid`.
fn figures(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (fds, rss)
}

/// Create `n` pods, wait until the agent serves each, make one call from each (in parallel),
/// delete them, and wait until the agent has let go of every one.
fn cycle(
    net: &mut PodNet,
    agent: &Agent,
    attach: &std::path::Path,
    url: &str,
    n: usize,
    first: usize,
) {
    let pods: Vec<_> = (0..n)
        .map(|i| {
            let tag = format!("c{}", first + i);
            net.pod(&tag, attach.join(&tag), true, true)
        })
        .collect();
    for pod in &pods {
        agent.wait_netns_ready(pod.ino());
    }
    std::thread::scope(|s| {
        for (i, pod) in pods.iter().enumerate() {
            s.spawn(move || {
                let body = call_body((first + i) as u64, "echo", json!({"text": "once"}));
                let run = pod.client(CLIENT_BIN, &["raw-post", url, &body], CLIENT_TIMEOUT);
                run.assert_status(200);
                assert_eq!(run.body_json()["result"]["content"][0]["text"], "once");
            });
        }
    });
    let inos: Vec<u64> = pods.iter().map(|p| p.ino()).collect();
    for pod in pods {
        net.remove(pod);
    }
    for ino in inos {
        let mark = format!("netns={ino} ");
        agent
            .wait_log(Duration::from_secs(30), &["no longer served", &mark])
            .unwrap_or_else(|| panic!("namespace {ino} never let go:\n{}", agent.log()));
    }
}

#[test]
fn two_hundred_namespaces_come_and_go_and_the_agent_returns_to_its_baseline() {
    require_root();
    let cg = TestCgroup::new("pods-churn");
    let attach = cg.child("pods");
    let mut net = PodNet::new("pods-churn", 141);
    let ip = net.remote_ip;
    let server = net.on_remote(move || TestServer::start(SocketAddr::new(IpAddr::V4(ip), 0)));
    let url = server.url();
    let agent = Agent::start_with(
        AGENT_BIN,
        AgentOpts {
            name: "pods-churn".into(),
            endpoints: vec![(url.clone(), POLICY.into())],
            listen: vec![free_addr(test_ip(141)), free_addr(Ipv6Addr::LOCALHOST)],
            cgroup: attach.clone(),
            agent_cgroup: cg.path().join("agent"),
        },
        &[
            "--netns-dir".to_string(),
            net.pins.path().display().to_string(),
            "--workers".to_string(),
            "2".to_string(),
        ],
    );
    let pid = agent.pid().expect("agent pid");
    // Warm up: the first namespaces grow the allocator's arenas, the caches, the maps.
    cycle(&mut net, &agent, &attach, &url, WARM_UP, 0);
    let settle = |want: Option<usize>| {
        // Workers drop a gone namespace's pools when they read their queue.
        wait_for(Duration::from_secs(10), || {
            let (fds, _) = figures(pid);
            want.is_none_or(|w| fds <= w).then_some(())
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    settle(None);
    let (base_fds, base_rss) = figures(pid);
    let mut done = WARM_UP;
    while done < WARM_UP + PODS {
        cycle(&mut net, &agent, &attach, &url, BATCH, done);
        done += BATCH;
    }
    assert_eq!(server.calls("echo") as usize, WARM_UP + PODS);
    let settled = settle(Some(base_fds));
    let (fds, rss) = figures(pid);
    eprintln!(
        "figures: after {WARM_UP} warm-up namespaces: {base_fds} descriptors, {base_rss} KiB RSS; \
         after {PODS} more created, used once and deleted: {fds} descriptors, {rss} KiB RSS"
    );
    assert!(
        settled.is_some(),
        "the agent holds {fds} descriptors, {base_fds} before the {PODS} namespaces"
    );
    assert!(
        rss <= base_rss + 4 * 1024,
        "RSS grew from {base_rss} KiB to {rss} KiB over {PODS} namespaces"
    );
    let served = agent
        .log()
        .lines()
        .filter(|l| l.contains("network namespace ready"))
        .count();
    assert_eq!(served, 1 + WARM_UP + PODS, "{}", agent.log());
}
