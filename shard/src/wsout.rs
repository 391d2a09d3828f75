//! The consumer side of a subscribeRepos WebSocket, by hand (RFC 6455 §5):
//! the server only sends unmasked, unfragmented binary frames, pings and a
//! close, and only needs to read a client's control frames. A library
//! connection cost a frame object, a header encoding and a copy into its
//! own buffer per frame per consumer; here:
//!
//! - [`FrameCache`]: each recent event is framed once per shard (header and
//!   payload in one buffer), shared by every consumer that sends it;
//! - [`Out`]: a consumer's writes gather into one buffer of
//!   [`GATHER_BYTES`] and reach the socket in one write; a frame larger
//!   than that is written from the cache without a copy;
//! - [`read_client`]: the reader half answers pings (through
//!   [`Conn::pong`], sent by the writer between frames), notices a close
//!   or the socket ending, and refuses client frames over
//!   [`CLIENT_FRAME_BYTES_MAX`].
//!
//! Invariant: frames reach the socket whole and in order; only the writer
//! task writes.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

pub const OP_BINARY: u8 = 2;
pub const OP_CLOSE: u8 = 8;
/// Close codes (RFC 6455 §7.4, and IANA's 1012 "Service Restart").
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_SERVICE_RESTART: u16 = 1012;
pub const OP_PING: u8 = 9;
pub const OP_PONG: u8 = 10;

/// Bytes a consumer's writes gather before one write to its socket.
pub const GATHER_BYTES: usize = 32 * 1024;
/// Largest client frame accepted (consumers send control frames only).
pub const CLIENT_FRAME_BYTES_MAX: usize = 64 * 1024;
/// Bytes of framed events a shard keeps for its consumers.
pub const CACHE_BYTES_MAX: usize = 4 << 20;

/// A server frame header (FIN set, no mask) for `len` bytes: the bytes
/// and how many of them are used (2, 4 or 10).
pub fn header(op: u8, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | op;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= 0xffff {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// Append a server frame header (FIN set, no mask) for `len` bytes.
pub fn frame_header(op: u8, len: usize, out: &mut Vec<u8>) {
    let (h, n) = header(op, len);
    out.extend_from_slice(&h[..n]);
}

/// A whole server frame.
pub fn frame(op: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 10);
    frame_header(op, payload.len(), &mut v);
    v.extend_from_slice(payload);
    v
}

/// What the reader half tells the writer.
#[derive(Default)]
pub struct Conn {
    /// The client closed, or its socket ended or misbehaved.
    pub closed: Cell<bool>,
    /// A ping's payload to answer (the latest; RFC 6455 allows answering
    /// only the last of several).
    pub pong: RefCell<Option<Vec<u8>>>,
}

/// The writer half of one consumer.
pub struct Out<W> {
    w: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> Out<W> {
    pub fn new(w: W) -> Out<W> {
        Out { w, buf: Vec::with_capacity(GATHER_BYTES) }
    }

    /// Queue a framed event (or any whole frame); writes when the buffer
    /// is full. A frame as large as the buffer goes straight out.
    pub async fn framed(&mut self, f: &[u8]) -> std::io::Result<()> {
        if self.buf.len() + f.len() > GATHER_BYTES {
            self.flush().await?;
        }
        if f.len() >= GATHER_BYTES {
            return self.w.write_all(f).await;
        }
        self.buf.extend_from_slice(f);
        Ok(())
    }

    /// Queue a binary frame of `payload`, framed here (a frame the
    /// shard's cache does not keep: no allocation, one copy).
    pub async fn binary(&mut self, payload: &[u8]) -> std::io::Result<()> {
        let (h, n) = header(OP_BINARY, payload.len());
        let head = &h[..n];
        if self.buf.len() + head.len() + payload.len() > GATHER_BYTES {
            self.flush().await?;
        }
        if head.len() + payload.len() >= GATHER_BYTES {
            self.w.write_all(head).await?;
            return self.w.write_all(payload).await;
        }
        self.buf.extend_from_slice(head);
        self.buf.extend_from_slice(payload);
        Ok(())
    }

    pub async fn control(&mut self, op: u8, payload: &[u8]) -> std::io::Result<()> {
        self.framed(&frame(op, payload)).await
    }

    /// Write what is gathered.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.w.write_all(&self.buf).await?;
            self.buf.clear();
        }
        self.w.flush().await
    }

    /// Bytes gathered, not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Send a close frame (status 1000, normal) and flush.
    pub async fn close(&mut self) -> std::io::Result<()> {
        self.close_with(CLOSE_NORMAL).await
    }

    /// Send a close frame with `code` and flush.
    pub async fn close_with(&mut self, code: u16) -> std::io::Result<()> {
        self.control(OP_CLOSE, &code.to_be_bytes()).await?;
        self.flush().await?;
        self.w.close().await
    }
}

