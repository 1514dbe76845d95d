package httpapi

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strings"
	"time"

	"github.com/gin-gonic/gin"

	"github.com/agentry/agentry/internal/platform"
)

type loggerKey struct{}

// RequestID returns the id of the request ctx belongs to, or "".
func RequestID(ctx context.Context) string { return platform.RequestInfoFrom(ctx).ID }

func validRequestID(id string) bool {
	if id == "" || len(id) > 64 {
		return false
	}
	for _, r := range id {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_', r == '.':
		default:
			return false
		}
	}
	return true
}

func newRequestID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// requestContext gives every request an id (the caller's X-Request-ID if
// sane), echoed in the response, and records where it came from for the
// audit log; log records made with its context carry the id.
func requestContext(logger *slog.Logger) gin.HandlerFunc {
	return func(c *gin.Context) {
		id := c.GetHeader("X-Request-ID")
		if !validRequestID(id) {
			id = newRequestID()
		}
		c.Header("X-Request-ID", id)
		// Kept for the audit log and sessions: cut at a character, as
		// PostgreSQL stores it (a cut inside one made the audit row fail).
		ua := platform.Storable(c.Request.UserAgent(), 256)
		ctx := platform.WithRequestInfo(c.Request.Context(), platform.RequestInfo{ID: id, IP: c.ClientIP(), UserAgent: ua})
		c.Request = c.Request.WithContext(context.WithValue(ctx, loggerKey{}, logger))
		c.Next()
	}
}

// quietRoutes are logged at debug level: probes and scrapes would drown
// everything else.
var quietRoutes = map[string]bool{"/healthz": true, "/readyz": true, "/metrics": true}

// accessLog writes one line per request: method, route template, status,
// duration, size and client address.
func accessLog() gin.HandlerFunc {
	return func(c *gin.Context) {
		start := time.Now()
		c.Next()
		route := c.FullPath()
		level := slog.LevelInfo
		switch {
		case c.Writer.Status() >= 500:
			level = slog.LevelError
		case quietRoutes[route]:
			level = slog.LevelDebug
		}
		ctx := c.Request.Context()
		loggerFrom(ctx).LogAttrs(ctx, level, "request",
			slog.String("method", c.Request.Method),
			slog.String("route", route),
			slog.String("path", c.Request.URL.Path),
			slog.Int("status", c.Writer.Status()),
			slog.Float64("duration_ms", float64(time.Since(start).Microseconds())/1000),
			slog.Int("bytes", c.Writer.Size()),
			slog.String("ip", c.ClientIP()),
		)
	}
}

// recoverPanics turns a panic in any handler into a 500 problem and a logged
// stack, and keeps the process serving.
func recoverPanics() gin.HandlerFunc {
	return func(c *gin.Context) {
		defer func() {
			rec := recover()
			if rec == nil {
				return
			}
			if rec == http.ErrAbortHandler {
				panic(rec)
			}
			ctx := c.Request.Context()
			loggerFrom(ctx).ErrorContext(ctx, "panic", "panic", fmt.Sprint(rec), "stack", string(debug.Stack()))
			if c.Writer.Written() {
				c.Abort()
				return
			}
			writeProblem(c, &platform.Error{Code: platform.EINTERNAL, Message: "internal error", Err: fmt.Errorf("panic: %v", rec)})
		}()
		c.Next()
	}
}

// limitBody caps every request body; Huma operations enforce the same limit
// with a 413 of their own, this guards the routes outside Huma.
func limitBody(max int64) gin.HandlerFunc {
	return func(c *gin.Context) {
		if c.Request.Body != nil {
			c.Request.Body = http.MaxBytesReader(c.Writer, c.Request.Body, max)
		}
		c.Next()
	}
}

// MaxJSONDepth is how deeply a request body's JSON may nest. Go decodes up
// to 10,000 levels, but a document stored that deep cannot be read back by
// many clients (Python's json gives up near 1,000): one member could make
// a shared list unreadable for the organization's tools.
const MaxJSONDepth = 64

// limitJSONDepth refuses a JSON body nested deeper than MaxJSONDepth. It
// runs after limitBody, so it reads at most the body limit.
func limitJSONDepth() gin.HandlerFunc {
	return func(c *gin.Context) {
		// A body without a Content-Type is read as JSON too.
		if ct := c.ContentType(); c.Request.Body == nil || c.Request.ContentLength == 0 || ct != "" && !strings.Contains(ct, "json") {
			c.Next()
			return
		}
		data, err := io.ReadAll(c.Request.Body)
		if err != nil {
			// The operation reads what was read, then meets the same error
			// and answers it (413 for a body over the limit).
			c.Request.Body = io.NopCloser(io.MultiReader(bytes.NewReader(data), failingReader{err}))
			c.Next()
			return
		}
		c.Request.Body = io.NopCloser(bytes.NewReader(data))
		if jsonDepth(data) > MaxJSONDepth {
			writeProblem(c, platform.Invalid("the body nests too deeply", platform.FieldError{Field: "body", Message: fmt.Sprintf("JSON nested more than %d levels deep", MaxJSONDepth)}))
			c.Abort()
			return
		}
		c.Next()
	}
}

// failingReader fails every read with err.
type failingReader struct{ err error }

func (r failingReader) Read([]byte) (int, error) { return 0, r.err }

// jsonDepth returns how deeply data's arrays and objects nest, counting
// brackets outside strings (data need not be valid JSON).
func jsonDepth(data []byte) int {
	depth, deepest := 0, 0
	inString, escaped := false, false
	for _, b := range data {
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case b == '\\':
				escaped = true
			case b == '"':
				inString = false
			}
		case b == '"':
			inString = true
		case b == '[' || b == '{':
			depth++
			deepest = max(deepest, depth)
		case b == ']' || b == '}':
			depth--
		}
	}
	return deepest
}

// securityHeaders sets the headers every API answer should carry.
func securityHeaders() gin.HandlerFunc {
	return func(c *gin.Context) {
		h := c.Writer.Header()
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("X-Frame-Options", "DENY")
		c.Next()
	}
}
