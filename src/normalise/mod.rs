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
    match (&spec.format, &spec.mapping) {
        (Format::Fhir, _) => fhir_passthrough::normalise(spec, raw).map(Outcome::Event),
        (Format::Json | Format::Xml, Some(m)) => engine::run(spec, m, raw, resolver),
        (Format::Json | Format::Xml, None) => Err(MapError::unmappable(
            "vendor",
            format!("vendor {:?} has no mapping rules", spec.name),
        )),
    }
}
