//! `mcpwarden ca show / install / uninstall`: the real binary, the real host trust store.
//! `mcpwarden ca init / intermediate`: a cluster root and per-node intermediates (unprivileged).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::AGENT_BIN;
use mcpwarden_tests::{require_root, sha256_hex, TempDir};

fn mcpwarden(args: &[&str]) -> Output {
    mcpwarden_with(args, &[])
}

/// `mcpwarden ARGS` with extra environment variables (and no NODE_NAME but theirs).
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(AGENT_BIN)
        .args(args)
        .env_remove("NODE_NAME")
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run {AGENT_BIN} {args:?}: {e}"))
}

/// `mcpwarden ARGS` with extra environment variables; it must succeed.
fn mcpwarden_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = run(args, env);
    assert!(
        out.status.success(),
        "mcpwarden {args:?} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `mcpwarden ARGS` must fail; its standard error.
fn mcpwarden_fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run(args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "mcpwarden {args:?} succeeded\n--- stdout ---\n{}\n--- stderr ---\n{stderr}",
        String::from_utf8_lossy(&out.stdout),
    );
    stderr
}

/// The DER of each PEM certificate in `pem`.
fn ders(pem: &str) -> Vec<Vec<u8>> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.expect("a PEM certificate").to_vec())
        .collect()
}

/// `AB:CD:...`, what `ca show` prints.
fn colon_fingerprint(der: &[u8]) -> String {
    let hex = sha256_hex(der).to_uppercase();
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// `ca show` generates the CA once (key 0600 in a 0700 dir, never printed), prints the same
/// certificate and its fingerprint every time; with a rotation configured it prints both CAs and
/// says which one signs.
#[test]
fn ca_show_prints_the_certificate_and_its_fingerprint() {
    require_root();
    let tmp = TempDir::new("ca-show");
    let state = tmp.path().join("state");
    let state_arg = state.display().to_string();
    let first = mcpwarden(&["ca", "show", "--state-dir", &state_arg]);
    let pem = String::from_utf8_lossy(&first.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&first.stderr).into_owned();
    let certs = ders(&pem);
    assert_eq!(certs.len(), 1, "{pem}");
    assert!(
        stderr.contains(&colon_fingerprint(&certs[0])),
        "stderr must carry the SHA-256 fingerprint: {stderr}"
    );
    assert!(!pem.contains("PRIVATE") && !stderr.contains("PRIVATE"));
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&state.join("ca.key")), 0o600);
    assert_eq!(mode(&state), 0o700);
    let again = mcpwarden(&["ca", "show", "--state-dir", &state_arg]);
    assert_eq!(
        again.stdout, first.stdout,
        "a second show must not make a new CA"
    );

    // Rotation: the current CA from files, the next one signing from a date in the future
    // (generated CAs have no name constraints: allowed explicitly).
    let next_state = tmp.path().join("next");
    let next = mcpwarden(&[
        "ca",
        "show",
        "--state-dir",
        &next_state.display().to_string(),
    ]);
    let config = tmp.path().join("mcpwarden.yaml");
    std::fs::write(
        &config,
        format!(
            "ca:\n  cert: {s}/ca.crt\n  key: {s}/ca.key\n  allow_unconstrained: true\n  next:\n    cert: {n}/ca.crt\n    key: {n}/ca.key\n    from: 2099-01-01T00:00:00Z\n\
             servers:\n  - url: https://mcp.example.test/mcp\n    policy: p.json\n",
            s = state.display(),
            n = next_state.display()
        ),
    )
    .expect("write config");
    let both = mcpwarden(&["ca", "show", "--config", &config.display().to_string()]);
    let bundle = String::from_utf8_lossy(&both.stdout).into_owned();
    assert_eq!(
        ders(&bundle),
        [
            certs[0].clone(),
            ders(&String::from_utf8_lossy(&next.stdout))[0].clone()
        ]
    );
    let lines = String::from_utf8_lossy(&both.stderr).into_owned();
    let signing: Vec<&str> = lines.lines().filter(|l| l.ends_with("(signing)")).collect();
    assert_eq!(signing.len(), 1, "{lines}");
    assert!(
        signing[0].contains(&colon_fingerprint(&certs[0])),
        "{lines}"
    );
}

/// Removes our anchors however the test ends.
struct Uninstall;
impl Drop for Uninstall {
    fn drop(&mut self) {
        let _ = Command::new(AGENT_BIN).args(["ca", "uninstall"]).output();
    }
}

