//! The client side of TLS interception: read the ClientHello, check its SNI against the names
//! configured for the original destination, present a leaf minted for that name (or for the
//! destination's address when there is no SNI), and offer the ALPN protocols the real server
//! speaks.
//!
//! Leaves are cached per name in a bounded LRU; concurrent first connections for one name wait
//! on one mint. A leaf is re-minted when less than [`REMINT_BEFORE`] of its life is left, or when
//! a CA rotation has moved signing to the next CA.
//!
//! What the server speaks (h2 or only HTTP/1.1) is learned by one probe handshake per
//! (destination, SNI) and cached for [`ALPN_TTL`], then refreshed in the background while the
//! old answer is served. The agent probes (and mints for) every configured origin at start, so
//! a client handshake waits for the upstream only for an origin first seen later (an address
//! DNS added), and concurrent first connections wait on one probe.

use std::{
    collections::HashMap,
    net::SocketAddr,
    num::NonZeroUsize,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use rustls::{
    server::{Acceptor, ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};
use tokio::net::TcpStream;
use tokio_rustls::StartHandshake;

use crate::{
    ca::{Ca, LeafName},
    netns::Netns,
};

mod hello;
use hello::{Peeked, MAX_HELLO};

/// Names whose leaves are kept.
const LEAF_CACHE: usize = 1024;
/// Re-mint when a leaf has less than this left.
const REMINT_BEFORE: Duration = Duration::from_secs(6 * 3600);
/// How long what a server speaks is remembered.
const ALPN_TTL: Duration = Duration::from_secs(600);
/// How long a probe handshake to the server may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed probe's answer (HTTP/1.1 only) is kept.
const PROBE_RETRY: Duration = Duration::from_secs(5);

pub const H2: &[u8] = b"h2";
pub const HTTP11: &[u8] = b"http/1.1";

/// What to offer a client in ALPN: what the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    H2AndHttp11,
    Http11,
}

impl Offer {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Offer::H2AndHttp11 => vec![H2.to_vec(), HTTP11.to_vec()],
            Offer::Http11 => vec![HTTP11.to_vec()],
        }
    }
}

/// One cached leaf and the server configs built around it.
struct Leaf {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
    generation: u8,
    /// Indexed by [`Offer`]: h2+http/1.1, http/1.1.
    configs: [OnceLock<Arc<ServerConfig>>; 2],
}

type Slot = Arc<tokio::sync::OnceCell<Arc<Leaf>>>;

/// Minted leaves, per name.
pub struct Leaves {
    ca: Arc<Ca>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    cache: Mutex<lru::LruCache<LeafName, Slot>>,
    minted: AtomicU64,
}

