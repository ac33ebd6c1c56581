//! A Kubernetes API server stand-in that speaks the real wire format, for tests of the agent's
//! Kubernetes client (kube's `Client`, `watcher` and `reflector`, exactly as in production).
//!
//! [`ApiServer::start`] serves HTTPS on `127.0.0.1:<free port>` with a certificate from a fresh
//! [`TestCa`] (HTTP/2 or HTTP/1.1 by ALPN), requires `Authorization: Bearer <token>` and writes a
//! kubeconfig for it. It knows four resources:
//!
//! - pods (`/api/v1/pods`, `/api/v1/namespaces/NS/pods[/NAME]`),
//! - endpointslices (`/apis/discovery.k8s.io/v1/[namespaces/NS/]endpointslices[/NAME]`),
//! - nodes (`/api/v1/nodes[/NAME]`),
//! - approvals, mcpwarden's custom resource
//!   (`/apis/mcpwarden.io/v1alpha1/[namespaces/NS/]approvals[/NAME[/status]]`),
//!
//! and for each: list (field and label selectors, `limit` and opaque `continue` tokens over a
//! snapshot, as kube-apiserver pages), watch (chunked JSON lines, replay from a bounded history
//! by `resourceVersion`, bookmarks when asked for, `timeoutSeconds`, 410 `Expired` ERROR events
//! for versions older than the history), get, and PATCH (`application/json-patch+json` and
//! `application/merge-patch+json`). Approvals also take POST (create: 201, 409 `AlreadyExists`)
//! and DELETE (200 with the deleted object, as for custom resources), and have a `status`
//! subresource as a CRD with `subresources.status` does: a PATCH of the object leaves its
//! `status` as it was, a PATCH of `/status` changes nothing but `status`, a create drops any
//! `status`, and `metadata.generation` counts changes of anything but metadata and status.
//! Objects change only through the test's own calls ([`ApiServer::apply_pod`], ...) and
//! requests; every change bumps one global resourceVersion, as etcd's revision does.
//!
//! Selector-filtered watches behave as kube-apiserver's: an object that starts matching is
//! sent as ADDED, one that stops matching as DELETED.
//!
//! Admission is not run on requests (they are the agent's, whose token the kubeconfig holds).
//! What an approver does goes through [`ApiServer::patch_approval_as`], which emulates the
//! ValidatingAdmissionPolicy `mcpwarden-approvals` (deploy/kustomize/base/approvals.yaml).
//!
//! Not implemented: create and delete of the built-in resources, and update (PUT) of any (405);
//! strategic-merge and apply patches (415); `resourceVersion`/`resourceVersionMatch` on lists (a
//! list is always the most recent state); delete preconditions and `generateName`;
//! `sendInitialEvents` (streaming lists); discovery endpoints; protobuf; schema validation of
//! approvals (the CRD's OpenAPI schema is not applied).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::tls::{TestCa, Validity};
use crate::{ServerThread, TempDir};

/// How many changes the watch history keeps; a watch resuming from before the oldest kept
/// change gets 410 Expired (as from a compacted etcd / rolled-over watch cache).
const HISTORY_LIMIT: usize = 4096;
/// How many unfinished paged lists (continue tokens) are kept.
const PAGES_LIMIT: usize = 256;
/// A watch without `timeoutSeconds` ends after this (kube-apiserver: --min-request-timeout 1800).
const DEFAULT_WATCH_TIMEOUT: u64 = 1800;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Body = BoxBody<Bytes, Infallible>;

/// One request the stand-in answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// `GET`, `PATCH`, ...
    pub method: String,
    /// The kube-apiserver verb: `list`, `watch`, `get`, `patch`, `create`, `delete`, or the
    /// lower-case method for anything else (unknown paths, unsupported methods).
    pub verb: String,
    /// The URL path, e.g. `/api/v1/pods` (with its subresource: `.../approvals/NAME/status`).
    pub path: String,
    /// The raw query string without `?` (still percent-encoded; see [`Seen::param`]).
    pub query: String,
    /// Whether `Authorization: Bearer <token>` carried the right token.
    pub authorized: bool,
    /// The request's `Content-Type`, if any.
    pub content_type: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// The status code of the response (200 for a watch that started, even if its first event
    /// is an ERROR).
    pub status: u16,
}

impl Seen {
    /// The decoded value of query parameter `name` (the first, if repeated).
    pub fn param(&self, name: &str) -> Option<String> {
        parse_query(&self.query)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    pub fn is_list(&self) -> bool {
        self.verb == "list"
    }

    pub fn is_watch(&self) -> bool {
        self.verb == "watch"
    }
}

/// The resources the stand-in serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Pod,
    EndpointSlice,
    Node,
    /// `approvals.mcpwarden.io`, namespaced, with a status subresource.
    Approval,
}

impl Kind {
    fn kind(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Approval => "Approval",
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Kind::Pod => "PodList",
            Kind::EndpointSlice => "EndpointSliceList",
            Kind::Node => "NodeList",
            Kind::Approval => "ApprovalList",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Pod | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Approval => "mcpwarden.io/v1alpha1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::Approval => "approvals",
        }
    }

    fn group(self) -> Option<&'static str> {
        match self {
            Kind::Pod | Kind::Node => None,
            Kind::EndpointSlice => Some("discovery.k8s.io"),
            Kind::Approval => Some("mcpwarden.io"),
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }

    /// Whether clients may create and delete it (the built-in kinds are the test's to change).
    fn writable(self) -> bool {
        self == Kind::Approval
    }

    /// Whether it has a `status` subresource (as far as the stand-in serves it).
    fn has_status(self) -> bool {
        self == Kind::Approval
    }

    /// `plural.group`, as Status messages name a resource.
    fn resource(self) -> String {
        match self.group() {
            Some(g) => format!("{}.{g}", self.plural()),
            None => self.plural().to_string(),
        }
    }

    /// The field labels kube-apiserver accepts in field selectors for this resource.
    fn fields(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ],
            // Custom resources: these two only (without `selectableFields`).
            Kind::EndpointSlice | Kind::Approval => &["metadata.name", "metadata.namespace"],
            Kind::Node => &["metadata.name", "spec.unschedulable"],
        }
    }

    fn from_path(group_version: &str, plural: &str) -> Option<Kind> {
        [Kind::Pod, Kind::EndpointSlice, Kind::Node, Kind::Approval]
            .into_iter()
            .find(|k| k.api_version() == group_version && k.plural() == plural)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Added,
    Modified,
    Deleted,
}

