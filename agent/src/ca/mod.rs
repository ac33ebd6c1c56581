//! The agent's certificate authority: where it comes from, and the leaf certificates it signs.
//!
//! A CA is either loaded from files (`ca.cert`/`ca.key`, e.g. a Kubernetes Secret mount, so a
//! cluster shares one CA) or, on first start, generated into the state directory
//! (`ca.crt` + `ca.key`, key mode 0600 in a 0700 directory). The key is never logged or printed.
//!
//! Rotation: a `next` CA can be configured with a cut-over time. Until then the current CA signs
//! and both are published ([`Ca::bundle_pem`]) so workloads can trust both; from the cut-over on,
//! the next CA signs. Leaves record which CA signed them so the cache re-mints at the cut-over.
//!
//! Leaves are ECDSA P-256, valid [`LEAF_LIFETIME`] from an hour ago (clock skew), never past the
//! signing CA's own expiry.

pub mod trust;

use std::{
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Default state directory (the generated CA lives here).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mcpwarden";
/// How long a minted leaf is valid.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Leaves start this long before they are minted, for clients whose clocks run behind.
const BACKDATE: Duration = Duration::from_secs(3600);
/// A generated CA is valid this long.
const CA_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// Where the CA comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaSettings {
    /// Holds the generated CA (`ca.crt`, `ca.key`).
    pub state_dir: PathBuf,
    /// An existing CA to load instead of the state directory's.
    pub files: Option<CaFiles>,
    /// Generate the CA with X.509 name constraints for `names` (generated CAs only).
    pub name_constraints: bool,
    /// The configured endpoint hosts (DNS names and IP literals): what a constrained CA permits.
    pub names: Vec<String>,
    /// Rotation: the CA that signs from `from` on.
    pub next: Option<NextCa>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextCa {
    pub files: CaFiles,
    pub from: SystemTime,
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
    /// Leaf first, then its CA.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_after: SystemTime,
    /// Which CA signed it (see [`Ca::signer_generation`]).
    pub generation: u8,
}

/// One CA certificate with its key.
struct Authority {
    cert: CertificateDer<'static>,
    pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
    fingerprint: String,
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
                        "ca.name_constraints applies to generated CAs only: the configured CA is used as it is"
                    );
                }
                Authority::load(files)?
            }
            None => Authority::load_or_generate_in(settings)?,
        };
        let next = match &settings.next {
            Some(n) => Some((Authority::load(&n.files)?, n.from)),
            None => None,
        };
        Ok(Ca { current, next })
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

    /// Every CA certificate workloads should trust (the current one, then the next), as PEM.
    pub fn bundle_pem(&self) -> String {
        self.authorities().map(|a| a.pem.as_str()).collect()
    }

    /// (source file, SHA-256 fingerprint, signs now?) of each CA certificate.
    pub fn describe(&self, now: SystemTime) -> Vec<(PathBuf, String, bool)> {
        let gen = self.signer_generation(now);
        self.authorities()
            .enumerate()
            .map(|(i, a)| (a.source.clone(), a.fingerprint.clone(), i == gen as usize))
            .collect()
    }

    /// The CA certificates, so the upstream side never trusts them.
    pub fn certs(&self) -> Vec<CertificateDer<'static>> {
        self.authorities().map(|a| a.cert.clone()).collect()
    }

    fn authorities(&self) -> impl Iterator<Item = &Authority> {
        std::iter::once(&self.current).chain(self.next.as_ref().map(|(a, _)| a))
    }

    /// Sign a leaf for `name`, valid from an hour ago for [`LEAF_LIFETIME`] (never past the CA).
    pub fn mint(&self, name: &LeafName, now: SystemTime) -> Result<Minted> {
        let generation = self.signer_generation(now);
        let ca = self.signer(now);
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
        Ok(Minted {
            chain: vec![cert.der().clone(), ca.cert.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_after,
            generation,
        })
    }
}

impl Authority {
    /// Load a CA certificate and key; errors name the file.
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
        let der = first_certificate(pem)
            .with_context(|| format!("{}: no PEM certificate in it", source.display()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow::anyhow!("{}: not an X.509 certificate: {e}", source.display()))?;
        if !x509.is_ca() {
            bail!(
                "{}: this certificate is not a CA (basicConstraints cA is not set)",
                source.display()
            );
        }
        if x509.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            bail!(
                "{}: the CA key does not belong to this certificate",
                source.display()
            );
        }
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(x509.validity().not_after.timestamp().max(0) as u64);
        if not_after <= SystemTime::now() {
            bail!("{}: the CA certificate has expired", source.display());
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| anyhow::anyhow!("{}: cannot sign with this CA: {e}", source.display()))?;
        Ok(Authority {
            fingerprint: fingerprint(&der),
            cert: der,
            pem: pem_block(pem),
            issuer,
            not_after,
            source: source.to_path_buf(),
        })
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
    let (_, x509) = x509_parser::parse_x509_certificate(&a.cert)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.source.display()))?;
    let permitted: Vec<String> = match x509.name_constraints() {
        Ok(Some(nc)) => nc
            .value
            .permitted_subtrees
            .iter()
            .flatten()
            .filter_map(|s| match &s.base {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    8 => <[u8; 4]>::try_from(&b[..4])
                        .ok()
                        .map(|o| IpAddr::from(o).to_string()),
                    32 => <[u8; 16]>::try_from(&b[..16])
                        .ok()
                        .map(|o| IpAddr::from(o).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        _ => bail!(
            "{}: ca.name_constraints is on but this CA has no name constraints; move ca.crt and ca.key aside to generate a constrained CA",
            a.source.display()
        ),
    };
    for n in names {
        let n = n.to_ascii_lowercase();
        let covered = permitted
            .iter()
            .any(|p| n == *p || n.ends_with(&format!(".{p}")));
        if !covered {
            bail!(
                "{}: the CA's name constraints ({}) do not cover the endpoint {n}; rotate to a new CA \
                 (configure it as ca.next) or move ca.crt and ca.key aside to generate one",
                a.source.display(),
                permitted.join(", ")
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

fn first_certificate(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()
        .map(|c| c.into_owned())
}

/// The first PEM certificate block of `pem`, re-encoded, ending with a newline.
fn pem_block(pem: &str) -> String {
    let begin = pem.find("-----BEGIN CERTIFICATE-----");
    let end = pem
        .find("-----END CERTIFICATE-----")
        .map(|i| i + "-----END CERTIFICATE-----".len());
    match (begin, end) {
        (Some(b), Some(e)) if b < e => format!("{}\n", &pem[b..e]),
        _ => String::new(),
    }
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
