-- requestCrawl open to the public or admin-only, as set at run time by the
-- admin API; NULL means the config's public_request_crawl decides.
ALTER TABLE relay_meta ADD COLUMN request_crawl BOOLEAN;
