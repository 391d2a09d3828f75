//! Requests to identity directories, on the identity service's worker
//! threads (blocking HTTP): a `did:plc` document from the PLC directory, a
//! `did:web` document from its own host, a page of the PLC export.
//!
//! Each answer is sorted into what the service must do with it
//! ([`FetchError`]): a permanent "no" (not registered, tombstoned, not a
//! valid document, a did:web name that does not exist or resolves to an
//! address a relay must not dial), "slow down" (429 or 503, with the
//! Retry-After the directory asked for), or a failure worth trying again.
//!
//! Connections are kept (ureq's pool, one idle connection per worker per
//! host), so a directory at 100 requests/s sees a handful of connections,
//! not a connect per request. A did:web name is resolved here and every
//! address checked as a host's would be (`process::netguard`) before
//! anything is sent; ureq then connects only to the addresses checked.

use sluice_common::atproto::identity::Identity;
use sluice_common::atproto::plc::{parse_export_line, PlcOp};
use std::net::SocketAddr;
use std::time::Duration;

/// DID documents larger than this are refused.
pub const DOC_BYTES_MAX: u64 = 64 * 1024;
/// An export page larger than this is refused (1,000 operations are
/// about 500 KB).
pub const EXPORT_BYTES_MAX: u64 = 8 << 20;
/// Operations per export page asked for (the PLC directory's maximum).
pub const EXPORT_COUNT: u32 = 1000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// 404 or 410: not registered, or gone.
    #[error("not found: {0}")]
    NotFound(String),
    /// An answer that is not a valid document (or export page), or a DID
    /// method this relay does not resolve.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Never sent: the did:web name does not exist, or resolves to an
    /// address that is refused.
    #[error("refused: {0}")]
    Refused(String),
    /// 429 or 503: the directory asks to slow down.
    #[error("rate limited: {why}")]
    RateLimited { retry_after: Option<Duration>, why: String },
    /// Anything else (5xx, timeouts, connections, a body cut short):
    /// worth trying again.
    #[error("{0}")]
    Failed(String),
}

impl FetchError {
    /// The directory's "no", not a failure to ask.
    pub fn is_permanent(&self) -> bool {
        matches!(self, FetchError::NotFound(_) | FetchError::Invalid(_) | FetchError::Refused(_))
    }
}

/// A page of the PLC export.
#[derive(Debug, Default)]
pub struct ExportPage {
    pub ops: Vec<PlcOp>,
    /// Lines in the page (a full page means more wait).
    pub lines: usize,
    /// Lines that did not parse (skipped, counted).
    pub bad_lines: usize,
}

/// Where documents come from, and the HTTP clients to ask with.
pub struct Directory {
    plc_url: String,
    insecure: bool,
    plc: ureq::Agent,
    web: ureq::Agent,
}

/// A did:web name resolved and checked as a host's would be: a name that
/// does not exist is `NotFound`, a refused address `PermissionDenied` (so
/// the caller can tell them from a lookup that merely failed).
struct GuardedResolver {
    insecure: bool,
}

impl ureq::Resolver for GuardedResolver {
    fn resolve(&self, netloc: &str) -> std::io::Result<Vec<SocketAddr>> {
        use std::io::{Error, ErrorKind};
        let (host, port) = netloc.rsplit_once(':').ok_or_else(|| Error::other("no port"))?;
        let port: u16 = port.parse().map_err(Error::other)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                let hints = dns_lookup::AddrInfoHints { socktype: libc_sock_stream(), ..Default::default() };
                match dns_lookup::getaddrinfo(Some(host), None, Some(hints)) {
                    Ok(it) => it.filter_map(Result::ok).map(|a| SocketAddr::new(a.sockaddr.ip(), port)).collect(),
                    Err(e) if matches!(e.kind(), dns_lookup::LookupErrorKind::NoName) => {
                        return Err(Error::new(ErrorKind::NotFound, format!("{host} does not exist")))
                    }
                    Err(e) => return Err(Error::other(format!("resolving {host}: {e:?}"))),
                }
            }
        };
        if !self.insecure {
            if let Some((a, why)) =
                addrs.iter().find_map(|a| sluice_common::process::netguard::address_refused(a.ip()).map(|w| (a, w)))
            {
                return Err(Error::new(ErrorKind::PermissionDenied, format!("{host} resolves to {}: {why}", a.ip())));
            }
        }
        if addrs.is_empty() {
            return Err(Error::new(ErrorKind::NotFound, format!("{host} has no address")));
        }
        Ok(addrs)
    }
}

fn libc_sock_stream() -> i32 {
    // SOCK_STREAM is 1 on Linux (the only platform sluice runs on).
    1
}

