//! Admin password guessing is not free: failed authentications are
//! counted (`sluice_admin_auth_failures_total`), logged at most once a
//! minute per client address, and an address past
//! [`FAILURES_PER_MINUTE_MAX`] failures in a minute gets 429 for
//! [`BLOCK`], whatever it sends. Shared by the query workers; bounded in
//! addresses ([`PEERS_MAX`], the oldest forgotten first).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const FAILURES_PER_MINUTE_MAX: u32 = 10;
pub const BLOCK: Duration = Duration::from_secs(60);
const WINDOW: Duration = Duration::from_secs(60);
/// Client addresses remembered at once.
pub const PEERS_MAX: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Peer {
    window_start: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
    logged_at: Option<Instant>,
}

/// What a failure means for its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// Log this one (the first in its minute for the address).
    pub log: bool,
    /// The address is now blocked.
    pub blocked: bool,
}

pub struct AuthThrottle {
    peers: Mutex<HashMap<String, Peer>>,
    on_failure: Box<dyn Fn() + Send + Sync>,
}

impl AuthThrottle {
    /// `on_failure` runs once per failed authentication (the metric).
    pub fn new(on_failure: Box<dyn Fn() + Send + Sync>) -> AuthThrottle {
        AuthThrottle { peers: Mutex::new(HashMap::new()), on_failure }
    }

    /// Is `peer` blocked at `now`?
    pub fn blocked(&self, peer: &str, now: Instant) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(peer).and_then(|p| p.blocked_until).is_some_and(|until| now < until)
    }

    /// Record a failed authentication from `peer`.
    pub fn failed(&self, peer: &str, now: Instant) -> Failure {
        (self.on_failure)();
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if peers.len() >= PEERS_MAX && !peers.contains_key(peer) {
            // Forget the address whose window is oldest.
            if let Some(oldest) = peers.iter().min_by_key(|(_, p)| p.window_start).map(|(k, _)| k.clone()) {
                peers.remove(&oldest);
            }
        }
        let p = peers.entry(peer.to_owned()).or_insert(Peer {
            window_start: now,
            failures: 0,
            blocked_until: None,
            logged_at: None,
        });
        if now.duration_since(p.window_start) >= WINDOW {
            p.window_start = now;
            p.failures = 0;
        }
        p.failures += 1;
        if p.failures > FAILURES_PER_MINUTE_MAX {
            p.blocked_until = Some(now + BLOCK);
        }
        let log = p.logged_at.is_none_or(|t| now.duration_since(t) >= WINDOW);
        if log {
            p.logged_at = Some(now);
        }
        Failure { log, blocked: p.blocked_until.is_some_and(|u| now < u) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn eleventh_failure_in_a_minute_blocks_for_a_minute() {
        let count = Arc::new(AtomicU64::new(0));
        let c = count.clone();
        let t = AuthThrottle::new(Box::new(move || {
            c.fetch_add(1, Ordering::Relaxed);
        }));
        let t0 = Instant::now();
        let mut logged = 0;
        for i in 0..FAILURES_PER_MINUTE_MAX {
            let f = t.failed("10.0.0.1", t0 + Duration::from_millis(i as u64));
            assert!(!f.blocked);
            logged += f.log as u32;
        }
        assert_eq!(logged, 1, "one log line a minute");
        assert!(!t.blocked("10.0.0.1", t0));
        assert!(t.failed("10.0.0.1", t0 + Duration::from_secs(1)).blocked);
        assert!(t.blocked("10.0.0.1", t0 + Duration::from_secs(30)));
        assert!(!t.blocked("10.0.0.2", t0 + Duration::from_secs(30)), "other addresses are not blocked");
        assert!(!t.blocked("10.0.0.1", t0 + Duration::from_secs(62)));
        assert_eq!(count.load(Ordering::Relaxed), FAILURES_PER_MINUTE_MAX as u64 + 1);
        // Failures spread over minutes never block.
        for m in 0..5 {
            for i in 0..FAILURES_PER_MINUTE_MAX {
                let at = t0 + Duration::from_secs(120 + 61 * m) + Duration::from_millis(i as u64);
                assert!(!t.failed("10.0.0.3", at).blocked);
            }
        }
    }

    #[test]
    fn bounded_in_addresses() {
        let t = AuthThrottle::new(Box::new(|| {}));
        let t0 = Instant::now();
        for i in 0..PEERS_MAX + 50 {
            t.failed(&format!("peer-{i}"), t0 + Duration::from_micros(i as u64));
        }
        assert_eq!(t.peers.lock().unwrap().len(), PEERS_MAX);
    }
}
