//! Where records go: one JSON object per line, written before anything they gate is forwarded.
//!
//! A record is serialised into a per-thread buffer and written with a single `write(2)` to a file
//! opened `O_APPEND`: the kernel appends each write whole (the file's inode lock serialises them),
//! so lines from concurrent connections never interleave and runtime threads share no lock on
//! this path. Standard output (a pipe or terminal, for the demo and development) is written
//! under std's stdout lock instead. [`AuditLog::write`] returns only once the kernel has
//! the bytes: the interceptor writes a call's decision record before it forwards the call, so a
//! crash of the agent never leaves a forwarded call unaudited. Records that gate nothing
//! (`response`) go through a [`WorkerAudit`], which defers them to the worker's next write.

use std::{
    cell::RefCell,
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    os::unix::io::{AsFd, AsRawFd},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use super::record::{Record, MAX_RECORD_BYTES};

enum Sink {
    File(File),
    Stdout,
    /// A FIFO, pipe or socket (standard output into a pipe, a named pipe to a log shipper):
    /// written without blocking, so that a reader that stops cannot freeze the writers.
    Pipe(Pipe),
}

/// A non-blocking pipe sink. Writers take turns (lines must not interleave); each waits at most
/// `stall` for room. Once a record has waited that long the pipe counts as stalled, and later
/// records are tried once and refused at once until one goes through.
struct Pipe {
    file: File,
    stall: Duration,
    state: Mutex<PipeState>,
}

#[derive(Default)]
struct PipeState {
    stalled: bool,
    /// A line was cut by the stall: the next write first ends it.
    cut_line: bool,
}

/// How long a record may wait for a pipe sink to take it, unless configured (`audit.stall_ms`).
pub const DEFAULT_STALL: Duration = Duration::from_millis(1000);

/// The audit sink: a file opened for append (created 0600), standard output, or a pipe.
pub struct AuditLog {
    sink: Sink,
}

thread_local! {
    /// Serialisation buffer, reused by every record written from this thread.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

impl AuditLog {
    /// `-` means standard output. Records wait at most [`DEFAULT_STALL`] for a pipe sink.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_with(path, DEFAULT_STALL)
    }

    /// [`AuditLog::open`] with how long a record may wait for a pipe sink (standard output
    /// into a pipe, a named pipe, a socket) before it is refused. Regular files and terminals
    /// are written as they are.
    pub fn open_with(path: &Path, stall: Duration) -> io::Result<Self> {
        let file = if path == Path::new("-") {
            let stdout = io::stdout().as_fd().try_clone_to_owned()?;
            if !is_pipe(&stdout)? {
                return Ok(AuditLog { sink: Sink::Stdout });
            }
            File::from(stdout)
        } else {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)?;
            if !is_pipe(&file)? {
                return Ok(AuditLog {
                    sink: Sink::File(file),
                });
            }
            file
        };
        set_nonblocking(&file)?;
        Ok(AuditLog {
            sink: Sink::Pipe(Pipe {
                file,
                stall,
                state: Mutex::default(),
            }),
        })
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
            append_line(line, record)?;
            self.write_lines(line)
        })
    }

    /// Write whole lines with one `write(2)`; returns once the kernel has them.
    fn write_lines(&self, lines: &[u8]) -> io::Result<()> {
        match &self.sink {
            // One write(2) on an O_APPEND file: appended whole and in order, without a lock. A
            // short write only happens on errors (disk full), and is reported.
            Sink::File(f) => {
                let n = (&*f).write(lines)?;
                if n != lines.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("short audit write: {n} of {} bytes", lines.len()),
                    ));
                }
                Ok(())
            }
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(lines)?;
                out.flush()
            }
            Sink::Pipe(pipe) => pipe.write(lines),
        }
    }
}

impl Pipe {
    fn write(&self, lines: &[u8]) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ended;
        let out = if state.cut_line {
            ended = [b"\n", lines].concat();
            &ended[..]
        } else {
            lines
        };
        let started = std::time::Instant::now();
        let mut written = 0;
        while written < out.len() {
            match (&self.file).write(&out[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Stalled already: a record not yet begun is not waited for.
                    let budget = if state.stalled && written == 0 {
                        Duration::ZERO
                    } else {
                        self.stall
                    };
                    let waited = started.elapsed();
                    if waited >= budget {
                        state.stalled = true;
                        state.cut_line |= written > 0;
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "the audit sink has not taken a record for {} ms",
                                self.stall.as_millis()
                            ),
                        ));
                    }
                    wait_writable(&self.file, budget - waited)?;
                }
                Err(e) => return Err(e),
            }
        }
        state.stalled = false;
        state.cut_line = false;
        Ok(())
    }
}

