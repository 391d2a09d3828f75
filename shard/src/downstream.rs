//! The public port: every shard accepts on `listen` (SO_REUSEPORT, the
//! kernel spreads connections), serves `subscribeRepos` from the event log
//! and `/xrpc/_health` itself, and forwards every other request to the
//! db-writer's query workers over the Unix socket.
//!
//! subscribeRepos behaviours:
//! - no cursor: live, from the next committed seq;
//! - `cursor=N` (0 < N ≤ committed): every seq > N, then live, no gap, no
//!   duplicate;
//! - `cursor=0`: the whole window; a cursor older than the window gets
//!   `#info OutdatedCursor`, then the window from its start;
//! - `cursor` above the committed seq: error frame `FutureCursor`, close;
//! - a consumer more than `consumer_lag_events_max` behind, or whose
//!   socket has taken nothing for `consumer_write_timeout_s`, gets error
//!   frame `ConsumerTooSlow` (if its socket takes it within a second) and
//!   is closed, whether or not it reads: a write in progress is checked
//!   every second; counted by reason. An idle stream gets a ping every
//!   [`PING_EVERY`]; at most `consumers_max` consumers per shard.
//! - the shard stopping (a relay restart, a reshard): each consumer gets
//!   every committed event, then `#info RelayRestarting` naming the cursor
//!   to reconnect with, then a close frame with code 1012.
//!
//! Consumers only ever see seqs at or below the committed watermark.

use crate::wsout;
use crate::{io, Shared};
use futures::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use sluice_common::atproto::frame::{encode_error, InfoEvent};
use sluice_common::ipc::eventlog::{Missing, FLAG_TAKEDOWN};
use sluice_common::ipc::shm::WriterState;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const HEAD_BYTES_MAX: usize = 16 * 1024;
/// Open downstream connections per shard (consumers included); more are
/// closed at accept and counted as dropped.
const CONNECTIONS_MAX: usize = 16_384;
const BODY_BYTES_MAX: usize = 64 * 1024;
const RESPONSE_BYTES_MAX: usize = 4 * 1024 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
pub const PING_EVERY: Duration = Duration::from_secs(30);
/// The waiting consumers' clock: [`Watermark::ticks`] advances this often
/// while any waits, and a consumer pings after [`PING_EVERY`] of them
/// without a frame (so no consumer keeps a timer of its own).
const TICK: Duration = Duration::from_secs(1);
const PING_TICKS: u64 = PING_EVERY.as_secs() / TICK.as_secs();
/// Frames sent per batch (between looks at the watermark).
const SEND_BATCH: usize = 256;
/// How often the shard looks at the committed watermark for its
/// caught-up consumers (one timer per shard, not per consumer).
const POLL: Duration = Duration::from_millis(1);

/// The least time between two wakes of the waiting consumers, by how
/// many wait: each consumer's wake costs a socket write (a syscall, and
/// on loopback the peer's receive path too) whatever it carries, so with
/// hundreds of consumers waking on every commit the writes, not the
/// bytes, fill the cores. [`COALESCE_PER_WAITER`] each, at most
/// [`COALESCE_MAX`] (a latency of that much at worst).
fn coalesce_gap(waiters: usize) -> Duration {
    COALESCE_PER_WAITER.saturating_mul(waiters.min(u32::MAX as usize) as u32).min(COALESCE_MAX)
}
const COALESCE_PER_WAITER: Duration = Duration::from_micros(20);
const COALESCE_MAX: Duration = Duration::from_millis(20);

/// The consumers of this shard waiting for the committed seq to pass what
/// they sent. One task ([`watch_committed`]) reads the control block every
/// [`POLL`] and wakes them all when it moved: with a thousand consumers,
/// a thousand timers every 2 ms cost more than the frames.
#[derive(Default)]
pub struct Watermark {
    wakers: std::cell::RefCell<Vec<std::task::Waker>>,
    /// The polling task, parked while nobody waits.
    poller: std::cell::RefCell<Option<std::task::Waker>>,
    /// Seconds some consumer has waited, about ([`TICK`]s).
    ticks: Cell<u64>,
}

impl Watermark {
    pub fn wake_all(&self) {
        let ws = std::mem::take(&mut *self.wakers.borrow_mut());
        for w in ws {
            w.wake();
        }
    }

