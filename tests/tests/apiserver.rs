//! The Kubernetes API server stand-in (`mcpwarden_tests::apiserver`) against kube's own client,
//! `watcher` and `reflector`, configured as the agent configures them: a kubeconfig file,
//! `Config::from_custom_kubeconfig`, `Client::try_from`, and kube 5 with the agent's features.
//! These tests need no privileges.

use std::sync::mpsc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::{reflector, WatchStreamExt};
use kube::{Client, Config, ResourceExt};
use mcpwarden_tests::apiserver::{ApiServer, Seen};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);
const NODE: &str = "node-a";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A kube client from a kubeconfig file, as the agent makes it.
fn client_from(rt: &tokio::runtime::Runtime, kubeconfig: &std::path::Path) -> Client {
    rt.block_on(async {
        let kc = Kubeconfig::read_from(kubeconfig).expect("read the kubeconfig");
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kube Config from the kubeconfig");
        Client::try_from(config).expect("kube Client")
    })
}

type Item<K> = Result<Event<K>, watcher::Error>;

/// Drive `stream` on `rt`, forwarding its items to the returned channel.
fn forward<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    stream: impl Stream<Item = T> + Send + 'static,
) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    rt.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if tx.send(item).is_err() {
                break;
            }
        }
    });
    rx
}

fn next<T>(rx: &mpsc::Receiver<T>) -> T {
    rx.recv_timeout(WAIT).expect("no watcher event within 10 s")
}

fn describe<K: kube::Resource>(item: &Item<K>) -> String {
    match item {
        Ok(Event::Init) => "Init".into(),
        Ok(Event::InitApply(k)) => {
            format!("InitApply({})", k.meta().name.clone().unwrap_or_default())
        }
        Ok(Event::InitDone) => "InitDone".into(),
        Ok(Event::Apply(k)) => format!("Apply({})", k.meta().name.clone().unwrap_or_default()),
        Ok(Event::Delete(k)) => format!("Delete({})", k.meta().name.clone().unwrap_or_default()),
        Err(e) => format!("Err({e})"),
    }
}

/// The next `n` events, described.
fn events<K: kube::Resource>(rx: &mpsc::Receiver<Item<K>>, n: usize) -> Vec<String> {
    (0..n).map(|_| describe(&next(rx))).collect()
}

/// The next event, which must be `Apply`/`Delete`/`InitApply`: its object.
fn object<K: kube::Resource + std::fmt::Debug>(rx: &mpsc::Receiver<Item<K>>, want: &str) -> K {
    let item = next(rx);
    let d = describe(&item);
    assert!(
        d.starts_with(&format!("{want}(")),
        "expected {want}, got {d}"
    );
    match item {
        Ok(Event::Apply(k) | Event::Delete(k) | Event::InitApply(k)) => k,
        _ => unreachable!(),
    }
}

fn assert_quiet<K: kube::Resource>(rx: &mpsc::Receiver<Item<K>>) {
    if let Ok(item) = rx.recv_timeout(Duration::from_millis(300)) {
        panic!("unexpected watcher event: {}", describe(&item));
    }
}

fn pod(ns: &str, name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": "10.1.0.7"},
    })
}

fn slice(ns: &str, name: &str, service: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

fn is_pod_list(s: &Seen) -> bool {
    s.is_list() && s.path == "/api/v1/pods"
}

fn is_pod_watch(s: &Seen) -> bool {
    s.is_watch() && s.path == "/api/v1/pods"
}

fn pods_on_node(client: Client) -> impl Stream<Item = Item<Pod>> + Send + 'static {
    watcher(
        Api::<Pod>::all(client),
        watcher::Config::default().fields(&format!("spec.nodeName={NODE}")),
    )
}

