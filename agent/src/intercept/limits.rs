//! What one client can make the agent hold: connections (in total and per caller), time to
//! send a request head, idle time, and request bytes buffered per connection. The numbers are
//! `limits:` of the config (README, "Limits").
//!
//! The header and idle timeouts are written here rather than taken from hyper: hyper's
//! `header_read_timeout` starts whenever it waits for a head, so it also cuts an idle
//! keep-alive connection, and MCP clients keep idle connections for minutes. Here the head
//! deadline starts at the first byte of a head and ends when the request reaches the service;
//! a connection waiting between requests is only subject to the (separate, longer) idle
//! timeout, and one with a request in flight (an SSE stream) to neither.

use std::{
    collections::HashMap,
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Connections being served: in total, and per caller (cgroup id).
#[derive(Default)]
pub struct Connections {
    total: AtomicUsize,
    per_caller: Mutex<HashMap<u64, usize>>,
}

/// Which connection limit a connection would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Over {
    Total(usize),
    Caller(usize),
}

impl Over {
    pub fn reason(self) -> String {
        match self {
            Over::Total(max) => format!(
                "the agent already serves {max} connections (limits.max_connections): refused"
            ),
            Over::Caller(max) => format!(
                "this caller already has {max} connections open (limits.max_connections_per_caller): refused"
            ),
        }
    }
}

impl Connections {
    /// A slot for one more connection of `caller`, or which limit it would exceed.
    pub(super) fn admit(
        self: &Arc<Self>,
        caller: u64,
        max_total: usize,
        max_per_caller: usize,
    ) -> Result<ConnSlot, Over> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Over::Total(max_total));
        }
        let mut per = self.per_caller.lock().unwrap_or_else(|e| e.into_inner());
        let n = per.entry(caller).or_insert(0);
        if *n >= max_per_caller {
            drop(per);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Over::Caller(max_per_caller));
        }
        *n += 1;
        Ok(ConnSlot {
            connections: self.clone(),
            caller,
        })
    }

    /// Connections being served now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// One admitted connection; dropping it frees its slot.
pub(super) struct ConnSlot {
    connections: Arc<Connections>,
    caller: u64,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut per = self
            .connections
            .per_caller
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.caller);
            }
        }
        drop(per);
        self.connections.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why [`Timed`] closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cut {
    HeaderTimeout,
    IdleTimeout,
}

/// What the service tells the connection's reader: requests started, requests whose response
/// has not been sent (or dropped) yet, and when the last one ended.
pub(super) struct Activity {
    started: AtomicU64,
    in_flight: AtomicUsize,
    /// When the last request in flight ended, in nanoseconds after `base`.
    ended_at: AtomicU64,
    base: tokio::time::Instant,
    /// 0: not cut; 1: header timeout; 2: idle timeout.
    cut: AtomicU8,
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            ended_at: AtomicU64::new(0),
            base: tokio::time::Instant::now(),
            cut: AtomicU8::new(0),
        }
    }

    /// A request reached the service; the guard marks it done when dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Why the connection was cut, if it was.
    pub fn cut(&self) -> Option<Cut> {
        match self.cut.load(Ordering::Acquire) {
            1 => Some(Cut::HeaderTimeout),
            2 => Some(Cut::IdleTimeout),
            _ => None,
        }
    }

    /// When the last request in flight ended (the connection's start if none has).
    fn ended(&self) -> tokio::time::Instant {
        self.base + Duration::from_nanos(self.ended_at.load(Ordering::Acquire))
    }
}

/// A request in flight; dropped with its response body. Ending the last one only notes the
/// time: the reader's idle clock reads it when it next fires, so no task is woken per request.
pub(super) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let since = tokio::time::Instant::now().saturating_duration_since(activity.base);
        activity.ended_at.store(
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Release,
        );
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it has been sent or dropped.
pub(super) struct Tracked<B> {
    pub inner: B,
    pub _in_flight: InFlight,
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client connection's reader with the head and idle deadlines. Each deadline is one timer,
/// reset rather than made anew for every request.
pub(super) struct Timed<IO> {
    inner: IO,
    activity: Arc<Activity>,
    /// `None`: no head deadline (HTTP/2, where frames are not heads).
    header: Option<Duration>,
    idle: Option<Duration>,
    /// The head being timed: the request count when its first byte came.
    head: Option<u64>,
    head_sleep: Option<Pin<Box<Sleep>>>,
    idle_sleep: Option<Pin<Box<Sleep>>>,
    /// Bytes came since the idle clock was last set.
    heard: bool,
}

impl<IO> Timed<IO> {
    pub fn new(
        inner: IO,
        activity: Arc<Activity>,
        header: Option<Duration>,
        idle: Option<Duration>,
    ) -> Timed<IO> {
        Timed {
            inner,
            activity,
            header,
            idle,
            head: None,
            head_sleep: None,
            idle_sleep: None,
            heard: true,
        }
    }

