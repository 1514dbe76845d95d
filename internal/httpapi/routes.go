package httpapi

import (
	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/access"
	"github.com/agentry/agentry/internal/crud"
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
	// Agents loads an agent for the API key routes (set by the agent routes).
	Agents AgentLoader
}

// Routes registers the whole API surface on s. Every operation of the
// platform is registered here or in a function called from here, in the
// order the documentation lists them.
func (s *Server) Routes(d Deps) {
	s.authRoutes(d)
	s.orgRoutes(d)
	s.membershipRoutes(d)
	s.keyRoutes(d)
	s.aclRoutes(d)
	s.auditRoutes(d)
}
