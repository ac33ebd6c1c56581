//! TLS on one connection: read the ClientHello, check its SNI against the servers configured at
//! the destination, then either terminate (a leaf minted for the name, offering what the server
//! speaks) or pass the connection through untouched (`tls: passthrough`, audited once).

use std::{sync::Arc, time::Duration};

use tokio::net::TcpStream;

use super::{
    conn::{caller_part, Conn, TlsSession},
    tls::{self, HelloError, Offer},
    upstream::TlsClient,
};
use crate::{
    audit::{Event, Head, Record, RequestPart, Tls, Verdict},
    ca::LeafName,
};

/// How long a client may take to send its ClientHello and finish the handshake.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What follows a ClientHello.
pub(super) enum Next {
    /// Terminated: serve HTTP (h2 if true) on the TLS stream.
    Serve(Conn, Box<tokio_rustls::server::TlsStream<TcpStream>>, bool),
    /// `tls: passthrough`, for this SNI.
    Pass(Conn, TcpStream, Option<String>),
    /// Refused (and audited), or the client went away.
    Done,
}

/// A ClientHello, consumed from the socket or only peeked at (its bytes still in the socket,
/// `len` of them, so the connection can be passed through untouched).
enum Hello {
    Read(tokio_rustls::StartHandshake<TcpStream>),
    Peeked(rustls::server::Accepted, usize, TcpStream),
}

/// Why a client handshake failed.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("the TLS handshake did not complete within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    #[error(transparent)]
    Hello(#[from] HelloError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl HandshakeError {
    /// The client refused our certificate: it does not trust the mcpwarden CA.
    fn untrusted(&self) -> bool {
        use rustls::AlertDescription::{BadCertificate, CertificateUnknown, UnknownCA};
        let HandshakeError::Io(e) = self else {
            return false;
        };
        matches!(
            e.get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
            Some(rustls::Error::AlertReceived(
                UnknownCA | BadCertificate | CertificateUnknown
            ))
        )
    }
}

/// `fut`, or [`HandshakeError::Timeout`] after [`HANDSHAKE_TIMEOUT`].
async fn in_time<T, E>(
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, HandshakeError>
where
    HandshakeError: From<E>,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, fut).await {
        Ok(result) => result.map_err(HandshakeError::from),
        Err(_) => Err(HandshakeError::Timeout),
    }
}

