//! `mcpwarden-bench`: the harness behind `cargo xtask bench`.
//!
//! `run` is the orchestrator (root: it creates cgroups and starts the agent and nginx); the other
//! subcommands are the processes it starts inside those cgroups, each printing one JSON line.

mod load;
mod nginx;
mod nsready;
mod podrun;
mod policyresult;
mod policyrun;
mod probe;
mod report;
mod responder;
mod run;
mod sserun;
mod stats;
mod tls;
mod tlsrun;

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mcpwarden-bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every scenario (direct, nginx, agent) and write the report.
    Run(run::RunOpts),
    /// The minimal MCP server the scenarios call.
    Responder {
        #[arg(long)]
        listen: SocketAddr,
        /// Serve TLS with this certificate chain (PEM)…
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// …and this key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Generate load as described by a JSON `LoadSpec`; prints a JSON `LoadResult`.
    Load {
        #[arg(long)]
        spec: String,
        /// Runtime worker threads (1 = current-thread runtime).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Time connect() to `target`; prints a JSON `ConnectResult`.
    Connect {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: u64,
    },
    /// Time fresh TCP + TLS handshakes as described by a JSON `HandshakeSpec`; prints a JSON
    /// `HandshakeResult`.
    Handshake {
        #[arg(long)]
        spec: String,
    },
    /// Accept and drop connections on `listen` (the connect() scenario's destination).
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Open `conns` connections, one call on each, and hold them until stdin closes.
    Hold {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long)]
        conns: usize,
        /// Open a standalone SSE stream (GET) on each connection instead, and hold it idle.
        #[arg(long)]
        sse: bool,
    },
    /// Make `count` network namespaces one at a time, each pinned in `pins`, and time each from
    /// its creation until the agent's listener `probe` is bound there; prints a JSON
    /// `NsReadyResult`.
    Nsready {
        #[arg(long)]
        pins: PathBuf,
        #[arg(long)]
        probe: std::net::SocketAddrV4,
        #[arg(long)]
        count: usize,
    },
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    Ok(rt)
}

/// Open files the bench wants: scenario 7b holds 10,000 SSE streams, which the agent (and
/// nginx) carry on two descriptors each.
pub const NOFILE: u64 = 65_536;

/// Raise the open-file limit to [`NOFILE`] (as root with CAP_SYS_RESOURCE, above the hard
/// limit), or else the soft limit to the hard one. Children inherit it: the agent raises its soft
/// limit to the hard one, and the responder and the holder come here too.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: NOFILE,
            rlim_max: NOFILE,
        };
        if lim.rlim_max >= NOFILE || libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The soft open-file limit of this process.
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        0
    }
}

fn main() -> Result<()> {
    raise_nofile();
    match Cli::parse().command {
        Cmd::Run(opts) => run::run(opts),
        Cmd::Responder {
            listen,
            tls_cert,
            tls_key,
        } => {
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(tls::server_config(&cert, &key)?),
                _ => None,
            };
            runtime(2)?.block_on(responder::serve(listen, tls))
        }
        Cmd::Handshake { spec } => {
            let spec: tls::HandshakeSpec = serde_json::from_str(&spec).context("--spec")?;
            let result = tls::handshakes(&spec)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Cmd::Load { spec, threads } => {
            let spec: load::LoadSpec = serde_json::from_str(&spec).context("--spec")?;
            let result = runtime(threads)?.block_on(load::run(&spec))?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Cmd::Sink { listen } => probe::listen(listen),
        Cmd::Connect { target, count } => {
            let result = probe::run(target, count)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Cmd::Hold {
            target,
            host,
            conns,
            sse: false,
        } => runtime(1)?.block_on(load::hold(target, &host, conns)),
        Cmd::Hold {
            target,
            host,
            conns,
            sse: true,
        } => runtime(1)?.block_on(load::hold_sse(target, &host, conns)),
        Cmd::Nsready { pins, probe, count } => {
            let result = nsready::run(&pins, probe, count)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
    }
}

/// Where the workspace's `target/` is (the bench binary lives in target/release).
pub fn target_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.to_path_buf())
}
