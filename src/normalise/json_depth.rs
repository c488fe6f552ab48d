//! Nesting-depth check done on raw bytes before any parser builds a tree, so a hostile
//! 100k-deep body costs one linear scan and no recursion.

/// Returns the deepest `[`/`{` nesting in `bytes`, ignoring brackets inside strings.
/// Stops early and returns `limit + 1` once the limit is passed.
pub fn max_depth(bytes: &[u8], limit: usize) -> usize {
    let mut depth = 0usize;
    let mut deepest = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > deepest {
                    deepest = depth;
                    if deepest > limit {
                        return deepest;
                    }
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::max_depth;

    #[test]
    fn counts_nesting_and_ignores_strings() {
        assert_eq!(max_depth(br#"{"a":[1,{"b":2}]}"#, 64), 3);
        assert_eq!(max_depth(br#"{"a":"[[[[{{{{\"]]"}"#, 64), 1);
        assert_eq!(max_depth(b"42", 64), 0);
    }

    #[test]
    fn stops_past_limit() {
        let deep = "[".repeat(100_000);
        assert_eq!(max_depth(deep.as_bytes(), 64), 65);
    }
}
