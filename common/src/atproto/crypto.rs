//! Keys and signatures: K-256 and P-256 ECDSA over SHA-256, as atproto
//! uses them.
//!
//! Verification is the relay's hottest CPU cost, so each curve uses the
//! fastest implementation measured on our machines (see BENCHMARKS.md):
//! K-256 through libsecp256k1 (`secp256k1` crate), P-256 through AWS-LC
//! (`aws-lc-rs`), both with keys parsed once ([`PublicKey`] is meant to be
//! cached with the identity). Signatures are the raw 64-byte `r ‖ s`; DER,
//! other lengths and high-S signatures are rejected on both curves (we check
//! low-S ourselves; libsecp256k1 also does, AWS-LC does not).
//!
//! Signing ([`PrivateKey`]) exists for the synthetic network and tests. It is
//! deterministic (RFC 6979) so a seeded fakenet replays byte for byte:
//! libsecp256k1 for K-256, RustCrypto `p256` for P-256.

use std::fmt;

/// Multicodec varint prefixes of compressed public keys.
const PREFIX_K256: [u8; 2] = [0xe7, 0x01];
const PREFIX_P256: [u8; 2] = [0x80, 0x24];

/// Half the group order, big-endian: signatures with `s` above are high-S.
const K256_HALF_N: [u8; 32] = hex32("7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0");
const P256_HALF_N: [u8; 32] = hex32("7FFFFFFF800000007FFFFFFFFFFFFFFFDE737D56D38BCF4279DCE5617E3192A8");

const fn hex32(s: &str) -> [u8; 32] {
    let b = s.as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = (nibble(b[2 * i]) << 4) | nibble(b[2 * i + 1]);
        i += 1;
    }
    out
}

const fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'A'..=b'F' => c - b'A' + 10,
        _ => c - b'a' + 10,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Curve {
    K256,
    P256,
}

