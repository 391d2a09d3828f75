//! The upstream side of subscribeRepos, by hand (RFC 6455): the client
//! handshake, and a reader of the host's frames whose memory and work are
//! ours to bound. A library connection kept a read buffer as large as the
//! largest frame the host ever sent for the rest of the connection (with
//! thousands of hosts, each able to send one 5 MiB message, that has no
//! useful bound) and looped over buffered frames without yielding.
//!
//! - Memory: one [`READ_BYTES`] buffer per connection. A frame that fits is
//!   handed out from it without a copy; a larger or fragmented message is
//!   assembled in a buffer of its own, read into directly, and given back
//!   when the next message is asked for (kept only up to
//!   [`MESSAGE_KEEP_BYTES`]). The response head may grow the read buffer to
//!   [`HEAD_BYTES_MAX`]; it shrinks back once drained.
//! - Work: [`WsIn::next`] yields to the executor every [`YIELD_BYTES`]
//!   read and every [`YIELD_FRAMES`] frames parsed.
//! - Bounds, each a typed [`WsError`] that ends the connection: a message
//!   over [`MESSAGE_BYTES_MAX`]; more than [`UNFINISHED_BYTES_MAX`] bytes or
//!   [`FRAGMENTS_MAX`] fragments without a complete data message (empty and
//!   1-byte fragments, control-frame floods); a masked, reserved-bit or
//!   unknown-opcode frame, a control frame over 125 bytes or fragmented, a
//!   continuation without a message or a message inside another.
//!
//! Invariant: [`WsIn::next`] is cancel-safe. Every await point leaves the
//! parse state in `self` (buffer positions, the frame being read, the
//! message so far), so the read loop can drop it for a timer or a stop and
//! call it again.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Largest WebSocket message accepted (PROTOCOL.md: 5 MB frames).
pub const MESSAGE_BYTES_MAX: usize = 5 * 1024 * 1024 + 64 * 1024;
/// Bytes without a complete data message: one maximal message and its
/// framing, control frames included.
pub const UNFINISHED_BYTES_MAX: usize = MESSAGE_BYTES_MAX + MESSAGE_BYTES_MAX / 4;
/// Fragments one message may arrive in.
pub const FRAGMENTS_MAX: u32 = 4096;
/// The read buffer each connection keeps.
pub const READ_BYTES: usize = 8 * 1024;
/// The upgrade's response head, at most.
pub const HEAD_BYTES_MAX: usize = 32 * 1024;
/// A message buffer larger than this is freed once its message was used.
pub const MESSAGE_KEEP_BYTES: usize = 64 * 1024;
/// Bytes read, and frames parsed, between two yields to the executor.
pub const YIELD_BYTES: usize = 64 * 1024;
pub const YIELD_FRAMES: u32 = 256;

// The opcodes the server side names too, from one place.
use crate::wsout::{OP_BINARY, OP_CLOSE, OP_PING, OP_PONG};
const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("stream ended")]
    Ended,
    /// The host did not answer the upgrade as a WebSocket server.
    #[error("upgrade: {0}")]
    Upgrade(String),
    /// A bound on bytes or fragments was passed.
    #[error("{0}")]
    Oversized(String),
    /// A frame RFC 6455 forbids.
    #[error("{0}")]
    BadFrame(String),
}

/// A control frame's payload (at most 125 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    bytes: [u8; 125],
    len: u8,
}

