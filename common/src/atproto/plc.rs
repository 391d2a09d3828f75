//! PLC directory operations as its export log carries them
//! (`GET /export?after=<createdAt>&count=<n>`: newline-delimited JSON,
//! oldest first, at most 1,000 a page).
//!
//! Each line is `{did, operation, cid, nullified, createdAt}`. An
//! operation states a DID's whole current state, not a change: the
//! `plc_operation` form (`verificationMethods.atproto`,
//! `services.atproto_pds`, `alsoKnownAs`), the legacy `create` form
//! (`signingKey`, `service`, `handle`), or `plc_tombstone` (the DID is
//! gone). [`parse_export_line`] keeps what a relay needs of it; the
//! directory's own signatures over the operation are not checked here (a
//! relay trusts the directory's export as it trusts its documents).

use super::crypto::PublicKey;
use super::syntax::{is_did, is_handle, Datetime};
use serde::Deserialize;

/// What an operation says a DID now is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlcState {
    Active {
        /// The `#atproto` verification method (`None`: none, or not a key
        /// this relay can use).
        signing_key: Option<PublicKey>,
        /// The `#atproto_pds` endpoint as written.
        pds: Option<String>,
        handle: Option<String>,
    },
    /// `plc_tombstone`: the DID has no document any more.
    Tombstone,
}

/// One line of the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlcOp {
    pub did: String,
    pub cid: String,
    /// As the directory wrote it (the next page's `after`).
    pub created_at: String,
    pub created_micros: i64,
    /// Replaced by a later fork of the DID's log: it does not count.
    pub nullified: bool,
    pub state: PlcState,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlcError {
    #[error("export line is not JSON of the expected shape: {0}")]
    Json(String),
    #[error("export line's did {0:?} is not a DID")]
    Did(String),
    #[error("export line's createdAt {0:?} is not a datetime")]
    CreatedAt(String),
    #[error("unknown operation type {0:?}")]
    Type(String),
}

#[derive(Deserialize)]
struct RawLine {
    did: String,
    operation: RawOp,
    #[serde(default)]
    cid: String,
    #[serde(default)]
    nullified: bool,
    #[serde(rename = "createdAt")]
    created_at: String,
}

#[derive(Deserialize)]
struct RawOp {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, rename = "verificationMethods")]
    verification_methods: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    services: Option<std::collections::BTreeMap<String, RawService>>,
    #[serde(default, rename = "alsoKnownAs")]
    also_known_as: Option<Vec<String>>,
    // The legacy `create` form.
    #[serde(default, rename = "signingKey")]
    signing_key: Option<String>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    handle: Option<String>,
}

#[derive(Deserialize)]
struct RawService {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    endpoint: String,
}

fn handle_of(h: &str) -> Option<String> {
    let h = h.strip_prefix("at://").unwrap_or(h).to_ascii_lowercase();
    is_handle(&h).then_some(h)
}

/// Parse one line of `/export`.
pub fn parse_export_line(line: &str) -> Result<PlcOp, PlcError> {
    let raw: RawLine = serde_json::from_str(line).map_err(|e| PlcError::Json(e.to_string()))?;
    if !is_did(&raw.did) {
        return Err(PlcError::Did(raw.did));
    }
    let created_micros =
        Datetime::parse(&raw.created_at).map(|d| d.unix_micros()).ok_or(PlcError::CreatedAt(raw.created_at.clone()))?;
    let op = raw.operation;
    let state = match op.kind.as_str() {
        "plc_tombstone" => PlcState::Tombstone,
        "plc_operation" => PlcState::Active {
            signing_key: op
                .verification_methods
                .as_ref()
                .and_then(|m| m.get("atproto"))
                .and_then(|k| PublicKey::from_did_key(k).ok()),
            pds: op
                .services
                .as_ref()
                .and_then(|s| s.get("atproto_pds"))
                .filter(|s| s.kind == "AtprotoPersonalDataServer")
                .map(|s| s.endpoint.clone()),
            handle: op
                .also_known_as
                .as_ref()
                .and_then(|a| a.iter().find_map(|h| h.strip_prefix("at://")))
                .and_then(handle_of),
        },
        "create" => PlcState::Active {
            signing_key: op.signing_key.as_deref().and_then(|k| PublicKey::from_did_key(k).ok()),
            pds: op.service.clone(),
            handle: op.handle.as_deref().and_then(handle_of),
        },
        other => return Err(PlcError::Type(other.to_owned())),
    };
    Ok(PlcOp {
        did: raw.did,
        cid: raw.cid,
        created_at: raw.created_at,
        created_micros,
        nullified: raw.nullified,
        state,
    })
}

