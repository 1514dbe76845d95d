package httpapi_test

import (
	"io"
	"strings"
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

	// What the middleware answers any operation is documented on each.
	_, doc := get(t, srv.URL+"/openapi.json")
	for path, item := range doc["paths"].(map[string]any) {
		for method, o := range item.(map[string]any) {
			op, _ := o.(map[string]any)
			responses, _ := op["responses"].(map[string]any)
			name := method + " " + path
			sec, declared := op["security"].([]any)
			if !declared {
				t.Errorf("%s declares no security: public operations declare none ([]), so that generated clients send no credentials", name)
			}
			if len(sec) > 0 && responses["403"] == nil {
				t.Errorf("%s authenticates (X-Org-ID) but documents no 403", name)
			}
			if strings.HasPrefix(path, "/v1/") && responses["503"] == nil {
				t.Errorf("%s documents no 503 (PostgreSQL or Redis unreachable)", name)
			}
			params, _ := op["parameters"].([]any)
			for _, p := range params {
				if m, _ := p.(map[string]any); m["name"] == "Content-Type" {
					t.Errorf("%s declares Content-Type as a parameter", name)
				}
			}
			if body, ok := op["requestBody"].(map[string]any); ok {
				for _, status := range []string{"413", "415"} {
					if responses[status] == nil {
						t.Errorf("%s takes a body but documents no %s", name, status)
					}
				}
				if content, _ := body["content"].(map[string]any); content["application/octet-stream"] != nil {
					t.Errorf("%s documents a raw body, which is refused with 415", name)
				}
			}
			if r, ok := responses["304"].(map[string]any); ok && r["content"] != nil {
				t.Errorf("%s documents a body on 304", name)
			}
		}
	}
}
