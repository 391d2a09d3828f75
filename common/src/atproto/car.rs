//! CARv1 slices: the `blocks` field of `#commit` and `#sync` events.
//!
//! Layout: `varint(len) ‖ header` where header is DAG-CBOR
//! `{version: 1, roots: [cid]}`, then sections `varint(len) ‖ cid ‖ block`
//! until the end of input. [`CarSlice::parse`] checks sha-256 of every block
//! against its CID, rejects truncated sections, bad varints and trailing
//! garbage, and indexes the blocks by CID as borrowed slices (no copy).
//! Duplicate blocks are tolerated (the hash check makes them identical).
//!
//! Blocks are kept in a `Vec` sorted by CID: commits carry 3 to 30 blocks,
//! for which a sorted vector beats a hash map on both building and lookup.
//! The vector holds offsets into the input and is a thread's spare
//! (`atproto::spare`): a slice allocates nothing once the thread is warm.

use crate::atproto::cbor::{CborError, Reader, Writer};
use crate::atproto::cid::{Cid, CidError};
use crate::atproto::spare::Spares;
use smallvec::SmallVec;

/// A block: its CID and where its bytes lie in the slice's input.
type BlockAt = (Cid, u32, u32);

thread_local! {
    static BLOCK_LISTS: Spares<BlockAt> = const { Spares::new(4, 4096) };
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum CarError {
    #[error("bad varint at byte {0}")]
    Varint(usize),
    #[error("CAR section at byte {0} runs past the end of input")]
    Truncated(usize),
    #[error("CAR header: {0}")]
    Header(CborError),
    #[error("CAR header version {0} (expected 1)")]
    Version(u64),
    #[error("CAR has no roots")]
    NoRoots,
    #[error("CAR section at byte {0}: {1}")]
    Cid(usize, CidError),
    #[error("block {0} does not hash to its CID")]
    HashMismatch(Cid),
    #[error("CAR has more than {0} blocks")]
    TooManyBlocks(usize),
    #[error("CAR of {0} bytes (blocks are indexed by 32-bit offsets)")]
    TooLarge(usize),
}

/// Upper bound on blocks in one slice (2,000,000 bytes / 37 bytes per
/// minimal section); a bound, not a policy.
pub const BLOCKS_MAX: usize = 60_000;

/// A parsed, hash-checked CAR slice borrowing from its input.
#[derive(Debug)]
pub struct CarSlice<'a> {
    pub roots: SmallVec<[Cid; 1]>,
    buf: &'a [u8],
    blocks: Vec<BlockAt>,
}

impl Clone for CarSlice<'_> {
    fn clone(&self) -> Self {
        let mut blocks = BLOCK_LISTS.with(Spares::take);
        blocks.extend_from_slice(&self.blocks);
        CarSlice { roots: self.roots.clone(), buf: self.buf, blocks }
    }
}

impl Drop for CarSlice<'_> {
    fn drop(&mut self) {
        let blocks = std::mem::take(&mut self.blocks);
        let _ = BLOCK_LISTS.try_with(|s| s.give(blocks));
    }
}

/// Read an unsigned LEB128 varint (at most 9 bytes, value < 2^63).
pub fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, CarError> {
    let start = *pos;
    let mut v: u64 = 0;
    for i in 0..9 {
        let b = *buf.get(*pos).ok_or(CarError::Varint(start))?;
        *pos += 1;
        v |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            // Reject overlong encodings (a trailing zero group).
            if i > 0 && b == 0 {
                return Err(CarError::Varint(start));
            }
            return Ok(v);
        }
    }
    Err(CarError::Varint(start))
}

pub fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

impl<'a> CarSlice<'a> {
    pub fn parse(buf: &'a [u8]) -> Result<CarSlice<'a>, CarError> {
        let mut pos = 0;
        let hlen = read_varint(buf, &mut pos)? as usize;
        let hend = pos.checked_add(hlen).filter(|&e| e <= buf.len()).ok_or(CarError::Truncated(0))?;
        let roots = parse_header(&buf[pos..hend])?;
        pos = hend;
        // Blocks are indexed by u32 offsets (frames are at most a few MB).
        if u32::try_from(buf.len()).is_err() {
            return Err(CarError::TooLarge(buf.len()));
        }
        // Built first, so an error below gives its list back.
        let mut car = CarSlice { roots, buf, blocks: BLOCK_LISTS.with(Spares::take) };
        while pos < buf.len() {
            let at = pos;
            let len = read_varint(buf, &mut pos)? as usize;
            let end = pos.checked_add(len).filter(|&e| e <= buf.len()).ok_or(CarError::Truncated(at))?;
            let (cid, clen) = Cid::read_prefix(&buf[pos..end]).map_err(|e| CarError::Cid(at, e))?;
            let data = &buf[pos + clen..end];
            if !cid.matches(data) {
                return Err(CarError::HashMismatch(cid));
            }
            if car.blocks.len() == BLOCKS_MAX {
                return Err(CarError::TooManyBlocks(BLOCKS_MAX));
            }
            car.blocks.push((cid, (pos + clen) as u32, end as u32));
            pos = end;
        }
        car.blocks.sort_unstable_by_key(|b| b.0);
        car.blocks.dedup_by(|a, b| a.0 == b.0);
        Ok(car)
    }

    pub fn root(&self) -> Cid {
        self.roots[0]
    }

    pub fn get(&self, cid: &Cid) -> Option<&'a [u8]> {
        self.blocks.binary_search_by(|(c, _, _)| c.cmp(cid)).ok().map(|i| self.at(i))
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Cid, &'a [u8])> + '_ {
        (0..self.blocks.len()).map(|i| (self.blocks[i].0, self.at(i)))
    }

    /// The bytes of block `i`.
    fn at(&self, i: usize) -> &'a [u8] {
        let (_, start, end) = self.blocks[i];
        &self.buf[start as usize..end as usize]
    }
}

