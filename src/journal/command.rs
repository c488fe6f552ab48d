//! The command queue in front of a backend's single writer: callers enqueue a command with a
//! reply slot; the writer applies a batch in one transaction and answers after the commit.

use tokio::sync::{mpsc, oneshot};

use super::alarm::{AlarmOp, AlarmOut};
use super::{
    Appended, Assignment, AttemptRecord, AuditNote, Claimed, DeviceBeat, JournalError, LaneClass,
    NewAssignment, NewEvent, QuarantineInfo, Release, ReplayFilter, Replayed,
};

pub type Reply<T> = oneshot::Sender<Result<T, JournalError>>;

pub enum Command {
    Append(Box<NewEvent>, Reply<Appended>),
    Claim {
        dest: String,
        class: LaneClass,
        limit: usize,
        now_ms: i64,
        reply: Reply<Claimed>,
    },
    Record(Box<AttemptRecord>, Reply<()>),
    Replay(ReplayFilter, Reply<Vec<Replayed>>),
    Ping(Reply<()>),
    /// Device registry, liveness and quarantine writes (see [`RegistryOp`]).
    Registry(RegistryOp, Reply<RegistryOut>),
    /// FHIR subscription and pull-feed writes (`journal::subs`).
    Subs(super::subs::SubsOp, Reply<super::subs::SubsOut>),
}

/// The writes of the device registry and the quarantine, behind one queue variant so that each
/// backend dispatches them in one place (`writer/registry.rs`).
pub enum RegistryOp {
    /// Adds an assignment unless it overlaps another of the same device (`Conflict`).
    Assign(NewAssignment),
    /// Ends an assignment at `at_ms` (sets `valid_to`).
    End {
        id: i64,
        vendor: String,
        device_id: String,
        at_ms: i64,
    },
    /// Upserts a device's liveness row.
    Beat(DeviceBeat),
    /// Stores an event without routing it, held until released.
    Quarantine(Box<NewEvent>, QuarantineInfo),
    /// Replaces a held event's mapping, routes it and closes its quarantine.
    Release(Box<Release>),
    /// Appends one audit record that is not part of a delivery step.
    Note(AuditNote),
    /// Escalations and device deactivations (`journal/alarm.rs`).
    Alarm(AlarmOp),
}

pub enum RegistryOut {
    Assignment(Assignment),
    Appended(Appended),
    Unit,
    Alarm(AlarmOut),
}

/// A command's result, held until its batch commits.
pub enum Done {
    Append(Reply<Appended>, Result<Appended, JournalError>),
    Claim(Reply<Claimed>, Result<Claimed, JournalError>),
    Unit(Reply<()>, Result<(), JournalError>),
    Replay(Reply<Vec<Replayed>>, Result<Vec<Replayed>, JournalError>),
    Registry(Reply<RegistryOut>, Result<RegistryOut, JournalError>),
    Subs(
        Reply<super::subs::SubsOut>,
        Result<super::subs::SubsOut, JournalError>,
    ),
}

impl Done {
    /// Answers the caller. A failed commit turns every answer into `Unavailable`: nothing of the
    /// batch is durable, so nothing may be acknowledged.
    pub fn send(self, commit: &Result<(), String>) {
        fn pick<T>(
            r: Result<T, JournalError>,
            commit: &Result<(), String>,
        ) -> Result<T, JournalError> {
            match commit {
                Ok(()) => r,
                Err(e) => Err(JournalError::Unavailable(format!("commit failed: {e}"))),
            }
        }
        // A caller that gave up (timeout) no longer listens; a committed result stays durable.
        match self {
            Done::Append(tx, r) => drop(tx.send(pick(r, commit))),
            Done::Claim(tx, r) => drop(tx.send(pick(r, commit))),
            Done::Unit(tx, r) => drop(tx.send(pick(r, commit))),
            Done::Replay(tx, r) => drop(tx.send(pick(r, commit))),
            Done::Registry(tx, r) => drop(tx.send(pick(r, commit))),
            Done::Subs(tx, r) => drop(tx.send(pick(r, commit))),
        }
    }
}

/// A command's result before its batch commits (paired with its reply slot by [`finish`]).
pub enum Out {
    Append(Result<Appended, JournalError>),
    Claim(Result<Claimed, JournalError>),
    Unit(Result<(), JournalError>),
    Replay(Result<Vec<Replayed>, JournalError>),
    Registry(Result<RegistryOut, JournalError>),
    Subs(Result<super::subs::SubsOut, JournalError>),
}

