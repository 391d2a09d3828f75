-- listReposByCollection (issue 23): which accounts hold records of each
-- collection, kept by the db-writer from the stream, durable with the
-- group commit.
--
-- An account gets a number (accounts.no) the first time the index places
-- it; the index is per collection a set of those numbers, stored as
-- compressed bitmaps (roaring's portable format) of 65,536 numbers each.
-- The column is nullable and added without a default: no rewrite of the
-- existing rows, and no bytes per row (the row's alignment has room).

ALTER TABLE accounts ADD COLUMN no INT;
CREATE UNIQUE INDEX accounts_no ON accounts (no) WHERE no IS NOT NULL;

CREATE TABLE collections (
    id   INT PRIMARY KEY,
    nsid TEXT NOT NULL UNIQUE
);

CREATE TABLE collection_chunks (
    collection INT NOT NULL,
    chunk      INT NOT NULL,    -- account numbers chunk * 65536 ..
    bits       BYTEA NOT NULL,  -- a roaring bitmap of the low 16 bits
    PRIMARY KEY (collection, chunk)
);

-- The changes since the chunks were last written, in rounds: each group
-- commit appends its own (small rows, no index); now and then a round
-- writes the changed chunks whole and empties this table, in one
-- transaction. The db-writer's start applies what is here on top of the
-- chunks.
CREATE TABLE collection_changes (
    round      BIGINT NOT NULL,
    collection INT NOT NULL,
    no         INT NOT NULL,
    present    BOOLEAN NOT NULL
);

-- Accounts whose collections the commits cannot tell (a #sync, a repo
-- first seen mid-history, a delete the slice does not decide, the
-- backfill): asked of their PDS, removed when the answer is applied.
CREATE TABLE collection_checks (
    did     UUID PRIMARY KEY,
    host_id INT NOT NULL
);

-- The backfill's position (accounts in key order; NULL: not running).
ALTER TABLE relay_meta ADD COLUMN collections_backfill UUID;
ALTER TABLE relay_meta ADD COLUMN collections_backfill_total BIGINT;
