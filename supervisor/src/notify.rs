//! sd_notify(3) for `Type=notify` units, without libsystemd: one datagram
//! to `$NOTIFY_SOCKET` per state change (READY=1 once the db-writer is
//! ready and the shards are started; RELOADING=1 ... READY=1 around a
//! SIGHUP reload; STOPPING=1 at shutdown; WATCHDOG=1 every half of
//! `WatchdogSec` while the supervisor's loop runs). Nothing happens without the
//! variable; a failed send is ignored (systemd then times the start out
//! and says so).

use std::os::unix::net::UnixDatagram;

/// Send `state` (newline-separated `KEY=value` lines).
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket (systemd's usual choice).
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// How often WATCHDOG=1 is due: half of `$WATCHDOG_USEC` (set by systemd
/// for `WatchdogSec`), when `$WATCHDOG_PID` is unset or this process.
pub fn watchdog_every() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| std::time::Duration::from_micros(usec / 2))
}

/// CLOCK_MONOTONIC in microseconds, which `RELOADING=1` carries.
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        super::notify("READY=1\nSTATUS=running");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=running");
        assert!(super::monotonic_usec() > 0);
    }
}
