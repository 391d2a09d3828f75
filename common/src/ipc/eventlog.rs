//! The event log: the relay's sequenced stream on disk, written by the
//! db-writer only, read (mmap) by every shard to serve consumers.
//!
//! Layout in `data_dir/events/`:
//! - `{first_seq:020}.seg`: records, each a 40-byte [`Header`] followed by
//!   the frame exactly as sent to consumers, padded to 8 bytes. The file is
//!   created at its full size (sparse), so readers can map it once; the end
//!   of the written part is the first header whose length word is zero.
//! - `{first_seq:020}.idx`: one little-endian u64 per record, the record's
//!   offset in the segment plus one (zero = not written). Record `seq` is at
//!   index `seq - first_seq`, so cursor lookup is O(1).
//!
//! Invariants:
//! - Seqs are dense: every seq from the first segment's `first_seq` to the
//!   last record written is present exactly once, in order.
//! - A reader reads only seqs at or below the committed watermark, which
//!   the db-writer advances only after [`LogWriter::sync`] returned, so it
//!   never sees a torn record.
//! - On start the writer scans the last segment, keeps records with a
//!   valid CRC up to the durable seq Postgres recorded, and zeroes the rest
//!   (a torn tail from a crash, or records whose Postgres transaction never
//!   committed).

use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const HEADER_BYTES: usize = 40;
/// Frames above this cannot be in the log (PROTOCOL.md: 5 MB frames).
pub const FRAME_BYTES_MAX: usize = 8 << 20;
/// Header flag: the account was taken down; replay skips the record.
pub const FLAG_TAKEDOWN: u8 = 1;
/// Average record size the index is sized for.
const INDEX_BYTES_PER_RECORD: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("event log {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("event log segment {path}: record at offset {offset} is corrupt ({why})")]
    Corrupt { path: PathBuf, offset: u64, why: &'static str },
    #[error("event log ends at seq {log} but Postgres says seq {durable} is durable")]
    Behind { log: i64, durable: i64 },
    #[error("frame of {0} bytes is too large for the event log")]
    TooLarge(usize),
    #[error("seq {seq} appended out of order (expected {expected})")]
    OutOfOrder { seq: i64, expected: i64 },
}

impl LogError {
    /// Out of space (ENOSPC or EDQUOT): the writer pauses instead of
    /// failing (db-writer).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, LogError::Io { err, .. }
            if err.kind() == std::io::ErrorKind::StorageFull
                || err.raw_os_error().is_some_and(|c| c == libc::ENOSPC || c == libc::EDQUOT))
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> LogError + '_ {
    move |err| LogError::Io { path: path.to_owned(), err }
}

/// A record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub seq: i64,
    pub kind: u8,
    pub flags: u8,
    pub did_hash: u64,
    pub time_micros: i64,
}

impl Header {
    fn encode(&self, frame: &[u8], out: &mut [u8; HEADER_BYTES]) {
        out[0..4].copy_from_slice(&self.len.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16] = self.kind;
        out[17] = self.flags;
        out[18..24].fill(0);
        out[24..32].copy_from_slice(&self.did_hash.to_le_bytes());
        out[32..40].copy_from_slice(&self.time_micros.to_le_bytes());
        let crc = record_crc(out, frame);
        out[4..8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode and check a header and its frame from `bytes` (which start
    /// at the header). `None` = end of data (zero length).
    fn decode(bytes: &[u8]) -> Result<Option<(Header, &[u8])>, &'static str> {
        Header::decode_checked(bytes, true)
    }

    /// As [`Header::decode`]; `verify: false` skips the CRC (a record
    /// this process already verified).
    fn decode_checked(bytes: &[u8], verify: bool) -> Result<Option<(Header, &[u8])>, &'static str> {
        if bytes.len() < HEADER_BYTES {
            return Err("header past the end of the segment");
        }
        let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
        if len == 0 {
            return Ok(None);
        }
        if len as usize > FRAME_BYTES_MAX || HEADER_BYTES + len as usize > bytes.len() {
            return Err("length out of range");
        }
        let frame = &bytes[HEADER_BYTES..HEADER_BYTES + len as usize];
        let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        if verify && record_crc(bytes, frame) != crc {
            return Err("CRC mismatch");
        }
        let h = Header {
            len,
            seq: i64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")),
            kind: bytes[16],
            flags: bytes[17],
            did_hash: u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes")),
            time_micros: i64::from_le_bytes(bytes[32..40].try_into().expect("8 bytes")),
        };
        Ok(Some((h, frame)))
    }
}

/// Check and split one record at the start of `bytes` (what every reader
/// of segments does, exposed for the fuzz target): `Ok(None)` at the end
/// of the data, the record's seq and frame otherwise.
pub fn decode_record(bytes: &[u8]) -> Result<Option<(i64, &[u8])>, &'static str> {
    Ok(Header::decode(bytes)?.map(|(h, frame)| (h.seq, frame)))
}

