//! Scenario 7: Server-Sent Events, on the plaintext endpoint of scenarios 1–4.
//!
//! - 7a: tools/call `progress` on one keep-alive connection, closed loop, the three routes (as
//!   2a): each answer is a `text/event-stream` of [`STEPS`] progress notifications, each flushed
//!   on its own, then the result; a call's latency runs until the stream ends, and every event
//!   is checked. Audited on the mcpwarden route as in 2a.
//! - 7b: RSS of a freshly started agent, idle and while it carries N idle standalone SSE
//!   streams (GET, `Accept: text/event-stream`: the responder sends a priming comment and then
//!   nothing), N = 1,000 and 10,000; the same through an nginx sized for them. The holder checks
//!   that every stream opened (200, the priming comment arrived) and was still open when it was
//!   released; on the mcpwarden route every stream's GET must have been audited (`non_mcp`).

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Result};
use mcpwarden_tests::free_port;

use crate::{
    load::{Call, LoadSpec, Shape},
    nginx::{Hop, Nginx},
    report::thousands,
    run::{bench_ip, noisy_added, repeated, rss_kib, three, Bench, Measured, Route},
};

/// Progress notifications before each 7a result.
pub const STEPS: u64 = crate::responder::DEFAULT_STEPS;

/// Goal of 7b: RSS per idle SSE stream through the agent, at most this (KiB).
pub const STREAM_GOAL_KIB: f64 = 64.0;

/// One 7b measurement: RSS (KiB) idle and while `streams` idle SSE streams are open.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamMemory {
    pub streams: usize,
    pub agent_idle_kib: u64,
    pub agent_held_kib: u64,
    pub nginx_idle_kib: u64,
    pub nginx_held_kib: u64,
}

impl StreamMemory {
    pub fn agent_per_stream(&self) -> f64 {
        (self.agent_held_kib as f64 - self.agent_idle_kib as f64) / self.streams as f64
    }

    pub fn nginx_per_stream(&self) -> f64 {
        (self.nginx_held_kib as f64 - self.nginx_idle_kib as f64) / self.streams as f64
    }
}

#[derive(Debug, Clone, Default)]
pub struct SseFigures {
    /// 7a.
    pub calls: Vec<[Measured; 3]>,
    pub steps: u64,
    /// 7b: per repeat, one measurement per entry of `counts`.
    pub memory: Vec<Vec<StreamMemory>>,
    pub counts: Vec<usize>,
    /// Per entry of `counts`, the count it stands in for when the machine's open-file limit
    /// did not allow that one.
    pub instead_of: Vec<Option<usize>>,
    /// Stream counts not measured as asked, and why.
    pub notes: Vec<String>,
    /// (scenario, attempts, why still noisy) as in [`crate::report::Report::attempts`].
    pub attempts: Vec<(String, usize, Option<String>)>,
}

impl SseFigures {
    /// The measurements of the `k`-th stream count, over repeats.
    pub fn memory_at(&self, k: usize) -> impl Iterator<Item = &StreamMemory> {
        self.memory.iter().filter_map(move |r| r.get(k))
    }
}

/// 7a: one keep-alive connection, closed loop, `calls` progress calls.
fn calls(bench: &mut Bench, route: Route, calls: u64) -> Result<Measured> {
    let (target, cgroup) = bench.route_target(route);
    let cgroup = cgroup.to_path_buf();
    let spec = LoadSpec {
        target,
        host: bench.upstream().to_string(),
        conns: 1,
        shape: Shape::Closed,
        warmup: 20,
        max_calls: calls,
        duration: Duration::from_secs(60),
        tls: None,
        call: Call::Progress { steps: STEPS },
    };
    let proxy = bench.proxy_pid(route)?;
    bench.measure(route, &cgroup, proxy, &spec)
}

