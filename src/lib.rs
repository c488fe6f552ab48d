//! knutepunkt: welfare-technology integration gateway.
//!
//! Data flow, in module order:
//! `ingest` (HTTP, limits) → `normalise` (vendor body → FHIR R4 `Envelope`) → `route`
//! (destinations) → `journal` (durable, group-committed) → `deliver` (per-lane ordered,
//! at-least-once HTTP). Beside them: `auth` (API tokens, tenant isolation), `admin` (health,
//! lanes, dead letters, replay), `alarm` (escalation, deactivation, no contact), `fhir`
//! (EPJ-facing FHIR R4 API: topic-based subscriptions with numbered notifications, pull feed),
//! `config` (raw → validated), `api_error` (every HTTP error as an OperationOutcome), `app`
//! (wiring), `telemetry` (metrics on `/metrics`, traces, logs, typed events).

pub mod deliver;
pub mod ingest;
pub mod journal;
pub mod normalise;
pub mod route;

pub mod admin;
pub mod alarm;
pub mod api_error;
pub mod app;
pub mod auth;
pub mod clock;
pub mod config;
pub mod fhir;
pub mod telemetry;
