//! Queue gauges: a snapshot of the journal's per-destination figures, refreshed by a background
//! task, read by observable-gauge callbacks at scrape time (never blocking on the database).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::metrics::Meter;
use tokio::sync::watch;

use super::kv;
use super::names::{self, MetricDef};
use crate::clock::now_ms;
use crate::journal::{DestinationQueue, Journal};

/// How often the background task re-reads the journal.
pub const REFRESH: Duration = Duration::from_secs(2);

/// A device is silent when nothing was heard from it for this long (`knutepunkt_devices_silent`).
pub const DEVICE_SILENT_AFTER: Duration = Duration::from_secs(15 * 60);
/// Device liveness is re-read every this many refreshes (it scans the liveness table).
const DEVICE_EVERY: u32 = 15;
/// Most liveness rows read per refresh (oldest first, so silent devices are counted first).
const DEVICE_SCAN_LIMIT: usize = 100_000;

#[derive(Default)]
pub struct Snapshot {
    inner: Mutex<Figures>,
    refreshes: std::sync::atomic::AtomicU32,
}

#[derive(Default, Clone)]
struct Figures {
    taken_at_ms: Option<i64>,
    destinations: Vec<DestinationQueue>,
    quarantined: i64,
    devices_silent: i64,
}

impl Snapshot {
    fn get(&self) -> Figures {
        self.inner.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Reads the journal once and replaces the figures. Configured destinations that the journal
    /// has never seen are reported with zeros, so every series exists from the first scrape.
    pub async fn refresh(
        &self,
        journal: &dyn Journal,
        configured: &[String],
    ) -> Result<(), crate::journal::JournalError> {
        let figures = journal.queue_figures().await?;
        let mut dests = figures.destinations;
        for name in configured {
            if !dests.iter().any(|d| &d.destination == name) {
                dests.push(DestinationQueue {
                    destination: name.clone(),
                    ..Default::default()
                });
            }
        }
        let n = self
            .refreshes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let devices_silent = if n.is_multiple_of(DEVICE_EVERY) {
            let q = crate::journal::LivenessQuery {
                limit: DEVICE_SCAN_LIMIT,
                ..Default::default()
            };
            let silent_ms = DEVICE_SILENT_AFTER.as_millis() as i64;
            journal
                .liveness(q)
                .await?
                .iter()
                .filter(|l| l.last_seen_age_ms > silent_ms)
                .count() as i64
        } else {
            self.get().devices_silent
        };
        if let Ok(mut g) = self.inner.lock() {
            *g = Figures {
                taken_at_ms: Some(now_ms()),
                destinations: dests,
                quarantined: figures.quarantined,
                devices_silent,
            };
        }
        Ok(())
    }

    /// Refreshes every [`REFRESH`] (or ten times as long as a refresh took, if longer) until
    /// `stop` turns true.
    pub async fn run(
        self: Arc<Self>,
        journal: Arc<dyn Journal>,
        configured: Vec<String>,
        mut stop: watch::Receiver<bool>,
    ) {
        while !*stop.borrow() {
            let started = std::time::Instant::now();
            if let Err(e) = self.refresh(journal.as_ref(), &configured).await {
                tracing::warn!(error = %e, "metrics snapshot: cannot read the journal");
            }
            // The figures come from aggregate queries over the queue; with a large backlog they
            // take a while, so the task never spends more than a tenth of its time on them.
            let wait = REFRESH.max(started.elapsed() * 10);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

pub(super) fn register_gauges(
    meter: &Meter,
    snap: &Arc<Snapshot>,
    vendor_seen: &Arc<Mutex<HashMap<String, f64>>>,
) {
    per_destination(meter, snap, names::DEST_PENDING, |d| d.pending as f64);
    per_destination(meter, snap, names::DEST_LANES, |d| d.lanes as f64);
    per_destination(meter, snap, names::DEST_OLDEST_AGE, |d| {
        d.oldest_pending_age_ms.unwrap_or(0).max(0) as f64 / 1000.0
    });
    per_destination(meter, snap, names::DEST_DEAD, |d| d.dead as f64);
    let s = Arc::clone(snap);
    gauge(meter, names::QUARANTINED, move |obs| {
        obs(s.get().quarantined as f64, &[]);
    });
    let s = Arc::clone(snap);
    gauge(meter, names::DEVICES_SILENT, move |obs| {
        obs(s.get().devices_silent as f64, &[]);
    });
    let s = Arc::clone(snap);
    gauge(meter, names::SNAPSHOT_AGE, move |obs| {
        if let Some(t) = s.get().taken_at_ms {
            obs((now_ms() - t).max(0) as f64 / 1000.0, &[]);
        }
    });
    let seen = Arc::clone(vendor_seen);
    gauge(meter, names::VENDOR_LAST_ACCEPTED, move |obs| {
        if let Ok(m) = seen.lock() {
            for (v, t) in m.iter() {
                obs(*t, &[kv("vendor", v.clone())]);
            }
        }
    });
}

fn per_destination(
    meter: &Meter,
    snap: &Arc<Snapshot>,
    def: MetricDef,
    value: fn(&DestinationQueue) -> f64,
) {
    let s = Arc::clone(snap);
    gauge(meter, def, move |obs| {
        for d in s.get().destinations {
            obs(value(&d), &[kv("destination", d.destination.clone())]);
        }
    });
}

type Observe<'a> = &'a dyn Fn(f64, &[opentelemetry::KeyValue]);

fn gauge(meter: &Meter, def: MetricDef, f: impl Fn(Observe<'_>) + Send + Sync + 'static) {
    // The handle only needs to live as long as the provider, which keeps the callback.
    let _ = meter
        .f64_observable_gauge(def.otel)
        .with_unit(def.unit)
        .with_description(def.help)
        .with_callback(move |o| f(&|v, attrs| o.observe(v, attrs)))
        .build();
}
