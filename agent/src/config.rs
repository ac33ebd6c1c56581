//! The agent's configuration: a YAML file (`--config`), with command-line flags on top.
//!
//! ```yaml
//! listen: ["127.0.0.1:15001", "[::1]:15001"]   # the interceptor; at most one IPv4 and one IPv6
//! audit: /var/log/mcpwarden/audit.jsonl        # or "-" for standard output (the default); or:
//! # audit:
//! #   path: /var/log/mcpwarden/audit.jsonl     # reopened on SIGUSR1, and when renamed or removed
//! #   stall_ms: 1000                           # how long a record waits for the sink (a full
//! #                                            # disk, a pipe/FIFO whose reader stopped)
//! #   on_stall: deny                           # then: deny (its call gets 503, nothing is
//! #                                            # forwarded) or allow (forwarded; the record goes
//! #                                            # to standard error: the file lacks it)
//! #   rotate: {max_bytes: 104857600, keep: 5}  # optional built-in rotation: PATH.1 … PATH.5
//! #   redact_keys: [password, token, secret, key, authorization]  # (the default) for
//! #                                            # log_arguments: keys containing one of these,
//! #                                            # case-insensitively, are written "[redacted]"
//! cgroup: kubepods.slice                       # where to attach: relative to the cgroup2 mount,
//!                                              # or absolute below it (default: the mount root)
//! agent_cgroup: mcpwarden                      # the agent's own cgroup, never redirected: the
//!                                              # agent moves there; `self`: it stays where it
//!                                              # was started (a container), alone in that cgroup
//! netns_dirs: [/run/netns, /var/run/docker/netns]  # where runtimes pin network namespaces
//!                                              # (watched: each is served from its creation)
//! raw_sockets: deny                            # or allow: SOCK_RAW/AF_PACKET below the attach
//!                                              # point (they can send around the redirect)
//! failure_mode: closed                         # or open: when the agent stops, its programs
//!                                              # stay attached (redirected connects are refused
//!                                              # until an agent serves again) or are detached
//!                                              # (calls go straight to the servers, uninspected)
//! bpffs_dir: /sys/fs/bpf/mcpwarden             # where programs' links and maps are pinned
//! drain_seconds: 30                            # after handing over to a new agent: how long
//!                                              # connections still open may finish
//! max_body_bytes: 4194304
//! workers: 2                                   # interceptor threads (default: one per CPU)
//! state_dir: /var/lib/mcpwarden                # the generated CA lives here
//! tls_prewarm: true                            # probe https servers and mint their leaves at start
//! ca:                                          # optional: an existing CA instead (e.g. a Secret)
//!   cert: /etc/mcpwarden/ca/${NODE_NAME}.crt   # the signing CA first, then the chain above it up
//!                                              # to the root workloads trust (README, "The CA in
//!                                              # a cluster"); ${NODE_NAME}: the NODE_NAME
//!                                              # environment variable (a per-node intermediate)
//!   key: /etc/mcpwarden/ca/${NODE_NAME}.key
//!   allow_unconstrained: false                 # true: accept a CA from files without X.509 name
//!                                              # constraints (refused by default: make one with
//!                                              # `mcpwarden ca init --name-constraints-from`);
//!                                              # constraints it has must cover every endpoint
//!   name_constraints: false                    # generated CAs only: limit it to the endpoints
//!   next:                                      # rotation: this CA signs from `from` on
//!     cert: /etc/mcpwarden/next/tls.crt
//!     key: /etc/mcpwarden/next/tls.key
//!     from: 2026-12-01T00:00:00Z
//! servers:
//!   - name: tools
//!     url: http://10.0.0.5:8080/mcp
//!     policy: policy.json                      # relative to this file
//!   - name: remote
//!     url: https://mcp.example.com/mcp
//!     policy: policy.json
//!     upstream_ca: internal-ca.pem             # trusted for this server, besides system roots
//!     tls: terminate                           # or passthrough: forwarded untouched, not inspected
//!     passthrough_paths: [/oauth/token, /healthz]  # non-JSON-RPC bodies forwarded here only
//!     log_arguments: false                     # true: its calls' records carry `arguments`,
//!                                              # redacted (audit.redact_keys)
//!     scope: all                               # host | pods | all: which network namespaces
//!                                              # the address means (default: host for loopback
//!                                              # and unspecified addresses, all otherwise)
//! identity_wait_ms: 500                        # how long a call waits for its pod's metadata
//! admin:                                       # the admin socket (status, reload, explain)
//!   socket: /run/mcpwarden/admin.sock          # mode 0660, owner root
//!   group: mcpwarden-admin                     # its group: members may use it (name or gid;
//!                                              # default: root only)
//! metrics:
//!   listen: 127.0.0.1:9478                     # /metrics, /healthz, /readyz; `off`: none
//! approvals:                                   # calls held by `action: require_approval`
//!   timeout_s: 45                              # refused "approval timed out" after (a rule's
//!                                              # approval.timeout wins)
//!   max_pending: 64                            # held calls on the node; past it, refused
//!   max_pending_per_caller: 4                  # per pod (or cgroup outside pods)
//!   webhook_url: https://hooks.example/mcpw    # optional: each pending approval POSTed, signed
//!   webhook_secret_file: /etc/mcpwarden/webhook.secret  # the HMAC key (never logged)
//!   webhook_ca_file: /etc/mcpwarden/hooks-ca.pem        # optional: trusted for the webhook
//! kubernetes:                                  # pod identity, Services' backends, the taint
//!   enabled: auto                              # auto: with a kubeconfig, or in a pod; true; false
//!   kubeconfig: /etc/mcpwarden/kubeconfig      # default: the pod's service account
//!   node_name: node-a                          # default: $NODE_NAME, then the host name
//!   deleted_pod_grace_s: 60                    # a deleted pod's late calls are still its own
//!   remove_taint: mcpwarden.io/agent-not-ready # removed from this node once ready; "": none
//!   approvals_namespace: mcpwarden             # Approval resources; default: the agent pod's
//! limits:                                      # see the README's table; all optional
//!   header_read_timeout_ms: 30000
//!   idle_timeout_ms: 600000                    # 0: off
//!   max_connections_per_caller: 1000
//! bindings:                                    # first match wins; else the server's `policy`
//!   - match: {namespace: payments, labels: {app: agent}, server: tools}
//!     policy: payments.json
//!   - match: {cgroup: "/system.slice/ci-*.scope", uid: 1000, comm: python3}
//!     policy: ci.yaml
//! ```
//! The policy files and this file are watched and reloaded on change and on SIGHUP.
//! Unknown keys and bad values are errors naming the file, line and column.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer};

use crate::{
    ca::{CaFiles, CaSettings, NextCa, DEFAULT_STATE_DIR},
    mcp,
};

pub const DEFAULT_LISTEN: [&str; 2] = ["127.0.0.1:15001", "[::1]:15001"];
pub const DEFAULT_AGENT_CGROUP: &str = "mcpwarden";
/// `agent_cgroup: self`: stay in the cgroup the agent was started in.
pub const AGENT_CGROUP_SELF: &str = "self";
/// Where container runtimes and `ip netns` pin network namespaces (`/var/run` is usually
/// `/run`; duplicates are dropped once resolved).
pub const DEFAULT_NETNS_DIRS: [&str; 3] = ["/run/netns", "/var/run/netns", "/var/run/docker/netns"];

/// An MCP endpoint URL, validated: `http(s)://host[:port]/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl {
    pub raw: String,
    /// `https://`
    pub https: bool,
    /// A DNS name or an IP literal (without brackets).
    pub host: String,
    pub port: u16,
    /// Normalised path (see [`mcp::normalize_path`]).
    pub path: String,
}

impl EndpointUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let uri: http::Uri = raw
            .parse()
            .map_err(|e| format!("invalid URL {raw:?}: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(format!(
                    "{raw:?}: an endpoint URL starts with http:// or https://"
                ))
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{raw:?}: the URL has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "{raw:?}: credentials in endpoint URLs are not accepted"
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(format!("{raw:?}: the URL has no host"));
        }
        Ok(EndpointUrl {
            raw: raw.to_owned(),
            https,
            host,
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
            path: mcp::normalize_path(uri.path()),
        })
    }
}

