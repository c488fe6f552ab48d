//! Per-vendor ingest limits: a token bucket per vendor and a body-size override.
//!
//! The bucket is a pure function of the instants it is given, so it is tested without sleeping.
//! It takes a monotonic `Instant` rather than `clock::now_ms` (wall clock): a wall-clock step
//! backwards must not starve a vendor, nor a step forwards hand it a full bucket.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::api_error::ApiError;
use crate::config::ingest_vendor::{Rate, ValidVendorLimits};
use crate::normalise::MapError;

/// A token bucket: `burst` tokens, refilled at `per_s` tokens per second; one request costs one.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_s: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: Rate, now: Instant) -> Self {
        let burst = f64::from(rate.burst.max(1));
        Self {
            per_s: rate.per_s,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token at `now`, or says how long until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        // `saturating_duration_since`: an instant older than the last one adds nothing.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_s).min(self.burst);
        if now > self.last {
            self.last = now;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_s))
        }
    }
}

/// `Retry-After` in whole seconds for a wait: rounded up, at least 1 (0 would invite a retry
/// storm).
pub fn retry_after_s(wait: Duration) -> u64 {
    let s = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    s.max(1)
}

/// One vendor's limits at run time.
#[derive(Debug)]
pub struct VendorLimit {
    pub max_body_bytes: Option<usize>,
    bucket: Option<Mutex<TokenBucket>>,
}

impl VendorLimit {
    /// Takes a token if this vendor is rate-limited; `Err(retry_after_s)` when none is left.
    pub fn admit(&self, now: Instant) -> Result<(), u64> {
        let Some(bucket) = &self.bucket else {
            return Ok(());
        };
        // A poisoned lock only means another request panicked mid-update; the bucket's numbers
        // are still usable.
        let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
        b.take(now).map_err(retry_after_s)
    }
}

/// Builds the run-time limits from the validated config.
pub fn build(
    limits: &BTreeMap<String, ValidVendorLimits>,
    now: Instant,
) -> HashMap<String, VendorLimit> {
    limits
        .iter()
        .map(|(name, l)| {
            (
                name.clone(),
                VendorLimit {
                    max_body_bytes: l.max_body_bytes,
                    bucket: l.rate.map(|r| Mutex::new(TokenBucket::new(r, now))),
                },
            )
        })
        .collect()
}

/// The `reason` label for a refusal: a closed set, so the metric's cardinality is bounded.
pub fn reject_reason(e: &ApiError) -> &'static str {
    match e {
        ApiError::RateLimited { .. } => "rate_limited",
        ApiError::TooLarge { .. } => "too_large",
        ApiError::Map(MapError::Malformed(_)) => "malformed",
        ApiError::Map(MapError::Unmappable { .. }) => "unmappable",
        ApiError::UnsupportedMediaType { .. } => "unsupported_media_type",
        ApiError::BadRequest { .. } => "invalid_header",
        ApiError::Forbidden { .. } => "forbidden",
        ApiError::UnknownVendor(_) => "unknown_vendor",
        ApiError::Overloaded { .. } => "overloaded",
        ApiError::Unavailable { .. } => "unavailable",
        ApiError::Timeout { .. } => "timeout",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_then_refill_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(
            Rate {
                per_s: 2.0,
                burst: 3,
            },
            t0,
        );
        for _ in 0..3 {
            assert_eq!(b.take(t0), Ok(()));
        }
        let wait = b.take(t0).expect_err("empty");
        assert_eq!(wait, ms(500));
        assert_eq!(retry_after_s(wait), 1);
        // 250 ms later half a token has come back: still refused, 250 ms to go.
        assert_eq!(b.take(t0 + ms(250)), Err(ms(250)));
        assert_eq!(b.take(t0 + ms(500)), Ok(()));
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.take(later), Ok(()));
        }
        assert!(b.take(later).is_err());
    }

    #[test]
    fn slow_rates_ask_for_whole_seconds() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(
            Rate {
                per_s: 0.1,
                burst: 1,
            },
            t0,
        );
        assert_eq!(b.take(t0), Ok(()));
        let wait = b.take(t0 + ms(1)).expect_err("empty");
        assert_eq!(retry_after_s(wait), 10);
        assert_eq!(retry_after_s(Duration::ZERO), 1);
        assert_eq!(retry_after_s(Duration::from_secs(2)), 2);
    }

    #[test]
    fn an_earlier_instant_adds_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(
            Rate {
                per_s: 1.0,
                burst: 1,
            },
            t0,
        );
        assert_eq!(b.take(t0), Ok(()));
        assert!(b.take(t0 - Duration::from_secs(5)).is_err());
        assert!(b.take(t0 + ms(999)).is_err());
        assert_eq!(b.take(t0 + ms(1000)), Ok(()));
    }

    #[test]
    fn unlimited_vendor_is_always_admitted() {
        let now = Instant::now();
        let l = build(
            &BTreeMap::from([(
                "fhir".to_string(),
                ValidVendorLimits {
                    max_body_bytes: Some(10),
                    rate: None,
                },
            )]),
            now,
        );
        assert!((0..1000).all(|_| l["fhir"].admit(now).is_ok()));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

        /// Over any window, admitted requests never exceed `burst + rate * window`, and a
        /// refusal's wait really is long enough for the next token.
        #[test]
        fn never_admits_more_than_the_rate_allows(
            per_s in 0.5f64..200.0,
            burst in 1u32..50,
            gaps in prop::collection::vec(0u64..300, 1..400),
        ) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(Rate { per_s, burst }, t0);
            let mut now = t0;
            let mut admitted = 0u64;
            for g in gaps {
                now += ms(g);
                match b.take(now) {
                    Ok(()) => admitted += 1,
                    Err(wait) => {
                        prop_assert!(wait > Duration::ZERO);
                        let mut probe = b.clone();
                        prop_assert!(probe.take(now + wait + ms(1)).is_ok());
                    }
                }
            }
            let window = (now - t0).as_secs_f64();
            prop_assert!(admitted as f64 <= f64::from(burst) + per_s * window + 1e-6);
        }
    }
}
