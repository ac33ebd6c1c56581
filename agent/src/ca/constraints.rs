//! X.509 name constraints of CA certificates: reading them, checking that they cover the
//! configured endpoints, and copying them into an intermediate CA.
//!
//! The check is stricter than RFC 5280 in one way: an endpoint is covered only when a permitted
//! subtree of its own type names it (RFC 5280 leaves a type with no permitted subtree open). So
//! a CA constrained to IP addresses alone is no constraint for a DNS endpoint, and the agent
//! says so instead of signing under it.

use std::net::IpAddr;

use anyhow::Result;
use rcgen::{CidrSubnet, GeneralSubtree, NameConstraints};
use x509_parser::extensions::GeneralName;

/// One subtree, as read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Subtree {
    /// A DNS name and its subdomains; with a leading dot, the subdomains only; empty: every name.
    Dns(String),
    /// An address range: address and mask, 4 or 16 bytes each.
    Ip {
        addr: Vec<u8>,
        mask: Vec<u8>,
    },
    Email(String),
    /// A type the agent does not check (directory names, URIs).
    Other,
}

/// The permitted and excluded subtrees of one certificate's nameConstraints extension.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Constraints {
    pub permitted: Vec<Subtree>,
    pub excluded: Vec<Subtree>,
}

impl Constraints {
    /// The name constraints of a certificate, `None` when it has no such extension.
    pub fn of(x509: &x509_parser::certificate::X509Certificate<'_>) -> Result<Option<Constraints>> {
        match x509.name_constraints() {
            Ok(Some(nc)) => {
                let read = |s: &Option<Vec<x509_parser::extensions::GeneralSubtree<'_>>>| {
                    s.iter().flatten().map(|s| subtree(&s.base)).collect()
                };
                Ok(Some(Constraints {
                    permitted: read(&nc.value.permitted_subtrees),
                    excluded: read(&nc.value.excluded_subtrees),
                }))
            }
            Ok(None) => Ok(None),
            Err(e) => anyhow::bail!("unreadable name constraints: {e}"),
        }
    }

    /// Is `name` (a DNS name or an IP literal) explicitly permitted and not excluded?
    pub fn covers(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        let matches = |s: &Subtree| match (name.parse::<IpAddr>(), s) {
            (Ok(ip), Subtree::Ip { addr, mask }) => ip_matches(ip, addr, mask),
            (Err(_), Subtree::Dns(c)) => dns_matches(&name, c),
            _ => false,
        };
        self.permitted.iter().any(matches) && !self.excluded.iter().any(matches)
    }

    /// Whether DNS names and IP addresses are both closed: each kind has permitted subtrees
    /// (and no empty DNS subtree, which permits every name), or is excluded whole (an empty DNS
    /// subtree; 0.0.0.0/0 and ::/0).
    pub fn closes_every_type(&self) -> bool {
        let dns_open_permit = self
            .permitted
            .iter()
            .any(|s| matches!(s, Subtree::Dns(d) if d.is_empty()));
        let dns_permitted = self.permitted.iter().any(|s| matches!(s, Subtree::Dns(_)));
        let dns_excluded_whole = self
            .excluded
            .iter()
            .any(|s| matches!(s, Subtree::Dns(d) if d.is_empty()));
        let dns_closed = dns_excluded_whole || (dns_permitted && !dns_open_permit);
        let ip_permitted = self
            .permitted
            .iter()
            .any(|s| matches!(s, Subtree::Ip { .. }));
        let whole = |len: usize| {
            self.excluded.iter().any(|s| {
                matches!(s, Subtree::Ip { addr, mask } if addr.len() == len && mask.iter().all(|b| *b == 0))
            })
        };
        let ip_closed = ip_permitted || (whole(4) && whole(16));
        dns_closed && ip_closed
    }

    /// The permitted subtrees, for messages: `tools.mcp, 10.0.0.5/32`.
    pub fn describe_permitted(&self) -> String {
        let shown: Vec<String> = self.permitted.iter().map(show).collect();
        if shown.is_empty() {
            "none permitted".to_owned()
        } else {
            shown.join(", ")
        }
    }

    /// The same constraints for a certificate rcgen signs (subtrees of unchecked types are left
    /// out: the certificate above still carries them, and clients apply every CA's constraints).
    pub fn to_rcgen(&self) -> NameConstraints {
        let convert = |s: &[Subtree]| -> Vec<GeneralSubtree> {
            s.iter()
                .filter_map(|s| match s {
                    Subtree::Dns(d) => Some(GeneralSubtree::DnsName(d.clone())),
                    Subtree::Email(e) => Some(GeneralSubtree::Rfc822Name(e.clone())),
                    Subtree::Ip { addr, mask } => cidr(addr, mask).map(GeneralSubtree::IpAddress),
                    Subtree::Other => None,
                })
                .collect()
        };
        NameConstraints {
            permitted_subtrees: convert(&self.permitted),
            excluded_subtrees: convert(&self.excluded),
        }
    }
}

fn subtree(name: &GeneralName<'_>) -> Subtree {
    match name {
        GeneralName::DNSName(d) => Subtree::Dns(d.to_ascii_lowercase()),
        GeneralName::RFC822Name(e) => Subtree::Email((*e).to_owned()),
        GeneralName::IPAddress(b) if b.len() == 8 || b.len() == 32 => {
            let (addr, mask) = b.split_at(b.len() / 2);
            Subtree::Ip {
                addr: addr.to_vec(),
                mask: mask.to_vec(),
            }
        }
        _ => Subtree::Other,
    }
}

