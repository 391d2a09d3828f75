//! The single-producer single-consumer ring between a shard (producer) and
//! the db-writer (consumer), in a memfd shared mapping.
//!
//! Layout: a 256-byte header (magic, capacity; `head` and `tail` on their
//! own cache lines), then `capacity` bytes of data (a power of two). `head`
//! and `tail` are byte counters that only grow; a position is the counter
//! modulo the capacity. A record is `len: u32 ‖ crc32c(payload): u32 ‖
//! payload`, padded to 8 bytes, never split: when it would run past the end
//! of the buffer, the producer writes a pad marker (`len = u32::MAX`) and
//! starts the record at offset 0.
//!
//! Protocol (the only ordering that matters):
//! - producer: write payload and record header into free space, then
//!   `head.store(new, Release)`. A producer that dies before that store
//!   leaves nothing visible: its successor reads `head` from the header and
//!   overwrites the garbage. Nothing a producer writes is ever visible half
//!   done.
//! - consumer: `head.load(Acquire)`, read records below it (validating
//!   length and CRC: the paired check of what the producer wrote), and
//!   only after the records' effects are durable, `tail.store(end,
//!   Release)`. A consumer that dies re-reads from `tail`.
//!
//! The consumer may read ahead of `tail` (its private position); the
//! producer never writes between `tail` and `head`. So a record's bytes
//! cannot change once published: the consumer checks each record's CRC
//! the first time it reads it and not again when it reads the same
//! record twice (the db-writer reads a round's records once to prefetch
//! their accounts and once to apply them; `Consumer::checked`).

use crate::ipc::shm::{Shm, ShmError};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

pub const RING_MAGIC: u64 = 0x534c_5549_4345_5231; // "SLUICER1"
const OFF_MAGIC: usize = 0;
const OFF_CAPACITY: usize = 8;
const OFF_HEAD: usize = 64;
const OFF_TAIL: usize = 128;
/// Data starts here.
pub const HEADER_BYTES: usize = 256;
const RECORD_HEADER: u64 = 8;
const PAD: u32 = u32::MAX;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("ring record at {pos}: length {len} is impossible")]
    Length { pos: u64, len: u32 },
    #[error("ring record at {pos}: checksum mismatch")]
    Crc { pos: u64 },
    #[error("ring counters inconsistent: head {head}, tail {tail}, capacity {cap}")]
    Counters { head: u64, tail: u64, cap: u64 },
}

/// The shared mapping of one ring, with typed access to its header.
pub struct Ring {
    shm: Shm,
    cap: u64,
}

fn align8(n: u64) -> u64 {
    (n + 7) & !7
}

impl Ring {
    /// Create a ring with `capacity` data bytes (a power of two).
    pub fn create(name: &str, capacity: u64) -> Result<Ring, ShmError> {
        assert!(capacity.is_power_of_two() && capacity >= 4096, "ring capacity {capacity}");
        let shm = Shm::create(name, HEADER_BYTES + capacity as usize)?;
        shm.u64_at(OFF_CAPACITY).store(capacity, Ordering::Relaxed);
        shm.u64_at(OFF_MAGIC).store(RING_MAGIC, Ordering::Release);
        Ok(Ring { shm, cap: capacity })
    }

    /// # Safety
    /// As [`Shm::from_raw_fd`].
    pub unsafe fn from_raw_fd(fd: RawFd) -> Result<Ring, ShmError> {
        // SAFETY: forwarded to the caller.
        let shm = unsafe { Shm::from_raw_fd(fd) }?;
        if shm.len() < HEADER_BYTES + 4096 {
            return Err(ShmError::Size { fd, len: shm.len(), need: HEADER_BYTES + 4096 });
        }
        let found = shm.u64_at(OFF_MAGIC).load(Ordering::Acquire);
        if found != RING_MAGIC {
            return Err(ShmError::Magic { fd, found, expected: RING_MAGIC });
        }
        let cap = shm.u64_at(OFF_CAPACITY).load(Ordering::Relaxed);
        if !cap.is_power_of_two() || HEADER_BYTES as u64 + cap != shm.len() as u64 {
            return Err(ShmError::Size { fd, len: shm.len(), need: HEADER_BYTES + cap as usize });
        }
        Ok(Ring { shm, cap })
    }

