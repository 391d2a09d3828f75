//! `com.atproto.sync.subscribeRepos` frames: decode, encode, re-sequence.
//!
//! A frame is one WebSocket binary message holding two DAG-CBOR values back
//! to back: a header `{op, t}` and a body. [`decode`] parses both into
//! [`Message`] types that borrow every string and byte string from the
//! input (a commit's CAR slice is never copied), enforces the protocol
//! limits ([`FRAME_BYTES_MAX`], [`COMMIT_BLOCKS_BYTES_MAX`], [`OPS_MAX`],
//! [`SYNC_BLOCKS_BYTES_MAX`], and the CBOR limits in `cbor`), and records
//! where the body's `seq` value lies so [`resequence`] can give the frame
//! the relay's seq by splicing one integer: no CAR decode, no re-encode.
//!
//! Unknown message types decode to [`Event::Unknown`] (receivers ignore
//! them); legacy `#handle`, `#migrate`, `#tombstone` are unknown too. Unknown
//! body fields are skipped, within limits.

use crate::atproto::cbor::{self, CborError, Reader, Writer};
use crate::atproto::cid::Cid;

/// Largest frame accepted from an upstream or sent downstream.
pub const FRAME_BYTES_MAX: usize = 5_000_000;
/// Largest `blocks` CAR slice in a `#commit`.
pub const COMMIT_BLOCKS_BYTES_MAX: usize = 2_000_000;
/// Largest `blocks` CAR slice in a `#sync`.
pub const SYNC_BLOCKS_BYTES_MAX: usize = 10_000;
/// Most ops in one `#commit`.
pub const OPS_MAX: usize = 200;

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds {FRAME_BYTES_MAX}")]
    TooLarge(usize),
    #[error("frame header: {0}")]
    Header(CborError),
    #[error("frame body ({t}): {err}")]
    Body { t: String, err: CborError },
    #[error("unknown frame op {0}")]
    Op(i64),
    #[error("message frame without a type")]
    NoType,
    #[error("{t}: blocks of {len} bytes exceed {max}")]
    BlocksTooLarge { t: &'static str, len: usize, max: usize },
    #[error("#commit with {0} ops exceeds {OPS_MAX}")]
    TooManyOps(usize),
    #[error("{0}: seq {1} is not a positive integer below 2^53")]
    Seq(&'static str, i64),
}

/// `create`, `update` or `delete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Update,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoOp<'a> {
    pub action: Action,
    pub path: &'a str,
    pub cid: Option<Cid>,
    /// Sync 1.1: previous record CID for updates and deletes.
    pub prev: Option<Cid>,
}

/// Ops held inline by a decoded `#commit` before it spills to the heap.
pub const OPS_INLINE: usize = 4;
pub type Ops<'a> = smallvec::SmallVec<[RepoOp<'a>; OPS_INLINE]>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit<'a> {
    pub seq: i64,
    pub rebase: bool,
    pub too_big: bool,
    pub repo: &'a str,
    pub commit: Cid,
    pub rev: &'a str,
    pub since: Option<&'a str>,
    pub blocks: &'a [u8],
    /// Inline up to [`OPS_INLINE`]: most commits carry one op, and decoding
    /// them allocates nothing.
    pub ops: Ops<'a>,
    pub prev_data: Option<Cid>,
    pub time: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncEvent<'a> {
    pub seq: i64,
    pub did: &'a str,
    pub blocks: &'a [u8],
    pub rev: &'a str,
    pub time: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityEvent<'a> {
    pub seq: i64,
    pub did: &'a str,
    pub time: &'a str,
    pub handle: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountEvent<'a> {
    pub seq: i64,
    pub did: &'a str,
    pub time: &'a str,
    pub active: bool,
    pub status: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoEvent<'a> {
    pub name: &'a str,
    pub message: Option<&'a str>,
}

