//! `[ingest.vendor.<name>]`: limits for one vendor (body size, token-bucket rate), so a single
//! misbehaving or compromised vendor cannot take the gateway's whole ingest capacity.
//!
//! Validated in two steps: [`validate`] is pure (values only, called from `config::validate`);
//! [`check_known_vendors`] runs where config and mapping files meet (`knutepunkt check` and
//! `serve`), because vendor names come from the mapping directory.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::validate::{ConfigError, valid_name};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VendorIngestConfig {
    /// Largest body for this vendor in bytes; overrides `ingest.max_body_bytes`.
    pub max_body_bytes: Option<usize>,
    /// Sustained requests per second allowed for this vendor (token refill rate).
    pub rate_per_s: Option<f64>,
    /// Requests allowed at once above the sustained rate (bucket size); default
    /// `ceil(rate_per_s)`, at least 1.
    pub burst: Option<u32>,
}

/// The limits one vendor runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidVendorLimits {
    pub max_body_bytes: Option<usize>,
    pub rate: Option<Rate>,
}

/// A token bucket's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_s: f64,
    pub burst: u32,
}

/// Highest rate accepted: above this the limit is not a limit, and the refill arithmetic in
/// milliseconds stays well inside f64 precision.
const MAX_RATE_PER_S: f64 = 1_000_000.0;

/// Checks every vendor section; pushes one error per problem, naming the field.
pub fn validate(
    file: &str,
    vendors: &BTreeMap<String, VendorIngestConfig>,
    errs: &mut Vec<ConfigError>,
) -> BTreeMap<String, ValidVendorLimits> {
    let mut out = BTreeMap::new();
    for (name, v) in vendors {
        let mut push = |field: &str, message: String| {
            errs.push(ConfigError {
                file: file.to_string(),
                field: format!("ingest.vendor.{name}.{field}"),
                message,
            })
        };
        if !valid_name(name) {
            push(
                "name",
                format!("{name:?} must be 1-64 characters of a-z, 0-9, '-' or '_', e.g. \"scaip\""),
            );
        }
        if v.max_body_bytes == Some(0) {
            push("max_body_bytes", "must be greater than 0".into());
        }
        let rate = match (v.rate_per_s, v.burst) {
            (None, None) => None,
            (None, Some(_)) => {
                push(
                    "burst",
                    "needs rate_per_s, e.g. rate_per_s = 50 and burst = 100".into(),
                );
                None
            }
            (Some(r), burst) => {
                if !(r.is_finite() && r > 0.0 && r <= MAX_RATE_PER_S) {
                    push(
                        "rate_per_s",
                        format!("must be a number above 0 and at most {MAX_RATE_PER_S}, e.g. 50"),
                    );
                }
                if burst == Some(0) {
                    push("burst", "must be at least 1".into());
                }
                let burst = burst.unwrap_or_else(|| r.clamp(1.0, MAX_RATE_PER_S).ceil() as u32);
                Some(Rate { per_s: r, burst })
            }
        };
        out.insert(
            name.clone(),
            ValidVendorLimits {
                max_body_bytes: v.max_body_bytes,
                rate,
            },
        );
    }
    out
}

/// Every `[ingest.vendor.<name>]` must name a vendor that has a mapping file: a typo would
/// otherwise silently leave the real vendor unlimited.
pub fn check_known_vendors<'a>(
    file: &str,
    configured: impl IntoIterator<Item = &'a String>,
    known: &[&str],
) -> Vec<ConfigError> {
    configured
        .into_iter()
        .filter(|name| !known.contains(&name.as_str()))
        .map(|name| ConfigError {
            file: file.to_string(),
            field: format!("ingest.vendor.{name}"),
            message: format!(
                "no mapping file defines vendor {name:?}; known vendors: {}",
                known.join(", ")
            ),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> (BTreeMap<String, ValidVendorLimits>, Vec<ConfigError>) {
        let raw: BTreeMap<String, VendorIngestConfig> = toml::from_str(text).expect("toml");
        let mut errs = Vec::new();
        let out = validate("t.toml", &raw, &mut errs);
        (out, errs)
    }

    #[test]
    fn burst_defaults_to_the_rate_rounded_up() {
        let (out, errs) = run("[scaip]\nrate_per_s = 2.5\nmax_body_bytes = 4096\n[fhir]\n");
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            out["scaip"],
            ValidVendorLimits {
                max_body_bytes: Some(4096),
                rate: Some(Rate {
                    per_s: 2.5,
                    burst: 3
                })
            }
        );
        assert_eq!(out["fhir"].rate, None);
        let (out, _) = run("[slow]\nrate_per_s = 0.1\n");
        assert_eq!(out["slow"].rate.map(|r| r.burst), Some(1));
    }

    #[test]
    fn reports_every_bad_field() {
        let (_, errs) = run(
            "[Bad]\nmax_body_bytes = 0\n[b]\nburst = 3\n[c]\nrate_per_s = -1\nburst = 0\n[d]\nrate_per_s = inf\n",
        );
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "ingest.vendor.Bad.name",
                "ingest.vendor.Bad.max_body_bytes",
                "ingest.vendor.b.burst",
                "ingest.vendor.c.rate_per_s",
                "ingest.vendor.c.burst",
                "ingest.vendor.d.rate_per_s",
            ]
        );
        assert!(errs.iter().all(|e| e.file == "t.toml"));
    }

    #[test]
    fn unknown_keys_and_vendors_are_refused() {
        assert!(toml::from_str::<BTreeMap<String, VendorIngestConfig>>("[a]\nrate = 1\n").is_err());
        let names = ["scaip".to_string(), "scaipp".to_string()];
        let errs = check_known_vendors("t.toml", &names, &["fhir", "scaip"]);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "ingest.vendor.scaipp");
        assert!(errs[0].message.contains("fhir, scaip"), "{}", errs[0]);
    }
}
