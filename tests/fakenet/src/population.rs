//! Who is in the network, derived rather than stored: every account's DID,
//! signing key, handle, first host and DID document follow from the seed
//! and the account's number, so a network of millions of accounts costs a
//! few bytes each until an account does something ([`crate::world`] then
//! keeps its repository).
//!
//! Numbering: the initial accounts are numbered host by host (host 0's
//! first), accounts created later continue the count. The first
//! `web_hosts.len()` are did:web accounts served on their own ports; the
//! next `broken_web.len()` are did:web accounts whose documents cannot be
//! had ([`BrokenWeb`]); the next `unregistered` are did:plc accounts the
//! directory does not know. Their events are undeliverable: the ledger
//! says "drop" (`unresolvable`) for every one.
//!
//! A did:plc identifier is the account number, permuted under a key from
//! the seed, and check bits, in base32: [`Population::index_of`] reads the
//! number back from any DID without a table.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice_common::atproto::crypto::{Curve, PrivateKey};
use sluice_common::atproto::did::{plc_did, plc_id};
use std::collections::HashMap;

/// A did:web account whose document cannot be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokenWeb {
    /// Its name does not exist (`*.invalid`): a permanent answer.
    NoSuchName(String),
    /// Its host (`localhost:PORT`) answers 500 to everything.
    Failing(String),
    /// Its host accepts and never answers.
    Hanging(String),
}

impl BrokenWeb {
    pub fn authority(&self) -> &str {
        match self {
            BrokenWeb::NoSuchName(a) | BrokenWeb::Failing(a) | BrokenWeb::Hanging(a) => a,
        }
    }
}

/// The did:web DID served on `localhost:PORT` (or another authority).
pub fn web_did(web_host: &str) -> String {
    format!("did:web:{}", web_host.replace(':', "%3A"))
}

/// `pds` is the endpoint URL (`http://localhost:PORT`).
pub fn did_document(did: &str, handle: &str, key: &PrivateKey, pds: &str) -> serde_json::Value {
    serde_json::json!({
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
        "id": did,
        "alsoKnownAs": [format!("at://{handle}")],
        "verificationMethod": [{
            "id": format!("{did}#atproto"),
            "type": "Multikey",
            "controller": did,
            "publicKeyMultibase": key.public_key().to_multikey(),
        }],
        "service": [{
            "id": "#atproto_pds",
            "type": "AtprotoPersonalDataServer",
            "serviceEndpoint": pds,
        }],
    })
}

#[derive(Debug, Clone)]
pub struct Population {
    pub seed: u64,
    /// `localhost:PORT` of each PDS host.
    pub hosts: Vec<String>,
    /// PDS endpoints are `https://` (else `http://`).
    pub tls: bool,
    pub p256_share: f64,
    /// First initial account of each host, and (last) the number of them.
    starts: Vec<usize>,
    pub web_hosts: Vec<String>,
    pub broken_web: Vec<BrokenWeb>,
    pub unregistered: usize,
    /// did:web DIDs (working and broken) by DID.
    web_index: HashMap<String, usize>,
    /// The did:plc permutation: x -> ((x ^ k1) * m) ^ k2, and m's inverse.
    k1: u64,
    k2: u64,
    m: u64,
    m_inv: u64,
    check: u64,
}

/// The multiplicative inverse of an odd `m` modulo 2^64 (Newton).
fn inverse(m: u64) -> u64 {
    let mut x = m;
    for _ in 0..6 {
        x = x.wrapping_mul(2u64.wrapping_sub(m.wrapping_mul(x)));
    }
    x
}

