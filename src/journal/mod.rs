//! Journal: the durable record of every accepted event and of its delivery state per destination.
//!
//! Design (shared by every backend):
//! - `events` holds the raw body, the normalised FHIR Bundle and routing facts.
//! - `deliveries` holds one row per (event, destination): `pending`, `delivered`, `dead` or
//!   `replayed` (a dead letter that was re-queued as a new row).
//! - `lanes` holds one row per non-empty (destination, lane class, key) FIFO: its head delivery,
//!   the head's retry schedule (`next_attempt_at`) and whether a worker holds it (`leased`).
//!   Only a lane's head is ever handed out, and only while unleased, so per-key order is strict.
//! - `audit` is the append-only trail of every step, hash-chained (`audit_chain`): editing or
//!   deleting a row is detected by `knutepunkt audit verify`.
//!
//! A backend commits many commands in one transaction (group commit) and answers none before
//! that commit is durable.

pub mod alarm;
pub mod audit_chain;
mod command;
pub mod handoff;
mod postgres;
pub mod registry_text;
pub mod retention;
mod sqlite;
pub mod subs;
pub mod types;

pub use postgres::audit::verify as verify_postgres_audit;
pub use postgres::{PgOptions, PostgresJournal};
pub use sqlite::SqliteJournal;
pub use sqlite::audit::verify as verify_sqlite_audit;
pub use types::*;

