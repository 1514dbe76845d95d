package e2e

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
)

// ntNotification is a notification as the API shows it.
type ntNotification struct {
	ID       string         `json:"id"`
	UserID   string         `json:"user_id"`
	SenderID string         `json:"sender_id"`
	OrgID    string         `json:"org_id"`
	Kind     string         `json:"kind"`
	Title    string         `json:"title"`
	Body     string         `json:"body"`
	Data     map[string]any `json:"data"`
	ReadAt   *string        `json:"read_at"`
}

type ntPage struct {
	Items  []ntNotification `json:"items"`
	Total  int64            `json:"total"`
	Unread int64            `json:"unread"`
}

func ntList(t *testing.T, c *Client, query string) ntPage {
	t.Helper()
	var p ntPage
	if err := json.Unmarshal(c.Must(200, "GET", "/v1/notifications"+query, nil).Body, &p); err != nil {
		t.Fatal(err)
	}
	return p
}

func ntTitles(ns []ntNotification) []string {
	out := make([]string, len(ns))
	for i, n := range ns {
		out[i] = n.Title
	}
	return out
}

// ntLive reads the next message and fails unless it is a notification of
// user, returning it.
func ntLive(t *testing.T, c *wsConn, user string) ntNotification {
	t.Helper()
	m := c.expect("notification", "user:"+user)
	var n ntNotification
	if err := json.Unmarshal(m.Data, &n); err != nil {
		t.Fatalf("notification data: %s", m.Data)
	}
	return n
}

func ntSend(admin *Client, user, kind, title string) *Response {
	return admin.Do("POST", "/v1/notifications", map[string]any{"user_id": user, "kind": kind, "title": title, "body": "body of " + title, "data": map[string]any{"k": title}})
}

