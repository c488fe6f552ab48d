//! The log line formatter: `text` (human-readable) or `json` (one object per line). Every field
//! value and the message pass through [`redact`] here, so no log line carries an identity number
//! or a name; JSON lines name the current trace and span (`trace_id`, `span_id`) so a log line
//! leads to its trace.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use super::redact::redact;
use crate::config::ops::LogFormat;

/// Span fields formatter that writes nothing: [`Format`] prints span names only, so the text the
/// fmt layer would otherwise build for every new span (three per event) is never read.
pub struct NoSpanFields;

impl<'writer> FormatFields<'writer> for NoSpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        _writer: Writer<'writer>,
        _fields: R,
    ) -> fmt::Result {
        Ok(())
    }
}

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
    fields: Vec<(&'static str, serde_json::Value)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, redact(value).into_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.push(field, redact(&format!("{value:?}")).into_owned());
    }

    // Numbers pass through redaction too: an identity number may arrive as an integer.
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value.to_string(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value.to_string(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.number(field, value.to_string(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.fields.push((field.name(), value.into()));
    }
}

impl Fields {
    fn push(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = value;
        } else {
            self.fields.push((field.name(), value.into()));
        }
    }

    fn number(&mut self, field: &Field, text: String, value: serde_json::Value) {
        match redact(&text) {
            std::borrow::Cow::Borrowed(_) => self.fields.push((field.name(), value)),
            std::borrow::Cow::Owned(masked) => self.push(field, masked),
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
        let ids = ctx
            .lookup_current()
            .and_then(|_| super::traces::current_ids());
        match self.format {
            LogFormat::Json => {
                let mut obj = serde_json::Map::new();
                obj.insert("timestamp".into(), ts.into());
                obj.insert("level".into(), meta.level().as_str().into());
                obj.insert("target".into(), meta.target().into());
                obj.insert("message".into(), fields.message.into());
                for (k, v) in fields.fields {
                    obj.insert(k.into(), v);
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
                    match v {
                        serde_json::Value::String(s) => write!(w, " {k}={s}")?,
                        other => write!(w, " {k}={other}")?,
                    }
                }
                if let Some((trace_id, _)) = ids {
                    write!(w, " trace_id={trace_id}")?;
                }
                writeln!(w)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(format: LogFormat) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .event_format(Format::new(format))
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(
                nin = 13497248005u64,
                body = r#"{"family":"Nordmann","nin":"134972 48005"}"#,
                attempt = 2,
                "refused 13497248005"
            );
        });
        String::from_utf8(buf.0.lock().expect("lock").clone()).expect("utf8")
    }

    #[test]
    fn every_field_and_the_message_are_redacted_in_both_formats() {
        let json = capture(LogFormat::Json);
        let v: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON line");
        assert_eq!(v["message"], "refused [fnr]");
        assert_eq!(v["nin"], "[fnr]");
        assert_eq!(v["body"], r#"{"family":"[name]","nin":"[fnr]"}"#);
        assert_eq!(v["attempt"], 2);
        assert_eq!(v["level"], "WARN");
        let text = capture(LogFormat::Text);
        assert!(
            text.contains("refused [fnr]") && text.contains("nin=[fnr]"),
            "{text}"
        );
        assert!(
            !text.contains("48005") && !text.contains("Nordmann"),
            "{text}"
        );
    }
}
