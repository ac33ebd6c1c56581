//! BENCHMARKS.md: the figures of one run, rendered between two markers so that the hand-written
//! analysis around them (profiles, explanations of gaps) survives the next run.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};

use crate::{
    podrun::{NsReady, PodFigures, READY_GOAL_MS},
    policyrun::{PolicyFigures, DECISION_GOAL_US},
    probe::ConnectResult,
    run::{
        added, ratio, Measured, Memory, Route, RunOpts, CONNECT_GOAL, CPU_GOAL, ROUTES, SSE_GOAL,
    },
    sserun::{SseFigures, STREAM_GOAL_KIB},
    stats::Spread,
    tlsrun::{
        hs_added, FirstConns, TlsFigures, FIRST_GOAL_US, FIRST_KINDS, HANDSHAKE_GOAL_US, HOST,
    },
};

pub const BEGIN: &str = "<!-- mcpwarden-bench: generated figures begin -->";
pub const END: &str = "<!-- mcpwarden-bench: generated figures end -->";

/// One criterion benchmark: its median and the 95 % confidence interval of that median (ns).
#[derive(Debug, Clone)]
pub struct Estimate {
    pub id: String,
    pub median_ns: f64,
    pub lower_ns: f64,
    pub upper_ns: f64,
}

#[derive(Default)]
pub struct Report {
    pub command: String,
    pub quick: bool,
    pub repeats: usize,
    pub rate: f64,
    pub connect: Vec<(ConnectResult, ConnectResult)>,
    pub one_conn: Vec<[Measured; 3]>,
    /// 2c.
    pub per_call: Vec<[Measured; 3]>,
    pub fixed_rate: Vec<[Measured; 3]>,
    pub saturation: Vec<[Measured; 3]>,
    pub memory: Vec<Memory>,
    pub criterion: Vec<Estimate>,
    /// 5b.
    pub policy: Option<PolicyFigures>,
    pub tls: Option<TlsFigures>,
    pub sse: Option<SseFigures>,
    /// 8.
    pub pods: Option<PodFigures>,
    pub attempts: Vec<(String, usize, Option<String>)>,
    pub agent_log_errors: Vec<String>,
}

fn cell(s: Spread, digits: usize) -> String {
    format!(
        "{:.d$} / **{:.d$}** / {:.d$}",
        s.min,
        s.median,
        s.max,
        d = digits
    )
}

fn spread(v: impl IntoIterator<Item = f64>) -> Spread {
    Spread::of(&v.into_iter().collect::<Vec<_>>()).unwrap_or_default()
}

fn route_index(route: Route) -> usize {
    ROUTES.iter().position(|&r| r == route).unwrap_or(0)
}