/// One change in the history: the object after it (for a deletion: the last state, with the
/// deletion's resourceVersion) and before it.
struct Change {
    rv: u64,
    kind: Kind,
    op: Op,
    object: Value,
    prev: Option<Value>,
}

enum WatchMsg {
    Change(Arc<Change>),
    Bookmark(u64),
    /// ERROR 410 and end; the payload is the oldest resourceVersion still served.
    Expire(u64),
    /// End the stream cleanly (as at `timeoutSeconds`).
    End,
}

/// The rest of a paged list: the snapshot taken by its first page.
struct Page {
    rv: u64,
    items: Arc<Vec<Value>>,
    offset: usize,
    selective: bool,
}

struct State {
    /// The global resourceVersion: that of the latest change.
    rv: u64,
    /// Watches and continue tokens from a resourceVersion older than this get 410 Expired.
    compacted: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: VecDeque<Arc<Change>>,
    watches: Vec<mpsc::UnboundedSender<WatchMsg>>,
    pages: VecDeque<(String, Page)>,
    seq: u64,
}

impl State {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn broadcast(&mut self, msg: impl Fn() -> WatchMsg) {
        self.watches.retain(|tx| tx.send(msg()).is_ok());
    }

    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push_back(change.clone());
        while self.history.len() > HISTORY_LIMIT {
            if let Some(old) = self.history.pop_front() {
                self.compacted = self.compacted.max(old.rv);
            }
        }
        self.broadcast(|| WatchMsg::Change(change.clone()));
    }

    /// Store `obj` as the new state of its object: ADDED if new, else MODIFIED.
    fn apply(&mut self, kind: Kind, mut obj: Value) -> Value {
        let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
            panic!(
                "ApiServer: a {} needs a metadata object: {obj}",
                kind.kind()
            );
        };
        let Some(name) = meta.get("name").and_then(Value::as_str).map(str::to_string) else {
            panic!("ApiServer: a {} needs metadata.name", kind.kind());
        };
        let namespace = if kind.namespaced() {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string();
            meta.insert("namespace".into(), json!(ns));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        let key = (kind, namespace, name);
        let prev = self.objects.get(&key).cloned();
        if !meta.contains_key("uid") {
            let uid = match prev.as_ref().and_then(|p| p.pointer("/metadata/uid")) {
                Some(uid) => uid.clone(),
                None => {
                    self.seq += 1;
                    json!(format!("00000000-0000-4000-8000-{:012x}", self.seq))
                }
            };
            meta.insert("uid".into(), uid);
        }
        set_type(&mut obj, kind);
        if kind.has_status() {
            custom_resource_meta(&mut obj, prev.as_ref());
        }
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key, obj.clone());
        let op = if prev.is_some() {
            Op::Modified
        } else {
            Op::Added
        };
        self.record(Change {
            rv,
            kind,
            op,
            object: obj.clone(),
            prev,
        });
        obj
    }

    fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let key = (kind, namespace.to_string(), name.to_string());
        let prev = self.objects.remove(&key)?;
        let rv = self.bump();
        let mut object = prev.clone();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(Change {
            rv,
            kind,
            op: Op::Deleted,
            object: object.clone(),
            prev: Some(prev),
        });
        Some(object)
    }
}

/// What kube-apiserver sets on a custom resource: `creationTimestamp` once, and
/// `metadata.generation`, 1 at creation and counting every change of anything but `metadata`
/// and `status`.
fn custom_resource_meta(obj: &mut Value, prev: Option<&Value>) {
    let content = |o: &Value| {
        let mut o = o.clone();
        if let Some(map) = o.as_object_mut() {
            map.remove("metadata");
            map.remove("status");
        }
        o
    };
    let (generation, created) = match prev {
        None => (1, now_rfc3339()),
        Some(p) => {
            let g = p
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            let created = p
                .pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
                .map_or_else(now_rfc3339, str::to_string);
            let changed = content(p) != content(obj);
            (if changed { g + 1 } else { g }, created)
        }
    };
    obj["metadata"]["generation"] = json!(generation);
    obj["metadata"]["creationTimestamp"] = json!(created);
}

/// Now, as kube-apiserver writes timestamps (RFC 3339, seconds, UTC).
fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

