//! Traces and logs: one `tracing` subscriber with two layers.
//!
//! - With `[telemetry] otlp_endpoint` set, an OpenTelemetry layer (tracing-opentelemetry) backed
//!   by an `SdkTracerProvider` exports spans over OTLP/HTTP (protobuf) through [`Redacting`].
//!   Without it nothing is exported and [`super::trace_ids::IdLayer`] takes its place: every span
//!   still has W3C trace context, so a vendor's `traceparent` reaches the destinations, at a
//!   fraction of the cost of building SDK spans nobody reads.
//! - A log formatter ([`super::logging`]) writing text or JSON lines to stderr, with the current
//!   trace id and span id.
//!
//! One span tree per event: `ingest` (child of the vendor's `traceparent`, if any) →
//! `journal.commit`; the ingest span's context is stored with the event in the journal
//! (`events.traceparent`), and every delivery attempt later opens a `deliver` span as its child
//! and sends that span's `traceparent` to the destination.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use super::redact::redact;
use super::trace_ids::SpanIds;
use crate::config::ops::{LogFormat, ValidOps};

/// How often finished spans are sent: short, so a trace shows up while someone is looking.
const EXPORT_DELAY: Duration = Duration::from_millis(500);

/// Keeps the tracer provider alive (when spans are exported); [`TraceGuard::shutdown`] flushes
/// spans not yet exported.
pub struct TraceGuard {
    provider: Option<SdkTracerProvider>,
}

impl TraceGuard {
    pub fn shutdown(&self) {
        if let Some(Err(e)) = self.provider.as_ref().map(SdkTracerProvider::shutdown) {
            eprintln!("warning: trace provider shutdown: {e}");
        }
    }
}

/// The resource every exported span and metric carries.
pub fn resource(ops: &ValidOps) -> Resource {
    Resource::builder()
        .with_service_name(ops.service_name.clone())
        .build()
}

/// Installs the global subscriber (log format, `KNUTEPUNKT_LOG` filter, tracer). Call once,
/// before the runtime starts: the OTLP client is a blocking one run by the exporter's thread.
pub fn init(ops: &ValidOps) -> Result<TraceGuard, opentelemetry_otlp::ExporterBuildError> {
    let provider = match &ops.otlp_endpoint {
        Some(endpoint) => Some(exporting_provider(ops, endpoint)?),
        None => None,
    };
    let mut filter =
        EnvFilter::try_from_env("KNUTEPUNKT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // tokio-postgres logs every statement's parameters at debug level: raw bodies as byte
    // arrays, which no text redaction can recognise. Never let those through.
    for quiet in ["tokio_postgres::query=info", "tokio_postgres::prepare=info"] {
        if let Ok(d) = quiet.parse() {
            filter = filter.add_directive(d);
        }
    }
    // Either layer sees our spans whatever the log level says, so trace context always exists.
    let ours = || {
        tracing_subscriber::filter::filter_fn(|m| {
            m.target().starts_with("knutepunkt")
                && (m.is_span() || *m.level() <= tracing::Level::INFO)
        })
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("knutepunkt"))
            .with_level(true)
            .with_threads(false)
            .with_location(false)
            // Nothing here reads the OpenTelemetry context of the current thread, and nobody
            // reads busy/idle times: both cost work on every poll of an instrumented future.
            .with_context_activation(false)
            .with_tracked_inactivity(false)
            .with_filter(ours())
    });
    let ids = provider
        .is_none()
        .then(|| super::trace_ids::IdLayer::new(ops.sampling_ratio).with_filter(ours()));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .event_format(super::logging::Format::new(log_format(ops)))
        // The formatter never prints span fields; formatting them for every span is wasted.
        .fmt_fields(super::logging::NoSpanFields)
        .with_filter(filter);
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(ids)
        .with(logs)
        .try_init();
    Ok(TraceGuard { provider })
}

/// The tracer provider that samples by `sampling_ratio` and exports to `endpoint`.
fn exporting_provider(
    ops: &ValidOps,
    endpoint: &str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .with_timeout(Duration::from_secs(10))
        .build()?;
    let processor = BatchSpanProcessor::builder(Redacting(exporter))
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(EXPORT_DELAY)
                .build(),
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ops.sampling_ratio,
        ))))
        .with_resource(resource(ops))
        .with_span_processor(processor)
        .build())
}

/// `[log] format`, unless the older `KNUTEPUNKT_LOG_FORMAT` environment variable says otherwise.
fn log_format(ops: &ValidOps) -> LogFormat {
    match std::env::var("KNUTEPUNKT_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        Ok("text") => LogFormat::Text,
        _ => ops.log_format,
    }
}

/// The W3C `traceparent` of the current span, when it has a valid context.
pub fn current_traceparent() -> Option<String> {
    current().map(|ids| ids.traceparent())
}

/// The current span's trace id and span id in hex, when it has a valid context (log lines).
pub fn current_ids() -> Option<(String, String)> {
    current().map(|ids| (ids.trace_id_hex(), ids.span_id_hex()))
}

/// The current span's W3C ids: from [`super::trace_ids::IdLayer`] when nothing is exported,
/// else from the span's OpenTelemetry context.
fn current() -> Option<SpanIds> {
    let span = tracing::Span::current();
    super::trace_ids::of(&span).or_else(|| ids_of(&span.context()))
}

/// The W3C ids of a context's span, when valid.
fn ids_of(cx: &Context) -> Option<SpanIds> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| SpanIds {
        trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
        span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
        sampled: sc.is_sampled(),
    })
}

/// A remote parent from a W3C `traceparent` value (a vendor's header, or one stored in the
/// journal); `None` when it is absent or malformed (a malformed one starts a new trace).
pub fn parent_from(traceparent: Option<&str>) -> Option<Context> {
    let tp = traceparent?;
    let mut carrier = HashMap::new();
    carrier.insert("traceparent".to_string(), tp.to_string());
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` a child of `traceparent` when it is a valid one.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(parent) = traceparent.and_then(SpanIds::parse)
        && super::trace_ids::set_parent(span, parent)
    {
        return;
    }
    if let Some(cx) = parent_from(traceparent) {
        // Fails only when the span is disabled (no tracing layer): nothing to link then.
        let _ = span.set_parent(cx);
    }
}

/// Span exporter wrapper: every string attribute (of spans and span events) goes through
/// [`redact`] before it leaves the process.
#[derive(Debug)]
pub struct Redacting<E>(pub E);

impl<E: SpanExporter> SpanExporter for Redacting<E> {
    async fn export(&self, mut batch: Vec<SpanData>) -> OTelSdkResult {
        for span in &mut batch {
            redact_attributes(&mut span.attributes);
            for ev in &mut span.events.events {
                redact_attributes(&mut ev.attributes);
            }
        }
        self.0.export(batch).await
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

fn redact_attributes(attrs: &mut [KeyValue]) {
    for kv in attrs {
        if let Value::String(s) = &kv.value {
            let clean = redact(s.as_str());
            if clean != s.as_str() {
                kv.value = Value::String(clean.into_owned().into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_ones_are_ignored() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = parent_from(Some(tp)).expect("valid");
        assert_eq!(ids_of(&cx).map(|i| i.traceparent()).as_deref(), Some(tp));
        assert!(parent_from(Some("00-zz-00f067aa0ba902b7-01")).is_none());
        assert!(
            parent_from(Some(
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
            ))
            .is_none()
        );
        assert!(parent_from(None).is_none());
    }
}
