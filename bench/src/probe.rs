//! connect() latency to a destination that is not an MCP endpoint: what every other connection
//! on the host pays for the programs being attached (connect4 looks the destination up and lets
//! it go; sock_ops sees the connection establish).
//!
//! Blocking std sockets, one connect() at a time, timed around the call alone. Each socket is
//! closed with SO_LINGER 0 (RST, no TIME_WAIT) so that a long run never exhausts ephemeral ports.
//! The listener is a separate process outside the attach point, like a server on another host:
//! on loopback the server's side of the handshake runs inside the client's connect(), and a
//! listener below the attach point would add its own sock_ops runs to the client's figure.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Instant,
};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectResult {
    pub connects: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

/// Accept and drop connections on `addr` until killed; prints `listening ADDR` once bound.
pub fn listen(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    // std listens with a backlog of 128; a burst the accept loop has not drained yet would
    // overflow it and cost a 1 s SYN retransmit. listen() again raises it.
    // SAFETY: listen on a socket we own.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    println!("listening {}", listener.local_addr()?);
    for s in listener.incoming() {
        drop(s);
    }
    Ok(())
}

/// Time `count` connects to `target`.
pub fn run(target: SocketAddr, count: u64) -> Result<ConnectResult> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)
        .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
    // Warm the paths (route, ports, caches) before timing.
    for _ in 0..200 {
        close_rst(TcpStream::connect(target)?);
    }
    for _ in 0..count {
        let t = Instant::now();
        let s = TcpStream::connect(target).with_context(|| format!("connect {target}"))?;
        let ns = t.elapsed().as_nanos() as u64;
        hist.saturating_record(ns.max(1));
        close_rst(s);
    }
    Ok(ConnectResult {
        connects: hist.len(),
        p50_us: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
        mean_us: hist.mean() / 1000.0,
    })
}

/// Close without TIME_WAIT (a long run would otherwise pile them up).
pub(crate) fn close_rst(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an fd we own, with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