struct Shared {
    token: String,
    /// Answer every request 503, as an API server behind a failing load balancer does.
    unavailable: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
    seen: Mutex<Vec<Seen>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The API server stand-in; stops its server thread and removes its kubeconfig on drop.
pub struct ApiServer {
    addr: SocketAddr,
    kubeconfig: PathBuf,
    ca_pem: String,
    shared: Arc<Shared>,
    _server: ServerThread,
    _dir: TempDir,
}

impl ApiServer {
    /// Serves HTTPS on 127.0.0.1:<free port> with a certificate (SANs 127.0.0.1, localhost,
    /// kubernetes.default.svc) from a fresh test CA, requiring `Authorization: Bearer <token>`
    /// (401 and a Status otherwise), and writes a kubeconfig for it.
    pub fn start(tag: &str) -> ApiServer {
        let ca = TestCa::new(&format!("mcpwarden test apiserver CA {tag}"));
        let cert = ca.issue(
            &["127.0.0.1", "localhost", "kubernetes.default.svc"],
            Validity::Current,
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .expect("TLS versions for the ring provider")
            .with_no_client_auth()
            .with_single_cert(cert.chain.clone(), cert.key.clone_key())
            .unwrap_or_else(|e| panic!("ApiServer TLS certificate and key: {e}"));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("ApiServer: bind 127.0.0.1:0: {e}"));
        listener
            .set_nonblocking(true)
            .expect("ApiServer: set the listener non-blocking");
        let addr = listener.local_addr().expect("ApiServer: local address");

        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let token =
            crate::sha256_hex(format!("{tag}-{}-{nanos}-{addr}", std::process::id()).as_bytes())
                [..40]
                .to_string();

        let dir = TempDir::new(&format!("apiserver-{tag}"));
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(
                addr,
                &crate::base64_encode(ca.cert_pem().as_bytes()),
                &token,
            ),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", kubeconfig.display()));

        let shared = Arc::new(Shared {
            token,
            unavailable: Default::default(),
            state: Mutex::new(State {
                rv: 1000,
                compacted: 0,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                watches: Vec::new(),
                pages: VecDeque::new(),
                seq: 0,
            }),
            seen: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let server = ServerThread::spawn(format!("apiserver-{tag}"), move |rx| {
            serve(listener, acceptor, s, rx)
        });
        ApiServer {
            addr,
            kubeconfig,
            ca_pem: ca.cert_pem(),
            shared,
            _server: server,
            _dir: dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A kubeconfig file (server https://127.0.0.1:PORT, certificate-authority-data, user
    /// token) for the agent.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// The test CA's certificate (PEM) that signed the server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> String {
        self.shared.state().rv.to_string()
    }

    /// Create or replace a pod (by metadata.namespace, default `default`, and metadata.name):
    /// ADDED if new, else MODIFIED. Sets kind, apiVersion, metadata.uid (kept from the stored
    /// pod if the new one has none) and metadata.resourceVersion (a new global one). Returns
    /// the stored pod.
    pub fn apply_pod(&self, pod: Value) -> Value {
        self.shared.state().apply(Kind::Pod, pod)
    }

    /// Delete a pod: a DELETED event with its last state (at a new resourceVersion).
    /// Panics if there is no such pod.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.delete(Kind::Pod, namespace, name);
    }

    /// As [`ApiServer::apply_pod`], for a discovery.k8s.io/v1 EndpointSlice.
    pub fn apply_endpointslice(&self, slice: Value) -> Value {
        self.shared.state().apply(Kind::EndpointSlice, slice)
    }

    /// As [`ApiServer::delete_pod`], for an EndpointSlice.
    pub fn delete_endpointslice(&self, namespace: &str, name: &str) {
        self.delete(Kind::EndpointSlice, namespace, name);
    }

    /// As [`ApiServer::apply_pod`], for a Node (cluster-scoped: metadata.namespace is removed).
    pub fn apply_node(&self, node: Value) -> Value {
        self.shared.state().apply(Kind::Node, node)
    }

    /// The stored node (as a GET returns it).
    pub fn node(&self, name: &str) -> Option<Value> {
        self.object(Kind::Node, "", name)
    }

    /// The stored pod.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.object(Kind::Pod, namespace, name)
    }

    /// As [`ApiServer::apply_pod`], for an `Approval` (mcpwarden.io/v1alpha1), stored whole
    /// (`status` included) and without admission; sets metadata.generation and
    /// creationTimestamp as for a custom resource.
    pub fn apply_approval(&self, approval: Value) -> Value {
        self.shared.state().apply(Kind::Approval, approval)
    }

    /// The stored approval (as a GET returns it).
    pub fn approval(&self, namespace: &str, name: &str) -> Option<Value> {
        self.object(Kind::Approval, namespace, name)
    }

    /// Every stored approval in `namespace`, by name.
    pub fn approvals(&self, namespace: &str) -> Vec<Value> {
        self.shared
            .state()
            .objects
            .iter()
            .filter(|((kind, ns, _), _)| *kind == Kind::Approval && ns == namespace)
            .map(|(_, obj)| obj.clone())
            .collect()
    }

    /// As [`ApiServer::delete_pod`], for an approval.
    pub fn delete_approval(&self, namespace: &str, name: &str) {
        self.delete(Kind::Approval, namespace, name);
    }

    /// What `kubectl patch approval NAME --type merge -p PATCH` does when `user` runs it: a
    /// merge patch of the object (its `status` stays as it was), admitted as the
    /// ValidatingAdmissionPolicy `mcpwarden-approvals` (deploy/kustomize/base/approvals.yaml)
    /// admits it, and as the CRD's schema restricts `spec.decision`. Returns the stored object,
    /// or the API server's refusal (`NotFound: ...`, `Forbidden: ...`, `Invalid: ...`).
    pub fn patch_approval_as(
        &self,
        namespace: &str,
        name: &str,
        user: &str,
        patch: Value,
    ) -> Result<Value, String> {
        let mut st = self.shared.state();
        let key = (Kind::Approval, namespace.to_string(), name.to_string());
        let Some(current) = st.objects.get(&key).cloned() else {
            return Err(format!(
                "NotFound: {} \"{name}\" not found",
                Kind::Approval.resource()
            ));
        };
        let mut patched = current.clone();
        json_patch::merge(&mut patched, &patch);
        let patched = with_status_of(&patched, &current);
        if let Some(d) = patched.pointer("/spec/decision") {
            if !matches!(d.as_str(), Some("approve" | "deny")) {
                return Err(format!(
                    "Invalid: Approval.mcpwarden.io \"{name}\" is invalid: spec.decision: \
                     Unsupported value: {d}: supported values: \"approve\", \"deny\""
                ));
            }
        }
        admit_approval_update(&current, &patched, user).map_err(|why| {
            format!(
                "Forbidden: approvals.mcpwarden.io \"{name}\" is forbidden: \
                 ValidatingAdmissionPolicy 'mcpwarden-approvals' with binding \
                 'mcpwarden-approvals' denied request: {why}"
            )
        })?;
        if patched == current {
            return Ok(current);
        }
        Ok(st.apply(Kind::Approval, patched))
    }

    fn object(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let key = (kind, namespace.to_string(), name.to_string());
        self.shared.state().objects.get(&key).cloned()
    }

    fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        if self.shared.state().delete(kind, namespace, name).is_none() {
            panic!("ApiServer: no {} {namespace}/{name} to delete", kind.kind());
        }
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many watches are open (a watch counts from when its request is in
    /// [`ApiServer::requests`] until its stream ends or its client goes away).
    pub fn open_watches(&self) -> usize {
        let mut st = self.shared.state();
        st.watches.retain(|tx| !tx.is_closed());
        st.watches.len()
    }

    /// Sends a BOOKMARK (kind, apiVersion, metadata.resourceVersion only) to every open watch
    /// that asked for bookmarks (`allowWatchBookmarks=true`, as kube's watcher does), at a new
    /// global resourceVersion (as if other resources had changed meanwhile). Returns that
    /// resourceVersion.
    pub fn bookmark(&self) -> String {
        let mut st = self.shared.state();
        let rv = st.bump();
        st.broadcast(|| WatchMsg::Bookmark(rv));
        rv.to_string()
    }

    /// Ends every open watch with an ERROR event carrying a 410 `Expired` Status, and makes
    /// watches and continue tokens from any resourceVersion older than now get the same (the
    /// history is dropped, as by an etcd compaction): clients must re-list.
    pub fn expire_watches(&self) {
        let mut st = self.shared.state();
        let rv = st.bump();
        st.compacted = rv;
        st.history.clear();
        st.broadcast(|| WatchMsg::Expire(rv));
    }

    /// Ends every open watch cleanly (the stream ends as at its `timeoutSeconds`): clients
    /// resume watching from the last resourceVersion they saw.
    /// While `down`, every request is answered 503 (a Status, reason ServiceUnavailable) and
    /// open watches end: the API server is unreachable for its clients.
    pub fn set_unavailable(&self, down: bool) {
        self.shared
            .unavailable
            .store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            self.end_watches();
        }
    }

    pub fn end_watches(&self) {
        let mut st = self.shared.state();
        st.broadcast(|| WatchMsg::End);
        st.watches.clear();
    }

    /// Waits until a request matching `pred` was answered and returns the first such;
    /// panics after `timeout`, listing the requests seen.
    pub fn wait_for_request(&self, pred: impl Fn(&Seen) -> bool, timeout: Duration) -> Seen {
        self.wait_for_requests(pred, 1, timeout).remove(0)
    }

    /// Waits until `count` requests matching `pred` were answered and returns all matching
    /// ones; panics after `timeout`, listing the requests seen.
    pub fn wait_for_requests(
        &self,
        pred: impl Fn(&Seen) -> bool,
        count: usize,
        timeout: Duration,
    ) -> Vec<Seen> {
        crate::wait_for(timeout, || {
            let found: Vec<Seen> = self.requests().into_iter().filter(|s| pred(s)).collect();
            (found.len() >= count).then_some(found)
        })
        .unwrap_or_else(|| {
            let seen: Vec<String> = self
                .requests()
                .iter()
                .map(|s| {
                    format!(
                        "  {} {}?{} ({}, {}, authorized: {})",
                        s.method, s.path, s.query, s.verb, s.status, s.authorized
                    )
                })
                .collect();
            panic!(
                "ApiServer: fewer than {count} matching requests within {timeout:?}; requests seen:\n{}",
                seen.join("\n")
            )
        })
    }
}

fn kubeconfig_yaml(addr: SocketAddr, ca_base64: &str, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: mcpwarden-test
  cluster:
    server: https://{addr}
    certificate-authority-data: {ca_base64}
users:
- name: mcpwarden-test-agent
  user:
    token: {token}
contexts:
- name: mcpwarden-test
  context:
    cluster: mcpwarden-test
    user: mcpwarden-test-agent
    namespace: default
current-context: mcpwarden-test
preferences: {{}}
"
    )
}

fn set_type(obj: &mut Value, kind: Kind) {
    if let Some(map) = obj.as_object_mut() {
        map.insert("kind".into(), json!(kind.kind()));
        map.insert("apiVersion".into(), json!(kind.api_version()));
    }
}

/// A list item as kube-apiserver sends it: without kind and apiVersion.
fn list_item(obj: &Value) -> Value {
    let mut item = obj.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    item
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[derive(Debug)]
enum FieldReq {
    Eq(String, String),
    Ne(String, String),
}

#[derive(Debug)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Which objects a list or watch selects.
#[derive(Debug)]
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    fields: Vec<FieldReq>,
    labels: Vec<LabelReq>,
}

impl Filter {
    fn new(
        kind: Kind,
        namespace: Option<String>,
        params: &[(String, String)],
    ) -> Result<Filter, String> {
        let mut fields = Vec::new();
        let mut labels = Vec::new();
        if let Some(s) = param(params, "fieldSelector") {
            fields = parse_fields(kind, s)?;
        }
        if let Some(s) = param(params, "labelSelector") {
            labels = parse_labels(s)?;
        }
        Ok(Filter {
            kind,
            namespace,
            fields,
            labels,
        })
    }

