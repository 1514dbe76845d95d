-- A schedule created with "enabled": false was stored enabled: the API
-- writes a column its hook set only when the value is not the zero value,
-- and false fell back to the column's default, true. The default is now
-- false, so what is written is what was asked (the API's create still
-- enables a schedule unless told otherwise).

-- +goose Up
ALTER TABLE schedules ALTER COLUMN enabled SET DEFAULT false;
UPDATE schedules SET enabled = false WHERE enabled AND next_run_at IS NULL;

-- +goose Down
ALTER TABLE schedules ALTER COLUMN enabled SET DEFAULT true;
