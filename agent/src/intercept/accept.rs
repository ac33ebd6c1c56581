//! The accept loop and the workers. The accept loop (on the control-plane thread) only takes
//! each connection's redirect record from the map and hands the socket to a worker; the worker
//! names the caller (`identity`: /proc and the cgroup filesystem), checks the destination and
//! serves the connection.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};

use super::{
    conn::Conn, limits::Over, serve::serve_connection, server::Interceptor, upstream::Upstream,
};
use crate::{
    audit::{Event, Record, WorkerAudit},
    redirect::Redirected,
};

/// A connection the accept loop took the record of, on its way to a worker.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    redirected: Redirected,
}

/// The worker threads, each running a single-threaded runtime that serves its share of the
/// connections: a connection and its upstream exchanges stay on one thread, so a call costs no
/// cross-thread wake-up and touches no state shared with other cores. Dropping this stops the
/// workers: each drops its runtime, and with it every connection it serves.
struct Workers {
    queues: Vec<tokio::sync::mpsc::UnboundedSender<Accepted>>,
    next: AtomicUsize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Workers {
    /// Close every queue and wait for the workers: each then drops its connections and writes
    /// its deferred audit records before the process can exit. Dropping runtimes does not block
    /// on I/O, so this is quick.
    fn drop(&mut self) {
        self.queues.clear();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("an interceptor worker panicked");
            }
        }
    }
}

impl Workers {
    fn start(shared: &Arc<Interceptor>, n: usize) -> std::io::Result<Workers> {
        let mut queues = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("mcpwarden-w{i}"))
                    .spawn(move || runtime.block_on(worker(shared, rx)))?,
            );
            queues.push(tx);
        }
        Ok(Workers {
            queues,
            next: AtomicUsize::new(0),
            threads,
        })
    }

    /// Hand a connection to the next worker (round robin).
    fn dispatch(&self, accepted: Accepted) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len().max(1);
        if let Some(queue) = self.queues.get(i) {
            if queue.send(accepted).is_err() {
                tracing::error!(
                    worker = i,
                    "interceptor worker has stopped: connection dropped"
                );
            }
        }
    }
}

/// Numbers accepted connections.
static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

/// One worker: serve every connection it is handed until its queue closes.
async fn worker(
    shared: Arc<Interceptor>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
) {
    let upstream = Arc::new(Upstream::new());
    let audit = WorkerAudit::new(shared.audit.clone());
    while let Some(a) = queue.recv().await {
        let caller = shared.identity.caller(&a.redirected.kernel);
        let dst = a.redirected.orig_dst;
        let servers = shared.routes.servers_for(dst);
        let conn = Conn::new(
            NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            shared.clone(),
            dst,
            caller,
            servers,
            upstream.clone(),
            audit.clone(),
        );
        if conn.servers.is_empty() {
            tracing::warn!(%dst, "destination is no longer a configured endpoint: refusing the connection");
            conn.write_audit(
                &conn
                    .record(Event::Refused)
                    .denied("destination is no longer a configured endpoint"),
            );
            continue;
        }
        let limits = &shared.limits;
        let slot = shared.connections.admit(
            conn.caller.cgroup_id,
            limits.max_connections,
            limits.max_connections_per_caller,
        );
        match slot {
            Ok(slot) => {
                tokio::spawn(async move {
                    let _slot = slot;
                    serve_connection(conn, a.stream, a.peer).await;
                });
            }
            Err(over) => refuse_over_limit(&conn, &a.stream, over),
        }
    }
}

/// A connection over a connection limit: audited (once a second per caller), answered 503 on
/// plaintext (best effort: the socket is not waited on), closed.
fn refuse_over_limit(conn: &Conn, stream: &std::net::TcpStream, over: Over) {
    let reason = over.reason();
    tracing::warn!(dst = %conn.dst, pid = conn.caller.pid, "{reason}");
    conn.audit_repeated(
        "connection_limit",
        conn.record(Event::Refused).denied(reason.clone()),
    );
    if conn.schemes() == (true, false) {
        let body = crate::mcp::error_response(None, -32603, &reason);
        let mut answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        let _ = std::io::Write::write(&mut &*stream, &answer);
    }
}

impl Interceptor {
    /// Start `workers` worker threads; the future accepts on every listener (on the calling
    /// runtime) until it is dropped, and the workers stop with it: the future owns them, so
    /// dropping it joins them.
    pub fn serve(
        self: Arc<Self>,
        listeners: Vec<TcpListener>,
        workers: usize,
    ) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
        let workers = Workers::start(&self, workers)?;
        Ok(async move { self.accept_loop(&listeners, &workers).await })
    }

    /// Accept on every listener (at most one IPv4 and one IPv6), take each connection's record,
    /// and hand it to a worker. The listeners are polled in turn, starting from a different one
    /// each time, so a flood on one does not starve the other.
    async fn accept_loop(&self, listeners: &[TcpListener], workers: &Workers) {
        let mut first = 0usize;
        loop {
            first = first.wrapping_add(1);
            let accepted = std::future::poll_fn(|cx| {
                let n = listeners.len();
                for k in 0..n {
                    if let Some(l) = listeners.get((first + k) % n) {
                        if let std::task::Poll::Ready(r) = l.poll_accept(cx) {
                            return std::task::Poll::Ready(r);
                        }
                    }
                }
                std::task::Poll::Pending
            })
            .await;
            match accepted {
                Ok((stream, peer)) => {
                    if let Some(accepted) = self.accept(stream, peer) {
                        workers.dispatch(accepted);
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Take an accepted connection's record: None means it was refused (and audited).
    fn accept(&self, stream: TcpStream, peer: SocketAddr) -> Option<Accepted> {
        let Some(redirected) = self.orig_dst.take(peer) else {
            tracing::warn!(%peer, "no redirect record for this connection: refusing it (the interceptor is not an open proxy)");
            let rec = Record::bare(Event::Refused)
                .denied(format!("no redirect record for connection from {peer}"));
            if let Err(e) = self.audit.write(&rec) {
                tracing::error!(error = %e, "writing an audit record failed");
            }
            return None;
        };
        let _ = stream.set_nodelay(true);
        match stream.into_std() {
            Ok(stream) => Some(Accepted {
                stream,
                peer,
                redirected,
            }),
            Err(e) => {
                tracing::error!(%peer, error = %e, "detaching an accepted connection failed");
                None
            }
        }
    }
}
