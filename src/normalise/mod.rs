//! Normalise: a vendor's native body becomes an [`Envelope`] holding a FHIR R4 Bundle.
//!
//! Each vendor is described by one mapping file in the mappings directory ([`vendors`]); the
//! file's `format` chooses the parser (`fhir` pass-through, or `json` / `xml` through the
//! declarative mapping engine, see docs/mappings.md). Errors are [`MapError`]s, turned into a
//! FHIR OperationOutcome by the ingest layer.

pub mod codes;
pub mod datetime;
mod engine;
mod envelope;
mod fhir_passthrough;
pub mod identity;
pub mod json_depth;
pub mod mapping;
mod nul;
pub mod path;
pub mod r4;
mod vendors;
pub mod xml;

pub use engine::{full_url, received_ms};
pub use envelope::{Category, Envelope, LaneClass, Priority};
pub use identity::PersonId;
pub use vendors::{Format, VendorRegistry, VendorSpec, load_vendor_file, load_vendors};

use thiserror::Error;

/// Why a body could not be normalised. `field` names the offending element (FHIRPath-like).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MapError {
    /// The body is not well-formed for its format.
    #[error("malformed body: {0}")]
    Malformed(String),
    /// Well-formed but not mappable; `field` says where.
    #[error("{field}: {message}")]
    Unmappable { field: String, message: String },
}

impl MapError {
    pub fn unmappable(field: impl Into<String>, message: impl Into<String>) -> Self {
        MapError::Unmappable {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// What the ingest layer knows about a request besides its body.
#[derive(Debug, Clone)]
pub struct RawEvent<'a> {
    pub id: String,
    pub body: &'a [u8],
    /// Tenant asked for in the request (header), if any.
    pub tenant: Option<String>,
    pub max_json_depth: usize,
    /// Deepest XML element nesting accepted (`ingest.max_xml_depth`).
    pub max_xml_depth: usize,
}

/// A device said it is alive. Not a clinical event: it updates liveness, it is never journaled
/// or delivered as FHIR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub vendor: String,
    /// `device:<id>`.
    pub device_key: String,
    pub tenant: Option<String>,
    pub vendor_event_id: Option<String>,
    /// When the device reported (ms since epoch).
    pub at_ms: i64,
}

/// The result of normalising one body.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A clinical event to journal and deliver.
    Event(Envelope),
    /// Device liveness only.
    Heartbeat(Heartbeat),
}

/// A payload without a patient identifier asks the device registry: which patient was this
/// vendor's device assigned to at `at_ms` (the event's own time when the mapping has `occurred`,
/// else when the gateway received it)?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceQuery {
    pub vendor: String,
    pub device_system: String,
    pub device_id: String,
    /// Where the device id came from in the payload (for error messages).
    pub device_field: String,
    pub at_ms: i64,
}

/// The registry's answer: the assigned patient (not yet validated) and municipality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub assignment_id: i64,
    pub patient_id: String,
    pub tenant: String,
}

/// Finds the patient a device is assigned to at a time (the device registry). Resolution is
/// synchronous so mapping stays a pure function: the gateway looks the device up in its journal
/// first (see `ingest`) and hands the answer in through [`Answer`]; [`NoRegistry`] resolves
/// nothing, so `output.missing_patient` decides (422, keyed by device, or quarantine).
pub trait PatientResolver: Send + Sync {
    fn resolve(&self, query: &DeviceQuery) -> Option<Registered>;
}

/// Resolves nothing.
pub struct NoRegistry;

impl PatientResolver for NoRegistry {
    fn resolve(&self, _: &DeviceQuery) -> Option<Registered> {
        None
    }
}

/// Resolves nothing but remembers the question: a first mapping pass with it tells whether (and
/// for which device and time) the registry must be asked.
#[derive(Default)]
pub struct Probe(std::sync::Mutex<Option<DeviceQuery>>);

impl Probe {
    pub fn asked(&self) -> Option<DeviceQuery> {
        self.0.lock().ok().and_then(|g| g.clone())
    }
}

impl PatientResolver for Probe {
    fn resolve(&self, query: &DeviceQuery) -> Option<Registered> {
        if let Ok(mut g) = self.0.lock() {
            *g = Some(query.clone());
        }
        None
    }
}

/// A registry answer looked up beforehand: resolves exactly that device at that time.
pub struct Answer {
    pub query: DeviceQuery,
    pub registered: Option<Registered>,
}

impl PatientResolver for Answer {
    fn resolve(&self, query: &DeviceQuery) -> Option<Registered> {
        if *query == self.query {
            self.registered.clone()
        } else {
            None
        }
    }
}

/// Maps a raw body with the vendor's spec. A heartbeat is not an event: it is reported as an
/// `Unmappable` error here; callers that handle heartbeats use [`normalise_outcome`].
pub fn normalise(spec: &VendorSpec, raw: &RawEvent<'_>) -> Result<Envelope, MapError> {
    match normalise_outcome(spec, raw)? {
        Outcome::Event(e) => Ok(e),
        Outcome::Heartbeat(h) => Err(MapError::unmappable(
            "$",
            format!("heartbeat from {} is not a clinical event", h.device_key),
        )),
    }
}

/// Maps a raw body: a clinical event or a heartbeat.
pub fn normalise_outcome(spec: &VendorSpec, raw: &RawEvent<'_>) -> Result<Outcome, MapError> {
    normalise_with(spec, raw, &NoRegistry)
}

