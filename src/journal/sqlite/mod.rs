//! Embedded journal on SQLite (bundled): WAL, `synchronous=FULL`, one writer thread that commits
//! many commands per transaction (group commit), plus a read connection for admin queries.

mod read;
mod writer;

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::{
    Appended, AttemptRecord, Claimed, DeadLetter, DeadLetterQuery, DestinationStats, EventDetail,
    Journal, JournalError, JournalStats, LaneClass, LaneInfo, LaneQuery, NewEvent, ReplayFilter,
    Replayed,
};
use writer::Command;

const SCHEMA_VERSION: i64 = 1;

pub struct SqliteJournal {
    tx: mpsc::Sender<Command>,
    reader: Arc<Mutex<Connection>>,
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
        let reader = open_conn(&path)?;
        let (tx, rx) = mpsc::channel(queue_capacity);
        writer::spawn(conn, rx, max_batch)?;
        Ok(Self {
            tx,
            reader: Arc::new(Mutex::new(reader)),
            _lock: lock,
        })
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, JournalError>>) -> Command,
        shed: bool,
    ) -> Result<T, JournalError> {
        let (reply, rx) = oneshot::channel();
        let cmd = make(reply);
        if shed {
            self.tx.try_send(cmd).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => JournalError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => writer_gone(),
            })?;
        } else {
            self.tx.send(cmd).await.map_err(|_| writer_gone())?;
        }
        rx.await.map_err(|_| writer_gone())?
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

fn writer_gone() -> JournalError {
    JournalError::Unavailable("journal writer stopped".into())
}

fn open_conn(path: &Path) -> Result<Connection, JournalError> {
    let conn = Connection::open(path)?;
    // FULL: the WAL is fsynced at every commit, so a 2xx survives power loss, not only a crash.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA busy_timeout = 5000;
         PRAGMA cache_size = -16384;",
    )?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<(), JournalError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(JournalError::Unavailable(format!(
            "journal schema version {version} is newer than this binary ({SCHEMA_VERSION})"
        )));
    }
    conn.execute_batch(include_str!("../schema.sql"))?;
    conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
    Ok(())
}

#[async_trait]
impl Journal for SqliteJournal {
    async fn append(&self, event: NewEvent) -> Result<Appended, JournalError> {
        self.call(|reply| Command::Append(Box::new(event), reply), true)
            .await
    }

    async fn claim(
        &self,
        dest: &str,
        class: LaneClass,
        limit: usize,
        now_ms: i64,
    ) -> Result<Claimed, JournalError> {
        let dest = dest.to_string();
        self.call(
            |reply| Command::Claim {
                dest,
                class,
                limit,
                now_ms,
                reply,
            },
            false,
        )
        .await
    }

    async fn record(&self, attempt: AttemptRecord) -> Result<(), JournalError> {
        self.call(|reply| Command::Record(Box::new(attempt), reply), false)
            .await
    }

    async fn replay(&self, filter: ReplayFilter) -> Result<Vec<Replayed>, JournalError> {
        self.call(|reply| Command::Replay(filter, reply), false)
            .await
    }

    async fn ping(&self) -> Result<(), JournalError> {
        self.call(Command::Ping, false).await
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
}