fn parse_header(h: &[u8]) -> Result<SmallVec<[Cid; 1]>, CarError> {
    let mut r = Reader::new(h);
    let n = r.map().map_err(CarError::Header)?;
    let mut version = None;
    let mut roots = SmallVec::new();
    for _ in 0..n {
        match r.key().map_err(CarError::Header)? {
            "version" => version = Some(r.u64().map_err(CarError::Header)?),
            "roots" => {
                let k = r.array().map_err(CarError::Header)?;
                for _ in 0..k {
                    roots.push(r.cid().map_err(CarError::Header)?);
                }
            }
            _ => {
                r.skip(1).map_err(CarError::Header)?;
            }
        }
    }
    r.finish().map_err(CarError::Header)?;
    match version {
        Some(1) => {}
        Some(v) => return Err(CarError::Version(v)),
        None => return Err(CarError::Header(CborError::Missing("version"))),
    }
    if roots.is_empty() {
        return Err(CarError::NoRoots);
    }
    Ok(roots)
}

/// Build a CARv1 with one root from `(cid, block)` pairs.
pub fn write_car<'b>(root: &Cid, blocks: impl IntoIterator<Item = (&'b Cid, &'b [u8])>) -> Vec<u8> {
    let mut h = Writer::new();
    h.map(2);
    h.text("roots");
    h.array(1);
    h.cid(root);
    h.text("version");
    h.u64(1);
    let mut out = Vec::with_capacity(1024);
    write_varint(&mut out, h.buf.len() as u64);
    out.extend_from_slice(&h.buf);
    for (cid, data) in blocks {
        let cb = cid.to_bytes();
        write_varint(&mut out, (cb.len() + data.len()) as u64);
        out.extend_from_slice(&cb);
        out.extend_from_slice(data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atproto::cid::Codec;

    fn sample() -> (Cid, Vec<u8>) {
        let a = b"\xa1aa\x01".to_vec();
        let b = b"\xa1ab\x02".to_vec();
        let ca = Cid::compute(Codec::DagCbor, &a);
        let cb = Cid::compute(Codec::DagCbor, &b);
        (ca, write_car(&ca, [(&ca, &a[..]), (&cb, &b[..])]))
    }

    #[test]
    fn round_trip() {
        let (root, car) = sample();
        let s = CarSlice::parse(&car).unwrap();
        assert_eq!(s.root(), root);
        assert_eq!(s.len(), 2);
        assert_eq!(s.get(&root), Some(&b"\xa1aa\x01"[..]));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let (_, car) = sample();
        for cut in 0..car.len() {
            let r = CarSlice::parse(&car[..cut]);
            // A cut exactly at a section boundary is a valid shorter CAR.
            if let Ok(s) = r {
                assert!(s.len() < 2);
            }
        }
    }

    #[test]
    fn rejects_bad_hash_and_garbage() {
        let (_, mut car) = sample();
        let last = car.len() - 1;
        car[last] ^= 1;
        assert!(matches!(CarSlice::parse(&car), Err(CarError::HashMismatch(_))));
        let (_, mut car) = sample();
        car.extend_from_slice(&[0x05, 1, 2]);
        assert!(matches!(CarSlice::parse(&car), Err(CarError::Truncated(_))));
        let (_, mut car) = sample();
        car.push(0x80);
        assert!(matches!(CarSlice::parse(&car), Err(CarError::Varint(_))));
    }

    #[test]
    fn varints() {
        for v in [0u64, 1, 127, 128, 300, 1 << 40] {
            let mut b = Vec::new();
            write_varint(&mut b, v);
            let mut p = 0;
            assert_eq!(read_varint(&b, &mut p).unwrap(), v);
            assert_eq!(p, b.len());
        }
        let mut p = 0;
        assert!(read_varint(&[0x81, 0x00], &mut p).is_err());
        let mut p = 0;
        assert!(read_varint(&[0xff; 12], &mut p).is_err());
    }
}