impl Control {
    fn new(p: &[u8]) -> Control {
        let mut bytes = [0; 125];
        bytes[..p.len()].copy_from_slice(p);
        Control { bytes, len: p.len() as u8 }
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// What [`WsIn::next`] read.
#[derive(Debug, PartialEq, Eq)]
pub enum In<'a> {
    Binary(&'a [u8]),
    /// A text message (subscribeRepos sends none; its bytes are not kept).
    Text,
    Ping(Control),
    Pong,
    /// The host's close frame, with its status code when it gave one.
    Close(Option<u16>),
}

/// The header of the frame being read.
#[derive(Debug, Clone, Copy)]
struct Frame {
    op: u8,
    fin: bool,
    /// Payload bytes not yet consumed.
    remaining: usize,
}

pub struct WsIn<S> {
    io: S,
    /// Read buffer; `start..end` is unread.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    frame: Option<Frame>,
    /// A data message has begun and its final fragment has not come.
    open: Option<u8>,
    fragments: u32,
    /// The message so far (`msg[..msg_len]`; the rest is zeroed room for
    /// a direct read).
    msg: Vec<u8>,
    msg_len: usize,
    /// The last message handed out was `msg`'s: clear it first.
    delivered: bool,
    since_message: usize,
    since_yield: usize,
    frames_since_yield: u32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIn<S> {
    /// Ask for `path` on `host` (the `Host` header) as a WebSocket, and
    /// check the answer (`101`, the upgrade headers, the accept key).
    pub async fn connect(mut io: S, host: &str, path: &str) -> Result<WsIn<S>, WsError> {
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: sluice/{}\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        );
        io.write_all(req.as_bytes()).await?;
        io.flush().await?;
        let mut buf = vec![0u8; READ_BYTES];
        let mut end = 0;
        let head = loop {
            match sluice_common::process::http::parse_response_head(&buf[..end], HEAD_BYTES_MAX) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(sluice_common::process::http::HeadError::TooLarge(n)) => {
                    return Err(WsError::Oversized(format!("upgrade answer head over {n} bytes")))
                }
                Err(e) => return Err(WsError::Upgrade(e.to_string())),
            }
            if end == buf.len() {
                buf.resize((buf.len() * 2).min(HEAD_BYTES_MAX), 0);
            }
            match io.read(&mut buf[end..]).await? {
                0 => return Err(WsError::Upgrade("connection closed before the answer".into())),
                n => end += n,
            }
        };
        if head.status != 101 {
            return Err(WsError::Upgrade(format!("answered {} instead of 101", head.status)));
        }
        let want = tungstenite::handshake::derive_accept_key(key.as_bytes());
        if !head.websocket || head.ws_accept.as_deref() != Some(want.as_str()) {
            return Err(WsError::Upgrade("101 without the WebSocket headers or with a wrong accept key".into()));
        }
        Ok(WsIn::after_upgrade(io, buf, head.head_len, end))
    }

    /// A connection whose upgrade was done elsewhere (fuzzing, tests).
    pub fn upgraded(io: S) -> WsIn<S> {
        WsIn::after_upgrade(io, vec![0; READ_BYTES], 0, 0)
    }

    /// A connection whose upgrade is done; `buf[start..end]` was read past
    /// the response head.
    fn after_upgrade(io: S, buf: Vec<u8>, start: usize, end: usize) -> WsIn<S> {
        WsIn {
            io,
            buf,
            start,
            end,
            frame: None,
            open: None,
            fragments: 0,
            msg: Vec::new(),
            msg_len: 0,
            delivered: false,
            since_message: 0,
            since_yield: 0,
            frames_since_yield: 0,
        }
    }

    /// The next message or control frame.
    pub async fn next(&mut self) -> Result<In<'_>, WsError> {
        if self.delivered {
            self.delivered = false;
            self.msg_len = 0;
            if self.msg.len() > MESSAGE_KEEP_BYTES {
                self.msg = Vec::new();
            }
        }
        loop {
            if self.since_yield >= YIELD_BYTES || self.frames_since_yield >= YIELD_FRAMES {
                self.since_yield = 0;
                self.frames_since_yield = 0;
                YieldNow(false).await;
            }
            let Some(frame) = self.frame else {
                if !self.header()? {
                    self.read_buffered().await?;
                }
                continue;
            };
            if frame.op >= OP_CLOSE {
                if self.end - self.start < frame.remaining {
                    self.read_buffered().await?;
                    continue;
                }
                return Ok(self.control(frame));
            }
            let whole = frame.fin && self.fragments == 1 && self.msg_len == 0;
            if whole && self.end - self.start >= frame.remaining {
                // The common case: a whole message in the read buffer.
                let at = self.start;
                self.consume_payload(frame.remaining);
                return Ok(if self.message_done() == OP_BINARY {
                    In::Binary(&self.buf[at..at + frame.remaining])
                } else {
                    In::Text
                });
            }
            if self.fill_message(frame).await? {
                self.delivered = true;
                return Ok(if self.message_done() == OP_BINARY {
                    In::Binary(&self.msg[..self.msg_len])
                } else {
                    In::Text
                });
            }
        }
    }