impl Out {
    /// `cmd`'s result when it failed with `err`.
    pub fn failed(cmd: &Command, err: JournalError) -> Out {
        match cmd {
            Command::Append(..) => Out::Append(Err(err)),
            Command::Claim { .. } => Out::Claim(Err(err)),
            Command::Record(..) | Command::Ping(_) => Out::Unit(Err(err)),
            Command::Replay(..) => Out::Replay(Err(err)),
            Command::Registry(..) => Out::Registry(Err(err)),
            Command::Subs(..) => Out::Subs(Err(err)),
        }
    }

    /// The command's error, if it failed.
    pub fn error(&self) -> Option<&JournalError> {
        match self {
            Out::Append(r) => r.as_ref().err(),
            Out::Claim(r) => r.as_ref().err(),
            Out::Unit(r) => r.as_ref().err(),
            Out::Replay(r) => r.as_ref().err(),
            Out::Registry(r) => r.as_ref().err(),
            Out::Subs(r) => r.as_ref().err(),
        }
    }
}

/// Pairs a command's reply slot with its result.
pub fn finish(cmd: Command, out: Out) -> Done {
    match (cmd, out) {
        (Command::Append(_, r), Out::Append(o)) => Done::Append(r, o),
        (Command::Claim { reply, .. }, Out::Claim(o)) => Done::Claim(reply, o),
        (Command::Record(_, r) | Command::Ping(r), Out::Unit(o)) => Done::Unit(r, o),
        (Command::Replay(_, r), Out::Replay(o)) => Done::Replay(r, o),
        (Command::Registry(_, r), Out::Registry(o)) => Done::Registry(r, o),
        (Command::Subs(_, r), Out::Subs(o)) => Done::Subs(r, o),
        (cmd, _) => fail(cmd, "internal error: result does not match command"),
    }
}

/// Fails a command without running it (the store could not start a transaction).
pub fn fail(cmd: Command, msg: &str) -> Done {
    let out = Out::failed(&cmd, JournalError::Unavailable(msg.to_string()));
    finish(cmd, out)
}

/// Other commands a batch that carries alarm work takes along: enough to keep group commit
/// going, few enough that the alarm's commit stays short.
const URGENT_COMPANIONS: usize = 32;

/// The writer's side of the queue. Alarm work (alarm appends, alarm-lane claims and outcomes)
/// arrives on its own channel and goes into the next commit ahead of everything queued before
/// it, so an alarm never waits behind a backlog of measurements. Order is unaffected: a lane
/// holds one class only, and each channel is FIFO.
pub struct Inbox {
    urgent: mpsc::Receiver<Command>,
    normal: mpsc::Receiver<Command>,
}

impl Inbox {
    /// Waits for work and returns the group of one commit (at most `max` commands); `None` when
    /// every sender is gone.
    pub async fn next_batch(&mut self, max: usize) -> Option<Vec<Command>> {
        let (first, urgent) = tokio::select! {
            biased;
            Some(c) = self.urgent.recv() => (c, true),
            Some(c) = self.normal.recv() => (c, false),
            else => return None,
        };
        Some(self.fill(first, urgent, max))
    }

    /// Like [`next_batch`](Self::next_batch), but only alarm work starts the batch: what a
    /// writer holding back a small batch still waits for (the batch then takes other work along
    /// as usual). Pending while no alarm work comes, also after every sender is gone.
    pub async fn next_alarm_batch(&mut self, max: usize) -> Vec<Command> {
        match self.urgent.recv().await {
            Some(first) => self.fill(first, true, max),
            None => std::future::pending().await,
        }
    }

    /// Commands waiting: alarm work, other work.
    pub fn waiting(&self) -> (usize, usize) {
        (self.urgent.len(), self.normal.len())
    }

    fn fill(&mut self, first: Command, mut urgent: bool, max: usize) -> Vec<Command> {
        let mut batch = vec![first];
        while batch.len() < max {
            match self.urgent.try_recv() {
                Ok(c) => {
                    batch.push(c);
                    urgent = true;
                }
                Err(_) => break,
            }
        }
        let cap = if urgent {
            max.min(batch.len() + URGENT_COMPANIONS)
        } else {
            max
        };
        while batch.len() < cap {
            match self.normal.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        batch
    }
}

/// The caller side of the queue.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<Command>,
    urgent: mpsc::Sender<Command>,
}

