package httpapi

import (
	"errors"

	"github.com/danielgtaylor/huma/v2"
	"github.com/danielgtaylor/huma/v2/adapters/humagin"

	"github.com/agentry/agentry/internal/platform"
)

// authenticate is the Huma middleware that requires credentials on every
// operation declaring security, and puts the principal in the context.
// Operations without security (login, health) pass untouched.
func (s *Server) authenticate(ctx huma.Context, next func(huma.Context)) {
	op := ctx.Operation()
	if op == nil || len(op.Security) == 0 || s.opts.Authenticator == nil {
		next(ctx)
		return
	}
	r := humagin.Unwrap(ctx).Request
	p, err := s.opts.Authenticator.Authenticate(r.Context(), r)
	if err != nil {
		if s.opts.OnAuthFailure != nil {
			reason := "error"
			var re interface{ AuthReason() string }
			if errors.As(err, &re) {
				reason = re.AuthReason()
			}
			s.opts.OnAuthFailure(reason)
		}
		if platform.ErrorCode(err) == platform.EUNAUTHORIZED {
			ctx.SetHeader("WWW-Authenticate", `Bearer realm="agentry"`)
		}
		p := problemFor(r.Context(), r.URL.Path, err)
		_ = huma.WriteErr(s.API, ctx, p.Status, p.Detail, err)
		return
	}
	info := platform.RequestInfoFrom(r.Context())
	p.IP, p.UserAgent = info.IP, info.UserAgent
	next(huma.WithContext(ctx, platform.WithPrincipal(ctx.Context(), p)))
}
