//! NUL characters are refused before any parser runs. No FHIR string may hold one (R4 excludes
//! control characters from strings), and PostgreSQL text columns cannot store one: an event
//! carrying it in its id or key would fail its journal write with 503, and again on every
//! retry, instead of being refused once with 400.

/// Byte offset of the first NUL in `body`: a raw 0x00 byte (never valid in JSON or XML text),
/// or, when `json`, a `\u0000` escape inside a string (`\\u0000` is a backslash and text).
pub fn find(body: &[u8], json: bool) -> Option<usize> {
    let raw = body.iter().position(|&b| b == 0);
    if !json {
        return raw;
    }
    let mut in_string = false;
    let mut i = 0;
    while i < raw.unwrap_or(body.len()) {
        match (in_string, body[i]) {
            (false, b'"') => in_string = true,
            (true, b'"') => in_string = false,
            (true, b'\\') => {
                if body.get(i + 1) == Some(&b'u') && body.get(i + 2..i + 6) == Some(b"0000") {
                    return Some(i);
                }
                // Skip the escaped character, whatever it is.
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::find;

    #[test]
    fn finds_escaped_and_raw_nul() {
        assert_eq!(find(br#"{"a":"x\u0000y"}"#, true), Some(7));
        assert_eq!(find(b"{\"a\":\"x\0\"}", true), Some(7));
        assert_eq!(find(b"<a>x\0</a>", false), Some(4));
        // The first of both kinds.
        assert_eq!(find(b"{\"a\":\"\\u0000\0\"}", true), Some(6));
    }

    #[test]
    fn leaves_lookalikes_alone() {
        // An escaped backslash followed by text, other escapes, and NUL-looking text outside
        // strings or in XML.
        assert_eq!(find(br#"{"a":"\\u0000"}"#, true), None);
        assert_eq!(find(br#"{"a":"\u0001\"\u00000"}"#, true), Some(14));
        assert_eq!(find(br#"{"a":"\u0010"}"#, true), None);
        assert_eq!(find(br#"<a b="\u0000"/>"#, false), None);
        assert_eq!(find(br#"{"a":"x"}"#, true), None);
        assert_eq!(find(b"", true), None);
    }
}
