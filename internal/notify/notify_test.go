package notify_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"slices"
	"testing"

	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/notify"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/testenv"
)

type fixture struct {
	svc *notify.Service
	db  *sqlx.DB
	bus *events.Bus
	org string
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	db := testenv.Postgres(t)
	rdb, prefix := testenv.Redis(t)
	f := &fixture{db: db, bus: events.NewBus(rdb, prefix, 1000)}
	f.svc = &notify.Service{DB: db, Events: f.bus, Logger: slog.New(slog.DiscardHandler)}
	owner := f.user(t)
	f.org = uuid.NewString()
	ctx := context.Background()
	db.MustExecContext(ctx, `INSERT INTO entities (id, kind) VALUES ($1, 'organization')`, f.org)
	db.MustExecContext(ctx, `INSERT INTO organizations (id, org_id, owner_id, name) VALUES ($1, $1, $2, 'org')`, f.org, owner)
	return f
}

// user inserts a user and returns its id.
func (f *fixture) user(t *testing.T) string {
	t.Helper()
	id := uuid.NewString()
	ctx := context.Background()
	f.db.MustExecContext(ctx, `INSERT INTO entities (id, kind) VALUES ($1, 'user')`, id)
	f.db.MustExecContext(ctx, `INSERT INTO users (id, email, name, password_hash) VALUES ($1, $2, 'u', 'x')`, id, id+"@example.com")
	return id
}

func (f *fixture) notify(t *testing.T, user, kind, title string) *notify.Notification {
	t.Helper()
	n, err := f.svc.Notify(context.Background(), notify.Notification{OrgID: &f.org, UserID: user, Kind: kind, Title: title})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// live returns the notifications published on user's topic.
func (f *fixture) live(t *testing.T, user string) []notify.Notification {
	t.Helper()
	evs, err := f.bus.Since(context.Background(), events.UserTopic(user), "", 100)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]notify.Notification, len(evs))
	for i, e := range evs {
		if e.Type != "notification" {
			t.Fatalf("want notification events, got %s", e.Type)
		}
		if err := json.Unmarshal(e.Data, &out[i]); err != nil {
			t.Fatalf("event data: %s", e.Data)
		}
	}
	return out
}

func titles(ns []notify.Notification) []string {
	out := make([]string, len(ns))
	for i, n := range ns {
		out[i] = n.Title
	}
	return out
}

func TestNotifyStoresAndDelivers(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	u, sender := f.user(t), f.user(t)
	n, err := f.svc.Notify(context.Background(), notify.Notification{OrgID: &f.org, OwnerID: &sender, UserID: u,
		Kind: "deploy.done", Title: "Deployed", Body: "v2 is live", Data: platform.JSONObject{"version": "v2"}})
	if err != nil {
		t.Fatal(err)
	}
	if n == nil || uuid.Validate(n.ID) != nil || n.UserID != u || *n.OwnerID != sender || *n.OrgID != f.org ||
		n.Kind != "deploy.done" || n.Body != "v2 is live" || n.Data["version"] != "v2" || n.ReadAt != nil || n.CreatedAt.IsZero() {
		t.Fatalf("stored: got %+v", n)
	}
	live := f.live(t, u)
	if len(live) != 1 || live[0].ID != n.ID || live[0].Title != "Deployed" || live[0].Data["version"] != "v2" {
		t.Fatalf("live: want the stored notification, got %+v", live)
	}
	// Without data, data is an empty object.
	plain := f.notify(t, u, "x", "plain")
	if plain.Data == nil || len(plain.Data) != 0 {
		t.Fatalf("data: want {}, got %v", plain.Data)
	}
}

func TestMutedKindsAreNeitherStoredNorDelivered(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	u := f.user(t)
	if muted, err := f.svc.Muted(ctx, u); err != nil || muted == nil || len(muted) != 0 {
		t.Fatalf("muted at first: want [], got %v (%v)", muted, err)
	}
	if err := f.svc.SetMuted(ctx, u, []string{"command.succeeded", "noise"}); err != nil {
		t.Fatal(err)
	}
	if muted, _ := f.svc.Muted(ctx, u); !slices.Equal(muted, []string{"command.succeeded", "noise"}) {
		t.Fatalf("muted: got %v", muted)
	}
	if n := f.notify(t, u, "command.succeeded", "ok"); n != nil {
		t.Fatalf("a muted kind: want nil, got %+v", n)
	}
	f.notify(t, u, "command.failed", "failed")
	if got := titles(f.live(t, u)); !slices.Equal(got, []string{"failed"}) {
		t.Fatalf("live: want only the unmuted one, got %v", got)
	}
	if items, total, _, _ := f.svc.List(ctx, u, false, 10, 0); total != 1 || len(items) != 1 {
		t.Fatalf("stored: want 1, got %d", total)
	}
	// A kind is muted exactly, not by prefix.
	if n := f.notify(t, u, "command.succeeded.twice", "x"); n == nil {
		t.Fatal("another kind was muted")
	}
	// Unmuting everything: an empty list, and never null.
	for _, kinds := range [][]string{{}, nil} {
		if err := f.svc.SetMuted(ctx, u, kinds); err != nil {
			t.Fatal(err)
		}
		if muted, err := f.svc.Muted(ctx, u); err != nil || muted == nil || len(muted) != 0 {
			t.Fatalf("SetMuted(%#v): want [], got %#v (%v)", kinds, muted, err)
		}
		if n := f.notify(t, u, "command.succeeded", "ok again"); n == nil {
			t.Fatalf("SetMuted(%#v): the kind is still muted", kinds)
		}
	}
}

