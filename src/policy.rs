//! Policies the engine applies: retry backoff and what to do with copies of
//! dead messages.

use std::time::Duration;

/// Exponential backoff with "equal jitter": attempt `n` waits a random time
/// in `[d/2, d]` where `d = min(max, base * 2^(n-1))`. Jitter spreads the
/// retries of a burst of failures so they do not all return at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// Delay before the first retry (before jitter).
    pub base: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
    /// Whether to apply jitter; without it the delay is exactly `d`.
    pub jitter: bool,
}

impl Backoff {
    /// Exponential from `base`, capped at `max`, with jitter.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            jitter: true,
        }
    }

    /// The same without jitter (exact, predictable delays).
    pub const fn without_jitter(self) -> Self {
        Backoff {
            jitter: false,
            ..self
        }
    }

    /// The delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(32);
        let full = self.base.saturating_mul(1u32 << exp.min(31)).min(self.max);
        if !self.jitter || full.is_zero() {
            return full;
        }
        let half = full / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

impl Default for Backoff {
    /// 1 s, doubling, capped at 5 minutes, with jitter.
    fn default() -> Self {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(300))
    }
}

/// What the engine does with a delivery whose key is already dead (buried).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnDead {
    /// Ack it and count it as a duplicate of a dead message (default). This
    /// drops nothing: the engine buries a key only after its dead letter was
    /// confirmed, so a dead key always has its copy in the dead-letter queue.
    #[default]
    Ack,
    /// Dead-letter every copy as well (reason `duplicate-of-dead`).
    DeadLetter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_capped_jittered() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.without_jitter().delay(1), Duration::from_millis(100));
        assert_eq!(b.without_jitter().delay(3), Duration::from_millis(400));
        assert_eq!(b.without_jitter().delay(30), Duration::from_secs(1));
        assert_eq!(b.without_jitter().delay(u32::MAX), Duration::from_secs(1));
        for attempt in 1..10 {
            let full = b.without_jitter().delay(attempt);
            for _ in 0..50 {
                let d = b.delay(attempt);
                assert!(d >= full / 2 && d <= full, "{d:?} vs {full:?}");
            }
        }
    }
}