fn yes_no(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**not met**"
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

impl Report {
    pub fn new(opts: &RunOpts, repeats: usize) -> Report {
        Report {
            command: opts.command.clone(),
            quick: opts.quick,
            repeats,
            ..Report::default()
        }
    }

    pub fn note_attempts(&mut self, scenario: &str, attempts: usize, noisy: Option<String>) {
        self.attempts.push((scenario.to_owned(), attempts, noisy));
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = self.render_into(&mut o);
        o
    }

    fn render_into(&self, o: &mut String) -> std::fmt::Result {
        writeln!(o, "{BEGIN}")?;
        writeln!(o, "## Figures of the last run\n")?;
        writeln!(
            o,
            "`{}` on {}; {}; {}.",
            self.command,
            date(),
            machine(),
            crate::nginx::version()
        )?;
        if self.quick {
            writeln!(
                o,
                "\n**Quick smoke run** (one repeat, short loads): it shows that the harness works; its figures are not results."
            )?;
        }
        writeln!(
            o,
            "\nEvery cell is min / **median** / max over {} repeat(s); within a repeat the three routes run one after another, in an order rotated from repeat to repeat. \
             Latencies in µs. *Added* = route − direct, computed per repeat. All traffic is on loopback{}; client, proxy and server share the machine's cores.\n",
            self.repeats,
            if self.pods.is_some() {
                " (in 8, also on veth pairs between network namespaces of the bench's own)"
            } else {
                ""
            }
        )?;
        self.render_goals(o)?;
        // Scenarios 1–4 run together, or not at all (`--tls-only`, `--sse-only`, `--pods-only`);
        // `--cpu-only` runs 2a and 3 alone.
        if !self.connect.is_empty() {
            self.render_connect(o)?;
        }
        if !self.one_conn.is_empty() {
            self.render_latency(
                o,
                "2a. tools/call on one keep-alive connection (closed loop)",
                &self.one_conn,
                false,
            )?;
        }
        if !self.per_call.is_empty() {
            self.render_latency(
                o,
                "2c. tools/call, each on a connection of its own (closed loop)",
                &self.per_call,
                false,
            )?;
            writeln!(o, "Each call connects, sends one `tools/call`, reads the answer and closes (FIN), as MCP clients that keep no connection do; timed from `connect()` until the answer is read (the close is not timed, but finishes before the next call connects). Through mcpwarden every call pays the per-accept work: the redirect record, the caller's comm and cgroup, a new connection's state; the upstream connection comes from the agent's keep-alive pool, as nginx's does from its `keepalive` pool.\n")?;
        }
        if !self.fixed_rate.is_empty() {
            let title = format!(
                "2b. tools/call at a fixed {:.0} calls/s over 32 keep-alive connections (open loop)",
                self.rate
            );
            self.render_latency(o, &title, &self.fixed_rate, true)?;
        }
        if !self.saturation.is_empty() {
            self.render_saturation(o)?;
        }
        if !self.memory.is_empty() {
            self.render_memory(o)?;
        }
        self.render_criterion(o)?;
        if let Some(policy) = &self.policy {
            render_policy(o, policy)?;
        }
        if let Some(tls) = &self.tls {
            self.render_tls(o, tls)?;
        }
        if let Some(sse) = &self.sse {
            self.render_sse(o, sse)?;
        }
        if let Some(pods) = &self.pods {
            self.render_pods(o, pods)?;
        }
        writeln!(o, "### Repeats and noise\n")?;
        for (name, attempts, noisy) in &self.attempts {
            match noisy {
                Some(why) => writeln!(
                    o,
                    "- {name}: still noisy after {attempts} attempt(s): {why}."
                )?,
                None => writeln!(
                    o,
                    "- {name}: {attempts} attempt(s); the spread does not blur the claim."
                )?,
            }
        }
        if !self.agent_log_errors.is_empty() {
            writeln!(o, "\nErrors in the agent's log during the run:\n```")?;
            for l in &self.agent_log_errors {
                writeln!(o, "{l}")?;
            }
            writeln!(o, "```")?;
        }
        writeln!(o, "\n{END}")
    }

    fn connect_ratio(&self) -> Spread {
        spread(self.connect.iter().map(|(a, d)| a.p50_us / d.p50_us))
    }

    fn render_goals(&self, o: &mut String) -> std::fmt::Result {
        writeln!(o, "### Goals\n")?;
        writeln!(o, "| scenario | goal | mcpwarden | nginx | |")?;
        writeln!(o, "|---|---|---|---|---|")?;
        if !self.connect.is_empty() {
            self.plaintext_goals(o)?;
        }
        if let Some(policy) = &self.policy {
            policy_goals(o, policy)?;
        }
        if let Some(tls) = &self.tls {
            tls_goals(o, tls)?;
        }
        if let Some(sse) = &self.sse {
            sse_goals(o, sse)?;
        }
        if let Some(pods) = &self.pods {
            pods_goals(o, pods)?;
        }
        writeln!(o)
    }

    fn plaintext_goals(&self, o: &mut String) -> std::fmt::Result {
        let c = self.connect_ratio();
        writeln!(
            o,
            "| 1. connect() to a non-endpoint, programs attached ÷ not | ≤ {CONNECT_GOAL}× | {:.3}× | — | {} |",
            c.median,
            yes_no(c.median <= CONNECT_GOAL)
        )?;
        for (label, runs) in [
            ("2a. one connection", &self.one_conn),
            ("2c. a connection per call", &self.per_call),
            ("2b. fixed rate, 32 connections", &self.fixed_rate),
        ] {
            if runs.is_empty() {
                continue;
            }
            for (q, f) in [
                (
                    "p50",
                    (|l: &crate::load::LoadResult| l.p50_us) as fn(&crate::load::LoadResult) -> f64,
                ),
                ("p99", |l| l.p99_us),
                ("p999", |l| l.p999_us),
            ] {
                let a = added(runs, Route::Agent, f).median;
                let n = added(runs, Route::Nginx, f).median;
                writeln!(
                    o,
                    "| {label}: added {q} latency | ≤ nginx's | {a:+.1} µs | {n:+.1} µs | {} |",
                    yes_no(a <= n)
                )?;
            }
        }
        let a = ratio(&self.saturation, Route::Agent, |l| l.calls_per_s).median;
        let n = ratio(&self.saturation, Route::Nginx, |l| l.calls_per_s).median;
        writeln!(
            o,
            "| 3. saturation throughput ÷ direct | ≥ nginx's | {a:.2}× | {n:.2}× | {} |",
            yes_no(a >= n)
        )?;
        let cpu = |route| {
            let i = route_index(route);
            spread(
                self.saturation
                    .iter()
                    .filter_map(|r| r[i].proxy_cpu_us_per_call),
            )
            .median
        };
        let (a, n) = (cpu(Route::Agent), cpu(Route::Nginx));
        writeln!(
            o,
            "| 3. saturation: proxy CPU per call | ≤ {CPU_GOAL}× nginx's | {a:.1} µs | {n:.1} µs | {} |",
            yes_no(a <= n * CPU_GOAL)
        )?;
        Ok(())
    }

    fn render_connect(&self, o: &mut String) -> std::fmt::Result {
        let n = self.connect.first().map_or(0, |(a, _)| a.connects);
        writeln!(
            o,
            "### 1. connect() latency to a non-endpoint destination ({n} connects per repeat)\n"
        )?;
        writeln!(o, "Timed around `connect()` alone, blocking, one at a time, to a loopback listener that is not an endpoint and runs outside the attach point (like a server on another host). *Attached*: the client's cgroup is the agent's attach point (connect4/6, sock_ops and getpeername run); *not attached*: a sibling cgroup with no programs, in the same run.\n")?;
        writeln!(o, "| | p50 | p99 | mean |")?;
        writeln!(o, "|---|---|---|---|")?;
        for (label, pick) in [
            (
                "attached",
                (|x: &(ConnectResult, ConnectResult)| x.0.clone())
                    as fn(&(ConnectResult, ConnectResult)) -> ConnectResult,
            ),
            ("not attached", |x| x.1.clone()),
        ] {
            let v: Vec<ConnectResult> = self.connect.iter().map(pick).collect();
            writeln!(
                o,
                "| {label} | {} | {} | {} |",
                cell(spread(v.iter().map(|r| r.p50_us)), 2),
                cell(spread(v.iter().map(|r| r.p99_us)), 2),
                cell(spread(v.iter().map(|r| r.mean_us)), 2)
            )?;
        }
        writeln!(
            o,
            "| ratio | {} | {} | {} |\n",
            cell(self.connect_ratio(), 3),
            cell(
                spread(self.connect.iter().map(|(a, d)| a.p99_us / d.p99_us)),
                3
            ),
            cell(
                spread(self.connect.iter().map(|(a, d)| a.mean_us / d.mean_us)),
                3
            )
        )
    }

    fn render_latency(
        &self,
        o: &mut String,
        title: &str,
        runs: &[[Measured; 3]],
        open: bool,
    ) -> std::fmt::Result {
        let calls = runs.first().map_or(0, |r| r[0].load.calls);
        writeln!(o, "### {title}\n")?;
        writeln!(o, "About {calls} measured calls per route per repeat.\n")?;
        latency_table(o, runs, open)
    }

    fn render_saturation(&self, o: &mut String) -> std::fmt::Result {
        writeln!(
            o,
            "### 3. Saturation throughput, 32 connections, closed loop\n"
        )?;
        writeln!(o, "Proxy CPU is the agent's (or the nginx worker's) user + system time from /proc/PID/stat over the run, divided by the calls it carried (10 ms clock ticks).\n")?;
        saturation_table(o, &self.saturation)
    }

    fn render_memory(&self, o: &mut String) -> std::fmt::Result {
        let conns = 1000.0;
        writeln!(o, "### 4. Memory (RSS)\n")?;
        writeln!(
            o,
            "Each repeat starts a fresh agent (allocators keep what earlier scenarios used) and measures it 2 s after start; nginx's worker allocates its connection slots at start.\n"
        )?;
        writeln!(
            o,
            "| process | idle | 1,000 open keep-alive connections | per connection |"
        )?;
        writeln!(o, "|---|---|---|---|")?;
        let mib = |v: Spread| Spread {
            min: v.min / 1024.0,
            median: v.median / 1024.0,
            max: v.max / 1024.0,
        };
        for (name, idle, held) in [
            (
                "mcpwarden agent",
                (|m: &Memory| m.agent_idle_kib) as fn(&Memory) -> u64,
                (|m: &Memory| m.agent_1k_kib) as fn(&Memory) -> u64,
            ),
            ("nginx worker", |m| m.nginx_idle_kib, |m| m.nginx_1k_kib),
        ] {
            let i = spread(self.memory.iter().map(|m| idle(m) as f64));
            let h = spread(self.memory.iter().map(|m| held(m) as f64));
            let per = spread(
                self.memory
                    .iter()
                    .map(|m| (held(m) as f64 - idle(m) as f64) / conns),
            );
            writeln!(
                o,
                "| {name} | {} MiB | {} MiB | {} KiB |",
                cell(mib(i), 1),
                cell(mib(h), 1),
                cell(per, 1)
            )?;
        }
        writeln!(o)
    }

    fn render_tls(&self, o: &mut String, tls: &TlsFigures) -> std::fmt::Result {
        writeln!(o, "### 6. TLS on both sides: an `https://` endpoint\n")?;
        writeln!(
            o,
            "The responder serves TLS (rustls, ring; TLS 1.3, X25519, an ECDSA P-256 certificate from a bench CA) for `{HOST}`, which /etc/hosts maps to a bench address, and offers h2 and http/1.1 in ALPN. \
             Clients (rustls) offer `http/1.1` only and never resume a session, so that every hop speaks HTTP/1.1 (nginx 1.22 proxies to upstreams in HTTP/1.1 only) and every handshake is a full one. \
             *nginx* terminates TLS with a bench-CA certificate for the same name and re-encrypts to the responder (`proxy_ssl_verify on`, SNI, upstream keep-alive, `proxy_ssl_session_reuse on`). \
             *mcpwarden* presents a leaf minted from its own CA and forwards over its own verified TLS connection. \
             Each client trusts one CA only, the bench CA (direct, nginx) or the agent's (mcpwarden), so a successful handshake shows which of them answered.\n"
        )?;
        self.render_latency(
            o,
            "6a. tools/call on one keep-alive TLS connection (closed loop)",
            &tls.calls,
            false,
        )?;

        writeln!(
            o,
            "### 6b. TLS handshake with a cached leaf ({} handshakes per route per repeat)\n",
            tls.handshakes_per_route
        )?;
        writeln!(
            o,
            "Fresh TCP + full TLS handshakes to `{HOST}`, one at a time, timed from `connect()` until the client's Finished is sent; each connection is then closed cleanly (not timed) before the next. \
             Through mcpwarden the leaf for the name and the server's ALPN are already cached (the run fails if the agent mints, or refuses a connection); the time includes the interceptor's per-connection work (the redirect record lookup, the caller's comm and cgroup). \
             Neither proxy touches the upstream during a handshake: each answers it with its own TLS stack, so *added* compares that stack (and the hop) with the responder's (rustls on a two-thread tokio runtime) and can come out below zero.\n"
        )?;
        writeln!(
            o,
            "| route | p50 | p99 | mean | added p50 | added p99 | proxy CPU µs per handshake |"
        )?;
        writeln!(o, "|---|---|---|---|---|---|---|")?;
        for route in ROUTES {
            let i = route_index(route);
            let pick = |f: fn(&crate::tls::HandshakeResult) -> f64| {
                spread(tls.handshakes.iter().map(|r| f(&r[i].hs)))
            };
            let (add50, add99, cpu) = if route == Route::Direct {
                ("—".to_owned(), "—".to_owned(), "—".to_owned())
            } else {
                (
                    cell(hs_added(&tls.handshakes, route, |h| h.p50_us), 0),
                    cell(hs_added(&tls.handshakes, route, |h| h.p99_us), 0),
                    cell(
                        spread(
                            tls.handshakes
                                .iter()
                                .filter_map(|r| r[i].proxy_cpu_us_per_handshake),
                        ),
                        0,
                    ),
                )
            };
            writeln!(
                o,
                "| {} | {} | {} | {} | {add50} | {add99} | {cpu} |",
                route.name(),
                cell(pick(|h| h.p50_us), 0),
                cell(pick(|h| h.p99_us), 0),
                cell(pick(|h| h.mean_us), 0),
            )?;
        }
        writeln!(o)?;

        writeln!(
            o,
            "### 6c. First connection to a name ({} new names per repeat, a freshly started agent each repeat)\n",
            tls.names
        )?;
        writeln!(
            o,
            "The agent is configured with every name at two ports, P and Q, of the same responder address. \
             For each new name, in order: a handshake at P (the agent mints a leaf for the name and, at the same time, probes (P, name) for its ALPN with a handshake of its own), one at Q (the leaf is cached; (Q, name) is probed), one at P again (both cached). \
             The same steps run direct, against the same responders. *Median* is over the names of a repeat, *slowest* is the slowest name's time minus the direct median; the run fails unless the agent minted exactly one leaf per new name. \
             The very first connection after start (to `{HOST}`) is shown apart: it also pays one-time start-up work.\n"
        )?;
        writeln!(
            o,
            "| handshake | direct, median | mcpwarden, median | added, median | added, slowest |"
        )?;
        writeln!(o, "|---|---|---|---|---|")?;
        let over = |f: &dyn Fn(&FirstConns) -> f64| spread(tls.first.iter().map(f));
        for (k, kind) in FIRST_KINDS.iter().enumerate() {
            writeln!(
                o,
                "| {kind} | {} | {} | {} | {} |",
                cell(over(&|f| f.median(k, false)), 0),
                cell(over(&|f| f.median(k, true)), 0),
                cell(over(&|f| f.added(k)), 0),
                cell(over(&|f| f.slowest_added(k)), 0),
            )?;
        }
        writeln!(
            o,
            "| first connection after the agent started | {} | {} | {} | — |",
            cell(over(&|f| f.direct_first), 0),
            cell(over(&|f| f.agent_first_after_start), 0),
            cell(over(&|f| f.agent_first_after_start - f.direct_first), 0),
        )?;
        let mint = over(&|f| f.median(0, true) - f.median(1, true));
        let probe = over(&|f| f.median(1, true) - f.median(2, true));
        write!(
            o,
            "\nDifferences of the medians above: the mint's share of a first connection (new name − probe only) {} µs; the ALPN probe's (probe only − both cached) {} µs.",
            cell(mint, 0),
            cell(probe, 0)
        )?;
        if let Some(e) = self.criterion.iter().find(|e| e.id == "tls/mint_leaf") {
            write!(
                o,
                " In process, a mint alone costs {} (criterion `tls/mint_leaf`).",
                ns(e.median_ns)
            )?;
        }
        writeln!(o, "\n")
    }

    fn render_sse(&self, o: &mut String, sse: &SseFigures) -> std::fmt::Result {
        writeln!(o, "### 7. Server-Sent Events\n")?;
        writeln!(
            o,
            "How it is measured: on the plaintext endpoint of scenarios 1–4, with the same responder, which answers a `tools/call` of the tool `progress` with `200 text/event-stream`: {} `notifications/progress` events for the call's progress token, then the result event, each event written and flushed on its own, then the end of the stream; and a GET with `Accept: text/event-stream` (the standalone stream) with `200 text/event-stream`, one SSE comment, and nothing more until the client goes away. \
             *nginx* streams both (`proxy_buffering off`, `proxy_read_timeout 1h`). \
             The client checks every event it reads; a run with a missing, reordered or misattributed event fails.\n",
            sse.steps
        )?;
        self.render_latency(
            o,
            &format!(
                "7a. tools/call answered over SSE ({} progress events, then the result) on one keep-alive connection (closed loop)",
                sse.steps
            ),
            &sse.calls,
            false,
        )?;
        writeln!(
            o,
            "7a is 2a with a streamed answer: one keep-alive connection, closed loop, each call timed from the request until the end of its stream, having read every event (progress 1…{} for its token, in order, then the result for its id). On the mcpwarden route the audit log must hold a `request` record per call.\n",
            sse.steps
        )?;

        writeln!(o, "### 7b. Memory per idle SSE stream (RSS)\n")?;
        writeln!(
            o,
            "For each count, a freshly started agent is measured 2 s after start (*idle*, as in 4), then while a client holds that many standalone SSE streams through it, each on its own connection, opened 64 at a time and idle once its priming comment has arrived (*held*, 0.5 s after the last one opened). \
             Per stream = (held − idle) ÷ streams: the client connection, the upstream connection (a stream in flight keeps its own) and whatever the agent keeps per stream; the kernel's socket buffers are not in RSS. \
             The holder fails the run unless every stream opened (200, `text/event-stream`, the comment) and was still open when released; on the mcpwarden route every stream's GET must have been audited (`non_mcp`). \
             *nginx* is a separate nginx (same binary and settings) whose worker has room for every stream's two connections: it allocates their slots at start, so its idle RSS is larger than in 4 and its per-stream figure is what it adds beyond those slots.\n"
        )?;
        if !sse.notes.is_empty() {
            for why in &sse.notes {
                writeln!(o, "- {why}.")?;
            }
            writeln!(o)?;
        }
        writeln!(o, "| streams | process | idle | held | per stream |")?;
        writeln!(o, "|---|---|---|---|---|")?;
        let mib = |v: Spread| Spread {
            min: v.min / 1024.0,
            median: v.median / 1024.0,
            max: v.max / 1024.0,
        };
        for (k, &count) in sse.counts.iter().enumerate() {
            type Kib = fn(&crate::sserun::StreamMemory) -> f64;
            for (name, idle, held, per) in [
                (
                    "mcpwarden agent",
                    (|m| m.agent_idle_kib as f64) as Kib,
                    (|m| m.agent_held_kib as f64) as Kib,
                    (|m| m.agent_per_stream()) as Kib,
                ),
                (
                    "nginx worker",
                    |m| m.nginx_idle_kib as f64,
                    |m| m.nginx_held_kib as f64,
                    |m| m.nginx_per_stream(),
                ),
            ] {
                writeln!(
                    o,
                    "| {} | {name} | {} MiB | {} MiB | {} KiB |",
                    thousands(count),
                    cell(mib(spread(sse.memory_at(k).map(idle))), 1),
                    cell(mib(spread(sse.memory_at(k).map(held))), 1),
                    cell(spread(sse.memory_at(k).map(per)), 1)
                )?;
            }
        }
        writeln!(o)
    }

    fn render_pods(&self, o: &mut String, pods: &PodFigures) -> std::fmt::Result {
        writeln!(
            o,
            "### 8. Pods: callers in network namespaces of their own\n"
        )?;
        writeln!(
            o,
            "How it is measured: a pod is a network namespace of its own (10.220.1.2) joined by a veth pair to a router namespace, behind which a \"remote host\" namespace (10.220.250.2) runs the responder; the pod's namespace is pinned (bind-mounted) in a directory as a container runtime pins a pod sandbox. \
             The agent is restarted with the remote responder as its endpoint, that directory as its `--netns-dir`, and a fixed listen port, which it binds inside every namespace it serves. \
             Every process of a route runs in the pod's namespace: *direct*, the load generator in a cgroup without programs dials the remote responder; *nginx*, the same load generator dials an nginx sidecar on the pod's loopback (same binary and settings as in 2a, also outside the attach point), which proxies to the remote responder; *mcpwarden*, the load generator in a cgroup below the attach point dials the remote responder, connect4 sends it to the agent's listener inside the pod, and the agent dials the responder from the pod's namespace. \
             Every route crosses the router: the responder sees the pod's address. On the mcpwarden route the audit log must hold a `request` record per call, on the others none.\n"
        )?;
        self.render_latency(
            o,
            "8a. tools/call from a pod on one keep-alive connection (closed loop)",
            &pods.one_conn,
            false,
        )?;
        writeln!(
            o,
            "### 8b. Saturation throughput from a pod, 32 connections, closed loop ({:.0} s per route per repeat)\n",
            pods.saturation_secs
        )?;
        saturation_table(o, &pods.saturation)?;

        writeln!(
            o,
            "### 8c. Namespace ready: from a namespace's creation until the agent serves it ({} new namespaces per repeat)\n",
            pods.namespaces
        )?;
        writeln!(
            o,
            "How it is measured: `mcpwarden-bench nsready`, in a cgroup outside the attach point (none of its sockets raises an event of the programs: the pin is the only way the agent learns of a namespace), makes one namespace at a time: the clock starts, `unshare(CLONE_NEWNET)`, a pin file in the agent's `--netns-dir` with the new namespace bind-mounted onto it; then every 200 µs a fresh socket in the namespace tries to bind the agent's listen address (`SO_REUSEADDR`, like the agent's listener, so the probe never keeps the agent from binding): `EADDRINUSE` means the agent's listener is there, and the clock stops. \
             The namespace's loopback is left down: the interceptor's address is bound there all the same. The pin is then removed (the agent lets go of the namespace) and, 20 ms later, the next namespace is made. \
             *The agent's own* is the `ready_ms` of its `network namespace ready` log lines: from noticing the pin to serving the namespace, without the mount, the mount table's wake-up and the probe's polling.\n"
        )?;
        writeln!(o, "| | namespaces | p50 | p99 | max |")?;
        writeln!(o, "|---|---|---|---|---|")?;
        writeln!(
            o,
            "| creation → the agent's listener bound there (probe), per repeat | {} | {} ms | {} ms | {} ms |",
            pods.namespaces,
            cell(spread(pods.ready.iter().map(|r| r.quantile(0.5))), 2),
            cell(spread(pods.ready.iter().map(|r| r.quantile(0.99))), 2),
            cell(spread(pods.ready.iter().map(NsReady::max)), 2)
        )?;
        let own = NsReady {
            ms: pods.agent_ready_ms.clone(),
        };
        writeln!(
            o,
            "| the agent's own `ready_ms`, all repeats together | {} of {} | {:.2} ms | {:.2} ms | {:.2} ms |\n",
            own.ms.len(),
            pods.namespaces * pods.ready.len(),
            own.quantile(0.5),
            own.quantile(0.99),
            own.max()
        )
    }

    fn render_criterion(&self, o: &mut String) -> std::fmt::Result {
        writeln!(o, "### 5a. In-process costs (criterion)\n")?;
        if self.criterion.is_empty() {
            return writeln!(o, "criterion was not run.\n");
        }
        writeln!(
            o,
            "Median time per operation with criterion's 95 % confidence interval of that median.\n"
        )?;
        writeln!(o, "| benchmark | median | 95 % CI |")?;
        writeln!(o, "|---|---|---|")?;
        for e in &self.criterion {
            writeln!(
                o,
                "| `{}` | {} | {} – {} |",
                e.id,
                ns(e.median_ns),
                ns(e.lower_ns),
                ns(e.upper_ns)
            )?;
        }
        writeln!(o)
    }
}

/// The table of a latency scenario (2a, 2b, 6a, 7a, 8a): per route, quantiles, added quantiles
/// and the proxy's CPU per call (and, `open`, the calls that left late).
fn latency_table(o: &mut String, runs: &[[Measured; 3]], open: bool) -> std::fmt::Result {
    writeln!(o, "| route | p50 | p99 | p999 | added p50 | added p99 | added p999 | proxy CPU µs per call |{}", if open { " calls late |" } else { "" })?;
    writeln!(
        o,
        "|---|---|---|---|---|---|---|---|{}",
        if open { "---|" } else { "" }
    )?;
    for route in ROUTES {
        let i = route_index(route);
        let pick =
            |f: fn(&crate::load::LoadResult) -> f64| spread(runs.iter().map(|r| f(&r[i].load)));
        let add = |f: fn(&crate::load::LoadResult) -> f64| {
            if route == Route::Direct {
                "—".to_owned()
            } else {
                cell(added(runs, route, f), 1)
            }
        };
        write!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} |",
            route.name(),
            cell(pick(|l| l.p50_us), 1),
            cell(pick(|l| l.p99_us), 1),
            cell(pick(|l| l.p999_us), 1),
            add(|l| l.p50_us),
            add(|l| l.p99_us),
            add(|l| l.p999_us)
        )?;
        let cpu = spread(runs.iter().filter_map(|r| r[i].proxy_cpu_us_per_call));
        let cpu = if route == Route::Direct {
            "—".to_owned()
        } else {
            cell(cpu, 1)
        };
        write!(o, " {cpu} |")?;
        if open {
            write!(o, " {} |", runs.iter().map(|r| r[i].load.late).sum::<u64>())?;
        }
        writeln!(o)?;
    }
    writeln!(o)
}

