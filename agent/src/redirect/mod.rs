//! Step 1 of the flow: which connections come to the interceptor, and who made them.
//!
//! Loads the embedded eBPF object against its maps (pinned ones adopted, [`pin`]), fills its
//! config, keeps the endpoint maps in sync with what the configured names resolve to
//! ([`resolve`]) and the namespace map with where the interceptor listens in each network
//! namespace (`netns` prepares them), attaches the programs to a cgroup once those are filled
//! ([`Redirector::attach`]), hands the interceptor the record of each accepted connection
//! ([`Redirector::take`]), and passes on what the programs refused or saw ([`events`]).
//! `failure_mode: closed`: the links are pinned and outlive the agent. `open`: dropping the
//! [`Redirector`] closes the link fds, which detaches every program.

pub mod cgroup;
pub mod events;
pub mod pin;
pub mod preexisting;
pub mod resolve;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{
        links::FdLink, CgroupAttachMode, CgroupSock, CgroupSockAddr, LsmCgroup, Program, SockOps,
    },
    util::KernelVersion,
    Btf, Ebpf, EbpfLoader,
};
use mcpwarden_common::{
    ConnRecord, EndpointValue, Listeners, NetnsAddr, ProxyConfig, SockKey, CFG_RAW_ALLOW,
    MAP_AGENT_CGROUPS, MAP_BY_COOKIE, MAP_BY_SOCKET, MAP_BY_TUPLE, MAP_CONFIG, MAP_ENDPOINTS,
    MAP_ENDPOINT_PORTS, MAP_EVENTS, MAP_EVENT_SEEN, MAP_LISTEN_PORTS, MAP_LOCAL_ADDRS,
    MAP_LOCAL_PORTS, MAP_NETNS, MAX_CONNECTIONS, MAX_ENDPOINTS, MAX_LOCAL_ADDRS, MAX_LOCAL_PORTS,
    MAX_NETNS, PROG_BIND4, PROG_BIND6, PROG_CONNECT4, PROG_CONNECT6, PROG_GETPEERNAME4,
    PROG_GETPEERNAME6, PROG_PACKET_CREATE, PROG_SENDMSG4, PROG_SENDMSG6, PROG_SOCK_CREATE,
    PROG_SOCK_OPS, REC_LOCAL, SCOPE_HOST, SCOPE_PODS,
};

use crate::identity::Kernel;
use pin::PinDir;

/// The programs, built by agent/build.rs from the `mcpwarden-ebpf` crate.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mcpwarden"));

/// getpeername hooks arrived in 5.8, bpf_link for cgroups in 5.7, SO_NETNS_COOKIE in 5.14,
/// `bpf_get_netns_cookie` in sock_ops programs in 5.15.
pub const MIN_KERNEL: (u8, u8) = (5, 15);

/// A connection the interceptor accepted, with where it was going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirected {
    pub orig_dst: SocketAddr,
    /// Who connected, as the kernel saw it (`identity` resolves names from it).
    pub kernel: Kernel,
    /// The destination was a local spelling of a local endpoint's port (`0.0.0.0`, another
    /// loopback address, an address of the caller's namespace), not an endpoint address itself.
    pub local: bool,
}

/// Where the programs attach, whom they exempt, what they guard.
#[derive(Debug, Clone)]
pub struct Settings {
    /// cgroup whose subtree is redirected.
    pub attach: PathBuf,
    /// The agent's own cgroup (path, id): never redirected, free to bind the interceptor's
    /// ports.
    pub agent_cgroup: (PathBuf, u64),
    /// Cookie of the host's network namespace (`scope: host`).
    pub host_netns: u64,
    /// The interceptor's configured ports: nobody else below the attach point binds them.
    pub guard_ports: (u16, u16),
    /// `raw_sockets: allow`.
    pub raw_sockets_allowed: bool,
    /// Where links and maps are pinned (`failure_mode: closed`); `None`: held by this process
    /// only (`open`), and whatever an earlier agent pinned there is unpinned once attached.
    pub pins: Option<PathBuf>,
    /// Where pins of an earlier agent may be (the configured `bpffs_dir`, both modes).
    pub pin_dir: PathBuf,
    /// Mixed into the layout id (tests).
    pub layout_salt: String,
}

