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

/// Finds the patient a device is assigned to at a time (the device registry). The gateway has
/// no registry yet; [`NoRegistry`] resolves nothing, so mappings decide via
/// `output.missing_patient` whether such events are rejected (422) or keyed by device.
pub trait PatientResolver: Send + Sync {
    fn resolve(
        &self,
        tenant: Option<&str>,
        device_system: &str,
        device_id: &str,
        at_ms: i64,
    ) -> Option<PersonId>;
}

/// Resolves nothing.
pub struct NoRegistry;

impl PatientResolver for NoRegistry {
    fn resolve(&self, _: Option<&str>, _: &str, _: &str, _: i64) -> Option<PersonId> {
        None
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
