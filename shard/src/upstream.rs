//! One task per upstream host: connect, subscribe from the host's cursor,
//! validate every frame (stateless checks, identity, host authority,
//! signature), and write what passes into the shard's ring. A full ring
//! makes the task wait, so TCP backpressure reaches the host.
//!
//! Behaviours:
//! - Connect, TLS and the upgrade share one deadline
//!   (`upstream_connect_timeout_s`); the upgrade answer is bounded in bytes.
//! - A quiet host is kept: after `upstream_ping_interval_s` of silence the
//!   task pings it, and only `upstream_idle_timeout_s` with neither a frame
//!   nor a pong ends the connection (the reference PDS never pings).
//! - No host can hold the executor or cost unbounded work: the WebSocket
//!   reader (`wsin`) yields every 64 KiB read or 256 frames, bounds the
//!   bytes and fragments without a complete data message (fragment and
//!   control-frame floods), and gives a large message's buffer back after
//!   it; a host may ping at most 20 times in 10 s.
//! - A frame that does not decode, an error frame or a WebSocket protocol
//!   error closes the connection. Every end is counted by reason
//!   ([`UpstreamClose`]); the task reconnects from the last upstream seq it
//!   handled, after a jittered backoff that grows to an hour while the
//!   host keeps failing; four failures in a row make it `offline`, which
//!   the task tells the db-writer once (a `HostState` ring record), and
//!   the first success makes it reachable again ([`crate::health`]).
//! - An event whose seq is not above the last one handled is dropped.
//! - An event that fails a check is dropped and counted; a `Cursor` record
//!   still tells the db-writer the host's cursor may move past it.
//! - Identities come from the shard's cache; a frame that needs the
//!   identity service waits in the host's read-ahead window
//!   ([`crate::window`]) while the host's other frames are read and
//!   validated behind it. A failed host-authority or signature check asks
//!   once for a document at least as recent as the event (migrations, key
//!   rotations) before dropping; an unresolvable DID's events are dropped
//!   (`identity_unresolved`), never the host's others.

use crate::health::{Change, Health, HEALTHY_AFTER};
use crate::window::{Delivery, HostCtx, Step, Window};
use crate::wsin::{In, WsError, WsIn};
use crate::{io, Shared};
use sluice_common::atproto::identity::PdsHost;
use sluice_common::ipc::ringrec::RingRecord;
use sluice_common::ipc::shm::{DropReason, Hist, UpstreamClose};
pub use sluice_common::process::host::HostAssignment;
use sluice_common::process::rate::TokenBucket;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub use crate::wsin::MESSAGE_BYTES_MAX;

/// A host task's cancellation: set once, and wakes the task at once, so
/// host tasks never poll a flag on a timer (with thousands of hosts, down
/// ones included, timers per host add up).
#[derive(Default)]
pub struct Cancel {
    set: Cell<bool>,
    /// Tasks waiting in [`Cancel::wait`] (one host task: one waker).
    wakers: std::cell::RefCell<Vec<std::task::Waker>>,
}

impl Cancel {
    pub fn fire(&self) {
        self.set.set(true);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }

    pub fn is_set(&self) -> bool {
        self.set.get()
    }

    /// Resolves once [`Cancel::fire`] was called.
    pub fn wait(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.set.get() {
                return std::task::Poll::Ready(());
            }
            let mut ws = self.wakers.borrow_mut();
            if !ws.iter().any(|w| w.will_wake(cx.waker())) {
                ws.push(cx.waker().clone());
            }
            std::task::Poll::Pending
        })
    }
}

/// Handle the shard keeps per running host task.
pub struct HostHandle {
    pub cancel: Rc<Cancel>,
}

fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// A dropped event's detail, for the one debug line [`apply`] writes of
/// it; the counted reason is the [`DropReason`]. Built with [`why!`]: empty,
/// and no allocation, unless that line is on (a host that replays old
/// seqs after a reconnect has thousands of them dropped).
pub type Why = std::borrow::Cow<'static, str>;

