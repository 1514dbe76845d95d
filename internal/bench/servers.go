package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime/pprof"
	"strconv"
	"time"

	"github.com/gin-gonic/gin"
	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/crud/crudtest"
	"github.com/agentry/agentry/internal/httpapi"
	"github.com/agentry/agentry/internal/metrics"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/postgres"
)

// agentColumns is the select list both servers use.
const agentColumns = `t.id, t.org_id, t.owner_id, t.created_at, t.updated_at, t.version, t.name, t.description, t.status,
	t.environment_id, t.template_id, t.overrides, t.config`

// serveBaseline runs one of the servers compared against: "bare" is Gin
// and sqlx with hand-written handlers running the same queries as the
// framework; "framework" is agentry's HTTP stack and CRUD framework with a
// guard that enforces tenancy only. It prints "listening on <url>" and
// serves until interrupted.
func serveBaseline(ctx context.Context, kind, dsn, cpuprofile string) error {
	db, err := postgres.Open(ctx, dsn, postgres.PoolOptions{MaxOpenConns: 25, MaxIdleConns: 25})
	if err != nil {
		return err
	}
	defer db.Close()
	var h http.Handler
	switch kind {
	case "bare":
		h = bareServer(db, false)
	case "bare-prepared":
		h = bareServer(db, true)
	case "framework":
		h = frameworkServer(db)
	default:
		return fmt.Errorf("unknown server %q", kind)
	}
	if cpuprofile != "" {
		f, err := os.Create(cpuprofile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer func() {
			pprof.StopCPUProfile()
			f.Close()
		}()
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	fmt.Printf("listening on http://%s\n", ln.Addr())
	go func() { <-ctx.Done(); srv.Close() }()
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		return err
	}
	return nil
}

// bareServer is the baseline: plain Gin, plain sqlx, the same SQL; with
// prepared, its statements are prepared once, as the framework's are.
func bareServer(db *sqlx.DB, prepared bool) http.Handler {
	gin.SetMode(gin.ReleaseMode)
	r := gin.New()
	getOne := func(ctx context.Context, id string) *sqlx.Row {
		return db.QueryRowxContext(ctx, "SELECT "+agentColumns+" FROM agents t WHERE t.id = $1", id)
	}
	if prepared {
		st, err := db.Preparex("SELECT " + agentColumns + " FROM agents t WHERE t.id = $1")
		if err != nil {
			panic(err)
		}
		getOne = func(ctx context.Context, id string) *sqlx.Row { return st.QueryRowxContext(ctx, id) }
	}
	r.GET("/v1/agents/:id", func(c *gin.Context) {
		var a platform.Agent
		err := getOne(c.Request.Context(), c.Param("id")).StructScan(&a)
		if err != nil {
			c.JSON(http.StatusNotFound, gin.H{"error": "not found"})
			return
		}
		c.Header("ETag", `"`+strconv.FormatInt(a.Version, 10)+`"`)
		c.JSON(http.StatusOK, a)
	})
	r.GET("/v1/agents", func(c *gin.Context) {
		org := c.GetHeader(crudtest.OrgHeader)
		page, _ := strconv.Atoi(c.DefaultQuery("page", "1"))
		size, _ := strconv.Atoi(c.DefaultQuery("page_size", "20"))
		if page < 1 || size < 1 || size > 100 {
			c.JSON(http.StatusBadRequest, gin.H{"error": "bad paging"})
			return
		}
		ctx := c.Request.Context()
		var total int64
		if err := db.GetContext(ctx, &total, "SELECT count(*) FROM agents t WHERE t.org_id = $1 AND (TRUE)", org); err != nil {
			c.JSON(http.StatusInternalServerError, gin.H{"error": err.Error()})
			return
		}
		items := []platform.Agent{}
		if err := db.SelectContext(ctx, &items, "SELECT "+agentColumns+" FROM agents t WHERE t.org_id = $1 AND (TRUE) ORDER BY t.created_at DESC, t.id DESC LIMIT $2 OFFSET $3",
			org, size, (page-1)*size); err != nil {
			c.JSON(http.StatusInternalServerError, gin.H{"error": err.Error()})
			return
		}
		c.JSON(http.StatusOK, gin.H{"items": items, "page": page, "page_size": size, "total": total})
	})
	return r
}

// frameworkServer is agentry's HTTP stack (middleware, Huma, problem
// errors, metrics, logging) with the agents resource registered through the
// CRUD framework; the guard only enforces tenancy, as in the foundation.
func frameworkServer(db *sqlx.DB) http.Handler {
	logger := slog.New(slog.NewJSONHandler(io.Discard, nil))
	s := httpapi.New(httpapi.Options{Logger: logger, Metrics: metrics.New("api", "bench"), Version: "bench", MaxBodyBytes: 1 << 20})
	reg := &crud.Registry{API: s.API, DB: db, Guard: crudtest.Guard{}, MaxBodyBytes: 1 << 20}
	crud.Register(reg, crud.Resource[platform.Agent, httpapi.AgentInput]{
		Scope: platform.Scope{Type: "Agent"}, Path: "/v1/agents", Table: "agents",
		Ops: crud.OpRead | crud.OpList,
	})
	return crudtest.Middleware(s)
}