// An organization admin notifies a member: stored, delivered live on
// user:me, listed unread first, read one by one or all at once.
func TestNotificationsFromAnAdmin(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	admin := s.Client(api).NewUser("admin")
	member := s.Client(api).NewUser("member")
	outsider := s.Client(api).NewUser("outsider")
	memberIn := rtInvite(t, admin, member, "member")

	live := wsDialTicket(t, api, member.Client)
	live.send("subscribe", "user:me", "")
	live.expect("subscribed", "user:"+member.ID)

	r := ntSend(admin.Client, member.ID, "deploy.done", "first")
	if r.Status != 201 {
		t.Fatalf("notify a member: want 201, got %d: %s", r.Status, r.Body)
	}
	var sent ntNotification
	_ = json.Unmarshal(r.Body, &sent)
	if sent.UserID != member.ID || sent.SenderID != admin.ID || sent.OrgID != admin.Org || sent.Kind != "deploy.done" || sent.ReadAt != nil {
		t.Fatalf("201: got %s", r.Body)
	}
	got := ntLive(t, live, member.ID)
	if got.ID != sent.ID || got.Title != "first" || got.Body != "body of first" || got.Data["k"] != "first" {
		t.Fatalf("live: want the sent notification, got %+v", got)
	}

	t.Run("who may notify whom", func(t *testing.T) {
		if r := ntSend(memberIn, admin.ID, "x", "from a member"); r.Status != 403 {
			t.Errorf("a plain member: want 403, got %d: %s", r.Status, r.Body)
		}
		for name, user := range map[string]string{"a non-member": outsider.ID, "an unknown user": uuid.NewString()} {
			if r := ntSend(admin.Client, user, "x", "to "+name); r.Status != 400 {
				t.Errorf("%s: want 400, got %d: %s", name, r.Status, r.Body)
			}
		}
		if r := ntSend(admin.Client, member.ID, "Not A Kind!", "bad kind"); r.Status != 400 {
			t.Errorf("a bad kind: want 400, got %d: %s", r.Status, r.Body)
		}
		if r := s.Client(api).Do("POST", "/v1/notifications", map[string]any{"user_id": member.ID, "kind": "x", "title": "anonymous"}); r.Status != 401 {
			t.Errorf("anonymous: want 401, got %d", r.Status)
		}
		// Nothing of that reached the member (the pong comes first).
		if extra := live.ping(); len(extra) != 0 {
			t.Fatalf("want nothing but the pong, got %v", rtTypes(extra))
		}
		if p := ntList(t, outsider.Client, ""); p.Total != 0 {
			t.Fatalf("the outsider got %d notifications", p.Total)
		}
	})

	t.Run("listed unread first, newest first; read; read all", func(t *testing.T) {
		var ids []string
		for _, title := range []string{"second", "third", "fourth"} {
			r := ntSend(admin.Client, member.ID, "deploy.done", title)
			if r.Status != 201 {
				t.Fatalf("notify: %d %s", r.Status, r.Body)
			}
			ids = append(ids, r.Str(t, "id"))
			if n := ntLive(t, live, member.ID); n.Title != title {
				t.Fatalf("live: want %s, got %s", title, n.Title)
			}
		}
		// The newest is read; the others stay unread.
		read := member.Must(200, "POST", "/v1/notifications/"+ids[2]+"/read", nil)
		if read.JSON(t)["read_at"] == nil {
			t.Fatalf("read: want read_at, got %s", read.Body)
		}
		p := ntList(t, member.Client, "")
		if want := []string{"third", "second", "first", "fourth"}; !slices.Equal(ntTitles(p.Items), want) || p.Total != 4 || p.Unread != 3 {
			t.Fatalf("list: want %v (4, 3 unread), got %v (%d, %d unread)", want, ntTitles(p.Items), p.Total, p.Unread)
		}
		if p := ntList(t, member.Client, "?unread=true&page_size=2"); !slices.Equal(ntTitles(p.Items), []string{"third", "second"}) || p.Total != 3 {
			t.Fatalf("unread, first page of 2: got %v (total %d)", ntTitles(p.Items), p.Total)
		}
		// Nobody else reads them.
		admin.Must(404, "POST", "/v1/notifications/"+ids[0]+"/read", nil)
		member.Must(404, "POST", "/v1/notifications/"+uuid.NewString()+"/read", nil)

		if marked := member.Must(200, "POST", "/v1/notifications/read-all", nil).JSON(t)["marked"]; marked != float64(3) {
			t.Fatalf("read-all: want 3 marked, got %v", marked)
		}
		if p := ntList(t, member.Client, ""); p.Unread != 0 || p.Total != 4 {
			t.Fatalf("after read-all: want 4, none unread; got %d, %d unread", p.Total, p.Unread)
		}
	})

	t.Run("a muted kind is refused", func(t *testing.T) {
		member.Must(200, "PUT", "/v1/users/me/notification-preferences", map[string]any{"muted": []string{"deploy.done"}})
		if r := ntSend(admin.Client, member.ID, "deploy.done", "muted"); r.Status != 409 {
			t.Fatalf("a muted kind: want 409, got %d: %s", r.Status, r.Body)
		}
		if extra := live.ping(); len(extra) != 0 {
			t.Fatalf("a muted kind was delivered: %v", rtTypes(extra))
		}
	})
}