/// Every map the agent shares with the programs: pinned by name under `maps/<layout>/`.
const MAPS: &[&str] = &[
    MAP_ENDPOINTS,
    MAP_LOCAL_PORTS,
    MAP_ENDPOINT_PORTS,
    MAP_LISTEN_PORTS,
    MAP_LOCAL_ADDRS,
    MAP_NETNS,
    MAP_AGENT_CGROUPS,
    MAP_BY_COOKIE,
    MAP_BY_TUPLE,
    MAP_BY_SOCKET,
    MAP_EVENTS,
    MAP_EVENT_SEEN,
    MAP_CONFIG,
];

/// The cgroup/sock_addr programs, attached at the attach point.
const SOCK_ADDR_PROGRAMS: &[&str] = &[
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    PROG_BIND4,
    PROG_BIND6,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
];

/// What [`Redirector::attach`] did.
#[derive(Debug, Default)]
pub struct Attached {
    /// Links an earlier agent pinned that now run this agent's programs (swapped in place).
    pub updated: usize,
    /// Links made now.
    pub created: usize,
    /// Pinned links no longer wanted (another attach point, a program gone), unpinned.
    pub unpinned: usize,
    /// The map layout in use, and whether its pinned maps were adopted from an earlier agent.
    pub layout: String,
    pub maps_adopted: bool,
    /// Map layouts of earlier builds, unpinned.
    pub old_layouts: Vec<String>,
}

/// The loaded, attached programs and the maps the agent talks to.
pub struct Redirector {
    /// Owns the programs, and under `failure_mode: open` their links (dropping it detaches
    /// them); under `closed` the links are pinned.
    ebpf: Mutex<Ebpf>,
    settings: Settings,
    layout: String,
    maps_adopted: bool,
    /// Namespaces an earlier agent served (found in a pinned `NETNS`), not served again yet.
    inherited_netns: Mutex<BTreeSet<u64>>,
    endpoints: Mutex<Endpoints>,
    local_addrs: Mutex<LocalAddrs>,
    netns: Mutex<Served>,
    by_socket: Mutex<HashMap<MapData, u64, ConnRecord>>,
    events: Mutex<Option<RingBuf<MapData>>>,
    /// Whether `AF_PACKET` sockets are refused (the BPF LSM is active).
    packet_guard: bool,
}

/// `ENDPOINTS`, `LOCAL_PORTS`, and `ENDPOINT_PORTS` (every port of either, as written).
struct Endpoints {
    exact: HashMap<MapData, SockKey, EndpointValue>,
    local: HashMap<MapData, u32, EndpointValue>,
    ports: Array<MapData, u32>,
    ports_written: BTreeSet<u16>,
}

/// `NETNS`, and `LISTEN_PORTS` with how many namespaces listen on each port.
struct Served {
    map: HashMap<MapData, u64, Listeners>,
    ports: Array<MapData, u32>,
    listeners: StdHashMap<u64, Listeners>,
    port_users: StdHashMap<u16, usize>,
}

impl Served {
    fn ports_of(l: &Listeners) -> impl Iterator<Item = u16> {
        [l.v4_port, l.v6_port].into_iter().filter(|p| *p != 0)
    }

    /// Count `l`'s ports in (`up`) or out, and mark in `LISTEN_PORTS` those now used by some
    /// namespace or by none.
    fn count(&mut self, l: &Listeners, up: bool) -> Result<()> {
        for port in Self::ports_of(l) {
            let users = self.port_users.entry(port).or_insert(0);
            if up {
                *users += 1;
            } else {
                *users = users.saturating_sub(1);
            }
            let used = *users > 0;
            if !used {
                self.port_users.remove(&port);
            }
            self.ports
                .set(u32::from(port), u32::from(used), 0)
                .context("updating the listen ports")?;
        }
        Ok(())
    }
}

/// `LOCAL_ADDRS` and what this agent wrote there per namespace, so that an update is a diff.
struct LocalAddrs {
    map: HashMap<MapData, NetnsAddr, u32>,
    written: StdHashMap<u64, BTreeSet<[u32; 4]>>,
}

