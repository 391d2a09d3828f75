-- sluice schema v1: hosts, accounts, bans, audit log, relay meta.

CREATE TABLE hosts (
    id            BIGSERIAL PRIMARY KEY,
    hostname      TEXT NOT NULL UNIQUE,
    status        TEXT NOT NULL DEFAULT 'active',   -- active | idle | offline | throttled | banned
    cursor        BIGINT NOT NULL DEFAULT 0,        -- last upstream seq made durable
    account_limit BIGINT NOT NULL DEFAULT 100000,
    account_count BIGINT NOT NULL DEFAULT 0,
    trusted       BOOLEAN NOT NULL DEFAULT FALSE,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE accounts (
    did             TEXT PRIMARY KEY,
    host_id         BIGINT NOT NULL REFERENCES hosts(id),
    status          TEXT NOT NULL DEFAULT 'active',  -- the relay's combined status
    upstream_active BOOLEAN NOT NULL DEFAULT TRUE,
    upstream_status TEXT,
    takendown       BOOLEAN NOT NULL DEFAULT FALSE,
    rev             TEXT,
    commit_cid      BYTEA,
    data_cid        BYTEA,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX accounts_host ON accounts(host_id);

CREATE TABLE domain_bans (
    domain     TEXT PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE admin_audit (
    id         BIGSERIAL PRIMARY KEY,
    at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    action     TEXT NOT NULL,
    subject    TEXT NOT NULL,
    detail     JSONB
);

-- Single-row relay state: the last relay seq made durable.
CREATE TABLE relay_meta (
    id       INT PRIMARY KEY CHECK (id = 1),
    last_seq BIGINT NOT NULL
);
