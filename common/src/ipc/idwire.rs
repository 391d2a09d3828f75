//! The identity socket (`data_dir/run/identity.sock`): what a shard asks
//! the db-writer's identity service, and what comes back.
//!
//! One connection per shard, messages both ways as `u32` little-endian
//! length ‖ bincode 2 payload, at most [`MESSAGE_BYTES_MAX`]. A shard sends
//! [`Request`]s; the service answers each with [`ToShard::Answer`] (same
//! `id`), in any order, and pushes [`ToShard::Changed`] whenever a DID's
//! stored identity changes (the PLC export, a refresh another shard
//! asked for), so shards holding it in their caches follow.
//!
//! The record ([`IdentityRecord`]) is what validation needs of a DID
//! document, plus `as_of_micros`: the time the document is known to be
//! current at (the request that fetched it was sent then, or the export
//! had been read up to then). It travels into the ring as
//! `EventRecord::identity_micros` (`atproto::policy`'s stale-host rule).

use crate::atproto::crypto::{CompactKey, Curve, PublicKey};
use bincode::{Decode, Encode};
use std::io::{Read, Write};

/// Largest message either side accepts (a DID, a handle, an endpoint).
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024;

/// Why a shard asks about a DID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub enum Reason {
    /// Not in the shard's cache.
    Miss,
    /// The host sent an `#identity` event for it (received at
    /// `received_micros`).
    Identity,
    /// A commit did not verify with the cached key.
    BadSignature,
    /// The cached document names another PDS (or none, or no key).
    WrongHost,
}

impl Reason {
    /// Does this reason need a document at least as recent as the event
    /// (`received_micros`), rather than any stored one?
    pub fn needs_fresh(self) -> bool {
        self != Reason::Miss
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Request {
    pub id: u64,
    pub did: String,
    /// The host whose event asks (`hosts.id`): the service shares the
    /// directory fairly between hosts.
    pub host_id: i64,
    pub reason: Reason,
    /// When the shard read the event that asks (unix micros).
    pub received_micros: i64,
}

/// What validation needs of a DID document.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct IdentityRecord {
    pub did: String,
    /// `(curve, compressed point)`: 0 K-256, 1 P-256.
    pub key: Option<(u8, [u8; 33])>,
    /// The `#atproto_pds` endpoint as written.
    pub pds: Option<String>,
    pub handle: Option<String>,
    /// The document is known current as of this time (unix micros).
    pub as_of_micros: i64,
}

impl IdentityRecord {
    pub fn new(
        did: String,
        key: Option<&PublicKey>,
        pds: Option<String>,
        handle: Option<String>,
        as_of_micros: i64,
    ) -> IdentityRecord {
        let key = key.map(|k| (curve_code(k.curve()), *k.compressed()));
        IdentityRecord { did, key, pds, handle, as_of_micros }
    }

    /// The signing key, if any and valid.
    pub fn compact_key(&self) -> Option<CompactKey> {
        let (c, point) = self.key.as_ref()?;
        CompactKey::from_compressed(curve_of(*c)?, point).ok()
    }

