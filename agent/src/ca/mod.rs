//! The agent's certificate authority: where it comes from, and the leaf certificates it signs.
//!
//! A CA is either loaded from files (`ca.cert`/`ca.key`, e.g. a Kubernetes Secret mount) or, on
//! first start, generated into the state directory (`ca.crt` + `ca.key`, key mode 0600 in a 0700
//! directory). The key is never logged or printed.
//!
//! A `ca.cert` file may hold a chain: the CA that signs (a per-node intermediate, see
//! [`cluster`]) first, then each certificate above it, the root last. Leaves are served with the
//! chain up to, not including, that root; workloads trust the root ([`Ca::bundle_pem`],
//! [`Ca::certs`]). A CA from files must carry X.509 name constraints (the signing certificate or
//! one above it) that cover every endpoint, unless `ca.allow_unconstrained` says otherwise: the
//! same key on every node, trusted by every workload, must not be able to sign any other name.
//! The paths may contain `${NODE_NAME}`, replaced by the `NODE_NAME` environment variable.
//!
//! Rotation: a `next` CA can be configured with a cut-over time. Until then the current CA signs
//! and both are published ([`Ca::bundle_pem`]) so workloads can trust both; from the cut-over on,
//! the next CA signs. Leaves record which CA signed them so the cache re-mints at the cut-over.
//!
//! Leaves are ECDSA P-256, valid [`LEAF_LIFETIME`] from an hour ago (clock skew), never past the
//! expiry of any certificate of the signing CA's chain.

pub mod cluster;
mod constraints;
pub mod trust;

