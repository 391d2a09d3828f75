//! `sluice tail [URL] [--cursor N] [--json] [--limit N]`: subscribe to a
//! relay's `subscribeRepos` (this one by default, any relay or PDS by URL)
//! and print one line per event: seq, kind, DID and what matters for the
//! kind; with `--json` the body as JSON (CIDs as `{"$link"}`, bytes as
//! `{"$bytes"}`), with its type under `"$type"`. An error frame from the
//! server ends it with the error's name on stderr and exit status 1; a
//! closed stdout (`| head`) ends it quietly.

use anyhow::{bail, Context};
use sluice_common::atproto::cbor::Reader;
use sluice_common::atproto::frame::{self, Event, Message};
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

/// How a stream ended.
pub enum End {
    /// The server closed the stream, or `--limit` was reached.
    Done,
    /// The server sent an error frame.
    ServerError,
}

/// `ws(s)://host[:port][/path]` or `http(s)://...`: the subscribeRepos URL
/// (path added when there is none), the host and port to dial, TLS or not.
fn target(url: &str, cursor: Option<i64>) -> anyhow::Result<(String, String, u16, bool)> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("wss://").or_else(|| url.strip_prefix("https://")) {
        (true, r)
    } else if let Some(r) = url.strip_prefix("ws://").or_else(|| url.strip_prefix("http://")) {
        (false, r)
    } else {
        bail!("{url:?}: expected a ws://, wss://, http:// or https:// URL");
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            (h.trim_matches(['[', ']']).to_owned(), p.parse().with_context(|| format!("port in {url:?}"))?)
        }
        _ => (authority.trim_matches(['[', ']']).to_owned(), if tls { 443 } else { 80 }),
    };
    if host.is_empty() {
        bail!("{url:?}: no host");
    }
    let path = if path.is_empty() { "xrpc/com.atproto.sync.subscribeRepos" } else { path };
    let mut full = format!("{}://{authority}/{path}", if tls { "wss" } else { "ws" });
    if let Some(c) = cursor {
        full += &format!("{}cursor={c}", if full.contains('?') { '&' } else { '?' });
    }
    Ok((full, host, port, tls))
}

/// Follow the stream until it ends; write lines to `out`.
pub fn run(url: &str, cursor: Option<i64>, json: bool, limit: Option<u64>, out: &mut dyn Write) -> anyhow::Result<End> {
    let (full, host, port, tls) = target(url, cursor)?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    let tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(10)).with_context(|| format!("connecting to {addr}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut n = 0u64;
    let mut each = |frame: &[u8]| -> anyhow::Result<Option<End>> {
        let line = match describe(frame, json) {
            Ok(Line::Event(l)) => l,
            Ok(Line::Error(e)) => {
                let _ = writeln!(std::io::stderr(), "{e}");
                return Ok(Some(End::ServerError));
            }
            Err(e) => format!("(undecodable frame of {} bytes: {e})", frame.len()),
        };
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            // The reader went away (`| head`): done, not an error.
            return Ok(Some(End::Done));
        }
        n += 1;
        Ok(limit.is_some_and(|l| n >= l).then_some(End::Done))
    };
    if tls {
        let cfg = sluice_common::process::tls::client_config(None)?;
        let name = rustls::pki_types::ServerName::try_from(host.clone()).context("TLS server name")?;
        let conn = rustls::ClientConnection::new(cfg, name)?;
        follow(tungstenite::client(full.as_str(), rustls::StreamOwned::new(conn, tcp))?.0, &mut each)
    } else {
        follow(tungstenite::client(full.as_str(), tcp)?.0, &mut each)
    }
}

fn follow<S: std::io::Read + std::io::Write>(
    mut ws: tungstenite::WebSocket<S>,
    each: &mut dyn FnMut(&[u8]) -> anyhow::Result<Option<End>>,
) -> anyhow::Result<End> {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Binary(b)) => {
                if let Some(end) = each(&b)? {
                    let _ = ws.close(None);
                    return Ok(end);
                }
            }
            Ok(tungstenite::Message::Close(_)) => return Ok(End::Done),
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => return Ok(End::Done),
            Err(e) => return Err(e).context("reading the stream"),
        }
    }
}

enum Line {
    Event(String),
    Error(String),
}

