//! `mcpwarden audit tail`: the audit log (`docs/audit.md`) as one readable line per call.
//!
//! A call is written as a `request` record (the decision) and, later, the `response` record that
//! closes it (latency, status, error). [`Merger`] holds a request until its response arrives and
//! hands back the pair as one [`Call`]; [`format_call`] turns a call into a line, a pure function
//! of the records' JSON. [`run`] reads a file or standard input (and, with `--follow`, keeps
//! reading as `tail -F` does, across a rotation or a truncation) and writes the lines.
//!
//! What is shown: every `request` (merged with its `response`), every `refused` record at once,
//! and the connection-level records (`passthrough`, `policy_reload`, `unprepared_netns`,
//! `preexisting_reset`, and any other event) as lines of their own. `non_mcp` and
//! `server_message` records, and the responses of `non_mcp` requests, only with `--all`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a request waits for its response before it is printed without one, when the input
/// is live (`--follow`, standard input). Its answer, when it comes, gets a line of its own.
pub const HOLD: Duration = Duration::from_secs(2);
/// How often a followed file is polled at its end.
pub const POLL: Duration = Duration::from_millis(200);
/// Requests whose answer is still awaited (or that were printed without one), at most: beyond
/// this the oldest are given up on.
const MAX_OPEN: usize = 100_000;
/// A request printed without its answer (or filtered out) is forgotten after this long: an
/// answer after that is printed alone.
const FORGET: Duration = Duration::from_secs(600);
/// A line longer than this (no newline in sight) is dropped: audit lines are at most 16 KiB.
const MAX_LINE: usize = 1 << 20;

/// `--decision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DecisionFilter {
    Allow,
    Deny,
    #[value(name = "require_approval")]
    RequireApproval,
}

impl DecisionFilter {
    fn as_str(self) -> &'static str {
        match self {
            DecisionFilter::Allow => "allow",
            DecisionFilter::Deny => "deny",
            DecisionFilter::RequireApproval => "require_approval",
        }
    }
}

/// `--color`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ColorWhen {
    /// When standard output is a terminal and `NO_COLOR` is not set.
    #[default]
    Auto,
    Always,
    Never,
}

impl ColorWhen {
    /// Whether to colour what goes to standard output.
    pub fn enabled(self) -> bool {
        match self {
            ColorWhen::Always => true,
            ColorWhen::Never => false,
            ColorWhen::Auto => {
                // no-color.org: set and not empty disables colours.
                let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
                !no_color && std::io::IsTerminal::is_terminal(&io::stdout())
            }
        }
    }
}

/// Which calls are shown.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The record's `decision` (a refused call's is `deny` or `require_approval`).
    pub decision: Option<DecisionFilter>,
    /// The exact `tool`.
    pub tool: Option<String>,
    /// A case-insensitive substring of `comm`, `pid`, `uid` or `cgroup`.
    pub caller: Option<String>,
}

impl Filter {
    /// Whether `record` (a call's first record, or a record of its own) passes.
    pub fn matches(&self, record: &Value) -> bool {
        if let Some(d) = self.decision {
            if record.get("decision").and_then(Value::as_str) != Some(d.as_str()) {
                return false;
            }
        }
        if let Some(tool) = &self.tool {
            if record.get("tool").and_then(Value::as_str) != Some(tool.as_str()) {
                return false;
            }
        }
        if let Some(caller) = &self.caller {
            let needle = caller.to_lowercase();
            let found =
                ["comm", "pid", "uid", "cgroup"]
                    .iter()
                    .any(|field| match record.get(*field) {
                        Some(Value::String(s)) => s.to_lowercase().contains(&needle),
                        Some(Value::Number(n)) => n.to_string().contains(&needle),
                        _ => false,
                    });
            if !found {
                return false;
            }
        }
        true
    }
}

/// What a line says beyond its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// Nothing: a call with its answer, or a record that needs none.
    None,
    /// The input ended before the call's answer.
    NoAnswer,
    /// Printed before its answer came (`--follow`, after [`HOLD`]).
    NoAnswerYet,
    /// The answer of a call printed earlier without one.
    Late,
}

/// One line's worth: a record and, for a call, the `response` that closed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub record: Value,
    pub answer: Option<Value>,
    pub note: Note,
}

impl Call {
    fn alone(record: Value) -> Call {
        Call {
            record,
            answer: None,
            note: Note::None,
        }
    }
}

/// A request waiting for its response.
struct Pending {
    /// Unique, in arrival order.
    seq: u64,
    /// `None`: filtered out; its response is swallowed.
    record: Option<Value>,
    /// Already printed without its answer.
    printed: bool,
}

/// Pairs each call's `request` with the `response` that closes it (same caller, destination,
/// server, HTTP request, JSON-RPC id, method and tool: docs/audit.md says the response repeats
/// them), first in first out when several are open under one key (ids reused across sessions).
pub struct Merger {
    filter: Filter,
    all: bool,
    /// With `Some`, a request unanswered after this long is printed without its answer.
    hold: Option<Duration>,
    open: HashMap<String, VecDeque<Pending>>,
    /// Every open request by `seq`: when it came, and its key.
    order: BTreeMap<u64, (Instant, String)>,
    /// The shown requests not printed yet, by `seq`.
    waiting: BTreeSet<u64>,
    seq: u64,
}

impl Merger {
    /// `all`: also `non_mcp` and `server_message` records. `hold`: see [`HOLD`] (`None`: a
    /// request waits for its answer until the end of the input).
    pub fn new(filter: Filter, all: bool, hold: Option<Duration>) -> Merger {
        Merger {
            filter,
            all,
            hold,
            open: HashMap::new(),
            order: BTreeMap::new(),
            waiting: BTreeSet::new(),
            seq: 0,
        }
    }