/// The table of a saturation scenario (3, 8b): per route, calls/s, the ratio to direct and the
/// proxy's CPU per call.
fn saturation_table(o: &mut String, runs: &[[Measured; 3]]) -> std::fmt::Result {
    writeln!(o, "| route | calls/s | ÷ direct | proxy CPU µs per call |")?;
    writeln!(o, "|---|---|---|---|")?;
    for route in ROUTES {
        let i = route_index(route);
        let cps = spread(runs.iter().map(|r| r[i].load.calls_per_s));
        let rat = if route == Route::Direct {
            "1".to_owned()
        } else {
            cell(ratio(runs, route, |l| l.calls_per_s), 2)
        };
        let cpu = spread(runs.iter().filter_map(|r| r[i].proxy_cpu_us_per_call));
        let cpu = if route == Route::Direct {
            "—".to_owned()
        } else {
            cell(cpu, 1)
        };
        writeln!(o, "| {} | {} | {rat} | {cpu} |", route.name(), cell(cps, 0))?;
    }
    writeln!(o)
}

/// The 5b rows of the goals table: medians over repeats of each repeat's quantile.
fn policy_goals(o: &mut String, policy: &PolicyFigures) -> std::fmt::Result {
    let p50 = spread(policy.runs.iter().map(|r| r.decisions.p50_us)).median;
    let p99 = spread(policy.runs.iter().map(|r| r.decisions.p99_us)).median;
    let rules = policy.runs.first().map_or(0, |r| r.rules);
    writeln!(
        o,
        "| 5b. policy decision, {}-rule policy with patterns, schemas and conditions: p50 per decision | ≤ {DECISION_GOAL_US:.0} µs | {p50:.3} µs | — | {} |",
        thousands(rules),
        yes_no(p50 <= DECISION_GOAL_US)
    )?;
    writeln!(
        o,
        "| 5b. the same, p99 | informational | {p99:.3} µs | — | — |"
    )
}

