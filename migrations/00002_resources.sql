-- +goose Up
-- Templates: parameter sets of a kind, inheriting from a parent of the same
-- kind; resolving merges the chain root-first (JSON merge patch).
CREATE TABLE IF NOT EXISTS templates (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    owner_id    uuid NOT NULL,
    kind        text NOT NULL,
    name        text NOT NULL,
    description text NOT NULL DEFAULT '',
    parent_id   uuid REFERENCES templates (id) ON DELETE RESTRICT,
    params      jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    version     bigint NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS templates_org_kind_idx ON templates (org_id, kind);
CREATE INDEX IF NOT EXISTS templates_parent_idx ON templates (parent_id);

-- Environments: named variables and write-only secrets (encrypted at rest)
-- that commands of the agents using them see.
CREATE TABLE IF NOT EXISTS environments (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    owner_id    uuid NOT NULL,
    name        text NOT NULL,
    description text NOT NULL DEFAULT '',
    template_id uuid REFERENCES templates (id) ON DELETE SET NULL,
    overrides   jsonb NOT NULL DEFAULT '{}',
    params      jsonb NOT NULL DEFAULT '{}',
    secrets     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    version     bigint NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS environments_org_idx ON environments (org_id, created_at);

-- Agents are principals (they hold API keys) and resources.
CREATE TABLE IF NOT EXISTS agents (
    id             uuid PRIMARY KEY REFERENCES entities (id) ON DELETE CASCADE,
    org_id         uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    owner_id       uuid NOT NULL,
    name           text NOT NULL,
    description    text NOT NULL DEFAULT '',
    status         text NOT NULL DEFAULT 'idle' CHECK (status IN ('idle', 'busy', 'error', 'disabled')),
    environment_id uuid REFERENCES environments (id) ON DELETE SET NULL,
    template_id    uuid REFERENCES templates (id) ON DELETE SET NULL,
    overrides      jsonb NOT NULL DEFAULT '{}',
    config         jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    version        bigint NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS agents_org_idx ON agents (org_id, created_at);

-- +goose Down
DROP TABLE IF EXISTS agents;
DROP TABLE IF EXISTS environments;
DROP TABLE IF EXISTS templates;
