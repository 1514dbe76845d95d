package access

import (
	"context"
	"log/slog"

	"github.com/agentry/agentry/internal/platform"
)

// Audit writes audit events, filling in who, from where and in which
// request from the context. A failed write is logged and never fails the
// action it records.
type Audit struct {
	Store interface {
		Record(ctx context.Context, e platform.AuditEvent) error
	}
	Logger *slog.Logger
}

// Record writes e.
func (a *Audit) Record(ctx context.Context, e platform.AuditEvent) {
	if a == nil || a.Store == nil {
		return
	}
	if p := platform.PrincipalFrom(ctx); p != nil {
		if e.ActorID == nil {
			e.ActorID, e.ActorKind = &p.ID, p.Kind
		}
		if e.OrgID == nil && p.OrgID != "" {
			e.OrgID = &p.OrgID
		}
		if p.KeyID != "" {
			if e.Details == nil {
				e.Details = platform.JSONObject{}
			}
			e.Details["api_key_id"] = p.KeyID
		}
	}
	info := platform.RequestInfoFrom(ctx)
	e.IP, e.UserAgent, e.RequestID = info.IP, info.UserAgent, info.ID
	if err := a.Store.Record(context.WithoutCancel(ctx), e); err != nil && a.Logger != nil {
		a.Logger.ErrorContext(ctx, "audit event not written", "action", e.Action, "err", err)
	}
}
