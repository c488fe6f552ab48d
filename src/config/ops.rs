//! Operations config: `[telemetry]` (traces and OTLP export), `[log]` (format) and `[audit]`
//! (retention). Raw serde types, their pure validation and the validated form.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP (protobuf) base URL, e.g. "http://otel-collector:4318"; traces go to
    /// `{endpoint}/v1/traces`, metrics to `{endpoint}/v1/metrics`. None: nothing is exported
    /// (trace context is still propagated to destinations).
    pub otlp_endpoint: Option<String>,
    /// `service.name` resource attribute of exported traces and metrics.
    pub service_name: String,
    /// Fraction of new traces recorded (0.0–1.0); a vendor's sampled flag is honoured.
    pub sampling_ratio: f64,
    /// Milliseconds between metric exports over OTLP.
    pub metrics_interval_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "knutepunkt".into(),
            sampling_ratio: 1.0,
            metrics_interval_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (human-readable) or `json` (one object per line, with trace_id/span_id).
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "text".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Days finished events and their audit records are kept; older ones are deleted.
    pub retention_days: u64,
    /// Seconds between retention sweeps.
    pub retention_interval_s: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: 3650,
            retention_interval_s: 3600,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated `[telemetry]`, `[log]` and `[audit]`.
#[derive(Debug, Clone)]
pub struct ValidOps {
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    pub sampling_ratio: f64,
    pub metrics_interval: Duration,
    pub log_format: LogFormat,
    pub retention: Duration,
    pub retention_interval: Duration,
}

impl Default for ValidOps {
    fn default() -> Self {
        let t = TelemetryConfig::default();
        let a = AuditConfig::default();
        Self {
            otlp_endpoint: None,
            service_name: t.service_name,
            sampling_ratio: t.sampling_ratio,
            metrics_interval: Duration::from_millis(t.metrics_interval_ms),
            log_format: LogFormat::Text,
            retention: Duration::from_secs(a.retention_days * 86_400),
            retention_interval: Duration::from_secs(a.retention_interval_s),
        }
    }
}

/// Checks the three sections; every problem is returned as (field, message).
pub fn validate(
    t: &TelemetryConfig,
    l: &LogConfig,
    a: &AuditConfig,
) -> (ValidOps, Vec<(&'static str, String)>) {
    let mut errs = Vec::new();
    let endpoint = t
        .otlp_endpoint
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    if let Some(e) = endpoint {
        let ok = e
            .parse::<axum::http::Uri>()
            .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
        if !ok {
            errs.push((
                "telemetry.otlp_endpoint",
                format!("{e:?} is not an http(s) URL, e.g. \"http://otel-collector:4318\""),
            ));
        }
    }
    if t.service_name.trim().is_empty() {
        errs.push(("telemetry.service_name", "must not be empty".to_string()));
    }
    if !(0.0..=1.0).contains(&t.sampling_ratio) {
        errs.push((
            "telemetry.sampling_ratio",
            format!("{} is outside 0.0–1.0", t.sampling_ratio),
        ));
    }
    if t.metrics_interval_ms < 100 {
        errs.push((
            "telemetry.metrics_interval_ms",
            "must be at least 100".to_string(),
        ));
    }
    let log_format = match l.format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            errs.push((
                "log.format",
                format!("{other:?} is not a log format; use \"text\" or \"json\""),
            ));
            LogFormat::Text
        }
    };
    if a.retention_days == 0 || a.retention_days > 36_500 {
        errs.push((
            "audit.retention_days",
            "must be between 1 and 36500".to_string(),
        ));
    }
    if a.retention_interval_s == 0 {
        errs.push((
            "audit.retention_interval_s",
            "must be greater than 0".to_string(),
        ));
    }
    let ops = ValidOps {
        otlp_endpoint: endpoint.map(|e| e.trim_end_matches('/').to_string()),
        service_name: t.service_name.clone(),
        sampling_ratio: t.sampling_ratio,
        metrics_interval: Duration::from_millis(t.metrics_interval_ms.max(100)),
        log_format,
        retention: Duration::from_secs(a.retention_days.clamp(1, 36_500) * 86_400),
        retention_interval: Duration::from_secs(a.retention_interval_s.max(1)),
    };
    (ops, errs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_field() {
        let (ops, errs) = validate(
            &TelemetryConfig::default(),
            &LogConfig::default(),
            &AuditConfig::default(),
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(ops.otlp_endpoint, None);
        assert_eq!(ops.retention, Duration::from_secs(3650 * 86_400));
        let (_, errs) = validate(
            &TelemetryConfig {
                otlp_endpoint: Some("collector:4318".into()),
                service_name: " ".into(),
                sampling_ratio: 1.5,
                metrics_interval_ms: 1,
            },
            &LogConfig {
                format: "xml".into(),
            },
            &AuditConfig {
                retention_days: 0,
                retention_interval_s: 0,
            },
        );
        let fields: Vec<_> = errs.iter().map(|e| e.0).collect();
        assert_eq!(
            fields,
            [
                "telemetry.otlp_endpoint",
                "telemetry.service_name",
                "telemetry.sampling_ratio",
                "telemetry.metrics_interval_ms",
                "log.format",
                "audit.retention_days",
                "audit.retention_interval_s"
            ]
        );
    }
}