    /// One record read at `now`: the lines it completes (none while it waits for its answer),
    /// then those that waited too long.
    pub fn push(&mut self, record: Value, now: Instant) -> Vec<Call> {
        let mut out = Vec::new();
        let event = record.get("event").and_then(Value::as_str).unwrap_or("");
        if event == "response" {
            match self.take(&call_key(&record)) {
                Some(p) => {
                    if let Some(request) = p.record {
                        out.push(Call {
                            record: request,
                            answer: Some(record),
                            note: if p.printed { Note::Late } else { Note::None },
                        });
                    }
                }
                None => {
                    // An answer whose request is not in the input (or a `non_mcp` request's).
                    let is_call = record.get("id").is_some() || record.get("method").is_some();
                    if (is_call || self.all) && self.filter.matches(&record) {
                        out.push(Call::alone(record));
                    }
                }
            }
        } else if awaits_response(&record) {
            let shown = (event != "non_mcp" || self.all) && self.filter.matches(&record);
            let key = call_key(&record);
            self.seq += 1;
            let seq = self.seq;
            if shown {
                self.waiting.insert(seq);
            }
            self.order.insert(seq, (now, key.clone()));
            self.open.entry(key).or_default().push_back(Pending {
                seq,
                record: shown.then_some(record),
                printed: false,
            });
        } else {
            let hidden = matches!(event, "non_mcp" | "server_message") && !self.all;
            if !hidden && self.filter.matches(&record) {
                out.push(Call::alone(record));
            }
        }
        out.extend(self.tick(now));
        out
    }

    /// The requests that have waited longer than the hold (printed without their answer), and
    /// the oldest open ones given up on.
    pub fn tick(&mut self, now: Instant) -> Vec<Call> {
        let mut out = Vec::new();
        if let Some(hold) = self.hold {
            while let Some(&seq) = self.waiting.first() {
                let Some((since, key)) = self.order.get(&seq) else {
                    self.waiting.remove(&seq);
                    continue;
                };
                if now.saturating_duration_since(*since) < hold {
                    break;
                }
                self.waiting.remove(&seq);
                if let Some(p) = self
                    .open
                    .get_mut(key)
                    .and_then(|q| q.iter_mut().find(|p| p.seq == seq))
                {
                    if let Some(record) = &p.record {
                        p.printed = true;
                        out.push(Call {
                            record: record.clone(),
                            answer: None,
                            note: Note::NoAnswerYet,
                        });
                    }
                }
            }
        }
        while let Some((&seq, (since, _))) = self.order.first_key_value() {
            let old = now.saturating_duration_since(*since) >= FORGET;
            if !old && self.order.len() <= MAX_OPEN {
                break;
            }
            let Some((_, key)) = self.order.remove(&seq) else {
                break;
            };
            self.waiting.remove(&seq);
            let Some(queue) = self.open.get_mut(&key) else {
                continue;
            };
            let Some(i) = queue.iter().position(|p| p.seq == seq) else {
                continue;
            };
            let p = queue.remove(i);
            if queue.is_empty() {
                self.open.remove(&key);
            }
            if let Some(Pending {
                record: Some(record),
                printed: false,
                ..
            }) = p
            {
                out.push(Call {
                    record,
                    answer: None,
                    note: Note::NoAnswer,
                });
            }
        }
        out
    }

    /// The end of the input: every request still waiting, without its answer, in arrival order.
    pub fn finish(&mut self) -> Vec<Call> {
        let mut left: Vec<Pending> = self.open.drain().flat_map(|(_, q)| q).collect();
        left.sort_by_key(|p| p.seq);
        self.order.clear();
        self.waiting.clear();
        left.into_iter()
            .filter(|p| !p.printed)
            .filter_map(|p| p.record)
            .map(|record| Call {
                record,
                answer: None,
                note: Note::NoAnswer,
            })
            .collect()
    }

    /// How many requests are open (waiting for their answer, or printed without it).
    pub fn open(&self) -> usize {
        self.order.len()
    }

    /// The oldest open request under `key`.
    fn take(&mut self, key: &str) -> Option<Pending> {
        let queue = self.open.get_mut(key)?;
        let p = queue.pop_front();
        if queue.is_empty() {
            self.open.remove(key);
        }
        if let Some(p) = &p {
            self.order.remove(&p.seq);
            self.waiting.remove(&p.seq);
        }
        p
    }
}

/// Whether a `response` record will close `record`: a client's JSON-RPC request (an `id` and a
/// `method`; a client's answer has no method, a notification no id), or a `non_mcp` request.
fn awaits_response(record: &Value) -> bool {
    match record.get("event").and_then(Value::as_str) {
        Some("request") => record.get("id").is_some() && record.get("method").is_some(),
        Some("non_mcp") => true,
        _ => false,
    }
}

/// What a call's `request` and its `response` share.
fn call_key(record: &Value) -> String {
    let field = |name: &str| record.get(name).cloned().unwrap_or(Value::Null);
    Value::Array(
        [
            "pid",
            "cgroup_id",
            "netns",
            "dst",
            "server",
            "http_method",
            "path",
            "id",
            "method",
            "tool",
        ]
        .iter()
        .map(|name| field(name))
        .collect(),
    )
    .to_string()
}

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const RESET: &str = "\x1b[0m";

