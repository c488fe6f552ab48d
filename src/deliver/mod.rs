//! Deliver: one dispatcher per destination claims lane heads from the journal, POSTs them, and
//! records each outcome back in the journal. Nothing about delivery state lives only in memory.
//!
//! Isolation: every destination has its own dispatcher, HTTP client and slots, so a dead or
//! hanging destination never holds up another. Within a destination, each lane holds at most one
//! attempt at a time (the journal hands out only unleased heads), so a failing key blocks only
//! itself. Alarm lanes are claimed first and have their own slots.
//!
//! A lane head that is ready when the journal writer commits it (a new lane, or the next event
//! of a lane whose head just finished) is leased by the writer itself and handed straight to
//! the dispatcher with one of its free slots (`journal::handoff`), saving a claim round trip;
//! a next head handed over without a slot (PostgreSQL) starts in the next slot freed.
//! Everything else (retries coming due, work found after a restart, no free slot) is claimed.

pub mod adapter;
pub mod backoff;
pub mod classify;
pub mod client;
pub mod oauth;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tracing::Instrument;

use crate::clock::now_ms;
use crate::config::ValidDestination;
use crate::journal::handoff::{Handed, Handoff, Registration};
use crate::journal::{AttemptRecord, DeliveryTask, Journal, JournalError, LaneClass, Verdict};
use crate::telemetry::Telemetry;
use crate::telemetry::events::{AttemptOutcome, DeadReason, DeliveryAttempted};
use classify::Class;

/// Longest a dispatcher sleeps without looking at the journal, so a missed wake-up costs at most
/// this much latency.
const POLL: Duration = Duration::from_millis(500);

/// Handles to wake dispatchers when new work is journaled: one per destination and lane class,
/// so that new measurements never start an alarm-lane claim and an alarm never waits for a
/// claim of the normal class to come back.
#[derive(Clone, Default)]
pub struct Wakers {
    by_dest: Arc<HashMap<String, ClassWake>>,
}

/// The two wake-ups of one destination's dispatcher, one per claim loop.
#[derive(Clone, Default)]
struct ClassWake {
    alarm: Arc<Notify>,
    normal: Arc<Notify>,
}

impl ClassWake {
    fn both(&self) {
        self.alarm.notify_one();
        self.normal.notify_one();
    }
    fn of(&self, class: LaneClass) -> &Arc<Notify> {
        match class {
            LaneClass::Alarm => &self.alarm,
            LaneClass::Normal => &self.normal,
        }
    }
}

impl Wakers {
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        Self {
            by_dest: Arc::new(
                names
                    .into_iter()
                    .map(|n| (n, ClassWake::default()))
                    .collect(),
            ),
        }
    }
    /// Wakes both claim loops of `dest` (work of either class, or not known which).
    pub fn wake(&self, dest: &str) {
        if let Some(w) = self.by_dest.get(dest) {
            w.both();
        }
    }
    /// Wakes the claim loop of `dest` for lanes of `class`.
    pub fn wake_class(&self, dest: &str, class: LaneClass) {
        if let Some(w) = self.by_dest.get(dest) {
            w.of(class).notify_one();
        }
    }
    pub fn wake_all(&self) {
        self.by_dest.values().for_each(ClassWake::both);
    }
    fn get(&self, dest: &str) -> ClassWake {
        self.by_dest.get(dest).cloned().unwrap_or_default()
    }
}

pub struct Dispatcher {
    dest: ValidDestination,
    journal: Arc<dyn Journal>,
    client: reqwest::Client,
    wake: ClassWake,
    telemetry: Arc<Telemetry>,
    /// Access tokens for destinations with `[destination.oauth]`.
    oauth: Option<oauth::TokenSource>,
    slots: Slots,
}

/// A destination's delivery slots (its `alarm_concurrency` and `concurrency`): one per attempt
/// in flight, held until the attempt's outcome is recorded.
struct Slots {
    alarm: Arc<Semaphore>,
    normal: Arc<Semaphore>,
}

