package httpapi_test

import (
	"io"
	"time"

	"github.com/hibiken/asynq"

	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/notify"
	"github.com/agentry/agentry/internal/realtime"
	"log/slog"
	"net/http/httptest"
	"testing"

	"github.com/agentry/agentry/internal/access"
	"github.com/agentry/agentry/internal/commands"
	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/httpapi"
	"github.com/agentry/agentry/internal/metrics"
	"github.com/agentry/agentry/internal/postgres"
	"github.com/agentry/agentry/internal/secrets"
	"github.com/agentry/agentry/internal/templates"
	"github.com/agentry/agentry/internal/testenv"
)

// TestEveryRouteIsDocumented builds the whole API surface and checks that
// every route the router serves is in the OpenAPI document and every
// documented operation is served.
func TestEveryRouteIsDocumented(t *testing.T) {
	t.Parallel()
	db := testenv.Postgres(t)
	rdb, prefix := testenv.Redis(t)
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	s := httpapi.New(httpapi.Options{Logger: logger, Metrics: metrics.New("api", "test"), Version: "test"})
	identity := &postgres.IdentityStore{DB: db}
	audit := &access.Audit{Store: identity, Logger: logger}
	guard := &access.Guard{DB: db, Audit: audit}
	acl := &access.ACL{DB: db, Audit: audit}
	sealer, err := secrets.New(make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	s.Routes(httpapi.Deps{
		DB:         db,
		Registry:   &crud.Registry{API: s.API, DB: db, Guard: guard, ACL: acl, MaxBodyBytes: 1 << 20},
		Accounts:   &access.Service{Accounts: identity, Audit: audit},
		Identity:   identity,
		Keys:       identity,
		Guard:      guard,
		ACL:        acl,
		Audit:      audit,
		Kinds:      &templates.Kinds{},
		Sealer:     sealer,
		Dispatcher: &commands.Dispatcher{Store: &commands.Store{DB: db}, Logger: logger},
		Admin:      &httpapi.Admin{Inspector: asynq.NewInspectorFromRedisClient(rdb), Queue: commands.QueueName(prefix)},
		Realtime: &httpapi.Realtime{
			Gateway: &realtime.Gateway{Events: events.NewBus(rdb, prefix, 100), Redis: rdb, Logger: logger},
			Tickets: realtime.NewTickets(rdb, prefix, time.Minute),
			Notify:  &notify.Service{DB: db, Logger: logger},
		},
	})
	srv := httptest.NewServer(s)
	defer srv.Close()
	routesMatchSpec(t, s, srv)
}
