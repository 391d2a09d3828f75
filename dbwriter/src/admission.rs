//! Whether requestCrawl may add a host (runs on a query worker thread, so
//! blocking DNS and HTTP are fine here, bounded by timeouts).
//!
//! Steps, in order; the first that fails is the 400 answer, and nothing is
//! stored:
//! 1. the name parses (`PdsHost`); without `allow_insecure_hosts`, it is
//!    not a local name and not plain text (`netguard::name_refused`);
//! 2. it resolves, and (without `allow_insecure_hosts`) every address is
//!    globally reachable (`netguard::address_refused`): one internal
//!    address is enough to refuse, since a later connect may pick it;
//! 3. the server answers `com.atproto.server.describeServer` with a JSON
//!    object naming its `did`, fetched from the addresses just checked
//!    (not a second lookup that could answer differently).
//!
//! requestCrawl runs step 1, then its ban and rate checks, then steps 2
//! and 3 for a host that is new or not active ([`check_network`]).
//!
//! The network is a trait ([`Net`]) so tests inject name → address
//! mappings and answers (there is no DNS in CI).

use sluice_common::atproto::identity::PdsHost;
use sluice_common::process::netguard;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// What admission needs from the network.
pub trait Net: Send + Sync {
    fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>>;
    /// GET `path` from `host` at exactly `addrs`; the body of a 200.
    fn get(&self, host: &PdsHost, addrs: &[SocketAddr], path: &str) -> Result<String, FetchError>;
}

/// A describeServer fetch that failed (connection, status, body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub String);