    fn waiters(&self) -> usize {
        self.wakers.borrow().len()
    }

    fn waiting(&self) -> bool {
        !self.wakers.borrow().is_empty()
    }

    /// Resolves once a consumer waits.
    fn someone_waits(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.waiting() {
                return std::task::Poll::Ready(());
            }
            *self.poller.borrow_mut() = Some(cx.waker().clone());
            std::task::Poll::Pending
        })
    }

    /// Resolves once the committed seq is above `seq` (or on a wake for
    /// another reason: callers re-check).
    fn above<'a>(&'a self, sh: &'a Shared, seq: i64) -> impl std::future::Future<Output = ()> + 'a {
        let mut registered = false;
        std::future::poll_fn(move |cx| {
            if registered || sh.control.committed().load(Ordering::Acquire) as i64 > seq {
                return std::task::Poll::Ready(());
            }
            registered = true;
            self.wakers.borrow_mut().push(cx.waker().clone());
            if let Some(p) = self.poller.borrow_mut().take() {
                p.wake();
            }
            std::task::Poll::Pending
        })
    }
}

/// The shard's one watermark task: wakes the waiting consumers when the
/// committed seq moves (at most every [`coalesce_gap`]), and once a
/// [`TICK`] while any waits (for their pings). Parked, with no timer,
/// while none waits.
async fn watch_committed(sh: Rc<Shared>) {
    let wm = &sh.watermark;
    // The committed seq at the last wake: a waiter registered on a seq at
    // or above it (below, it would not have waited), so any other value
    // is news for it.
    let mut last = 0;
    let mut woke = Instant::now();
    loop {
        wm.someone_waits().await;
        while sh.control.committed().load(Ordering::Acquire) == last && wm.waiting() {
            if woke.elapsed() >= TICK {
                break;
            }
            glommio::timer::sleep(POLL).await;
        }
        // Many waiters: let a few commits gather so that each consumer's
        // socket write carries several frames.
        let gap = coalesce_gap(wm.waiters());
        let since = woke.elapsed();
        if since < gap {
            glommio::timer::sleep(gap - since).await;
        }
        last = sh.control.committed().load(Ordering::Acquire);
        if woke.elapsed() >= TICK {
            wm.ticks.set(wm.ticks.get() + 1);
        }
        woke = Instant::now();
        wm.wake_all();
    }
}

pub async fn serve(sh: Rc<Shared>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(sh.listen).map_err(io)?;
    glommio::spawn_local(watch_committed(sh.clone())).detach();
    tracing::info!(shard = sh.id, listen = %sh.listen, "serving consumers");
    let open = Rc::new(Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(shard = sh.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Bounded: consumers are capped by consumers_max in `subscribe`;
        // everything else (requests in flight) by this.
        if open.get() >= CONNECTIONS_MAX {
            sh.slot().dropped.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        open.set(open.get() + 1);
        let (sh, open) = (sh.clone(), open.clone());
        glommio::spawn_local(async move {
            if let Err(e) = handle(sh, stream).await {
                tracing::debug!(error = %e, "downstream connection ended");
            }
            open.set(open.get() - 1);
        })
        .detach();
    }
}

struct Head {
    method: String,
    target: String,
    ws_key: Option<String>,
    content_length: usize,
    /// Bytes read past the head (start of the body).
    rest: Vec<u8>,
    raw: Vec<u8>,
}

/// After answering a request we did not read whole: stop writing, and
/// read (and drop) what the client still sends, for at most 1 s and 2
/// MiB, so that closing does not reset the connection before the client
/// has read the answer.
async fn linger(stream: TcpStream) -> anyhow::Result<()> {
    let _ = stream.shutdown(std::net::Shutdown::Write).await;
    let mut stream = stream;
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut chunk = [0u8; 4096];
    let mut drained = 0;
    while drained < 2 * 1024 * 1024 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left)).map_err(io)?;
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    Ok(())
}

/// Why no request head was read.
enum HeadFailure {
    /// Answered: 431 for an oversized head, 400 for a malformed one.
    Bad(sluice_common::process::http::HeadError),
    /// Closed, failed or past the deadline: nothing to answer.
    Gone(anyhow::Error),
}

