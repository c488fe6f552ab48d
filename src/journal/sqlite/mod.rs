//! Embedded journal on SQLite (bundled): WAL, `synchronous=FULL`, one writer thread that commits
//! many commands per transaction (group commit), plus a read connection for admin queries.

mod alarm;
pub mod audit;
mod audit_search;
mod read;
mod registry;
mod retention;
pub(super) mod subs;
mod writer;

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::Connection;
use rusqlite::config::DbConfig;

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

/// 1: events, deliveries, lanes, audit. 2: device registry, device liveness, quarantine.
/// 3: audit hash chain (`chain_seq`, `hash`). 4: escalations, device deactivations (`alarm.rs`).
/// 5: FHIR subscriptions and pull feed (`subs.rs`). 6: `events.traceparent`. 7: `audit_anchor`.
const SCHEMA_VERSION: i64 = 7;

/// Version 3: the audit hash chain. Rows written before it get a negative position (outside the
/// chain, reported by `audit verify` as not covered).
const SCHEMA_V3: &str = "
    ALTER TABLE audit ADD COLUMN chain_seq INTEGER;
    ALTER TABLE audit ADD COLUMN hash TEXT;
    UPDATE audit SET chain_seq = -id;
    CREATE UNIQUE INDEX audit_chain ON audit(chain_seq);
";

/// Version 6: the W3C trace context of the ingest span, so delivery spans join its trace.
const SCHEMA_V6: &str = "ALTER TABLE events ADD COLUMN traceparent TEXT;";

/// Version 7: the retention anchor (chain position and hash of the last audit row retention
/// deleted), from which `audit verify` walks.
const SCHEMA_V7: &str = "
    CREATE TABLE IF NOT EXISTS audit_anchor (
        id    INTEGER PRIMARY KEY CHECK (id = 1),
        seq   INTEGER NOT NULL,
        hash  TEXT NOT NULL,
        at    INTEGER NOT NULL
    );
";

pub struct SqliteJournal {
    queue: Queue,
    reader: Arc<Mutex<Connection>>,
    /// Dispatchers that take lane heads straight from the writer (see `journal::handoff`).
    handoff: Arc<Handoff>,
    /// Held for the process lifetime: a second gateway on the same data dir is refused.
    _lock: File,
}

impl SqliteJournal {
    /// Opens (creating if needed) the journal in `dir`, runs migrations and starts the writer.
    pub fn open(dir: &Path, max_batch: usize, queue_capacity: usize) -> Result<Self, JournalError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| JournalError::Unavailable(format!("create {}: {e}", dir.display())))?;
        let lock = File::create(dir.join("LOCK"))
            .map_err(|e| JournalError::Unavailable(format!("lock file: {e}")))?;
        lock.try_lock().map_err(|_| {
            JournalError::Unavailable(format!(
                "data dir {} is in use by another knutepunkt process",
                dir.display()
            ))
        })?;
        let path = dir.join("journal.sqlite3");
        let conn = open_conn(&path)?;
        migrate(&conn)?;
        // Leases die with the process that held them; their heads become claimable again.
        conn.execute("UPDATE lanes SET leased = 0 WHERE leased != 0", [])?;
        conn.execute(
            "UPDATE subscriptions SET lease_until = 0 WHERE lease_until != 0",
            [],
        )?;
        let reader = open_conn(&path)?;
        // Admin and metrics queries scan whole tables; a small page cache keeps that from costing
        // memory (each connection's cache is the journal's only memory that grows with its size).
        // Sorts for those scans (GROUP BY) spill to temp files, not memory: in memory they would
        // grow with the journal.
        reader.execute_batch("PRAGMA cache_size = -2048; PRAGMA temp_store = FILE;")?;
        let (queue, rx) = Queue::new(queue_capacity);
        let handoff = Arc::new(Handoff::default());
        writer::spawn(conn, rx, max_batch, Arc::clone(&handoff))?;
        Ok(Self {
            queue,
            reader: Arc::new(Mutex::new(reader)),
            handoff,
            _lock: lock,
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, JournalError> {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            let conn = reader
                .lock()
                .map_err(|_| JournalError::Unavailable("reader poisoned".into()))?;
            f(&conn).map_err(JournalError::from)
        })
        .await
        .map_err(|e| JournalError::Unavailable(e.to_string()))?
    }
}

/// Page size of a new journal. Every commit writes each page it touched whole to the WAL, page
/// by page, and every event touches the tail pages of several tables and indexes: with 8 KiB
/// instead of SQLite's 4 KiB default the writer spent 39-40 µs per event instead of 41-44 and
/// the bench gained 2-6 % (BENCHMARKS.md, 2026-12-05 morning; 1 KiB and 2 KiB were slower,
/// 16 KiB no better). A journal that exists keeps the page size it was created with.
const PAGE_SIZE: u32 = 8192;

