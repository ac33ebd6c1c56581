//! `cargo xtask demo` (the README's first command) end to end: the `mcpwarden-demo` binary, with
//! its sample server, agent and unmodified rmcp client. Guards the parts no other test runs:
//! the demo client (rmcp's reqwest transport, started by the demo in its cgroup), the demo's
//! clean-up, and its live view of the audit log (`mcpwarden::audit_tail`, one line per call).

use std::process::Command;

use mcpwarden_tests::{require_root, schema, TempDir};

const DEMO_BIN: &str = env!("CARGO_BIN_EXE_mcpwarden-demo");

#[test]
fn the_demo_runs_its_calls_and_cleans_up() {
    require_root();
    let tmp = TempDir::new("demo");
    let audit = tmp.path().join("audit.jsonl");
    let out = Command::new(DEMO_BIN)
        .env("MCPWARDEN_DEMO_AUDIT", &audit)
        .env("NO_COLOR", "1")
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

    // The audit log, as the demo printed it: one line per call, latency merged in.
    let line_of = |tool: &str, decision: &str| {
        stdout
            .lines()
            .filter(|l| l.contains(&format!("  {tool} ")) && l.contains(&format!("  {decision} ")))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let echo = line_of("echo", "allow");
    assert_eq!(echo.len(), 1, "{all}");
    assert!(
        echo[0].contains("/tools/echo") && echo[0].trim_end().ends_with(" ms"),
        "{all}"
    );
    let drop = line_of("drop_cluster", "deny");
    assert_eq!(drop.len(), 1, "{all}");
    assert!(
        drop[0].contains("/tools/drop_cluster/action") && drop[0].contains("destructive"),
        "{all}"
    );
    assert_eq!(line_of("dump_secrets", "deny").len(), 1, "{all}");
    assert_eq!(line_of("start_security_scan", "allow").len(), 1, "{all}");
    assert_eq!(line_of("start_security_scan", "deny").len(), 1, "{all}");
    assert!(
        !stdout.contains("{\"v\":1"),
        "raw JSON lines printed:\n{all}"
    );
    assert!(
        !stdout.contains('\x1b'),
        "colours with NO_COLOR and no terminal:\n{all}"
    );

    // Every line the demo's agent wrote matches docs/audit.schema.json.
    let text =
        std::fs::read_to_string(&audit).unwrap_or_else(|e| panic!("{}: {e}", audit.display()));
    assert!(text.lines().count() >= 10, "{text}");
    schema::assert_audit_file_matches_schema(&audit);
}
