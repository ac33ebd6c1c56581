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
//!
//! **Reopening.** The file is held in an [`ArcSwap`]: a write loads it without a lock, and a
//! reopen swaps a new one in (the old one closes when its last write is done). It is reopened on
//! [`AuditLog::reopen`] (SIGUSR1), and when a thread that checks the path every
//! [`WATCH_INTERVAL`] finds that it names another file or none (logrotate's `create` mode, or a
//! removal): records written meanwhile went to the renamed file; those written to a removed file
//! after the previous check are copied into the new one. `copytruncate` needs nothing: `O_APPEND`
//! writes go to the new end of a truncated file.
//!
//! **Rotation.** With `audit.rotate`, the write that takes the file past `max_bytes` renames
//! `PATH.(k-1)` to `PATH.k` down to `PATH` to `PATH.1` and swaps a new `PATH` in, under a mutex
//! taken only to rotate; writes meanwhile go to the renamed file, whole.
//!
//! **Stalls.** A write that fails (a full disk, EIO, a short write, a pipe that does not drain)
//! is retried with a short backoff for at most `audit.stall_ms`. Then the sink counts as
//! stalled: records not yet begun are tried once and refused at once until one goes through,
//! and each refused record is refused (`on_stall: deny`, the caller answers 503) or written to
//! standard error and forwarded (`on_stall: allow`). A short write leaves a fragment of a line:
//! the next write first ends it with a newline, and the cut record is written again whole. When
//! the sink takes records again an `audit_stall` record says for how long it did not and what
//! happened to the records meanwhile.

use std::{
    cell::RefCell,
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt},
    os::unix::io::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering},
        Arc, Mutex, OnceLock, Weak,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use super::record::{Event, Record, StallPart, MAX_RECORD_BYTES};

/// Relaxed everywhere: the counters and flags order nothing else.
const R: Ordering = Ordering::Relaxed;

/// How long a record may wait for the sink to take it, unless configured (`audit.stall_ms`).
pub const DEFAULT_STALL: Duration = Duration::from_millis(1000);

/// How often the file sink checks that its path still names the file it writes.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// The default `audit.redact_keys`: an argument whose key contains one of these
/// (case-insensitively) is written `"[redacted]"`.
pub const DEFAULT_REDACT_KEYS: [&str; 5] = ["password", "token", "secret", "key", "authorization"];

/// What a redacted argument value is written as.
pub const REDACTED: &str = "[redacted]";

/// What a record gets when the sink has not taken it within `stall_ms` (`audit.on_stall`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStall {
    /// The write fails: the call is answered 503 and nothing is forwarded.
    #[default]
    Deny,
    /// The write succeeds without the file: the record goes to standard error (the container
    /// log), counted, and the call is forwarded. The audit file then lacks those decisions.
    Allow,
}

/// `audit.rotate`: built-in rotation by size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    /// The write that takes the file to this size or past it rotates it.
    pub max_bytes: u64,
    /// Rotated files kept: `PATH.1` (the newest) to `PATH.keep`.
    pub keep: u32,
}

/// The `audit:` settings besides the path and `stall_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub on_stall: OnStall,
    pub rotate: Option<Rotate>,
    /// Argument keys containing one of these (compared lower-case) are redacted.
    pub redact_keys: Vec<String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            on_stall: OnStall::Deny,
            rotate: None,
            redact_keys: DEFAULT_REDACT_KEYS.map(str::to_owned).to_vec(),
        }
    }
}

/// Sees every record handed to the log (metrics), once, before it is serialised, whether or
/// not it is then written.
pub trait Observer: Send + Sync {
    fn observe(&self, record: &Record);
}

/// Upper bounds (seconds) of the write-latency histogram's buckets; a last one, +Inf, follows.
pub const WRITE_LATENCY_BOUNDS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0,
];
/// [`WRITE_LATENCY_BOUNDS`] in nanoseconds.
const WRITE_LATENCY_BOUNDS_NS: [u64; 16] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

/// What the sink did, for metrics. Every counter only grows.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Bytes of the records the sink took whole.
    pub bytes_written: AtomicU64,
    /// Records the sink took whole.
    pub records_written: AtomicU64,
    /// Failed `write(2)`s (each retry counts): ENOSPC, EIO, short writes, a full pipe.
    pub write_errors: AtomicU64,
    /// Writes that waited the whole `stall_ms` and gave up.
    pub stalls: AtomicU64,
    /// Records the sink did not take that went to standard error instead, their calls
    /// forwarded (`on_stall: allow`): decision records, and the records of the answers.
    pub unrecorded_forwarded: AtomicU64,
    /// Records refused because the sink was stalled (`on_stall: deny`): their calls got 503.
    pub refused_for_stall: AtomicU64,
    /// The file reopened: SIGUSR1, or its path renamed or removed.
    pub reopens: AtomicU64,
    /// Built-in rotations (`audit.rotate`).
    pub rotations: AtomicU64,
    /// Per bucket of [`WRITE_LATENCY_BOUNDS`] (not cumulative); the last is +Inf.
    pub write_latency_buckets: [AtomicU64; WRITE_LATENCY_BOUNDS.len() + 1],
    pub write_latency_sum_ns: AtomicU64,
    pub write_latency_count: AtomicU64,
}

impl SinkStats {
    fn latency(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = WRITE_LATENCY_BOUNDS_NS.partition_point(|&b| b < ns);
        if let Some(b) = self.write_latency_buckets.get(bucket) {
            b.fetch_add(1, R);
        }
        self.write_latency_sum_ns.fetch_add(ns, R);
        self.write_latency_count.fetch_add(1, R);
    }
}

/// What kind of sink the log writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    File,
    Stdout,
    /// A FIFO, a pipe or a socket (standard output into one included).
    Pipe,
}

/// The sink as `mcpwarden status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SinkState {
    pub kind: SinkKind,
    /// The configured path (absent for standard output).
    pub path: Option<PathBuf>,
    /// A record waited the whole `stall_ms`, and none has gone through since.
    pub stalled: bool,
    pub on_stall: OnStall,
}

/// Part of `lines` is in the sink, the rest is not, and why.
struct Cut {
    /// Bytes at the start of what was tried that are in the sink as whole lines.
    whole: usize,
    error: io::Error,
}

impl Cut {
    fn of(error: io::Error) -> Cut {
        Cut { whole: 0, error }
    }
}

/// Bytes of `written` (a prefix of what was tried) that are whole lines.
fn whole_lines(written: &[u8]) -> usize {
    written
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1)
}

fn count_lines(lines: &[u8]) -> u64 {
    lines.iter().filter(|&&b| b == b'\n').count() as u64
}

enum Sink {
    File(Arc<FileSink>),
    Stdout,
    /// A FIFO, pipe or socket (standard output into a pipe, a named pipe to a log shipper):
    /// written without blocking, so that a reader that stops cannot freeze the writers.
    Pipe(Pipe),
}

/// One open audit file.
struct OpenFile {
    file: File,
    dev: u64,
    ino: u64,
    /// Its size as this agent knows it: at open, plus what it appended (for rotation).
    size: AtomicU64,
    /// The size at which a write tries to rotate it (raised when rotating failed).
    rotate_at: AtomicU64,
    /// Its size when the watcher last found it at the path: what a copy after its removal
    /// starts from.
    checked: AtomicU64,
}