fn open_conn(path: &Path) -> Result<Connection, JournalError> {
    let conn = Connection::open(path)?;
    // Only takes effect before the first table is written, so before WAL mode creates the file.
    conn.execute_batch(&format!("PRAGMA page_size = {PAGE_SIZE};"))?;
    // FULL: the WAL is fsynced at every commit, so a 2xx survives power loss, not only a crash.
    // temp_store = MEMORY keeps the per-command savepoint journal off the disk (a quarter of the
    // writer's time went to those temp-file writes).
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA busy_timeout = 5000;
         PRAGMA cache_size = -16384;
         PRAGMA temp_store = MEMORY;",
    )?;
    // Query-planner stability: without it SQLite re-plans a statement whenever a parameter it
    // looked at while planning (a `LIMIT ?`, a comparison against a partial index) is bound
    // again, so the cached statements were parsed anew on most executions (a sixth of the
    // writer's CPU). The plans are checked by `hot_statements_use_indexes`.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<(), JournalError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(JournalError::Unavailable(format!(
            "journal schema version {version} is newer than this binary ({SCHEMA_VERSION})"
        )));
    }
    // Every statement of the schema is `IF NOT EXISTS`: applying it to a version-1 journal adds
    // the version-2 tables and leaves the rest untouched. Later versions that alter existing
    // tables add their steps here, keyed on `version`.
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(include_str!("../schema.sql"))?;
    if version < 3 {
        tx.execute_batch(SCHEMA_V3)?;
    }
    if version < 4 {
        tx.execute_batch(alarm::SCHEMA_V4)?;
    }
    if version < 5 {
        tx.execute_batch(subs::SCHEMA_V5)?;
    }
    if version < 6 {
        tx.execute_batch(SCHEMA_V6)?;
    }
    if version < 7 {
        tx.execute_batch(SCHEMA_V7)?;
    }
    tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
    tx.commit()?;
    if version != SCHEMA_VERSION {
        tracing::info!(
            from = version,
            to = SCHEMA_VERSION,
            "journal schema migrated"
        );
    }
    Ok(())
}

#[async_trait]
impl Journal for SqliteJournal {
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

    async fn record(&self, attempt: AttemptRecord) -> Result<(), JournalError> {
        self.queue.record(attempt).await
    }

    async fn replay(&self, filter: ReplayFilter) -> Result<Vec<Replayed>, JournalError> {
        self.queue.replay(filter).await
    }

    async fn ping(&self) -> Result<(), JournalError> {
        self.queue.ping().await
    }

    fn handoff(&self) -> Option<Arc<Handoff>> {
        Some(Arc::clone(&self.handoff))
    }

    async fn lanes(&self, query: LaneQuery) -> Result<Vec<LaneInfo>, JournalError> {
        self.read(move |c| read::lanes(c, &query)).await
    }

    async fn destinations(&self) -> Result<Vec<DestinationStats>, JournalError> {
        self.read(read::destinations).await
    }

    async fn dead_letters(&self, query: DeadLetterQuery) -> Result<Vec<DeadLetter>, JournalError> {
        self.read(move |c| read::dead_letters(c, &query)).await
    }

    async fn event(&self, id: &str) -> Result<Option<EventDetail>, JournalError> {
        let id = id.to_string();
        self.read(move |c| read::event(c, &id)).await
    }

    async fn stats(&self) -> Result<JournalStats, JournalError> {
        self.read(read::stats).await
    }

    async fn queue_figures(&self) -> Result<QueueFigures, JournalError> {
        self.read(read::queue_figures).await
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
        self.read(move |c| registry::assignments(c, &q)).await
    }

    async fn resolve_device(
        &self,
        vendor: &str,
        device_id: &str,
        at_ms: i64,
    ) -> Result<Option<Assignment>, JournalError> {
        let (vendor, device_id) = (vendor.to_string(), device_id.to_string());
        self.read(move |c| registry::resolve(c, &vendor, &device_id, at_ms))
            .await
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
        self.read(move |c| audit_search::search(c, &q)).await
    }

    async fn retention_sweep(
        &self,
        cutoff_ms: i64,
    ) -> Result<crate::journal::RetentionReport, JournalError> {
        self.read(move |c| retention::sweep(c, cutoff_ms)).await
    }

    async fn liveness(&self, q: LivenessQuery) -> Result<Vec<Liveness>, JournalError> {
        self.read(move |c| registry::liveness(c, &q)).await
    }

    async fn append_quarantined(
        &self,
        event: NewEvent,
        info: QuarantineInfo,
    ) -> Result<Appended, JournalError> {
        self.queue.quarantine(event, info).await
    }