// A command that ends notifies whoever dispatched it, unless they muted
// that kind.
func TestNotificationsOfCommands(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("dispatcher")
	live := wsDial(t, api, u.Token)
	live.send("subscribe", "user:me", "")
	live.expect("subscribed", "user:"+u.ID)

	// Each step uses an agent of its own: a command dispatched to an agent
	// as its previous command ends may never run (see
	// TestCommandDispatchedAsThePreviousEndsRuns).
	var agent string
	dispatch := func(task string, payload map[string]any) string {
		t.Helper()
		body := map[string]any{"task": task, "payload": payload, "max_retries": 0}
		return u.Must(202, "POST", "/v1/agents/"+agent+"/commands", body).Str(t, "id")
	}
	agent = rtAgent(t, u.Client)
	ok := dispatch("agent:echo", map[string]any{"message": "hi"})
	n := ntLive(t, live, u.ID)
	if n.Kind != "command.succeeded" || n.Data["command_id"] != ok || n.Data["agent_id"] != agent || n.OrgID != u.Org {
		t.Fatalf("success: got %+v", n)
	}
	agent = rtAgent(t, u.Client)
	failed := dispatch("agent:echo", map[string]any{"message": "hi", "fail": "boom"})
	n = ntLive(t, live, u.ID)
	if n.Kind != "command.failed" || n.Data["command_id"] != failed || n.Body != "boom" {
		t.Fatalf("failure: got %+v", n)
	}

	for _, bad := range []string{"", "Bad Kind", strings.Repeat("k", 101)} {
		if r := u.Do("PUT", "/v1/users/me/notification-preferences", map[string]any{"muted": []string{"command.failed", bad}}); r.Status != 400 {
			t.Fatalf("muting %q: want 400, got %d", bad, r.Status)
		}
	}
	if r := u.Do("GET", "/v1/notifications?unread=true&sort=-created_at", nil); r.Status != 400 {
		t.Fatalf("an unknown list parameter: want 400, got %d", r.Status)
	}
	prefs := u.Must(200, "PUT", "/v1/users/me/notification-preferences", map[string]any{"muted": []string{"command.succeeded", "command.succeeded"}})
	if got := prefs.JSON(t)["muted"]; len(got.([]any)) != 1 {
		t.Fatalf("PUT preferences: got %s", prefs.Body)
	}
	if got := u.Must(200, "GET", "/v1/users/me/notification-preferences", nil).JSON(t)["muted"].([]any); len(got) != 1 || got[0] != "command.succeeded" {
		t.Fatalf("GET preferences: got %v", got)
	}
	// Commands of one agent run in order: the failure's notification comes
	// after the (muted) success's would have. The failure is dispatched
	// while the success runs.
	agent = rtAgent(t, u.Client)
	quiet := dispatch("agent:sleep", map[string]any{"milliseconds": 300, "steps": 1})
	failedAgain := dispatch("agent:echo", map[string]any{"message": "hi", "fail": "boom again"})
	n = ntLive(t, live, u.ID)
	if n.Kind != "command.failed" || n.Data["command_id"] != failedAgain {
		t.Fatalf("after muting successes: want only the failure, got %+v", n)
	}
	rtWaitCommand(t, u.Client, quiet, "succeeded")
	p := ntList(t, u.Client, "")
	var kinds []string
	for _, n := range p.Items {
		kinds = append(kinds, n.Kind)
	}
	if want := []string{"command.failed", "command.failed", "command.succeeded"}; !slices.Equal(kinds, want) {
		t.Fatalf("listed: want %v, got %v", want, kinds)
	}

	// Unmuted, successes notify again.
	if got, ok := u.Must(200, "PUT", "/v1/users/me/notification-preferences", map[string]any{"muted": []string{}}).JSON(t)["muted"].([]any); !ok || len(got) != 0 {
		t.Fatalf("unmuted everything: want muted [], got %v", got)
	}
	agent = rtAgent(t, u.Client)
	again := dispatch("agent:echo", map[string]any{"message": "loud"})
	if n := ntLive(t, live, u.ID); n.Kind != "command.succeeded" || n.Data["command_id"] != again {
		t.Fatalf("unmuted: got %+v", n)
	}
}

// A command dispatched to an agent just as its previous command ends must
// run.
func TestCommandDispatchedAsThePreviousEndsRuns(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("race")
	agent := rtAgent(t, u.Client)
	live := wsDial(t, api, u.Token)
	live.send("subscribe", "user:me", "")
	live.expect("subscribed", "user:"+u.ID)
	body := map[string]any{"task": "agent:echo", "payload": map[string]any{"message": "hi"}}
	u.Must(202, "POST", "/v1/agents/"+agent+"/commands", body)
	for i := range 100 {
		// The notification is sent as the command ends, just before the
		// worker admits the agent's next command.
		ntLive(t, live, u.ID)
		next := u.Must(202, "POST", "/v1/agents/"+agent+"/commands", body).Str(t, "id")
		deadline := time.Now().Add(10 * time.Second)
		for u.Must(200, "GET", "/v1/commands/"+next, nil).Str(t, "status") == "queued" {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: command %s still queued after 10s: %s", i, next, u.Must(200, "GET", "/v1/commands/"+next, nil).Body)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}
