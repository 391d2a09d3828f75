//! The consumer side of a subscribeRepos WebSocket, by hand (RFC 6455 §5):
//! the server only sends unmasked, unfragmented binary frames, pings and a
//! close, and only needs to read a client's control frames. A library
//! connection cost a frame object, a header encoding and a copy into its
//! own buffer per frame per consumer; here:
//!
//! - [`FrameCache`]: each recent event is framed once per shard (header and
//!   payload in one buffer), shared by every consumer that sends it;
//! - [`Out`]: a consumer's frames queue as references (to the cache or
//!   the log's mapping: no copy per consumer) and reach the socket in
//!   vectored writes ([`VectoredSocket`]) of up to [`GATHER_BYTES`];
//! - [`read_client`]: the reader half answers pings (through
//!   [`Conn::pong`], sent by the writer between frames), notices a close
//!   or the socket ending, and refuses client frames over
//!   [`CLIENT_FRAME_BYTES_MAX`].
//!
//! Invariant: frames reach the socket whole and in order; only the writer
//! task writes.

use bytes::{Bytes, BytesMut};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use sluice_common::ipc::eventlog::LogFrame;
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
pub const GATHER_BYTES: usize = 64 * 1024;
/// Pieces (frames, headers) a consumer's writes gather before one write.
pub const GATHER_PIECES: usize = 128;
/// Buffers per vectored write (Linux takes up to 1,024).
const IOV_PER_WRITE: usize = GATHER_PIECES;
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

/// One piece of a consumer's queued output.
enum Piece {
    /// A whole frame: from the shard's cache, or made for this consumer
    /// (control, error, info).
    Frame(Bytes),
    /// A frame header (its payload follows as the next piece).
    Head([u8; 10], u8),
    /// An event log record's bytes, sent from the mapping.
    Log(LogFrame),
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        match self {
            Piece::Frame(f) => f,
            Piece::Head(h, n) => &h[..usize::from(*n)],
            Piece::Log(f) => f.bytes(),
        }
    }
}

/// The writer half of one consumer: frames queue as references (to the
/// shard's cache or the log's mapping, never copied here) and reach the
/// socket in vectored writes of up to [`IOV_PER_WRITE`] pieces.
pub struct Out<W> {
    w: W,
    /// At most [`GATHER_PIECES`] + 1 pieces: a push past the bound writes.
    queue: VecDeque<Piece>,
    /// Bytes queued, the written part of the first piece included.
    queued: usize,
    /// Bytes of the first piece already written.
    done: usize,
}

impl<W: AsyncWrite + Unpin> Out<W> {
    pub fn new(w: W) -> Out<W> {
        Out { w, queue: VecDeque::new(), queued: 0, done: 0 }
    }

    fn push(&mut self, p: Piece) {
        self.queued += p.bytes().len();
        self.queue.push_back(p);
    }

    /// Write what is queued if it passed [`GATHER_BYTES`] or
    /// [`GATHER_PIECES`].
    async fn maybe_flush(&mut self) -> std::io::Result<()> {
        if self.queued >= GATHER_BYTES || self.queue.len() >= GATHER_PIECES {
            self.write_queued().await?;
        }
        Ok(())
    }

    /// Queue a frame from the shard's cache.
    pub async fn shared(&mut self, f: Bytes) -> std::io::Result<()> {
        self.push(Piece::Frame(f));
        self.maybe_flush().await
    }

    /// Queue a whole frame made for this consumer.
    pub async fn framed(&mut self, f: Vec<u8>) -> std::io::Result<()> {
        self.shared(Bytes::from(f)).await
    }

    /// Queue a binary frame of a log record (one the shard's cache does
    /// not keep): its header, then the record's bytes from the mapping.
    pub async fn binary(&mut self, payload: LogFrame) -> std::io::Result<()> {
        let (h, n) = header(OP_BINARY, payload.bytes().len());
        self.push(Piece::Head(h, n as u8));
        self.push(Piece::Log(payload));
        self.maybe_flush().await
    }

    pub async fn control(&mut self, op: u8, payload: &[u8]) -> std::io::Result<()> {
        self.framed(frame(op, payload)).await
    }

    /// Write everything queued, in vectored writes.
    async fn write_queued(&mut self) -> std::io::Result<()> {
        while !self.queue.is_empty() {
            // The buffers are built in each poll, so the task does not
            // carry them across the wait.
            let (queue, done, w) = (&self.queue, self.done, &mut self.w);
            let n = std::future::poll_fn(|cx| {
                let mut iov = [std::io::IoSlice::new(&[]); IOV_PER_WRITE];
                let mut used = 0;
                for (i, p) in queue.iter().take(IOV_PER_WRITE).enumerate() {
                    iov[i] = std::io::IoSlice::new(if i == 0 { &p.bytes()[done..] } else { p.bytes() });
                    used = i + 1;
                }
                std::pin::Pin::new(&mut *w).poll_write_vectored(cx, &iov[..used])
            })
            .await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.consume(n);
        }
        Ok(())
    }