impl Queue {
    pub fn new(capacity: usize) -> (Self, Inbox) {
        let (tx, normal) = mpsc::channel(capacity);
        let (urgent_tx, urgent) = mpsc::channel(capacity);
        (
            Self {
                tx,
                urgent: urgent_tx,
            },
            Inbox { urgent, normal },
        )
    }

    /// Enqueues a command and waits for its committed answer. With `shed`, a full queue fails at
    /// once with `Overloaded` (ingest turns that into 503) instead of waiting.
    pub async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
        shed: bool,
    ) -> Result<T, JournalError> {
        self.call_on(false, make, shed).await
    }

    /// `call` on the alarm channel when `urgent` (see [`Inbox`]).
    async fn call_on<T>(
        &self,
        urgent: bool,
        make: impl FnOnce(Reply<T>) -> Command,
        shed: bool,
    ) -> Result<T, JournalError> {
        let (reply, rx) = oneshot::channel();
        let cmd = make(reply);
        let tx = if urgent { &self.urgent } else { &self.tx };
        if shed {
            tx.try_send(cmd).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => JournalError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => writer_gone(),
            })?;
        } else {
            tx.send(cmd).await.map_err(|_| writer_gone())?;
        }
        rx.await.map_err(|_| writer_gone())?
    }

    pub async fn append(&self, event: NewEvent) -> Result<Appended, JournalError> {
        let urgent = event.envelope.category.lane_class() == LaneClass::Alarm;
        self.call_on(
            urgent,
            |reply| Command::Append(Box::new(event), reply),
            true,
        )
        .await
    }

    pub async fn claim(
        &self,
        dest: &str,
        class: LaneClass,
        limit: usize,
        now_ms: i64,
    ) -> Result<Claimed, JournalError> {
        let dest = dest.to_string();
        self.call_on(
            class == LaneClass::Alarm,
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

    pub async fn record(&self, attempt: AttemptRecord) -> Result<(), JournalError> {
        let urgent = attempt.task.class == LaneClass::Alarm;
        self.call_on(
            urgent,
            |reply| Command::Record(Box::new(attempt), reply),
            false,
        )
        .await
    }

    pub async fn replay(&self, filter: ReplayFilter) -> Result<Vec<Replayed>, JournalError> {
        self.call(|reply| Command::Replay(filter, reply), false)
            .await
    }

    pub async fn ping(&self) -> Result<(), JournalError> {
        self.call(Command::Ping, false).await
    }

    /// Registry writes; `shed` as for [`Queue::call`] (ingest-driven writes shed, admin waits).
    pub async fn registry(&self, op: RegistryOp, shed: bool) -> Result<RegistryOut, JournalError> {
        self.call(|reply| Command::Registry(op, reply), shed).await
    }

    /// Subscription writes wait rather than shed: they come from the API and the notifier, not
    /// from vendors.
    pub async fn subs(
        &self,
        op: super::subs::SubsOp,
    ) -> Result<super::subs::SubsOut, JournalError> {
        self.call(|reply| Command::Subs(op, reply), false).await
    }

    pub async fn assign(&self, a: NewAssignment) -> Result<Assignment, JournalError> {
        match self.registry(RegistryOp::Assign(a), false).await? {
            RegistryOut::Assignment(a) => Ok(a),
            _ => Err(mismatch()),
        }
    }

    pub async fn end_assignment(
        &self,
        id: i64,
        vendor: &str,
        device_id: &str,
        at_ms: i64,
    ) -> Result<Assignment, JournalError> {
        let op = RegistryOp::End {
            id,
            vendor: vendor.to_string(),
            device_id: device_id.to_string(),
            at_ms,
        };
        match self.registry(op, false).await? {
            RegistryOut::Assignment(a) => Ok(a),
            _ => Err(mismatch()),
        }
    }

    pub async fn beat(&self, beat: DeviceBeat) -> Result<(), JournalError> {
        self.registry(RegistryOp::Beat(beat), true)
            .await
            .map(|_| ())
    }

    pub async fn quarantine(
        &self,
        event: NewEvent,
        info: QuarantineInfo,
    ) -> Result<Appended, JournalError> {
        match self
            .registry(RegistryOp::Quarantine(Box::new(event), info), true)
            .await?
        {
            RegistryOut::Appended(a) => Ok(a),
            _ => Err(mismatch()),
        }
    }

    /// Sheds like ingest: a refusal note must not queue behind an overload it is part of.
    pub async fn note(&self, note: AuditNote) -> Result<(), JournalError> {
        self.registry(RegistryOp::Note(note), true)
            .await
            .map(|_| ())
    }

    pub async fn release(&self, r: Release) -> Result<(), JournalError> {
        self.registry(RegistryOp::Release(Box::new(r)), false)
            .await
            .map(|_| ())
    }
}

impl Queue {
    pub async fn alarm(&self, op: AlarmOp) -> Result<AlarmOut, JournalError> {
        match self.registry(RegistryOp::Alarm(op), false).await? {
            RegistryOut::Alarm(a) => Ok(a),
            _ => Err(mismatch()),
        }
    }
}

fn mismatch() -> JournalError {
    JournalError::Unavailable("internal error: registry result does not match command".into())
}

fn writer_gone() -> JournalError {
    JournalError::Unavailable("journal writer stopped".into())
}

/// One audit row; fields a step does not have stay `None`.
#[derive(Default)]
pub struct AuditRow<'a> {
    pub at: i64,
    pub event_id: &'a str,
    pub kind: &'a str,
    pub dest: Option<&'a str>,
    pub attempt: Option<u32>,
    pub status: Option<u16>,
    pub latency_ms: Option<f64>,
    pub detail: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping() -> (Command, oneshot::Receiver<Result<(), JournalError>>) {
        let (reply, rx) = oneshot::channel();
        (Command::Ping(reply), rx)
    }

    /// Alarm work queued behind a backlog goes into the very next batch, first, and that batch
    /// takes only a few of the queued others along.
    #[tokio::test]
    async fn alarm_work_overtakes_the_backlog_in_a_short_batch() {
        let (queue, mut inbox) = Queue::new(1024);
        let mut waiting = Vec::new();
        for _ in 0..600 {
            let (cmd, rx) = ping();
            queue.tx.try_send(cmd).expect("normal");
            waiting.push(rx);
        }
        let (cmd, mut alarm_rx) = ping();
        queue.urgent.try_send(cmd).expect("urgent");

        let batch = inbox.next_batch(512).await.expect("batch");
        assert_eq!(batch.len(), 1 + URGENT_COMPANIONS);
        // The first command is the alarm's: answering it answers the alarm caller.
        let mut batch = batch.into_iter();
        if let Some(Command::Ping(r)) = batch.next() {
            let _ = r.send(Ok(()));
        }
        assert!(matches!(alarm_rx.try_recv(), Ok(Ok(()))));

        // Without alarm work, batches are full size again, in FIFO order.
        let rest = inbox.next_batch(512).await.expect("batch");
        assert_eq!(rest.len(), 512);
        let last = inbox.next_batch(512).await.expect("batch");
        assert_eq!(last.len(), 600 - URGENT_COMPANIONS - 512);
        drop(queue);
        assert!(
            inbox.next_batch(512).await.is_none(),
            "closed when every sender is gone"
        );
    }

    /// A writer holding back a small batch waits for alarm work only: other work stays queued
    /// (and counted) until an alarm arrives, which then leaves at once with companions.
    #[tokio::test]
    async fn a_held_batch_leaves_for_alarm_work_only() {
        let (queue, mut inbox) = Queue::new(64);
        for _ in 0..40 {
            queue.tx.try_send(ping().0).expect("normal");
        }
        assert_eq!(inbox.waiting(), (0, 40));
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            inbox.next_alarm_batch(512),
        )
        .await;
        assert!(waited.is_err(), "other work alone must not start it");
        assert_eq!(inbox.waiting(), (0, 40), "nothing taken while waiting");

        queue.urgent.try_send(ping().0).expect("urgent");
        assert_eq!(inbox.waiting(), (1, 40));
        let batch = inbox.next_alarm_batch(512).await;
        assert_eq!(batch.len(), 1 + URGENT_COMPANIONS);
        assert_eq!(inbox.waiting(), (0, 40 - URGENT_COMPANIONS));
    }
}
