package httpapi

import (
	"context"

	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/access"
	"github.com/agentry/agentry/internal/commands"
	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/secrets"
	"github.com/agentry/agentry/internal/templates"
)

// Deps are the services the API's routes call.
type Deps struct {
	DB       *sqlx.DB
	Registry *crud.Registry
	Accounts *access.Service
	Identity Identity
	Keys     Keys
	Guard    crud.Guard
	ACL      *access.ACL
	Audit    *access.Audit
	// Kinds are the templated resource kinds; the agent and environment
	// kinds are registered by the routes.
	Kinds *templates.Kinds
	// Sealer encrypts environment secrets.
	Sealer *secrets.Sealer
	// Dispatcher accepts commands.
	Dispatcher *commands.Dispatcher
	// Realtime serves the WebSocket gateway and notifications.
	Realtime *Realtime
	// Admin serves the superadmins' queue views.
	Admin *Admin
}

// Routes registers the whole API surface on s. Every operation of the
// platform is registered here or in a function called from here, in the
// order the documentation lists them.
func (s *Server) Routes(d Deps) {
	s.authRoutes(d)
	s.orgRoutes(d)
	s.membershipRoutes(d)
	res := s.resourceRoutes(d)
	s.keyRoutes(d, func(ctx context.Context, id, action string) (*platform.ResourceRef, error) {
		a, _, err := res.Agents.Get(ctx, id, action)
		if err != nil {
			return nil, err
		}
		ref := a.Ref(AgentScope.Type)
		return &ref, nil
	})
	s.commandRoutes(d, res)
	if d.Realtime != nil {
		s.realtimeRoutes(d, res)
	}
	s.aclRoutes(d)
	s.auditRoutes(d)
	if d.Admin != nil {
		s.adminRoutes(d)
	}
}