    fn selective(&self) -> bool {
        !self.fields.is_empty() || !self.labels.is_empty()
    }

    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if obj.pointer("/metadata/namespace").and_then(Value::as_str) != Some(ns) {
                return false;
            }
        }
        let fields_ok = self.fields.iter().all(|req| match req {
            FieldReq::Eq(k, v) => field_value(obj, k) == *v,
            FieldReq::Ne(k, v) => field_value(obj, k) != *v,
        });
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        fields_ok
            && self.labels.iter().all(|req| match req {
                LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
                LabelReq::Ne(k, v) => label(k) != Some(v.as_str()),
                LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
                LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
                LabelReq::Exists(k) => label(k).is_some(),
                LabelReq::NotExists(k) => label(k).is_none(),
            })
    }
}

/// The value of a field label as kube-apiserver compares it: a string; booleans as
/// `true`/`false` (absent = `false`); anything absent as the empty string.
fn field_value(obj: &Value, field: &str) -> String {
    let mut v = Some(obj);
    for part in field.split('.') {
        v = v.and_then(|x| x.get(part));
    }
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ if matches!(field, "spec.hostNetwork" | "spec.unschedulable") => "false".into(),
        _ => String::new(),
    }
}

fn parse_fields(kind: Kind, selector: &str) -> Result<Vec<FieldReq>, String> {
    let mut reqs = Vec::new();
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (key, value, negated) = if let Some((k, v)) = term.split_once("!=") {
            (k, v, true)
        } else if let Some((k, v)) = term.split_once("==") {
            (k, v, false)
        } else if let Some((k, v)) = term.split_once('=') {
            (k, v, false)
        } else {
            return Err(format!(
                "invalid selector: '{selector}'; can't understand '{term}'"
            ));
        };
        let key = key.trim();
        if !kind.fields().contains(&key) {
            return Err(format!("field label not supported: {key}"));
        }
        let (key, value) = (key.to_string(), value.trim().to_string());
        reqs.push(if negated {
            FieldReq::Ne(key, value)
        } else {
            FieldReq::Eq(key, value)
        });
    }
    Ok(reqs)
}

