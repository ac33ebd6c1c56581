//! Step 1 of the flow: which connections come to the interceptor, and who made them.
//!
//! Loads the embedded eBPF object, fills its config, attaches connect4/6, sock_ops and
//! getpeername4/6 to a cgroup, keeps the endpoint map in sync with what the configured names
//! resolve to ([`resolve`]), and hands the interceptor the record of each accepted connection
//! ([`Redirector::take`]). Dropping the [`Redirector`] closes the link fds, which detaches every
//! program (`failure_mode: open`).

pub mod cgroup;
pub mod resolve;

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
    util::KernelVersion,
    Ebpf,
};
use mcpwarden_common::{
    ConnRecord, EndpointValue, ProxyConfig, SockKey, MAP_BY_CLIENT, MAP_CONFIG, MAP_ENDPOINTS,
    PROG_CONNECT4, PROG_CONNECT6, PROG_GETPEERNAME4, PROG_GETPEERNAME6, PROG_SOCK_OPS,
};

use crate::identity::Kernel;

/// The programs, built by agent/build.rs from the `mcpwarden-ebpf` crate.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mcpwarden"));

/// getpeername hooks arrived in 5.8, bpf_link for cgroups in 5.7, SO_NETNS_COOKIE in 5.14.
pub const MIN_KERNEL: (u8, u8) = (5, 14);

/// A connection the interceptor accepted, with where it was going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirected {
    pub orig_dst: SocketAddr,
    /// Who connected, as the kernel saw it (`identity` resolves names from it).
    pub kernel: Kernel,
}

/// Where the programs attach and where they send connections.
#[derive(Debug, Clone)]
pub struct Settings {
    /// cgroup whose subtree is redirected.
    pub attach: PathBuf,
    /// cgroup id whose connections are never redirected (the agent's own).
    pub agent_cgroup_id: u64,
    /// The interceptor's network namespace ([`netns_cookie`]); only connections made there are
    /// redirected.
    pub netns_cookie: u64,
    /// The interceptor's listeners.
    pub v4: Option<SocketAddrV4>,
    pub v6: Option<SocketAddrV6>,
}

/// The loaded, attached programs and the maps the agent talks to.
pub struct Redirector {
    /// Owns the programs and their links; dropping it detaches everything.
    _ebpf: Ebpf,
    endpoints: Mutex<HashMap<MapData, SockKey, EndpointValue>>,
    by_client: Mutex<HashMap<MapData, SockKey, ConnRecord>>,
    attach: PathBuf,
}

impl Redirector {
    /// Load, configure and attach. The endpoint map starts empty: fill it with
    /// [`Redirector::set_endpoints`].
    pub fn start(settings: &Settings) -> Result<Self> {
        check_kernel()?;
        let mut ebpf = Ebpf::load(EBPF_OBJECT).context("loading the eBPF object")?;

        let config = ProxyConfig {
            v4_addr: settings
                .v4
                .map(|a| u32::from_ne_bytes(a.ip().octets()))
                .unwrap_or(0),
            v4_port: settings.v4.map(|a| a.port()).unwrap_or(0),
            v6_port: settings.v6.map(|a| a.port()).unwrap_or(0),
            v6_addr: settings
                .v6
                .map(|a| SockKey::from_octets(a.ip().octets(), 0).addr)
                .unwrap_or([0; 4]),
            agent_cgroup_id: settings.agent_cgroup_id,
            netns_cookie: settings.netns_cookie,
        };
        let mut config_map: Array<_, ProxyConfig> =
            Array::try_from(take_map(&mut ebpf, MAP_CONFIG)?)?;
        config_map
            .set(0, config, 0)
            .context("writing the redirect config")?;

        let endpoints = HashMap::try_from(take_map(&mut ebpf, MAP_ENDPOINTS)?)?;
        let by_client = HashMap::try_from(take_map(&mut ebpf, MAP_BY_CLIENT)?)?;

        let cgroup = std::fs::File::open(&settings.attach)
            .with_context(|| format!("opening cgroup {}", settings.attach.display()))?;
        // Cgroup bpf_links are multi-attach by nature: each link is one more program in the
        // cgroup's effective array, next to whatever else (Cilium, Istio) is attached there.
        // `Single` is what bpf_link_create accepts for that (AllowMultiple gives EINVAL).
        for name in [
            PROG_CONNECT4,
            PROG_CONNECT6,
            PROG_GETPEERNAME4,
            PROG_GETPEERNAME6,
        ] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().with_context(|| format!("loading {name}"))?;
            prog.attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", settings.attach.display()))?;
        }
        let prog: &mut SockOps = program(&mut ebpf, PROG_SOCK_OPS)?;
        prog.load()
            .with_context(|| format!("loading {PROG_SOCK_OPS}"))?;
        prog.attach(&cgroup, CgroupAttachMode::Single)
            .with_context(|| {
                format!("attaching {PROG_SOCK_OPS} to {}", settings.attach.display())
            })?;

        Ok(Redirector {
            _ebpf: ebpf,
            endpoints: Mutex::new(endpoints),
            by_client: Mutex::new(by_client),
            attach: settings.attach.clone(),
        })
    }

    /// The cgroup the programs are attached to.
    pub fn attach_point(&self) -> &Path {
        &self.attach
    }

    /// Make the endpoint map hold exactly `want`.
    pub fn set_endpoints(&self, want: &BTreeMap<SockKey, EndpointValue>) -> Result<()> {
        let mut map = self
            .endpoints
            .lock()
            .map_err(|_| anyhow::anyhow!("endpoint map lock poisoned"))?;
        let have: Vec<SockKey> = map.keys().filter_map(|k| k.ok()).collect();
        for key in have.iter().filter(|k| !want.contains_key(k)) {
            map.remove(key).context("removing an endpoint")?;
        }
        for (key, value) in want {
            map.insert(*key, *value, 0).context("adding an endpoint")?;
        }
        Ok(())
    }

    /// The record of the connection whose client side is `peer`, removed from the map (each
    /// accepted connection consumes its record). None when the connection was not redirected —
    /// someone dialled the interceptor directly. A map look-up only: names are resolved later,
    /// off the accept thread (`identity`).
    pub fn take(&self, peer: SocketAddr) -> Option<Redirected> {
        let key = SockKey::from_socket_addr(peer);
        let rec = {
            let mut map = self.by_client.lock().ok()?;
            let rec = map.get(&key, 0).ok()?;
            // Already read: losing the delete only leaves an LRU entry behind.
            let _ = map.remove(&key);
            rec
        };
        Some(Redirected {
            orig_dst: rec.orig.to_socket_addr(),
            kernel: Kernel {
                pid: rec.tgid,
                uid: rec.uid,
                gid: rec.gid,
                cgroup_id: rec.cgroup_id,
                comm: comm_str(&rec.comm),
            },
        })
    }
}

/// The cookie of the network namespace `socket` lives in (`SO_NETNS_COOKIE`), the value
/// `bpf_get_netns_cookie()` returns for sockets in that namespace.
pub fn netns_cookie(socket: &impl std::os::fd::AsRawFd) -> Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading the network namespace cookie (SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}

fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow::anyhow!("the eBPF object has no map {name}"))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow::anyhow!("the eBPF object has no program {name}"))?;
    Ok(prog.try_into()?)
}

fn check_kernel() -> Result<()> {
    let v = KernelVersion::current().context("reading the kernel version")?;
    let (major, minor) = MIN_KERNEL;
    if v < KernelVersion::new(major, minor, 0) {
        bail!("kernel {v} is too old: mcpwarden needs Linux {major}.{minor} or newer");
    }
    Ok(())
}
