package httpapi

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/gin-gonic/gin"
	"github.com/google/uuid"
	"github.com/gorilla/websocket"

	"github.com/agentry/agentry/internal/access"
	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/notify"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/realtime"
)

// Realtime is what the WebSocket and notification routes need.
type Realtime struct {
	Gateway        *realtime.Gateway
	Tickets        *realtime.Tickets
	Authenticator  *access.Authenticator
	AllowedOrigins []string
	Notify         *notify.Service
}

// wsProtocol documents the WebSocket protocol in /docs.
const wsProtocol = `Upgrade to a WebSocket. Authenticate with ?ticket= (from POST /v1/ws/ticket; single use, 30 s) or, outside browsers, an Authorization: Bearer header. A browser's Origin must be one of the allowed origins (403 otherwise); a bad ticket or token is 401.

Client messages (JSON): {"type":"subscribe","topic":"agent:{id}" | "command:{id}" | "user:me","since":"<last event id seen>"} — since is optional and replays what was missed from the topic before live events (a since after the topic's last event is an error); {"type":"unsubscribe","topic":…}; {"type":"ping"}.

Server messages all have type, topic, id and data: events ("command.queued", "command.running", "command.progress", "command.log", "command.cancel_requested", "command.retrying", "command.succeeded", "command.failed", "command.canceled", "notification", …) with their stream id; and "subscribed", "unsubscribed", "pong", "error" (data: code, message — a refused subscription is an error message, the socket stays open), "reconnect" (the server is going away: reconnect and resubscribe with since).

A client message is at most 4 KiB. Subscribing needs read access (Agent.read, Command.read; user:me with an API key needs Notification.read in its scope); a topic's id may be spelled any way, "subscribed" names the canonical topic; revoking that access, or the session, ends the subscription (or the connection, close code 4001) within seconds. A client too slow to keep up is closed with code 4008: reconnect and resubscribe with since. The server pings every 20 s.`

type ticketOutput struct {
	CacheControl string `header:"Cache-Control"`
	Body         struct {
		Ticket    string    `json:"ticket" doc:"Pass as /v1/ws?ticket=…; it works once."`
		ExpiresAt time.Time `json:"expires_at"`
	}
}

