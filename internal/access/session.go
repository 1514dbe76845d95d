package access

import (
	"context"

	"github.com/agentry/agentry/internal/platform"
)

// FromSession returns the principal of a user's login session acting in
// orgID, as FromToken would for one of the session's access tokens: for
// connections that outlive a token (WebSocket tickets). A revoked session,
// a disabled user or a lost membership is refused.
func (a *Authenticator) FromSession(ctx context.Context, userID, orgID, sessionID string) (*platform.Principal, error) {
	revoked, err := a.sessionRevoked(ctx, sessionID)
	if err != nil {
		return nil, err
	}
	if revoked {
		return nil, unauthorized(FailRevoked)
	}
	f, err := a.loadFacts(ctx, userID, orgID)
	if err != nil {
		return nil, err
	}
	p, err := userPrincipal(f, orgID)
	if err != nil {
		return nil, err
	}
	p.SessionID = sessionID
	return p, nil
}
