-- +goose Up
-- Notifications: messages to one user, persisted and delivered live on the
-- user's topic.
CREATE TABLE IF NOT EXISTS notifications (
    id         uuid PRIMARY KEY,
    org_id     uuid REFERENCES organizations (id) ON DELETE CASCADE,
    owner_id   uuid,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind       text NOT NULL,
    title      text NOT NULL,
    body       text NOT NULL DEFAULT '',
    data       jsonb NOT NULL DEFAULT '{}',
    read_at    timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS notifications_user_idx ON notifications (user_id, (read_at IS NULL) DESC, created_at DESC);

-- The kinds of notification a user muted.
ALTER TABLE users ADD COLUMN IF NOT EXISTS muted_kinds jsonb NOT NULL DEFAULT '[]';

-- +goose Down
ALTER TABLE users DROP COLUMN IF EXISTS muted_kinds;
DROP TABLE IF EXISTS notifications;