func TestListUnreadFirstThenNewest(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	u, other := f.user(t), f.user(t)
	var ids []string
	for _, title := range []string{"n1", "n2", "n3", "n4"} {
		ids = append(ids, f.notify(t, u, "k", title).ID)
	}
	f.notify(t, other, "k", "not mine")
	if _, err := f.svc.MarkRead(ctx, u, ids[3]); err != nil { // the newest is read
		t.Fatal(err)
	}
	tests := []struct {
		name          string
		unreadOnly    bool
		limit, offset int
		want          []string
		total         int64
	}{
		{"all", false, 10, 0, []string{"n3", "n2", "n1", "n4"}, 4},
		{"a page", false, 2, 1, []string{"n2", "n1"}, 4},
		{"unread", true, 10, 0, []string{"n3", "n2", "n1"}, 3},
		{"past the end", false, 10, 10, []string{}, 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			items, total, unread, err := f.svc.List(ctx, u, tt.unreadOnly, tt.limit, tt.offset)
			if err != nil {
				t.Fatal(err)
			}
			if got := titles(items); !slices.Equal(got, tt.want) || total != tt.total || unread != 3 {
				t.Fatalf("want %v (total %d, unread 3), got %v (total %d, unread %d)", tt.want, tt.total, got, total, unread)
			}
		})
	}
}

func TestMarkRead(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	u, other := f.user(t), f.user(t)
	n := f.notify(t, u, "k", "mine")
	read, err := f.svc.MarkRead(ctx, u, n.ID)
	if err != nil || read.ReadAt == nil {
		t.Fatalf("want it read, got %+v (%v)", read, err)
	}
	again, err := f.svc.MarkRead(ctx, u, n.ID)
	if err != nil || !again.ReadAt.Equal(*read.ReadAt) {
		t.Fatalf("marking again keeps the first read time: want %v, got %+v (%v)", read.ReadAt, again, err)
	}
	for name, id := range map[string]string{"someone else's": n.ID, "unknown": uuid.NewString()} {
		if _, err := f.svc.MarkRead(ctx, other, id); platform.ErrorCode(err) != platform.ENOTFOUND {
			t.Errorf("%s: want not_found, got %v", name, err)
		}
	}

	f.notify(t, u, "k", "a")
	f.notify(t, u, "k", "b")
	f.notify(t, other, "k", "theirs")
	if marked, err := f.svc.MarkAllRead(ctx, u); err != nil || marked != 2 {
		t.Fatalf("read-all: want 2 marked, got %d (%v)", marked, err)
	}
	if marked, _ := f.svc.MarkAllRead(ctx, u); marked != 0 {
		t.Fatalf("read-all again: want 0, got %d", marked)
	}
	if _, _, unread, _ := f.svc.List(ctx, other, false, 10, 0); unread != 1 {
		t.Fatalf("another user's stay unread: got %d unread", unread)
	}
}

func TestCommandFinishedNotifiesTheDispatcher(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	u := f.user(t)
	boom, schedule := "boom", uuid.NewString()
	cmd := func(status string, err *string, scheduleID *string) *platform.Command {
		return &platform.Command{Base: platform.Base{ID: uuid.NewString(), OrgID: f.org, OwnerID: u}, AgentID: uuid.NewString(),
			Task: "agent:echo", Status: status, Error: err, ScheduleID: scheduleID}
	}
	ok := cmd(platform.CommandSucceeded, nil, nil)
	f.svc.CommandFinished(ctx, ok)
	f.svc.CommandFinished(ctx, cmd(platform.CommandFailed, &boom, nil))
	f.svc.CommandFinished(ctx, cmd(platform.CommandSucceeded, nil, &schedule)) // routine: not notified
	f.svc.CommandFinished(ctx, cmd(platform.CommandFailed, &boom, &schedule))

	items, _, _, err := f.svc.List(ctx, u, false, 10, 0)
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, n := range items {
		kinds = append(kinds, n.Kind)
	}
	slices.Sort(kinds)
	if !slices.Equal(kinds, []string{"command.failed", "command.failed", "command.succeeded"}) {
		t.Fatalf("kinds: got %v", kinds)
	}
	for _, n := range items {
		if n.Kind == "command.succeeded" {
			if n.Data["command_id"] != ok.ID || n.Data["agent_id"] != ok.AgentID || n.Data["status"] != "succeeded" || n.Title != "agent:echo succeeded" || *n.OrgID != f.org || n.OwnerID != nil {
				t.Fatalf("success notification: got %+v", n)
			}
		} else if n.Body != "boom" {
			t.Fatalf("a failure says why: got %+v", n)
		}
	}
	if live := f.live(t, u); len(live) != 3 {
		t.Fatalf("live: want 3, got %d", len(live))
	}
}
