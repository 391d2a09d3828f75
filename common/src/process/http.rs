//! HTTP/1.1 heads, parsed in one place: requests for every server sluice
//! runs (the shard's public port, the db-writer's query workers), and the
//! response to a shard's WebSocket upgrade of an upstream host: httparse
//! underneath, a byte bound on top, and the few headers sluice reads pulled
//! out as owned values. Pure: the callers read the socket and call
//! [`parse_request_head`] on what they have so far, which answers
//! "complete", "need more" or a typed error, whatever the split points
//! (PROTOCOL §8: a head may arrive one byte at a time).

/// Headers a request may carry (more is [`HeadError::Malformed`]).
pub const HEADERS_MAX: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    /// The head is not complete within the byte bound (HTTP 431).
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    /// Not an HTTP/1.x request head (HTTP 400).
    #[error("malformed request head: {0}")]
    Malformed(String),
    /// A `content-length` that is not a number (HTTP 400).
    #[error("malformed content-length")]
    ContentLength,
}

/// A complete request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    /// Bytes of the head, blank line included; the body starts here.
    pub head_len: usize,
    pub content_length: u64,
    /// `upgrade: websocket` was asked for.
    pub websocket: bool,
    pub ws_key: Option<String>,
    pub authorization: Option<String>,
    /// The client's address as the shard that forwarded the request saw
    /// it ([`PEER_HEADER`]; the shard strips any the client sent).
    pub peer: Option<String>,
}

/// The header a shard adds when it forwards a request to the query workers.
pub const PEER_HEADER: &str = "x-sluice-peer";

/// Parse the head at the start of `buf`: `Ok(None)` until the blank line
/// has arrived, an error once `buf` holds `bytes_max` bytes without one.
pub fn parse_request_head(buf: &[u8], bytes_max: usize) -> Result<Option<RequestHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let Some(head_len) = head_length(req.parse(&buf[..buf.len().min(bytes_max)]), buf.len(), bytes_max)? else {
        return Ok(None);
    };
    let header = |name: &str| header_value(req.headers, name);
    let content_length = match header("content-length") {
        None => 0,
        Some(v) => v.parse::<u64>().map_err(|_| HeadError::ContentLength)?,
    };
    let websocket = header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    Ok(Some(RequestHead {
        method: req.method.unwrap_or("GET").to_owned(),
        target: req.path.unwrap_or("/").to_owned(),
        head_len,
        content_length,
        websocket,
        ws_key: if websocket { header("sec-websocket-key") } else { None },
        authorization: header("authorization"),
        peer: header(PEER_HEADER),
    }))
}

/// A complete response head (the answer to a WebSocket upgrade).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// Bytes of the head, blank line included; the body (or, after a
    /// `101`, the WebSocket frames) starts here.
    pub head_len: usize,
    /// `upgrade: websocket` and `connection: upgrade` were answered.
    pub websocket: bool,
    pub ws_accept: Option<String>,
}

/// Parse the response head at the start of `buf`, as
/// [`parse_request_head`] does a request's.
pub fn parse_response_head(buf: &[u8], bytes_max: usize) -> Result<Option<ResponseHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut resp = httparse::Response::new(&mut headers);
    let Some(head_len) = head_length(resp.parse(&buf[..buf.len().min(bytes_max)]), buf.len(), bytes_max)? else {
        return Ok(None);
    };
    let header = |name: &str| header_value(resp.headers, name);
    let upgrade = header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let connection =
        header("connection").is_some_and(|c| c.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    Ok(Some(ResponseHead {
        status: resp.code.unwrap_or(0),
        head_len,
        websocket: upgrade && connection,
        ws_accept: header("sec-websocket-accept"),
    }))
}

/// What httparse said of a head, as the parsers answer it: its length,
/// `None` while it may still complete within `bytes_max`, or the error.
fn head_length(parsed: httparse::Result<usize>, have: usize, bytes_max: usize) -> Result<Option<usize>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) if have >= bytes_max => Err(HeadError::TooLarge(bytes_max)),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(HeadError::Malformed(e.to_string())),
    }
}