impl Redirector {
    /// Load the programs against their maps and configure them; nothing is attached yet
    /// ([`Redirector::attach`] does, once the endpoints and namespaces are in the maps). Under
    /// `failure_mode: closed` the maps pinned by an earlier agent of the same layout are
    /// adopted, with what they hold (endpoints, namespaces, records of connections in flight).
    pub fn load(settings: &Settings) -> Result<Self> {
        check_kernel()?;
        let layout = pin::layout_id(EBPF_OBJECT, MAPS, &settings.layout_salt)?;
        let mut loader = EbpfLoader::new();
        let mut maps_adopted = false;
        let map_paths: Vec<(&str, PathBuf)>;
        if let Some(dir) = &settings.pins {
            let pins = PinDir::new(dir);
            pins.prepare()?;
            let maps_dir = pins.maps_dir(&layout);
            maps_adopted = maps_dir.exists();
            std::fs::create_dir_all(&maps_dir)
                .with_context(|| format!("creating {}", maps_dir.display()))?;
            map_paths = MAPS.iter().map(|m| (*m, maps_dir.join(m))).collect();
            for (name, path) in &map_paths {
                loader.map_pin_path(name, path.as_path());
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;

        let config = ProxyConfig {
            host_netns: settings.host_netns,
            guard_v4_port: settings.guard_ports.0,
            guard_v6_port: settings.guard_ports.1,
            flags: if settings.raw_sockets_allowed {
                CFG_RAW_ALLOW
            } else {
                0
            },
        };
        let mut config_map: Array<_, ProxyConfig> =
            Array::try_from(take_map(&mut ebpf, MAP_CONFIG)?)?;
        config_map
            .set(0, config, 0)
            .context("writing the redirect config")?;
        let mut agents: HashMap<_, u64, u32> =
            HashMap::try_from(take_map(&mut ebpf, MAP_AGENT_CGROUPS)?)?;
        // This agent's cgroup, and those of agents still running (a hand-over: the previous
        // agent dials upstream until it has drained); cgroups that are gone are dropped.
        let mut keep = BTreeMap::from([(settings.agent_cgroup.1, 0u32)]);
        let existing: Vec<u64> = agents.keys().filter_map(|k| k.ok()).collect();
        if !existing.is_empty() {
            let live = match cgroup::cgroup2_mount() {
                Ok(mount) => cgroup::ids_below(&mount),
                Err(_) => BTreeSet::new(),
            };
            keep.extend(
                existing
                    .into_iter()
                    .filter(|id| live.contains(id))
                    .map(|id| (id, 0u32)),
            );
        }
        sync_map(&mut agents, &keep).context("exempting the agent's cgroup")?;

        let exact: HashMap<MapData, SockKey, EndpointValue> =
            HashMap::try_from(take_map(&mut ebpf, MAP_ENDPOINTS)?)?;
        let local: HashMap<MapData, u32, EndpointValue> =
            HashMap::try_from(take_map(&mut ebpf, MAP_LOCAL_PORTS)?)?;
        // Adopted maps: the ports marked are those of the endpoints already there.
        let ports_written: BTreeSet<u16> = exact
            .keys()
            .filter_map(|k| k.ok().map(|k| k.port))
            .chain(
                local
                    .keys()
                    .filter_map(|k| k.ok().and_then(|p| u16::try_from(p).ok())),
            )
            .collect();
        let endpoints = Endpoints {
            exact,
            local,
            ports: Array::try_from(take_map(&mut ebpf, MAP_ENDPOINT_PORTS)?)?,
            ports_written,
        };
        let local_addrs: HashMap<MapData, NetnsAddr, u32> =
            HashMap::try_from(take_map(&mut ebpf, MAP_LOCAL_ADDRS)?)?;
        let mut written: StdHashMap<u64, BTreeSet<[u32; 4]>> = StdHashMap::new();
        for key in local_addrs.keys().filter_map(|k| k.ok()) {
            written.entry(key.netns).or_default().insert(key.addr);
        }
        let mut netns = Served {
            map: HashMap::try_from(take_map(&mut ebpf, MAP_NETNS)?)?,
            ports: Array::try_from(take_map(&mut ebpf, MAP_LISTEN_PORTS)?)?,
            listeners: StdHashMap::new(),
            port_users: StdHashMap::new(),
        };
        let inherited: Vec<(u64, Listeners)> = netns.map.iter().filter_map(|e| e.ok()).collect();
        for (cookie, l) in &inherited {
            netns.count(l, true)?;
            netns.listeners.insert(*cookie, *l);
        }
        let by_socket = HashMap::try_from(take_map(&mut ebpf, MAP_BY_SOCKET)?)?;
        let events = RingBuf::try_from(take_map(&mut ebpf, MAP_EVENTS)?)?;

        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().with_context(|| format!("loading {name}"))?;
        }
        let prog: &mut CgroupSock = program(&mut ebpf, PROG_SOCK_CREATE)?;
        prog.load()
            .with_context(|| format!("loading {PROG_SOCK_CREATE}"))?;
        let prog: &mut SockOps = program(&mut ebpf, PROG_SOCK_OPS)?;
        prog.load()
            .with_context(|| format!("loading {PROG_SOCK_OPS}"))?;
        let packet_guard = !settings.raw_sockets_allowed && load_packet_guard(&mut ebpf);

        Ok(Redirector {
            ebpf: Mutex::new(ebpf),
            settings: settings.clone(),
            layout,
            maps_adopted,
            inherited_netns: Mutex::new(inherited.iter().map(|(c, _)| *c).collect()),
            endpoints: Mutex::new(endpoints),
            local_addrs: Mutex::new(LocalAddrs {
                map: local_addrs,
                written,
            }),
            netns: Mutex::new(netns),
            by_socket: Mutex::new(by_socket),
            events: Mutex::new(Some(events)),
            packet_guard,
        })
    }

    /// Attach every program: a link pinned by an earlier agent is made to run this agent's
    /// program in one atomic swap (`BPF_LINK_UPDATE`), so its cgroup is never without one;
    /// other links are created (and pinned, `failure_mode: closed`). Then the pins this agent
    /// does not use — links elsewhere, maps of another layout — are removed (under `open`,
    /// every pin: nothing outlives this agent).
    pub fn attach(&self) -> Result<Attached> {
        let settings = &self.settings;
        let mut ebpf = lock(&self.ebpf)?;
        let pins = settings.pins.as_deref().map(PinDir::new);
        let attach = &settings.attach;
        let attach_id = cgroup::id_of(attach)?;
        let cgroup_file = std::fs::File::open(attach)
            .with_context(|| format!("opening cgroup {}", attach.display()))?;
        let mut wanted: Vec<(&std::fs::File, &Path, u64, &str)> = Vec::new();
        for name in SOCK_ADDR_PROGRAMS
            .iter()
            .chain([&PROG_SOCK_CREATE, &PROG_SOCK_OPS])
        {
            wanted.push((&cgroup_file, attach, attach_id, name));
        }
        if self.packet_guard {
            wanted.push((&cgroup_file, attach, attach_id, PROG_PACKET_CREATE));
        }
        // sock_ops runs for the clients' sockets below the attach point and for the
        // interceptor's accepted sockets, which belong to the agent's cgroup (a socket accepted
        // from a listener is in the listener's cgroup): attached there too unless the attach
        // point covers it.
        let (agent_path, agent_id) = &settings.agent_cgroup;
        let agent_file;
        if !agent_path.starts_with(attach) {
            agent_file = std::fs::File::open(agent_path)
                .with_context(|| format!("opening cgroup {}", agent_path.display()))?;
            wanted.push((&agent_file, agent_path, *agent_id, PROG_SOCK_OPS));
        }

        let mut done = Attached {
            layout: self.layout.clone(),
            maps_adopted: self.maps_adopted,
            ..Attached::default()
        };
        let mut kept: BTreeSet<PathBuf> = BTreeSet::new();
        for (file, path, id, name) in &wanted {
            let pinned = pins.as_ref().map(|p| p.link_path(*id, name));
            if let Some(link_path) = pinned.as_ref().filter(|p| p.exists()) {
                let link = pin::obj_get(link_path)
                    .with_context(|| format!("opening the pinned link {}", link_path.display()))?;
                let prog = ebpf
                    .program(name)
                    .ok_or_else(|| anyhow::anyhow!("the eBPF object has no program {name}"))?
                    .fd()
                    .with_context(|| format!("{name} is not loaded"))?;
                pin::link_update(link.as_fd(), prog.as_fd()).with_context(|| {
                    format!("swapping {name} in the pinned link {}", link_path.display())
                })?;
                kept.insert(link_path.clone());
                done.updated += 1;
                continue;
            }
            let link = attach_program(&mut ebpf, name, file, pinned.is_some())
                .with_context(|| format!("attaching {name} to {}", path.display()))?;
            if let (Some(link), Some(link_path)) = (link, pinned) {
                if let Some(dir) = link_path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                // The pin holds the link from now on; this descriptor closes.
                link.pin(&link_path)
                    .with_context(|| format!("pinning {}", link_path.display()))?;
                kept.insert(link_path);
            }
            done.created += 1;
        }

        // What an earlier agent pinned and this one does not use.
        let earlier = PinDir::new(&settings.pin_dir);
        for (_, _, path) in earlier.links() {
            if !kept.contains(&path) {
                earlier.remove_link(&path)?;
                done.unpinned += 1;
            }
        }
        for layout in earlier.layouts() {
            if pins.is_none() || layout != self.layout {
                earlier.remove_layout(&layout)?;
                done.old_layouts.push(layout);
            }
        }
        Ok(done)
    }

    /// Namespaces an earlier agent served that this one has not served again by now are
    /// dropped from the maps (their connects fail as unprepared, and are prepared, from now on).
    pub fn forget_inherited_netns(&self) -> Result<Vec<u64>> {
        let stale: Vec<u64> = std::mem::take(&mut *lock(&self.inherited_netns)?)
            .into_iter()
            .collect();
        for cookie in &stale {
            self.unserve_netns(*cookie)?;
        }
        Ok(stale)
    }

    /// The cgroup the programs are attached to.
    pub fn attach_point(&self) -> &Path {
        &self.settings.attach
    }

    /// Whether `AF_PACKET` sockets are refused below the attach point.
    pub fn packet_guard(&self) -> bool {
        self.packet_guard
    }

    /// Make the endpoint maps hold exactly `exact` (destinations) and `local` (ports of local
    /// endpoints), and `ENDPOINT_PORTS` every port of either. New ports are marked before the
    /// entries that need them, and a port is unmarked only after its entries are gone.
    pub fn set_endpoints(
        &self,
        exact: &BTreeMap<SockKey, EndpointValue>,
        local: &BTreeMap<u16, EndpointValue>,
    ) -> Result<()> {
        let mut e = lock(&self.endpoints)?;
        let ports: BTreeSet<u16> = exact
            .keys()
            .map(|k| k.port)
            .chain(local.keys().copied())
            .collect();
        for port in ports.difference(&e.ports_written.clone()) {
            e.ports
                .set(u32::from(*port), 1, 0)
                .context("marking an endpoint port")?;
        }
        sync_map(&mut e.exact, exact).context("updating the endpoint map")?;
        let local: BTreeMap<u32, EndpointValue> =
            local.iter().map(|(p, v)| (u32::from(*p), *v)).collect();
        sync_map(&mut e.local, &local).context("updating the local endpoint ports")?;
        for port in e.ports_written.clone().difference(&ports) {
            e.ports
                .set(u32::from(*port), 0, 0)
                .context("unmarking an endpoint port")?;
        }
        e.ports_written = ports;
        Ok(())
    }

    /// From now on, connections in namespace `cookie` are redirected to `listeners` there.
    pub fn serve_netns(&self, cookie: u64, listeners: Listeners) -> Result<()> {
        lock(&self.inherited_netns)?.remove(&cookie);
        let mut served = lock(&self.netns)?;
        served.count(&listeners, true)?;
        if let Some(old) = served.listeners.insert(cookie, listeners) {
            served.count(&old, false)?;
        }
        served
            .map
            .insert(cookie, listeners, 0)
            .context("adding a network namespace")
    }

    /// Namespace `cookie` is served no more: its connects to endpoints fail from now on, and its
    /// addresses are forgotten.
    pub fn unserve_netns(&self, cookie: u64) -> Result<()> {
        {
            let mut served = lock(&self.netns)?;
            match served.map.remove(&cookie) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing a network namespace"),
            }
            if let Some(old) = served.listeners.remove(&cookie) {
                served.count(&old, false)?;
            }
        }
        self.set_local_addrs(cookie, &BTreeSet::new())
    }