impl<'de> Deserialize<'de> for EndpointUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        EndpointUrl::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// The other spellings of a Kubernetes Service host, lower case: `SVC.NS.svc.cluster.local` is
/// also reached as `SVC.NS` and `SVC.NS.svc` (the pod's DNS search path), and `SVC.NS.svc` as
/// `SVC.NS` and `SVC.NS.svc.cluster.local`. Any other host has none.
pub fn host_aliases(host: &str) -> Vec<String> {
    let host = host.to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    match labels.as_slice() {
        [svc, ns, "svc", "cluster", "local"] if !svc.is_empty() && !ns.is_empty() => {
            vec![format!("{svc}.{ns}"), format!("{svc}.{ns}.svc")]
        }
        [svc, ns, "svc"] if !svc.is_empty() && !ns.is_empty() => {
            vec![
                format!("{svc}.{ns}"),
                format!("{svc}.{ns}.svc.cluster.local"),
            ]
        }
        _ => Vec::new(),
    }
}

/// What the interceptor does with an `https://` server's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Terminate with a minted leaf, inspect, re-encrypt to the server (the default).
    #[default]
    Terminate,
    /// Forward the encrypted bytes untouched; audited per connection only, never inspected.
    Passthrough,
}

pub use crate::redirect::resolve::Scope;

/// Whether raw sockets (`SOCK_RAW`, `AF_PACKET`) may be opened below the attach point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RawSockets {
    /// Refused (the default): a raw socket can send packets around the redirect.
    #[default]
    Deny,
    /// Allowed, and not inspected.
    Allow,
}

/// What workloads get while no agent serves: refused connections (the programs stay attached,
/// pinned in bpffs) or direct, uninspected ones (the programs are detached with the agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// The default: links and maps are pinned and outlive the agent; a redirected connect fails
    /// at once (ECONNREFUSED) while no interceptor listens.
    #[default]
    Closed,
    /// Links are held by the agent's descriptors only: when it stops, for whatever reason, the
    /// programs detach and calls go straight to the servers, uninspected and unaudited.
    Open,
}

/// How long connections may finish after a hand-over, unless configured.
pub const DEFAULT_DRAIN_SECONDS: u64 = 30;

/// Where the pinned datapath lives unless configured.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/mcpwarden";

/// One MCP server under policy.
#[derive(Debug, Clone)]
pub struct Server {
    pub name: String,
    pub url: EndpointUrl,
    pub policy: PathBuf,
    /// `https://` servers only.
    pub tls: TlsMode,
    /// Extra roots (PEM) trusted for this server's certificate, besides the system's.
    pub upstream_ca: Option<PathBuf>,
    /// Paths (normalised; a trailing `*` matches any rest) where a request body that is not
    /// JSON-RPC is forwarded: OAuth endpoints, health checks. Elsewhere such a body is refused.
    pub passthrough_paths: Vec<String>,
    /// `scope`, when configured (the default depends on each address).
    pub scope: Option<Scope>,
    /// Its calls' records carry their arguments, redacted (`log_arguments`).
    pub log_arguments: bool,
}

/// The assembled configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub audit: PathBuf,
    /// How long a record may wait for the sink (`audit.stall_ms`).
    pub audit_stall: std::time::Duration,
    /// `audit.on_stall`, `audit.rotate`, `audit.redact_keys`.
    pub audit_options: crate::audit::Options,
    /// As given: absolute, or relative to the cgroup2 mount.
    pub cgroup: PathBuf,
    /// As given, or `self` ([`AGENT_CGROUP_SELF`]).
    pub agent_cgroup: PathBuf,
    /// Directories where network namespaces are pinned.
    pub netns_dirs: Vec<PathBuf>,
    pub raw_sockets: RawSockets,
    pub failure_mode: FailureMode,
    /// Where links and maps are pinned (a directory on a bpf filesystem).
    pub bpffs_dir: PathBuf,
    /// Mixed into the map layout id (`--layout-salt`, for tests only): a second build with a
    /// different map layout, without building one.
    pub layout_salt: String,
    /// After a hand-over, how long the connections still open may finish.
    pub drain: std::time::Duration,
    pub max_body_bytes: usize,
    /// Interceptor worker threads, each a single-threaded runtime serving its own connections.
    pub workers: usize,
    pub servers: Vec<Server>,
    /// Where the CA comes from (used when some server is `https://`).
    pub ca: CaSettings,
    /// Learn what each https origin speaks and mint its leaf at start (default), rather than on
    /// its first connection.
    pub tls_prewarm: bool,
    /// Which policy applies to which caller, in order; first match wins.
    pub bindings: Vec<BindingConfig>,
    /// How long a call waits for its caller's pod metadata when a binding needs it.
    pub identity_wait: std::time::Duration,
    pub limits: Limits,
    /// What the config was assembled from: a reload assembles it again from the same.
    pub flags: Flags,
    /// The admin socket and the metrics listener.
    pub operate: Operate,
    /// `kubernetes:`: pod identity, Services' backends, the node's not-ready taint.
    pub kubernetes: crate::k8s::Settings,
    /// `approvals:`: held calls' bounds and timeout, the webhook (`node` is filled at start).
    pub approvals: crate::approvals::Settings,
}

/// How the agent is operated: the admin socket and the metrics listener.
#[derive(Debug, Clone)]
pub struct Operate {
    pub admin_socket: PathBuf,
    /// The group whose members may use the admin socket besides root.
    pub admin_group: Option<u32>,
    /// `None`: no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for Operate {
    fn default() -> Self {
        Operate {
            admin_socket: PathBuf::from(crate::admin::DEFAULT_SOCKET),
            admin_group: None,
            metrics_listen: crate::admin::DEFAULT_METRICS_LISTEN.parse().ok(),
        }
    }
}

/// One entry of `bindings`.
#[derive(Debug, Clone)]
pub struct BindingConfig {
    pub selector: crate::policy::bindings::Selector,
    /// Relative paths are resolved against the config file's directory.
    pub policy: PathBuf,
}

/// The default `identity_wait_ms`.
pub const DEFAULT_IDENTITY_WAIT_MS: u64 = 500;

/// `limits:`: bounds on what one client can make the agent hold or write. Every field has a
/// default (README, "Limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// A request head (HTTP/1.1 request line and headers) must arrive within this many
    /// milliseconds of its first byte, else the connection is closed. An idle keep-alive
    /// connection is not reading a head: see `idle_timeout_ms`.
    pub header_read_timeout_ms: u64,
    /// A request body must arrive whole within this many milliseconds of its head (408).
    pub body_read_timeout_ms: u64,
    /// A connection with no request in flight and nothing from the client for this long is
    /// closed; 0 turns it off. A streaming response (an SSE stream) is a request in flight.
    pub idle_timeout_ms: u64,
    /// Connections served at once, all callers together; more are refused (503).
    pub max_connections: usize,
    /// Connections served at once for one caller (one cgroup); more are refused (503).
    pub max_connections_per_caller: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// Request body bytes one connection may hold buffered at once, over all its streams (503).
    pub max_buffered_bytes_per_connection: usize,
    /// Messages in one JSON-RPC batch (413).
    pub max_batch: usize,
    /// Answer bytes one worker thread may hold buffered at once (JSON answers are read whole
    /// before they are passed on), over all its connections (503).
    pub max_buffered_answer_bytes_per_worker: usize,
    /// Bytes of a request's path kept in its audit records (query values are always masked).
    pub audit_path_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout_ms: 30_000,
            body_read_timeout_ms: 30_000,
            idle_timeout_ms: 600_000,
            max_connections: 10_000,
            max_connections_per_caller: 1_000,
            h2_max_concurrent_streams: 100,
            max_buffered_bytes_per_connection: 16 * 1024 * 1024,
            max_batch: 100,
            max_buffered_answer_bytes_per_worker: 256 * 1024 * 1024,
            audit_path_bytes: 256,
        }
    }
}

