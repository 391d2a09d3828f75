//! Just enough HTTP/1.1 and WebSocket (server side) for fakenet, written
//! over raw sockets so faults can control every byte: frames are formatted
//! with tungstenite's frame codec and written in whatever chunks a fault
//! asks for.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Largest request head we read.
pub const HEAD_BYTES_MAX: usize = 16 * 1024;

#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    /// Bytes read past the head (a body, or early WebSocket frames).
    pub rest: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn is_websocket(&self) -> bool {
        self.header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
    }
}

use sluice_common::process::http::{percent_decode, split_target};

/// Read and parse one request head.
pub async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let target = req.path.unwrap_or("/");
                let (path, query) = split_target(target);
                let headers = req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                return Ok(Some(Request {
                    method: req.method.unwrap_or("GET").to_owned(),
                    path: percent_decode(&path),
                    query,
                    headers,
                    rest: buf[len..].to_vec(),
                }));
            }
            Ok(httparse::Status::Partial) if buf.len() < HEAD_BYTES_MAX => continue,
            _ => return Ok(None),
        }
    }
}

/// Read the request body (Content-Length) after the head.
pub async fn read_body<S: AsyncRead + Unpin>(s: &mut S, req: &Request, max: usize) -> std::io::Result<Vec<u8>> {
    let len: usize = req.header("content-length").and_then(|v| v.trim().parse().ok()).unwrap_or(0).min(max);
    let mut body = req.rest.clone();
    body.truncate(len);
    while body.len() < len {
        let mut chunk = vec![0u8; len - body.len()];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(body)
}

pub fn http_response(status: u16, reason: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

pub fn json_response(status: u16, value: &serde_json::Value) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Error",
    };
    http_response(status, reason, "application/json", &serde_json::to_vec(value).expect("json"))
}

/// The 101 response completing a WebSocket handshake.
pub fn upgrade_response(req: &Request) -> Option<Vec<u8>> {
    let key = req.header("sec-websocket-key")?;
    let accept = tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
    Some(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
        )
        .into_bytes(),
    )
}

/// Append a server (unmasked) frame.
pub fn push_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    let h = FrameHeader { opcode, ..FrameHeader::default() };
    h.format(payload.len() as u64, out).expect("vec write");
    out.extend_from_slice(payload);
}

pub fn binary(out: &mut Vec<u8>, payload: &[u8]) {
    push_frame(out, OpCode::Data(Data::Binary), payload);
}

pub fn close(out: &mut Vec<u8>) {
    push_frame(out, OpCode::Control(Control::Close), &[0x03, 0xe8]);
}

/// What the peer sent, as far as fakenet cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Ping(Vec<u8>),
    Close,
    Other,
}

/// Parse complete client frames from `buf`, consuming them.
pub fn parse_incoming(buf: &mut Vec<u8>) -> Result<Vec<Incoming>, String> {
    let mut out = Vec::new();
    loop {
        let mut cur = std::io::Cursor::new(&buf[..]);
        let Some((h, len)) = FrameHeader::parse(&mut cur).map_err(|e| e.to_string())? else { break };
        if len > 1 << 20 {
            return Err("client frame too large".into());
        }
        let start = cur.position() as usize;
        let end = start + len as usize;
        if buf.len() < end {
            break;
        }
        let mut payload = buf[start..end].to_vec();
        if let Some(mask) = h.mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        out.push(match h.opcode {
            OpCode::Control(Control::Ping) => Incoming::Ping(payload),
            OpCode::Control(Control::Close) => Incoming::Close,
            _ => Incoming::Other,
        });
        buf.drain(..end);
    }
    Ok(out)
}

pub fn pong(out: &mut Vec<u8>, payload: &[u8]) {
    push_frame(out, OpCode::Control(Control::Pong), payload);
}

/// Write `bytes`, either at once or (split mode) in random small chunks,
/// each flushed so it becomes its own TCP segment, the task yielding
/// between some of them and now and then pausing a millisecond (so the
/// reader sees frames cut across its reads). Not a timer pause between
/// chunks: tokio's timers tick in milliseconds, so a 300 us sleep after
/// three chunks in ten made a split connection deliver about 33 frames a
/// second, and a relay catching up a backlog through one took minutes
/// (the long chaos runs 2 and 10 of BENCHMARKS.md).
pub async fn write_maybe_split<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    split: Option<&mut rand_chacha::ChaCha8Rng>,
) -> std::io::Result<()> {
    use rand::Rng;
    match split {
        None => w.write_all(bytes).await,
        Some(rng) => {
            let mut pos = 0;
            while pos < bytes.len() {
                let n = rng.gen_range(1..=64.min(bytes.len() - pos));
                w.write_all(&bytes[pos..pos + n]).await?;
                w.flush().await?;
                pos += n;
                match rng.gen_range(0..1000) {
                    0..5 => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
                    5..305 => tokio::task::yield_now().await,
                    _ => {}
                }
            }
            Ok(())
        }
    }
}
