//! The agent's configuration: a YAML file (`--config`), with command-line flags on top.
//!
//! ```yaml
//! listen: ["127.0.0.1:15001", "[::1]:15001"]   # the interceptor; at most one IPv4 and one IPv6
//! audit: /var/log/mcpwarden/audit.jsonl        # or "-" for standard output (the default)
//! cgroup: kubepods.slice                       # where to attach: relative to the cgroup2 mount,
//!                                              # or absolute below it (default: the mount root)
//! agent_cgroup: mcpwarden                      # the agent's own cgroup, never redirected
//! max_body_bytes: 4194304
//! workers: 2                                   # interceptor threads (default: one per CPU)
//! servers:
//!   - name: tools
//!     url: http://10.0.0.5:8080/mcp
//!     policy: policy.json                      # relative to this file
//! ```
//! Unknown keys and bad values are errors naming the file, line and column.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer};

use crate::mcp;

pub const DEFAULT_LISTEN: [&str; 2] = ["127.0.0.1:15001", "[::1]:15001"];
pub const DEFAULT_AGENT_CGROUP: &str = "mcpwarden";

/// An MCP endpoint URL, validated: `http://host[:port]/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl {
    pub raw: String,
    /// A DNS name or an IP literal (without brackets).
    pub host: String,
    pub port: u16,
    /// Normalised path (see [`mcp::normalize_path`]).
    pub path: String,
}

impl EndpointUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let uri: http::Uri = raw
            .parse()
            .map_err(|e| format!("invalid URL {raw:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "{raw:?}: https endpoints need TLS interception, which this version does not have yet"
                ));
            }
            _ => return Err(format!("{raw:?}: an endpoint URL starts with http://")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{raw:?}: the URL has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "{raw:?}: credentials in endpoint URLs are not accepted"
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(format!("{raw:?}: the URL has no host"));
        }
        Ok(EndpointUrl {
            raw: raw.to_owned(),
            host,
            port: authority.port_u16().unwrap_or(80),
            path: mcp::normalize_path(uri.path()),
        })
    }
}

impl<'de> Deserialize<'de> for EndpointUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        EndpointUrl::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// One MCP server under policy.
#[derive(Debug, Clone)]
pub struct Server {
    pub name: String,
    pub url: EndpointUrl,
    pub policy: PathBuf,
}

/// The assembled configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub audit: PathBuf,
    /// As given: absolute, or relative to the cgroup2 mount.
    pub cgroup: PathBuf,
    pub agent_cgroup: PathBuf,
    pub max_body_bytes: usize,
    /// Interceptor worker threads, each a single-threaded runtime serving its own connections.
    pub workers: usize,
    pub servers: Vec<Server>,
}

/// What the command line contributes; `Some`/non-empty values override the file.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub endpoints: Vec<String>,
    pub policies: Vec<PathBuf>,
    pub listen: Vec<SocketAddr>,
    pub audit: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub agent_cgroup: Option<PathBuf>,
    pub max_body_bytes: Option<usize>,
    pub workers: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    listen: Vec<SocketAddr>,
    audit: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    agent_cgroup: Option<PathBuf>,
    max_body_bytes: Option<usize>,
    workers: Option<usize>,
    #[serde(default)]
    servers: Vec<FileServer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    name: Option<String>,
    url: EndpointUrl,
    policy: PathBuf,
}

/// Parse a config file's text; errors name `file:line:column`.
fn parse_file(text: &str, file: &Path) -> Result<FileConfig> {
    serde_yaml_ng::from_str(text).map_err(|e| {
        let message = e.to_string();
        match e.location() {
            Some(l) => {
                // The library appends the position to its message; it is already in front.
                let suffix = format!(" at line {} column {}", l.line(), l.column());
                let message = message.strip_suffix(&suffix).unwrap_or(&message);
                anyhow::anyhow!("{}:{}:{}: {message}", file.display(), l.line(), l.column())
            }
            None => anyhow::anyhow!("{}: {message}", file.display()),
        }
    })
}