/// Read a client's frames until it closes, errs or misbehaves; answer
/// pings through `conn.pong`, calling `wake` so the writer sends it.
pub async fn read_client<R: AsyncRead + Unpin>(mut r: R, conn: Rc<Conn>, wake: impl Fn()) {
    // Small: a consumer sends a ping now and then. A larger frame grows
    // `buf` (to CLIENT_FRAME_BYTES_MAX at most) while it arrives.
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 512];
    'read: loop {
        // Parse every whole frame in `buf`.
        loop {
            match parse_client_frame(&buf) {
                Parsed::Need => break,
                Parsed::Bad => break 'read,
                Parsed::Frame { op, payload, used } => {
                    match op {
                        OP_CLOSE => break 'read,
                        OP_PING => {
                            *conn.pong.borrow_mut() = Some(payload);
                            wake();
                        }
                        _ => {}
                    }
                    buf.drain(..used);
                    if buf.is_empty() && buf.capacity() > 4096 {
                        buf = Vec::new();
                    }
                }
            }
        }
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    conn.closed.set(true);
    wake();
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// Not a whole frame yet.
    Need,
    /// Unmasked, too large, a reserved bit, a fragmented control frame.
    Bad,
    Frame {
        op: u8,
        payload: Vec<u8>,
        used: usize,
    },
}

/// One client frame from the start of `b`: unmasked with the client's key.
fn parse_client_frame(b: &[u8]) -> Parsed {
    if b.len() < 2 {
        return Parsed::Need;
    }
    let (fin, rsv, op) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0f);
    let masked = b[1] & 0x80 != 0;
    if rsv != 0 || !masked || (op >= 8 && !fin) {
        return Parsed::Bad;
    }
    let (len, mut at) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as u64, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")), 10),
        126 | 127 => return Parsed::Need,
        l => (l as u64, 2),
    };
    if len > CLIENT_FRAME_BYTES_MAX as u64 || (op >= 8 && len > 125) {
        return Parsed::Bad;
    }
    let len = len as usize;
    if b.len() < at + 4 + len {
        return Parsed::Need;
    }
    let key = [b[at], b[at + 1], b[at + 2], b[at + 3]];
    at += 4;
    let payload = b[at..at + len].iter().enumerate().map(|(i, x)| x ^ key[i % 4]).collect();
    Parsed::Frame { op, payload, used: at + len }
}

/// Recent events, framed once for every consumer of the shard: a window
/// of consecutive seqs, bounded by bytes, oldest dropped first. `None`
/// entries are seqs a consumer must skip (taken down when framed).
#[derive(Default)]
pub struct FrameCache {
    first: i64,
    frames: VecDeque<Option<Rc<[u8]>>>,
    bytes: usize,
    /// The db-writer's flags generation the frames were read under.
    generation: u64,
}

impl FrameCache {
    /// Forget everything if takedown flags changed since (`generation`
    /// from the control block): the log is read again.
    pub fn check_generation(&mut self, generation: u64) {
        if generation != self.generation {
            self.generation = generation;
            self.frames.clear();
            self.bytes = 0;
        }
    }

    /// The frame of `seq` if cached (`Some(None)`: skip it).
    pub fn get(&self, seq: i64) -> Option<Option<Rc<[u8]>>> {
        let i = seq.checked_sub(self.first)?;
        if i < 0 {
            return None;
        }
        self.frames.get(i as usize).cloned()
    }