/// CRC32C of a record: the header after the CRC word, except the flags
/// byte (so a takedown can flip flags with one byte write, which readers
/// see whole), then the frame.
fn record_crc(header: &[u8], frame: &[u8]) -> u32 {
    let c = crc32c::crc32c(&header[8..17]);
    let c = crc32c::crc32c_append(c, &header[18..40]);
    crc32c::crc32c_append(c, frame)
}

/// Offset of the flags byte in a record header.
const FLAGS_AT: u64 = 17;

/// Set (`on`) or clear `flag` on every record up to `upto_seq` whose DID
/// hash `hash_wanted` accepts and whose frame `matches` (to rule out hash
/// collisions). Each change is one byte written in place; readers see the
/// old or the new flags, never a broken record. Returns how many records
/// changed. Used for takedowns: replay skips flagged records.
pub fn set_flags(
    dir: &Path,
    hash_wanted: impl Fn(u64) -> bool,
    upto_seq: i64,
    flag: u8,
    on: bool,
    matches: impl Fn(&[u8]) -> bool,
) -> Result<u64, LogError> {
    let mut changed = 0;
    for first in list_segments(dir)? {
        if first > upto_seq {
            break;
        }
        let (dpath, _) = segment_paths(dir, first);
        let file = match OpenOptions::new().read(true).write(true).open(&dpath) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // retention removed it
            Err(err) => return Err(LogError::Io { path: dpath, err }),
        };
        // SAFETY: read-only map; the only writes to these bytes are the
        // single flag bytes below and appends past what we read.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err(&dpath))?;
        let mut off = 0u64;
        let mut dirty = false;
        while (off as usize) + HEADER_BYTES <= map.len() {
            let Ok(Some((h, frame))) = Header::decode(&map[off as usize..]) else { break };
            if h.seq > upto_seq {
                break;
            }
            let want = if on { h.flags | flag } else { h.flags & !flag };
            if want != h.flags && hash_wanted(h.did_hash) && matches(frame) {
                file.write_all_at(&[want], off + FLAGS_AT).map_err(io_err(&dpath))?;
                changed += 1;
                dirty = true;
            }
            off += record_bytes(h.len as usize);
        }
        if dirty {
            file.sync_data().map_err(io_err(&dpath))?;
        }
        crate::process::failpoint::hit("flags-after-segment");
    }
    Ok(changed)
}

fn record_bytes(frame_len: usize) -> u64 {
    ((HEADER_BYTES + frame_len + 7) & !7) as u64
}

pub fn segment_paths(dir: &Path, first_seq: i64) -> (PathBuf, PathBuf) {
    (dir.join(format!("{first_seq:020}.seg")), dir.join(format!("{first_seq:020}.idx")))
}

/// First seqs of the segments in `dir`, ascending.
pub fn list_segments(dir: &Path) -> Result<Vec<i64>, LogError> {
    let mut v = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
        Err(err) => return Err(LogError::Io { path: dir.to_owned(), err }),
    };
    for e in rd {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".seg") {
            if let Ok(s) = stem.parse::<i64>() {
                v.push(s);
            }
        }
    }
    v.sort_unstable();
    Ok(v)
}