    /// Send a ping (masked, as a client must).
    pub async fn ping(&mut self) -> Result<(), WsError> {
        self.send_control(OP_PING, &[]).await
    }

    pub async fn pong(&mut self, payload: &Control) -> Result<(), WsError> {
        self.send_control(OP_PONG, payload.as_slice()).await
    }

    /// A normal close (best effort: the connection is ending anyway).
    pub async fn close(&mut self) {
        let _ = self.send_control(OP_CLOSE, &1000u16.to_be_bytes()).await;
        let _ = self.io.close().await;
    }

    async fn send_control(&mut self, op: u8, payload: &[u8]) -> Result<(), WsError> {
        debug_assert!(payload.len() <= 125);
        let mask = rand::random::<[u8; 4]>();
        let mut f = [0u8; 6 + 125];
        f[..2].copy_from_slice(&[0x80 | op, 0x80 | payload.len() as u8]);
        f[2..6].copy_from_slice(&mask);
        for (i, b) in payload.iter().enumerate() {
            f[6 + i] = b ^ mask[i % 4];
        }
        self.io.write_all(&f[..6 + payload.len()]).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Parse a frame header from the buffer: `Ok(false)` when it has not
    /// all arrived.
    fn header(&mut self) -> Result<bool, WsError> {
        let Some((frame, len)) = parse_header(&self.buf[self.start..self.end])? else {
            return Ok(false);
        };
        self.start += len;
        self.since_message += len;
        self.frames_since_yield += 1;
        if self.since_message.saturating_add(frame.remaining) > UNFINISHED_BYTES_MAX {
            return Err(WsError::Oversized(format!(
                "more than {UNFINISHED_BYTES_MAX} bytes without a complete message (a frame of {} bytes)",
                frame.remaining
            )));
        }
        if frame.op < OP_CLOSE {
            match (frame.op, self.open) {
                (OP_CONTINUATION, None) => {
                    return Err(WsError::BadFrame("a continuation frame without a message".into()))
                }
                (OP_CONTINUATION, Some(_)) => {}
                (_, Some(_)) => {
                    return Err(WsError::BadFrame("a new message before the last one's final frame".into()))
                }
                (op, None) => {
                    self.open = Some(op);
                    self.fragments = 0;
                }
            }
            self.fragments += 1;
            if self.fragments > FRAGMENTS_MAX {
                return Err(WsError::Oversized(format!("a message in more than {FRAGMENTS_MAX} fragments")));
            }
            if self.msg_len + frame.remaining > MESSAGE_BYTES_MAX {
                return Err(WsError::Oversized(format!("a message over {MESSAGE_BYTES_MAX} bytes")));
            }
        }
        self.frame = Some(frame);
        Ok(true)
    }

    fn consume_payload(&mut self, n: usize) {
        self.start += n;
        self.since_message += n;
        self.frame = None;
    }

    /// A data message is complete: its opcode.
    fn message_done(&mut self) -> u8 {
        self.since_message = 0;
        self.fragments = 0;
        self.open.take().unwrap_or(OP_BINARY)
    }

    /// A control frame, wholly buffered.
    fn control(&mut self, frame: Frame) -> In<'static> {
        let payload = Control::new(&self.buf[self.start..self.start + frame.remaining]);
        self.consume_payload(frame.remaining);
        match frame.op {
            OP_PING => In::Ping(payload),
            OP_PONG => In::Pong,
            _ => In::Close((payload.len >= 2).then(|| u16::from_be_bytes([payload.bytes[0], payload.bytes[1]]))),
        }
    }