use std::{
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use constraints::Constraints;

/// Default state directory (the generated CA lives here).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mcpwarden";
/// How long a minted leaf is valid.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Leaves start this long before they are minted, for clients whose clocks run behind.
const BACKDATE: Duration = Duration::from_secs(3600);
/// A generated CA is valid this long.
const CA_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// A configured CA expiring sooner than this is warned about at start.
const EXPIRY_WARNING: Duration = Duration::from_secs(48 * 3600);
/// In `ca.cert`/`ca.key` paths: replaced by the value of [`NODE_NAME_VAR`].
pub const NODE_NAME_PLACEHOLDER: &str = "${NODE_NAME}";
/// The environment variable naming this node (in a DaemonSet: from `spec.nodeName`).
pub const NODE_NAME_VAR: &str = "NODE_NAME";

/// Where the CA comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaSettings {
    /// Holds the generated CA (`ca.crt`, `ca.key`).
    pub state_dir: PathBuf,
    /// An existing CA to load instead of the state directory's.
    pub files: Option<CaFiles>,
    /// Generate the CA with X.509 name constraints for `names` (generated CAs only).
    pub name_constraints: bool,
    /// Accept a CA from files that carries no name constraints (`ca.allow_unconstrained`).
    pub allow_unconstrained: bool,
    /// The configured endpoint hosts (DNS names, their Kubernetes short names, IP literals):
    /// what a constrained CA must permit.
    pub names: Vec<String>,
    /// Rotation: the CA that signs from `from` on.
    pub next: Option<NextCa>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaFiles {
    /// The paths with `${NODE_NAME}` replaced; `section` (`ca`, `ca.next`) names them in errors.
    pub fn resolved(&self, section: &str) -> Result<CaFiles> {
        Ok(CaFiles {
            cert: expand_node_name(&self.cert, &format!("{section}.cert"))?,
            key: expand_node_name(&self.key, &format!("{section}.key"))?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextCa {
    pub files: CaFiles,
    pub from: SystemTime,
}

/// A path as configured is checked for placeholders: `${NODE_NAME}` is the only one.
pub fn check_placeholders(path: &str) -> Result<(), String> {
    let mut rest = path;
    while let Some(i) = rest.find("${") {
        let tail = &rest[i..];
        if !tail.starts_with(NODE_NAME_PLACEHOLDER) {
            let shown: String = tail
                .chars()
                .take_while(|c| *c != '}')
                .chain(['}'])
                .collect();
            return Err(format!(
                "{path:?}: unknown placeholder {shown}: the only one is {NODE_NAME_PLACEHOLDER} \
                 (the {NODE_NAME_VAR} environment variable)"
            ));
        }
        rest = &tail[NODE_NAME_PLACEHOLDER.len()..];
    }
    Ok(())
}

/// `path` with `${NODE_NAME}` replaced by the environment variable, which must then be set to a
/// node name (letters, digits, `-`, `.`, `_`; never a path).
fn expand_node_name(path: &Path, key: &str) -> Result<PathBuf> {
    expand_node_name_with(path, key, std::env::var(NODE_NAME_VAR).ok())
}

fn expand_node_name_with(path: &Path, key: &str, node: Option<String>) -> Result<PathBuf> {
    let Some(text) = path.to_str().filter(|t| t.contains(NODE_NAME_PLACEHOLDER)) else {
        return Ok(path.to_path_buf());
    };
    let node = node.unwrap_or_default();
    if node.is_empty() {
        bail!(
            "{key} {text}: the {NODE_NAME_VAR} environment variable is not set; in a DaemonSet set \
             it from the downward API (env {NODE_NAME_VAR}, valueFrom fieldRef spec.nodeName)"
        );
    }
    check_node_name(&node).with_context(|| format!("{key} {text}: {NODE_NAME_VAR}"))?;
    Ok(PathBuf::from(text.replace(NODE_NAME_PLACEHOLDER, &node)))
}

/// A Kubernetes node name, safe in a file name.
pub fn check_node_name(node: &str) -> Result<()> {
    let ok = !node.is_empty()
        && node.len() <= 253
        && !node.starts_with('.')
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !ok {
        bail!(
            "{node:?} is not a node name (letters, digits, '-', '.', '_'; not starting with '.')"
        );
    }
    Ok(())
}

/// What a leaf is minted for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LeafName {
    /// The SNI the client sent (lower case).
    Dns(String),
    /// No SNI (the client dialled an IP literal): the original destination's address.
    Ip(IpAddr),
}

impl std::fmt::Display for LeafName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeafName::Dns(n) => f.write_str(n),
            LeafName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A freshly signed leaf.
pub struct Minted {
    /// Leaf first, then its CA (and the intermediates above it, never the root of a chain).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_after: SystemTime,
    /// Which CA signed it (see [`Ca::signer_generation`]).
    pub generation: u8,
}

/// A signing CA that is not what workloads trust (an intermediate below a root), for
/// `mcpwarden ca show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intermediate {
    pub source: PathBuf,
    /// Its subject's common name (or the whole subject).
    pub subject: String,
    /// SHA-256, `AB:CD:...`.
    pub fingerprint: String,
    /// The earliest expiry of the chain.
    pub not_after: SystemTime,
}

/// One CA with its key: the certificate that signs, and the chain above it from the same file.
struct Authority {
    /// Every certificate of the file, the signing one first.
    chain: Vec<CertificateDer<'static>>,
    /// The certificate workloads trust: the file's last.
    anchor: CertificateDer<'static>,
    /// `anchor` as PEM.
    pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// The earliest expiry of the chain: no leaf outlives it.
    not_after: SystemTime,
    /// SHA-256 of `anchor`.
    fingerprint: String,
    /// Subject of the signing certificate.
    subject: String,
    /// The name constraints of each certificate of the file that carries them (subject,
    /// constraints), the signing certificate's first.
    constraints: Vec<(String, Constraints)>,
    source: PathBuf,
}

/// The CA (and the one rotating in, if any).
pub struct Ca {
    current: Authority,
    next: Option<(Authority, SystemTime)>,
}

impl Ca {
    /// Load the configured CA, or the state directory's, generating it there on first start.
    pub fn load_or_generate(settings: &CaSettings) -> Result<Ca> {
        let current = match &settings.files {
            Some(files) => {
                if settings.name_constraints {
                    tracing::warn!(
                        cert = %files.cert.display(),
                        "ca.name_constraints applies to generated CAs only: a configured CA carries its own (checked against the endpoints)"
                    );
                }
                let a = Authority::load(&files.resolved("ca")?)?;
                check_configured(&a, settings)?;
                a
            }
            None => Authority::load_or_generate_in(settings)?,
        };
        let next = match &settings.next {
            Some(n) => {
                let a = Authority::load(&n.files.resolved("ca.next")?)?;
                check_configured(&a, settings)?;
                Some((a, n.from))
            }
            None => None,
        };
        let ca = Ca { current, next };
        let now = SystemTime::now();
        for a in ca.authorities() {
            if a.not_after < now + EXPIRY_WARNING {
                tracing::warn!(
                    cert = %a.source.display(),
                    not_after = %humantime::format_rfc3339_seconds(a.not_after),
                    "the CA expires soon: leaves are cut short at its expiry and none can be signed after it; issue a new one (`mcpwarden ca intermediate`) and restart the agent"
                );
            }
        }
        Ok(ca)
    }

    /// 0 while the current CA signs, 1 from the next CA's cut-over on.
    pub fn signer_generation(&self, now: SystemTime) -> u8 {
        match &self.next {
            Some((_, from)) if now >= *from => 1,
            _ => 0,
        }
    }

    fn signer(&self, now: SystemTime) -> &Authority {
        match &self.next {
            Some((next, from)) if now >= *from => next,
            _ => &self.current,
        }
    }

    /// Every CA certificate workloads should trust (the current one, then the next), as PEM:
    /// of a chain, its root only.
    pub fn bundle_pem(&self) -> String {
        self.authorities().map(|a| a.pem.as_str()).collect()
    }

    /// (source file, SHA-256 fingerprint, signs now?) of each CA certificate workloads trust.
    pub fn describe(&self, now: SystemTime) -> Vec<(PathBuf, String, bool)> {
        let gen = self.signer_generation(now);
        self.authorities()
            .enumerate()
            .map(|(i, a)| (a.source.clone(), a.fingerprint.clone(), i == gen as usize))
            .collect()
    }

    /// The signing intermediates (CAs whose file holds a chain), for display.
    pub fn intermediates(&self) -> Vec<Intermediate> {
        self.authorities()
            .filter(|a| a.chain.len() > 1)
            .filter_map(|a| {
                a.chain.first().map(|c| Intermediate {
                    source: a.source.clone(),
                    subject: a.subject.clone(),
                    fingerprint: fingerprint(c),
                    not_after: a.not_after,
                })
            })
            .collect()
    }

    /// The CA certificates workloads trust (roots), so the upstream side never trusts them.
    pub fn certs(&self) -> Vec<CertificateDer<'static>> {
        self.authorities().map(|a| a.anchor.clone()).collect()
    }

    fn authorities(&self) -> impl Iterator<Item = &Authority> {
        std::iter::once(&self.current).chain(self.next.as_ref().map(|(a, _)| a))
    }

    /// Sign a leaf for `name`, valid from an hour ago for [`LEAF_LIFETIME`] (never past the CA).
    pub fn mint(&self, name: &LeafName, now: SystemTime) -> Result<Minted> {
        let generation = self.signer_generation(now);
        let ca = self.signer(now);
        if now >= ca.not_after {
            bail!(
                "{}: the signing CA expired at {}: issue a new one (`mcpwarden ca intermediate`) and restart the agent",
                ca.source.display(),
                humantime::format_rfc3339_seconds(ca.not_after)
            );
        }
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating a leaf key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match name {
            LeafName::Dns(n) => SanType::DnsName(
                n.clone()
                    .try_into()
                    .with_context(|| format!("{n:?} is not a DNS name"))?,
            ),
            LeafName::Ip(ip) => SanType::IpAddress(*ip),
        }];
        let not_after = (now + LEAF_LIFETIME).min(ca.not_after);
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &ca.issuer)
            .with_context(|| format!("signing a leaf for {name}"))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(ca.served().iter().cloned());
        Ok(Minted {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_after,
            generation,
        })
    }
}