impl Curve {
    pub fn name(self) -> &'static str {
        match self {
            Curve::K256 => "K-256",
            Curve::P256 => "P-256",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum KeyError {
    #[error("multikey is not base58btc ('z' prefix)")]
    Multibase,
    #[error("multikey base58 decode failed")]
    Base58,
    #[error("unknown multicodec key prefix {0:02x?}")]
    Prefix([u8; 2]),
    #[error("not a did:key")]
    DidKey,
    #[error("invalid {0} public key point")]
    Point(&'static str),
    #[error("invalid {0} private key")]
    Private(&'static str),
    #[error("unsupported verification method type {0:?}")]
    Type(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum SigError {
    #[error("signature is {0} bytes, expected 64 (r||s; DER is not accepted)")]
    Length(usize),
    #[error("signature is high-S")]
    HighS,
    #[error("signature does not verify")]
    Invalid,
}

/// A parsed public key, ready to verify.
#[derive(Clone)]
pub struct PublicKey {
    compressed: [u8; 33],
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    K256(secp256k1::PublicKey),
    P256(std::sync::Arc<aws_lc_rs::signature::ParsedPublicKey>),
}

impl PartialEq for PublicKey {
    fn eq(&self, o: &PublicKey) -> bool {
        self.curve() == o.curve() && self.compressed == o.compressed
    }
}
impl Eq for PublicKey {}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_multikey())
    }
}

/// Compress a SEC1 point (33 or 65 bytes) to 33 bytes.
fn compress(point: &[u8]) -> Option<[u8; 33]> {
    let mut out = [0u8; 33];
    match point.len() {
        33 if point[0] == 2 || point[0] == 3 => out.copy_from_slice(point),
        65 if point[0] == 4 => {
            out[0] = 2 | (point[64] & 1);
            out[1..].copy_from_slice(&point[1..33]);
        }
        _ => return None,
    }
    Some(out)
}

impl PublicKey {
    /// Parse a SEC1 point (compressed or uncompressed) on `curve`.
    pub fn from_sec1(curve: Curve, point: &[u8]) -> Result<PublicKey, KeyError> {
        let compressed = compress(point).ok_or(KeyError::Point(curve.name()))?;
        let inner = match curve {
            Curve::K256 => {
                Inner::K256(secp256k1::PublicKey::from_slice(&compressed).map_err(|_| KeyError::Point(curve.name()))?)
            }
            Curve::P256 => {
                let k =
                    aws_lc_rs::signature::ParsedPublicKey::new(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED, point)
                        .map_err(|_| KeyError::Point(curve.name()))?;
                Inner::P256(std::sync::Arc::new(k))
            }
        };
        Ok(PublicKey { compressed, inner })
    }

    pub fn curve(&self) -> Curve {
        match self.inner {
            Inner::K256(_) => Curve::K256,
            Inner::P256(_) => Curve::P256,
        }
    }

    pub fn compressed(&self) -> &[u8; 33] {
        &self.compressed
    }

    /// Parse a Multikey (`z` + base58btc(multicodec ‖ compressed point)).
    pub fn from_multikey(s: &str) -> Result<PublicKey, KeyError> {
        let bytes = decode_multibase(s)?;
        if bytes.len() < 2 {
            return Err(KeyError::Prefix([0, 0]));
        }
        let prefix = [bytes[0], bytes[1]];
        let curve = match prefix {
            PREFIX_K256 => Curve::K256,
            PREFIX_P256 => Curve::P256,
            _ => return Err(KeyError::Prefix(prefix)),
        };
        PublicKey::from_sec1(curve, &bytes[2..])
    }

    /// Parse the legacy DID document forms: `publicKeyMultibase` without a
    /// multicodec prefix, curve given by the verification method type.
    pub fn from_legacy(method_type: &str, multibase: &str) -> Result<PublicKey, KeyError> {
        let curve = match method_type {
            "EcdsaSecp256k1VerificationKey2019" => Curve::K256,
            "EcdsaSecp256r1VerificationKey2019" => Curve::P256,
            "Multikey" => return PublicKey::from_multikey(multibase),
            other => return Err(KeyError::Type(other.to_owned())),
        };
        let bytes = decode_multibase(multibase)?;
        PublicKey::from_sec1(curve, &bytes)
    }

    pub fn to_multikey(&self) -> String {
        let mut b = Vec::with_capacity(35);
        b.extend_from_slice(match self.curve() {
            Curve::K256 => &PREFIX_K256,
            Curve::P256 => &PREFIX_P256,
        });
        b.extend_from_slice(&self.compressed);
        format!("z{}", bs58::encode(b).into_string())
    }

    pub fn from_did_key(s: &str) -> Result<PublicKey, KeyError> {
        PublicKey::from_multikey(s.strip_prefix("did:key:").ok_or(KeyError::DidKey)?)
    }

    pub fn to_did_key(&self) -> String {
        format!("did:key:{}", self.to_multikey())
    }

    /// Verify a raw `r ‖ s` signature over a SHA-256 digest.
    pub fn verify_digest(&self, digest: &[u8; 32], sig: &[u8]) -> Result<(), SigError> {
        match &self.inner {
            Inner::K256(pk) => verify_k256(pk, digest, sig),
            Inner::P256(pk) => {
                check_low_s(sig, &P256_HALF_N)?;
                let d = aws_lc_rs::digest::Digest::import_less_safe(digest, &aws_lc_rs::digest::SHA256)
                    .map_err(|_| SigError::Invalid)?;
                pk.verify_digest_sig(&d, sig).map_err(|_| SigError::Invalid)
            }
        }
    }

    /// The key in the form a cache holds (see [`CompactKey`]).
    pub fn compact(&self) -> CompactKey {
        match &self.inner {
            Inner::K256(pk) => CompactKey::K256(*pk),
            Inner::P256(_) => CompactKey::P256(self.compressed),
        }
    }

    /// Verify a signature over `msg` (hashed with SHA-256 here).
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), SigError> {
        self.verify_digest(&sha256(msg), sig)
    }
}

/// A 64-byte `r ‖ s` whose `s` is at most `half_n`.
fn check_low_s(sig: &[u8], half_n: &[u8; 32]) -> Result<(), SigError> {
    if sig.len() != 64 {
        return Err(SigError::Length(sig.len()));
    }
    let s: &[u8; 32] = sig[32..].try_into().expect("64 bytes");
    if s > half_n {
        return Err(SigError::HighS);
    }
    Ok(())
}

fn verify_k256(pk: &secp256k1::PublicKey, digest: &[u8; 32], sig: &[u8]) -> Result<(), SigError> {
    check_low_s(sig, &K256_HALF_N)?;
    let sig = secp256k1::ecdsa::Signature::from_compact(sig).map_err(|_| SigError::Invalid)?;
    let msg = secp256k1::Message::from_digest(*digest);
    secp256k1::ecdsa::verify(&sig, msg, pk).map_err(|_| SigError::Invalid)
}

/// A public key in 65 bytes, no heap: what an identity cache holds per
/// account. A K-256 key is kept parsed (libsecp256k1's 64-byte form, so a
/// verification costs nothing more); a P-256 key compressed, parsed by
/// AWS-LC when it verifies (its parsed form lives on the heap and is
/// several times larger).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CompactKey {
    K256(secp256k1::PublicKey),
    P256([u8; 33]),
}

impl fmt::Debug for CompactKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CompactKey({:?}, {:02x?})", self.curve(), &self.compressed()[..4])
    }
}

