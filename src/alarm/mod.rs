//! The response-centre alarm path on top of delivery: deadline escalation of alarm deliveries
//! and time-limited device deactivations.
//!
//! Everything is driven from journal state, never from timers held in memory: the watcher
//! scans the journal every `escalation.scan_interval_ms` for alarm deliveries that are not
//! delivered (no 2xx) `deadline_s` after they were stored and not yet escalated. For each it
//! commits, in one transaction, the escalation row, a delivery row to the fallback destination
//! (retried and audited like any delivery) and an `escalated` audit record. Then, outside the
//! transaction, it counts the escalation, wakes the fallback's dispatcher and notifies
//! `escalation.url` (bounded retries). The original delivery keeps trying. A restart loses
//! nothing: an overdue delivery that was not escalated before the crash is found by the next
//! scan; only the best-effort notification of an escalation committed just before a crash can be
//! lost (the escalation itself stays open in the journal, the console and the gauge).
//!
//! A delivery that is dead-lettered (e.g. the destination refused it with a 4xx) escalates at
//! the next scan, without waiting for the deadline: it will not be delivered.
//!
//! Deliveries that are delivered late (after the deadline, before a scan saw them) are not
//! escalated: the alarm reached its destination and a second copy would only add noise.

pub mod admin;
pub mod deactivation;
pub mod metrics;
pub mod no_contact;

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use serde_json::json;
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::config::ValidConfig;
use crate::config::alarm::ValidAlarm;
use crate::deliver::Wakers;
use crate::journal::alarm::{AlarmOp, AlarmOut, DeactivationQuery, Escalation, EscalationRule};
use crate::journal::{AuditNote, Journal};
use metrics::AlarmMetrics;

/// Most escalations committed in one transaction (a backlog is taken in several).
const BATCH: usize = 100;
/// How often reminders are looked for and the gauges refreshed.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Shared by the watcher and the admin endpoints.
pub struct AlarmState {
    pub config: ValidAlarm,
    pub metrics: AlarmMetrics,
    /// Deactivations in force, for marking events at ingest.
    pub active: deactivation::ActiveSet,
}

pub struct Watcher {
    journal: Arc<dyn Journal>,
    wakers: Wakers,
    state: Arc<AlarmState>,
    rules: Vec<EscalationRule>,
    http: reqwest::Client,
    no_contact: no_contact::NoContact,
}

/// The escalation rules of the destinations that have a deadline.
pub fn rules(config: &ValidConfig) -> Vec<EscalationRule> {
    config
        .destinations
        .iter()
        .filter_map(|d| {
            d.deadline.map(|dl| EscalationRule {
                dest: d.name.clone(),
                deadline_ms: dl.as_millis() as i64,
                fallback: d.fallback.clone(),
            })
        })
        .collect()
}

