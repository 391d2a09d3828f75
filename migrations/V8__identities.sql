-- Identities at network scale (issue 21): what the relay resolved for each
-- DID it verified, so a restart, a shard restart or a reshard asks the
-- directory again for nothing it knows, and the PLC export it follows.
--
-- Compact on purpose (tens of millions of rows): the DID as its 16-byte
-- key (common::atproto::did::DidKey::stored, a did:plc's own bytes), the
-- signing key as its curve code and compressed point (34 bytes), the PDS
-- endpoint as a number into pds_endpoints (a few thousand distinct ones
-- network-wide).
CREATE TABLE pds_endpoints (
    id  SERIAL PRIMARY KEY,
    url TEXT NOT NULL UNIQUE
);
CREATE TABLE identities (
    did    UUID PRIMARY KEY,
    as_of  BIGINT NOT NULL,   -- unix micros the document is known current at
    pds_id INT,               -- pds_endpoints.id; NULL: no #atproto_pds service
    key    BYTEA,             -- NULL: the document has no usable #atproto key
    handle TEXT
);
-- Where the PLC export was read up to (its createdAt; NULL: not yet).
ALTER TABLE relay_meta ADD COLUMN plc_cursor TEXT;
