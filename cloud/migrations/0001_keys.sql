-- tandem-cloud key store, schema version 1 (issue 13; TDM-KEY-4, TDM-KEY-9).
-- Applied once by tandem_cloud::pg_store under an advisory lock; recorded in
-- tandem_schema_migrations. Times are microseconds since the Unix epoch.
CREATE TABLE tandem_keys (
    peer        BYTEA    NOT NULL CHECK (octet_length(peer) = 32),      -- device identity (certificate hash)
    key_id      BYTEA    NOT NULL CHECK (octet_length(key_id) = 32),    -- protocol key id
    mode        SMALLINT NOT NULL,                                      -- output mode (0 no-key, 1 packed)
    he_key_id   BYTEA    NOT NULL CHECK (octet_length(he_key_id) = 32), -- key id the ciphertexts carry
    blob        BYTEA    NOT NULL,                                      -- evaluation-key blob
    size_bytes  BIGINT   NOT NULL,
    created_us  BIGINT   NOT NULL,
    last_use_us BIGINT   NOT NULL,
    PRIMARY KEY (peer, key_id)
);
-- Expiry sweeps scan by last use.
CREATE INDEX tandem_keys_last_use ON tandem_keys (last_use_us);