/// An export line for a `plc_operation` (fakenet's directory, tests).
pub fn export_line(did: &str, key: &PublicKey, handle: &str, pds: &str, cid: &str, created_at: &str) -> String {
    serde_json::json!({
        "did": did,
        "operation": {
            "type": "plc_operation",
            "rotationKeys": [key.to_did_key()],
            "verificationMethods": {"atproto": key.to_did_key()},
            "alsoKnownAs": [format!("at://{handle}")],
            "services": {"atproto_pds": {"type": "AtprotoPersonalDataServer", "endpoint": pds}},
            "prev": null,
            "sig": "",
        },
        "cid": cid,
        "nullified": false,
        "createdAt": created_at,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atproto::crypto::{Curve, PrivateKey};
    use rand::SeedableRng;

    #[test]
    fn the_three_forms() {
        let key = PrivateKey::generate(Curve::K256, &mut rand::rngs::StdRng::seed_from_u64(3)).public_key();
        let did = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";
        let line = export_line(did, &key, "Alice.Test", "https://pds.test", "bafyop", "2026-01-02T03:04:05.678Z");
        let op = parse_export_line(&line).unwrap();
        assert_eq!(op.did, did);
        assert_eq!(op.created_at, "2026-01-02T03:04:05.678Z");
        assert!(!op.nullified);
        assert_eq!(
            op.state,
            PlcState::Active {
                signing_key: Some(key.clone()),
                pds: Some("https://pds.test".into()),
                handle: Some("alice.test".into())
            }
        );
        let legacy = format!(
            r#"{{"did":"{did}","operation":{{"type":"create","signingKey":"{}","recoveryKey":"x","handle":"bob.test","service":"https://old.test","prev":null,"sig":"s"}},"cid":"c","nullified":true,"createdAt":"2023-01-01T00:00:00.000Z"}}"#,
            key.to_did_key()
        );
        let op = parse_export_line(&legacy).unwrap();
        assert!(op.nullified);
        assert_eq!(
            op.state,
            PlcState::Active {
                signing_key: Some(key),
                pds: Some("https://old.test".into()),
                handle: Some("bob.test".into())
            }
        );
        let tomb = format!(
            r#"{{"did":"{did}","operation":{{"type":"plc_tombstone","prev":"p","sig":"s"}},"cid":"c","nullified":false,"createdAt":"2024-01-01T00:00:00Z"}}"#
        );
        assert_eq!(parse_export_line(&tomb).unwrap().state, PlcState::Tombstone);
    }

    #[test]
    fn bad_lines_are_errors_not_panics() {
        assert!(matches!(parse_export_line("{"), Err(PlcError::Json(_))));
        assert!(matches!(
            parse_export_line(
                r#"{"did":"nope","operation":{"type":"plc_tombstone"},"createdAt":"2024-01-01T00:00:00Z"}"#
            ),
            Err(PlcError::Did(_))
        ));
        assert!(matches!(
            parse_export_line(r#"{"did":"did:plc:a","operation":{"type":"plc_tombstone"},"createdAt":"yesterday"}"#),
            Err(PlcError::CreatedAt(_))
        ));
        assert!(matches!(
            parse_export_line(r#"{"did":"did:plc:a","operation":{"type":"x"},"createdAt":"2024-01-01T00:00:00Z"}"#),
            Err(PlcError::Type(_))
        ));
        // A key that does not parse, a service of another type: absent.
        let op = parse_export_line(
            r#"{"did":"did:plc:a","operation":{"type":"plc_operation","verificationMethods":{"atproto":"did:key:zBAD"},"services":{"atproto_pds":{"type":"Other","endpoint":"https://x"}}},"createdAt":"2024-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(op.state, PlcState::Active { signing_key: None, pds: None, handle: None });
    }
}