/// As [`normalise_outcome`], resolving device-only payloads through `resolver`.
pub fn normalise_with(
    spec: &VendorSpec,
    raw: &RawEvent<'_>,
    resolver: &dyn PatientResolver,
) -> Result<Outcome, MapError> {
    if let Some(at) = nul::find(raw.body, !matches!(spec.format, Format::Xml)) {
        return Err(MapError::Malformed(format!(
            "NUL character (U+0000) at byte {at}: no FHIR string may contain one"
        )));
    }
    match (&spec.format, &spec.mapping) {
        (Format::Fhir, _) => fhir_passthrough::normalise(spec, raw).map(Outcome::Event),
        (Format::Json | Format::Xml, Some(m)) => engine::run(spec, m, raw, resolver),
        (Format::Json | Format::Xml, None) => Err(MapError::unmappable(
            "vendor",
            format!("vendor {:?} has no mapping rules", spec.name),
        )),
    }
}

#[cfg(test)]
mod registry_tests {
    use super::*;

    const P1: &str = "13097248022";

    fn scaip() -> VendorSpec {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings/scaip.toml");
        load_vendor_file(&path).expect("scaip mapping loads")
    }

    fn raw<'a>(body: &'a [u8], tenant: Option<&str>) -> RawEvent<'a> {
        RawEvent {
            id: "019594ab-2900-7000-8000-000000000001".into(),
            body,
            tenant: tenant.map(str::to_string),
            max_json_depth: 64,
            max_xml_depth: crate::normalise::xml::MAX_DEPTH,
        }
    }

    const ALARM: &[u8] =
        b"<mrq><ref>R1</ref><mty>ME</mty><cid> 4711002 </cid><dty>0004</dty><stc>0010</stc></mrq>";

    fn answer_for(spec: &VendorSpec, body: &[u8], patient: &str, tenant: &str) -> Answer {
        let probe = Probe::default();
        let _ = normalise_with(spec, &raw(body, None), &probe);
        Answer {
            query: probe
                .asked()
                .expect("device-only payload asks the registry"),
            registered: Some(Registered {
                assignment_id: 7,
                patient_id: patient.into(),
                tenant: tenant.into(),
            }),
        }
    }

    #[test]
    fn probe_asks_at_the_event_time_else_the_received_time() {
        let spec = scaip();
        let probe = Probe::default();
        let _ = normalise_with(&spec, &raw(ALARM, None), &probe);
        let q = probe.asked().expect("asked");
        assert_eq!(q.vendor, "scaip");
        assert_eq!(q.device_id, "4711002", "trimmed like the mapping does");
        assert_eq!(q.device_field, "cid");
        assert_eq!(q.at_ms, received_ms("019594ab-2900-7000-8000-000000000001"));

        let timed = b"<mrq><ref>R2</ref><cid>4711002</cid><dty>0004</dty><stc>0010</stc>\
            <lge><tim>2025-03-14T13:05:22+01</tim></lge></mrq>";
        let probe = Probe::default();
        let _ = normalise_with(&spec, &raw(timed, None), &probe);
        assert_eq!(probe.asked().expect("asked").at_ms, 1_741_953_922_000);

        // A payload patient never asks the registry.
        let fhir_like = Probe::default();
        let supervision = load_vendor_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings/supervision.toml"),
        )
        .expect("loads");
        let body = format!(
            r#"{{"eventId":"e1","eventType":"ALARM_TRIGGERED","occurredAt":"2025-03-14T13:05:22+01:00",
               "alarm":{{"category":"FALL"}},"device":{{"serial":"FD-1"}},
               "serviceRecipient":{{"nationalId":"{P1}","municipalityNumber":"5001"}}}}"#
        );
        normalise_with(&supervision, &raw(body.as_bytes(), None), &fhir_like).expect("maps");
        assert!(fhir_like.asked().is_none());
    }

    #[test]
    fn answer_sets_patient_and_municipality() {
        let spec = scaip();
        let answer = answer_for(&spec, ALARM, P1, "0301");
        let Outcome::Event(env) = normalise_with(&spec, &raw(ALARM, None), &answer).expect("maps")
        else {
            panic!("event expected");
        };
        assert_eq!(env.key, format!("patient:{P1}"));
        assert_eq!(
            env.tenant.as_deref(),
            Some("0301"),
            "registry beats default_tenant"
        );
        assert!(env.fhir.contains(identity::OID_FNR));
    }

    #[test]
    fn answer_conflicting_with_the_named_municipality_is_422() {
        let spec = scaip();
        let answer = answer_for(&spec, ALARM, P1, "5001");
        let err = normalise_with(&spec, &raw(ALARM, Some("0301")), &answer).expect_err("422");
        let MapError::Unmappable { field, message } = err else {
            panic!("unmappable expected");
        };
        assert_eq!(field, "cid");
        assert!(message.contains("municipality 5001"), "{message}");
    }

    #[test]
    fn invalid_registry_identifier_is_refused_without_echo() {
        let spec = scaip();
        let answer = answer_for(&spec, ALARM, "13097248023", "0301");
        let err = normalise_with(&spec, &raw(ALARM, None), &answer).expect_err("422");
        assert!(!err.to_string().contains("13097248023"), "{err}");
        // A synthetic number is valid only for a test tenant (scaip: 5001).
        let synthetic = "13497248022";
        if identity::parse_person_id(synthetic, true).is_ok() {
            let answer = answer_for(&spec, ALARM, synthetic, "0301");
            assert!(normalise_with(&spec, &raw(ALARM, None), &answer).is_err());
            let answer = answer_for(&spec, ALARM, synthetic, "5001");
            assert!(normalise_with(&spec, &raw(ALARM, None), &answer).is_ok());
        }
    }
}