/// A [`Why`]: `format!` of its arguments when [`apply`]'s debug line is
/// enabled, empty otherwise.
macro_rules! why {
    ($($arg:tt)*) => {
        if tracing::enabled!(target: "sluice_shard::upstream", tracing::Level::DEBUG) {
            $crate::upstream::Why::Owned(format!($($arg)*))
        } else {
            $crate::upstream::Why::Borrowed("")
        }
    };
}
pub(crate) use why;

/// Why an event was not relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// Drop the event, keep the connection.
    Drop(DropReason, Why),
    /// Close the connection (the stream itself is broken, or the event
    /// cannot be judged now).
    Close(UpstreamClose, String),
}

/// How a connection ended: the counted reason and what to log.
#[derive(Debug)]
pub struct Ended {
    pub reason: UpstreamClose,
    pub detail: String,
}

fn ended(reason: UpstreamClose, detail: impl std::fmt::Display) -> Ended {
    Ended { reason, detail: detail.to_string() }
}

/// Run one host until `cancel` fires (unassigned, or the relay stops: the
/// shard's main loop fires every host's on `stop_reading`). Each end of a
/// connection is counted by reason; the waits between dials and the
/// host's offline state follow [`crate::health`]. Logged: a WARN when the
/// host goes offline (with the last reason), an INFO when it is back or an
/// established connection ends; retries only at debug.
pub async fn run_host(sh: Rc<Shared>, host: HostAssignment, cancel: Rc<Cancel>) {
    let mut last_seq = host.cursor;
    let seed = (host.id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ now_micros() as u64;
    let mut health = Health::new(host.offline, seed);
    let stopping = || cancel.is_set() || sh.control.stop_reading().load(Ordering::Acquire) != 0;
    let mut scratch = Vec::new();
    let stats = Rc::new(crate::consumers::HostStats::new(&host.hostname));
    sh.hosts.borrow_mut().insert(host.id, stats.clone());
    // A restarted task of the same host may have listed its own already.
    let _listed = scopeguard(|| {
        let mut hosts = sh.hosts.borrow_mut();
        if hosts.get(&host.id).is_some_and(|s| Rc::ptr_eq(s, &stats)) {
            hosts.remove(&host.id);
        }
    });
    while !stopping() {
        let before = last_seq;
        let mut upgraded = None;
        let task = Task { host: &host, stats: &stats, stopping: &stopping, cancel: &cancel };
        let end = connect_and_read(&sh, task, &mut last_seq, &mut upgraded).await;
        sh.slot().upstream_closes[end.reason as usize].fetch_add(1, Ordering::Relaxed);
        let (reason, detail) = (end.reason.name(), end.detail.as_str());
        let succeeded = upgraded.is_some_and(|t: Instant| {
            last_seq > before || t.elapsed() >= HEALTHY_AFTER || end.reason == UpstreamClose::Local
        });
        if end.reason == UpstreamClose::Local {
            tracing::debug!(host = host.hostname, seq = last_seq, reason, detail, "upstream connection closed");
            break;
        }
        let (change, wait) = health.record(succeeded);
        match change {
            Change::WentOffline => tracing::warn!(
                host = host.hostname,
                seq = last_seq,
                reason,
                detail,
                failures = health.failures(),
                "host offline: cannot connect or keep a connection; retrying with backoff up to an hour"
            ),
            Change::BackOnline => tracing::info!(host = host.hostname, seq = last_seq, "host reachable again"),
            Change::None if succeeded => {
                tracing::info!(host = host.hostname, seq = last_seq, reason, detail, "upstream connection ended")
            }
            Change::None => tracing::debug!(
                host = host.hostname,
                seq = last_seq,
                reason,
                detail,
                failures = health.failures(),
                "upstream connection failed again"
            ),
        }
        if change != Change::None {
            RingRecord::HostState { host_id: host.id, offline: health.offline() }.encode(&mut scratch);
            push(&sh, &scratch).await;
        }
        if stopping() {
            break;
        }
        // Cancellation ends the wait at once.
        futures::future::select(Box::pin(glommio::timer::sleep(wait)), Box::pin(cancel.wait())).await;
    }
}

/// Pings a host may send per [`PING_WINDOW`].
pub const PINGS_PER_WINDOW_MAX: u32 = 20;
pub const PING_WINDOW: Duration = Duration::from_secs(10);

/// What a host task's connection needs of its task.
struct Task<'a, F: Fn() -> bool> {
    host: &'a HostAssignment,
    stats: &'a crate::consumers::HostStats,
    /// The task should end (unassigned, or the relay stopping).
    stopping: &'a F,
    cancel: &'a Cancel,
}

