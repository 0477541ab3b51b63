-- The floor's row and inseam's PostgreSQL outbox as migrated (crates/inseam-sql/src/sql.rs),
-- with variants that leave out indexes. Used by run.sh.
CREATE TABLE floor_events (stream TEXT NOT NULL, version BIGINT NOT NULL, payload JSONB NOT NULL,
    PRIMARY KEY (stream, version));
CREATE TABLE o_full (message_id TEXT COLLATE "C" PRIMARY KEY, name TEXT NOT NULL,
    version BIGINT NOT NULL, msg_key TEXT COLLATE "C", envelope BYTEA NOT NULL,
    created_at BIGINT NOT NULL, stream TEXT COLLATE "C", stream_version BIGINT,
    correlation_id TEXT COLLATE "C",
    tx BIGINT NOT NULL DEFAULT CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT),
    position BIGSERIAL, groups TEXT COLLATE "C");
CREATE INDEX ON o_full (created_at);
CREATE UNIQUE INDEX ON o_full (stream, stream_version) WHERE stream IS NOT NULL;
CREATE INDEX ON o_full (created_at, stream, stream_version) WHERE stream IS NOT NULL;
CREATE INDEX ON o_full (correlation_id, created_at);
CREATE INDEX ON o_full (position) WHERE groups IS NOT NULL;
CREATE INDEX ON o_full (tx, position) WHERE groups IS NOT NULL;
CREATE TABLE o_noreplay (LIKE o_full INCLUDING DEFAULTS);
ALTER TABLE o_noreplay ADD PRIMARY KEY (message_id);
CREATE INDEX ON o_noreplay (created_at);
CREATE UNIQUE INDEX ON o_noreplay (stream, stream_version) WHERE stream IS NOT NULL;
CREATE INDEX ON o_noreplay (correlation_id, created_at);
CREATE INDEX ON o_noreplay (position) WHERE groups IS NOT NULL;
CREATE INDEX ON o_noreplay (tx, position) WHERE groups IS NOT NULL;
CREATE TABLE o_min (LIKE o_full INCLUDING DEFAULTS);
ALTER TABLE o_min ADD PRIMARY KEY (message_id);
CREATE UNIQUE INDEX ON o_min (stream, stream_version) WHERE stream IS NOT NULL;