    fn cut(&self, why: Cut) -> io::Error {
        self.activity.cut.store(
            match why {
                Cut::HeaderTimeout => 1,
                Cut::IdleTimeout => 2,
            },
            Ordering::Release,
        );
        let what = match why {
            Cut::HeaderTimeout => "the request head did not arrive in time",
            Cut::IdleTimeout => "the connection was idle too long",
        };
        io::Error::new(io::ErrorKind::TimedOut, what)
    }

    /// Start timing a head now.
    fn arm_head(&mut self, started: u64, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        match self.head_sleep.as_mut() {
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => self.head_sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        self.head = Some(started);
    }

    /// The idle clock, between requests: `Err` when it has run out.
    fn poll_idle(&mut self, cx: &mut Context<'_>, limit: Duration) -> Result<(), io::Error> {
        // The clock is read only when the timer is set or fires, not on every read.
        let heard = std::mem::take(&mut self.heard);
        let sleep = match self.idle_sleep.as_mut() {
            Some(sleep) => {
                if heard {
                    sleep.as_mut().reset(tokio::time::Instant::now() + limit);
                }
                sleep
            }
            None => self.idle_sleep.insert(Box::pin(tokio::time::sleep(limit))),
        };
        while sleep.as_mut().poll(cx).is_ready() {
            let now = tokio::time::Instant::now();
            // A request in flight (an SSE stream) is never idle; after the last one ended, the
            // connection has been idle since it ended.
            let busy = self.activity.in_flight.load(Ordering::Acquire) > 0;
            let quiet_until = self.activity.ended() + limit;
            if !busy && quiet_until <= now {
                return Err(self.cut(Cut::IdleTimeout));
            }
            sleep
                .as_mut()
                .reset(if busy { now + limit } else { quiet_until });
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Timed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let started = this.activity.started.load(Ordering::Acquire);
        // The head being timed reached the service: its deadline is over.
        if this.head.is_some_and(|at| at != started) {
            this.head = None;
        }
        // Late is late, whether or not more of the head has come.
        if this.head.is_some() {
            if let Some(deadline) = this.head_sleep.as_mut() {
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(this.cut(Cut::HeaderTimeout)));
                }
            }
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.heard = true;
                    // The first byte of a head: between requests, none being timed.
                    let between = this.activity.in_flight.load(Ordering::Acquire) == 0;
                    if let (Some(limit), true, None) = (this.header, between, this.head) {
                        this.arm_head(started, limit);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // A head being timed: its deadline (polled above) wakes this task.
                if this.head.is_some() {
                    return Poll::Pending;
                }
                if let Some(limit) = this.idle {
                    if let Err(e) = this.poll_idle(cx, limit) {
                        return Poll::Ready(Err(e));
                    }
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Timed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Refusals that a flood would repeat, audited at most once per [`REPEAT_WINDOW`] per (kind,
/// caller): the record written carries how many were left unwritten since the last one.
#[derive(Default)]
pub struct Repeats {
    seen: Mutex<HashMap<(&'static str, u64), (Instant, u64)>>,
}

/// How often one kind of repeated refusal of one caller is written.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(1);

/// Callers tracked at most; beyond it the oldest are forgotten (a record is then written).
const REPEAT_CALLERS: usize = 4096;

impl Repeats {
    /// Whether to write this refusal now, and with it how many like it went unwritten.
    pub fn admit(&self, kind: &'static str, caller: u64, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= REPEAT_CALLERS {
            seen.retain(|_, (at, _)| now.duration_since(*at) < REPEAT_WINDOW);
        }
        match seen.get_mut(&(kind, caller)) {
            Some((at, skipped)) if now.duration_since(*at) < REPEAT_WINDOW => {
                *skipped += 1;
                None
            }
            Some((at, skipped)) => {
                let n = *skipped;
                *at = now;
                *skipped = 0;
                Some(n)
            }
            None => {
                seen.insert((kind, caller), (now, 0));
                Some(0)
            }
        }
    }
}

/// Request body bytes one connection holds; dropping the charge returns them.
pub(super) struct Charge<'a> {
    held: &'a AtomicUsize,
    n: usize,
}

impl<'a> Charge<'a> {
    pub fn new(held: &'a AtomicUsize) -> Charge<'a> {
        Charge { held, n: 0 }
    }

    /// Take `n` more bytes; `false` (nothing taken) when the connection would then hold more
    /// than `max`.
    pub fn take(&mut self, n: usize, max: usize) -> bool {
        let before = self.held.fetch_add(n, Ordering::AcqRel);
        if before + n > max {
            self.held.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        self.n += n;
        true
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        self.held.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// Why [`collect`] stopped.
pub(super) enum Collect<E> {
    /// The body itself failed.
    Read(E),
    /// It is longer than its own bound.
    TooLarge,
    /// Its bytes would overflow the budget they are charged to.
    OverBudget,
}

/// A body read whole: at most `max` bytes, each frame charged to `charge` (bounded by
/// `budget`). A body that comes in one frame (most do) is kept as it came, without a copy.
pub(super) async fn collect<B>(
    mut body: B,
    max: usize,
    charge: &mut Charge<'_>,
    budget: usize,
) -> Result<Bytes, Collect<B::Error>>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    use http_body_util::BodyExt;
    let mut first: Option<Bytes> = None;
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(Collect::Read)?.into_data() else {
            continue;
        };
        let held = first.as_ref().map_or(0, Bytes::len) + buf.len();
        if held + data.len() > max {
            return Err(Collect::TooLarge);
        }
        if !charge.take(data.len(), budget) {
            return Err(Collect::OverBudget);
        }
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            earlier => {
                if let Some(earlier) = earlier {
                    buf.extend_from_slice(&earlier);
                }
                buf.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| Bytes::from(buf)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_count_in_total_and_per_caller() {
        let c = Arc::new(Connections::default());
        let a1 = c.admit(1, 3, 2).expect("first of caller 1");
        let a2 = c.admit(1, 3, 2).expect("second of caller 1");
        assert_eq!(c.admit(1, 3, 2).err(), Some(Over::Caller(2)));
        let b1 = c.admit(2, 3, 2).expect("first of caller 2");
        assert_eq!(c.admit(3, 3, 2).err(), Some(Over::Total(3)));
        assert_eq!(c.open(), 3);
        drop(a1);
        let a3 = c.admit(1, 3, 2).expect("a slot came free");
        drop((a2, a3, b1));
        assert_eq!(c.open(), 0);
        assert!(c.per_caller.lock().map(|m| m.is_empty()).unwrap_or(false));
    }

    #[test]
    fn repeated_refusals_are_written_once_per_window_with_a_count() {
        let r = Repeats::default();
        let t0 = Instant::now();
        assert_eq!(r.admit("k", 1, t0), Some(0));
        assert_eq!(r.admit("k", 1, t0 + Duration::from_millis(10)), None);
        assert_eq!(r.admit("k", 1, t0 + Duration::from_millis(20)), None);
        assert_eq!(r.admit("k", 2, t0), Some(0), "another caller");
        assert_eq!(r.admit("other", 1, t0), Some(0), "another kind");
        assert_eq!(r.admit("k", 1, t0 + REPEAT_WINDOW), Some(2));
    }

    #[test]
    fn a_charge_is_bounded_and_returned() {
        let held = AtomicUsize::new(0);
        {
            let mut a = Charge::new(&held);
            assert!(a.take(60, 100));
            let mut b = Charge::new(&held);
            assert!(!b.take(50, 100), "110 > 100");
            assert!(b.take(40, 100));
            assert_eq!(held.load(Ordering::Acquire), 100);
        }
        assert_eq!(held.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_head_deadline_runs_from_its_first_byte_and_idle_is_another_clock() {
        use tokio::io::AsyncReadExt;
        let (client, server) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::new());
        let mut timed = Timed::new(
            server,
            activity.clone(),
            Some(Duration::from_secs(30)),
            Some(Duration::from_secs(600)),
        );
        let mut client = client;
        let mut buf = [0u8; 16];
        // Idle for longer than the head deadline: not cut.
        let read = tokio::time::timeout(Duration::from_secs(100), timed.read(&mut buf)).await;
        assert!(read.is_err(), "still waiting, not cut");
        // A head starts; a byte every 10 s does not extend its 30 s.
        tokio::io::AsyncWriteExt::write_all(&mut client, b"P")
            .await
            .expect("write");
        assert_eq!(timed.read(&mut buf).await.expect("read"), 1);
        let mut cut = None;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let _ = tokio::io::AsyncWriteExt::write_all(&mut client, b"O").await;
            if let Err(e) = timed.read(&mut buf).await {
                cut = Some(e);
                break;
            }
        }
        assert_eq!(cut.map(|e| e.kind()), Some(io::ErrorKind::TimedOut));
        assert_eq!(activity.cut(), Some(Cut::HeaderTimeout));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_idle_and_a_finished_head_is_not_timed() {
        use tokio::io::AsyncReadExt;
        let (mut client, server) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::new());
        let mut timed = Timed::new(
            server,
            activity.clone(),
            Some(Duration::from_secs(30)),
            Some(Duration::from_secs(60)),
        );
        let mut buf = [0u8; 16];
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET")
            .await
            .expect("write");
        assert_eq!(timed.read(&mut buf).await.expect("read"), 3);
        // The head reached the service: a streaming response is in flight for 10 minutes.
        let in_flight = activity.request();
        let read = tokio::time::timeout(Duration::from_secs(600), timed.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "neither deadline cut a connection with a request in flight"
        );
        // The stream ends; the connection is idle and is cut after the idle timeout only.
        drop(in_flight);
        let started = tokio::time::Instant::now();
        let err = timed.read(&mut buf).await.expect_err("cut when idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(activity.cut(), Some(Cut::IdleTimeout));
        assert!(started.elapsed() >= Duration::from_secs(60));
    }
}