#[test]
fn pod_watcher_sees_apply_modify_delete_with_node_selector() {
    let server = ApiServer::start("pods");
    let rt = runtime();
    server.apply_pod(pod("default", "before", NODE));
    server.apply_pod(pod("default", "elsewhere", "node-b"));
    let client = client_from(&rt, server.kubeconfig());
    let rx = forward(&rt, pods_on_node(client));

    // The initial list: only this node's pod (list items carry no kind/apiVersion).
    assert_eq!(events(&rx, 1), ["Init"]);
    let first = object(&rx, "InitApply");
    assert_eq!(first.name_any(), "before");
    assert_eq!(events(&rx, 1), ["InitDone"]);

    let list = server.wait_for_request(is_pod_list, WAIT);
    let watch = server.wait_for_request(is_pod_watch, WAIT);
    for s in [&list, &watch] {
        assert!(s.authorized, "{s:?}");
        assert_eq!(s.status, 200, "{s:?}");
        assert_eq!(
            s.param("fieldSelector").as_deref(),
            Some("spec.nodeName=node-a"),
            "{s:?}"
        );
        assert!(
            s.query.contains("fieldSelector=spec.nodeName%3Dnode-a"),
            "{s:?}"
        );
    }
    assert_eq!(list.param("limit").as_deref(), Some("500"));
    assert_eq!(list.param("continue"), None);
    assert_eq!(watch.param("timeoutSeconds").as_deref(), Some("290"));
    assert_eq!(watch.param("allowWatchBookmarks").as_deref(), Some("true"));
    assert_eq!(
        watch.param("resourceVersion"),
        Some(server.resource_version()),
        "the watch resumes from the list's resourceVersion: the latest change, the other node's pod"
    );
    assert_eq!(
        list.version, "HTTP/1.1",
        "kube's client offers only http/1.1 by ALPN"
    );

    // Apply, modify, delete; the other node's pods never show.
    server.apply_pod(pod("default", "p1", "node-b"));
    server.apply_pod(pod("default", "p1", NODE)); // bound to this node: ADDED for this watch
    let added = object(&rx, "Apply");
    assert_eq!(added.name_any(), "p1");
    let mut changed = pod("default", "p1", NODE);
    changed["metadata"]["labels"]["version"] = json!("2");
    let stored = server.apply_pod(changed);
    let modified = object(&rx, "Apply");
    assert_eq!(
        modified.labels().get("version").map(String::as_str),
        Some("2")
    );
    assert_eq!(
        modified.resource_version(),
        stored["metadata"]["resourceVersion"]
            .as_str()
            .map(String::from)
    );
    assert_eq!(modified.uid(), added.uid(), "uid kept across modifications");
    server.delete_pod("default", "p1");
    let deleted = object(&rx, "Delete");
    assert_eq!(deleted.name_any(), "p1");
    assert_eq!(deleted.resource_version(), Some(server.resource_version()));
    server.apply_pod(pod("default", "p2", "node-b"));
    assert_quiet(&rx);
    assert!(server.requests().iter().all(|s| s.authorized));
}

#[test]
fn watcher_relists_after_expiry() {
    let server = ApiServer::start("expire");
    let rt = runtime();
    server.apply_pod(pod("default", "old", NODE));
    let client = client_from(&rt, server.kubeconfig());

    // As the agent: reflector store, default backoff.
    let (store, writer) = reflector::store::<Pod>();
    let stream = reflector(writer, pods_on_node(client.clone())).default_backoff();
    let rx = forward(&rt, stream);
    let names = || {
        let mut n: Vec<String> = store.state().iter().map(|p| p.name_any()).collect();
        n.sort();
        n
    };
    assert_eq!(events(&rx, 3), ["Init", "InitApply(old)", "InitDone"]);
    assert_eq!(names(), ["old"]);
    let first_watch = server.wait_for_request(is_pod_watch, WAIT);
    mcpwarden_tests::wait_for(WAIT, || (server.open_watches() == 1).then_some(()))
        .expect("the watch is open");
    let old_rv = first_watch.param("resourceVersion").unwrap();

    // Expire, then change things the expired watch never reports: only a re-list shows them.
    server.expire_watches();
    server.delete_pod("default", "old");
    server.apply_pod(pod("default", "new", NODE));
    let err = events(&rx, 1).remove(0);
    assert!(
        err.starts_with("Err(") && err.contains("too old resource version"),
        "{err}"
    );
    assert_eq!(events(&rx, 3), ["Init", "InitApply(new)", "InitDone"]);
    assert_eq!(names(), ["new"], "the re-list replaced the store");
    let lists = server.wait_for_requests(is_pod_list, 2, WAIT);
    assert_eq!(lists.len(), 2);
    let watches = server.wait_for_requests(is_pod_watch, 2, WAIT);
    assert_eq!(
        watches[1].param("resourceVersion"),
        Some(server.resource_version())
    );

    // Later changes still arrive.
    server.apply_pod(pod("default", "later", NODE));
    assert_eq!(events(&rx, 1), ["Apply(later)"]);
    assert_eq!(names(), ["later", "new"]);

    // A watch resuming from before the expiry gets ERROR 410 (as a watch event) and ends.
    let api = Api::<Pod>::all(client);
    let got: Vec<String> = rt.block_on(async {
        let stream = api
            .watch(&WatchParams::default(), &old_rv)
            .await
            .expect("watch");
        stream
            .map(|e| match e {
                Ok(WatchEvent::Error(s)) => format!("ERROR {} {} {}", s.code, s.reason, s.message),
                Ok(other) => format!("{other:?}"),
                Err(e) => format!("Err({e})"),
            })
            .collect()
            .await
    });
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("ERROR 410 Expired too old resource version:"),
        "{got:?}"
    );
}

