//! Vendor XML (e.g. SCAIP `<mrq>`) to a JSON tree, so the same path rules apply to both.
//!
//! Conversion: an element with only text becomes a string; an element with child elements or
//! attributes becomes an object (`@name` for attributes, `$text` for mixed text); repeated
//! children become arrays. Namespace prefixes are dropped (local names only).
//!
//! Safety: DTDs are refused (so no entity can be declared, let alone expanded), only the five
//! predefined entities and character references are resolved, depth and element count are capped,
//! and the input must be UTF-8.

use quick_xml::events::Event;
use quick_xml::{Reader, XmlVersion};
use serde_json::{Map, Value};

use super::MapError;

pub const MAX_ELEMENTS: usize = 10_000;

struct Frame {
    name: String,
    attrs: Map<String, Value>,
    children: Map<String, Value>,
    text: String,
}

impl Frame {
    fn into_value(self) -> Value {
        if self.children.is_empty() && self.attrs.is_empty() {
            return Value::String(self.text);
        }
        let mut m = self.attrs;
        for (k, v) in self.children {
            m.insert(k, v);
        }
        if !self.text.trim().is_empty() {
            m.insert("$text".into(), Value::String(self.text));
        }
        Value::Object(m)
    }
}

fn local(name: &str) -> String {
    name.rsplit(':').next().unwrap_or(name).to_string()
}

fn add_child(parent: &mut Map<String, Value>, name: String, v: Value) {
    match parent.get_mut(&name) {
        None => {
            parent.insert(name, v);
        }
        Some(Value::Array(a)) => a.push(v),
        Some(existing) => {
            let prev = existing.take();
            *existing = Value::Array(vec![prev, v]);
        }
    }
}

fn predefined(name: &str) -> Option<char> {
    Some(match name {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "apos" => '\'',
        "quot" => '"',
        _ => return None,
    })
}

/// Default for `ingest.max_xml_depth`.
pub const MAX_DEPTH: usize = 32;

/// Parses a document with the default depth limit; returns the root element name and its value.
pub fn parse(body: &[u8]) -> Result<(String, Value), MapError> {
    parse_with_depth(body, MAX_DEPTH)
}

