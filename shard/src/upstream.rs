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
//! - A failed host-authority or signature check re-resolves the DID once
//!   before dropping (migrations, key rotations).

use crate::health::{Change, Health, HEALTHY_AFTER};
use crate::wsin::{In, WsError, WsIn};
use crate::{io, Shared};
use sluice_common::atproto::commit::{check_commit, check_sync, CheckedCommit, Mode, Proof};
use sluice_common::atproto::frame::{self, Event};
use sluice_common::atproto::identity::PdsHost;
use sluice_common::ipc::ringrec::{EventRecord, Kind, RingRecord, PROOF_ABSENT, PROOF_FAILED, PROOF_VERIFIED};
use sluice_common::ipc::shm::{DropReason, Hist, UpstreamClose};
pub use sluice_common::process::host::HostAssignment;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub use crate::wsin::MESSAGE_BYTES_MAX;

/// Per-host event rate limit: a token bucket holding one second of
/// events. Over the rate, the host task waits before reading on, so the
/// host's TCP window closes: nothing is dropped.
pub struct Bucket {
    rate: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl Bucket {
    pub fn new(per_second: u32, now: std::time::Instant) -> Bucket {
        let rate = per_second.max(1) as f64;
        Bucket { rate, tokens: rate, last: now }
    }

    /// A new rate (a reload), from now on; the tokens held stay, up to it.
    pub fn set_rate(&mut self, per_second: u32) {
        self.rate = per_second.max(1) as f64;
        self.tokens = self.tokens.min(self.rate);
    }

    /// Take a token at `now`; `Some(wait)` if none is left.
    pub fn take(&mut self, now: std::time::Instant) -> Option<Duration> {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

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

/// Why an event was not relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// Drop the event, keep the connection.
    Drop(DropReason, String),
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
    let mut buf = Vec::new();
    let mut bucket = Bucket::new(sh.settings().host_events_per_second_max, Instant::now());
    let mut keep = KeepAlive::new(sh);
    // Wakes the loop when the host is unassigned or the relay stops, even
    // if the host sends nothing.
    let mut watch = Box::pin(cancel.wait());
    let mut tick = Box::pin(glommio::timer::sleep(keep.ping_every));
    while !stopping() {
        // `WsIn::next` is cancel-safe: a timer or a stop may drop it.
        let wake = {
            // Pinned on the stack: no allocation per message.
            let next = std::pin::pin!(ws.next());
            match futures::future::select(next, futures::future::select(&mut watch, &mut tick)).await {
                futures::future::Either::Left((m, _)) => Wake::Message(m),
                futures::future::Either::Right((futures::future::Either::Left(_), _)) => Wake::Stop,
                futures::future::Either::Right((futures::future::Either::Right(_), _)) => Wake::Tick,
            }
        };
        let data = match wake {
            Wake::Stop => break,
            Wake::Tick => {
                let (ping, next) = match keep.tick() {
                    Ok(t) => t,
                    Err(e) => return e,
                };
                if ping {
                    if let Err(e) = ws.ping().await {
                        return ws_error(e, false);
                    }
                }
                tick = Box::pin(glommio::timer::sleep(next));
                continue;
            }
            Wake::Message(Err(e)) => return ws_error(e, false),
            Wake::Message(Ok(m)) => {
                keep.last_heard = Instant::now();
                match m {
                    In::Binary(b) => b,
                    In::Close(code) => return ended(UpstreamClose::Remote, format!("close frame ({code:?})")),
                    In::Ping(p) => {
                        if let Err(e) = keep.host_pinged() {
                            return e;
                        }
                        if let Err(e) = ws.pong(&p).await {
                            return ws_error(e, false);
                        }
                        continue;
                    }
                    In::Pong | In::Text => continue,
                }
            }
        };
        throttle(sh, &mut bucket).await;
        if let Err(e) = handle_frame(sh, host, stats, data, last_seq, &mut buf).await {
            return e;
        }
    }
    ws.close().await;
    ended(UpstreamClose::Local, "unassigned or stopping")
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

/// Wait for the host's rate (`limits.host_events_per_second_max`, as
/// reloaded) to allow one more event.
async fn throttle(sh: &Shared, bucket: &mut Bucket) {
    bucket.set_rate(sh.settings().host_events_per_second_max);
    while let Some(wait) = bucket.take(Instant::now()) {
        glommio::timer::sleep(wait).await;
    }
}

/// Check one data message and write what it yields into the ring.
async fn handle_frame(
    sh: &Shared,
    host: &HostAssignment,
    stats: &crate::consumers::HostStats,
    data: &[u8],
    last_seq: &mut i64,
    buf: &mut Vec<u8>,
) -> Result<(), Ended> {
    let started = Instant::now();
    let checked = check_frame(sh, host, data, *last_seq, buf).await;
    sh.control.histogram(Hist::Validation).observe(started.elapsed().as_micros() as u64);
    match checked {
        Ok(seq) => {
            push(sh, buf).await;
            sh.slot().events_in.fetch_add(1, Ordering::Relaxed);
            stats.event(now_micros());
            *last_seq = seq;
        }
        Err((Rejected::Drop(reason, why), seq)) => {
            sh.slot().dropped.fetch_add(1, Ordering::Relaxed);
            sh.slot().drops[reason as usize].fetch_add(1, Ordering::Relaxed);
            stats.drop(reason);
            tracing::debug!(host = host.hostname, seq, reason = reason.name(), why, "dropped upstream event");
            if let Some(seq) = seq {
                RingRecord::Cursor { host_id: host.id, upstream_seq: seq }.encode(buf);
                push(sh, buf).await;
                *last_seq = seq;
            }
        }
        Err((Rejected::Close(reason, why), _)) => {
            sh.slot().dropped.fetch_add(1, Ordering::Relaxed);
            return Err(ended(reason, why));
        }
    }
    Ok(())
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

fn proof_code(p: &Proof) -> u8 {
    match p {
        Proof::Verified(_) => PROOF_VERIFIED,
        Proof::Absent => PROOF_ABSENT,
        Proof::Failed(_) => PROOF_FAILED,
    }
}

/// A check's outcome: what it found, or why the event is rejected (with
/// its seq when known, so the cursor can pass it).
type Verdict<T> = Result<T, (Rejected, Option<i64>)>;

/// Decode a frame into an event with a seq above `last_seq`, and the byte
/// span of that seq in the frame.
fn decode_event<'a>(host: &HostAssignment, data: &'a [u8], last_seq: i64) -> Verdict<(Event<'a>, i64, (usize, usize))> {
    let decoded =
        frame::decode(data).map_err(|e| (Rejected::Close(UpstreamClose::BadFrame, format!("frame: {e}")), None))?;
    let ev = match decoded.message {
        frame::Message::Error { error, message } => {
            let why = format!("error frame {error}: {}", message.unwrap_or(""));
            return Err((Rejected::Close(UpstreamClose::BadFrame, why), None));
        }
        frame::Message::Event(ev) => ev,
    };
    let seq = match (&ev, ev.seq()) {
        (Event::Info(i), _) => {
            tracing::info!(host = host.hostname, name = i.name, message = i.message, "upstream #info");
            return Err((Rejected::Drop(DropReason::Info, "info".into()), None));
        }
        (_, None) => {
            let why = format!("unknown message type {}", ev.type_name());
            return Err((Rejected::Drop(DropReason::UnknownType, why), None));
        }
        (_, Some(s)) => s,
    };
    if seq <= last_seq {
        return Err((Rejected::Drop(DropReason::OldSeq, format!("seq {seq} not above {last_seq}")), None));
    }
    let span =
        decoded.seq_span.ok_or_else(|| (Rejected::Drop(DropReason::Malformed, "no seq span".into()), Some(seq)))?;
    Ok((ev, seq, span))
}

/// The ring record of an event before its kind's fields are filled in.
fn new_record<'a>(
    host: &HostAssignment,
    seq: i64,
    did: &'a str,
    frame: &'a [u8],
    span: (usize, usize),
    now: i64,
) -> EventRecord<'a> {
    EventRecord {
        host_id: host.id,
        upstream_seq: seq,
        kind: 0,
        did,
        rev: "",
        since: "",
        commit_cid: &[],
        data_cid: &[],
        prev_data: &[],
        proof: PROOF_ABSENT,
        active: true,
        status: "",
        time_micros: now,
        identity_micros: 0,
        frame,
        seq_start: span.0 as u32,
        seq_end: span.1 as u32,
    }
}

/// Validate one frame; on success `out` holds the encoded ring record and
/// the event's upstream seq is returned.
pub async fn check_frame(
    sh: &Shared,
    host: &HostAssignment,
    data: &[u8],
    last_seq: i64,
    out: &mut Vec<u8>,
) -> Verdict<i64> {
    let (ev, seq, span) = decode_event(host, data, last_seq)?;
    let drop = |reason, why: String| (Rejected::Drop(reason, why), Some(seq));
    let mode = if sh.settings().strict { Mode::Strict } else { Mode::Lenient };
    let now = now_micros();
    let did = ev.did().expect("events with a seq have a DID");
    let mut rec = new_record(host, seq, did, data, span, now);
    let (commit_bytes, data_bytes, prev_bytes);
    match &ev {
        Event::Commit(c) => {
            let checked =
                check_commit(c, mode, now).map_err(|e| drop(DropReason::InvalidCommit, format!("{did}: {e}")))?;
            rec.identity_micros =
                authority_and_signature(sh, host, did, Some(&checked)).await.map_err(|r| (r, Some(seq)))?;
            commit_bytes = checked.commit_cid.to_bytes();
            data_bytes = checked.data.to_bytes();
            prev_bytes = c.prev_data.map(|p| p.to_bytes());
            rec.kind = Kind::Commit as u8;
            rec.rev = c.rev;
            rec.since = c.since.unwrap_or("");
            rec.commit_cid = &commit_bytes;
            rec.data_cid = &data_bytes;
            rec.prev_data = prev_bytes.as_ref().map_or(&[][..], |p| &p[..]);
            rec.proof = proof_code(&checked.proof);
        }
        Event::Sync(s) => {
            let checked = check_sync(s, now).map_err(|e| drop(DropReason::InvalidSync, format!("{did}: {e}")))?;
            rec.identity_micros =
                authority_and_signature(sh, host, did, Some(&checked)).await.map_err(|r| (r, Some(seq)))?;
            commit_bytes = checked.commit_cid.to_bytes();
            data_bytes = checked.data.to_bytes();
            rec.kind = Kind::Sync as u8;
            rec.rev = s.rev;
            rec.commit_cid = &commit_bytes;
            rec.data_cid = &data_bytes;
        }
        Event::Identity(_) => {
            sh.resolver.forget(did);
            rec.identity_micros = authority_and_signature(sh, host, did, None).await.map_err(|r| (r, Some(seq)))?;
            rec.kind = Kind::Identity as u8;
        }
        Event::Account(a) => {
            rec.identity_micros = authority_and_signature(sh, host, did, None).await.map_err(|r| (r, Some(seq)))?;
            rec.kind = Kind::Account as u8;
            rec.active = a.active;
            rec.status = a.status.unwrap_or("");
        }
        Event::Info(_) | Event::Unknown { .. } => unreachable!("handled above"),
    }
    RingRecord::Event(rec).encode(out);
    if out.len() > sh.payload_max {
        let why = format!("{did}: record of {} bytes exceeds the ring's limit", out.len());
        return Err(drop(DropReason::TooLarge, why));
    }
    Ok(seq)
}

/// Host authority (the DID's PDS is this host) and, for commits, the
/// signature; one fresh resolution before giving up. When the identity
/// cannot be fetched at all (directory down), the event is not dropped:
/// the connection closes and the event is read again after the backoff.
/// Returns when the document that passed was fetched.
async fn authority_and_signature(
    sh: &Shared,
    host: &HostAssignment,
    did: &str,
    commit: Option<&CheckedCommit>,
) -> Result<i64, Rejected> {
    let mut last_err = String::new();
    let mut reason = DropReason::IdentityFailed;
    let mut unavailable = 0;
    for fresh in [false, true] {
        let ident = match sh.resolver.did(did, fresh).await {
            Ok(i) => i,
            Err(e) => {
                if e.is_transient() {
                    unavailable += 1;
                }
                (reason, last_err) = (DropReason::IdentityFailed, e.to_string());
                continue;
            }
        };
        let pds = ident.pds_endpoint.as_deref().and_then(PdsHost::from_endpoint);
        match pds {
            Some(p) if p.name == host.hostname => {}
            Some(p) => {
                (reason, last_err) =
                    (DropReason::WrongHost, format!("{did} is hosted at {}, not {}", p.name, host.hostname));
                continue;
            }
            None => {
                (reason, last_err) = (DropReason::WrongHost, format!("{did} has no PDS endpoint"));
                continue;
            }
        }
        let Some(c) = commit else { return Ok(ident.fetched_micros) };
        let Some(key) = &ident.signing_key else {
            (reason, last_err) = (DropReason::NoSigningKey, format!("{did} has no signing key"));
            continue;
        };
        match c.verify_signature(key) {
            Ok(()) => return Ok(ident.fetched_micros),
            Err(e) => (reason, last_err) = (DropReason::BadSignature, format!("{did}: signature: {e}")),
        }
    }
    if unavailable == 2 {
        return Err(Rejected::Close(UpstreamClose::IdentityUnavailable, format!("identity unavailable: {last_err}")));
    }
    Err(Rejected::Drop(reason, last_err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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

    #[test]
    fn bucket_allows_a_second_of_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, t0);
        for _ in 0..100 {
            assert_eq!(b.take(t0), None);
        }
        let w = b.take(t0).expect("empty after the burst");
        assert!((w.as_secs_f64() - 0.01).abs() < 1e-6, "{w:?}");
        // 50 ms later: 5 more tokens.
        let t1 = t0 + Duration::from_millis(50);
        for _ in 0..5 {
            assert_eq!(b.take(t1), None);
        }
        assert!(b.take(t1).is_some());
        // Never more than one second's worth.
        let t2 = t1 + Duration::from_secs(60);
        let n = (0..1000).take_while(|_| b.take(t2).is_none()).count();
        assert_eq!(n, 100);
    }
}
