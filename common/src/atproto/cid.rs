//! Content identifiers as the AT Protocol uses them.
//!
//! Every CID in a repository is CIDv1 with a sha2-256 multihash and codec
//! dag-cbor (0x71) or raw (0x55). [`Cid`] stores exactly that: one codec byte
//! and the 32-byte digest, so it is `Copy`, 33 bytes, cheap to hash and
//! compare. Anything else (CIDv0, other hashes, other codecs) is rejected at
//! parse time with [`CidError`]; a relay has no use for it.
//!
//! Binary form: `0x01 ‖ codec ‖ 0x12 ‖ 0x20 ‖ digest` (36 bytes); in DAG-CBOR
//! it travels as tag 42 over `0x00 ‖ binary`. Text form: multibase base32
//! lower (`b...`).

use sha2::{Digest, Sha256};
use std::fmt;

/// Length of the binary form of every CID we accept.
pub const CID_BINARY_LEN: usize = 36;

/// The two codecs the repository format uses.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum Codec {
    DagCbor,
    Raw,
}

impl Codec {
    pub fn code(self) -> u8 {
        match self {
            Codec::DagCbor => 0x71,
            Codec::Raw => 0x55,
        }
    }
}

/// A CIDv1 with a sha2-256 digest. Ordered by digest, then codec (the
/// order only needs to be total and cheap: CAR slices binary-search it).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cid {
    codec: Codec,
    digest: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum CidError {
    #[error("CID is {0} bytes, expected {CID_BINARY_LEN}")]
    Length(usize),
    #[error("CID version {0} is not supported (only CIDv1)")]
    Version(u8),
    #[error("CID codec 0x{0:02x} is not dag-cbor or raw")]
    Codec(u8),
    #[error("CID multihash 0x{0:02x}/{1} is not sha2-256/32")]
    Multihash(u8, u8),
    #[error("CID text is not base32 multibase: {0}")]
    Text(String),
}

/// The sha-256 digest of a binary CID (`Cid::to_bytes` form), for stores
/// that keep a commit's CID in 32 bytes (a commit is dag-cbor).
pub fn binary_digest(b: &[u8]) -> Option<[u8; 32]> {
    Cid::from_bytes(b).ok().map(|c| c.digest)
}

/// 16 bits of a binary CID's digest: enough to tell whether a commit's
/// `prevData` follows the last data CID. A chain break is only counted,
/// and one in 65,536 goes uncounted; the bits are a 2-byte column of the
/// account row (`accounts.data_fp`, migration V14).
pub fn binary_fingerprint(b: &[u8]) -> Option<i16> {
    binary_digest(b).map(|d| i16::from_be_bytes([d[0], d[1]]))
}

impl Cid {
    pub const fn new(codec: Codec, digest: [u8; 32]) -> Cid {
        Cid { codec, digest }
    }

    /// The CID of `data` encoded with `codec`.
    pub fn compute(codec: Codec, data: &[u8]) -> Cid {
        Cid { codec, digest: Sha256::digest(data).into() }
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// Does `data` hash to this CID?
    pub fn matches(&self, data: &[u8]) -> bool {
        let d: [u8; 32] = Sha256::digest(data).into();
        d == self.digest
    }

    /// Parse the 36-byte binary form.
    pub fn from_bytes(b: &[u8]) -> Result<Cid, CidError> {
        if b.len() != CID_BINARY_LEN {
            // Give the more useful error when the prefix already tells.
            if let Some(&v) = b.first() {
                if v != 1 {
                    return Err(CidError::Version(v));
                }
            }
            return Err(CidError::Length(b.len()));
        }
        if b[0] != 1 {
            return Err(CidError::Version(b[0]));
        }
        let codec = match b[1] {
            0x71 => Codec::DagCbor,
            0x55 => Codec::Raw,
            c => return Err(CidError::Codec(c)),
        };
        if b[2] != 0x12 || b[3] != 0x20 {
            return Err(CidError::Multihash(b[2], b[3]));
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&b[4..]);
        Ok(Cid { codec, digest })
    }

    /// Parse a CID at the start of `b` (as in a CAR section), returning it
    /// and its length. Lengths other than 36 mean an unsupported CID.
    pub fn read_prefix(b: &[u8]) -> Result<(Cid, usize), CidError> {
        if b.len() < CID_BINARY_LEN {
            return Err(CidError::Length(b.len()));
        }
        Cid::from_bytes(&b[..CID_BINARY_LEN]).map(|c| (c, CID_BINARY_LEN))
    }

    pub fn to_bytes(&self) -> [u8; CID_BINARY_LEN] {
        let mut out = [0u8; CID_BINARY_LEN];
        out[0] = 1;
        out[1] = self.codec.code();
        out[2] = 0x12;
        out[3] = 0x20;
        out[4..].copy_from_slice(&self.digest);
        out
    }

    /// Parse the base32 multibase text form (`bafy...`).
    pub fn parse(s: &str) -> Result<Cid, CidError> {
        let rest = s.strip_prefix('b').ok_or_else(|| CidError::Text(format!("{s:?} lacks the 'b' base32 prefix")))?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(rest.to_ascii_uppercase().as_bytes())
            .map_err(|e| CidError::Text(format!("{s:?}: {e}")))?;
        if rest.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(CidError::Text(format!("{s:?} is not lower case")));
        }
        Cid::from_bytes(&bytes)
    }
}

impl Ord for Cid {
    #[inline]
    fn cmp(&self, o: &Cid) -> std::cmp::Ordering {
        let a = u128::from_be_bytes(self.digest[..16].try_into().expect("16 bytes"));
        let b = u128::from_be_bytes(o.digest[..16].try_into().expect("16 bytes"));
        a.cmp(&b).then_with(|| self.digest[16..].cmp(&o.digest[16..])).then_with(|| self.codec.cmp(&o.codec))
    }
}

impl PartialOrd for Cid {
    #[inline]
    fn partial_cmp(&self, o: &Cid) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = data_encoding::BASE32_NOPAD.encode(&self.to_bytes());
        s.make_ascii_lowercase();
        write!(f, "b{s}")
    }
}

impl fmt::Debug for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cid({self})")
    }
}

impl std::str::FromStr for Cid {
    type Err = CidError;
    fn from_str(s: &str) -> Result<Cid, CidError> {
        Cid::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip() {
        let s = "bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454";
        let c = Cid::parse(s).unwrap();
        assert_eq!(c.codec(), Codec::DagCbor);
        assert_eq!(c.to_string(), s);
        assert_eq!(Cid::from_bytes(&c.to_bytes()).unwrap(), c);
    }

    #[test]
    fn rejects_other_cids() {
        // CIDv0 text
        assert!(Cid::parse("QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR").is_err());
        // dag-pb codec
        let mut b = Cid::compute(Codec::Raw, b"x").to_bytes();
        b[1] = 0x70;
        assert_eq!(Cid::from_bytes(&b), Err(CidError::Codec(0x70)));
        b[1] = 0x55;
        b[2] = 0x13;
        assert_eq!(Cid::from_bytes(&b), Err(CidError::Multihash(0x13, 0x20)));
        assert!(Cid::from_bytes(&b[..10]).is_err());
        assert!(Cid::parse("BAFYREIE5CVV4H45FEADGEUWHBCUTMH6T2CESEOCCKAHDOE6UAT64ZMZ454").is_err());
    }

    #[test]
    fn compute_matches() {
        let c = Cid::compute(Codec::DagCbor, b"hello");
        assert!(c.matches(b"hello"));
        assert!(!c.matches(b"hellp"));
    }
}