// A commit holds its first ops inline (`Ops`): no allocation per event for
// about 520 bytes on the stack, one event per frame being read.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    Commit(Commit<'a>),
    Sync(SyncEvent<'a>),
    Identity(IdentityEvent<'a>),
    Account(AccountEvent<'a>),
    Info(InfoEvent<'a>),
    /// A type this relay does not know (including the legacy ones).
    Unknown {
        t: &'a str,
    },
}

impl Event<'_> {
    pub fn seq(&self) -> Option<i64> {
        match self {
            Event::Commit(c) => Some(c.seq),
            Event::Sync(s) => Some(s.seq),
            Event::Identity(i) => Some(i.seq),
            Event::Account(a) => Some(a.seq),
            Event::Info(_) | Event::Unknown { .. } => None,
        }
    }

    pub fn did(&self) -> Option<&str> {
        match self {
            Event::Commit(c) => Some(c.repo),
            Event::Sync(s) => Some(s.did),
            Event::Identity(i) => Some(i.did),
            Event::Account(a) => Some(a.did),
            Event::Info(_) | Event::Unknown { .. } => None,
        }
    }

    pub fn type_name(&self) -> &str {
        match self {
            Event::Commit(_) => "#commit",
            Event::Sync(_) => "#sync",
            Event::Identity(_) => "#identity",
            Event::Account(_) => "#account",
            Event::Info(_) => "#info",
            Event::Unknown { t } => t,
        }
    }
}

#[allow(clippy::large_enum_variant)] // as `Event`
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Event(Event<'a>),
    /// `op = -1`: the stream ends after this.
    Error {
        error: &'a str,
        message: Option<&'a str>,
    },
}

/// A decoded frame and the byte range of its body's `seq` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub message: Message<'a>,
    pub seq_span: Option<(usize, usize)>,
}

/// Decode one frame.
pub fn decode(frame: &[u8]) -> Result<Decoded<'_>, FrameError> {
    if frame.len() > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(frame.len()));
    }
    let mut r = Reader::new(frame);
    let (op, t) = decode_header(&mut r).map_err(FrameError::Header)?;
    match op {
        1 => {
            let t = t.ok_or(FrameError::NoType)?;
            let body_err = |err| FrameError::Body { t: t.to_owned(), err };
            let mut seq_span = None;
            let mut too_many_ops = None;
            let event = match t {
                "#commit" => Event::Commit(decode_commit(&mut r, &mut seq_span, &mut too_many_ops).map_err(body_err)?),
                "#sync" => Event::Sync(decode_sync(&mut r, &mut seq_span).map_err(body_err)?),
                "#identity" => Event::Identity(decode_identity(&mut r, &mut seq_span).map_err(body_err)?),
                "#account" => Event::Account(decode_account(&mut r, &mut seq_span).map_err(body_err)?),
                "#info" => Event::Info(decode_info(&mut r).map_err(body_err)?),
                _ => {
                    r.skip(0).map_err(body_err)?;
                    Event::Unknown { t }
                }
            };
            r.finish().map_err(body_err)?;
            if let Some(k) = too_many_ops {
                return Err(FrameError::TooManyOps(k));
            }
            check_limits(&event)?;
            Ok(Decoded { message: Message::Event(event), seq_span })
        }
        -1 => {
            let msg = decode_error_body(&mut r).map_err(|err| FrameError::Body { t: "error".into(), err })?;
            r.finish().map_err(|err| FrameError::Body { t: "error".into(), err })?;
            Ok(Decoded { message: msg, seq_span: None })
        }
        other => Err(FrameError::Op(other)),
    }
}

/// seq must be a positive integer below 2^53 (PROTOCOL.md §1).
pub const SEQ_MAX: i64 = (1 << 53) - 1;

fn check_limits(ev: &Event<'_>) -> Result<(), FrameError> {
    if let Some(seq) = ev.seq() {
        if !(1..=SEQ_MAX).contains(&seq) {
            return Err(FrameError::Seq(
                match ev {
                    Event::Commit(_) => "#commit",
                    Event::Sync(_) => "#sync",
                    Event::Identity(_) => "#identity",
                    _ => "#account",
                },
                seq,
            ));
        }
    }
    match ev {
        Event::Commit(c) => {
            if c.blocks.len() > COMMIT_BLOCKS_BYTES_MAX {
                return Err(FrameError::BlocksTooLarge {
                    t: "#commit",
                    len: c.blocks.len(),
                    max: COMMIT_BLOCKS_BYTES_MAX,
                });
            }
            if c.ops.len() > OPS_MAX {
                return Err(FrameError::TooManyOps(c.ops.len()));
            }
        }
        Event::Sync(s) if s.blocks.len() > SYNC_BLOCKS_BYTES_MAX => {
            return Err(FrameError::BlocksTooLarge { t: "#sync", len: s.blocks.len(), max: SYNC_BLOCKS_BYTES_MAX });
        }
        _ => {}
    }
    Ok(())
}

