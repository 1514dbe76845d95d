-- +goose Up
-- Every principal (user, agent), organization and role has one id here.
CREATE TABLE IF NOT EXISTS entities (
    id         uuid PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('user', 'organization', 'role', 'agent')),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS users (
    id            uuid PRIMARY KEY REFERENCES entities (id) ON DELETE CASCADE,
    email         text NOT NULL,
    name          text NOT NULL,
    password_hash text NOT NULL,
    is_superadmin boolean NOT NULL DEFAULT false,
    disabled      boolean NOT NULL DEFAULT false,
    -- Bumped to revoke every access token of the user at once.
    token_version bigint NOT NULL DEFAULT 1,
    default_org_id uuid,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    version       bigint NOT NULL DEFAULT 1
);
CREATE UNIQUE INDEX IF NOT EXISTS users_email_key ON users (lower(email));

-- An organization is its own tenant: org_id = id.
CREATE TABLE IF NOT EXISTS organizations (
    id         uuid PRIMARY KEY REFERENCES entities (id) ON DELETE CASCADE,
    org_id     uuid NOT NULL,
    owner_id   uuid NOT NULL REFERENCES users (id),
    name       text NOT NULL,
    org_max_in_flight integer,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    version    bigint NOT NULL DEFAULT 1,
    CHECK (org_id = id)
);

ALTER TABLE users DROP CONSTRAINT IF EXISTS users_default_org_fk;
ALTER TABLE users ADD CONSTRAINT users_default_org_fk
    FOREIGN KEY (default_org_id) REFERENCES organizations (id) ON DELETE SET NULL;

CREATE TABLE IF NOT EXISTS roles (
    id          uuid PRIMARY KEY REFERENCES entities (id) ON DELETE CASCADE,
    org_id      uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    owner_id    uuid NOT NULL,
    name        text NOT NULL,
    description text NOT NULL DEFAULT '',
    builtin     boolean NOT NULL DEFAULT false,
    permissions jsonb NOT NULL DEFAULT '[]',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    version     bigint NOT NULL DEFAULT 1,
    UNIQUE (org_id, name)
);

CREATE TABLE IF NOT EXISTS memberships (
    id         uuid PRIMARY KEY,
    org_id     uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    owner_id   uuid NOT NULL,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role_id    uuid NOT NULL REFERENCES roles (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    version    bigint NOT NULL DEFAULT 1,
    UNIQUE (org_id, user_id)
);
CREATE INDEX IF NOT EXISTS memberships_user_idx ON memberships (user_id);

-- Refresh tokens: one row per issued token; a family is one login session.
-- Reusing a rotated token revokes its whole family.
CREATE TABLE IF NOT EXISTS refresh_tokens (
    id         uuid PRIMARY KEY,
    family_id  uuid NOT NULL,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash bytea NOT NULL UNIQUE,
    expires_at timestamptz NOT NULL,
    rotated_at timestamptz,
    revoked_at timestamptz,
    ip         text NOT NULL DEFAULT '',
    user_agent text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS refresh_tokens_family_idx ON refresh_tokens (family_id);
CREATE INDEX IF NOT EXISTS refresh_tokens_user_idx ON refresh_tokens (user_id);

-- API keys authenticate a user's automation or an agent, in one organization.
CREATE TABLE IF NOT EXISTS api_keys (
    id           uuid PRIMARY KEY,
    org_id       uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    owner_id     uuid NOT NULL,
    entity_id    uuid NOT NULL REFERENCES entities (id) ON DELETE CASCADE,
    name         text NOT NULL,
    prefix       text NOT NULL UNIQUE,
    secret_hash  bytea NOT NULL,
    permissions  jsonb NOT NULL DEFAULT '[]',
    expires_at   timestamptz,
    last_used_at timestamptz,
    revoked_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    version      bigint NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS api_keys_entity_idx ON api_keys (entity_id);

-- Allow and deny rules. resource_id NULL covers every resource of the type.
CREATE TABLE IF NOT EXISTS acl_entries (
    id            uuid PRIMARY KEY,
    org_id        uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    resource_type text NOT NULL,
    resource_id   uuid,
    action        text NOT NULL,
    principal_id  uuid NOT NULL REFERENCES entities (id) ON DELETE CASCADE,
    effect        text NOT NULL CHECK (effect IN ('allow', 'deny')),
    created_by    uuid,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (org_id, resource_type, resource_id, action, principal_id, effect)
);
CREATE INDEX IF NOT EXISTS acl_entries_lookup_idx ON acl_entries (org_id, resource_type, principal_id, resource_id);

-- Security-relevant actions and every denied decision.
CREATE TABLE IF NOT EXISTS audit_log (
    id            bigserial PRIMARY KEY,
    org_id        uuid,
    actor_id      uuid,
    actor_kind    text NOT NULL DEFAULT '',
    action        text NOT NULL,
    resource_type text NOT NULL DEFAULT '',
    resource_id   uuid,
    outcome       text NOT NULL,
    reason        text NOT NULL DEFAULT '',
    ip            text NOT NULL DEFAULT '',
    user_agent    text NOT NULL DEFAULT '',
    request_id    text NOT NULL DEFAULT '',
    details       jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS audit_log_org_idx ON audit_log (org_id, created_at DESC);

-- +goose Down
DROP TABLE IF EXISTS audit_log;
DROP TABLE IF EXISTS acl_entries;
DROP TABLE IF EXISTS api_keys;
DROP TABLE IF EXISTS refresh_tokens;
DROP TABLE IF EXISTS memberships;
DROP TABLE IF EXISTS roles;
ALTER TABLE IF EXISTS users DROP CONSTRAINT IF EXISTS users_default_org_fk;
DROP TABLE IF EXISTS organizations;
DROP TABLE IF EXISTS users;
DROP TABLE IF EXISTS entities;