impl Limits {
    fn validate(&self) -> Result<()> {
        let positive = [
            (
                "header_read_timeout_ms",
                usize::from(self.header_read_timeout_ms != 0),
            ),
            (
                "body_read_timeout_ms",
                usize::from(self.body_read_timeout_ms != 0),
            ),
            ("max_connections", self.max_connections),
            (
                "max_connections_per_caller",
                self.max_connections_per_caller,
            ),
            (
                "h2_max_concurrent_streams",
                usize::from(self.h2_max_concurrent_streams != 0),
            ),
            (
                "max_buffered_bytes_per_connection",
                self.max_buffered_bytes_per_connection,
            ),
            ("max_batch", self.max_batch),
            (
                "max_buffered_answer_bytes_per_worker",
                self.max_buffered_answer_bytes_per_worker,
            ),
            ("audit_path_bytes", self.audit_path_bytes),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            bail!("limits.{name} must be more than 0");
        }
        Ok(())
    }
}

/// What the command line contributes (the `run` flags, `#[command(flatten)]`-ed there);
/// `Some`/non-empty/`true` values override the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Flags {
    /// YAML configuration file (see config docs); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// MCP endpoint to protect, e.g. http://10.0.0.5:8080/mcp. Repeatable; pairs with --policy.
    #[arg(long = "endpoint", value_name = "URL")]
    pub endpoints: Vec<String>,
    /// Policy file (PolicyLayer policy.json) for the --endpoint at the same position.
    #[arg(long = "policy", value_name = "FILE")]
    pub policies: Vec<PathBuf>,
    /// Interceptor address; at most one IPv4 and one IPv6 [default: 127.0.0.1:15001, [::1]:15001].
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<SocketAddr>,
    /// Audit log path, or - for standard output [default: -].
    #[arg(long = "audit-log", value_name = "PATH|-")]
    pub audit: Option<PathBuf>,
    /// cgroup to attach to: absolute, or relative to the cgroup2 mount [default: the mount root].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// The agent's own cgroup, never redirected: the agent moves there (created if missing), or
    /// `self` to stay in the cgroup it was started in, which must hold it alone [default: mcpwarden].
    #[arg(long = "agent-cgroup")]
    pub agent_cgroup: Option<PathBuf>,
    /// Directory where network namespaces are pinned, watched so that each is served from its
    /// creation; repeatable [default: /run/netns, /var/run/netns, /var/run/docker/netns].
    #[arg(long = "netns-dir", value_name = "DIR")]
    pub netns_dirs: Vec<PathBuf>,
    /// Raw sockets (SOCK_RAW, AF_PACKET) below the attach point [default: deny].
    #[arg(long = "raw-sockets", value_enum)]
    pub raw_sockets: Option<RawSockets>,
    /// While no agent serves: `closed` (programs stay attached, redirected connects are refused)
    /// or `open` (programs detach, calls go direct, uninspected) [default: closed].
    #[arg(long = "failure-mode", value_enum)]
    pub failure_mode: Option<FailureMode>,
    /// Directory on a bpf filesystem where links and maps are pinned (bpffs is mounted at
    /// /sys/fs/bpf if it is not) [default: /sys/fs/bpf/mcpwarden].
    #[arg(long = "bpffs-dir", value_name = "DIR")]
    pub bpffs_dir: Option<PathBuf>,
    /// After handing the listeners over to a new agent: how long connections still open may
    /// finish before they are closed [default: 30].
    #[arg(long = "drain-seconds", value_name = "N")]
    pub drain_seconds: Option<u64>,
    /// Tests only: mixed into the map layout id, as a build with other maps would change it.
    #[arg(long = "layout-salt", hide = true, default_value = "")]
    pub layout_salt: String,
    /// Largest request body inspected; larger ones are refused [default: 4194304].
    #[arg(long = "max-body-bytes")]
    pub max_body_bytes: Option<usize>,
    /// Interceptor worker threads [default: one per CPU].
    #[arg(long)]
    pub workers: Option<usize>,
    /// State directory; the generated CA lives here [default: /var/lib/mcpwarden].
    #[arg(long = "state-dir")]
    pub state_dir: Option<PathBuf>,
    /// PEM roots trusted for every https:// --endpoint, besides the system's.
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,
    /// Do not probe https servers and mint their leaves at start: each origin's first client
    /// connection then waits for both (measuring that cold path is what this is for).
    #[arg(long = "no-tls-prewarm")]
    pub no_tls_prewarm: bool,
    /// The admin socket (`mcpwarden status`, `reload`, `policy explain --live`)
    /// [default: /run/mcpwarden/admin.sock].
    #[arg(long = "admin-socket", value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Group (name or gid) whose members may use the admin socket besides root [default: none].
    #[arg(long = "admin-group", value_name = "GROUP")]
    pub admin_group: Option<String>,
    /// Where /metrics, /healthz and /readyz are served, or `off` [default: 127.0.0.1:9478].
    #[arg(long = "metrics-listen", value_name = "ADDR|off")]
    pub metrics_listen: Option<String>,
    /// Talk to the Kubernetes API (pod identity, Service backends, the not-ready taint):
    /// `auto` when a kubeconfig is given or in a pod, `true`, `false` [default: auto].
    #[arg(long = "kubernetes", value_name = "auto|true|false")]
    pub kubernetes: Option<crate::k8s::Mode>,
    /// The kubeconfig to use instead of the pod's service account.
    #[arg(long = "kubeconfig", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name [default: $NODE_NAME, then the host name].
    #[arg(long = "node-name", value_name = "NAME")]
    pub node_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    listen: Vec<SocketAddr>,
    audit: Option<FileAudit>,
    cgroup: Option<PathBuf>,
    agent_cgroup: Option<PathBuf>,
    #[serde(default)]
    netns_dirs: Vec<PathBuf>,
    raw_sockets: Option<RawSockets>,
    failure_mode: Option<FailureMode>,
    bpffs_dir: Option<PathBuf>,
    drain_seconds: Option<u64>,
    max_body_bytes: Option<usize>,
    workers: Option<usize>,
    state_dir: Option<PathBuf>,
    tls_prewarm: Option<bool>,
    ca: Option<FileCa>,
    #[serde(default)]
    servers: Vec<FileServer>,
    #[serde(default)]
    bindings: Vec<FileBinding>,
    identity_wait_ms: Option<u64>,
    #[serde(default)]
    limits: Limits,
    admin: Option<FileAdmin>,
    metrics: Option<FileMetrics>,
    kubernetes: Option<crate::k8s::FileSettings>,
    approvals: Option<FileApprovals>,
}

/// `approvals:`, checked whole as it is read (a webhook URL without its secret is an error at
/// the section's position).
#[derive(Debug, Deserialize)]
#[serde(try_from = "RawApprovals")]
struct FileApprovals(RawApprovals);

impl TryFrom<RawApprovals> for FileApprovals {
    type Error = String;
    fn try_from(raw: RawApprovals) -> Result<Self, String> {
        if raw.timeout_s.is_some_and(|Positive(n)| n > 86_400) {
            return Err("approvals.timeout_s must be at most 86400 (a day)".to_owned());
        }
        match (&raw.webhook_url, &raw.webhook_secret_file) {
            (Some(_), None) => Err("approvals.webhook_url needs approvals.webhook_secret_file \
                                    (the HMAC key its receivers check signatures with)"
                .to_owned()),
            (None, Some(_)) => Err(
                "approvals.webhook_secret_file is set but approvals.webhook_url is not".to_owned(),
            ),
            _ => Ok(FileApprovals(raw)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprovals {
    timeout_s: Option<Positive>,
    max_pending: Option<Positive>,
    max_pending_per_caller: Option<Positive>,
    webhook_url: Option<WebhookUrl>,
    webhook_secret_file: Option<PathBuf>,
    webhook_ca_file: Option<PathBuf>,
}

/// A positive integer (a bound or a number of seconds), refused at its line and column
/// otherwise.
#[derive(Debug, Clone, Copy)]
struct Positive(u64);

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u64::deserialize(d)? {
            0 => Err(serde::de::Error::custom(
                "must be a positive integer, not 0",
            )),
            n => Ok(Positive(n)),
        }
    }
}

/// An http or https URL with a host.
#[derive(Debug, Clone)]
struct WebhookUrl(http::Uri);

impl<'de> Deserialize<'de> for WebhookUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let uri: http::Uri = text
            .parse()
            .map_err(|e| serde::de::Error::custom(format!("webhook_url {text:?}: {e}")))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(_)) => Ok(WebhookUrl(uri)),
            _ => Err(serde::de::Error::custom(format!(
                "webhook_url {text:?}: expected an http:// or https:// URL with a host"
            ))),
        }
    }
}

