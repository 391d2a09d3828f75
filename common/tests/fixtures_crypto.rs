//! atproto-interop-tests/crypto: signatures (valid, high-S, DER) and did:key.
mod support;
use sluice_common::atproto::crypto::{Curve, PrivateKey, PublicKey, SigError};

#[test]
fn signature_fixtures() {
    let cases = support::json("atproto-interop-tests/crypto/signature-fixtures.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 6);
    let (mut valid, mut invalid) = (0, 0);
    for c in cases {
        let comment = c["comment"].as_str().unwrap();
        let msg = support::b64(c["messageBase64"].as_str().unwrap());
        let sig = support::b64(c["signatureBase64"].as_str().unwrap());
        let key = PublicKey::from_did_key(c["publicKeyDid"].as_str().unwrap()).unwrap();
        let legacy =
            PublicKey::from_legacy(c["didDocSuite"].as_str().unwrap(), c["publicKeyMultibase"].as_str().unwrap())
                .unwrap();
        assert_eq!(key, legacy, "{comment}: did:key and legacy multibase disagree");
        let want_curve = match c["algorithm"].as_str().unwrap() {
            "ES256K" => Curve::K256,
            "ES256" => Curve::P256,
            a => panic!("algorithm {a}"),
        };
        assert_eq!(key.curve(), want_curve, "{comment}");
        let got = key.verify(&msg, &sig);
        let tags: Vec<&str> = c["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        if c["validSignature"].as_bool().unwrap() {
            assert_eq!(got, Ok(()), "{comment}");
            valid += 1;
        } else {
            assert!(got.is_err(), "{comment}: accepted an invalid signature");
            if tags.contains(&"high-s") {
                assert_eq!(got, Err(SigError::HighS), "{comment}");
            }
            if tags.contains(&"der-encoded") {
                assert!(matches!(got, Err(SigError::Length(_))), "{comment}: {got:?}");
            }
            invalid += 1;
        }
    }
    assert!(valid >= 2 && invalid >= 4, "valid={valid} invalid={invalid}");
}

fn didkey_cases(file: &str, curve: Curve) {
    let cases = support::json(&format!("atproto-interop-tests/crypto/{file}"));
    let cases = cases.as_array().unwrap();
    assert!(!cases.is_empty());
    for c in cases {
        let bytes: Vec<u8> = if let Some(hex) = c["privateKeyBytesHex"].as_str() {
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
        } else {
            bs58::decode(c["privateKeyBytesBase58"].as_str().unwrap()).into_vec().unwrap()
        };
        let k = PrivateKey::from_bytes(curve, &bytes).unwrap();
        let did = c["publicDidKey"].as_str().unwrap();
        assert_eq!(k.public_key().to_did_key(), did);
        assert_eq!(PublicKey::from_did_key(did).unwrap(), k.public_key());
        // and the key signs what it verifies
        let sig = k.sign(b"sluice");
        PublicKey::from_did_key(did).unwrap().verify(b"sluice", &sig).unwrap();
    }
}

#[test]
fn did_key_k256() {
    didkey_cases("w3c_didkey_K256.json", Curve::K256);
}

#[test]
fn did_key_p256() {
    didkey_cases("w3c_didkey_P256.json", Curve::P256);
}