/// Section 5b.
fn render_policy(o: &mut String, policy: &PolicyFigures) -> std::fmt::Result {
    let Some(first) = policy.runs.first() else {
        return Ok(());
    };
    writeln!(
        o,
        "### 5b. Policy decision: a {}-rule policy with patterns, schemas and conditions ({} decisions per repeat)\n",
        thousands(first.rules),
        thousands(first.decisions.count)
    )?;
    writeln!(
        o,
        "How it is measured: `Engine::decide_call` in a process of its own (`mcpwarden-bench-policy`, on mimalloc like the agent), started once per repeat before anything else of the bench runs. \
         The policy (`bench/src/policygen.rs`, {} KiB of JSON, `default: deny`) has 800 exact names — 100 with an `arguments` JSON Schema (3–5 typed properties, `required`, `maximum`, `pattern`, `enum`) plus two `deny_if` (one an `any` of `in` and `regex`) and a `require`, 200 with two `deny_if`, 40 of those with a rate limit, 192 with a `require` `all` of `regex` and `lte`, 16 denied, 292 without checks — and 200 patterns with distinct literal prefixes (`ns037_read_*`, `ns037_*`; half with a `require` or `deny_if`), a `hide` of three patterns and a name, and `all_tools` with one `deny_if`. \
         The calls cycle through {} prebuilt calls (tool name and parsed arguments) of the kinds below, each kind naming many tools; the first decision of each is checked to take the path its kind is named after, and every timed one to have its kind's outcome. \
         After {} untimed decisions, each decision is timed on its own, `Instant::now()` before `decide_call` (also its `now`) and `elapsed()` after it; the decision is dropped outside the timed span. Nothing is subtracted: two back-to-back clock reads take {:.0} ns (median) on this machine.\n",
        first.policy_bytes / 1024,
        thousands(first.mix_calls),
        thousands(first.warmup),
        spread(policy.runs.iter().map(|r| r.timer_p50_ns)).median
    )?;
    writeln!(o, "| calls | share | p50 | p90 | p99 | max | mean |")?;
    writeln!(o, "|---|---|---|---|---|---|---|")?;
    let row = |o: &mut String,
               label: &str,
               pick: &dyn Fn(
        &crate::policyresult::PolicyResult,
    ) -> Option<&crate::policyresult::Latency>| {
        let lat: Vec<&crate::policyresult::Latency> = policy.runs.iter().filter_map(pick).collect();
        let share = lat.first().map_or(0.0, |l| {
            100.0 * l.count as f64 / first.decisions.count.max(1) as f64
        });
        writeln!(
            o,
            "| {label} | {share:.0} % | {} | {} | {} | {} | {} |",
            cell(spread(lat.iter().map(|l| l.p50_us)), 3),
            cell(spread(lat.iter().map(|l| l.p90_us)), 3),
            cell(spread(lat.iter().map(|l| l.p99_us)), 3),
            cell(spread(lat.iter().map(|l| l.max_us)), 1),
            cell(spread(lat.iter().map(|l| l.mean_us)), 3)
        )
    };
    row(o, "**all**", &|r| Some(&r.decisions))?;
    for (k, (label, _)) in first.by_kind.iter().enumerate() {
        row(o, label, &|r| r.by_kind.get(k).map(|(_, l)| l))?;
    }
    writeln!(o)?;
    writeln!(o, "| loading the policy | |")?;
    writeln!(o, "|---|---|")?;
    writeln!(
        o,
        "| first load in the process (`Policy::parse`: JSON, schemas, regexes, pattern checks; then `Engine::new`) | {} ms |",
        cell(spread(policy.runs.iter().map(|r| r.first_load_ms)), 1)
    )?;
    writeln!(
        o,
        "| of which `Policy::parse` | {} ms |",
        cell(spread(policy.runs.iter().map(|r| r.first_parse_ms)), 1)
    )?;
    writeln!(
        o,
        "| reload in the same process (median of {}) | {} ms |",
        first.reloads,
        cell(spread(policy.runs.iter().map(|r| r.reload_ms)), 1)
    )?;
    writeln!(
        o,
        "| RSS growth over the first load (what the engine keeps, plus what the allocator holds on to) | {} KiB |\n",
        cell(spread(policy.runs.iter().map(|r| r.rss_growth_kib as f64)), 0)
    )
}