    /// The namespaces served now, with their listeners.
    /// The names of the programs loaded (and attached once [`Redirector::attach`] returned).
    pub fn program_names(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.ebpf)
            .map(|e| {
                e.programs()
                    .map(|(name, _)| name.to_owned())
                    // Loaded only where the kernel can run it (BPF LSM).
                    .filter(|name| self.packet_guard || name != PROG_PACKET_CREATE)
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The map layout in use, and whether it is pinned (`failure_mode: closed`).
    pub fn layout(&self) -> (&str, bool) {
        (&self.layout, self.settings.pins.is_some())
    }

    /// `(map, entries, max_entries)` of the maps the agent holds. The entries are counted on a
    /// duplicate of each map's descriptor, after its lock is released: a scrape never holds up
    /// an accept.
    pub fn occupancy(&self) -> Vec<(&'static str, u64, u64)> {
        use aya::maps::IterableMap;
        let dup = |m: &MapData| m.fd().as_fd().try_clone_to_owned().ok();
        // The descriptors under the locks; the walks after them.
        let (endpoints, local_ports) = match lock(&self.endpoints) {
            Ok(e) => (dup(e.exact.map()), dup(e.local.map())),
            Err(_) => (None, None),
        };
        let local_addrs = lock(&self.local_addrs).ok().and_then(|l| dup(l.map.map()));
        let netns = lock(&self.netns).ok().and_then(|n| dup(n.map.map()));
        let by_socket = lock(&self.by_socket).ok().and_then(|m| dup(m.map()));
        [
            (
                MAP_ENDPOINTS,
                count_keys::<SockKey, EndpointValue>(endpoints, MAX_ENDPOINTS),
            ),
            (
                MAP_LOCAL_PORTS,
                count_keys::<u32, EndpointValue>(local_ports, MAX_LOCAL_PORTS),
            ),
            (
                MAP_LOCAL_ADDRS,
                count_keys::<NetnsAddr, u32>(local_addrs, MAX_LOCAL_ADDRS),
            ),
            (MAP_NETNS, count_keys::<u64, Listeners>(netns, MAX_NETNS)),
            (
                MAP_BY_SOCKET,
                count_keys::<u64, ConnRecord>(by_socket, MAX_CONNECTIONS),
            ),
        ]
        .into_iter()
        .filter_map(|(name, counted)| counted.map(|(n, max)| (name, n, max)))
        .collect()
    }

    pub fn served_netns(&self) -> Vec<(u64, Listeners)> {
        lock(&self.netns)
            .map(|m| m.listeners.iter().map(|(c, l)| (*c, *l)).collect())
            .unwrap_or_default()
    }

    /// Make `LOCAL_ADDRS` hold exactly `addrs` for namespace `cookie`.
    pub fn set_local_addrs(&self, cookie: u64, addrs: &BTreeSet<IpAddr>) -> Result<()> {
        let addrs: BTreeSet<[u32; 4]> = addrs
            .iter()
            .map(|ip| SockKey::from_socket_addr(SocketAddr::new(*ip, 0)).addr)
            .collect();
        let addrs = &addrs;
        let mut guard = lock(&self.local_addrs)?;
        let LocalAddrs { map, written } = &mut *guard;
        let had = written.remove(&cookie).unwrap_or_default();
        for addr in had.difference(addrs) {
            let _ = map.remove(&NetnsAddr {
                netns: cookie,
                addr: *addr,
            });
        }
        for addr in addrs.difference(&had) {
            map.insert(
                NetnsAddr {
                    netns: cookie,
                    addr: *addr,
                },
                0,
                0,
            )
            .context("adding a local address")?;
        }
        if !addrs.is_empty() {
            written.insert(cookie, addrs.clone());
        }
        Ok(())
    }

    /// Whether a connect to `dst` from namespace `netns` (`host`: the host's) is one the
    /// programs redirect: what `connect4/6` decide, read from the same maps.
    pub fn is_endpoint(&self, netns: u64, host: bool, dst: SocketAddr) -> bool {
        let key = SockKey::from_socket_addr(dst);
        let want = if host { SCOPE_HOST } else { SCOPE_PODS };
        let Ok(e) = lock(&self.endpoints) else {
            return false;
        };
        if e.exact.get(&key, 0).is_ok_and(|v| v.scope & want != 0) {
            return true;
        }
        let Ok(local) = e.local.get(&u32::from(dst.port()), 0) else {
            return false;
        };
        if local.scope & want == 0 {
            return false;
        }
        key.is_self()
            || lock(&self.local_addrs).is_ok_and(|l| {
                l.map
                    .get(
                        &NetnsAddr {
                            netns,
                            addr: key.addr,
                        },
                        0,
                    )
                    .is_ok()
            })
    }

    /// The record of the accepted connection `socket`, removed from the map: each accepted
    /// connection consumes the record made for it, keyed by the accepted socket's own cookie
    /// (`SO_COOKIE`), so no other connection can claim it. None when the connection was not
    /// redirected — someone dialled the interceptor directly. A map look-up only: names are
    /// resolved later, off the accept thread (`identity`).
    pub fn take(&self, socket: &impl AsFd) -> Option<Redirected> {
        let cookie = socket_cookie(socket).ok()?;
        let rec = {
            let mut map = self.by_socket.lock().ok()?;
            let rec = map.get(&cookie, 0).ok()?;
            // Already read: losing the delete only leaves an LRU entry behind.
            let _ = map.remove(&cookie);
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
                netns: rec.netns,
            },
            local: rec.flags & REC_LOCAL != 0,
        })
    }

