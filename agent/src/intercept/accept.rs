//! The accept loop and the workers. The accept loop (on the control-plane thread) accepts on
//! the listeners of every network namespace served (`netns` hands them over and takes them back
//! with [`ListenerMsg`]), only takes each connection's redirect record from the map, and hands
//! the socket to a worker; the worker names the caller (`identity`: /proc and the cgroup
//! filesystem), checks the destination and serves the connection.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::AsFd,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

use super::{
    conn::Conn, limits::Over, serve::serve_connection, server::Interceptor, upstream::Upstream,
};
use crate::{
    audit::{Event, Record, Refusal, WorkerAudit},
    netns::{ListenerMsg, Netns},
    redirect::Redirected,
};

/// A connection the accept loop took the record of, on its way to a worker.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    redirected: Redirected,
    /// The namespace it was made in (and is accepted in): its upstream is dialled from there.
    netns: Arc<Netns>,
}

/// What a worker is told.
enum WorkerMsg {
    Serve(Accepted),
    /// A namespace is no longer served: drop the upstream pools dialled from it.
    NetnsGone(u64),
}

/// The worker threads, each running a single-threaded runtime that serves its share of the
/// connections: a connection and its upstream exchanges stay on one thread, so a call costs no
/// cross-thread wake-up and touches no state shared with other cores. Dropping this stops the
/// workers: each drops its runtime, and with it every connection it serves.
struct Workers {
    queues: Vec<tokio::sync::mpsc::UnboundedSender<WorkerMsg>>,
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
                    .spawn(move || {
                        crate::metrics::set_shard(i + 1);
                        runtime.block_on(worker(shared, rx))
                    })?,
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
            if queue.send(WorkerMsg::Serve(accepted)).is_err() {
                tracing::error!(
                    worker = i,
                    "interceptor worker has stopped: connection dropped"
                );
            }
        }
    }

    /// Tell every worker that namespace `cookie` is gone.
    fn netns_gone(&self, cookie: u64) {
        for queue in &self.queues {
            let _ = queue.send(WorkerMsg::NetnsGone(cookie));
        }
    }
}

/// Numbers accepted connections.
static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

