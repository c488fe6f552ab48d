//! W3C trace context without OpenTelemetry, for when no span is exported.
//!
//! Without `[telemetry] otlp_endpoint` nobody reads span data, yet a vendor's `traceparent` must
//! still reach the destinations and log lines must still name their trace. [`IdLayer`] gives
//! every span a [`SpanIds`] (the parent's trace id and sampled flag, a new span id) and nothing
//! else; the OpenTelemetry layer it replaces built and ended a full SDK span for every one of
//! the three spans per event, about a quarter of the tokio workers' CPU at full load.
//!
//! Sampling follows the SDK's `ParentBased(TraceIdRatioBased(ratio))`: a parent's flag is kept,
//! a new trace is sampled when the low 63 bits of its id fall under the ratio.

use tracing::span::{Attributes, Id};
use tracing::{Span, Subscriber};
use tracing_subscriber::Registry;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::{LookupSpan, SpanRef};

/// One span's place in a W3C trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl SpanIds {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; all-zero ids and other versions' shapes are
    /// refused (a malformed parent starts a new trace).
    pub fn parse(traceparent: &str) -> Option<SpanIds> {
        let mut parts = traceparent.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            (s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                .then_some(())
        };
        hex(version, 2)?;
        hex(trace, 32)?;
        hex(span, 16)?;
        hex(flags, 2)?;
        // Version ff is invalid; version 00 has exactly four parts.
        if version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let ids = SpanIds {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            span_id: u64::from_str_radix(span, 16).ok()?,
            sampled: u8::from_str_radix(flags, 16).ok()? & 1 == 1,
        };
        (ids.trace_id != 0 && ids.span_id != 0).then_some(ids)
    }

    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }

    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// A new span in this trace.
    fn child(&self) -> SpanIds {
        SpanIds {
            span_id: nonzero_u64(),
            ..*self
        }
    }

    /// The first span of a new trace, sampled by `ratio`.
    fn root(ratio: f64) -> SpanIds {
        let trace_id = loop {
            let t = rand::random::<u128>();
            if t != 0 {
                break t;
            }
        };
        SpanIds {
            trace_id,
            span_id: nonzero_u64(),
            sampled: sampled_by_ratio(trace_id, ratio),
        }
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let v = rand::random::<u64>();
        if v != 0 {
            return v;
        }
    }
}

/// The SDK's `TraceIdRatioBased` decision: the trace id's low 64 bits, shifted right by one,
/// against `ratio` × 2^63.
fn sampled_by_ratio(trace_id: u128, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    ((trace_id as u64) >> 1) < bound
}

/// Gives every span it sees a [`SpanIds`]: a child of its parent span's, or a new trace.
pub struct IdLayer {
    ratio: f64,
}

impl IdLayer {
    pub fn new(ratio: f64) -> Self {
        Self { ratio }
    }
}

impl<S> Layer<S> for IdLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    // The parent comes from the registry (explicit or contextual), not from the attributes.
    fn on_new_span(&self, _attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let parent = span
            .parent()
            .and_then(|p| p.extensions().get::<SpanIds>().copied());
        let ids = match parent {
            Some(p) => p.child(),
            None => SpanIds::root(self.ratio),
        };
        span.extensions_mut().insert(ids);
    }
}

/// Runs `f` on `span`'s registry data; `None` when the span is disabled or the subscriber has
/// no registry.
fn with_data<T>(span: &Span, f: impl FnOnce(SpanRef<'_, Registry>) -> Option<T>) -> Option<T> {
    span.with_subscriber(|(id, dispatch)| f(dispatch.downcast_ref::<Registry>()?.span(id)?))
        .flatten()
}

/// The ids [`IdLayer`] gave `span`; `None` when that layer is not installed or the span is
/// disabled.
pub fn of(span: &Span) -> Option<SpanIds> {
    with_data(span, |data| data.extensions().get::<SpanIds>().copied())
}

/// Makes `span` part of `parent`'s trace (keeping its own span id). Call right after creating
/// the span, before it has children. Returns whether `span` carries [`SpanIds`].
pub fn set_parent(span: &Span, parent: SpanIds) -> bool {
    with_data(span, |data| {
        let mut ext = data.extensions_mut();
        let ids = ext.get_mut::<SpanIds>()?;
        ids.trace_id = parent.trace_id;
        ids.sampled = parent.sampled;
        Some(())
    })
    .is_some()
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_parses_and_prints_back() {
        let ids = SpanIds::parse(TP).expect("valid");
        assert_eq!(ids.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(ids.span_id, 0x00f067aa0ba902b7);
        assert!(ids.sampled);
        assert_eq!(ids.traceparent(), TP);
        let unsampled = SpanIds::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
            .expect("valid");
        assert!(!unsampled.sampled);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-zz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(SpanIds::parse(bad), None, "{bad:?}");
            // The OpenTelemetry propagator (used when spans are exported) refuses it too.
            assert!(
                super::super::traces::parent_from(Some(bad)).is_none(),
                "{bad:?}"
            );
        }
        assert!(super::super::traces::parent_from(Some(TP)).is_some());
        // A later version may append fields; its first four are read.
        assert!(
            SpanIds::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_some()
        );
    }

    #[test]
    fn ratio_sampling_agrees_with_the_sdk_sampler() {
        use opentelemetry::trace::{SpanKind, TraceId};
        use opentelemetry_sdk::trace::{Sampler, SamplingDecision, ShouldSample};
        // Edge ids (low 64 bits 0, all ones, at the 0.5 bound) and random ones.
        let mut ids = vec![
            1u128 << 64,
            u64::MAX as u128,
            (1u128 << 62) << 1,
            ((1u128 << 62) - 1) << 1,
        ];
        ids.extend((0..2000).map(|_| rand::random::<u128>() | 1));
        for ratio in [0.0, 0.001, 0.25, 0.5, 0.9, 0.999, 1.0] {
            let sdk = Sampler::TraceIdRatioBased(ratio);
            for &t in &ids {
                let decision = sdk
                    .should_sample(None, TraceId::from(t), "x", &SpanKind::Internal, &[], &[])
                    .decision;
                assert_eq!(
                    sampled_by_ratio(t, ratio),
                    decision == SamplingDecision::RecordAndSample,
                    "ratio {ratio}, trace id {t:032x}"
                );
            }
        }
    }

    #[test]
    fn children_inherit_the_trace_and_get_their_own_span_id() {
        let subscriber = tracing_subscriber::registry().with(IdLayer::new(1.0));
        tracing::subscriber::with_default(subscriber, || {
            let root = tracing::info_span!("ingest");
            let parent = SpanIds::parse(TP).expect("valid");
            assert!(set_parent(&root, parent));
            let r = of(&root).expect("ids");
            assert_eq!(r.trace_id, parent.trace_id);
            assert_ne!(r.span_id, parent.span_id);
            let child = root.in_scope(|| tracing::info_span!("journal.commit"));
            let c = of(&child).expect("ids");
            assert_eq!(c.trace_id, parent.trace_id);
            assert_ne!(c.span_id, r.span_id);
            let other = tracing::info_span!("deliver");
            let o = of(&other).expect("ids");
            assert_ne!(o.trace_id, parent.trace_id, "no parent: a new trace");
            assert!(o.sampled, "ratio 1 samples every new trace");
        });
    }

    #[test]
    fn without_the_layer_there_are_no_ids() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("ingest");
            assert_eq!(of(&span), None);
            assert!(!set_parent(&span, SpanIds::parse(TP).expect("valid")));
        });
    }
}
