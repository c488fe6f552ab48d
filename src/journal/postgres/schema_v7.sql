-- Version 7: the retention anchor: chain position and hash of the last audit row deleted by
-- retention; `audit verify` walks the remaining chain from it (docs/operations.md, "Retention").
CREATE TABLE IF NOT EXISTS audit_anchor (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   BIGINT NOT NULL,
    hash  TEXT NOT NULL,
    at    BIGINT NOT NULL
);