const DEBIAN_ANCHOR: &str = "/usr/local/share/ca-certificates/mcpwarden.crt";
const DEBIAN_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// `ca install` puts the CA in the host's trust store (this CI host is Debian:
/// update-ca-certificates), `ca uninstall` takes it out again.
#[test]
fn ca_install_adds_the_ca_to_the_host_trust_store_and_uninstall_removes_it() {
    require_root();
    let tmp = TempDir::new("ca-install");
    let state = tmp.path().join("state").display().to_string();
    let _cleanup = Uninstall;
    mcpwarden(&["ca", "install", "--state-dir", &state]);
    let pem = String::from_utf8_lossy(&mcpwarden(&["ca", "show", "--state-dir", &state]).stdout)
        .into_owned();
    let der = ders(&pem).remove(0);
    let anchor = std::fs::read_to_string(DEBIAN_ANCHOR)
        .unwrap_or_else(|e| panic!("{DEBIAN_ANCHOR} after ca install: {e}"));
    assert_eq!(ders(&anchor), std::slice::from_ref(&der));
    let bundle = std::fs::read_to_string(DEBIAN_BUNDLE).expect("read the system bundle");
    assert!(
        ders(&bundle).contains(&der),
        "the CA is not in {DEBIAN_BUNDLE}"
    );

    mcpwarden(&["ca", "uninstall"]);
    assert!(!Path::new(DEBIAN_ANCHOR).exists());
    let bundle = std::fs::read_to_string(DEBIAN_BUNDLE).expect("read the system bundle");
    assert!(
        !ders(&bundle).contains(&der),
        "the CA is still in {DEBIAN_BUNDLE}"
    );
}

/// The certificate's subject CN, its permitted DNS subtrees, whether it excludes every IP
/// address, its path length, and its validity in seconds.
struct CaFacts {
    cn: String,
    dns: Vec<String>,
    excludes_all_ips: bool,
    pathlen: Option<u32>,
    validity: i64,
}

fn facts(der: &[u8]) -> CaFacts {
    use x509_parser::extensions::GeneralName;
    let (_, x) = x509_parser::parse_x509_certificate(der).expect("an X.509 certificate");
    let nc = x
        .name_constraints()
        .expect("readable name constraints")
        .expect("name constraints");
    let dns = nc
        .value
        .permitted_subtrees
        .iter()
        .flatten()
        .filter_map(|s| match s.base {
            GeneralName::DNSName(d) => Some(d.to_owned()),
            _ => None,
        })
        .collect();
    let excludes_all_ips = nc
        .value
        .excluded_subtrees
        .iter()
        .flatten()
        .any(|s| matches!(s.base, GeneralName::IPAddress(b) if b == [0u8; 8].as_slice()));
    let cn = x
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    CaFacts {
        cn,
        dns,
        excludes_all_ips,
        pathlen: x
            .basic_constraints()
            .ok()
            .flatten()
            .and_then(|b| b.value.path_len_constraint),
        validity: x.validity().not_after.timestamp() - x.validity().not_before.timestamp(),
    }
}

