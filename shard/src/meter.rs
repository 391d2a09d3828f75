//! Byte accounting between an upstream socket and the WebSocket parser,
//! so that no host can hold the shard's executor or cost it unbounded
//! work, whatever it sends.
//!
//! [`Metered`] wraps the stream the WebSocket library reads (plain TCP, or
//! TLS above it) and does two things on every read:
//! - **yield**: after [`YIELD_BYTES`] read since the task last gave way, the
//!   next read answers `Pending` (waking itself at once), so the host task
//!   goes to the back of the executor's queue. The WebSocket parser loops
//!   over buffered frames without ever returning to us (empty continuation
//!   frames and control frames never complete a message); this is what
//!   makes it stop.
//! - **bound**: bytes read since the last complete data message
//!   ([`Meter::message_done`]) may not pass [`Meter::set_bound`]; past it
//!   the read fails and [`Meter::tripped`] says why. During the handshake
//!   the bound is the response head's; after it, one maximal message plus
//!   its framing. Empty fragments, 1-byte fragments and ping floods all
//!   run into it.

use futures::{AsyncRead, AsyncWrite};
use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// Bytes a host task may read before it yields to the executor.
pub const YIELD_BYTES: usize = 64 * 1024;

/// The shared counters of one connection.
#[derive(Debug)]
pub struct Meter {
    since_yield: Cell<usize>,
    since_message: Cell<usize>,
    bound: Cell<usize>,
    tripped: Cell<bool>,
    yields: Cell<u64>,
}

impl Meter {
    pub fn new(bound: usize) -> Rc<Meter> {
        Rc::new(Meter {
            since_yield: Cell::new(0),
            since_message: Cell::new(0),
            bound: Cell::new(bound),
            tripped: Cell::new(false),
            yields: Cell::new(0),
        })
    }

    /// A new bound, counted from now.
    pub fn set_bound(&self, bound: usize) {
        self.bound.set(bound);
        self.since_message.set(0);
    }

    /// A complete data message arrived: its bytes are accounted for.
    pub fn message_done(&self) {
        self.since_message.set(0);
    }

    /// The bound was passed (the read that failed said so).
    pub fn tripped(&self) -> bool {
        self.tripped.get()
    }

    /// Times the task gave way (tests).
    pub fn yields(&self) -> u64 {
        self.yields.get()
    }
}

/// A stream whose reads are metered by a [`Meter`].
pub struct Metered<S> {
    inner: S,
    meter: Rc<Meter>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, meter: Rc<Meter>) -> Metered<S> {
        Metered { inner, meter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
        let m = self.meter.clone();
        if m.since_yield.get() >= YIELD_BYTES {
            m.since_yield.set(0);
            m.yields.set(m.yields.get() + 1);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        // Never read past the bound: a hostile peer gets exactly its quota.
        let room = m.bound.get().saturating_sub(m.since_message.get()) + 1;
        let want = buf.len().min(room);
        match Pin::new(&mut self.inner).poll_read(cx, &mut buf[..want]) {
            Poll::Ready(Ok(n)) => {
                m.since_yield.set(m.since_yield.get() + n);
                m.since_message.set(m.since_message.get() + n);
                if m.since_message.get() > m.bound.get() {
                    m.tripped.set(true);
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("more than {} bytes without a complete message", m.bound.get()),
                    )));
                }
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::AsyncReadExt;

    /// A source that always has data: the worst case for a parser loop.
    struct Endless;
    impl AsyncRead for Endless {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
            buf.fill(0x80);
            Poll::Ready(Ok(buf.len()))
        }
    }

    fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let waker = futures::task::noop_waker();
        Pin::new(f).poll(&mut Context::from_waker(&waker))
    }

    /// An endless source yields every YIELD_BYTES and fails once the bound
    /// is passed, having read at most bound + 1 bytes.
    #[test]
    fn yields_and_bounds_an_endless_source() {
        let meter = Meter::new(1 << 20);
        let mut s = Metered::new(Endless, meter.clone());
        let mut buf = vec![0u8; 4096];
        let (mut read, mut pendings) = (0usize, 0);
        loop {
            let mut f = s.read(&mut buf);
            match poll_once(&mut f) {
                Poll::Ready(Ok(n)) => read += n,
                Poll::Ready(Err(e)) => {
                    assert!(e.to_string().contains("without a complete message"), "{e}");
                    break;
                }
                Poll::Pending => pendings += 1,
            }
            assert!(read <= (1 << 20) + 1, "read past the bound: {read}");
        }
        assert!(meter.tripped());
        assert_eq!(pendings, (1 << 20) / YIELD_BYTES);
        assert_eq!(meter.yields(), pendings as u64);
    }

    /// A completed message resets the count; a new bound starts afresh.
    #[test]
    fn message_done_resets_the_count() {
        let meter = Meter::new(10_000);
        let mut s = Metered::new(Endless, meter.clone());
        let mut buf = vec![0u8; 1000];
        for _ in 0..100 {
            let mut f = s.read(&mut buf);
            assert!(matches!(poll_once(&mut f), Poll::Ready(Ok(1000)) | Poll::Pending));
            meter.message_done();
        }
        assert!(!meter.tripped());
        // A read may take one byte past the new bound, which trips it.
        meter.set_bound(500);
        let mut r = Poll::Pending;
        for _ in 0..2 {
            let mut f = s.read(&mut buf);
            r = poll_once(&mut f);
            if r.is_ready() {
                break;
            }
        }
        assert!(matches!(r, Poll::Ready(Err(_))), "{r:?}");
        assert!(meter.tripped());
    }
}