impl OpenFile {
    fn open(path: &Path, rotate: Option<Rotate>) -> io::Result<OpenFile> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            // Read too: what was written to it after it was removed is copied from it.
            .read(true)
            .mode(0o600)
            .open(path)?;
        let meta = file.metadata()?;
        Ok(OpenFile {
            dev: meta.dev(),
            ino: meta.ino(),
            size: AtomicU64::new(meta.len()),
            rotate_at: AtomicU64::new(rotate.map_or(u64::MAX, |r| r.max_bytes)),
            checked: AtomicU64::new(meta.len()),
            file,
        })
    }

    fn is(&self, meta: &std::fs::Metadata) -> bool {
        (meta.dev(), meta.ino()) == (self.dev, self.ino)
    }
}

/// A regular file, reopened by path when asked, renamed, removed or rotated.
struct FileSink {
    path: PathBuf,
    current: ArcSwap<OpenFile>,
    rotate: Option<Rotate>,
    /// Taken to reopen or rotate (rare); never by a write that goes through.
    switching: Mutex<()>,
    /// A short write left part of a line: the next write ends it first.
    cut_line: AtomicBool,
    /// Writers take turns while `cut_line` is set, so that only one ends the line.
    cut_turn: Mutex<()>,
    stats: Arc<SinkStats>,
}

/// Why the file is reopened.
#[derive(Debug, Clone, Copy)]
enum Why {
    Asked,
    Renamed,
    Removed,
}

impl FileSink {
    /// One try at appending `rest` whole.
    fn attempt(&self, rest: &[u8]) -> Result<(), Cut> {
        if self.cut_line.load(R) {
            let _turn = self.cut_turn.lock().unwrap_or_else(|e| e.into_inner());
            if self.cut_line.load(R) {
                let mut ended = Vec::with_capacity(rest.len() + 1);
                ended.push(b'\n');
                ended.extend_from_slice(rest);
                return self.put(&ended, 1);
            }
        }
        self.put(rest, 0)
    }