impl Watcher {
    pub fn new(
        config: &ValidConfig,
        journal: Arc<dyn Journal>,
        wakers: Wakers,
        state: Arc<AlarmState>,
    ) -> Result<Self, reqwest::Error> {
        // Outbound authentication (HelseID) is not applied to the escalation hook: it is an
        // operator alerting endpoint. Add it here when one needs it.
        let http = crate::deliver::client::build(state.config.escalation_timeout)?;
        let no_contact = no_contact::NoContact::new(
            Arc::clone(&journal),
            wakers.clone(),
            crate::route::Router::new(config.routes.clone()),
            Arc::clone(&state),
        );
        for v in state.config.heartbeat.keys() {
            tracing::info!(vendor = %v, "no-contact watch on");
        }
        Ok(Self {
            no_contact,
            journal,
            wakers,
            rules: rules(config),
            state,
            http,
        })
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let mut tick = tokio::time::interval(this.state.config.scan_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep: Option<Instant> = None;
        while !*shutdown.borrow() {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => continue,
            }
            let escalated = if this.rules.is_empty() {
                0
            } else {
                this.scan().await
            };
            if escalated > 0 || last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
                last_sweep = Some(Instant::now());
                this.sweep().await;
                this.refresh().await;
                if this.no_contact.is_enabled() {
                    this.no_contact.scan(now_ms()).await;
                }
            }
        }
    }

    /// Escalates every overdue alarm delivery; returns how many.
    async fn scan(self: &Arc<Self>) -> usize {
        let mut total = 0;
        loop {
            let op = AlarmOp::Escalate {
                rules: self.rules.clone(),
                now_ms: now_ms(),
                limit: BATCH,
            };
            let list = match self.journal.alarm_op(op).await {
                Ok(AlarmOut::Escalated(list)) => list,
                Ok(_) => return total,
                Err(e) => {
                    tracing::warn!(error = %e, "escalation scan failed");
                    return total;
                }
            };
            total += list.len();
            let full = list.len() >= BATCH;
            for e in list {
                tracing::warn!(
                    event_id = %e.event_id,
                    destination = %e.destination,
                    fallback = e.fallback.as_deref().unwrap_or(""),
                    deadline_ms = e.deadline_ms,
                    delivery_state = %e.delivery_state,
                    "alarm escalated: not delivered by the destination's deadline, or refused"
                );
                self.state.metrics.escalated(&e.destination);
                if let Some(f) = &e.fallback {
                    self.wakers.wake(f);
                }
                if self.state.config.escalation_url.is_some() {
                    let me = Arc::clone(self);
                    tokio::spawn(async move { me.notify(e).await });
                }
            }
            if !full {
                return total;
            }
        }
    }

    /// POSTs a FHIR `Communication` about the escalation to `escalation.url` (bounded retries)
    /// and audits the result.
    async fn notify(&self, e: Escalation) {
        let Some(url) = self.state.config.escalation_url.clone() else {
            return;
        };
        let body = notification(&e).to_string();
        let post = || async {
            let resp = self
                .http
                .post(&url)
                .header("content-type", "application/fhir+json")
                .header("idempotency-key", format!("escalation-{}", e.id))
                .body(body.clone())
                .send()
                .await
                .map_err(|err| format!("transport: {err}"))?;
            let code = resp.status();
            if code.is_success() {
                Ok(code.as_u16())
            } else {
                Err(format!("HTTP {}", code.as_u16()))
            }
        };
        let result = post
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_max_times(self.state.config.escalation_max_attempts as usize - 1),
            )
            .await;
        self.state.metrics.notified(result.is_ok());
        let (kind, detail) = match &result {
            Ok(code) => (
                "escalation_notified",
                format!("escalation {} notified (HTTP {code})", e.id),
            ),
            Err(err) => {
                tracing::warn!(escalation = e.id, error = %err, "escalation notification failed");
                (
                    "escalation_notify_failed",
                    format!(
                        "escalation {} not notified after {} attempts: {err}",
                        e.id, self.state.config.escalation_max_attempts
                    ),
                )
            }
        };
        let note = AuditNote {
            kind: kind.into(),
            subject: e.event_id.clone(),
            dest: Some(e.destination.clone()),
            detail,
        };
        if let Err(err) = self.journal.audit_note(note).await {
            tracing::warn!(error = %err, "could not audit an escalation notification");
        }
    }

    /// Raises reminders for deactivations about to end, and notes the ones that ended.
    async fn sweep(&self) {
        let op = AlarmOp::DeactivationSweep {
            now_ms: now_ms(),
            lead_ms: self.state.config.reminder_lead.as_millis() as i64,
        };
        match self.journal.alarm_op(op).await {
            Ok(AlarmOut::Swept { reminded, expired }) => {
                for d in &reminded {
                    tracing::warn!(vendor = %d.vendor, device = %d.device_id, until_ms = d.until_ms,
                        "device deactivation ends soon");
                }
                for d in &expired {
                    tracing::warn!(vendor = %d.vendor, device = %d.device_id,
                        "device deactivation expired; the device is active again");
                }
                self.state.metrics.reminded("expiring", reminded.len());
                self.state.metrics.reminded("expired", expired.len());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "deactivation sweep failed"),
        }
    }

    async fn refresh(&self) {
        if let Ok(n) = self.journal.open_escalations().await {
            self.state
                .metrics
                .open_escalations
                .store(n, std::sync::atomic::Ordering::Relaxed);
        }
        let q = DeactivationQuery {
            active_at_ms: Some(now_ms()),
            limit: 100_000,
            ..Default::default()
        };
        if let Ok(list) = self.journal.deactivations(q).await {
            self.state
                .metrics
                .active_deactivations
                .store(list.len() as i64, std::sync::atomic::Ordering::Relaxed);
            self.state.active.replace(list);
        }
    }
}

/// The escalation notification: a FHIR R4 `Communication` (alert, priority stat) about the
/// event, carrying ids and destination names only, never patient data.
pub fn notification(e: &Escalation) -> serde_json::Value {
    let text = match &e.fallback {
        Some(f) => format!(
            "Alarm {} was not delivered to {} within {} s; escalated to {f}.",
            e.event_id,
            e.destination,
            e.deadline_ms / 1000
        ),
        None => format!(
            "Alarm {} was not delivered to {} within {} s.",
            e.event_id,
            e.destination,
            e.deadline_ms / 1000
        ),
    };
    json!({
        "resourceType": "Communication",
        "identifier": [{ "system": "urn:knutepunkt:escalation", "value": e.id.to_string() }],
        "status": "completed",
        "category": [{ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/communication-category",
            "code": "alert"
        }]}],
        "priority": "stat",
        "sent": crate::journal::registry_text::instant(e.escalated_at_ms),
        "about": [{ "identifier": { "system": "urn:knutepunkt:event", "value": e.event_id } }],
        "payload": [{ "contentString": text }]
    })
}
