//! The audit trail's hash chain: every audit row carries `chain_seq` (its position, 1, 2, …) and
//! `hash` = SHA-256 over the previous row's hash and the row's canonical content, so editing,
//! removing or inserting a row breaks the chain at that row. Backends compute the hash when they
//! write (see each writer); [`verify`] walks a chain read from either backend.
//!
//! Canonical content (version 1): a domain tag, the previous hash (hex), then `chain_seq`, `at`,
//! `event_id`, `kind`, `dest`, `attempt`, `status`, `latency_ms`, `detail`, each as a presence
//! byte plus a fixed-width big-endian integer, IEEE-754 bits, or length-prefixed UTF-8 — no
//! separator ambiguity, and `NULL` differs from an empty string. The row's `id` is not hashed
//! (PostgreSQL assigns it before the chain position is known); `chain_seq` is.

use sha2::{Digest, Sha256};

/// The "previous hash" of the first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit row as hashed and verified.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChainRow {
    pub id: i64,
    /// Position in the chain; `None` for a row that is not in it.
    pub chain_seq: Option<i64>,
    pub hash: Option<String>,
    pub at: i64,
    pub event_id: String,
    pub kind: String,
    pub dest: Option<String>,
    pub attempt: Option<i64>,
    pub status: Option<i64>,
    pub latency_ms: Option<f64>,
    pub detail: Option<String>,
}

/// The content fields of a row, borrowed (what a writer has at hand).
pub struct Content<'a> {
    pub seq: i64,
    pub at: i64,
    pub event_id: &'a str,
    pub kind: &'a str,
    pub dest: Option<&'a str>,
    pub attempt: Option<i64>,
    pub status: Option<i64>,
    pub latency_ms: Option<f64>,
    pub detail: Option<&'a str>,
}

impl ChainRow {
    pub fn content(&self, seq: i64) -> Content<'_> {
        Content {
            seq,
            at: self.at,
            event_id: &self.event_id,
            kind: &self.kind,
            dest: self.dest.as_deref(),
            attempt: self.attempt,
            status: self.status,
            latency_ms: self.latency_ms,
            detail: self.detail.as_deref(),
        }
    }
}

/// `hex(SHA-256(tag ‖ prev ‖ canonical content))`.
pub fn row_hash(prev: &str, c: &Content<'_>) -> String {
    let mut h = Sha256::new();
    h.update(b"knutepunkt-audit-v1\0");
    h.update(prev.as_bytes());
    h.update(c.seq.to_be_bytes());
    h.update(c.at.to_be_bytes());
    text(&mut h, Some(c.event_id));
    text(&mut h, Some(c.kind));
    text(&mut h, c.dest);
    int(&mut h, c.attempt);
    int(&mut h, c.status);
    match c.latency_ms {
        Some(v) => {
            h.update([1]);
            h.update(v.to_bits().to_be_bytes());
        }
        None => h.update([0]),
    }
    text(&mut h, c.detail);
    hex(&h.finalize())
}

fn text(h: &mut Sha256, v: Option<&str>) {
    match v {
        Some(s) => {
            h.update([1]);
            h.update((s.len() as u64).to_be_bytes());
            h.update(s.as_bytes());
        }
        None => h.update([0]),
    }
}

fn int(h: &mut Sha256, v: Option<i64>) {
    match v {
        Some(n) => {
            h.update([1]);
            h.update(n.to_be_bytes());
        }
        None => h.update([0]),
    }
}

/// Lowercase hex of `bytes` (also used for certificate serials and fingerprints).
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// The result of walking a chain.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every chained row follows from the one before. `head` is the last (seq, hash): record it
    /// elsewhere to detect a later truncation of the tail.
    Intact {
        rows: u64,
        head: Option<(i64, String)>,
        /// Rows written before the chain existed (schema upgrade), not covered.
        legacy: u64,
    },
    /// The first row at which the chain breaks.
    Broken {
        id: i64,
        seq: Option<i64>,
        what: String,
    },
}

/// Walks rows in `chain_seq` order (legacy rows, `chain_seq <= 0`, and rows outside the chain,
/// `chain_seq` NULL, may come in any position) and reports the first break.
pub fn verify(rows: impl IntoIterator<Item = ChainRow>) -> Verdict {
    let mut w = Walker::default();
    for row in rows {
        if let Some(broken) = w.push(row) {
            return broken;
        }
    }
    w.finish()
}

