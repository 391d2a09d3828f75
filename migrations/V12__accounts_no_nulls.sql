-- Accounts without NULLs (issue 22): a row with any NULL carries a null
-- bitmap, and that pushes its 23-byte header from 24 to 32 bytes: 8 of
-- the row's ~110 bytes, 8.4 with the fillfactor's room, the difference
-- between 153 and 145 bytes an account at 10 million rows. So every column
-- is NOT NULL and "none" is a value no real row holds:
--   rev 0               no rev (a TID's number is never 0 in practice;
--                       any rev is after it, as after none)
--   data_fp 0           no data CID (a real one whose 32 bits are 0, one
--                       in 2^32, loses one chain check: only counted)
--   commit_cid ''       no commit
--   upstream_status ''  no word beyond the code in flags
--   no 0                not numbered by the collection index
-- (dbwriter::db::accounts maps them to and from `None`.) The table is
-- written anew as V10 did, so it starts compact; every row is kept.

ALTER TABLE accounts RENAME TO accounts_v11;
DROP INDEX accounts_takendown;
DROP INDEX accounts_no;

CREATE TABLE accounts (
    did             UUID PRIMARY KEY,
    rev             BIGINT NOT NULL DEFAULT 0,
    host_checked    BIGINT NOT NULL DEFAULT 0,
    host_id         INT NOT NULL,
    data_fp         INT NOT NULL DEFAULT 0,
    flags           SMALLINT NOT NULL,
    commit_cid      BYTEA NOT NULL DEFAULT '',
    upstream_status TEXT NOT NULL DEFAULT '',
    no              INT NOT NULL DEFAULT 0
) WITH (fillfactor = 95);

INSERT INTO accounts (did, rev, host_checked, host_id, data_fp, flags, commit_cid, upstream_status, no)
SELECT did, COALESCE(rev, 0), host_checked, host_id, COALESCE(data_fp, 0), flags, COALESCE(commit_cid, ''),
       COALESCE(upstream_status, ''), COALESCE(no, 0)
FROM accounts_v11;

DROP TABLE accounts_v11;
CREATE INDEX accounts_takendown ON accounts (did) WHERE (flags & 2) <> 0;
CREATE UNIQUE INDEX accounts_no ON accounts (no) WHERE no <> 0;
