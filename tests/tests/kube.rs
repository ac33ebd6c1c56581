//! Kubernetes: pod identity and Service backends from an API server (test indices 185–189).
//!
//! The agent talks to `ApiServer`, a stand-in speaking the real wire format over TLS with a
//! bearer token, through the same kube client it uses in a cluster (a kubeconfig). Callers are
//! pods of a `PodNet` (network namespaces of their own) whose cgroups are laid out as kubelet
//! lays them out, with pod UIDs the stand-in serves.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use mcpwarden_tests::{
    free_addr, require_root, test_ip, wait_for, Agent, AgentOpts, ApiServer, Pod, PodNet, TempDir,
    TestCgroup, TestServer,
};
use serde_json::{json, Value};

const ALLOW_ECHO: &str = r#"{"version": "1", "default": "deny", "tools": {"echo": {}}}"#;
const DENY_ALL: &str = r#"{"version": "1", "default": "deny", "tools": {"echo": {"action": "deny", "reason": "not for this workload"}}}"#;
const TAINT: &str = "mcpwarden.io/agent-not-ready";

/// A pod as the API server stores it, on `node`, with one running container `main`.
fn pod_object(name: &str, uid: &str, node: &str, app: &str, container_id: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "payments", "uid": uid, "labels": {"app": app}},
        "spec": {"nodeName": node, "serviceAccountName": "agent-sa", "containers": [{"name": "main", "image": "agent"}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "main", "containerID": format!("containerd://{container_id}"), "image": "agent",
            "imageID": "", "ready": true, "restartCount": 0}]}
    })
}

/// `…/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`
fn kubelet_cgroup(attach: &std::path::Path, uid: &str, container_id: &str) -> PathBuf {
    attach.join(format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{container_id}.scope",
        uid.replace('-', "_")
    ))
}