    pub fn fd(&self) -> RawFd {
        self.shm.fd()
    }

    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// Largest payload one record may carry.
    pub fn payload_max(&self) -> usize {
        (self.cap / 4) as usize - RECORD_HEADER as usize
    }

    fn head(&self) -> &AtomicU64 {
        self.shm.u64_at(OFF_HEAD)
    }

    fn tail(&self) -> &AtomicU64 {
        self.shm.u64_at(OFF_TAIL)
    }

    /// Bytes in use (published, not yet released).
    pub fn used(&self) -> u64 {
        self.head().load(Ordering::Acquire).wrapping_sub(self.tail().load(Ordering::Acquire))
    }

    /// Published and released counters (for metrics and shutdown).
    pub fn counters(&self) -> (u64, u64) {
        (self.head().load(Ordering::Acquire), self.tail().load(Ordering::Acquire))
    }

    /// Pointer to data offset `pos` (modulo capacity).
    fn data(&self, pos: u64) -> *mut u8 {
        let off = (pos & (self.cap - 1)) as usize;
        // SAFETY: `off < cap`, and the mapping holds HEADER_BYTES + cap.
        unsafe { self.shm.as_ptr().add(HEADER_BYTES + off) }
    }

    fn write_u32(&self, pos: u64, v: u32) {
        // SAFETY: the producer owns [head, tail + cap); `pos` is 8-aligned
        // and the 4 bytes lie inside the data area (records never wrap).
        unsafe { (self.data(pos) as *mut u32).write(v.to_le()) }
    }

    fn read_u32(&self, pos: u64) -> u32 {
        // SAFETY: the consumer reads only below a head it loaded with
        // Acquire; aligned, in bounds.
        u32::from_le(unsafe { (self.data(pos) as *const u32).read() })
    }
}

/// The writing end (a shard). One per ring, ever at a time.
pub struct Producer {
    ring: Ring,
    /// Our copy of `head` (we are its only writer).
    head: u64,
}

impl Producer {
    /// Take the producer role; continues from the published `head` (a
    /// predecessor's unpublished bytes are simply overwritten).
    pub fn new(ring: Ring) -> Producer {
        let head = ring.head().load(Ordering::Acquire);
        Producer { ring, head }
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Space a record of `len` payload bytes takes, pad included, at the
    /// current position.
    fn need(&self, len: usize) -> (u64, u64) {
        let rec = align8(RECORD_HEADER + len as u64);
        let pos = self.head & (self.ring.cap - 1);
        let pad = if pos + rec > self.ring.cap { self.ring.cap - pos } else { 0 };
        (pad, rec)
    }

    /// Would a record of `len` payload bytes fit now?
    pub fn has_room(&self, len: usize) -> bool {
        let (pad, rec) = self.need(len);
        let tail = self.ring.tail().load(Ordering::Acquire);
        self.head + pad + rec - tail <= self.ring.cap
    }

    /// Append one record whose payload `fill` writes into exactly `len`
    /// bytes; `false` (nothing written) when the ring is full.
    ///
    /// # Panics
    /// If `len` exceeds [`Ring::payload_max`] (a bug: callers bound it).
    pub fn try_push(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) -> bool {
        assert!(len <= self.ring.payload_max(), "ring record of {len} bytes");
        if !self.has_room(len) {
            return false;
        }
        let (pad, rec) = self.need(len);
        if pad > 0 {
            self.ring.write_u32(self.head, PAD);
            self.head += pad;
        }
        let start = self.head;
        // SAFETY: [start + 8, start + 8 + len) lies in free space owned by
        // the producer (checked by has_room) and does not wrap (padding).
        let payload = unsafe { std::slice::from_raw_parts_mut(self.ring.data(start + RECORD_HEADER), len) };
        fill(payload);
        let crc = crc32c::crc32c(payload);
        self.ring.write_u32(start, len as u32);
        self.ring.write_u32(start + 4, crc);
        self.head = start + rec;
        self.ring.head().store(self.head, Ordering::Release);
        true
    }
}

/// One record read by the consumer: its payload (borrowed from the shared
/// mapping) and the position just past it (what to release up to).
pub struct Record<'a> {
    pub payload: &'a [u8],
    pub end: u64,
}

