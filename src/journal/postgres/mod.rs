//! PostgreSQL journal for production and multi-node operation.
//!
//! Same model as the embedded store, with what several nodes need: lane leases that expire
//! (`storage.lease_s`) so another node takes over the lanes of a dead one, fencing by lease token
//! (a node whose lease expired cannot record a stale outcome), and `FOR UPDATE SKIP LOCKED` claims
//! so nodes never hand out the same lane. Polling (every dispatcher looks at least every 500 ms)
//! is the wake-up mechanism across nodes; ingest wakes its own node's dispatchers at once.
//!
//! Each node has one writer connection that commits batches of commands (group commit); the
//! commands of a batch run pipelined on that connection inside one transaction.

mod alarm;
pub mod audit;
mod audit_search;
mod read;
mod registry;
mod retention;
mod subs;
mod tls;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use super::alarm::{
    AlarmOp, AlarmOut, Deactivation, DeactivationQuery, Escalation, EscalationQuery,
};
use super::command::Queue;
use super::handoff::Handoff;
use super::{
    Appended, Assignment, AssignmentQuery, AttemptRecord, AuditNote, Claimed, DeadLetter,
    DeadLetterQuery, DestinationStats, DeviceBeat, EventDetail, Journal, JournalError,
    JournalStats, LaneClass, LaneInfo, LaneQuery, Liveness, LivenessQuery, NewAssignment, NewEvent,
    QuarantineInfo, QuarantineQuery, QuarantinedEvent, QueueFigures, Release, ReplayFilter,
    Replayed,
};

/// 1: events, deliveries, lanes, audit (`schema.sql`). 2: device registry, device liveness,
/// quarantine (`schema_v2.sql`). 3: audit hash chain (`schema_v3.sql`). 4: `events.traceparent`
/// (`schema_v4.sql`). 5: `audit_anchor`, the retention anchor (`schema_v5.sql`).
/// Writer connections per node unless configured (`storage.writers`).
pub const DEFAULT_WRITERS: usize = 1;

/// Tuning of a PostgreSQL journal (see docs/configuration.md, `[storage]`).
#[derive(Debug, Clone, Copy)]
pub struct PgOptions {
    pub pool_size: usize,
    pub lease: Duration,
    pub max_batch: usize,
    pub queue_capacity: usize,
    /// Writer connections, each committing its own batches (see `writer::run`).
    pub writers: usize,
}

/// 4: escalations, device deactivations (`schema_v4.sql`).
/// 5: FHIR subscriptions and pull feed (`schema_v5.sql`). 6: `events.traceparent` (`schema_v6.sql`).
/// 7: retention anchor (`schema_v7.sql`). 8: `knutepunkt_raced()` (`schema_v8.sql`).
const SCHEMA_VERSION: i32 = 8;
/// Arbitrary constant naming the migration advisory lock.
const MIGRATION_LOCK: i64 = 0x6b6e_7574_6570_756e;

pub struct PostgresJournal {
    queue: Queue,
    pool: Pool,
    /// The dispatchers of this node, to which writers hand lanes their appends open.
    handoff: Arc<Handoff>,
}

impl From<tokio_postgres::Error> for JournalError {
    fn from(e: tokio_postgres::Error) -> Self {
        JournalError::Unavailable(db_error_text(&e))
    }
}

fn db_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            // The driver's own text is generic ("error performing TLS handshake"); the cause
            // (e.g. an unknown certificate issuer) is what an operator needs.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                text.push_str(": ");
                text.push_str(&inner.to_string());
                source = inner.source();
            }
            text
        }
    }
}

impl PostgresJournal {
    /// Connects (retrying for up to about 30 s while the database starts), migrates the schema
    /// and starts the writer.
    pub async fn open(
        url: &str,
        tls_ca_file: Option<&Path>,
        pool_size: usize,
        lease: Duration,
        max_batch: usize,
        queue_capacity: usize,
    ) -> Result<Self, JournalError> {
        let opts = PgOptions {
            pool_size,
            lease,
            max_batch,
            queue_capacity,
            writers: DEFAULT_WRITERS,
        };
        Self::open_with(url, tls_ca_file, opts).await
    }

