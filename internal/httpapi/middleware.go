package httpapi

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
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