fn cidr(addr: &[u8], mask: &[u8]) -> Option<CidrSubnet> {
    match (<[u8; 4]>::try_from(addr), <[u8; 4]>::try_from(mask)) {
        (Ok(a), Ok(m)) => Some(CidrSubnet::V4(a, m)),
        _ => match (<[u8; 16]>::try_from(addr), <[u8; 16]>::try_from(mask)) {
            (Ok(a), Ok(m)) => Some(CidrSubnet::V6(a, m)),
            _ => None,
        },
    }
}

fn show(s: &Subtree) -> String {
    match s {
        Subtree::Dns(d) if d.is_empty() => "every DNS name".to_owned(),
        Subtree::Dns(d) => d.clone(),
        Subtree::Email(e) => format!("email {e}"),
        Subtree::Ip { addr, mask } => {
            let prefix: u32 = mask.iter().map(|b| b.count_ones()).sum();
            let ip = match (
                <[u8; 4]>::try_from(addr.as_slice()),
                <[u8; 16]>::try_from(addr.as_slice()),
            ) {
                (Ok(a), _) => IpAddr::from(a).to_string(),
                (_, Ok(a)) => IpAddr::from(a).to_string(),
                _ => "?".to_owned(),
            };
            format!("{ip}/{prefix}")
        }
        Subtree::Other => "(a directory name or URI)".to_owned(),
    }
}

/// RFC 5280 DNS subtrees: the name itself and its subdomains; `.example.com` the subdomains
/// only; the empty name every name.
fn dns_matches(name: &str, constraint: &str) -> bool {
    let name = name.trim_end_matches('.');
    if constraint.is_empty() {
        return true;
    }
    if constraint.starts_with('.') {
        return name.ends_with(constraint);
    }
    name == constraint || name.ends_with(&format!(".{constraint}"))
}

fn ip_matches(ip: IpAddr, addr: &[u8], mask: &[u8]) -> bool {
    let octets: Vec<u8> = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    octets.len() == addr.len()
        && addr.len() == mask.len()
        && octets
            .iter()
            .zip(addr)
            .zip(mask)
            .all(|((o, a), m)| o & m == a & m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(net: &str, prefix: u8) -> Subtree {
        let (addr, mask) = match cidr_of(net, prefix) {
            CidrSubnet::V4(a, m) => (a.to_vec(), m.to_vec()),
            CidrSubnet::V6(a, m) => (a.to_vec(), m.to_vec()),
        };
        Subtree::Ip { addr, mask }
    }

    fn cidr_of(net: &str, prefix: u8) -> CidrSubnet {
        CidrSubnet::from_addr_prefix(net.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])), prefix)
    }

    #[test]
    fn coverage_follows_subtrees_and_exclusions() {
        let c = Constraints {
            permitted: vec![
                Subtree::Dns("tools.mcp".into()),
                Subtree::Dns(".corp.test".into()),
                ip("10.1.0.0", 16),
            ],
            excluded: vec![Subtree::Dns("bad.tools.mcp".into()), ip("10.1.9.9", 32)],
        };
        assert!(c.covers("tools.mcp") && c.covers("A.Tools.MCP"));
        assert!(!c.covers("xtools.mcp") && !c.covers("tools.mcp.svc"));
        assert!(c.covers("x.corp.test") && !c.covers("corp.test"));
        assert!(!c.covers("bad.tools.mcp") && !c.covers("x.bad.tools.mcp"));
        assert!(c.covers("10.1.2.3") && !c.covers("10.2.0.1") && !c.covers("10.1.9.9"));
        assert!(!c.covers("::1"));
        // No permitted subtree of a type: not covered (stricter than RFC 5280, on purpose).
        let dns_only = Constraints {
            permitted: vec![Subtree::Dns("a.test".into())],
            excluded: vec![],
        };
        assert!(!dns_only.covers("10.0.0.1"));
        assert_eq!(c.describe_permitted(), "tools.mcp, .corp.test, 10.1.0.0/16");
    }

    #[test]
    fn a_constraint_must_close_dns_names_and_ip_addresses_both() {
        let dns = Subtree::Dns("tools.mcp".into());
        let every_name = Subtree::Dns(String::new());
        let c = |permitted: Vec<Subtree>, excluded: Vec<Subtree>| Constraints {
            permitted,
            excluded,
        };
        assert!(c(vec![dns.clone(), ip("10.1.0.0", 16)], vec![]).closes_every_type());
        // What `ca init` writes for DNS endpoints only: every IP address excluded.
        assert!(c(vec![dns.clone()], vec![ip("0.0.0.0", 0), ip("::", 0)]).closes_every_type());
        // Open: IP addresses unconstrained, or only IPv4 excluded, or every DNS name permitted.
        assert!(!c(vec![dns.clone()], vec![]).closes_every_type());
        assert!(!c(vec![dns.clone()], vec![ip("0.0.0.0", 0)]).closes_every_type());
        assert!(!c(vec![every_name.clone(), ip("10.1.0.0", 16)], vec![]).closes_every_type());
        assert!(!c(vec![ip("10.1.0.0", 16)], vec![]).closes_every_type());
        assert!(c(vec![ip("10.1.0.0", 16)], vec![every_name]).closes_every_type());
    }
}
