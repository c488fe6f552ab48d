-- Version 3: the audit hash chain (see src/journal/audit_chain.rs and docs/operations.md).
-- Rows written before it get a negative position: outside the chain, reported as not covered.
ALTER TABLE audit ADD COLUMN IF NOT EXISTS chain_seq BIGINT;
ALTER TABLE audit ADD COLUMN IF NOT EXISTS hash TEXT;
UPDATE audit SET chain_seq = -id WHERE chain_seq IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS audit_chain ON audit(chain_seq);
-- Rows not yet sealed into the chain: only the current transaction's own, until it commits.
CREATE INDEX IF NOT EXISTS audit_unsealed ON audit(id) WHERE chain_seq IS NULL;
-- The chain head, locked FOR UPDATE by every transaction that seals audit rows: one row, so
-- chain positions are handed out in commit order across every writer of every node.
CREATE TABLE IF NOT EXISTS audit_chain_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   BIGINT NOT NULL,
    hash  TEXT NOT NULL
);
INSERT INTO audit_chain_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000')
ON CONFLICT (id) DO NOTHING;
