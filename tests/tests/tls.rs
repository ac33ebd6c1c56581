//! TLS interception: https:// servers by name and by address, over HTTP/1.1 and HTTP/2, under
//! the same policy and audit as plaintext; refused names, bad upstream certificates, domain
//! fronting, client-certificate upstreams, passthrough, and the CA key's privacy.
//!
//! Each test has its own cgroup, 127.0.0.x address (indices 40–49), hostname (an /etc/hosts
//! entry removed on drop), upstream test CA and agent state directory.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use mcpwarden_tests::hosts::HostsEntry;
use mcpwarden_tests::{
    require_root, run_client_env, test_ip, Agent, AgentOpts, ClientRun, TestCa, TestCgroup,
    TestServer, TlsOpts, Validity,
};
use serde_json::{json, Value};

/// A test's world; fields drop in order: agent, servers, hosts entry, cgroup, files.
struct TlsRig {
    agent: Agent,
    servers: Vec<TestServer>,
    _hosts: HostsEntry,
    cg: TestCgroup,
    app: PathBuf,
    ip: std::net::Ipv4Addr,
    host: String,
    upstream_ca: TestCa,
    files: mcpwarden_tests::TempDir,
}

/// What a test's servers present.
enum Cert {
    /// Issued by the upstream CA the agent trusts, for the test's hostname and address.
    Good,
    /// By a CA the agent does not trust.
    Untrusted,
    Expired,
    /// For another name.
    WrongName,
}

struct Upstream {
    cert: Cert,
    require_client_cert: bool,
}

impl Upstream {
    fn good() -> Upstream {
        Upstream {
            cert: Cert::Good,
            require_client_cert: false,
        }
    }
}

impl TlsRig {
    /// Servers as asked, each at `https://t<index>.mcpwarden.test:<port>/mcp` (or the address
    /// when `by_ip`), and an agent protecting them with [`POLICY`], trusting the upstream CA.
    fn start(name: &str, index: u8, upstreams: Vec<Upstream>, by_ip: bool) -> TlsRig {
        Self::start_with(name, index, upstreams, by_ip, None, &[])
    }

    /// With `config`: the agent reads this YAML (its `servers:` replacing the --endpoint
    /// flags), `{URL0}`, `{UPSTREAM_CA}` and `{POLICY}` filled in.
    fn start_with(
        name: &str,
        index: u8,
        upstreams: Vec<Upstream>,
        by_ip: bool,
        config: Option<&str>,
        agent_args: &[&str],
    ) -> TlsRig {
        require_root();
        let files = mcpwarden_tests::TempDir::new(&format!("tls-{name}"));
        let cg = TestCgroup::new(name);
        let app = cg.child("app");
        let agent_cg = cg.path().join("agent");
        let ip = test_ip(index);
        let host = format!("t{index}.mcpwarden.test");
        let hosts = HostsEntry::add(&host, IpAddr::V4(ip));
        let upstream_ca = TestCa::new(&format!("upstream CA of {name}"));
        let other_ca = TestCa::new("a CA nobody trusts");
        let ca_path = files.path().join("upstream-ca.pem");
        upstream_ca.write_pem(&ca_path);
        let ip_text = ip.to_string();
        let servers: Vec<TestServer> = upstreams
            .iter()
            .map(|u| {
                let sans = [host.as_str(), ip_text.as_str()];
                let cert = match u.cert {
                    Cert::Good => upstream_ca.issue(&sans, Validity::Current),
                    Cert::Untrusted => other_ca.issue(&sans, Validity::Current),
                    Cert::Expired => upstream_ca.issue(&sans, Validity::Expired),
                    Cert::WrongName => {
                        upstream_ca.issue(&["someone-else.test", "127.0.0.254"], Validity::Current)
                    }
                };
                let mut opts = TlsOpts::new(cert);
                opts.require_client_cert = u.require_client_cert;
                opts.extra_hosts = vec![host.clone()];
                TestServer::start_tls(SocketAddr::new(IpAddr::V4(ip), 0), opts)
            })
            .collect();
        let urls: Vec<String> = servers
            .iter()
            .map(|s| s.https_url(if by_ip { &ip_text } else { &host }))
            .collect();
        let listen_v4 = mcpwarden_tests::free_addr(ip);
        let listen_v6 = mcpwarden_tests::free_addr(std::net::Ipv6Addr::LOCALHOST);
        let (endpoints, mut extra) = match config {
            None => (
                urls.iter()
                    .map(|u| (u.clone(), POLICY.to_string()))
                    .collect(),
                vec!["--upstream-ca".to_string(), ca_path.display().to_string()],
            ),
            Some(yaml) => {
                let policy = files.path().join("policy.json");
                std::fs::write(&policy, POLICY).expect("write policy");
                let yaml = yaml
                    .replace(
                        "{URL0}",
                        urls.first().map(String::as_str).unwrap_or_default(),
                    )
                    .replace(
                        "{URL0_IP}",
                        &servers
                            .first()
                            .map(|s| s.https_url(&ip_text))
                            .unwrap_or_default(),
                    )
                    .replace("{UPSTREAM_CA}", &ca_path.display().to_string())
                    .replace("{POLICY}", &policy.display().to_string());
                let file = files.path().join("mcpwarden.yaml");
                std::fs::write(&file, yaml).expect("write config");
                (
                    Vec::new(),
                    vec!["--config".to_string(), file.display().to_string()],
                )
            }
        };
        extra.extend(agent_args.iter().map(|a| a.to_string()));
        let agent = Agent::start_with(
            AGENT_BIN,
            AgentOpts {
                name: name.to_string(),
                endpoints,
                listen: vec![listen_v4, listen_v6],
                cgroup: app.clone(),
                agent_cgroup: agent_cg,
            },
            &extra,
        );
        TlsRig {
            agent,
            servers,
            _hosts: hosts,
            cg,
            app,
            ip,
            host,
            upstream_ca,
            files,
        }
    }

