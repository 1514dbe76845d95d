// Package httpapi is agentry's HTTP adapter: a Gin engine carrying a Huma API
// that generates the OpenAPI 3.1 document from the registered operations.
// routes.go lists the whole surface; every error answer is an RFC 9457
// problem built in problem.go; middleware.go holds what runs around every
// request.
package httpapi

import (
	"context"
	"embed"
	"encoding/json"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/danielgtaylor/huma/v2/adapters/humagin"
	"github.com/gin-gonic/gin"
	"github.com/google/uuid"

	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/metrics"
	"github.com/agentry/agentry/internal/platform"
)

//go:embed docsui
var docsFS embed.FS

// ReadyCheck is a dependency /readyz checks: Postgres, Redis.
type ReadyCheck struct {
	Name  string
	Check func(context.Context) error
}

// Options configure a Server.
type Options struct {
	Logger       *slog.Logger
	Metrics      *metrics.Registry
	Version      string
	MaxBodyBytes int64
	Ready        []ReadyCheck
	// TrustedProxies are the CIDRs whose X-Forwarded-For is believed.
	TrustedProxies []string
	// Authenticator authenticates the operations that declare security.
	Authenticator Authenticator
	// OnAuthFailure, if set, is told the reason of every refused credential.
	OnAuthFailure func(reason string)
	// PublicURL, if set, is the API's address as its clients see it: the
	// OpenAPI document's server, which /docs sends its requests to.
	PublicURL string
}

// Authenticator turns a request's credentials into a principal.
type Authenticator interface {
	Authenticate(ctx context.Context, r *http.Request) (*platform.Principal, error)
}

// Server is the API's HTTP handler. Build it with New, register resources on
// API (routes.go does), then serve it.
type Server struct {
	API    huma.API
	engine *gin.Engine
	opts   Options
	http   *metrics.HTTP

	specOnce sync.Once
	spec     []byte
	specErr  error
}

var ginMode sync.Once

// New returns a Server with the platform routes (health, readiness, metrics,
// the OpenAPI document and its browsable docs) and the middleware every
// request passes through. Callers add their operations to s.API.
func New(opts Options) *Server {
	ginMode.Do(func() { gin.SetMode(gin.ReleaseMode) })
	useProblems()
	if opts.MaxBodyBytes <= 0 {
		opts.MaxBodyBytes = 1 << 20
	}
	engine := gin.New()
	engine.HandleMethodNotAllowed = true
	engine.RedirectTrailingSlash = false
	engine.RedirectFixedPath = false
	engine.ContextWithFallback = true
	if err := engine.SetTrustedProxies(opts.TrustedProxies); err != nil {
		opts.Logger.Warn("ignoring invalid trusted_proxies", "err", err)
		_ = engine.SetTrustedProxies(nil)
	}
	s := &Server{engine: engine, opts: opts}
	if opts.Metrics != nil {
		s.http = metrics.NewHTTP(opts.Metrics)
	}
	engine.Use(requestContext(opts.Logger), s.instrument(), accessLog(), recoverPanics(), securityHeaders(), limitBody(opts.MaxBodyBytes), limitJSONDepth())
	engine.NoRoute(func(c *gin.Context) {
		if c.Request.URL.Path == "/docs/" && c.Request.Method == http.MethodGet {
			c.Redirect(http.StatusMovedPermanently, "/docs") // as a browser may complete it
			return
		}
		writeProblem(c, platform.Errorf(platform.ENOTFOUND, "no route for %s %s", c.Request.Method, c.Request.URL.Path))
	})
	engine.NoMethod(func(c *gin.Context) {
		writeProblem(c, platform.Errorf(platform.ENOTALLOWED, "%s is not allowed on %s", c.Request.Method, c.Request.URL.Path))
	})

	cfg := huma.DefaultConfig("agentry API", opts.Version)
	cfg.OpenAPIPath, cfg.DocsPath, cfg.SchemasPath = "", "", ""
	cfg.Transformers = nil
	cfg.CreateHooks = nil
	cfg.Info.Description = apiDescription
	if opts.PublicURL != "" {
		cfg.Servers = []*huma.Server{{URL: strings.TrimSuffix(opts.PublicURL, "/"), Description: "this installation"}}
	}
	cfg.Components.SecuritySchemes = map[string]*huma.SecurityScheme{
		"bearer": {Type: "http", Scheme: "bearer", BearerFormat: "JWT or API key",
			Description: "An access token from POST /v1/auth/login, or an API key (`agk_…`)."},
		"wsTicket": {Type: "apiKey", In: "query", Name: "ticket",
			Description: "A single-use ticket from POST /v1/ws/ticket, for GET /v1/ws from a browser (which cannot set headers on a WebSocket)."},
	}
	s.API = humagin.New(engine, cfg)
	s.API.UseMiddleware(canonicalIDs, s.authenticate, s.onlyDocumentedQuery)
	s.platformRoutes()
	return s
}