/// The TLS rows of the goals table.
fn tls_goals(o: &mut String, tls: &TlsFigures) -> std::fmt::Result {
    type Pick = fn(&crate::load::LoadResult) -> f64;
    for (q, f, cap) in [
        ("p50", (|l| l.p50_us) as Pick, Some(100.0)),
        ("p99", |l| l.p99_us, Some(500.0)),
        ("p999", |l| l.p999_us, None),
    ] {
        let a = added(&tls.calls, Route::Agent, f).median;
        let n = added(&tls.calls, Route::Nginx, f).median;
        let (goal, verdict) = match cap {
            Some(cap) => (
                format!("≤ {cap:.0} µs and ≤ nginx's"),
                match (a <= cap, a <= n) {
                    (true, true) => "met".to_owned(),
                    (false, true) => format!("**not met** (> {cap:.0} µs)"),
                    (true, false) => "**not met** (> nginx's)".to_owned(),
                    (false, false) => format!("**not met** (> {cap:.0} µs, > nginx's)"),
                },
            ),
            None => ("≤ nginx's".to_owned(), yes_no(a <= n).to_owned()),
        };
        writeln!(
            o,
            "| 6a. TLS, one connection: added {q} latency | {goal} | {a:+.1} µs | {n:+.1} µs | {verdict} |"
        )?;
    }
    type HsPick = fn(&crate::tls::HandshakeResult) -> f64;
    for (q, f) in [("p50", (|h| h.p50_us) as HsPick), ("p99", |h| h.p99_us)] {
        let a = hs_added(&tls.handshakes, Route::Agent, f).median;
        let n = hs_added(&tls.handshakes, Route::Nginx, f).median;
        writeln!(
            o,
            "| 6b. TLS handshake, cached leaf: added {q} | ≤ {:.0} ms | {:+.2} ms | {:+.2} ms | {} |",
            HANDSHAKE_GOAL_US / 1000.0,
            a / 1000.0,
            n / 1000.0,
            yes_no(a <= HANDSHAKE_GOAL_US)
        )?;
    }
    let median = |f: &dyn Fn(&FirstConns) -> f64| spread(tls.first.iter().map(f)).median;
    for (label, v) in [
        ("median of the names", median(&|f| f.added(0))),
        ("slowest name", median(&|f| f.slowest_added(0))),
    ] {
        writeln!(
            o,
            "| 6c. first connection to a new name (mint + ALPN probe), added, {label} | ≤ {:.0} ms | {:+.2} ms | — | {} |",
            FIRST_GOAL_US / 1000.0,
            v / 1000.0,
            yes_no(v <= FIRST_GOAL_US)
        )?;
    }
    Ok(())
}

