//! Property tests for the request headers ingest parses itself (Content-Type, X-Tenant,
//! Idempotency-Key): any header bytes a client can send either yield a value that satisfies the
//! documented rule or a typed refusal naming the header. Never a panic.
//!
//! Case count: `PROPTEST_CASES` (default here 256); see docs/security.md, "Fuzzing".

use axum::http::{HeaderMap, HeaderValue, header};
use proptest::prelude::*;

use super::{check_content_type, idempotency_key, requested_tenant};
use crate::api_error::ApiError;
use crate::normalise::{VendorSpec, load_vendor_file};

fn spec(file: &str) -> VendorSpec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("mappings")
        .join(file);
    load_vendor_file(&path).expect("mapping loads")
}

/// Header values as a client can put them on the wire: any visible bytes, tabs, obs-text.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..120),
        "[ -~]{0,80}".prop_map(String::into_bytes),
        prop::sample::select(vec![
            "application/json",
            "application/fhir+json; charset=utf-8",
            " Application/XML ;q=1",
            "text/xml;",
            "application/scaip+xml",
            "0301",
            " 5001 ",
            "9999",
            "03011",
            "",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
    ]
}

fn headers_with(name: header::HeaderName, bytes: &[u8]) -> Option<HeaderMap> {
    // `http` refuses control bytes in values, exactly as hyper does on the wire.
    let v = HeaderValue::from_bytes(bytes).ok()?;
    let mut h = HeaderMap::new();
    h.insert(name, v);
    Some(h)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn content_type_is_accepted_only_from_the_documented_set(b in header_bytes()) {
        let Some(h) = headers_with(header::CONTENT_TYPE, &b) else { return Ok(()) };
        for (file, allowed) in [
            ("fhir-passthrough.toml", &["application/fhir+json", "application/json"][..]),
            ("scaip.toml", &["application/xml", "text/xml", "application/scaip+xml"][..]),
        ] {
            match check_content_type(&spec(file), &h) {
                Ok(essence) => prop_assert!(allowed.contains(&essence.as_str()), "{essence}"),
                Err(ApiError::UnsupportedMediaType { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected refusal {e:?}"),
            }
        }
    }

    #[test]
    fn tenant_is_four_digits_from_the_allow_list(b in header_bytes()) {
        let Some(h) = headers_with(header::HeaderName::from_static("x-tenant"), &b) else {
            return Ok(());
        };
        let mut limited = spec("fhir-passthrough.toml");
        limited.tenants = vec!["0301".into(), "5001".into()];
        for s in [spec("fhir-passthrough.toml"), limited] {
            match requested_tenant(&s, &h) {
                Ok(Some(t)) => {
                    prop_assert!(t.len() == 4 && t.bytes().all(|c| c.is_ascii_digit()), "{t}");
                    prop_assert!(s.tenants.is_empty() || s.tenants.contains(&t));
                }
                Ok(None) => prop_assert!(false, "header present but no tenant"),
                Err(ApiError::BadRequest { field, .. } | ApiError::Forbidden { field, .. }) => {
                    prop_assert_eq!(field, "X-Tenant");
                }
                Err(e) => prop_assert!(false, "unexpected refusal {e:?}"),
            }
        }
    }

    #[test]
    fn idempotency_key_is_trimmed_and_bounded(b in header_bytes()) {
        let Some(h) = headers_with(header::HeaderName::from_static("idempotency-key"), &b) else {
            return Ok(());
        };
        match idempotency_key(&h) {
            Ok(Some(k)) => {
                prop_assert!(!k.is_empty() && k.len() <= 200);
                prop_assert_eq!(k.trim(), k.as_str());
            }
            Ok(None) => prop_assert!(false, "header present but no key"),
            Err(ApiError::BadRequest { field, .. }) => prop_assert_eq!(field, "Idempotency-Key"),
            Err(e) => prop_assert!(false, "unexpected refusal {e:?}"),
        }
    }
}
