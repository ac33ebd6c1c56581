//! A test certificate authority and the certificates it issues, for TLS test servers
//! ([`crate::TestServer::start_tls`]) and for clients that trust only this CA (its PEM file
//! written with [`TestCa::write_pem`] and given to `mcp-client` as `SSL_CERT_FILE` or CAFILE).
//!
//! Everything is ECDSA P-256, made with rcgen's ring backend.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

/// A self-signed ECDSA P-256 certificate authority that issues server certificates.
pub struct TestCa {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// The validity period of an issued certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Valid now: notBefore one hour ago (tolerates clock skew), notAfter one day after that.
    Current,
    /// Expired: notBefore ten days ago, notAfter one day ago.
    Expired,
}

/// A server certificate issued by a [`TestCa`], with its private key.
#[derive(Debug)]
pub struct ServerCert {
    /// The chain a server sends: the leaf alone (the CA is the trust anchor, not sent).
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's PKCS#8 private key.
    pub key: PrivateKeyDer<'static>,
    /// The certificate of the CA that issued the leaf. A TLS test server that requires client
    /// certificates trusts this CA for them.
    pub ca: CertificateDer<'static>,
}

impl Clone for ServerCert {
    fn clone(&self) -> Self {
        ServerCert {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

impl ServerCert {
    /// The leaf certificate (first in the chain).
    pub fn leaf(&self) -> &CertificateDer<'static> {
        self.chain.first().expect("ServerCert has an empty chain")
    }

    /// [`sha256_fingerprint`] of the leaf certificate.
    pub fn leaf_sha256(&self) -> String {
        sha256_fingerprint(self.leaf())
    }
}

impl TestCa {
    /// A new CA with subject `CN=<common_name>`, valid from 30 days ago for a year (so that it
    /// is valid now even while it vouches for an [`Validity::Expired`] leaf).
    pub fn new(common_name: &str) -> TestCa {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .unwrap_or_else(|e| panic!("generate the P-256 key of test CA {common_name}: {e}"));
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "mcpwarden tests");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(30);
        params.not_after = now + Duration::days(365);
        let cert = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("self-sign test CA {common_name}: {e}"));
        TestCa {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// Write the CA certificate as PEM to `path` (for `SSL_CERT_FILE` or a CA file option).
    pub fn write_pem(&self, path: &Path) {
        std::fs::write(path, &self.cert_pem)
            .unwrap_or_else(|e| panic!("write test CA certificate to {}: {e}", path.display()));
    }

    /// Issue a server certificate (fresh P-256 key) for `sans`: a SAN that parses as an IP
    /// address becomes an IP SAN, any other a DNS SAN. The subject CN is the first SAN.
    /// Extended key usage: serverAuth only.
    pub fn issue(&self, sans: &[&str], validity: Validity) -> ServerCert {
        assert!(!sans.is_empty(), "TestCa::issue needs at least one SAN");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .unwrap_or_else(|e| panic!("generate a P-256 key for {sans:?}: {e}"));
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    (*s).try_into()
                        .unwrap_or_else(|e| panic!("SAN {s:?} is not a valid DNS name: {e}")),
                ),
            })
            .collect();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, sans[0]);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = match validity {
            Validity::Current => {
                let start = now - Duration::hours(1);
                (start, start + Duration::days(1))
            }
            Validity::Expired => (now - Duration::days(10), now - Duration::days(1)),
        };
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("sign the certificate for {sans:?}: {e}"));
        ServerCert {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            ca: self.cert_der.clone(),
        }
    }
}

/// SHA-256 of a DER certificate, lower-case hex without colons (as `mcp-client` prints it).
pub fn sha256_fingerprint(der: &[u8]) -> String {
    crate::sha256_hex(der)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::{CertificateError, Error, RootCertStore};
    use rustls_pki_types::{ServerName, UnixTime};
    use std::sync::Arc;

    fn verifier(ca: &TestCa) -> Arc<WebPkiServerVerifier> {
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.cert_der())
            .expect("add the test CA to a root store");
        WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("build WebPkiServerVerifier")
    }

    fn verify(ca: &TestCa, cert: &ServerCert, name: &str) -> Result<(), Error> {
        let name = ServerName::try_from(name.to_string()).expect("server name");
        verifier(ca)
            .verify_server_cert(cert.leaf(), &cert.chain[1..], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn issued_cert_is_valid_for_its_sans_only() {
        let ca = TestCa::new("mcpwarden test CA");
        let cert = ca.issue(&["127.0.0.1", "mcp.test"], Validity::Current);
        assert_eq!(cert.chain.len(), 1);
        assert_eq!(cert.ca, ca.cert_der());
        for name in ["127.0.0.1", "mcp.test"] {
            verify(&ca, &cert, name)
                .unwrap_or_else(|e| panic!("certificate for {name} rejected: {e}"));
        }
        for name in ["other.test", "127.0.0.2"] {
            match verify(&ca, &cert, name) {
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => {}
                other => panic!("expected NotValidForName for {name}, got {other:?}"),
            }
        }
    }

    #[test]
    fn expired_cert_is_rejected() {
        let ca = TestCa::new("mcpwarden test CA");
        let cert = ca.issue(&["mcp.test"], Validity::Expired);
        match verify(&ca, &cert, "mcp.test") {
            Err(Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) => {}
            other => panic!("expected Expired, got {other:?}"),
        }
    }

    #[test]
    fn cert_from_another_ca_is_rejected() {
        let ca = TestCa::new("mcpwarden test CA");
        let other = TestCa::new("another CA");
        let cert = other.issue(&["mcp.test"], Validity::Current);
        match verify(&ca, &cert, "mcp.test") {
            Err(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {}
            other => panic!("expected UnknownIssuer, got {other:?}"),
        }
    }

    #[test]
    fn pem_and_fingerprint() {
        let ca = TestCa::new("mcpwarden test CA");
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let fp = sha256_fingerprint(&ca.cert_der());
        assert_eq!(fp.len(), 64);
        assert!(fp
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        let cert = ca.issue(&["mcp.test"], Validity::Current);
        let copy = cert.clone();
        assert_eq!(copy.leaf_sha256(), cert.leaf_sha256());
        assert_eq!(copy.key.secret_der(), cert.key.secret_der());
    }
}
