-- Version 4: the W3C trace context of the ingest span, so delivery spans join its trace.
ALTER TABLE events ADD COLUMN IF NOT EXISTS traceparent TEXT;
-- The retention anchor: chain position and hash of the last audit row deleted by retention;
-- `audit verify` walks the remaining chain from it (see docs/operations.md, "Retention").
CREATE TABLE IF NOT EXISTS audit_anchor (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   BIGINT NOT NULL,
    hash  TEXT NOT NULL,
    at    BIGINT NOT NULL
);