/// The reading end (the db-writer).
pub struct Consumer {
    ring: Ring,
    /// Next byte to read (≥ tail).
    read: u64,
    /// Every record below this position passed its length and CRC checks
    /// (≥ tail; may be above `read` after a seek back). Published records
    /// do not change until released, so they are not checked twice.
    checked: u64,
}

impl Consumer {
    /// Take the consumer role; reads from the released position.
    pub fn new(ring: Ring) -> Consumer {
        let read = ring.tail().load(Ordering::Acquire);
        Consumer { ring, read, checked: read }
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn position(&self) -> u64 {
        self.read
    }

    /// Bytes published past our read position.
    pub fn unread(&self) -> u64 {
        self.ring.head().load(Ordering::Acquire).wrapping_sub(self.read)
    }

    /// Is a published record waiting past our read position?
    pub fn has_data(&self) -> bool {
        self.ring.head().load(Ordering::Acquire) != self.read
    }

    /// Read the next record, if any. The payload stays valid until
    /// [`Consumer::release`] passes it.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, RingError> {
        let head = self.ring.head().load(Ordering::Acquire);
        let tail = self.ring.tail().load(Ordering::Acquire);
        if head.wrapping_sub(tail) > self.ring.cap || self.read > head || self.read < tail {
            return Err(RingError::Counters { head, tail, cap: self.ring.cap });
        }
        if self.read == head {
            return Ok(None);
        }
        let mut pos = self.read;
        if self.ring.read_u32(pos) == PAD {
            pos = (pos | (self.ring.cap - 1)) + 1;
            if pos >= head {
                return Err(RingError::Length { pos: self.read, len: PAD });
            }
        }
        let len = self.ring.read_u32(pos);
        let rec = align8(RECORD_HEADER + len as u64);
        let fits = (pos & (self.ring.cap - 1)) + rec <= self.ring.cap;
        if len as usize > self.ring.payload_max() || pos + rec > head || !fits {
            return Err(RingError::Length { pos, len });
        }
        let crc = self.ring.read_u32(pos + 4);
        // SAFETY: [pos + 8, pos + 8 + len) is below the Acquire-loaded head
        // and above tail, so the producer finished it and will not touch it
        // until we release past it; it does not wrap (checked above).
        let payload = unsafe { std::slice::from_raw_parts(self.ring.data(pos + RECORD_HEADER), len as usize) };
        if pos >= self.checked {
            if crc32c::crc32c(payload) != crc {
                return Err(RingError::Crc { pos });
            }
            self.checked = pos + rec;
        }
        self.read = pos + rec;
        Ok(Some(Record { payload, end: self.read }))
    }

    /// Everything before `upto` is durable: give the space back.
    pub fn release(&self, upto: u64) {
        debug_assert!(upto <= self.read);
        self.ring.tail().store(upto, Ordering::Release);
    }

    /// Go back to `pos`, where this consumer read from earlier and has not
    /// released past, to read the same records again.
    pub fn seek_back(&mut self, pos: u64) {
        debug_assert!(pos <= self.read);
        self.read = pos;
    }

    /// Go back to the released position (after a failed commit, the same
    /// records are read again).
    pub fn rewind(&mut self) {
        self.read = self.ring.tail().load(Ordering::Acquire);
    }