/// Read a request head within [`HEAD_TIMEOUT`] in total (a head sent one
/// byte at a time does not get a fresh timeout per byte) and
/// [`HEAD_BYTES_MAX`].
async fn read_head(stream: &mut TcpStream) -> Result<Head, HeadFailure> {
    let gone = |e: anyhow::Error| HeadFailure::Gone(e);
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let deadline = Instant::now() + HEAD_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(gone(anyhow::anyhow!("request head not complete within {HEAD_TIMEOUT:?}")));
        }
        stream.set_read_timeout(Some(left)).map_err(|e| gone(io(e).into()))?;
        let n = stream.read(&mut chunk).await.map_err(|e| gone(e.into()))?;
        if n == 0 {
            return Err(gone(anyhow::anyhow!("closed before the request head")));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(h) =
            sluice_common::process::http::parse_request_head(&buf, HEAD_BYTES_MAX).map_err(HeadFailure::Bad)?
        {
            let head = Head {
                method: h.method,
                target: h.target,
                ws_key: h.ws_key,
                content_length: h.content_length as usize,
                rest: buf[h.head_len..].to_vec(),
                raw: buf[..h.head_len].to_vec(),
            };
            stream.set_read_timeout(None).map_err(|e| gone(io(e).into()))?;
            return Ok(head);
        }
    }
}

async fn respond(stream: &mut TcpStream, status: u16, body: &serde_json::Value) -> anyhow::Result<()> {
    respond_bytes(stream, status, "application/json", body.to_string().as_bytes()).await
}

async fn respond_bytes(stream: &mut TcpStream, status: u16, content_type: &str, body: &[u8]) -> anyhow::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    Ok(())
}

/// The status page (`GET /`): static HTML and a little script that reads
/// `/status.json` every two seconds. No build step, nothing external.
const STATUS_PAGE: &str = include_str!("status.html");

async fn handle(sh: Rc<Shared>, mut stream: TcpStream) -> anyhow::Result<()> {
    let head = match read_head(&mut stream).await {
        Ok(h) => h,
        Err(HeadFailure::Bad(e)) => {
            let (status, name) = match e {
                sluice_common::process::http::HeadError::TooLarge(_) => (431, "RequestHeaderFieldsTooLarge"),
                _ => (400, "InvalidRequest"),
            };
            respond(&mut stream, status, &serde_json::json!({"error": name, "message": e.to_string()})).await?;
            return linger(stream).await;
        }
        Err(HeadFailure::Gone(e)) => return Err(e),
    };
    let path = head.target.split('?').next().unwrap_or("");
    match (head.method.as_str(), path) {
        ("GET", "/xrpc/com.atproto.sync.subscribeRepos") => match head.ws_key.clone() {
            Some(key) => subscribe(sh, stream, &head, &key).await,
            None => {
                respond(
                    &mut stream,
                    400,
                    &serde_json::json!({"error": "InvalidRequest", "message": "WebSocket upgrade required"}),
                )
                .await
            }
        },
        ("GET", "/xrpc/_health") => {
            let (status, body) = health(&sh);
            respond(&mut stream, status, &body).await
        }
        ("GET", "/") | ("GET", "/index.html") => {
            respond_bytes(&mut stream, 200, "text/html; charset=utf-8", STATUS_PAGE.as_bytes()).await
        }
        _ => proxy(&sh, stream, head).await,
    }
}

/// 200 once the pipeline is up; 503 with the reason otherwise.
pub fn health(sh: &Shared) -> (u16, serde_json::Value) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let beat = sh.control.writer_heartbeat().load(Ordering::Relaxed);
    let seq = sh.control.committed().load(Ordering::Acquire);
    let reason = match sh.control.writer_state() {
        WriterState::Ready if now.saturating_sub(beat) <= 10 => None,
        WriterState::Ready => Some("db-writer heartbeat is stale"),
        WriterState::Starting => Some("db-writer is starting"),
        WriterState::Stopping | WriterState::Stopped => Some("relay is shutting down"),
        WriterState::DiskFull => Some("disk full: intake paused until space returns"),
        WriterState::DbUnavailable => Some("database unavailable: intake paused until it answers"),
    };
    match reason {
        None => (200, serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "seq": seq})),
        Some(r) => (503, serde_json::json!({"status": "unavailable", "reason": r})),
    }
}