// ServeHTTP makes the Server an http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.engine.ServeHTTP(w, r) }

// Engine returns the Gin engine, for routes that are not JSON operations
// (the WebSocket gateway). Document every such route with Document.
func (s *Server) Engine() *gin.Engine { return s.engine }

// Document adds an operation served outside Huma to the OpenAPI document.
func (s *Server) Document(op *huma.Operation) { s.API.OpenAPI().AddOperation(op) }

// MaxBodyBytes is the body limit every operation enforces.
func (s *Server) MaxBodyBytes() int64 { return s.opts.MaxBodyBytes }

// instrument counts and times every request by route template.
func (s *Server) instrument() gin.HandlerFunc {
	if s.http == nil {
		return func(c *gin.Context) { c.Next() }
	}
	return func(c *gin.Context) {
		start := time.Now()
		s.http.InFlight.Inc()
		defer s.http.InFlight.Dec()
		c.Next()
		route := c.FullPath()
		if route == "" {
			route = "unmatched"
		}
		s.http.Requests.WithLabelValues(c.Request.Method, route, strconv.Itoa(c.Writer.Status())).Inc()
		s.http.Duration.WithLabelValues(c.Request.Method, route).Observe(time.Since(start).Seconds())
	}
}

type healthOutput struct {
	Body struct {
		Status string            `json:"status" example:"ok"`
		Checks map[string]string `json:"checks,omitempty" doc:"Each dependency and its state."`
	}
}

