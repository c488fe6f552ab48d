//! Marking events from a deactivated device. A deactivation never changes where or whether an
//! event is delivered (see docs/operations.md, *Device deactivation*); it only marks the event,
//! so the response centre sees that the device was recorded as out of service:
//! - the delivered Bundle gets a `meta.tag` (`urn:knutepunkt:device-state#deactivated`);
//! - the event's audit trail gets `during_deactivation`, naming the deactivation.
//!
//! The active deactivations are held in memory (refreshed every second from the journal by the
//! watcher, and at once by the admin endpoints), so ingest never waits on a query for them.

use std::sync::RwLock;

use serde_json::{Value, json};

use crate::app::AppState;
use crate::clock::now_ms;
use crate::journal::AuditNote;
use crate::journal::alarm::Deactivation;
use crate::journal::registry_text::instant;
use crate::normalise::Envelope;

/// Deactivations in force (or starting later), as last read from the journal.
#[derive(Default)]
pub struct ActiveSet {
    list: RwLock<Vec<Deactivation>>,
}

impl ActiveSet {
    pub fn replace(&self, list: Vec<Deactivation>) {
        if let Ok(mut l) = self.list.write() {
            *l = list;
        }
    }

    pub fn upsert(&self, d: Deactivation) {
        if let Ok(mut l) = self.list.write() {
            l.retain(|x| x.id != d.id);
            l.push(d);
        }
    }

    /// Whether the vendor's device is deactivated at `at_ms`.
    pub fn covers(&self, vendor: &str, device_id: &str, at_ms: i64) -> bool {
        self.for_vendor(vendor, at_ms)
            .iter()
            .any(|d| d.device_id == device_id)
    }

    fn for_vendor(&self, vendor: &str, at_ms: i64) -> Vec<Deactivation> {
        self.list
            .read()
            .map(|l| {
                l.iter()
                    .filter(|d| d.vendor == vendor && d.active_at(at_ms))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The deactivation covering the event's device now, if any. `device` is the device id when
/// ingest knows it (device-only payloads); otherwise the device is matched through the event's
/// key: `device:{id}`, or `patient:{id}` and the registry's current assignment of the device.
pub async fn find(state: &AppState, env: &Envelope, device: Option<&str>) -> Option<Deactivation> {
    let now = now_ms();
    let candidates = state.alarm.active.for_vendor(&env.vendor, now);
    if candidates.is_empty() {
        return None;
    }
    let keyed_device = env.key.strip_prefix("device:");
    for d in candidates {
        if device == Some(d.device_id.as_str()) || keyed_device == Some(d.device_id.as_str()) {
            return Some(d);
        }
        if let Some(patient) = env.key.strip_prefix("patient:")
            && let Ok(Some(a)) = state
                .journal
                .resolve_device(&d.vendor, &d.device_id, now)
                .await
            && a.patient_id == patient
        {
            return Some(d);
        }
    }
    None
}

/// Adds the deactivation tag to the Bundle (left unchanged when it is not a JSON object).
pub fn tag(env: &mut Envelope, d: &Deactivation) {
    let Ok(mut v) = serde_json::from_str::<Value>(&env.fhir) else {
        return;
    };
    let Some(obj) = v.as_object_mut() else {
        return;
    };
    let meta = obj.entry("meta").or_insert_with(|| json!({}));
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    let tags = meta.entry("tag").or_insert_with(|| json!([]));
    if let Some(tags) = tags.as_array_mut() {
        tags.push(json!({
            "system": "urn:knutepunkt:device-state",
            "code": "deactivated",
            "display": format!("device deactivated until {}", instant(d.until_ms)),
        }));
        env.fhir = v.to_string();
    }
}

/// Audits that a stored event came from a deactivated device.
pub async fn note(state: &AppState, event_id: &str, d: &Deactivation) {
    let note = AuditNote {
        kind: "during_deactivation".into(),
        subject: event_id.to_string(),
        dest: None,
        detail: format!(
            "device {}/{} is deactivated until {} (deactivation {}, by {}); delivered as usual",
            d.vendor,
            d.device_id,
            instant(d.until_ms),
            d.id,
            d.created_by
        ),
    };
    if let Err(e) = state.journal.audit_note(note).await {
        tracing::warn!(error = %e, "could not audit an event from a deactivated device");
    }
}
