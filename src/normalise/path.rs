//! Field paths in mapping files: `alarm.id`, `readings[0].value`, `lge.geo`, `@attr`.
//!
//! A path is relative to the current item (the whole body unless the mapping iterates over
//! `items`); a leading `$.` (or `$` alone) makes it relative to the body's root.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub from_root: bool,
    pub steps: Vec<Step>,
    pub text: String,
}

impl Path {
    pub fn parse(s: &str) -> Result<Path, String> {
        let text = s.to_string();
        let (from_root, rest) = if s == "$" {
            (true, "")
        } else if let Some(r) = s.strip_prefix("$.") {
            (true, r)
        } else {
            (false, s)
        };
        let mut steps = Vec::new();
        if rest.is_empty() {
            if !from_root {
                return Err("path must not be empty".into());
            }
            return Ok(Path {
                from_root,
                steps,
                text,
            });
        }
        for part in rest.split('.') {
            let (key, mut idx) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if key.is_empty() && idx.is_empty() {
                return Err(format!("empty step in path {s:?}"));
            }
            if !key.is_empty() {
                if key.chars().any(|c| c.is_whitespace() || c == ']') {
                    return Err(format!("invalid step {key:?} in path {s:?}"));
                }
                steps.push(Step::Key(key.to_string()));
            }
            while !idx.is_empty() {
                let close = idx
                    .find(']')
                    .ok_or_else(|| format!("unclosed '[' in path {s:?}"))?;
                let n: usize = idx[1..close]
                    .parse()
                    .map_err(|_| format!("index in path {s:?} must be a number"))?;
                steps.push(Step::Index(n));
                idx = &idx[close + 1..];
                if !idx.is_empty() && !idx.starts_with('[') {
                    return Err(format!("unexpected {idx:?} in path {s:?}"));
                }
            }
        }
        Ok(Path {
            from_root,
            steps,
            text,
        })
    }

    pub fn eval<'a>(&self, root: &'a Value, item: &'a Value) -> Option<&'a Value> {
        let mut cur = if self.from_root { root } else { item };
        for step in &self.steps {
            cur = match step {
                Step::Key(k) => cur.as_object()?.get(k)?,
                Step::Index(i) => cur.as_array()?.get(*i)?,
            };
        }
        Some(cur)
    }

    /// The path as a vendor reads it in an error, relative to the body's root.
    pub fn display(&self, item_prefix: &str) -> String {
        let rel = self.text.strip_prefix("$.").unwrap_or(&self.text);
        if self.from_root || item_prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{item_prefix}.{rel}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_and_eval() {
        let v = json!({"a":{"b":[{"c":1},{"c":2}]},"@x":"y"});
        let p = Path::parse("a.b[1].c").expect("ok");
        assert_eq!(p.eval(&v, &v), Some(&json!(2)));
        assert_eq!(
            Path::parse("@x").expect("ok").eval(&v, &v),
            Some(&json!("y"))
        );
        let item = json!({"c": 3});
        assert_eq!(
            Path::parse("c").expect("ok").eval(&v, &item),
            Some(&json!(3))
        );
        assert_eq!(
            Path::parse("$.a.b[0].c").expect("ok").eval(&v, &item),
            Some(&json!(1))
        );
        assert!(Path::parse("").is_err());
        assert!(Path::parse("a..b").is_err());
        assert!(Path::parse("a[x]").is_err());
        assert!(Path::parse("a[1").is_err());
    }
}