    /// The kernel's event ring buffer; there is one reader, so this is Some once.
    pub fn take_events(&self) -> Option<events::Events> {
        self.events
            .lock()
            .ok()
            .and_then(|mut e| e.take())
            .map(events::Events::new)
    }
}

/// Load the `lsm_cgroup/socket_create` program that refuses `AF_PACKET` sockets below the
/// attach point (cgroup/sock_create only sees inet sockets). This needs the BPF LSM to be active
/// (`bpf` in the kernel's `lsm=` list); without it the program would attach and never run, so it
/// is not loaded and the agent says so. Returns whether packet sockets will be refused.
fn load_packet_guard(ebpf: &mut Ebpf) -> bool {
    match bpf_lsm_active() {
        Some(true) => {}
        Some(false) => {
            tracing::warn!(
                "the BPF LSM is not active on this kernel (add `bpf` to the lsm= boot parameter): \
                 AF_PACKET sockets below the attach point are NOT refused, and a workload with \
                 NET_RAW can send packets around the redirect (SOCK_RAW sockets are refused)"
            );
            return false;
        }
        None => {
            tracing::warn!(
                "cannot tell whether the BPF LSM is active (/sys/kernel/security/lsm unreadable): \
                 AF_PACKET sockets below the attach point are NOT refused"
            );
            return false;
        }
    }
    let loaded = (|| -> Result<()> {
        let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let prog: &mut LsmCgroup = program(ebpf, PROG_PACKET_CREATE)?;
        prog.load("socket_create", &btf)
            .with_context(|| format!("loading {PROG_PACKET_CREATE}"))?;
        Ok(())
    })();
    match loaded {
        Ok(()) => true,
        Err(e) => {
            // Kernels without BPF trampolines (no LSM, fentry or fexit programs) refuse the load.
            tracing::warn!(
                error = %format!("{e:#}"),
                "the AF_PACKET guard (an lsm_cgroup program) cannot run on this kernel: AF_PACKET \
                 sockets below the attach point are NOT refused, and a workload with NET_RAW can \
                 send packets around the redirect (SOCK_RAW sockets are refused)"
            );
            false
        }
    }
}