    async fn quarantined(&self, q: QuarantineQuery) -> Result<Vec<QuarantinedEvent>, JournalError> {
        self.read(move |c| registry::quarantined(c, &q)).await
    }

    async fn quarantined_event(&self, id: &str) -> Result<Option<QuarantinedEvent>, JournalError> {
        let id = id.to_string();
        self.read(move |c| registry::quarantined_event(c, &id))
            .await
    }

    async fn release(&self, r: Release) -> Result<(), JournalError> {
        self.queue.release(r).await
    }

    async fn alarm_op(&self, op: AlarmOp) -> Result<AlarmOut, JournalError> {
        self.queue.alarm(op).await
    }

    async fn escalations(&self, q: EscalationQuery) -> Result<Vec<Escalation>, JournalError> {
        self.read(move |c| alarm::escalations(c, &q)).await
    }

    async fn open_escalations(&self) -> Result<i64, JournalError> {
        self.read(alarm::open_escalations).await
    }

    async fn deactivations(&self, q: DeactivationQuery) -> Result<Vec<Deactivation>, JournalError> {
        self.read(move |c| alarm::deactivations(c, &q)).await
    }

    async fn subs(
        &self,
        op: crate::journal::subs::SubsOp,
    ) -> Result<crate::journal::subs::SubsOut, JournalError> {
        self.queue.subs(op).await
    }

    async fn subs_read(
        &self,
        q: crate::journal::subs::SubsRead,
    ) -> Result<crate::journal::subs::SubsOut, JournalError> {
        self.read(move |c| subs::read(c, q)).await
    }

    async fn silent_devices(
        &self,
        vendor: &str,
        seen_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<Liveness>, JournalError> {
        let vendor = vendor.to_string();
        self.read(move |c| alarm::silent_devices(c, &vendor, seen_before_ms, limit))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_size(c: &Connection) -> i64 {
        c.query_row("PRAGMA page_size", [], |r| r.get(0))
            .expect("page_size")
    }

    /// A new journal gets 8 KiB pages; one created with SQLite's default 4 KiB keeps them and
    /// opens as before (the page size of a WAL database cannot change in place).
    #[tokio::test]
    async fn new_journals_get_8k_pages_and_old_ones_keep_theirs() {
        let fresh = tempfile::tempdir().expect("tempdir");
        let j = SqliteJournal::open(fresh.path(), 16, 16).expect("open");
        let size = j.read(|c| Ok(page_size(c))).await.expect("read");
        assert_eq!(size, i64::from(PAGE_SIZE));

        let old = tempfile::tempdir().expect("tempdir");
        {
            let c = Connection::open(old.path().join("journal.sqlite3")).expect("open");
            c.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x);")
                .expect("4 KiB journal");
            assert_eq!(page_size(&c), 4096);
        }
        let j = SqliteJournal::open(old.path(), 16, 16).expect("an old journal opens");
        let (size, version) = j
            .read(|c| {
                Ok((
                    page_size(c),
                    c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))?,
                ))
            })
            .await
            .expect("read");
        assert_eq!((size, version), (4096, SCHEMA_VERSION));
    }

    /// A journal created by a version-1 binary gains the version-2 tables on open; its rows stay.
    #[tokio::test]
    async fn version_1_journal_is_migrated_to_version_2() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let conn = open_conn(&dir.path().join("journal.sqlite3")).expect("open");
            let full = include_str!("../schema.sql");
            let v1 = &full[..full.find("-- Version 2").expect("v2 marker")];
            conn.execute_batch(v1).expect("v1 schema");
            conn.execute_batch(
                "INSERT INTO audit (at, event_id, kind) VALUES (1, 'e', 'received');
                 PRAGMA user_version = 1;",
            )
            .expect("v1 data");
        }
        let j = SqliteJournal::open(dir.path(), 16, 16).expect("open migrates");
        let (version, audit): (i64, i64) = j
            .read(|c| {
                Ok((
                    c.query_row("PRAGMA user_version", [], |r| r.get(0))?,
                    c.query_row("SELECT count(*) FROM audit", [], |r| r.get(0))?,
                ))
            })
            .await
            .expect("read");
        assert_eq!((version, audit), (SCHEMA_VERSION, 1));
        let a = j
            .assign_device(crate::journal::NewAssignment {
                vendor: "v".into(),
                device_id: "d".into(),
                patient_id: "13097248022".into(),
                tenant: "0301".into(),
                valid_from_ms: 0,
                valid_to_ms: None,
                note: None,
            })
            .await
            .expect("registry works after migration");
        let found = j.resolve_device("v", "d", 5).await.expect("resolve");
        assert_eq!(found.map(|f| f.id), Some(a.id));
    }
}
