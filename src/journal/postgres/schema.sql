-- knutepunkt PostgreSQL journal, schema version 1 (applied under an advisory lock).
CREATE TABLE IF NOT EXISTS events (
    seq             BIGSERIAL PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    vendor          TEXT NOT NULL,
    vendor_event_id TEXT,
    idem_key        TEXT,
    category        TEXT NOT NULL,
    priority        TEXT NOT NULL,
    tenant          TEXT,
    key             TEXT NOT NULL,
    lane_class      SMALLINT NOT NULL,
    mapping_version TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    raw             BYTEA NOT NULL,
    fhir            TEXT NOT NULL,
    routed_to       INTEGER NOT NULL,
    received_at     BIGINT NOT NULL,
    stored_at       BIGINT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_vendor_event ON events(vendor, vendor_event_id)
    WHERE vendor_event_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS events_idem ON events(vendor, idem_key) WHERE idem_key IS NOT NULL;

CREATE TABLE IF NOT EXISTS deliveries (
    id           BIGSERIAL PRIMARY KEY,
    event_seq    BIGINT NOT NULL REFERENCES events(seq),
    event_id     TEXT NOT NULL,
    dest         TEXT NOT NULL,
    class        SMALLINT NOT NULL,
    lane_key     TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_status  INTEGER,
    last_error   TEXT,
    created_at   BIGINT NOT NULL,
    delivered_at BIGINT,
    dead_at      BIGINT
);
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries(dest, class, lane_key, id)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries(id) WHERE state = 'dead';
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries(event_seq);

-- head_id = 0 marks an empty lane. Emptied lanes keep their row (removed later by a sweep)
-- so an append racing with the advance of the same lane can never strand a delivery.
CREATE TABLE IF NOT EXISTS lanes (
    dest            TEXT NOT NULL,
    class           SMALLINT NOT NULL,
    lane_key        TEXT NOT NULL,
    head_id         BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    leased          BIGINT NOT NULL DEFAULT 0,
    lease_until     BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (dest, class, lane_key)
);
CREATE INDEX IF NOT EXISTS lanes_ready ON lanes(dest, class, next_attempt_at) WHERE head_id <> 0;

CREATE SEQUENCE IF NOT EXISTS lease_tokens;

CREATE TABLE IF NOT EXISTS audit (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    event_id    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    dest        TEXT,
    attempt     INTEGER,
    status      INTEGER,
    latency_ms  DOUBLE PRECISION,
    detail      TEXT
);
CREATE INDEX IF NOT EXISTS audit_event ON audit(event_id);