/// A CA from files must carry name constraints (unless `ca.allow_unconstrained`), and those it
/// carries must cover every endpoint.
fn check_configured(a: &Authority, settings: &CaSettings) -> Result<()> {
    if a.constraints.is_empty() {
        if settings.allow_unconstrained {
            return Ok(());
        }
        bail!(
            "{}: this CA carries no X.509 name constraints (neither the signing certificate nor one \
             above it in the file): loaded from files such as a Kubernetes Secret, it could sign any \
             name for every workload that trusts it. Generate a constrained one with `mcpwarden ca \
             init --name-constraints-from CONFIG` (and per-node intermediates with `mcpwarden ca \
             intermediate`), or set `ca.allow_unconstrained: true` to use it as it is",
            a.source.display()
        );
    }
    // Constraints that leave a whole kind of name open (DNS names constrained, IP addresses not,
    // or an empty DNS subtree that permits every name) constrain nothing there.
    if !settings.allow_unconstrained && !a.constraints.iter().any(|(_, c)| c.closes_every_type()) {
        bail!(
            "{}: this CA's name constraints leave DNS names or IP addresses open (each kind must              have permitted subtrees, or be excluded whole, as `mcpwarden ca init              --name-constraints-from CONFIG` writes): it could sign names beyond the endpoints.              Generate one with `mcpwarden ca init`, or set `ca.allow_unconstrained: true`",
            a.source.display()
        );
    }
    for (subject, c) in &a.constraints {
        if let Some(n) = settings.names.iter().find(|n| !c.covers(n)) {
            bail!(
                "{}: the name constraints of {subject} ({}) do not cover the endpoint {n}: clients \
                 would reject the leaves minted for it. Generate a new CA from the current config \
                 (`mcpwarden ca init --name-constraints-from CONFIG`, then new intermediates) and \
                 configure it as ca.next to rotate",
                a.source.display(),
                c.describe_permitted()
            );
        }
    }
    Ok(())
}