impl CompactKey {
    pub fn curve(&self) -> Curve {
        match self {
            CompactKey::K256(_) => Curve::K256,
            CompactKey::P256(_) => Curve::P256,
        }
    }

    /// The compressed SEC1 point.
    pub fn compressed(&self) -> [u8; 33] {
        match self {
            CompactKey::K256(pk) => pk.serialize(),
            CompactKey::P256(c) => *c,
        }
    }

    /// From a curve and a compressed point (as stored).
    pub fn from_compressed(curve: Curve, point: &[u8]) -> Result<CompactKey, KeyError> {
        Ok(PublicKey::from_sec1(curve, point)?.compact())
    }

    pub fn to_public_key(&self) -> PublicKey {
        match self {
            CompactKey::K256(pk) => PublicKey { compressed: pk.serialize(), inner: Inner::K256(*pk) },
            CompactKey::P256(c) => PublicKey::from_sec1(Curve::P256, c).expect("checked when compacted"),
        }
    }

    /// As [`PublicKey::verify_digest`].
    pub fn verify_digest(&self, digest: &[u8; 32], sig: &[u8]) -> Result<(), SigError> {
        match self {
            CompactKey::K256(pk) => verify_k256(pk, digest, sig),
            CompactKey::P256(_) => self.to_public_key().verify_digest(digest, sig),
        }
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

fn decode_multibase(s: &str) -> Result<Vec<u8>, KeyError> {
    let rest = s.strip_prefix('z').ok_or(KeyError::Multibase)?;
    bs58::decode(rest).into_vec().map_err(|_| KeyError::Base58)
}

/// A signing key (synthetic network, tests).
#[derive(Clone)]
pub enum PrivateKey {
    K256(secp256k1::SecretKey),
    P256(p256::ecdsa::SigningKey),
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({})", self.curve().name())
    }
}

impl PrivateKey {
    pub fn from_bytes(curve: Curve, b: &[u8]) -> Result<PrivateKey, KeyError> {
        match curve {
            Curve::K256 => {
                let b: [u8; 32] = b.try_into().map_err(|_| KeyError::Private("K-256"))?;
                secp256k1::SecretKey::from_secret_bytes(b).map(PrivateKey::K256).map_err(|_| KeyError::Private("K-256"))
            }
            Curve::P256 => {
                p256::ecdsa::SigningKey::from_slice(b).map(PrivateKey::P256).map_err(|_| KeyError::Private("P-256"))
            }
        }
    }