fn index_capacity(segment_bytes: u64) -> u64 {
    (segment_bytes / INDEX_BYTES_PER_RECORD).max(1024)
}

struct OpenSegment {
    first_seq: i64,
    data: File,
    idx: File,
    data_path: PathBuf,
    /// Bytes written.
    end: u64,
    /// Records written.
    count: u64,
    /// Last record's time, for retention.
    last_time: i64,
    /// Records appended but not written yet: they end at `end`, and their
    /// index entries end at `count`.
    pend: Vec<u8>,
    pend_idx: Vec<u8>,
}

/// Appended bytes buffered before a write, at most.
const PENDING_BYTES_MAX: usize = 8 << 20;

impl OpenSegment {
    /// Write the buffered records and index entries (no sync).
    fn write_pending(&mut self) -> Result<(), LogError> {
        if self.pend.is_empty() {
            return Ok(());
        }
        if crate::process::failpoint::switched_on("eventlog-enospc") {
            return Err(LogError::Io {
                path: self.data_path.clone(),
                err: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        let at = self.end - self.pend.len() as u64;
        self.data.write_all_at(&self.pend, at).map_err(io_err(&self.data_path))?;
        let idx_at = self.count * 8 - self.pend_idx.len() as u64;
        self.idx.write_all_at(&self.pend_idx, idx_at).map_err(io_err(&self.data_path))?;
        self.pend.clear();
        self.pend_idx.clear();
        Ok(())
    }
}

/// The db-writer's side.
pub struct LogWriter {
    dir: PathBuf,
    segment_bytes: u64,
    index_cap: u64,
    cur: Option<OpenSegment>,
    /// Segments written since the last sync (the current one included).
    dirty: Vec<(File, File)>,
    dir_dirty: bool,
    next_seq: i64,
}

/// Remove the last segments whose first seq is past `durable_seq` (never
/// committed); true if any was.
fn drop_uncommitted(dir: &Path, segs: &mut Vec<i64>, durable_seq: i64) -> Result<bool, LogError> {
    let mut removed = false;
    while let Some(&last) = segs.last() {
        if last <= durable_seq {
            break;
        }
        let (d, i) = segment_paths(dir, last);
        std::fs::remove_file(&d).map_err(io_err(&d))?;
        let _ = std::fs::remove_file(&i);
        removed = true;
        segs.pop();
    }
    Ok(removed)
}

/// What a segment holds up to the durable seq ([`scan_segment`]).
struct Scan {
    /// Bytes of the records kept.
    off: u64,
    count: u64,
    last_seq: i64,
    last_time: i64,
    /// The offset index of the kept records, as written to the index file.
    index: Vec<u8>,
}

/// Read the segment starting at `first` record by record while the seqs
/// follow and stay at or below `durable_seq`.
fn scan_segment(data: &File, path: &Path, len: u64, first: i64, durable_seq: i64) -> Result<Scan, LogError> {
    // SAFETY: we are the only writer of the log (one db-writer), and
    // nothing writes this file while the map lives.
    let map = unsafe { Mmap::map(data) }.map_err(io_err(path))?;
    let mut s = Scan { off: 0, count: 0, last_seq: first - 1, last_time: 0, index: Vec::new() };
    while s.off < len && s.last_seq < durable_seq {
        match Header::decode(&map[s.off as usize..]) {
            Ok(Some((h, _))) if h.seq == s.last_seq + 1 => {
                s.index.extend_from_slice(&(s.off + 1).to_le_bytes());
                s.off += record_bytes(h.len as usize);
                s.count += 1;
                s.last_seq = h.seq;
                s.last_time = h.time_micros;
            }
            _ => break,
        }
    }
    Ok(s)
}

impl LogWriter {
    /// Open the log, repairing it to end exactly at `durable_seq` (the last
    /// seq Postgres recorded as committed). A fresh log starts at
    /// `durable_seq + 1`.
    pub fn open(dir: &Path, segment_bytes: u64, durable_seq: i64) -> Result<LogWriter, LogError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut w = LogWriter {
            dir: dir.to_owned(),
            segment_bytes,
            index_cap: index_capacity(segment_bytes),
            cur: None,
            dirty: Vec::new(),
            dir_dirty: false,
            next_seq: durable_seq + 1,
        };
        let mut segs = list_segments(dir)?;
        w.dir_dirty = drop_uncommitted(dir, &mut segs, durable_seq)?;
        let Some(&last) = segs.last() else {
            return Ok(w);
        };
        let (dpath, ipath) = segment_paths(dir, last);
        let data = OpenOptions::new().read(true).write(true).open(&dpath).map_err(io_err(&dpath))?;
        let idx = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&ipath)
            .map_err(io_err(&ipath))?;
        let len = data.metadata().map_err(io_err(&dpath))?.len();
        let Scan { off, count, last_seq, last_time, index } = scan_segment(&data, &dpath, len, last, durable_seq)?;
        if last_seq < durable_seq {
            return Err(LogError::Behind { log: last_seq, durable: durable_seq });
        }
        // Zero everything after the kept records: truncate, re-extend.
        data.set_len(off).map_err(io_err(&dpath))?;
        data.set_len(len.max(segment_bytes)).map_err(io_err(&dpath))?;
        w.index_cap = index_capacity(len.max(segment_bytes));
        idx.set_len(0).map_err(io_err(&ipath))?;
        idx.set_len(w.index_cap * 8).map_err(io_err(&ipath))?;
        idx.write_all_at(&index, 0).map_err(io_err(&ipath))?;
        data.sync_all().map_err(io_err(&dpath))?;
        idx.sync_all().map_err(io_err(&ipath))?;
        w.cur = Some(OpenSegment {
            first_seq: last,
            data,
            idx,
            data_path: dpath,
            end: off,
            count,
            last_time,
            pend: Vec::new(),
            pend_idx: Vec::new(),
        });
        Ok(w)
    }

    /// The seq the next append must carry.
    pub fn next_seq(&self) -> i64 {
        self.next_seq
    }

    /// Drop what was appended since the last durable seq and open the log
    /// again at `durable_seq` (after a failed group commit: the records
    /// are appended again from the rings).
    pub fn reopen(&mut self, durable_seq: i64) -> Result<(), LogError> {
        let (dir, segment_bytes) = (self.dir.clone(), self.segment_bytes);
        // Close the current files first: open() repairs the same segment.
        self.cur = None;
        self.dirty.clear();
        *self = LogWriter::open(&dir, segment_bytes, durable_seq)?;
        Ok(())
    }

    /// Append one record. Not durable until [`LogWriter::sync`].
    pub fn append(
        &mut self,
        seq: i64,
        kind: u8,
        flags: u8,
        did_hash: u64,
        time_micros: i64,
        frame: &[u8],
    ) -> Result<(), LogError> {
        if seq != self.next_seq {
            return Err(LogError::OutOfOrder { seq, expected: self.next_seq });
        }
        if frame.len() > FRAME_BYTES_MAX || record_bytes(frame.len()) > self.segment_bytes {
            return Err(LogError::TooLarge(frame.len()));
        }
        let need = record_bytes(frame.len());
        let full = match &self.cur {
            None => true,
            Some(c) => c.end + need > self.segment_bytes.max(c.end) || c.count >= self.index_cap,
        };
        if full {
            self.roll(seq)?;
        }
        let c = self.cur.as_mut().expect("rolled");
        let h = Header { len: frame.len() as u32, seq, kind, flags, did_hash, time_micros };
        let mut hb = [0u8; HEADER_BYTES];
        h.encode(frame, &mut hb);
        // Buffered: one write per group commit, not two syscalls per record.
        c.pend_idx.extend_from_slice(&(c.end + 1).to_le_bytes());
        c.pend.extend_from_slice(&hb);
        c.pend.extend_from_slice(frame);
        c.pend.resize(c.pend.len() + (need as usize - HEADER_BYTES - frame.len()), 0);
        c.end += need;
        c.count += 1;
        c.last_time = time_micros;
        self.next_seq += 1;
        if c.pend.len() > PENDING_BYTES_MAX {
            c.write_pending()?;
        }
        Ok(())
    }

    fn roll(&mut self, first_seq: i64) -> Result<(), LogError> {
        if let Some(mut c) = self.cur.take() {
            c.write_pending()?;
            self.dirty.push((c.data, c.idx));
        }
        let (dpath, ipath) = segment_paths(&self.dir, first_seq);
        let data = OpenOptions::new().read(true).write(true).create_new(true).open(&dpath).map_err(io_err(&dpath))?;
        data.set_len(self.segment_bytes).map_err(io_err(&dpath))?;
        let idx = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&ipath)
            .map_err(io_err(&ipath))?;
        self.index_cap = index_capacity(self.segment_bytes);
        idx.set_len(self.index_cap * 8).map_err(io_err(&ipath))?;
        self.dir_dirty = true;
        self.cur = Some(OpenSegment {
            first_seq,
            data,
            idx,
            data_path: dpath,
            end: 0,
            count: 0,
            last_time: 0,
            pend: Vec::new(),
            pend_idx: Vec::new(),
        });
        Ok(())
    }