    fn server(&self) -> &TestServer {
        &self.servers[0]
    }

    fn url(&self, i: usize) -> String {
        self.servers[i].https_url(&self.host)
    }

    fn agent_ca(&self) -> String {
        self.agent.ca_cert_path().display().to_string()
    }

    /// mcp-client in the attached cgroup, trusting only `ca_file` (SSL_CERT_FILE).
    fn client_trusting(&self, ca_file: &str, args: &[&str]) -> ClientRun {
        run_client_env(
            CLIENT_BIN,
            Some(&self.app),
            args,
            &[("SSL_CERT_FILE", ca_file)],
            CLIENT_TIMEOUT,
        )
    }

    /// mcp-client trusting the mcpwarden CA, as a workload on a node running the agent would.
    fn client(&self, args: &[&str]) -> ClientRun {
        self.client_trusting(&self.agent_ca(), args)
    }

    /// One hand-made TLS request to server `i` with this SNI (`-`: none) and Host.
    fn tls_raw(&self, i: usize, sni: &str, host: &str, body: &str) -> ClientRun {
        let addr = self.servers[i].addr().to_string();
        let ca = self.agent_ca();
        self.client(&[
            "tls-raw",
            &addr,
            sni,
            &ca,
            "POST",
            "/mcp",
            host,
            body,
            "Content-Type: application/json",
            "Accept: application/json, text/event-stream",
        ])
    }

    fn host_port(&self, i: usize) -> String {
        format!("{}:{}", self.host, self.servers[i].addr().port())
    }

    fn wait_audit(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.agent.wait_audit(AUDIT_WAIT, pred).unwrap_or_else(|| {
            panic!(
                "no audit record for {what}; audit:\n{}",
                self.agent.audit_text()
            )
        })
    }
}

/// Allowed, denied and unknown tools through an unmodified rmcp client in `mode`.
fn assert_policy_applies(rig: &TlsRig, mode: &str, url: &str) {
    let run = rig.client(&[
        mode,
        url,
        "echo",
        r#"{"text":"over tls"}"#,
        "drop_cluster",
        r#"{"cluster":"prod"}"#,
        "secret_dump",
        "{}",
    ]);
    run.assert_success();
    let lines = run.json_lines();
    assert_eq!(lines.len(), 3, "{}", run.describe());
    assert_eq!(result_text(&lines[0]), "over tls", "{}", run.describe());
    assert!(is_error_result(&lines[1]), "{}", run.describe());
    assert_eq!(
        result_text(&lines[1]),
        DENY_TEXT_DESTRUCTIVE,
        "{}",
        run.describe()
    );
    assert_eq!(lines[2]["error"]["code"], -32602, "{}", run.describe());
}

