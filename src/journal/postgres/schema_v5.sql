-- Version 5: FHIR subscriptions (R5 Backport IG on R4), their numbered events, and the pull
-- feed's journaling acknowledgements (see src/journal/subs.rs).
CREATE TABLE IF NOT EXISTS subscriptions (
    id              TEXT PRIMARY KEY,
    topic           TEXT NOT NULL,
    tenant          TEXT,
    patient         TEXT,
    code            TEXT,
    endpoint        TEXT NOT NULL,
    payload         TEXT NOT NULL,
    heartbeat_s     BIGINT NOT NULL,
    timeout_s       BIGINT NOT NULL,
    max_count       BIGINT NOT NULL,
    headers         TEXT NOT NULL,
    resource        TEXT NOT NULL,
    status          TEXT NOT NULL,
    events          BIGINT NOT NULL DEFAULT 0,
    delivered       BIGINT NOT NULL DEFAULT 0,
    handshake_done  BOOLEAN NOT NULL DEFAULT FALSE,
    failures        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    last_sent_at    BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT,
    lease_until     BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS subscriptions_topic ON subscriptions(topic);
CREATE TABLE IF NOT EXISTS subscription_events (
    sub_id   TEXT NOT NULL,
    event_no BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    at       BIGINT NOT NULL,
    PRIMARY KEY (sub_id, event_no)
);
CREATE TABLE IF NOT EXISTS feed_acks (
    event_id   TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    reason     TEXT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_feed ON audit(chain_seq) WHERE kind IN ('stored', 'released');
