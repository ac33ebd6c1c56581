//! Scenario 6: an `https://` endpoint, TLS on both sides of the hop.
//!
//! The world: a bench CA (rcgen, [`TestCa`]); two TLS responders on one bench address (ports P
//! and Q) with a wildcard certificate from it for [`HOST`] and K more names; /etc/hosts entries
//! mapping every name to that address ([`HostsEntry`], removed on drop); an nginx that
//! terminates TLS with the same certificate and proxies over verified, kept-alive TLS to P; and
//! the agent restarted with every name as an `https://` endpoint (`https://HOST:P/mcp`, and each
//! new name at P and at Q), trusting the bench CA for the upstream (`--upstream-ca`).
//!
//! Clients trust one CA only: the bench CA on the direct and nginx routes, the agent's on the
//! mcpwarden route. A handshake that succeeds therefore proves which of them answered.
//!
//! - 6a: tools/call on one keep-alive TLS connection, closed loop, the three routes (audited on
//!   the mcpwarden route as in 2a).
//! - 6b: fresh TCP + TLS handshakes, one at a time, to [`HOST`] whose leaf the agent has cached;
//!   the agent must mint nothing meanwhile.
//! - 6c: first connections: a freshly started agent, and per new name one handshake at P (a
//!   mint and an ALPN probe of (P, name)), one at Q (leaf cached, a new probe of (Q, name)) and
//!   one at P again (both cached); the same steps direct for comparison. The agent must mint
//!   exactly one leaf per new name (plus [`HOST`], the first connection after start, kept
//!   apart).