/// Why a host was refused (the XRPC error message says it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0:?} is not a hostname")]
    NotAHost(String),
    #[error("{0} is loopback, private or plain-text; it needs allow_insecure_hosts")]
    Insecure(String),
    #[error("{host} is refused: {why}")]
    LocalName { host: String, why: &'static str },
    #[error("{host} does not resolve: {why}")]
    NoAddress { host: String, why: String },
    #[error("{host} resolves to {addr}, which is refused: {why}")]
    LocalAddress { host: String, addr: IpAddr, why: &'static str },
    #[error("{host} does not answer com.atproto.server.describeServer as a PDS: {why}")]
    NotAPds { host: String, why: String },
}

/// The host a requestCrawl names: a bare `hostname[:port]` (TLS, except a
/// loopback or private name) or a URL.
pub fn parse_target(raw: &str, allow_insecure: bool) -> Result<PdsHost, Refusal> {
    let parsed = if raw.contains("://") {
        PdsHost::from_endpoint(raw)
    } else {
        PdsHost::parse_authority(raw, false).map(|mut h| {
            h.insecure = h.is_local();
            h
        })
    };
    let host = parsed.ok_or_else(|| Refusal::NotAHost(raw.to_owned()))?;
    if allow_insecure {
        return Ok(host);
    }
    if host.insecure || host.is_local() {
        return Err(Refusal::Insecure(host.name));
    }
    if let Some(why) = netguard::name_refused(host.hostname()) {
        return Err(Refusal::LocalName { host: host.name.clone(), why });
    }
    Ok(host)
}

/// Steps 1–3 above.
pub fn admit(raw: &str, allow_insecure: bool, net: &dyn Net) -> Result<PdsHost, Refusal> {
    let host = parse_target(raw, allow_insecure)?;
    check_network(&host, allow_insecure, net)?;
    Ok(host)
}

/// Steps 2 and 3 for a parsed host (requestCrawl checks bans in between,
/// so a banned name costs no lookup).
pub fn check_network(host: &PdsHost, allow_insecure: bool, net: &dyn Net) -> Result<(), Refusal> {
    let port =
        host.name.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(if host.insecure { 80 } else { 443 });
    let no_address = |why: String| Refusal::NoAddress { host: host.name.clone(), why };
    let ips = net.resolve(host.hostname(), port).map_err(|e| no_address(e.to_string()))?;
    if ips.is_empty() {
        return Err(no_address("no address".into()));
    }
    if !allow_insecure {
        for ip in &ips {
            if let Some(why) = netguard::address_refused(*ip) {
                return Err(Refusal::LocalAddress { host: host.name.clone(), addr: *ip, why });
            }
        }
    }
    let addrs: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
    let not_a_pds = |why: String| Refusal::NotAPds { host: host.name.clone(), why };
    let body =
        net.get(host, &addrs, "/xrpc/com.atproto.server.describeServer").map_err(|e| not_a_pds(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| not_a_pds(format!("not JSON: {e}")))?;
    if !v.get("did").is_some_and(|d| d.as_str().is_some_and(|s| s.starts_with("did:"))) {
        return Err(not_a_pds("the answer names no did".into()));
    }
    Ok(())
}

/// The real network: the system resolver, and ureq pinned to the checked
/// addresses, 5 s per request, answers up to 64 KiB.
pub struct SystemNet {
    tls: std::sync::Arc<rustls::ClientConfig>,
}

impl SystemNet {
    pub fn new(tls: std::sync::Arc<rustls::ClientConfig>) -> SystemNet {
        SystemNet { tls }
    }
}

/// Answers ureq's lookups with the addresses admission checked.
struct Pinned(Vec<SocketAddr>);

impl ureq::Resolver for Pinned {
    fn resolve(&self, _netloc: &str) -> std::io::Result<Vec<SocketAddr>> {
        Ok(self.0.clone())
    }
}

impl Net for SystemNet {
    fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>> {
        use std::net::ToSocketAddrs;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        Ok((host, port).to_socket_addrs()?.map(|a| a.ip()).collect())
    }

    fn get(&self, host: &PdsHost, addrs: &[SocketAddr], path: &str) -> Result<String, FetchError> {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .redirects(0)
            .resolver(Pinned(addrs.to_vec()))
            .tls_config(self.tls.clone())
            .build();
        let scheme = if host.insecure { "http" } else { "https" };
        let resp =
            agent.get(&format!("{scheme}://{}{path}", host.name)).call().map_err(|e| FetchError(e.to_string()))?;
        let mut body = String::new();
        use std::io::Read;
        resp.into_reader().take(64 * 1024).read_to_string(&mut body).map_err(|e| FetchError(e.to_string()))?;
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Names and answers as a test says.
    struct FakeNet {
        dns: HashMap<&'static str, Vec<&'static str>>,
        pds: bool,
    }

    impl Net for FakeNet {
        fn resolve(&self, host: &str, _: u16) -> std::io::Result<Vec<IpAddr>> {
            if let Ok(ip) = host.parse() {
                return Ok(vec![ip]);
            }
            let a = self.dns.get(host).ok_or_else(|| std::io::Error::other("no such name"))?;
            Ok(a.iter().map(|s| s.parse().unwrap()).collect())
        }
        fn get(&self, _: &PdsHost, addrs: &[SocketAddr], _: &str) -> Result<String, FetchError> {
            assert!(!addrs.is_empty());
            if self.pds {
                Ok(r#"{"did": "did:web:pds.example.com", "availableUserDomains": []}"#.into())
            } else {
                Ok("<html>a printer</html>".into())
            }
        }
    }

    fn net(pds: bool) -> FakeNet {
        let dns = HashMap::from([
            ("pds.example.com", vec!["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]),
            ("rebind.example.com", vec!["93.184.215.14", "10.0.0.7"]),
            ("loop.example.com", vec!["127.0.0.1"]),
            ("v6local.example.com", vec!["fd00::1"]),
            ("mapped.example.com", vec!["::ffff:169.254.169.254"]),
            ("nat64.example.com", vec!["64:ff9b::a9fe:a9fe"]),
            ("shared.example.com", vec!["100.64.0.1"]),
        ]);
        FakeNet { dns, pds }
    }

    #[test]
    fn public_pds_is_admitted() {
        assert_eq!(admit("pds.example.com", false, &net(true)).unwrap().name, "pds.example.com");
        assert_eq!(admit("https://pds.example.com/", false, &net(true)).unwrap().name, "pds.example.com");
    }

    #[test]
    fn internal_names_and_addresses_are_refused() {
        let n = net(true);
        for raw in [
            "localhost",
            "printer.local",
            "metadata.google.internal",
            "foo.internal",
            "nas.home.arpa",
            "intranet",
            "a.localhost",
        ] {
            let e = admit(raw, false, &n).unwrap_err();
            // A single label is not even a hostname to PdsHost.
            assert!(matches!(e, Refusal::LocalName { .. } | Refusal::Insecure(_) | Refusal::NotAHost(_)), "{raw}: {e}");
        }
        for raw in ["169.254.169.254", "100.64.0.1", "0.0.0.0:2470", "127.0.0.1", "10.1.1.1"] {
            let e = admit(raw, false, &n).unwrap_err();
            assert!(matches!(e, Refusal::LocalName { .. } | Refusal::Insecure(_)), "{raw}: {e}");
        }
        for raw in [
            "rebind.example.com",
            "loop.example.com",
            "v6local.example.com",
            "mapped.example.com",
            "nat64.example.com",
            "shared.example.com",
        ] {
            let e = admit(raw, false, &n).unwrap_err();
            assert!(matches!(e, Refusal::LocalAddress { .. }), "{raw}: {e}");
        }
        // allow_insecure_hosts: loopback and private are fine (tests, demo).
        assert!(admit("loop.example.com", true, &n).is_ok());
        assert!(admit("localhost:2583", true, &n).is_err(), "localhost itself does not resolve in FakeNet");
    }

    #[test]
    fn unresolvable_or_not_a_pds_is_refused() {
        let e = admit("nowhere.example.com", false, &net(true)).unwrap_err();
        assert!(matches!(e, Refusal::NoAddress { .. }), "{e}");
        let e = admit("pds.example.com", false, &net(false)).unwrap_err();
        assert!(matches!(e, Refusal::NotAPds { .. }), "{e}");
        assert!(e.to_string().contains("describeServer"), "{e}");
        assert!(matches!(admit("not a host", true, &net(true)), Err(Refusal::NotAHost(_))));
    }
}
