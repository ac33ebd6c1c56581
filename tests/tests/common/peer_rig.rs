//! A test's world around an [`McpPeer`] (a raw MCP server speaking every revision) instead of
//! the rmcp `TestServer`: one cgroup, one peer, one agent with one endpoint on the peer.
//! Clients are `mcp-client script` runs inside the attached cgroup.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use mcpwarden_tests::script::{run_script, ScriptRun};
use mcpwarden_tests::{
    free_addr, require_root, test_ip, Agent, AgentOpts, McpPeer, PeerOpts, TestCgroup,
};
use serde_json::{json, Value};

use super::{AGENT_BIN, AUDIT_WAIT, CLIENT_BIN, CLIENT_TIMEOUT};

/// The policy of the protocol and bypass suites, with each kind of visibility:
/// - visible and allowed: echo, add, slow_echo, resumable, split_echo, confirm_action, fail_rpc;
/// - visible, explicitly denied (isError "destructive"): drop_cluster;
/// - hidden although listed (`hide`): secret_dump;
/// - unlisted under default deny: start_security_scan.
pub const PEER_POLICY: &str = r#"{
  "version": "1",
  "default": "deny",
  "hide": ["secret_dump"],
  "tools": {
    "echo": {}, "add": {}, "slow_echo": {}, "resumable": {}, "split_echo": {},
    "confirm_action": {}, "fail_rpc": {}, "secret_dump": {},
    "drop_cluster": {"action": "deny", "reason": "destructive"}
  }
}"#;

/// The tools a client of [`PEER_POLICY`] sees in tools/list, in the peer's order.
pub const VISIBLE: [&str; 7] = [
    "echo",
    "add",
    "drop_cluster",
    "slow_echo",
    "resumable",
    "split_echo",
    "confirm_action",
];

pub struct PeerRig {
    pub agent: Agent,
    pub peer: McpPeer,
    pub cg: TestCgroup,
    pub app: PathBuf,
    pub ip: Ipv4Addr,
}

impl PeerRig {
    /// The agent's endpoint is `http://127.0.0.(10+index):PORT/mcp`; being the only server at
    /// that address, it covers every path of the peer (`/sse`, `/messages/`, `/mcp-json`, …).
    pub fn start(name: &str, index: u8, policy: &str, opts: PeerOpts) -> PeerRig {
        require_root();
        let cg = TestCgroup::new(name);
        let app = cg.child("app");
        let agent_cg = cg.path().join("agent");
        let ip = test_ip(index);
        let peer = McpPeer::start_with(SocketAddr::new(IpAddr::V4(ip), 0), opts);
        let agent = Agent::start(
            AGENT_BIN,
            AgentOpts {
                name: name.to_string(),
                endpoints: vec![(peer.url("/mcp"), policy.to_string())],
                listen: vec![free_addr(ip), free_addr(Ipv6Addr::LOCALHOST)],
                cgroup: app.clone(),
                agent_cgroup: agent_cg,
            },
        );
        PeerRig {
            agent,
            peer,
            cg,
            app,
            ip,
        }
    }

    /// Run `steps` with `mcp-client script` inside the attached cgroup.
    pub fn script(&self, steps: Value) -> ScriptRun {
        run_script(
            CLIENT_BIN,
            Some(&self.app),
            &json!({ "steps": steps }),
            CLIENT_TIMEOUT,
        )
    }

    pub fn url(&self, path: &str) -> String {
        self.peer.url(path)
    }

    /// Wait until an audit record satisfies `pred`; panic with the audit if none does.
    pub fn wait_record(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.agent.wait_audit(AUDIT_WAIT, pred).unwrap_or_else(|| {
            panic!(
                "no audit record: {what}; audit:\n{}",
                self.agent.audit_text()
            )
        })
    }
}

/// A JSON-RPC request body.
pub fn rpc(id: Value, method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
}

/// A tools/call body.
pub fn call(id: u64, tool: &str, args: Value) -> String {
    rpc(
        json!(id),
        "tools/call",
        json!({"name": tool, "arguments": args}),
    )
}

pub fn notification(method: &str) -> String {
    json!({"jsonrpc": "2.0", "method": method}).to_string()
}

pub fn init_body(id: u64, version: &str) -> String {
    rpc(
        json!(id),
        "initialize",
        json!({"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}),
    )
}

/// The JSON-RPC messages carried by a script step's SSE events.
pub fn event_messages(step: &Value) -> Vec<Value> {
    step["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter(|e| !e["json"].is_null())
                .map(|e| e["json"].clone())
                .collect()
        })
        .unwrap_or_default()
}

/// The tool names of a tools/list result.
pub fn tool_names(result: &Value) -> Vec<String> {
    result["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("no tools in {result}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}