use std::{
    ffi::OsStr,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use mcpwarden_tests::{free_port, hosts::HostsEntry, TempDir, TestCa, Validity};

use crate::{
    load::{Call, LoadSpec, Shape, PATH},
    nginx::{Hop, Nginx},
    run::{
        bench_ip, child_output, cpu_seconds, noisy_added, repeated, spawn_listening, three,
        AgentConfig, Bench, Measured, Proc, Route, ROUTES,
    },
    stats::Spread,
    tls::{write_cert_files, ClientTls, HandshakeResult, HandshakeSpec, Step},
};

/// The endpoint name of 6a and 6b.
pub const HOST: &str = "mcp.bench.mcpwarden.test";

/// The responders' and nginx's certificate covers every bench name.
const WILDCARD: &str = "*.bench.mcpwarden.test";

/// The names whose first connection 6c times.
fn new_name(i: usize) -> String {
    format!("new{i}.bench.mcpwarden.test")
}

/// What the agent logs once per leaf it mints.
const MINTED: &str = "minted a leaf certificate";

/// New names per 6c repeat.
pub const NAMES: usize = 20;

/// One handshake run on one route, with the proxy's CPU time over it.
#[derive(Debug, Clone, Default)]
pub struct HsMeasured {
    pub hs: HandshakeResult,
    pub proxy_cpu_us_per_handshake: Option<f64>,
}

/// One 6c repeat: per new name, the handshake times (µs) of [new name at P, same name at Q,
/// same name at P again], via the agent and direct.
#[derive(Debug, Clone, Default)]
pub struct FirstConns {
    pub agent: Vec<[f64; 3]>,
    pub direct: Vec<[f64; 3]>,
    /// The very first handshake after the agent started (to [`HOST`], a mint and a probe), and
    /// the same step direct.
    pub agent_first_after_start: f64,
    pub direct_first: f64,
}

/// The kinds of 6c handshake, in step order.
pub const FIRST_KINDS: [&str; 3] = [
    "new name: mint + ALPN probe",
    "known name, new destination: ALPN probe only",
    "same name and destination again: both cached",
];

impl FirstConns {
    /// Median over the names of handshake kind `k`, on the agent route or direct.
    pub fn median(&self, k: usize, agent: bool) -> f64 {
        let v: Vec<f64> = if agent { &self.agent } else { &self.direct }
            .iter()
            .map(|t| t[k])
            .collect();
        Spread::of(&v).map_or(f64::NAN, |s| s.median)
    }

    /// Slowest over the names of kind `k` on the agent route, minus the direct median of `k`.
    pub fn slowest_added(&self, k: usize) -> f64 {
        let max = self.agent.iter().map(|t| t[k]).fold(f64::NAN, f64::max);
        max - self.median(k, false)
    }

    /// Agent median − direct median for kind `k`.
    pub fn added(&self, k: usize) -> f64 {
        self.median(k, true) - self.median(k, false)
    }
}

#[derive(Debug, Clone, Default)]
pub struct TlsFigures {
    pub calls: Vec<[Measured; 3]>,
    pub handshakes: Vec<[HsMeasured; 3]>,
    pub first: Vec<FirstConns>,
    pub handshakes_per_route: u64,
    pub names: usize,
    /// (scenario, attempts, why still noisy) as in [`crate::report::Report::attempts`].
    pub attempts: Vec<(String, usize, Option<String>)>,
}

/// Everything scenario 6 talks to besides the agent; dropped (nginx, responders, /etc/hosts
/// lines, files) when the scenario is over.
struct TlsWorld {
    nginx: Nginx,
    /// The responders at P and Q.
    upstream: SocketAddr,
    alt: SocketAddr,
    names: Vec<String>,
    ca_file: PathBuf,
    _responders: [Proc; 2],
    _hosts: Vec<HostsEntry>,
    _files: TempDir,
}

impl TlsWorld {
    fn start(bench: &Bench, names: usize) -> Result<TlsWorld> {
        let files = TempDir::new("bench-tls");
        let ca = TestCa::new("mcpwarden bench CA");
        let ca_file = files.path().join("bench-ca.pem");
        ca.write_pem(&ca_file);
        let names: Vec<String> = (0..names).map(new_name).collect();
        // One wildcard certificate for every name, as many real servers have: it stays the
        // size of a one-name certificate however many names 6c uses.
        let cert = ca.issue(&[WILDCARD], Validity::Current);
        let (cert_file, key_file) = (files.path().join("cert.pem"), files.path().join("key.pem"));
        write_cert_files(&cert.chain, &cert.key, &cert_file, &key_file)?;

        let ip = bench_ip(4);
        let hosts: Vec<HostsEntry> = std::iter::once(HOST)
            .chain(names.iter().map(String::as_str))
            .map(|n| HostsEntry::add(n, IpAddr::V4(ip)))
            .collect();
        let args: [&OsStr; 4] = [
            OsStr::new("--tls-cert"),
            cert_file.as_os_str(),
            OsStr::new("--tls-key"),
            key_file.as_os_str(),
        ];
        let (p, upstream) = spawn_listening(&bench.exe, "responder", ip, &bench.plain, &args)?;
        let (q, alt) = spawn_listening(&bench.exe, "responder", ip, &bench.plain, &args)?;
        let listen = SocketAddr::new(bench_ip(1).into(), free_port(bench_ip(1)));
        let nginx = Nginx::start(
            &bench.plain,
            listen,
            &Hop::Tls {
                upstream,
                name: HOST,
                cert: &cert_file,
                key: &key_file,
                ca: &ca_file,
            },
        )?;
        Ok(TlsWorld {
            nginx,
            upstream,
            alt,
            names,
            ca_file,
            _responders: [p, q],
            _hosts: hosts,
            _files: files,
        })
    }

    /// The agent's configuration: every name an https endpoint, the bench CA trusted upstream.
    fn agent_config(&self) -> AgentConfig {
        let url = |name: &str, at: SocketAddr| format!("https://{name}:{}{PATH}", at.port());
        let mut endpoints = vec![url(HOST, self.upstream)];
        for n in &self.names {
            endpoints.push(url(n, self.upstream));
            endpoints.push(url(n, self.alt));
        }
        AgentConfig {
            endpoints,
            listen: AgentConfig::any_port(),
            // 6c measures the cold path (probe + mint on a first connection), which the agent
            // otherwise does for configured origins at start.
            extra: vec![
                "--upstream-ca".into(),
                self.ca_file.display().to_string(),
                "--no-tls-prewarm".into(),
            ],
        }
    }

    /// Where `route` dials, from which cgroup, trusting which CA, and the proxy's pid.
    fn route(&self, bench: &Bench, route: Route) -> Result<RouteTarget> {
        Ok(match route {
            Route::Direct => RouteTarget {
                target: self.upstream,
                cgroup: bench.plain.clone(),
                ca_file: self.ca_file.clone(),
                proxy: None,
            },
            Route::Nginx => RouteTarget {
                target: self.nginx.listen,
                cgroup: bench.plain.clone(),
                ca_file: self.ca_file.clone(),
                proxy: self.nginx.worker_pid(),
            },
            Route::Agent => RouteTarget {
                target: self.upstream,
                cgroup: bench.redirected.clone(),
                ca_file: bench.agent.ca_cert_path(),
                proxy: Some(bench.agent_pid()?),
            },
        })
    }
}

struct RouteTarget {
    target: SocketAddr,
    cgroup: PathBuf,
    ca_file: PathBuf,
    proxy: Option<u32>,
}

fn minted(bench: &Bench) -> usize {
    bench.agent.log().matches(MINTED).count()
}

/// A handshake the client saw complete must not have ended in a refusal on the agent's side
/// (it would have written its audit record and warning for every connection).
fn check_refused(bench: &mut Bench, before: u64) -> Result<()> {
    let refused = bench.audit_refused()? - before;
    if refused > 0 {
        bail!("the agent refused {refused} connections during the handshakes");
    }
    Ok(())
}

fn handshakes(bench: &Bench, cgroup: &Path, spec: &HandshakeSpec) -> Result<HandshakeResult> {
    let mut cmd = Command::new(&bench.exe);
    cmd.arg("handshake")
        .arg("--spec")
        .arg(serde_json::to_string(spec)?);
    let line = child_output(cmd, cgroup)?;
    serde_json::from_str(&line).with_context(|| format!("handshake result {line:?}"))
}

/// 6a: one keep-alive TLS connection, closed loop.
fn calls(bench: &mut Bench, world: &TlsWorld, route: Route, calls: u64) -> Result<Measured> {
    let t = world.route(bench, route)?;
    let spec = LoadSpec {
        target: t.target,
        host: format!("{HOST}:{}", world.upstream.port()),
        conns: 1,
        shape: Shape::Closed,
        warmup: 20,
        max_calls: calls,
        duration: std::time::Duration::from_secs(60),
        tls: Some(ClientTls {
            sni: HOST.into(),
            ca_file: t.ca_file,
        }),
        call: Call::Echo,
    };
    bench.measure(route, &t.cgroup, t.proxy, &spec)
}

/// 6b: `count` fresh handshakes to [`HOST`]; through the agent, none may mint.
fn cached_handshakes(
    bench: &mut Bench,
    world: &TlsWorld,
    route: Route,
    count: u64,
) -> Result<HsMeasured> {
    let t = world.route(bench, route)?;
    let warmup = 20;
    let spec = HandshakeSpec {
        steps: vec![Step {
            target: t.target,
            sni: HOST.into(),
        }],
        ca_file: t.ca_file,
        rounds: count + warmup,
        warmup,
    };
    let (mints, refused) = (minted(bench), bench.audit_refused()?);
    let cpu_before = t.proxy.and_then(cpu_seconds);
    let hs = handshakes(bench, &t.cgroup, &spec)?;
    let cpu_after = t.proxy.and_then(cpu_seconds);
    let new_mints = minted(bench) - mints;
    if route == Route::Agent && new_mints > 0 {
        bail!("the agent minted {new_mints} leaves during the cached-leaf handshakes");
    }
    check_refused(bench, refused)?;
    let proxy_cpu_us_per_handshake = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) => Some((a - b) * 1e6 / spec.rounds as f64),
        _ => None,
    };
    Ok(HsMeasured {
        hs,
        proxy_cpu_us_per_handshake,
    })
}