fn parse_labels(selector: &str) -> Result<Vec<LabelReq>, String> {
    let bad = |term: &str| format!("unable to parse requirement: found '{term}' in '{selector}'");
    let valid_key = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    };
    let mut reqs = Vec::new();
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let req = if let Some(key) = term.strip_prefix('!') {
            LabelReq::NotExists(key.trim().to_string())
        } else if let Some(open) = term.find('(') {
            let Some(inner) = term[open + 1..].strip_suffix(')') else {
                return Err(bad(term));
            };
            let values: Vec<String> = inner
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            let head = term[..open].trim_end();
            if let Some(key) = head.strip_suffix("notin").filter(|k| k.ends_with(' ')) {
                LabelReq::NotIn(key.trim().to_string(), values)
            } else if let Some(key) = head.strip_suffix("in").filter(|k| k.ends_with(' ')) {
                LabelReq::In(key.trim().to_string(), values)
            } else {
                return Err(bad(term));
            }
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelReq::Ne(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = term.split_once("==") {
            LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = term.split_once('=') {
            LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
        } else {
            LabelReq::Exists(term.to_string())
        };
        let key = match &req {
            LabelReq::Eq(k, _)
            | LabelReq::Ne(k, _)
            | LabelReq::In(k, _)
            | LabelReq::NotIn(k, _)
            | LabelReq::Exists(k)
            | LabelReq::NotExists(k) => k,
        };
        if !valid_key(key) {
            return Err(bad(term));
        }
        reqs.push(req);
    }
    Ok(reqs)
}

// ---------------------------------------------------------------------------------------------
// HTTP

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A resource path: the kind, the namespace (for namespaced paths), the name (for objects),
/// the subresource (`status`, for kinds that have it).
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ((*v).to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, plural, name, subresource) = match rest {
        [plural] => (None, *plural, None, None),
        [plural, name] => (None, *plural, Some(*name), None),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
        ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
        _ => return None,
    };
    let kind = Kind::from_path(&gv, plural)?;
    if subresource.is_some_and(|sub| sub != "status" || !kind.has_status()) {
        return None;
    }
    if namespace.is_some() && !kind.namespaced() {
        return None;
    }
    if name.is_some() && namespace.is_none() && kind.namespaced() {
        return None;
    }
    if [namespace, name].iter().flatten().any(|s| s.is_empty()) {
        return None;
    }
    Some(Target {
        kind,
        namespace: namespace.map(percent_decode),
        name: name.map(percent_decode),
        subresource: subresource.map(str::to_string),
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("serialize a response");
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed())
        .expect("response")
}

fn status_json(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(details) = details {
        status["details"] = details;
    }
    status
}

fn status_response(
    code: u16,
    reason: &str,
    message: &str,
    details: Option<Value>,
) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).expect("status code"),
        &status_json(code, reason, message, details),
    )
}

fn not_found(kind: Kind, name: &str) -> Response<Body> {
    let mut details = json!({"name": name, "kind": kind.plural()});
    if let Some(group) = kind.group() {
        details["group"] = json!(group);
    }
    let resource = match kind.group() {
        Some(g) => format!("{}.{g}", kind.plural()),
        None => kind.plural().to_string(),
    };
    status_response(
        404,
        "NotFound",
        &format!("{resource} \"{name}\" not found"),
        Some(details),
    )
}

fn bad_request(message: &str) -> Response<Body> {
    status_response(400, "BadRequest", message, None)
}

fn expired_status(requested: u64, oldest: u64) -> Value {
    status_json(
        410,
        "Expired",
        &format!("too old resource version: {requested} ({oldest})"),
        None,
    )
}

async fn serve(
    listener: std::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let acceptor = acceptor.clone();
                let shared = shared.clone();
                conns.spawn(async move {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(io, svc)
                        .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        }
        while conns.try_join_next().is_some() {}
    }
    {
        let mut st = shared.state();
        st.broadcast(|| WatchMsg::End);
        st.watches.clear();
    }
    conns.abort_all();
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let version = format!("{:?}", req.version());
    let authorized = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t.trim() == shared.token);
    let params = parse_query(&query);
    let target = parse_path(&path);
    let watch = matches!(param(&params, "watch"), Some("true" | "1"));
    let verb = match (&method, &target) {
        (&Method::GET, Some(t)) if t.name.is_none() && watch => "watch".to_string(),
        (&Method::GET, Some(t)) if t.name.is_none() => "list".to_string(),
        (&Method::GET, Some(_)) => "get".to_string(),
        (&Method::PATCH, Some(t)) if t.name.is_some() => "patch".to_string(),
        (&Method::POST, Some(t)) if t.name.is_none() => "create".to_string(),
        (&Method::DELETE, Some(t)) if t.name.is_some() && t.subresource.is_none() => {
            "delete".to_string()
        }
        (m, _) => m.as_str().to_ascii_lowercase(),
    };

    let resp = if shared.unavailable.load(std::sync::atomic::Ordering::SeqCst) {
        status_response(
            503,
            "ServiceUnavailable",
            "the API server is unavailable",
            None,
        )
    } else if !authorized {
        status_response(401, "Unauthorized", "Unauthorized", None)
    } else {
        match (target, verb.as_str()) {
            (Some(t), "watch") => start_watch(&shared, t, &params),
            (Some(t), "list") => list(&shared, t, &params),
            (Some(t), "get") => get(&shared, t),
            (Some(t), "patch") => match req.into_body().collect().await {
                Ok(body) => patch(&shared, t, content_type.as_deref(), &body.to_bytes()),
                Err(e) => bad_request(&format!("reading the request body: {e}")),
            },
            (Some(t), "create") if t.kind.writable() && t.namespace.is_some() => {
                match req.into_body().collect().await {
                    Ok(body) => create_request(&shared, t, &body.to_bytes()),
                    Err(e) => bad_request(&format!("reading the request body: {e}")),
                }
            }
            (Some(t), "delete") if t.kind.writable() => delete_request(&shared, t),
            (Some(_), _) => status_response(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                None,
            ),
            (None, _) => status_response(
                404,
                "NotFound",
                "the server could not find the requested resource",
                None,
            ),
        }
    };
    shared
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Seen {
            method: method.to_string(),
            verb,
            path,
            query,
            authorized,
            content_type,
            version,
            status: resp.status().as_u16(),
        });
    resp
}