impl Authority {
    /// Load a CA certificate (or chain) and key; errors name the file.
    fn load(files: &CaFiles) -> Result<Authority> {
        let pem = fs::read_to_string(&files.cert)
            .with_context(|| format!("{}: cannot read the CA certificate", files.cert.display()))?;
        let key_pem = fs::read_to_string(&files.key)
            .with_context(|| format!("{}: cannot read the CA key", files.key.display()))?;
        warn_if_readable_by_others(&files.key);
        // Never include the key's text in an error.
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a PEM private key rcgen can use ({e})",
                files.key.display()
            )
        })?;
        Authority::from_parts(&pem, key, &files.cert)
    }

    fn from_parts(pem: &str, key: KeyPair, source: &Path) -> Result<Authority> {
        let chain = certificates(pem).with_context(|| format!("{}", source.display()))?;
        let (Some(first), Some(anchor)) = (chain.first(), chain.last()) else {
            bail!("{}: no PEM certificate in it", source.display());
        };
        let now = SystemTime::now();
        let mut not_after = None::<SystemTime>;
        let mut constraints = Vec::new();
        let mut subject = String::new();
        for (i, der) in chain.iter().enumerate() {
            let (_, x509) = x509_parser::parse_x509_certificate(der).map_err(|e| {
                anyhow::anyhow!(
                    "{}: certificate {} is not an X.509 certificate: {e}",
                    source.display(),
                    i + 1
                )
            })?;
            let name = common_name(&x509);
            let what = match (i, chain.len()) {
                (0, 1) => "the CA certificate".to_owned(),
                (0, _) => format!("the signing CA certificate ({name}, the first in the file)"),
                _ => format!("certificate {} of the file ({name})", i + 1),
            };
            if !x509.is_ca() {
                bail!(
                    "{}: {what} is not a CA (basicConstraints cA is not set)",
                    source.display()
                );
            }
            if i == 0 {
                subject = name.clone();
                if x509.public_key().raw
                    != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
                {
                    bail!("{}: the CA key does not belong to {what}", source.display());
                }
            }
            let validity = x509.validity();
            let end = SystemTime::UNIX_EPOCH
                + Duration::from_secs(validity.not_after.timestamp().max(0) as u64);
            let start = SystemTime::UNIX_EPOCH
                + Duration::from_secs(validity.not_before.timestamp().max(0) as u64);
            if end <= now {
                let hint = if i == 0 && chain.len() > 1 {
                    ": issue a new intermediate (`mcpwarden ca intermediate`), update the Secret and restart the agent"
                } else {
                    ""
                };
                bail!(
                    "{}: {what} has expired (not after {}){hint}",
                    source.display(),
                    humantime::format_rfc3339_seconds(end)
                );
            }
            if start > now {
                bail!(
                    "{}: {what} is not valid before {}: check this host's clock",
                    source.display(),
                    humantime::format_rfc3339_seconds(start)
                );
            }
            not_after = Some(not_after.map_or(end, |t| t.min(end)));
            if let Some(c) =
                Constraints::of(&x509).with_context(|| format!("{}: {what}", source.display()))?
            {
                constraints.push((name, c));
            }
        }
        let issuer = Issuer::from_ca_cert_der(first, key)
            .map_err(|e| anyhow::anyhow!("{}: cannot sign with this CA: {e}", source.display()))?;
        let a = Authority {
            fingerprint: fingerprint(anchor),
            pem: pem_encode(anchor),
            anchor: anchor.clone(),
            chain: chain.clone(),
            issuer,
            not_after: not_after.unwrap_or(now),
            subject,
            constraints,
            source: source.to_path_buf(),
        };
        a.check_chain(now)?;
        Ok(a)
    }

    /// What a leaf's chain carries after the leaf: the file's certificates but its last (the
    /// root, which clients have); a lone certificate is served itself.
    fn served(&self) -> &[CertificateDer<'static>] {
        match self.chain.len() {
            0 | 1 => &self.chain,
            n => &self.chain[..n - 1],
        }
    }

    /// Sign a throw-away certificate and verify it as a client trusting the file's last
    /// certificate only would: a file whose certificates do not chain up is refused at start,
    /// not discovered by every client.
    fn check_chain(&self, now: SystemTime) -> Result<()> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .context("generating a key to check the CA")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "mcpwarden CA check");
        params.distinguished_name = dn;
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + Duration::from_secs(300)).min(self.not_after).into();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let probe = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("{}: cannot sign with this CA", self.source.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.anchor.clone()).map_err(|e| {
            anyhow::anyhow!(
                "{}: the file's last certificate cannot be a trust anchor: {e}",
                self.source.display()
            )
        })?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| anyhow::anyhow!("{}: {e}", self.source.display()))?;
        let intermediates = if self.chain.len() > 1 {
            self.served()
        } else {
            &[]
        };
        verifier
            .verify_client_cert(
                probe.der(),
                intermediates,
                rustls_pki_types::UnixTime::since_unix_epoch(
                    now.duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default(),
                ),
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: a certificate signed by this CA does not verify up to the file's last \
                     certificate, as clients trusting it would check ({e}): the file holds the \
                     signing CA first, then each certificate above it, the root last",
                    self.source.display()
                )
            })?;
        Ok(())
    }

    /// The state directory's CA; generated there when neither file exists.
    fn load_or_generate_in(settings: &CaSettings) -> Result<Authority> {
        let dir = &settings.state_dir;
        let files = CaFiles {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
        };
        match (files.cert.exists(), files.key.exists()) {
            (true, true) => {
                let a = Authority::load(&files)?;
                if settings.name_constraints {
                    check_constraints_cover(&a, &settings.names)?;
                }
                Ok(a)
            }
            (false, false) => {
                let a = generate(settings, &files)?;
                tracing::info!(
                    cert = %files.cert.display(),
                    fingerprint = %a.fingerprint,
                    "generated a new mcpwarden CA: workloads must trust it (`mcpwarden ca show`)"
                );
                Ok(a)
            }
            (cert, _) => bail!(
                "{}: the state directory has {} but not {}; restore the missing file or remove both to generate a new CA",
                dir.display(),
                if cert { "ca.crt" } else { "ca.key" },
                if cert { "ca.key" } else { "ca.crt" },
            ),
        }
    }
}

