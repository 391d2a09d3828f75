//! A host task's view of its host's health: when to dial again, and when
//! the host has changed between reachable and `offline` (which the task
//! tells the db-writer once, through the ring).
//!
//! Rules:
//! - A connection *succeeded* if the upgrade completed and it then either
//!   carried an event, or stayed up [`HEALTHY_AFTER`], or was closed by
//!   the relay itself. Anything else is a failure (refused, timed out,
//!   upgrade refused, cut early).
//! - After a success the next dial is [`BACKOFF_MIN`] away; after the n-th
//!   failure in a row about 2^(n-1) s, capped at [`BACKOFF_MAX`] (an
//!   hour), each wait jittered by ±20 % so hosts that failed together do
//!   not come back in step.
//! - [`OFFLINE_AFTER`] failures in a row make the host offline; the first
//!   success after that makes it reachable again.
//! - A task for a host stored as offline starts at [`OFFLINE_AFTER`]
//!   failures (its backoff continues rather than restarting at 1 s; the
//!   first dial is immediate).

use std::time::Duration;

pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(3600);
/// Failures in a row that make a host offline (about 7 s of retries after
/// the first: 1 + 2 + 4 s).
pub const OFFLINE_AFTER: u32 = 4;
/// A connection up this long counts as a success even if it carried
/// nothing (a quiet host).
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// What the task must tell the db-writer after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    WentOffline,
    BackOnline,
}

#[derive(Debug, Clone)]
pub struct Health {
    failures: u32,
    offline: bool,
    /// xorshift64 state for the jitter (seeded per host).
    rng: u64,
}

impl Health {
    /// `offline`: the host's stored status; `seed`: anything that differs
    /// per host and per start (host id and clock).
    pub fn new(offline: bool, seed: u64) -> Health {
        Health { failures: if offline { OFFLINE_AFTER } else { 0 }, offline, rng: seed | 1 }
    }

    pub fn offline(&self) -> bool {
        self.offline
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Record one attempt's outcome; returns the change to report and the
    /// wait before the next dial.
    pub fn record(&mut self, succeeded: bool) -> (Change, Duration) {
        let change = if succeeded {
            self.failures = 0;
            std::mem::replace(&mut self.offline, false).then_some(Change::BackOnline)
        } else {
            self.failures = self.failures.saturating_add(1);
            (self.failures >= OFFLINE_AFTER && !std::mem::replace(&mut self.offline, true))
                .then_some(Change::WentOffline)
        };
        (change.unwrap_or(Change::None), self.wait())
    }

    /// The wait before the next dial, jittered.
    fn wait(&mut self) -> Duration {
        let base = match self.failures {
            0 => BACKOFF_MIN,
            n => BACKOFF_MIN.saturating_mul(1u32 << (n - 1).min(12)).min(BACKOFF_MAX),
        };
        // xorshift64: uniform enough for spreading retries.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let unit = (self.rng >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        base.mul_f64(0.8 + 0.4 * unit).min(BACKOFF_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_to_an_hour_and_go_offline_once() {
        let mut h = Health::new(false, 42);
        let mut changes = Vec::new();
        let mut waits = Vec::new();
        for _ in 0..20 {
            let (c, w) = h.record(false);
            changes.push(c);
            waits.push(w);
        }
        // Offline exactly at the OFFLINE_AFTER-th failure, reported once.
        for (i, c) in changes.iter().enumerate() {
            let want = if i + 1 == OFFLINE_AFTER as usize { Change::WentOffline } else { Change::None };
            assert_eq!(*c, want, "attempt {i}");
        }
        assert!(h.offline());
        // Roughly doubling within the jitter, never above the cap.
        for (i, w) in waits.iter().enumerate() {
            let base = BACKOFF_MIN.as_secs_f64() * 2f64.powi(i as i32).min(3600.0);
            let s = w.as_secs_f64();
            assert!(s >= base * 0.8 - 1e-9 && s <= (base * 1.2).min(3600.0) + 1e-9, "attempt {i}: {s} s vs {base}");
        }
        assert!(waits[19] >= Duration::from_secs(2880) && waits[19] <= BACKOFF_MAX);
        // One success: reachable again, reported once, next dial soon.
        let (c, w) = h.record(true);
        assert_eq!(c, Change::BackOnline);
        assert!(w <= Duration::from_millis(1200));
        assert_eq!(h.record(true).0, Change::None);
        assert_eq!(h.failures(), 0);
    }

    #[test]
    fn a_host_stored_offline_continues_its_backoff() {
        let mut h = Health::new(true, 7);
        assert!(h.offline());
        let (c, w) = h.record(false);
        assert_eq!(c, Change::None, "already offline: nothing to report");
        assert!(w >= Duration::from_secs(12), "{w:?}");
        assert_eq!(h.record(true).0, Change::BackOnline);
    }

    #[test]
    fn jitter_spreads_hosts_that_failed_together() {
        let waits: Vec<Duration> = (1..=50u64)
            .map(|seed| {
                let mut h = Health::new(false, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                (0..8).map(|_| h.record(false).1).last().unwrap()
            })
            .collect();
        let min = waits.iter().min().unwrap();
        let max = waits.iter().max().unwrap();
        assert!(max.as_secs_f64() - min.as_secs_f64() > 20.0, "{min:?}..{max:?} (base 128 s)");
    }
}
