//! The retry schedule: a small pure function, so it can be tested without clocks or sockets.

use std::time::Duration;

use crate::config::RetryConfig;
use crate::journal::Verdict;

/// Backoff ceiling after `failures` failed attempts: `base · 2^(failures-1)`, capped at `max`.
pub fn ceiling(policy: &RetryConfig, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(32);
    let ms = policy
        .base_delay_ms
        .saturating_mul(1u64 << exp)
        .min(policy.max_delay_ms);
    Duration::from_millis(ms)
}

/// Full jitter: a delay uniformly spread over `[0, ceiling]` (`jitter` is in `[0, 1)`), but never
/// shorter than the receiver's `Retry-After`.
pub fn delay(
    policy: &RetryConfig,
    failures: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let ceiling = ceiling(policy, failures);
    let jittered = ceiling.mul_f64(jitter.clamp(0.0, 1.0));
    retry_after.map_or(jittered, |ra| jittered.max(ra))
}

/// Decides what follows a retryable failure of attempt number `attempt` (1-based) of a delivery
/// created at `created_at_ms`. The last attempt is scheduled at the max-age deadline at the latest,
/// so a delivery is tried until its age runs out, then dead-lettered.
pub fn after_failure(
    policy: &RetryConfig,
    attempt: u32,
    created_at_ms: i64,
    now_ms: i64,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Verdict {
    if attempt >= policy.max_attempts {
        return Verdict::DeadLetter {
            reason: format!("gave up after {attempt} attempts"),
        };
    }
    let deadline = created_at_ms.saturating_add((policy.max_age_s as i64).saturating_mul(1000));
    if now_ms >= deadline {
        return Verdict::DeadLetter {
            reason: format!(
                "max age of {} s exceeded after {attempt} attempts",
                policy.max_age_s
            ),
        };
    }
    let wait = delay(policy, attempt, retry_after, jitter).as_millis() as i64;
    Verdict::Retry {
        next_attempt_ms: now_ms.saturating_add(wait).min(deadline),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> RetryConfig {
        RetryConfig {
            base_delay_ms: 100,
            max_delay_ms: 1_000,
            max_attempts: 5,
            max_age_s: 60,
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = policy();
        let ms: Vec<u128> = (1..=6).map(|n| ceiling(&p, n).as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(ceiling(&p, 0).as_millis(), 100);
        assert_eq!(ceiling(&p, u32::MAX).as_millis(), 1000);
    }

    #[test]
    fn retry_after_is_a_floor() {
        let p = policy();
        let d = delay(&p, 1, Some(Duration::from_secs(7)), 0.5);
        assert_eq!(d, Duration::from_secs(7));
        assert_eq!(delay(&p, 3, None, 0.5), Duration::from_millis(200));
    }

    #[test]
    fn gives_up_on_attempts_and_age() {
        let p = policy();
        assert!(matches!(
            after_failure(&p, 5, 0, 10, None, 0.5),
            Verdict::DeadLetter { .. }
        ));
        assert!(matches!(
            after_failure(&p, 1, 0, 60_000, None, 0.5),
            Verdict::DeadLetter { .. }
        ));
        assert_eq!(
            after_failure(&p, 1, 0, 1_000, None, 0.5),
            Verdict::Retry {
                next_attempt_ms: 1_050
            }
        );
        // Never scheduled past the deadline: the last try happens at it.
        let v = after_failure(&p, 2, 0, 59_990, Some(Duration::from_secs(30)), 0.0);
        assert_eq!(
            v,
            Verdict::Retry {
                next_attempt_ms: 60_000
            }
        );
    }

    proptest! {
        #[test]
        fn delay_within_bounds(failures in 0u32..100, jitter in 0.0f64..1.0, ra in proptest::option::of(0u64..100_000)) {
            let p = policy();
            let d = delay(&p, failures, ra.map(Duration::from_millis), jitter);
            let upper = ceiling(&p, failures).max(Duration::from_millis(ra.unwrap_or(0)));
            prop_assert!(d <= upper);
            if let Some(ra) = ra { prop_assert!(d >= Duration::from_millis(ra)); }
        }
    }
}