impl<F: Fn() -> bool> Clone for Task<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: Fn() -> bool> Copy for Task<'_, F> {}

async fn connect_and_read<F: Fn() -> bool>(
    sh: &Rc<Shared>,
    task: Task<'_, F>,
    last_seq: &mut i64,
    upgraded: &mut Option<Instant>,
) -> Ended {
    let host = task.host;
    let deadline = Duration::from_secs(sh.settings().upstream.connect_timeout_s as u64);
    let handshake = Box::pin(handshake(sh, host, *last_seq));
    let ws = match futures::future::select(handshake, Box::pin(glommio::timer::sleep(deadline))).await {
        futures::future::Either::Left((Ok(ws), _)) => ws,
        futures::future::Either::Left((Err(e), _)) => return e,
        futures::future::Either::Right(_) => {
            return ended(UpstreamClose::HandshakeTimeout, format!("no upgrade within {deadline:?}"))
        }
    };
    *upgraded = Some(Instant::now());
    match ws {
        Upgraded::Plain(ws) => read_loop(sh, task, *ws, last_seq).await,
        Upgraded::Tls(ws) => read_loop(sh, task, *ws, last_seq).await,
    }
}

type Tls = futures_rustls::client::TlsStream<glommio::net::TcpStream>;

enum Upgraded {
    Plain(Box<WsIn<glommio::net::TcpStream>>),
    Tls(Box<WsIn<Tls>>),
}

/// TCP connect (resolved addresses only), TLS, the WebSocket upgrade.
async fn handshake(sh: &Rc<Shared>, host: &HostAssignment, cursor: i64) -> Result<Upgraded, Ended> {
    let connect = |e: &dyn std::fmt::Display| ended(UpstreamClose::Connect, e);
    let pds = PdsHost::parse_authority(&host.hostname, host.insecure)
        .ok_or_else(|| connect(&format!("{:?} is not a hostname", host.hostname)))?;
    if host.insecure && !sh.allow_insecure {
        return Err(connect(&"plain-text (ws://) host and allow_insecure_hosts is off"));
    }
    let default_port = if host.insecure { 80 } else { 443 };
    let port = pds.name.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(default_port);
    let mut tcp = None;
    let mut last_err = String::from("no address");
    for addr in sh.resolver.host(pds.hostname(), port).await.map_err(|e| connect(&e))? {
        // Checked again at every connect: a name may resolve elsewhere now
        // than at requestCrawl (DNS rebinding).
        if let (false, Some(why)) = (sh.allow_insecure, sluice_common::process::netguard::address_refused(addr.ip())) {
            last_err = format!("{} resolves to {}, which is refused: {why}", pds.hostname(), addr.ip());
            continue;
        }
        match glommio::net::TcpStream::connect(addr).await {
            Ok(t) => {
                tcp = Some(t);
                break;
            }
            Err(e) => last_err = io(e).to_string(),
        }
    }
    let tcp = tcp.ok_or_else(|| connect(&last_err))?;
    tcp.set_nodelay(true).map_err(|e| connect(&io(e)))?;
    // Reads have no timeout: a quiet host is kept by pings (read_loop).
    // Writes (pings, pongs) to a peer that does not read do not hang.
    tcp.set_write_timeout(Some(Duration::from_secs(sh.settings().upstream.connect_timeout_s as u64)))
        .map_err(|e| connect(&io(e)))?;
    // Always with a cursor: a host's backlog since our durable cursor (its
    // whole backlog for a new host) is what a lossless relay must read.
    let path = format!("/xrpc/com.atproto.sync.subscribeRepos?cursor={cursor}");
    if host.insecure {
        let ws = WsIn::connect(tcp, &host.hostname, &path).await.map_err(|e| ws_error(e, true))?;
        Ok(Upgraded::Plain(Box::new(ws)))
    } else {
        let name = futures_rustls::rustls::pki_types::ServerName::try_from(pds.hostname().to_owned())
            .map_err(|e| connect(&e))?;
        let tls = futures_rustls::TlsConnector::from(sh.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| connect(&format!("TLS: {e}")))?;
        let ws = WsIn::connect(tls, &host.hostname, &path).await.map_err(|e| ws_error(e, true))?;
        Ok(Upgraded::Tls(Box::new(ws)))
    }
}

