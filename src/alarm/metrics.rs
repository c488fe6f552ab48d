//! The alarm path's instruments (names in `telemetry::names`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Meter};

use crate::telemetry::names::{self, MetricDef};

pub struct AlarmMetrics {
    escalations: Counter<u64>,
    notifications: Counter<u64>,
    reminders: Counter<u64>,
    no_contact: Counter<u64>,
    /// Open escalations and active deactivations, refreshed from the journal by the watcher.
    pub open_escalations: Arc<AtomicI64>,
    pub active_deactivations: Arc<AtomicI64>,
}

impl AlarmMetrics {
    /// Registers the instruments; every counter starts at 0 for its known label values, so an
    /// alert rule sees the series before the first escalation.
    pub fn new(meter: &Meter, destinations: &[String]) -> Self {
        let m = Self {
            escalations: counter(meter, names::ALARM_ESCALATIONS),
            notifications: counter(meter, names::ALARM_ESCALATION_NOTIFICATIONS),
            reminders: counter(meter, names::DEVICE_DEACTIVATION_REMINDERS),
            no_contact: counter(meter, names::DEVICE_NO_CONTACT),
            open_escalations: Arc::new(AtomicI64::new(0)),
            active_deactivations: Arc::new(AtomicI64::new(0)),
        };
        for d in destinations {
            m.escalations
                .add(0, &[KeyValue::new("destination", d.clone())]);
        }
        for o in ["sent", "failed"] {
            m.notifications.add(0, &[KeyValue::new("outcome", o)]);
        }
        for k in ["expiring", "expired"] {
            m.reminders.add(0, &[KeyValue::new("kind", k)]);
        }
        m.no_contact.add(0, &[]);
        gauge(meter, names::ALARM_ESCALATIONS_OPEN, &m.open_escalations);
        gauge(
            meter,
            names::DEVICE_DEACTIVATIONS_ACTIVE,
            &m.active_deactivations,
        );
        m
    }

    pub fn escalated(&self, destination: &str) {
        self.escalations
            .add(1, &[KeyValue::new("destination", destination.to_string())]);
    }

    pub fn notified(&self, ok: bool) {
        let outcome = if ok { "sent" } else { "failed" };
        self.notifications
            .add(1, &[KeyValue::new("outcome", outcome)]);
    }

    /// A no-contact event was raised (no vendor label: the log line names vendor and device).
    pub fn no_contact(&self, _vendor: &str) {
        self.no_contact.add(1, &[]);
    }

    pub fn reminded(&self, kind: &'static str, n: usize) {
        self.reminders.add(n as u64, &[KeyValue::new("kind", kind)]);
    }
}

fn counter(meter: &Meter, def: MetricDef) -> Counter<u64> {
    meter
        .u64_counter(def.otel)
        .with_unit(def.unit)
        .with_description(def.help)
        .build()
}

fn gauge(meter: &Meter, def: MetricDef, v: &Arc<AtomicI64>) {
    let v = Arc::clone(v);
    // The provider keeps the callback; the handle need not be held.
    let _ = meter
        .i64_observable_gauge(def.otel)
        .with_unit(def.unit)
        .with_description(def.help)
        .with_callback(move |o| o.observe(v.load(Ordering::Relaxed), &[]))
        .build();
}
