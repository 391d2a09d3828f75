//! The query workers: a Unix socket (`data_dir/run/query.sock`) the shards
//! forward requests to, one per connection (HTTP/1.1, `Connection: close`),
//! a small pool of threads each with its own Postgres connection, and the
//! routing: the admin API (authenticated; goat's paths, then sluice's own)
//! or the public endpoints.

use crate::api::{error, QueryConfig, Request, Response};
use postgres::Client;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Requests above this are refused (headers + body).
pub const REQUEST_BYTES_MAX: usize = 64 * 1024;
/// Connections waiting for a worker.
const QUEUE_MAX: usize = 256;

/// Start the listener and the workers; they run until `stop`.
pub fn start(
    socket: &Path,
    cfg: QueryConfig,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    listener.set_nonblocking(true)?;
    let (tx, rx) = flume_like::channel(QUEUE_MAX);
    let mut handles = Vec::new();
    let cfg = Arc::new(cfg);
    for i in 0..cfg.workers.max(1) {
        let rx = rx.clone();
        let cfg = cfg.clone();
        let stop = stop.clone();
        handles.push(std::thread::Builder::new().name(format!("query-{i}")).spawn(move || {
            let mut pg: Option<Client> = None;
            while !stop.load(Ordering::Acquire) {
                let Some(mut s) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
                if pg.as_mut().is_none_or(|c| c.is_closed()) {
                    pg = crate::db::connect(&cfg.database_url)
                        .map_err(|e| tracing::error!(error = %e, "query worker cannot reach Postgres"))
                        .ok();
                }
                let resp = match read_request(&mut s) {
                    Ok(req) => match pg.as_mut() {
                        Some(c) => route(c, &cfg, &req),
                        None => error(503, "Unavailable", "database unavailable"),
                    },
                    Err(e) => error(400, "InvalidRequest", &e.to_string()),
                };
                let _ = write_response(&mut s, &resp);
            }
        })?);
    }
    handles.push(std::thread::Builder::new().name("query-accept".into()).spawn(move || {
        while !stop.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                    if let Err(mut s) = tx.try_send(s) {
                        let _ = write_response(&mut s, &error(503, "Busy", "too many requests in flight"));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_readable(&listener, STOP_CHECK),
                Err(e) => {
                    tracing::warn!(error = %e, "query socket accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    })?);
    Ok(handles)
}

/// How often the accept thread looks at the stop flag while no request
/// comes (it sleeps in `poll` meanwhile, not in a timer loop).
const STOP_CHECK: Duration = Duration::from_millis(200);

/// Until `listener` has a connection to accept, or `at_most` passed.
pub(crate) fn wait_readable(listener: &UnixListener, at_most: Duration) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(at_most).unwrap_or(PollTimeout::MAX);
    let _ = poll(&mut fds, ms);
}

/// A bounded MPMC queue from std parts (the pool is small; contention is
/// irrelevant).
mod flume_like {
    use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    pub struct Tx<T>(SyncSender<T>);
    pub struct Rx<T>(Arc<Mutex<Receiver<T>>>);
    impl<T> Clone for Rx<T> {
        fn clone(&self) -> Self {
            Rx(self.0.clone())
        }
    }
    pub fn channel<T>(n: usize) -> (Tx<T>, Rx<T>) {
        let (t, r) = sync_channel(n);
        (Tx(t), Rx(Arc::new(Mutex::new(r))))
    }
    impl<T> Tx<T> {
        pub fn try_send(&self, v: T) -> Result<(), T> {
            self.0.try_send(v).map_err(|e| match e {
                TrySendError::Full(v) | TrySendError::Disconnected(v) => v,
            })
        }
    }
    impl<T> Rx<T> {
        pub fn recv_timeout(&self, d: Duration) -> Option<T> {
            self.0.lock().ok()?.recv_timeout(d).ok()
        }
    }
}

/// One request to its handler.
pub fn route(c: &mut Client, cfg: &QueryConfig, req: &Request) -> Response {
    if !req.path.starts_with("/admin/") {
        return crate::query::handle(c, cfg, req);
    }
    if let Err(refused) = crate::api::authenticate(cfg, req) {
        return refused;
    }
    let r = match crate::goat::route(c, cfg, req) {
        Some(r) => r,
        None => crate::admin::route(c, cfg, req),
    };
    r.unwrap_or_else(|e| {
        tracing::error!(path = req.path, error = %e, "admin action failed");
        error(500, "InternalServerError", "internal error")
    })
}

/// Why a forwarded request could not be read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed mid-request")]
    Closed,
    #[error("bad request: {0}")]
    Head(#[from] sluice_common::process::http::HeadError),
    #[error("request over {REQUEST_BYTES_MAX} bytes")]
    TooLarge,
}

fn read_request(s: &mut UnixStream) -> Result<Request, ReadError> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(h) = sluice_common::process::http::parse_request_head(&buf, REQUEST_BYTES_MAX)? else {
            continue;
        };
        let (head, len) = (h.head_len, h.content_length.min(REQUEST_BYTES_MAX as u64 + 1) as usize);
        if head + len > REQUEST_BYTES_MAX {
            return Err(ReadError::TooLarge);
        }
        while buf.len() < head + len {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let (path, query) = crate::api::split_target(&h.target);
        let body = buf[head..head + len].to_vec();
        return Ok(Request { method: h.method, path, query, body, authorization: h.authorization, peer: h.peer });
    }
}

fn write_response(s: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let body = serde_json::to_vec(&r.body).expect("JSON values serialise");
    let reason = match r.status {
        200 => "OK",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        400 => "Bad Request",
        404 => "Not Found",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let location = r.location.as_ref().map(|l| format!("location: {l}\r\n")).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {} {reason}\r\n{location}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        r.status,
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(&body)?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_split_at_every_byte_parse_the_same() {
        let body = "{\"hostname\":\"pds.example.com\"}";
        let req = format!(
            "POST /xrpc/com.atproto.sync.requestCrawl?x=1 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer pw\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        for cut in 1..req.len() {
            let (mut a, mut b) = UnixStream::pair().unwrap();
            let bytes = req.clone().into_bytes();
            let writer = std::thread::spawn(move || {
                a.write_all(&bytes[..cut]).unwrap();
                std::thread::sleep(Duration::from_micros(200));
                a.write_all(&bytes[cut..]).unwrap();
            });
            let r = read_request(&mut b).unwrap_or_else(|e| panic!("split at {cut}: {e}"));
            writer.join().unwrap();
            assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/xrpc/com.atproto.sync.requestCrawl"), "{cut}");
            assert_eq!(r.query, vec![("x".to_owned(), "1".to_owned())], "{cut}");
            assert_eq!(r.authorization.as_deref(), Some("Bearer pw"), "{cut}");
            assert_eq!(r.body, body.as_bytes(), "split at {cut}");
        }
    }
}