#[test]
fn bookmarks_move_the_resume_point() {
    let server = ApiServer::start("bookmark");
    let rt = runtime();
    let client = client_from(&rt, server.kubeconfig());
    let rx = forward(&rt, pods_on_node(client));
    assert_eq!(events(&rx, 2), ["Init", "InitDone"]);
    server.apply_pod(pod("default", "p1", NODE));
    let p1 = object(&rx, "Apply");
    mcpwarden_tests::wait_for(WAIT, || (server.open_watches() == 1).then_some(()))
        .expect("the watch is open");

    // Other resources move on (p2 is on another node), then a bookmark: the watcher must
    // resume from the bookmark's resourceVersion, not from p1's.
    server.apply_pod(pod("default", "p2", "node-b"));
    let bookmark = server.bookmark();
    assert!(
        bookmark.parse::<u64>().unwrap() > p1.resource_version().unwrap().parse::<u64>().unwrap()
    );
    server.end_watches();
    let resumed = server.wait_for_request(
        |s| is_pod_watch(s) && s.param("resourceVersion").as_deref() == Some(bookmark.as_str()),
        WAIT,
    );
    assert_eq!(resumed.status, 200);
    assert_quiet(&rx);
    server.apply_pod(pod("default", "p3", NODE));
    assert_eq!(events(&rx, 1), ["Apply(p3)"]);
    assert_eq!(
        server.requests().iter().filter(|s| is_pod_list(s)).count(),
        1,
        "no re-list"
    );
}

#[test]
fn list_pages_with_continue_tokens() {
    let server = ApiServer::start("pages");
    let rt = runtime();
    for i in 0..5 {
        server.apply_pod(pod("default", &format!("p{i}"), NODE));
    }
    server.apply_pod(pod("default", "elsewhere", "node-b"));
    let client = client_from(&rt, server.kubeconfig());
    let stream = watcher(
        Api::<Pod>::all(client),
        watcher::Config::default()
            .fields(&format!("spec.nodeName={NODE}"))
            .page_size(2),
    );
    let rx = forward(&rt, stream);
    assert_eq!(
        events(&rx, 7),
        [
            "Init",
            "InitApply(p0)",
            "InitApply(p1)",
            "InitApply(p2)",
            "InitApply(p3)",
            "InitApply(p4)",
            "InitDone"
        ]
    );
    let lists = server.wait_for_requests(is_pod_list, 3, WAIT);
    assert_eq!(lists.len(), 3);
    assert_eq!(lists[0].param("continue"), None);
    assert!(lists[1].param("continue").is_some_and(|c| !c.is_empty()));
    assert!(lists[2].param("continue").is_some_and(|c| !c.is_empty()));
    assert!(lists
        .iter()
        .all(|l| l.param("limit").as_deref() == Some("2")));
}

