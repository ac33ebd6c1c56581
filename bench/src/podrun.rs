//! Scenario 8: callers in network namespaces of their own ("pods", `mcpwarden_tests::pods`).
//!
//! ```text
//!   pod (10.220.1.2) ──veth── router (ip_forward) ──veth── remote host (10.220.250.2): responder
//! ```
//!
//! The agent is restarted for it with the remote responder as its endpoint, the net's pin
//! directory as its only `--netns-dir`, and a fixed listen port, the same in every namespace it
//! serves. Everything (pod, router, remote host, pins, nginx, responder) goes when the scenario
//! ends, also on an error.
//!
//! - 8a, 8b: scenarios 2a (one keep-alive connection, closed loop) and 3 (saturation, 32
//!   connections) from inside the pod, on three routes, every process of a route in the pod's
//!   namespace:
//!   - direct: the load generator in `plain` (no programs) dials the remote responder;
//!   - nginx: the load generator in `plain` dials an nginx sidecar on the pod's loopback (also
//!     in `plain`), which proxies to the remote responder over keep-alive;
//!   - mcpwarden: the load generator in the pod's cgroup below the attach point dials the
//!     remote responder; connect4 sends it to the agent's listener inside the pod, and the
//!     agent dials the responder from the pod's namespace. Audited as in 2a.
//! - 8c: namespace-ready time: `mcpwarden-bench nsready` ([`crate::nsready`], in `plain`, so
//!   that none of its sockets raises an event of the programs) makes new namespaces one at a
//!   time, pins each in the pin directory as a runtime pins a pod sandbox, and times each from
//!   its creation until the agent's listener is bound there.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use mcpwarden_tests::{free_port, wait_for, Pod, PodNet};

use crate::{
    load::{Call, LoadSpec, Shape, PATH},
    nginx::{Hop, Nginx, CONNECTIONS},
    nsready::NsReadyResult,
    run::{
        bench_ip, child_output, noisy_added, noisy_throughput, repeated, spawn_listening_in, three,
        AgentConfig, Bench, Measured, Proc, Route,
    },
};

/// The pods' addresses: 10.220.0.0/16, apart from the integration tests' (10.130–149).
const SUBNET: u8 = 220;

/// The nginx sidecar's address inside the pod.
const SIDECAR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);

/// Goal of 8c: p99 of the namespace-ready time, at most this (ms).
pub const READY_GOAL_MS: f64 = 200.0;

/// One 8c run: the namespace-ready times (ms) of its namespaces.
#[derive(Debug, Clone, Default)]
pub struct NsReady {
    pub ms: Vec<f64>,
}

impl NsReady {
    /// The `q` quantile (nearest rank).
    pub fn quantile(&self, q: f64) -> f64 {
        let mut v = self.ms.clone();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        let rank = (q * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    pub fn max(&self) -> f64 {
        self.ms.iter().copied().fold(f64::NAN, f64::max)
    }
}

#[derive(Debug, Clone, Default)]
pub struct PodFigures {
    /// 8a.
    pub one_conn: Vec<[Measured; 3]>,
    /// 8b.
    pub saturation: Vec<[Measured; 3]>,
    pub saturation_secs: f64,
    /// 8c: one run of `namespaces` namespaces per repeat.
    pub ready: Vec<NsReady>,
    pub namespaces: usize,
    /// 8c as the agent logged it (`ready_ms`: from noticing the pin to serving the namespace),
    /// for every probe namespace it said it serves.
    pub agent_ready_ms: Vec<f64>,
    /// (scenario, attempts, why still noisy) as in [`crate::report::Report::attempts`].
    pub attempts: Vec<(String, usize, Option<String>)>,
}

/// The pod, the remote host with its responder, and the pod's nginx sidecar. Fields drop in
/// order: nginx and the responder first, then the pod's namespace, then the net (its pins,
/// the remote host and the router); the pod's cgroup (emptied by then) is removed on drop.
struct PodWorld {
    nginx: Nginx,
    /// The responder on the remote host: the endpoint.
    remote: SocketAddr,
    _responder: Proc,
    pod: Pod,
    net: PodNet,
}

impl Drop for PodWorld {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.pod.cgroup);
    }
}

impl PodWorld {
    fn start(bench: &Bench) -> Result<PodWorld> {
        let mut net = PodNet::new("bench", SUBNET);
        let (responder, remote) = spawn_listening_in(
            &bench.exe,
            "responder",
            net.remote_ip,
            &bench.plain,
            Some(&net.remote.path()),
            &[],
        )?;
        let pod = net.pod("bench", bench.redirected.join("pod"), true, true);
        let nginx = Nginx::start_in(
            &bench.plain,
            Some(&pod.ns.path()),
            SIDECAR,
            &Hop::Plain { upstream: remote },
            CONNECTIONS,
        )?;
        Ok(PodWorld {
            nginx,
            remote,
            _responder: responder,
            pod,
            net,
        })
    }

    fn pod_netns(&self) -> PathBuf {
        self.pod.ns.path()
    }
}

/// One load run from the pod on `route`.
fn load(
    bench: &mut Bench,
    world: &PodWorld,
    route: Route,
    conns: usize,
    max_calls: u64,
    secs: f64,
) -> Result<Measured> {
    let (target, cgroup, proxy) = match route {
        Route::Direct => (world.remote, bench.plain.clone(), None),
        Route::Nginx => (
            world.nginx.listen,
            bench.plain.clone(),
            world.nginx.worker_pid(),
        ),
        Route::Agent => (
            world.remote,
            world.pod.cgroup.clone(),
            Some(bench.agent_pid()?),
        ),
    };
    let spec = LoadSpec {
        target,
        host: world.remote.to_string(),
        conns,
        shape: Shape::Closed,
        warmup: 20,
        max_calls,
        duration: Duration::from_secs_f64(secs),
        tls: None,
        call: Call::Echo,
    };
    bench.measure_in(route, &cgroup, Some(&world.pod_netns()), proxy, &spec)
}