/// 6c, one repeat: a fresh agent, then the first connections on the agent route and the same
/// steps direct (in an order alternating between repeats).
fn first_connections(bench: &mut Bench, world: &TlsWorld, r: usize) -> Result<FirstConns> {
    bench.restart_agent()?;
    let steps = |at: SocketAddr, alt: SocketAddr| {
        let mut steps = vec![Step {
            target: at,
            sni: HOST.into(),
        }];
        for n in &world.names {
            for target in [at, alt, at] {
                steps.push(Step {
                    target,
                    sni: n.clone(),
                });
            }
        }
        steps
    };
    let spec = |route: Route| -> Result<(HandshakeSpec, PathBuf)> {
        let t = world.route(bench, route)?;
        Ok((
            HandshakeSpec {
                steps: steps(world.upstream, world.alt),
                ca_file: t.ca_file,
                rounds: 1,
                warmup: 0,
            },
            t.cgroup,
        ))
    };
    let (agent_spec, agent_cg) = spec(Route::Agent)?;
    let (direct_spec, direct_cg) = spec(Route::Direct)?;
    let split = |hs: HandshakeResult| -> Result<(f64, Vec<[f64; 3]>)> {
        let Some((&first, rest)) = hs.each_us.split_first() else {
            bail!("the first-connection run reported no handshakes");
        };
        if rest.len() != 3 * world.names.len() {
            bail!(
                "the first-connection run reported {} handshakes, not {}",
                hs.each_us.len(),
                3 * world.names.len() + 1
            );
        }
        Ok((
            first,
            rest.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect(),
        ))
    };
    let run_agent = |bench: &mut Bench| -> Result<HandshakeResult> {
        let (before, refused) = (minted(bench), bench.audit_refused()?);
        let hs = handshakes(bench, &agent_cg, &agent_spec)?;
        check_refused(bench, refused)?;
        let new_mints = minted(bench) - before;
        let want = world.names.len() + 1;
        if new_mints != want {
            bail!("the agent minted {new_mints} leaves for {want} first connections to new names");
        }
        Ok(hs)
    };
    let (agent, direct) = if r.is_multiple_of(2) {
        let direct = handshakes(bench, &direct_cg, &direct_spec)?;
        (run_agent(bench)?, direct)
    } else {
        let agent = run_agent(bench)?;
        (agent, handshakes(bench, &direct_cg, &direct_spec)?)
    };
    let (agent_first_after_start, agent) = split(agent)?;
    let (direct_first, direct) = split(direct)?;
    Ok(FirstConns {
        agent,
        direct,
        agent_first_after_start,
        direct_first,
    })
}