/// Whether `fd` is a FIFO or a socket.
fn is_pipe(fd: &impl AsFd) -> io::Result<bool> {
    let kind = File::from(fd.as_fd().try_clone_to_owned()?)
        .metadata()?
        .file_type();
    Ok(kind.is_fifo() || kind.is_socket())
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function borrows; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Wait up to `timeout` for room to write on `file`.
fn wait_writable(file: &File, timeout: Duration) -> io::Result<()> {
    let mut fds = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: one pollfd, valid for the call.
    if unsafe { libc::poll(&mut fds, 1, ms) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// Serialise `record` as one line onto `buf`; a line longer than [`MAX_RECORD_BYTES`] is
/// written [`Record::clipped`] instead, so one record is bounded whatever a client sent.
fn append_line(buf: &mut Vec<u8>, record: &Record) -> io::Result<()> {
    let start = buf.len();
    serde_json::to_writer(&mut *buf, record).map_err(io::Error::other)?;
    if buf.len() - start > MAX_RECORD_BYTES {
        buf.truncate(start);
        serde_json::to_writer(&mut *buf, &record.clipped()).map_err(io::Error::other)?;
    }
    buf.push(b'\n');
    Ok(())
}

/// How long a deferred record may wait for a write to carry it.
pub const DEFER_AT_MOST: Duration = Duration::from_millis(5);
/// Deferred bytes that trigger a write at once.
const DEFER_BYTES: usize = 64 * 1024;

/// One interceptor worker's writer: records that gate nothing (`response` records) are deferred
/// and carried by the worker's next write, so under load a call costs one `write(2)` instead of
/// two; a timer writes them within [`DEFER_AT_MOST`] when no other write comes. Records that gate
/// forwarding go out at once, after everything deferred before them, so the file keeps the order
/// in which the worker produced its records. The worker owns its writer and is its only user; the
/// mutex is never contended. Whatever is still deferred is written when the writer is dropped (the
/// agent stopping); a crash of the agent can lose at most the last few milliseconds of
/// `response` records, never a decision record.
pub struct WorkerAudit {
    log: Arc<AuditLog>,
    pending: Mutex<Vec<u8>>,
    flush_scheduled: AtomicBool,
}

impl WorkerAudit {
    pub fn new(log: Arc<AuditLog>) -> Arc<WorkerAudit> {
        Arc::new(WorkerAudit {
            log,
            pending: Mutex::new(Vec::with_capacity(DEFER_BYTES)),
            flush_scheduled: AtomicBool::new(false),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A poisoned buffer is still a buffer of whole lines.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write `record` now, with every deferred record before it; returns once the kernel has
    /// them. On failure the deferred records are dropped with the error reported (the caller
    /// refuses to forward).
    pub fn write(&self, record: &Record) -> io::Result<()> {
        let mut pending = self.pending();
        let result =
            append_line(&mut pending, record).and_then(|()| self.log.write_lines(&pending));
        pending.clear();
        result
    }

    /// [`WorkerAudit::write`] for several records, in one write.
    pub fn write_all(&self, records: &[Record]) -> io::Result<()> {
        let mut pending = self.pending();
        let result = records
            .iter()
            .try_for_each(|r| append_line(&mut pending, r))
            .and_then(|()| self.log.write_lines(&pending));
        pending.clear();
        result
    }

    /// Defer `record` (must be called on the worker's runtime, which runs the flush timer).
    pub fn write_deferred(self: &Arc<Self>, record: &Record) -> io::Result<()> {
        let mut pending = self.pending();
        append_line(&mut pending, record)?;
        if pending.len() >= DEFER_BYTES {
            let result = self.log.write_lines(&pending);
            pending.clear();
            return result;
        }
        drop(pending);
        if !self.flush_scheduled.swap(true, Ordering::AcqRel) {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(DEFER_AT_MOST).await;
                this.flush_scheduled.store(false, Ordering::Release);
                if let Err(e) = this.flush() {
                    tracing::error!(error = %e, "writing deferred audit records failed");
                }
            });
        }
        Ok(())
    }

    /// Write everything deferred.
    pub fn flush(&self) -> io::Result<()> {
        let mut pending = self.pending();
        if pending.is_empty() {
            return Ok(());
        }
        let result = self.log.write_lines(&pending);
        pending.clear();
        result
    }
}

impl Drop for WorkerAudit {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "writing deferred audit records at shutdown failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Event, Head, MessagePart, Verdict};

    #[test]
    fn lines_are_complete_json_objects_without_null_fields() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("mcpwarden-audit-test-{}", std::process::id()));
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path)?;
        let head = Head::default().with_message(MessagePart {
            tool: Some("drop_cluster".into()),
            ..MessagePart::default()
        });
        let mut rec = Record::new(Event::Refused, Arc::new(head));
        rec.decision = Some(Verdict::Deny);
        rec.rule = Some("/tools/drop_cluster/action".into());
        log.write(&rec)?;
        log.write(&Record::bare(Event::NonMcp))?;
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
        // Fields that do not apply are left out, not written as null.
        assert_eq!(
            lines[1].as_object().map(|o| o
                .keys()
                .map(String::as_str)
                .collect::<std::collections::BTreeSet<_>>()),
            Some(["event", "ts", "v"].into_iter().collect())
        );
        assert_eq!(lines[0]["tool"], "drop_cluster");
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path)?.permissions());
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir)
    }

    #[test]
    fn a_stalled_pipe_refuses_records_after_the_stall_then_at_once_until_it_drains(
    ) -> io::Result<()> {
        use std::io::Read;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::OpenOptionsExt;
        use std::time::Instant;
        let dir = std::env::temp_dir().join(format!("mcpwarden-audit-pipe-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let fifo = dir.join("audit.fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // The reader is there (opening for write needs one) but reads nothing yet.
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)?;
        let stall = Duration::from_millis(150);
        let log = AuditLog::open_with(&fifo, stall)?;
        let rec = Record::bare(Event::Request).because("x".repeat(200));
        let mut written = 0;
        let started = Instant::now();
        let first_err = loop {
            match log.write(&rec) {
                Ok(()) => written += 1,
                Err(e) => break e,
            }
            assert!(written < 100_000, "a pipe never filled");
        };
        assert_eq!(first_err.kind(), io::ErrorKind::TimedOut);
        assert!(
            started.elapsed() >= stall,
            "the first refusal waited the stall"
        );
        // Stalled: the next record is refused without waiting.
        let again = Instant::now();
        assert!(log.write(&rec).is_err());
        assert!(again.elapsed() < stall / 2, "{:?}", again.elapsed());
        // The reader catches up: records are taken again, and every line is whole.
        let mut text = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        log.write(&rec)?;
        let n = reader.read(&mut buf)?;
        text.extend_from_slice(&buf[..n]);
        let lines: Vec<&[u8]> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), written + 1);
        for line in lines {
            serde_json::from_slice::<serde_json::Value>(line).map_err(io::Error::other)?;
        }
        std::fs::remove_dir_all(&dir)
    }

    #[test]
    fn a_record_is_bounded_whatever_the_client_sent() -> io::Result<()> {
        let huge = "t".repeat(1 << 20);
        let head = Head::default().with_message(MessagePart {
            tool: Some(huge.clone()),
            method: Some("tools/call".into()),
            arg_keys: Some((0..10_000).map(|i| format!("key{i}")).collect()),
            id: Some(serde_json::Value::String(huge.clone())),
            ..MessagePart::default()
        });
        let rec =
            Record::new(Event::Refused, Arc::new(head)).denied(format!("tool {huge} is denied"));
        let mut line = Vec::new();
        append_line(&mut line, &rec)?;
        assert!(line.len() <= MAX_RECORD_BYTES, "{} bytes", line.len());
        let v: serde_json::Value = serde_json::from_slice(&line).map_err(io::Error::other)?;
        assert_eq!(v["clipped"], true);
        assert_eq!(v["method"], "tools/call", "short fields are kept");
        assert_eq!(v["arg_keys"].as_array().map(Vec::len), Some(64));
        assert!(v["tool"]
            .as_str()
            .is_some_and(|t| t.ends_with('…') && t.len() < 600));
        // A record of ordinary size is written as it is.
        let mut small = Vec::new();
        append_line(&mut small, &Record::bare(Event::Request).because("fine"))?;
        assert!(!String::from_utf8_lossy(&small).contains("clipped"));
        Ok(())
    }

    fn read_events(path: &Path) -> io::Result<Vec<String>> {
        let text = std::fs::read_to_string(path)?;
        text.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .map(|v| v["event"].as_str().unwrap_or("").to_owned())
                    .map_err(io::Error::other)
            })
            .collect()
    }

    #[test]
    fn deferred_records_ride_on_the_next_write_or_the_timer() -> io::Result<()> {
        let dir =
            std::env::temp_dir().join(format!("mcpwarden-audit-defer-{}", std::process::id()));
        let path = dir.join("audit.jsonl");
        let worker = WorkerAudit::new(Arc::new(AuditLog::open(&path)?));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()?;
        runtime.block_on(async {
            // A deferred record is not in the file until a write carries it, then comes first.
            worker.write_deferred(&Record::bare(Event::Response))?;
            assert_eq!(read_events(&path)?, Vec::<String>::new());
            worker.write(&Record::bare(Event::Request))?;
            assert_eq!(read_events(&path)?, ["response", "request"]);

            // With no write to carry it, the timer writes it within DEFER_AT_MOST.
            worker.write_deferred(&Record::bare(Event::Response))?;
            tokio::time::sleep(DEFER_AT_MOST + Duration::from_millis(1)).await;
            assert_eq!(read_events(&path)?, ["response", "request", "response"]);

            // Deferred again: its timer task now holds the writer too.
            worker.write_deferred(&Record::bare(Event::Refused))?;
            Ok::<_, io::Error>(())
        })?;
        // The worker stopping: its runtime drops the timer task and the last reference goes with
        // the worker's own, writing what is left.
        drop(runtime);
        drop(worker);
        assert_eq!(
            read_events(&path)?,
            ["response", "request", "response", "refused"]
        );
        std::fs::remove_dir_all(&dir)
    }
}