impl FileApprovals {
    /// Relative paths are resolved against `base` (the config file's directory).
    fn settings(self, base: &Path) -> crate::approvals::Settings {
        let FileApprovals(mut raw) = self;
        let d = crate::approvals::Settings::default();
        let webhook = match (raw.webhook_url.take(), raw.webhook_secret_file.take()) {
            (Some(WebhookUrl(url)), Some(secret)) => Some(crate::approvals::webhook::Settings {
                url,
                secret_file: base.join(secret),
                ca_file: raw.webhook_ca_file.take().map(|p| base.join(p)),
            }),
            _ => None,
        };
        let size = |p: Option<Positive>, d: usize| {
            p.map_or(d, |Positive(n)| usize::try_from(n).unwrap_or(usize::MAX))
        };
        let this = raw;
        crate::approvals::Settings {
            timeout: this
                .timeout_s
                .map_or(d.timeout, |Positive(n)| std::time::Duration::from_secs(n)),
            max_pending: size(this.max_pending, d.max_pending),
            max_pending_per_caller: size(this.max_pending_per_caller, d.max_pending_per_caller),
            webhook,
            node: String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    socket: Option<PathBuf>,
    group: Option<FileGroup>,
}

/// A group by number, or by name: resolved as the file is read, so that an unknown name is an
/// error at its line and column.
#[derive(Debug)]
struct FileGroup(u32);

impl<'de> Deserialize<'de> for FileGroup {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Id(u32),
            Name(String),
        }
        match Given::deserialize(d)? {
            Given::Id(gid) => Ok(FileGroup(gid)),
            Given::Name(name) => crate::admin::socket::resolve_group(&name)
                .map(FileGroup)
                .map_err(|e| serde::de::Error::custom(format!("{e:#}"))),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    listen: Option<MetricsListen>,
}

/// `metrics.listen`: an address, or `off`; checked as the file is read.
#[derive(Debug)]
struct MetricsListen(Option<SocketAddr>);

impl<'de> Deserialize<'de> for MetricsListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        metrics_listen(&text)
            .map(MetricsListen)
            .map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

/// `ADDR`, or `off`/`none` for no listener.
fn metrics_listen(text: &str) -> Result<Option<SocketAddr>> {
    if matches!(text, "off" | "none") {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|e| anyhow::anyhow!("metrics listen address {text:?}: {e} (ADDR:PORT, or off)"))
}

/// `audit: PATH`, or `audit: {path: PATH, stall_ms: N, on_stall: deny|allow, rotate: {..},
/// redact_keys: [..]}`.
#[derive(Debug)]
enum FileAudit {
    Path(PathBuf),
    Settings(FileAuditSettings),
}

impl<'de> Deserialize<'de> for FileAudit {
    /// By hand rather than `untagged`: a bad key or value inside the mapping keeps its own
    /// message and position.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = FileAudit;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a path, \"-\", or a mapping with path, stall_ms, on_stall, rotate, redact_keys")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FileAudit, E> {
                Ok(FileAudit::Path(PathBuf::from(v)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<FileAudit, A::Error> {
                FileAuditSettings::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(FileAudit::Settings)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuditSettings {
    path: Option<PathBuf>,
    /// How long a record may wait for the sink before it is refused (503) or written to
    /// standard error (`on_stall`).
    stall_ms: Option<u64>,
    on_stall: Option<crate::audit::OnStall>,
    #[serde(default, deserialize_with = "rotate")]
    rotate: Option<crate::audit::Rotate>,
    #[serde(default, deserialize_with = "redact_keys")]
    redact_keys: Option<Vec<String>>,
}

fn rotate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<crate::audit::Rotate>, D::Error> {
    let r = crate::audit::Rotate::deserialize(d)?;
    if r.max_bytes < 4096 {
        return Err(serde::de::Error::custom(format!(
            "rotate.max_bytes must be at least 4096 (got {})",
            r.max_bytes
        )));
    }
    if !(1..=1000).contains(&r.keep) {
        return Err(serde::de::Error::custom(format!(
            "rotate.keep must be between 1 and 1000 (got {})",
            r.keep
        )));
    }
    Ok(Some(r))
}

fn redact_keys<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let keys = Vec::<String>::deserialize(d)?;
    if keys.iter().any(|k| k.is_empty()) {
        return Err(serde::de::Error::custom(
            "redact_keys: an empty term would redact every argument; list non-empty terms, or [] for none",
        ));
    }
    Ok(Some(keys))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBinding {
    #[serde(rename = "match")]
    selector: crate::policy::bindings::Selector,
    policy: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCa {
    #[serde(default, deserialize_with = "ca_path_opt")]
    cert: Option<PathBuf>,
    #[serde(default, deserialize_with = "ca_path_opt")]
    key: Option<PathBuf>,
    #[serde(default)]
    name_constraints: bool,
    #[serde(default)]
    allow_unconstrained: bool,
    next: Option<FileNextCa>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNextCa {
    #[serde(deserialize_with = "ca_path")]
    cert: PathBuf,
    #[serde(deserialize_with = "ca_path")]
    key: PathBuf,
    #[serde(deserialize_with = "rfc3339")]
    from: std::time::SystemTime,
}

/// A CA file path: `${NODE_NAME}` is its only placeholder (replaced when the CA is loaded).
fn ca_path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    let raw = String::deserialize(d)?;
    crate::ca::check_placeholders(&raw).map_err(serde::de::Error::custom)?;
    Ok(PathBuf::from(raw))
}

fn ca_path_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    ca_path(d).map(Some)
}

fn rfc3339<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::SystemTime, D::Error> {
    let raw = String::deserialize(d)?;
    humantime::parse_rfc3339_weak(&raw).map_err(|e| {
        serde::de::Error::custom(format!(
            "{raw:?} is not an RFC 3339 time such as 2026-12-01T00:00:00Z: {e}"
        ))
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    name: Option<String>,
    url: EndpointUrl,
    policy: PathBuf,
    tls: Option<TlsMode>,
    upstream_ca: Option<PathBuf>,
    #[serde(default)]
    passthrough_paths: Vec<String>,
    scope: Option<Scope>,
    #[serde(default)]
    log_arguments: bool,
}

/// Parse a config file's text; errors name `file:line:column`.
fn parse_file(text: &str, file: &Path) -> Result<FileConfig> {
    serde_yaml_ng::from_str(text).map_err(|e| {
        let message = e.to_string();
        match e.location() {
            Some(l) => {
                // The library appends the position to its message; it is already in front.
                let suffix = format!(" at line {} column {}", l.line(), l.column());
                let message = message.strip_suffix(&suffix).unwrap_or(&message);
                anyhow::anyhow!("{}:{}:{}: {message}", file.display(), l.line(), l.column())
            }
            None => anyhow::anyhow!("{}: {message}", file.display()),
        }
    })
}

impl Config {
    /// Read the file (if any), apply the flags, validate.
    pub fn assemble(flags: Flags) -> Result<Config> {
        let flags_again = flags.clone();
        let mut text = None;
        let (file, base) = match &flags.config {
            Some(path) => {
                let read = std::fs::read_to_string(path).with_context(|| {
                    format!("{}:0:0: cannot read the config file", path.display())
                })?;
                let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
                let parsed = parse_file(&read, path)?;
                text = Some(read);
                (Some(parsed), base)
            }
            None => (None, PathBuf::new()),
        };
        let mut servers = Vec::new();
        let mut listen = flags.listen.clone();
        let (mut audit, mut cgroup, mut agent_cgroup, mut max_body, mut workers) =
            (None, None, None, None, None);
        let (mut state_dir, mut file_ca, mut tls_prewarm) = (None, None, None);
        let (mut bindings, mut identity_wait_ms) = (Vec::new(), None);
        let (mut netns_dirs, mut raw_sockets) = (Vec::new(), None);
        let (mut failure_mode, mut bpffs_dir, mut drain_seconds) = (None, None, None);
        let mut limits = Limits::default();
        let mut audit_stall_ms = None;
        let mut audit_options = crate::audit::Options::default();
        let mut operate = Operate::default();
        let mut file_group = None;
        let mut kubernetes = crate::k8s::Settings::default();
        let mut approvals = crate::approvals::Settings::default();
        if let Some(f) = file {
            if let Some(k) = f.kubernetes {
                kubernetes = k.settings(&base);
            }
            if let Some(a) = f.approvals {
                approvals = a.settings(&base);
            }
            if let Some(a) = f.admin {
                if let Some(s) = a.socket {
                    operate.admin_socket = base.join(s);
                }
                file_group = a.group;
            }
            if let Some(MetricsListen(listen)) = f.metrics.and_then(|m| m.listen) {
                operate.metrics_listen = listen;
            }
            bindings = f
                .bindings
                .into_iter()
                .map(|b| BindingConfig {
                    selector: b.selector,
                    policy: base.join(b.policy),
                })
                .collect();
            identity_wait_ms = f.identity_wait_ms;
            limits = f.limits;
            for s in f.servers {
                let name = s
                    .name
                    .unwrap_or_else(|| format!("{}:{}", s.url.host, s.url.port));
                if !s.url.https && (s.tls.is_some() || s.upstream_ca.is_some()) {
                    bail!(
                        "server {name}: `tls` and `upstream_ca` apply to https:// endpoints only ({})",
                        s.url.raw
                    );
                }
                let mut passthrough_paths = Vec::new();
                for path in &s.passthrough_paths {
                    if !path.starts_with('/') {
                        bail!(
                            "server {name}: passthrough_paths entry {path:?} must be a path starting with /"
                        );
                    }
                    let (stem, any_rest) = match path.strip_suffix('*') {
                        Some(stem) => (stem, "*"),
                        None => (path.as_str(), ""),
                    };
                    let mut normalised = crate::mcp::normalize_path(stem);
                    if stem.ends_with('/') && normalised != "/" {
                        normalised.push('/');
                    }
                    passthrough_paths.push(format!("{normalised}{any_rest}"));
                }
                servers.push(Server {
                    name,
                    policy: base.join(s.policy),
                    url: s.url,
                    tls: s.tls.unwrap_or_default(),
                    upstream_ca: s.upstream_ca.map(|p| base.join(p)),
                    passthrough_paths,
                    scope: s.scope,
                    log_arguments: s.log_arguments,
                });
            }
            state_dir = f.state_dir;
            file_ca = f.ca;
            tls_prewarm = f.tls_prewarm;
            if listen.is_empty() {
                listen = f.listen;
            }
            match f.audit {
                Some(FileAudit::Path(p)) => audit = Some(p),
                Some(FileAudit::Settings(a)) => {
                    audit = a.path;
                    audit_stall_ms = a.stall_ms;
                    audit_options.on_stall = a.on_stall.unwrap_or_default();
                    audit_options.rotate = a.rotate;
                    if let Some(keys) = a.redact_keys {
                        audit_options.redact_keys = keys;
                    }
                }
                None => {}
            }
            cgroup = f.cgroup;
            agent_cgroup = f.agent_cgroup;
            netns_dirs = f.netns_dirs;
            raw_sockets = f.raw_sockets;
            failure_mode = f.failure_mode;
            bpffs_dir = f.bpffs_dir;
            drain_seconds = f.drain_seconds;
            max_body = f.max_body_bytes;
            workers = f.workers;
        }
        if flags.endpoints.len() != flags.policies.len() {
            bail!(
                "each --endpoint needs its --policy: got {} endpoint(s) and {} policy file(s)",
                flags.endpoints.len(),
                flags.policies.len()
            );
        }
        for (url, policy) in flags.endpoints.iter().zip(&flags.policies) {
            let url = EndpointUrl::parse(url).map_err(|e| anyhow::anyhow!("--endpoint {e}"))?;
            servers.push(Server {
                name: format!("{}:{}", url.host, url.port),
                upstream_ca: flags.upstream_ca.clone().filter(|_| url.https),
                url,
                policy: policy.clone(),
                tls: TlsMode::default(),
                passthrough_paths: Vec::new(),
                scope: None,
                log_arguments: false,
            });
        }
        if servers.is_empty() {
            bail!(
                "no MCP server to protect: pass --endpoint http://HOST:PORT/PATH --policy FILE \
                 (repeatable), or --config FILE with a `servers:` list"
            );
        }
        if listen.is_empty() {
            listen = DEFAULT_LISTEN
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect();
        }
        if let Some(s) = &flags.admin_socket {
            operate.admin_socket = s.clone();
        }
        if let Some(l) = &flags.metrics_listen {
            operate.metrics_listen = metrics_listen(l).context("--metrics-listen")?;
        }
        if let Some(mode) = flags.kubernetes {
            kubernetes.mode = mode;
        }
        if let Some(path) = &flags.kubeconfig {
            kubernetes.kubeconfig = Some(path.clone());
        }
        if let Some(node) = &flags.node_name {
            kubernetes.node_name = Some(node.clone());
        }
        operate.admin_group = match (&flags.admin_group, file_group) {
            (Some(g), _) => Some(crate::admin::socket::resolve_group(g).context("--admin-group")?),
            (None, Some(FileGroup(gid))) => Some(gid),
            (None, None) => None,
        };
        let config = Config {
            operate,
            kubernetes,
            approvals,
            listen,
            audit: flags.audit.or(audit).unwrap_or_else(|| PathBuf::from("-")),
            audit_stall: audit_stall_ms.map_or(
                crate::audit::DEFAULT_STALL,
                std::time::Duration::from_millis,
            ),
            audit_options,
            cgroup: flags.cgroup.or(cgroup).unwrap_or_else(|| PathBuf::from("")),
            agent_cgroup: flags
                .agent_cgroup
                .or(agent_cgroup)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_CGROUP)),
            netns_dirs: if !flags.netns_dirs.is_empty() {
                flags.netns_dirs.clone()
            } else if !netns_dirs.is_empty() {
                netns_dirs
            } else {
                DEFAULT_NETNS_DIRS.iter().map(PathBuf::from).collect()
            },
            raw_sockets: flags.raw_sockets.or(raw_sockets).unwrap_or_default(),
            failure_mode: flags.failure_mode.or(failure_mode).unwrap_or_default(),
            bpffs_dir: flags
                .bpffs_dir
                .clone()
                .or(bpffs_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_DIR)),
            layout_salt: flags.layout_salt.clone(),
            drain: std::time::Duration::from_secs(
                flags
                    .drain_seconds
                    .or(drain_seconds)
                    .unwrap_or(DEFAULT_DRAIN_SECONDS),
            ),
            max_body_bytes: flags
                .max_body_bytes
                .or(max_body)
                .unwrap_or(mcp::DEFAULT_MAX_BODY),
            workers: flags
                .workers
                .or(workers)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            ca: ca_settings(
                flags
                    .state_dir
                    .or(state_dir)
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
                file_ca,
                &base,
                &servers,
            )?,
            servers,
            tls_prewarm: !flags.no_tls_prewarm && tls_prewarm.unwrap_or(true),
            bindings,
            identity_wait: std::time::Duration::from_millis(
                identity_wait_ms.unwrap_or(DEFAULT_IDENTITY_WAIT_MS),
            ),
            limits,
            flags: flags_again,
        };
        config.validate()?;
        if let (Some(path), Some(text)) = (&config.flags.config, &text) {
            config.check_binding_cgroups(path, text)?;
        }
        Ok(config)
    }

    /// A binding that selects on a cgroup a non-root user can create or move processes into
    /// would let that user's processes pick their policy: refused, naming where it is written.
    fn check_binding_cgroups(&self, path: &Path, text: &str) -> Result<()> {
        if !self.bindings.iter().any(|b| b.selector.cgroup.is_some()) {
            return Ok(());
        }
        let Ok(mount) = crate::redirect::cgroup::cgroup2_mount() else {
            // No cgroup v2: the agent stops at start with its own error.
            return Ok(());
        };
        let delegated = crate::redirect::cgroup::delegated_subtrees(&mount);
        for (i, b) in self.bindings.iter().enumerate() {
            let Some(glob) = &b.selector.cgroup else {
                continue;
            };
            if let Some(d) = crate::redirect::cgroup::delegation_conflict(glob, &delegated, &mount)
            {
                let (line, col) = locate(text, glob.as_str());
                let who = match d.uid {
                    u32::MAX => "users other than root".to_owned(),
                    uid => format!("uid {uid}"),
                };
                bail!(
                    "{}:{line}:{col}: bindings[{i}]: match.cgroup {:?} can match cgroups in {}, a \
                     subtree {who} can write: a process there could move itself into the cgroup \
                     whose policy it prefers. Hint: select on cgroups only root can change (a \
                     service's or a pod's), or on pod metadata (namespace, labels, service_account)",
                    path.display(),
                    glob.as_str(),
                    d.path
                );
            }
        }
        Ok(())
    }

    /// Is any server `https://` (and so the CA needed)?
    pub fn needs_ca(&self) -> bool {
        self.servers
            .iter()
            .any(|s| s.url.https && s.tls == TlsMode::Terminate)
    }

    fn validate(&self) -> Result<()> {
        self.limits.validate()?;
        let v4 = self.listen.iter().filter(|a| a.is_ipv4()).count();
        let v6 = self.listen.iter().filter(|a| a.is_ipv6()).count();
        if v4 > 1 || v6 > 1 {
            bail!(
                "listen: at most one IPv4 and one IPv6 address (got {:?})",
                self.listen
            );
        }
        if let Some(a) = self.listen.iter().find(|a| !a.ip().is_loopback()) {
            bail!(
                "listen: {a} is not a loopback address: the interceptor listens in every network \
                 namespace it serves, and anywhere but loopback it would be reachable from the network"
            );
        }
        if !self.bpffs_dir.is_absolute() {
            bail!(
                "bpffs_dir: {} must be an absolute path",
                self.bpffs_dir.display()
            );
        }
        for d in &self.netns_dirs {
            if !d.is_absolute() {
                bail!("netns_dirs: {} must be an absolute path", d.display());
            }
        }
        for s in &self.servers {
            if let Ok(ip) = s.url.host.parse::<IpAddr>() {
                let dst = SocketAddr::new(ip, s.url.port);
                if self.listen.contains(&dst) {
                    bail!(
                        "server {}: {} is the interceptor's own address",
                        s.name,
                        s.url.raw
                    );
                }
            }
        }
        let mut schemes = std::collections::HashMap::new();
        for s in &self.servers {
            let origin = (s.url.host.to_ascii_lowercase(), s.url.port);
            if let Some(&(https, ref other)) = schemes.get(&origin) {
                if https != s.url.https {
                    bail!(
                        "server {}: {}:{} is configured both as http:// (or https://) by server {other}; one port speaks one",
                        s.name, s.url.host, s.url.port
                    );
                }
            }
            schemes.insert(origin, (s.url.https, s.name.clone()));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.servers {
            if !seen.insert((
                s.url.host.to_ascii_lowercase(),
                s.url.port,
                s.url.path.clone(),
            )) {
                bail!(
                    "server {}: endpoint {} is configured twice; which policy applies would be ambiguous",
                    s.name,
                    s.url.raw
                );
            }
        }
        for (i, b) in self.bindings.iter().enumerate() {
            if let Some(name) = &b.selector.server {
                if !self.servers.iter().any(|s| &s.name == name) {
                    bail!("bindings[{i}]: match.server {name:?} names no configured server");
                }
            }
        }
        if self.identity_wait > std::time::Duration::from_secs(60) {
            bail!("identity_wait_ms must be at most 60000: calls wait that long");
        }
        if self.max_body_bytes == 0 {
            bail!("max_body_bytes must be positive");
        }
        if !(1..=1024).contains(&self.workers) {
            bail!("workers must be between 1 and 1024 (got {})", self.workers);
        }
        Ok(())
    }
}

/// Line and column (1-based) of the first `cgroup:` value spelling `needle` in `text`, else of
/// the first occurrence of `needle`; 0:0 when it is not there.
fn locate(text: &str, needle: &str) -> (usize, usize) {
    let found = text
        .lines()
        .enumerate()
        .filter_map(|(n, line)| line.find(needle).map(|c| (n, c, line.contains("cgroup"))))
        .max_by_key(|(n, _, cgroup)| (*cgroup, usize::MAX - n));
    match found {
        Some((n, c, _)) => (n + 1, c + 1),
        None => (0, 0),
    }
}

/// The CA settings: the file's `ca:` section (paths relative to the config file), the state dir,
/// and the names a constrained CA would permit.
fn ca_settings(
    state_dir: PathBuf,
    file: Option<FileCa>,
    base: &Path,
    servers: &[Server],
) -> Result<CaSettings> {
    let mut names: Vec<String> = servers
        .iter()
        .filter(|s| s.url.https)
        .flat_map(|s| {
            let host = s.url.host.to_ascii_lowercase();
            let mut all = host_aliases(&host);
            all.push(host);
            all
        })
        .collect();
    names.sort();
    names.dedup();
    let mut settings = CaSettings {
        state_dir,
        names,
        ..CaSettings::default()
    };
    if let Some(ca) = file {
        settings.name_constraints = ca.name_constraints;
        settings.allow_unconstrained = ca.allow_unconstrained;
        settings.files = match (ca.cert, ca.key) {
            (Some(cert), Some(key)) => Some(CaFiles {
                cert: base.join(cert),
                key: base.join(key),
            }),
            (None, None) => None,
            _ => bail!("ca: `cert` and `key` go together"),
        };
        settings.next = ca.next.map(|n| NextCa {
            files: CaFiles {
                cert: base.join(n.cert),
                key: base.join(n.key),
            },
            from: n.from,
        });
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_error(text: &str, file: &str) -> String {
        parse_file(text, Path::new(file))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn parses_urls() -> Result<(), String> {
        let u = EndpointUrl::parse("http://127.0.0.1:8080/mcp/")?;
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8080, "/mcp")
        );
        let u = EndpointUrl::parse("http://[::1]/a")?;
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 80, "/a")
        );
        let u = EndpointUrl::parse("https://Mcp.Example.test/mcp")?;
        assert!(u.https);
        assert_eq!((u.host.as_str(), u.port), ("Mcp.Example.test", 443));
        assert!(EndpointUrl::parse("ftp://x/").is_err());
        assert!(EndpointUrl::parse("http://u:p@x/").is_err());
        Ok(())
    }

    #[test]
    fn host_aliases_are_the_other_spellings_of_a_service_host() {
        assert_eq!(
            host_aliases("Tools.MCP.svc.cluster.local"),
            ["tools.mcp", "tools.mcp.svc"]
        );
        assert_eq!(
            host_aliases("tools.mcp.svc"),
            ["tools.mcp", "tools.mcp.svc.cluster.local"]
        );
        for other in [
            "tools.mcp",
            "mcp.example.com",
            "10.0.0.5",
            "::1",
            ".mcp.svc",
            "tools..svc.cluster.local",
            "a.tools.mcp.svc.cluster.local",
            "tools.mcp.svc.cluster.local.",
            "tools.mcp.svc.example.local",
        ] {
            assert!(host_aliases(other).is_empty(), "{other}");
        }
    }

    #[test]
    fn the_ca_section_takes_allow_unconstrained_and_node_name_paths() -> Result<()> {
        let err = load_error(
            "ca:\n  cert: /etc/ca/${NODE}.crt\n  key: /etc/ca/k\n",
            "c.yaml",
        );
        assert!(err.starts_with("c.yaml:2:"), "{err}");
        assert!(err.contains("${NODE_NAME}"), "{err}");
        let dir = std::env::temp_dir().join(format!("mcpwarden-config-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("c.yaml");
        std::fs::write(
            &file,
            "ca:\n  cert: ca/${NODE_NAME}.crt\n  key: ca/${NODE_NAME}.key\n  allow_unconstrained: true\n\
             servers:\n  - url: https://tools.mcp.svc.cluster.local/mcp\n    policy: p.json\n  \
             - url: http://plain.example.test/mcp\n    policy: p.json\n",
        )?;
        let c = Config::assemble(Flags {
            config: Some(file),
            ..Flags::default()
        })?;
        std::fs::remove_dir_all(&dir)?;
        assert!(c.ca.allow_unconstrained);
        assert_eq!(
            c.ca.files.map(|f| f.cert),
            Some(dir.join("ca/${NODE_NAME}.crt"))
        );
        assert_eq!(
            c.ca.names,
            ["tools.mcp", "tools.mcp.svc", "tools.mcp.svc.cluster.local"]
        );
        Ok(())
    }

    #[test]
    fn file_errors_name_line_and_column() {
        let text =
            "servers:\n  - url: http://127.0.0.1:1/mcp\n    policy: p.json\n    colour: red\n";
        let err = load_error(text, "/etc/mcpwarden.yaml");
        assert!(err.starts_with("/etc/mcpwarden.yaml:4:5: "), "{err}");
        assert!(err.contains("colour"), "{err}");
        let err = load_error(
            "servers:\n  - url: ftp://example.test/mcp\n    policy: p.json\n",
            "c.yaml",
        );
        assert!(err.starts_with("c.yaml:2:"), "{err}");
        assert!(err.contains("http:// or https://"), "{err}");
        let err = load_error(
            "ca:\n  next:\n    cert: a\n    key: b\n    from: next tuesday\n",
            "c.yaml",
        );
        // serde_yaml_ng places errors from a field deserializer at the enclosing mapping.
        assert!(err.starts_with("c.yaml:3:5: ca.next: "), "{err}");
        assert!(err.contains("RFC 3339"), "{err}");
    }

    #[test]
    fn the_admin_and_metrics_sections_parse_and_their_errors_name_line_and_column() {
        for (text, at, says) in [
            ("metrics:\n  listen: nonsense\n", "c.yaml:2:3: ", "nonsense"),
            ("metrics:\n  port: 9\n", "c.yaml:2:3: ", "port"),
            (
                "admin:\n  group: no-such-group-mcpw\n",
                "c.yaml:2:3: ",
                "no group named",
            ),
            ("admin:\n  socket: a\n  grup: 5\n", "c.yaml:3:3: ", "grup"),
        ] {
            let err = load_error(text, "c.yaml");
            assert!(err.starts_with(at) && err.contains(says), "{text}: {err}");
        }
        let parsed = parse_file(
            "admin:\n  socket: /run/x.sock\n  group: 0\nmetrics:\n  listen: \"off\"\n",
            Path::new("c.yaml"),
        );
        let parsed = parsed.ok().and_then(|f| Some((f.admin?, f.metrics?)));
        let Some((admin, metrics)) = parsed else {
            panic!("the sections did not parse");
        };
        assert_eq!(admin.group.map(|g| g.0), Some(0));
        assert_eq!(metrics.listen.map(|l| l.0), Some(None));
    }

    #[test]
    fn the_kubernetes_section_parses_and_its_errors_name_line_and_column() -> Result<()> {
        for (text, at, says) in [
            (
                "kubernetes:\n  enabled: maybe\n",
                "c.yaml:2:12: ",
                "expected auto, true or false",
            ),
            ("kubernetes:\n  node: a\n", "c.yaml:2:3: ", "node"),
            (
                "kubernetes:\n  deleted_pod_grace_s: -1\n",
                "c.yaml:2:24: ",
                "deleted_pod_grace_s",
            ),
        ] {
            let err = load_error(text, "c.yaml");
            assert!(err.starts_with(at) && err.contains(says), "{text}: {err}");
        }
        let dir = std::env::temp_dir().join(format!("mcpwarden-cfg-kube-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("c.yaml");
        std::fs::write(
            &file,
            "servers:\n  - {url: http://127.0.0.1:1/mcp, policy: p.json}\n\
             kubernetes:\n  enabled: true\n  kubeconfig: kc.yaml\n  node_name: n1\n  \
             deleted_pod_grace_s: 5\n  remove_taint: \"\"\n",
        )?;
        let c = Config::assemble(Flags {
            config: Some(file.clone()),
            ..Flags::default()
        })?;
        let k = &c.kubernetes;
        assert_eq!(k.mode, crate::k8s::Mode::On);
        assert_eq!(k.kubeconfig.as_deref(), Some(dir.join("kc.yaml").as_path()));
        assert_eq!(k.node_name.as_deref(), Some("n1"));
        assert_eq!(k.deleted_pod_grace, std::time::Duration::from_secs(5));
        assert_eq!(k.remove_taint, None);
        // Flags win; the default removes the usual taint.
        let c = Config::assemble(Flags {
            config: Some(file.clone()),
            kubernetes: Some(crate::k8s::Mode::Off),
            ..Flags::default()
        })?;
        assert_eq!(c.kubernetes.mode, crate::k8s::Mode::Off);
        assert_eq!(
            crate::k8s::Settings::default().remove_taint.as_deref(),
            Some(crate::k8s::DEFAULT_TAINT)
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn the_audit_section_and_log_arguments_parse_and_their_errors_name_line_and_column(
    ) -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mcpwarden-cfg-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("c.yaml");
        let servers = "servers:\n  - {name: one, url: http://127.0.0.1:1/mcp, policy: p.json, log_arguments: true}\n  - {name: two, url: http://127.0.0.1:2/mcp, policy: p.json}\n";
        std::fs::write(
            &file,
            format!(
                "audit:\n  path: /tmp/a.jsonl\n  stall_ms: 250\n  on_stall: allow\n  rotate: {{max_bytes: 1048576, keep: 3}}\n  redact_keys: [Pin, cvv]\n{servers}"
            ),
        )?;
        let c = Config::assemble(Flags {
            config: Some(file.clone()),
            ..Flags::default()
        })?;
        assert_eq!(c.audit, PathBuf::from("/tmp/a.jsonl"));
        assert_eq!(c.audit_stall, std::time::Duration::from_millis(250));
        assert_eq!(c.audit_options.on_stall, crate::audit::OnStall::Allow);
        assert_eq!(
            c.audit_options.rotate,
            Some(crate::audit::Rotate {
                max_bytes: 1048576,
                keep: 3
            })
        );
        assert_eq!(c.audit_options.redact_keys, ["Pin", "cvv"]);
        assert!(c.servers[0].log_arguments && !c.servers[1].log_arguments);
        std::fs::write(&file, format!("audit: /tmp/a.jsonl\n{servers}"))?;
        let c = Config::assemble(Flags {
            config: Some(file),
            ..Flags::default()
        })?;
        assert_eq!(c.audit_options, crate::audit::Options::default());
        assert_eq!(c.audit_options.redact_keys.len(), 5);
        assert_eq!(c.audit_stall, crate::audit::DEFAULT_STALL);
        std::fs::remove_dir_all(&dir)?;

        for (text, at, says) in [
            ("audit:\n  path: a\n  on_stall: maybe\n", "c.yaml:3:", "maybe"),
            ("audit:\n  path: a\n  colour: red\n", "c.yaml:3:", "colour"),
            ("audit:\n  rotate: {max_bytes: 10, keep: 1}\n", "c.yaml:2:", "max_bytes"),
            ("audit:\n  rotate: {max_bytes: 100000, keep: 0}\n", "c.yaml:2:", "keep"),
            ("audit:\n  rotate: {max_bytes: 100000}\n", "c.yaml:2:", "keep"),
            ("audit:\n  redact_keys: [token, \"\"]\n", "c.yaml:2:", "empty term"),
            ("audit:\n  stall_ms: soon\n", "c.yaml:2:", "stall_ms"),
            ("audit: [a]\n", "c.yaml:1:", "audit"),
            (
                "servers:\n  - {url: http://127.0.0.1:1/mcp, policy: p.json, log_arguments: maybe}\n",
                "c.yaml:2:",
                "log_arguments",
            ),
        ] {
            let err = load_error(text, "c.yaml");
            assert!(err.starts_with(at) && err.contains(says), "{text:?}: {err}");
        }
        Ok(())
    }

    #[test]
    fn flags_add_servers_and_override() -> Result<()> {
        let dir =
            std::env::temp_dir().join(format!("mcpwarden-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("c.yaml");
        std::fs::write(
            &file,
            "audit: /tmp/a.jsonl\nservers:\n  - name: one\n    url: http://127.0.0.1:1/mcp\n    policy: p.json\n",
        )?;
        let c = Config::assemble(Flags {
            config: Some(file),
            endpoints: vec!["http://localhost:2/x".into()],
            policies: vec!["q.json".into()],
            audit: Some("-".into()),
            ..Flags::default()
        })?;
        assert_eq!(c.servers.len(), 2);
        assert_eq!(c.servers[0].name, "one");
        assert_eq!(c.servers[0].policy, dir.join("p.json"));
        assert_eq!(c.servers[1].url.host, "localhost");
        assert_eq!(c.audit, PathBuf::from("-"));
        assert_eq!(c.listen.len(), 2);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn an_endpoint_configured_twice_is_an_error() {
        let err = Config::assemble(Flags {
            endpoints: vec![
                "http://127.0.0.1:1/mcp".into(),
                "http://127.0.0.1:1/mcp/".into(),
            ],
            policies: vec!["a.json".into(), "b.json".into()],
            ..Flags::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("configured twice"), "{err}");
    }

    #[test]
    fn no_server_is_an_error_that_says_what_to_pass() {
        let err = Config::assemble(Flags::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("--endpoint") && err.contains("--policy"),
            "{err}"
        );
    }

    #[test]
    fn workers_come_from_the_file_or_the_flag_and_must_be_positive() -> Result<()> {
        let dir =
            std::env::temp_dir().join(format!("mcpwarden-cfg-workers-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("c.yaml");
        std::fs::write(
            &file,
            "workers: 3\nservers:\n  - name: one\n    url: http://127.0.0.1:1/mcp\n    policy: p.json\n",
        )?;
        let from_file = Config::assemble(Flags {
            config: Some(file.clone()),
            ..Flags::default()
        })?;
        assert_eq!(from_file.workers, 3);
        let from_flag = Config::assemble(Flags {
            config: Some(file.clone()),
            workers: Some(1),
            ..Flags::default()
        })?;
        assert_eq!(from_flag.workers, 1);
        let zero = Config::assemble(Flags {
            config: Some(file),
            workers: Some(0),
            ..Flags::default()
        });
        let err = zero.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("workers must be between 1 and 1024"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn failure_mode_bpffs_dir_and_drain_come_from_the_file_or_the_flags() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mcpwarden-cfg-fm-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("c.yaml");
        let server =
            "servers:\n  - name: one\n    url: http://127.0.0.1:1/mcp\n    policy: p.json\n";
        std::fs::write(
            &file,
            format!("failure_mode: open\nbpffs_dir: /sys/fs/bpf/other\ndrain_seconds: 5\n{server}"),
        )?;
        let c = Config::assemble(Flags {
            config: Some(file.clone()),
            ..Flags::default()
        })?;
        assert_eq!(c.failure_mode, FailureMode::Open);
        assert_eq!(c.bpffs_dir, PathBuf::from("/sys/fs/bpf/other"));
        assert_eq!(c.drain, std::time::Duration::from_secs(5));
        let c = Config::assemble(Flags {
            config: Some(file.clone()),
            failure_mode: Some(FailureMode::Closed),
            drain_seconds: Some(7),
            ..Flags::default()
        })?;
        assert_eq!(c.failure_mode, FailureMode::Closed);
        assert_eq!(c.drain, std::time::Duration::from_secs(7));
        std::fs::write(&file, server)?;
        let plain = Config::assemble(Flags {
            config: Some(file.clone()),
            ..Flags::default()
        })?;
        assert_eq!(plain.failure_mode, FailureMode::Closed, "closed by default");
        assert_eq!(plain.bpffs_dir, PathBuf::from(DEFAULT_BPFFS_DIR));
        let relative = Config::assemble(Flags {
            config: Some(file),
            bpffs_dir: Some(PathBuf::from("pins")),
            ..Flags::default()
        });
        let err = relative.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.contains("bpffs_dir") && err.contains("absolute"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn scopes_netns_dirs_raw_sockets_and_loopback_listeners() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mcpwarden-cfg-ns-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("c.yaml");
        std::fs::write(
            &file,
            "netns_dirs: [/var/run/netns]\nraw_sockets: allow\nagent_cgroup: self\nservers:\n  \
             - {url: http://127.0.0.1:1/mcp, policy: p.json, scope: pods}\n  \
             - {url: http://10.0.0.5:2/mcp, policy: p.json}\n",
        )?;
        let c = Config::assemble(Flags {
            config: Some(file.clone()),
            ..Flags::default()
        })?;
        assert_eq!(c.servers[0].scope, Some(Scope::Pods));
        assert_eq!(c.servers[1].scope, None);
        assert_eq!(c.netns_dirs, vec![PathBuf::from("/var/run/netns")]);
        assert_eq!(c.raw_sockets, RawSockets::Allow);
        assert_eq!(c.agent_cgroup, PathBuf::from(AGENT_CGROUP_SELF));
        // Flags win; the defaults without either.
        let c = Config::assemble(Flags {
            config: Some(file.clone()),
            netns_dirs: vec!["/run/pins".into()],
            raw_sockets: Some(RawSockets::Deny),
            ..Flags::default()
        })?;
        assert_eq!(c.netns_dirs, vec![PathBuf::from("/run/pins")]);
        assert_eq!(c.raw_sockets, RawSockets::Deny);
        let plain = Config::assemble(Flags {
            endpoints: vec!["http://127.0.0.1:1/mcp".into()],
            policies: vec!["p.json".into()],
            ..Flags::default()
        })?;
        assert_eq!(plain.netns_dirs.len(), DEFAULT_NETNS_DIRS.len());
        assert_eq!(plain.raw_sockets, RawSockets::Deny);
        std::fs::write(
            &file,
            "servers:\n  - {url: http://127.0.0.1:1/mcp, policy: p.json, scope: everywhere}\n",
        )?;
        let err = load_error(&std::fs::read_to_string(&file)?, "c.yaml");
        assert!(err.starts_with("c.yaml:2:"), "{err}");
        let err = Config::assemble(Flags {
            endpoints: vec!["http://127.0.0.1:1/mcp".into()],
            policies: vec!["p.json".into()],
            listen: vec!["10.0.0.1:15001".parse()?],
            ..Flags::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("not a loopback address"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_binding_that_can_match_a_users_cgroups_names_its_line_and_column() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mcpwarden-cfg-deleg-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("c.yaml");
        std::fs::write(
            &file,
            "servers:\n  - {url: http://127.0.0.1:1/mcp, policy: p.json}\nbindings:\n  - match: {cgroup: \"/user.slice/**\"}\n    policy: p.json\n",
        )?;
        let err = Config::assemble(Flags {
            config: Some(file.clone()),
            ..Flags::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        // Any user who logs in later gets a delegated subtree there.
        assert!(
            err.starts_with(&format!("{}:4:22: bindings[0]", file.display())),
            "{err}"
        );
        assert!(err.contains("Hint:"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn no_tls_prewarm_overrides_the_file() -> Result<()> {
        let dir =
            std::env::temp_dir().join(format!("mcpwarden-cfg-prewarm-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let servers =
            "servers:\n  - name: one\n    url: http://127.0.0.1:1/mcp\n    policy: p.json\n";
        let prewarm = |file_says: &str, flag: bool| -> Result<bool> {
            let file = dir.join("c.yaml");
            std::fs::write(&file, format!("{file_says}{servers}"))?;
            Ok(Config::assemble(Flags {
                config: Some(file),
                no_tls_prewarm: flag,
                ..Flags::default()
            })?
            .tls_prewarm)
        };
        assert!(prewarm("", false)?);
        assert!(prewarm("tls_prewarm: true\n", false)?);
        assert!(!prewarm("tls_prewarm: true\n", true)?);
        assert!(!prewarm("tls_prewarm: false\n", false)?);
        assert!(!prewarm("", true)?);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
