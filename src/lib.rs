//! knutepunkt: welfare-technology integration gateway.
//!
//! Data flow, in module order:
//! `ingest` (HTTP, limits) → `normalise` (vendor body → FHIR R4 `Envelope`) → `route`
//! (destinations) → `journal` (durable, group-committed) → `deliver` (per-lane ordered,
//! at-least-once HTTP). Beside them: `admin` (health, lanes, dead letters, replay), `config`
//! (raw → validated), `api_error` (every HTTP error as an OperationOutcome), `app` (wiring),
//! `telemetry` (metrics on `/metrics`, typed events), `fhir` (EPJ-facing FHIR R4 API: topic-based
//! subscriptions with numbered notifications, pull feed).

pub mod deliver;
pub mod ingest;
pub mod journal;
pub mod normalise;
pub mod route;

pub mod admin;
pub mod api_error;
pub mod app;
pub mod clock;
pub mod config;
pub mod fhir;
pub mod telemetry;