#[test]
fn endpointslices_by_service_label_in_a_namespace() {
    let server = ApiServer::start("slices");
    let rt = runtime();
    server.apply_endpointslice(slice("shop", "cart-abc", "cart", "10.2.0.1"));
    server.apply_endpointslice(slice("shop", "db-xyz", "db", "10.2.0.9"));
    server.apply_endpointslice(slice("other", "cart-zzz", "cart", "10.3.0.1"));
    let client = client_from(&rt, server.kubeconfig());
    let stream = watcher(
        Api::<EndpointSlice>::namespaced(client, "shop"),
        watcher::Config::default().labels("kubernetes.io/service-name=cart"),
    );
    let rx = forward(&rt, stream);
    assert_eq!(events(&rx, 3), ["Init", "InitApply(cart-abc)", "InitDone"]);
    let list = server.wait_for_request(|s| s.is_list(), WAIT);
    assert_eq!(
        list.path,
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"
    );
    assert_eq!(
        list.param("labelSelector").as_deref(),
        Some("kubernetes.io/service-name=cart")
    );
    let watch = server.wait_for_request(|s| s.is_watch(), WAIT);
    assert_eq!(watch.path, list.path);
    assert_eq!(watch.param("labelSelector"), list.param("labelSelector"));

    // A second slice, a change of addresses, then a relabel away from the service (the
    // selector-filtered watch reports it as a deletion) and a real deletion.
    server.apply_endpointslice(slice("shop", "cart-def", "cart", "10.2.0.2"));
    assert_eq!(object(&rx, "Apply").name_any(), "cart-def");
    server.apply_endpointslice(slice("shop", "cart-abc", "cart", "10.2.0.5"));
    let changed = object(&rx, "Apply");
    assert_eq!(changed.endpoints[0].addresses, ["10.2.0.5"]);
    server.apply_endpointslice(slice("other", "cart-zzz", "cart", "10.3.0.2"));
    server.apply_endpointslice(slice("shop", "db-xyz", "db", "10.2.0.8"));
    server.apply_endpointslice(slice("shop", "cart-def", "not-cart", "10.2.0.2"));
    assert_eq!(object(&rx, "Delete").name_any(), "cart-def");
    server.delete_endpointslice("shop", "cart-abc");
    assert_eq!(object(&rx, "Delete").name_any(), "cart-abc");
    server.delete_endpointslice("shop", "cart-def");
    assert_quiet(&rx);
}

#[test]
fn node_get_and_json_patch_removing_a_taint() {
    let server = ApiServer::start("nodes");
    let rt = runtime();
    let taint = json!({"key": "mcpwarden.io/agent-not-ready", "effect": "NoSchedule"});
    let other = json!({"key": "dedicated", "value": "mcp", "effect": "NoExecute"});
    server.apply_node(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        "spec": {"taints": [taint, other]},
    }));
    let client = client_from(&rt, server.kubeconfig());
    let api = Api::<Node>::all(client.clone());
    let rx = forward(
        &rt,
        watcher(
            api.clone(),
            watcher::Config::default().fields(&format!("metadata.name={NODE}")),
        ),
    );
    assert_eq!(events(&rx, 3), ["Init", "InitApply(node-a)", "InitDone"]);

    let node = rt.block_on(api.get(NODE)).expect("GET the node");
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    assert_eq!(taints.len(), 2);
    match rt.block_on(api.get("missing")) {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"), "{s:?}");
            assert_eq!(s.message, "nodes \"missing\" not found");
        }
        other => panic!("expected 404, got {other:?}"),
    }

    // Remove the taint: test the current list, replace it without the taint.
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/taints", "value": [taint, other]},
        {"op": "replace", "path": "/spec/taints", "value": [other]},
    ]))
    .unwrap();
    let before_rv = node.resource_version().unwrap();
    let patched = rt
        .block_on(api.patch(
            NODE,
            &PatchParams::default(),
            &Patch::Json::<()>(patch.clone()),
        ))
        .expect("PATCH the node");
    let taints = patched
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    assert_eq!(taints.len(), 1);
    assert_eq!(taints[0].key, "dedicated");
    assert_ne!(patched.resource_version().unwrap(), before_rv);
    assert_eq!(server.node(NODE).unwrap()["spec"]["taints"], json!([other]));
    let seen = server.wait_for_request(|s| s.verb == "patch", WAIT);
    assert_eq!(seen.path, "/api/v1/nodes/node-a");
    assert_eq!(
        seen.content_type.as_deref(),
        Some("application/json-patch+json")
    );
    let watched = object(&rx, "Apply");
    assert_eq!(watched.resource_version(), patched.resource_version());

    // The same patch again: its `test` fails now.
    match rt.block_on(api.patch(NODE, &PatchParams::default(), &Patch::Json::<()>(patch))) {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"), "{s:?}")
        }
        other => panic!("expected 422, got {other:?}"),
    }
    assert_eq!(server.node(NODE).unwrap()["spec"]["taints"], json!([other]));

    // test + remove of the last taint.
    let remove: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/taints", "value": [other]},
        {"op": "remove", "path": "/spec/taints"},
    ]))
    .unwrap();
    let patched = rt
        .block_on(api.patch(NODE, &PatchParams::default(), &Patch::Json::<()>(remove)))
        .expect("PATCH the node");
    assert!(patched
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_none());
    assert_eq!(
        object(&rx, "Apply").resource_version(),
        patched.resource_version()
    );
}

