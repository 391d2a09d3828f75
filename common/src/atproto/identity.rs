//! DID documents: what a relay needs from an account's identity.
//!
//! [`Identity::from_did_document`] extracts the `#atproto` signing key
//! (Multikey, or the legacy `EcdsaSecp256k1VerificationKey2019` /
//! `EcdsaSecp256r1VerificationKey2019` forms without multicodec prefix), the
//! `#atproto_pds` service endpoint, and the handle (first `at://` entry of
//! `alsoKnownAs`). Missing pieces are `None`, not errors: an account without
//! a key cannot have commits verified, which the caller reports.
//!
//! [`PdsHost`] is the normalised "host[:port]" of a PDS endpoint, the unit in
//! which the relay partitions and authorises upstream hosts.

use crate::atproto::crypto::{KeyError, PublicKey};
use crate::atproto::syntax::{is_did, is_handle, Did, Handle};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("DID document is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("DID document id {found:?} does not match {expected:?}")]
    IdMismatch { expected: String, found: String },
    #[error("DID document id {0:?} is not a DID")]
    BadId(String),
    #[error("#atproto key: {0}")]
    Key(#[from] KeyError),
}

#[derive(Deserialize)]
struct RawDoc {
    id: String,
    #[serde(default, rename = "alsoKnownAs")]
    also_known_as: Option<Vec<String>>,
    #[serde(default, rename = "verificationMethod")]
    verification_method: Option<Vec<RawMethod>>,
    #[serde(default)]
    service: Option<Vec<RawService>>,
}

#[derive(Deserialize)]
struct RawMethod {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, rename = "publicKeyMultibase")]
    public_key_multibase: Option<String>,
}

#[derive(Deserialize)]
struct RawService {
    id: String,
    #[serde(rename = "type", default)]
    kind: serde_json::Value,
    #[serde(rename = "serviceEndpoint", default)]
    endpoint: serde_json::Value,
}

/// The parts of a DID document the relay uses.
#[derive(Debug, Clone)]
pub struct Identity {
    pub did: Did,
    pub handle: Option<Handle>,
    /// The `#atproto_pds` endpoint URL as written.
    pub pds_endpoint: Option<String>,
    pub signing_key: Option<PublicKey>,
}

fn id_matches(id: &str, did: &str, fragment: &str) -> bool {
    id == fragment || (id.len() == did.len() + fragment.len() && id.starts_with(did) && id.ends_with(fragment))
}

impl Identity {
    /// Parse a DID document. If `expected_did` is given, the document's id
    /// must equal it.
    pub fn from_did_document(json: &[u8], expected_did: Option<&str>) -> Result<Identity, DocError> {
        let doc: RawDoc = serde_json::from_slice(json)?;
        if let Some(exp) = expected_did {
            if doc.id != exp {
                return Err(DocError::IdMismatch { expected: exp.to_owned(), found: doc.id });
            }
        }
        if !is_did(&doc.id) {
            return Err(DocError::BadId(doc.id));
        }
        let did = Did::new(doc.id.clone()).expect("checked");
        let handle = doc
            .also_known_as
            .unwrap_or_default()
            .iter()
            .find_map(|a| a.strip_prefix("at://").map(str::to_owned))
            .filter(|h| is_handle(h))
            .map(|h| Handle::new(h.to_ascii_lowercase()).expect("checked"));
        let mut signing_key = None;
        for m in doc.verification_method.unwrap_or_default() {
            if id_matches(&m.id, &doc.id, "#atproto") {
                if let Some(mb) = &m.public_key_multibase {
                    signing_key = Some(PublicKey::from_legacy(&m.kind, mb)?);
                }
                break;
            }
        }
        let pds_endpoint = doc.service.unwrap_or_default().into_iter().find_map(|s| {
            let ok = id_matches(&s.id, &doc.id, "#atproto_pds") && s.kind == "AtprotoPersonalDataServer";
            match (ok, s.endpoint) {
                (true, serde_json::Value::String(e)) => Some(e),
                _ => None,
            }
        });
        Ok(Identity { did, handle, pds_endpoint, signing_key })
    }

    /// The normalised host of the PDS endpoint, if it is a usable URL.
    pub fn pds_host(&self) -> Option<PdsHost> {
        self.pds_endpoint.as_deref().and_then(PdsHost::from_endpoint)
    }
}

/// A PDS host as the relay names it: lower-case `hostname` or
/// `hostname:port` (port omitted when it is the scheme's default).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PdsHost {
    pub name: String,
    /// `http` / `ws` (true) or `https` / `wss` (false).
    pub insecure: bool,
}

impl PdsHost {
    /// From an endpoint URL such as `https://pds.example.com` or
    /// `http://localhost:2583/`.
    pub fn from_endpoint(url: &str) -> Option<PdsHost> {
        let (insecure, rest) = if let Some(r) = url.strip_prefix("https://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("wss://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("ws://") {
            (true, r)
        } else {
            return None;
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        PdsHost::parse_authority(authority, insecure)
    }

    /// From a bare `hostname[:port]` as given to requestCrawl.
    pub fn parse_authority(authority: &str, insecure: bool) -> Option<PdsHost> {
        if authority.is_empty() || authority.contains('@') || authority.len() > 260 {
            return None;
        }
        let lower = authority.to_ascii_lowercase();
        let (host, port) = match lower.rsplit_once(':') {
            Some((h, p)) => {
                let port: u16 = p.parse().ok()?;
                (h.to_owned(), Some(port))
            }
            None => (lower.clone(), None),
        };
        let valid_host = host == "localhost" || is_handle(&host) || host.parse::<std::net::Ipv4Addr>().is_ok();
        if !valid_host {
            return None;
        }
        let default_port = if insecure { 80 } else { 443 };
        let name = match port {
            Some(p) if p != default_port => format!("{host}:{p}"),
            _ => host,
        };
        Some(PdsHost { name, insecure })
    }

    /// Hostname without the port.
    pub fn hostname(&self) -> &str {
        self.name.rsplit_once(':').map_or(&self.name, |(h, _)| h)
    }

    /// Is this a loopback or private name a public relay must not crawl
    /// unless configured to (`allow_insecure_hosts`)?
    pub fn is_local(&self) -> bool {
        let h = self.hostname();
        h == "localhost"
            || h.ends_with(".localhost")
            || h.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback() || ip.is_private())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pds_hosts() {
        let h = PdsHost::from_endpoint("https://Morel.us-east.host.bsky.network/").unwrap();
        assert_eq!(h.name, "morel.us-east.host.bsky.network");
        assert!(!h.insecure);
        let h = PdsHost::from_endpoint("http://localhost:2583").unwrap();
        assert_eq!(h.name, "localhost:2583");
        assert!(h.insecure && h.is_local());
        assert_eq!(PdsHost::from_endpoint("https://pds.example.com:443").unwrap().name, "pds.example.com");
        assert!(PdsHost::from_endpoint("ftp://x.com").is_none());
        assert!(PdsHost::from_endpoint("https://user@x.com").is_none());
        assert!(PdsHost::parse_authority("bad_host.com", false).is_none());
    }
}