    /// Make every appended record durable.
    pub fn sync(&mut self) -> Result<(), LogError> {
        for (d, i) in self.dirty.drain(..) {
            d.sync_data().map_err(io_err(&self.dir))?;
            i.sync_data().map_err(io_err(&self.dir))?;
        }
        if let Some(c) = &mut self.cur {
            c.write_pending()?;
            c.data.sync_data().map_err(io_err(&c.data_path))?;
            c.idx.sync_data().map_err(io_err(&c.data_path))?;
        }
        if self.dir_dirty {
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err(&self.dir))?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// Delete whole segments whose newest record is older than
    /// `cutoff_micros` (never the current one). Returns the first seq still
    /// in the log, if any.
    pub fn retain(&mut self, cutoff_micros: i64) -> Result<Option<i64>, LogError> {
        let segs = list_segments(&self.dir)?;
        let cur = self.cur.as_ref().map(|c| c.first_seq);
        let mut first = None;
        for (k, &s) in segs.iter().enumerate() {
            if Some(s) == cur || first.is_some() {
                first.get_or_insert(s);
                continue;
            }
            // The newest record of segment k is just before segment k+1.
            let newest_time = segs.get(k + 1).and_then(|&next| self.time_of_last(s, next - 1));
            match newest_time {
                Some(t) if t < cutoff_micros => {
                    let (d, i) = segment_paths(&self.dir, s);
                    std::fs::remove_file(&d).map_err(io_err(&d))?;
                    let _ = std::fs::remove_file(&i);
                    self.dir_dirty = true;
                }
                _ => first = Some(s),
            }
        }
        Ok(first)
    }

    fn time_of_last(&self, first_seq: i64, seq: i64) -> Option<i64> {
        let mut r = LogReader::new(&self.dir);
        r.read(seq).ok().flatten().map(|(h, _)| h.time_micros).filter(|_| first_seq <= seq)
    }

    /// First seq of the oldest segment (None = empty log).
    pub fn oldest_seq(&self) -> Result<Option<i64>, LogError> {
        Ok(list_segments(&self.dir)?.first().copied())
    }
}

struct MappedSegment {
    first_seq: i64,
    data: Mmap,
    idx: Mmap,
    /// One bit per record: its CRC was checked through this mapping. What
    /// the CRC covers never changes once written (only the flags byte,
    /// which it leaves out), so each record is checked once per process,
    /// not once per consumer that reads it.
    verified: Box<[AtomicU64]>,
}

/// Read side: maps segments on demand and keeps a bounded number mapped.
pub struct LogReader {
    dir: PathBuf,
    known: Vec<i64>,
    maps: BTreeMap<i64, Arc<MappedSegment>>,
    maps_max: usize,
}

/// Why a read found nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum Missing {
    /// Older than the oldest segment (retention removed it).
    Gone,
    /// Not written (yet).
    NotYet,
}

