-- The idemq dedup table: one row per (scope, key).
--
-- This file is a template, embedded with `sqlx::migrate!` and applied by
-- `PostgresDedupStore::migrate`, which replaces {{table}} and
-- {{expires_index}} with the validated, double-quoted identifiers of the
-- configured table (default `idemq_dedup`). It is not meant for
-- `sqlx migrate run`; use `PostgresDedupStore::migration_sql` to get the
-- rendered statements for your own migration tool.
CREATE TABLE IF NOT EXISTS {{table}} (
    scope       text        NOT NULL,
    key         text        NOT NULL,
    -- 'claimed' | 'released' | 'done' | 'dead'
    state       text        NOT NULL CHECK (state IN ('claimed', 'released', 'done', 'dead')),
    -- fencing token of the current (or last) owner
    token       bigint      NOT NULL,
    -- attempts counted so far; a won claim is an attempt
    attempts    integer     NOT NULL CHECK (attempts >= 0),
    -- the claim is exclusive until then (database clock)
    lease_until timestamptz NOT NULL,
    -- the row is dead weight from then on: treated as absent, purged
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);

-- Keeps `purge` (expired rows first) cheap.
CREATE INDEX IF NOT EXISTS {{expires_index}} ON {{table}} (expires_at);