/// What woke the read loop.
enum Wake<'a> {
    Message(Result<In<'a>, WsError>),
    /// The window's head has its identity.
    Answered,
    Stop,
    Tick,
}

/// Keep-alive: silence for `upstream_ping_interval_s` sends a ping;
/// silence (no frame, no pong) for `upstream_idle_timeout_s` ends it.
struct KeepAlive {
    ping_every: Duration,
    idle_max: Duration,
    last_heard: Instant,
    pings_window: Instant,
    pings: u32,
}

impl KeepAlive {
    fn new(sh: &Shared) -> KeepAlive {
        let now = Instant::now();
        KeepAlive {
            ping_every: Duration::from_secs(sh.settings().upstream.ping_interval_s as u64),
            idle_max: Duration::from_secs(sh.settings().upstream.idle_timeout_s as u64),
            last_heard: now,
            pings_window: now,
            pings: 0,
        }
    }

    /// On a timer tick: `Err` if the host went silent too long, else
    /// whether to ping, and when to look again.
    fn tick(&self) -> Result<(bool, Duration), Ended> {
        let silent = self.last_heard.elapsed();
        if silent >= self.idle_max {
            return Err(ended(UpstreamClose::Idle, format!("no frame or pong for {silent:?}")));
        }
        let ping = silent >= self.ping_every;
        let next = if ping { self.ping_every } else { self.ping_every - silent };
        Ok((ping, next.min(self.idle_max - silent)))
    }

    /// A ping from the host: `Err` past the rate.
    fn host_pinged(&mut self) -> Result<(), Ended> {
        if self.pings_window.elapsed() >= PING_WINDOW {
            self.pings_window = Instant::now();
            self.pings = 0;
        }
        self.pings += 1;
        if self.pings > PINGS_PER_WINDOW_MAX {
            return Err(ended(
                UpstreamClose::PingFlood,
                format!("more than {PINGS_PER_WINDOW_MAX} pings in {PING_WINDOW:?}"),
            ));
        }
        Ok(())
    }
}

/// The counted reason for a WebSocket error (`upgrading`: before the
/// host answered the upgrade).
fn ws_error(e: WsError, upgrading: bool) -> Ended {
    let reason = match &e {
        WsError::Oversized(_) => UpstreamClose::Oversized,
        WsError::BadFrame(_) => UpstreamClose::BadFrame,
        _ if upgrading => UpstreamClose::Connect,
        WsError::Upgrade(_) => UpstreamClose::Connect,
        WsError::Io(_) | WsError::Ended => UpstreamClose::Remote,
    };
    ended(reason, e)
}

