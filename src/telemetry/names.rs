//! Every metric knutepunkt exports, in one table: the OpenTelemetry instrument name and unit, and
//! the name it has on `GET /metrics` (the Prometheus exporter turns `.` into `_`, appends the unit
//! — `s` becomes `_seconds`, `{annotations}` add nothing — and `_total` to counters).
//!
//! Labels are bounded: vendor and destination names come from config, category, lane class,
//! outcome and status class from closed enums. Never patient, device or event ids.

/// How a metric is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Histogram,
    Gauge,
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    pub otel: &'static str,
    pub unit: &'static str,
    pub prom: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub labels: &'static [&'static str],
}

macro_rules! metric {
    ($id:ident, $otel:literal, $unit:literal, $prom:literal, $kind:ident, [$($l:literal),*], $help:literal) => {
        pub const $id: MetricDef = MetricDef {
            otel: $otel,
            unit: $unit,
            prom: $prom,
            kind: Kind::$kind,
            help: $help,
            labels: &[$($l),*],
        };
    };
}

metric!(
    INGEST_REQUESTS,
    "knutepunkt.ingest.requests",
    "{request}",
    "knutepunkt_ingest_requests_total",
    Counter,
    ["vendor", "outcome", "status_class"],
    "Ingest requests answered, by vendor (\"unknown\" for names not configured), outcome (stored, duplicate, quarantined, heartbeat, rejected) and HTTP status class"
);
metric!(
    EVENTS_STORED,
    "knutepunkt.events.stored",
    "{event}",
    "knutepunkt_events_stored_total",
    Counter,
    ["vendor", "category", "lane_class"],
    "Events durably journaled (duplicates excluded), by vendor, category and lane class"
);
metric!(
    DELIVERY_ATTEMPTS,
    "knutepunkt.delivery.attempts",
    "{attempt}",
    "knutepunkt_delivery_attempts_total",
    Counter,
    ["destination", "lane_class", "outcome"],
    "Delivery attempts finished, by destination, lane class and outcome (delivered, retry, dead_letter)"
);
metric!(
    DEAD_LETTERS,
    "knutepunkt.delivery.dead_letters",
    "{delivery}",
    "knutepunkt_delivery_dead_letters_total",
    Counter,
    ["destination", "lane_class", "reason"],
    "Deliveries given up (dead-lettered), by destination, lane class and reason (permanent, exhausted)"
);
metric!(
    INGEST_DURATION,
    "knutepunkt.ingest.duration",
    "s",
    "knutepunkt_ingest_duration_seconds",
    Histogram,
    ["vendor", "outcome"],
    "Time from request start to answer (journaled durably for stored events)"
);
metric!(
    DELIVERY_DURATION,
    "knutepunkt.delivery.duration",
    "s",
    "knutepunkt_delivery_duration_seconds",
    Histogram,
    ["destination", "outcome"],
    "Duration of one delivery attempt (HTTP round trip)"
);
metric!(
    ALARM_LATENCY,
    "knutepunkt.alarm.delivery.latency",
    "s",
    "knutepunkt_alarm_delivery_latency_seconds",
    Histogram,
    ["destination"],
    "Alarm lane: time from journaling (or replay) to delivered, retries included"
);
metric!(
    DEST_PENDING,
    "knutepunkt.destination.pending",
    "{delivery}",
    "knutepunkt_destination_pending",
    Gauge,
    ["destination"],
    "Pending deliveries (queue depth) per destination, from the journal snapshot"
);
metric!(
    DEST_LANES,
    "knutepunkt.destination.lanes",
    "{lane}",
    "knutepunkt_destination_lanes",
    Gauge,
    ["destination"],
    "Non-empty lanes per destination, from the journal snapshot"
);
metric!(
    DEST_OLDEST_AGE,
    "knutepunkt.destination.oldest_pending_age",
    "s",
    "knutepunkt_destination_oldest_pending_age_seconds",
    Gauge,
    ["destination"],
    "Age of the oldest pending delivery per destination (0 when none), from the journal snapshot"
);
metric!(
    DEST_DEAD,
    "knutepunkt.destination.dead_letters",
    "{delivery}",
    "knutepunkt_destination_dead_letters",
    Gauge,
    ["destination"],
    "Dead letters currently held (not replayed) per destination, from the journal snapshot"
);
metric!(
    QUARANTINED,
    "knutepunkt.journal.quarantined",
    "{event}",
    "knutepunkt_journal_quarantined",
    Gauge,
    [],
    "Events held in quarantine, from the journal snapshot"
);
metric!(
    SNAPSHOT_AGE,
    "knutepunkt.journal.snapshot_age",
    "s",
    "knutepunkt_journal_snapshot_age_seconds",
    Gauge,
    [],
    "Seconds since the journal snapshot behind the gauges was last refreshed (grows when the journal is unreadable)"
);
metric!(
    VENDOR_LAST_ACCEPTED,
    "knutepunkt.vendor.last_accepted",
    "s",
    "knutepunkt_vendor_last_accepted_seconds",
    Gauge,
    ["vendor"],
    "Unix time (seconds) of the vendor's last accepted request (stored, duplicate, quarantined or heartbeat) since this process started"
);
metric!(
    INGEST_REJECTED,
    "knutepunkt.ingest.rejected",
    "{request}",
    "knutepunkt_ingest_rejected_total",
    Counter,
    ["vendor", "reason"],
    "Ingest requests refused (nothing stored), by vendor (\"unknown\" for names not configured) and reason (rate_limited, too_large, malformed, unmappable, unsupported_media_type, invalid_header, forbidden, unknown_vendor, overloaded, unavailable, timeout, other)"
);

