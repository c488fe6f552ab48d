-- knutepunkt embedded journal, schema version 2 (every statement is idempotent: the whole file
-- runs at each start, so a version-1 journal gains the version-2 tables on upgrade).
CREATE TABLE IF NOT EXISTS events (
    seq             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    vendor          TEXT NOT NULL,
    vendor_event_id TEXT,
    idem_key        TEXT,
    category        TEXT NOT NULL,
    priority        TEXT NOT NULL,
    tenant          TEXT,
    key             TEXT NOT NULL,
    lane_class      INTEGER NOT NULL,
    mapping_version TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    raw             BLOB NOT NULL,
    fhir            TEXT NOT NULL,
    routed_to       INTEGER NOT NULL,
    received_at     INTEGER NOT NULL,
    stored_at       INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_vendor_event ON events(vendor, vendor_event_id)
    WHERE vendor_event_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS events_idem ON events(vendor, idem_key) WHERE idem_key IS NOT NULL;

CREATE TABLE IF NOT EXISTS deliveries (
    id           INTEGER PRIMARY KEY,
    event_seq    INTEGER NOT NULL REFERENCES events(seq),
    event_id     TEXT NOT NULL,
    dest         TEXT NOT NULL,
    class        INTEGER NOT NULL,
    lane_key     TEXT NOT NULL,
    -- pending | delivered | dead | replayed
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_status  INTEGER,
    last_error   TEXT,
    created_at   INTEGER NOT NULL,
    delivered_at INTEGER,
    dead_at      INTEGER
);
-- Finds a lane's next pending delivery; small because finished rows leave it.
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries(dest, class, lane_key, id)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries(id) WHERE state = 'dead';
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries(event_seq);

CREATE TABLE IF NOT EXISTS lanes (
    dest            TEXT NOT NULL,
    class           INTEGER NOT NULL,
    lane_key        TEXT NOT NULL,
    head_id         INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    -- 0 = free, else the lease token of the worker delivering the head
    leased          INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dest, class, lane_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lanes_ready ON lanes(dest, class, leased, next_attempt_at);

CREATE TABLE IF NOT EXISTS audit (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    event_id    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    dest        TEXT,
    attempt     INTEGER,
    status      INTEGER,
    latency_ms  REAL,
    detail      TEXT
);
CREATE INDEX IF NOT EXISTS audit_event ON audit(event_id);

-- Version 2: device registry, device liveness, quarantine.

-- Devices assigned to patients for a period [valid_from, valid_to); valid_to NULL = open-ended.
-- The writer refuses overlapping periods of one device (at most one patient at a time).
CREATE TABLE IF NOT EXISTS device_assignments (
    id          INTEGER PRIMARY KEY,
    vendor      TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    patient_id  TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    valid_from  INTEGER NOT NULL,
    valid_to    INTEGER,
    created_at  INTEGER NOT NULL,
    note        TEXT
);
CREATE INDEX IF NOT EXISTS device_assignments_device
    ON device_assignments(vendor, device_id, valid_from);
CREATE INDEX IF NOT EXISTS device_assignments_patient ON device_assignments(patient_id);

CREATE TABLE IF NOT EXISTS device_liveness (
    vendor       TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    tenant       TEXT,
    last_seen_at INTEGER NOT NULL,
    last_kind    TEXT NOT NULL,
    reported_at  INTEGER,
    beats        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (vendor, device_id)
) WITHOUT ROWID;

-- Events held back because no assignment covered their device; released_at set on release.
CREATE TABLE IF NOT EXISTS quarantine (
    event_seq        INTEGER PRIMARY KEY REFERENCES events(seq),
    event_id         TEXT NOT NULL UNIQUE,
    device_id        TEXT,
    requested_tenant TEXT,
    reason           TEXT NOT NULL,
    quarantined_at   INTEGER NOT NULL,
    released_at      INTEGER
);
CREATE INDEX IF NOT EXISTS quarantine_open ON quarantine(quarantined_at) WHERE released_at IS NULL;
