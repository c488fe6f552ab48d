//! "No contact" alarms: a device whose vendor has a heartbeat interval (`no_contact.heartbeat_s`)
//! and that has been silent longer than it gets one alarm-category event per silence period,
//! journaled and routed like any alarm (so it is delivered, retried, escalated and audited).
//!
//! Once per silence period, across restarts, without extra state: the event's vendor event id is
//! `no-contact:{device}:{last_seen_at_ms}`, and the journal stores a vendor event id only once
//! (a repeat is a duplicate). A new heartbeat moves `last_seen_at`, which opens a new period. The
//! in-memory set only spares the journal the repeated duplicate appends.
//!
//! A device under an active deactivation is expected to be silent: no event is raised for it
//! while the deactivation lasts (one is raised after it ends if the device is still silent).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use serde_json::json;

use super::AlarmState;
use crate::deliver::Wakers;
use crate::journal::{Appended, Journal, NewEvent};
use crate::normalise::identity;
use crate::normalise::{Category, Envelope, Priority};
use crate::route::Router as EventRouter;

/// Mapping version recorded for the events this module makes (there is no mapping file).
pub const VERSION: &str = "knutepunkt-no-contact/1";
/// Silent devices looked at per vendor and scan.
const SCAN_LIMIT: usize = 1000;
/// Most silence periods remembered in memory.
const RAISED_CACHE: usize = 100_000;

pub struct NoContact {
    journal: Arc<dyn Journal>,
    wakers: Wakers,
    router: EventRouter,
    state: Arc<AlarmState>,
    /// Vendor → heartbeat interval in ms.
    intervals: BTreeMap<String, i64>,
    raised: Mutex<HashSet<(String, String, i64)>>,
}

impl NoContact {
    pub fn new(
        journal: Arc<dyn Journal>,
        wakers: Wakers,
        router: EventRouter,
        state: Arc<AlarmState>,
    ) -> Self {
        let intervals = state
            .config
            .heartbeat
            .iter()
            .map(|(v, d)| (v.clone(), d.as_millis() as i64))
            .collect();
        Self {
            journal,
            wakers,
            router,
            state,
            intervals,
            raised: Mutex::new(HashSet::new()),
        }
    }

    pub fn is_enabled(&self) -> bool {
        !self.intervals.is_empty()
    }