/// Where a DID's document lives (None: a method this relay does not
/// resolve, or a did:web with a path).
pub fn did_document_url(plc_url: &str, insecure: bool, did: &str) -> Option<String> {
    if did.starts_with("did:plc:") {
        return Some(format!("{}/{did}", plc_url.trim_end_matches('/')));
    }
    let host = did.strip_prefix("did:web:")?;
    if host.contains(':') || host.contains('/') || host.is_empty() {
        return None; // paths are not allowed for atproto did:web
    }
    let host = host.replace("%3A", ":").replace("%3a", ":");
    let name = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
    let local = name == "localhost" || name.starts_with("127.");
    let scheme = if insecure && local { "http" } else { "https" };
    Some(format!("{scheme}://{host}/.well-known/did.json"))
}

impl Directory {
    pub fn new(plc_url: &str, insecure: bool, tls: std::sync::Arc<rustls::ClientConfig>, pool: usize) -> Directory {
        let base = || {
            ureq::AgentBuilder::new()
                .timeout_connect(CONNECT_TIMEOUT)
                .timeout(REQUEST_TIMEOUT)
                .max_idle_connections_per_host(pool.max(1))
                .max_idle_connections(pool.max(1) * 4)
                .tls_config(tls.clone())
        };
        Directory {
            plc_url: plc_url.trim_end_matches('/').to_owned(),
            insecure,
            plc: base().redirects(2).build(),
            // A did:web document is at its own name: no redirects, which
            // would go to names that were not checked.
            web: base().redirects(0).resolver(GuardedResolver { insecure }).build(),
        }
    }

    /// Fetch and parse `did`'s document.
    pub fn document(&self, did: &str) -> Result<Identity, FetchError> {
        let url = did_document_url(&self.plc_url, self.insecure, did)
            .ok_or_else(|| FetchError::Invalid(format!("{did}: not a DID this relay resolves")))?;
        let agent = if did.starts_with("did:web:") { &self.web } else { &self.plc };
        let body = get(agent, &url, DOC_BYTES_MAX)?;
        Identity::from_did_document(&body, Some(did)).map_err(|e| FetchError::Invalid(format!("{url}: {e}")))
    }

    /// One page of the PLC export after `after` (a `createdAt`).
    pub fn export_page(&self, after: &str) -> Result<ExportPage, FetchError> {
        let url = format!("{}/export?count={EXPORT_COUNT}&after={}", self.plc_url, encode_query(after));
        let body = get(&self.plc, &url, EXPORT_BYTES_MAX)?;
        let text = std::str::from_utf8(&body).map_err(|e| FetchError::Invalid(format!("{url}: {e}")))?;
        let mut page = ExportPage::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            page.lines += 1;
            match parse_export_line(line) {
                Ok(op) => page.ops.push(op),
                Err(_) => page.bad_lines += 1,
            }
        }
        Ok(page)
    }
}

/// Percent-encode what a datetime may hold that a query may not.
fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET `url`, its body at most `max` bytes, errors sorted.
fn get(agent: &ureq::Agent, url: &str, max: u64) -> Result<Vec<u8>, FetchError> {
    let resp = agent.get(url).call().map_err(|e| classify(url, e))?;
    let mut body = Vec::new();
    // A body cut short is the network's fault, not the document's.
    std::io::Read::read_to_end(&mut std::io::Read::take(resp.into_reader(), max + 1), &mut body)
        .map_err(|e| FetchError::Failed(format!("reading {url}: {e}")))?;
    if body.len() as u64 > max {
        return Err(FetchError::Invalid(format!("{url}: answer over {max} bytes")));
    }
    Ok(body)
}

/// Seconds of a Retry-After header (a number; an HTTP date is taken as
/// "a while": None).
fn retry_after(resp: &ureq::Response) -> Option<Duration> {
    resp.header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()).map(|s| Duration::from_secs(s.min(3600)))
}