/// Max open files of `pid` (its soft limit), from /proc/PID/limits.
fn nofile_of(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Descriptors the agent needs besides two per stream (listeners, maps, audit log, pools).
const SPARE_FDS: u64 = 512;

/// 7b, one count: a fresh agent idle and holding `streams`, then nginx idle and holding them.
fn stream_memory(bench: &mut Bench, nginx: &Nginx, streams: usize) -> Result<StreamMemory> {
    bench.restart_agent()?;
    // As in scenario 4: let the start-up garbage go before measuring idle.
    std::thread::sleep(Duration::from_secs(2));
    let agent = bench.agent_pid()?;
    let rss = |pid: u32| rss_kib(pid).ok_or_else(|| anyhow::anyhow!("no RSS for pid {pid}"));
    let agent_idle_kib = rss(agent)?;
    let before = bench.audit_non_mcp()?;
    let (target, cgroup) = bench.route_target(Route::Agent);
    let cgroup = cgroup.to_path_buf();
    let agent_held_kib =
        bench.rss_holding_at(target, &cgroup, Route::Agent.name(), agent, streams, true)?;
    let audited = bench.audit_non_mcp()? - before;
    if audited < streams as u64 {
        bail!("the agent audited {audited} of {streams} SSE streams: they did not go through it");
    }

    let worker = nginx
        .worker_pid()
        .ok_or_else(|| anyhow::anyhow!("no nginx worker"))?;
    let nginx_idle_kib = rss(worker)?;
    let before = bench.audit_non_mcp()?;
    let plain = bench.plain.clone();
    let nginx_held_kib = bench.rss_holding_at(
        nginx.listen,
        &plain,
        Route::Nginx.name(),
        worker,
        streams,
        true,
    )?;
    if bench.audit_non_mcp()? > before {
        bail!("the SSE streams held through nginx went through the agent");
    }
    Ok(StreamMemory {
        streams,
        agent_idle_kib,
        agent_held_kib,
        nginx_idle_kib,
        nginx_held_kib,
    })
}

/// Run scenario 7 on the bench's plaintext agent configuration.
pub fn run(bench: &mut Bench, repeats: usize, attempts: usize) -> Result<SseFigures> {
    let quick = bench.quick;
    let mut figures = SseFigures {
        steps: STEPS,
        ..SseFigures::default()
    };

    // 7a.
    let n = if quick { 500 } else { 20_000 };
    eprintln!(
        "mcpwarden-bench: SSE responses ({STEPS} progress events + result), one connection, {n} calls × {repeats} × 3 routes"
    );
    let (runs, k, why) = repeated(
        "SSE one connection",
        repeats,
        attempts,
        |r| three(|route| calls(bench, route, n), r),
        |runs| noisy_added(runs, |l| l.p50_us),
    )?;
    figures.calls = runs;
    figures
        .attempts
        .push(("SSE one connection".to_owned(), k, why));

    // 7b. The agent carries a stream on two descriptors (client, upstream); it raises its soft
    // limit to the hard one it inherits from us (see `raise_nofile`).
    let wanted: &[usize] = if quick { &[200] } else { &[1_000, 10_000] };
    let limit = nofile_of(bench.agent_pid()?).unwrap_or(0);
    let fits = |count: usize| 2 * count as u64 + SPARE_FDS <= limit;
    for &count in wanted {
        if fits(count) {
            figures.counts.push(count);
            figures.instead_of.push(None);
            continue;
        }
        // Where the machine's hard limit is below what `count` needs (and the bench may not
        // raise it: no CAP_SYS_RESOURCE), measure the most thousands that fit instead.
        let most = (limit.saturating_sub(SPARE_FDS) / 2 / 1_000 * 1_000) as usize;
        let instead = figures
            .counts
            .last()
            .is_none_or(|&last| most > last)
            .then_some(most)
            .filter(|&m| m > 0);
        let note = format!(
            "{} streams need about {} open files in the agent, which may open {} here (its hard limit, which the bench could not raise)",
            thousands(count),
            thousands((2 * count as u64 + SPARE_FDS) as usize),
            thousands(limit as usize)
        );
        match instead {
            Some(m) => {
                figures.counts.push(m);
                figures.instead_of.push(Some(count));
                figures
                    .notes
                    .push(format!("{note}: {} streams measured instead", thousands(m)));
            }
            None => figures.notes.push(format!("{note}: not measured")),
        }
        eprintln!(
            "mcpwarden-bench: SSE streams: {}",
            figures.notes.last().map_or("", |n| n)
        );
    }
    let Some(&most) = figures.counts.iter().max() else {
        return Ok(figures);
    };
    // nginx allocates a slot per connection at start: this one has room for every stream's two
    // connections, plus the sixteenth it keeps free (below that it closes connections it deems
    // reusable and warns that worker_connections are not enough).
    let listen = SocketAddr::new(bench_ip(1).into(), free_port(bench_ip(1)));
    let nginx = Nginx::start_sized(
        &bench.plain,
        listen,
        &Hop::Plain {
            upstream: bench.upstream(),
        },
        2 * most * 17 / 16 + 256,
    )?;
    eprintln!(
        "mcpwarden-bench: idle SSE streams, {:?} × {repeats}, through the agent and nginx",
        figures.counts
    );
    for _ in 0..repeats {
        let mut one = Vec::new();
        for &count in &figures.counts {
            one.push(stream_memory(bench, &nginx, count)?);
        }
        figures.memory.push(one);
    }
    drop(nginx);
    bench.agent.assert_running();
    Ok(figures)
}