#[test]
fn wrong_token_gets_401_status() {
    let server = ApiServer::start("auth");
    let rt = runtime();
    let text = std::fs::read_to_string(server.kubeconfig()).unwrap();
    assert!(text.contains(server.token()));
    let dir = mcpwarden_tests::TempDir::new("apiserver-auth");
    let wrong = dir.path().join("kubeconfig");
    std::fs::write(&wrong, text.replace(server.token(), "not-the-token")).unwrap();
    let client = client_from(&rt, &wrong);
    match rt.block_on(Api::<Node>::all(client).get(NODE)) {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (401, "Unauthorized"), "{s:?}")
        }
        other => panic!("expected 401, got {other:?}"),
    }
    let seen = server.wait_for_request(|s| s.verb == "get", WAIT);
    assert!(!seen.authorized);
    assert_eq!(seen.status, 401);
}

/// kube's client speaks HTTP/1.1; the stand-in also serves HTTP/2 (ALPN h2), e.g. for
/// client-go style clients: a list and a watch stream over h2.
#[test]
fn http2_list_and_watch() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = ApiServer::start("h2");
    let rt = runtime();
    server.apply_pod(pod("default", "p1", NODE));
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(server.ca_pem().as_bytes()).unwrap()])
        .http2_prior_knowledge()
        .build()
        .expect("reqwest client");
    rt.block_on(async {
        let url = format!("{}/api/v1/namespaces/default/pods", server.url());
        let resp = client
            .get(&url)
            .bearer_auth(server.token())
            .send()
            .await
            .expect("list");
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        let list: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(list["kind"], "PodList");
        assert_eq!(list["apiVersion"], "v1");
        assert_eq!(
            list["metadata"]["resourceVersion"],
            json!(server.resource_version())
        );
        assert_eq!(list["items"][0]["metadata"]["name"], "p1");
        assert!(
            list["items"][0].get("kind").is_none(),
            "list items carry no kind"
        );

        // A watch without resourceVersion: the current state as ADDED, then changes.
        let mut watch = client
            .get(format!("{url}?watch=true&timeoutSeconds=5"))
            .bearer_auth(server.token())
            .send()
            .await
            .expect("watch");
        assert_eq!(watch.version(), reqwest::Version::HTTP_2);
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        while lines.len() < 2 {
            if lines.len() == 1 {
                server.apply_pod(pod("default", "p2", "node-b"));
            }
            let chunk = tokio::time::timeout(WAIT, watch.chunk())
                .await
                .expect("a watch event within 10 s")
                .expect("watch body")
                .expect("watch still open");
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                lines.push(serde_json::from_slice::<Value>(&line).unwrap());
            }
        }
        assert_eq!(lines[0]["type"], "ADDED");
        assert_eq!(lines[0]["object"]["kind"], "Pod");
        assert_eq!(lines[0]["object"]["metadata"]["name"], "p1");
        assert_eq!(lines[1]["type"], "ADDED");
        assert_eq!(lines[1]["object"]["metadata"]["name"], "p2");
    });
    let seen = server.wait_for_request(|s| s.is_watch(), WAIT);
    assert_eq!(seen.version, "HTTP/2.0");
}