/// One call as one line (no newline):
/// `TIME  CALLER  SERVER  TOOL  DECISION  RULE  LATENCY  [details]`, `-` where a column does
/// not apply. `color`: the decision in red (deny), green (allow) or yellow (require_approval).
pub fn format_call(call: &Call, color: bool) -> String {
    let record = &call.record;
    let answer = call.answer.as_ref();
    let text = |v: &Value, name: &str| v.get(name).and_then(Value::as_str).map(clean);

    let time = record
        .get("ts")
        .and_then(Value::as_str)
        .map(clock)
        .unwrap_or_else(|| "-".to_owned());
    let decision = text(record, "decision").unwrap_or_else(|| "-".to_owned());
    let paint = match (color, decision.as_str()) {
        (true, "deny") => Some(RED),
        (true, "allow") => Some(GREEN),
        (true, "require_approval") => Some(YELLOW),
        _ => None,
    };
    let decision_col = match paint {
        Some(c) => format!("{c}{decision}{RESET}{}", pad(&decision, 16)),
        None => format!("{decision:<16}"),
    };
    let latency = answer
        .and_then(|a| a.get("latency_ms"))
        .and_then(Value::as_f64)
        .map(|ms| format!("{ms:.1} ms"))
        .unwrap_or_else(|| "-".to_owned());

    let mut line = columns(
        &time,
        &caller(record),
        &text(record, "server").unwrap_or_else(|| "-".to_owned()),
        &label(record),
        &decision_col,
        &text(record, "rule").unwrap_or_else(|| "-".to_owned()),
        &latency,
    );

    // Details: the answer's, then the record's.
    let mut details: Vec<String> = Vec::new();
    for v in answer.into_iter().chain(std::iter::once(record)) {
        if let Some(status) = v.get("status").and_then(Value::as_u64) {
            if !(200..300).contains(&status) {
                details.push(format!("HTTP {status}"));
            }
        }
        if v.get("is_error").and_then(Value::as_bool) == Some(true) {
            match v.get("error_code").and_then(Value::as_i64) {
                Some(code) => details.push(format!("error {code}")),
                None => details.push("error".to_owned()),
            }
        }
        if let Some(rt) = text(v, "result_type") {
            if rt != "complete" {
                details.push(rt);
            }
        }
        if let Some(hidden) = v.get("hidden_tools").and_then(Value::as_array) {
            if !hidden.is_empty() {
                details.push(format!("hid {} tools", hidden.len()));
            }
        }
        if v.get("quota_released").and_then(Value::as_bool) == Some(true) {
            details.push("quota released".to_owned());
        }
    }
    if record.get("event").and_then(Value::as_str) == Some("server_message") {
        details.push("from the server".to_owned());
    }
    if let Some(would) = text(record, "would") {
        details.push(format!("dry run: would {would}"));
    }
    if let Some(n) = record.get("repeats").and_then(Value::as_u64) {
        details.push(format!("{n} more like it"));
    }
    for v in std::iter::once(record).chain(answer) {
        if let Some(reason) = text(v, "reason") {
            details.push(format!("— {reason}"));
        }
    }
    match call.note {
        Note::None => {}
        Note::NoAnswer => details.push("(no answer)".to_owned()),
        Note::NoAnswerYet => details.push("(no answer yet)".to_owned()),
        Note::Late => details.push("(answer)".to_owned()),
    }
    if !details.is_empty() {
        line.push_str("  ");
        line.push_str(&details.join("  "));
    }
    line
}

/// The titles of [`format_call`]'s columns, aligned with them.
pub fn header() -> String {
    let decision = format!("{:<16}", "DECISION");
    columns(
        "TIME (UTC)",
        "CALLER",
        "SERVER",
        "TOOL",
        &decision,
        "RULE",
        "LATENCY",
    )
}

/// The columns of a line; `decision` comes padded (its colour codes take no room).
fn columns(
    time: &str,
    caller: &str,
    server: &str,
    tool: &str,
    decision: &str,
    rule: &str,
    latency: &str,
) -> String {
    format!(
        "{time:<12}  {caller:<32}  {server:<12}  {tool:<24}  {decision}  {rule:<26}  {latency:>10}"
    )
}

/// Spaces that pad `s` to `width` characters.
fn pad(s: &str, width: usize) -> String {
    " ".repeat(width.saturating_sub(s.chars().count()))
}

/// `HH:MM:SS.mmm` of an RFC 3339 UTC timestamp (the text as it is if it is not one).
fn clock(ts: &str) -> String {
    match ts.split_once('T') {
        Some((_, time)) => clean(time.trim_end_matches('Z')),
        None => clean(ts),
    }
}

/// `comm[pid] uid=N` and the pod (from a `pod` field, or the pod UID in a kubepods cgroup path)
/// or the cgroup's last component; `-` for a record about no caller.
fn caller(record: &Value) -> String {
    let mut parts: Vec<String> = Vec::new();
    let comm = record.get("comm").and_then(Value::as_str).map(clean);
    let pid = record.get("pid").and_then(Value::as_u64);
    match (comm, pid) {
        (Some(c), Some(p)) if !c.is_empty() => parts.push(format!("{c}[{p}]")),
        (_, Some(p)) => parts.push(format!("[{p}]")),
        (Some(c), None) if !c.is_empty() => parts.push(c),
        _ => {}
    }
    if let Some(uid) = record.get("uid").and_then(Value::as_u64) {
        parts.push(format!("uid={uid}"));
    }
    let cgroup = record.get("cgroup").and_then(Value::as_str);
    if let Some(pod) = pod(record.get("pod"), cgroup) {
        parts.push(format!("pod={pod}"));
    } else if let Some(tail) = cgroup
        .and_then(|c| c.rsplit('/').find(|s| !s.is_empty()))
        .map(clean)
    {
        parts.push(tail);
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(" ")
    }
}