fn list(shared: &Shared, t: Target, params: &[(String, String)]) -> Response<Body> {
    let filter = match Filter::new(t.kind, t.namespace, params) {
        Ok(f) => f,
        Err(e) => return bad_request(&e),
    };
    let limit = match param(params, "limit").filter(|s| !s.is_empty()) {
        None => 0,
        Some(s) => match s.parse::<usize>() {
            Ok(n) => n,
            Err(_) => return bad_request(&format!("invalid limit: {s:?}")),
        },
    };
    let mut st = shared.state();
    let page = match param(params, "continue").filter(|s| !s.is_empty()) {
        Some(token) => {
            let Some(i) = st.pages.iter().position(|(t, _)| t == token) else {
                return bad_request("continue key is not valid: no such continue token");
            };
            let (_, page) = st.pages.remove(i).expect("page");
            if page.rv < st.compacted {
                return status_response(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                    None,
                );
            }
            page
        }
        None => {
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|((kind, _, _), obj)| *kind == t.kind && filter.matches(obj))
                .map(|(_, obj)| list_item(obj))
                .collect();
            Page {
                rv: st.rv,
                items: Arc::new(items),
                offset: 0,
                selective: filter.selective(),
            }
        }
    };
    let total = page.items.len();
    let end = if limit == 0 {
        total
    } else {
        (page.offset + limit).min(total)
    };
    let mut metadata = Map::new();
    metadata.insert("resourceVersion".into(), json!(page.rv.to_string()));
    let items: Vec<Value> = page.items[page.offset..end].to_vec();
    if end < total {
        st.seq += 1;
        let token = crate::base64_encode(
            json!({"v": "meta.k8s.io/v1", "rv": page.rv, "start": st.seq})
                .to_string()
                .as_bytes(),
        );
        metadata.insert("continue".into(), json!(token));
        if !page.selective {
            metadata.insert("remainingItemCount".into(), json!(total - end));
        }
        st.pages.push_back((
            token,
            Page {
                offset: end,
                ..page
            },
        ));
        while st.pages.len() > PAGES_LIMIT {
            st.pages.pop_front();
        }
    }
    drop(st);
    json_response(
        StatusCode::OK,
        &json!({
            "kind": t.kind.list_kind(),
            "apiVersion": t.kind.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    )
}

fn get(shared: &Shared, t: Target) -> Response<Body> {
    let name = t.name.unwrap_or_default();
    let key = (t.kind, t.namespace.unwrap_or_default(), name.clone());
    match shared.state().objects.get(&key) {
        Some(obj) => json_response(StatusCode::OK, obj),
        None => not_found(t.kind, &name),
    }
}

fn patch(shared: &Shared, t: Target, content_type: Option<&str>, body: &[u8]) -> Response<Body> {
    let name = t.name.unwrap_or_default();
    let namespace = t.namespace.unwrap_or_default();
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let key = (t.kind, namespace.clone(), name.clone());
    let mut st = shared.state();
    let Some(current) = st.objects.get(&key).cloned() else {
        return not_found(t.kind, &name);
    };
    let mut patched = current.clone();
    match media.as_str() {
        "application/json-patch+json" => {
            let ops: json_patch::Patch = match serde_json::from_slice(body) {
                Ok(p) => p,
                Err(e) => return bad_request(&e.to_string()),
            };
            if let Err(e) = json_patch::patch(&mut patched, &ops) {
                return status_response(
                    422,
                    "Invalid",
                    "the server rejected our request due to an error in our request",
                    Some(
                        json!({"causes": [{"reason": "UnexpectedServerResponse", "message": e.to_string()}]}),
                    ),
                );
            }
        }
        "application/merge-patch+json" => {
            let p: Value = match serde_json::from_slice(body) {
                Ok(p) => p,
                Err(e) => return bad_request(&e.to_string()),
            };
            json_patch::merge(&mut patched, &p);
        }
        other => {
            return status_response(
                415,
                "UnsupportedMediaType",
                &format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json (got {other:?})"),
                None,
            );
        }
    }
    if !patched.is_object() {
        return bad_request("the patched object is not a JSON object");
    }
    let patched_name = patched.pointer("/metadata/name").and_then(Value::as_str);
    if patched_name != Some(name.as_str()) {
        return bad_request(&format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            patched_name.unwrap_or("")
        ));
    }
    if t.kind.namespaced()
        && patched
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            != Some(namespace.as_str())
    {
        return bad_request(
            "the namespace of the object does not match the namespace on the request",
        );
    }
    let current_rv = current.pointer("/metadata/resourceVersion").cloned();
    let patched_rv = patched.pointer("/metadata/resourceVersion").cloned();
    if patched_rv.is_some() && patched_rv != current_rv {
        let resource = t.kind.resource();
        return status_response(
            409,
            "Conflict",
            &format!("Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
            Some(json!({"name": name, "kind": t.kind.plural()})),
        );
    }
    if t.kind.has_status() {
        patched = if t.subresource.is_some() {
            with_status_of(&current, &patched)
        } else {
            with_status_of(&patched, &current)
        };
    }
    set_type(&mut patched, t.kind);
    patched["metadata"]["resourceVersion"] = current_rv.unwrap_or(Value::Null);
    if patched == current {
        // A no-op patch: no new resourceVersion, no event (as kube-apiserver).
        return json_response(StatusCode::OK, &current);
    }
    let stored = st.apply(t.kind, patched);
    drop(st);
    json_response(StatusCode::OK, &stored)
}

/// `object` with the `status` of `from` (none if `from` has none): a status subresource's
/// split between the object's endpoint and `/status`.
fn with_status_of(object: &Value, from: &Value) -> Value {
    let mut out = object.clone();
    if let Some(map) = out.as_object_mut() {
        match from.get("status") {
            Some(status) => map.insert("status".into(), status.clone()),
            None => map.remove("status"),
        };
    }
    out
}

/// The approver's fields of an `Approval`'s spec; the others are the agent's.
const APPROVER_FIELDS: [&str; 4] = ["decision", "decidedBy", "decisionReason", "for"];

/// The ValidatingAdmissionPolicy `mcpwarden-approvals` (deploy/kustomize/base/approvals.yaml)
/// on an UPDATE by `user`, rule by rule: Err with the refused rule's message.
fn admit_approval_update(old: &Value, new: &Value, user: &str) -> Result<(), String> {
    let empty = Map::new();
    let spec = |o: &Value| o.get("spec").and_then(Value::as_object).cloned();
    let (old_spec, new_spec) = (
        spec(old).unwrap_or_else(|| empty.clone()),
        spec(new).unwrap_or_else(|| empty.clone()),
    );
    let approver_changed = APPROVER_FIELDS
        .iter()
        .any(|k| old_spec.get(*k) != new_spec.get(*k));
    if approver_changed
        && new_spec.contains_key("decision")
        && new_spec.get("decidedBy").and_then(Value::as_str) != Some(user)
    {
        return Err(
            "spec.decidedBy must be your own user name (kubectl auth whoami) when you set spec.decision"
                .into(),
        );
    }
    let agent_keys = old_spec
        .keys()
        .chain(new_spec.keys())
        .filter(|k| !APPROVER_FIELDS.contains(&k.as_str()));
    for k in agent_keys {
        if old_spec.get(k) != new_spec.get(k) {
            return Err(
                "only spec.decision, spec.decidedBy, spec.decisionReason and spec.for may be changed"
                    .into(),
            );
        }
    }
    let label = |o: &Value| o.pointer("/metadata/labels/mcpwarden.io~1node").cloned();
    if label(old) != label(new) {
        return Err("the label mcpwarden.io/node cannot be changed".into());
    }
    let refused = old.pointer("/status/state").and_then(Value::as_str) == Some("refused");
    if old_spec.contains_key("decision") && approver_changed && !refused {
        return Err(
            "a decision, once set, cannot be changed (unless the agent refused it: status.state refused)"
                .into(),
        );
    }
    Ok(())
}

/// POST of a new object (custom resources): 201 with it as stored, 409 if it exists.
fn create_request(shared: &Shared, t: Target, body: &[u8]) -> Response<Body> {
    let namespace = t.namespace.unwrap_or_default();
    let mut obj: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return bad_request("the request body is not a JSON object"),
        Err(e) => return bad_request(&e.to_string()),
    };
    let kind_ok = obj.get("kind").and_then(Value::as_str) == Some(t.kind.kind())
        && obj.get("apiVersion").and_then(Value::as_str) == Some(t.kind.api_version());
    if !kind_ok {
        return bad_request(&format!(
            "the API version in the data ({}) and the kind ({}) do not match the request ({}, {})",
            obj.get("apiVersion").unwrap_or(&Value::Null),
            obj.get("kind").unwrap_or(&Value::Null),
            t.kind.api_version(),
            t.kind.kind(),
        ));
    }
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return invalid(
            t.kind,
            "",
            "metadata.name",
            "name or generateName is required",
        );
    };
    let Some(name) = meta
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
    else {
        return invalid(
            t.kind,
            "",
            "metadata.name",
            "name or generateName is required",
        );
    };
    match meta.get("namespace").and_then(Value::as_str) {
        None => {
            meta.insert("namespace".into(), json!(namespace));
        }
        Some(ns) if ns == namespace => {}
        Some(_) => return bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ),
    }
    // Set by the server alone.
    for key in ["uid", "resourceVersion", "generation", "creationTimestamp"] {
        meta.remove(key);
    }
    if t.kind.has_status() {
        if let Some(map) = obj.as_object_mut() {
            map.remove("status");
        }
    }
    let mut st = shared.state();
    let key = (t.kind, namespace, name.clone());
    if st.objects.contains_key(&key) {
        let mut details = json!({"name": name, "kind": t.kind.plural()});
        if let Some(group) = t.kind.group() {
            details["group"] = json!(group);
        }
        return status_response(
            409,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", t.kind.resource()),
            Some(details),
        );
    }
    let stored = st.apply(t.kind, obj);
    drop(st);
    json_response(StatusCode::CREATED, &stored)
}

