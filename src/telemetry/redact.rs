//! The one place personal data is removed from anything that leaves the process as text: log
//! lines (through the log formatter in `logging`) and exported span attributes (through the
//! exporter wrapper in `tracing`). Both call [`redact`].
//!
//! What is masked, wherever it appears in a string:
//! - national identity numbers: any run of exactly 11 digits (fødselsnummer, D-nummer,
//!   H-nummer, felles hjelpenummer, synthetic test numbers: no check-digit test, so a mistyped
//!   number is masked too), also written as 6 + 5 digits with one space or hyphen between;
//! - patient names: the string values of name-bearing keys (`family`, `given`, `name`, `text`
//!   of a HumanName, `fornavn`, `etternavn`, `patientName`, a Reference's `display`, …) in JSON
//!   or `key=value` text. Code displays are masked too: over-masking a log line is harmless.
//!
//! Longer digit runs (timestamps in ms, UUID parts) are left alone, so ids stay searchable.

use std::borrow::Cow;

/// What a masked identity number becomes.
pub const ID_MASK: &str = "[fnr]";
/// What a masked name becomes.
pub const NAME_MASK: &str = "[name]";

/// Keys whose string values are personal names (compared case-insensitively).
const NAME_KEYS: &[&str] = &[
    "family",
    "given",
    "name",
    "prefix",
    "suffix",
    "fornavn",
    "etternavn",
    "mellomnavn",
    "navn",
    "patientname",
    "patient_name",
    "firstname",
    "first_name",
    "lastname",
    "last_name",
    "fullname",
    "full_name",
    "displayname",
    // HumanName.text: the whole name.
    "text",
    // A FHIR Reference's display names its target: for `subject`/`patient`, the patient.
    "display",
];

/// `s` with identity numbers and names masked; borrowed when nothing was found.
pub fn redact(s: &str) -> Cow<'_, str> {
    let ids = mask_ids(s);
    match mask_names(&ids) {
        Cow::Borrowed(_) => ids,
        Cow::Owned(o) => Cow::Owned(o),
    }
}

/// Whether `s` still contains something [`redact`] would mask (used by tests).
pub fn contains_identity_number(s: &str) -> bool {
    matches!(mask_ids(s), Cow::Owned(_))
}

fn mask_ids(s: &str) -> Cow<'_, str> {
    let b = s.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() || (i > 0 && b[i - 1].is_ascii_digit()) {
            i += 1;
            continue;
        }
        let run = digits(b, i);
        let end = if run == 11 {
            Some(i + 11)
        } else if run == 6 && matches!(b.get(i + 6), Some(b' ' | b'-')) && digits(b, i + 7) == 5 {
            Some(i + 12)
        } else {
            None
        };
        match end {
            Some(end) => {
                let o = out.get_or_insert_with(|| String::with_capacity(s.len()));
                o.push_str(&s[copied..i]);
                o.push_str(ID_MASK);
                copied = end;
                i = end;
            }
            None => i += run,
        }
    }
    match out {
        None => Cow::Borrowed(s),
        Some(mut o) => {
            o.push_str(&s[copied..]);
            Cow::Owned(o)
        }
    }
}

