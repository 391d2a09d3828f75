-- Accounts at network scale (issue 22): about 41 million rows, so each
-- takes under 150 bytes with its index, an event's write touches no
-- indexed column (HOT updates, in the room fillfactor leaves), and taken
-- down accounts are found through a partial index. Every existing row is
-- kept.
--
-- The DID is its 16-byte key, a UUID column (common::atproto::did::
-- DidKey::stored: a did:plc's own 15 bytes behind a tag; for any other DID
-- a tag and 15 bytes of its SHA-256, the DID itself in `dids`). The rev is
-- the TID's number, the commit CID its sha-256 digest, the data CID 32
-- bits of it (whether the next prevData follows: a chain break is only
-- counted). flags: 1 upstream active, 2 taken down, 4 throttled, bits 4-7
-- the upstream status word's code (common::atproto::policy::
-- UpstreamStatus); a word the lexicons do not know is kept as the host
-- said in upstream_status.

CREATE FUNCTION sluice_did_key(did TEXT) RETURNS UUID
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    acc INT := 0;
    bits INT := 0;
    v INT;
    c INT;
    out BYTEA := '\x01'::BYTEA;
BEGIN
    IF did !~ '^did:plc:[a-z2-7]{24}$' THEN
        RETURN encode('\x02'::BYTEA || substr(sha256(convert_to(did, 'UTF8')), 1, 15), 'hex')::UUID;
    END IF;
    FOR i IN 9..32 LOOP
        c := ascii(substr(did, i, 1));
        v := CASE WHEN c >= 97 THEN c - 97 ELSE c - 50 + 26 END;
        acc := ((acc << 5) | v) & 8191;
        bits := bits + 5;
        IF bits >= 8 THEN
            bits := bits - 8;
            out := out || set_byte('\x00'::BYTEA, 0, (acc >> bits) & 255);
        END IF;
    END LOOP;
    RETURN encode(out, 'hex')::UUID;
END $$;

CREATE FUNCTION sluice_tid_value(tid TEXT) RETURNS BIGINT
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    v BIGINT := 0;
BEGIN
    IF tid !~ '^[234567a-j][234567a-z]{12}$' THEN
        RETURN NULL;
    END IF;
    FOR i IN 1..13 LOOP
        v := (v << 5) | (strpos('234567abcdefghijklmnopqrstuvwxyz', substr(tid, i, 1)) - 1);
    END LOOP;
    RETURN v;
END $$;

CREATE TABLE dids (
    key UUID PRIMARY KEY,
    did TEXT NOT NULL
);

ALTER TABLE accounts RENAME TO accounts_v9;
CREATE TABLE accounts (
    did             UUID PRIMARY KEY,
    rev             BIGINT,
    host_checked    BIGINT NOT NULL DEFAULT 0,
    host_id         INT NOT NULL,
    data_fp         INT,
    flags           SMALLINT NOT NULL,
    commit_cid      BYTEA,
    upstream_status TEXT
) WITH (fillfactor = 95);

INSERT INTO dids (key, did)
SELECT sluice_did_key(did), did FROM accounts_v9 WHERE did !~ '^did:plc:[a-z2-7]{24}$';

INSERT INTO accounts (did, rev, host_checked, host_id, data_fp, flags, commit_cid, upstream_status)
SELECT
    sluice_did_key(did),
    sluice_tid_value(rev),
    host_checked_micros,
    host_id,
    CASE WHEN length(data_cid) = 36 THEN
        (get_byte(data_cid, 4) << 24) | (get_byte(data_cid, 5) << 16) | (get_byte(data_cid, 6) << 8) | get_byte(data_cid, 7)
    END,
    (CASE WHEN upstream_active THEN 1 ELSE 0 END
     | CASE WHEN takendown THEN 2 ELSE 0 END
     | CASE WHEN throttled THEN 4 ELSE 0 END
     | (CASE
            WHEN upstream_status IS NULL OR upstream_status = '' THEN 0
            WHEN upstream_status = 'active' THEN 1
            WHEN upstream_status = 'takendown' THEN 2
            WHEN upstream_status = 'suspended' THEN 3
            WHEN upstream_status = 'deleted' THEN 4
            WHEN upstream_status = 'deactivated' THEN 5
            WHEN upstream_status = 'desynchronized' THEN 6
            WHEN upstream_status = 'throttled' THEN 7
            ELSE 15
        END << 4))::SMALLINT,
    CASE WHEN length(commit_cid) = 36 THEN substr(commit_cid, 5, 32) END,
    CASE WHEN upstream_status NOT IN ('', 'active', 'takendown', 'suspended', 'deleted', 'deactivated',
                                      'desynchronized', 'throttled') THEN upstream_status END
FROM accounts_v9;

DROP TABLE accounts_v9;
CREATE INDEX accounts_takendown ON accounts (did) WHERE (flags & 2) <> 0;

-- An account limit an operator set for a host wins over its kind's
-- (trusted_hosts or the default); a limit other than the old default was
-- an operator's.
ALTER TABLE hosts ADD COLUMN account_limit_set BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE hosts SET account_limit_set = TRUE WHERE account_limit <> 100000;