/// DELETE of an object (custom resources): 200 with its last state, as a custom resource's
/// immediate deletion answers.
fn delete_request(shared: &Shared, t: Target) -> Response<Body> {
    let name = t.name.unwrap_or_default();
    let namespace = t.namespace.unwrap_or_default();
    match shared.state().delete(t.kind, &namespace, &name) {
        Some(object) => json_response(StatusCode::OK, &object),
        None => not_found(t.kind, &name),
    }
}

fn invalid(kind: Kind, name: &str, field: &str, message: &str) -> Response<Body> {
    let mut details = json!({
        "name": name,
        "kind": kind.kind(),
        "causes": [{"reason": "FieldValueRequired", "message": message, "field": field}],
    });
    if let Some(group) = kind.group() {
        details["group"] = json!(group);
    }
    status_response(
        422,
        "Invalid",
        &format!(
            "{} \"{name}\" is invalid: {field}: Required value: {message}",
            kind.kind()
        ),
        Some(details),
    )
}

// ---------------------------------------------------------------------------------------------
// Watches

/// A streaming response body fed by a watch task; the task sees the client go away as its
/// sender closing.
struct WatchBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object}))
        .expect("serialize a watch event");
    line.push(b'\n');
    Bytes::from(line)
}

/// The event a watch with `filter` gets for `change`, if any: selector transitions become
/// ADDED / DELETED, as kube-apiserver's watch cache sends them.
fn translate(change: &Change, filter: &Filter) -> Option<Bytes> {
    if change.kind != filter.kind {
        return None;
    }
    let now = filter.matches(&change.object);
    let before = change.prev.as_ref().is_some_and(|p| filter.matches(p));
    let typ = match (change.op, before, now) {
        (Op::Added, _, true) => "ADDED",
        (Op::Modified, true, true) => "MODIFIED",
        (Op::Modified, true, false) => "DELETED",
        (Op::Modified, false, true) => "ADDED",
        (Op::Deleted, true, _) => "DELETED",
        _ => return None,
    };
    Some(event_line(typ, &change.object))
}