    /// One `write(2)` of `out`, whose first `lead` bytes end a cut line.
    fn put(&self, out: &[u8], lead: usize) -> Result<(), Cut> {
        let file = self.current.load();
        let n = match (&file.file).write(out) {
            Ok(n) => n,
            Err(e) => return Err(Cut::of(e)),
        };
        file.size.fetch_add(n as u64, R);
        if n == out.len() {
            if lead > 0 {
                self.cut_line.store(false, R);
            }
            if file.size.load(R) >= file.rotate_at.load(R) {
                if let Some(r) = self.rotate {
                    self.rotate(&file, r);
                }
            }
            return Ok(());
        }
        // A short write (a full disk): the lines before the cut are in, whole.
        let body = &out[lead..];
        let took = &body[..n.saturating_sub(lead)];
        let whole = whole_lines(took);
        let fragment = took.len() > whole;
        if lead > 0 {
            self.cut_line.store(n < lead || fragment, R);
        } else if fragment {
            self.cut_line.store(true, R);
        }
        Err(Cut {
            whole,
            error: io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {n} of {} bytes", out.len()),
            ),
        })
    }

    /// Rotate `file` (the current one, grown to `max_bytes`) unless another thread is
    /// switching files already.
    fn rotate(&self, file: &OpenFile, r: Rotate) {
        let Ok(_switching) = self.switching.try_lock() else {
            return;
        };
        if !std::ptr::eq(&**self.current.load(), file) {
            return;
        }
        // The path must still name this file: after logrotate or another agent renamed it, the
        // watcher reopens; renaming again would shift someone else's files.
        if !std::fs::metadata(&self.path).is_ok_and(|m| file.is(&m)) {
            return;
        }
        // What others appended counts too (a second agent, a copytruncate).
        match file.file.metadata() {
            Ok(m) if m.len() < r.max_bytes => {
                file.size.store(m.len(), R);
                return;
            }
            _ => {}
        }
        let renamed = (1..r.keep)
            .rev()
            .map(|i| (numbered(&self.path, i), numbered(&self.path, i + 1)))
            .chain([(self.path.clone(), numbered(&self.path, 1))])
            .try_for_each(|(from, to)| match std::fs::rename(&from, &to) {
                Err(e) if e.kind() == io::ErrorKind::NotFound && from != self.path => Ok(()),
                other => other,
            });
        let opened = renamed.and_then(|()| OpenFile::open(&self.path, self.rotate));
        match opened {
            Ok(new) => {
                self.current.store(Arc::new(new));
                self.stats.rotations.fetch_add(1, R);
                tracing::info!(path = %self.path.display(), keep = r.keep, "audit log rotated");
            }
            Err(e) => {
                // Records go on into the file they were going to; try again a little later.
                let later = (r.max_bytes / 8).max(1 << 20);
                file.rotate_at.fetch_add(later, R);
                tracing::error!(path = %self.path.display(), error = %e, "rotating the audit log failed; writing on to the current file");
            }
        }
    }

    /// What the watcher found at the path: unless `settled` (checked under the switching lock,
    /// given the current file and the path's metadata now) says another thread has dealt with
    /// it, open the path again, then copy into it what went to the old file if that was removed.
    fn replace(
        &self,
        why: Why,
        settled: impl FnOnce(&OpenFile, io::Result<std::fs::Metadata>) -> bool,
    ) {
        let old = {
            let _switching = self.switching.lock().unwrap_or_else(|e| e.into_inner());
            if settled(&self.current.load(), std::fs::metadata(&self.path)) {
                return;
            }
            match self.swap_in(why) {
                Ok(old) => old,
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "reopening the audit log failed; writing on to the file open before");
                    return;
                }
            }
        };
        self.salvage(old);
    }

    /// Open the path again and swap the new file in; returns the one it replaced.
    fn reopen(&self, why: Why) -> io::Result<Arc<OpenFile>> {
        let _switching = self.switching.lock().unwrap_or_else(|e| e.into_inner());
        self.swap_in(why)
    }

    fn swap_in(&self, why: Why) -> io::Result<Arc<OpenFile>> {
        let new = Arc::new(OpenFile::open(&self.path, self.rotate)?);
        let old = self.current.swap(new);
        self.stats.reopens.fetch_add(1, R);
        let reason = match why {
            Why::Asked => "asked (SIGUSR1)",
            Why::Renamed => "the path names another file (renamed, logrotate create)",
            Why::Removed => "the file was removed",
        };
        tracing::info!(path = %self.path.display(), reason, "audit log reopened");
        Ok(old)
    }

    /// The watcher's check: does the path still name the file written? `missing` says whether
    /// the previous check found no file there (a file is created only when two checks in a
    /// row find none, so that logrotate's own `create` is not raced).
    fn check(&self, missing: &mut bool) {
        let current = self.current.load_full();
        // Before the stat: what this agent knows it appended is in the file, unless truncated.
        let appended = current.size.load(R);
        match std::fs::metadata(&self.path) {
            Ok(m) if current.is(&m) => {
                *missing = false;
                current.checked.store(m.len(), R);
                if m.len() < appended {
                    current.size.store(m.len(), R);
                    tracing::info!(path = %self.path.display(), from = appended, to = m.len(), "the audit file was truncated (logrotate copytruncate?): writes go on at its new end; records written between logrotate's copy and its truncation are in neither file");
                }
            }
            Ok(_) => {
                *missing = false;
                drop(current);
                // A rotation of ours may have swapped it already.
                self.replace(Why::Renamed, |current, path| {
                    path.is_ok_and(|m| current.is(&m))
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !std::mem::replace(missing, true) {
                    return;
                }
                *missing = false;
                drop(current);
                self.replace(Why::Removed, |_, path| path.is_ok());
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot check the audit log's path");
            }
        }
    }

    /// Copy what was written to a removed file after the last check into the current one.
    fn salvage(&self, old: Arc<OpenFile>) {
        // Renamed rather than removed (another link to it): its records are there.
        if old.file.metadata().map_or(true, |m| m.nlink() > 0) {
            return;
        }
        // Writes that loaded it before the swap finish first.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let from = old.checked.load(R);
        let end = old.file.metadata().map_or(0, |m| m.len());
        if end <= from {
            return;
        }
        const AT_MOST: u64 = 64 << 20;
        let start = from.max(end.saturating_sub(AT_MOST));
        let Ok(len) = usize::try_from(end - start) else {
            return;
        };
        let mut tail = vec![0u8; len];
        if let Err(e) = old.file.read_exact_at(&mut tail, start) {
            tracing::error!(error = %e, "reading the removed audit file failed: the records written to it since the last check are lost");
            return;
        }
        if tail.last() != Some(&b'\n') {
            tail.push(b'\n');
        }
        let mut copied = 0;
        while copied < tail.len() {
            // One write(2) per chunk of whole lines: they cannot interleave with other records.
            let rest = &tail[copied..];
            let mut len = rest.len().min(1 << 20);
            if len < rest.len() {
                len = match whole_lines(&rest[..len]) {
                    0 => rest.len(),
                    whole => whole,
                };
            }
            match self.attempt(&rest[..len]) {
                Ok(()) => copied += len,
                Err(cut) => {
                    tracing::error!(error = %cut.error, lost_bytes = rest.len() - cut.whole, "copying the records of the removed audit file failed");
                    return;
                }
            }
        }
        tracing::info!(
            bytes = copied,
            "the audit file was removed: the records written to it since the last check were copied into the new one"
        );
    }
}

/// `PATH.n`
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Check the file sink's path every [`WATCH_INTERVAL`] while the sink lives.
fn watch(sink: Weak<FileSink>) {
    let mut missing = false;
    loop {
        std::thread::sleep(WATCH_INTERVAL);
        let Some(sink) = sink.upgrade() else {
            return;
        };
        sink.check(&mut missing);
    }
}

/// A non-blocking pipe sink. Writers take turns (lines must not interleave); each waits for room
/// as long as its budget allows.
struct Pipe {
    file: File,
    /// A line was cut by a stall: the next write first ends it.
    cut_line: Mutex<bool>,
}

impl Pipe {
    fn new(file: File) -> Pipe {
        Pipe {
            file,
            cut_line: Mutex::new(false),
        }
    }

    /// Write `lines` whole, waiting for room at most `budget` before the first byte, and at most
    /// `stall` once begun (a line is finished rather than cut when the reader is only slow).
    fn write(
        &self,
        lines: &[u8],
        started: Instant,
        budget: Duration,
        stall: Duration,
    ) -> Result<(), Cut> {
        let mut cut_line = self.cut_line.lock().unwrap_or_else(|e| e.into_inner());
        let lead = usize::from(*cut_line);
        let ended;
        let out = if lead > 0 {
            ended = [b"\n", lines].concat();
            &ended[..]
        } else {
            lines
        };
        let mut written = 0;
        let give_up = |written: usize, cut_line: &mut bool, error: io::Error| {
            let took = &lines[..written.saturating_sub(lead)];
            let whole = whole_lines(took);
            *cut_line = written < lead || took.len() > whole;
            Cut { whole, error }
        };
        while written < out.len() {
            match (&self.file).write(&out[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let allowed = if written == 0 { budget } else { stall };
                    let waited = started.elapsed();
                    if waited >= allowed {
                        let e = io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the pipe's reader takes nothing",
                        );
                        return Err(give_up(written, &mut cut_line, e));
                    }
                    if let Err(e) = wait_writable(&self.file, allowed - waited) {
                        return Err(give_up(written, &mut cut_line, e));
                    }
                }
                Err(e) => return Err(give_up(written, &mut cut_line, e)),
            }
        }
        *cut_line = false;
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

/// Whether the sink takes records, and what happened to those it did not take since it stopped.
#[derive(Default)]
struct Health {
    /// A record waited the whole stall, and none went through since.
    stalled: AtomicBool,
    /// Nanoseconds after `epoch` of the first failed write since the last that went through;
    /// 0: none failed.
    failing_since: AtomicU64,
    /// The last failure's errno (0: a short write, a timeout).
    last_errno: AtomicI32,
    /// Since the stall began: records refused (deny) and forwarded without the sink (allow).
    refused: AtomicU64,
    unrecorded: AtomicU64,
}

/// The audit sink: a file opened for append (created 0600), standard output, or a pipe.
pub struct AuditLog {
    sink: Sink,
    path: Option<PathBuf>,
    stall: Duration,
    on_stall: OnStall,
    health: Health,
    epoch: Instant,
    stats: Arc<SinkStats>,
    observer: OnceLock<Arc<dyn Observer>>,
    /// Servers whose calls' arguments are written (`log_arguments`), and the redaction terms
    /// (lower-case).
    arguments_of: Vec<String>,
    redact: Vec<String>,
}

thread_local! {
    /// Serialisation buffer, reused by every record written from this thread.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

impl AuditLog {
    /// `-` means standard output. Records wait at most [`DEFAULT_STALL`] for the sink.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_with(path, DEFAULT_STALL)
    }

    /// [`AuditLog::open`] with how long a record may wait for the sink (a full disk, a named
    /// pipe or socket whose reader stopped) before it is refused.
    pub fn open_with(path: &Path, stall: Duration) -> io::Result<Self> {
        Self::configured(path, stall, &Options::default(), Vec::new())
    }

    /// The log the config describes: `audit:` and the servers' `log_arguments`.
    pub fn for_config(config: &crate::config::Config) -> io::Result<Self> {
        Self::configured(
            &config.audit,
            config.audit_stall,
            &config.audit_options,
            config
                .servers
                .iter()
                .filter(|s| s.log_arguments)
                .map(|s| s.name.clone())
                .collect(),
        )
    }

    /// The log at `path` (`-`: standard output) with `options`; the calls to the servers named
    /// in `log_arguments` are written with their arguments, redacted.
    pub fn configured(
        path: &Path,
        stall: Duration,
        options: &Options,
        log_arguments: Vec<String>,
    ) -> io::Result<Self> {
        let stats = Arc::new(SinkStats::default());
        let (sink, named) = if path == Path::new("-") {
            let stdout = io::stdout().as_fd().try_clone_to_owned()?;
            if is_pipe(&stdout)? {
                let file = File::from(stdout);
                set_nonblocking(&file)?;
                (Sink::Pipe(Pipe::new(file)), None)
            } else {
                (Sink::Stdout, None)
            }
        } else {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let kind = std::fs::metadata(path).map(|m| m.file_type());
            if kind.is_ok_and(|k| k.is_fifo() || k.is_socket()) {
                // Write-only, as a FIFO's writer (a regular file is opened for reading too).
                let file = OpenOptions::new().append(true).open(path)?;
                set_nonblocking(&file)?;
                (Sink::Pipe(Pipe::new(file)), Some(path.to_owned()))
            } else {
                let opened = OpenFile::open(path, options.rotate)?;
                let sink = Arc::new(FileSink {
                    path: path.to_owned(),
                    current: ArcSwap::from_pointee(opened),
                    rotate: options.rotate,
                    switching: Mutex::new(()),
                    cut_line: AtomicBool::new(false),
                    cut_turn: Mutex::new(()),
                    stats: stats.clone(),
                });
                let weak = Arc::downgrade(&sink);
                std::thread::Builder::new()
                    .name("mcpwarden-audit-watch".into())
                    .spawn(move || watch(weak))?;
                (Sink::File(sink), Some(path.to_owned()))
            }
        };
        Ok(AuditLog {
            sink,
            path: named,
            stall,
            on_stall: options.on_stall,
            health: Health::default(),
            epoch: Instant::now(),
            stats,
            observer: OnceLock::new(),
            arguments_of: log_arguments,
            redact: options
                .redact_keys
                .iter()
                .map(|k| k.to_lowercase())
                .collect(),
        })
    }

    /// Serialise and write one line; returns once the kernel has it (or, stalled with
    /// `on_stall: allow`, once standard error has it).
    pub fn write(&self, record: &Record) -> io::Result<()> {
        self.observe(record);
        LINE.with(|cell| {
            // A record serialised while another is being written on this thread (the
            // `audit_stall` record) finds the buffer borrowed: it gets a fresh one.
            let mut own = Vec::new();
            let mut borrowed = cell.try_borrow_mut();
            let line = match borrowed.as_mut() {
                Ok(b) => &mut **b,
                Err(_) => &mut own,
            };
            line.clear();
            append_line(line, record)?;
            self.write_lines(line, 0)
        })
    }

    /// Reopen the file at its path (SIGUSR1, after an external rotation). Standard output and
    /// pipes are kept as they are.
    pub fn reopen(&self) -> io::Result<()> {
        match &self.sink {
            Sink::File(f) => {
                let old = f.reopen(Why::Asked)?;
                // Removed before the signal (`rm`, then SIGUSR1): what was written to it since
                // the last check is copied into the new file, off the signal's thread.
                let sink = f.clone();
                let _ = std::thread::Builder::new()
                    .name("mcpwarden-audit-salvage".into())
                    .spawn(move || sink.salvage(old));
                Ok(())
            }
            Sink::Stdout | Sink::Pipe(_) => Ok(()),
        }
    }

    /// What the sink did so far.
    pub fn stats(&self) -> &SinkStats {
        &self.stats
    }

    pub fn sink_state(&self) -> SinkState {
        SinkState {
            kind: match &self.sink {
                Sink::File(_) => SinkKind::File,
                Sink::Stdout => SinkKind::Stdout,
                Sink::Pipe(_) => SinkKind::Pipe,
            },
            path: self.path.clone(),
            stalled: self.health.stalled.load(R),
            on_stall: self.on_stall,
        }
    }

    /// Set the observer every record is shown to (once, at start); false if one was set.
    pub fn set_observer(&self, observer: Arc<dyn Observer>) -> bool {
        self.observer.set(observer).is_ok()
    }

    fn observe(&self, record: &Record) {
        if let Some(o) = self.observer.get() {
            o.observe(record);
        }
    }

    /// The `arguments` of a `tools/call` to `server`, for its records: a copy with every value
    /// whose key contains a redaction term replaced by `"[redacted]"`; `None` unless the
    /// server has `log_arguments: true`.
    pub fn arguments(
        &self,
        server: Option<&str>,
        arguments: Option<&serde_json::Value>,
    ) -> Option<serde_json::Value> {
        let server = server?;
        if !self.arguments_of.iter().any(|s| s == server) {
            return None;
        }
        Some(redacted(arguments?, &self.redact))
    }

    /// Write whole lines with one `write(2)` (retried on failure up to the stall); returns once
    /// the kernel has them. The first `kept` bytes are deferred lines the caller keeps when
    /// the write fails: they are not counted refused.
    fn write_lines(&self, lines: &[u8], kept: usize) -> io::Result<()> {
        self.write_lines_counted(lines, kept).1
    }

    /// [`AuditLog::write_lines`], with how many bytes of `lines` are in the sink as whole lines
    /// (all of them on success).
    fn write_lines_counted(&self, lines: &[u8], kept: usize) -> (usize, io::Result<()>) {
        if lines.is_empty() {
            return (0, Ok(()));
        }
        let started = Instant::now();
        let budget = if self.health.stalled.load(R) {
            Duration::ZERO
        } else {
            self.stall
        };
        let result = match &self.sink {
            Sink::File(f) => self.retrying(lines, started, budget, |rest| f.attempt(rest)),
            Sink::Stdout => self.retrying(lines, started, budget, |rest| {
                let mut out = io::stdout().lock();
                out.write_all(rest)
                    .and_then(|()| out.flush())
                    .map_err(Cut::of)
            }),
            Sink::Pipe(p) => self.retrying(lines, started, budget, |rest| {
                p.write(rest, started, budget, self.stall)
            }),
        };
        self.stats.latency(started.elapsed());
        match result {
            Ok(()) => {
                self.stats.bytes_written.fetch_add(lines.len() as u64, R);
                self.stats.records_written.fetch_add(count_lines(lines), R);
                if self.health.failing_since.load(R) != 0 || self.health.stalled.load(R) {
                    self.recovered();
                }
                (lines.len(), Ok(()))
            }
            Err((whole, error)) => {
                self.stats.bytes_written.fetch_add(whole as u64, R);
                self.stats
                    .records_written
                    .fetch_add(count_lines(&lines[..whole]), R);
                (
                    whole,
                    self.not_taken(lines, whole, kept, error, !budget.is_zero()),
                )
            }
        }
    }

    /// Try `attempt` on what is not written yet until it is all written or `budget` is spent,
    /// backing off between tries. Err: how much is in the sink, whole, and the last error.
    fn retrying(
        &self,
        lines: &[u8],
        started: Instant,
        budget: Duration,
        mut attempt: impl FnMut(&[u8]) -> Result<(), Cut>,
    ) -> Result<(), (usize, io::Error)> {
        let mut done = 0;
        let mut backoff = Duration::from_millis(1);
        loop {
            let Err(cut) = attempt(&lines[done..]) else {
                return Ok(());
            };
            done += cut.whole;
            self.stats.write_errors.fetch_add(1, R);
            self.failing(&cut.error);
            let waited = started.elapsed();
            if waited >= budget || cut.error.kind() == io::ErrorKind::TimedOut {
                return Err((done, cut.error));
            }
            std::thread::sleep(backoff.min(budget - waited));
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    fn failing(&self, error: &io::Error) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let _ = self.health.failing_since.compare_exchange(0, now, R, R);
        self.health
            .last_errno
            .store(error.raw_os_error().unwrap_or(0), R);
    }

    /// `lines` from `whole` on could not be written within the stall: refused (but for the
    /// first `kept` bytes, which the caller keeps), or (`on_stall: allow`) written to standard
    /// error and reported written.
    fn not_taken(
        &self,
        lines: &[u8],
        whole: usize,
        kept: usize,
        error: io::Error,
        waited: bool,
    ) -> io::Result<()> {
        let refused = count_lines(&lines[whole.max(kept).min(lines.len())..]);
        let lines = &lines[whole..];
        let count = count_lines(lines);
        if waited {
            self.stats.stalls.fetch_add(1, R);
        }
        // Marks the stall as begun, should a write that went through meanwhile have cleared it.
        self.failing(&error);
        if !self.health.stalled.swap(true, R) {
            tracing::error!(
                error = %error,
                stall_ms = self.stall.as_millis() as u64,
                on_stall = ?self.on_stall,
                "the audit sink has not taken a record within the stall: until it takes records again, \
                 each is tried once and then {}",
                match self.on_stall {
                    OnStall::Deny => "refused (its request gets 503, nothing is forwarded)",
                    OnStall::Allow => "written to standard error and its request forwarded",
                }
            );
        }
        match self.on_stall {
            OnStall::Deny => {
                self.stats.refused_for_stall.fetch_add(refused, R);
                self.health.refused.fetch_add(refused, R);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the audit sink has not taken a record for {} ms: {error}",
                        self.stall.as_millis()
                    ),
                ))
            }
            OnStall::Allow => {
                self.stats.unrecorded_forwarded.fetch_add(count, R);
                self.health.unrecorded.fetch_add(count, R);
                for line in lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    tracing::error!(
                        record = %String::from_utf8_lossy(line),
                        "audit sink stalled (on_stall: allow): forwarded without an audit record in the sink; the record follows"
                    );
                }
                Ok(())
            }
        }
    }

    /// A write went through after failures: if they made a stall, say so in the log.
    fn recovered(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // Only the writer that ends the stall reads when it began.
        if !self.health.stalled.swap(false, R) {
            self.health.failing_since.store(0, R);
            return;
        }
        let since = match self.health.failing_since.swap(0, R) {
            0 => now,
            since => since,
        };
        let ms = now.saturating_sub(since) / 1_000_000;
        let refused = self.health.refused.swap(0, R);
        let unrecorded = self.health.unrecorded.swap(0, R);
        let error = match self.health.last_errno.load(R) {
            0 => "a short write or a reader that took nothing".to_owned(),
            errno => io::Error::from_raw_os_error(errno).to_string(),
        };
        tracing::warn!(
            stalled_ms = ms,
            refused,
            forwarded_unrecorded = unrecorded,
            "the audit sink takes records again"
        );
        let mut rec = Record::bare(Event::AuditStall).because(format!(
            "the audit sink took no record for {ms} ms ({error}); meanwhile {refused} record(s) were \
             refused (their requests got 503, nothing was forwarded) and {unrecorded} record(s) went \
             to the agent's standard error instead, their calls forwarded (on_stall: allow)"
        ));
        rec.stall = Some(StallPart {
            ms,
            error,
            refused,
            forwarded_unrecorded: unrecorded,
        });
        if let Err(e) = self.write(&rec) {
            tracing::error!(error = %e, "writing the audit_stall record failed");
        }
    }
}

