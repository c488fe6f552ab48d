//! Validation of a destination's adapter keys (`kind`, `orgnr`, `municipality`,
//! `status_poll_ms`, `status_window_s`).

use std::time::Duration;

use super::DestinationConfig;
use super::validate::Errors;
use crate::deliver::adapter::Adapter;

pub(super) fn validate(i: usize, d: &DestinationConfig, errs: &mut Errors<'_>) -> Adapter {
    let at = |field: &str| format!("destination[{i}] ({}).{field}", d.name);
    let kind = d.kind.as_deref().unwrap_or("fhir-bundle");
    let unused = |errs: &mut Errors<'_>, field: &str, set: bool| {
        if set {
            errs.push(at(field), format!("is not used by kind = {kind:?}"));
        }
    };
    let adapter = match kind {
        "fhir-bundle" => Adapter::FhirBundle,
        "fhir-rest" => Adapter::FhirRest,
        "vkp" => {
            let orgnr = d.orgnr.clone().unwrap_or_default();
            if orgnr.len() != 9 || !orgnr.bytes().all(|b| b.is_ascii_digit()) {
                errs.push(
                    at("orgnr"),
                    "kind = \"vkp\" needs the municipality's 9-digit organisation number, e.g. \"312229544\"",
                );
            }
            Adapter::Vkp { orgnr }
        }
        "jft" => {
            let poll = d.status_poll_ms.unwrap_or(1000);
            let window = d.status_window_s.unwrap_or(15);
            if poll == 0 {
                errs.push(at("status_poll_ms"), "must be greater than 0");
            }
            if window == 0 || window * 1000 < poll {
                errs.push(
                    at("status_window_s"),
                    "must be greater than 0 and at least one poll",
                );
            }
            Adapter::Jft {
                poll: Duration::from_millis(poll.max(1)),
                window: Duration::from_secs(window),
            }
        }
        "pmd" => {
            let m = d.municipality.clone().unwrap_or_default();
            if !super::validate::is_municipality_number(&m) {
                errs.push(
                    at("municipality"),
                    "kind = \"pmd\" needs the 4-digit municipality number for the Bundle tag, e.g. \"0301\"",
                );
            }
            Adapter::Pmd { municipality: m }
        }
        other => {
            errs.push(
                at("kind"),
                format!("{other:?} is not a destination kind; use fhir-bundle, fhir-rest, vkp, jft or pmd"),
            );
            Adapter::FhirBundle
        }
    };
    unused(errs, "orgnr", d.orgnr.is_some() && kind != "vkp");
    unused(
        errs,
        "municipality",
        d.municipality.is_some() && kind != "pmd",
    );
    unused(
        errs,
        "status_poll_ms",
        d.status_poll_ms.is_some() && kind != "jft",
    );
    unused(
        errs,
        "status_window_s",
        d.status_window_s.is_some() && kind != "jft",
    );
    adapter
}

#[cfg(test)]
mod tests {
    use crate::config::{RawConfig, Source, validate};
    use crate::deliver::adapter::Adapter;

    fn check(extra: &str) -> Result<Adapter, Vec<String>> {
        let text =
            format!("[[destination]]\nname = \"d\"\nurl = \"http://127.0.0.1:1/\"\n{extra}\n");
        let raw: RawConfig = toml::from_str(&text).expect("toml");
        validate(&raw, &Source::defaults())
            .map(|v| v.destinations[0].adapter.clone())
            .map_err(|e| {
                e.into_iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect()
            })
    }

    #[test]
    fn kinds_and_their_keys() {
        assert_eq!(check(""), Ok(Adapter::FhirBundle));
        assert_eq!(check("kind = \"fhir-rest\""), Ok(Adapter::FhirRest));
        assert_eq!(
            check("kind = \"vkp\"\norgnr = \"312229544\""),
            Ok(Adapter::Vkp {
                orgnr: "312229544".into()
            })
        );
        assert!(check("kind = \"vkp\"").is_err_and(|e| e[0].contains("orgnr")));
        assert!(
            check("kind = \"pmd\"\nmunicipality = \"oslo\"")
                .is_err_and(|e| e[0].contains("municipality"))
        );
        assert!(
            check("kind = \"jft\"\norgnr = \"312229544\"")
                .is_err_and(|e| e[0].contains("not used"))
        );
        assert!(check("kind = \"smtp\"").is_err_and(|e| e[0].contains("kind")));
        assert!(matches!(
            check("kind = \"jft\"\nstatus_window_s = 5"),
            Ok(Adapter::Jft { .. })
        ));
    }
}