fn start_watch(shared: &Shared, t: Target, params: &[(String, String)]) -> Response<Body> {
    let kind = t.kind;
    let filter = match Filter::new(kind, t.namespace, params) {
        Ok(f) => f,
        Err(e) => return bad_request(&e),
    };
    let timeout = match param(params, "timeoutSeconds").filter(|s| !s.is_empty()) {
        None => DEFAULT_WATCH_TIMEOUT,
        Some(s) => match s.parse::<u64>() {
            Ok(n) => n,
            Err(_) => return bad_request(&format!("invalid timeoutSeconds: {s:?}")),
        },
    };
    let from = match param(params, "resourceVersion").filter(|s| !s.is_empty() && *s != "0") {
        None => None,
        Some(s) => match s.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return status_response(
                    400,
                    "BadRequest",
                    &format!("invalid resource version: {s:?}"),
                    None,
                )
            }
        },
    };
    let bookmarks = param(params, "allowWatchBookmarks") == Some("true");

    let (out, rx_body) = mpsc::channel::<Bytes>(64);
    let mut initial = Vec::new();
    let mut msgs = None;
    let mut last_rv;
    {
        let mut st = shared.state();
        last_rv = st.rv;
        match from {
            // "Get state and start at most recent": the current objects as ADDED.
            None => {
                initial.extend(
                    st.objects
                        .iter()
                        .filter(|((k, _, _), obj)| *k == kind && filter.matches(obj))
                        .map(|(_, obj)| event_line("ADDED", obj)),
                );
            }
            Some(rv) if rv < st.compacted => {
                // As kube-apiserver: a watch that was accepted reports this as an ERROR event.
                initial.push(event_line("ERROR", &expired_status(rv, st.compacted)));
            }
            Some(rv) => {
                last_rv = rv;
                for change in st.history.iter().filter(|c| c.rv > rv) {
                    if let Some(line) = translate(change, &filter) {
                        initial.push(line);
                    }
                    last_rv = change.rv;
                }
            }
        }
        let expired = from.is_some_and(|rv| rv < st.compacted);
        if !expired {
            // Registered under the same lock as the replay: no change falls in between.
            let (tx, rx) = mpsc::unbounded_channel();
            st.watches.push(tx);
            msgs = Some(rx);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    tokio::spawn(run_watch(
        out, initial, msgs, filter, deadline, bookmarks, last_rv,
    ));
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(WatchBody(rx_body).boxed())
        .expect("response")
}

async fn run_watch(
    out: mpsc::Sender<Bytes>,
    initial: Vec<Bytes>,
    msgs: Option<mpsc::UnboundedReceiver<WatchMsg>>,
    filter: Filter,
    deadline: tokio::time::Instant,
    bookmarks: bool,
    mut last_rv: u64,
) {
    for line in initial {
        if out.send(line).await.is_err() {
            return;
        }
    }
    let Some(mut msgs) = msgs else { return };
    loop {
        let msg = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return,
            _ = out.closed() => return,
            msg = msgs.recv() => msg,
        };
        let line = match msg {
            None | Some(WatchMsg::End) => return,
            Some(WatchMsg::Change(change)) => {
                let Some(line) = translate(&change, &filter) else {
                    continue;
                };
                last_rv = change.rv;
                line
            }
            Some(WatchMsg::Bookmark(rv)) => {
                if !bookmarks {
                    continue;
                }
                last_rv = rv;
                event_line(
                    "BOOKMARK",
                    &json!({
                        "kind": filter.kind.kind(),
                        "apiVersion": filter.kind.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()},
                    }),
                )
            }
            Some(WatchMsg::Expire(oldest)) => {
                let _ = out
                    .send(event_line("ERROR", &expired_status(last_rv, oldest)))
                    .await;
                return;
            }
        };
        if out.send(line).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_selectors() {
        let q = parse_query("&watch=true&fieldSelector=spec.nodeName%3Dnode-a&labelSelector=a%3Db%2Cc+in+%28x%2C+y%29");
        assert_eq!(param(&q, "watch"), Some("true"));
        assert_eq!(param(&q, "fieldSelector"), Some("spec.nodeName=node-a"));
        let f = Filter::new(Kind::Pod, None, &q).unwrap();
        let pod = |node: &str, c: &str| json!({"metadata": {"name": "p", "namespace": "n", "labels": {"a": "b", "c": c}}, "spec": {"nodeName": node}});
        assert!(f.matches(&pod("node-a", "x")));
        assert!(!f.matches(&pod("node-b", "x")));
        assert!(!f.matches(&pod("node-a", "z")));
        assert!(parse_fields(Kind::Pod, "spec.bogus=1").is_err());
        let l = parse_labels("!gone,k!=v,m notin (1,2),e").unwrap();
        assert_eq!(l.len(), 4);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%41%"), "A%");
    }

    #[test]
    fn paths() {
        let t = parse_path("/api/v1/namespaces/ns/pods/p").unwrap();
        assert_eq!(
            (t.kind, t.namespace.as_deref(), t.name.as_deref()),
            (Kind::Pod, Some("ns"), Some("p"))
        );
        let t = parse_path("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices").unwrap();
        assert_eq!((t.kind, t.name), (Kind::EndpointSlice, None));
        assert!(parse_path("/api/v1/namespaces/ns/nodes").is_none());
        assert!(parse_path("/api/v1/pods/p").is_none());
        assert!(parse_path("/api/v1/nodes/n").is_some());
        assert!(parse_path("/apis/apps/v1/deployments").is_none());
        let t =
            parse_path("/apis/mcpwarden.io/v1alpha1/namespaces/ns/approvals/a1/status").unwrap();
        assert_eq!(
            (t.kind, t.name.as_deref(), t.subresource.as_deref()),
            (Kind::Approval, Some("a1"), Some("status"))
        );
        assert!(
            parse_path("/apis/mcpwarden.io/v1alpha1/namespaces/ns/approvals/a1/scale").is_none()
        );
        assert!(parse_path("/api/v1/namespaces/ns/pods/p/status").is_none());
        assert!(parse_path("/apis/mcpwarden.io/v1alpha1/approvals").is_some());
    }

    #[test]
    fn approval_admission() {
        let old = json!({
            "metadata": {"name": "a1", "labels": {"mcpwarden.io/node": "n"}},
            "spec": {"tool": "pay", "node": "n"},
        });
        let with = |spec: Value| {
            let mut o = old.clone();
            json_patch::merge(&mut o, &json!({ "spec": spec }));
            o
        };
        let alice = with(json!({"decision": "approve", "decidedBy": "alice"}));
        assert_eq!(admit_approval_update(&old, &alice, "alice"), Ok(()));
        assert!(
            admit_approval_update(&old, &alice, "bob").is_err(),
            "in another's name"
        );
        let no_by = with(json!({"decision": "approve"}));
        assert!(admit_approval_update(&old, &no_by, "alice").is_err());
        let rewritten =
            with(json!({"tool": "refund", "decision": "approve", "decidedBy": "alice"}));
        assert!(admit_approval_update(&old, &rewritten, "alice").is_err());
        let mut relabelled = alice.clone();
        relabelled["metadata"]["labels"]["mcpwarden.io/node"] = json!("m");
        assert!(admit_approval_update(&old, &relabelled, "alice").is_err());
        // Decided: it stands, unless the agent refused it.
        let bob = with(json!({"decision": "deny", "decidedBy": "bob"}));
        assert!(admit_approval_update(&alice, &bob, "bob").is_err());
        let mut refused = alice.clone();
        refused["status"] = json!({"state": "refused"});
        assert_eq!(admit_approval_update(&refused, &bob, "bob"), Ok(()));
        // An update that leaves the approver's fields alone needs no decidedBy of its own.
        let mut annotated = alice.clone();
        annotated["metadata"]["annotations"] = json!({"note": "x"});
        assert_eq!(admit_approval_update(&alice, &annotated, "carol"), Ok(()));
    }
}