impl Slots {
    fn of(&self, class: LaneClass) -> &Arc<Semaphore> {
        match class {
            LaneClass::Alarm => &self.alarm,
            LaneClass::Normal => &self.normal,
        }
    }
}

/// Building a dispatcher failed (start-up).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("client_cert_file/client_key_file: {0}")]
    Identity(String),
    #[error(transparent)]
    OAuth(#[from] oauth::OAuthError),
}

impl Dispatcher {
    pub fn new(
        dest: ValidDestination,
        journal: Arc<dyn Journal>,
        wakers: &Wakers,
    ) -> Result<Self, BuildError> {
        let identity = match (&dest.client_cert_file, &dest.client_key_file) {
            (Some(cert), Some(key)) => Some(load_identity(cert, key)?),
            _ => None,
        };
        let client = client::build_with_identity(dest.timeout, identity)?;
        let oauth = match &dest.oauth {
            Some(o) => Some(oauth::TokenSource::load(o.clone(), dest.timeout)?),
            None => None,
        };
        let wake = wakers.get(&dest.name);
        let slots = Slots {
            alarm: Arc::new(Semaphore::new(dest.alarm_concurrency)),
            normal: Arc::new(Semaphore::new(dest.concurrency)),
        };
        Ok(Self {
            slots,
            dest,
            journal,
            client,
            wake,
            telemetry: Arc::new(Telemetry::disabled()),
            oauth,
        })
    }

    /// Records attempt metrics through `telemetry` (default: nowhere).
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// Runs until `shutdown` turns true, then waits up to `grace` for attempts in flight.
    pub async fn run(self, shutdown: watch::Receiver<bool>, grace: Duration) {
        let this = Arc::new(self);
        let alarm_slots = Arc::clone(&this.slots.alarm);
        let normal_slots = Arc::clone(&this.slots.normal);
        // One claim loop per class: an alarm claim is never queued behind a claim of the normal
        // class, whose journal round trip waits behind every measurement queued before it.
        let mut loops: Vec<_> = [LaneClass::Alarm, LaneClass::Normal]
            .into_iter()
            .map(|class| tokio::spawn(Arc::clone(&this).claim_loop(class, shutdown.clone())))
            .collect();
        // Lane heads the journal writer leased for us as it committed them (no claim needed).
        if let Some(handoff) = this.journal.handoff() {
            let registration = handoff.register(
                &this.dest.name,
                Arc::clone(&alarm_slots),
                Arc::clone(&normal_slots),
            );
            loops.push(tokio::spawn(Arc::clone(&this).take_handoffs(
                handoff,
                registration,
                shutdown.clone(),
            )));
        }
        for l in loops {
            if let Err(e) = l.await {
                tracing::error!(dest = %this.dest.name, error = %e, "claim loop ended abnormally");
            }
        }
        // Let attempts in flight finish and record their outcome; past the grace period their
        // leases die with the process and the heads are delivered again after restart.
        let all = this.dest.concurrency + this.dest.alarm_concurrency;
        let drained = async {
            let _a = alarm_slots
                .acquire_many(this.dest.alarm_concurrency as u32)
                .await;
            let _n = normal_slots
                .acquire_many(this.dest.concurrency as u32)
                .await;
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!(dest = %this.dest.name, slots = all, "shutdown grace ran out with attempts in flight");
        }
    }