/// The pod: a `pod` field (`"ns/name"`, or `{"namespace", "name"}`), else the pod UID of a
/// kubepods cgroup path (`…-pod3f1c2a9e_8d4b_….slice` or `…/pod3f1c2a9e-8d4b-…/`).
fn pod(field: Option<&Value>, cgroup: Option<&str>) -> Option<String> {
    match field {
        Some(Value::String(s)) if !s.is_empty() => return Some(clean(s)),
        Some(Value::Object(o)) => {
            let get = |k: &str| o.get(k).and_then(Value::as_str).map(clean);
            match (get("namespace"), get("name")) {
                (Some(ns), Some(name)) => return Some(format!("{ns}/{name}")),
                (None, Some(name)) => return Some(name),
                _ => {}
            }
        }
        _ => {}
    }
    let cgroup = cgroup?;
    if !cgroup.contains("kubepods") {
        return None;
    }
    cgroup.split('/').find_map(|segment| {
        let segment = segment.strip_suffix(".slice").unwrap_or(segment);
        let at = segment.rfind("pod")?;
        let uid = &segment[at + 3..];
        let looks_like_uid = uid.len() >= 8
            && uid
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == '_' || c == '-');
        looks_like_uid.then(|| uid.replace('_', "-"))
    })
}

/// The tool column: the tool, else the JSON-RPC method, else what the record is about.
fn label(record: &Value) -> String {
    let text = |name: &str| record.get(name).and_then(Value::as_str).map(clean);
    if let Some(tool) = text("tool") {
        return tool;
    }
    if let Some(method) = text("method") {
        return method;
    }
    let event = text("event").unwrap_or_else(|| "-".to_owned());
    match event.as_str() {
        "request" if record.get("aggregated").is_some() => "batch".to_owned(),
        "request" if record.get("id").is_some() => "answer".to_owned(),
        "request" => "message".to_owned(),
        "non_mcp" | "response" => match (text("http_method"), text("path")) {
            (Some(m), Some(p)) => format!("{m} {p}"),
            _ => event,
        },
        _ => event,
    }
}

/// `s` with control characters (a terminal's escape sequences among them) written `\x1b`, so
/// that what a client or server chose cannot drive the terminal.
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// What to read and show.
#[derive(Debug, Clone)]
pub struct Options {
    /// `None` (or `-`): standard input.
    pub file: Option<PathBuf>,
    /// Keep reading at the end of the file, across rotation and truncation.
    pub follow: bool,
    pub filter: Filter,
    /// ANSI colours.
    pub color: bool,
    /// Also `non_mcp` and `server_message` records.
    pub all: bool,
    /// See [`HOLD`].
    pub hold: Duration,
    /// See [`POLL`].
    pub poll: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            file: None,
            follow: false,
            filter: Filter::default(),
            color: false,
            all: false,
            hold: HOLD,
            poll: POLL,
        }
    }
}

/// Splits bytes into lines; a line without its newline yet is kept for the next bytes.
struct Lines {
    name: String,
    partial: Vec<u8>,
    number: u64,
}

impl Lines {
    fn new(name: String) -> Lines {
        Lines {
            name,
            partial: Vec::new(),
            number: 0,
        }
    }

    /// The records in `bytes` (after what was left of the previous ones).
    fn feed(&mut self, bytes: &[u8]) -> Vec<Value> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(i);
            rest = &tail[1..];
            if self.partial.is_empty() {
                self.parse(line, &mut out);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.parse(&whole, &mut out);
            }
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > MAX_LINE {
            self.number += 1;
            warn(&format!(
                "{}:{}: skipped a line longer than {MAX_LINE} bytes",
                self.name, self.number
            ));
            self.partial.clear();
        }
        out
    }

    /// The last line, if it had no newline (the end of the input).
    fn end(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        let last = std::mem::take(&mut self.partial);
        if !last.is_empty() {
            self.parse(&last, &mut out);
        }
        out
    }

    /// Start again (a truncated or a new file): what was partial is gone.
    fn restart(&mut self) {
        self.partial.clear();
        self.number = 0;
    }

    fn parse(&mut self, line: &[u8], out: &mut Vec<Value>) {
        self.number += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match serde_json::from_slice::<Value>(line) {
            Ok(v) if v.is_object() => out.push(v),
            Ok(_) => warn(&format!(
                "{}:{}: skipped a line that is not a JSON object",
                self.name, self.number
            )),
            Err(e) => warn(&format!(
                "{}:{}: skipped a line that is not JSON ({e})",
                self.name, self.number
            )),
        }
    }
}

fn warn(message: &str) {
    eprintln!("mcpwarden: audit tail: warning: {message}");
}

/// Writes each call as a line.
fn emit(out: &mut dyn Write, calls: Vec<Call>, color: bool) -> io::Result<()> {
    for call in calls {
        writeln!(out, "{}", format_call(&call, color))?;
    }
    Ok(())
}

/// Reads the audit log `opts` names and writes one line per call to `out` until the input ends
/// (or, with `follow`, until `stop` is set; then what is left is read and written). Lines that
/// are not JSON are skipped with a warning on standard error. An error writing `out` (a closed
/// pipe: `io::ErrorKind::BrokenPipe`) ends it.
pub fn run(opts: &Options, out: &mut dyn Write, stop: Option<&AtomicBool>) -> io::Result<()> {
    match opts.file.as_deref() {
        None => read_stdin(opts, out),
        Some(p) if p == Path::new("-") => read_stdin(opts, out),
        Some(path) if opts.follow => follow(path, opts, out, stop),
        Some(path) => {
            let mut file = File::open(path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            let mut merger = Merger::new(opts.filter.clone(), opts.all, None);
            let mut lines = Lines::new(path.display().to_string());
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                let now = Instant::now();
                for record in lines.feed(&buf[..n]) {
                    emit(out, merger.push(record, now), opts.color)?;
                }
            }
            let now = Instant::now();
            for record in lines.end() {
                emit(out, merger.push(record, now), opts.color)?;
            }
            emit(out, merger.finish(), opts.color)?;
            out.flush()
        }
    }
}