/// Attach the loaded program `name` to `cgroup` with a bpf_link. `take`: the link is handed
/// back (to be pinned); otherwise the `Ebpf` keeps it and dropping that detaches it.
fn attach_program(
    ebpf: &mut Ebpf,
    name: &str,
    cgroup: &std::fs::File,
    take: bool,
) -> Result<Option<FdLink>> {
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow::anyhow!("the eBPF object has no program {name}"))?;
    // Cgroup bpf_links are multi-attach by nature: each link is one more program in the
    // cgroup's effective array, next to whatever else (Cilium, Istio) is attached there.
    // `Single` is what bpf_link_create accepts for that (AllowMultiple gives EINVAL).
    // The three program types differ only in their link types.
    macro_rules! attach_single {
        ($p:expr) => {{
            let id = $p.attach(cgroup, CgroupAttachMode::Single)?;
            take.then(|| $p.take_link(id))
                .transpose()?
                .map(FdLink::try_from)
                .transpose()?
        }};
    }
    let link: Option<FdLink> = match prog {
        Program::CgroupSockAddr(p) => attach_single!(p),
        Program::CgroupSock(p) => attach_single!(p),
        Program::SockOps(p) => attach_single!(p),
        Program::LsmCgroup(p) => {
            let id = p.attach(cgroup)?;
            take.then(|| p.take_link(id)).transpose()?.map(FdLink::from)
        }
        _ => bail!("{name} is not a cgroup program"),
    };
    Ok(link)
}