use async_trait::async_trait;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum JournalError {
    /// The writer queue is full: shed load (ingest answers 503 + Retry-After).
    #[error("journal is overloaded")]
    Overloaded,
    /// The store failed or is unreachable; nothing of the command was committed.
    #[error("journal unavailable: {0}")]
    Unavailable(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
}

impl From<rusqlite::Error> for JournalError {
    fn from(e: rusqlite::Error) -> Self {
        JournalError::Unavailable(e.to_string())
    }
}

/// The storage contract. The SQLite backend implements it today; a PostgreSQL backend implements
/// the same calls with leases that expire (fencing by `LaneLease::token`).
#[async_trait]
pub trait Journal: Send + Sync + 'static {
    /// Stores an event and its pending deliveries; returns once durable. Repeats of a vendor event
    /// (same vendor event id or idempotency key) return the first event's id and store nothing.
    async fn append(&self, event: NewEvent) -> Result<Appended, JournalError>;

    /// Leases up to `limit` ready lanes of `dest` in `class`, oldest due first, and returns their
    /// head deliveries. `next_due` tells when the earliest not-yet-ready lane becomes due.
    async fn claim(
        &self,
        dest: &str,
        class: LaneClass,
        limit: usize,
        now_ms: i64,
    ) -> Result<Claimed, JournalError>;

    /// Records the outcome of one attempt, releases the lane lease and advances the lane when the
    /// head is finished (delivered or dead-lettered).
    async fn record(&self, attempt: AttemptRecord) -> Result<(), JournalError>;

    /// Re-queues dead letters matching `filter` at the tail of their lanes; returns how many.
    async fn replay(&self, filter: ReplayFilter) -> Result<Vec<Replayed>, JournalError>;

    /// A durable no-op write: proves the store is writable (readiness).
    async fn ping(&self) -> Result<(), JournalError>;

    /// Where dispatchers register to receive lane heads leased by the writer itself (see
    /// `handoff`); `None` for a backend that only hands work out through `claim`.
    fn handoff(&self) -> Option<std::sync::Arc<handoff::Handoff>> {
        None
    }

    async fn lanes(&self, query: LaneQuery) -> Result<Vec<LaneInfo>, JournalError>;
    async fn destinations(&self) -> Result<Vec<DestinationStats>, JournalError>;
    async fn dead_letters(&self, query: DeadLetterQuery) -> Result<Vec<DeadLetter>, JournalError>;
    async fn event(&self, id: &str) -> Result<Option<EventDetail>, JournalError>;
    async fn stats(&self) -> Result<JournalStats, JournalError>;
    /// The queue gauges' figures (see [`QueueFigures`]): cheap enough to read every few seconds.
    async fn queue_figures(&self) -> Result<QueueFigures, JournalError>;

    // ---- Device registry (devices assigned to patients for a period), liveness, quarantine.
    // Writes go through the writer queue (durable before they answer); reads use the read side.

    /// Adds an assignment; `Conflict` when it overlaps another assignment of the same device
    /// (a device has at most one patient at a time).
    async fn assign_device(&self, a: NewAssignment) -> Result<Assignment, JournalError>;
    /// Ends assignment `id` of the device at `at_ms`; `NotFound` when the device has no such
    /// assignment, `Conflict` when it already ended before `at_ms` or starts after it.
    async fn end_assignment(
        &self,
        id: i64,
        vendor: &str,
        device_id: &str,
        at_ms: i64,
    ) -> Result<Assignment, JournalError>;
    async fn assignments(&self, q: AssignmentQuery) -> Result<Vec<Assignment>, JournalError>;
    /// The assignment covering `at_ms` for the vendor's device, if any.
    async fn resolve_device(
        &self,
        vendor: &str,
        device_id: &str,
        at_ms: i64,
    ) -> Result<Option<Assignment>, JournalError>;
    /// Records that a device is alive (durable before it answers; sheds load like `append`).
    async fn device_beat(&self, beat: DeviceBeat) -> Result<(), JournalError>;
    async fn liveness(&self, q: LivenessQuery) -> Result<Vec<Liveness>, JournalError>;

    /// Stores an event held in quarantine: journaled, never routed until released. Repeats are
    /// recognised as by `append`.
    async fn append_quarantined(
        &self,
        event: NewEvent,
        info: QuarantineInfo,
    ) -> Result<Appended, JournalError>;
    async fn quarantined(&self, q: QuarantineQuery) -> Result<Vec<QuarantinedEvent>, JournalError>;
    /// One held (or released) event with its raw body, for a replay.
    async fn quarantined_event(&self, id: &str) -> Result<Option<QuarantinedEvent>, JournalError>;
    /// Releases a held event with its new mapping and routes; `Conflict` when it is not (any
    /// longer) in quarantine.
    async fn release(&self, r: Release) -> Result<(), JournalError>;

    /// Appends one audit record outside a delivery step (durable before it answers; sheds load
    /// with `Overloaded` like `append`).
    async fn audit_note(&self, note: AuditNote) -> Result<(), JournalError>;

    // ---- Alarm path: escalations and device deactivations (`alarm.rs`).

    /// Escalation and deactivation writes (durable before they answer).
    async fn alarm_op(&self, op: alarm::AlarmOp) -> Result<alarm::AlarmOut, JournalError>;
    async fn escalations(
        &self,
        q: alarm::EscalationQuery,
    ) -> Result<Vec<alarm::Escalation>, JournalError>;
    /// How many escalations no operator has acknowledged yet.
    async fn open_escalations(&self) -> Result<i64, JournalError>;
    async fn deactivations(
        &self,
        q: alarm::DeactivationQuery,
    ) -> Result<Vec<alarm::Deactivation>, JournalError>;
    /// FHIR subscription and pull-feed writes (see `subs`), durable before they answer.
    async fn subs(&self, op: subs::SubsOp) -> Result<subs::SubsOut, JournalError>;
    /// FHIR subscription and pull-feed reads.
    async fn subs_read(&self, q: subs::SubsRead) -> Result<subs::SubsOut, JournalError>;
    /// Devices of `vendor` last seen before `seen_before_ms`, most recently silent first (so
    /// long-gone devices never crowd out the ones that just went quiet).
    async fn silent_devices(
        &self,
        vendor: &str,
        seen_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<Liveness>, JournalError>;
    /// Audit records matching `q`, newest first, with their events' facts (read side).
    async fn audit_search(&self, q: AuditQuery) -> Result<Vec<AuditRecord>, JournalError>;

    /// Deletes what retention allows before `cutoff_ms` (see `retention`): a prefix of the
    /// audit chain, anchored so `audit verify` still walks the rest, and the finished events
    /// no remaining audit row refers to.
    async fn retention_sweep(&self, cutoff_ms: i64) -> Result<RetentionReport, JournalError>;
}
