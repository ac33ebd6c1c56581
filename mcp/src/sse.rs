//! Server-sent events, split incrementally into whole events without changing a byte.
//!
//! Written here rather than taken from an SSE crate: the interceptor must forward every event
//! byte for byte (crates decode into owned strings and would re-encode), must know where each
//! event ends so that it can inject one of its own between two events, and must bound what it
//! holds. Parsing follows the WHATWG "event stream" rules that clients implement: lines end in
//! CRLF, LF or CR; a blank line ends an event; `:` starts a comment; one space after the colon
//! is dropped; `data` lines are joined with `\n`; an `id` containing NUL is ignored; `retry`
//! must be all ASCII digits; a UTF-8 byte-order mark at the very start is skipped; text is
//! decoded as UTF-8 with replacement, as clients decode it.

use bytes::{Bytes, BytesMut};

/// One whole event: its exact bytes (blank line included) and its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The bytes as received, from the first byte after the previous event up to and including
    /// the blank line that ended this one.
    pub raw: Bytes,
    /// The `event` field; `None` for the default type `message`.
    pub event: Option<String>,
    /// The `data` lines joined with `\n`; `None` when the event had no `data` field (clients do
    /// not dispatch such events).
    pub data: Option<String>,
    /// The `id` field, when present and valid.
    pub id: Option<String>,
    /// The `retry` field, when valid.
    pub retry: Option<u64>,
}

impl SseEvent {
    /// Whether clients hand this event to their JSON-RPC reader: it carries data and its type
    /// is `message` (given or by default). Other types (`endpoint` of the 2024-11-05
    /// transport, or anything else) are not JSON-RPC to a client.
    pub fn is_message(&self) -> bool {
        self.data.is_some() && self.event.as_deref().is_none_or(|t| t == "message")
    }
}

/// An event grew beyond the bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTooLarge {
    pub limit: usize,
}

impl std::fmt::Display for EventTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a server-sent event exceeds the {} byte limit",
            self.limit
        )
    }
}

/// Splits an event stream fed in arbitrary pieces into whole events.
#[derive(Debug)]
pub struct SseSplitter {
    /// Bytes of the event being read.
    buf: BytesMut,
    /// How far `buf` has been scanned.
    scanned: usize,
    /// Where the current line starts in `buf`.
    line_start: usize,
    /// The last line ended in CR: a LF right after it belongs to the same line ending.
    after_cr: bool,
    /// The event's blank line ended in CR: it is complete, but a LF right after it is still
    /// part of it (CRLF), so it is passed on once the next byte (or the end) is seen.
    blank_cr: bool,
    /// Still at the start of the stream (a byte-order mark may follow).
    at_start: bool,
    fields: Fields,
    limit: usize,
}

