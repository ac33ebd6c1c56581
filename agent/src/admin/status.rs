//! What `mcpwarden status` shows about a running agent: one JSON document (`--json`), or the
//! same read in a terminal.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::health::Report;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub agent: AgentInfo,
    pub health: Option<Report>,
    pub datapath: Datapath,
    pub endpoints: Vec<Endpoint>,
    pub namespaces: Namespaces,
    pub policies: Vec<PolicyInfo>,
    /// Limit counters, the fullest first (at most [`MAX_COUNTERS`]).
    pub counters: Vec<CounterUse>,
    pub audit: AuditInfo,
    pub traffic: Traffic,
    /// The Kubernetes API connection: absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<crate::k8s::Report>,
}

/// Counters listed at most.
pub const MAX_COUNTERS: usize = 20;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentInfo {
    pub pid: u32,
    pub version: String,
    pub uptime_secs: u64,
    pub failure_mode: String,
    pub config: Option<String>,
    pub state_dir: String,
    pub admin_socket: String,
    pub metrics_listen: Option<String>,
    pub workers: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Datapath {
    pub attach_cgroup: String,
    pub agent_cgroup: String,
    pub bpffs_dir: String,
    /// Pinned (`failure_mode: closed`): the programs stay attached when the agent stops.
    pub pinned: bool,
    pub layout: String,
    /// Programs attached at the attach point, by name.
    pub programs: Vec<String>,
    pub links_pinned: usize,
    pub maps: Vec<MapUse>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MapUse {
    pub name: String,
    pub entries: u64,
    pub max_entries: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Endpoint {
    pub server: String,
    pub url: String,
    /// Where its traffic is redirected from: the addresses it resolved to.
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Namespaces {
    pub served: usize,
    /// The netns cookies of the first [`MAX_NAMESPACES`] (the audit log names namespaces by
    /// inode; `mcpwarden status --datapath` and the kernel by cookie).
    pub cookies: Vec<u64>,
}

/// Namespaces listed at most.
pub const MAX_NAMESPACES: usize = 50;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PolicyInfo {
    pub file: String,
    pub sha256: String,
    /// RFC 3339, when this version took effect.
    pub loaded_at: String,
    pub mode: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CounterUse {
    pub policy: String,
    pub counter: String,
    pub scope: String,
    pub key: String,
    pub rule: String,
    pub used: f64,
    pub max: f64,
    pub window_secs: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditInfo {
    /// `file`, `stdout` or `pipe`.
    pub sink: String,
    pub path: String,
    pub stalled: bool,
    pub on_stall: String,
    pub bytes_written: u64,
    pub records_written: u64,
    pub write_errors: u64,
    pub stalls: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Traffic {
    pub open_connections: u64,
    pub sse_streams: i64,
    /// `tools/call` decisions since start.
    pub calls: Vec<CallCount>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CallCount {
    pub server: String,
    pub tool: String,
    pub decision: String,
    pub count: u64,
}

fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h}h{m}m")
    } else if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// The status as a terminal reads it.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let a = &s.agent;
    let _ = writeln!(
        o,
        "agent:      pid {} mcpwarden {}, up {}, {} workers, failure_mode {}",
        a.pid,
        a.version,
        duration(a.uptime_secs),
        a.workers,
        a.failure_mode
    );
    if let Some(h) = &s.health {
        let failing: Vec<String> = h
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        let _ = writeln!(
            o,
            "ready:      {}",
            if h.ready {
                "yes".to_owned()
            } else {
                format!("NO — {}", failing.join("; "))
            }
        );
    }
    let _ = writeln!(
        o,
        "admin:      {}   metrics: {}",
        a.admin_socket,
        a.metrics_listen.as_deref().unwrap_or("off")
    );
    let d = &s.datapath;
    let _ = writeln!(
        o,
        "datapath:   {} programs attached at {} ({}); agent cgroup {}",
        d.programs.len(),
        d.attach_cgroup,
        if d.pinned {
            format!(
                "pinned under {}, layout {}, {} links",
                d.bpffs_dir, d.layout, d.links_pinned
            )
        } else {
            "not pinned: they detach when the agent stops".to_owned()
        },
        d.agent_cgroup
    );
    if !d.programs.is_empty() {
        let _ = writeln!(o, "            {}", d.programs.join(" "));
    }
    for m in &d.maps {
        let _ = writeln!(
            o,
            "  map {:<16} {:>7} / {} entries",
            m.name, m.entries, m.max_entries
        );
    }
    let _ = writeln!(o, "endpoints:");
    for e in &s.endpoints {
        let addrs = if e.addresses.is_empty() {
            "UNRESOLVED: not intercepted until it resolves".to_owned()
        } else {
            e.addresses.join(", ")
        };
        let _ = writeln!(o, "  {:<16} {}  → {}", e.server, e.url, addrs);
    }
    let _ = write!(o, "namespaces: {} served", s.namespaces.served);
    let names: Vec<String> = s
        .namespaces
        .cookies
        .iter()
        .map(|cookie| format!("cookie {cookie}"))
        .collect();
    if !names.is_empty() {
        let _ = write!(o, ": {}", names.join(", "));
        if s.namespaces.served > names.len() {
            let _ = write!(o, ", …");
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "policies:");
    for p in &s.policies {
        let _ = writeln!(
            o,
            "  {}  sha256 {}  loaded {}{}",
            p.file,
            p.sha256.get(..12).unwrap_or(&p.sha256),
            p.loaded_at,
            if p.mode == "enforce" {
                String::new()
            } else {
                format!("  mode {}", p.mode)
            }
        );
    }
    if s.counters.is_empty() {
        let _ = writeln!(o, "counters:   none in use");
    } else {
        let _ = writeln!(o, "counters (fullest first):");
        for c in &s.counters {
            let _ = writeln!(
                o,
                "  {:>5.1}%  {}/{} in {}s  {} {}={}  ({} {})",
                if c.max > 0.0 {
                    c.used / c.max * 100.0
                } else {
                    100.0
                },
                c.used,
                c.max,
                c.window_secs,
                c.counter,
                c.scope,
                c.key,
                c.policy,
                c.rule
            );
        }
    }
    let au = &s.audit;
    let _ = writeln!(
        o,
        "audit:      {} {}{}, {} records, {} bytes, {} write errors, {} stalls, on_stall {}",
        au.sink,
        au.path,
        if au.stalled { " STALLED" } else { "" },
        au.records_written,
        au.bytes_written,
        au.write_errors,
        au.stalls,
        au.on_stall
    );
    match &s.kubernetes {
        Some(k) => {
            let _ = writeln!(
                o,
                "kubernetes: node {}, API {}, pods {} ({}), {} service backends, {} watch errors, taint {}{}",
                k.node,
                if k.connected { "connected" } else { "NOT CONNECTED" },
                k.pods,
                if k.pods_synced { "synced" } else { "NOT SYNCED" },
                k.service_backends,
                k.watch_errors,
                if k.taint_removed { "removed" } else { "not removed" },
                k.last_error
                    .as_ref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(
                o,
                "kubernetes: not configured (callers known by process, cgroup and container)"
            );
        }
    }
    let t = &s.traffic;
    let _ = writeln!(
        o,
        "traffic:    {} connections open, {} SSE streams",
        t.open_connections, t.sse_streams
    );
    for c in &t.calls {
        let _ = writeln!(
            o,
            "  {:>8}  {} {} {}",
            c.count,
            if c.server.is_empty() { "-" } else { &c.server },
            c.tool,
            c.decision
        );
    }
    o
}
