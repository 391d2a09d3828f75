-- Events the db-writer holds while it asks an account's PDS whether the
-- account is active (a commit of an account stored inactive, and the
-- account's later events from that host behind it), durable with the
-- group commit that made the host's cursor pass them: a crash while an
-- answer is due loses none of them. A few at a time (8 MiB at most).
CREATE TABLE held_events (
    did    TEXT NOT NULL,
    n      INT NOT NULL,       -- order within the account's list
    record BYTEA NOT NULL,     -- the ring record as read (common::ipc::ringrec)
    PRIMARY KEY (did, n)
);
