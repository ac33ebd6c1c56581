//! A test SSE server whose stream stays open until the test lets it go, so that a test can
//! see an event arrive while the stream is open (an interceptor that buffered would never
//! deliver it).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Channel};
use hyper::body::Frame;
use tokio::sync::Notify;

/// An SSE endpoint at /mcp: `data: one`, then (once released) `data: two`, then the end.
pub struct HeldStream {
    pub addr: SocketAddr,
    release: Arc<Notify>,
    _runtime: tokio::runtime::Runtime,
}

impl HeldStream {
    pub fn start(addr: SocketAddr) -> HeldStream {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let release = Arc::new(Notify::new());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .expect("bind the SSE server");
        let addr = listener.local_addr().expect("local addr");
        let gate = release.clone();
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let gate = gate.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        let gate = gate.clone();
                        async move {
                            let (mut tx, body) = Channel::<Bytes, hyper::Error>::new(4);
                            tokio::spawn(async move {
                                let _ = tx
                                    .send(Frame::data(Bytes::from_static(b"data: one\n\n")))
                                    .await;
                                gate.notified().await;
                                let _ = tx
                                    .send(Frame::data(Bytes::from_static(b"data: two\n\n")))
                                    .await;
                            });
                            let resp = http::Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(body.boxed())
                                .expect("response");
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HeldStream {
            addr,
            release,
            _runtime: runtime,
        }
    }
}

impl HeldStream {
    /// Send the second event and end the stream (of one waiting stream).
    pub fn release(&self) {
        self.release.notify_one();
    }

    /// With `client` (an `mcp-client sse-get` of this stream) running: its first event must
    /// arrive while the stream is held open; then the stream is released and the second must
    /// arrive. No timing is asserted: the 30 s waits are deadlock guards.
    pub fn delivered_live(&self, client: &mut crate::LineChild) -> Result<(), String> {
        for want in ["event=one", "event=two"] {
            if client
                .wait_line(std::time::Duration::from_secs(30), |l| l == want)
                .is_none()
            {
                return Err(format!(
                    "{want:?} did not reach the client while the stream was open (seen {:?})",
                    client.seen
                ));
            }
            if want == "event=one" {
                self.release();
            }
        }
        Ok(())
    }
}