/// The SSE rows of the goals table.
fn sse_goals(o: &mut String, sse: &SseFigures) -> std::fmt::Result {
    type Pick = fn(&crate::load::LoadResult) -> f64;
    for (q, f) in [("p50", (|l| l.p50_us) as Pick), ("p99", |l| l.p99_us)] {
        let a = added(&sse.calls, Route::Agent, f).median;
        let n = added(&sse.calls, Route::Nginx, f).median;
        let (goal, met) = if q == "p50" {
            (
                format!("≤ {SSE_GOAL}× nginx's"),
                yes_no(a <= n * SSE_GOAL).to_owned(),
            )
        } else {
            (
                "informational (nginx for comparison)".to_owned(),
                "—".to_owned(),
            )
        };
        writeln!(
            o,
            "| 7a. SSE response ({} progress events + result), one connection: added {q} latency | {goal} | {a:+.1} µs | {n:+.1} µs | {met} |",
            sse.steps
        )?;
    }
    for (k, &count) in sse.counts.iter().enumerate() {
        let a = spread(sse.memory_at(k).map(|m| m.agent_per_stream())).median;
        let n = spread(sse.memory_at(k).map(|m| m.nginx_per_stream())).median;
        let instead = match sse.instead_of.get(k).copied().flatten() {
            Some(asked) => format!(
                " (instead of {}: the open-file limit, see 7b)",
                thousands(asked)
            ),
            None => String::new(),
        };
        writeln!(
            o,
            "| 7b. memory per idle SSE stream, {} streams{instead} | ≤ {STREAM_GOAL_KIB:.0} KiB | {a:.1} KiB | {n:.1} KiB | {} |",
            thousands(count),
            yes_no(a <= STREAM_GOAL_KIB)
        )?;
    }
    Ok(())
}