    /// Move the current data frame's payload into the message: what is
    /// buffered, then straight from the socket. `Ok(true)` when the
    /// message is complete.
    async fn fill_message(&mut self, mut frame: Frame) -> Result<bool, WsError> {
        let text = self.open == Some(OP_TEXT);
        while frame.remaining > 0 {
            if self.since_yield >= YIELD_BYTES {
                self.since_yield = 0;
                YieldNow(false).await;
            }
            let n = frame.remaining.min(self.end - self.start);
            if n > 0 {
                if !text {
                    self.reserve(frame.remaining);
                    self.msg[self.msg_len..self.msg_len + n].copy_from_slice(&self.buf[self.start..self.start + n]);
                    self.msg_len += n;
                }
                self.start += n;
                self.since_message += n;
                frame.remaining -= n;
                self.frame = Some(frame);
                continue;
            }
            if text || frame.remaining < READ_BYTES {
                self.read_buffered().await?;
                continue;
            }
            // Large: read into the message itself.
            self.reserve(frame.remaining);
            let n = match self.io.read(&mut self.msg[self.msg_len..self.msg_len + frame.remaining]).await? {
                0 => return Err(WsError::Ended),
                n => n,
            };
            self.since_yield += n;
            self.msg_len += n;
            self.since_message += n;
            frame.remaining -= n;
            self.frame = Some(frame);
        }
        self.frame = None;
        Ok(frame.fin)
    }

    /// Room in `msg` for `more` bytes past what it holds.
    fn reserve(&mut self, more: usize) {
        if self.msg.len() < self.msg_len + more {
            self.msg.resize(self.msg_len + more, 0);
        }
    }

    /// Read more into the read buffer (compacting it first, and giving
    /// back a head-sized buffer once it is drained).
    async fn read_buffered(&mut self) -> Result<(), WsError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > READ_BYTES {
                self.buf = vec![0; READ_BYTES];
            }
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        match self.io.read(&mut self.buf[self.end..]).await? {
            0 => Err(WsError::Ended),
            n => {
                self.end += n;
                self.since_yield += n;
                Ok(())
            }
        }
    }

    /// Bytes of memory this connection holds in its buffers (tests).
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity() + self.msg.capacity()
    }
}

/// A frame header at the start of `b`: the frame and the header's length,
/// `Ok(None)` if incomplete.
fn parse_header(b: &[u8]) -> Result<Option<(Frame, usize)>, WsError> {
    if b.len() < 2 {
        return Ok(None);
    }
    let (fin, rsv, op) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0F);
    if rsv != 0 {
        return Err(WsError::BadFrame("reserved bits set (no extension was agreed)".into()));
    }
    if !matches!(op, OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG) {
        return Err(WsError::BadFrame(format!("unknown opcode {op:#x}")));
    }
    if b[1] & 0x80 != 0 {
        return Err(WsError::BadFrame("a masked frame from the server".into()));
    }
    let (len, at) = match b[1] & 0x7F {
        126 if b.len() < 4 => return Ok(None),
        126 => (u16::from_be_bytes([b[2], b[3]]) as u64, 4),
        127 if b.len() < 10 => return Ok(None),
        127 => (u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")), 10),
        n => (n as u64, 2),
    };
    if op >= OP_CLOSE && (!fin || len > 125) {
        return Err(WsError::BadFrame("a fragmented or over-125-byte control frame".into()));
    }
    if len > MESSAGE_BYTES_MAX as u64 {
        return Err(WsError::Oversized(format!("a frame declaring {len} bytes (at most {MESSAGE_BYTES_MAX})")));
    }
    Ok(Some((Frame { op, fin, remaining: len as usize }, at)))
}

