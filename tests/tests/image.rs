//! The container image (deploy/Containerfile, test index 180): built offline with buildah from
//! the release agent binary (`MCPWARDEN_IMAGE_BINARY`, which `cargo xtask test` sets), then
//! the agent FROM THE IMAGE — its own binary, libraries and files, chrooted into the image's
//! root in a mount namespace of its own with what the container runtime provides and the
//! hostPath volumes of the rendered DaemonSet (read from `kubectl kustomize`) — checks policies, and attaches its programs so that a pod's calls
//! are decided and audited. `podman run` is tried too, where the runtime can run at all.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;
use mcpwarden_tests::image::{release_binary, Image, SharedMount};
use mcpwarden_tests::{
    free_addr, require_root, test_ip, wait_for, Agent, AgentOpts, PodNet, TempDir, TestCgroup,
    TestServer,
};
use serde::Deserialize;
use serde_json::Value;

const INDEX: u8 = 180;

const GOOD_POLICY: &str = r#"{
  "version": "1",
  "default": "deny",
  "tools": {
    "echo": {},
    "drop_cluster": {"action": "deny", "reason": "destructive"}
  }
}
"#;

/// Line 5, column 30 is the bad action's value.
const BAD_POLICY: &str = r#"{
  "version": "1",
  "default": "deny",
  "tools": {
    "echo": {"action": "maybe"}
  }
}
"#;

fn describe(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The host paths the rendered DaemonSet (deploy/kustomize/base) mounts into the agent's
/// container: its hostPath volumes, each mounted at the same path inside, as the launcher binds
/// them.
fn daemonset_host_paths() -> Vec<PathBuf> {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kustomize/base");
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&base)
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl kustomize (cargo xtask setup checks for kubectl): {e}")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        describe(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let daemonset = serde_yaml_ng::Deserializer::from_str(&text)
        .filter_map(|doc| serde_yaml_ng::Value::deserialize(doc).ok())
        .find(|doc| doc["kind"] == "DaemonSet" && doc["metadata"]["name"] == "mcpwarden")
        .expect("the rendered base has the mcpwarden DaemonSet");
    let spec = &daemonset["spec"]["template"]["spec"];
    let mounts = spec["containers"][0]["volumeMounts"]
        .as_sequence()
        .expect("the agent's volumeMounts");
    let mut paths = Vec::new();
    for volume in spec["volumes"].as_sequence().expect("volumes") {
        let Some(host) = volume["hostPath"]["path"].as_str() else {
            continue;
        };
        let inside = mounts
            .iter()
            .find(|m| m["name"] == volume["name"])
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("hostPath volume {host} is not mounted"));
        assert_eq!(
            inside, host,
            "the launcher binds host paths at the same path inside"
        );
        paths.push(PathBuf::from(host));
    }
    for needed in ["/sys/fs/bpf", "/sys/fs/cgroup", "/run/netns"] {
        assert!(
            paths.iter().any(|p| p == Path::new(needed)),
            "the DaemonSet mounts {needed}: {paths:?}"
        );
    }
    paths
}

fn run(launcher: &Path, args: &[&str]) -> Output {
    std::process::Command::new(launcher)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", launcher.display()))
}

/// The image holds the agent and what it needs, and nothing else: its entrypoint and command
/// are the DaemonSet's, its binary runs from its own root (`--version`), and
/// `mcpwarden policy check` accepts a good policy and rejects a bad one at file:line:col.
#[test]
fn the_image_runs_its_agent_and_checks_policies() {
    require_root();
    let image = Image::build(&release_binary());

    let config = image.oci_config();
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/mcpwarden"]),
        "{config}"
    );
    assert_eq!(
        config["Cmd"],
        serde_json::json!(["run", "--config", "/etc/mcpwarden/config.yaml"]),
        "{config}"
    );
    assert_eq!(
        config["Labels"]["org.opencontainers.image.title"], "mcpwarden",
        "{config}"
    );
    assert_ne!(
        config["Labels"]["org.opencontainers.image.version"], "unknown",
        "{config}"
    );

    match image.podman_run(&["--version"]) {
        None => eprintln!("podman is not installed: not tried"),
        Some(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.starts_with("mcpwarden "), "{}", describe(&out));
            eprintln!("podman run: {}", text.trim());
        }
        // Accepted: crun cannot set rlimits in some sandboxes (this one: EPERM). The chroot
        // below runs the same binary from the same root.
        Some(out) => eprintln!(
            "podman run could not run the image here (accepted):\n{}",
            describe(&out)
        ),
    }

    let rootfs = image.mount();
    let root = rootfs.path();
    for file in [
        "usr/local/bin/mcpwarden",
        "lib64/ld-linux-x86-64.so.2",
        "etc/ssl/certs/ca-certificates.crt",
        "etc/passwd",
        "etc/group",
    ] {
        assert!(
            root.join(file).is_file(),
            "/{file} is missing from the image"
        );
    }
    for dir in [
        "etc/mcpwarden",
        "proc",
        "sys",
        "run/mcpwarden",
        "var/lib/mcpwarden",
        "var/log/mcpwarden",
        "tmp",
    ] {
        assert!(root.join(dir).is_dir(), "/{dir} is missing from the image");
    }
    assert!(
        !root.join("bin/sh").exists() && !root.join("usr/bin").exists(),
        "the image is the agent alone: no shell, no tools"
    );

    let files = TempDir::new("image-policies");
    let tmp = std::env::temp_dir();
    let host_paths = daemonset_host_paths();
    let mut binds: Vec<&Path> = host_paths.iter().map(PathBuf::as_path).collect();
    binds.push(tmp.as_path());
    let launcher = rootfs.launcher(&binds);
    let out = run(&launcher, &["--version"]);
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success() && version.starts_with("mcpwarden "),
        "{}",
        describe(&out)
    );
    eprintln!("from the image: {version}");

    let good = files.path().join("good.json");
    std::fs::write(&good, GOOD_POLICY).expect("write policy");
    let good_arg = good.display().to_string();
    let out = run(&launcher, &["policy", "check", &good_arg]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{good_arg}: ok")),
        "{}",
        describe(&out)
    );

    let bad = files.path().join("bad.json");
    std::fs::write(&bad, BAD_POLICY).expect("write policy");
    let bad_arg = bad.display().to_string();
    let out = run(&launcher, &["policy", "check", &bad_arg]);
    assert!(!out.status.success(), "{}", describe(&out));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!("{bad_arg}:5:30: ")) && said.contains("maybe"),
        "the error must name file:line:col\n{}",
        describe(&out)
    );
}