/// Whether `bpf` is among the active LSMs. securityfs is mounted if it is not yet (systemd
/// does this at boot; a bare host or container may not have).
fn bpf_lsm_active() -> Option<bool> {
    const LSM: &str = "/sys/kernel/security/lsm";
    let read = || std::fs::read_to_string(LSM).ok();
    let list = read().or_else(|| {
        // The syscall, not mount(8): the agent's image has no mount binary.
        // SAFETY: NUL-terminated strings that outlive the call; no data argument.
        let rc = unsafe {
            libc::mount(
                c"securityfs".as_ptr(),
                c"/sys/kernel/security".as_ptr(),
                c"securityfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        (rc == 0).then(read).flatten()
    })?;
    Some(list.trim().split(',').any(|m| m == "bpf"))
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| anyhow::anyhow!("an eBPF map's lock is poisoned"))
}

/// Make a hash map hold exactly `want`.
fn sync_map<K, V>(map: &mut HashMap<MapData, K, V>, want: &BTreeMap<K, V>) -> Result<()>
where
    K: aya::Pod + Ord,
    V: aya::Pod,
{
    let have: Vec<K> = map.keys().filter_map(|k| k.ok()).collect();
    for key in have.iter().filter(|k| !want.contains_key(k)) {
        map.remove(key)?;
    }
    for (key, value) in want {
        map.insert(*key, *value, 0)?;
    }
    Ok(())
}

/// The cookie of the network namespace `socket` lives in (`SO_NETNS_COOKIE`), the value
/// `bpf_get_netns_cookie()` returns for sockets in that namespace.
/// How many keys the hash map `fd` holds (aya's key walk on a duplicate of its descriptor), at
/// most `max`; with `max`.
fn count_keys<K: aya::Pod, V: aya::Pod>(
    fd: Option<std::os::fd::OwnedFd>,
    max: u32,
) -> Option<(u64, u64)> {
    let map = aya::maps::Map::from_map_data(MapData::from_fd(fd?).ok()?).ok()?;
    let map = HashMap::<MapData, K, V>::try_from(map).ok()?;
    let n = map.keys().take(max as usize).filter(Result::is_ok).count();
    Some((n as u64, u64::from(max)))
}

pub fn netns_cookie(socket: &impl AsFd) -> Result<u64> {
    getsockopt_u64(socket, libc::SO_NETNS_COOKIE)
        .context("reading the network namespace cookie (SO_NETNS_COOKIE)")
}

/// The socket's cookie (`SO_COOKIE`), what `bpf_get_socket_cookie()` returns for it.
pub fn socket_cookie(socket: &impl AsFd) -> std::io::Result<u64> {
    getsockopt_u64(socket, libc::SO_COOKIE)
}

fn getsockopt_u64(socket: &impl AsFd, opt: libc::c_int) -> std::io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// The listeners of one namespace as the programs see them.
pub fn listeners(v4: Option<SocketAddrV4>, v6: Option<SocketAddrV6>) -> Listeners {
    Listeners {
        v4_addr: v4.map(|a| u32::from_ne_bytes(a.ip().octets())).unwrap_or(0),
        v4_port: v4.map(|a| a.port()).unwrap_or(0),
        v6_port: v6.map(|a| a.port()).unwrap_or(0),
        v6_addr: v6
            .map(|a| SockKey::from_octets(a.ip().octets(), 0).addr)
            .unwrap_or([0; 4]),
    }
}

pub(crate) fn comm_str(comm: &[u8; 16]) -> String {
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
