//! Normalise: a vendor's native body becomes an [`Envelope`] holding a FHIR R4 Bundle.
//!
//! Each vendor is described by one mapping file in the mappings directory ([`vendors`]); the
//! file's `format` chooses the parser. Errors are [`MapError`]s, turned into a FHIR
//! OperationOutcome by the ingest layer.

mod envelope;
mod fhir_passthrough;
pub mod json_depth;
mod vendors;

pub use envelope::{Category, Envelope, LaneClass, Priority};
pub use vendors::{Format, VendorRegistry, VendorSpec, load_vendors};

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

/// Maps a raw body with the vendor's spec.
pub fn normalise(spec: &VendorSpec, raw: &RawEvent<'_>) -> Result<Envelope, MapError> {
    match spec.format {
        Format::Fhir => fhir_passthrough::normalise(spec, raw),
    }
}