/// Run scenario 6 and leave the bench's agent configured for it.
pub fn run(bench: &mut Bench, repeats: usize, attempts: usize) -> Result<TlsFigures> {
    let quick = bench.quick;
    let world = TlsWorld::start(bench, NAMES)?;
    bench.reconfigure_agent(world.agent_config())?;
    let mut figures = TlsFigures {
        names: NAMES,
        ..TlsFigures::default()
    };

    // 6a.
    let n = if quick { 2_000 } else { 30_000 };
    eprintln!("mcpwarden-bench: TLS, one connection, {n} calls × {repeats} × 3 routes");
    let (runs, k, why) = repeated(
        "TLS one connection",
        repeats,
        attempts,
        |r| three(|route| calls(bench, &world, route, n), r),
        |runs| noisy_added(runs, |l| l.p50_us),
    )?;
    figures.calls = runs;
    let mut notes = vec![("TLS one connection".to_owned(), k, why)];

    // 6b.
    let n = if quick { 300 } else { 3_000 };
    figures.handshakes_per_route = n;
    eprintln!("mcpwarden-bench: TLS handshakes, cached leaf, {n} × {repeats} × 3 routes");
    let (runs, k, why) = repeated(
        "TLS handshake, cached leaf",
        repeats,
        attempts,
        |r| three(|route| cached_handshakes(bench, &world, route, n), r),
        |runs| {
            // The claim is "at most HANDSHAKE_GOAL added": a spread on both sides of it cannot
            // carry it (one near zero can, however wide it is relative to itself).
            let s = hs_added(runs, Route::Agent, |h| h.p50_us);
            straddles(s, HANDSHAKE_GOAL_US, "added handshake p50")
        },
    )?;
    figures.handshakes = runs;
    notes.push(("TLS handshake, cached leaf".to_owned(), k, why));

    // 6c.
    eprintln!("mcpwarden-bench: TLS first connections, {NAMES} new names × {repeats} fresh agents");
    let (runs, k, why) = repeated(
        "TLS first connections",
        repeats,
        attempts,
        |r| first_connections(bench, &world, r),
        |runs| {
            let s = Spread::of(&runs.iter().map(|f| f.added(0)).collect::<Vec<_>>())
                .unwrap_or_default();
            straddles(s, FIRST_GOAL_US, "first-connection added median")
        },
    )?;
    figures.first = runs;
    notes.push(("TLS first connections".to_owned(), k, why));
    bench.agent.assert_running();
    drop(world);
    figures.attempts = notes;
    Ok(figures)
}

/// Goal of 6b: a handshake with a cached leaf adds at most this (µs).
pub const HANDSHAKE_GOAL_US: f64 = 1_000.0;
/// Goal of 6c: a first connection to a new name adds at most this (µs).
pub const FIRST_GOAL_US: f64 = 5_000.0;

/// Why a spread cannot carry "at most `goal`": it lies on both sides of it.
fn straddles(s: Spread, goal: f64, what: &str) -> Option<String> {
    (s.min <= goal && s.max > goal).then(|| {
        format!(
            "mcpwarden {what} spread {:.0}–{:.0} µs straddles the {goal:.0} µs goal",
            s.min, s.max
        )
    })
}

/// Spread of `f(route) − f(direct)` over handshake repeats.
pub fn hs_added(
    runs: &[[HsMeasured; 3]],
    route: Route,
    f: impl Fn(&HandshakeResult) -> f64,
) -> Spread {
    let i = ROUTES.iter().position(|&x| x == route).unwrap_or(0);
    let v: Vec<f64> = runs.iter().map(|r| f(&r[i].hs) - f(&r[0].hs)).collect();
    Spread::of(&v).unwrap_or_default()
}