async fn read_loop<S: futures::AsyncRead + futures::AsyncWrite + Unpin, F: Fn() -> bool>(
    sh: &Rc<Shared>,
    task: Task<'_, F>,
    mut ws: WsIn<S>,
    last_seq: &mut i64,
) -> Ended {
    let Task { host, stats, stopping, cancel } = task;
    let _connected = connected(sh, stats);
    tracing::debug!(host = host.hostname, cursor = *last_seq, "subscribed upstream");
    let ctx = HostCtx { host, pds: sh.resolver.pds_hash(&host.hostname) };
    let rate = sh.events_per_second(host.id);
    let mut r = Reading {
        window: Window::new(sh),
        last_read: *last_seq,
        buf: Vec::new(),
        bucket: TokenBucket::new(rate, rate, Instant::now()),
    };
    let mut keep = KeepAlive::new(sh);
    // Wakes the loop when the host is unassigned or the relay stops, even
    // if the host sends nothing.
    let mut watch = Box::pin(cancel.wait());
    let mut tick = Box::pin(glommio::timer::sleep(keep.ping_every));
    while !stopping() {
        if let Err(e) = deliver(sh, &ctx, stats, &mut r.window, last_seq, &mut r.buf).await {
            return e;
        }
        let done = match next_wake(&r.window, &mut ws, &mut watch, &mut tick).await {
            Wake::Stop => break,
            Wake::Answered => Ok(()),
            Wake::Tick => match on_tick(&mut ws, &keep).await {
                Ok(next) => {
                    tick = Box::pin(glommio::timer::sleep(next));
                    Ok(())
                }
                Err(e) => Err(e),
            },
            Wake::Message(m) => match message(m, &mut keep) {
                Ok(Msg::Frame(data)) => on_frame(sh, &ctx, stats, &mut r, last_seq, data).await,
                Ok(Msg::Ping(p)) => ws.pong(&p).await.map_err(|e| ws_error(e, false)),
                Ok(Msg::Nothing) => Ok(()),
                Err(e) => Err(e),
            },
        };
        if let Err(e) = done {
            return e;
        }
    }
    ws.close().await;
    ended(UpstreamClose::Local, "unassigned or stopping")
}

/// What the read loop keeps of its host between frames.
struct Reading<'a> {
    window: Window<'a>,
    /// The last seq read (frames are read ahead of what is delivered).
    last_read: i64,
    /// The scratch buffer records are encoded into.
    buf: Vec<u8>,
    /// The host's event rate ([`Shared::events_per_second`]).
    bucket: TokenBucket,
}

/// What wakes the read loop next: a message (read only while the window
/// has room: a full one leaves the rest to TCP backpressure), the
/// window's head answered, a stop, or the keep-alive's tick.
/// `WsIn::next` is cancel-safe, so whichever comes first may drop it.
async fn next_wake<'w, S, W, T>(window: &Window<'_>, ws: &'w mut WsIn<S>, watch: &mut W, tick: &mut T) -> Wake<'w>
where
    S: futures::AsyncRead + futures::AsyncWrite + Unpin,
    W: std::future::Future<Output = ()> + Unpin,
    T: std::future::Future + Unpin,
{
    use futures::future::{select, Either};
    let head = window.head_slot();
    let answered = async {
        match &head {
            Some(s) => s.wait().await,
            None => std::future::pending().await,
        }
    };
    let room = window.has_room();
    let read = async move {
        if room {
            ws.next().await
        } else {
            std::future::pending().await
        }
    };
    // Pinned on the stack: no allocation per message.
    let (read, answered) = (std::pin::pin!(read), std::pin::pin!(answered));
    match select(read, select(answered, select(watch, tick))).await {
        Either::Left((m, _)) => Wake::Message(m),
        Either::Right((Either::Left(_), _)) => Wake::Answered,
        Either::Right((Either::Right((Either::Left(_), _)), _)) => Wake::Stop,
        Either::Right(_) => Wake::Tick,
    }
}

/// What a message from the host comes to.
enum Msg<'a> {
    /// A binary message: a frame to check.
    Frame(&'a [u8]),
    /// A ping within the host's rate, to answer.
    Ping(crate::wsin::Control),
    /// A pong or a text message: nothing to do.
    Nothing,
}

