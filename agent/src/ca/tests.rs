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
        // Generated CAs configured from files: unconstrained, accepted here.
        allow_unconstrained: true,
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

/// Load the CA of `cert`/`key` as the agent would for `names`.
fn configured(cert: &Path, key: &Path, names: &[&str], allow_unconstrained: bool) -> Result<Ca> {
    Ca::load_or_generate(&CaSettings {
        files: Some(CaFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }),
        names: names.iter().map(|n| (*n).to_owned()).collect(),
        allow_unconstrained,
        ..CaSettings::default()
    })
}

fn error_of<T>(r: Result<T>) -> String {
    r.err().map(|e| format!("{e:#}")).unwrap_or_default()
}

/// The names `ca init --name-constraints-from` reads from a config with these server URLs.
fn names_from_config(dir: &Path, urls: &[&str]) -> Result<(Vec<String>, Vec<String>)> {
    fs::create_dir_all(dir)?;
    let file = dir.join("config.yaml");
    let servers: String = urls
        .iter()
        .map(|u| format!("  - url: {u}\n    policy: p.json\n"))
        .collect();
    fs::write(&file, format!("servers:\n{servers}"))?;
    let config = crate::config::Config::assemble(crate::config::Flags {
        config: Some(file),
        ..Default::default()
    })?;
    Ok((cluster::endpoint_names(&config), config.ca.names))
}

