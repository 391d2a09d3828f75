//! A DID as compact bytes, for stores and caches that hold tens of
//! millions of them.
//!
//! A `did:plc` identifier is 24 characters of lower-case base32: 120 bits,
//! so a tag byte and 15 bytes hold it exactly (16 in all, against 32 as
//! text). [`DidKey`] is that fixed 16-byte form, which caches and stores
//! key on: a `did:plc`'s own bytes, and for any other DID (`did:web`, or
//! a `did:plc` not of that form) a tag and 120 bits of a hash.
//! In memory ([`DidKey::new`]) the hash is keyed by a secret of the
//! process, so nobody outside can build two DIDs that share an entry; in
//! Postgres ([`DidKey::stored`], a `uuid` column) it is SHA-256, the same
//! in every process and every run (the store keeps the DID itself beside
//! it, in `dids`, for the few accounts that are not did:plc).

/// Tag of a `did:plc`'s own bytes in a [`DidKey`].
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

    /// The key a store keeps `did` under: a `did:plc`'s own bytes, or a
    /// tag and 15 bytes of SHA-256 of any other DID. The SQL function
    /// `sluice_did_key` (migration V10) computes the same.
    pub fn stored(did: &str) -> DidKey {
        let mut out = [0u8; 16];
        match plc_id(did) {
            Some(id) => {
                out[0] = PLC_TAG;
                out[1..].copy_from_slice(&id);
            }
            None => {
                use sha2::Digest;
                let h = sha2::Sha256::digest(did.as_bytes());
                out[0] = HASHED_TAG;
                out[1..].copy_from_slice(&h[..15]);
            }
        }
        DidKey(out)
    }

    /// A `did:plc` (exact), not a hash.
    pub fn is_plc(&self) -> bool {
        self.0[0] == PLC_TAG
    }

    /// The `did:plc` this key is, if it is one.
    pub fn plc_did(&self) -> Option<String> {
        self.is_plc().then(|| plc_did(self.0[1..].try_into().expect("15 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plc_round_trips_in_16_bytes() {
        let did = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";
        assert_eq!(DidKey::stored(did).plc_did().as_deref(), Some(did));
        // Every character of the alphabet in every position survives.
        for i in 0..24 {
            for c in BASE32 {
                let mut id = *b"abcdefghijklmnopqrstuvwx";
                id[i] = *c;
                let d = format!("did:plc:{}", std::str::from_utf8(&id).unwrap());
                assert_eq!(DidKey::stored(&d).plc_did().as_deref(), Some(d.as_str()));
            }
        }
    }

    #[test]
    fn other_dids_are_hashed() {
        for did in [
            "did:web:example.com",
            "did:plc:short",
            "did:plc:UPPERCASEUPPERCASEUPPERC",
            "did:plc:0123456789abcdefghijklmn",
        ] {
            let k = DidKey::stored(did);
            assert!(!k.is_plc() && k.plc_did().is_none(), "{did}");
        }
    }

    #[test]
    fn stored_keys_are_exact_for_plc_and_sha256_for_the_rest() {
        let plc = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";
        let k = DidKey::stored(plc);
        assert_eq!(k, DidKey::new(plc, &DidHashKey::random()));
        assert_eq!(k.plc_did().as_deref(), Some(plc));
        let web = DidKey::stored("did:web:example.com");
        assert_eq!(web, DidKey::stored("did:web:example.com"), "the same in every process");
        assert_eq!(web.0[0], HASHED_TAG);
        assert_eq!(web.plc_did(), None);
        assert_ne!(web, DidKey::stored("did:web:example.org"));
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
