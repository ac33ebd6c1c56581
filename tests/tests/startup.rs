//! The binary's start-up errors: a bad policy or config stops the agent before it touches the
//! host, with a message naming the file, line and column.

mod common;

use std::process::Command;

use common::*;
use mcpwarden_tests::TempDir;

fn run_agent(args: &[&str]) -> (bool, String) {
    let out = Command::new(AGENT_BIN)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {AGENT_BIN}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_bad_policy_stops_the_agent_naming_file_line_and_column() {
    let dir = TempDir::new("startup-policy");
    let policy = dir.path().join("policy.json");
    // Line 3, column 12: the misspelt "limit" key.
    std::fs::write(
        &policy,
        "{\"version\": \"1\", \"default\": \"deny\",\n  \"tools\": {\n    \"scan\": {\"limit\": []}\n  }\n}\n",
    )
    .expect("write policy");
    let policy_s = policy.display().to_string();
    let (ok, out) = run_agent(&[
        "run",
        "--endpoint",
        "http://127.0.0.1:9/mcp",
        "--policy",
        &policy_s,
    ]);
    assert!(!ok, "the agent started with a bad policy:\n{out}");
    assert!(
        out.contains(&format!("{policy_s}:3:")),
        "no file:line in:\n{out}"
    );
    assert!(
        out.contains("limit"),
        "the message does not name the bad key:\n{out}"
    );
    assert!(!out.contains("mcpwarden ready"), "{out}");
}

#[test]
fn a_bad_config_stops_the_agent_naming_file_line_and_column() {
    let dir = TempDir::new("startup-config");
    let config = dir.path().join("mcpwarden.yaml");
    std::fs::write(
        &config,
        "servers:\n  - url: http://127.0.0.1:9/mcp\n    policy: p.json\nlisten: [\"127.0.0.1:1\"]\naudti: -\n",
    )
    .expect("write config");
    let config_s = config.display().to_string();
    let (ok, out) = run_agent(&["run", "--config", &config_s]);
    assert!(!ok, "the agent started with a bad config:\n{out}");
    assert!(
        out.contains(&format!("{config_s}:5:1")),
        "no file:line:column in:\n{out}"
    );
    assert!(out.contains("audti"), "{out}");
}

#[test]
fn run_without_a_server_says_what_to_pass() {
    let (ok, out) = run_agent(&["run"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("--endpoint") && out.contains("--policy"),
        "{out}"
    );
}

/// A binding on a cgroup subtree a non-root user can write (a delegated subtree, as systemd's
/// `user@UID.service`) would let that user's processes move into whichever cgroup's policy
/// they prefer: the config is refused, naming the line and column of the selector.
#[test]
fn a_binding_on_a_cgroup_a_user_can_write_stops_the_agent() {
    mcpwarden_tests::require_root();
    let cg = mcpwarden_tests::TestCgroup::new("startup-deleg");
    let delegated = cg.child("user-sessions");
    std::os::unix::fs::chown(&delegated, Some(1000), Some(1000)).expect("chown the cgroup");
    let dir = TempDir::new("startup-deleg");
    std::fs::write(dir.path().join("p.json"), POLICY).expect("write policy");
    let rel = cg.child_rel_path("user-sessions");
    let config = dir.path().join("mcpwarden.yaml");
    std::fs::write(
        &config,
        format!(
            "servers:\n  - url: http://127.0.0.1:9/mcp\n    policy: p.json\nbindings:\n  - match: {{cgroup: \"{rel}/*.scope\"}}\n    policy: p.json\n"
        ),
    )
    .expect("write config");
    let config_s = config.display().to_string();
    let (ok, out) = run_agent(&["run", "--config", &config_s]);
    assert!(
        !ok,
        "the agent started with a binding users can pick:\n{out}"
    );
    assert!(
        out.contains(&format!("{config_s}:5:")),
        "no file:line:column in:\n{out}"
    );
    assert!(out.contains("uid 1000 can write"), "{out}");
    assert!(out.contains("Hint:"), "{out}");
}

/// The interceptor listens in every namespace it serves: on anything but loopback it would be
/// reachable from the network.
#[test]
fn a_listen_address_that_is_not_loopback_stops_the_agent() {
    let dir = TempDir::new("startup-listen");
    std::fs::write(dir.path().join("p.json"), POLICY).expect("write policy");
    let policy = dir.path().join("p.json").display().to_string();
    let (ok, out) = run_agent(&[
        "run",
        "--endpoint",
        "http://127.0.0.1:9/mcp",
        "--policy",
        &policy,
        "--listen",
        "0.0.0.0:15001",
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("not a loopback address"), "{out}");
}