    /// Claims ready heads of `class` into its free slots and starts their attempts, until
    /// `shutdown` turns true.
    async fn claim_loop(self: Arc<Self>, class: LaneClass, mut shutdown: watch::Receiver<bool>) {
        let wake = Arc::clone(self.wake.of(class));
        while !*shutdown.borrow() {
            let now = now_ms();
            let free = self.slots.of(class).available_permits();
            let wait = match self.journal.claim(&self.dest.name, class, free, now).await {
                Ok(claimed) => {
                    // A slot the writer took for a hand-off meanwhile makes a claimed lease
                    // wait for the next free one (at most `free` tasks wait).
                    for task in claimed.tasks {
                        self.start_when_free(task);
                    }
                    claimed.next_due_ms.map_or(POLL, |due| {
                        POLL.min(Duration::from_millis((due - now_ms()).max(0) as u64))
                    })
                }
                Err(e) => {
                    tracing::warn!(dest = %self.dest.name, ?class, error = %e, "claim failed");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Runs one attempt in its own task; when it is recorded, the slot is freed and the claim
    /// loop of its class looks for more work.
    fn start(self: &Arc<Self>, task: DeliveryTask, permit: OwnedSemaphorePermit) {
        let me = Arc::clone(self);
        let wake = Arc::clone(self.wake.of(task.class));
        tokio::spawn(async move {
            me.attempt(task).await;
            drop(permit);
            wake.notify_one();
        });
    }

    /// Starts every lane head the journal hands over, until `shutdown`; then stops the hand-offs
    /// and starts those already sent, so that none is left leased without an attempt.
    async fn take_handoffs(
        self: Arc<Self>,
        handoff: Arc<Handoff>,
        Registration { id, mut rx }: Registration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        while !*shutdown.borrow() {
            tokio::select! {
                got = rx.recv() => match got {
                    Some(h) => self.take(h),
                    None => break,
                },
                _ = shutdown.changed() => {}
            }
        }
        handoff.unregister(&self.dest.name, id);
        rx.close();
        while let Some(h) = rx.recv().await {
            self.take(h);
        }
    }

    /// Starts a handed-over head in its slot, or once a slot of its class is free.
    fn take(self: &Arc<Self>, h: Handed) {
        match h.permit {
            Some(permit) => self.start(h.task, permit),
            None => self.start_when_free(h.task),
        }
    }

    /// Starts `task` (already leased) in the next free slot of its class.
    fn start_when_free(self: &Arc<Self>, task: DeliveryTask) {
        let slots = Arc::clone(self.slots.of(task.class));
        match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => self.start(task, permit),
            Err(_) => {
                let me = Arc::clone(self);
                tokio::spawn(async move {
                    if let Ok(permit) = slots.acquire_owned().await {
                        me.start(task, permit);
                    }
                });
            }
        }
    }

    async fn attempt(&self, task: DeliveryTask) {
        let attempt = task.attempts + 1;
        // A child of the ingest span stored with the event: one trace from vendor to EPJ. The
        // request carries this span's `traceparent`.
        let span = tracing::info_span!(
            "deliver",
            otel.kind = "client",
            destination = %self.dest.name,
            attempt,
            event_id = %task.event_id,
            http.response.status_code = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        crate::telemetry::traces::set_parent(&span, task.traceparent.as_deref());
        let started = Instant::now();
        let answer = self.send(&task, attempt).instrument(span.clone()).await;
        if let Some(status) = answer.status {
            span.record("http.response.status_code", status);
        }
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let at_ms = now_ms();
        let verdict = match answer.class {
            Class::Delivered => Verdict::Delivered,
            Class::Permanent => Verdict::DeadLetter {
                reason: format!(
                    "permanent failure: {}",
                    answer.error.clone().unwrap_or_default()
                ),
            },
            Class::Retry => match backoff::after_failure(
                &self.dest.retry,
                attempt,
                task.created_at_ms,
                at_ms,
                answer.retry_after,
                rand::random::<f64>(),
            ) {
                // Say why the last attempt failed, not only that retries ran out.
                Verdict::DeadLetter { reason } => Verdict::DeadLetter {
                    reason: format!(
                        "{reason}; last error: {}",
                        answer.error.clone().unwrap_or_default()
                    ),
                },
                other => other,
            },
        };
        DeliveryAttempted {
            destination: &self.dest.name,
            class: task.class,
            outcome: match verdict {
                Verdict::Delivered => AttemptOutcome::Delivered,
                Verdict::Retry { .. } => AttemptOutcome::Retry,
                Verdict::DeadLetter { .. } => AttemptOutcome::DeadLetter,
            },
            dead_reason: match (&verdict, answer.class) {
                (Verdict::DeadLetter { .. }, Class::Permanent) => Some(DeadReason::Permanent),
                (Verdict::DeadLetter { .. }, _) => Some(DeadReason::Exhausted),
                _ => None,
            },
            duration: Duration::from_secs_f64(latency_ms / 1000.0),
            since_created: Some(Duration::from_millis(
                (at_ms - task.created_at_ms).max(0) as u64
            )),
        }
        .emit(&self.telemetry);
        span.record(
            "outcome",
            match verdict {
                Verdict::Delivered => "delivered",
                Verdict::Retry { .. } => "retry",
                Verdict::DeadLetter { .. } => "dead_letter",
            },
        );
        if let Verdict::DeadLetter { reason } = &verdict {
            span.in_scope(|| {
                tracing::warn!(dest = %self.dest.name, event_id = %task.event_id, attempt, %reason, "dead-lettered");
            });
        }
        drop(span);
        let record = AttemptRecord {
            task,
            attempt,
            status: answer.status,
            error: answer.error,
            latency_ms,
            at_ms,
            verdict,
        };
        // The journal may be briefly overloaded or away: keep the outcome until it is written,
        // since the lane stays leased until then. A crash meanwhile only means a redelivery.
        let write = || async { self.journal.record(record.clone()).await };
        let result = write
            .retry(
                ExponentialBuilder::default()
                    .with_max_times(usize::MAX)
                    .with_max_delay(Duration::from_secs(5)),
            )
            .when(|e| matches!(e, JournalError::Overloaded | JournalError::Unavailable(_)))
            .await;
        if let Err(e) = result {
            tracing::error!(dest = %self.dest.name, error = %e, "could not record delivery outcome");
        }
    }
}

impl Dispatcher {
    /// One attempt: with `[destination.oauth]`, get a token first (failing that is a retryable
    /// attempt, recorded and audited like any other); a 401 drops the token and the request is
    /// sent once more with a fresh one, whose answer counts.
    async fn send(&self, task: &DeliveryTask, attempt: u32) -> client::Answer {
        let Some(tokens) = &self.oauth else {
            return adapter::send(&self.client, &self.dest, task, attempt, None).await;
        };
        let mut retried = false;
        loop {
            let token = match tokens.token().await {
                Ok(t) => t,
                Err(e) => {
                    return client::Answer {
                        class: classify::token_unavailable(),
                        status: None,
                        error: Some(e.to_string()),
                        retry_after: None,
                    };
                }
            };
            let answer = adapter::send(&self.client, &self.dest, task, attempt, Some(&token)).await;
            if answer.status == Some(401) && !retried {
                tokens.invalidate(&token).await;
                retried = true;
                continue;
            }
            return answer;
        }
    }
}

/// Client certificate chain and key (PEM) as one reqwest identity.
fn load_identity(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<reqwest::Identity, BuildError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| BuildError::Identity(format!("{}: {e}", p.display())))
    };
    let mut pem = read(cert)?;
    pem.push(b'\n');
    pem.extend(read(key)?);
    reqwest::Identity::from_pem(&pem).map_err(|e| BuildError::Identity(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_identity_from_pem_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["knutepunkt.test".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, key.serialize_pem()).expect("write");
        assert!(load_identity(&c, &k).is_ok());
        std::fs::write(&k, "not a key").expect("write");
        assert!(matches!(
            load_identity(&c, &k),
            Err(BuildError::Identity(_))
        ));
        let missing = dir.path().join("missing.pem");
        let err = load_identity(&missing, &k).expect_err("missing file");
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }
}