/// Create a CA in `files` (directory 0700, key 0600, both written whole then renamed into place).
fn generate(settings: &CaSettings, files: &CaFiles) -> Result<Authority> {
    let dir = &settings.state_dir;
    fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create the state directory", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("{}: cannot make the state directory 0700", dir.display()))?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating the CA key")?;
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mcpwarden");
    dn.push(DnType::CommonName, format!("mcpwarden CA {}", host_name()));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_LIFETIME).into();
    if settings.name_constraints {
        params.name_constraints = Some(constraints_for(&settings.names)?);
    }
    let cert = params.self_signed(&key).context("signing the CA")?;
    write_private(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_private(&files.cert, cert.pem().as_bytes(), 0o644)?;
    Authority::from_parts(&cert.pem(), key, &files.cert)
}

/// Permitted subtrees: every configured DNS name (and its subdomains, as RFC 5280 reads a DNS
/// subtree) and every configured IP literal as a single address. IP SANs are constrained only
/// when some endpoint is configured by IP: a CA with no IP subtree leaves IP names open.
fn constraints_for(names: &[String]) -> Result<NameConstraints> {
    let mut permitted = Vec::new();
    for n in names {
        match n.parse::<IpAddr>() {
            Ok(ip) => permitted.push(GeneralSubtree::IpAddress(
                rcgen::CidrSubnet::from_addr_prefix(ip, if ip.is_ipv4() { 32 } else { 128 }),
            )),
            Err(_) => permitted.push(GeneralSubtree::DnsName(n.to_ascii_lowercase())),
        }
    }
    if permitted.is_empty() {
        bail!("ca.name_constraints: no endpoint names to constrain the CA to");
    }
    Ok(NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: Vec::new(),
    })
}