func (s *Server) realtimeRoutes(d Deps, res *Resources) {
	rt := d.Realtime
	rt.Gateway.Authorize = func(ctx context.Context, p *platform.Principal, topic string) (string, error) {
		kind, id, _ := strings.Cut(topic, ":")
		switch kind {
		case "user":
			if id != "me" && id != p.ID {
				return "", platform.Errorf(platform.ENOTFOUND, "you can only follow your own notifications (user:me)")
			}
			// The topic carries notifications: an API key needs them in its
			// scope, as GET /v1/notifications does.
			if err := keyRequires(p, "Notification", "read"); err != nil {
				return "", err
			}
			return events.UserTopic(p.ID), nil
		case "agent", "command":
			// Any spelling of an id names the same topic: the canonical one.
			parsed, err := uuid.Parse(id)
			if err != nil {
				return "", platform.Errorf(platform.EINVALID, "%s topics are %s:{id}", kind, kind)
			}
			id = parsed.String()
			if kind == "agent" {
				_, _, err = res.Agents.Get(ctx, id, crud.ActionRead)
			} else {
				_, _, err = res.Commands.Get(ctx, id, crud.ActionRead)
			}
			if err != nil {
				return "", err
			}
			return kind + ":" + id, nil
		}
		return "", platform.Errorf(platform.EINVALID, "unknown topic; use agent:{id}, command:{id} or user:me")
	}

	huma.Register(s.API, s.op(http.MethodPost, "/v1/ws/ticket", "create-ws-ticket", "Realtime", "Get a WebSocket ticket",
		"A single-use ticket for the WebSocket handshake of a browser, which cannot send an Authorization header. It stands for the caller's session in the organization the request acts in, for 30 seconds.",
		http.StatusCreated, true, http.StatusForbidden),
		func(ctx context.Context, _ *struct{}) (*ticketOutput, error) {
			p := caller(ctx)
			if p.SessionID == "" {
				return nil, platform.Errorf(platform.EFORBIDDEN, "tickets are for logged-in users; API keys connect with an Authorization header")
			}
			ticket, err := rt.Tickets.Issue(ctx, realtime.TicketClaims{UserID: p.ID, OrgID: p.OrgID, SessionID: p.SessionID})
			if err != nil {
				return nil, err
			}
			out := &ticketOutput{CacheControl: "no-store"}
			out.Body.Ticket, out.Body.ExpiresAt = ticket, time.Now().Add(rt.Tickets.TTL()).UTC()
			return out, nil
		})

	s.engine.GET("/v1/ws", func(c *gin.Context) {
		r := c.Request
		if origin := r.Header.Get("Origin"); origin != "" && !originAllowed(origin, rt.AllowedOrigins) {
			writeProblem(c, platform.Errorf(platform.EFORBIDDEN, "origin %q is not allowed", origin))
			return
		}
		if !websocket.IsWebSocketUpgrade(r) {
			// Before authentication: a ticket is not spent on a request
			// that cannot become a connection.
			writeProblem(c, platform.Errorf(platform.EINVALID, "this is a WebSocket endpoint: connect with a WebSocket client (Connection: Upgrade, Upgrade: websocket)"))
			return
		}
		ctx := r.Context()
		var (
			p         *platform.Principal
			rebuild   func(context.Context) (*platform.Principal, error)
			session   string
			keyPrefix string
			err       error
		)
		if ticket := c.Query("ticket"); ticket != "" {
			claims, rerr := rt.Tickets.Redeem(ctx, ticket)
			if rerr != nil {
				writeProblem(c, rerr)
				return
			}
			if claims == nil {
				s.authFailed("bad_ticket")
				c.Header("WWW-Authenticate", `Bearer realm="agentry"`)
				writeProblem(c, platform.Errorf(platform.EUNAUTHORIZED, "invalid, used or expired ticket"))
				return
			}
			rebuild = func(ctx context.Context) (*platform.Principal, error) {
				return rt.Authenticator.FromSession(ctx, claims.UserID, claims.OrgID, claims.SessionID)
			}
			p, err = rebuild(ctx)
			session = claims.SessionID
		} else {
			header := r.Header.Clone()
			rebuild = func(ctx context.Context) (*platform.Principal, error) {
				return rt.Authenticator.Authenticate(ctx, &http.Request{Header: header})
			}
			p, err = rebuild(ctx)
			if p != nil {
				session = p.SessionID
				if p.KeyID != "" {
					keyPrefix, _, _ = access.SplitAPIKey(strings.TrimPrefix(header.Get("Authorization"), "Bearer "))
				}
			}
		}
		if err != nil {
			if reason, ok := access.IsAuthError(err); ok {
				s.authFailed(reason)
			}
			if platform.ErrorCode(err) == platform.EUNAUTHORIZED {
				c.Header("WWW-Authenticate", `Bearer realm="agentry"`)
			}
			writeProblem(c, err)
			return
		}
		rt.Gateway.Accept(c.Writer, r, p, rebuild, session, keyPrefix)
	})
	s.Document(&huma.Operation{
		OperationID: "websocket", Method: http.MethodGet, Path: "/v1/ws", Tags: []string{"Realtime"},
		Summary: "WebSocket: live events", Description: wsProtocol,
		Security: []map[string][]string{{"wsTicket": {}}, {"bearer": {}}},
		Responses: map[string]*huma.Response{
			"101": {Description: "Switching to the WebSocket protocol."},
			"400": {Description: "Not a WebSocket handshake (connect with a WebSocket client).", Content: map[string]*huma.MediaType{"application/problem+json": {Schema: &huma.Schema{Ref: "#/components/schemas/Problem"}}}},
			"401": {Description: "Bad ticket or token.", Content: map[string]*huma.MediaType{"application/problem+json": {Schema: &huma.Schema{Ref: "#/components/schemas/Problem"}}}},
			"403": {Description: "Origin not allowed.", Content: map[string]*huma.MediaType{"application/problem+json": {Schema: &huma.Schema{Ref: "#/components/schemas/Problem"}}}},
		},
	})

	s.notificationRoutes(d)
}

