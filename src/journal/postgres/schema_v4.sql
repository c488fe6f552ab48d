-- Version 4: the W3C trace context of the ingest span, so delivery spans join its trace.
ALTER TABLE events ADD COLUMN IF NOT EXISTS traceparent TEXT;