impl Leaves {
    pub fn new(ca: Arc<Ca>, provider: Arc<rustls::crypto::CryptoProvider>) -> Leaves {
        Leaves {
            ca,
            provider,
            cache: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(LEAF_CACHE).unwrap_or(NonZeroUsize::MIN),
            )),
            minted: AtomicU64::new(0),
        }
    }

    /// How many leaves have been minted since start.
    pub fn minted(&self) -> u64 {
        self.minted.load(Ordering::Relaxed)
    }

    /// The server config presenting the leaf for `name`, offering `offer` in ALPN.
    pub async fn config(&self, name: &LeafName, offer: Offer) -> Result<Arc<ServerConfig>> {
        self.config_at(name, offer, SystemTime::now()).await
    }

    async fn config_at(
        &self,
        name: &LeafName,
        offer: Offer,
        now: SystemTime,
    ) -> Result<Arc<ServerConfig>> {
        let leaf = self.leaf(name, now).await?;
        let slot = match offer {
            Offer::H2AndHttp11 => &leaf.configs[0],
            Offer::Http11 => &leaf.configs[1],
        };
        if let Some(c) = slot.get() {
            return Ok(c.clone());
        }
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS server versions")?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(leaf.key.clone())));
        config.alpn_protocols = offer.protocols();
        let config = Arc::new(config);
        Ok(slot.get_or_init(|| config).clone())
    }

    /// Make sure a leaf for `name` is minted (errors surface again from [`Leaves::config`]).
    pub async fn warm(&self, name: &LeafName) {
        let _ = self.leaf(name, SystemTime::now()).await;
    }

    async fn leaf(&self, name: &LeafName, now: SystemTime) -> Result<Arc<Leaf>> {
        let slot = self.slot(name, now);
        let leaf = slot
            .get_or_try_init(|| async {
                let minted = self.ca.mint(name, now)?;
                let key = self
                    .provider
                    .key_provider
                    .load_private_key(minted.key)
                    .context("loading a minted leaf key")?;
                self.minted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(name = %name, generation = minted.generation, "minted a leaf certificate");
                Ok::<_, anyhow::Error>(Arc::new(Leaf {
                    key: Arc::new(CertifiedKey::new(minted.chain, key)),
                    not_after: minted.not_after,
                    generation: minted.generation,
                    configs: [OnceLock::new(), OnceLock::new()],
                }))
            })
            .await?;
        Ok(leaf.clone())
    }

    /// The slot for `name`: the cached one unless its leaf is due for re-minting.
    fn slot(&self, name: &LeafName, now: SystemTime) -> Slot {
        let generation = self.ca.signer_generation(now);
        let Ok(mut cache) = self.cache.lock() else {
            // A poisoned cache: mint without caching rather than stop serving.
            return Slot::default();
        };
        if let Some(slot) = cache.get(name) {
            let fresh = slot.get().is_none_or(|leaf| {
                leaf.generation == generation
                    && leaf
                        .not_after
                        .duration_since(now)
                        .is_ok_and(|left| left > REMINT_BEFORE)
            });
            if fresh {
                return slot.clone();
            }
        }
        let slot = Slot::default();
        cache.put(name.clone(), slot.clone());
        slot
    }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A server as the client addressed it: from which network namespace (a pod's loopback is its
/// own, and its routes may reach another server), destination and SNI.
type Origin = (u64, SocketAddr, Option<String>);

/// What one origin speaks, and until when that is believed.
type Learned = Arc<tokio::sync::OnceCell<(Offer, Instant)>>;

struct Entry {
    learned: Learned,
    /// A background probe is replacing a stale answer.
    refreshing: bool,
}

/// What servers at (destination, SNI) speak, learned by probing. Only the first connection to
/// an origin waits for a probe (concurrent first connections wait on the same one); a stale
/// answer keeps being used while a background probe replaces it.
#[derive(Default)]
pub struct Protocols {
    learned: Mutex<HashMap<Origin, Entry>>,
}

impl Protocols {
    /// What to offer for this origin. A failed probe offers HTTP/1.1 only and is believed for
    /// [`PROBE_RETRY`]: the request that follows meets the same failure and reports it to the
    /// client, and a burst of connections to a broken server costs one probe, not one each.
    pub async fn learn(
        self: &Arc<Self>,
        netns: &Arc<Netns>,
        dst: SocketAddr,
        sni: Option<&str>,
        client: &Arc<super::upstream::TlsClient>,
    ) -> Offer {
        let origin = (netns.cookie, dst, sni.map(str::to_owned));
        let learned = {
            let Ok(mut map) = self.learned.lock() else {
                return Offer::Http11;
            };
            let entry = map.entry(origin.clone()).or_insert_with(|| Entry {
                learned: Learned::default(),
                refreshing: false,
            });
            match entry.learned.get() {
                Some((offer, until)) if *until > Instant::now() => return *offer,
                Some((offer, _)) => {
                    if !entry.refreshing {
                        entry.refreshing = true;
                        tokio::spawn(self.clone().refresh(origin, netns.clone(), client.clone()));
                    }
                    return *offer;
                }
                None => entry.learned.clone(),
            }
        };
        let (offer, _) = learned.get_or_init(|| probe(netns, dst, sni, client)).await;
        *offer
    }

    async fn refresh(
        self: Arc<Self>,
        origin: Origin,
        netns: Arc<Netns>,
        client: Arc<super::upstream::TlsClient>,
    ) {
        let answer = probe(&netns, origin.1, origin.2.as_deref(), &client).await;
        if let Ok(mut map) = self.learned.lock() {
            map.insert(
                origin,
                Entry {
                    learned: Arc::new(tokio::sync::OnceCell::new_with(Some(answer))),
                    refreshing: false,
                },
            );
        }
    }
}

/// One probe handshake offering h2 and http/1.1: the server's choice, and until when to
/// believe it.
async fn probe(
    netns: &Netns,
    dst: SocketAddr,
    sni: Option<&str>,
    client: &super::upstream::TlsClient,
) -> (Offer, Instant) {
    match tokio::time::timeout(PROBE_TIMEOUT, client.probe_alpn(netns, dst, sni)).await {
        Ok(Ok(alpn)) => {
            let offer = if alpn.as_deref() == Some(H2) {
                Offer::H2AndHttp11
            } else {
                Offer::Http11
            };
            (offer, Instant::now() + ALPN_TTL)
        }
        Ok(Err(e)) => {
            tracing::debug!(%dst, sni, error = %e, "probing the server's protocols failed");
            (Offer::Http11, Instant::now() + PROBE_RETRY)
        }
        Err(_) => {
            tracing::debug!(%dst, sni, "probing the server's protocols timed out");
            (Offer::Http11, Instant::now() + PROBE_RETRY)
        }
    }
}

/// Why a ClientHello could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("reading the ClientHello: {0}")]
    Read(#[source] std::io::Error),
    #[error("the client closed the connection before its ClientHello")]
    Closed,
    #[error("the ClientHello is larger than a TLS record")]
    TooLarge,
    #[error("not a TLS ClientHello: {0}")]
    NotTls(#[source] std::io::Error),
    #[error("not a TLS ClientHello: {0}")]
    Rejected(#[source] rustls::Error),
}

/// Read the ClientHello without consuming it from the socket (so the connection can still be
/// passed through untouched). Returns the parsed hello and how many bytes it took.
pub async fn peek_client_hello(
    stream: &TcpStream,
) -> Result<(rustls::server::Accepted, usize), HelloError> {
    let mut buf = vec![0u8; MAX_HELLO];
    let mut seen = 0usize;
    loop {
        let n = stream.peek(&mut buf).await.map_err(HelloError::Read)?;
        if n == 0 {
            return Err(HelloError::Closed);
        }
        if n > seen {
            seen = n;
            match hello::peeked(buf.get(..n).unwrap_or_default()) {
                Peeked::Hello(accepted) => return Ok((accepted, n)),
                Peeked::Partial => {}
                Peeked::TooLarge => return Err(HelloError::TooLarge),
                Peeked::Unreadable(e) => return Err(HelloError::Read(e)),
                Peeked::Rejected(e) => return Err(HelloError::Rejected(e)),
            }
        } else {
            // Peeking does not clear readiness: wait a little for the rest of the hello.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Consume the `len` bytes a peeked ClientHello took, and resume the handshake from it.
pub async fn resume_after_peek(
    mut stream: TcpStream,
    accepted: rustls::server::Accepted,
    len: usize,
) -> std::io::Result<StartHandshake<TcpStream>> {
    use tokio::io::AsyncReadExt;
    let mut sink = vec![0u8; len];
    stream.read_exact(&mut sink).await?;
    Ok(StartHandshake::from_parts(accepted, stream))
}

/// Read the ClientHello, consuming it (the usual case: nothing at this destination is passed
/// through).
pub async fn read_client_hello(stream: TcpStream) -> Result<StartHandshake<TcpStream>, HelloError> {
    tokio_rustls::LazyConfigAcceptor::new(Acceptor::default(), stream)
        .await
        .map_err(HelloError::NotTls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CaFiles, CaSettings, NextCa};

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(name: &str) -> Dir {
        Dir(std::env::temp_dir().join(format!("mcpwarden-leaves-{name}-{}", std::process::id())))
    }

    fn leaves(ca: Ca) -> Leaves {
        Leaves::new(
            Arc::new(ca),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
    }

    fn generated(d: &Dir) -> Result<Ca> {
        Ca::load_or_generate(&CaSettings {
            state_dir: d.0.clone(),
            ..CaSettings::default()
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_mint_per_name_whatever_the_offer_or_the_concurrency() -> Result<()> {
        let d = dir("once");
        let leaves = Arc::new(leaves(generated(&d)?));
        let name = LeafName::Dns("mcp.example.test".into());
        let mut tasks = Vec::new();
        for i in 0..50 {
            let (leaves, name) = (leaves.clone(), name.clone());
            let offer = if i % 2 == 0 {
                Offer::H2AndHttp11
            } else {
                Offer::Http11
            };
            tasks.push(tokio::spawn(
                async move { leaves.config(&name, offer).await },
            ));
        }
        for t in tasks {
            t.await??;
        }
        assert_eq!(leaves.minted(), 1);
        let h2 = leaves.config(&name, Offer::H2AndHttp11).await?;
        assert_eq!(h2.alpn_protocols, vec![H2.to_vec(), HTTP11.to_vec()]);
        assert!(Arc::ptr_eq(
            &h2,
            &leaves.config(&name, Offer::H2AndHttp11).await?
        ));
        assert_eq!(
            leaves.config(&name, Offer::Http11).await?.alpn_protocols,
            vec![HTTP11.to_vec()]
        );
        leaves
            .config(&LeafName::Ip("10.1.2.3".parse()?), Offer::Http11)
            .await?;
        assert_eq!(leaves.minted(), 2);
        Ok(())
    }

    /// A TLS server on loopback offering `alpn`, counting handshakes; returns its address.
    async fn alpn_server(
        d: &Dir,
        alpn: &[&[u8]],
        handshakes: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Result<(SocketAddr, Arc<rustls::RootCertStore>)> {
        let ca = generated(d)?;
        let minted = ca.mint(&LeafName::Ip("127.0.0.1".parse()?), SystemTime::now())?;
        let mut roots = rustls::RootCertStore::empty();
        for c in ca.certs() {
            roots.add(c)?;
        }
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(minted.chain, minted.key)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, handshakes) = (acceptor.clone(), handshakes.clone());
                tokio::spawn(async move {
                    if acceptor.accept(tcp).await.is_ok() {
                        handshakes.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        Ok((addr, Arc::new(roots)))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_probe_learns_what_a_server_speaks_for_every_concurrent_first_connection(
    ) -> Result<()> {
        use crate::intercept::upstream::TlsClient;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        for (name, alpn, expected) in [
            ("h2", vec![H2, HTTP11], Offer::H2AndHttp11),
            ("h1", vec![HTTP11], Offer::Http11),
        ] {
            let d = dir(&format!("probe-{name}"));
            let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let (addr, roots) = alpn_server(&d, &alpn, count.clone()).await?;
            let client = Arc::new(TlsClient::new(provider.clone(), roots)?);
            let protocols = Arc::new(Protocols::default());
            let netns = Arc::new(crate::netns::Netns::own()?);
            let mut tasks = Vec::new();
            for _ in 0..20 {
                let (p, c, n) = (protocols.clone(), client.clone(), netns.clone());
                tasks.push(tokio::spawn(
                    async move { p.learn(&n, addr, None, &c).await },
                ));
            }
            for t in tasks {
                assert_eq!(t.await?, expected, "{name}");
            }
            assert_eq!(protocols.learn(&netns, addr, None, &client).await, expected);
            // The server counts a handshake once it has read the client's Finished.
            for _ in 0..100 {
                if count.load(Ordering::SeqCst) > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(
                count.load(Ordering::SeqCst),
                1,
                "{name}: one probe handshake"
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn leaves_are_reminted_near_expiry_and_at_a_ca_cut_over() -> Result<()> {
        let (old, new) = (dir("old"), dir("new"));
        generated(&new)?;
        let start = SystemTime::now();
        let from = start + Duration::from_secs(30 * 3600);
        let ca = Ca::load_or_generate(&CaSettings {
            state_dir: old.0.clone(),
            next: Some(NextCa {
                files: CaFiles {
                    cert: new.0.join("ca.crt"),
                    key: new.0.join("ca.key"),
                },
                from,
            }),
            // A generated CA configured from files: unconstrained, accepted for this test.
            allow_unconstrained: true,
            ..CaSettings::default()
        })?;
        let leaves = leaves(ca);
        let name = LeafName::Dns("a.test".into());
        leaves.config_at(&name, Offer::Http11, start).await?;
        // 17 h later 7 h are left: still cached. 19 h later only 5 h: re-minted.
        leaves
            .config_at(&name, Offer::Http11, start + Duration::from_secs(17 * 3600))
            .await?;
        assert_eq!(leaves.minted(), 1);
        let at19 = start + Duration::from_secs(19 * 3600);
        leaves.config_at(&name, Offer::Http11, at19).await?;
        assert_eq!(leaves.minted(), 2);
        // The cut-over: the next CA signs, so the cached leaf (good until 19 h + 24 h) goes.
        let after = leaves.leaf(&name, from + Duration::from_secs(1)).await?;
        assert_eq!(leaves.minted(), 3);
        assert_eq!(after.generation, 1);
        Ok(())
    }
}