/// One worker: serve every connection it is handed until its queue closes.
async fn worker(
    shared: Arc<Interceptor>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<WorkerMsg>,
) {
    let upstream = Arc::new(Upstream::new());
    let audit = WorkerAudit::new(shared.audit.clone());
    while let Some(msg) = queue.recv().await {
        let a = match msg {
            WorkerMsg::Serve(a) => a,
            WorkerMsg::NetnsGone(cookie) => {
                upstream.forget_netns(cookie);
                continue;
            }
        };
        let mut caller = shared.identity.caller(&a.redirected.kernel);
        caller.pod = shared.pods.lookup(caller.cgroup_id, &caller.workload);
        let dst = a.redirected.orig_dst;
        let servers = shared
            .routes
            .servers_for(dst, a.redirected.local, a.netns.host);
        let conn = Conn::new(
            NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            shared.clone(),
            dst,
            caller,
            a.netns,
            servers,
            upstream.clone(),
            audit.clone(),
        );
        if conn.servers.is_empty() {
            tracing::warn!(%dst, "destination is no longer a configured endpoint: refusing the connection");
            conn.write_audit(
                &conn
                    .record(Event::Refused)
                    .denied("destination is no longer a configured endpoint")
                    .kind(Refusal::Connection),
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
        conn.record(Event::Refused)
            .denied(reason.clone())
            .kind(Refusal::Limit),
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

/// One listener of one namespace.
struct Listening {
    listener: TcpListener,
    netns: Arc<Netns>,
    /// Turns true when the namespace is no longer served.
    stop: watch::Receiver<bool>,
}

type Accepting = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (
                    Arc<Listening>,
                    Option<std::io::Result<(TcpStream, SocketAddr)>>,
                ),
            > + Send,
    >,
>;

/// Accept one connection from `l` (after `delay`, when the last accept failed); None once the
/// namespace is no longer served.
fn accept_one(l: Arc<Listening>, delay: Option<Duration>) -> Accepting {
    Box::pin(async move {
        let mut stop = l.stop.clone();
        if *stop.borrow_and_update() {
            return (l, None);
        }
        let accepted = tokio::select! {
            _ = stop.changed() => None,
            r = async {
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                l.listener.accept().await
            } => Some(r),
        };
        (l, accepted)
    })
}

impl Interceptor {
    /// Start `workers` worker threads; the future accepts on every listener `listeners` hands
    /// over (on the calling runtime) until it is dropped, and the workers stop with it: the
    /// future owns them, so dropping it joins them.
    pub fn serve(
        self: Arc<Self>,
        listeners: mpsc::UnboundedReceiver<ListenerMsg>,
        workers: usize,
    ) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
        let workers = Workers::start(&self, workers)?;
        Ok(async move { self.accept_loop(listeners, &workers).await })
    }

    /// Accept on every namespace's listeners, take each connection's record, and hand it to a
    /// worker. Only the listeners that woke are polled, however many namespaces are served.
    async fn accept_loop(
        &self,
        mut control: mpsc::UnboundedReceiver<ListenerMsg>,
        workers: &Workers,
    ) {
        let mut accepting: FuturesUnordered<Accepting> = FuturesUnordered::new();
        let mut stops: HashMap<u64, watch::Sender<bool>> = HashMap::new();
        let mut control_open = true;
        loop {
            tokio::select! {
                msg = control.recv(), if control_open => match msg {
                    Some(ListenerMsg::Serve { netns, listeners }) => {
                        let stop = stops
                            .entry(netns.cookie)
                            .or_insert_with(|| watch::channel(false).0)
                            .subscribe();
                        for l in listeners {
                            match TcpListener::from_std(l) {
                                Ok(listener) => accepting.push(accept_one(
                                    Arc::new(Listening { listener, netns: netns.clone(), stop: stop.clone() }),
                                    None,
                                )),
                                Err(e) => tracing::error!(netns = netns.ino, error = %e, "registering a listener failed"),
                            }
                        }
                    }
                    Some(ListenerMsg::StopAccepting) => {
                        for (_, stop) in stops.drain() {
                            let _ = stop.send(true);
                        }
                    }
                    Some(ListenerMsg::Stop { cookie }) => {
                        if let Some(stop) = stops.remove(&cookie) {
                            let _ = stop.send(true);
                        }
                        workers.netns_gone(cookie);
                    }
                    None => control_open = false,
                },
                Some((l, accepted)) = accepting.next(), if !accepting.is_empty() => {
                    // None: the namespace is gone, and its listener with this future.
                    let Some(accepted) = accepted else { continue };
                    let delay = match accepted {
                        Ok((stream, peer)) => {
                            if let Some(accepted) = self.accept(stream, peer, &l.netns) {
                                workers.dispatch(accepted);
                            }
                            None
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::error!(error = %e, "accept failed");
                            Some(Duration::from_millis(50))
                        }
                    };
                    accepting.push(accept_one(l, delay));
                }
                else => return,
            }
        }
    }

    /// Take an accepted connection's record: None means it was refused (and audited).
    fn accept(&self, stream: TcpStream, peer: SocketAddr, netns: &Arc<Netns>) -> Option<Accepted> {
        let redirected = self
            .orig_dst
            .take(stream.as_fd())
            .filter(|r| r.kernel.netns == netns.cookie);
        let Some(redirected) = redirected else {
            tracing::warn!(%peer, netns = netns.ino, "no redirect record for this connection: refusing it (the interceptor is not an open proxy)");
            let rec = Record::bare(Event::Refused)
                .denied(format!("no redirect record for connection from {peer}"))
                .kind(Refusal::Connection);
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
                netns: netns.clone(),
            }),
            Err(e) => {
                tracing::error!(%peer, error = %e, "detaching an accepted connection failed");
                None
            }
        }
    }
}