/// An rmcp client calling an https:// server by hostname, trusting the mcpwarden CA: the same
/// policy and audit as plaintext, over HTTP/1.1 and HTTP/2 (and the same protocol upstream).
/// The CA key is 0600 in a 0700 directory and appears in no log.
#[test]
fn https_by_hostname_is_under_policy_over_http1_and_http2() {
    let rig = TlsRig::start("tls-name", 40, vec![Upstream::good()], false);
    // By default the agent probes the server and mints its leaf at start, before any client.
    let warmed = mcpwarden_tests::wait_for(AUDIT_WAIT, || {
        rig.agent
            .log()
            .contains("TLS origins prewarmed")
            .then_some(())
    });
    assert!(
        warmed.is_some(),
        "no prewarm at start:\n{}",
        rig.agent.log()
    );
    assert_eq!(
        rig.agent.log().matches("minted a leaf certificate").count(),
        1
    );
    assert!(rig
        .server()
        .alpns()
        .iter()
        .any(|a| a.as_deref() == Some("h2")));
    let url = rig.url(0);
    for mode in ["call-h1", "call-h2", "call"] {
        assert_policy_applies(&rig, mode, &url);
    }
    let server = rig.server();
    assert_eq!(server.calls("echo"), 3);
    assert_eq!(
        rig.agent.log().matches("minted a leaf certificate").count(),
        1,
        "the prewarmed leaf serves every connection"
    );
    server.assert_not_reached("drop_cluster");
    server.assert_not_reached("secret_dump");
    let alpns = server.alpns();
    assert!(
        alpns.iter().any(|a| a.as_deref() == Some("h2")),
        "{alpns:?}"
    );
    assert!(
        alpns.iter().any(|a| a.as_deref() == Some("http/1.1")),
        "{alpns:?}"
    );
    assert!(
        server
            .snis()
            .iter()
            .all(|s| s.as_deref() == Some(rig.host.as_str())),
        "the agent must send the client's SNI upstream: {:?}",
        server.snis()
    );

    let decisions: Vec<Value> = rig.agent.decisions_for("echo");
    assert_eq!(decisions.len(), 3, "{}", rig.agent.audit_text());
    for r in &decisions {
        assert_eq!(r["tls"], "terminated", "{r}");
        assert_eq!(r["sni"], rig.host.as_str(), "{r}");
        assert_eq!(r["decision"], "allow", "{r}");
    }
    let versions: Vec<&str> = decisions
        .iter()
        .filter_map(|r| r["http_version"].as_str())
        .collect();
    assert!(
        versions.contains(&"HTTP/2") && versions.contains(&"HTTP/1.1"),
        "{versions:?}"
    );
    let denied = rig.agent.decisions_for("drop_cluster");
    assert!(
        denied
            .iter()
            .all(|r| r["decision"] == "deny" && r["tls"] == "terminated"),
        "{denied:?}"
    );
    assert_eq!(denied.len(), 3);

    // The CA key: private on disk, never in the agent's output or audit.
    let state = rig.agent.temp_dir().join("state");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&state.join("ca.key")), 0o600);
    assert_eq!(mode(&state), 0o700);
    let key = std::fs::read_to_string(state.join("ca.key")).expect("read the CA key");
    let log = rig.agent.log() + &rig.agent.audit_text();
    assert!(!log.contains("PRIVATE KEY"), "{log}");
    for line in key
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
    {
        assert!(
            !log.contains(line),
            "a line of the CA key is in the agent's output"
        );
    }
}

/// A client dialling the server's address (no SNI) gets a leaf for that address.
#[test]
fn https_by_ip_url_gets_a_leaf_for_the_address() {
    let rig = TlsRig::start("tls-ip", 41, vec![Upstream::good()], true);
    let url = rig.server().https_url(&rig.ip.to_string());
    assert_policy_applies(&rig, "call", &url);
    assert_eq!(rig.server().calls("echo"), 1);

    let ip_port = rig.server().addr().to_string();
    let run = rig.tls_raw(
        0,
        "-",
        &ip_port,
        &call_body(5, "echo", json!({"text": "raw"})),
    );
    run.assert_field("tls", "ok").assert_status(200);
    assert_eq!(
        run.field("peer-cert-sans").as_deref(),
        Some(rig.ip.to_string().as_str())
    );
    let rec = rig.wait_audit("the raw call", |r| r["event"] == "request" && r["id"] == 5);
    assert!(rec["sni"].is_null(), "{rec}");
    assert_eq!(rec["tls"], "terminated");
}