/// `value` with the value of every object key (at any depth) that contains one of `terms`
/// (lower-case; the key is compared lower-cased) replaced by [`REDACTED`].
pub fn redacted(value: &serde_json::Value, terms: &[String]) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = k.to_lowercase();
                    let v = if terms.iter().any(|t| key.contains(t.as_str())) {
                        Value::String(REDACTED.to_owned())
                    } else {
                        redacted(v, terms)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| redacted(v, terms)).collect()),
        other => other.clone(),
    }
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
/// Deferred bytes kept while the sink refuses them; past this they go to standard error.
const DEFER_KEPT: usize = 16 * DEFER_BYTES;
/// How long the timer waits before it tries a refused flush again.
const DEFER_RETRY: Duration = Duration::from_millis(1000);

/// One interceptor worker's writer: records that gate nothing (`response` records) are deferred
/// and carried by the worker's next write, so under load a call costs one `write(2)` instead of
/// two; a timer writes them within [`DEFER_AT_MOST`] when no other write comes. Records that gate
/// forwarding go out at once, after everything deferred before them, so the file keeps the order
/// in which the worker produced its records. The worker owns its writer and is its only user; the
/// mutex is never contended. Whatever is still deferred is written when the writer is dropped (the
/// agent stopping); a crash of the agent can lose at most the last few milliseconds of
/// `response` records, never a decision record. Deferred records the sink refuses (stalled,
/// `on_stall: deny`) are kept for the next write, up to [`DEFER_KEPT`] bytes; past that, and at
/// the end, they go to standard error rather than nowhere.
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

    /// The log this writer writes to.
    pub fn log(&self) -> &AuditLog {
        &self.log
    }

    /// [`AuditLog::arguments`].
    pub fn arguments(
        &self,
        server: Option<&str>,
        arguments: Option<&serde_json::Value>,
    ) -> Option<serde_json::Value> {
        self.log.arguments(server, arguments)
    }

    /// Write `pending` (deferred lines, then from `deferred` on the lines being written now).
    /// On failure the deferred lines not in the sink yet are kept for the next write (those it
    /// took, whole, are not written twice) and the others dropped.
    fn write_pending(&self, pending: &mut Vec<u8>, deferred: usize) -> io::Result<()> {
        let (written, result) = self.log.write_lines_counted(pending, deferred);
        match &result {
            Ok(()) => pending.clear(),
            Err(_) => {
                pending.truncate(deferred);
                pending.drain(..written.min(deferred));
                if pending.len() > DEFER_KEPT {
                    self.spill(pending, "the sink has refused them too long");
                }
            }
        }
        result
    }

    /// Deferred records that will not reach the sink: to standard error, never nowhere.
    fn spill(&self, pending: &mut Vec<u8>, why: &str) {
        for line in pending.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            tracing::error!(
                record = %String::from_utf8_lossy(line),
                "an audit record the sink did not take ({why}); the record follows"
            );
        }
        pending.clear();
    }

    /// Write `record` now, with every deferred record before it; returns once the kernel has
    /// them. On failure the caller refuses to forward; the deferred records are kept.
    pub fn write(&self, record: &Record) -> io::Result<()> {
        self.log.observe(record);
        let mut pending = self.pending();
        let deferred = pending.len();
        if let Err(e) = append_line(&mut pending, record) {
            pending.truncate(deferred);
            return Err(e);
        }
        self.write_pending(&mut pending, deferred)
    }

    /// [`WorkerAudit::write`] for several records, in one write.
    pub fn write_all(&self, records: &[Record]) -> io::Result<()> {
        records.iter().for_each(|r| self.log.observe(r));
        let mut pending = self.pending();
        let deferred = pending.len();
        if let Err(e) = records
            .iter()
            .try_for_each(|r| append_line(&mut pending, r))
        {
            pending.truncate(deferred);
            return Err(e);
        }
        self.write_pending(&mut pending, deferred)
    }

    /// Defer `record` (must be called on the worker's runtime, which runs the flush timer).
    pub fn write_deferred(self: &Arc<Self>, record: &Record) -> io::Result<()> {
        self.log.observe(record);
        let mut pending = self.pending();
        let before = pending.len();
        if let Err(e) = append_line(&mut pending, record) {
            pending.truncate(before);
            return Err(e);
        }
        if pending.len() >= DEFER_BYTES {
            let all = pending.len();
            return self.write_pending(&mut pending, all);
        }
        drop(pending);
        if !self.flush_scheduled.swap(true, Ordering::AcqRel) {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(DEFER_AT_MOST).await;
                loop {
                    this.flush_scheduled.store(false, Ordering::Release);
                    let Err(e) = this.flush() else {
                        break;
                    };
                    // Refused (a stalled sink): kept, and tried again later, unless a newer
                    // timer will.
                    tracing::error!(error = %e, "writing deferred audit records failed; they are kept and tried again");
                    if this.flush_scheduled.swap(true, Ordering::AcqRel) {
                        break;
                    }
                    tokio::time::sleep(DEFER_RETRY).await;
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
        let all = pending.len();
        self.write_pending(&mut pending, all)
    }
}

impl Drop for WorkerAudit {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "writing deferred audit records at shutdown failed");
            let mut pending = self.pending();
            self.spill(&mut pending, "the agent is stopping");
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
        assert!(!log.sink_state().stalled);
        let n = reader.read(&mut buf)?;
        text.extend_from_slice(&buf[..n]);
        let lines: Vec<&[u8]> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        // Every record taken, then the one that went through and the stall's own record.
        assert_eq!(lines.len(), written + 2);
        let mut parsed = Vec::new();
        for line in lines {
            parsed
                .push(serde_json::from_slice::<serde_json::Value>(line).map_err(io::Error::other)?);
        }
        let stall = &parsed[written + 1];
        assert_eq!(stall["event"], "audit_stall", "{stall}");
        assert_eq!(stall["stall"]["refused"], 2, "{stall}");
        assert_eq!(log.stats().refused_for_stall.load(R), 2);
        assert_eq!(
            log.stats().stalls.load(R),
            1,
            "the second refusal did not wait"
        );
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

    /// A private directory for one test, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("mcpwarden-audit-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create the scratch directory");
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A record whose `reason` is `mark`.
    fn marked(mark: &str) -> Record {
        Record::bare(Event::Request).because(mark)
    }

    /// The `reason` of every record of every line in `path` (missing file: none). Panics on a
    /// line that is not JSON.
    fn reasons(path: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
                v["reason"].as_str().unwrap_or("").to_owned()
            })
            .collect()
    }

    /// Poll `done` for at most `within` (a bound, not a measurement).
    fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        done()
    }

    #[test]
    fn a_renamed_file_is_reopened_on_request_and_when_the_watcher_sees_it() -> io::Result<()> {
        let dir = Scratch::new("rename");
        let path = dir.0.join("audit.jsonl");
        let log = AuditLog::open(&path)?;
        log.write(&marked("a"))?;
        // logrotate create, then postrotate's SIGUSR1: B still goes to the renamed file.
        std::fs::rename(&path, dir.0.join("audit.jsonl.1"))?;
        log.write(&marked("b"))?;
        log.reopen()?;
        log.write(&marked("c"))?;
        assert_eq!(reasons(&dir.0.join("audit.jsonl.1")), ["a", "b"]);
        assert_eq!(reasons(&path), ["c"]);
        // Renamed with nobody telling: the watcher reopens within a check or two.
        std::fs::rename(&path, dir.0.join("audit.jsonl.2"))?;
        log.write(&marked("d"))?;
        assert!(wait_until(Duration::from_secs(30), || log
            .stats()
            .reopens
            .load(R)
            == 2));
        log.write(&marked("e"))?;
        assert_eq!(reasons(&dir.0.join("audit.jsonl.2")), ["c", "d"]);
        assert_eq!(reasons(&path), ["e"]);
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path)?.permissions());
        assert_eq!(mode & 0o777, 0o600);
        Ok(())
    }

    #[test]
    fn records_written_to_a_removed_file_are_copied_into_the_new_one() -> io::Result<()> {
        let dir = Scratch::new("remove");
        let path = dir.0.join("audit.jsonl");
        let log = AuditLog::open(&path)?;
        log.write(&marked("before"))?;
        // Let a check see the file as it is.
        std::thread::sleep(WATCH_INTERVAL * 2);
        std::fs::remove_file(&path)?;
        log.write(&marked("gone-1"))?;
        log.write(&marked("gone-2"))?;
        assert!(wait_until(Duration::from_secs(30), || log
            .stats()
            .reopens
            .load(R)
            == 1));
        log.write(&marked("after"))?;
        let got = reasons(&path);
        assert_eq!(
            got.iter().filter(|r| r.starts_with("gone")).count(),
            2,
            "{got:?}"
        );
        assert_eq!(got.last().map(String::as_str), Some("after"), "{got:?}");
        // Copied from the last check's size on: what was in the file then is not (unless the
        // watcher was starved of the CPU for two intervals).
        assert!(
            got.iter().filter(|r| *r == "before").count() <= 1,
            "{got:?}"
        );
        Ok(())
    }

    #[test]
    fn rotation_keeps_k_files_and_loses_no_record() -> io::Result<()> {
        let dir = Scratch::new("rotate");
        let path = dir.0.join("audit.jsonl");
        let options = Options {
            rotate: Some(Rotate {
                max_bytes: 8192,
                keep: 50,
            }),
            ..Options::default()
        };
        let log = Arc::new(AuditLog::configured(
            &path,
            DEFAULT_STALL,
            &options,
            Vec::new(),
        )?);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || -> io::Result<()> {
                    for i in 0..250 {
                        log.write(&marked(&format!("{t}-{i}-{}", "x".repeat(100))))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for t in threads {
            t.join()
                .map_err(|_| io::Error::other("a writer panicked"))??;
        }
        let rotations = log.stats().rotations.load(R);
        let listing = || {
            let mut files: Vec<String> = std::fs::read_dir(&dir.0)
                .map(|d| {
                    d.flatten()
                        .map(|e| {
                            let len = e.metadata().map_or(0, |m| m.len());
                            format!("{} {len}", e.file_name().to_string_lossy())
                        })
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            files
        };
        // How many depends on how fast the writers are while a rotation runs (they go on into
        // the file being rotated): at least one, each file at least max_bytes.
        assert!(
            (1..50).contains(&rotations),
            "{rotations} rotations: {:?}",
            listing()
        );
        let mut all = reasons(&path);
        for n in 1..=50 {
            all.extend(reasons(&numbered(&path, n)));
        }
        all.sort();
        let mut want: Vec<String> = (0..4)
            .flat_map(|t| (0..250).map(move |i| format!("{t}-{i}-{}", "x".repeat(100))))
            .collect();
        want.sort();
        assert_eq!(all, want, "every record once, whole");
        for n in 1..=rotations {
            let len = std::fs::metadata(numbered(&path, n as u32))?.len();
            assert!(
                len >= 8192,
                "PATH.{n} rotated at {len} bytes: {:?}",
                listing()
            );
        }
        assert!(
            !numbered(&path, rotations as u32 + 1).exists(),
            "{:?}",
            listing()
        );

        // keep: 2 — PATH, PATH.1, PATH.2 and nothing older.
        let path = dir.0.join("kept.jsonl");
        let options = Options {
            rotate: Some(Rotate {
                max_bytes: 4096,
                keep: 2,
            }),
            ..Options::default()
        };
        let log = AuditLog::configured(&path, DEFAULT_STALL, &options, Vec::new())?;
        for i in 0..200 {
            log.write(&marked(&format!("{i}-{}", "y".repeat(100))))?;
        }
        assert!(log.stats().rotations.load(R) >= 4);
        assert!(numbered(&path, 1).exists() && numbered(&path, 2).exists());
        assert!(!numbered(&path, 3).exists());
        // The newest records are in PATH, those just before in PATH.1.
        let last = reasons(&path);
        assert!(
            last.last().is_some_and(|r| r.starts_with("199-")),
            "{last:?}"
        );
        Ok(())
    }

    /// A tmpfs of `size` mounted on a directory of its own; unmounted (lazily) and removed on
    /// drop. Mounting needs root: under CI it must work, elsewhere the test says why it did not
    /// run.
    struct Tmpfs(Scratch);

    impl Tmpfs {
        fn mount(name: &str, size: &str) -> Option<Tmpfs> {
            use std::os::unix::ffi::OsStrExt;
            let dir = Scratch::new(name);
            let target = std::ffi::CString::new(dir.0.as_os_str().as_bytes()).ok()?;
            let data = std::ffi::CString::new(format!("size={size},mode=0700")).ok()?;
            // SAFETY: NUL-terminated strings valid for the call.
            let rc = unsafe {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    target.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    data.as_ptr().cast(),
                )
            };
            if rc != 0 {
                let e = io::Error::last_os_error();
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "mounting a tmpfs needs root (CAP_SYS_ADMIN): {e}"
                );
                eprintln!("not run: mounting a tmpfs needs root (CAP_SYS_ADMIN): {e}");
                return None;
            }
            Some(Tmpfs(dir))
        }

        /// Fill it: a file that takes every page left.
        fn fill(&self) -> io::Result<PathBuf> {
            let filler = self.0 .0.join("filler");
            let mut f = File::create(&filler)?;
            for chunk in [4096, 1] {
                let buf = vec![b'.'; chunk];
                loop {
                    match f.write(&buf) {
                        Ok(n) if n == chunk => {}
                        Ok(_) => break,
                        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(filler)
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            use std::os::unix::ffi::OsStrExt;
            if let Ok(target) = std::ffi::CString::new(self.0 .0.as_os_str().as_bytes()) {
                // SAFETY: a NUL-terminated path.
                unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }

    /// A record whose line is exactly `len` bytes, its reason starting with `mark`.
    fn sized(mark: &str, len: usize) -> Record {
        let mut line = Vec::new();
        let rec = marked(mark);
        append_line(&mut line, &rec).expect("serialise");
        marked(&format!("{mark}{}", "p".repeat(len - line.len())))
    }

    #[test]
    fn a_full_disk_refuses_records_after_the_stall_and_recovers_with_an_audit_stall_record(
    ) -> io::Result<()> {
        let Some(fs) = Tmpfs::mount("enospc", "64k") else {
            return Ok(());
        };
        let path = fs.0 .0.join("audit.jsonl");
        let log = AuditLog::open_with(&path, Duration::from_millis(100))?;
        // 1000-byte lines: the file never ends on a page boundary before it fills, so the write
        // that crosses the last page is cut short.
        log.write(&sized("first-", 1000))?;
        let filler = fs.fill()?;
        let mut taken = vec!["first-".to_owned()];
        let mut refused = 0;
        for i in 0..20 {
            let mark = format!("r{i:02}-");
            match log.write(&sized(&mark, 1000)) {
                Ok(()) => taken.push(mark),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
                    assert!(
                        e.to_string().contains("short write") || e.to_string().contains("No space"),
                        "{e}"
                    );
                    refused += 1;
                }
            }
        }
        assert!(refused > 0 && taken.len() <= 5, "{taken:?}");
        let stats = log.stats();
        assert_eq!(stats.refused_for_stall.load(R), refused);
        assert_eq!(
            stats.stalls.load(R),
            1,
            "after the first, records are refused at once"
        );
        assert!(stats.write_errors.load(R) >= refused);
        assert!(log.sink_state().stalled);

        std::fs::remove_file(filler)?;
        log.write(&sized("after-", 1000))?;
        assert!(!log.sink_state().stalled);
        let text = std::fs::read_to_string(&path)?;
        let mut whole = Vec::new();
        let mut fragments = Vec::new();
        for line in text.lines() {
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(v) => whole.push(v),
                Err(_) => fragments.push(line.to_owned()),
            }
        }
        // The cut record is a fragment on a line of its own; every other line is whole.
        assert_eq!(fragments.len(), 1, "{fragments:?}");
        assert!(text.ends_with('\n'));
        let marks: Vec<String> = whole
            .iter()
            .filter(|v| v["event"] == "request")
            .map(|v| v["reason"].as_str().unwrap_or("").chars().take(4).collect())
            .collect();
        let mut want: Vec<String> = taken.iter().map(|m| m.chars().take(4).collect()).collect();
        want.push("afte".into());
        assert_eq!(marks, want);
        let stall = whole
            .iter()
            .find(|v| v["event"] == "audit_stall")
            .ok_or_else(|| io::Error::other(format!("no audit_stall record: {text}")))?;
        assert_eq!(stall["stall"]["refused"], refused, "{stall}");
        assert_eq!(stall["stall"]["forwarded_unrecorded"], 0, "{stall}");
        assert!(
            stall["reason"]
                .as_str()
                .is_some_and(|r| r.contains("refused")),
            "{stall}"
        );
        Ok(())
    }

    #[test]
    fn deferred_records_the_sink_took_before_a_refusal_are_not_written_twice() -> io::Result<()> {
        let Some(fs) = Tmpfs::mount("deferred", "64k") else {
            return Ok(());
        };
        let path = fs.0 .0.join("audit.jsonl");
        let log = Arc::new(AuditLog::open_with(&path, Duration::from_millis(50))?);
        let worker = WorkerAudit::new(log.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        runtime.block_on(async {
            worker.write(&sized("first-", 1000))?;
            let filler = fs.fill()?;
            // 3,096 bytes left on the last page: three deferred lines fit whole, the record
            // that carries them does not.
            for mark in ["defer0", "defer1", "defer2"] {
                worker.write_deferred(&sized(mark, 1000))?;
            }
            let refused = worker.write(&sized("refuse", 1000));
            assert!(refused.is_err(), "the disk is full");
            std::fs::remove_file(filler)?;
            worker.write(&sized("after-", 1000))?;
            worker.flush()
        })?;
        drop(runtime);
        let marks: Vec<String> = std::fs::read_to_string(&path)?
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "request")
            .map(|v| v["reason"].as_str().unwrap_or("").chars().take(6).collect())
            .collect();
        assert_eq!(marks, ["first-", "defer0", "defer1", "defer2", "after-"]);
        Ok(())
    }

    #[test]
    fn a_short_write_is_retried_whole_when_space_comes_back_within_the_stall() -> io::Result<()> {
        let Some(fs) = Tmpfs::mount("short", "64k") else {
            return Ok(());
        };
        let path = fs.0 .0.join("audit.jsonl");
        let log = Arc::new(AuditLog::open_with(&path, Duration::from_secs(60))?);
        log.write(&sized("first-", 1000))?;
        log.write(&sized("second", 1000))?;
        let filler = fs.fill()?;
        log.write(&sized("third-", 1000))?;
        log.write(&sized("fourth", 1000))?;
        // 4000 of the page's 4096 bytes are used: the fifth is cut at 96, then retried.
        let writer = {
            let log = log.clone();
            std::thread::spawn(move || log.write(&sized("fifth-", 1000)))
        };
        assert!(wait_until(Duration::from_secs(30), || log
            .stats()
            .write_errors
            .load(R)
            > 0));
        std::fs::remove_file(filler)?;
        writer
            .join()
            .map_err(|_| io::Error::other("the writer panicked"))??;
        log.write(&sized("sixth-", 1000))?;
        let text = std::fs::read_to_string(&path)?;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 7, "{text}");
        // Four whole, the fifth's fragment, the fifth whole, the sixth; no stall was reached.
        assert_eq!(lines[4].len(), 96, "{text}");
        assert!(serde_json::from_str::<serde_json::Value>(lines[4]).is_err());
        let marks: Vec<String> = [0, 1, 2, 3, 5, 6]
            .iter()
            .map(|&i| {
                serde_json::from_str::<serde_json::Value>(lines[i])
                    .map(|v| v["reason"].as_str().unwrap_or("").chars().take(6).collect())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            marks,
            ["first-", "second", "third-", "fourth", "fifth-", "sixth-"]
        );
        assert_eq!(log.stats().stalls.load(R), 0);
        Ok(())
    }

    /// A `tracing` writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn on_stall_allow_forwards_and_writes_the_record_to_standard_error() -> io::Result<()> {
        let Some(fs) = Tmpfs::mount("allow", "64k") else {
            return Ok(());
        };
        let path = fs.0 .0.join("audit.jsonl");
        let options = Options {
            on_stall: OnStall::Allow,
            ..Options::default()
        };
        let log = AuditLog::configured(&path, Duration::from_millis(50), &options, Vec::new())?;
        log.write(&sized("first-", 1000))?;
        let filler = fs.fill()?;
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || -> io::Result<()> {
            for i in 0..10 {
                log.write(&sized(&format!("a{i:02}-"), 1000))?;
            }
            Ok(())
        })?;
        let unrecorded = log.stats().unrecorded_forwarded.load(R);
        assert!(unrecorded > 0 && log.stats().refused_for_stall.load(R) == 0);
        let err = String::from_utf8_lossy(&captured.0.lock().unwrap_or_else(|e| e.into_inner()))
            .into_owned();
        let in_file = std::fs::read_to_string(&path)?;
        // Every record is whole in the file or on standard error.
        for i in 0..10 {
            let mark = format!("a{i:02}-p");
            let file_has = in_file
                .lines()
                .any(|l| l.contains(&mark) && serde_json::from_str::<serde_json::Value>(l).is_ok());
            assert!(
                file_has || err.contains(&mark),
                "{mark}: neither in the file nor on stderr"
            );
        }
        assert_eq!(
            err.matches("forwarded without an audit record").count() as u64,
            unrecorded
        );
        std::fs::remove_file(filler)?;
        log.write(&marked("back"))?;
        let stall: Vec<serde_json::Value> = std::fs::read_to_string(&path)?
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "audit_stall")
            .collect();
        assert_eq!(stall.len(), 1);
        assert_eq!(stall[0]["stall"]["forwarded_unrecorded"], unrecorded);
        Ok(())
    }

    #[test]
    fn arguments_are_written_only_when_asked_and_redacted() -> io::Result<()> {
        let args = serde_json::json!({
            "text": "hello",
            "Password": "hunter2",
            "nested": {"ApiToken": "t0k", "list": [{"client_secret": "s", "ok": 1}], "keep": {"api_key": "k"}},
            "AUTHORIZATION": {"anything": "x"},
            "count": 3
        });
        let log = AuditLog::configured(
            Path::new("-"),
            DEFAULT_STALL,
            &Options::default(),
            vec!["tools".into()],
        )?;
        assert_eq!(log.arguments(Some("other"), Some(&args)), None);
        assert_eq!(log.arguments(None, Some(&args)), None);
        assert_eq!(log.arguments(Some("tools"), None), None);
        let shown = log.arguments(Some("tools"), Some(&args));
        assert_eq!(
            shown,
            Some(serde_json::json!({
                "text": "hello",
                "Password": REDACTED,
                "nested": {"ApiToken": REDACTED, "list": [{"client_secret": REDACTED, "ok": 1}], "keep": {"api_key": REDACTED}},
                "AUTHORIZATION": REDACTED,
                "count": 3
            }))
        );
        // Other terms; none at all.
        let terms = vec!["TEXT".to_lowercase()];
        assert_eq!(redacted(&args, &terms)["text"], REDACTED);
        assert_eq!(redacted(&args, &terms)["Password"], "hunter2");
        assert_eq!(redacted(&args, &[]), args);

        // In a record; clipped lines leave them out.
        let head = Head::default().with_message(MessagePart {
            tool: Some("echo".into()),
            arguments: shown,
            ..MessagePart::default()
        });
        let rec = Record::new(Event::Request, Arc::new(head));
        let mut line = Vec::new();
        append_line(&mut line, &rec)?;
        let v: serde_json::Value = serde_json::from_slice(&line).map_err(io::Error::other)?;
        assert_eq!(v["arguments"]["text"], "hello");
        assert!(!String::from_utf8_lossy(&line).contains("hunter2"));
        let huge = Head::default().with_message(MessagePart {
            tool: Some("echo".into()),
            arguments: Some(serde_json::json!({"text": "z".repeat(MAX_RECORD_BYTES)})),
            ..MessagePart::default()
        });
        let mut line = Vec::new();
        append_line(&mut line, &Record::new(Event::Request, Arc::new(huge)))?;
        let v: serde_json::Value = serde_json::from_slice(&line).map_err(io::Error::other)?;
        assert_eq!(v["clipped"], true);
        assert!(v.get("arguments").is_none(), "{v}");
        Ok(())
    }

    #[test]
    fn every_record_is_observed_once_whether_or_not_it_is_written() -> io::Result<()> {
        #[derive(Default)]
        struct Count(Mutex<Vec<Event>>);
        impl Observer for Count {
            fn observe(&self, record: &Record) {
                self.0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(record.event);
            }
        }
        let dir = Scratch::new("observe");
        let log = Arc::new(AuditLog::open(&dir.0.join("audit.jsonl"))?);
        let seen = Arc::new(Count::default());
        assert!(log.set_observer(seen.clone()));
        assert!(!log.set_observer(seen.clone()), "set once");
        log.write(&Record::bare(Event::Refused))?;
        let worker = WorkerAudit::new(log.clone());
        worker.write(&Record::bare(Event::Request))?;
        worker.write_all(&[Record::bare(Event::Request), Record::bare(Event::NonMcp)])?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        runtime.block_on(async { worker.write_deferred(&Record::bare(Event::Response)) })?;
        drop(runtime);
        drop(worker);
        let events = seen.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(
            events,
            [
                Event::Refused,
                Event::Request,
                Event::Request,
                Event::NonMcp,
                Event::Response
            ]
        );
        // A refused write is observed too.
        let fifo_dir = Scratch::new("observe-fifo");
        let fifo = fifo_dir.0.join("audit.fifo");
        {
            use std::os::unix::ffi::OsStrExt;
            let c =
                std::ffi::CString::new(fifo.as_os_str().as_bytes()).map_err(io::Error::other)?;
            // SAFETY: a NUL-terminated path.
            if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let _reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)?;
        let log = AuditLog::open_with(&fifo, Duration::ZERO)?;
        let seen = Arc::new(Count::default());
        log.set_observer(seen.clone());
        let big = marked(&"q".repeat(10_000));
        let mut failed = 0;
        for _ in 0..100 {
            failed += usize::from(log.write(&big).is_err());
        }
        assert!(failed > 0);
        assert_eq!(seen.0.lock().unwrap_or_else(|e| e.into_inner()).len(), 100);
        Ok(())
    }

    #[test]
    fn the_latency_histogram_counts_every_write() -> io::Result<()> {
        for (s, ns) in WRITE_LATENCY_BOUNDS.iter().zip(WRITE_LATENCY_BOUNDS_NS) {
            assert_eq!((s * 1e9).round() as u64, ns);
        }
        let dir = Scratch::new("latency");
        let path = dir.0.join("audit.jsonl");
        let log = AuditLog::open(&path)?;
        for _ in 0..10 {
            log.write(&Record::bare(Event::Request))?;
        }
        let stats = log.stats();
        assert_eq!(stats.bytes_written.load(R), std::fs::metadata(&path)?.len());
        let buckets: u64 = stats.write_latency_buckets.iter().map(|b| b.load(R)).sum();
        assert_eq!(buckets, 10);
        assert_eq!(stats.write_latency_count.load(R), 10);
        assert!(stats.write_latency_sum_ns.load(R) > 0);
        assert_eq!(stats.records_written.load(R), 10);
        let state = log.sink_state();
        assert_eq!(state.kind, SinkKind::File);
        assert_eq!(state.on_stall, OnStall::Deny);
        assert!(!state.stalled);
        let slowest = stats.write_latency_buckets[WRITE_LATENCY_BOUNDS.len()].load(R);
        stats.latency(Duration::from_secs(5));
        assert_eq!(
            stats.write_latency_buckets[WRITE_LATENCY_BOUNDS.len()].load(R),
            slowest + 1
        );
        let fastest = stats.write_latency_buckets[0].load(R);
        stats.latency(Duration::from_micros(10));
        assert_eq!(
            stats.write_latency_buckets[0].load(R),
            fastest + 1,
            "le 10µs includes 10µs"
        );
        let next = stats.write_latency_buckets[1].load(R);
        stats.latency(Duration::from_nanos(10_001));
        assert_eq!(stats.write_latency_buckets[1].load(R), next + 1);
        Ok(())
    }
}