fn decode_header<'a>(r: &mut Reader<'a>) -> cbor::Result<(i64, Option<&'a str>)> {
    let n = r.map()?;
    let (mut op, mut t) = (None, None);
    for _ in 0..n {
        match r.key_bytes()? {
            b"op" => op = Some(r.i64()?),
            b"t" => t = Some(r.text()?),
            _ => {
                r.skip(1)?;
            }
        }
    }
    Ok((op.ok_or(CborError::Missing("op"))?, t))
}

/// Read `seq`, remembering where its value sits in the frame.
fn read_seq(r: &mut Reader<'_>, span: &mut Option<(usize, usize)>) -> cbor::Result<i64> {
    let start = r.position();
    let v = r.i64()?;
    *span = Some((start, r.position()));
    Ok(v)
}

fn decode_commit<'a>(
    r: &mut Reader<'a>,
    span: &mut Option<(usize, usize)>,
    too_many_ops: &mut Option<usize>,
) -> cbor::Result<Commit<'a>> {
    let n = r.map()?;
    let (mut seq, mut repo, mut commit, mut rev, mut blocks, mut time) = (None, None, None, None, None, None);
    let (mut rebase, mut too_big, mut since, mut prev_data) = (false, false, None, None);
    let mut ops = Ops::new();
    for _ in 0..n {
        match r.key_bytes()? {
            b"seq" => seq = Some(read_seq(r, span)?),
            b"rebase" => rebase = r.bool()?,
            b"tooBig" => too_big = r.bool()?,
            b"repo" => repo = Some(r.text()?),
            b"commit" => commit = Some(r.cid()?),
            b"rev" => rev = Some(r.text()?),
            b"since" => since = r.opt_text()?,
            b"blocks" => blocks = Some(r.bytes()?),
            b"ops" => {
                if !r.null() {
                    let k = r.array()?;
                    if k > OPS_MAX {
                        for _ in 0..k {
                            r.skip(2)?;
                        }
                        *too_many_ops = Some(k);
                    } else {
                        ops.reserve_exact(k);
                        for _ in 0..k {
                            ops.push(decode_op(r)?);
                        }
                    }
                }
            }
            b"prevData" => prev_data = r.opt_cid()?,
            b"time" => time = Some(r.text()?),
            _ => {
                r.skip(1)?;
            }
        }
    }
    Ok(Commit {
        seq: seq.ok_or(CborError::Missing("seq"))?,
        rebase,
        too_big,
        repo: repo.ok_or(CborError::Missing("repo"))?,
        commit: commit.ok_or(CborError::Missing("commit"))?,
        rev: rev.ok_or(CborError::Missing("rev"))?,
        since,
        blocks: blocks.ok_or(CborError::Missing("blocks"))?,
        ops,
        prev_data,
        time: time.unwrap_or(""),
    })
}

fn decode_op<'a>(r: &mut Reader<'a>) -> cbor::Result<RepoOp<'a>> {
    let n = r.map()?;
    let (mut action, mut path, mut cid, mut prev) = (None, None, None, None);
    for _ in 0..n {
        match r.key_bytes()? {
            b"action" => {
                action = Some(match r.text()? {
                    "create" => Action::Create,
                    "update" => Action::Update,
                    "delete" => Action::Delete,
                    _ => return Err(CborError::Field("action", "not create/update/delete")),
                })
            }
            b"path" => path = Some(r.text()?),
            b"cid" => cid = r.opt_cid()?,
            b"prev" => prev = r.opt_cid()?,
            _ => {
                r.skip(3)?;
            }
        }
    }
    Ok(RepoOp {
        action: action.ok_or(CborError::Missing("action"))?,
        path: path.ok_or(CborError::Missing("path"))?,
        cid,
        prev,
    })
}

