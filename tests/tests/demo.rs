//! `cargo xtask demo` (the README's first command) end to end: the `mcpwarden-demo` binary, with
//! its sample server, agent and unmodified rmcp client. Guards the parts no other test runs:
//! the demo client (rmcp's reqwest transport, started by the demo in its cgroup) and the demo's
//! clean-up.

use std::process::Command;

use mcpwarden_tests::require_root;

const DEMO_BIN: &str = env!("CARGO_BIN_EXE_mcpwarden-demo");

#[test]
fn the_demo_runs_its_calls_and_cleans_up() {
    require_root();
    let out = Command::new(DEMO_BIN)
        .output()
        .unwrap_or_else(|e| panic!("run {DEMO_BIN}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    assert!(out.status.success(), "demo failed ({})\n{all}", out.status);
    for expected in [
        "(expect denied by the policy) -> tool error: Denied by mcpwarden policy: destructive.",
        "-> JSON-RPC error: Mcp error: -32602: Unknown tool: dump_secrets",
        "(expect allowed, first of 1 per minute) -> ok: scan of prod started",
        "(expect rate-limited) -> tool error: Denied by mcpwarden policy: rate limit",
        "demo finished: the programs are detached and the demo cgroups removed",
    ] {
        assert!(stdout.contains(expected), "missing `{expected}`\n{all}");
    }
    assert!(!stderr.contains("panicked"), "{all}");
}