/// A header's value (the first of that name, trimmed; not UTF-8: absent).
fn header_value(headers: &[httparse::Header<'_>], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(|v| v.trim().to_owned())
}

/// Split a request target into its path and its decoded query pairs
/// (`k=v` joined by `&`; a key without `=` has an empty value).
pub fn split_target(target: &str) -> (String, Vec<(String, String)>) {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    (path.to_owned(), query)
}

/// Decode `%XX` escapes and `+` (a space, as forms send it); a `%` not
/// followed by two hex digits stays as it is; bytes that are not UTF-8
/// come out as U+FFFD.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 3 <= b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
            .flatten();
        match hex {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(if b[i] == b'+' { b' ' } else { b[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_and_decode() {
        let (p, q) = split_target("/x/y?did=did%3Aplc%3Aabc&a+b=c%2&flag&=v");
        assert_eq!(p, "/x/y");
        let want: Vec<(String, String)> = [("did", "did:plc:abc"), ("a b", "c%2"), ("flag", ""), ("", "v")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(q, want);
        assert_eq!(percent_decode("%ff%zz%"), "\u{fffd}%zz%");
        assert_eq!(split_target("/only").1, vec![]);
    }

    const GET: &[u8] = b"GET /xrpc/com.atproto.sync.subscribeRepos?cursor=5 HTTP/1.1\r\nHost: x\r\n\
        Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\nrest";

    /// Every prefix of a head is "need more"; the whole is the same head
    /// whatever came before (PROTOCOL §8).
    #[test]
    fn every_split_point() {
        let whole = parse_request_head(GET, 16 * 1024).unwrap().unwrap();
        assert_eq!(whole.target, "/xrpc/com.atproto.sync.subscribeRepos?cursor=5");
        assert!(whole.websocket);
        assert_eq!(whole.ws_key.as_deref(), Some("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(&GET[whole.head_len..], b"rest");
        for cut in 0..whole.head_len {
            assert_eq!(parse_request_head(&GET[..cut], 16 * 1024), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn response_heads() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\
                   Sec-WebSocket-Accept: abc=\r\n\r\n\x82\x00";
        for cut in 0..ok.len() - 2 {
            assert_eq!(parse_response_head(&ok[..cut], 1024), Ok(None), "cut at {cut}");
        }
        let h = parse_response_head(ok, 1024).unwrap().unwrap();
        assert_eq!(
            (h.status, h.head_len, h.websocket, h.ws_accept.as_deref()),
            (101, ok.len() - 2, true, Some("abc="))
        );
        let plain = parse_response_head(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", 1024).unwrap().unwrap();
        assert_eq!((plain.status, plain.websocket, plain.ws_accept), (404, false, None));
        let long = [&b"HTTP/1.1 101 OK\r\nx: "[..], &[b'a'; 64]].concat();
        assert_eq!(parse_response_head(&long, 64), Err(HeadError::TooLarge(64)));
        assert!(matches!(parse_response_head(b"SSH-2.0-OpenSSH\r\n\r\n", 64), Err(HeadError::Malformed(_))));
    }

    #[test]
    fn bounds_and_errors() {
        let big = [b"GET / HTTP/1.1\r\nx: ".as_slice(), &[b'a'; 100], b"\r\n\r\n"].concat();
        assert_eq!(parse_request_head(&big, 64), Err(HeadError::TooLarge(64)));
        assert!(parse_request_head(&big, 4096).unwrap().is_some());
        assert!(matches!(parse_request_head(b"\x00\x01 nonsense\r\n\r\n", 4096), Err(HeadError::Malformed(_))));
        let cl = b"POST /a HTTP/1.1\r\ncontent-length: ten\r\n\r\n";
        assert_eq!(parse_request_head(cl, 4096), Err(HeadError::ContentLength));
        let ok = parse_request_head(b"POST /a HTTP/1.1\r\nContent-Length: 10\r\nAuthorization: Bearer x\r\n\r\n", 4096)
            .unwrap()
            .unwrap();
        assert_eq!((ok.content_length, ok.authorization.as_deref(), ok.websocket), (10, Some("Bearer x"), false));
    }
}
