//! A DID as compact bytes, for stores and caches that hold tens of
//! millions of them.
//!
//! A `did:plc` identifier is 24 characters of lower-case base32: 120 bits,
//! so [`did_bytes`] stores it as a tag byte and 15 bytes (16 in all,
//! against 32 as text). Any other DID (`did:web`, or a `did:plc` that is
//! not of that form) is stored as its text, which starts with `d` and so
//! never collides with the tag. [`did_from_bytes`] is the inverse: the
//! store keeps every DID exactly.
//!
//! [`DidKey`] is the fixed 16-byte form an in-memory cache keys on: the
//! same bytes for a `did:plc`, and for any other DID a 120-bit keyed hash
//! (the key is the cache's own, drawn at random, so nobody outside can
//! build two DIDs that share an entry).

/// Tag of the compact `did:plc` form (`did_bytes`, `DidKey`).
const PLC_TAG: u8 = 0x01;
/// Tag of a hashed DID in a [`DidKey`].
const HASHED_TAG: u8 = 0x02;
const PLC_PREFIX: &str = "did:plc:";
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// The 15 bytes of a `did:plc`'s 24-character identifier, if it is one.
pub fn plc_id(did: &str) -> Option<[u8; 15]> {
    let id = did.strip_prefix(PLC_PREFIX)?.as_bytes();
    if id.len() != 24 {
        return None;
    }
    let mut out = [0u8; 15];
    let (mut acc, mut bits, mut n) = (0u64, 0u32, 0usize);
    for &c in id {
        let v = match c {
            b'a'..=b'z' => c - b'a',
            b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        acc = (acc << 5) | v as u64;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out[n] = (acc >> bits) as u8;
            n += 1;
        }
    }
    Some(out)
}

/// The `did:plc` whose identifier is these 15 bytes.
pub fn plc_did(id: &[u8; 15]) -> String {
    let mut s = String::with_capacity(32);
    s.push_str(PLC_PREFIX);
    let (mut acc, mut bits) = (0u64, 0u32);
    for &b in id {
        acc = (acc << 8) | b as u64;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            s.push(BASE32[((acc >> bits) & 31) as usize] as char);
        }
    }
    s
}

/// `did` as stored: 16 bytes for a `did:plc`, else its text.
pub fn did_bytes(did: &str) -> Vec<u8> {
    match plc_id(did) {
        Some(id) => {
            let mut v = Vec::with_capacity(16);
            v.push(PLC_TAG);
            v.extend_from_slice(&id);
            v
        }
        None => did.as_bytes().to_vec(),
    }
}

/// The DID [`did_bytes`] stored (None: not such bytes).
pub fn did_from_bytes(b: &[u8]) -> Option<String> {
    match b.split_first() {
        Some((&PLC_TAG, rest)) => Some(plc_did(rest.try_into().ok()?)),
        _ => String::from_utf8(b.to_vec()).ok().filter(|s| s.starts_with("did:")),
    }
}

/// A cache's fixed-size key for a DID (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DidKey(pub [u8; 16]);

/// The secret a cache hashes DIDs that are not `did:plc` with.
#[derive(Debug, Clone, Copy)]
pub struct DidHashKey(pub [u64; 4]);

impl DidHashKey {
    /// A key from the operating system's randomness (std's hasher seeds).
    pub fn random() -> DidHashKey {
        use std::hash::{BuildHasher, Hasher};
        let mut k = [0u64; 4];
        for (i, w) in k.iter_mut().enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            *w = h.finish();
        }
        DidHashKey(k)
    }
}

impl DidKey {
    pub fn new(did: &str, key: &DidHashKey) -> DidKey {
        let mut out = [0u8; 16];
        match plc_id(did) {
            Some(id) => {
                out[0] = PLC_TAG;
                out[1..].copy_from_slice(&id);
            }
            None => {
                use std::hash::Hasher;
                // Two SipHash-2-4 runs under independent keys: 120 bits.
                #[allow(deprecated)]
                let run = |k0: u64, k1: u64| {
                    let mut h = std::hash::SipHasher::new_with_keys(k0, k1);
                    h.write(did.as_bytes());
                    h.finish()
                };
                let (a, b) = (run(key.0[0], key.0[1]), run(key.0[2], key.0[3]));
                out[0] = HASHED_TAG;
                out[1..9].copy_from_slice(&a.to_le_bytes());
                out[9..].copy_from_slice(&b.to_le_bytes()[..7]);
            }
        }
        DidKey(out)
    }

    /// A `did:plc` (exact), not a hash.
    pub fn is_plc(&self) -> bool {
        self.0[0] == PLC_TAG
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plc_round_trips_in_16_bytes() {
        let did = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";
        let b = did_bytes(did);
        assert_eq!(b.len(), 16);
        assert_eq!(did_from_bytes(&b).as_deref(), Some(did));
        // Every character of the alphabet in every position survives.
        for i in 0..24 {
            for c in BASE32 {
                let mut id = *b"abcdefghijklmnopqrstuvwx";
                id[i] = *c;
                let d = format!("did:plc:{}", std::str::from_utf8(&id).unwrap());
                assert_eq!(did_from_bytes(&did_bytes(&d)).as_deref(), Some(d.as_str()));
            }
        }
    }

    #[test]
    fn other_dids_are_stored_as_text() {
        for did in [
            "did:web:example.com",
            "did:plc:short",
            "did:plc:UPPERCASEUPPERCASEUPPERC",
            "did:plc:0123456789abcdefghijklmn",
        ] {
            let b = did_bytes(did);
            assert_eq!(b, did.as_bytes());
            assert_eq!(did_from_bytes(&b).as_deref(), Some(did));
        }
        assert_eq!(did_from_bytes(b"nonsense"), None);
        assert_eq!(did_from_bytes(&[PLC_TAG, 1, 2]), None);
    }

    #[test]
    fn cache_keys_are_exact_for_plc_and_keyed_for_the_rest() {
        let k1 = DidHashKey::random();
        let k2 = DidHashKey::random();
        let plc = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";
        assert_eq!(DidKey::new(plc, &k1), DidKey::new(plc, &k2));
        assert!(DidKey::new(plc, &k1).is_plc());
        let web = "did:web:example.com";
        assert_eq!(DidKey::new(web, &k1), DidKey::new(web, &k1));
        assert_ne!(DidKey::new(web, &k1), DidKey::new(web, &k2), "the key is the cache's own");
        assert_ne!(DidKey::new(web, &k1), DidKey::new("did:web:example.org", &k1));
        assert!(!DidKey::new(web, &k1).is_plc());
    }
}
