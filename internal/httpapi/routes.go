package httpapi

// Deps are the services the API's routes call.
type Deps struct{}

// Routes registers the whole API surface on s: every operation of the
// platform is listed here or in a function called from here.
func (s *Server) Routes(deps Deps) {
	_ = deps
}
