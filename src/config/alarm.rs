//! Alarm-path config: `[escalation]` (deadline escalation of alarm deliveries) and
//! `[deactivation]` (time-limited device deactivations). Raw serde types and their validation.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::RawConfig;
use super::validate::{Errors, ValidDestination};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EscalationConfig {
    /// Absolute http(s) URL that receives a small FHIR `Communication` for every escalation
    /// (an operator alerting hook). Unset: escalations are still journaled, delivered to the
    /// fallback destination, counted and shown in the console.
    pub url: Option<String>,
    /// Milliseconds one notification POST may take.
    pub timeout_ms: u64,
    /// Notification POSTs per escalation before giving up (the escalation itself stays open).
    pub max_attempts: u32,
    /// Milliseconds between two scans of the journal for overdue alarm deliveries.
    pub scan_interval_ms: u64,
}

impl Default for EscalationConfig {
    fn default() -> Self {
        Self {
            url: None,
            timeout_ms: 5_000,
            max_attempts: 4,
            scan_interval_ms: 250,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeactivationConfig {
    /// Longest deactivation an operator may set, in seconds (open-ended ones are refused).
    pub max_s: u64,
    /// Seconds before a deactivation ends at which a reminder is raised.
    pub reminder_lead_s: u64,
}

impl Default for DeactivationConfig {
    fn default() -> Self {
        Self {
            max_s: 7 * 24 * 3600,
            reminder_lead_s: 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NoContactConfig {
    /// Vendor name → seconds between a device's heartbeats. A device of that vendor silent
    /// longer than this raises one "no contact" alarm per silence period.
    pub heartbeat_s: BTreeMap<String, u64>,
}

/// The validated alarm-path settings.
#[derive(Debug, Clone)]
pub struct ValidAlarm {
    pub escalation_url: Option<String>,
    pub escalation_timeout: Duration,
    pub escalation_max_attempts: u32,
    pub scan_interval: Duration,
    pub deactivation_max: Duration,
    pub reminder_lead: Duration,
    /// Vendor → heartbeat interval (`[no_contact]`).
    pub heartbeat: BTreeMap<String, Duration>,
}

/// Checks `[escalation]`, `[deactivation]` and the destinations' `deadline_s`/`fallback`.
pub(super) fn validate(
    raw: &RawConfig,
    dests: &[ValidDestination],
    errs: &mut Errors<'_>,
) -> ValidAlarm {
    let e = &raw.escalation;
    if let Some(url) = &e.url {
        let ok = (url.starts_with("http://") || url.starts_with("https://"))
            && reqwest::Url::parse(url).is_ok_and(|u| u.host().is_some());
        if !ok {
            errs.push(
                "escalation.url",
                format!("{url:?} is not an absolute http(s) URL, e.g. \"https://alerts.example/escalations\""),
            );
        }
    }
    if e.timeout_ms == 0 {
        errs.push("escalation.timeout_ms", "must be greater than 0");
    }
    if e.max_attempts == 0 {
        errs.push("escalation.max_attempts", "must be greater than 0");
    }
    // The promise is "escalated within deadline + 1 s": the scan must run well inside that.
    if !(10..=1000).contains(&e.scan_interval_ms) {
        errs.push("escalation.scan_interval_ms", "must be between 10 and 1000");
    }
    let d = &raw.deactivation;
    if d.max_s == 0 {
        errs.push("deactivation.max_s", "must be greater than 0");
    }
    if d.reminder_lead_s >= d.max_s.max(1) {
        errs.push(
            "deactivation.reminder_lead_s",
            "must be shorter than deactivation.max_s",
        );
    }
    for (i, raw_d) in raw.destinations.iter().enumerate() {
        let at = |field: &str| format!("destination[{i}] ({}).{field}", raw_d.name);
        if raw_d.deadline_s == Some(0) {
            errs.push(at("deadline_s"), "must be greater than 0, e.g. 10");
        }
        if let Some(f) = &raw_d.fallback {
            if raw_d.deadline_s.is_none() {
                errs.push(
                    at("fallback"),
                    "needs deadline_s (the fallback is used when the deadline passes)",
                );
            }
            if f == &raw_d.name {
                errs.push(at("fallback"), "must name another destination");
            } else if !dests.iter().any(|v| &v.name == f) {
                errs.push(
                    at("fallback"),
                    format!("{f:?} is not a configured destination"),
                );
            }
        }
    }
    // A cycle of fallbacks would escalate the same alarm round and round.
    for start in dests {
        let mut seen = vec![start.name.as_str()];
        let mut cur = start.fallback.as_deref();
        while let Some(name) = cur {
            if seen.contains(&name) {
                if name == start.name {
                    errs.push(
                        format!("destination ({}).fallback", start.name),
                        format!("fallbacks form a cycle: {} -> {name}", seen.join(" -> ")),
                    );
                }
                break;
            }
            seen.push(name);
            cur = dests
                .iter()
                .find(|v| v.name == name)
                .and_then(|v| v.fallback.as_deref());
        }
    }
    for (vendor, s) in &raw.no_contact.heartbeat_s {
        if *s == 0 {
            errs.push(
                format!("no_contact.heartbeat_s.{vendor}"),
                "must be greater than 0, e.g. 300",
            );
        }
    }
    ValidAlarm {
        heartbeat: raw
            .no_contact
            .heartbeat_s
            .iter()
            .map(|(v, s)| (v.clone(), Duration::from_secs(*s)))
            .collect(),
        escalation_url: e.url.clone(),
        escalation_timeout: Duration::from_millis(e.timeout_ms.max(1)),
        escalation_max_attempts: e.max_attempts.max(1),
        scan_interval: Duration::from_millis(e.scan_interval_ms.clamp(10, 1000)),
        deactivation_max: Duration::from_secs(d.max_s),
        reminder_lead: Duration::from_secs(d.reminder_lead_s),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{RawConfig, Source, validate};

    fn errors(text: &str) -> Vec<String> {
        let raw: RawConfig = toml::from_str(text).expect("toml");
        match validate(&raw, &Source::defaults()) {
            Ok(_) => Vec::new(),
            Err(e) => e
                .into_iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect(),
        }
    }

    const DESTS: &str = r#"
        [[destination]]
        name = "rc"
        url = "http://127.0.0.1:1/a"
        deadline_s = 10
        fallback = "backup"
        [[destination]]
        name = "backup"
        url = "http://127.0.0.1:1/b"
    "#;

    #[test]
    fn deadline_and_fallback_are_accepted() {
        assert_eq!(errors(DESTS), Vec::<String>::new());
        let raw: RawConfig = toml::from_str(DESTS).expect("toml");
        let v = validate(&raw, &Source::defaults()).expect("valid");
        assert_eq!(
            v.destinations[0].deadline,
            Some(std::time::Duration::from_secs(10))
        );
        assert_eq!(v.destinations[0].fallback.as_deref(), Some("backup"));
        assert_eq!(v.alarm.scan_interval, std::time::Duration::from_millis(250));
    }

    #[test]
    fn bad_fallbacks_are_refused_with_their_field() {
        let unknown = DESTS.replace("fallback = \"backup\"", "fallback = \"nowhere\"");
        let e = errors(&unknown);
        assert!(
            e.iter()
                .any(|e| e.starts_with("destination[0] (rc).fallback") && e.contains("nowhere")),
            "{e:?}"
        );

        let cycle = format!("{DESTS}\n").replace(
            "url = \"http://127.0.0.1:1/b\"",
            "url = \"http://127.0.0.1:1/b\"\ndeadline_s = 5\nfallback = \"rc\"",
        );
        let e = errors(&cycle);
        assert!(e.iter().any(|e| e.contains("cycle")), "{e:?}");

        let no_deadline = DESTS.replace("deadline_s = 10", "");
        let e = errors(&no_deadline);
        assert!(e.iter().any(|e| e.contains("needs deadline_s")), "{e:?}");

        let zero = DESTS.replace("deadline_s = 10", "deadline_s = 0");
        assert!(errors(&zero).iter().any(|e| e.contains("deadline_s")));
    }

    #[test]
    fn escalation_and_deactivation_sections_are_checked() {
        let e = errors(
            "[escalation]\nurl = \"ftp://x\"\nscan_interval_ms = 5000\nmax_attempts = 0\n\
             [deactivation]\nmax_s = 60\nreminder_lead_s = 60\n",
        );
        for field in [
            "escalation.url",
            "escalation.scan_interval_ms",
            "escalation.max_attempts",
            "deactivation.reminder_lead_s",
        ] {
            assert!(
                e.iter().any(|e| e.starts_with(field)),
                "{field} missing in {e:?}"
            );
        }
    }
}
