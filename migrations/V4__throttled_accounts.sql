-- Accounts that appeared on a host already at its account limit: stored,
-- reported as 'throttled', nothing of them relayed, and not counted in the
-- host's account_count until the host has room and admits them.
ALTER TABLE accounts ADD COLUMN throttled BOOLEAN NOT NULL DEFAULT FALSE;
