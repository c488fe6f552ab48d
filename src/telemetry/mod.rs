//! Telemetry: one OpenTelemetry `SdkMeterProvider` whose instruments are exported as Prometheus
//! text on `GET /metrics` (through `opentelemetry-prometheus`).
//!
//! Code never touches instruments directly: each thing that happens is a typed event in
//! [`events`] whose `emit()` records the metric (and a debug log line). Names and units live in
//! [`names`]. Gauges about the queue are observable gauges whose callbacks read a
//! [`snapshot::Snapshot`] that a background task refreshes from the journal every few seconds,
//! so a scrape never waits on the database.

pub mod events;
pub mod logging;
pub mod names;
pub mod redact;
pub mod snapshot;
pub mod trace_ids;
pub mod traces;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;

use crate::app::AppState;
use names::MetricDef;
pub use snapshot::Snapshot;

/// The meter provider, its Prometheus registry and the typed instrument handles.
pub struct Telemetry {
    provider: SdkMeterProvider,
    registry: Option<prometheus::Registry>,
    pub(crate) ingest_requests: Counter<u64>,
    pub(crate) events_stored: Counter<u64>,
    pub(crate) delivery_attempts: Counter<u64>,
    pub(crate) dead_letters: Counter<u64>,
    pub(crate) subscription_notifications: Counter<u64>,
    pub(crate) ingest_duration: Histogram<f64>,
    pub(crate) delivery_duration: Histogram<f64>,
    pub(crate) alarm_latency: Histogram<f64>,
    pub(crate) ingest_rejected: Counter<u64>,
    /// Queue figures behind the observable gauges.
    pub snapshot: Arc<Snapshot>,
    /// Unix seconds of each vendor's last accepted request.
    pub(crate) vendor_seen: Arc<Mutex<HashMap<String, f64>>>,
}

impl Telemetry {
    /// A provider exported on `/metrics`.
    pub fn prometheus() -> Result<Self, opentelemetry_sdk::error::OTelSdkError> {
        Self::prometheus_and_otlp(&crate::config::ops::ValidOps::default())
            .map_err(|e| opentelemetry_sdk::error::OTelSdkError::InternalFailure(e.to_string()))
    }

    /// A provider exported on `/metrics` and, with `[telemetry] otlp_endpoint`, also pushed over
    /// OTLP/HTTP every `metrics_interval_ms` (the same instruments feed both).
    pub fn prometheus_and_otlp(ops: &crate::config::ops::ValidOps) -> anyhow::Result<Self> {
        use opentelemetry_otlp::{Protocol, WithExportConfig};
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()?;
        let mut builder = SdkMeterProvider::builder().with_reader(exporter);
        if let Some(endpoint) = &ops.otlp_endpoint {
            let otlp = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(format!("{endpoint}/v1/metrics"))
                .build()?;
            let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(otlp)
                .with_interval(ops.metrics_interval)
                .build();
            builder = builder
                .with_reader(reader)
                .with_resource(traces::resource(ops));
        }
        Ok(Self::build(builder.build(), Some(registry)))
    }

    /// Instruments that record nowhere (unit tests, tools).
    pub fn disabled() -> Self {
        Self::build(SdkMeterProvider::builder().build(), None)
    }

    fn build(provider: SdkMeterProvider, registry: Option<prometheus::Registry>) -> Self {
        let meter = provider.meter("knutepunkt");
        let snapshot = Arc::new(Snapshot::default());
        let vendor_seen = Arc::new(Mutex::new(HashMap::new()));
        snapshot::register_gauges(&meter, &snapshot, &vendor_seen);
        Self {
            ingest_requests: counter(&meter, names::INGEST_REQUESTS),
            events_stored: counter(&meter, names::EVENTS_STORED),
            delivery_attempts: counter(&meter, names::DELIVERY_ATTEMPTS),
            dead_letters: counter(&meter, names::DEAD_LETTERS),
            subscription_notifications: counter(&meter, names::SUBSCRIPTION_NOTIFICATIONS),
            ingest_duration: histogram(&meter, names::INGEST_DURATION, names::FAST_BUCKETS),
            delivery_duration: histogram(&meter, names::DELIVERY_DURATION, names::FAST_BUCKETS),
            alarm_latency: histogram(&meter, names::ALARM_LATENCY, names::ALARM_BUCKETS),
            ingest_rejected: counter(&meter, names::INGEST_REJECTED),
            snapshot,
            vendor_seen,
            provider,
            registry,
        }
    }

    /// The Prometheus text exposition of every instrument.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let Some(registry) = &self.registry else {
            return Ok(String::new());
        };
        let families = registry.gather();
        prometheus::TextEncoder::new().encode_to_string(&families)
    }

    /// The meter, for modules that own their instruments (e.g. `alarm::metrics`).
    pub fn meter(&self) -> Meter {
        self.provider.meter("knutepunkt")
    }

    /// Flushes and stops the provider (call once on shutdown).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "meter provider shutdown");
        }
    }
}

fn counter(meter: &Meter, def: MetricDef) -> Counter<u64> {
    meter
        .u64_counter(def.otel)
        .with_unit(def.unit)
        .with_description(def.help)
        .build()
}

fn histogram(meter: &Meter, def: MetricDef, bounds: &[f64]) -> Histogram<f64> {
    meter
        .f64_histogram(def.otel)
        .with_unit(def.unit)
        .with_description(def.help)
        .with_boundaries(bounds.to_vec())
        .build()
}

pub(crate) fn kv(k: &'static str, v: impl Into<opentelemetry::Value>) -> KeyValue {
    KeyValue::new(k, v)
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.telemetry.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}"),
        )
            .into_response(),
    }
}