/// The pods rows of the goals table.
fn pods_goals(o: &mut String, pods: &PodFigures) -> std::fmt::Result {
    type Pick = fn(&crate::load::LoadResult) -> f64;
    for (q, f) in [("p50", (|l| l.p50_us) as Pick), ("p99", |l| l.p99_us)] {
        let a = added(&pods.one_conn, Route::Agent, f).median;
        let n = added(&pods.one_conn, Route::Nginx, f).median;
        writeln!(
            o,
            "| 8a. pods, one connection: added {q} latency | informational (nginx for comparison) | {a:+.1} µs | {n:+.1} µs | — |"
        )?;
    }
    let a = ratio(&pods.saturation, Route::Agent, |l| l.calls_per_s).median;
    let n = ratio(&pods.saturation, Route::Nginx, |l| l.calls_per_s).median;
    writeln!(
        o,
        "| 8b. pods, saturation throughput ÷ direct | informational (nginx for comparison) | {a:.2}× | {n:.2}× | — |"
    )?;
    let p99 = spread(pods.ready.iter().map(|r| r.quantile(0.99))).median;
    writeln!(
        o,
        "| 8c. namespace ready (creation → served), p99 over {} namespaces | ≤ {READY_GOAL_MS:.0} ms | {p99:.2} ms | — | {} |",
        pods.namespaces,
        yes_no(p99 <= READY_GOAL_MS)
    )
}