fn describe(f: &[u8], json: bool) -> anyhow::Result<Line> {
    let d = frame::decode(f)?;
    let ev = match d.message {
        Message::Error { error, message } => {
            return Ok(Line::Error(format!("error from the server: {error}: {}", message.unwrap_or(""))))
        }
        Message::Event(ev) => ev,
    };
    if json {
        let mut r = Reader::new(f);
        let header = value(&mut r, 0)?;
        let mut body = value(&mut r, 0)?;
        if let (Some(t), Some(map)) = (header.get("t").cloned(), body.as_object_mut()) {
            map.insert("$type".into(), t);
        }
        return Ok(Line::Event(body.to_string()));
    }
    let seq = ev.seq().map_or_else(|| "-".to_owned(), |s| s.to_string());
    Ok(Line::Event(match ev {
        Event::Commit(c) => format!("{seq} #commit {} rev={} ops={}", c.repo, c.rev, c.ops.len()),
        Event::Sync(s) => format!("{seq} #sync {} rev={}", s.did, s.rev),
        Event::Identity(i) => format!("{seq} #identity {} handle={}", i.did, i.handle.unwrap_or("-")),
        Event::Account(a) => {
            format!("{seq} #account {} active={} status={}", a.did, a.active, a.status.unwrap_or("-"))
        }
        Event::Info(i) => format!("#info {} {}", i.name, i.message.unwrap_or("")),
        Event::Unknown { t } => format!("{seq} {t}"),
    }))
}

/// One DAG-CBOR value as JSON (the atproto data model's JSON form).
fn value(r: &mut Reader<'_>, depth: usize) -> anyhow::Result<serde_json::Value> {
    use base64::Engine;
    use serde_json::{json, Value};
    if depth > 64 {
        bail!("nested too deep");
    }
    Ok(match r.peek_major()? {
        0 => json!(r.u64()?),
        1 => json!(r.i64()?),
        2 => json!({"$bytes": base64::engine::general_purpose::STANDARD_NO_PAD.encode(r.bytes()?)}),
        3 => json!(r.text()?),
        4 => {
            let n = r.array()?;
            Value::Array((0..n).map(|_| value(r, depth + 1)).collect::<anyhow::Result<_>>()?)
        }
        5 => {
            let n = r.map()?;
            let mut m = serde_json::Map::new();
            for _ in 0..n {
                let k = r.key()?.to_owned();
                m.insert(k, value(r, depth + 1)?);
            }
            Value::Object(m)
        }
        6 => json!({"$link": r.cid()?.to_string()}),
        _ if r.peek_null() => {
            r.null();
            Value::Null
        }
        _ => json!(r.bool()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (u, h, p, tls) = target("ws://127.0.0.1:2470", Some(5)).unwrap();
        assert_eq!(u, "ws://127.0.0.1:2470/xrpc/com.atproto.sync.subscribeRepos?cursor=5");
        assert_eq!((h.as_str(), p, tls), ("127.0.0.1", 2470, false));
        let (u, h, p, tls) = target("https://bsky.network", None).unwrap();
        assert_eq!(u, "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos");
        assert_eq!((h.as_str(), p, tls), ("bsky.network", 443, true));
        let (u, ..) = target("wss://pds.example/xrpc/com.atproto.sync.subscribeRepos?x=1", Some(0)).unwrap();
        assert!(u.ends_with("subscribeRepos?x=1&cursor=0"), "{u}");
        assert!(target("ftp://x", None).is_err());
        assert!(target("ws://", None).is_err());
    }

    #[test]
    fn lines_and_json() {
        let mut f = Vec::new();
        frame::AccountEvent {
            seq: 7,
            did: "did:plc:abc",
            time: "2026-12-01T00:00:00Z",
            active: false,
            status: Some("deactivated"),
        }
        .encode(&mut f);
        match describe(&f, false).unwrap() {
            Line::Event(l) => assert_eq!(l, "7 #account did:plc:abc active=false status=deactivated"),
            Line::Error(e) => panic!("{e}"),
        }
        match describe(&f, true).unwrap() {
            Line::Event(l) => {
                let v: serde_json::Value = serde_json::from_str(&l).unwrap();
                assert_eq!(v["$type"], "#account");
                assert_eq!(v["seq"], 7);
                assert_eq!(v["active"], false);
            }
            Line::Error(e) => panic!("{e}"),
        }
        let mut e = Vec::new();
        frame::encode_error("FutureCursor", Some("ahead"), &mut e);
        assert!(matches!(describe(&e, false).unwrap(), Line::Error(m) if m.contains("FutureCursor")));
    }
}
