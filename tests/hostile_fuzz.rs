//! Property tests for the parsers on the ingest path that `normalise_fuzz.rs` only reaches through
//! a mapping: the JSON depth pre-check, the XML reader fed hostile constructs, date-times in every
//! format and zone, and national identity numbers. Properties: never a panic; a refusal is a
//! typed error; an accepted value satisfies its rule. (Header parsing is fuzzed next to the code,
//! in `src/ingest/header_fuzz.rs`; whole bodies through every mapping in `normalise_fuzz.rs`.)
//!
//! Bounded by case count: `PROPTEST_CASES=20000 cargo test --test hostile_fuzz` runs longer
//! (docs/security.md, "Fuzzing").

use knutepunkt::normalise::datetime::{self, TimeFormat, Zone};
use knutepunkt::normalise::identity::{check_digits, parse_person_id};
use knutepunkt::normalise::json_depth::max_depth;
use knutepunkt::normalise::{MapError, xml};
use proptest::prelude::*;
use serde_json::Value;

/// `PROPTEST_CASES` when set, else a small default so the suite stays fast.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default),
        ..ProptestConfig::default()
    }
}

/// Nesting depth of a parsed JSON value, counted as the byte scanner counts brackets.
fn value_depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(value_depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        // Strings full of brackets, quotes and escapes: the scanner must skip them.
        "[\\[\\]{}\"\\\\a-z ]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(12, 128, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[\\[{\"a-z]{0,4}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Bytes that look like JSON: brackets, quotes, escapes, and some noise.
fn jsonish() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop::sample::select(vec![
            b'[', b']', b'{', b'}', b'"', b'\\', b':', b',', b'1', b'a', b' ', 0xff,
        ]),
        0..400,
    )
}

/// Pieces of hostile XML. `Dtd` and `Undeclared` make any document that contains them invalid.
#[derive(Debug, Clone)]
enum Piece {
    Open(u8),
    Close(u8),
    Empty(u8),
    Attr(u8),
    Text,
    Predefined,
    CharRef,
    CData,
    Comment,
    Pi,
    Dtd,
    Undeclared,
}

impl Piece {
    fn render(&self, out: &mut String) {
        match self {
            Piece::Open(n) => out.push_str(&format!("<e{n}>")),
            Piece::Close(n) => out.push_str(&format!("</e{n}>")),
            Piece::Empty(n) => out.push_str(&format!("<e{n}/>")),
            Piece::Attr(n) => out.push_str(&format!("<e{n} a=\"1\" b:c='&lt;' d=\"&#x41;\">")),
            Piece::Text => out.push_str("text "),
            Piece::Predefined => out.push_str("&amp;&lt;&quot;"),
            Piece::CharRef => out.push_str("&#65;&#x1F600;"),
            Piece::CData => out.push_str("<![CDATA[<!DOCTYPE x [<!ENTITY y \"z\">]> &y;]]>"),
            Piece::Comment => out.push_str("<!-- &lol; <!ENTITY -->"),
            Piece::Pi => out.push_str("<?pi data?>"),
            Piece::Dtd => out.push_str(
                "<!DOCTYPE e0 [<!ENTITY lol \"lol\"><!ENTITY x SYSTEM \"file:///etc/passwd\">]>",
            ),
            Piece::Undeclared => out.push_str("&lol;"),
        }
    }
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        4 => (0u8..3).prop_map(Piece::Open),
        4 => (0u8..3).prop_map(Piece::Close),
        2 => (0u8..3).prop_map(Piece::Empty),
        2 => (0u8..3).prop_map(Piece::Attr),
        2 => Just(Piece::Text),
        1 => Just(Piece::Predefined),
        1 => Just(Piece::CharRef),
        1 => Just(Piece::CData),
        1 => Just(Piece::Comment),
        1 => Just(Piece::Pi),
        1 => Just(Piece::Dtd),
        1 => Just(Piece::Undeclared),
    ]
}

fn zone() -> impl Strategy<Value = Zone> {
    prop_oneof![
        Just(Zone::Utc),
        Just(Zone::EuropeOslo),
        (-14 * 60..=14 * 60).prop_map(Zone::Fixed),
    ]
}

fn format() -> impl Strategy<Value = TimeFormat> {
    prop::sample::select(vec![
        TimeFormat::Iso,
        TimeFormat::EpochMs,
        TimeFormat::EpochS,
    ])
}

/// Strings near the accepted date-time shapes, plus anything.
fn timeish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}([.,][0-9]{0,12})?)?)?(Z|[+-][0-9]{2}(:?[0-9]{2})?)?",
        "-?[0-9]{1,20}",
        "\\PC{0,40}",
    ]
}