impl LogReader {
    pub fn new(dir: &Path) -> LogReader {
        LogReader { dir: dir.to_owned(), known: Vec::new(), maps: BTreeMap::new(), maps_max: 8 }
    }

    /// The mapped segment that would hold `seq`, by the segments listed so
    /// far; `relist` lists the directory first.
    fn segment_for(&mut self, seq: i64, relist: bool) -> Result<Result<Arc<MappedSegment>, Missing>, LogError> {
        if relist {
            self.known = list_segments(&self.dir)?;
        }
        let Some(first) = self.known.iter().rev().find(|&&s| s <= seq).copied() else {
            return Ok(Err(if self.known.is_empty() { Missing::NotYet } else { Missing::Gone }));
        };
        if let Some(m) = self.maps.get(&first) {
            return Ok(Ok(m.clone()));
        }
        let (dpath, ipath) = segment_paths(&self.dir, first);
        let open = |p: &Path| File::open(p);
        let (d, i) = match (open(&dpath), open(&ipath)) {
            (Ok(d), Ok(i)) => (d, i),
            (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                self.known.retain(|&s| s != first);
                return Ok(Err(Missing::Gone));
            }
            (Err(err), _) | (_, Err(err)) => return Err(LogError::Io { path: dpath, err }),
        };
        // SAFETY: the writer only appends past the committed watermark and
        // never shrinks a segment below it; files are created at full size,
        // so every mapped byte stays valid while the map lives.
        let data = unsafe { Mmap::map(&d) }.map_err(io_err(&dpath))?;
        // SAFETY: as above, for the index.
        let idx = unsafe { Mmap::map(&i) }.map_err(io_err(&ipath))?;
        let verified = (0..(idx.len() / 8).div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let seg = Arc::new(MappedSegment { first_seq: first, data, idx, verified });
        if self.maps.len() >= self.maps_max {
            // Drop the mapping farthest from what is being read.
            let far = *self.maps.keys().max_by_key(|&&k| (k - first).unsigned_abs()).expect("non-empty");
            self.maps.remove(&far);
        }
        self.maps.insert(first, seg.clone());
        Ok(Ok(seg))
    }

    /// Read record `seq`. The caller must only ask for committed seqs.
    #[allow(clippy::type_complexity)]
    pub fn read(&mut self, seq: i64) -> Result<Option<(Header, LogFrame)>, LogError> {
        match self.lookup(seq)? {
            Ok(x) => Ok(Some(x)),
            Err(_) => Ok(None),
        }
    }

    /// Like [`LogReader::read`], saying why nothing was found.
    ///
    /// Reads go by the segments listed so far, and list the directory again
    /// only when that finds nothing (a segment begun or removed since):
    /// listing on every read of the live tail cost a `getdents` and path
    /// walks per frame per consumer.
    pub fn lookup(&mut self, seq: i64) -> Result<Result<(Header, LogFrame), Missing>, LogError> {
        match self.lookup_listed(seq, false)? {
            Ok(found) => Ok(Ok(found)),
            Err(_) => self.lookup_listed(seq, true),
        }
    }

    fn lookup_listed(&mut self, seq: i64, relist: bool) -> Result<Result<(Header, LogFrame), Missing>, LogError> {
        let seg = match self.segment_for(seq, relist)? {
            Ok(s) => s,
            Err(m) => return Ok(Err(m)),
        };
        let i = (seq - seg.first_seq) as usize * 8;
        if i + 8 > seg.idx.len() {
            return Ok(Err(Missing::NotYet));
        }
        let off = u64::from_le_bytes(seg.idx[i..i + 8].try_into().expect("8 bytes"));
        if off == 0 {
            return Ok(Err(Missing::NotYet));
        }
        let off = off - 1;
        let path = || segment_paths(&self.dir, seg.first_seq).0;
        if off as usize >= seg.data.len() {
            return Err(LogError::Corrupt { path: path(), offset: off, why: "index points past the segment" });
        }
        let k = (seq - seg.first_seq) as usize;
        let (word, bit) = (&seg.verified[k / 64], 1u64 << (k % 64));
        let checked = word.load(Ordering::Relaxed) & bit != 0;
        match Header::decode_checked(&seg.data[off as usize..], !checked) {
            Ok(Some((h, f))) if h.seq == seq => {
                if !checked {
                    word.fetch_or(bit, Ordering::Relaxed);
                }
                let start = off as usize + HEADER_BYTES;
                let len = f.len();
                Ok(Ok((h, LogFrame { seg, start, len })))
            }
            Ok(Some(_)) => Err(LogError::Corrupt { path: path(), offset: off, why: "seq does not match the index" }),
            Ok(None) => Ok(Err(Missing::NotYet)),
            Err(why) => Err(LogError::Corrupt { path: path(), offset: off, why }),
        }
    }
}

/// A frame inside a mapped segment (keeps the mapping alive).
pub struct LogFrame {
    seg: Arc<MappedSegment>,
    start: usize,
    len: usize,
}

impl LogFrame {
    pub fn bytes(&self) -> &[u8] {
        &self.seg.data[self.start..self.start + self.len]
    }
}

/// So a frame can be sent straight from the mapping (`Bytes::from_owner`),
/// without a copy per consumer.
impl AsRef<[u8]> for LogFrame {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: i64) -> Vec<u8> {
        let n = 10 + (seq as usize * 37) % 300;
        (0..n).map(|i| (seq as usize + i) as u8).collect()
    }

