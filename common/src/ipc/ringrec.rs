//! What travels through a shard's ring to the db-writer: one [`RingRecord`]
//! per ring record, encoded with bincode 2 and decoded borrowing from the
//! ring's bytes (no copy of the frame).
//!
//! A shard writes an [`EventRecord`] only for an event that passed every
//! stateless check (frame, CAR, signature, MST proof, host authority); the
//! db-writer adds the stateful checks (see `policy`). [`RingRecord::Cursor`]
//! tells the db-writer that a host's upstream seq moved past events the shard
//! dropped, so the persisted cursor does not lag behind dropped events.

use crate::atproto::commit::{CheckedCommit, Proof};
use crate::atproto::frame::Event;
use bincode::{BorrowDecode, Encode};

/// Event kinds as stored in rings and in the event log header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Commit = 1,
    Sync = 2,
    Identity = 3,
    Account = 4,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Commit),
            2 => Some(Kind::Sync),
            3 => Some(Kind::Identity),
            4 => Some(Kind::Account),
            _ => None,
        }
    }
}

/// Outcome of the Sync 1.1 proof, as the shard saw it.
pub const PROOF_VERIFIED: u8 = 0;
pub const PROOF_ABSENT: u8 = 1;
/// Lenient mode only.
pub const PROOF_FAILED: u8 = 2;

/// A validated upstream event.
#[derive(Debug, Clone, PartialEq, Eq, Encode, BorrowDecode)]
pub struct EventRecord<'a> {
    /// `hosts.id` in Postgres.
    pub host_id: i64,
    /// The host's own seq for this event.
    pub upstream_seq: i64,
    /// [`Kind`] as u8.
    pub kind: u8,
    pub did: &'a str,
    /// `#commit`/`#sync`: the commit's rev; empty otherwise.
    pub rev: &'a str,
    /// `#commit`: `since`, empty when null.
    pub since: &'a str,
    /// Binary CIDs; empty when not applicable.
    pub commit_cid: &'a [u8],
    pub data_cid: &'a [u8],
    /// `#commit`: the prevData field (empty = absent).
    pub prev_data: &'a [u8],
    pub proof: u8,
    /// `#account`: upstream active flag and status (empty = none).
    pub active: bool,
    pub status: &'a str,
    /// Event `time` in micros since the epoch (0 if unparseable).
    pub time_micros: i64,
    /// When the request for the DID document that places the account on
    /// this host was sent (unix micros): the document is at least that
    /// recent. The sequencer accepts a move to another host only on a
    /// document newer than the one behind the account's current host.
    pub identity_micros: i64,
    /// The frame as received.
    pub frame: &'a [u8],
    /// Byte range of the body's `seq` value inside `frame`.
    pub seq_start: u32,
    pub seq_end: u32,
    /// `#commit`: what it leaves of each collection its ops touch
    /// (`atproto::commit::encode_presence`; empty otherwise): the
    /// db-writer's collection index follows it.
    pub collections: &'a [u8],
}

/// One record in a shard's ring.
#[derive(Debug, Clone, PartialEq, Eq, Encode, BorrowDecode)]
pub enum RingRecord<'a> {
    Event(EventRecord<'a>),
    /// Events of `host_id` up to `upstream_seq` were handled (dropped by
    /// the shard); the cursor may move there.
    Cursor {
        host_id: i64,
        upstream_seq: i64,
    },
    /// The shard could not reach `host_id` for a while (`offline`), or
    /// reached it again: the host's stored status follows
    /// (`common::process::host`). Sent once per change, never per retry.
    HostState {
        host_id: i64,
        offline: bool,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("ring record does not decode: {0}")]
pub struct DecodeError(String);

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_little_endian().with_variable_int_encoding()
}

impl<'a> RingRecord<'a> {
    /// Encode into `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        bincode::encode_into_std_write(self, out, config()).expect("writing to a Vec cannot fail");
    }

    pub fn decode(bytes: &'a [u8]) -> Result<RingRecord<'a>, DecodeError> {
        let (r, used) = bincode::borrow_decode_from_slice(bytes, config()).map_err(|e| DecodeError(e.to_string()))?;
        if used != bytes.len() {
            return Err(DecodeError(format!("{} trailing bytes", bytes.len() - used)));
        }
        Ok(r)
    }
}

/// Where an event came from and when: the parts of its [`EventRecord`]
/// that are not in the event itself.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub host_id: i64,
    /// The frame as received, and the byte range of its body's `seq`.
    pub frame: &'a [u8],
    pub seq_span: (usize, usize),
    /// See [`EventRecord::time_micros`].
    pub time_micros: i64,
    /// See [`EventRecord::identity_micros`].
    pub identity_micros: i64,
}

/// The ring code of a Sync 1.1 proof's outcome.
pub fn proof_code(p: &Proof) -> u8 {
    match p {
        Proof::Verified(_) => PROOF_VERIFIED,
        Proof::Absent => PROOF_ABSENT,
        Proof::Failed(_) => PROOF_FAILED,
    }
}