    /// A key from 32 random bytes; retries the (astronomically rare) out of
    /// range scalars.
    pub fn generate(curve: Curve, rng: &mut impl rand::RngCore) -> PrivateKey {
        loop {
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            if let Ok(k) = PrivateKey::from_bytes(curve, &b) {
                return k;
            }
        }
    }

    pub fn curve(&self) -> Curve {
        match self {
            PrivateKey::K256(_) => Curve::K256,
            PrivateKey::P256(_) => Curve::P256,
        }
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        match self {
            PrivateKey::K256(k) => k.to_secret_bytes(),
            PrivateKey::P256(k) => k.to_bytes().into(),
        }
    }

    pub fn public_key(&self) -> PublicKey {
        match self {
            PrivateKey::K256(k) => {
                let pk = secp256k1::PublicKey::from_secret_key(k);
                PublicKey::from_sec1(Curve::K256, &pk.serialize()).expect("valid derived key")
            }
            PrivateKey::P256(k) => {
                let pt = k.verifying_key().to_encoded_point(true);
                PublicKey::from_sec1(Curve::P256, pt.as_bytes()).expect("valid derived key")
            }
        }
    }

    /// Sign a SHA-256 digest; the result is low-S `r ‖ s`.
    pub fn sign_digest(&self, digest: &[u8; 32]) -> [u8; 64] {
        match self {
            PrivateKey::K256(k) => {
                let msg = secp256k1::Message::from_digest(*digest);
                secp256k1::ecdsa::sign(msg, k).serialize_compact()
            }
            PrivateKey::P256(k) => {
                use p256::ecdsa::signature::hazmat::PrehashSigner;
                let sig: p256::ecdsa::Signature = k.sign_prehash(digest).expect("32-byte prehash");
                let sig = sig.normalize_s().unwrap_or(sig);
                sig.to_bytes().into()
            }
        }
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.sign_digest(&sha256(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn sign_verify_both_curves() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for curve in [Curve::K256, Curve::P256] {
            let k = PrivateKey::generate(curve, &mut rng);
            let pk = k.public_key();
            let sig = k.sign(b"hello");
            pk.verify(b"hello", &sig).unwrap();
            assert_eq!(pk.verify(b"hellp", &sig), Err(SigError::Invalid));
            assert_eq!(pk.verify(b"hello", &sig[..63]), Err(SigError::Length(63)));
            let round = PublicKey::from_multikey(&pk.to_multikey()).unwrap();
            assert_eq!(round, pk);
            assert_eq!(PublicKey::from_did_key(&pk.to_did_key()).unwrap(), pk);
            // deterministic
            assert_eq!(k.sign(b"hello"), sig);
            let again = PrivateKey::from_bytes(curve, &k.to_bytes()).unwrap();
            assert_eq!(again.public_key(), pk);
            // The cache's form verifies the same, and round-trips.
            let c = pk.compact();
            c.verify_digest(&sha256(b"hello"), &sig).unwrap();
            assert_eq!(c.verify_digest(&sha256(b"hellp"), &sig), Err(SigError::Invalid));
            assert_eq!(c.to_public_key(), pk);
            assert_eq!(CompactKey::from_compressed(curve, &c.compressed()).unwrap(), c);
            assert!(std::mem::size_of::<CompactKey>() <= 66);
        }
    }

    #[test]
    fn high_s_is_rejected() {
        // Flip a valid low-S signature to its high-S twin: s' = n - s.
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let k = PrivateKey::generate(Curve::P256, &mut rng);
        let sig = k.sign(b"x");
        use p256::elliptic_curve::PrimeField;
        let mut fb = p256::FieldBytes::default();
        fb.copy_from_slice(&sig[32..]);
        let s = p256::Scalar::from_repr(fb).unwrap();
        let neg: p256::FieldBytes = (-s).into();
        let mut high = sig;
        high[32..].copy_from_slice(&neg);
        assert_eq!(k.public_key().verify(b"x", &high), Err(SigError::HighS));
    }
}
