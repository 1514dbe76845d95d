package httpapi

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"sync"

	"github.com/danielgtaylor/huma/v2"
	"github.com/gin-gonic/gin"

	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/sqlq"
)

// Problem is an RFC 9457 problem detail, the body of every error answer.
type Problem struct {
	Type      string                `json:"type" doc:"A URI reference identifying the problem type; about:blank when the status says it all."`
	Title     string                `json:"title" doc:"The HTTP status text."`
	Status    int                   `json:"status" doc:"The HTTP status code."`
	Detail    string                `json:"detail,omitempty" doc:"What went wrong, for a human."`
	Instance  string                `json:"instance,omitempty" doc:"The request path."`
	Code      string                `json:"code" doc:"A stable machine-readable error code." enum:"invalid,not_found,forbidden,unauthorized,conflict,precondition_failed,too_large,unsupported_media,too_many_requests,unavailable,method_not_allowed,internal"`
	RequestID string                `json:"request_id,omitempty" doc:"The request id, also in the X-Request-ID header; quote it when reporting a problem."`
	Errors    []platform.FieldError `json:"errors,omitempty" doc:"Every bad field of the input, when the input failed validation."`

	retryAfter int
}

func (p *Problem) Error() string  { return p.Title + ": " + p.Detail }
func (p *Problem) GetStatus() int { return p.Status }

// ContentType makes Huma answer problems as application/problem+json.
func (p *Problem) ContentType(string) string { return "application/problem+json" }

// GetHeaders gives Huma the Retry-After header of a throttled or unavailable answer.
func (p *Problem) GetHeaders() http.Header {
	if p.retryAfter <= 0 {
		return nil
	}
	return http.Header{"Retry-After": {strconv.Itoa(p.retryAfter)}}
}

// statusOf maps each platform error code to its one HTTP status.
var statusOf = map[string]int{
	platform.EINVALID:      http.StatusBadRequest,
	platform.EUNAUTHORIZED: http.StatusUnauthorized,
	platform.EFORBIDDEN:    http.StatusForbidden,
	platform.ENOTFOUND:     http.StatusNotFound,
	platform.ENOTALLOWED:   http.StatusMethodNotAllowed,
	platform.ECONFLICT:     http.StatusConflict,
	platform.EPRECONDITION: http.StatusPreconditionFailed,
	platform.ETOOLARGE:     http.StatusRequestEntityTooLarge,
	platform.EMEDIATYPE:    http.StatusUnsupportedMediaType,
	platform.ETOOMANY:      http.StatusTooManyRequests,
	platform.EINTERNAL:     http.StatusInternalServerError,
	platform.EUNAVAILABLE:  http.StatusServiceUnavailable,
}

// codeOf maps a status Huma chose (for its own validation) back to a code.
func codeOf(status int) string {
	for code, s := range statusOf {
		if s == status {
			return code
		}
	}
	if status >= 500 {
		return platform.EINTERNAL
	}
	return platform.EINVALID
}

// unavailable reports whether err means a dependency (Postgres, Redis) is
// unreachable rather than that the request was bad: the client may retry.
var unavailable = func(err error) bool { return false }

// SetUnavailableClassifier installs the function that recognises a
// dependency outage in an error, so it is answered 503 instead of 500.
func SetUnavailableClassifier(fn func(error) bool) { unavailable = fn }

// problemFor builds the problem for err as seen by the request in ctx.
// Errors without a platform code are logged in full and shown as "internal
// error"; a platform error's message is shown as is.
func problemFor(ctx context.Context, path string, err error) *Problem {
	var perr *platform.Error
	var p *Problem
	bad := sqlq.BadInput(err)
	switch {
	case errors.As(err, &p):
		cp := *p
		p = &cp
	case errors.As(err, &perr):
		status := statusOf[perr.Code]
		if status == 0 {
			status = http.StatusInternalServerError
		}
		p = &Problem{Status: status, Code: perr.Code, Detail: perr.Message, Errors: perr.Fields, retryAfter: perr.RetryAfter}
		switch {
		case status >= 500:
			loggerFrom(ctx).ErrorContext(ctx, "request failed", "err", err)
		case perr.Err != nil:
			loggerFrom(ctx).InfoContext(ctx, "request refused", "code", perr.Code, "err", err)
		}
	case bad != nil:
		// Data the database refused (a NUL character, a malformed value)
		// that no check caught first: the client's to fix.
		return problemFor(ctx, path, bad)
	case unavailable(err) || errors.Is(err, context.DeadlineExceeded):
		loggerFrom(ctx).WarnContext(ctx, "dependency unavailable", "err", err)
		p = &Problem{Status: http.StatusServiceUnavailable, Code: platform.EUNAVAILABLE, Detail: "a dependency is unavailable; retry shortly", retryAfter: 2}
	default:
		loggerFrom(ctx).ErrorContext(ctx, "request failed", "err", err)
		p = &Problem{Status: http.StatusInternalServerError, Code: platform.EINTERNAL, Detail: "internal error"}
	}
	p.fill(ctx, path)
	return p
}

