//! Alarm-path state in the journal: escalations of alarm deliveries that missed their deadline,
//! and time-limited device deactivations. Both are journal state (never only in memory), so a
//! restart neither loses an escalation nor forgets a deactivation.

use serde::Serialize;

/// One destination's deadline rule: alarm deliveries still undelivered `deadline_ms` after they
/// were stored escalate; the event is then also delivered to `fallback` (when set).
#[derive(Debug, Clone)]
pub struct EscalationRule {
    pub dest: String,
    pub deadline_ms: i64,
    pub fallback: Option<String>,
}

/// Alarm-path writes (through the writer queue: durable before they answer).
#[derive(Debug, Clone)]
pub enum AlarmOp {
    /// Finds alarm deliveries past their destination's deadline that are neither delivered nor
    /// escalated (a dead-lettered one at once: it will not be delivered), and escalates up to `limit` of them: marks each escalated, adds a delivery
    /// row for the fallback destination and an `escalated` audit record, in one transaction.
    Escalate {
        rules: Vec<EscalationRule>,
        now_ms: i64,
        limit: usize,
    },
    /// An operator acknowledges an open escalation.
    Acknowledge {
        id: i64,
        by: String,
        note: Option<String>,
        at_ms: i64,
    },
    /// Starts a time-limited deactivation of a device.
    Deactivate(NewDeactivation),
    /// Ends the device's active deactivation early.
    EndDeactivation {
        vendor: String,
        device_id: String,
        by: String,
        at_ms: i64,
    },
    /// Marks active deactivations ending within `lead_ms` as reminded (once each), and returns
    /// them; also records (once each) the ones that expired by `now_ms`.
    DeactivationSweep { now_ms: i64, lead_ms: i64 },
}

#[derive(Debug, Clone)]
pub enum AlarmOut {
    Escalated(Vec<Escalation>),
    Escalation(Escalation),
    Deactivation(Deactivation),
    Swept {
        reminded: Vec<Deactivation>,
        expired: Vec<Deactivation>,
    },
}

/// An escalation: an alarm delivery that missed its deadline.
#[derive(Debug, Clone, Serialize)]
pub struct Escalation {
    pub id: i64,
    pub delivery_id: i64,
    pub event_id: String,
    pub destination: String,
    pub fallback: Option<String>,
    pub fallback_delivery_id: Option<i64>,
    pub deadline_ms: i64,
    /// When the original delivery row was created (the event was stored).
    pub stored_at_ms: i64,
    pub escalated_at_ms: i64,
    pub acknowledged_at_ms: Option<i64>,
    pub acknowledged_by: Option<String>,
    pub note: Option<String>,
    /// State of the original delivery now (`pending`, `dead`, `delivered`, ...).
    pub delivery_state: String,
}

#[derive(Debug, Clone, Default)]
pub struct EscalationQuery {
    /// Include acknowledged escalations too.
    pub all: bool,
    pub limit: usize,
}

#[derive(Debug, Clone)]
pub struct NewDeactivation {
    pub vendor: String,
    pub device_id: String,
    pub from_ms: i64,
    pub until_ms: i64,
    pub reason: String,
    pub by: String,
}

/// A time-limited deactivation of one device.
#[derive(Debug, Clone, Serialize)]
pub struct Deactivation {
    pub id: i64,
    pub vendor: String,
    pub device_id: String,
    pub from_ms: i64,
    pub until_ms: i64,
    pub reason: String,
    pub created_by: String,
    pub created_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub ended_by: Option<String>,
    pub reminded_at_ms: Option<i64>,
}

impl Deactivation {
    pub fn active_at(&self, at_ms: i64) -> bool {
        self.from_ms <= at_ms && at_ms < self.until_ms && self.ended_at_ms.is_none_or(|e| e > at_ms)
    }
}

#[derive(Debug, Clone, Default)]
pub struct DeactivationQuery {
    pub vendor: Option<String>,
    pub device_id: Option<String>,
    /// Only deactivations active at this instant.
    pub active_at_ms: Option<i64>,
    pub limit: usize,
}

/// The audit text of an escalation (shared by both backends so they cannot drift). `dead`: the
/// delivery was dead-lettered (escalated at once, without waiting for the deadline).
pub fn escalated_detail(
    deadline_ms: i64,
    dead: bool,
    fallback: Option<&str>,
    fallback_id: Option<i64>,
) -> String {
    let why = if dead {
        "dead-lettered (will not be delivered)".to_string()
    } else {
        format!("not delivered within {deadline_ms} ms")
    };
    match (fallback, fallback_id) {
        (Some(f), Some(id)) => format!("{why}; escalated: fallback delivery {id} to {f}"),
        _ => format!("{why}; escalated (no fallback destination)"),
    }
}

/// Audit subject of a device-level record (there is no event).
pub fn device_subject(vendor: &str, device_id: &str) -> String {
    format!("device:{vendor}/{device_id}")
}

pub fn acknowledged_detail(id: i64, by: &str, note: Option<&str>) -> String {
    let note = note.map(|n| format!(": {n}")).unwrap_or_default();
    format!("escalation {id} acknowledged by {by}{note}")
}

pub fn deactivated_detail(id: i64, d: &NewDeactivation) -> String {
    use super::registry_text::instant;
    format!(
        "deactivation {id} by {} from {} until {}: {}",
        d.by,
        instant(d.from_ms),
        instant(d.until_ms),
        d.reason
    )
}

pub fn ended_detail(id: i64, by: &str) -> String {
    format!("deactivation {id} ended early by {by}")
}

pub fn expiring_detail(d: &Deactivation, now_ms: i64) -> String {
    format!(
        "deactivation {} ends in {} s (until {}): {}",
        d.id,
        (d.until_ms - now_ms) / 1000,
        super::registry_text::instant(d.until_ms),
        d.reason
    )
}

pub fn expired_detail(d: &Deactivation) -> String {
    format!(
        "deactivation {} expired at {}",
        d.id,
        super::registry_text::instant(d.until_ms)
    )
}
