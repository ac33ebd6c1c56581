use std::{os::unix::fs::PermissionsExt, sync::Arc};

use rustls::{client::danger::ServerCertVerifier, pki_types::ServerName, RootCertStore};

use super::*;

struct Dir(PathBuf);
impl Dir {
    fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("mcpwarden-ca-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        Dir(p)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn settings(dir: &Path) -> CaSettings {
    CaSettings {
        state_dir: dir.to_path_buf(),
        ..CaSettings::default()
    }
}

/// Does a client trusting exactly `ca` accept `minted` for `name`?
fn verify(ca: &Ca, minted: &Minted, name: &str) -> Result<(), rustls::Error> {
    let mut roots = RootCertStore::empty();
    for c in ca.certs() {
        roots
            .add(c)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| rustls::Error::General(e.to_string()))?;
    let name =
        ServerName::try_from(name.to_owned()).map_err(|e| rustls::Error::General(e.to_string()))?;
    let (leaf, rest) = minted
        .chain
        .split_first()
        .ok_or_else(|| rustls::Error::General("empty chain".into()))?;
    verifier
        .verify_server_cert(leaf, rest, &name, &[], rustls::pki_types::UnixTime::now())
        .map(|_| ())
}

#[test]
fn generates_once_with_private_permissions_and_reloads_the_same_ca() -> Result<()> {
    let dir = Dir::new("gen");
    let s = settings(&dir.0.join("state"));
    let first = Ca::load_or_generate(&s)?;
    let meta = |p: &str| -> Result<u32> {
        Ok(fs::metadata(s.state_dir.join(p))?.permissions().mode() & 0o777)
    };
    assert_eq!(meta("ca.key")?, 0o600);
    assert_eq!(
        fs::metadata(&s.state_dir)?.permissions().mode() & 0o777,
        0o700
    );
    let again = Ca::load_or_generate(&s)?;
    assert_eq!(
        first.describe(SystemTime::now()),
        again.describe(SystemTime::now())
    );
    assert!(first
        .bundle_pem()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(!first.bundle_pem().contains("PRIVATE KEY"));

    fs::remove_file(s.state_dir.join("ca.crt"))?;
    let err = Ca::load_or_generate(&s)
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(err.contains("has ca.key but not ca.crt"), "{err}");
    Ok(())
}

#[test]
fn leaves_verify_for_their_name_or_address_only() -> Result<()> {
    let dir = Dir::new("leaf");
    let ca = Ca::load_or_generate(&settings(&dir.0))?;
    let now = SystemTime::now();
    let leaf = ca.mint(&LeafName::Dns("mcp.example.test".into()), now)?;
    verify(&ca, &leaf, "mcp.example.test")?;
    assert!(verify(&ca, &leaf, "other.example.test").is_err());
    assert!(leaf.not_after <= now + LEAF_LIFETIME);
    let ip = ca.mint(&LeafName::Ip("127.0.0.9".parse()?), now)?;
    verify(&ca, &ip, "127.0.0.9")?;
    assert!(verify(&ca, &ip, "127.0.0.8").is_err());
    Ok(())
}

#[test]
fn a_constrained_ca_cannot_mint_for_other_names() -> Result<()> {
    let dir = Dir::new("nc");
    let mut s = settings(&dir.0);
    s.name_constraints = true;
    s.names = vec!["mcp.example.test".into(), "10.1.2.3".into()];
    let ca = Ca::load_or_generate(&s)?;
    let now = SystemTime::now();
    verify(
        &ca,
        &ca.mint(&LeafName::Dns("mcp.example.test".into()), now)?,
        "mcp.example.test",
    )?;
    let outside = ca.mint(&LeafName::Dns("bank.example.com".into()), now)?;
    let err = verify(&ca, &outside, "bank.example.com");
    assert!(
        err.is_err(),
        "a leaf outside the constraints must not verify"
    );
    verify(
        &ca,
        &ca.mint(&LeafName::Ip("10.1.2.3".parse()?), now)?,
        "10.1.2.3",
    )?;
    assert!(verify(
        &ca,
        &ca.mint(&LeafName::Ip("10.9.9.9".parse()?), now)?,
        "10.9.9.9"
    )
    .is_err());

    // The stored CA no longer covers a newly configured name: refuse to start, say what to do.
    s.names.push("new.example.org".into());
    let err = Ca::load_or_generate(&s)
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(
        err.contains("do not cover the endpoint new.example.org"),
        "{err}"
    );
    Ok(())
}

#[test]
fn rotation_switches_the_signer_at_the_cut_over() -> Result<()> {
    let old = Dir::new("rot-old");
    let new = Dir::new("rot-new");
    let next_ca = Ca::load_or_generate(&settings(&new.0))?;
    let from = SystemTime::now() + Duration::from_secs(3600);
    let ca = Ca::load_or_generate(&CaSettings {
        next: Some(NextCa {
            files: CaFiles {
                cert: new.0.join("ca.crt"),
                key: new.0.join("ca.key"),
            },
            from,
        }),
        ..settings(&old.0)
    })?;
    assert_eq!(ca.certs().len(), 2);
    assert_eq!(ca.bundle_pem().matches("BEGIN CERTIFICATE").count(), 2);
    let before = ca.mint(&LeafName::Dns("a.test".into()), SystemTime::now())?;
    let after = ca.mint(
        &LeafName::Dns("a.test".into()),
        from + Duration::from_secs(1),
    )?;
    assert_eq!((before.generation, after.generation), (0, 1));
    assert_eq!(before.chain.get(1), ca.certs().first());
    assert_eq!(after.chain.get(1), next_ca.certs().first());
    let described = ca.describe(SystemTime::now());
    assert_eq!(described.iter().filter(|d| d.2).count(), 1);
    assert!(described.first().is_some_and(|d| d.2));
    Ok(())
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused() -> Result<()> {
    let a = Dir::new("mismatch-a");
    let b = Dir::new("mismatch-b");
    Ca::load_or_generate(&settings(&a.0))?;
    Ca::load_or_generate(&settings(&b.0))?;
    let err = Ca::load_or_generate(&CaSettings {
        files: Some(CaFiles {
            cert: a.0.join("ca.crt"),
            key: b.0.join("ca.key"),
        }),
        ..settings(&a.0)
    })
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    assert!(err.contains("does not belong"), "{err}");
    assert!(!err.contains("PRIVATE"), "{err}");
    Ok(())
}