fn decode_sync<'a>(r: &mut Reader<'a>, span: &mut Option<(usize, usize)>) -> cbor::Result<SyncEvent<'a>> {
    let n = r.map()?;
    let (mut seq, mut did, mut blocks, mut rev, mut time) = (None, None, None, None, None);
    for _ in 0..n {
        match r.key_bytes()? {
            b"seq" => seq = Some(read_seq(r, span)?),
            b"did" => did = Some(r.text()?),
            b"blocks" => blocks = Some(r.bytes()?),
            b"rev" => rev = Some(r.text()?),
            b"time" => time = Some(r.text()?),
            _ => {
                r.skip(1)?;
            }
        }
    }
    Ok(SyncEvent {
        seq: seq.ok_or(CborError::Missing("seq"))?,
        did: did.ok_or(CborError::Missing("did"))?,
        blocks: blocks.ok_or(CborError::Missing("blocks"))?,
        rev: rev.ok_or(CborError::Missing("rev"))?,
        time: time.unwrap_or(""),
    })
}

fn decode_identity<'a>(r: &mut Reader<'a>, span: &mut Option<(usize, usize)>) -> cbor::Result<IdentityEvent<'a>> {
    let n = r.map()?;
    let (mut seq, mut did, mut time, mut handle) = (None, None, None, None);
    for _ in 0..n {
        match r.key_bytes()? {
            b"seq" => seq = Some(read_seq(r, span)?),
            b"did" => did = Some(r.text()?),
            b"time" => time = Some(r.text()?),
            b"handle" => handle = r.opt_text()?,
            _ => {
                r.skip(1)?;
            }
        }
    }
    Ok(IdentityEvent {
        seq: seq.ok_or(CborError::Missing("seq"))?,
        did: did.ok_or(CborError::Missing("did"))?,
        time: time.unwrap_or(""),
        handle,
    })
}

fn decode_account<'a>(r: &mut Reader<'a>, span: &mut Option<(usize, usize)>) -> cbor::Result<AccountEvent<'a>> {
    let n = r.map()?;
    let (mut seq, mut did, mut time, mut active, mut status) = (None, None, None, None, None);
    for _ in 0..n {
        match r.key_bytes()? {
            b"seq" => seq = Some(read_seq(r, span)?),
            b"did" => did = Some(r.text()?),
            b"time" => time = Some(r.text()?),
            b"active" => active = Some(r.bool()?),
            b"status" => status = r.opt_text()?,
            _ => {
                r.skip(1)?;
            }
        }
    }
    Ok(AccountEvent {
        seq: seq.ok_or(CborError::Missing("seq"))?,
        did: did.ok_or(CborError::Missing("did"))?,
        time: time.unwrap_or(""),
        active: active.ok_or(CborError::Missing("active"))?,
        status,
    })
}

fn decode_info<'a>(r: &mut Reader<'a>) -> cbor::Result<InfoEvent<'a>> {
    let n = r.map()?;
    let (mut name, mut message) = (None, None);
    for _ in 0..n {
        match r.key_bytes()? {
            b"name" => name = Some(r.text()?),
            b"message" => message = r.opt_text()?,
            _ => {
                r.skip(1)?;
            }
        }
    }
    Ok(InfoEvent { name: name.ok_or(CborError::Missing("name"))?, message })
}

fn decode_error_body<'a>(r: &mut Reader<'a>) -> cbor::Result<Message<'a>> {
    let n = r.map()?;
    let (mut error, mut message) = (None, None);
    for _ in 0..n {
        match r.key_bytes()? {
            b"error" => error = Some(r.text()?),
            b"message" => message = r.opt_text()?,
            _ => {
                r.skip(1)?;
            }
        }
    }
    Ok(Message::Error { error: error.ok_or(CborError::Missing("error"))?, message })
}