func (s *Server) authFailed(reason string) {
	if s.opts.OnAuthFailure != nil {
		s.opts.OnAuthFailure(reason)
	}
}

// originAllowed compares an Origin header with the allowed origins
// (scheme://host[:port], exactly; "*" allows any).
func originAllowed(origin string, allowed []string) bool {
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" {
		return false
	}
	canonical := strings.ToLower(u.Scheme + "://" + u.Host)
	return slices.ContainsFunc(allowed, func(a string) bool { return a == "*" || strings.ToLower(strings.TrimSuffix(a, "/")) == canonical })
}

type notifyInput struct {
	Body struct {
		UserID string              `json:"user_id" format:"uuid" doc:"A member of the organization the request acts in."`
		Kind   string              `json:"kind" minLength:"1" maxLength:"100" pattern:"^[a-z][a-z0-9_.-]*$"`
		Title  string              `json:"title" minLength:"1" maxLength:"200"`
		Body   string              `json:"body,omitempty" maxLength:"10000"`
		Data   platform.JSONObject `json:"data,omitempty"`
	}
}

type notificationOutput struct {
	Body *notify.Notification
}

type listNotificationsInput struct {
	Page       int  `query:"page" minimum:"1" maximum:"100000" default:"1"`
	PageSize   int  `query:"page_size" minimum:"1" maximum:"100" default:"20"`
	UnreadOnly bool `query:"unread" doc:"Only unread notifications."`
}

type notificationsOutput struct {
	Body struct {
		Items    []notify.Notification `json:"items" nullable:"false"`
		Page     int                   `json:"page"`
		PageSize int                   `json:"page_size"`
		Total    int64                 `json:"total"`
		Unread   int64                 `json:"unread"`
	}
}

type notificationIDInput struct {
	ID string `path:"id" format:"uuid"`
}

type readAllOutput struct {
	Body struct {
		Marked int64 `json:"marked"`
	}
}

type mutedBody struct {
	Muted []string `json:"muted" maxItems:"100" nullable:"false" doc:"Notification kinds not to receive, such as command.succeeded (each as a notification's kind is spelt)."`
}

// notificationKind is how a notification's kind is spelt.
var notificationKind = regexp.MustCompile(`^[a-z][a-z0-9_.-]{0,99}$`)

type mutedOutput struct{ Body mutedBody }
type mutedInput struct{ Body mutedBody }