func (s *Server) platformRoutes() {
	huma.Register(s.API, huma.Operation{
		OperationID: "healthz", Method: http.MethodGet, Path: "/healthz", Tags: []string{"Platform"},
		Summary: "Liveness", Description: "Answers 200 while the process is alive; it checks no dependency.",
	}, func(ctx context.Context, _ *struct{}) (*healthOutput, error) {
		out := &healthOutput{}
		out.Body.Status = "ok"
		return out, nil
	})

	huma.Register(s.API, huma.Operation{
		OperationID: "readyz", Method: http.MethodGet, Path: "/readyz", Tags: []string{"Platform"},
		Summary: "Readiness", Description: "Answers 200 when Postgres and Redis are reachable, 503 (with the failing checks) when not.",
		Errors: []int{http.StatusServiceUnavailable},
	}, func(ctx context.Context, _ *struct{}) (*healthOutput, error) {
		out := &healthOutput{}
		out.Body.Status = "ok"
		out.Body.Checks = map[string]string{}
		failed := false
		for _, check := range s.opts.Ready {
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			err := check.Check(cctx)
			cancel()
			if err != nil {
				failed = true
				out.Body.Checks[check.Name] = "unreachable"
				loggerFrom(ctx).WarnContext(ctx, "readiness check failed", "check", check.Name, "err", err)
				continue
			}
			out.Body.Checks[check.Name] = "ok"
		}
		if failed {
			p := &Problem{Status: http.StatusServiceUnavailable, Code: platform.EUNAVAILABLE, Detail: "not ready: a dependency is unreachable", retryAfter: 2}
			for name, state := range out.Body.Checks {
				if state != "ok" {
					p.Errors = append(p.Errors, platform.FieldError{Field: name, Message: state})
				}
			}
			return nil, p
		}
		return out, nil
	})

	if s.opts.Metrics != nil {
		handler := s.opts.Metrics.Handler()
		s.engine.GET("/metrics", gin.WrapH(handler))
		s.Document(&huma.Operation{
			OperationID: "metrics", Method: http.MethodGet, Path: "/metrics", Tags: []string{"Platform"},
			Summary: "Prometheus metrics", Description: "The Prometheus text exposition of this process's metrics.",
			Responses: map[string]*huma.Response{"200": {Description: "Metrics", Content: map[string]*huma.MediaType{"text/plain": {}}}},
		})
	}

	s.engine.GET("/openapi.json", func(c *gin.Context) {
		s.specOnce.Do(func() { s.spec, s.specErr = documentSpec(s.API.OpenAPI()) })
		if s.specErr != nil {
			writeProblem(c, s.specErr)
			return
		}
		c.Data(http.StatusOK, "application/vnd.oai.openapi+json", s.spec)
	})
	s.Document(&huma.Operation{
		OperationID: "openapi", Method: http.MethodGet, Path: "/openapi.json", Tags: []string{"Platform"},
		Summary: "OpenAPI document", Description: "This document: OpenAPI 3.1, generated from the registered operations.",
		Responses: map[string]*huma.Response{"200": {Description: "The OpenAPI document", Content: map[string]*huma.MediaType{"application/vnd.oai.openapi+json": {}}}},
	})

	ui, _ := fs.Sub(docsFS, "docsui")
	s.engine.GET("/docs", func(c *gin.Context) { c.FileFromFS("/", http.FS(ui)) })
	s.engine.GET("/docs/:file", func(c *gin.Context) {
		name := c.Param("file")
		if name == "index.html" {
			c.Redirect(http.StatusMovedPermanently, "/docs")
			return
		}
		if _, err := fs.Stat(ui, name); err != nil {
			writeProblem(c, platform.Errorf(platform.ENOTFOUND, "no such documentation asset"))
			return
		}
		c.Header("Cache-Control", "public, max-age=86400")
		c.FileFromFS(name, http.FS(ui))
	})
	html := &huma.Response{Description: "HTML", Content: map[string]*huma.MediaType{"text/html": {}}}
	s.Document(&huma.Operation{
		OperationID: "docs", Method: http.MethodGet, Path: "/docs", Tags: []string{"Platform"},
		Summary: "API documentation", Description: "Browsable documentation of this API (Swagger UI, served from the binary).",
		Responses: map[string]*huma.Response{"200": html},
	})
	s.Document(&huma.Operation{
		OperationID: "docsAsset", Method: http.MethodGet, Path: "/docs/{file}", Tags: []string{"Platform"},
		Summary: "Documentation asset", Description: "A static file of the documentation page.",
		Parameters: []*huma.Param{{Name: "file", In: "path", Required: true, Schema: &huma.Schema{Type: "string"}}},
		Responses:  map[string]*huma.Response{"200": {Description: "The file"}},
	})
}

// canonicalIDs puts the operation's UUID path parameters in canonical form
// (lower case, hyphenated): every spelling of an id, which the format
// accepts (upper case, in braces, after urn:uuid:, without hyphens), names
// the same resource in the cache, the ACL and every check that compares
// ids.
func canonicalIDs(ctx huma.Context, next func(huma.Context)) {
	if op := ctx.Operation(); op != nil {
		params := humagin.Unwrap(ctx).Params
		for _, p := range op.Parameters {
			if p.In != "path" || p.Schema == nil || p.Schema.Format != "uuid" {
				continue
			}
			for i := range params {
				if params[i].Key == p.Name {
					if u, err := uuid.Parse(params[i].Value); err == nil {
						params[i].Value = u.String()
					}
				}
			}
		}
	}
	next(ctx)
}

// onlyDocumentedQuery refuses query parameters an operation does not take:
// one it ignored (misspelt, say) would answer what was not asked. So does
// a query with a ';', whose pairs Go drops without a word.
func (s *Server) onlyDocumentedQuery(ctx huma.Context, next func(huma.Context)) {
	u := ctx.URL()
	if strings.Contains(u.RawQuery, ";") {
		_ = huma.WriteErr(s.API, ctx, http.StatusUnprocessableEntity, "validation failed",
			&huma.ErrorDetail{Location: "query", Message: "';' does not separate parameters; use '&' (or escape it as %3B in a value)"})
		return
	}
	op := ctx.Operation()
	if op == nil || u.RawQuery == "" {
		next(ctx)
		return
	}
	var takes []string
	for _, p := range op.Parameters {
		if p.In == "query" {
			takes = append(takes, p.Name)
		}
	}
	if bad := crud.OnlyParams(ctx, takes...); len(bad) > 0 {
		_ = huma.WriteErr(s.API, ctx, http.StatusUnprocessableEntity, "validation failed", bad...)
		return
	}
	next(ctx)
}

