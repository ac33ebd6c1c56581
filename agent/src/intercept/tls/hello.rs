//! The byte-level half of reading a ClientHello: what the bytes a client has sent so far say,
//! as a pure function over a buffer. [`super::peek_client_hello`] calls [`peeked`] each time
//! its peek sees more bytes.
//!
//! This file depends on `rustls` and `std` alone, and must stay so: the `client_hello` fuzz
//! target (`agent/fuzz/fuzz_targets/client_hello.rs`) includes it by path, so that it fuzzes
//! this very code without building the agent (whose build script builds the eBPF programs).
//! Its invariants, [`check`], are compiled only for the fuzzer (`--cfg fuzzing`) and for
//! tests, which replay the seed corpus (`agent/fuzz/corpus/client_hello/`) through them.

use rustls::server::{Accepted, Acceptor};

/// The largest ClientHello read while peeking (TLS records are at most 16 KiB + header).
pub const MAX_HELLO: usize = 16 * 1024 + 5;

/// What the first bytes of a connection say about its ClientHello.
// `Accepted` is large, as it was in the `Result<Option<Accepted>, _>` this replaced: each value
// is matched at once, and boxing it would add an allocation per connection for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Peeked {
    /// A whole ClientHello.
    Hello(Accepted),
    /// Not a whole ClientHello yet: wait for more bytes.
    Partial,
    /// [`MAX_HELLO`] bytes or more, and still no whole ClientHello.
    TooLarge,
    /// rustls could not take the bytes in.
    Unreadable(std::io::Error),
    /// Not a ClientHello rustls accepts.
    Rejected(rustls::Error),
}

/// Reads `buf`, every byte the client has sent so far, into a fresh rustls [`Acceptor`].
pub fn peeked(buf: &[u8]) -> Peeked {
    let mut acceptor = Acceptor::default();
    let mut rd: &[u8] = buf;
    while !rd.is_empty() {
        if let Err(e) = acceptor.read_tls(&mut rd) {
            return Peeked::Unreadable(e);
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Peeked::Hello(accepted),
        Ok(None) if buf.len() < MAX_HELLO => Peeked::Partial,
        Ok(None) => Peeked::TooLarge,
        Err((e, _)) => Peeked::Rejected(e),
    }
}

/// Where the fuzz target's input went, and what the ClientHello said.
#[cfg(any(fuzzing, test))]
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// A ClientHello: its SNI as the agent uses it (lower case), its ALPN protocols, cipher
    /// suites and signature schemes.
    Hello(Option<String>, Option<Vec<Vec<u8>>>, String),
    /// Refused (rustls' error, or a read error).
    Refused,
    /// The input ended before a decision (more bytes would be awaited, or it is too large).
    Undecided,
}

#[cfg(any(fuzzing, test))]
impl Outcome {
    fn of(accepted: &Accepted) -> Outcome {
        let hello = accepted.client_hello();
        Outcome::Hello(
            hello.server_name().map(str::to_ascii_lowercase),
            hello
                .alpn()
                .map(|protocols| protocols.map(<[u8]>::to_vec).collect()),
            format!(
                "{:?} {:?} {:?}",
                hello.cipher_suites(),
                hello.signature_schemes(),
                hello.named_groups()
            ),
        )
    }
}