    /// `n` more bytes were written: drop the pieces they finish.
    fn consume(&mut self, mut n: usize) {
        self.queued -= n;
        while let Some(first) = self.queue.front() {
            let left = first.bytes().len() - self.done;
            if n < left {
                self.done += n;
                return;
            }
            n -= left;
            self.done = 0;
            self.queue.pop_front();
        }
        debug_assert_eq!(n, 0, "wrote more than was queued");
    }

    /// Write what is queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        self.write_queued().await?;
        self.w.flush().await
    }

    /// Bytes queued, not yet written.
    pub fn pending(&self) -> usize {
        self.queued
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

/// A socket's write half that writes a vector of buffers in one
/// `sendmsg` (glommio's stream writes one buffer per call): tried first
/// without waiting; a full socket waits through glommio's own write of
/// the first buffer.
pub struct VectoredSocket<W> {
    w: W,
    /// The socket's descriptor; open while `w` (a half of its stream)
    /// lives.
    fd: std::os::fd::RawFd,
}

impl<W> VectoredSocket<W> {
    pub fn new(w: W, fd: std::os::fd::RawFd) -> VectoredSocket<W> {
        VectoredSocket { w, fd }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for VectoredSocket<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.w).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use nix::sys::socket::{sendmsg, MsgFlags};
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        loop {
            match sendmsg::<()>(self.fd, bufs, &[], flags, None) {
                Ok(n) => return std::task::Poll::Ready(Ok(n)),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => return std::task::Poll::Ready(Err(e.into())),
            }
        }
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
        std::pin::Pin::new(&mut self.w).poll_write(cx, first)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.w).poll_flush(cx)
    }

    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.w).poll_close(cx)
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
///
/// Frames are packed into chunks of [`CHUNK_BYTES`] (each allocated whole,
/// so above glibc's mmap threshold as the supervisor sets it): a chunk
/// goes back to the kernel as soon as its last frame left the window and
/// every consumer's queue. Frames of per-frame heap allocations, freed in
/// the middle of the heap, had stayed resident after the consumers left.
#[derive(Default)]
pub struct FrameCache {
    first: i64,
    frames: VecDeque<Option<Bytes>>,
    bytes: usize,
    /// The db-writer's flags generation the frames were read under.
    generation: u64,
    /// The newest chunk's unused end, where the next frame is written.
    chunk: BytesMut,
}

/// Bytes of one chunk of framed events.
pub const CHUNK_BYTES: usize = 64 * 1024;

impl FrameCache {
    /// Forget everything if takedown flags changed since (`generation`
    /// from the control block): the log is read again.
    pub fn check_generation(&mut self, generation: u64) {
        if generation != self.generation {
            self.generation = generation;
            self.clear();
        }
    }

    /// Forget every frame (and the chunk being filled): the shard's last
    /// consumer left, or the frames are stale.
    pub fn clear(&mut self) {
        self.frames = VecDeque::new();
        self.bytes = 0;
        self.chunk = BytesMut::new();
    }