#[derive(Debug, Default)]
struct Fields {
    event: Option<String>,
    data: Option<String>,
    id: Option<String>,
    retry: Option<u64>,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl SseSplitter {
    /// A splitter that refuses events longer than `limit` bytes.
    pub fn new(limit: usize) -> SseSplitter {
        SseSplitter {
            buf: BytesMut::new(),
            scanned: 0,
            line_start: 0,
            after_cr: false,
            blank_cr: false,
            at_start: true,
            fields: Fields::default(),
            limit,
        }
    }

    /// Feeds the next piece of the stream; returns the events it completed, in order.
    ///
    /// # Errors
    ///
    /// An event longer than the limit: the stream cannot be forwarded further.
    pub fn push(&mut self, piece: &[u8]) -> Result<Vec<SseEvent>, EventTooLarge> {
        self.buf.extend_from_slice(piece);
        let mut events = Vec::new();
        while self.scanned < self.buf.len() {
            if self.at_start {
                // Wait for three bytes (or a mismatch) before deciding about a BOM.
                let have = &self.buf[..self.buf.len().min(3)];
                if BOM.starts_with(have) && have.len() < 3 {
                    break;
                }
                self.at_start = false;
                if have == BOM {
                    self.scanned = 3;
                    self.line_start = 3;
                    continue;
                }
            }
            let i = self.scanned;
            let byte = self.buf[i];
            if self.blank_cr {
                self.blank_cr = false;
                self.after_cr = false;
                if byte == b'\n' {
                    self.scanned += 1;
                }
                events.push(self.dispatch());
                continue;
            }
            self.scanned += 1;
            if self.after_cr {
                self.after_cr = false;
                if byte == b'\n' && i == self.line_start {
                    self.line_start = self.scanned;
                    continue;
                }
            }
            if byte != b'\n' && byte != b'\r' {
                continue;
            }
            self.after_cr = byte == b'\r';
            let line_start = self.line_start;
            self.line_start = self.scanned;
            if i == line_start && byte == b'\r' {
                self.blank_cr = true;
            } else if i == line_start {
                events.push(self.dispatch());
            } else {
                let line = String::from_utf8_lossy(&self.buf[line_start..i]).into_owned();
                self.field(&line);
            }
        }
        if self.buf.len() > self.limit {
            return Err(EventTooLarge { limit: self.limit });
        }
        Ok(events)
    }

    /// At the end of the stream: the last event, if its blank line was a lone CR still
    /// waiting to see whether a LF followed.
    pub fn finish(&mut self) -> Option<SseEvent> {
        if !self.blank_cr {
            return None;
        }
        self.blank_cr = false;
        Some(self.dispatch())
    }

    /// Bytes held for an event not yet ended: at the end of the stream clients discard them.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Ends the current event at `scanned`, which follows its blank line.
    fn dispatch(&mut self) -> SseEvent {
        let raw = self.buf.split_to(self.scanned).freeze();
        self.scanned = 0;
        self.line_start = 0;
        let fields = std::mem::take(&mut self.fields);
        SseEvent {
            raw,
            event: fields.event,
            data: fields.data,
            id: fields.id,
            retry: fields.retry,
        }
    }

    fn field(&mut self, line: &str) {
        if line.starts_with(':') {
            return;
        }
        let (name, value) = match line.split_once(':') {
            Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match name {
            "event" => self.fields.event = Some(value.to_owned()),
            "data" => match &mut self.fields.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.fields.data = Some(value.to_owned()),
            },
            "id" if !value.contains('\0') => self.fields.id = Some(value.to_owned()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.fields.retry = value.parse().ok();
            }
            _ => {}
        }
    }
}

/// A `message` event carrying one JSON-RPC message: `event: message\ndata: <json>\n\n`. The
/// JSON must be on one line (the bodies mcpwarden writes are).
pub fn message_event(json: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(json.len() + 24);
    out.extend_from_slice(b"event: message\ndata: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(pieces: &[&[u8]]) -> Vec<SseEvent> {
        let mut s = SseSplitter::new(1 << 20);
        let mut out = Vec::new();
        for p in pieces {
            out.extend(s.push(p).unwrap());
        }
        out.extend(s.finish());
        assert_eq!(s.pending(), 0, "nothing left over");
        out
    }

    #[test]
    fn fields_comments_and_multiline_data() {
        let stream =
            b": hello\nevent: message\nid: 7\nretry: 250\ndata: {\"a\":\ndata:1}\n\ndata:x\n\n";
        let events = all(&[stream]);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].event.as_deref(), Some("message"));
        assert_eq!(events[0].id.as_deref(), Some("7"));
        assert_eq!(events[0].retry, Some(250));
        assert_eq!(events[0].data.as_deref(), Some("{\"a\":\n1}"));
        assert!(events[0].is_message());
        assert_eq!(events[1].event, None);
        assert_eq!(events[1].data.as_deref(), Some("x"));
        assert!(events[1].is_message(), "bare data: is a message event");
        let raw: Vec<u8> = events.iter().flat_map(|e| e.raw.to_vec()).collect();
        assert_eq!(raw, stream.to_vec(), "bytes are kept exactly");
    }

    /// Every way of cutting the stream gives the same events and bytes, including cuts inside
    /// CRLF and inside the byte-order mark.
    #[test]
    fn any_split_gives_the_same_events() {
        let stream: &[u8] =
            b"\xEF\xBB\xBFevent: endpoint\r\ndata: /m?s=1\r\n\r\ndata: a\rdata: b\r\rid\n: c\n\ndata: \xC3\xA9\n\n";
        let whole = all(&[stream]);
        assert_eq!(whole.len(), 4);
        assert_eq!(whole[0].event.as_deref(), Some("endpoint"));
        assert!(!whole[0].is_message());
        assert_eq!(whole[1].data.as_deref(), Some("a\nb"));
        assert_eq!(whole[2].id.as_deref(), Some(""));
        assert_eq!(whole[2].data, None, "no data: not dispatched by clients");
        assert_eq!(whole[3].data.as_deref(), Some("\u{e9}"));
        for a in 0..stream.len() {
            for b in a..stream.len() {
                let got = all(&[&stream[..a], &stream[a..b], &stream[b..]]);
                let fields = |e: &Vec<SseEvent>| {
                    e.iter()
                        .map(|e| (e.event.clone(), e.data.clone(), e.id.clone()))
                        .collect::<Vec<_>>()
                };
                assert_eq!(fields(&got), fields(&whole), "cut at {a},{b}");
                let raw: Vec<u8> = got.iter().flat_map(|e| e.raw.to_vec()).collect();
                assert_eq!(raw, stream.to_vec(), "cut at {a},{b}");
            }
        }
    }

    /// The Python SDK's style: CRLF everywhere. Each event carries its whole blank line, as
    /// soon as the bytes are there.
    #[test]
    fn crlf_events_end_with_their_lf() {
        let mut s = SseSplitter::new(1 << 20);
        let got = s
            .push(b"event: message\r\ndata: {}\r\n\r\nevent: message\r\ndata: 2\r\n\r\n")
            .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].raw[..], b"event: message\r\ndata: {}\r\n\r\n");
        assert_eq!(&got[1].raw[..], b"event: message\r\ndata: 2\r\n\r\n");
        assert_eq!(s.pending(), 0);
        // Cut between the CR and the LF of the blank line: the event waits for the LF.
        assert!(s.push(b"data: 3\r\n\r").unwrap().is_empty());
        let got = s.push(b"\ndata: 4").unwrap();
        assert_eq!(&got[0].raw[..], b"data: 3\r\n\r\n");
        // A lone CR blank line at the very end is an event too.
        let mut s = SseSplitter::new(1 << 20);
        assert!(s.push(b"data: 5\r\r").unwrap().is_empty());
        assert_eq!(s.finish().unwrap().data.as_deref(), Some("5"));
    }

    #[test]
    fn a_partial_event_is_held_and_bounded() {
        let mut s = SseSplitter::new(16);
        assert!(s.push(b"data: 12345").unwrap().is_empty());
        assert_eq!(s.pending(), 11);
        assert_eq!(s.push(b"678901234567"), Err(EventTooLarge { limit: 16 }));
    }

    #[test]
    fn invalid_retry_and_nul_id_are_ignored() {
        let events = all(&[b"retry: 1x\nid: a\0b\ndata: d\n\n"]);
        assert_eq!(events[0].retry, None);
        assert_eq!(events[0].id, None);
    }
}
