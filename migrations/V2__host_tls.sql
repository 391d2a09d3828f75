-- How to reach a host: TLS (wss://, the default) or plain text (ws://,
-- only for hosts entered as such or as loopback with allow_insecure_hosts).
ALTER TABLE hosts ADD COLUMN insecure BOOLEAN NOT NULL DEFAULT FALSE;
