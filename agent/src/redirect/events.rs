//! What the programs refused or saw for the first time, read from their ring buffer.
//!
//! The kernel side sends at most one event a second per (kind, network namespace, cgroup), so a
//! workload retrying in a loop cannot flood the reader; what the agent makes of them (preparing a
//! namespace, an audit record) is `netns`'s.

use std::net::SocketAddr;

use aya::maps::{MapData, RingBuf};
use mcpwarden_common::{Event, EV_BIND, EV_NO_RECORD, EV_RAW, EV_UDP, EV_UNPREPARED};
use tokio::io::{unix::AsyncFd, Interest};

use crate::identity::Kernel;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A connect to an endpoint from a namespace not served yet: refused.
    Unprepared,
    /// UDP to an endpoint: refused.
    Udp,
    /// A raw or packet socket: refused.
    Raw,
    /// A bind to the interceptor's port: refused.
    Bind,
    /// A connect to an endpoint whose record could not be stored (the map is full): refused.
    NoRecord,
}

/// One event, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEvent {
    pub kind: Kind,
    /// Who (the netns cookie is 0 for packet sockets: refused before the socket existed).
    pub kernel: Kernel,
    /// The destination (connect, UDP) or the address bound (bind).
    pub addr: Option<SocketAddr>,
    pub family: u16,
    pub sock_type: u16,
}

impl KernelEvent {
    /// Decode one ring buffer entry; None for an entry of another size or an unknown kind.
    pub fn decode(bytes: &[u8]) -> Option<KernelEvent> {
        if bytes.len() != std::mem::size_of::<Event>() {
            return None;
        }
        // SAFETY: the length matches, Event is repr(C) plain integers (any bit pattern is
        // valid), and read_unaligned copes with the ring buffer's 8-byte alignment.
        let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let kind = match ev.kind {
            EV_UNPREPARED => Kind::Unprepared,
            EV_UDP => Kind::Udp,
            EV_RAW => Kind::Raw,
            EV_BIND => Kind::Bind,
            EV_NO_RECORD => Kind::NoRecord,
            _ => return None,
        };
        let addr =
            (ev.addr != mcpwarden_common::SockKey::default()).then(|| ev.addr.to_socket_addr());
        Some(KernelEvent {
            kind,
            kernel: Kernel {
                pid: ev.tgid,
                uid: ev.uid,
                gid: ev.gid,
                cgroup_id: ev.cgroup_id,
                comm: super::comm_str(&ev.comm),
                netns: ev.netns,
            },
            addr,
            family: ev.family,
            sock_type: ev.sock_type,
        })
    }
}

/// The ring buffer, readable from a tokio runtime.
pub struct Events {
    ring: Option<AsyncFd<RingBuf<MapData>>>,
    raw: Option<RingBuf<MapData>>,
}

impl Events {
    pub(super) fn new(ring: RingBuf<MapData>) -> Events {
        Events {
            ring: None,
            raw: Some(ring),
        }
    }

    /// The next batch of events (waits until there is at least one). Registers with the
    /// runtime it is first called on.
    pub async fn next_batch(&mut self) -> std::io::Result<Vec<KernelEvent>> {
        if self.ring.is_none() {
            if let Some(raw) = self.raw.take() {
                // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd holds it.
                let fd = unsafe { AsyncFd::register_with_interest(raw, Interest::READABLE) }
                    .map_err(std::io::Error::from)?;
                self.ring = Some(fd);
            }
        }
        let Some(ring) = self.ring.as_mut() else {
            return Err(std::io::Error::other("the event ring buffer is gone"));
        };
        loop {
            let mut guard = ring.readable_mut().await?;
            let mut out = Vec::new();
            let inner = guard.get_inner_mut();
            while let Some(item) = inner.next() {
                if let Some(ev) = KernelEvent::decode(&item) {
                    out.push(ev);
                }
            }
            guard.clear_ready();
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcpwarden_common::SockKey;

    #[test]
    fn decodes_an_entry_and_refuses_other_sizes_and_kinds() {
        let ev = Event {
            kind: EV_UDP,
            tgid: 42,
            uid: 1000,
            gid: 1000,
            cgroup_id: 7,
            netns: 99,
            comm: *b"quic-client\0\0\0\0\0",
            addr: SockKey::from_socket_addr("10.0.0.5:443".parse().expect("addr")),
            family: 2,
            sock_type: 2,
            protocol: 0,
            _pad: 0,
        };
        // SAFETY: viewing a repr(C) value of plain integers as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const Event).cast::<u8>(),
                std::mem::size_of::<Event>(),
            )
        };
        let got = KernelEvent::decode(bytes).expect("decoded");
        assert_eq!(got.kind, Kind::Udp);
        assert_eq!(got.kernel.pid, 42);
        assert_eq!(got.kernel.comm, "quic-client");
        assert_eq!(got.kernel.netns, 99);
        assert_eq!(got.addr, Some("10.0.0.5:443".parse().expect("addr")));
        assert!(KernelEvent::decode(&bytes[1..]).is_none());
        let mut unknown = ev;
        unknown.kind = 77;
        // SAFETY: as above.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&unknown as *const Event).cast::<u8>(),
                std::mem::size_of::<Event>(),
            )
        };
        assert!(KernelEvent::decode(bytes).is_none());
    }
}
