-- One type per status (issue 12): the values common::host::HostStatus and
-- common::policy::AccountStatus name, and no others. The raw word a host
-- sent for an account (upstream_status) stays free text.
ALTER TABLE hosts ADD CONSTRAINT hosts_status_known
    CHECK (status IN ('active', 'idle', 'offline', 'throttled', 'banned'));
ALTER TABLE accounts ADD CONSTRAINT accounts_status_known
    CHECK (status IN ('active', 'takendown', 'suspended', 'deleted', 'deactivated', 'desynchronized', 'throttled'));
