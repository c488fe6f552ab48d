-- knutepunkt PostgreSQL journal, schema version 2: device registry, device liveness, quarantine.
-- Applied once by the version-2 migration step (under the migration advisory lock), on new
-- databases right after version 1 and on databases already at version 1.

-- Devices assigned to patients for a period [valid_from, valid_to); valid_to NULL = open-ended.
-- Overlaps of one device are refused by the writer under a per-device advisory lock.
CREATE TABLE IF NOT EXISTS device_assignments (
    id          BIGSERIAL PRIMARY KEY,
    vendor      TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    patient_id  TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    valid_from  BIGINT NOT NULL,
    valid_to    BIGINT,
    created_at  BIGINT NOT NULL,
    note        TEXT,
    CHECK (valid_to IS NULL OR valid_to > valid_from)
);
CREATE INDEX IF NOT EXISTS device_assignments_device
    ON device_assignments(vendor, device_id, valid_from);
CREATE INDEX IF NOT EXISTS device_assignments_patient ON device_assignments(patient_id);

CREATE TABLE IF NOT EXISTS device_liveness (
    vendor       TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    tenant       TEXT,
    last_seen_at BIGINT NOT NULL,
    last_kind    TEXT NOT NULL,
    reported_at  BIGINT,
    beats        BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (vendor, device_id)
);

-- Events held back because no assignment covered their device; released_at set on release.
CREATE TABLE IF NOT EXISTS quarantine (
    event_seq        BIGINT PRIMARY KEY REFERENCES events(seq),
    event_id         TEXT NOT NULL UNIQUE,
    device_id        TEXT,
    requested_tenant TEXT,
    reason           TEXT NOT NULL,
    quarantined_at   BIGINT NOT NULL,
    released_at      BIGINT
);
CREATE INDEX IF NOT EXISTS quarantine_open ON quarantine(quarantined_at) WHERE released_at IS NULL;