    /// Raises an event for every device silent past its vendor's interval; returns how many.
    pub async fn scan(&self, now: i64) -> usize {
        let mut raised = 0;
        for (vendor, interval) in &self.intervals {
            let devices = match self
                .journal
                .silent_devices(vendor, now - *interval, SCAN_LIMIT)
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "no-contact scan failed");
                    return raised;
                }
            };
            // Most recently silent first: devices gone for long (e.g. taken out of use and never
            // removed) cannot crowd out one that just went quiet.
            for d in devices {
                let key = (vendor.clone(), d.device_id.clone(), d.last_seen_at_ms);
                if self.raised.lock().is_ok_and(|s| s.contains(&key)) {
                    continue;
                }
                if self.state.active.covers(vendor, &d.device_id, now) {
                    continue;
                }
                match self.raise(vendor, &d, *interval, now).await {
                    Ok(stored) => {
                        raised += usize::from(stored);
                        if let Ok(mut s) = self.raised.lock() {
                            // Only a cache: the journal's duplicate check is what counts, so
                            // dropping it when large costs one duplicate append per device.
                            if s.len() >= RAISED_CACHE {
                                s.clear();
                            }
                            s.insert(key);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, vendor = %vendor, "no-contact event not stored")
                    }
                }
            }
        }
        raised
    }

    /// Journals one no-contact event; `true` when stored (not a repeat).
    async fn raise(
        &self,
        vendor: &str,
        d: &crate::journal::Liveness,
        interval_ms: i64,
        now: i64,
    ) -> Result<bool, crate::journal::JournalError> {
        let assignment = self
            .journal
            .resolve_device(vendor, &d.device_id, now)
            .await?;
        let patient = assignment
            .as_ref()
            .and_then(|a| identity::parse_person_id(&a.patient_id, true).ok());
        let tenant = assignment
            .as_ref()
            .map(|a| a.tenant.clone())
            .or_else(|| d.tenant.clone());
        let key = match &patient {
            Some(p) => format!("patient:{}", p.value),
            None => format!("device:{}", d.device_id),
        };
        let id = uuid::Uuid::now_v7().to_string();
        let fhir = bundle(&id, vendor, d, patient.as_ref(), interval_ms, now);
        let envelope = Envelope {
            id: id.clone(),
            vendor: vendor.to_string(),
            vendor_event_id: Some(format!("no-contact:{}:{}", d.device_id, d.last_seen_at_ms)),
            category: Category::Alarm,
            priority: Priority::High,
            tenant,
            key,
            mapping_version: VERSION.into(),
            fhir: fhir.to_string(),
        };
        let decision = self.router.route(&envelope);
        let raw = json!({
            "kind": "no-contact",
            "vendor": vendor,
            "device_id": d.device_id,
            "last_seen_at_ms": d.last_seen_at_ms,
            "heartbeat_interval_ms": interval_ms,
        })
        .to_string()
        .into_bytes();
        let event = NewEvent {
            envelope,
            raw,
            content_type: "application/json".into(),
            idempotency_key: None,
            received_at_ms: now,
            destinations: decision.destinations.clone(),
            routes: decision.routes,
            // Raised by the gateway itself: its delivery spans start a trace of their own.
            traceparent: None,
        };
        let stored = matches!(self.journal.append(event).await?, Appended::Stored { .. });
        if stored {
            tracing::warn!(vendor = %vendor, device = %d.device_id, silent_ms = now - d.last_seen_at_ms,
                event_id = %id, "no contact with device: alarm raised");
            self.state.metrics.no_contact(vendor);
            for dest in &decision.destinations {
                self.wakers.wake(dest);
            }
        }
        Ok(stored)
    }
}

/// A collection Bundle shaped like the mapped alarms: a `VkpDetectedIssue` with alert code
/// `1.20` "Ingen kontakt" and the silent `Device`.
fn bundle(
    id: &str,
    vendor: &str,
    d: &crate::journal::Liveness,
    patient: Option<&identity::PersonId>,
    interval_ms: i64,
    now: i64,
) -> serde_json::Value {
    use crate::journal::registry_text::instant;
    use crate::normalise::full_url;
    let issue_url = full_url(id, 1);
    let dev_url = full_url(id, 2);
    let detail = format!(
        "Ingen kontakt med enhet {} siden {} (forventet hjerteslag hvert {} s)",
        d.device_id,
        instant(d.last_seen_at_ms),
        interval_ms / 1000
    );
    let mut issue = json!({
        "resourceType": "DetectedIssue",
        "meta": { "profile": [format!("{}vkp-DetectedIssue-v090", crate::normalise::codes::PROFILE_BASE)] },
        "identifier": [{ "system": "urn:knutepunkt:no-contact", "value": format!("{vendor}/{}/{}", d.device_id, d.last_seen_at_ms) }],
        "status": "final",
        "code": {
            "coding": [{ "system": crate::normalise::codes::VKP_ALERT, "code": "1.20", "display": "Ingen kontakt" }],
            "text": "Ingen kontakt"
        },
        "severity": "high",
        "identifiedDateTime": instant(now),
        "author": { "reference": dev_url, "display": format!("Enhet {}", d.device_id) },
        "detail": detail,
    });
    if let Some(p) = patient {
        issue["patient"] = json!({ "identifier": { "system": p.kind.system(), "value": p.value } });
    }
    json!({
        "resourceType": "Bundle",
        "id": id,
        "identifier": { "system": "urn:ietf:rfc:3986", "value": format!("urn:uuid:{id}") },
        "type": "collection",
        "timestamp": instant(now),
        "entry": [
            { "fullUrl": issue_url, "resource": issue },
            { "fullUrl": dev_url, "resource": {
                "resourceType": "Device",
                "identifier": [{ "system": format!("urn:knutepunkt:{vendor}:device"), "value": d.device_id }],
                "status": "active"
            }}
        ]
    })
}
