//! The last step of the flow: one JSON object per line for every MCP message the interceptor sees.
//!
//! A record is serialised into a per-thread buffer and written with a single `write(2)` to a file
//! opened `O_APPEND`: the kernel appends each write whole (the file's inode lock serialises them),
//! so lines from concurrent connections never interleave and runtime threads share no lock on
//! this path. Standard output (a pipe or terminal, for the demo and development) is written
//! under std's stdout lock instead. [`AuditLog::write`] returns only once the kernel has
//! the bytes: the interceptor writes a call's decision record before it forwards the call, so a
//! crash of the agent never leaves a forwarded call unaudited. Argument values are never written;
//! their top-level keys and a sha256 of their canonical JSON are.

use std::{
    cell::RefCell,
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
    time::SystemTime,
};

use serde::Serialize;

/// Version of the record schema (`v`).
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// An MCP message the interceptor forwarded (after deciding it).
    Request,
    /// The upstream's answer to a forwarded MCP request.
    Response,
    /// A message or connection the interceptor refused; nothing was forwarded.
    Refused,
    /// An HTTP request that is not MCP (OAuth metadata, health checks, the SSE GET stream).
    NonMcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
}

/// Which policy made a decision: a JSON Pointer only means something next to the file it points
/// into, and that file can change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyRef {
    pub file: String,
    pub sha256: String,
}

/// One audit line. Fields that do not apply are written as null so every line has the same shape.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub v: u32,
    pub ts: String,
    pub event: Event,
    pub server: Option<String>,
    pub dst: Option<String>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub uid: Option<u32>,
    pub cgroup: Option<String>,
    pub cgroup_id: Option<u64>,
    pub http_method: Option<String>,
    pub path: Option<String>,
    pub method: Option<String>,
    pub id: Option<serde_json::Value>,
    pub tool: Option<String>,
    pub decision: Option<Verdict>,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub policy: Option<PolicyRef>,
    pub status: Option<u16>,
    pub latency_ms: Option<f64>,
    pub arg_keys: Option<Vec<String>>,
    pub args_sha256: Option<String>,
}

impl Record {
    /// An empty record of `event`, stamped now.
    pub fn new(event: Event) -> Self {
        Record {
            v: SCHEMA_VERSION,
            ts: now(),
            event,
            server: None,
            dst: None,
            pid: None,
            comm: None,
            uid: None,
            cgroup: None,
            cgroup_id: None,
            http_method: None,
            path: None,
            method: None,
            id: None,
            tool: None,
            decision: None,
            rule: None,
            reason: None,
            policy: None,
            status: None,
            latency_ms: None,
            arg_keys: None,
            args_sha256: None,
        }
    }
}

/// RFC 3339 UTC timestamp with milliseconds.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

enum Sink {
    File(File),
    Stdout,
}

/// The audit sink: a file opened for append (created 0600), or standard output.
pub struct AuditLog {
    sink: Sink,
}

thread_local! {
    /// Serialisation buffer, reused by every record written from this thread.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

impl AuditLog {
    /// `-` means standard output.
    pub fn open(path: &Path) -> io::Result<Self> {
        let sink = if path == Path::new("-") {
            Sink::Stdout
        } else {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            Sink::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)?,
            )
        };
        Ok(AuditLog { sink })
    }

    /// Serialise and write one line; returns once the kernel has it.
    pub fn write(&self, record: &Record) -> io::Result<()> {
        LINE.with(|cell| {
            // A record serialised while another is being written on this thread (impossible
            // today) would find the buffer borrowed: it gets a fresh one instead of panicking.
            let mut own = Vec::new();
            let mut borrowed = cell.try_borrow_mut();
            let line = match borrowed.as_mut() {
                Ok(b) => &mut **b,
                Err(_) => &mut own,
            };
            line.clear();
            serde_json::to_writer(&mut *line, record).map_err(io::Error::other)?;
            line.push(b'\n');
            match &self.sink {
                // One write(2) per line on an O_APPEND file: whole and in order, without a lock.
                // A short write only happens on errors (disk full), and is reported.
                Sink::File(f) => {
                    let n = (&*f).write(line)?;
                    if n != line.len() {
                        return Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            format!("short audit write: {n} of {} bytes", line.len()),
                        ));
                    }
                    Ok(())
                }
                Sink::Stdout => {
                    let mut out = io::stdout().lock();
                    out.write_all(line)?;
                    out.flush()
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_complete_json_objects_with_every_field() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("mcpwarden-audit-test-{}", std::process::id()));
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path)?;
        let mut rec = Record::new(Event::Refused);
        rec.tool = Some("drop_cluster".into());
        rec.decision = Some(Verdict::Deny);
        rec.rule = Some("/tools/drop_cluster/action".into());
        log.write(&rec)?;
        log.write(&Record::new(Event::NonMcp))?;
        let text = std::fs::read_to_string(&path)?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .map_err(io::Error::other)?;
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "refused");
        assert_eq!(lines[0]["decision"], "deny");
        assert_eq!(lines[0]["rule"], "/tools/drop_cluster/action");
        assert_eq!(lines[1]["event"], "non_mcp");
        assert!(lines[1]["pid"].is_null());
        assert_eq!(
            lines[1].as_object().map(|o| o.len()),
            lines[0].as_object().map(|o| o.len())
        );
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path)?.permissions());
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir)
    }
}
