package crud_test

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/agentry/agentry/internal/cache"
	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/crud/crudtest"
	"github.com/agentry/agentry/internal/httpapi"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/testenv"
)

// A resource with state (Resource.State): Get sees a state change as soon
// as it is announced (StateChanged); GetDefinition keeps serving its cached
// copy through state changes, but not through a change of the definition.
func TestStateHasItsOwnCacheVersion(t *testing.T) {
	t.Parallel()
	db := testenv.Postgres(t)
	if _, err := db.Exec(widgetTable); err != nil {
		t.Fatal(err)
	}
	rdb, prefix := testenv.Redis(t)
	rows := cache.NewVersioned(rdb, prefix, time.Minute, 100, slog.New(slog.NewTextHandler(io.Discard, nil)))
	s := httpapi.New(httpapi.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Version: "test", MaxBodyBytes: 1 << 20})
	reg := &crud.Registry{API: s.API, DB: db, Guard: crudtest.Guard{}, MaxBodyBytes: 1 << 20, Cache: rows}
	res := widgetResource(crud.AllOps)
	res.Cached, res.State = true, true
	h := crud.Register(reg, res)

	org, user := uuid.NewString(), uuid.NewString()
	ctx := platform.WithPrincipal(context.Background(), &platform.Principal{ID: user, Kind: platform.KindUser, OrgID: org,
		Roles: []platform.RoleRef{{ID: "admin", Name: platform.RoleAdmin}}})
	id := uuid.NewString()
	if _, err := db.Exec(`INSERT INTO widgets (id, org_id, owner_id, name, color) VALUES ($1, $2, $3, 'gear', 'red')`, id, org, user); err != nil {
		t.Fatal(err)
	}
	get := func(def bool) *Widget {
		t.Helper()
		read := h.Get
		if def {
			read = h.GetDefinition
		}
		w, _, err := read(ctx, id, crud.ActionRead)
		if err != nil {
			t.Fatal(err)
		}
		return w
	}
	get(false)
	get(true)

	// The state changes outside the API, which says so.
	if _, err := db.Exec(`UPDATE widgets SET status = 'busy' WHERE id = $1`, id); err != nil {
		t.Fatal(err)
	}
	if err := crud.StateChanged(ctx, rows, "Widget", id); err != nil {
		t.Fatal(err)
	}
	if w := get(false); w.Status != "busy" {
		t.Fatalf("Get after a state change: status %q, want busy", w.Status)
	}
	if w := get(true); w.Status != "new" {
		t.Fatalf("GetDefinition after a state change: status %q, want the cached copy's new (served from the cache)", w.Status)
	}

	// The definition changes: both see it.
	if _, err := db.Exec(`UPDATE widgets SET name = 'cog' WHERE id = $1`, id); err != nil {
		t.Fatal(err)
	}
	h.Notify(ctx, crud.OpUpdate, get(false))
	if w := get(true); w.Name != "cog" || w.Status != "busy" {
		t.Fatalf("GetDefinition after a definition change: %+v, want it read afresh", w)
	}
}
