//! Non-MCP listeners for the "untouched traffic" tests: a TCP echo and a UDP echo.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// TCP echo: for each connection, reads until EOF and writes everything back, then closes.
pub struct TcpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEcho {
    pub fn start(addr: SocketAddr) -> TcpEcho {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("TcpEcho bind {addr}: {e}"));
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (s, p) = (stop.clone(), peers.clone());
        let thread = std::thread::spawn(move || {
            for conn in l.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut c) = conn else { continue };
                if let Ok(peer) = c.peer_addr() {
                    p.lock().unwrap().push(peer);
                }
                std::thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut buf = Vec::new();
                    let _ = c.read_to_end(&mut buf);
                    let _ = c.write_all(&buf);
                });
            }
        });
        TcpEcho {
            addr,
            stop,
            peers,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Peers of the accepted connections.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// UDP echo: answers every datagram with the same bytes, to the sender.
pub struct UdpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    sources: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(addr: SocketAddr) -> UdpEcho {
        let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("UdpEcho bind {addr}: {e}"));
        let addr = sock.local_addr().unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let sources = Arc::new(Mutex::new(Vec::new()));
        let (s, src) = (stop.clone(), sources.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !s.load(Ordering::SeqCst) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    src.lock().unwrap().push(from);
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        UdpEcho {
            addr,
            stop,
            sources,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn sources(&self) -> Vec<SocketAddr> {
        self.sources.lock().unwrap().clone()
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