metric!(
    ALARM_ESCALATIONS,
    "knutepunkt.alarm.escalations",
    "{escalation}",
    "knutepunkt_alarm_escalations_total",
    Counter,
    ["destination"],
    "Alarm deliveries that missed their destination's deadline_s and escalated, by destination"
);
metric!(
    ALARM_ESCALATIONS_OPEN,
    "knutepunkt.alarm.escalations_open",
    "{escalation}",
    "knutepunkt_alarm_escalations_open",
    Gauge,
    [],
    "Escalations no operator has acknowledged yet, from the journal"
);
metric!(
    ALARM_ESCALATION_NOTIFICATIONS,
    "knutepunkt.alarm.escalation_notifications",
    "{notification}",
    "knutepunkt_alarm_escalation_notifications_total",
    Counter,
    ["outcome"],
    "Escalation notifications to escalation.url, by outcome (sent, failed after all attempts)"
);
metric!(
    DEVICE_DEACTIVATIONS_ACTIVE,
    "knutepunkt.device.deactivations_active",
    "{deactivation}",
    "knutepunkt_device_deactivations_active",
    Gauge,
    [],
    "Device deactivations in force now, from the journal"
);
metric!(
    DEVICE_DEACTIVATION_REMINDERS,
    "knutepunkt.device.deactivation_reminders",
    "{reminder}",
    "knutepunkt_device_deactivation_reminders_total",
    Counter,
    ["kind"],
    "Deactivation reminders raised, by kind (expiring: within deactivation.reminder_lead_s of its end; expired)"
);

metric!(
    DEVICES_SILENT,
    "knutepunkt.devices.silent",
    "{device}",
    "knutepunkt_devices_silent",
    Gauge,
    [],
    "Devices heard from before (heartbeat or event) but silent for more than 15 minutes, from the journal snapshot (refreshed every 30 s)"
);
metric!(
    DEVICE_NO_CONTACT,
    "knutepunkt.device.no_contact_events",
    "{event}",
    "knutepunkt_device_no_contact_events_total",
    Counter,
    [],
    "No-contact alarms raised for devices silent longer than their vendor's no_contact.heartbeat_s"
);
metric!(
    SUBSCRIPTION_NOTIFICATIONS,
    "knutepunkt.subscription.notifications",
    "{notification}",
    "knutepunkt_subscription_notifications_total",
    Counter,
    ["type", "outcome"],
    "FHIR subscription notifications sent, by type (handshake, heartbeat, event-notification) and outcome (accepted: 2xx, failed)"
);

/// Every exported metric (the `/metrics` names are checked against this list in tests).
pub const ALL: &[MetricDef] = &[
    INGEST_REQUESTS,
    SUBSCRIPTION_NOTIFICATIONS,
    EVENTS_STORED,
    DELIVERY_ATTEMPTS,
    DEAD_LETTERS,
    INGEST_DURATION,
    DELIVERY_DURATION,
    ALARM_LATENCY,
    DEST_PENDING,
    DEST_LANES,
    DEST_OLDEST_AGE,
    DEST_DEAD,
    QUARANTINED,
    SNAPSHOT_AGE,
    VENDOR_LAST_ACCEPTED,
    INGEST_REJECTED,
    ALARM_ESCALATIONS,
    ALARM_ESCALATIONS_OPEN,
    ALARM_ESCALATION_NOTIFICATIONS,
    DEVICE_DEACTIVATIONS_ACTIVE,
    DEVICE_DEACTIVATION_REMINDERS,
    DEVICES_SILENT,
    DEVICE_NO_CONTACT,
];

/// Bucket bounds (seconds) for ingest and attempt durations: 1 ms to 30 s.
pub const FAST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Bucket bounds (seconds) for alarm ingest-to-delivery latency, retries included.
pub const ALARM_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_names_follow_the_exporter_rules() {
        for m in ALL {
            let mut want = m.otel.replace('.', "_");
            if m.unit == "s" {
                want.push_str("_seconds");
            }
            if m.kind == Kind::Counter {
                want.push_str("_total");
            }
            assert_eq!(m.prom, want, "{}", m.otel);
        }
    }
}