    #[test]
    fn a_record_is_checked_once_per_reader_and_corruption_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), 1 << 16, 0).unwrap();
        for s in 1..=3 {
            w.append(s, 1, 0, 9, s * 10, &frame(s)).unwrap();
        }
        w.sync().unwrap();
        let mut r = LogReader::new(dir.path());
        assert!(r.read(1).unwrap().is_some());
        // Flip a byte of record 2's frame on disk (the reader maps it).
        let first = list_segments(dir.path()).unwrap()[0];
        let seg = std::fs::OpenOptions::new().write(true).open(segment_paths(dir.path(), first).0).unwrap();
        let off = (HEADER_BYTES + frame(1).len() + HEADER_BYTES + 3) as u64;
        seg.write_all_at(&[0xFF], off).unwrap();
        assert!(matches!(r.read(2), Err(LogError::Corrupt { why: "CRC mismatch", .. })));
        for _ in 0..2 {
            assert_eq!(r.read(1).unwrap().unwrap().1.bytes(), frame(1).as_slice());
            assert_eq!(r.read(3).unwrap().unwrap().1.bytes(), frame(3).as_slice());
        }
        let k = |seq: i64| r.maps[&first].verified[0].load(Ordering::Relaxed) & (1 << (seq - first)) != 0;
        assert!(k(1) && !k(2) && k(3), "records 1 and 3 checked, 2 not passed");
    }

    #[test]
    fn append_sync_read_and_roll() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), 1 << 16, 0).unwrap();
        for s in 1..=2000 {
            w.append(s, 1, 0, 9, s * 10, &frame(s)).unwrap();
        }
        w.sync().unwrap();
        assert!(list_segments(dir.path()).unwrap().len() > 3);
        let mut r = LogReader::new(dir.path());
        for s in 1..=2000 {
            let (h, f) = r.read(s).unwrap().unwrap();
            assert_eq!((h.seq, h.time_micros), (s, s * 10));
            assert_eq!(f.bytes(), frame(s).as_slice());
        }
        assert_eq!(r.lookup(2001).unwrap().err(), Some(Missing::NotYet));
        assert!(matches!(w.append(5, 1, 0, 0, 0, b"x"), Err(LogError::OutOfOrder { .. })));
    }

    #[test]
    fn tail_reader_follows_new_segments() {
        // A consumer reads each record as soon as it is durable, so its
        // reader keeps meeting segments it has not listed yet.
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), 1 << 16, 0).unwrap();
        let mut r = LogReader::new(dir.path());
        for s in 1..=2000 {
            w.append(s, 1, 0, 9, s, &frame(s)).unwrap();
            if s % 7 == 0 {
                w.sync().unwrap();
                for t in s - 6..=s {
                    assert_eq!(r.read(t).unwrap().unwrap().1.bytes(), frame(t).as_slice(), "seq {t}");
                }
                assert_eq!(r.lookup(s + 1).unwrap().err(), Some(Missing::NotYet));
            }
        }
        assert!(r.known.len() > 3, "the reader saw the segments roll");
    }

    #[test]
    fn reopen_truncates_past_durable_and_repairs_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), 1 << 20, 99).unwrap();
        for s in 100..150 {
            w.append(s, 1, 0, 0, 0, &frame(s)).unwrap();
        }
        w.sync().unwrap();
        drop(w);
        // Tear record 140: flip a byte in its frame.
        let seg = list_segments(dir.path()).unwrap()[0];
        let (d, _) = segment_paths(dir.path(), seg);
        let mut r = LogReader::new(dir.path());
        let (_, f) = r.read(140).unwrap().unwrap();
        let off = f.start as u64;
        drop((f, r));
        let file = OpenOptions::new().write(true).open(&d).unwrap();
        file.write_all_at(&[0xff, 0xee], off).unwrap();
        // Postgres says 145 is durable: the log is behind, which is an error.
        assert!(matches!(LogWriter::open(dir.path(), 1 << 20, 145), Err(LogError::Behind { log: 139, durable: 145 })));
        // Postgres says 130: 131.. go, appends continue at 131.
        let mut w = LogWriter::open(dir.path(), 1 << 20, 130).unwrap();
        assert_eq!(w.next_seq(), 131);
        w.append(131, 2, 0, 0, 0, b"new").unwrap();
        w.sync().unwrap();
        let mut r = LogReader::new(dir.path());
        assert_eq!(r.read(131).unwrap().unwrap().1.bytes(), b"new");
        assert_eq!(r.read(130).unwrap().unwrap().1.bytes(), frame(130).as_slice());
        assert!(r.read(132).unwrap().is_none());
    }

    #[test]
    fn flags_flip_in_place_and_records_stay_valid() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), 1 << 16, 0).unwrap();
        for s in 1..=600 {
            w.append(s, 1, 0, (s % 3) as u64, s, &frame(s)).unwrap();
        }
        w.sync().unwrap();
        // Hash 1, up to seq 400, except frames the matcher rejects (a
        // simulated hash collision: seq 100).
        let n = set_flags(dir.path(), |h| h == 1, 400, FLAG_TAKEDOWN, true, |f| f != frame(100).as_slice()).unwrap();
        assert_eq!(n, (1..=400).filter(|s| s % 3 == 1 && *s != 100).count() as u64);
        let mut r = LogReader::new(dir.path());
        for s in 1..=600 {
            let (h, f) = r.read(s).unwrap().unwrap();
            assert_eq!(f.bytes(), frame(s).as_slice());
            let flagged = s % 3 == 1 && s <= 400 && s != 100;
            assert_eq!(h.flags & FLAG_TAKEDOWN != 0, flagged, "seq {s}");
        }
        // Reversal clears them; appends continue after a reopen.
        set_flags(dir.path(), |h| h == 1, 600, FLAG_TAKEDOWN, false, |_| true).unwrap();
        drop(w);
        let mut w = LogWriter::open(dir.path(), 1 << 16, 600).unwrap();
        w.append(601, 1, 0, 1, 0, b"x").unwrap();
        let mut r = LogReader::new(dir.path());
        assert!((1..=600).all(|s| r.read(s).unwrap().unwrap().0.flags == 0));
    }

    #[test]
    fn retention_drops_old_segments_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), 1 << 16, 0).unwrap();
        for s in 1..=3000 {
            w.append(s, 1, 0, 0, s, &frame(s)).unwrap();
        }
        w.sync().unwrap();
        let before = list_segments(dir.path()).unwrap();
        let first = w.retain(1500).unwrap().unwrap();
        let after = list_segments(dir.path()).unwrap();
        assert!(after.len() < before.len());
        assert_eq!(after[0], first);
        assert!(first <= 1500);
        let mut r = LogReader::new(dir.path());
        assert_eq!(r.lookup(1).unwrap().err(), Some(Missing::Gone));
        assert!(r.read(first).unwrap().is_some());
        assert!(r.read(3000).unwrap().is_some());
    }
}
