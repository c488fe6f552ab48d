//! Typed telemetry events: each one records its metrics through [`Telemetry`] in `emit()`.
//! Label values are bounded (config names and closed enums); never payloads, patient, device or
//! event ids.

use std::time::Duration;

use super::{Telemetry, kv};
use crate::normalise::{Category, LaneClass};

/// How an ingest request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    Stored,
    Duplicate,
    Quarantined,
    Heartbeat,
    Rejected,
}

impl IngestOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            IngestOutcome::Stored => "stored",
            IngestOutcome::Duplicate => "duplicate",
            IngestOutcome::Quarantined => "quarantined",
            IngestOutcome::Heartbeat => "heartbeat",
            IngestOutcome::Rejected => "rejected",
        }
    }
}

/// An ingest request was answered.
pub struct IngestAnswered<'a> {
    /// A configured vendor name, or `"unknown"` (the path segment is never used as a label).
    pub vendor: &'a str,
    pub outcome: IngestOutcome,
    pub status: u16,
    pub duration: Duration,
}

impl IngestAnswered<'_> {
    pub fn emit(&self, t: &Telemetry) {
        let class = status_class(self.status);
        t.ingest_requests.add(
            1,
            &[
                kv("vendor", self.vendor.to_string()),
                kv("outcome", self.outcome.as_str()),
                kv("status_class", class),
            ],
        );
        t.ingest_duration.record(
            self.duration.as_secs_f64(),
            &[
                kv("vendor", self.vendor.to_string()),
                kv("outcome", self.outcome.as_str()),
            ],
        );
        if self.outcome != IngestOutcome::Rejected
            && let Ok(mut m) = t.vendor_seen.lock()
        {
            m.insert(
                self.vendor.to_string(),
                crate::clock::now_ms() as f64 / 1000.0,
            );
        }
        tracing::debug!(
            vendor = self.vendor,
            outcome = self.outcome.as_str(),
            status = self.status,
            "ingest answered"
        );
    }
}

/// An event was durably journaled (not a duplicate).
pub struct EventStored<'a> {
    pub vendor: &'a str,
    pub category: Category,
}

impl EventStored<'_> {
    pub fn emit(&self, t: &Telemetry) {
        t.events_stored.add(
            1,
            &[
                kv("vendor", self.vendor.to_string()),
                kv("category", self.category.as_str()),
                kv("lane_class", self.category.lane_class().as_str()),
            ],
        );
    }
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    Retry,
    DeadLetter,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::Retry => "retry",
            AttemptOutcome::DeadLetter => "dead_letter",
        }
    }
}

/// Why a delivery was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// The destination refused it (4xx other than 408/429).
    Permanent,
    /// Retries or the maximum age ran out.
    Exhausted,
}

/// A delivery attempt finished and its outcome was decided.
pub struct DeliveryAttempted<'a> {
    pub destination: &'a str,
    pub class: LaneClass,
    pub outcome: AttemptOutcome,
    pub dead_reason: Option<DeadReason>,
    pub duration: Duration,
    /// For delivered alarms: time since the delivery row was created (journaled or replayed).
    pub since_created: Option<Duration>,
}

impl DeliveryAttempted<'_> {
    pub fn emit(&self, t: &Telemetry) {
        let dest = self.destination.to_string();
        t.delivery_attempts.add(
            1,
            &[
                kv("destination", dest.clone()),
                kv("lane_class", self.class.as_str()),
                kv("outcome", self.outcome.as_str()),
            ],
        );
        t.delivery_duration.record(
            self.duration.as_secs_f64(),
            &[
                kv("destination", dest.clone()),
                kv("outcome", self.outcome.as_str()),
            ],
        );
        if let Some(reason) = self.dead_reason {
            let reason = match reason {
                DeadReason::Permanent => "permanent",
                DeadReason::Exhausted => "exhausted",
            };
            t.dead_letters.add(
                1,
                &[
                    kv("destination", dest.clone()),
                    kv("lane_class", self.class.as_str()),
                    kv("reason", reason),
                ],
            );
        }
        if self.outcome == AttemptOutcome::Delivered
            && self.class == LaneClass::Alarm
            && let Some(l) = self.since_created
        {
            t.alarm_latency
                .record(l.as_secs_f64(), &[kv("destination", dest)]);
        }
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// An ingest request was refused; nothing was stored.
pub struct IngestRejected<'a> {
    /// A configured vendor name, or `"unknown"`.
    pub vendor: &'a str,
    /// A closed set, see `ingest::limits::reject_reason`.
    pub reason: &'static str,
}

impl IngestRejected<'_> {
    pub fn emit(&self, t: &Telemetry) {
        t.ingest_rejected.add(
            1,
            &[
                kv("vendor", self.vendor.to_string()),
                kv("reason", self.reason),
            ],
        );
    }
}