    /// Drop everything published (a corrupt ring): returns the bytes lost.
    pub fn discard_all(&mut self) -> u64 {
        let head = self.ring.head().load(Ordering::Acquire);
        let tail = self.ring.tail().load(Ordering::Acquire);
        self.read = head;
        self.checked = head;
        self.ring.tail().store(head, Ordering::Release);
        head.wrapping_sub(tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dup_ring(r: &Ring) -> Ring {
        let fd = nix::unistd::dup(r.fd()).unwrap();
        // SAFETY: a fresh dup we own.
        unsafe { Ring::from_raw_fd(fd) }.unwrap()
    }

    fn payload(i: u64) -> Vec<u8> {
        let len = (i * 7919 % 3000) as usize + 1;
        (0..len).map(|j| (i as usize + j) as u8).collect()
    }

    #[test]
    fn fifo_with_wraparound() {
        let ring = Ring::create("t", 1 << 14).unwrap();
        let mut c = Consumer::new(dup_ring(&ring));
        let mut p = Producer::new(ring);
        let (mut sent, mut got) = (0u64, 0u64);
        while got < 5000 {
            while sent < 5000 && p.try_push(payload(sent).len(), |b| b.copy_from_slice(&payload(sent))) {
                sent += 1;
            }
            let mut end = None;
            for _ in 0..3 {
                match c.next_record().unwrap() {
                    Some(r) => {
                        assert_eq!(r.payload, payload(got).as_slice(), "record {got}");
                        got += 1;
                        end = Some(r.end);
                    }
                    None => break,
                }
            }
            if let Some(e) = end {
                c.release(e);
            }
        }
        assert!(c.next_record().unwrap().is_none());
    }

    #[test]
    fn full_ring_refuses_and_recovers() {
        let ring = Ring::create("t", 4096).unwrap();
        let mut c = Consumer::new(dup_ring(&ring));
        let mut p = Producer::new(ring);
        let mut n = 0;
        while p.try_push(500, |b| b.fill(n as u8)) {
            n += 1;
        }
        assert!((6..=8).contains(&n), "{n}");
        assert!(!p.has_room(500));
        let r = c.next_record().unwrap().unwrap();
        let end = r.end;
        c.release(end);
        assert!(p.try_push(500, |b| b.fill(0xee)));
    }

    #[test]
    fn unreleased_records_are_read_again_after_rewind() {
        let ring = Ring::create("t", 4096).unwrap();
        let mut c = Consumer::new(dup_ring(&ring));
        let mut p = Producer::new(ring);
        for i in 0..3u8 {
            assert!(p.try_push(10, |b| b.fill(i)));
        }
        let first_end = c.next_record().unwrap().unwrap().end;
        c.release(first_end);
        c.next_record().unwrap().unwrap();
        c.rewind(); // e.g. the commit of record 1 failed
        assert_eq!(c.next_record().unwrap().unwrap().payload, &[1u8; 10]);
        // A new consumer (db-writer restart) starts at the released point.
        let mut c2 = Consumer::new(dup_ring(c.ring()));
        assert_eq!(c2.next_record().unwrap().unwrap().payload, &[1u8; 10]);
        // Two passes over the same records (the db-writer's prefetch).
        let start = c2.position();
        assert_eq!(c2.unread(), 24, "one record of 8 + 10 bytes, aligned");
        assert_eq!(c2.next_record().unwrap().unwrap().payload, &[2u8; 10]);
        assert!(c2.next_record().unwrap().is_none());
        assert_eq!(c2.unread(), 0);
        c2.seek_back(start);
        assert_eq!(c2.next_record().unwrap().unwrap().payload, &[2u8; 10]);
    }

    #[test]
    fn a_producer_dying_mid_write_leaves_nothing_visible() {
        let ring = Ring::create("t", 4096).unwrap();
        let mut c = Consumer::new(dup_ring(&ring));
        let mut p = Producer::new(dup_ring(&ring));
        assert!(p.try_push(10, |b| b.fill(1)));
        // A "crash" inside fill: the payload is half written, head unmoved.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            p.try_push(100, |b| {
                b[..50].fill(0xff);
                panic!("shard died");
            })
        }));
        assert!(r.is_err());
        // Its successor continues from the published head.
        let mut p2 = Producer::new(ring);
        assert!(p2.try_push(20, |b| b.fill(2)));
        assert_eq!(c.next_record().unwrap().unwrap().payload, &[1u8; 10]);
        assert_eq!(c.next_record().unwrap().unwrap().payload, &[2u8; 20]);
        assert!(c.next_record().unwrap().is_none());
    }

    #[test]
    fn corruption_is_detected_not_trusted() {
        let ring = Ring::create("t", 4096).unwrap();
        let mut c = Consumer::new(dup_ring(&ring));
        let mut p = Producer::new(dup_ring(&ring));
        assert!(p.try_push(10, |b| b.fill(1)));
        // Flip a payload byte behind the producer's back.
        // SAFETY: test-only write into the data area.
        unsafe { *ring.data(9) ^= 1 };
        assert_eq!(c.next_record().err(), Some(RingError::Crc { pos: 0 }));
        assert_eq!(c.discard_all(), 24);
        assert!(c.next_record().unwrap().is_none());
        // An impossible length is caught too.
        assert!(p.try_push(10, |b| b.fill(1)));
        ring.write_u32(24, 4000);
        assert!(matches!(c.next_record(), Err(RingError::Length { .. })));
    }

    #[test]
    fn a_record_read_again_is_not_checked_again_but_a_new_one_is() {
        let ring = Ring::create("t", 4096).unwrap();
        let mut c = Consumer::new(dup_ring(&ring));
        let mut p = Producer::new(dup_ring(&ring));
        assert!(p.try_push(10, |b| b.fill(1)));
        assert!(p.try_push(10, |b| b.fill(2)));
        assert_eq!(c.next_record().unwrap().unwrap().payload, &[1; 10]);
        // Bytes changed under a record already checked (the protocol
        // forbids it: published records are immutable until released)
        // go unseen on the second read, the db-writer's apply after its
        // prefetch: the check was paid once.
        // SAFETY: test-only write into the data area.
        unsafe { *ring.data(9) ^= 1 };
        c.seek_back(0);
        assert_eq!(c.next_record().unwrap().unwrap().payload[1], 0);
        // The second record was never read: it is checked.
        // SAFETY: as above.
        unsafe { *ring.data(24 + 9) ^= 1 };
        assert_eq!(c.next_record().err(), Some(RingError::Crc { pos: 24 }));
        // After a rewind too, what was checked stays checked and what was
        // not is checked.
        c.rewind();
        assert!(c.next_record().unwrap().is_some());
        assert_eq!(c.next_record().err(), Some(RingError::Crc { pos: 24 }));
    }

    /// Two threads, one ring, 200,000 records of varying size.
    #[test]
    fn threaded_stress() {
        let ring = Ring::create("t", 1 << 16).unwrap();
        let mut c = Consumer::new(dup_ring(&ring));
        let total = 200_000u64;
        let t = std::thread::spawn(move || {
            let mut p = Producer::new(ring);
            for i in 0..total {
                let v = payload(i % 97);
                while !p.try_push(v.len() + 8, |b| {
                    b[..8].copy_from_slice(&i.to_le_bytes());
                    b[8..].copy_from_slice(&v);
                }) {
                    std::hint::spin_loop();
                }
            }
        });
        let mut next = 0u64;
        while next < total {
            let mut end = None;
            while let Some(r) = c.next_record().unwrap() {
                let i = u64::from_le_bytes(r.payload[..8].try_into().unwrap());
                assert_eq!(i, next);
                assert_eq!(&r.payload[8..], payload(i % 97).as_slice());
                next += 1;
                end = Some(r.end);
            }
            if let Some(e) = end {
                c.release(e);
            }
        }
        t.join().unwrap();
    }
}