/// `ca init` makes a root constrained to the config's endpoints and their Service short names,
/// once (again only with --force), and says what to do with it; `ca intermediate` issues a
/// node's constrained CA with the root after it; an agent configured with it through
/// `${NODE_NAME}` publishes the root only. Unconstrained or uncovering CAs from files are refused.
#[test]
fn ca_init_and_intermediate_make_a_constrained_chain_whose_root_workloads_trust() {
    let tmp = TempDir::new("ca-cluster");
    let dir = tmp.path();
    let p = |rel: &str| dir.join(rel).display().to_string();
    let servers = "servers:\n\
                   \x20 - url: https://tools.mcp.svc.cluster.local/mcp\n    policy: p.json\n\
                   \x20 - url: https://mcp.example.test/mcp\n    policy: p.json\n";
    std::fs::write(dir.join("config.yaml"), servers).expect("write config");

    let (config, out) = (p("config.yaml"), p("root"));
    let first_args = [
        "ca",
        "init",
        "--name-constraints-from",
        &config,
        "--out",
        &out,
        "--days",
        "30",
    ];
    let printed = String::from_utf8_lossy(&mcpwarden(&first_args).stdout).into_owned();
    assert!(
        printed.contains(
            "may sign for: mcp.example.test, tools.mcp, tools.mcp.svc, tools.mcp.svc.cluster.local"
        ),
        "{printed}"
    );
    assert!(
        printed.contains("kubectl -n mcpwarden create configmap mcpwarden-ca --from-file=ca.crt="),
        "{printed}"
    );
    assert!(
        printed.contains("create secret generic mcpwarden-node-ca"),
        "{printed}"
    );
    assert!(!printed.contains("PRIVATE"), "{printed}");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    let (root_crt, root_key) = (dir.join("root/ca.crt"), dir.join("root/ca.key"));
    assert_eq!((mode(&root_crt), mode(&root_key)), (0o644, 0o600));
    let root_pem = std::fs::read_to_string(&root_crt).expect("read ca.crt");
    let root = ders(&root_pem);
    assert_eq!(root.len(), 1);
    let f = facts(&root[0]);
    assert_eq!(f.cn, "mcpwarden cluster CA");
    assert_eq!(
        f.dns,
        [
            "mcp.example.test",
            "tools.mcp",
            "tools.mcp.svc",
            "tools.mcp.svc.cluster.local"
        ]
    );
    assert!(
        f.excludes_all_ips,
        "no IP endpoint: no address may be signed for"
    );
    assert_eq!(f.validity, (30 * 24 + 1) * 3600);

    // Not replaced without --force.
    let err = mcpwarden_fails(&first_args, &[]);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&root_crt).expect("read"), root_pem);
    let mut forced = first_args.to_vec();
    forced.push("--force");
    mcpwarden(&forced);
    let root_pem = std::fs::read_to_string(&root_crt).expect("read ca.crt");
    assert_ne!(ders(&root_pem), root, "--force makes a new root");
    let root = ders(&root_pem);

    // A node's intermediate: 168 h by default, the root's constraints, the root after it.
    let (crt, key) = (
        root_crt.display().to_string(),
        root_key.display().to_string(),
    );
    let node_out = p("nodes/node-1");
    let said = mcpwarden(&[
        "ca",
        "intermediate",
        "--ca-cert",
        &crt,
        "--ca-key",
        &key,
        "--node",
        "node-1",
        "--out",
        &node_out,
    ]);
    let said = String::from_utf8_lossy(&said.stdout).into_owned();
    assert!(said.contains("mcpwarden node node-1"), "{said}");
    let chain = ders(&std::fs::read_to_string(dir.join("nodes/node-1/tls.crt")).expect("tls.crt"));
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], root[0], "the root follows the intermediate");
    assert_eq!(mode(&dir.join("nodes/node-1/tls.key")), 0o600);
    let int = facts(&chain[0]);
    assert_eq!(int.cn, "mcpwarden node node-1");
    assert_eq!(int.pathlen, Some(0));
    assert_eq!(int.dns, facts(&root[0]).dns);
    assert!(int.excludes_all_ips);
    assert_eq!(int.validity, (168 + 1) * 3600);
    let err = mcpwarden_fails(
        &[
            "ca",
            "intermediate",
            "--ca-cert",
            &crt,
            "--ca-key",
            &key,
            "--node",
            "../x",
            "--out",
            &node_out,
        ],
        &[],
    );
    assert!(err.contains("--node"), "{err}");

    // The Secret's layout: <node>.crt and <node>.key, picked by ${NODE_NAME}.
    std::fs::create_dir_all(dir.join("secret")).expect("mkdir");
    for (from, to) in [("tls.crt", "node-1.crt"), ("tls.key", "node-1.key")] {
        std::fs::copy(
            dir.join("nodes/node-1").join(from),
            dir.join("secret").join(to),
        )
        .expect("copy");
    }
    std::fs::write(
        dir.join("node.yaml"),
        format!(
            "ca:\n  cert: secret/${{NODE_NAME}}.crt\n  key: secret/${{NODE_NAME}}.key\n{servers}"
        ),
    )
    .expect("write config");
    let node_config = p("node.yaml");
    let show = mcpwarden_with(
        &["ca", "show", "--config", &node_config],
        &[("NODE_NAME", "node-1")],
    );
    assert_eq!(
        ders(&String::from_utf8_lossy(&show.stdout)),
        root,
        "workloads are given the root, not the intermediate"
    );
    let stderr = String::from_utf8_lossy(&show.stderr).into_owned();
    assert!(
        stderr.contains(&format!(
            "SHA-256 {} (signing)",
            colon_fingerprint(&root[0])
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("mcpwarden node node-1") && stderr.contains(&colon_fingerprint(&chain[0])),
        "{stderr}"
    );
    let err = mcpwarden_fails(&["ca", "show", "--config", &node_config], &[]);
    assert!(
        err.contains("NODE_NAME") && err.contains("ca.cert"),
        "{err}"
    );

    // A CA from files must cover every endpoint ...
    std::fs::write(
        dir.join("more.yaml"),
        format!(
            "ca:\n  cert: secret/node-1.crt\n  key: secret/node-1.key\n{servers}  \
             - url: https://other.example.org/mcp\n    policy: p.json\n"
        ),
    )
    .expect("write config");
    let err = mcpwarden_fails(&["ca", "show", "--config", &p("more.yaml")], &[]);
    assert!(err.contains("node-1.crt"), "{err}");
    assert!(
        err.contains("do not cover the endpoint other.example.org"),
        "{err}"
    );

    // ... and carry name constraints, unless allowed.
    let state = p("state");
    mcpwarden(&["ca", "show", "--state-dir", &state]);
    let plain = format!("ca:\n  cert: state/ca.crt\n  key: state/ca.key\n{servers}");
    std::fs::write(dir.join("plain.yaml"), &plain).expect("write config");
    let err = mcpwarden_fails(&["ca", "show", "--config", &p("plain.yaml")], &[]);
    assert!(
        err.contains("ca.crt") && err.contains("no X.509 name constraints"),
        "{err}"
    );
    assert!(
        err.contains("mcpwarden ca init --name-constraints-from"),
        "{err}"
    );
    assert!(err.contains("ca.allow_unconstrained: true"), "{err}");
    std::fs::write(
        dir.join("plain.yaml"),
        plain.replace("ca:\n", "ca:\n  allow_unconstrained: true\n"),
    )
    .expect("write config");
    mcpwarden(&["ca", "show", "--config", &p("plain.yaml")]);
}