/// A message heard from the host (the keep-alive hears it); `Err` when
/// it ends the connection (an error, a close frame, a ping flood).
fn message<'a>(m: Result<In<'a>, WsError>, keep: &mut KeepAlive) -> Result<Msg<'a>, Ended> {
    let m = m.map_err(|e| ws_error(e, false))?;
    keep.last_heard = Instant::now();
    Ok(match m {
        In::Binary(b) => Msg::Frame(b),
        In::Close(code) => return Err(ended(UpstreamClose::Remote, format!("close frame ({code:?})"))),
        In::Ping(p) => {
            keep.host_pinged()?;
            Msg::Ping(p)
        }
        In::Pong | In::Text => Msg::Nothing,
    })
}

/// The keep-alive's tick: a ping after `upstream_ping_interval_s` of
/// silence, the end after `upstream_idle_timeout_s`; the next tick's wait.
async fn on_tick<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    ws: &mut WsIn<S>,
    keep: &KeepAlive,
) -> Result<Duration, Ended> {
    let (ping, next) = keep.tick()?;
    if ping {
        ws.ping().await.map_err(|e| ws_error(e, false))?;
    }
    Ok(next)
}

/// A frame read: paced to the host's rate, checked, and when the window
/// was empty written to the ring or dropped at once (a push's record is
/// still in `r.buf`, no copy); otherwise it waits in the window.
async fn on_frame(
    sh: &Shared,
    ctx: &HostCtx<'_>,
    stats: &crate::consumers::HostStats,
    r: &mut Reading<'_>,
    last_seq: &mut i64,
    data: &[u8],
) -> Result<(), Ended> {
    throttle(sh, ctx.host.id, &mut r.bucket).await;
    let started = Instant::now();
    let step = r.window.on_frame(ctx, data, &mut r.last_read, now_micros(), &mut r.buf);
    sh.control.histogram(Hist::Validation).observe(started.elapsed().as_micros() as u64);
    let delivery = match step {
        None => return Ok(()),
        Some(Step::Push(seq)) => Delivery::Push { seq, record: Vec::new() },
        Some(Step::Reject(r, seq)) => Delivery::Reject(r, seq),
        Some(Step::Wait(_)) => unreachable!("a waiting frame goes into the window"),
    };
    apply(sh, ctx.host, stats, delivery, last_seq, &mut r.buf).await
}

/// Deliver the window's head while it is ready.
async fn deliver(
    sh: &Shared,
    ctx: &HostCtx<'_>,
    stats: &crate::consumers::HostStats,
    window: &mut Window<'_>,
    last_seq: &mut i64,
    buf: &mut Vec<u8>,
) -> Result<(), Ended> {
    while let Some(d) = window.take_ready(ctx, buf) {
        apply(sh, ctx.host, stats, d, last_seq, buf).await?;
    }
    Ok(())
}

/// One event's outcome, in its host's order: into the ring, dropped (a
/// `Cursor` record lets the host's cursor pass it), or the connection's
/// end. A push with an empty record writes `buf` (the window was empty).
async fn apply(
    sh: &Shared,
    host: &HostAssignment,
    stats: &crate::consumers::HostStats,
    d: Delivery,
    last_seq: &mut i64,
    buf: &mut Vec<u8>,
) -> Result<(), Ended> {
    match d {
        Delivery::Push { seq, record } => {
            push(sh, if record.is_empty() { buf } else { &record }).await;
            sh.slot().events_in.fetch_add(1, Ordering::Relaxed);
            stats.event(now_micros());
            *last_seq = seq;
        }
        Delivery::Reject(Rejected::Drop(reason, why), seq) => {
            sh.slot().dropped.fetch_add(1, Ordering::Relaxed);
            sh.slot().drops[reason as usize].fetch_add(1, Ordering::Relaxed);
            stats.drop(reason);
            tracing::debug!(host = host.hostname, seq, reason = reason.name(), why = &*why, "dropped upstream event");
            if let Some(seq) = seq {
                RingRecord::Cursor { host_id: host.id, upstream_seq: seq }.encode(buf);
                push(sh, buf).await;
                *last_seq = seq;
            }
        }
        Delivery::Reject(Rejected::Close(reason, why), _) => {
            sh.slot().dropped.fetch_add(1, Ordering::Relaxed);
            return Err(ended(reason, why));
        }
    }
    Ok(())
}

