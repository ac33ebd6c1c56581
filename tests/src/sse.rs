//! An incremental Server-Sent Events parser (the WHATWG event-stream rules), for the test
//! client: CR, LF and CRLF line ends (also split across reads), `:` comments, multi-line
//! `data:`, `event:`, `id:`, `retry:`, and events with empty data (MCP's priming events).

use serde_json::{json, Value};

/// One event block of an SSE stream (the lines up to a blank line).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseEvent {
    /// The `event:` field (`None`: absent, which a browser reads as `message`).
    pub event: Option<String>,
    /// The `id:` field.
    pub id: Option<String>,
    /// The `retry:` field, when it is all digits.
    pub retry: Option<u64>,
    /// The `data:` lines joined with `\n` (`None`: no `data:` line at all; `Some("")`: an
    /// empty one, as in a priming event).
    pub data: Option<String>,
    /// The text of `:` comment lines (without the colon and one leading space).
    pub comments: Vec<String>,
}

impl SseEvent {
    /// The data parsed as JSON, if it is.
    pub fn json(&self) -> Option<Value> {
        self.data
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok())
    }

    /// `{"event","id","retry","data","json"}` (and `"comments"` when there are some).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "event": self.event,
            "id": self.id,
            "retry": self.retry,
            "data": self.data,
            "json": self.json(),
        });
        if !self.comments.is_empty() {
            v["comments"] = json!(self.comments);
        }
        v
    }

    fn is_empty(&self) -> bool {
        self.event.is_none() && self.id.is_none() && self.retry.is_none() && self.data.is_none()
    }
}

/// Feed bytes as they arrive with [`SseParser::push`]; complete events come out. A block
/// that has only comments is not an event and is dropped; a block not ended by a blank line
/// when the stream ends is dropped too (as the SSE rules say).
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous byte was a CR: a LF right after it belongs to the same line end.
    after_cr: bool,
    block: SseEvent,
    /// A line has been read (the first one may start with a UTF-8 BOM, which is skipped).
    started: bool,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Parse `bytes`, returning the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(ev) = self.line_done(&line) {
                        out.push(ev);
                    }
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(b);
                }
            }
        }
        out
    }

    fn line_done(&mut self, line: &[u8]) -> Option<SseEvent> {
        let line = match self.started {
            true => line,
            false => {
                self.started = true;
                line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line)
            }
        };
        if line.is_empty() {
            let block = std::mem::take(&mut self.block);
            return (!block.is_empty()).then_some(block);
        }
        let line = String::from_utf8_lossy(line);
        if let Some(comment) = line.strip_prefix(':') {
            let c = comment.strip_prefix(' ').unwrap_or(comment);
            self.block.comments.push(c.to_string());
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.block.event = Some(value.to_string()),
            "data" => match &mut self.block.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.block.data = Some(value.to_string()),
            },
            "id" if !value.contains('\0') => self.block.id = Some(value.to_string()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.block.retry = value.parse().ok()
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_ends_comments_multiline_and_split_reads() {
        let stream = b"\xEF\xBB\xBFevent: endpoint\r\ndata: /m?x=1\r\n\r\n: hi\ndata: {\"a\":1,\ndata: \"b\":2}\n\nid: 7\rdata:\r\rretry: 100\n\n: only a comment\n\ndata: tail";
        // Byte by byte: every split point must give the same events.
        let mut p = SseParser::new();
        let mut events = Vec::new();
        for b in stream.iter() {
            events.extend(p.push(std::slice::from_ref(b)));
        }
        let mut whole = SseParser::new();
        assert_eq!(whole.push(stream), events);
        assert_eq!(events.len(), 4, "{events:?}");
        assert_eq!(events[0].event.as_deref(), Some("endpoint"));
        assert_eq!(events[0].data.as_deref(), Some("/m?x=1"));
        assert_eq!(events[1].event, None);
        assert_eq!(events[1].comments, vec!["hi".to_string()]);
        assert_eq!(events[1].json(), Some(json!({"a": 1, "b": 2})));
        assert_eq!(events[2].id.as_deref(), Some("7"));
        assert_eq!(events[2].data.as_deref(), Some(""));
        assert_eq!(events[3].retry, Some(100));
        assert_eq!(events[3].data, None);
    }
}