/// Length of the digit run starting at `i`.
fn digits(b: &[u8], i: usize) -> usize {
    b[i.min(b.len())..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .count()
}

/// Masks `"key": "value"`, `"key": ["a", "b"]`, `key=value` and `key: value` for name keys.
fn mask_names(s: &str) -> Cow<'_, str> {
    let lower = s.to_ascii_lowercase();
    if !NAME_KEYS.iter().any(|k| lower.contains(k)) {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        // A key starts after a non-identifier byte (or a quote).
        if !b[i].is_ascii_alphabetic() || (i > 0 && is_ident(b[i - 1])) {
            i += 1;
            continue;
        }
        let key_end = i + b[i..].iter().take_while(|&&c| is_ident(c)).count();
        let key = &lower[i..key_end];
        if !NAME_KEYS.contains(&key) {
            i = key_end;
            continue;
        }
        // Skip a closing quote, spaces and the separator.
        let mut j = key_end;
        if b.get(j) == Some(&b'\\') {
            j += 1;
        }
        if b.get(j) == Some(&b'"') {
            j += 1;
        }
        while b.get(j) == Some(&b' ') {
            j += 1;
        }
        if !matches!(b.get(j), Some(b':' | b'=')) {
            i = key_end;
            continue;
        }
        j += 1;
        while b.get(j) == Some(&b' ') {
            j += 1;
        }
        let Some(span) = value_span(b, j) else {
            i = key_end;
            continue;
        };
        out.push_str(&s[copied..span.0]);
        out.push_str(NAME_MASK);
        copied = span.1;
        i = span.1;
    }
    if copied == 0 {
        return Cow::Borrowed(s);
    }
    out.push_str(&s[copied..]);
    Cow::Owned(out)
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The byte range of the value at `j` to replace: the inside of a quoted string (also an
/// escaped `\"…\"` one), the inside of an array of strings, or a bare word up to a delimiter.
/// None for values that are not text (objects, numbers, booleans).
fn value_span(b: &[u8], j: usize) -> Option<(usize, usize)> {
    match b.get(j)? {
        b'"' => Some((j + 1, quoted_end(b, j + 1, b'"'))),
        b'\\' if b.get(j + 1) == Some(&b'"') => {
            let start = j + 2;
            let mut k = start;
            while k < b.len() && !(b[k] == b'\\' && b.get(k + 1) == Some(&b'"')) {
                k += 1;
            }
            Some((start, k))
        }
        b'[' => {
            // Only an array of strings; an array of objects (HumanName) is walked key by key.
            let first = b[j + 1..].iter().find(|c| !c.is_ascii_whitespace())?;
            if !matches!(first, b'"' | b'\\') {
                return None;
            }
            let end = j + b[j..].iter().position(|&c| c == b']')?;
            Some((j + 1, end))
        }
        b'{' => None,
        c if c.is_ascii_digit() || *c == b'-' => None,
        _ => {
            let rest = &b[j..];
            if rest.starts_with(b"true") || rest.starts_with(b"false") || rest.starts_with(b"null")
            {
                return None;
            }
            let end = j + rest
                .iter()
                .position(|&c| matches!(c, b',' | b';' | b'&' | b'\n' | b'}' | b')'))
                .unwrap_or(rest.len());
            (end > j).then_some((j, end))
        }
    }
}

/// End of a string starting at `k` (just after its opening quote), honouring `\` escapes.
fn quoted_end(b: &[u8], mut k: usize, quote: u8) -> usize {
    while k < b.len() {
        match b[k] {
            b'\\' => k += 2,
            c if c == quote => return k,
            _ => k += 1,
        }
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_numbers_are_masked_in_every_spelling() {
        assert_eq!(redact("patient 13497248022 fell"), "patient [fnr] fell");
        assert_eq!(redact("x=134972 48022,"), "x=[fnr],");
        assert_eq!(redact("x=134972-48022"), "x=[fnr]");
        assert_eq!(redact("\"value\":\"41019012345\""), "\"value\":\"[fnr]\"");
        assert_eq!(redact("a01019012345b"), "a[fnr]b");
        // Not 11 digits: untouched.
        assert_eq!(redact("at 1732460000123 ms"), "at 1732460000123 ms");
        assert_eq!(redact("tenant 5001, 1234567890"), "tenant 5001, 1234567890");
        assert_eq!(redact("123456789012"), "123456789012");
        assert!(matches!(redact("nothing here"), Cow::Borrowed(_)));
        assert!(!contains_identity_number(&redact(
            "13497248022 and 134972 48022"
        )));
    }

    #[test]
    fn names_are_masked_in_json_and_key_value_text() {
        let json = r#"{"name":[{"family":"Nordmann","given":["Kari","Ola"]}],"id":"p1"}"#;
        assert_eq!(
            redact(json),
            r#"{"name":[{"family":"[name]","given":[[name]]}],"id":"p1"}"#
        );
        assert_eq!(
            redact(r#"{"patientName": "Kari Nordmann", "age": 80}"#),
            r#"{"patientName": "[name]", "age": 80}"#
        );
        assert_eq!(redact("fornavn=Kari etternavn=Nordmann"), "fornavn=[name]");
        assert_eq!(
            redact(r#"body: {\"family\":\"Hansen\"}"#),
            r#"body: {\"family\":\"[name]\"}"#
        );
        // Names of things that are not people's keys stay.
        assert_eq!(
            redact("vendor=scaip category=alarm"),
            "vendor=scaip category=alarm"
        );
        assert_eq!(redact("renamed=ok"), "renamed=ok");
    }
}