/// An SNI that is not a configured name for the destination, and plaintext bytes for an https
/// endpoint, are refused and audited; nothing reaches the server.
#[test]
fn unconfigured_names_and_non_tls_bytes_are_refused() {
    let rig = TlsRig::start("tls-refuse", 42, vec![Upstream::good()], false);
    let run = rig.tls_raw(0, "elsewhere.test", "elsewhere.test", "{}");
    assert!(run.field("tls-error").is_some(), "{}", run.describe());
    let rec = rig.wait_audit("the unconfigured SNI", |r| {
        r["event"] == "refused" && r["sni"] == "elsewhere.test"
    });
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("is not a configured endpoint name"),
        "{rec}"
    );

    let addr = rig.server().addr().to_string();
    let run = rig.client(&["tcp-echo", &addr, "POST /mcp HTTP/1.1\r\nHost: x\r\n\r\n"]);
    // Closed with at most a TLS alert (0x15), never an HTTP answer.
    let echo = run.field("echo").unwrap_or_default();
    assert!(
        echo.is_empty() || echo.starts_with('\u{15}'),
        "{}",
        run.describe()
    );
    let rec = rig.wait_audit("plaintext to an https endpoint", |r| {
        r["event"] == "refused"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("not a TLS ClientHello"))
    });
    assert_eq!(rec["pid"], run.pid, "{rec}");
    assert_eq!(rig.server().http_requests(), 0);
}

/// 100 concurrent first connections for one name (no prewarm at start): one leaf minted, the
/// same one presented to all.
#[test]
fn one_mint_for_100_concurrent_first_connections() {
    let rig = TlsRig::start_with(
        "tls-mint",
        43,
        vec![Upstream::good()],
        false,
        None,
        &["--no-tls-prewarm"],
    );
    assert_eq!(
        rig.agent.log().matches("minted a leaf certificate").count(),
        0
    );
    let addr = rig.server().addr().to_string();
    let ca = rig.agent_ca();
    let run = rig.client(&["tls-handshakes", &addr, &rig.host, &ca, "100"]);
    run.assert_success();
    run.assert_field("ok", "100")
        .assert_field("distinct-certs", "1");
    let mints = rig.agent.log().matches("minted a leaf certificate").count();
    assert_eq!(mints, 1, "{}", rig.agent.log());
}

/// Upstreams with an untrusted, an expired and a wrong-name certificate: the client gets a 502
/// that says why, nothing reaches the server, the audit records the TLS reason.
#[test]
fn bad_upstream_certificates_get_502_and_nothing_is_forwarded() {
    let bad = |cert| Upstream {
        cert,
        require_client_cert: false,
    };
    let rig = TlsRig::start(
        "tls-badcert",
        44,
        vec![
            bad(Cert::Untrusted),
            bad(Cert::Expired),
            bad(Cert::WrongName),
        ],
        false,
    );
    for (i, (why, id)) in [
        ("UnknownIssuer", 1),
        ("expired", 2),
        ("not valid for name", 3),
    ]
    .into_iter()
    .enumerate()
    {
        let run = rig.tls_raw(
            i,
            &rig.host,
            &rig.host_port(i),
            &call_body(id, "echo", json!({"text": "x"})),
        );
        run.assert_field("tls", "ok").assert_status(502);
        let body = String::from_utf8_lossy(&run.body().unwrap_or_default()).into_owned();
        assert!(body.contains(why), "502 body must say why ({why}): {body}");
        let rec = rig.wait_audit("the failed forward", |r| {
            r["event"] == "response" && r["id"] == id
        });
        let reason = rec["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(why) && reason.contains("certificate"),
            "{rec}"
        );
        assert_eq!(rig.servers[i].http_requests(), 0, "server {i} was reached");
    }
}

/// A Host naming another server than the SNI is domain fronting: 421, nothing forwarded.
#[test]
fn host_naming_another_server_than_the_sni_gets_421() {
    let rig = TlsRig::start("tls-front", 45, vec![Upstream::good()], false);
    let run = rig.tls_raw(
        0,
        &rig.host,
        "bank.example.com",
        &call_body(9, "echo", json!({"text": "x"})),
    );
    run.assert_field("tls", "ok").assert_status(421);
    let rec = rig.wait_audit("the misdirected request", |r| {
        r["event"] == "refused" && r["status"] == 421
    });
    assert_eq!(rec["sni"], rig.host.as_str());
    assert_eq!(rig.server().http_requests(), 0);
    // The right Host on the same kind of connection goes through.
    let run = rig.tls_raw(
        0,
        &rig.host,
        &rig.host_port(0),
        &call_body(10, "echo", json!({"text": "x"})),
    );
    run.assert_status(200);
}