    /// The frame of `seq` if cached (`Some(None)`: skip it).
    pub fn get(&self, seq: i64) -> Option<Option<Bytes>> {
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

    /// Frame `payload` as a binary frame: into the current chunk, or (a
    /// frame over a quarter chunk) an allocation of its own.
    fn frame(&mut self, payload: &[u8]) -> Bytes {
        let (h, n) = header(OP_BINARY, payload.len());
        let len = n + payload.len();
        if len > CHUNK_BYTES / 4 {
            let mut own = BytesMut::with_capacity(len);
            own.extend_from_slice(&h[..n]);
            own.extend_from_slice(payload);
            return own.freeze();
        }
        if self.chunk.capacity() < len {
            self.chunk = BytesMut::with_capacity(CHUNK_BYTES);
        }
        self.chunk.extend_from_slice(&h[..n]);
        self.chunk.extend_from_slice(payload);
        self.chunk.split().freeze()
    }

    /// Frame `seq`'s event (`None`: a seq to skip) and remember it if it
    /// extends the window (or starts a new one after a gap); older seqs
    /// are framed but not kept. Returns the frame.
    pub fn put(&mut self, seq: i64, payload: Option<&[u8]>) -> Option<Bytes> {
        let f = payload.map(|p| self.frame(p));
        let end = self.first + self.frames.len() as i64;
        if self.frames.is_empty() || seq != end {
            if !self.frames.is_empty() && seq < end {
                return f;
            }
            self.frames.clear();
            self.bytes = 0;
            self.first = seq;
        }
        self.bytes += f.as_ref().map_or(0, |f| f.len());
        self.frames.push_back(f.clone());
        while self.bytes > CACHE_BYTES_MAX && self.frames.len() > 1 {
            if let Some(Some(old)) = self.frames.pop_front() {
                self.bytes -= old.len();
            }
            self.first += 1;
        }
        f
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

    /// Takes at most `at_most` bytes per write, across buffers.
    struct Trickle {
        got: Vec<u8>,
        at_most: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.calls += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.at_most - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                if n == self.at_most {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn queued_pieces_reach_the_writer_whole_and_in_order_through_partial_writes() {
        futures::executor::block_on(async {
            let mut cache = FrameCache::default();
            let mut out = Out::new(Trickle { got: Vec::new(), at_most: 7, calls: 0 });
            let mut want = Vec::new();
            for s in 1..300i64 {
                let payload = vec![s as u8; (s as usize * 37) % 700];
                let f = cache.put(s, Some(&payload)).unwrap();
                want.extend_from_slice(&f);
                out.shared(f).await.unwrap();
                if s % 50 == 0 {
                    out.control(OP_PING, b"hi").await.unwrap();
                    want.extend_from_slice(&frame(OP_PING, b"hi"));
                }
            }
            assert!(out.pending() > 0 && out.pending() < GATHER_BYTES);
            out.flush().await.unwrap();
            assert_eq!(out.pending(), 0);
            assert_eq!(out.w.got.len(), want.len());
            assert!(out.w.got == want, "bytes differ");
            assert!(out.w.calls >= want.len() / 7);
        });
    }

    #[test]
    fn a_full_socket_is_waited_for_and_nothing_is_lost() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        // Far more than the socket buffer: sendmsg finds it full, the
        // fallback write waits while the reader drains.
        let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        let mut want = Vec::new();
        futures::executor::block_on(async {
            let mut out = Out::new(VectoredSocket::new(futures::io::AllowStdIo::new(a), fd));
            for _ in 0..2000 {
                let f = frame(OP_BINARY, &payload);
                want.extend_from_slice(&f);
                out.shared(Bytes::from(f)).await.unwrap();
            }
            out.flush().await.unwrap();
        });
        let got = reader.join().unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes differ");
    }

    #[test]
    fn cache_keeps_a_window_bounded_by_bytes() {
        let mut c = FrameCache::default();
        let p = |n: usize| vec![7u8; n];
        assert_eq!(c.put(10, Some(&p(100))).unwrap()[..], frame(OP_BINARY, &p(100))[..]);
        assert_eq!(c.put(11, None), None);
        c.put(12, Some(&p(100)));
        assert!(c.get(9).is_none());
        assert_eq!(c.get(11), Some(None));
        assert_eq!(c.get(12).unwrap().unwrap()[..], frame(OP_BINARY, &p(100))[..]);
        assert!(c.get(13).is_none());
        // Older than the window: framed, not cached; a gap starts a new
        // window.
        assert_eq!(c.put(5, Some(&p(1))).unwrap()[..], frame(OP_BINARY, &p(1))[..]);
        assert!(c.get(5).is_none());
        c.put(20, Some(&p(10)));
        assert!(c.get(12).is_none());
        assert_eq!(c.get(20).unwrap().unwrap().len(), 12);
        // Bounded: the oldest go first.
        let big = CACHE_BYTES_MAX / 4 + 1;
        for s in 21..30 {
            c.put(s, Some(&p(big)));
        }
        assert!(c.bytes <= CACHE_BYTES_MAX);
        assert!(c.get(21).is_none());
        assert!(c.get(29).is_some());
        c.clear();
        assert!(c.get(29).is_none() && c.keeps(29) && c.bytes == 0);
    }

    #[test]
    fn cache_packs_small_frames_into_chunks() {
        let mut c = FrameCache::default();
        let a = c.put(1, Some(&[1u8; 300])).unwrap();
        let b = c.put(2, Some(&[2u8; 300])).unwrap();
        // One after the other in one chunk.
        assert_eq!(b.as_ptr() as usize, a.as_ptr() as usize + a.len());
        // A large frame has its own allocation; the chunk goes on after.
        let big = c.put(3, Some(&vec![3u8; CHUNK_BYTES / 2])).unwrap();
        assert_eq!(big.len(), CHUNK_BYTES / 2 + 4);
        let d = c.put(4, Some(&[4u8; 300])).unwrap();
        assert_eq!(d.as_ptr() as usize, b.as_ptr() as usize + b.len());
        // A full chunk starts another; frames stay whole and correct.
        let mut last = d;
        for s in 5..500 {
            let f = c.put(s, Some(&[s as u8; 1000])).unwrap();
            assert_eq!(f[..], frame(OP_BINARY, &[s as u8; 1000])[..]);
            last = f;
        }
        assert_eq!(c.get(499).unwrap().unwrap(), last);
        assert_eq!(c.get(1).unwrap().unwrap()[..], frame(OP_BINARY, &[1u8; 300])[..]);
    }
}