/// Copy `frame` into `out` with the body's seq replaced by `new_seq`.
/// `span` is [`Decoded::seq_span`] of the same frame.
pub fn resequence(frame: &[u8], span: (usize, usize), new_seq: i64, out: &mut Vec<u8>) {
    let (a, b) = span;
    out.reserve(frame.len() + 9);
    out.extend_from_slice(&frame[..a]);
    cbor::write_head(out, cbor::MAJOR_UINT, new_seq as u64);
    out.extend_from_slice(&frame[b..]);
}

fn write_header(w: &mut Writer, t: &str) {
    w.map(2);
    w.text("t");
    w.text(t);
    w.text("op");
    w.i64(1);
}

impl Commit<'_> {
    /// Encode as a complete frame (header + body).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer { buf: std::mem::take(out) };
        write_header(&mut w, "#commit");
        w.map(if self.prev_data.is_some() { 12 } else { 11 });
        w.text("ops");
        w.array(self.ops.len());
        for op in &self.ops {
            w.map(if op.prev.is_some() { 4 } else { 3 });
            w.text("cid");
            w.opt_cid(op.cid.as_ref());
            w.text("path");
            w.text(op.path);
            if let Some(p) = &op.prev {
                w.text("prev");
                w.cid(p);
            }
            w.text("action");
            w.text(op.action.as_str());
        }
        w.text("rev");
        w.text(self.rev);
        w.text("seq");
        w.i64(self.seq);
        w.text("repo");
        w.text(self.repo);
        w.text("time");
        w.text(self.time);
        w.text("blobs");
        w.array(0);
        w.text("since");
        w.opt_text(self.since);
        w.text("blocks");
        w.bytes(self.blocks);
        w.text("commit");
        w.cid(&self.commit);
        w.text("rebase");
        w.bool(self.rebase);
        w.text("tooBig");
        w.bool(self.too_big);
        if let Some(p) = &self.prev_data {
            w.text("prevData");
            w.cid(p);
        }
        *out = w.into_inner();
    }
}

impl SyncEvent<'_> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer { buf: std::mem::take(out) };
        write_header(&mut w, "#sync");
        w.map(5);
        w.text("did");
        w.text(self.did);
        w.text("rev");
        w.text(self.rev);
        w.text("seq");
        w.i64(self.seq);
        w.text("time");
        w.text(self.time);
        w.text("blocks");
        w.bytes(self.blocks);
        *out = w.into_inner();
    }
}

impl IdentityEvent<'_> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer { buf: std::mem::take(out) };
        write_header(&mut w, "#identity");
        w.map(if self.handle.is_some() { 4 } else { 3 });
        w.text("did");
        w.text(self.did);
        w.text("seq");
        w.i64(self.seq);
        w.text("time");
        w.text(self.time);
        if let Some(h) = self.handle {
            w.text("handle");
            w.text(h);
        }
        *out = w.into_inner();
    }
}

impl AccountEvent<'_> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer { buf: std::mem::take(out) };
        write_header(&mut w, "#account");
        w.map(if self.status.is_some() { 5 } else { 4 });
        w.text("did");
        w.text(self.did);
        w.text("seq");
        w.i64(self.seq);
        w.text("time");
        w.text(self.time);
        w.text("active");
        w.bool(self.active);
        if let Some(s) = self.status {
            w.text("status");
            w.text(s);
        }
        *out = w.into_inner();
    }
}

impl InfoEvent<'_> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer { buf: std::mem::take(out) };
        write_header(&mut w, "#info");
        w.map(if self.message.is_some() { 2 } else { 1 });
        w.text("name");
        w.text(self.name);
        if let Some(m) = self.message {
            w.text("message");
            w.text(m);
        }
        *out = w.into_inner();
    }
}

