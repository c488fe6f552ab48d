//! Types crossing the journal boundary: ingest → journal (`NewEvent`), journal → deliver
//! (`DeliveryTask`), deliver → journal (`AttemptRecord`), and the admin read models.

use std::sync::Arc;

use serde::Serialize;

use crate::normalise::Envelope;
pub use crate::normalise::LaneClass;

/// An envelope plus everything ingest and routing decided about it.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub envelope: Envelope,
    pub raw: Vec<u8>,
    pub content_type: String,
    pub idempotency_key: Option<String>,
    pub received_at_ms: i64,
    /// Destination names from matching routes (deduplicated, in config order).
    pub destinations: Vec<String>,
    /// Names of the routes that matched, for the audit trail.
    pub routes: Vec<String>,
    /// W3C trace context of the ingest span: delivery spans become its children.
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    Stored { id: String },
    Duplicate { id: String },
}

/// The head of one lane, handed to a delivery worker.
#[derive(Debug, Clone)]
pub struct DeliveryTask {
    pub delivery_id: i64,
    pub event_id: String,
    pub dest: String,
    pub class: LaneClass,
    pub lane_key: String,
    /// Attempts already made for this delivery (the next one is `attempts + 1`).
    pub attempts: u32,
    /// When this delivery row was created (ingest, or replay): the base for max age.
    pub created_at_ms: i64,
    pub fhir: Arc<str>,
    /// Lease token: a backend refuses outcomes carrying a stale token.
    pub lease: i64,
    /// W3C trace context stored with the event at ingest (see `NewEvent::traceparent`).
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Claimed {
    pub tasks: Vec<DeliveryTask>,
    /// Earliest `next_attempt_at` among this class's unleased lanes that were not ready.
    pub next_due_ms: Option<i64>,
}

/// What one attempt ended in, as decided by the delivery worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Try again at `next_attempt_ms`; the lane stays blocked until then.
    Retry {
        next_attempt_ms: i64,
    },
    /// Give up on this delivery; the lane moves on.
    DeadLetter {
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub task: DeliveryTask,
    /// 1-based number of this attempt.
    pub attempt: u32,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub latency_ms: f64,
    pub at_ms: i64,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    pub delivery_id: Option<i64>,
    pub destination: Option<String>,
    pub vendor: Option<String>,
    pub limit: usize,
    /// Only events of these tenants (municipality numbers); `None` = every tenant.
    pub tenants: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub event_id: String,
    pub destination: String,
    pub dead_delivery_id: i64,
    pub new_delivery_id: i64,
}

#[derive(Debug, Clone, Default)]
pub struct LaneQuery {
    pub destination: Option<String>,
    pub limit: usize,
    /// Only events of these tenants (municipality numbers); `None` = every tenant.
    pub tenants: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LaneInfo {
    pub destination: String,
    pub class: LaneClass,
    pub key: String,
    pub depth: i64,
    pub head_event_id: String,
    pub head_attempts: i64,
    pub oldest_age_ms: i64,
    pub next_attempt_at_ms: i64,
    pub in_flight: bool,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DestinationStats {
    pub destination: String,
    pub lanes: i64,
    pub pending: i64,
    pub delivered: i64,
    pub dead: i64,
    pub oldest_pending_age_ms: Option<i64>,
}

/// What the queue gauges show: per destination only what is still queued or dead, and the open
/// quarantine. Unlike [`DestinationStats`] it never counts delivered history, so reading it costs
/// in proportion to the queue, not to the journal's retention.
#[derive(Debug, Clone, Default)]
pub struct QueueFigures {
    pub destinations: Vec<DestinationQueue>,
    pub quarantined: i64,
}

/// One destination's queue: its non-empty lanes, pending and dead deliveries, oldest pending.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DestinationQueue {
    pub destination: String,
    pub lanes: i64,
    pub pending: i64,
    pub dead: i64,
    pub oldest_pending_age_ms: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct DeadLetterQuery {
    pub destination: Option<String>,
    pub vendor: Option<String>,
    pub limit: usize,
    /// Only events of these tenants (municipality numbers); `None` = every tenant.
    pub tenants: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub delivery_id: i64,
    pub event_id: String,
    pub destination: String,
    pub vendor: String,
    pub category: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub reason: Option<String>,
    pub dead_at_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventDetail {
    pub id: String,
    pub vendor: String,
    pub vendor_event_id: Option<String>,
    pub category: String,
    pub priority: String,
    pub tenant: Option<String>,
    pub key: String,
    pub mapping_version: String,
    pub content_type: String,
    pub received_at_ms: i64,
    pub stored_at_ms: i64,
    pub fhir: serde_json::Value,
    pub deliveries: Vec<DeliveryInfo>,
    pub audit: Vec<AuditEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryInfo {
    pub delivery_id: i64,
    pub destination: String,
    pub state: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub delivered_at_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub at_ms: i64,
    pub kind: String,
    pub destination: Option<String>,
    pub attempt: Option<i64>,
    pub status: Option<i64>,
    pub latency_ms: Option<f64>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct JournalStats {
    pub events: i64,
    pub unrouted: i64,
    pub pending: i64,
    pub delivered: i64,
    pub dead: i64,
    /// Events held in quarantine (no device assignment covered them), not yet released.
    pub quarantined: i64,
}

// ---- Device registry, device liveness and quarantine (issue 3, identity) ----

/// A request to assign a device to a patient for a period `[valid_from, valid_to)`.
#[derive(Debug, Clone)]
pub struct NewAssignment {
    pub vendor: String,
    pub device_id: String,
    /// Validated national identifier (digits only).
    pub patient_id: String,
    /// Municipality number the patient belongs to.
    pub tenant: String,
    pub valid_from_ms: i64,
    /// `None`: open-ended.
    pub valid_to_ms: Option<i64>,
    pub note: Option<String>,
}

/// One row of the device registry.
#[derive(Debug, Clone, Serialize)]
pub struct Assignment {
    pub id: i64,
    pub vendor: String,
    pub device_id: String,
    pub patient_id: String,
    pub tenant: String,
    pub valid_from_ms: i64,
    pub valid_to_ms: Option<i64>,
    pub created_at_ms: i64,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct AssignmentQuery {
    pub vendor: Option<String>,
    pub device_id: Option<String>,
    pub patient_id: Option<String>,
    pub tenant: Option<String>,
    /// Only assignments covering this instant.
    pub active_at_ms: Option<i64>,
    pub limit: usize,
}

/// A device said it is alive (or otherwise reported).
#[derive(Debug, Clone)]
pub struct DeviceBeat {
    pub vendor: String,
    pub device_id: String,
    /// Gateway clock when the message arrived.
    pub seen_at_ms: i64,
    /// The device's own timestamp, when it sent one.
    pub reported_at_ms: Option<i64>,
    /// `heartbeat`, or the kind of message that proved liveness.
    pub kind: String,
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Liveness {
    pub vendor: String,
    pub device_id: String,
    pub tenant: Option<String>,
    pub last_seen_at_ms: i64,
    /// Milliseconds since `last_seen_at_ms`, at the time of the query.
    pub last_seen_age_ms: i64,
    pub last_kind: String,
    pub reported_at_ms: Option<i64>,
    pub beats: i64,
}

#[derive(Debug, Clone, Default)]
pub struct LivenessQuery {
    pub vendor: Option<String>,
    pub device_id: Option<String>,
    pub limit: usize,
    /// Only events of these tenants (municipality numbers); `None` = every tenant.
    pub tenants: Option<Vec<String>>,
}

/// An audit record that is not a step of one delivery: a refused request, an audit query or
/// export, an escalation. `subject` is the event id it concerns, or a short reference such as
/// `vendor:acme` when there is no event (it fills the audit trail's `event_id` column).
#[derive(Debug, Clone)]
pub struct AuditNote {
    pub kind: String,
    pub subject: String,
    pub dest: Option<String>,
    pub detail: String,
}

/// Why an event is held back instead of routed.
#[derive(Debug, Clone)]
pub struct QuarantineInfo {
    pub device_id: Option<String>,
    /// The tenant the request named (`X-Tenant`), needed to map the event again on release.
    pub requested_tenant: Option<String>,
    pub reason: String,
}

/// An event held in quarantine (open) or released from it.
#[derive(Debug, Clone, Serialize)]
pub struct QuarantinedEvent {
    pub event_id: String,
    pub vendor: String,
    pub device_id: Option<String>,
    pub category: String,
    pub reason: String,
    pub quarantined_at_ms: i64,
    pub age_ms: i64,
    pub received_at_ms: i64,
    pub released_at_ms: Option<i64>,
    #[serde(skip)]
    pub requested_tenant: Option<String>,
    #[serde(skip)]
    pub content_type: String,
    #[serde(skip)]
    pub idempotency_key: Option<String>,
    #[serde(skip)]
    pub raw: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
pub struct QuarantineQuery {
    pub vendor: Option<String>,
    /// Include released events too.
    pub all: bool,
    pub limit: usize,
}

/// A quarantined event mapped again (now with a patient) and routed: stored over the held event
/// and queued for delivery.
#[derive(Debug, Clone)]
pub struct Release {
    pub envelope: Envelope,
    pub destinations: Vec<String>,
    pub routes: Vec<String>,
    /// Audit detail (never the patient's identity).
    pub detail: String,
}

/// Filter of an audit search (`GET /v1/admin/audit`, the export, the console's audit page).
/// Every field narrows; `None` matches all. Times are Unix ms, `to_ms` exclusive.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditQuery {
    pub event_id: Option<String>,
    pub vendor: Option<String>,
    /// A device id: matches events keyed by the device or whose FHIR names it.
    pub device: Option<String>,
    pub destination: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// An audit step kind (`delivered`, `dead`, `retry_scheduled`, `received`, …).
    pub outcome: Option<String>,
    pub limit: usize,
    /// Only records of events of these tenants (municipality numbers); `None` = every record.
    pub tenants: Option<Vec<String>>,
}

/// One audit record with the facts of its event (when it concerns one), newest first.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub id: i64,
    /// Position in the hash chain (negative for rows from before the chain).
    pub chain_seq: Option<i64>,
    pub hash: Option<String>,
    pub at_ms: i64,
    pub event_id: String,
    pub kind: String,
    pub destination: Option<String>,
    pub attempt: Option<i64>,
    pub status: Option<i64>,
    pub latency_ms: Option<f64>,
    pub detail: Option<String>,
    pub vendor: Option<String>,
    pub category: Option<String>,
    pub tenant: Option<String>,
    /// The event's lane key (`patient:<id>` or `device:<id>`): personal data, shown only to
    /// callers allowed to see patient identity.
    pub key: Option<String>,
}

/// What one retention sweep deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    /// Audit rows deleted (chained rows up to the anchor, plus pre-chain rows).
    pub audit_rows: u64,
    /// Finished events deleted (with their deliveries and released quarantine records).
    pub events: u64,
    /// The new anchor (chain position, hash) when chained rows were deleted.
    pub anchor: Option<(i64, String)>,
}