/// Standard input, until it ends: a live pipe (`mcpwarden run --audit-log - | …`) too, so a
/// request is printed without its answer after the hold. A thread reads; this one waits at most
/// a poll for it, to print what waited too long.
fn read_stdin(opts: &Options, out: &mut dyn Write) -> io::Result<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(16);
    std::thread::Builder::new()
        .name("audit-tail-stdin".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let chunk = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => Ok(buf[..n].to_vec()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => Err(e),
                };
                let failed = chunk.is_err();
                if tx.send(chunk).is_err() || failed {
                    return;
                }
            }
        })?;
    let mut merger = Merger::new(opts.filter.clone(), opts.all, Some(opts.hold));
    let mut lines = Lines::new("<stdin>".into());
    loop {
        match rx.recv_timeout(opts.poll) {
            Ok(chunk) => {
                let chunk = chunk?;
                let now = Instant::now();
                for record in lines.feed(&chunk) {
                    emit(out, merger.push(record, now), opts.color)?;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        emit(out, merger.tick(Instant::now()), opts.color)?;
        out.flush()?;
    }
    let now = Instant::now();
    for record in lines.end() {
        emit(out, merger.push(record, now), opts.color)?;
    }
    emit(out, merger.finish(), opts.color)?;
    out.flush()
}

/// The file that is open, and which file it is.
struct Followed {
    file: File,
    dev: u64,
    ino: u64,
    offset: u64,
}

fn open_followed(path: &Path) -> io::Result<Followed> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    Ok(Followed {
        file,
        dev: meta.dev(),
        ino: meta.ino(),
        offset: 0,
    })
}

/// `tail -F`: read to the end, then poll. A new file at the path (logrotate `create`: renamed,
/// then created again; or removed and created) is opened and read from its start, once the old
/// one is read to its end; a file that shrank (`copytruncate`) is read again from its start. A
/// path that does not exist (yet) is waited for.
fn follow(
    path: &Path,
    opts: &Options,
    out: &mut dyn Write,
    stop: Option<&AtomicBool>,
) -> io::Result<()> {
    let stopped = || stop.is_some_and(|s| s.load(Ordering::Acquire));
    let mut merger = Merger::new(opts.filter.clone(), opts.all, Some(opts.hold));
    let mut lines = Lines::new(path.display().to_string());
    let mut buf = vec![0u8; 64 * 1024];
    let mut current: Option<Followed> = None;
    let mut said_missing = false;
    loop {
        // Whether the loop ends after this round (checked before reading: what was written
        // before `stop` is read).
        let last_round = stopped();
        if current.is_none() {
            match open_followed(path) {
                Ok(f) => {
                    if said_missing {
                        warn(&format!("{}: appeared; following it", path.display()));
                    }
                    current = Some(f);
                    lines.restart();
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !said_missing {
                        warn(&format!(
                            "{}: does not exist yet; waiting for it",
                            path.display()
                        ));
                        said_missing = true;
                    }
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
            }
        }
        if let Some(f) = current.as_mut() {
            // Read to the end.
            loop {
                let n = match f.file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                f.offset += n as u64;
                let now = Instant::now();
                for record in lines.feed(&buf[..n]) {
                    emit(out, merger.push(record, now), opts.color)?;
                }
            }
            // At the end: is the path still this file, and is the file still this long?
            match std::fs::metadata(path) {
                Ok(meta) if meta.dev() != f.dev || meta.ino() != f.ino => {
                    // Rotated: the old file is read to its end (above); its last line, if it
                    // had no newline, is all there will be of it.
                    let now = Instant::now();
                    for record in lines.end() {
                        emit(out, merger.push(record, now), opts.color)?;
                    }
                    current = None;
                    said_missing = false;
                    continue;
                }
                Ok(meta) if meta.len() < f.offset => {
                    warn(&format!(
                        "{}: truncated; reading it from its start",
                        path.display()
                    ));
                    f.file.seek(io::SeekFrom::Start(0))?;
                    f.offset = 0;
                    lines.restart();
                    continue;
                }
                // Unchanged, or gone (renamed away, not created again yet): keep the old one.
                _ => {}
            }
        }
        emit(out, merger.tick(Instant::now()), opts.color)?;
        out.flush()?;
        if last_round {
            break;
        }
        std::thread::sleep(opts.poll);
    }
    let now = Instant::now();
    for record in lines.end() {
        emit(out, merger.push(record, now), opts.color)?;
    }
    emit(out, merger.finish(), opts.color)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn request() -> Value {
        json!({"v":1,"ts":"2026-05-14T09:21:07.412Z","event":"request","dst":"10.0.0.5:8080","pid":48213,"comm":"python3","uid":1000,"cgroup":"/system.slice/agent.service","cgroup_id":7342,"server":"tools","http_version":"HTTP/1.1","http_method":"POST","path":"/mcp","transport":"streamable_http","revision":"2025-06-18","method":"tools/call","id":7,"tool":"start_security_scan","arg_keys":["target"],"args_sha256":"ca4d49ee6ed48d1008a9f82bb7470ebeeff95f1a33853fedfa573191eaac49d4","decision":"allow","rule":"/tools/start_security_scan","policy":{"file":"/etc/mcpwarden/policy.json","sha256":"72993b6cb83904d39a8c73bd0651aa6251288ede5dbc2c7bcbdc54cc5bbf5d77"}})
    }

    fn response() -> Value {
        json!({"v":1,"ts":"2026-05-14T09:21:07.455Z","event":"response","dst":"10.0.0.5:8080","pid":48213,"comm":"python3","uid":1000,"cgroup":"/system.slice/agent.service","cgroup_id":7342,"server":"tools","http_version":"HTTP/1.1","http_method":"POST","path":"/mcp","transport":"streamable_http","revision":"2025-06-18","method":"tools/call","id":7,"tool":"start_security_scan","arg_keys":["target"],"args_sha256":"ca4d49ee6ed48d1008a9f82bb7470ebeeff95f1a33853fedfa573191eaac49d4","status":200,"latency_ms":42.871304,"is_error":false})
    }

    fn refused() -> Value {
        json!({"v":1,"ts":"2026-05-14T09:21:12.804Z","event":"refused","dst":"10.0.0.5:8080","pid":48213,"comm":"python3","uid":1000,"cgroup":"/system.slice/agent.service","cgroup_id":7342,"server":"tools","http_version":"HTTP/1.1","http_method":"POST","path":"/mcp","transport":"streamable_http","revision":"2025-06-18","method":"tools/call","id":12,"tool":"drop_cluster","arg_keys":["cluster"],"args_sha256":"e2f58fcc7b381aa9c185ca5a429280a97904d3f5859d465aa01e6a6ff5bc4c6f","decision":"deny","rule":"/tools/drop_cluster/action","reason":"destructive","policy":{"file":"/etc/mcpwarden/policy.json","sha256":"72993b6cb83904d39a8c73bd0651aa6251288ede5dbc2c7bcbdc54cc5bbf5d77"}})
    }

    fn with(mut v: Value, field: &str, value: Value) -> Value {
        v[field] = value;
        v
    }

    fn all_of(merger: &mut Merger, records: Vec<Value>) -> Vec<Call> {
        let now = Instant::now();
        let mut out: Vec<Call> = records
            .into_iter()
            .flat_map(|r| merger.push(r, now))
            .collect();
        out.extend(merger.finish());
        out
    }

    #[test]
    fn a_call_is_one_line_with_its_latency() {
        let mut m = Merger::new(Filter::default(), false, None);
        let now = Instant::now();
        assert!(m.push(request(), now).is_empty(), "held until its answer");
        let calls = m.push(response(), now);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].record["event"], "request");
        assert_eq!(calls[0].answer.as_ref().unwrap()["latency_ms"], 42.871304);
        assert!(m.finish().is_empty());
        let line = format_call(&calls[0], false);
        assert_eq!(
            line,
            "09:21:07.412  python3[48213] uid=1000 agent.service  tools         start_security_scan       \
             allow             /tools/start_security_scan     42.9 ms"
        );
    }

    #[test]
    fn refusals_and_notifications_print_at_once() {
        let mut m = Merger::new(Filter::default(), false, None);
        let now = Instant::now();
        assert_eq!(m.push(refused(), now).len(), 1);
        let notification = json!({"v":1,"ts":"2026-05-14T09:21:07.000Z","event":"request","pid":1,"method":"notifications/initialized","decision":"allow"});
        assert_eq!(m.push(notification, now).len(), 1);
        // A client's answer to a server request: an id, no method, no response to wait for.
        let answer = json!({"v":1,"ts":"2026-05-14T09:21:07.000Z","event":"request","pid":1,"id":0,"decision":"allow"});
        let calls = m.push(answer, now);
        assert_eq!(calls.len(), 1);
        assert!(format_call(&calls[0], false).contains(" answer "));
    }

    #[test]
    fn responses_pair_with_their_own_request() {
        let mut m = Merger::new(Filter::default(), false, None);
        let other = with(with(request(), "id", json!(8)), "tool", json!("echo"));
        let other_answer = with(
            with(with(response(), "id", json!(8)), "tool", json!("echo")),
            "latency_ms",
            json!(1.0),
        );
        // The same id from another process is another call; "7" is not 7.
        let other_pid = with(request(), "pid", json!(1));
        let string_id = with(request(), "id", json!("7"));
        let calls = all_of(
            &mut m,
            vec![
                request(),
                other,
                other_pid,
                string_id,
                other_answer,
                response(),
            ],
        );
        assert_eq!(calls.len(), 4, "{calls:#?}");
        assert_eq!(calls[0].record["tool"], "echo");
        assert_eq!(calls[0].answer.as_ref().unwrap()["latency_ms"], 1.0);
        assert_eq!(calls[1].record["id"], 7);
        assert_eq!(calls[1].record["pid"], 48213);
        assert_eq!(calls[1].note, Note::None);
        // Left without an answer at the end of the input, in arrival order.
        assert_eq!(calls[2].record["pid"], 1);
        assert_eq!(calls[2].note, Note::NoAnswer);
        assert_eq!(calls[3].record["id"], "7");
        assert!(format_call(&calls[3], false).ends_with("(no answer)"));
    }

    #[test]
    fn reused_ids_pair_first_in_first_out() {
        let mut m = Merger::new(Filter::default(), false, None);
        let first = with(request(), "ts", json!("2026-05-14T09:00:00.000Z"));
        let second = with(request(), "ts", json!("2026-05-14T09:00:01.000Z"));
        let calls = all_of(&mut m, vec![first, second, response(), response()]);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].record["ts"], "2026-05-14T09:00:00.000Z");
        assert!(calls.iter().all(|c| c.answer.is_some()));
    }

    #[test]
    fn a_held_request_prints_after_the_hold_and_its_late_answer_after() {
        let hold = Duration::from_secs(2);
        let mut m = Merger::new(Filter::default(), false, Some(hold));
        let t0 = Instant::now();
        assert!(m.push(request(), t0).is_empty());
        assert!(m.tick(t0 + Duration::from_secs(1)).is_empty());
        let early = m.tick(t0 + hold);
        assert_eq!(early.len(), 1);
        assert_eq!(early[0].note, Note::NoAnswerYet);
        assert!(early[0].answer.is_none());
        assert!(
            m.tick(t0 + Duration::from_secs(3)).is_empty(),
            "printed once"
        );
        let late = m.push(response(), t0 + Duration::from_secs(5));
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].note, Note::Late);
        assert!(format_call(&late[0], false).contains("42.9 ms"));
        assert!(m.finish().is_empty());
    }

    #[test]
    fn unanswered_requests_are_forgotten_eventually() {
        let mut m = Merger::new(Filter::default(), false, Some(HOLD));
        let t0 = Instant::now();
        m.push(request(), t0);
        assert_eq!(m.tick(t0 + HOLD).len(), 1);
        assert!(m.tick(t0 + FORGET).is_empty());
        assert_eq!(m.open(), 0);
        // Its answer now comes alone.
        let calls = m.push(response(), t0 + FORGET);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].record["event"], "response");
        assert!(format_call(&calls[0], false).starts_with("09:21:07.455"));
    }

    #[test]
    fn filters_hide_a_call_and_swallow_its_answer() {
        let deny = Filter {
            decision: Some(DecisionFilter::Deny),
            ..Filter::default()
        };
        let calls = all_of(
            &mut Merger::new(deny, false, None),
            vec![request(), refused(), response()],
        );
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].record["tool"], "drop_cluster");

        let tool = Filter {
            tool: Some("start_security_scan".into()),
            ..Filter::default()
        };
        let calls = all_of(
            &mut Merger::new(tool, false, None),
            vec![request(), refused(), response()],
        );
        assert_eq!(calls.len(), 1);
        assert!(calls[0].answer.is_some());

        let approval = Filter {
            decision: Some(DecisionFilter::RequireApproval),
            ..Filter::default()
        };
        assert!(all_of(
            &mut Merger::new(approval, false, None),
            vec![request(), refused(), response()],
        )
        .is_empty());
    }

    #[test]
    fn the_caller_filter_is_a_case_insensitive_substring_of_comm_pid_uid_cgroup() {
        let f = |s: &str| Filter {
            caller: Some(s.into()),
            ..Filter::default()
        };
        assert!(f("PYTHON").matches(&request()));
        assert!(f("4821").matches(&request()));
        assert!(f("1000").matches(&request()));
        assert!(f("Agent.Service").matches(&request()));
        assert!(!f("node").matches(&request()));
        assert!(!f("python").matches(&json!({"event": "policy_reload"})));
    }

    #[test]
    fn non_mcp_and_server_messages_only_with_all() {
        let non_mcp = json!({"v":1,"ts":"2026-05-14T09:21:07.020Z","event":"non_mcp","dst":"10.0.0.5:8080","pid":48213,"comm":"python3","uid":1000,"cgroup_id":7342,"server":"tools","http_version":"HTTP/1.1","http_method":"GET","path":"/.well-known/oauth-protected-resource"});
        let its_answer = json!({"v":1,"ts":"2026-05-14T09:21:07.030Z","event":"response","dst":"10.0.0.5:8080","pid":48213,"comm":"python3","uid":1000,"cgroup_id":7342,"server":"tools","http_version":"HTTP/1.1","http_method":"GET","path":"/.well-known/oauth-protected-resource","status":404,"latency_ms":10.0});
        let server_message = json!({"v":1,"ts":"2026-05-14T09:21:07.431Z","event":"server_message","pid":48213,"method":"notifications/progress"});
        let records = vec![non_mcp, its_answer, server_message];
        assert!(all_of(
            &mut Merger::new(Filter::default(), false, None),
            records.clone()
        )
        .is_empty());
        let calls = all_of(&mut Merger::new(Filter::default(), true, None), records);
        assert_eq!(calls.len(), 2, "{calls:#?}");
        let line = format_call(&calls[0], false);
        assert!(
            line.contains("GET /.well-known/oauth-protected-resource") && line.contains("HTTP 404"),
            "{line}"
        );
        let line = format_call(&calls[1], false);
        assert!(
            line.contains("notifications/progress") && line.ends_with("from the server"),
            "{line}"
        );
    }

    #[test]
    fn connection_level_records_are_named_by_their_event() {
        let reload = json!({"v":1,"ts":"2026-05-14T10:02:13.540Z","event":"policy_reload","reason":"loaded: in force from now on","policy":{"file":"/p.json","sha256":"05d35c3cff576032c2ec020b80090de59407c157e924b1e1140f9d29a4833113"}});
        assert_eq!(
            format_call(&Call::alone(reload), false),
            "10:02:13.540  -                                 -             policy_reload             \
             -                 -                                    -  — loaded: in force from now on"
        );
        let bare = json!({"v":1,"ts":"2026-05-14T09:20:55.310Z","event":"refused","decision":"deny","reason":"no redirect record"});
        let line = format_call(&Call::alone(bare), false);
        assert!(
            line.contains("  refused  ") && line.contains("deny"),
            "{line}"
        );
        let netns = json!({"v":1,"ts":"2026-05-14T09:30:02.118Z","event":"unprepared_netns","dst":"10.0.0.5:8080","pid":61877,"comm":"agent","uid":0,"cgroup":"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod3f1c2a9e_8d4b_4c1e_9a7f_0b5e6d2c1a44.slice/cri-containerd-5d1e.scope","cgroup_id":9931,"netns":4026532441u64,"decision":"deny","reason":"not served yet"});
        let line = format_call(&Call::alone(netns), false);
        assert!(
            line.contains("agent[61877] uid=0 pod=3f1c2a9e-8d4b-4c1e-9a7f-0b5e6d2c1a44")
                && line.contains("unprepared_netns"),
            "{line}"
        );
        let passthrough = json!({"event":"passthrough","ts":"2026-05-14T09:26:40.333Z","pid":1,"comm":"c","server":"partner","decision":"allow"});
        assert!(format_call(&Call::alone(passthrough), false).contains("passthrough"));
    }

    #[test]
    fn the_pod_field_wins_over_the_cgroup() {
        let mut r = request();
        r["pod"] = json!({"namespace": "team-a", "name": "agent-0"});
        let line = format_call(&Call::alone(r), false);
        assert!(
            line.contains("python3[48213] uid=1000 pod=team-a/agent-0"),
            "{line}"
        );
        let cgroupfs = json!({"pid": 1, "comm": "x", "cgroup": "/kubepods/burstable/pod3f1c2a9e-8d4b-4c1e-9a7f-0b5e6d2c1a44/0123abcd"});
        assert!(caller(&cgroupfs).ends_with("pod=3f1c2a9e-8d4b-4c1e-9a7f-0b5e6d2c1a44"));
        assert_eq!(
            caller(&json!({"pid": 0, "comm": "", "uid": 0})),
            "[0] uid=0"
        );
    }

    #[test]
    fn colours_mark_the_decision_only_when_asked() {
        let allowed = Call {
            record: request(),
            answer: Some(response()),
            note: Note::None,
        };
        let plain = format_call(&allowed, false);
        assert!(!plain.contains('\x1b'));
        let coloured = format_call(&allowed, true);
        assert!(coloured.contains("\x1b[32mallow\x1b[0m"), "{coloured:?}");
        // The colour codes do not move the columns.
        assert_eq!(coloured.replace(GREEN, "").replace(RESET, ""), plain);
        assert!(format_call(&Call::alone(refused()), true).contains("\x1b[31mdeny\x1b[0m"));
        let approval = with(refused(), "decision", json!("require_approval"));
        assert!(
            format_call(&Call::alone(approval), true).contains("\x1b[33mrequire_approval\x1b[0m")
        );
    }

    #[test]
    fn what_a_client_chose_cannot_drive_the_terminal() {
        let evil = with(request(), "tool", json!("x\u{1b}[2J\nrm"));
        let line = format_call(&Call::alone(evil), false);
        assert!(!line.contains('\x1b') && !line.contains('\n'), "{line:?}");
        assert!(line.contains("x\\u{1b}[2J\\u{a}rm"), "{line}");
    }

    #[test]
    fn details_say_what_the_answer_was() {
        let error = with(
            with(response(), "is_error", json!(true)),
            "error_code",
            json!(-32602),
        );
        let line = format_call(
            &Call {
                record: request(),
                answer: Some(error),
                note: Note::None,
            },
            false,
        );
        assert!(line.ends_with("42.9 ms  error -32602"), "{line}");
        let cut = json!({"event":"response","status":502,"latency_ms":3.0,"reason":"upstream failed (HTTP 502 Bad Gateway from mcpwarden): refused","quota_released":true});
        let line = format_call(
            &Call {
                record: request(),
                answer: Some(cut),
                note: Note::None,
            },
            false,
        );
        assert!(
            line.ends_with("3.0 ms  HTTP 502  quota released  — upstream failed (HTTP 502 Bad Gateway from mcpwarden): refused"),
            "{line}"
        );
        let dry = with(
            with(request(), "would", json!("deny")),
            "reason",
            json!("destructive"),
        );
        let line = format_call(&Call::alone(dry), false);
        assert!(
            line.contains("dry run: would deny  — destructive"),
            "{line}"
        );
    }

    #[test]
    fn lines_are_split_across_reads_and_bad_ones_skipped() {
        let mut lines = Lines::new("t".into());
        let text = format!("{}\n{{\"v\":1,\"ev", request());
        let got = lines.feed(text.as_bytes());
        assert_eq!(got.len(), 1);
        assert_eq!(lines.number, 1);
        // The rest of the second line, then a fragment a full disk left, a blank and a number.
        let got = lines.feed(b"ent\":\"refused\"}\n{\"v\":1,\"ts\x00\x00\n\n42\n");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["event"], "refused");
        assert_eq!(lines.number, 5);
        let got = lines.feed(b"{\"event\":\"request\"}");
        assert!(got.is_empty());
        assert_eq!(lines.end().len(), 1, "the last line without its newline");
    }

    #[test]
    fn a_whole_file_is_read_and_merged() {
        let dir = std::env::temp_dir().join(format!("mcpwarden-audit-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let text = format!("{}\n{}\nnot json\n{}\n", request(), refused(), response());
        std::fs::write(&path, text).unwrap();
        let mut out = Vec::new();
        let opts = Options {
            file: Some(path.clone()),
            ..Options::default()
        };
        run(&opts, &mut out, None).unwrap();
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].contains("drop_cluster"));
        assert!(lines[1].contains("start_security_scan") && lines[1].contains("42.9 ms"));
        let missing = Options {
            file: Some(dir.join("missing.jsonl")),
            ..Options::default()
        };
        let err = run(&missing, &mut Vec::new(), None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("missing.jsonl"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_closed_pipe_ends_the_run() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let dir = std::env::temp_dir().join(format!("mcpwarden-audit-pipe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        std::fs::write(&path, format!("{}\n", refused())).unwrap();
        let opts = Options {
            file: Some(path),
            ..Options::default()
        };
        let err = run(&opts, &mut Closed, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