impl Conn {
    /// Read the ClientHello and either terminate (the connection narrowed to the servers the
    /// SNI names, the TLS stream and whether h2 was negotiated) or pass the connection through.
    pub(super) async fn terminate_or_pass(mut self, stream: TcpStream) -> Next {
        let passthrough_here = self
            .servers_here()
            .any(|(_, s)| s.tls.as_ref().is_some_and(|t| t.passthrough));
        // Where something may be passed through, the hello is only peeked at: its bytes must
        // still be in the socket to forward them untouched.
        let hello = if passthrough_here {
            in_time(tls::peek_client_hello(&stream))
                .await
                .map(|(accepted, len)| Hello::Peeked(accepted, len, stream))
        } else {
            in_time(tls::read_client_hello(stream))
                .await
                .map(Hello::Read)
        };
        let hello = match hello {
            Ok(h) => h,
            Err(e) => {
                self.refuse_connection(None, format!("{e} (this endpoint is https)"));
                return Next::Done;
            }
        };
        let client_hello = match &hello {
            Hello::Read(start) => start.client_hello(),
            Hello::Peeked(accepted, _, _) => accepted.client_hello(),
        };
        let sni = client_hello.server_name().map(str::to_ascii_lowercase);
        let dst = self.dst;
        // The servers this hello is for: those whose configured name is the SNI; without SNI
        // (the client dialled an address), every https server here.
        let candidates: Vec<usize> = self
            .servers_here()
            .filter(|(_, s)| s.tls.is_some() && sni.as_deref().is_none_or(|n| s.is_named(n)))
            .map(|(i, _)| i)
            .collect();
        let Some(&first) = candidates.first() else {
            let name = sni.as_deref().unwrap_or_default();
            tracing::warn!(%dst, sni = name, "TLS for a name not configured at this destination: refused");
            self.refuse_connection(
                sni.clone(),
                format!(
                    "TLS server name {name:?} is not a configured endpoint name for {dst}: refused"
                ),
            );
            return Next::Done;
        };
        let Some(server_tls) = self.server_at(first).and_then(|s| s.tls.as_ref()) else {
            return Next::Done;
        };
        let (passthrough, client) = (server_tls.passthrough, server_tls.client.clone());
        // Passed through only when every server the hello may be for is: a hello that does not
        // settle between a passthrough server and an inspected one is refused, never passed.
        let mixed = candidates.iter().any(|&i| {
            self.server_at(i)
                .and_then(|s| s.tls.as_ref())
                .is_some_and(|t| t.passthrough != passthrough)
        });
        if mixed {
            let name = sni.as_deref().unwrap_or("(none)");
            self.refuse_connection(
                sni.clone(),
                format!(
                    "TLS server name {name} does not settle whether this connection is for a \
                     passthrough server or an inspected one at {dst}: refused, not passed through"
                ),
            );
            return Next::Done;
        }
        self.servers = candidates;
        match hello {
            Hello::Peeked(_, _, stream) if passthrough => Next::Pass(self, stream, sni),
            Hello::Peeked(accepted, len, stream) => {
                match tls::resume_after_peek(stream, accepted, len).await {
                    Ok(start) => self.handshake(start, sni, first, client).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "client connection ended during the handshake");
                        Next::Done
                    }
                }
            }
            Hello::Read(start) => self.handshake(start, sni, first, client).await,
        }
    }

    /// Finish the client handshake with a minted leaf, offering what the server speaks.
    async fn handshake(
        mut self,
        start: tokio_rustls::StartHandshake<TcpStream>,
        sni: Option<String>,
        server: usize,
        client: Arc<TlsClient>,
    ) -> Next {
        let Some(terminator) = self.shared.terminator.clone() else {
            self.refuse_connection(sni, "TLS termination is not configured".into());
            return Next::Done;
        };
        let dst = self.dst;
        let name = match &sni {
            Some(n) => LeafName::Dns(n.clone()),
            None => LeafName::Ip(dst.ip()),
        };
        // A first connection waits for the probe; mint meanwhile (the leaf is cached either way).
        let (offer, _) = tokio::join!(
            terminator
                .protocols
                .learn(&self.netns, dst, sni.as_deref(), &client),
            terminator.leaves.warm(&name)
        );
        let config = match terminator.leaves.config(&name, offer).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(%name, error = format!("{e:#}"), "minting a leaf failed");
                self.refuse_connection(
                    sni,
                    format!("minting a certificate for {name} failed: {e:#}"),
                );
                return Next::Done;
            }
        };
        match in_time(start.into_stream(config)).await {
            Ok(tls) => {
                let h2 =
                    offer == Offer::H2AndHttp11 && tls.get_ref().1.alpn_protocol() == Some(tls::H2);
                self.terminated(TlsSession {
                    sni,
                    h2,
                    server,
                    client,
                });
                Next::Serve(self, Box::new(tls), h2)
            }
            Err(e) => {
                let hint = if e.untrusted() {
                    ": the client does not trust the mcpwarden CA (see `mcpwarden ca show`)"
                } else {
                    ""
                };
                tracing::warn!(%dst, error = %e, "TLS handshake with the client failed{hint}");
                self.refuse_connection(
                    sni,
                    format!("TLS handshake with the client failed: {e}{hint}"),
                );
                Next::Done
            }
        }
    }

    /// `tls: passthrough`: audit the connection, then copy bytes both ways, uninspected.
    pub(super) async fn pass_through(&self, mut stream: TcpStream, sni: Option<String>) {
        let dst = self.dst;
        let server = self.servers_here().next().map(|(_, s)| s.name.clone());
        let head = Head {
            caller: Some(Arc::new(caller_part(
                dst,
                &self.caller,
                &self.netns,
                sni,
                Some(Tls::Passthrough),
            ))),
            request: Some(Arc::new(RequestPart {
                server,
                ..RequestPart::default()
            })),
            ..Head::default()
        };
        let mut rec = Record::new(Event::Passthrough, Arc::new(head));
        rec.decision = Some(Verdict::Allow);
        rec.reason = Some("tls: passthrough — forwarded untouched, not inspected".into());
        if self.audit.write(&rec).is_err() {
            tracing::error!("audit write failed: not passing the connection through");
            return;
        }
        // From the caller's namespace, as every upstream connection.
        let mut upstream = match self.netns.connect(dst).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(%dst, error = %e, "passthrough: the server could not be reached");
                return;
            }
        };
        if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await {
            tracing::debug!(%dst, error = %e, "passthrough connection ended");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HandshakeError;

    fn io(e: rustls::Error) -> HandshakeError {
        HandshakeError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    #[test]
    fn a_client_that_rejects_our_leaf_is_told_apart_by_its_alert() {
        use rustls::AlertDescription::{
            BadCertificate, CertificateUnknown, HandshakeFailure, UnknownCA,
        };
        for alert in [UnknownCA, BadCertificate, CertificateUnknown] {
            assert!(
                io(rustls::Error::AlertReceived(alert)).untrusted(),
                "{alert:?}"
            );
        }
        assert!(!io(rustls::Error::AlertReceived(HandshakeFailure)).untrusted());
        assert!(!io(rustls::Error::HandshakeNotComplete).untrusted());
        assert!(!HandshakeError::Timeout.untrusted());
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "UnknownCA");
        assert!(
            !HandshakeError::Io(plain).untrusted(),
            "the word in a message is not the alert"
        );
    }
}