/// Forward a request to the db-writer's query workers.
async fn proxy(sh: &Shared, mut stream: TcpStream, head: Head) -> anyhow::Result<()> {
    if head.content_length > BODY_BYTES_MAX {
        return respond(&mut stream, 413, &serde_json::json!({"error": "PayloadTooLarge"})).await;
    }
    let mut body = head.rest;
    stream.set_read_timeout(Some(HEAD_TIMEOUT)).map_err(io)?;
    let mut chunk = [0u8; 4096];
    while body.len() < head.content_length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("closed mid-body");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(head.content_length);
    let mut up = match glommio::net::UnixStream::connect(&sh.query_socket).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, socket = %sh.query_socket.display(), "query socket unreachable");
            return respond(
                &mut stream,
                503,
                &serde_json::json!({"error": "Unavailable", "message": "query workers unreachable"}),
            )
            .await;
        }
    };
    up.write_all(&with_peer(&head.raw, stream.peer_addr().ok())).await?;
    up.write_all(&body).await?;
    up.flush().await?;
    let mut resp = Vec::new();
    loop {
        let n = up.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        resp.extend_from_slice(&chunk[..n]);
        if resp.len() > RESPONSE_BYTES_MAX {
            anyhow::bail!("query response too large");
        }
    }
    stream.write_all(&resp).await?;
    stream.flush().await?;
    Ok(())
}