// documentSpec is the OpenAPI document as served. What the middleware does
// for every operation is added to the document, not to each operation:
//   - an operation that authenticates takes the X-Org-ID header, and may
//     answer 403 (not a member of that organization, or not allowed);
//   - one that takes a body may answer 413 (too large) and 415 (not JSON),
//     and takes JSON only (Huma also lists a raw body, which is refused);
//   - a 304 has no body.
func documentSpec(doc *huma.OpenAPI) ([]byte, error) {
	raw, err := json.Marshal(doc)
	if err != nil {
		return nil, err
	}
	var spec map[string]any
	if err := json.Unmarshal(raw, &spec); err != nil {
		return nil, err
	}
	components, _ := spec["components"].(map[string]any)
	if components == nil {
		components = map[string]any{}
		spec["components"] = components
	}
	params, _ := components["parameters"].(map[string]any)
	if params == nil {
		params = map[string]any{}
		components["parameters"] = params
	}
	params["OrgID"] = map[string]any{
		"name": "X-Org-ID", "in": "header", "required": false,
		"description": "The organization to act in: one of yours. Without it, your default organization (an API key acts in its own).",
		"schema":      map[string]any{"type": "string", "format": "uuid"},
	}
	// Operations authenticate unless they say otherwise: the public ones
	// declare no security ([]), so that generated clients send no
	// credentials to them and send them everywhere else.
	spec["security"] = []any{map[string]any{"bearer": []any{}}}
	paths, _ := spec["paths"].(map[string]any)
	for path, item := range paths {
		methods, _ := item.(map[string]any)
		for _, o := range methods {
			op, _ := o.(map[string]any)
			responses, _ := op["responses"].(map[string]any)
			if responses == nil {
				continue
			}
			if _, ok := op["security"]; !ok {
				op["security"] = []any{}
			}
			if r, ok := responses["304"].(map[string]any); ok {
				delete(r, "content")
			}
			// Content-Type is the request body's media type, not a
			// parameter (OpenAPI ignores one; generators do not).
			if list, ok := op["parameters"].([]any); ok {
				op["parameters"] = slices.DeleteFunc(list, func(p any) bool {
					m, _ := p.(map[string]any)
					return m["in"] == "header" && strings.EqualFold(fmt.Sprint(m["name"]), "Content-Type")
				})
			}
			// Anything that reads or writes data may find PostgreSQL or
			// Redis unreachable: 503 with Retry-After, never a 500.
			if strings.HasPrefix(path, "/v1/") {
				addProblem(responses, "503", "Service Unavailable (retry after Retry-After seconds)")
			}
			if body, ok := op["requestBody"].(map[string]any); ok {
				if content, ok := body["content"].(map[string]any); ok && len(content) > 1 {
					delete(content, "application/octet-stream")
				}
				addProblem(responses, "413", "Content Too Large")
				addProblem(responses, "415", "Unsupported Media Type")
			}
			if sec, _ := op["security"].([]any); len(sec) == 0 {
				continue
			}
			addProblem(responses, "403", "Forbidden")
			list, _ := op["parameters"].([]any)
			op["parameters"] = append(list, map[string]any{"$ref": "#/components/parameters/OrgID"})
		}
	}
	return json.Marshal(spec)
}

// addProblem documents a problem+json answer with status, unless the
// operation documents one already.
func addProblem(responses map[string]any, status, description string) {
	if _, ok := responses[status]; ok {
		return
	}
	responses[status] = map[string]any{
		"description": description,
		"content":     map[string]any{"application/problem+json": map[string]any{"schema": map[string]any{"$ref": "#/components/schemas/Problem"}}},
	}
}
