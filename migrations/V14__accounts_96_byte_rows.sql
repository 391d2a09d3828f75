-- Accounts in 96-byte rows (issue 22): 72 bytes of data instead of 80, so
-- 80 rows fit a page instead of 74 (102 bytes an account instead of 111).
-- Three columns shrink; what each loses is written where it is decoded
-- (dbwriter::db::accounts):
--   host_checked  int8 microseconds -> int4 whole seconds since
--                 2024-01-01 (0: never), rounded down; the in-memory
--                 state keeps microseconds, so only a state read back
--                 from here is coarser, and rounding down can only let a
--                 move through that the exact time would have held
--                 (never hold one it would have let through).
--   host_id, flags -> `host`: the host's id times 256 plus the flags
--                 (active 1, taken down 2, throttled 4, has a data CID 8,
--                 the upstream status's code times 16). Host ids stay
--                 below 2^23 (8,388,608): `hosts` checks it, and the
--                 db-writer no longer takes an id for a host it knows.
--   data_fp       int4 -> int2: 16 bits of the data CID's digest; "none"
--                 is the flag, so every value is a fingerprint. A chain
--                 break is only counted, and is missed one time in 65,536.
-- The table is written anew, as V12 did, so it starts compact; every row
-- is kept.

DO $$
BEGIN
    IF (SELECT COALESCE(max(id), 0) FROM hosts) >= 8388608 THEN
        RAISE EXCEPTION 'a host id reaches 8388608 (2^23): V14 packs host ids below it into accounts.host';
    END IF;
END $$;

-- Ids that a repeated requestCrawl took from the sequence (ON CONFLICT
-- took one each time) were never given to a row, and hosts are never
-- deleted: the sequence goes on from the largest id in use.
SELECT setval(pg_get_serial_sequence('hosts', 'id'), COALESCE(max(id), 0) + 1, false) FROM hosts;

ALTER TABLE accounts RENAME TO accounts_v13;
DROP INDEX accounts_takendown;
DROP INDEX accounts_no;

CREATE TABLE accounts (
    did             UUID PRIMARY KEY,
    rev             BIGINT NOT NULL DEFAULT 0,
    host_checked    INT NOT NULL DEFAULT 0,
    host            INT NOT NULL,
    no              INT NOT NULL DEFAULT 0,
    data_fp         SMALLINT NOT NULL DEFAULT 0,
    commit_cid      BYTEA NOT NULL DEFAULT '',
    upstream_status TEXT NOT NULL DEFAULT ''
) WITH (fillfactor = 98);

INSERT INTO accounts (did, rev, host_checked, host, no, data_fp, commit_cid, upstream_status)
SELECT did, rev,
       GREATEST(0, LEAST(2147483647, host_checked / 1000000 - 1704067200))::int,
       host_id * 256 + (flags & 247) + (CASE WHEN data_fp <> 0 THEN 8 ELSE 0 END),
       no,
       (data_fp >> 16)::smallint,
       commit_cid, upstream_status
FROM accounts_v13;

DROP TABLE accounts_v13;
CREATE INDEX accounts_takendown ON accounts (did) WHERE (host & 2) <> 0;
CREATE UNIQUE INDEX accounts_no ON accounts (no) WHERE no <> 0;
ALTER TABLE hosts ADD CONSTRAINT hosts_id_fits_accounts_host CHECK (id < 8388608);
