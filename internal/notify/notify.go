// Package notify is agentry's notification system (the seed's
// NotificationSystem): any service can notify a user; the notification is
// stored, delivered live on the user's topic, listable and markable read.
// Users mute kinds they do not want.
package notify

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"github.com/agentry/agentry/internal/batch"
	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/platform"
)

// Notification is one message to one user.
type Notification struct {
	ID        string              `db:"id" json:"id" format:"uuid"`
	OrgID     *string             `db:"org_id" json:"org_id,omitempty" format:"uuid"`
	OwnerID   *string             `db:"owner_id" json:"sender_id,omitempty" format:"uuid" doc:"Who sent it; absent for the platform."`
	UserID    string              `db:"user_id" json:"user_id" format:"uuid"`
	Kind      string              `db:"kind" json:"kind" doc:"What it is about: command.succeeded, command.failed, or any kind a sender chooses."`
	Title     string              `db:"title" json:"title"`
	Body      string              `db:"body" json:"body"`
	Data      platform.JSONObject `db:"data" json:"data"`
	ReadAt    *time.Time          `db:"read_at" json:"read_at,omitempty"`
	CreatedAt time.Time           `db:"created_at" json:"created_at"`
}

// Service stores and delivers notifications.
type Service struct {
	DB     *sqlx.DB
	Events *events.Bus
	Logger *slog.Logger

	// Linger, if set before the first Notify, is how long a notification
	// waits for others to be stored with (see batch.Batcher.Linger).
	Linger time.Duration

	once   sync.Once
	stores *batch.Batcher[Notification, *Notification]
}

// Notify stores n and delivers it live, unless its recipient muted its
// kind. It returns the stored notification, or nil when muted.
// Notifications sent at once (commands ending together) are stored in one
// statement.
func (s *Service) Notify(ctx context.Context, n Notification) (*Notification, error) {
	n.ID = uuid.NewString()
	if n.Data == nil {
		n.Data = platform.JSONObject{}
	}
	s.once.Do(func() {
		s.stores = batch.New(1, 64, s.store)
		s.stores.Linger = s.Linger
	})
	out, err := s.stores.Do(n)
	if err != nil || out == nil {
		return nil, err
	}
	if err := s.Events.Publish(ctx, "notification", out, events.UserTopic(n.UserID)); err != nil {
		s.Logger.WarnContext(ctx, "notification stored but not delivered live", "id", out.ID, "err", err)
	}
	return out, nil
}

// store stores notifications whose recipients did not mute their kinds; the
// result is in the order of ns, nil for a muted one.
func (s *Service) store(ctx context.Context, ns []Notification) ([]*Notification, error) {
	k := len(ns)
	ids, users, kinds, titles, bodies, data := make([]string, k), make([]string, k), make([]string, k), make([]string, k), make([]string, k), make([]string, k)
	orgs, owners := make([]sql.NullString, k), make([]sql.NullString, k)
	for i, n := range ns {
		raw, err := json.Marshal(n.Data)
		if err != nil {
			return nil, err
		}
		ids[i], users[i], kinds[i], titles[i], bodies[i], data[i] = n.ID, n.UserID, n.Kind, n.Title, n.Body, string(raw)
		if n.OrgID != nil {
			orgs[i] = sql.NullString{String: *n.OrgID, Valid: true}
		}
		if n.OwnerID != nil {
			owners[i] = sql.NullString{String: *n.OwnerID, Valid: true}
		}
	}
	var rows []*Notification
	// Stores each notification unless its user muted its kind; returns
	// those stored.
	err := s.DB.SelectContext(ctx, &rows, `INSERT INTO notifications (id, org_id, owner_id, user_id, kind, title, body, data)
		SELECT r.id, r.org_id::uuid, r.owner_id::uuid, r.user_id, r.kind, r.title, r.body, r.data::jsonb
		FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[], $6::text[], $7::text[], $8::text[])
			AS r(id, org_id, owner_id, user_id, kind, title, body, data)
		JOIN users u ON u.id = r.user_id
		WHERE NOT (u.muted_kinds ? r.kind)
		RETURNING *`, pq.Array(ids), pq.Array(orgs), pq.Array(owners), pq.Array(users), pq.Array(kinds), pq.Array(titles), pq.Array(bodies), pq.Array(data))
	if err != nil {
		return nil, err
	}
	return batch.Align(rows, func(n *Notification) string { return n.ID }, ids), nil
}