/// [`verify`] one row at a time (for rows streamed from a database).
pub struct Walker {
    prev: String,
    expected: i64,
    count: u64,
    legacy: u64,
    outside: Option<ChainRow>,
}

impl Default for Walker {
    fn default() -> Self {
        Self {
            prev: GENESIS.to_string(),
            expected: 1,
            count: 0,
            legacy: 0,
            outside: None,
        }
    }
}

impl Walker {
    /// A walk that starts after a retention anchor: the rows up to position `seq` were deleted
    /// by retention and `hash` is the hash of the last of them, so the first remaining row must
    /// be at `seq + 1` and chain onto `hash`.
    pub fn anchored(seq: i64, hash: String) -> Self {
        Self {
            prev: hash,
            expected: seq + 1,
            ..Self::default()
        }
    }

    /// Checks the next row; `Some` at the first break.
    pub fn push(&mut self, row: ChainRow) -> Option<Verdict> {
        let Some(seq) = row.chain_seq else {
            self.outside.get_or_insert(row);
            return None;
        };
        if seq <= 0 {
            self.legacy += 1;
            return None;
        }
        let expected = self.expected;
        if seq != expected {
            let what = if seq > expected {
                let last = if seq - 1 > expected {
                    format!("..{}", seq - 1)
                } else {
                    String::new()
                };
                format!(
                    "{} row(s) missing before this one: chain position {expected}{last} not \
                     found (deleted); this row is at position {seq}",
                    seq - expected
                )
            } else {
                format!("chain position {seq} appears twice (expected {expected})")
            };
            return Some(Verdict::Broken {
                id: row.id,
                seq: Some(seq),
                what,
            });
        }
        let computed = row_hash(&self.prev, &row.content(seq));
        let stored = row.hash.clone().unwrap_or_default();
        if computed != stored {
            return Some(Verdict::Broken {
                id: row.id,
                seq: Some(seq),
                what: format!(
                    "stored hash {} does not match the hash of the row's content and the previous \
                     row's hash ({}): this row was edited (or the one before it was rewritten \
                     with a new hash)",
                    short(&stored),
                    short(&computed)
                ),
            });
        }
        self.prev = stored;
        self.expected += 1;
        self.count += 1;
        None
    }

    pub fn finish(self) -> Verdict {
        if let Some(row) = self.outside {
            return Verdict::Broken {
                id: row.id,
                seq: None,
                what: "row has no chain position (inserted outside the journal writer, or its \
                       chain position was cleared)"
                    .into(),
            };
        }
        Verdict::Intact {
            rows: self.count,
            head: (self.count > 0).then(|| (self.expected - 1, self.prev)),
            legacy: self.legacy,
        }
    }
}

fn short(h: &str) -> &str {
    if h.is_empty() {
        "(none)"
    } else {
        &h[..h.len().min(16)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<ChainRow> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|i| {
                let mut r = ChainRow {
                    id: i + 100,
                    chain_seq: Some(i),
                    at: i * 10,
                    event_id: format!("e{i}"),
                    kind: "received".into(),
                    latency_ms: (i % 2 == 0).then_some(1.5),
                    ..Default::default()
                };
                let h = row_hash(&prev, &r.content(i));
                r.hash = Some(h.clone());
                prev = h;
                r
            })
            .collect()
    }

    #[test]
    fn intact_chain_verifies() {
        let rows = chain(5);
        let head = rows[4].hash.clone().unwrap();
        assert_eq!(
            verify(rows),
            Verdict::Intact {
                rows: 5,
                head: Some((5, head)),
                legacy: 0
            }
        );
    }

    #[test]
    fn edit_is_reported_at_the_row() {
        let mut rows = chain(5);
        rows[2].detail = Some("x".into());
        assert!(matches!(
            verify(rows),
            Verdict::Broken {
                id: 103,
                seq: Some(3),
                ..
            }
        ));
    }

    #[test]
    fn deletion_is_reported_at_the_next_row() {
        let mut rows = chain(5);
        rows.remove(1);
        match verify(rows) {
            Verdict::Broken { id, seq, what } => {
                assert_eq!((id, seq), (103, Some(3)));
                assert!(what.contains("position 2"), "{what}");
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn null_and_empty_differ() {
        let a = Content {
            seq: 1,
            at: 0,
            event_id: "e",
            kind: "k",
            dest: None,
            attempt: None,
            status: None,
            latency_ms: None,
            detail: None,
        };
        let b = Content {
            dest: Some(""),
            ..a
        };
        assert_ne!(row_hash(GENESIS, &a), row_hash(GENESIS, &b));
    }
}