/// Encode an error frame (`op = -1`).
pub fn encode_error(error: &str, message: Option<&str>, out: &mut Vec<u8>) {
    let mut w = Writer { buf: std::mem::take(out) };
    w.map(1);
    w.text("op");
    w.i64(-1);
    w.map(if message.is_some() { 2 } else { 1 });
    w.text("error");
    w.text(error);
    if let Some(m) = message {
        w.text("message");
        w.text(m);
    }
    *out = w.into_inner();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atproto::cid::Codec;

    fn sample_commit() -> Vec<u8> {
        let cid = Cid::compute(Codec::DagCbor, b"c");
        let c = Commit {
            seq: 42,
            rebase: false,
            too_big: false,
            repo: "did:plc:abc",
            commit: cid,
            rev: "3lmxjza3nva27",
            since: None,
            blocks: b"\x01\x02",
            ops: smallvec::smallvec![RepoOp {
                action: Action::Create,
                path: "app.bsky.feed.post/1",
                cid: Some(cid),
                prev: None
            }],
            prev_data: Some(cid),
            time: "2025-01-01T00:00:00.000Z",
        };
        let mut out = Vec::new();
        c.encode(&mut out);
        out
    }

    #[test]
    fn commit_round_trip_and_canonical() {
        let f = sample_commit();
        let d = decode(&f).unwrap();
        let Message::Event(Event::Commit(c)) = &d.message else { panic!() };
        assert_eq!(c.seq, 42);
        assert_eq!(c.ops.len(), 1);
        // The body is canonical DAG-CBOR: the generic strict decoder agrees.
        let mut r = Reader::new(&f);
        crate::atproto::cbor::Value::read(&mut r, 0).unwrap();
        crate::atproto::cbor::Value::read(&mut r, 0).unwrap();
        r.finish().unwrap();
    }

    #[test]
    fn resequence_changes_only_seq() {
        let f = sample_commit();
        let d = decode(&f).unwrap();
        for new in [1i64, 23, 24, 70_000, 5_000_000_000, SEQ_MAX] {
            let mut out = Vec::new();
            resequence(&f, d.seq_span.unwrap(), new, &mut out);
            let d2 = decode(&out).unwrap();
            let (Message::Event(a), Message::Event(b)) = (&d.message, &d2.message) else { panic!() };
            assert_eq!(b.seq(), Some(new));
            let (Event::Commit(a), Event::Commit(b)) = (a, b) else { panic!() };
            // (Debug: `Ops` is invariant in its lifetime, so the two
            // frames' commits are not one type.)
            assert_eq!(format!("{:?}", Commit { seq: new, ..a.clone() }), format!("{b:?}"));
        }
    }

    #[test]
    fn limits() {
        let mut huge = vec![0u8; FRAME_BYTES_MAX + 1];
        huge[0] = 0xa0;
        assert_eq!(decode(&huge), Err(FrameError::TooLarge(FRAME_BYTES_MAX + 1)));
        let cid = Cid::compute(Codec::DagCbor, b"c");
        let op = RepoOp { action: Action::Delete, path: "a.b.c/x", cid: None, prev: Some(cid) };
        let c = Commit {
            seq: 1,
            rebase: false,
            too_big: false,
            repo: "did:plc:abc",
            commit: cid,
            rev: "3lmxjza3nva27",
            since: None,
            blocks: b"",
            ops: smallvec::smallvec![op; OPS_MAX + 1],
            prev_data: None,
            time: "",
        };
        let mut out = Vec::new();
        c.encode(&mut out);
        assert_eq!(decode(&out), Err(FrameError::TooManyOps(OPS_MAX + 1)));
        let mut out = Vec::new();
        encode_error("FutureCursor", Some("nope"), &mut out);
        assert_eq!(decode(&out).unwrap().message, Message::Error { error: "FutureCursor", message: Some("nope") });
    }

    #[test]
    fn unknown_and_bad_seq() {
        let mut w = Writer::new();
        w.map(2);
        w.text("t");
        w.text("#tombstone");
        w.text("op");
        w.i64(1);
        w.map(1);
        w.text("seq");
        w.i64(5);
        assert_eq!(decode(&w.buf).unwrap().message, Message::Event(Event::Unknown { t: "#tombstone" }));
        let mut out = Vec::new();
        IdentityEvent { seq: 0, did: "did:plc:x", time: "", handle: None }.encode(&mut out);
        assert_eq!(decode(&out), Err(FrameError::Seq("#identity", 0)));
    }
}