/// 10000 → "10,000".
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ns(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} µs", v / 1000.0)
    } else {
        format!("{v:.0} ns")
    }
}

/// Every `new/estimates.json` below `dir`, named by its `benchmark.json` full id.
pub fn read_criterion(dir: &Path) -> Result<Vec<Estimate>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    out.push(read_estimate(&p)?);
                } else if p
                    .file_name()
                    .is_some_and(|n| n != "base" && n != "change" && n != "report")
                {
                    stack.push(p);
                }
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

fn read_estimate(new_dir: &Path) -> Result<Estimate> {
    let read = |name: &str| -> Result<serde_json::Value> {
        let p = new_dir.join(name);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let bench = read("benchmark.json")?;
    let est = read("estimates.json")?;
    let median = &est["median"];
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    Ok(Estimate {
        id: bench["full_id"].as_str().unwrap_or("?").to_owned(),
        median_ns: num(&median["point_estimate"]),
        lower_ns: num(&median["confidence_interval"]["lower_bound"]),
        upper_ns: num(&median["confidence_interval"]["upper_bound"]),
    })
}

/// Put `generated` between the markers of `existing`, keeping everything around them; a file
/// without markers gets a heading and the figures appended.
pub fn splice(existing: &str, generated: &str) -> String {
    match (existing.find(BEGIN), existing.find(END)) {
        (Some(b), Some(e)) if b < e => {
            let after = &existing[e + END.len()..];
            format!("{}{}{}", &existing[..b], generated.trim_end(), after)
        }
        _ if existing.trim().is_empty() => format!("# mcpwarden benchmarks\n\n{generated}"),
        _ => format!("{}\n\n{generated}", existing.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_keeps_the_text_around_the_markers() {
        let old = format!("# T\n\nintro\n\n{BEGIN}\nold figures\n{END}\n\n## Analysis\nkept\n");
        let new = format!("{BEGIN}\nnew figures\n{END}\n");
        let out = splice(&old, &new);
        assert!(out.contains("intro"));
        assert!(out.contains("new figures"));
        assert!(!out.contains("old figures"));
        assert!(out.ends_with("## Analysis\nkept\n"));
        assert_eq!(out.matches(BEGIN).count(), 1);
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(200), "200");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(20_512), "20,512");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn splice_into_a_file_without_markers_appends() {
        let new = format!("{BEGIN}\nx\n{END}\n");
        assert!(splice("", &new).starts_with("# mcpwarden benchmarks"));
        let out = splice("# Mine\n", &new);
        assert!(out.starts_with("# Mine\n\n"));
        assert!(out.contains("\nx\n"));
    }
}
