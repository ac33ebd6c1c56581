//! Shared set-up for the integration tests: one cgroup, one MCP server, one agent per test.
#![allow(dead_code)]

pub mod peer_rig;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use mcpwarden_tests::{
    free_addr, require_root, run_client, test_ip, Agent, AgentOpts, ClientRun, TestCgroup,
    TestServer,
};
use serde_json::Value;

pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_mcpwarden-agent");
pub const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_mcp-client");

pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
pub const AUDIT_WAIT: Duration = Duration::from_secs(5);

/// The policy most tests use (the example from the agent's interface).
pub const POLICY: &str = r#"{
  "version": "1",
  "default": "deny",
  "tools": {
    "echo": {},
    "add": {},
    "start_security_scan": {"limits": [{"counter": "scan_rate", "window": "minute", "max": 10, "scope": "grant"}]},
    "drop_cluster": {"action": "deny", "reason": "destructive"}
  }
}"#;

pub const DENY_TEXT_DESTRUCTIVE: &str =
    "Denied by mcpwarden policy: destructive. Do not retry this call.";

/// A test's world. Fields drop in declaration order: the agent stops first, then the server,
/// then the cgroup (which kills whatever is left and removes its directories).
pub struct Rig {
    pub agent: Agent,
    pub server: TestServer,
    pub cg: TestCgroup,
    /// The attached cgroup (`--cgroup`), where clients run.
    pub app: PathBuf,
    /// `--agent-cgroup` (created by the agent).
    pub agent_cg: PathBuf,
    pub ip: Ipv4Addr,
    pub listen_v4: SocketAddr,
    pub listen_v6: SocketAddr,
}

impl Rig {
    /// cgroup `mcpwarden-test-<name>-<pid>` with the agent attached at its child `app`, the
    /// agent in its child `agent`, an MCP server on 127.0.0.(10+index), and `policy` for it.
    pub fn start(name: &str, index: u8, policy: &str) -> Rig {
        Self::start_with(name, index, policy, &[])
    }

    /// [`Rig::start`] with more agent arguments.
    pub fn start_with(name: &str, index: u8, policy: &str, extra: &[String]) -> Rig {
        require_root();
        let cg = TestCgroup::new(name);
        let app = cg.child("app");
        let agent_cg = cg.path().join("agent");
        let ip = test_ip(index);
        let server = TestServer::start(SocketAddr::new(IpAddr::V4(ip), 0));
        let listen_v4 = free_addr(ip);
        let listen_v6 = free_addr(Ipv6Addr::LOCALHOST);
        let agent = Agent::start_with(
            AGENT_BIN,
            AgentOpts {
                name: name.to_string(),
                endpoints: vec![(server.url(), policy.to_string())],
                listen: vec![listen_v4, listen_v6],
                cgroup: app.clone(),
                agent_cgroup: agent_cg.clone(),
            },
            extra,
        );
        Rig {
            agent,
            server,
            cg,
            app,
            agent_cg,
            ip,
            listen_v4,
            listen_v6,
        }
    }

    /// Run `mcp-client args...` inside the attached cgroup.
    pub fn client(&self, args: &[&str]) -> ClientRun {
        run_client(CLIENT_BIN, Some(&self.app), args, CLIENT_TIMEOUT)
    }

    /// `/mcpwarden-test-.../app`
    pub fn app_rel(&self) -> String {
        self.cg.child_rel_path("app")
    }

    /// Audit records of `tool` that carry a decision.
    pub fn decisions_for(&self, tool: &str) -> Vec<Value> {
        self.agent.decisions_for(tool)
    }

    /// Wait for `n` decision records of `tool` by `pid`; panic with the audit if they do not come.
    pub fn wait_decisions(&self, tool: &str, pid: u32, n: usize) -> Vec<Value> {
        let got = mcpwarden_tests::wait_for(AUDIT_WAIT, || {
            let v: Vec<Value> = self
                .decisions_for(tool)
                .into_iter()
                .filter(|r| r["pid"] == pid)
                .collect();
            (v.len() >= n).then_some(v)
        });
        got.unwrap_or_else(|| {
            panic!(
                "expected {n} audit decision record(s) for tool {tool} from pid {pid}; audit:\n{}",
                self.agent.audit_text()
            )
        })
    }
}

impl Rig {
    /// Wait for a `refused` audit record from `pid`; panic with the audit if none comes.
    pub fn wait_refused(&self, pid: u32, what: &str) {
        self.agent
            .wait_audit(AUDIT_WAIT, |r| r["event"] == "refused" && r["pid"] == pid)
            .unwrap_or_else(|| {
                panic!(
                    "no `refused` record for {what}; audit:\n{}",
                    self.agent.audit_text()
                )
            });
    }
}

/// The text of the first content block of a CallToolResult printed by mcp-client.
pub fn result_text(v: &Value) -> &str {
    v["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text content in {v}"))
}

pub fn is_error_result(v: &Value) -> bool {
    v["isError"] == true
}

/// A tools/call JSON-RPC body.
pub fn call_body(id: u64, tool: &str, args: Value) -> String {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}})
        .to_string()
}