func (p *Problem) fill(ctx context.Context, path string) {
	if p.Type == "" {
		p.Type = "about:blank"
	}
	if p.Title == "" {
		p.Title = http.StatusText(p.Status)
	}
	if p.Code == "" {
		p.Code = codeOf(p.Status)
	}
	if p.Instance == "" {
		p.Instance = path
	}
	if p.RequestID == "" {
		p.RequestID = RequestID(ctx)
	}
}

var installHumaErrors sync.Once

// useProblems makes every error Huma writes an agentry Problem. Huma keeps
// this hook in a package variable, so it is installed once per process; it
// takes everything request-specific from the request's context.
func useProblems() {
	installHumaErrors.Do(func() {
		huma.NewErrorWithContext = func(hctx huma.Context, status int, msg string, errs ...error) huma.StatusError {
			var ctx context.Context = context.Background()
			path := ""
			if hctx != nil {
				ctx = hctx.Context()
				u := hctx.URL()
				path = u.Path
			}
			for _, err := range errs {
				var perr *platform.Error
				if errors.As(err, &perr) || (status >= 500 && err != nil) {
					return problemFor(ctx, path, err)
				}
			}
			return humaProblem(ctx, path, status, msg, errs)
		}
		huma.NewError = func(status int, msg string, errs ...error) huma.StatusError {
			return humaProblem(context.Background(), "", status, msg, errs)
		}
	})
}

// humaProblem turns an error Huma raised itself (decoding, validation, body
// size, content type) into a Problem. Validation is always 400, with every
// bad field listed.
func humaProblem(ctx context.Context, path string, status int, msg string, errs []error) *Problem {
	p := &Problem{Status: status, Detail: msg}
	for _, err := range errs {
		if err == nil {
			continue
		}
		var d *huma.ErrorDetail
		if errors.As(err, &d) {
			p.Errors = append(p.Errors, crud.FieldError(d))
			continue
		}
		p.Errors = append(p.Errors, platform.FieldError{Message: err.Error()})
	}
	switch status {
	case http.StatusUnprocessableEntity:
		p.Status = http.StatusBadRequest
		p.Code = platform.EINVALID
	case http.StatusRequestEntityTooLarge:
		p.Code = platform.ETOOLARGE
	case http.StatusUnsupportedMediaType:
		p.Code = platform.EMEDIATYPE
		p.Detail = "unsupported Content-Type; send application/json"
		p.Errors = nil
	}
	if p.Status == http.StatusBadRequest && p.Detail == "" {
		p.Detail = "the request is invalid"
	}
	p.fill(ctx, path)
	return p
}

// writeProblem answers a Gin request that never reached Huma (unknown route,
// panic, middleware refusal) with the problem for err.
func writeProblem(c *gin.Context, err error) {
	p := problemFor(c.Request.Context(), c.Request.URL.Path, err)
	if p.retryAfter > 0 {
		c.Header("Retry-After", strconv.Itoa(p.retryAfter))
	}
	c.Header("Content-Type", "application/problem+json")
	c.AbortWithStatusJSON(p.Status, p)
}

// loggerFrom returns the request's logger, or the default one outside a request.
func loggerFrom(ctx context.Context) *slog.Logger {
	if l, ok := ctx.Value(loggerKey{}).(*slog.Logger); ok {
		return l
	}
	return slog.Default()
}