// CommandFinished notifies whoever dispatched a command of its end: the
// notifications mixin of commands.
func (s *Service) CommandFinished(ctx context.Context, c *platform.Command) {
	if c.ScheduleID != nil && c.Status == platform.CommandSucceeded {
		return // a schedule's routine successes would drown the user
	}
	kind := "command." + c.Status
	title := c.Task + " " + c.Status
	body := ""
	if c.Error != nil {
		body = *c.Error
	}
	data := platform.JSONObject{"command_id": c.ID, "agent_id": c.AgentID, "task": c.Task, "status": c.Status}
	if _, err := s.Notify(ctx, Notification{OrgID: &c.OrgID, UserID: c.OwnerID, Kind: kind, Title: title, Body: body, Data: data}); err != nil {
		s.Logger.WarnContext(ctx, "command notification failed", "command_id", c.ID, "err", err)
	}
}

// List returns a page of a user's notifications, unread first, newest
// first, and the total and unread counts.
func (s *Service) List(ctx context.Context, userID string, unreadOnly bool, limit, offset int) ([]Notification, int64, int64, error) {
	var counts struct {
		Total  int64 `db:"total"`
		Unread int64 `db:"unread"`
	}
	if err := s.DB.GetContext(ctx, &counts, `SELECT count(*) AS total, count(*) FILTER (WHERE read_at IS NULL) AS unread
		FROM notifications WHERE user_id = $1`, userID); err != nil {
		return nil, 0, 0, err
	}
	out := []Notification{}
	err := s.DB.SelectContext(ctx, &out, `SELECT * FROM notifications WHERE user_id = $1 AND (NOT $2 OR read_at IS NULL)
		ORDER BY (read_at IS NULL) DESC, created_at DESC, id DESC LIMIT $3 OFFSET $4`, userID, unreadOnly, limit, offset)
	total := counts.Total
	if unreadOnly {
		total = counts.Unread
	}
	return out, total, counts.Unread, err
}

// MarkRead marks one of the user's notifications read; ENOTFOUND if the
// user has no such notification.
func (s *Service) MarkRead(ctx context.Context, userID, id string) (*Notification, error) {
	out := &Notification{}
	err := s.DB.GetContext(ctx, out, `UPDATE notifications SET read_at = COALESCE(read_at, now()) WHERE id = $1 AND user_id = $2 RETURNING *`, id, userID)
	if isNoRows(err) {
		return nil, platform.Errorf(platform.ENOTFOUND, "notification not found")
	}
	return out, err
}

// MarkAllRead marks every unread notification of the user read.
func (s *Service) MarkAllRead(ctx context.Context, userID string) (int64, error) {
	res, err := s.DB.ExecContext(ctx, `UPDATE notifications SET read_at = now() WHERE user_id = $1 AND read_at IS NULL`, userID)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// Muted returns the kinds the user muted.
func (s *Service) Muted(ctx context.Context, userID string) ([]string, error) {
	var raw []byte
	if err := s.DB.GetContext(ctx, &raw, `SELECT muted_kinds FROM users WHERE id = $1`, userID); err != nil {
		return nil, err
	}
	var out []string
	if err := json.Unmarshal(raw, &out); err != nil {
		return nil, err
	}
	if out == nil {
		out = []string{} // a list, never null
	}
	return out, nil
}

// SetMuted replaces the kinds the user muted.
func (s *Service) SetMuted(ctx context.Context, userID string, kinds []string) error {
	if kinds == nil {
		kinds = []string{} // stored as a list, never as null
	}
	data, _ := json.Marshal(kinds)
	_, err := s.DB.ExecContext(ctx, `UPDATE users SET muted_kinds = $2 WHERE id = $1`, userID, string(data))
	return err
}

func isNoRows(err error) bool { return errors.Is(err, sql.ErrNoRows) }