/// The invariants of the `client_hello` fuzz target, over the bytes a client sends. A panic
/// is a finding.
///
/// The same bytes are read the two ways the agent reads a ClientHello:
/// - peeked ([`super::peek_client_hello`], where something may be passed through): [`peeked`]
///   on ever longer prefixes (at most [`MAX_HELLO`] bytes), at cut points derived from the
///   input, until it decides;
/// - consumed ([`super::read_client_hello`]): tokio-rustls' `LazyConfigAcceptor` drives one
///   rustls `Acceptor`, one `read_tls` per read from the socket and `accept` after each; here
///   reads return the input in pieces derived from the input (and one byte at a time).
///
/// Invariants: nothing panics or loops; the two ways, and every way of cutting the input,
/// agree on whether it is a ClientHello, and when it is, on its SNI, ALPN, cipher suites,
/// signature schemes and groups (a passed-through connection and a terminated one never see
/// two hellos in one byte stream); an SNI is ASCII and, lower-cased as the agent uses it, a
/// valid DNS name (the name the agent compares with its endpoints and mints a leaf for).
#[cfg(any(fuzzing, test))]
pub fn check(data: &[u8]) -> String {
    let peekable = &data[..data.len().min(MAX_HELLO)];
    let mut rng = Rng::new(data);
    let mut cuts: Vec<usize> = (0..1 + rng.next() % 6)
        .map(|_| (rng.next() % (peekable.len() as u64 + 1)) as usize)
        .chain([peekable.len()])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();

    // Peeked: each time more bytes are there, the whole prefix read afresh.
    let mut peek = Outcome::Undecided;
    let mut decided_at = None;
    let mut why = String::new();
    for &n in &cuts {
        let outcome = match peeked(&peekable[..n]) {
            Peeked::Partial | Peeked::TooLarge => continue,
            Peeked::Hello(accepted) => Outcome::of(&accepted),
            Peeked::Unreadable(e) => {
                why = e.to_string();
                Outcome::Refused
            }
            Peeked::Rejected(e) => {
                why = e.to_string();
                Outcome::Refused
            }
        };
        peek = outcome;
        decided_at = Some(n);
        break;
    }

    // Consumed: one acceptor fed read by read.
    let pieces: Vec<usize> = cuts
        .iter()
        .scan(0, |last, &c| {
            let len = c - *last;
            *last = c;
            Some(len)
        })
        .filter(|&len| len > 0)
        .collect();
    let (read, consumed) = read_in_pieces(data, &pieces);
    let (bytewise, _) = read_in_pieces(data, &[1]);
    assert_eq!(
        read, bytewise,
        "read in pieces {pieces:?} and byte by byte, one acceptor decides otherwise"
    );

    // Both ways see the same bytes: a decision one way is the same decision the other way.
    if peek != Outcome::Undecided {
        assert!(
            read != Outcome::Undecided,
            "peeking {decided_at:?} bytes decided {peek:?}, reading them all decided nothing"
        );
    }
    if read != Outcome::Undecided && consumed <= peekable.len() {
        assert!(
            peek != Outcome::Undecided,
            "reading {consumed} bytes decided {read:?}, peeking {} decided nothing",
            peekable.len()
        );
    }
    if read != Outcome::Undecided && peek != Outcome::Undecided {
        assert_eq!(
            peek, read,
            "peeked (decided at {decided_at:?} bytes) and read ({consumed} bytes) differ"
        );
    }
    if let Outcome::Hello(Some(name), _, _) = &peek {
        assert!(name.is_ascii(), "SNI {name:?} is not ASCII");
        assert!(
            rustls::pki_types::DnsName::try_from(name.clone()).is_ok(),
            "SNI {name:?} is not a DNS name: the agent cannot mint a leaf for it"
        );
    }
    match (&peek, &read) {
        (Outcome::Hello(sni, alpn, _), _) | (_, Outcome::Hello(sni, alpn, _)) => {
            let alpn: Vec<String> = alpn
                .iter()
                .flatten()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            format!("ClientHello: SNI {sni:?}, ALPN {alpn:?}")
        }
        (Outcome::Refused, _) | (_, Outcome::Refused) => format!("refused ({why})"),
        _ => "undecided".to_owned(),
    }
}

/// What `LazyConfigAcceptor` decides over a socket that returns `data` in reads of the sizes
/// `pieces` (the last size repeated), and how many bytes it had read then.
#[cfg(any(fuzzing, test))]
fn read_in_pieces(data: &[u8], pieces: &[usize]) -> (Outcome, usize) {
    let mut acceptor = Acceptor::default();
    let mut at = 0;
    let mut sizes = pieces.iter().copied().chain(std::iter::repeat(
        pieces.last().copied().unwrap_or(data.len()).max(1),
    ));
    // Each read takes at least one byte or ends the loop.
    while at < data.len() {
        let size = sizes.next().unwrap_or(1).max(1);
        let mut socket: &[u8] = &data[at..data.len().min(at + size)];
        match acceptor.read_tls(&mut socket) {
            // What LazyConfigAcceptor takes for the end of the stream (rustls reads nothing
            // more once the client has sent close_notify).
            Ok(0) => return (Outcome::Refused, at),
            Ok(n) => at += n,
            Err(_) => return (Outcome::Refused, at),
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return (Outcome::of(&accepted), at),
            Ok(None) => {}
            Err(_) => return (Outcome::Refused, at),
        }
    }
    (Outcome::Undecided, at)
}

/// A small deterministic generator seeded by the input (FNV-1a, then splitmix64), for cut
/// points that are the same every time one input is replayed.
#[cfg(any(fuzzing, test))]
struct Rng(u64);

#[cfg(any(fuzzing, test))]
impl Rng {
    fn new(data: &[u8]) -> Rng {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in data {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Rng(hash)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed corpus, replayed through [`check`]: seeds named `hello_*` must be read as a
    /// ClientHello, `refused_*` refused.
    #[test]
    fn client_hello_corpus_keeps_the_invariants() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/client_hello");
        let mut paths: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.is_file())
            .collect();
        paths.sort();
        assert!(!paths.is_empty(), "{} has no seeds", dir.display());
        for path in &paths {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes =
                std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            let summary = check(&bytes);
            println!("client_hello/{name}: {summary}");
            if name.starts_with("hello_") {
                assert!(summary.starts_with("ClientHello"), "{name}: {summary}");
            }
            if name.starts_with("refused_") {
                assert!(summary.starts_with("refused"), "{name}: {summary}");
            }
        }
        println!(
            "client_hello: {} seed(s), every invariant held",
            paths.len()
        );
    }

    #[test]
    fn a_hello_cut_short_waits_and_plaintext_is_refused() {
        assert!(matches!(peeked(&[0x16, 0x03, 0x01]), Peeked::Partial));
        assert!(matches!(peeked(b""), Peeked::Partial));
        assert!(matches!(
            peeked(b"GET / HTTP/1.1\r\n\r\n"),
            Peeked::Rejected(_) | Peeked::Unreadable(_)
        ));
    }
}