func (s *Server) notificationRoutes(d Deps) {
	n := d.Realtime.Notify
	huma.Register(s.API, s.op(http.MethodPost, "/v1/notifications", "create-notification", "Notifications", "Notify a member",
		"Sends a notification to a member of the organization (the seed's notify): stored, and delivered live on their user:me topic. Organization admins and platform services. A kind the member muted is not sent (409).",
		http.StatusCreated, true, http.StatusForbidden, http.StatusConflict),
		func(ctx context.Context, in *notifyInput) (*notificationOutput, error) {
			p := caller(ctx)
			if !p.IsOrgAdmin() && !p.Superadmin || !keyAllows(p, "Notification", "create") {
				d.Audit.Record(ctx, platform.AuditEvent{Action: "notification.create", Outcome: "denied", Reason: "organization admins only"})
				return nil, platform.Errorf(platform.EFORBIDDEN, "organization admins only")
			}
			ms, err := d.Identity.Memberships(ctx, in.Body.UserID)
			if err != nil {
				return nil, err
			}
			if !slices.ContainsFunc(ms, func(m platform.Membership) bool { return m.OrgID == p.OrgID }) {
				return nil, platform.Invalid("not a member", platform.FieldError{Field: "body.user_id", Message: "no member of this organization has this id"})
			}
			org, sender := p.OrgID, p.ID
			out, err := n.Notify(ctx, notify.Notification{OrgID: &org, OwnerID: &sender, UserID: in.Body.UserID, Kind: in.Body.Kind,
				Title: in.Body.Title, Body: in.Body.Body, Data: in.Body.Data})
			if err != nil {
				return nil, err
			}
			if out == nil {
				return nil, platform.Errorf(platform.ECONFLICT, "the member muted notifications of kind %q", in.Body.Kind)
			}
			return &notificationOutput{Body: out}, nil
		})
	huma.Register(s.API, s.op(http.MethodGet, "/v1/notifications", "list-notifications", "Notifications", "My notifications",
		"The caller's notifications, unread first, newest first.", http.StatusOK, true, http.StatusForbidden),
		func(ctx context.Context, in *listNotificationsInput) (*notificationsOutput, error) {
			if err := keyRequires(caller(ctx), "Notification", "read"); err != nil {
				return nil, err
			}
			items, total, unread, err := n.List(ctx, caller(ctx).ID, in.UnreadOnly, in.PageSize, (in.Page-1)*in.PageSize)
			if err != nil {
				return nil, err
			}
			out := &notificationsOutput{}
			out.Body.Items, out.Body.Page, out.Body.PageSize, out.Body.Total, out.Body.Unread = items, in.Page, in.PageSize, total, unread
			return out, nil
		})
	huma.Register(s.API, s.op(http.MethodPost, "/v1/notifications/{id}/read", "read-notification", "Notifications", "Mark a notification read",
		"Marks one of the caller's notifications read.", http.StatusOK, true, http.StatusNotFound, http.StatusForbidden),
		func(ctx context.Context, in *notificationIDInput) (*notificationOutput, error) {
			if err := keyRequires(caller(ctx), "Notification", "update"); err != nil {
				return nil, err
			}
			out, err := n.MarkRead(ctx, caller(ctx).ID, in.ID)
			if err != nil {
				return nil, err
			}
			return &notificationOutput{Body: out}, nil
		})
	huma.Register(s.API, s.op(http.MethodPost, "/v1/notifications/read-all", "read-all-notifications", "Notifications", "Mark all read",
		"Marks every unread notification of the caller read.", http.StatusOK, true, http.StatusForbidden),
		func(ctx context.Context, _ *struct{}) (*readAllOutput, error) {
			if err := keyRequires(caller(ctx), "Notification", "update"); err != nil {
				return nil, err
			}
			marked, err := n.MarkAllRead(ctx, caller(ctx).ID)
			out := &readAllOutput{}
			out.Body.Marked = marked
			return out, err
		})
	huma.Register(s.API, s.op(http.MethodGet, "/v1/users/me/notification-preferences", "get-notification-preferences", "Notifications", "My muted notification kinds",
		"The kinds of notification the caller does not receive.", http.StatusOK, true, http.StatusForbidden),
		func(ctx context.Context, _ *struct{}) (*mutedOutput, error) {
			if err := keyRequires(caller(ctx), "Notification", "read"); err != nil {
				return nil, err
			}
			muted, err := n.Muted(ctx, caller(ctx).ID)
			return &mutedOutput{Body: mutedBody{Muted: muted}}, err
		})
	huma.Register(s.API, s.op(http.MethodPut, "/v1/users/me/notification-preferences", "set-notification-preferences", "Notifications", "Mute notification kinds",
		"Replaces the kinds of notification the caller does not receive (e.g. [\"command.succeeded\"]). Not with an API key.", http.StatusOK, true, http.StatusForbidden),
		func(ctx context.Context, in *mutedInput) (*mutedOutput, error) {
			if p := caller(ctx); p.Kind != platform.KindUser || p.KeyID != "" {
				return nil, platform.Errorf(platform.EFORBIDDEN, "only users logged in may change their notification preferences")
			}
			var bad []platform.FieldError
			for i, kind := range in.Body.Muted {
				if !notificationKind.MatchString(kind) {
					bad = append(bad, platform.FieldError{Field: fmt.Sprintf("body.muted[%d]", i), Message: "not a notification kind: lower-case letters, digits, '.', '_' and '-', at most 100, such as command.succeeded"})
				}
			}
			if len(bad) > 0 {
				return nil, platform.Invalid("invalid notification kinds", bad...)
			}
			muted := append([]string{}, slices.Compact(slices.Sorted(slices.Values(in.Body.Muted)))...) // [] for none, not null
			if err := n.SetMuted(ctx, caller(ctx).ID, muted); err != nil {
				return nil, err
			}
			return &mutedOutput{Body: mutedBody{Muted: muted}}, nil
		})
}
