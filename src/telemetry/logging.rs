//! The log line formatter: `text` (human-readable) or `json` (one object per line). Every field
//! value and the message pass through [`redact`] here, so no log line carries an identity number
//! or a name; JSON lines name the current trace and span (`trace_id`, `span_id`) so a log line
//! leads to its trace.

use std::fmt;

use opentelemetry::trace::TraceContextExt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use super::redact::redact;
use crate::config::ops::LogFormat;

pub struct Format {
    format: LogFormat,
}

impl Format {
    pub fn new(format: LogFormat) -> Self {
        Self { format }
    }
}

/// An event's fields as (name, value), values already redacted.
#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, redact(value).into_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.push(field, redact(&format!("{value:?}")).into_owned());
    }
}

impl Fields {
    fn push(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = value;
        } else {
            self.fields.push((field.name(), value));
        }
    }
}

impl<S, N> FormatEvent<S, N> for Format
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut ts = String::new();
        SystemTime.format_time(&mut Writer::new(&mut ts))?;
        let meta = event.metadata();
        let scope: Vec<&'static str> = ctx
            .event_scope()
            .map(|s| s.from_root().map(|span| span.name()).collect())
            .unwrap_or_default();
        let ids = ctx.lookup_current().and_then(|_| {
            let cx = tracing::Span::current().context();
            let span = cx.span();
            let sc = span.span_context();
            sc.is_valid()
                .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
        });
        match self.format {
            LogFormat::Json => {
                let mut obj = serde_json::Map::new();
                obj.insert("timestamp".into(), ts.into());
                obj.insert("level".into(), meta.level().as_str().into());
                obj.insert("target".into(), meta.target().into());
                obj.insert("message".into(), fields.message.into());
                for (k, v) in fields.fields {
                    obj.insert(k.into(), v.into());
                }
                if let Some(span) = scope.last() {
                    obj.insert("span".into(), (*span).into());
                }
                if let Some((trace_id, span_id)) = ids {
                    obj.insert("trace_id".into(), trace_id.into());
                    obj.insert("span_id".into(), span_id.into());
                }
                let line = serde_json::Value::Object(obj).to_string();
                writeln!(w, "{line}")
            }
            LogFormat::Text => {
                write!(w, "{ts} {:>5} ", meta.level().as_str())?;
                if !scope.is_empty() {
                    write!(w, "{}: ", scope.join(":"))?;
                }
                write!(w, "{}: {}", meta.target(), fields.message)?;
                for (k, v) in fields.fields {
                    write!(w, " {k}={v}")?;
                }
                if let Some((trace_id, _)) = ids {
                    write!(w, " trace_id={trace_id}")?;
                }
                writeln!(w)
            }
        }
    }
}