/// A stored constrained CA must still cover every configured name, or clients would reject the
/// leaves minted for the new ones.
fn check_constraints_cover(a: &Authority, names: &[String]) -> Result<()> {
    if a.constraints.is_empty() {
        bail!(
            "{}: ca.name_constraints is on but this CA has no name constraints; move ca.crt and ca.key aside to generate a constrained CA",
            a.source.display()
        );
    }
    for (_, c) in &a.constraints {
        if let Some(n) = names.iter().find(|n| !c.covers(n)) {
            bail!(
                "{}: the CA's name constraints ({}) do not cover the endpoint {}; rotate to a new CA \
                 (configure it as ca.next) or move ca.crt and ca.key aside to generate one",
                a.source.display(),
                c.describe_permitted(),
                n.to_ascii_lowercase()
            );
        }
    }
    Ok(())
}

/// Write `data` to `path` through a temporary file created with `mode`, then rename it in place.
fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("{}: cannot create", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))
}

fn warn_if_readable_by_others(key: &Path) {
    if let Ok(m) = fs::metadata(key) {
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                key = %key.display(),
                mode = format!("{:o}", m.permissions().mode() & 0o777),
                "the CA key is readable by other users than its owner: make it 0600"
            );
        }
    }
}

/// Every PEM certificate of `pem`, in order (other PEM blocks, such as a key, are skipped).
fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.map(|c| c.into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("not a PEM certificate file: {e}"))
}

/// The subject's common name, else the whole subject.
fn common_name(x509: &x509_parser::certificate::X509Certificate<'_>) -> String {
    x509.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| x509.subject().to_string())
}

/// A certificate as PEM (base64 in lines of 64), ending with a newline.
fn pem_encode(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for group in der.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]);
            } else {
                b64.push(b'=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// SHA-256 of a certificate, as `AB:CD:...` (what `openssl x509 -fingerprint -sha256` prints).
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