/// An upstream that demands a client certificate cannot be terminated: 502 saying so, audited.
#[test]
fn an_upstream_demanding_a_client_certificate_is_reported() {
    let rig = TlsRig::start(
        "tls-mtls",
        46,
        vec![Upstream {
            cert: Cert::Good,
            require_client_cert: true,
        }],
        false,
    );
    let run = rig.tls_raw(
        0,
        &rig.host,
        &rig.host_port(0),
        &call_body(3, "echo", json!({"text": "x"})),
    );
    run.assert_field("tls", "ok").assert_status(502);
    let body = String::from_utf8_lossy(&run.body().unwrap_or_default()).into_owned();
    assert!(
        body.contains("client certificate") && body.contains("passthrough"),
        "{body}"
    );
    let rec = rig.wait_audit("the refused forward", |r| {
        r["event"] == "response" && r["id"] == 3
    });
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("client certificate"),
        "{rec}"
    );
    assert_eq!(rig.server().http_requests(), 0);
}

/// A passthrough server and an inspected one at the same address: a ClientHello without SNI
/// could be for either, so it is refused, never passed through; one naming the passthrough
/// server is passed through.
#[test]
fn a_hello_that_does_not_settle_passthrough_or_inspection_is_refused() {
    let rig = TlsRig::start_with(
        "tls-mixed",
        48,
        vec![Upstream::good()],
        false,
        Some(
            "servers:\n  - name: passed\n    url: {URL0}\n    policy: {POLICY}\n    tls: passthrough\n  \
             - name: inspected\n    url: {URL0_IP}\n    policy: {POLICY}\n    upstream_ca: {UPSTREAM_CA}\n",
        ),
        &[],
    );
    let body = call_body(4, "drop_cluster", json!({"cluster": "dev"}));
    let run = rig.tls_raw(0, "-", &rig.host_port(0), &body);
    assert!(
        !String::from_utf8_lossy(&run.stdout).contains("status="),
        "a hello without SNI got an HTTP answer: {}",
        run.describe()
    );
    let rec = rig.wait_audit("the unsettled hello", |r| {
        r["event"] == "refused"
            && r["reason"]
                .as_str()
                .is_some_and(|t| t.contains("does not settle"))
    });
    assert_eq!(rec["tls"], "terminated");
    assert_eq!(
        rig.server().http_requests(),
        0,
        "nothing was passed through"
    );
    assert_eq!(rig.server().calls("drop_cluster"), 0);
}

/// `tls: passthrough`: the client talks TLS to the real server (trusting its CA, not ours), the
/// agent audits the connection and inspects nothing — a denied tool goes through.
#[test]
fn passthrough_servers_are_forwarded_untouched_and_audited() {
    let rig = TlsRig::start_with(
        "tls-pass",
        47,
        vec![Upstream::good()],
        false,
        Some("servers:\n  - name: passed\n    url: {URL0}\n    policy: {POLICY}\n    tls: passthrough\n"),
        &[],
    );
    let upstream_ca = rig
        .files
        .path()
        .join("upstream-ca.pem")
        .display()
        .to_string();
    let run = rig.client_trusting(
        &upstream_ca,
        &["call", &rig.url(0), "drop_cluster", r#"{"cluster":"dev"}"#],
    );
    run.assert_success();
    assert_eq!(
        result_text(&run.json_lines()[0]),
        "dropped cluster dev",
        "{}",
        run.describe()
    );
    assert_eq!(rig.server().calls("drop_cluster"), 1);
    let rec = rig.wait_audit("the passed-through connection", |r| {
        r["event"] == "passthrough"
    });
    assert_eq!(rec["sni"], rig.host.as_str());
    assert_eq!(rec["server"], "passed");
    assert_eq!(rec["tls"], "passthrough");
    assert!(
        !rig.agent.ca_cert_path().exists(),
        "no CA is needed when nothing is terminated"
    );
    assert!(rig.upstream_ca.cert_pem().contains("BEGIN CERTIFICATE"));
    let _ = &rig.cg;
}