fn x509_of<R>(
    der: &[u8],
    f: impl FnOnce(&x509_parser::certificate::X509Certificate<'_>) -> R,
) -> Result<R> {
    let (_, x509) = x509_parser::parse_x509_certificate(der).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(f(&x509))
}

#[test]
fn a_cluster_root_covers_the_endpoints_and_their_aliases_and_nothing_else() -> Result<()> {
    let dir = Dir::new("init");
    let (names, agent_names) = names_from_config(
        &dir.0,
        &[
            "https://tools.mcp.svc.cluster.local/mcp",
            "https://10.1.2.3:8443/mcp",
            "http://plain.example.test/mcp",
        ],
    )?;
    assert_eq!(
        names,
        [
            "10.1.2.3",
            "plain.example.test",
            "tools.mcp",
            "tools.mcp.svc",
            "tools.mcp.svc.cluster.local"
        ]
    );
    let out = dir.0.join("root");
    let root = cluster::init(&names, &out, 30, false, SystemTime::now())?;
    let mode = |p: &Path| -> Result<u32> { Ok(fs::metadata(p)?.permissions().mode() & 0o777) };
    assert_eq!((mode(&root.cert)?, mode(&root.key)?), (0o644, 0o600));
    assert!(
        root.permitted.contains("tools.mcp.svc"),
        "{}",
        root.permitted
    );

    // The agent loading the root itself (a constrained CA from files).
    let refs: Vec<&str> = agent_names.iter().map(String::as_str).collect();
    let ca = configured(&root.cert, &root.key, &refs, false)?;
    let now = SystemTime::now();
    for name in ["tools.mcp", "tools.mcp.svc", "tools.mcp.svc.cluster.local"] {
        verify(&ca, &ca.mint(&LeafName::Dns(name.into()), now)?, name)?;
    }
    verify(
        &ca,
        &ca.mint(&LeafName::Ip("10.1.2.3".parse()?), now)?,
        "10.1.2.3",
    )?;
    for name in ["bank.example.com", "mcp.svc", "tools.other"] {
        let leaf = ca.mint(&LeafName::Dns(name.into()), now)?;
        assert!(verify(&ca, &leaf, name).is_err(), "{name} must not verify");
    }
    let ip = ca.mint(&LeafName::Ip("10.9.9.9".parse()?), now)?;
    assert!(verify(&ca, &ip, "10.9.9.9").is_err());

    // A root for DNS names only signs for no address at all.
    let dns_only = cluster::init(
        &["mcp.example.test".to_owned()],
        &dir.0.join("dns-only"),
        30,
        false,
        now,
    )?;
    let ca = configured(&dns_only.cert, &dns_only.key, &["mcp.example.test"], false)?;
    let ip = ca.mint(&LeafName::Ip("10.1.2.3".parse()?), now)?;
    assert!(verify(&ca, &ip, "10.1.2.3").is_err());
    verify(
        &ca,
        &ca.mint(&LeafName::Dns("mcp.example.test".into()), now)?,
        "mcp.example.test",
    )?;

    // Not replaced without --force; replaced with it.
    let err = error_of(cluster::init(&names, &out, 30, false, now));
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let again = cluster::init(&names, &out, 30, true, now)?;
    assert_ne!(again.fingerprint, root.fingerprint);
    Ok(())
}

#[test]
fn a_leaf_signed_by_a_node_intermediate_verifies_with_only_the_root_trusted() -> Result<()> {
    let dir = Dir::new("intermediate");
    let names: Vec<String> = ["mcp.example.test", "tools.mcp", "tools.mcp.svc"]
        .map(String::from)
        .to_vec();
    let now = SystemTime::now();
    let root = cluster::init(&names, &dir.0.join("root"), 30, false, now)?;
    let root_files = CaFiles {
        cert: root.cert.clone(),
        key: root.key.clone(),
    };
    let node = dir.0.join("nodes/node-1");
    let issued = cluster::intermediate(&root_files, "node-1", &node, 168, now)?;
    assert_eq!(
        fs::metadata(&issued.key)?.permissions().mode() & 0o777,
        0o600
    );
    assert!(issued.constrained && !issued.cut_short);
    let file = certificates(&fs::read_to_string(&issued.cert)?)?;
    let root_der = certificates(&fs::read_to_string(&root.cert)?)?;
    assert_eq!(file.len(), 2, "the intermediate, then the root");
    assert_eq!(file.get(1), root_der.first());
    let int = file.first().ok_or_else(|| anyhow::anyhow!("empty"))?;
    let (cn, pathlen, key_cert_sign, permitted) = x509_of(int, |x| {
        (
            common_name(x),
            x.basic_constraints()
                .ok()
                .flatten()
                .and_then(|b| b.value.path_len_constraint),
            x.key_usage()
                .ok()
                .flatten()
                .is_some_and(|k| k.value.key_cert_sign()),
            Constraints::of(x).ok().flatten().map(|c| c.permitted),
        )
    })?;
    assert_eq!(cn, "mcpwarden node node-1");
    assert_eq!(pathlen, Some(0));
    assert!(key_cert_sign);
    let root_permitted = x509_of(&root_der[0], |x| {
        Constraints::of(x).ok().flatten().map(|c| c.permitted)
    })?;
    assert!(permitted.is_some());
    assert_eq!(permitted, root_permitted, "the root's constraints, copied");
    let validity = x509_of(int, |x| {
        x.validity().not_after.timestamp() - x.validity().not_before.timestamp()
    })?;
    assert_eq!(validity, (168 + 1) * 3600, "168 h from an hour ago");

    // The agent with the intermediate (a `${NODE_NAME}` path, as in a DaemonSet).
    let template = CaFiles {
        cert: node.parent().unwrap_or(&node).join("${NODE_NAME}/tls.crt"),
        key: node.parent().unwrap_or(&node).join("${NODE_NAME}/tls.key"),
    };
    let files = CaFiles {
        cert: expand_node_name_with(&template.cert, "ca.cert", Some("node-1".into()))?,
        key: expand_node_name_with(&template.key, "ca.key", Some("node-1".into()))?,
    };
    assert_eq!(files.cert, issued.cert);
    let ca = configured(
        &files.cert,
        &files.key,
        &["tools.mcp", "tools.mcp.svc"],
        false,
    )?;
    let leaf = ca.mint(&LeafName::Dns("tools.mcp".into()), now)?;
    assert_eq!(leaf.chain.len(), 2, "leaf and intermediate, not the root");
    assert_eq!(leaf.chain.get(1), Some(int));
    assert!(leaf.not_after <= now + LEAF_LIFETIME);
    verify(&ca, &leaf, "tools.mcp")?;
    let outside = ca.mint(&LeafName::Dns("bank.example.com".into()), now)?;
    assert!(verify(&ca, &outside, "bank.example.com").is_err());

    // What workloads are given is the root only.
    assert_eq!(ca.certs(), root_der);
    assert_eq!(certificates(&ca.bundle_pem())?, root_der);
    assert_eq!(ca.bundle_pem(), fs::read_to_string(&root.cert)?);
    let described = ca.describe(now);
    assert_eq!(described.len(), 1);
    assert!(described.iter().all(|d| d.1 == root.fingerprint && d.2));
    let intermediates = ca.intermediates();
    assert_eq!(intermediates.len(), 1);
    assert!(intermediates
        .iter()
        .all(|i| i.subject == "mcpwarden node node-1" && i.fingerprint == fingerprint(int)));

    // An intermediate of another root, filed with this root: refused at load.
    let other = cluster::init(&names, &dir.0.join("other"), 30, false, now)?;
    let stray = cluster::intermediate(
        &CaFiles {
            cert: other.cert.clone(),
            key: other.key.clone(),
        },
        "node-2",
        &dir.0.join("stray"),
        24,
        now,
    )?;
    let mixed = dir.0.join("mixed.crt");
    let stray_int = certificates(&fs::read_to_string(&stray.cert)?)?;
    fs::write(
        &mixed,
        format!(
            "{}{}",
            pem_encode(&stray_int[0]),
            fs::read_to_string(&root.cert)?
        ),
    )?;
    let err = error_of(configured(&mixed, &stray.key, &["tools.mcp"], false));
    assert!(
        err.contains("mixed.crt") && err.contains("does not verify up to"),
        "{err}"
    );

    // Node names and the placeholder.
    assert!(cluster::intermediate(&root_files, "../etc", &node, 1, now).is_err());
    let err = error_of(expand_node_name_with(&template.cert, "ca.cert", None));
    assert!(
        err.contains("ca.cert") && err.contains("NODE_NAME"),
        "{err}"
    );
    assert!(expand_node_name_with(&template.cert, "ca.cert", Some("a/b".into())).is_err());
    assert!(check_placeholders("/etc/${NODE_NAME}/${NODE_NAME}.crt").is_ok());
    assert!(check_placeholders("/etc/${NODE}.crt").is_err());
    Ok(())
}

#[test]
fn an_unconstrained_ca_from_files_is_refused_unless_allowed() -> Result<()> {
    let dir = Dir::new("unconstrained");
    let state = dir.0.join("state");
    Ca::load_or_generate(&settings(&state))?;
    let (cert, key) = (state.join("ca.crt"), state.join("ca.key"));
    let err = error_of(configured(&cert, &key, &["mcp.example.test"], false));
    assert!(err.contains(&cert.display().to_string()), "{err}");
    assert!(err.contains("no X.509 name constraints"), "{err}");
    assert!(
        err.contains("mcpwarden ca init --name-constraints-from"),
        "{err}"
    );
    assert!(err.contains("ca.allow_unconstrained: true"), "{err}");
    configured(&cert, &key, &["mcp.example.test"], true)?;

    // The same for the CA rotating in.
    let root = cluster::init(
        &["mcp.example.test".to_owned()],
        &dir.0.join("root"),
        30,
        false,
        SystemTime::now(),
    )?;
    let next = CaSettings {
        files: Some(CaFiles {
            cert: root.cert.clone(),
            key: root.key.clone(),
        }),
        names: vec!["mcp.example.test".into()],
        next: Some(NextCa {
            files: CaFiles {
                cert: cert.clone(),
                key: key.clone(),
            },
            from: SystemTime::now(),
        }),
        ..CaSettings::default()
    };
    let err = error_of(Ca::load_or_generate(&next));
    assert!(err.contains("no X.509 name constraints"), "{err}");

    // Constrained, but not to every endpoint (an alias included): refused, naming both.
    let err = error_of(configured(
        &root.cert,
        &root.key,
        &["mcp.example.test", "tools.mcp"],
        true,
    ));
    assert!(err.contains(&root.cert.display().to_string()), "{err}");
    assert!(err.contains("do not cover the endpoint tools.mcp"), "{err}");
    Ok(())
}

#[test]
fn an_expired_intermediate_is_refused_with_a_clear_error() -> Result<()> {
    let dir = Dir::new("expired");
    let then = SystemTime::now() - Duration::from_secs(10 * 24 * 3600);
    let names = vec!["mcp.example.test".to_owned()];
    let root = cluster::init(&names, &dir.0.join("root"), 30, false, then)?;
    let issued = cluster::intermediate(
        &CaFiles {
            cert: root.cert.clone(),
            key: root.key.clone(),
        },
        "node-1",
        &dir.0.join("node"),
        24,
        then,
    )?;
    let err = error_of(configured(
        &issued.cert,
        &issued.key,
        &["mcp.example.test"],
        false,
    ));
    assert!(err.contains(&issued.cert.display().to_string()), "{err}");
    assert!(err.contains("mcpwarden node node-1"), "{err}");
    assert!(err.contains("has expired"), "{err}");
    assert!(err.contains("mcpwarden ca intermediate"), "{err}");
    Ok(())
}