/// Wait until the agent says it serves the namespace with inode `ino`.
fn wait_served(bench: &Bench, ino: u64) -> Result<()> {
    let mark = format!("netns={ino} ");
    wait_for(Duration::from_secs(20), || {
        bench
            .agent
            .log()
            .lines()
            .any(|l| l.contains("network namespace ready") && l.contains(&mark))
            .then_some(())
    })
    .ok_or_else(|| {
        anyhow::anyhow!(
            "the agent never said it serves the pod's namespace {ino}:\n{}",
            bench.agent.log()
        )
    })
}

/// One 8c run: `count` new namespaces pinned in `pins`, probed at the agent's `listen`.
fn ns_ready(bench: &Bench, pins: &Path, listen: SocketAddr, count: usize) -> Result<NsReadyResult> {
    let mut cmd = Command::new(&bench.exe);
    cmd.arg("nsready")
        .arg("--pins")
        .arg(pins)
        .arg("--probe")
        .arg(listen.to_string())
        .arg("--count")
        .arg(count.to_string());
    let line = child_output(cmd, &bench.plain)?;
    let result: NsReadyResult =
        serde_json::from_str(&line).with_context(|| format!("nsready result {line:?}"))?;
    if result.ready_ms.len() != count {
        bail!(
            "nsready timed {} namespaces of {count}",
            result.ready_ms.len()
        );
    }
    Ok(result)
}

/// `ready_ms` of the agent's "network namespace ready" lines for the namespaces in `inos`.
fn agent_ready_ms(log: &str, inos: &[u64]) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("network namespace ready"))
        .filter(|l| inos.iter().any(|ino| l.contains(&format!("netns={ino} "))))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("ready_ms="))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

/// Run scenario 8. It leaves the agent configured for the pods (the net it served is gone):
/// it runs last.
pub fn run(bench: &mut Bench, repeats: usize, attempts: usize) -> Result<PodFigures> {
    let quick = bench.quick;
    let world = PodWorld::start(bench)?;
    // A port known in advance: the interceptor listens on it in every namespace it serves.
    let listen = SocketAddr::new(bench_ip(2).into(), free_port(bench_ip(2)));
    bench.reconfigure_agent(AgentConfig {
        endpoints: vec![format!("http://{}{PATH}", world.remote)],
        listen,
        extra: vec![
            "--netns-dir".into(),
            world.net.pins.path().display().to_string(),
        ],
    })?;
    wait_served(bench, world.pod.ino())?;
    let mut figures = PodFigures::default();

    // 8a.
    let calls = if quick { 2_000 } else { 30_000 };
    eprintln!("mcpwarden-bench: pods: one connection, {calls} calls × {repeats} × 3 routes");
    let (runs, n, why) = repeated(
        "pods one connection",
        repeats,
        attempts,
        |r| three(|route| load(bench, &world, route, 1, calls, 60.0), r),
        |runs| noisy_added(runs, |l| l.p50_us),
    )?;
    figures.one_conn = runs;
    figures
        .attempts
        .push(("pods one connection".to_owned(), n, why));

    // 8b.
    let secs = if quick { 2.0 } else { 8.0 };
    figures.saturation_secs = secs;
    eprintln!(
        "mcpwarden-bench: pods: saturation, 32 connections for {secs} s × {repeats} × 3 routes"
    );
    let (runs, n, why) = repeated(
        "pods saturation",
        repeats,
        attempts,
        |r| three(|route| load(bench, &world, route, 32, u64::MAX, secs), r),
        noisy_throughput,
    )?;
    figures.saturation = runs;
    figures
        .attempts
        .push(("pods saturation".to_owned(), n, why));

    // 8c.
    let count = if quick { 10 } else { 100 };
    figures.namespaces = count;
    eprintln!("mcpwarden-bench: pods: namespace ready, {count} new namespaces × {repeats}");
    let mut inos = Vec::new();
    for _ in 0..repeats {
        let r = ns_ready(bench, world.net.pins.path(), listen, count)?;
        inos.extend(r.netns);
        figures.ready.push(NsReady { ms: r.ready_ms });
    }
    figures.agent_ready_ms = agent_ready_ms(&bench.agent.log(), &inos);
    bench.agent.assert_running();
    drop(world);
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let r = NsReady {
            ms: (1..=100).rev().map(f64::from).collect(),
        };
        assert_eq!(r.quantile(0.5), 50.0);
        assert_eq!(r.quantile(0.99), 99.0);
        assert_eq!(r.max(), 100.0);
        let ten = NsReady {
            ms: (1..=10).map(f64::from).collect(),
        };
        assert_eq!(ten.quantile(0.99), 10.0);
        assert_eq!(ten.quantile(0.5), 5.0);
        assert!(NsReady::default().quantile(0.5).is_nan());
    }

    #[test]
    fn the_agents_ready_lines_are_read() {
        let log = "2025-01-01T00:00:00Z  INFO mcpwarden::netns::coverage: network namespace ready netns=4026532 cookie=9 name=nsready-1-0 v4=Some(127.0.0.222:4000) v6=None ready_ms=0.731\n\
                   2025-01-01T00:00:00Z  INFO mcpwarden::netns::coverage: network namespace ready netns=4026999 cookie=10 name=other ready_ms=5.0\n";
        assert_eq!(agent_ready_ms(log, &[4026532]), vec![0.731]);
    }
}