/// `mcpwarden status --json` of `agent`.
fn status_json(agent: &Agent) -> Value {
    let out = std::process::Command::new(AGENT_BIN)
        .args(["status", "--json", "--admin-socket"])
        .arg(agent.admin_socket())
        .output()
        .expect("run mcpwarden status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// The readiness report in `agent`'s status.
fn health(agent: &Agent) -> Value {
    status_json(agent)["health"].clone()
}

/// A scrape of `agent`'s /metrics.
fn metrics_text(agent: &Agent) -> String {
    let url = format!("http://{}/metrics", agent.metrics_addr());
    match mcpwarden_tests::rawhttp::request("GET", &url, b"", &[], Duration::from_secs(10)) {
        mcpwarden_tests::rawhttp::RawOutcome::Response(r) => {
            String::from_utf8_lossy(&r.body).into_owned()
        }
        mcpwarden_tests::rawhttp::RawOutcome::NoResponse { reason, .. } => {
            panic!("GET {url}: {reason}")
        }
    }
}

struct KubeRig {
    agent: Agent,
    server: TestServer,
    net: PodNet,
    attach: PathBuf,
    api: ApiServer,
    _files: TempDir,
    _cg: TestCgroup,
}

impl KubeRig {
    /// An agent whose config is `config` with `{URL}` the server's URL and `{KUBECONFIG}` the
    /// stand-in's; policy files `files` beside it.
    fn start(
        name: &str,
        index: u8,
        config: &str,
        files: &[(&str, &str)],
        api: ApiServer,
    ) -> KubeRig {
        require_root();
        let cg = TestCgroup::new(name);
        let attach = cg.child("pods");
        let net = PodNet::new(name, index);
        let ip = net.remote_ip;
        let server = net.on_remote(move || TestServer::start(SocketAddr::new(IpAddr::V4(ip), 0)));
        let dir = TempDir::new(name);
        for (file, text) in files {
            std::fs::write(dir.path().join(file), text).expect("write a policy file");
        }
        let config = config
            .replace("{URL}", &server.url())
            .replace("{KUBECONFIG}", &api.kubeconfig().display().to_string());
        let config_path = dir.path().join("mcpwarden.yaml");
        std::fs::write(&config_path, config).expect("write the config");
        let agent = Agent::start_with(
            AGENT_BIN,
            AgentOpts {
                name: name.into(),
                endpoints: Vec::new(),
                listen: vec![free_addr(test_ip(index)), free_addr(Ipv6Addr::LOCALHOST)],
                cgroup: attach.clone(),
                agent_cgroup: cg.path().join("agent"),
            },
            &[
                "--config".to_string(),
                config_path.display().to_string(),
                "--netns-dir".to_string(),
                net.pins.path().display().to_string(),
            ],
        );
        KubeRig {
            agent,
            server,
            net,
            attach,
            api,
            _files: dir,
            _cg: cg,
        }
    }

    fn pod(&mut self, tag: &str, cgroup: PathBuf) -> Pod {
        let pod = self.net.pod(tag, cgroup, true, true);
        self.agent.wait_netns_ready(pod.ino());
        pod
    }

    /// `mcp-client call URL tool args` from `pod`: (its pid, its output lines).
    fn call(&self, pod: &Pod, url: &str, tool: &str, args: &str) -> (u32, Vec<Value>) {
        let run = pod.client(CLIENT_BIN, &["call", url, tool, args], CLIENT_TIMEOUT);
        run.assert_success();
        (run.pid, run.json_lines())
    }

    /// The decision record of `tool` by `pid`.
    fn decision(&self, pid: u32, tool: &str) -> Value {
        wait_for(AUDIT_WAIT, || {
            self.agent
                .decisions_for(tool)
                .into_iter()
                .find(|r| r["pid"] == pid)
        })
        .unwrap_or_else(|| {
            panic!(
                "no decision record of {tool} by pid {pid}:\n{}",
                self.agent.audit_text()
            )
        })
    }
}

/// A call from a pod is audited with the pod's name, namespace, UID, service account,
/// container and node; a binding on a pod label chooses its policy, and follows a label change
/// the watch delivers; a pod the API server does not know is refused after `identity_wait_ms`.
/// The watch asks only for this node's pods, with the token; once ready, the agent removes the
/// not-ready taint from its node.
#[test]
fn pod_callers_are_named_by_their_pod_and_bound_by_its_labels() {
    let node = "node-185";
    let api = ApiServer::start("kube-id");
    api.apply_node(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
        "spec": {"taints": [
            {"key": TAINT, "effect": "NoSchedule"},
            {"key": "example.com/other", "value": "x", "effect": "NoSchedule"}]}
    }));
    let (uid_a, id_a) = ("0b9e6c2a-1d4f-4a7e-9c3b-5e8f7a6d4c21", "a1".repeat(32));
    let (uid_b, id_b) = ("7c5d3e1f-2a4b-4c6d-8e9f-0a1b2c3d4e5f", "b2".repeat(32));
    let (uid_c, id_c) = ("9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a", "c3".repeat(32));
    api.apply_pod(pod_object("agent-a", uid_a, node, "agent", &id_a));
    api.apply_pod(pod_object("batch-b", uid_b, node, "batch", &id_b));
    // Another node's pod: not this agent's business (the field selector leaves it out).
    api.apply_pod(pod_object("elsewhere", uid_c, "node-other", "agent", &id_c));
    let config = format!(
        "identity_wait_ms: 1500\n\
         servers:\n  - name: tools\n    url: {{URL}}\n    policy: deny.json\n\
         bindings:\n  - match: {{labels: {{app: agent}}}}\n    policy: allow.json\n\
         kubernetes:\n  enabled: true\n  kubeconfig: {{KUBECONFIG}}\n  node_name: {node}\n"
    );
    let mut rig = KubeRig::start(
        "kube-id",
        185,
        &config,
        &[("allow.json", ALLOW_ECHO), ("deny.json", DENY_ALL)],
        api,
    );
    let url = rig.server.url();

    // The watch: this node's pods only, authenticated, listed then watched.
    for verb in ["list", "watch"] {
        let seen = rig.api.wait_for_request(
            |s| s.path == "/api/v1/pods" && s.verb == verb,
            Duration::from_secs(20),
        );
        assert_eq!(
            seen.param("fieldSelector").as_deref(),
            Some(format!("spec.nodeName={node}").as_str()),
            "{seen:?}"
        );
        assert!(seen.authorized, "{seen:?}");
    }

    let a = rig.pod("a", kubelet_cgroup(&rig.attach.clone(), uid_a, &id_a));
    let (pid, lines) = rig.call(&a, &url, "echo", r#"{"text":"from a"}"#);
    assert_eq!(result_text(&lines[0]), "from a", "{lines:?}");
    let d = rig.decision(pid, "echo");
    assert_eq!(d["decision"], "allow", "{d}");
    assert_eq!(d["binding"], "/bindings/0", "the label binding chose: {d}");
    for (field, want) in [
        ("pod", "agent-a"),
        ("namespace", "payments"),
        ("pod_uid", uid_a),
        ("service_account", "agent-sa"),
        ("container", "main"),
        ("container_id", id_a.as_str()),
        ("node", node),
    ] {
        assert_eq!(d[field], want, "{field}: {d}");
    }

    // Another pod, another label: the server's policy denies.
    let b = rig.pod("b", kubelet_cgroup(&rig.attach.clone(), uid_b, &id_b));
    let (pid, lines) = rig.call(&b, &url, "echo", r#"{"text":"from b"}"#);
    assert!(is_error_result(&lines[0]), "{lines:?}");
    let d = rig.decision(pid, "echo");
    assert_eq!(d["decision"], "deny", "{d}");
    assert_eq!(d["pod"], "batch-b", "{d}");
    assert!(d["binding"].is_null(), "{d}");
    assert_eq!(rig.server.calls("echo"), 1, "only pod a's call ran");

    // Its label changes: the watch brings it, and the binding follows.
    rig.api
        .apply_pod(pod_object("batch-b", uid_b, node, "agent", &id_b));
    let allowed = wait_for(Duration::from_secs(10), || {
        let (pid, lines) = rig.call(&b, &url, "echo", r#"{"text":"b relabelled"}"#);
        (result_text(&lines[0]) == "b relabelled").then_some(pid)
    })
    .expect("pod b's calls allowed once its label says app=agent");
    assert_eq!(rig.decision(allowed, "echo")["binding"], "/bindings/0");

    // A pod the API server never described to this node (it is another node's): refused
    // after the wait, never given the server's policy in its place.
    let c = rig.pod("c", kubelet_cgroup(&rig.attach.clone(), uid_c, &id_c));
    let started = Instant::now();
    let (pid, lines) = rig.call(&c, &url, "echo", r#"{"text":"from c"}"#);
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(is_error_result(&lines[0]), "{lines:?}");
    let d = rig.decision(pid, "echo");
    assert_eq!(d["decision"], "deny", "{d}");
    assert!(
        d["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("caller identity unresolved")),
        "{d}"
    );
    assert!(d.get("pod").is_none(), "{d}");
    assert_eq!(
        d["container_id"],
        id_c.as_str(),
        "known from the cgroup path: {d}"
    );

    // A process in cgroups a user made (a delegated subtree), named like pod a's: not pod a.
    // It gets no pod, so the label binding cannot pass it over and it is refused, and the
    // server never sees its call.
    let spoof_cg = rig.attach.join("user-1000");
    let spoof_leaf = kubelet_cgroup(&spoof_cg, uid_a, &id_a);
    let spoof = rig.pod("spoof", spoof_leaf.clone());
    let mut dir = spoof_cg.clone();
    for part in spoof_leaf
        .strip_prefix(&spoof_cg)
        .expect("below the user's cgroup")
        .components()
    {
        std::os::unix::fs::chown(&dir, Some(1000), Some(1000)).expect("chown the user's cgroup");
        dir = dir.join(part);
    }
    std::os::unix::fs::chown(&dir, Some(1000), Some(1000)).expect("chown the user's cgroup");
    let echoes = rig.server.calls("echo");
    let (pid, lines) = rig.call(&spoof, &url, "echo", r#"{"text":"i am pod a"}"#);
    assert!(is_error_result(&lines[0]), "{lines:?}");
    let d = rig.decision(pid, "echo");
    assert_eq!(d["decision"], "deny", "{d}");
    assert!(d.get("pod").is_none(), "not attributed to pod a: {d}");
    assert!(d.get("container_id").is_none(), "{d}");
    assert_eq!(
        rig.server.calls("echo"),
        echoes,
        "the spoofed call never ran"
    );

    // The watch expires (410 Gone): the agent lists again, and keeps following. A bookmark
    // on the way changes nothing.
    rig.api.bookmark();
    let lists_before = rig
        .api
        .requests()
        .iter()
        .filter(|s| s.path == "/api/v1/pods" && s.is_list())
        .count();
    rig.api.expire_watches();
    rig.api.wait_for_requests(
        |s| s.path == "/api/v1/pods" && s.is_list(),
        lists_before + 1,
        Duration::from_secs(20),
    );
    // Pod a is deleted: its late calls are still its own for the grace period (60 s).
    rig.api.delete_pod("payments", "agent-a");
    rig.api
        .apply_pod(pod_object("batch-b", uid_b, node, "batch", &id_b));
    wait_for(Duration::from_secs(10), || {
        let (pid, _) = rig.call(&b, &url, "echo", r#"{"text":"b again"}"#);
        (rig.decision(pid, "echo")["decision"] == "deny").then_some(())
    })
    .expect("the relabelling after the re-list is followed");
    let (pid, lines) = rig.call(&a, &url, "echo", r#"{"text":"late"}"#);
    assert_eq!(result_text(&lines[0]), "late", "{lines:?}");
    let d = rig.decision(pid, "echo");
    assert_eq!(d["pod"], "agent-a", "a deleted pod's late call: {d}");
    assert_eq!(d["binding"], "/bindings/0", "{d}");

    // Ready: the not-ready taint is gone from this node, the other taint stays.
    let taints = wait_for(Duration::from_secs(20), || {
        let n = rig.api.node(node)?;
        let taints = n["spec"]["taints"].as_array()?.clone();
        (!taints.iter().any(|t| t["key"] == TAINT)).then_some(taints)
    })
    .unwrap_or_else(|| panic!("taint not removed: {:?}", rig.api.node(node)));
    assert_eq!(taints.len(), 1, "{taints:?}");
    assert_eq!(taints[0]["key"], "example.com/other");
    let status = status_json(&rig.agent);
    assert_eq!(status["kubernetes"]["pods_synced"], true, "{status}");
    assert_eq!(status["kubernetes"]["taint_removed"], true, "{status}");
    let metrics = metrics_text(&rig.agent);
    assert!(
        metrics.contains("mcpwarden_kubernetes_pods_synced 1"),
        "{metrics}"
    );
}

/// A server configured by its Service name also covers its backends: a pod dialling a backend
/// pod's address directly is intercepted once the EndpointSlice lists that address, and the
/// slice's changes are followed.
#[test]
fn a_service_backend_dialled_directly_is_intercepted() {
    let node = "node-186";
    let api = ApiServer::start("kube-svc");
    let config = format!(
        "servers:\n  - name: tools\n    url: http://tools.mcp.svc.cluster.local:8080/mcp\n    policy: allow.json\n\
         kubernetes:\n  enabled: true\n  kubeconfig: {{KUBECONFIG}}\n  node_name: {node}\n  remove_taint: \"\"\n"
    );
    let mut rig = KubeRig::start("kube-svc", 186, &config, &[("allow.json", ALLOW_ECHO)], api);
    let backend = rig.server.addr();
    let slice = |addresses: &[String]| {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "tools-x1", "namespace": "mcp",
                         "labels": {"kubernetes.io/service-name": "tools",
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "ports": [{"name": "mcp", "port": backend.port(), "protocol": "TCP"}],
            "endpoints": addresses.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true},
                                                         "targetRef": {"kind": "Pod", "namespace": "mcp", "name": format!("tools-{a}")}})).collect::<Vec<_>>()
        })
    };
    // At first the slice lists another backend only.
    rig.api
        .apply_endpointslice(slice(&["10.186.250.9".to_string()]));
    let seen = rig.api.wait_for_request(
        |s| {
            s.path == "/apis/discovery.k8s.io/v1/namespaces/mcp/endpointslices" && s.verb == "watch"
        },
        Duration::from_secs(20),
    );
    assert_eq!(
        seen.param("labelSelector").as_deref(),
        Some("kubernetes.io/service-name=tools,endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io"),
        "{seen:?}"
    );
    // A slice someone made by hand for the Service, pointing at the backend: not followed.
    let mut forged = slice(&[backend.ip().to_string()]);
    forged["metadata"]["name"] = json!("tools-forged");
    forged["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] = json!("someone");
    rig.api.apply_endpointslice(forged);
    let a = rig.pod("a", rig.attach.join("a"));
    std::thread::sleep(Duration::from_secs(1));
    let status = status_json(&rig.agent);
    assert_eq!(
        status["kubernetes"]["service_backends"], 1,
        "the controller's slice only: {status}"
    );
    let direct = format!("http://{backend}/mcp");
    // Not a backend yet: the call goes straight through, as any non-MCP destination would.
    let (_, lines) = rig.call(&a, &direct, "add", r#"{"a":1,"b":2}"#);
    assert_eq!(result_text(&lines[0]), "3", "{lines:?}");
    assert_eq!(rig.server.calls("add"), 1);
    assert!(rig.agent.decisions_for("add").is_empty());

    // The slice now lists the real backend: direct calls to it are decided.
    rig.api.apply_endpointslice(slice(&[
        "10.186.250.9".to_string(),
        backend.ip().to_string(),
    ]));
    let (pid, lines) = wait_for(Duration::from_secs(10), || {
        let (pid, lines) = rig.call(&a, &direct, "add", r#"{"a":1,"b":2}"#);
        (!rig.agent.decisions_for("add").is_empty()).then_some((pid, lines))
    })
    .expect("direct calls to a listed backend are intercepted");
    assert!(
        lines[0].get("error").is_some() || is_error_result(&lines[0]),
        "add is not allowed: {lines:?}"
    );
    let d = rig.decision(pid, "add");
    assert_eq!(d["decision"], "deny", "{d}");
    assert_eq!(d["server"], "tools", "{d}");
    assert_eq!(d["dst"], backend.to_string(), "{d}");
    let before = rig.server.calls("add");
    let (pid, lines) = rig.call(&a, &direct, "echo", r#"{"text":"via the backend"}"#);
    assert_eq!(result_text(&lines[0]), "via the backend", "{lines:?}");
    assert_eq!(rig.decision(pid, "echo")["decision"], "allow");
    assert_eq!(rig.server.calls("add"), before, "a refused add never ran");
    let status = status_json(&rig.agent);
    assert_eq!(status["kubernetes"]["service_backends"], 2, "{status}");
}

/// With the API server unreachable at start, the agent starts all the same, says why in its
/// status, metrics and readiness, and retries; the API coming back makes it ready.
#[test]
fn an_unreachable_api_server_delays_readiness_not_the_start() {
    let node = "node-187";
    let api = ApiServer::start("kube-down");
    api.set_unavailable(true);
    let config = format!(
        "servers:\n  - name: tools\n    url: {{URL}}\n    policy: allow.json\n\
         kubernetes:\n  enabled: true\n  kubeconfig: {{KUBECONFIG}}\n  node_name: {node}\n  remove_taint: \"\"\n"
    );
    let rig = KubeRig::start(
        "kube-down",
        187,
        &config,
        &[("allow.json", ALLOW_ECHO)],
        api,
    );
    let status = wait_for(Duration::from_secs(20), || {
        let s = status_json(&rig.agent);
        (s["kubernetes"]["watch_errors"].as_u64() > Some(0)).then_some(s)
    })
    .unwrap_or_else(|| panic!("no watch error reported: {}", status_json(&rig.agent)));
    assert_eq!(status["kubernetes"]["connected"], false, "{status}");
    assert!(
        status["kubernetes"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{status}"
    );
    let report = health(&rig.agent);
    assert_eq!(report["ready"], false, "{report}");
    let check = report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "kubernetes").cloned())
        .unwrap_or_else(|| panic!("no kubernetes check: {report}"));
    assert_eq!(check["ok"], false, "{check}");
    assert!(
        check["detail"].as_str().is_some_and(|d| d.contains("503")),
        "the check says why: {check}"
    );
    assert!(metrics_text(&rig.agent).contains("mcpwarden_kubernetes_connected 0"));
    rig.api.set_unavailable(false);
    let ready = wait_for(Duration::from_secs(60), || {
        let h = health(&rig.agent);
        (h["ready"] == true).then_some(h)
    });
    assert!(ready.is_some(), "{}", health(&rig.agent));
    let status = status_json(&rig.agent);
    assert_eq!(status["kubernetes"]["connected"], true, "{status}");
    assert!(metrics_text(&rig.agent).contains("mcpwarden_kubernetes_pods_synced 1"));
}
