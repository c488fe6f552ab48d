-- Version 4: escalations of alarm deliveries that missed their destination's deadline, and
-- time-limited device deactivations (see src/journal/alarm.rs and docs/operations.md).
CREATE TABLE IF NOT EXISTS escalations (
    id                   BIGSERIAL PRIMARY KEY,
    -- One escalation per delivery row, inserted in the transaction that adds the fallback
    -- delivery; concurrent scans of several nodes meet on this key (ON CONFLICT DO NOTHING).
    delivery_id          BIGINT NOT NULL UNIQUE,
    event_id             TEXT NOT NULL,
    dest                 TEXT NOT NULL,
    fallback             TEXT,
    fallback_delivery_id BIGINT,
    deadline_ms          BIGINT NOT NULL,
    stored_at            BIGINT NOT NULL,
    escalated_at         BIGINT NOT NULL,
    acked_at             BIGINT,
    acked_by             TEXT,
    ack_note             TEXT
);
CREATE INDEX IF NOT EXISTS escalations_open ON escalations(id) WHERE acked_at IS NULL;
-- The escalation scan: undelivered alarm deliveries by destination and age.
CREATE INDEX IF NOT EXISTS deliveries_alarm_open ON deliveries(dest, created_at)
    WHERE class = 0 AND state IN ('pending', 'dead');
CREATE TABLE IF NOT EXISTS device_deactivations (
    id           BIGSERIAL PRIMARY KEY,
    vendor       TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    from_at      BIGINT NOT NULL,
    until_at     BIGINT NOT NULL,
    reason       TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    ended_at     BIGINT,
    ended_by     TEXT,
    reminded_at  BIGINT,
    expired_at   BIGINT,
    CHECK (until_at > from_at)
);
CREATE INDEX IF NOT EXISTS device_deactivations_device
    ON device_deactivations(vendor, device_id, until_at);
