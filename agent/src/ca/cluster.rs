//! A CA for a cluster: `mcpwarden ca init` makes a root name-constrained to the endpoints of a
//! config (kept off the nodes), `mcpwarden ca intermediate` a short-lived CA per node signed by
//! it, carrying the same constraints. Nodes sign leaves with their intermediate; workloads trust
//! the root.

use std::{
    fs,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType, GeneralSubtree,
    IsCa, KeyPair, KeyUsagePurpose, NameConstraints, PKCS_ECDSA_P256_SHA256,
};

use super::{
    check_node_name, fingerprint, pem_encode, write_private, Authority, CaFiles, Constraints,
    BACKDATE,
};

/// `ca init --days` unless given.
pub const DEFAULT_ROOT_DAYS: u32 = 3650;
/// `ca intermediate --hours` unless given.
pub const DEFAULT_INTERMEDIATE_HOURS: u32 = 168;

/// The names a cluster CA permits: every server's host (lower case), and the Kubernetes short
/// names of Service hosts ([`crate::config::host_aliases`]), sorted, without duplicates.
pub fn endpoint_names(config: &crate::config::Config) -> Vec<String> {
    let mut names: Vec<String> = config
        .servers
        .iter()
        .flat_map(|s| {
            let host = s.url.host.to_ascii_lowercase();
            let mut all = crate::config::host_aliases(&host);
            all.push(host);
            all
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// What `ca init` wrote.
#[derive(Debug)]
pub struct Root {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub fingerprint: String,
    /// The permitted names, as `ca show` would print them.
    pub permitted: String,
}

/// The constraints of a cluster root: each DNS name as a subtree, each IP literal as a single
/// address. A type no endpoint uses is excluded whole (RFC 5280 would leave it open): with no
/// IP endpoint the CA signs for no address, with no DNS endpoint for no DNS name.
fn root_constraints(names: &[String]) -> Result<NameConstraints> {
    let (mut permitted, mut excluded) = (Vec::new(), Vec::new());
    for n in names {
        match n.parse::<std::net::IpAddr>() {
            Ok(ip) => permitted.push(GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(
                ip,
                if ip.is_ipv4() { 32 } else { 128 },
            ))),
            Err(_) => permitted.push(GeneralSubtree::DnsName(n.to_ascii_lowercase())),
        }
    }
    if permitted.is_empty() {
        bail!("no endpoint names to constrain the CA to");
    }
    if !permitted
        .iter()
        .any(|p| matches!(p, GeneralSubtree::IpAddress(_)))
    {
        excluded.push(GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])));
        excluded.push(GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])));
    }
    if !permitted
        .iter()
        .any(|p| matches!(p, GeneralSubtree::DnsName(_)))
    {
        // The empty DNS name is every DNS name.
        excluded.push(GeneralSubtree::DnsName(String::new()));
    }
    Ok(NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: excluded,
    })
}

/// Create `dir` (0700) if it is missing.
fn make_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("{}: cannot create the directory", dir.display()))
}

/// `mcpwarden ca init`: a root CA (ECDSA P-256, path length 1) name-constrained to `names`, as
/// `out/ca.crt` (0644) and `out/ca.key` (0600). Existing files are replaced only with `force`.
pub fn init(names: &[String], out: &Path, days: u32, force: bool, now: SystemTime) -> Result<Root> {
    if days == 0 || days > 36500 {
        bail!("--days must be between 1 and 36500 (got {days})");
    }
    let cert_path = out.join("ca.crt");
    let key_path = out.join("ca.key");
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                bail!(
                    "{}: already exists; pass --force to replace it (workloads that trust the old \
                     root will not trust leaves signed under the new one)",
                    p.display()
                );
            }
        }
    }
    let constraints = root_constraints(names)?;
    make_dir(out)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating the CA key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mcpwarden");
    dn.push(DnType::CommonName, "mcpwarden cluster CA");
    params.distinguished_name = dn;
    // One level below: the per-node intermediates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + Duration::from_secs(u64::from(days) * 24 * 3600)).into();
    params.name_constraints = Some(constraints);
    params.use_authority_key_identifier_extension = false;
    let cert = params.self_signed(&key).context("signing the CA")?;
    write_private(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_private(&cert_path, cert.pem().as_bytes(), 0o644)?;
    let (_, x509) = x509_parser::parse_x509_certificate(cert.der())
        .map_err(|e| anyhow::anyhow!("reading back the CA: {e}"))?;
    let permitted = Constraints::of(&x509)?
        .map(|c| c.describe_permitted())
        .unwrap_or_default();
    Ok(Root {
        cert: cert_path,
        key: key_path,
        fingerprint: fingerprint(cert.der()),
        permitted,
    })
}

/// What `ca intermediate` wrote.
#[derive(Debug)]
pub struct Issued {
    /// The chain: the intermediate, then the certificates of `--ca-cert`.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub subject: String,
    pub fingerprint: String,
    pub not_after: SystemTime,
    /// The root's expiry came first.
    pub cut_short: bool,
    /// The root carries name constraints, copied into the intermediate.
    pub constrained: bool,
}

/// `mcpwarden ca intermediate`: a CA for one node (path length 0, keyCertSign), signed by the CA
/// of `ca`, with its name constraints, valid from an hour ago for `hours` (never past the
/// signing CA): `out/tls.crt` (the intermediate, then the chain of `ca`) and `out/tls.key`
/// (0600), replacing earlier ones (this is how it is rotated).
pub fn intermediate(
    ca: &CaFiles,
    node: &str,
    out: &Path,
    hours: u32,
    now: SystemTime,
) -> Result<Issued> {
    check_node_name(node).context("--node")?;
    if hours == 0 || hours > 24 * 366 {
        bail!("--hours must be between 1 and 8784 (got {hours})");
    }
    let root = Authority::load(ca)?;
    let constraints = root.constraints.first().map(|(_, c)| c.to_rcgen());
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .context("generating the intermediate's key")?;
    let subject = format!("mcpwarden node {node}");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mcpwarden");
    dn.push(DnType::CommonName, subject.clone());
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let wanted = now + Duration::from_secs(u64::from(hours) * 3600);
    let not_after = wanted.min(root.not_after);
    params.not_before = (now - BACKDATE).into();
    params.not_after = not_after.into();
    params.name_constraints = constraints.clone();
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &root.issuer)
        .context("signing the intermediate")?;
    let mut chain = cert.pem();
    if !chain.ends_with('\n') {
        chain.push('\n');
    }
    for c in &root.chain {
        chain.push_str(&pem_encode(c));
    }
    make_dir(out)?;
    let cert_path = out.join("tls.crt");
    let key_path = out.join("tls.key");
    write_private(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_private(&cert_path, chain.as_bytes(), 0o644)?;
    Ok(Issued {
        cert: cert_path,
        key: key_path,
        subject,
        fingerprint: fingerprint(cert.der()),
        not_after,
        cut_short: not_after < wanted,
        constrained: constraints.is_some(),
    })
}