    /// Like `open`, with every tuning knob.
    pub async fn open_with(
        url: &str,
        tls_ca_file: Option<&Path>,
        opts: PgOptions,
    ) -> Result<Self, JournalError> {
        let PgOptions {
            pool_size,
            lease,
            max_batch,
            queue_capacity,
            ..
        } = opts;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| JournalError::Unavailable(format!("storage.url: {e}")))?;
        config.connect_timeout(Duration::from_secs(5));
        let tls = tls::configure(&mut config, tls_ca_file)?;
        // Wait while the server is starting or unreachable; fail at once on what waiting cannot
        // fix (authentication, a rejected certificate, a missing database).
        let connect = || async { writer::connect_raw(&config, tls.clone()).await };
        let client = connect
            .retry(
                ExponentialBuilder::default()
                    .with_max_times(10)
                    .with_max_delay(Duration::from_secs(5)),
            )
            .when(is_transient)
            .notify(|e, _| tracing::warn!(error = %db_error_text(e), "waiting for PostgreSQL"))
            .await?;
        migrate(&client).await?;
        drop(client);

        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| JournalError::Unavailable(format!("pool: {e}")))?;
        let (queue, rx) = Queue::new(queue_capacity);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let handoff = Arc::new(Handoff::default());
        for _ in 0..opts.writers.max(1) {
            tokio::spawn(writer::run(
                config.clone(),
                tls.clone(),
                Arc::clone(&rx),
                max_batch,
                lease,
                Arc::clone(&handoff),
            ));
        }
        Ok(Self {
            queue,
            pool,
            handoff,
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, JournalError> {
        self.pool
            .get()
            .await
            .map_err(|e| JournalError::Unavailable(format!("database: {e}")))
    }
}

/// Connection failures worth waiting out: no answer from the server (refused, timed out, reset),
/// or a server that is still starting or shutting down. Not: TLS and authentication failures.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        // 57P03: cannot connect now (starting up); 57P01-57P02: shutting down.
        return code.starts_with("57P") || code.starts_with("08");
    }
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        if inner.downcast_ref::<rustls::Error>().is_some() {
            return false;
        }
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            // rustls reports handshake failures as io::Error(InvalidData) wrapping its error.
            return io.kind() != std::io::ErrorKind::InvalidData;
        }
        source = inner.source();
    }
    true
}

/// Applies the schema once, even when several nodes start together.
async fn migrate(client: &tokio_postgres::Client) -> Result<(), JournalError> {
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS knutepunkt_schema (version INTEGER NOT NULL)")
        .await
        .or_else(|e| {
            // Two nodes racing on CREATE TABLE IF NOT EXISTS may see a unique violation.
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                Ok(())
            } else {
                Err(e)
            }
        })?;
    client.batch_execute("BEGIN").await?;
    client
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let current: Option<i32> = client
        .query_opt("SELECT max(version) FROM knutepunkt_schema", &[])
        .await?
        .and_then(|r| r.get(0));
    let current = current.unwrap_or(0);
    if current > SCHEMA_VERSION {
        client.batch_execute("ROLLBACK").await?;
        return Err(JournalError::Unavailable(format!(
            "database schema version {current} is newer than this binary ({SCHEMA_VERSION})"
        )));
    }
    // One step per version, each applied once, in order; a database at version 1 gets only the
    // later steps.
    let steps: [(i32, &str); 8] = [
        (1, include_str!("schema.sql")),
        (2, include_str!("schema_v2.sql")),
        (3, include_str!("schema_v3.sql")),
        (4, include_str!("schema_v4.sql")),
        (5, include_str!("schema_v5.sql")),
        (6, include_str!("schema_v6.sql")),
        (7, include_str!("schema_v7.sql")),
        (8, include_str!("schema_v8.sql")),
    ];
    for (version, sql) in steps {
        if current < version {
            client.batch_execute(sql).await?;
            client
                .execute(
                    "INSERT INTO knutepunkt_schema (version) VALUES ($1)",
                    &[&version],
                )
                .await?;
        }
    }
    client.batch_execute("COMMIT").await?;
    Ok(())
}

#[async_trait]
impl Journal for PostgresJournal {
    async fn append(&self, event: NewEvent) -> Result<Appended, JournalError> {
        self.queue.append(event).await
    }

    async fn claim(
        &self,
        dest: &str,
        class: LaneClass,
        limit: usize,
        now_ms: i64,
    ) -> Result<Claimed, JournalError> {
        self.queue.claim(dest, class, limit, now_ms).await
    }

    fn handoff(&self) -> Option<Arc<Handoff>> {
        Some(Arc::clone(&self.handoff))
    }

    async fn record(&self, attempt: AttemptRecord) -> Result<(), JournalError> {
        self.queue.record(attempt).await
    }

    async fn replay(&self, filter: ReplayFilter) -> Result<Vec<Replayed>, JournalError> {
        self.queue.replay(filter).await
    }

    async fn ping(&self) -> Result<(), JournalError> {
        self.queue.ping().await
    }

    async fn lanes(&self, query: LaneQuery) -> Result<Vec<LaneInfo>, JournalError> {
        read::lanes(&**self.client().await?, &query).await
    }

    async fn destinations(&self) -> Result<Vec<DestinationStats>, JournalError> {
        read::destinations(&**self.client().await?).await
    }

