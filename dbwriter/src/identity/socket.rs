//! The identity socket (`data_dir/run/identity.sock`, `ipc::idwire`): an
//! accept thread, and per shard connection a reader thread (requests into
//! the service's bounded request queue: when the service has as much as it
//! takes, the reader waits, the socket fills, and the shard's lookups
//! wait: backpressure, nothing dropped) and a writer thread (answers and
//! pushes out, from a bounded queue; a shard that stops reading for that
//! long is cut, and asks again when it reconnects).

use super::Event;
use sluice_common::ipc::idwire::{read_msg, write_msg, Request, ToShard};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Messages waiting to be written to one shard.
pub const OUT_QUEUE_MAX: usize = 65_536;
const STOP_CHECK: Duration = Duration::from_millis(200);

/// A shard's connection, as the service knows it.
pub type ConnId = u64;

/// Listen on `path` until `stop`: each connection is announced to the
/// service ([`Event::Connected`] with its writer queue), its requests sent
/// to `requests`, its end announced ([`Event::Disconnected`]).
pub fn listen(
    path: &Path,
    requests: flume::Sender<(ConnId, Request)>,
    events: flume::Sender<Event>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("identity-accept".into()).spawn(move || {
        let mut next: ConnId = 0;
        while !stop.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((s, _)) => {
                    next += 1;
                    if let Err(e) = serve(next, s, requests.clone(), events.clone()) {
                        tracing::warn!(error = %e, "identity socket: cannot serve a connection");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    crate::serve::wait_readable(&listener, STOP_CHECK)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "identity socket accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    })
}

fn serve(
    conn: ConnId,
    s: UnixStream,
    requests: flume::Sender<(ConnId, Request)>,
    events: flume::Sender<Event>,
) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    let mut reader = s.try_clone()?;
    let mut writer = s;
    let (tx, rx) = flume::bounded::<ToShard>(OUT_QUEUE_MAX);
    if events.send(Event::Connected { conn, out: tx }).is_err() {
        return Ok(());
    }
    std::thread::Builder::new().name(format!("identity-out-{conn}")).spawn(move || {
        let mut scratch = Vec::new();
        for msg in rx.iter() {
            if write_msg(&mut writer, &msg, &mut scratch).is_err() {
                break;
            }
        }
        let _ = writer.shutdown(std::net::Shutdown::Both);
    })?;
    std::thread::Builder::new().name(format!("identity-in-{conn}")).spawn(move || {
        let mut buf = Vec::new();
        loop {
            match read_msg::<Request>(&mut reader, &mut buf) {
                Ok(Some(req)) => {
                    if requests.send((conn, req)).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(conn, error = %e, "identity socket: bad message from a shard; closing it");
                    break;
                }
            }
        }
        let _ = reader.shutdown(std::net::Shutdown::Both);
        let _ = events.send(Event::Disconnected { conn });
    })?;
    Ok(())
}