impl Config {
    /// Read the file (if any), apply the flags, validate.
    pub fn assemble(flags: Flags) -> Result<Config> {
        let (file, base) = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("{}:0:0: cannot read the config file", path.display())
                })?;
                let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
                (Some(parse_file(&text, path)?), base)
            }
            None => (None, PathBuf::new()),
        };
        let mut servers = Vec::new();
        let mut listen = flags.listen.clone();
        let (mut audit, mut cgroup, mut agent_cgroup, mut max_body, mut workers) =
            (None, None, None, None, None);
        if let Some(f) = file {
            for s in f.servers {
                servers.push(Server {
                    name: s
                        .name
                        .unwrap_or_else(|| format!("{}:{}", s.url.host, s.url.port)),
                    policy: base.join(s.policy),
                    url: s.url,
                });
            }
            if listen.is_empty() {
                listen = f.listen;
            }
            audit = f.audit;
            cgroup = f.cgroup;
            agent_cgroup = f.agent_cgroup;
            max_body = f.max_body_bytes;
            workers = f.workers;
        }
        if flags.endpoints.len() != flags.policies.len() {
            bail!(
                "each --endpoint needs its --policy: got {} endpoint(s) and {} policy file(s)",
                flags.endpoints.len(),
                flags.policies.len()
            );
        }
        for (url, policy) in flags.endpoints.iter().zip(&flags.policies) {
            let url = EndpointUrl::parse(url).map_err(|e| anyhow::anyhow!("--endpoint {e}"))?;
            servers.push(Server {
                name: format!("{}:{}", url.host, url.port),
                url,
                policy: policy.clone(),
            });
        }
        if servers.is_empty() {
            bail!(
                "no MCP server to protect: pass --endpoint http://HOST:PORT/PATH --policy FILE \
                 (repeatable), or --config FILE with a `servers:` list"
            );
        }
        if listen.is_empty() {
            listen = DEFAULT_LISTEN
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect();
        }
        let config = Config {
            listen,
            audit: flags.audit.or(audit).unwrap_or_else(|| PathBuf::from("-")),
            cgroup: flags.cgroup.or(cgroup).unwrap_or_else(|| PathBuf::from("")),
            agent_cgroup: flags
                .agent_cgroup
                .or(agent_cgroup)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_CGROUP)),
            max_body_bytes: flags
                .max_body_bytes
                .or(max_body)
                .unwrap_or(mcp::DEFAULT_MAX_BODY),
            workers: flags
                .workers
                .or(workers)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            servers,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let v4 = self.listen.iter().filter(|a| a.is_ipv4()).count();
        let v6 = self.listen.iter().filter(|a| a.is_ipv6()).count();
        if v4 > 1 || v6 > 1 {
            bail!(
                "listen: at most one IPv4 and one IPv6 address (got {:?})",
                self.listen
            );
        }
        for s in &self.servers {
            if let Ok(ip) = s.url.host.parse::<IpAddr>() {
                let dst = SocketAddr::new(ip, s.url.port);
                if self.listen.contains(&dst) {
                    bail!(
                        "server {}: {} is the interceptor's own address",
                        s.name,
                        s.url.raw
                    );
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.servers {
            if !seen.insert((
                s.url.host.to_ascii_lowercase(),
                s.url.port,
                s.url.path.clone(),
            )) {
                bail!(
                    "server {}: endpoint {} is configured twice; which policy applies would be ambiguous",
                    s.name,
                    s.url.raw
                );
            }
        }
        if self.max_body_bytes == 0 {
            bail!("max_body_bytes must be positive");
        }
        if !(1..=1024).contains(&self.workers) {
            bail!("workers must be between 1 and 1024 (got {})", self.workers);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_error(text: &str, file: &str) -> String {
        parse_file(text, Path::new(file))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn parses_urls() -> Result<(), String> {
        let u = EndpointUrl::parse("http://127.0.0.1:8080/mcp/")?;
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8080, "/mcp")
        );
        let u = EndpointUrl::parse("http://[::1]/a")?;
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 80, "/a")
        );
        assert!(EndpointUrl::parse("https://x/mcp").is_err_and(|e| e.contains("TLS")));
        assert!(EndpointUrl::parse("ftp://x/").is_err());
        assert!(EndpointUrl::parse("http://u:p@x/").is_err());
        Ok(())
    }

    #[test]
    fn file_errors_name_line_and_column() {
        let text =
            "servers:\n  - url: http://127.0.0.1:1/mcp\n    policy: p.json\n    colour: red\n";
        let err = load_error(text, "/etc/mcpwarden.yaml");
        assert!(err.starts_with("/etc/mcpwarden.yaml:4:5: "), "{err}");
        assert!(err.contains("colour"), "{err}");
        let err = load_error(
            "servers:\n  - url: https://example.test/mcp\n    policy: p.json\n",
            "c.yaml",
        );
        assert!(err.starts_with("c.yaml:2:"), "{err}");
        assert!(err.contains("TLS"), "{err}");
    }

    #[test]
    fn flags_add_servers_and_override() -> Result<()> {
        let dir =
            std::env::temp_dir().join(format!("mcpwarden-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("c.yaml");
        std::fs::write(
            &file,
            "audit: /tmp/a.jsonl\nservers:\n  - name: one\n    url: http://127.0.0.1:1/mcp\n    policy: p.json\n",
        )?;
        let c = Config::assemble(Flags {
            config: Some(file),
            endpoints: vec!["http://localhost:2/x".into()],
            policies: vec!["q.json".into()],
            audit: Some("-".into()),
            ..Flags::default()
        })?;
        assert_eq!(c.servers.len(), 2);
        assert_eq!(c.servers[0].name, "one");
        assert_eq!(c.servers[0].policy, dir.join("p.json"));
        assert_eq!(c.servers[1].url.host, "localhost");
        assert_eq!(c.audit, PathBuf::from("-"));
        assert_eq!(c.listen.len(), 2);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn an_endpoint_configured_twice_is_an_error() {
        let err = Config::assemble(Flags {
            endpoints: vec![
                "http://127.0.0.1:1/mcp".into(),
                "http://127.0.0.1:1/mcp/".into(),
            ],
            policies: vec!["a.json".into(), "b.json".into()],
            ..Flags::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("configured twice"), "{err}");
    }

    #[test]
    fn no_server_is_an_error_that_says_what_to_pass() {
        let err = Config::assemble(Flags::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("--endpoint") && err.contains("--policy"),
            "{err}"
        );
    }

    #[test]
    fn workers_come_from_the_file_or_the_flag_and_must_be_positive() -> Result<()> {
        let dir =
            std::env::temp_dir().join(format!("mcpwarden-cfg-workers-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("c.yaml");
        std::fs::write(
            &file,
            "workers: 3\nservers:\n  - name: one\n    url: http://127.0.0.1:1/mcp\n    policy: p.json\n",
        )?;
        let from_file = Config::assemble(Flags {
            config: Some(file.clone()),
            ..Flags::default()
        })?;
        assert_eq!(from_file.workers, 3);
        let from_flag = Config::assemble(Flags {
            config: Some(file.clone()),
            workers: Some(1),
            ..Flags::default()
        })?;
        assert_eq!(from_flag.workers, 1);
        let zero = Config::assemble(Flags {
            config: Some(file),
            workers: Some(0),
            ..Flags::default()
        });
        let err = zero.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("workers must be between 1 and 1024"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