/// The agent from the image, chrooted with the DaemonSet's mounts, attaches its programs and
/// serves a pod network namespace pinned while it runs (the pin reaches it through a shared
/// mount, as HostToContainer propagation delivers it): the pod's allowed call reaches the
/// server, its denied call is refused, both are audited with the pod's cgroup and namespace,
/// and SIGTERM from the harness stops the agent itself.
#[test]
fn the_agent_from_the_image_decides_and_audits_a_pods_calls() {
    require_root();
    let image = Image::build(&release_binary());
    let rootfs = image.mount();

    let cg = TestCgroup::new("image");
    let attach = cg.child("pods");
    let mut net = PodNet::new("image", INDEX);
    let _shared_pins = SharedMount::new(net.pins.path());
    let ip = net.remote_ip;
    let server = net.on_remote(move || TestServer::start(SocketAddr::new(IpAddr::V4(ip), 0)));
    let tmp = std::env::temp_dir();
    let host_paths = daemonset_host_paths();
    let mut binds: Vec<&Path> = host_paths.iter().map(PathBuf::as_path).collect();
    binds.extend([tmp.as_path(), net.pins.path()]);
    let launcher = rootfs.launcher(&binds);
    let pin_dir = net.pins.path().display().to_string();
    let mut agent = Agent::start_with(
        launcher.to_str().expect("a UTF-8 path"),
        AgentOpts {
            name: "image".into(),
            endpoints: vec![(server.url(), GOOD_POLICY.into())],
            listen: vec![free_addr(test_ip(INDEX)), free_addr(Ipv6Addr::LOCALHOST)],
            cgroup: attach.clone(),
            agent_cgroup: cg.path().join("agent"),
        },
        &["--netns-dir".to_string(), pin_dir],
    );

    // The process the harness started is the image's binary, rooted in the image.
    let pid = agent.pid().expect("the agent runs");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("readlink exe");
    assert_eq!(
        exe,
        rootfs.path().join("usr/local/bin/mcpwarden"),
        "the agent is not the image's binary"
    );
    let own_root = std::fs::read_link(format!("/proc/{pid}/root")).expect("readlink root");
    assert_eq!(
        own_root,
        rootfs.path(),
        "the agent is not chrooted in the image"
    );

    let pod = net.pod("a", attach.join("a"), true, true);
    agent.wait_netns_ready(pod.ino());
    let run = pod.client(
        CLIENT_BIN,
        &[
            "call",
            &server.url(),
            "echo",
            r#"{"text":"through the image"}"#,
            "drop_cluster",
            r#"{"cluster":"prod"}"#,
        ],
        CLIENT_TIMEOUT,
    );
    run.assert_success();
    let lines = run.json_lines();
    assert_eq!(
        result_text(&lines[0]),
        "through the image",
        "{}",
        run.describe()
    );
    assert!(is_error_result(&lines[1]), "{}", run.describe());
    assert_eq!(result_text(&lines[1]), DENY_TEXT_DESTRUCTIVE);
    assert_eq!(server.calls("echo"), 1);
    server.assert_not_reached("drop_cluster");

    let want_cgroup = cg.child_rel_path("pods/a");
    for (tool, decision) in [("echo", "allow"), ("drop_cluster", "deny")] {
        let record: Value = wait_for(AUDIT_WAIT, || {
            agent
                .decisions_for(tool)
                .into_iter()
                .find(|r| r["pid"] == run.pid)
        })
        .unwrap_or_else(|| {
            panic!(
                "no decision record of {tool} by pid {}:\n{}",
                run.pid,
                agent.audit_text()
            )
        });
        assert_eq!(record["decision"], decision, "{record}");
        assert_eq!(record["cgroup"], want_cgroup.as_str(), "{record}");
        assert_eq!(record["netns"], pod.ino(), "{record}");
        assert_eq!(record["dst"], server.addr().to_string(), "{record}");
    }

    // `exec` all the way: the harness's SIGTERM reaches the agent, which stops by itself.
    let (status, killed) = agent.terminate();
    assert!(
        !killed && status.success(),
        "the agent from the image did not stop cleanly on SIGTERM ({status}, killed: {killed}):\n{}",
        agent.log()
    );
    assert!(
        wait_for(Duration::from_secs(5), || {
            (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        })
        .is_some(),
        "the agent's process {pid} is still there"
    );
}