fn mix(a: u64, b: u64) -> u64 {
    let mut x = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Population {
    /// The population of a world of `cfg`; `counts[h]`: initial accounts
    /// of host h.
    pub fn new(cfg: &crate::world::WorldConfig, counts: &[usize]) -> Population {
        let (seed, hosts, tls, p256_share) = (cfg.seed, cfg.hosts.clone(), cfg.tls, cfg.p256_share);
        let (web_hosts, broken_web, unregistered) = (cfg.web_hosts.clone(), cfg.broken_web.clone(), cfg.unregistered);
        let mut starts = Vec::with_capacity(counts.len() + 1);
        let mut n = 0;
        for c in counts {
            starts.push(n);
            n += c;
        }
        starts.push(n);
        let web_index = web_hosts
            .iter()
            .map(|w| web_did(w))
            .chain(broken_web.iter().map(|b| web_did(b.authority())))
            .enumerate()
            .map(|(i, d)| (d, i))
            .collect();
        Population {
            seed,
            hosts,
            tls,
            p256_share,
            starts,
            web_hosts,
            broken_web,
            unregistered,
            web_index,
            k1: mix(seed, 1),
            k2: mix(seed, 2),
            m: mix(seed, 3) | 1,
            m_inv: inverse(mix(seed, 3) | 1),
            check: mix(seed, 4),
        }
    }

    /// Accounts the network starts with.
    pub fn initial(&self) -> usize {
        *self.starts.last().expect("one start per host and the total")
    }

    /// The initial accounts of `host`: a range of numbers.
    pub fn initial_range(&self, host: usize) -> std::ops::Range<usize> {
        self.starts[host]..self.starts[host + 1]
    }

    /// The host an initial account starts on.
    pub fn initial_host(&self, idx: usize) -> usize {
        self.starts.partition_point(|s| *s <= idx) - 1
    }

    fn web_count(&self) -> usize {
        self.web_hosts.len() + self.broken_web.len()
    }

    /// Its events can never be relayed (its identity cannot be resolved).
    pub fn unresolvable(&self, idx: usize) -> bool {
        (self.web_hosts.len()..self.web_count() + self.unregistered).contains(&idx)
    }

    pub fn did(&self, idx: usize) -> String {
        if idx < self.web_hosts.len() {
            return web_did(&self.web_hosts[idx]);
        }
        if idx < self.web_count() {
            return web_did(self.broken_web[idx - self.web_hosts.len()].authority());
        }
        let x = ((idx as u64 ^ self.k1).wrapping_mul(self.m)) ^ self.k2;
        let mut id = [0u8; 15];
        id[..8].copy_from_slice(&x.to_be_bytes());
        id[8..].copy_from_slice(&mix(self.check, idx as u64).to_be_bytes()[..7]);
        plc_did(&id)
    }

    /// The account number of `did`, if it is one of this network's.
    pub fn index_of(&self, did: &str) -> Option<usize> {
        if let Some(&i) = self.web_index.get(did) {
            return Some(i);
        }
        let id = plc_id(did)?;
        let x = u64::from_be_bytes(id[..8].try_into().expect("8 bytes"));
        let idx = ((x ^ self.k2).wrapping_mul(self.m_inv)) ^ self.k1;
        (idx >= self.web_count() as u64 && id[8..] == mix(self.check, idx).to_be_bytes()[..7]).then_some(idx as usize)
    }

    pub fn key(&self, idx: usize) -> PrivateKey {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.seed ^ 0x6b65_7973, idx as u64));
        let curve = if rng.gen_bool(self.p256_share.clamp(0.0, 1.0)) { Curve::P256 } else { Curve::K256 };
        PrivateKey::generate(curve, &mut rng)
    }

    /// The handle an account starts with on `host`.
    pub fn handle(&self, idx: usize, host: usize) -> String {
        format!("u{idx}.h{host}.test")
    }

    pub fn endpoint(&self, host: usize) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.hosts[host])
    }

    /// The document an initial account starts with (None: not an initial
    /// account, or one the directory does not know).
    pub fn initial_document(&self, idx: usize) -> Option<serde_json::Value> {
        if idx >= self.initial() || self.unresolvable(idx) {
            return None;
        }
        let host = self.initial_host(idx);
        Some(did_document(&self.did(idx), &self.handle(idx, host), &self.key(idx), &self.endpoint(host)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::WorldConfig;

    #[test]
    fn numbers_round_trip_through_dids() {
        let hosts = vec!["localhost:1".to_owned(), "localhost:2".to_owned()];
        let mut cfg = WorldConfig::small(7, hosts);
        cfg.web_hosts = vec!["localhost:9".into()];
        cfg.broken_web = vec![BrokenWeb::NoSuchName("nx-1.invalid".into())];
        cfg.unregistered = 2;
        let p = Population::new(&cfg, &[600, 400]);
        assert_eq!(p.initial(), 1000);
        assert_eq!((p.initial_host(0), p.initial_host(599), p.initial_host(600), p.initial_host(999)), (0, 0, 1, 1));
        assert_eq!(p.did(0), "did:web:localhost%3A9");
        assert_eq!(p.did(1), "did:web:nx-1.invalid");
        for i in 0..5000 {
            assert_eq!(p.index_of(&p.did(i)), Some(i), "{i}");
        }
        assert!(p.unresolvable(1) && p.unresolvable(2) && p.unresolvable(3) && !p.unresolvable(4));
        assert!(!p.unresolvable(0));
        // Another network's DIDs are not ours.
        let q = Population::new(&WorldConfig::small(8, vec!["localhost:1".into()]), &[10]);
        assert_eq!(p.index_of(&q.did(50)), None);
        assert_eq!(p.index_of("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"), None);
        // Keys and documents are the same every time.
        assert_eq!(p.key(77).to_bytes(), p.key(77).to_bytes());
        assert_eq!(p.initial_document(77), p.initial_document(77));
        assert!(p.initial_document(2).is_none() && p.initial_document(1000).is_none());
    }
}