/// Encode into `out` (cleared first) the ring record of `ev`, an event
/// that passed a shard's checks (`checked`: what they found of a
/// `#commit` or `#sync`). The one place an [`EventRecord`] is built from
/// an event: the shard writes its rings with it, and the allocation test
/// (`common/tests/allocations.rs`) counts what it costs. Allocates
/// nothing once `out` has room. Returns `false`, writing nothing, for an
/// event that has no record (`#info`, an unknown type: a shard drops
/// them before).
pub fn encode_event(ev: &Event<'_>, checked: Option<&CheckedCommit>, at: Origin<'_>, out: &mut Vec<u8>) -> bool {
    let (Some(did), Some(upstream_seq)) = (ev.did(), ev.seq()) else { return false };
    let mut rec = EventRecord {
        host_id: at.host_id,
        upstream_seq,
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
        time_micros: at.time_micros,
        identity_micros: at.identity_micros,
        frame: at.frame,
        seq_start: at.seq_span.0 as u32,
        seq_end: at.seq_span.1 as u32,
        collections: &[],
    };
    let (commit_bytes, data_bytes, prev_bytes);
    if let Some(checked) = checked {
        commit_bytes = checked.commit_cid.to_bytes();
        data_bytes = checked.data.to_bytes();
        rec.commit_cid = &commit_bytes;
        rec.data_cid = &data_bytes;
    }
    match ev {
        Event::Commit(c) => {
            prev_bytes = c.prev_data.map(|p| p.to_bytes());
            rec.kind = Kind::Commit as u8;
            rec.rev = c.rev;
            rec.since = c.since.unwrap_or("");
            rec.prev_data = prev_bytes.as_ref().map_or(&[][..], |p| &p[..]);
            rec.proof = checked.map_or(PROOF_ABSENT, |c| proof_code(&c.proof));
            rec.collections = checked.map_or(&[][..], |c| &c.collections[..]);
        }
        Event::Sync(s) => {
            rec.kind = Kind::Sync as u8;
            rec.rev = s.rev;
        }
        Event::Identity(_) => rec.kind = Kind::Identity as u8,
        Event::Account(a) => {
            rec.kind = Kind::Account as u8;
            rec.active = a.active;
            rec.status = a.status.unwrap_or("");
        }
        Event::Info(_) | Event::Unknown { .. } => return false,
    }
    RingRecord::Event(rec).encode(out);
    true
}

/// A 64-bit hash of a DID (FNV-1a), stored in event log headers so replay
/// can skip a taken-down account's records without decoding frames.
pub fn did_hash(did: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in did.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_borrows() {
        let frame = vec![1u8, 2, 3, 4, 5];
        let r = RingRecord::Event(EventRecord {
            host_id: 7,
            upstream_seq: 99,
            kind: Kind::Commit as u8,
            did: "did:plc:abc",
            rev: "3k2a",
            since: "",
            commit_cid: &[1, 2],
            data_cid: &[3],
            prev_data: &[],
            proof: PROOF_VERIFIED,
            active: true,
            status: "",
            time_micros: 5,
            identity_micros: 6,
            frame: &frame,
            seq_start: 1,
            seq_end: 2,
            collections: b"\x01\x05a.b.c",
        });
        let mut out = Vec::new();
        r.encode(&mut out);
        let back = RingRecord::decode(&out).unwrap();
        assert_eq!(back, r);
        let c = RingRecord::Cursor { host_id: 1, upstream_seq: 2 };
        c.encode(&mut out);
        assert_eq!(RingRecord::decode(&out).unwrap(), c);
        assert!(RingRecord::decode(&out[..1]).is_err());
        out.push(0);
        assert!(RingRecord::decode(&out).is_err());
    }

    #[test]
    fn an_event_record_carries_its_event_and_origin() {
        use crate::atproto::frame::{self, AccountEvent, InfoEvent, Message};
        let mut bytes = Vec::new();
        let did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
        AccountEvent { seq: 42, did, time: "2025-01-01T00:00:00Z", active: false, status: Some("deleted") }
            .encode(&mut bytes);
        let d = frame::decode(&bytes).unwrap();
        let Message::Event(ev) = d.message else { panic!("an event") };
        let at =
            Origin { host_id: 7, frame: &bytes, seq_span: d.seq_span.unwrap(), time_micros: 5, identity_micros: 6 };
        let mut out = vec![9; 3];
        assert!(encode_event(&ev, None, at, &mut out));
        let RingRecord::Event(e) = RingRecord::decode(&out).unwrap() else { panic!("an event record") };
        assert_eq!((e.host_id, e.upstream_seq, e.kind, e.did), (7, 42, Kind::Account as u8, did));
        assert_eq!((e.active, e.status, e.time_micros, e.identity_micros), (false, "deleted", 5, 6));
        assert_eq!(
            (e.frame, e.seq_start as usize, e.seq_end as usize),
            (&bytes[..], d.seq_span.unwrap().0, d.seq_span.unwrap().1)
        );
        assert_eq!((e.commit_cid, e.proof), (&[][..], PROOF_ABSENT));

        let mut info = Vec::new();
        InfoEvent { name: "OutdatedCursor", message: None }.encode(&mut info);
        let Message::Event(ev) = frame::decode(&info).unwrap().message else { panic!("an event") };
        let mut out = vec![9; 3];
        assert!(!encode_event(&ev, None, at, &mut out), "#info has no record");
        assert_eq!(out, [9; 3], "nothing written");
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 1;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            let _ = RingRecord::decode(&bytes);
        }
    }
}
