//! A token bucket: at most `rate` takes a second on average, `burst` at
//! once. Time is a parameter (no clock read here). Used for a host's event
//! rate (shards), the relay-wide PLC directory rate and each host's
//! `#identity` refreshes (the db-writer's identity service).

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Full at `now`. `rate` per second; `burst` at least one token.
    pub fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        let (rate, burst) = (rate.max(1e-6), burst.max(1.0));
        TokenBucket { rate, burst, tokens: burst, last: now }
    }

    /// A new rate and burst (a reload), from now on; the tokens held
    /// stay, up to the new burst.
    pub fn set_rate(&mut self, rate: f64, burst: f64) {
        self.rate = rate.max(1e-6);
        self.burst = burst.max(1.0);
        self.tokens = self.tokens.min(self.burst);
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Take a token at `now`; `Some(wait)` (and nothing taken) if none
    /// is left: one will be there after `wait`.
    pub fn take(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 100.0, t0);
        for _ in 0..100 {
            assert_eq!(b.take(t0), None);
        }
        let w = b.take(t0).expect("empty after the burst");
        assert!((w.as_secs_f64() - 0.01).abs() < 1e-6, "{w:?}");
        // 50 ms later: 5 more tokens.
        let t1 = t0 + Duration::from_millis(50);
        for _ in 0..5 {
            assert_eq!(b.take(t1), None);
        }
        assert!(b.take(t1).is_some());
        // Never more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        let n = (0..1000).take_while(|_| b.take(t2).is_none()).count();
        assert_eq!(n, 100);
    }

    /// With a burst of one, no window of a second ever sees more than the
    /// rate plus one.
    #[test]
    fn a_burst_of_one_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 1.0, t0);
        let mut taken = Vec::new();
        let mut t = t0;
        while t < t0 + Duration::from_secs(5) {
            match b.take(t) {
                None => taken.push(t),
                Some(w) => t += w,
            }
        }
        for (i, first) in taken.iter().enumerate() {
            let in_window = taken[i..].iter().take_while(|x| **x < *first + Duration::from_secs(1)).count();
            assert!(in_window <= 11, "{in_window} in a second");
        }
        assert!(taken.len() >= 49, "{}", taken.len());
        // A slower rate from a reload keeps at most the new burst.
        b.set_rate(1.0, 1.0);
        assert!(b.take(t).is_some() || b.take(t).is_some());
    }
}