/// Give way to the executor once (the task goes to the back of its queue).
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    /// A server's byte stream, delivered `chunk` bytes per read; writes
    /// are kept.
    struct Script {
        data: Vec<u8>,
        at: usize,
        chunk: usize,
        /// Sent over and over once `data` is done (empty: the stream ends).
        repeat: Vec<u8>,
        written: Vec<u8>,
    }

    impl AsyncRead for Script {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
            if self.at == self.data.len() && !self.repeat.is_empty() {
                let again = self.repeat.clone();
                self.data.extend_from_slice(&again);
            }
            let n = buf.len().min(self.chunk).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for Script {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            self.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A server frame (the shard's own downstream framing, FIN cleared
    /// for a fragment).
    fn frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        crate::wsout::frame_header(op, payload.len(), &mut f);
        if !fin {
            f[0] &= 0x7F;
        }
        f.extend_from_slice(payload);
        f
    }

    fn conn(data: Vec<u8>, chunk: usize) -> WsIn<Script> {
        endless(data, Vec::new(), chunk)
    }

    fn endless(data: Vec<u8>, repeat: Vec<u8>, chunk: usize) -> WsIn<Script> {
        WsIn::after_upgrade(Script { data, at: 0, chunk, repeat, written: Vec::new() }, vec![0; READ_BYTES], 0, 0)
    }

    /// Everything `ws` yields until an error, messages as owned bytes.
    fn drain(ws: &mut WsIn<Script>) -> (Vec<Result<Vec<u8>, String>>, WsError) {
        let mut out = Vec::new();
        loop {
            match block_on(ws.next()) {
                Ok(In::Binary(b)) => out.push(Ok(b.to_vec())),
                Ok(other) => out.push(Err(format!("{other:?}"))),
                Err(e) => return (out, e),
            }
        }
    }

    #[test]
    fn messages_whole_fragmented_and_large_at_every_read_size() {
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let mut stream = frame(true, OP_BINARY, b"one");
        stream.extend(frame(false, OP_BINARY, b"tw"));
        stream.extend(frame(true, OP_PING, b"hi"));
        stream.extend(frame(true, OP_CONTINUATION, b"o"));
        stream.extend(frame(true, OP_BINARY, &big));
        stream.extend(frame(true, OP_TEXT, b"ignored"));
        stream.extend(frame(true, OP_BINARY, b""));
        for chunk in [1, 2, 3, 7, 100, 5000, 1 << 20] {
            let (got, end) = drain(&mut conn(stream.clone(), chunk));
            assert!(matches!(end, WsError::Ended), "{end}");
            let ping = format!("{:?}", In::Ping(Control::new(b"hi")));
            let want: Vec<Result<Vec<u8>, String>> = vec![
                Ok(b"one".to_vec()),
                Err(ping),
                Ok(b"two".to_vec()),
                Ok(big.clone()),
                Err("Text".into()),
                Ok(vec![]),
            ];
            assert_eq!(got, want, "read size {chunk}");
        }
    }

    #[test]
    fn a_large_message_is_given_back_after_use() {
        let mut stream = frame(true, OP_BINARY, &vec![7u8; 2 << 20]);
        stream.extend(frame(true, OP_BINARY, b"small"));
        let mut ws = conn(stream, 64 * 1024);
        assert!(matches!(block_on(ws.next()), Ok(In::Binary(b)) if b.len() == 2 << 20));
        assert!(ws.buffered_capacity() >= 2 << 20);
        assert!(matches!(block_on(ws.next()), Ok(In::Binary(b"small"))));
        assert!(ws.buffered_capacity() <= READ_BYTES + MESSAGE_KEEP_BYTES, "{}", ws.buffered_capacity());
    }

    #[test]
    fn floods_and_forbidden_frames_end_the_connection() {
        let flood = |first: Vec<u8>, unit: Vec<u8>, says: &str| {
            let (_, e) = drain(&mut endless(first, unit, 1 << 16));
            assert!(matches!(e, WsError::Oversized(_)) && e.to_string().contains(says), "{e}");
        };
        flood(frame(false, OP_BINARY, b"x"), frame(false, OP_CONTINUATION, b""), "fragments");
        flood(frame(false, OP_BINARY, b"x"), frame(false, OP_CONTINUATION, b"y"), "fragments");
        // Control frames between fragments count against the bytes
        // without a complete message.
        flood(frame(false, OP_BINARY, b"x"), frame(true, OP_PONG, &[0; 125]), "without a complete message");
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("2^62 bytes", vec![0x82, 127, 0x40, 0, 0, 0, 0, 0, 0, 0], "declaring"),
            ("masked", vec![0x82, 0x81, 1, 2, 3, 4, 5], "masked"),
            ("reserved bits", vec![0xC2, 0], "reserved"),
            ("opcode 3", vec![0x83, 0], "opcode"),
            ("long ping", frame(true, OP_PING, &[0; 126]), "control"),
            ("fragmented ping", frame(false, OP_PING, b""), "control"),
            ("lone continuation", frame(true, OP_CONTINUATION, b"x"), "continuation"),
            (
                "message in a message",
                [frame(false, OP_BINARY, b"a"), frame(true, OP_BINARY, b"b")].concat(),
                "new message",
            ),
        ];
        for (what, data, says) in cases {
            let (_, e) = drain(&mut conn(data, 4096));
            assert!(e.to_string().contains(says), "{what}: {e}");
        }
    }

    #[test]
    fn a_flood_yields_to_the_executor_on_the_way() {
        let mut ws = endless(frame(false, OP_BINARY, b"x"), frame(false, OP_CONTINUATION, b""), 1 << 16);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut pending = 0;
        let end = {
            let mut next = Box::pin(ws.next());
            loop {
                match next.as_mut().poll(&mut cx) {
                    Poll::Pending => pending += 1,
                    Poll::Ready(r) => break r.map(|_| ()),
                }
            }
        };
        assert!(matches!(end, Err(WsError::Oversized(_))));
        // 4,096 fragments of 2 bytes: a yield every 256 frames.
        assert!(pending >= 15, "{pending} yields");
    }

    #[test]
    fn pings_are_masked_and_a_close_carries_its_code() {
        let mut ws = conn([frame(true, OP_PING, b"abc"), frame(true, OP_CLOSE, &1001u16.to_be_bytes())].concat(), 4096);
        let Ok(In::Ping(p)) = block_on(ws.next()) else { panic!("ping") };
        block_on(ws.pong(&p)).unwrap();
        assert_eq!(block_on(ws.next()).unwrap(), In::Close(Some(1001)));
        let w = &ws.io.written;
        assert_eq!((w[0], w[1]), (0x8A, 0x83), "a final, masked pong of 3 bytes");
        let unmasked: Vec<u8> = w[6..9].iter().enumerate().map(|(i, b)| b ^ w[2 + i % 4]).collect();
        assert_eq!(unmasked, b"abc");
    }

    #[test]
    fn the_upgrade_is_checked() {
        let answer = |head: &str| {
            let io =
                Script { data: head.as_bytes().to_vec(), at: 0, chunk: 3, repeat: Vec::new(), written: Vec::new() };
            block_on(WsIn::connect(io, "pds.example", "/xrpc/x?cursor=0")).err().map(|e| e.to_string())
        };
        assert!(answer("HTTP/1.1 404 Not Found\r\n\r\n").unwrap().contains("404"));
        assert!(answer("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: x\r\n\r\n")
            .unwrap()
            .contains("accept"));
        assert!(answer("HTTP/1.1 101 OK\r\n").unwrap().contains("closed before"));
        let long = format!("HTTP/1.1 101 OK\r\nx: {}\r\n\r\n", "a".repeat(HEAD_BYTES_MAX));
        assert!(answer(&long).unwrap().contains("over"));
    }
}
