-- A command is stamped created_at by insert_commands with clock_timestamp()
-- (so that the commands of one call keep their order), while updated_at
-- took the transaction's start, now(): a fresh command showed an updated_at
-- a few milliseconds before its created_at. The default is filled in after
-- the inserted values are computed, so updated_at >= created_at.

-- +goose Up
ALTER TABLE commands ALTER COLUMN updated_at SET DEFAULT clock_timestamp();

-- +goose Down
ALTER TABLE commands ALTER COLUMN updated_at SET DEFAULT now();
