//! Small, dependency-free HTML helpers for the console: one escaping function that every value
//! goes through, a page builder that only accepts escaped text or literal markup written in this
//! crate, patient masking, and form/URL encoding for the replay forms.

use std::fmt::Write as _;

/// Escapes text for HTML element content and double- or single-quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A page under construction. Markup is added only with `raw` (for `&'static str` literals
/// written here, so no runtime value can reach it) and values only through `text`, which escapes.
#[derive(Default)]
pub struct Html {
    buf: String,
}

impl Html {
    pub fn new() -> Self {
        Self::default()
    }

    /// Literal markup. Only `'static` strings: runtime values must go through [`Html::text`].
    pub fn raw(&mut self, markup: &'static str) -> &mut Self {
        self.buf.push_str(markup);
        self
    }

    /// A value, escaped.
    pub fn text(&mut self, value: impl std::fmt::Display) -> &mut Self {
        let mut s = String::new();
        let _ = write!(s, "{value}");
        self.buf.push_str(&escape(&s));
        self
    }

    /// Another fragment built the same way (already safe).
    pub fn append(&mut self, other: Html) -> &mut Self {
        self.buf.push_str(&other.buf);
        self
    }

    /// `<td>value</td>`, with `class="bad"` when `bad`.
    pub fn td(&mut self, value: impl std::fmt::Display, bad: bool) -> &mut Self {
        self.raw(if bad { "<td class=\"bad\">" } else { "<td>" })
            .text(value)
            .raw("</td>")
    }

    /// `<a href="href">label</a>`; both escaped.
    pub fn link(&mut self, href: &str, label: impl std::fmt::Display) -> &mut Self {
        self.raw("<a href=\"")
            .text(href)
            .raw("\">")
            .text(label)
            .raw("</a>")
    }

    pub fn into_string(self) -> String {
        self.buf
    }
}

/// What the console shows of a lane key or patient identifier: `patient:` keys keep their first
/// six characters, the rest is replaced by `*****` (an identifier of six characters or fewer is
/// masked entirely). Device keys and anything else are shown as they are.
pub fn mask_key(key: &str) -> String {
    match key.strip_prefix("patient:") {
        Some(id) => format!("patient:{}", mask_patient(id)),
        None => key.to_string(),
    }
}

/// First six characters and `*****`; `******` for an identifier of six characters or fewer.
pub fn mask_patient(id: &str) -> String {
    if id.chars().count() > 6 {
        let head: String = id.chars().take(6).collect();
        format!("{head}*****")
    } else {
        "******".to_string()
    }
}

/// `text` with every occurrence of the patient identifier of `key` masked (for the FHIR JSON).
pub fn mask_in_text(text: &str, key: &str) -> String {
    match key.strip_prefix("patient:") {
        Some(id) if !id.is_empty() => text.replace(id, &mask_patient(id)),
        _ => text.to_string(),
    }
}

/// A duration in milliseconds as short human text: `850 ms`, `12.3 s`, `4 min 5 s`, `2 h 3 min`.
pub fn age(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{} h {} min", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

/// Percent-encodes a query-string component (RFC 3986 unreserved characters stay as they are).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Parses an `application/x-www-form-urlencoded` body (`+` is a space, `%XX` a byte; invalid
/// escapes are kept literally, invalid UTF-8 is replaced).
pub fn parse_form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi * 16 + lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_every_special_character() {
        assert_eq!(
            escape(r#"<script>alert('x') & "y"</script>"#),
            "&lt;script&gt;alert(&#39;x&#39;) &amp; &quot;y&quot;&lt;/script&gt;"
        );
        assert_eq!(escape("plain æøå 123"), "plain æøå 123");
        assert_eq!(escape(""), "");
        // Escaping is not idempotent by design: an already escaped value is shown literally.
        assert_eq!(escape("&amp;"), "&amp;amp;");
    }

    #[test]
    fn builder_escapes_values_but_not_literals() {
        let mut h = Html::new();
        h.raw("<p>")
            .text("<b>\"hi\"</b>")
            .raw("</p>")
            .td("x<y", true)
            .td(42, false)
            .link("/console/events/a\"b", "<id>");
        assert_eq!(
            h.into_string(),
            "<p>&lt;b&gt;&quot;hi&quot;&lt;/b&gt;</p><td class=\"bad\">x&lt;y</td><td>42</td>\
             <a href=\"/console/events/a&quot;b\">&lt;id&gt;</a>"
        );
    }

    #[test]
    fn patient_keys_are_masked() {
        assert_eq!(mask_key("patient:01017012345"), "patient:010170*****");
        assert_eq!(mask_key("patient:123456"), "patient:******");
        assert_eq!(mask_key("patient:"), "patient:******");
        assert_eq!(mask_key("device:abc-123"), "device:abc-123");
        assert_eq!(
            mask_in_text(r#"{"value":"01017012345"}"#, "patient:01017012345"),
            r#"{"value":"010170*****"}"#
        );
        assert_eq!(mask_in_text("device:x", "device:x"), "device:x");
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(-5), "0 ms");
        assert_eq!(age(850), "850 ms");
        assert_eq!(age(12_345), "12.3 s");
        assert_eq!(age(245_000), "4 min 5 s");
        assert_eq!(age(7_380_000), "2 h 3 min");
    }

    #[test]
    fn form_and_url_encoding_round_trip() {
        assert_eq!(
            parse_form("destination=epj&vendor=a+b%26c&limit=&x"),
            vec![
                ("destination".into(), "epj".into()),
                ("vendor".into(), "a b&c".into()),
                ("limit".into(), String::new()),
                ("x".into(), String::new()),
            ]
        );
        assert_eq!(parse_form("v=%zz%4"), vec![("v".into(), "%zz%4".into())]);
        let s = "replayed 2 <dead> letters & more/æ";
        assert_eq!(url_decode(&url_encode(s)), s);
        assert_eq!(url_encode("a b/c"), "a%20b%2Fc");
    }
}