    async fn dead_letters(&self, query: DeadLetterQuery) -> Result<Vec<DeadLetter>, JournalError> {
        read::dead_letters(&**self.client().await?, &query).await
    }

    async fn event(&self, id: &str) -> Result<Option<EventDetail>, JournalError> {
        read::event(&**self.client().await?, id).await
    }

    async fn stats(&self) -> Result<JournalStats, JournalError> {
        read::stats(&**self.client().await?).await
    }

    async fn queue_figures(&self) -> Result<QueueFigures, JournalError> {
        read::queue_figures(&**self.client().await?).await
    }

    async fn assign_device(&self, a: NewAssignment) -> Result<Assignment, JournalError> {
        self.queue.assign(a).await
    }

    async fn end_assignment(
        &self,
        id: i64,
        vendor: &str,
        device_id: &str,
        at_ms: i64,
    ) -> Result<Assignment, JournalError> {
        self.queue
            .end_assignment(id, vendor, device_id, at_ms)
            .await
    }

    async fn assignments(&self, q: AssignmentQuery) -> Result<Vec<Assignment>, JournalError> {
        registry::assignments(&**self.client().await?, &q).await
    }

    async fn resolve_device(
        &self,
        vendor: &str,
        device_id: &str,
        at_ms: i64,
    ) -> Result<Option<Assignment>, JournalError> {
        registry::resolve(&**self.client().await?, vendor, device_id, at_ms).await
    }

    async fn device_beat(&self, beat: DeviceBeat) -> Result<(), JournalError> {
        self.queue.beat(beat).await
    }

    async fn audit_note(&self, note: AuditNote) -> Result<(), JournalError> {
        self.queue.note(note).await
    }

    async fn audit_search(
        &self,
        q: crate::journal::AuditQuery,
    ) -> Result<Vec<crate::journal::AuditRecord>, JournalError> {
        audit_search::search(&**self.client().await?, &q).await
    }

    async fn retention_sweep(
        &self,
        cutoff_ms: i64,
    ) -> Result<crate::journal::RetentionReport, JournalError> {
        retention::sweep(&mut self.client().await?, cutoff_ms).await
    }

    async fn liveness(&self, q: LivenessQuery) -> Result<Vec<Liveness>, JournalError> {
        registry::liveness(&**self.client().await?, &q).await
    }

    async fn append_quarantined(
        &self,
        event: NewEvent,
        info: QuarantineInfo,
    ) -> Result<Appended, JournalError> {
        self.queue.quarantine(event, info).await
    }

    async fn quarantined(&self, q: QuarantineQuery) -> Result<Vec<QuarantinedEvent>, JournalError> {
        registry::quarantined(&**self.client().await?, &q).await
    }

    async fn quarantined_event(&self, id: &str) -> Result<Option<QuarantinedEvent>, JournalError> {
        registry::quarantined_event(&**self.client().await?, id).await
    }

    async fn release(&self, r: Release) -> Result<(), JournalError> {
        self.queue.release(r).await
    }

    async fn alarm_op(&self, op: AlarmOp) -> Result<AlarmOut, JournalError> {
        self.queue.alarm(op).await
    }

    async fn escalations(&self, q: EscalationQuery) -> Result<Vec<Escalation>, JournalError> {
        alarm::escalations(&**self.client().await?, &q).await
    }

    async fn open_escalations(&self) -> Result<i64, JournalError> {
        alarm::open_escalations(&**self.client().await?).await
    }

    async fn deactivations(&self, q: DeactivationQuery) -> Result<Vec<Deactivation>, JournalError> {
        alarm::deactivations(&**self.client().await?, &q).await
    }

    async fn subs(
        &self,
        op: crate::journal::subs::SubsOp,
    ) -> Result<crate::journal::subs::SubsOut, JournalError> {
        use crate::journal::subs::{SubsOp, SubsOut};
        // The notifier claims several times a second, mostly finding nothing; a claim is a
        // writer command that cannot go in a batch sent in one round trip, so it cost its batch
        // the careful way and emptied the writer's pipeline. Look first, on a pooled connection.
        if let SubsOp::Claim { now_ms, .. } = &op
            && !subs::any_due(&**self.client().await?, *now_ms).await?
        {
            return Ok(SubsOut::Subs(Vec::new()));
        }
        self.queue.subs(op).await
    }

    async fn subs_read(
        &self,
        q: crate::journal::subs::SubsRead,
    ) -> Result<crate::journal::subs::SubsOut, JournalError> {
        subs::read(&**self.client().await?, q).await
    }

    async fn silent_devices(
        &self,
        vendor: &str,
        seen_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<Liveness>, JournalError> {
        alarm::silent_devices(&**self.client().await?, vendor, seen_before_ms, limit).await
    }
}