fn classify(url: &str, e: ureq::Error) -> FetchError {
    match e {
        ureq::Error::Status(code @ (404 | 410), _) => FetchError::NotFound(format!("GET {url}: {code}")),
        ureq::Error::Status(code @ (429 | 503), resp) => {
            FetchError::RateLimited { retry_after: retry_after(&resp), why: format!("GET {url}: {code}") }
        }
        ureq::Error::Status(code, _) if (400..500).contains(&code) => FetchError::Invalid(format!("GET {url}: {code}")),
        ureq::Error::Status(code, _) => FetchError::Failed(format!("GET {url}: {code}")),
        ureq::Error::Transport(t) => {
            let io_kind = std::error::Error::source(&t)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .map(std::io::Error::kind);
            let why = format!("GET {url}: {t}");
            match (t.kind(), io_kind) {
                (ureq::ErrorKind::Dns, Some(std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied)) => {
                    FetchError::Refused(why)
                }
                (ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme, _) => FetchError::Invalid(why),
                _ => FetchError::Failed(why),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server answering each connection's requests with `status`
    /// (and `extra` headers), `n` connections at most.
    fn serve(status: u16, extra: &'static str, body: &'static str, n: usize) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().take(n) {
                let Ok(mut s) = s else { continue };
                let mut buf = [0u8; 2048];
                let _ = std::io::Read::read(&mut s, &mut buf);
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = std::io::Write::write_all(&mut s, resp.as_bytes());
            }
        });
        format!("http://{addr}")
    }

    fn dir(url: &str) -> Directory {
        Directory::new(url, true, sluice_common::process::tls::client_config(None).unwrap(), 2)
    }

    #[test]
    fn answers_are_sorted() {
        let plc = "did:plc:abcdefghijklmnopqrstuvwx";
        let e = dir(&serve(404, "", "{}", 1)).document(plc).unwrap_err();
        assert!(matches!(e, FetchError::NotFound(_)) && e.is_permanent(), "{e}");
        let e = dir(&serve(410, "", "{}", 1)).document(plc).unwrap_err();
        assert!(matches!(e, FetchError::NotFound(_)), "{e}");
        let e = dir(&serve(200, "", "{}", 1)).document(plc).unwrap_err();
        assert!(matches!(e, FetchError::Invalid(_)) && e.is_permanent(), "{e}");
        let e = dir(&serve(429, "retry-after: 7\r\n", "{}", 1)).document(plc).unwrap_err();
        assert!(
            matches!(e, FetchError::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(7)),
            "{e}"
        );
        let e = dir(&serve(503, "", "{}", 1)).document(plc).unwrap_err();
        assert!(matches!(e, FetchError::RateLimited { retry_after: None, .. }), "{e}");
        let e = dir(&serve(500, "", "{}", 1)).document(plc).unwrap_err();
        assert!(matches!(e, FetchError::Failed(_)) && !e.is_permanent(), "{e}");
        // Nobody listening: a failure, not a "no".
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = dir(&format!("http://{dead}")).document(plc).unwrap_err();
        assert!(matches!(e, FetchError::Failed(_)), "{e}");
        let e = dir("http://127.0.0.1:9").document("did:key:zQ3s").unwrap_err();
        assert!(matches!(e, FetchError::Invalid(_)), "{e}");
    }

    #[test]
    fn did_web_names_are_checked_before_anything_is_sent() {
        // A name that does not exist: refused (permanent), no request.
        let d =
            Directory::new("http://127.0.0.1:9", false, sluice_common::process::tls::client_config(None).unwrap(), 1);
        let e = d.document("did:web:nx-sluice-test.invalid").unwrap_err();
        assert!(matches!(e, FetchError::Refused(_)), "{e}");
        // Loopback without allow_insecure_hosts: refused.
        let e = d.document("did:web:localhost%3A9").unwrap_err();
        assert!(matches!(e, FetchError::Refused(_)), "{e}");
        assert!(e.to_string().contains("127.0.0.1") || e.to_string().contains("::1"), "{e}");
        // With it: asked (and here nobody answers).
        let d = dir("http://127.0.0.1:9");
        let e = d.document("did:web:localhost%3A9").unwrap_err();
        assert!(matches!(e, FetchError::Failed(_)), "{e}");
    }

    #[test]
    fn export_pages_parse_and_count_bad_lines() {
        let line = r#"{"did":"did:plc:abcdefghijklmnopqrstuvwx","operation":{"type":"plc_tombstone"},"cid":"c","nullified":false,"createdAt":"2026-01-01T00:00:00.000Z"}"#;
        let body: &'static str = Box::leak(format!("{line}\nnot json\n{line}\n").into_boxed_str());
        let page = dir(&serve(200, "", body, 1)).export_page("2026-01-01T00:00:00.000Z").unwrap();
        assert_eq!((page.ops.len(), page.lines, page.bad_lines), (2, 3, 1));
        assert_eq!(encode_query("2026-01-01T00:00:00.000+01:00"), "2026-01-01T00:00:00.000%2B01:00");
    }

    #[test]
    fn document_urls() {
        assert_eq!(
            did_document_url("http://127.0.0.1:9/", false, "did:plc:abc").as_deref(),
            Some("http://127.0.0.1:9/did:plc:abc")
        );
        assert_eq!(
            did_document_url("", true, "did:web:localhost%3A8080").as_deref(),
            Some("http://localhost:8080/.well-known/did.json")
        );
        assert_eq!(
            did_document_url("", false, "did:web:localhost%3A8080").as_deref(),
            Some("https://localhost:8080/.well-known/did.json")
        );
        assert_eq!(
            did_document_url("", true, "did:web:example.com").as_deref(),
            Some("https://example.com/.well-known/did.json")
        );
        assert_eq!(did_document_url("", true, "did:key:z6Mk"), None);
        assert_eq!(did_document_url("", true, "did:web:example.com:path"), None);
    }
}
