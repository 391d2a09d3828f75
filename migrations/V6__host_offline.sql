-- Host status that tells the truth (issue 14): when a host went offline
-- (its shard could not reach it), so it turns idle after
-- host_offline_idle_days; and a generation bumped by each requestCrawl of
-- an offline or idle host, so its shard restarts the task, backoff reset.
ALTER TABLE hosts ADD COLUMN offline_since TIMESTAMPTZ;
ALTER TABLE hosts ADD COLUMN crawl_gen BIGINT NOT NULL DEFAULT 0;
