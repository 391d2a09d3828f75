-- When the DID document behind an account's current host was fetched (unix
-- micros; common::policy): an event from another host moves the account
-- only on a newer document, so a lagging old host cannot move it back.
ALTER TABLE accounts ADD COLUMN host_checked_micros BIGINT NOT NULL DEFAULT 0;