    /// Would [`FrameCache::put`] keep `seq`'s frame? (Not a seq older
    /// than the window: a consumer behind it is sent from the log.)
    pub fn keeps(&self, seq: i64) -> bool {
        self.frames.is_empty() || seq >= self.first + self.frames.len() as i64
    }

    /// Remember `seq`'s frame if it extends the window (or starts a new
    /// one after a gap); older seqs are not cached.
    pub fn put(&mut self, seq: i64, f: Option<Rc<[u8]>>) {
        let end = self.first + self.frames.len() as i64;
        if self.frames.is_empty() || seq != end {
            if !self.frames.is_empty() && seq < end {
                return;
            }
            self.frames.clear();
            self.bytes = 0;
            self.first = seq;
        }
        self.bytes += f.as_ref().map_or(0, |f| f.len());
        self.frames.push_back(f);
        while self.bytes > CACHE_BYTES_MAX && self.frames.len() > 1 {
            if let Some(Some(old)) = self.frames.pop_front() {
                self.bytes -= old.len();
            }
            self.first += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(op: u8, payload: &[u8]) -> Vec<u8> {
        let key = [1u8, 2, 3, 4];
        let mut v = vec![0x80 | op];
        if payload.len() < 126 {
            v.push(0x80 | payload.len() as u8);
        } else {
            v.push(0x80 | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(&key);
        v.extend(payload.iter().enumerate().map(|(i, x)| x ^ key[i % 4]));
        v
    }

    #[test]
    fn headers_match_the_three_length_forms() {
        for (len, head) in [(5usize, 2usize), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut v = Vec::new();
            frame_header(OP_BINARY, len, &mut v);
            assert_eq!(v.len(), head, "{len}");
            assert_eq!(v[0], 0x82);
        }
        let f = frame(OP_BINARY, &[7u8; 300]);
        assert_eq!(&f[..4], &[0x82, 126, 1, 44]);
        assert_eq!(f.len(), 304);
    }

    #[test]
    fn client_frames_parse_and_bad_ones_are_refused() {
        let ping = masked(OP_PING, b"hi");
        assert_eq!(parse_client_frame(&ping), Parsed::Frame { op: OP_PING, payload: b"hi".to_vec(), used: ping.len() });
        for cut in 0..ping.len() {
            assert_eq!(parse_client_frame(&ping[..cut]), Parsed::Need, "{cut}");
        }
        let big = masked(OP_BINARY, &[0u8; 300]);
        assert!(matches!(parse_client_frame(&big), Parsed::Frame { op: OP_BINARY, used, .. } if used == big.len()));
        // Unmasked, reserved bit, fragmented ping, oversized control frame,
        // a length past the limit.
        assert_eq!(parse_client_frame(&[0x89, 0x00]), Parsed::Bad);
        assert_eq!(parse_client_frame(&[0xc9, 0x80, 0, 0, 0, 0]), Parsed::Bad);
        assert_eq!(parse_client_frame(&[0x09, 0x80, 0, 0, 0, 0]), Parsed::Bad);
        assert_eq!(parse_client_frame(&masked(OP_PING, &[0u8; 126])), Parsed::Bad);
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(parse_client_frame(&huge), Parsed::Bad);
    }

    #[test]
    fn cache_keeps_a_window_bounded_by_bytes() {
        let mut c = FrameCache::default();
        let f = |n: usize| Some(Rc::<[u8]>::from(vec![0u8; n]));
        c.put(10, f(100));
        c.put(11, None);
        c.put(12, f(100));
        assert!(c.get(9).is_none());
        assert_eq!(c.get(11), Some(None));
        assert_eq!(c.get(12).unwrap().unwrap().len(), 100);
        assert!(c.get(13).is_none());
        // Older than the window: not cached; a gap starts a new window.
        c.put(5, f(1));
        assert!(c.get(5).is_none());
        c.put(20, f(10));
        assert!(c.get(12).is_none());
        assert_eq!(c.get(20).unwrap().unwrap().len(), 10);
        // Bounded: the oldest go first.
        let big = CACHE_BYTES_MAX / 4 + 1;
        for s in 21..30 {
            c.put(s, f(big));
        }
        assert!(c.bytes <= CACHE_BYTES_MAX);
        assert!(c.get(21).is_none());
        assert!(c.get(29).is_some());
    }
}
