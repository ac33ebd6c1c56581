//! `mcpwarden ca show / install / uninstall`: the real binary, the real host trust store.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::AGENT_BIN;
use mcpwarden_tests::{require_root, sha256_hex, TempDir};

fn mcpwarden(args: &[&str]) -> Output {
    let out = Command::new(AGENT_BIN)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {AGENT_BIN} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "mcpwarden {args:?} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
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

    // Rotation: the current CA from files, the next one signing from a date in the future.
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
            "ca:\n  cert: {s}/ca.crt\n  key: {s}/ca.key\n  next:\n    cert: {n}/ca.crt\n    key: {n}/ca.key\n    from: 2099-01-01T00:00:00Z\n\
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