proptest! {
    #![proptest_config(config(256))]

    /// The scanner's depth is the parsed value's depth, whatever the strings contain.
    #[test]
    fn json_depth_matches_the_parsed_value(v in arb_json()) {
        let bytes = serde_json::to_vec(&v).expect("serializes");
        prop_assert_eq!(max_depth(&bytes, 1_000), value_depth(&v));
        let pretty = serde_json::to_vec_pretty(&v).expect("serializes");
        prop_assert_eq!(max_depth(&pretty, 1_000), value_depth(&v));
    }

    /// Never under-counts: whatever the scanner lets through (depth ≤ 64), serde_json parses
    /// without reaching its own recursion limit (128), so no parser recursion is unbounded.
    #[test]
    fn json_depth_never_lets_deep_input_through(b in jsonish(), deep in 0usize..3000) {
        let mut b = b;
        b.splice(0..0, std::iter::repeat_n(b'[', deep));
        let d = max_depth(&b, 64);
        prop_assert!(d <= 65);
        if d <= 64 {
            if let Err(e) = serde_json::from_slice::<Value>(&b) {
                prop_assert!(!e.to_string().contains("recursion limit"), "{e}");
            }
        } else {
            let openers = b.iter().filter(|&&c| c == b'[' || c == b'{').count();
            prop_assert!(openers > 64, "depth {} from {} openers", d, openers);
        }
    }

    #[test]
    fn hostile_xml_is_refused_or_yields_a_tree(
        pieces in prop::collection::vec(piece(), 0..60),
        depth in 1usize..8,
    ) {
        let mut doc = String::new();
        for p in &pieces {
            p.render(&mut doc);
        }
        match xml::parse_with_depth(doc.as_bytes(), depth) {
            Ok((root, value)) => {
                prop_assert!(!root.is_empty());
                prop_assert!(serde_json::to_string(&value).is_ok());
                // Each element adds at most two levels (object, array of repeats).
                prop_assert!(value_depth(&value) <= 2 * depth + 1, "{doc}");
                prop_assert!(
                    !pieces.iter().any(|p| matches!(p, Piece::Dtd | Piece::Undeclared)),
                    "accepted a DTD or an undeclared entity: {doc}"
                );
            }
            Err(MapError::Malformed(m)) => prop_assert!(!m.is_empty()),
            Err(e) => prop_assert!(false, "XML reader gave a non-syntax error {e:?}"),
        }
    }

    #[test]
    fn xml_arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = xml::parse_with_depth(&b, 4);
    }

    /// Accepted times are in range and print as FHIR text that parses back to the same instant.
    #[test]
    fn datetimes_round_trip_or_are_refused(s in timeish(), f in format(), z in zone()) {
        match datetime::parse(&s, f, z) {
            Ok(dt) => {
                prop_assert!(!dt.text.is_empty());
                let again = datetime::parse(&dt.text, TimeFormat::Iso, Zone::Utc)
                    .map_err(|e| TestCaseError::fail(format!("{s:?} → {:?}: {e}", dt.text)))?;
                prop_assert_eq!(again.epoch_ms, dt.epoch_ms, "{:?} → {:?}", s, dt.text);
            }
            Err(m) => prop_assert!(!m.is_empty()),
        }
    }

    /// Accepted numbers are 11 digits with correct check digits; refusals never echo a full
    /// 11-digit number (error messages reach OperationOutcomes and logs).
    #[test]
    fn identity_numbers_are_checked_and_masked(
        s in prop_oneof!["[0-9]{11}", "[0-9 .]{9,16}", "\\PC{0,20}"],
        synthetic in any::<bool>(),
    ) {
        match parse_person_id(&s, synthetic) {
            Ok(id) => {
                prop_assert_eq!(id.value.len(), 11);
                let d: Vec<u32> = id.value.bytes().map(|b| u32::from(b - b'0')).collect();
                prop_assert_eq!(check_digits(&d[..9]), Some((d[9], d[10])));
                prop_assert!(synthetic || !id.synthetic);
            }
            Err(m) => {
                let digits: String = s.chars().filter(char::is_ascii_digit).collect();
                prop_assert!(digits.len() < 11 || !m.contains(&digits), "{m}");
            }
        }
    }
}

/// Valid identity numbers built from their rule are all accepted (the checker is not just
/// refusing everything).
#[test]
fn constructed_identity_numbers_are_accepted() {
    let mut accepted = 0;
    for first9 in [
        [1, 3, 0, 9, 7, 2, 4, 8, 0],
        [0, 1, 0, 1, 9, 0, 1, 2, 3],
        [4, 1, 0, 1, 9, 0, 1, 2, 3],
    ] {
        if let Some((k1, k2)) = check_digits(&first9) {
            let s: String = first9
                .iter()
                .chain([k1, k2].iter())
                .map(|d| char::from(b'0' + *d as u8))
                .collect();
            assert!(parse_person_id(&s, false).is_ok(), "{s}");
            accepted += 1;
        }
    }
    assert!(accepted >= 2);
}