/// Counted as connected (shard gauge, host stats) until the guard drops.
fn connected<'a>(sh: &'a Shared, stats: &'a crate::consumers::HostStats) -> Guard<impl FnMut() + 'a> {
    sh.slot().hosts_connected.fetch_add(1, Ordering::Relaxed);
    stats.connected.set(true);
    scopeguard(move || {
        sh.slot().hosts_connected.fetch_sub(1, Ordering::Relaxed);
        stats.connected.set(false);
    })
}

/// Wait for the host's rate ([`Shared::events_per_second`]) to allow one
/// more event.
async fn throttle(sh: &Shared, host_id: i64, bucket: &mut TokenBucket) {
    let rate = sh.events_per_second(host_id);
    bucket.set_rate(rate, rate);
    while let Some(wait) = bucket.take(Instant::now()) {
        glommio::timer::sleep(wait).await;
    }
}

struct Guard<F: FnMut()>(F);
impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}

/// Write one encoded record into the ring, waiting while it is full.
async fn push(sh: &Shared, rec: &[u8]) {
    if sluice_common::process::failpoint::fires("shard-ring-garbage") {
        tracing::warn!(shard = sh.id, "failpoint shard-ring-garbage: writing a record that does not decode");
        push_raw(sh, &[0xff; 24]).await;
    }
    push_raw(sh, rec).await
}

async fn push_raw(sh: &Shared, rec: &[u8]) {
    let mut wait = Duration::from_micros(200);
    let started = Instant::now();
    loop {
        let pushed = sh.producer.borrow_mut().try_push(rec.len(), |b| b.copy_from_slice(rec));
        if pushed {
            sh.control.writer_doorbell().ring();
            sh.control.histogram(Hist::RingWait).observe(started.elapsed().as_micros() as u64);
            return;
        }
        glommio::timer::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_detail_is_formatted_only_when_its_debug_line_is_on() {
        let n = 7;
        let quiet = why!("seq {n} not above {}", n + 1);
        assert!(matches!(quiet, Why::Borrowed("")), "no subscriber: nothing formatted ({quiet:?})");
        let at = |level| tracing_subscriber::fmt().with_max_level(level).with_writer(std::io::sink).finish();
        tracing::subscriber::with_default(at(tracing::Level::DEBUG), || {
            assert_eq!(why!("seq {n} not above {}", n + 1), "seq 7 not above 8");
        });
        tracing::subscriber::with_default(at(tracing::Level::INFO), || {
            assert!(matches!(why!("seq {n}"), Why::Borrowed("")));
        });
        // By target: the line's module, wherever the detail is built.
        let only = |filter: &str| tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::sink).finish();
        tracing::subscriber::with_default(only("info,sluice_shard::upstream=debug"), || {
            assert_eq!(why!("seq {n}"), "seq 7");
        });
        tracing::subscriber::with_default(only("info,sluice_shard::validate=debug"), || {
            assert!(matches!(why!("seq {n}"), Why::Borrowed("")));
        });
    }

    #[test]
    fn cancel_wakes_its_waiter_once_and_stays_set() {
        use std::future::Future;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use std::task::{Context, Poll, Wake};
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let c = Cancel::default();
        let mut wait = Box::pin(c.wait());
        for _ in 0..3 {
            assert_eq!(wait.as_mut().poll(&mut cx), Poll::Pending);
        }
        assert_eq!(c.wakers.borrow().len(), 1, "one waiter, one waker, however often polled");
        c.fire();
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert!(c.is_set());
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(()));
        assert_eq!(Box::pin(c.wait()).as_mut().poll(&mut cx), Poll::Ready(()));
    }
}