    /// The same identity (key, endpoint, handle), whatever `as_of`.
    pub fn same_identity(&self, o: &IdentityRecord) -> bool {
        self.did == o.did && self.key == o.key && self.pds == o.pds && self.handle == o.handle
    }
}

pub fn curve_code(c: Curve) -> u8 {
    match c {
        Curve::K256 => 0,
        Curve::P256 => 1,
    }
}

pub fn curve_of(code: u8) -> Option<Curve> {
    match code {
        0 => Some(Curve::K256),
        1 => Some(Curve::P256),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Answer {
    Found(IdentityRecord),
    /// No usable document now. `permanent`: the directory said so (not
    /// registered, tombstoned, an invalid document, a name that does not
    /// exist); otherwise it could not be fetched within the wait allowed.
    /// The service asks again no sooner than `retry_after_ms`.
    Unresolved {
        permanent: bool,
        retry_after_ms: u64,
        why: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ToShard {
    Answer { id: u64, answer: Answer },
    Changed(IdentityRecord),
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("identity socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("identity socket: message of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("identity socket: message does not decode: {0}")]
    Decode(String),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_little_endian().with_variable_int_encoding()
}

/// Write one message (length prefix and payload in one write).
pub fn write_msg<T: Encode>(w: &mut impl Write, msg: &T, scratch: &mut Vec<u8>) -> Result<(), WireError> {
    scratch.clear();
    scratch.extend_from_slice(&[0; 4]);
    bincode::encode_into_std_write(msg, scratch, config()).map_err(|e| WireError::Decode(e.to_string()))?;
    let len = scratch.len() - 4;
    if len > MESSAGE_BYTES_MAX {
        return Err(WireError::TooLarge(len));
    }
    scratch[..4].copy_from_slice(&(len as u32).to_le_bytes());
    w.write_all(scratch)?;
    Ok(())
}

/// Read one message; `Ok(None)` at a clean end of stream.
pub fn read_msg<T: Decode<()>>(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<T>, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MESSAGE_BYTES_MAX {
        return Err(WireError::TooLarge(len));
    }
    buf.resize(len, 0);
    r.read_exact(buf)?;
    let (msg, used) = bincode::decode_from_slice(buf, config()).map_err(|e| WireError::Decode(e.to_string()))?;
    if used != len {
        return Err(WireError::Decode(format!("{} trailing bytes", len - used)));
    }
    Ok(Some(msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atproto::crypto::PrivateKey;
    use rand::SeedableRng;

    #[test]
    fn messages_round_trip_and_bad_ones_are_errors() {
        let key = PrivateKey::generate(Curve::P256, &mut rand::rngs::StdRng::seed_from_u64(9)).public_key();
        let rec = IdentityRecord::new("did:plc:a".into(), Some(&key), Some("https://p.test".into()), None, 7);
        assert_eq!(rec.compact_key(), Some(key.compact()));
        let msgs = vec![
            ToShard::Answer { id: 1, answer: Answer::Found(rec.clone()) },
            ToShard::Answer {
                id: 2,
                answer: Answer::Unresolved { permanent: true, retry_after_ms: 60_000, why: "404".into() },
            },
            ToShard::Changed(rec),
        ];
        let mut wire = Vec::new();
        let mut scratch = Vec::new();
        for m in &msgs {
            write_msg(&mut wire, m, &mut scratch).unwrap();
        }
        let req =
            Request { id: 3, did: "did:web:x.test".into(), host_id: 4, reason: Reason::Identity, received_micros: 5 };
        write_msg(&mut wire, &req, &mut scratch).unwrap();
        let mut r = std::io::Cursor::new(wire.clone());
        let mut buf = Vec::new();
        for m in &msgs {
            assert_eq!(read_msg::<ToShard>(&mut r, &mut buf).unwrap().as_ref(), Some(m));
        }
        assert_eq!(read_msg::<Request>(&mut r, &mut buf).unwrap(), Some(req));
        assert!(read_msg::<Request>(&mut r, &mut buf).unwrap().is_none(), "clean end");
        // A length over the limit, and garbage: errors, not panics.
        let mut over = std::io::Cursor::new(((MESSAGE_BYTES_MAX + 1) as u32).to_le_bytes().to_vec());
        assert!(matches!(read_msg::<ToShard>(&mut over, &mut buf), Err(WireError::TooLarge(_))));
        let mut junk = vec![5, 0, 0, 0];
        junk.extend_from_slice(&[0xff; 5]);
        assert!(read_msg::<ToShard>(&mut std::io::Cursor::new(junk), &mut buf).is_err());
        // Cut mid-message: an I/O error (not a clean end).
        let cut = &wire[..wire.len() - 3];
        let mut r = std::io::Cursor::new(cut.to_vec());
        let mut n = 0;
        while let Ok(Some(_)) = read_msg::<ToShard>(&mut r, &mut buf) {
            n += 1;
        }
        assert_eq!(n, 3);
    }
}