/// The request head as forwarded: any peer header the client sent is
/// dropped, and the client's address as this shard sees it is added
/// (the query workers throttle failed admin logins per address).
fn with_peer(raw: &[u8], peer: Option<std::net::SocketAddr>) -> Vec<u8> {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(raw.len() + 64);
    for line in text.trim_end_matches("\r\n").split("\r\n") {
        let is_peer = line
            .split_once(':')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(sluice_common::process::http::PEER_HEADER));
        if !is_peer {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    if let Some(p) = peer {
        out.push_str(&format!("{}: {}\r\n", sluice_common::process::http::PEER_HEADER, p.ip()));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// The `cursor` parameter: an integer in 0..2^53 (PROTOCOL §1), or absent.
fn cursor_param(target: &str) -> Result<Option<i64>, String> {
    let q = target.split_once('?').map_or("", |(_, q)| q);
    for p in q.split('&') {
        if let Some(v) = p.strip_prefix("cursor=") {
            return match v.parse::<i64>() {
                Ok(c) if (0..=sluice_common::atproto::frame::SEQ_MAX).contains(&c) => Ok(Some(c)),
                _ => Err(format!("cursor {v:?} is not an integer from 0 to 2^53")),
            };
        }
    }
    Ok(None)
}

fn error_frame(name: &str, message: &str) -> Vec<u8> {
    let mut out = Vec::new();
    encode_error(name, Some(message), &mut out);
    wsout::frame(wsout::OP_BINARY, &out)
}

fn outdated_frame() -> Vec<u8> {
    let mut out = Vec::new();
    InfoEvent {
        name: "OutdatedCursor",
        message: Some("cursor is older than the replay window; starting at its oldest event"),
    }
    .encode(&mut out);
    wsout::frame(wsout::OP_BINARY, &out)
}

async fn subscribe(sh: Rc<Shared>, mut stream: TcpStream, head: &Head, key: &str) -> anyhow::Result<()> {
    let slot = sh.slot();
    // consumers_max is for the whole relay: count every shard's.
    let shards = (sh.control.shard_count().load(Ordering::Relaxed) as usize).max(1);
    let all: u64 = (0..shards).map(|k| sh.control.shard(k).consumers.load(Ordering::Relaxed)).sum();
    if all >= u64::from(sh.settings().consumers_max) {
        return respond(&mut stream, 503, &serde_json::json!({"error": "TooManyConsumers"})).await;
    }
    let cursor = match cursor_param(&head.target) {
        Ok(c) => c,
        Err(m) => {
            return respond(&mut stream, 400, &serde_json::json!({"error": "InvalidRequest", "message": m})).await
        }
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.flush().await?;
    let remote = stream.peer_addr().ok();
    slot.consumers.fetch_add(1, Ordering::Relaxed);
    let id = sh.consumers.borrow_mut().add(remote, cursor);
    let r = stream_events(&sh, stream, cursor, id).await;
    sh.consumers.borrow_mut().remove(id);
    sh.slot().consumers.fetch_sub(1, Ordering::Relaxed);
    if sh.consumers.borrow().is_empty() {
        // Nobody to share frames with: the cache's chunks go back.
        sh.frames.borrow_mut().clear();
    }
    r
}

type Writer = wsout::Out<wsout::VectoredSocket<futures::io::WriteHalf<TcpStream>>>;

async fn stream_events(sh: &Rc<Shared>, stream: TcpStream, cursor: Option<i64>, id: u64) -> anyhow::Result<()> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let (rd, wr) = AsyncReadExt::split(stream);
    let out = wsout::Out::new(wsout::VectoredSocket::new(wr, fd));
    // The reader half answers pings and notices the consumer leaving; it
    // wakes this loop if it waits for the watermark.
    let conn = Rc::new(wsout::Conn::default());
    let wake = sh.clone();
    let reader = glommio::spawn_local(wsout::read_client(rd, conn.clone(), move || wake.watermark.wake_all()));
    let r = send_events(sh, out, &conn, cursor, id).await;
    // Ended, however it ended: the reader ends too, by reading the end of
    // the stream (a shut-down read side), and is waited for. A reader
    // cancelled in a pending read kept its task's memory (about 600
    // bytes per subscription, in glommio's read source). A reader that
    // has not set `closed` still runs and holds its half, so `fd` is
    // still this socket's (no await between the look and the call).
    if !conn.closed.get() {
        let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Read);
    }
    let timeout = std::pin::pin!(glommio::timer::sleep(READER_END));
    let ended = futures::future::select(reader, timeout).await;
    if let futures::future::Either::Right((_, reader)) = ended {
        reader.cancel().await;
    }
    r
}

/// How long a consumer's reader has to end once its read side is shut.
const READER_END: Duration = Duration::from_secs(1);

/// The writer's loop: frames from `cursor` until the consumer leaves, is
/// cut or the shard stops.
async fn send_events(
    sh: &Rc<Shared>,
    mut out: Writer,
    conn: &wsout::Conn,
    cursor: Option<i64>,
    id: u64,
) -> anyhow::Result<()> {
    let committed = || sh.control.committed().load(Ordering::Acquire) as i64;
    let Some(mut next) = first_seq(sh, &mut out, cursor).await? else { return Ok(()) };
    // The watermark's tick at the last frame or ping sent.
    let mut sent_at = sh.watermark.ticks.get();
    while !conn.closed.get() {
        let pong = conn.pong.borrow_mut().take();
        if let Some(p) = pong {
            out.control(wsout::OP_PONG, &p).await?;
            out.flush().await?;
        }
        let top = committed();
        if next > top && sh.closing.get() {
            return restarting(&mut out, next - 1).await;
        }
        if next > top {
            if sh.watermark.ticks.get().saturating_sub(sent_at) >= PING_TICKS {
                out.control(wsout::OP_PING, &[]).await?;
                out.flush().await?;
                sent_at = sh.watermark.ticks.get();
                continue;
            }
            sh.watermark.above(sh, top).await;
            continue;
        }
        if top - next > lag_max(sh) {
            return cut(sh, out, Cut::Lag { seq: next, committed: top }).await;
        }
        let pos = Cell::new(next);
        let sent = match send_watched(sh, &mut out, &pos, top).await? {
            Ok(sent) => sent,
            Err(why) => return cut(sh, out, why).await,
        };
        next = pos.get();
        let behind = (committed() - (next - 1)).max(0) as u64;
        sh.lag_hist.borrow_mut().observe(behind);
        sh.slot().frames_out.fetch_add(sent as u64, Ordering::Relaxed);
        sh.consumers.borrow_mut().progress(id, next - 1, sent as u64);
        sent_at = sh.watermark.ticks.get();
    }
    Ok(())
}

/// Where a subscription starts (`None`: the cursor is ahead of the
/// stream; the consumer got `FutureCursor` and the close).
async fn first_seq(sh: &Shared, out: &mut Writer, cursor: Option<i64>) -> anyhow::Result<Option<i64>> {
    let committed = sh.control.committed().load(Ordering::Acquire) as i64;
    let oldest = (sh.control.oldest().load(Ordering::Acquire) as i64).max(1);
    Ok(Some(match cursor {
        None => committed + 1,
        Some(c) if c > committed => {
            out.framed(error_frame("FutureCursor", "cursor is ahead of the stream")).await?;
            out.close().await?;
            return Ok(None);
        }
        Some(0) => oldest,
        Some(c) if c + 1 < oldest => {
            out.framed(outdated_frame()).await?;
            oldest
        }
        Some(c) => c + 1,
    }))
}

/// One batch up to `top`, watched: a consumer that stops reading fills its
/// socket and the write waits; it is cut (`Err`) once its lag passes the
/// limit or the socket has taken nothing for the write timeout. `pos`
/// follows the batch.
async fn send_watched(sh: &Shared, out: &mut Writer, pos: &Cell<i64>, top: i64) -> anyhow::Result<Result<usize, Cut>> {
    let mut batch = std::pin::pin!(send_batch(sh, out, pos, top));
    // Most batches go out without waiting on the socket: no clock and no
    // timer for those.
    if let std::task::Poll::Ready(r) = futures::poll!(batch.as_mut()) {
        return Ok(Ok(r?));
    }
    let started = Instant::now();
    loop {
        let tick = std::pin::pin!(glommio::timer::sleep(CUT_CHECK));
        match futures::future::select(batch.as_mut(), tick).await {
            futures::future::Either::Left((r, _)) => return Ok(Ok(r?)),
            futures::future::Either::Right(_) => {
                let (top, at) = (sh.control.committed().load(Ordering::Acquire) as i64, pos.get());
                if top - at > lag_max(sh) {
                    return Ok(Err(Cut::Lag { seq: at, committed: top }));
                } else if started.elapsed() >= write_timeout(sh) {
                    return Ok(Err(Cut::Unwritable { seq: at, waited: started.elapsed() }));
                }
            }
        }
    }
}

/// The shard stops: say where to resume, close with 1012 (best effort,
/// within a second).
async fn restarting(out: &mut Writer, last_sent: i64) -> anyhow::Result<()> {
    let message = format!("the relay is restarting; reconnect with cursor={last_sent}");
    let mut info = Vec::new();
    InfoEvent { name: "RelayRestarting", message: Some(&message) }.encode(&mut info);
    let farewell = async {
        out.framed(wsout::frame(wsout::OP_BINARY, &info)).await?;
        out.close_with(wsout::CLOSE_SERVICE_RESTART).await
    };
    let _ =
        futures::future::select(std::pin::pin!(farewell), std::pin::pin!(glommio::timer::sleep(CUT_FAREWELL))).await;
    Ok(())
}

fn lag_max(sh: &Shared) -> i64 {
    sh.settings().consumer_lag_events_max.min(i64::MAX as u64) as i64
}

fn write_timeout(sh: &Shared) -> Duration {
    Duration::from_secs(sh.settings().consumer_write_timeout_s.into())
}

/// `seq`'s frame: from the shard's cache, or read from the log and framed
/// into the cache, or (a seq older than the cache keeps) the log's bytes
/// to frame on the way out. `None`: taken down, skip it.
fn framed(sh: &Shared, seq: i64) -> anyhow::Result<Result<Option<Frame>, Missing>> {
    if let Some(f) = sh.frames.borrow().get(seq) {
        return Ok(Ok(f.map(Frame::Cached)));
    }
    let found = sh.log.borrow_mut().lookup(seq)?;
    Ok(match found {
        Ok((h, _)) if h.flags & FLAG_TAKEDOWN != 0 => {
            sh.frames.borrow_mut().put(seq, None);
            Ok(None)
        }
        Ok((_, f)) if !sh.frames.borrow().keeps(seq) => Ok(Some(Frame::Log(f))),
        Ok((_, f)) => Ok(sh.frames.borrow_mut().put(seq, Some(f.bytes())).map(Frame::Cached)),
        Err(m) => Err(m),
    })
}

/// A frame to send: framed once in the shard's cache, or an event log
/// record framed as it is written out.
enum Frame {
    Cached(bytes::Bytes),
    Log(sluice_common::ipc::eventlog::LogFrame),
}

/// Send the committed frames from `pos` up to `top` (at most
/// [`SEND_BATCH`]), then flush; `pos` follows, so a watcher sees how far
/// a stuck write got. Returns the frames sent.
async fn send_batch(sh: &Shared, out: &mut Writer, pos: &Cell<i64>, top: i64) -> anyhow::Result<usize> {
    sh.frames.borrow_mut().check_generation(sh.control.flags_generation().load(Ordering::Acquire));
    let (mut sent, mut bytes) = (0, 0);
    while sent < SEND_BATCH && pos.get() <= top {
        let next = pos.get();
        match framed(sh, next)? {
            Ok(Some(f)) => {
                // Bytes on the wire, header included, either way.
                bytes += match f {
                    Frame::Cached(f) => {
                        let len = f.len();
                        out.shared(f).await?;
                        len
                    }
                    Frame::Log(f) => {
                        let len = f.bytes().len();
                        out.binary(f).await?;
                        wsout::header(wsout::OP_BINARY, len).1 + len
                    }
                } as u64;
                sent += 1;
                pos.set(next + 1);
            }
            Ok(None) => pos.set(next + 1),
            Err(Missing::Gone) => {
                out.framed(outdated_frame()).await?;
                pos.set((sh.control.oldest().load(Ordering::Acquire) as i64).max(1).max(next + 1));
            }
            Err(Missing::NotYet) => anyhow::bail!("seq {next} is committed but not in the event log"),
        }
    }
    sh.slot().bytes_out.fetch_add(bytes, Ordering::Relaxed);
    out.flush().await?;
    Ok(sent)
}

/// How often a write in progress is checked against the lag limit and
/// the write timeout.
const CUT_CHECK: Duration = Duration::from_secs(1);

/// Why a consumer is cut.
enum Cut {
    Lag { seq: i64, committed: i64 },
    Unwritable { seq: i64, waited: Duration },
}

/// Cut a consumer: `ConsumerTooSlow` if the socket takes it within a
/// second (best effort: a full socket usually does not), then close;
/// counted by reason.
async fn cut(sh: &Shared, mut out: Writer, why: Cut) -> anyhow::Result<()> {
    match why {
        Cut::Lag { seq, committed } => {
            sh.slot().consumers_cut_lag.fetch_add(1, Ordering::Relaxed);
            tracing::info!(shard = sh.id, seq, committed, "consumer too slow (lag past the limit); closing");
        }
        Cut::Unwritable { seq, waited } => {
            sh.slot().consumers_cut_unwritable.fetch_add(1, Ordering::Relaxed);
            tracing::info!(shard = sh.id, seq, waited_s = waited.as_secs(), "consumer not reading; closing");
        }
    }
    let farewell = async {
        out.framed(error_frame("ConsumerTooSlow", "consumer fell too far behind")).await?;
        out.close().await
    };
    let _ =
        futures::future::select(std::pin::pin!(farewell), std::pin::pin!(glommio::timer::sleep(CUT_FAREWELL))).await;
    Ok(())
}

const CUT_FAREWELL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_parsing() {
        assert_eq!(cursor_param("/x"), Ok(None));
        assert_eq!(cursor_param("/x?cursor=5"), Ok(Some(5)));
        assert_eq!(cursor_param("/x?a=b&cursor=0"), Ok(Some(0)));
        assert!(cursor_param("/x?cursor=abc").is_err());
        let fwd = with_peer(
            b"GET /admin/hosts HTTP/1.1\r\nX-Sluice-Peer: 6.6.6.6\r\nhost: x\r\n\r\n",
            "10.1.2.3:9".parse().ok(),
        );
        let h = sluice_common::process::http::parse_request_head(&fwd, 4096).unwrap().unwrap();
        assert_eq!(h.peer.as_deref(), Some("10.1.2.3"), "a client cannot choose its address");
        assert_eq!(h.head_len, fwd.len());
        assert!(cursor_param("/x?cursor=-1").is_err());
        assert!(cursor_param("/x?cursor=-9223372036854775808").is_err());
        assert!(cursor_param("/x?cursor=9007199254740992").is_err());
    }
}