/// Parses a document, refusing element nesting deeper than `max_depth`. The reader is
/// streaming and the open elements live on a heap stack, so depth never recurses.
pub fn parse_with_depth(body: &[u8], max_depth: usize) -> Result<(String, Value), MapError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| MapError::Malformed("XML body is not UTF-8".into()))?;
    let mut reader = Reader::from_str(text);
    reader.config_mut().trim_text(false);
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<(String, Value)> = None;
    let mut count = 0usize;
    let err = |reader: &Reader<&[u8]>, e: &dyn std::fmt::Display| {
        MapError::Malformed(format!(
            "invalid XML at byte {}: {e}",
            reader.buffer_position()
        ))
    };
    loop {
        let ev = reader.read_event().map_err(|e| err(&reader, &e))?;
        match ev {
            Event::Start(ref s) | Event::Empty(ref s) => {
                if root.is_some() {
                    return Err(MapError::Malformed("content after the root element".into()));
                }
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(MapError::Malformed(format!(
                        "more than {MAX_ELEMENTS} XML elements"
                    )));
                }
                if stack.len() >= max_depth {
                    return Err(MapError::Malformed(format!(
                        "XML nesting deeper than {max_depth} levels (ingest.max_xml_depth)"
                    )));
                }
                let name = local(s.local_name().as_ref());
                let mut attrs = Map::new();
                for a in s.attributes() {
                    let a = a.map_err(|e| err(&reader, &e))?;
                    let key = local(a.key.local_name().as_ref());
                    if a.key.as_ref().starts_with("xmlns") {
                        continue;
                    }
                    let v = a
                        .normalized_value(XmlVersion::Implicit1_0)
                        .map_err(|e| err(&reader, &e))?;
                    attrs.insert(format!("@{key}"), Value::String(v.into_owned()));
                }
                let frame = Frame {
                    name,
                    attrs,
                    children: Map::new(),
                    text: String::new(),
                };
                if matches!(ev, Event::Empty(_)) {
                    close(&mut stack, &mut root, frame);
                } else {
                    stack.push(frame);
                }
            }
            Event::End(_) => {
                let frame = stack
                    .pop()
                    .ok_or_else(|| MapError::Malformed("unbalanced XML end tag".into()))?;
                close(&mut stack, &mut root, frame);
            }
            Event::Text(t) => {
                let content = t.xml10_content();
                match stack.last_mut() {
                    Some(f) => f.text.push_str(&content),
                    None if content.trim().is_empty() => {}
                    None => {
                        return Err(MapError::Malformed("text outside the root element".into()));
                    }
                }
            }
            Event::CData(c) => {
                let content = c.xml10_content();
                match stack.last_mut() {
                    Some(f) => f.text.push_str(&content),
                    None => {
                        return Err(MapError::Malformed("CDATA outside the root element".into()));
                    }
                }
            }
            Event::GeneralRef(r) => {
                let ch = if r.is_char_ref() {
                    r.resolve_char_ref().map_err(|e| err(&reader, &e))?
                } else {
                    predefined(&r.xml10_content())
                };
                let Some(ch) = ch else {
                    return Err(MapError::Malformed(format!(
                        "unknown XML entity &{};",
                        r.xml10_content()
                    )));
                };
                match stack.last_mut() {
                    Some(f) => f.text.push(ch),
                    None => {
                        return Err(MapError::Malformed(
                            "entity outside the root element".into(),
                        ));
                    }
                }
            }
            Event::DocType(_) => {
                return Err(MapError::Malformed(
                    "XML document type declarations (DTDs) are not accepted".into(),
                ));
            }
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(MapError::Malformed("XML ended inside an element".into()));
    }
    root.ok_or_else(|| MapError::Malformed("XML body has no root element".into()))
}

fn close(stack: &mut [Frame], root: &mut Option<(String, Value)>, frame: Frame) {
    let name = frame.name.clone();
    let v = frame.into_value();
    match stack.last_mut() {
        Some(parent) => add_child(&mut parent.children, name, v),
        None => *root = Some((name, v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaip_like_to_json() {
        let (root, v) = parse(
            b"<?xml version=\"1.0\"?><mrq><ref>7F</ref><cid> 4711002</cid>\
              <lge><geo>63.4,10.3</geo></lge><x a=\"1\"/><tnu>1</tnu><tnu>2</tnu><t>a &amp; &#66;</t></mrq>",
        )
        .expect("parses");
        assert_eq!(root, "mrq");
        assert_eq!(v["ref"], "7F");
        assert_eq!(v["cid"], " 4711002");
        assert_eq!(v["lge"]["geo"], "63.4,10.3");
        assert_eq!(v["x"]["@a"], "1");
        assert_eq!(v["tnu"][1], "2");
        assert_eq!(v["t"], "a & B");
    }

    #[test]
    fn refuses_dangerous_or_broken_xml() {
        let laughs =
            b"<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\">]><mrq>&lol;</mrq>";
        assert!(matches!(parse(laughs), Err(MapError::Malformed(m)) if m.contains("DTD")));
        assert!(
            matches!(parse(b"<mrq>&xxe;</mrq>"), Err(MapError::Malformed(m)) if m.contains("entity"))
        );
        assert!(parse(b"<mrq><ref>1</mrq>").is_err());
        assert!(parse(b"").is_err());
        assert!(parse(b"<a/><b/>").is_err());
        assert!(parse(b"\xff\xfe<mrq/>").is_err());
        let deep = format!("{}{}", "<a>".repeat(100), "</a>".repeat(100));
        assert!(
            matches!(parse(deep.as_bytes()), Err(MapError::Malformed(m)) if m.contains("deeper"))
        );
    }
}
