package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/testenv"
)

// wsMsg is a message of the gateway.
type wsMsg struct {
	Type  string          `json:"type"`
	Topic string          `json:"topic"`
	ID    string          `json:"id"`
	Data  json.RawMessage `json:"data"`
}

// field returns a top-level string field of the message's data.
func (m wsMsg) field(key string) string {
	var d map[string]any
	_ = json.Unmarshal(m.Data, &d)
	s, _ := d[key].(string)
	return s
}

// wsConn is a WebSocket client of an API process.
type wsConn struct {
	t  *testing.T
	ws *websocket.Conn
}

// wsURL is the WebSocket address of an API process.
func wsURL(p *Proc, query string) string {
	return "ws" + strings.TrimPrefix(p.URL, "http") + "/v1/ws" + query
}

// wsDial connects to p as the caller of token (Authorization header) and
// fails the test unless the upgrade succeeds.
func wsDial(t *testing.T, p *Proc, token string) *wsConn {
	t.Helper()
	h := http.Header{}
	h.Set("Authorization", "Bearer "+token)
	return wsDialWith(t, websocket.DefaultDialer, wsURL(p, ""), h)
}

// wsDialTicket connects to p with a fresh ticket of c's session.
func wsDialTicket(t *testing.T, p *Proc, c *Client) *wsConn {
	t.Helper()
	return wsDialWith(t, websocket.DefaultDialer, wsURL(p, "?ticket="+wsTicket(t, c)), nil)
}

func wsTicket(t *testing.T, c *Client) string {
	t.Helper()
	return c.Must(201, "POST", "/v1/ws/ticket", nil).Str(t, "ticket")
}

func wsDialWith(t *testing.T, d *websocket.Dialer, url string, h http.Header) *wsConn {
	t.Helper()
	ws, res, err := d.Dial(url, h)
	if err != nil {
		status := 0
		if res != nil {
			status = res.StatusCode
		}
		t.Fatalf("dial %s: %v (status %d)", url, err, status)
	}
	res.Body.Close()
	t.Cleanup(func() { ws.Close() })
	return &wsConn{t: t, ws: ws}
}

// wsStatus tries to connect and returns the status of the answer (101 on
// success, after which it closes the connection).
func wsStatus(t *testing.T, url string, h http.Header) int {
	t.Helper()
	ws, res, err := websocket.DefaultDialer.Dial(url, h)
	if err == nil {
		ws.Close()
		return http.StatusSwitchingProtocols
	}
	if res == nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	res.Body.Close()
	return res.StatusCode
}

func (c *wsConn) send(typ, topic, since string) {
	c.t.Helper()
	if err := c.ws.WriteJSON(map[string]string{"type": typ, "topic": topic, "since": since}); err != nil {
		c.t.Fatalf("send %s: %v", typ, err)
	}
}

func (c *wsConn) tryRead(within time.Duration) (wsMsg, error) {
	_ = c.ws.SetReadDeadline(time.Now().Add(within))
	var m wsMsg
	_, data, err := c.ws.ReadMessage()
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(data, &m); err != nil {
		return m, fmt.Errorf("not a message: %s", data)
	}
	return m, nil
}

// read returns the next message, failing after 10 s.
func (c *wsConn) read() wsMsg {
	c.t.Helper()
	m, err := c.tryRead(10 * time.Second)
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	return m
}

// expect reads the next message and fails unless it has typ and topic.
func (c *wsConn) expect(typ, topic string) wsMsg {
	c.t.Helper()
	m := c.read()
	if m.Type != typ || m.Topic != topic {
		c.t.Fatalf("want %s on %q, got %s on %q: %s", typ, topic, m.Type, m.Topic, m.Data)
	}
	return m
}

func (c *wsConn) subscribe(topic, since string) {
	c.t.Helper()
	c.send("subscribe", topic, since)
	c.expect("subscribed", topic)
}

// ping sends a ping and reads until the pong, returning what came before:
// whatever the server had queued for the client before it read the ping.
func (c *wsConn) ping() []wsMsg {
	c.t.Helper()
	c.send("ping", "", "")
	var before []wsMsg
	for {
		m := c.read()
		if m.Type == "pong" {
			return before
		}
		before = append(before, m)
	}
}

// until reads messages of topic until one of type last, and returns them all.
func (c *wsConn) until(topic, last string) []wsMsg {
	c.t.Helper()
	var out []wsMsg
	for {
		m := c.read()
		if m.Topic != topic {
			c.t.Fatalf("want messages of %s, got %s on %s: %s", topic, m.Type, m.Topic, m.Data)
		}
		out = append(out, m)
		if m.Type == last {
			return out
		}
	}
}

// closed reads until the connection closes and returns the close error and
// the messages read before.
func (c *wsConn) closed(within time.Duration) (*websocket.CloseError, []wsMsg) {
	c.t.Helper()
	deadline := time.Now().Add(within)
	var seen []wsMsg
	for {
		m, err := c.tryRead(time.Until(deadline))
		if err != nil {
			var ce *websocket.CloseError
			if !errors.As(err, &ce) {
				c.t.Fatalf("want a close frame within %s, got %v (after %d messages)", within, err, len(seen))
			}
			return ce, seen
		}
		seen = append(seen, m)
	}
}

// expectClose reads until the connection closes, and fails unless with code.
func (c *wsConn) expectClose(code int, within time.Duration) []wsMsg {
	c.t.Helper()
	ce, seen := c.closed(within)
	if ce.Code != code {
		c.t.Fatalf("want close code %d, got %d %q", code, ce.Code, ce.Text)
	}
	return seen
}

func rtTypes(ms []wsMsg) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.Type
	}
	return out
}

func rtIDs(ms []wsMsg) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.ID
	}
	return out
}

// rtCheckLifecycle fails unless ms are one command's events: queued,
// running, progress…, succeeded, each once, with increasing ids.
func rtCheckLifecycle(t *testing.T, who string, ms []wsMsg, command string) {
	t.Helper()
	types := rtTypes(ms)
	count := map[string]int{}
	for i, m := range ms {
		count[m.Type]++
		if m.field("id") != command {
			t.Fatalf("%s: event %d is of command %q, want %s", who, i, m.field("id"), command)
		}
		if i > 0 && !rtBefore(ms[i-1].ID, m.ID) {
			t.Fatalf("%s: ids not increasing at %d: %s then %s", who, i, ms[i-1].ID, m.ID)
		}
	}
	if len(ms) < 4 || types[0] != "command.queued" || types[1] != "command.running" || types[len(types)-1] != "command.succeeded" ||
		count["command.queued"] != 1 || count["command.running"] != 1 || count["command.succeeded"] != 1 || count["command.progress"] < 1 {
		t.Fatalf("%s: want queued, running, progress…, succeeded once each, got %v", who, types)
	}
}

// rtBefore reports whether stream id a comes before b.
func rtBefore(a, b string) bool {
	am, as, _ := strings.Cut(a, "-")
	bm, bs, _ := strings.Cut(b, "-")
	an, _ := strconv.ParseUint(am, 10, 64)
	bn, _ := strconv.ParseUint(bm, 10, 64)
	asq, _ := strconv.ParseUint(as, 10, 64)
	bsq, _ := strconv.ParseUint(bs, 10, 64)
	return an < bn || an == bn && asq < bsq
}

func rtAgent(t *testing.T, c *Client) string {
	t.Helper()
	return c.Must(201, "POST", "/v1/agents", map[string]any{"name": "rt-agent"}).Str(t, "id")
}

func rtDispatchSleep(t *testing.T, c *Client, agent string, ms, steps int) string {
	t.Helper()
	body := map[string]any{"task": "agent:sleep", "payload": map[string]any{"milliseconds": ms, "steps": steps}}
	return c.Must(202, "POST", "/v1/agents/"+agent+"/commands", body).Str(t, "id")
}

func rtWaitCommand(t *testing.T, c *Client, id, status string) {
	t.Helper()
	Eventually(t, 20*time.Second, "command "+status, func() bool {
		return c.Must(200, "GET", "/v1/commands/"+id, nil).Str(t, "status") == status
	})
}

// rtInvite makes member a member of admin's organization with role and
// returns member's client acting there.
func rtInvite(t *testing.T, admin, member *User, role string) *Client {
	t.Helper()
	admin.Must(201, "POST", "/v1/members", map[string]any{"email": member.Email, "role": role})
	return member.As(member.Token, admin.Org)
}

// rtRedis returns a client of the stack's Redis.
func rtRedis(t *testing.T, s *Stack) *redis.Client {
	t.Helper()
	opts, err := redis.ParseURL(s.Redis)
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opts)
	t.Cleanup(func() { rdb.Close() })
	return rdb
}

// rtMetric returns the value of a metric (without labels) of an API process.
func rtMetric(t *testing.T, p *Proc, name string) float64 {
	t.Helper()
	res, err := http.Get(p.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	sc := bufio.NewScanner(res.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

// Two API replicas share Redis: a client of each sees a command's events
// once each, in order; a client that drops off mid-way and comes back
// with since, on the other replica, gets exactly what it missed.
func TestRealtimeTwoReplicasSeeEveryEventOnce(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	a, b := s.API(), s.API()
	s.Start("worker")
	u := s.Client(a).NewUser("rt")
	agent := rtAgent(t, u.Client)
	topic := events.AgentTopic(agent)

	onA, onB := wsDial(t, a, u.Token), wsDial(t, b, u.Token)
	onA.subscribe(topic, "")
	onB.subscribe(topic, "")
	cmd := rtDispatchSleep(t, u.Client, agent, 1200, 6)
	cmdTopic := events.CommandTopic(cmd)

	// A third client follows the command from its start (since 0-0: all
	// that is kept), and leaves after the first progress event.
	leaver := wsDial(t, a, u.Token)
	leaver.subscribe(cmdTopic, "0-0")
	var seen []wsMsg
	for len(seen) == 0 || seen[len(seen)-1].Type != "command.progress" {
		seen = append(seen, leaver.read())
	}
	leaver.ws.Close()

	fromA := onA.until(topic, "command.succeeded")
	fromB := onB.until(topic, "command.succeeded")
	rtCheckLifecycle(t, "replica A", fromA, cmd)
	rtCheckLifecycle(t, "replica B", fromB, cmd)
	if a, b := strings.Join(rtIDs(fromA), ","), strings.Join(rtIDs(fromB), ","); a != b {
		t.Fatalf("the replicas relayed different events:\nA %s\nB %s", a, b)
	}
	rtWaitCommand(t, u.Client, cmd, "succeeded")

	// The whole story of the command topic, replayed on B.
	whole := wsDial(t, b, u.Token)
	whole.subscribe(cmdTopic, "0-0")
	all := whole.until(cmdTopic, "command.succeeded")
	rtCheckLifecycle(t, "replayed", all, cmd)
	if extra := whole.ping(); len(extra) != 0 {
		t.Fatalf("after the replay: want nothing more, got %v", rtTypes(extra))
	}
	if len(all) != len(fromA) {
		t.Fatalf("the command topic has %d events, the agent topic %d", len(all), len(fromA))
	}

	// The leaver comes back on B with the last id it saw.
	last := seen[len(seen)-1].ID
	back := wsDial(t, b, u.Token)
	back.subscribe(cmdTopic, last)
	missed := back.ping()
	want := all[len(seen):]
	if strings.Join(rtIDs(seen), ",") != strings.Join(rtIDs(all[:len(seen)]), ",") {
		t.Fatalf("the leaver saw %v, the topic starts %v", rtIDs(seen), rtIDs(all))
	}
	if got, w := strings.Join(rtIDs(missed), ","), strings.Join(rtIDs(want), ","); got != w {
		t.Fatalf("resumed after %s: want exactly %s, got %s", last, w, got)
	}
}

// A subscription to what the caller may not read is refused with an error
// message, and the socket stays usable.
func TestRealtimeRefusesOtherTenantsTopics(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	alice := s.Client(api).NewUser("alice")
	mallory := s.Client(api).NewUser("mallory")
	agent := rtAgent(t, alice.Client)
	mine := rtAgent(t, mallory.Client)

	c := wsDial(t, api, mallory.Token)
	for _, topic := range []string{
		"agent:" + agent,
		"agent:" + strings.ToUpper(agent),
		"command:" + agent,
		"user:" + alice.ID,
		"agent:not-a-uuid",
		"org:" + alice.Org,
	} {
		c.send("subscribe", topic, "")
		m := c.expect("error", topic)
		if code := m.field("code"); code != "not_found" && code != "invalid" {
			t.Fatalf("%s: want a not_found or invalid error, got %s", topic, m.Data)
		}
	}
	c.subscribe("agent:"+mine, "")
	c.subscribe("user:"+mallory.ID, "")
	if extra := c.ping(); len(extra) != 0 {
		t.Fatalf("want nothing but the pong, got %v", rtTypes(extra))
	}
}

// A topic takes any spelling of an id and answers with the canonical one,
// on which the events come; an API key follows user:me only with
// Notification.read in its scope; a since after the topic's last event is
// refused rather than left to hold back every live event.
func TestRealtimeTopicRules(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("topics")
	agent := rtAgent(t, u.Client)
	topic := events.AgentTopic(agent)

	c := wsDial(t, api, u.Token)
	c.subscribe(topic, "")
	plain := strings.ReplaceAll(agent, "-", "")
	for _, spelling := range []string{strings.ToUpper(agent), "{" + agent + "}", "urn:uuid:" + agent, plain} {
		c.send("subscribe", "agent:"+spelling, "")
		if m := c.expect("subscribed", topic); string(m.Data) != `{"already":true}` {
			t.Fatalf("agent:%s: want the canonical subscription, already there; got %s", spelling, m.Data)
		}
	}
	id := rtDispatchSleep(t, u.Client, agent, 1, 1)
	rtWaitCommand(t, u.Client, id, "succeeded")
	got := c.until(topic, "command.succeeded")
	if got[0].Type != "command.queued" {
		t.Fatalf("want the command's events once each from queued, got %v", rtTypes(got))
	}
	last := got[len(got)-1].ID

	// since: the last event is fine (nothing to replay), after it is not.
	c2 := wsDial(t, api, u.Token)
	c2.subscribe(topic, last)
	for _, since := range []string{"9999999999999-0", strings.Split(last, "-")[0] + "-999"} {
		c3 := wsDial(t, api, u.Token)
		c3.send("subscribe", topic, since)
		if m := c3.expect("error", topic); m.field("code") != "invalid" {
			t.Fatalf("since %s: want invalid, got %s", since, m.Data)
		}
	}

	narrow := u.Must(201, "POST", "/v1/api-keys", map[string]any{"name": "agents", "permissions": []string{"Agent.read"}}).Str(t, "key")
	k := wsDial(t, api, narrow)
	k.subscribe(topic, "")
	k.send("subscribe", "user:me", "")
	if m := k.expect("error", "user:me"); m.field("code") != "forbidden" {
		t.Fatalf("user:me with a key without Notification.read: want forbidden, got %s", m.Data)
	}
	wide := u.Must(201, "POST", "/v1/api-keys", map[string]any{"name": "inbox", "permissions": []string{"Notification.read"}}).Str(t, "key")
	wsDial(t, api, wide).subscribe("user:"+u.ID, "")

	// Deleting the agent ends the subscriptions to it at once, not at the
	// next periodic recheck.
	u.Must(204, "DELETE", "/v1/agents/"+agent, nil)
	start := time.Now()
	if m := c.read(); m.Type != "error" || m.Topic != topic || m.field("code") != "revoked" {
		t.Fatalf("after the agent's deletion: want a revoked error, got %s on %s: %s", m.Type, m.Topic, m.Data)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("ended %s after the deletion; want within seconds", took)
	}
}

// A client that cannot keep up is cut off with 4008 and does not slow down
// another on the same topic.
func TestRealtimeSlowClientIsCutOff(t *testing.T) {
	t.Parallel()
	s := NewStack(t, map[string]string{"AGENTRY_WEBSOCKET_SEND_QUEUE": "256"})
	api := s.API()
	u := s.Client(api).NewUser("slow")
	agent := rtAgent(t, u.Client)
	topic := events.AgentTopic(agent)

	// The slow client reads nothing, through a small receive window.
	h := http.Header{"Authorization": {"Bearer " + u.Token}}
	slow := wsDialWith(t, testenv.SmallBufferDialer(), wsURL(api, ""), h)
	fast := wsDial(t, api, u.Token)
	slow.subscribe(topic, "")
	fast.subscribe(topic, "")

	// Events published the way workers publish them.
	bus := events.NewBus(rtRedis(t, s), s.Prefix, 100000)
	pad := strings.Repeat("x", 4000)
	const total = 3000
	var wg sync.WaitGroup
	var fastErr error
	var lag time.Duration
	wg.Add(1)
	go func() {
		defer wg.Done()
		for want := 0; want < total; want++ {
			m, err := fast.tryRead(10 * time.Second)
			if err != nil {
				fastErr = fmt.Errorf("fast client after %d events: %w", want, err)
				return
			}
			var d struct {
				N  int   `json:"n"`
				At int64 `json:"at"`
			}
			_ = json.Unmarshal(m.Data, &d)
			if d.N != want {
				fastErr = fmt.Errorf("fast client: want event %d, got %d", want, d.N)
				return
			}
			lag = max(lag, time.Since(time.Unix(0, d.At)))
		}
	}()
	ctx := context.Background()
	// About 2,000 events/s of 4 KB: a client that reads keeps up, even on a
	// loaded machine under the race detector; one that does not read fills
	// its queue within seconds.
	pace := time.NewTicker(500 * time.Microsecond)
	defer pace.Stop()
	for i := range total {
		if err := bus.Publish(ctx, "load", map[string]any{"n": i, "at": time.Now().UnixNano(), "pad": pad}, topic); err != nil {
			t.Fatal(err)
		}
		<-pace.C
	}
	wg.Wait()
	if fastErr != nil {
		t.Fatal(fastErr)
	}
	t.Logf("the fast client's worst lag: %s", lag)
	if lag > 2*time.Second {
		t.Errorf("the fast client was held up: an event took %s", lag)
	}
	if got := rtMetric(t, api, "agentry_ws_slow_clients_dropped_total"); got != 1 {
		t.Errorf("slow clients dropped: want 1, got %v", got)
	}
	// Reading at last, the slow client gets what was sent before the cut,
	// then 4008.
	seen := slow.expectClose(4008, 20*time.Second)
	if len(seen) == 0 || len(seen) >= total {
		t.Fatalf("the slow client got %d of %d events before the cut", len(seen), total)
	}
}

// The origin check: a browser's Origin must be allowed; clients that send
// none (not browsers) are not concerned.
func TestWebSocketOriginCheck(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	u := s.Client(api).NewUser("origin")
	for _, tt := range []struct {
		origin string
		want   int
	}{
		{"http://evil.example", 403},
		{"http://allowed.example.evil.example", 403},
		{"https://allowed.example", 403}, // another scheme is another origin
		{"http://allowed.example:8080", 403},
		{"null", 403},
		{"http://allowed.example", 101},
		{"HTTP://ALLOWED.EXAMPLE", 101},
		{"", 101},
	} {
		h := http.Header{}
		if tt.origin != "" {
			h.Set("Origin", tt.origin)
		}
		if got := wsStatus(t, wsURL(api, "?ticket="+wsTicket(t, u.Client)), h); got != tt.want {
			t.Errorf("Origin %q: want %d, got %d", tt.origin, tt.want, got)
		}
	}
}

// Tickets work once, for a while; anything else is 401.
func TestWebSocketTicketsAndCredentials(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	u := s.Client(api).NewUser("ticket")
	r := u.Must(201, "POST", "/v1/ws/ticket", nil)
	if cc := r.Header.Get("Cache-Control"); cc != "no-store" {
		t.Errorf("ticket Cache-Control: want no-store, got %q", cc)
	}
	ticket := r.Str(t, "ticket")
	if status := wsStatus(t, wsURL(api, "?ticket="+ticket), nil); status != 101 {
		t.Fatalf("a fresh ticket: want 101, got %d", status)
	}
	for name, url := range map[string]string{
		"a used ticket":    wsURL(api, "?ticket="+ticket),
		"a made-up ticket": wsURL(api, "?ticket=agt_"+strings.Repeat("A", 43)),
		"a huge ticket":    wsURL(api, "?ticket="+strings.Repeat("A", 5000)),
		"no credentials":   wsURL(api, ""),
	} {
		if status := wsStatus(t, url, nil); status != 401 {
			t.Errorf("%s: want 401, got %d", name, status)
		}
	}
	bad := http.Header{"Authorization": {"Bearer not-a-token"}}
	if status := wsStatus(t, wsURL(api, ""), bad); status != 401 {
		t.Errorf("a bad bearer token: want 401, got %d", status)
	}
	if r := s.Client(api).Do("POST", "/v1/ws/ticket", nil); r.Status != 401 {
		t.Errorf("a ticket without credentials: want 401, got %d", r.Status)
	}
	// The ticket stands for the user: it follows user:me.
	c := wsDialTicket(t, api, u.Client)
	c.send("subscribe", "user:me", "")
	c.expect("subscribed", "user:"+u.ID)
}

// Revoking a member's read access on an agent ends their subscription to
// it within seconds, on another replica too.
func TestRealtimeRevokedAccessEndsTheSubscription(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	a, b := s.API(), s.API()
	owner := s.Client(a).NewUser("owner")
	member := s.Client(b).NewUser("member")
	memberIn := rtInvite(t, owner, member, "member")
	agent := rtAgent(t, owner.Client)
	other := rtAgent(t, owner.Client)
	memberIn.Must(200, "GET", "/v1/agents/"+agent, nil)

	c := wsDialWith(t, websocket.DefaultDialer, wsURL(b, "?ticket="+wsTicket(t, memberIn)), nil)
	c.subscribe(events.AgentTopic(agent), "")
	c.subscribe(events.AgentTopic(other), "")
	owner.Must(201, "POST", "/v1/agents/"+agent+"/acl", map[string]any{"principal_id": member.ID, "action": "read", "effect": "deny"})
	start := time.Now()
	m := c.read()
	if m.Type != "error" || m.Topic != events.AgentTopic(agent) || m.field("code") != "revoked" {
		t.Fatalf("want a revoked error for the agent, got %s on %s: %s", m.Type, m.Topic, m.Data)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("revoked after %s; want within seconds", took)
	}
	memberIn.Must(404, "GET", "/v1/agents/"+agent, nil)

	// The other subscription lives on, and the denied one is gone.
	bus := events.NewBus(rtRedis(t, s), s.Prefix, 1000)
	ctx := context.Background()
	if err := bus.Publish(ctx, "test", map[string]int{"n": 1}, events.AgentTopic(agent)); err != nil {
		t.Fatal(err)
	}
	if err := bus.Publish(ctx, "test", map[string]int{"n": 2}, events.AgentTopic(other)); err != nil {
		t.Fatal(err)
	}
	if m := c.read(); m.Topic != events.AgentTopic(other) {
		t.Fatalf("want the other agent's event, got %s on %s", m.Type, m.Topic)
	}
	c.send("subscribe", events.AgentTopic(agent), "")
	if m := c.expect("error", events.AgentTopic(agent)); m.field("code") != "not_found" {
		t.Fatalf("subscribing again: want not_found, got %s", m.Data)
	}
}

// Removing a member from the organization ends their subscriptions to its
// topics within seconds, on every replica: the cached facts are dropped
// once the removal is committed, so the recheck cannot load the old
// membership again.
func TestRealtimeRemovedMemberLosesTheTopics(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	a, b := s.API(), s.API()
	owner := s.Client(a).NewUser("owner")
	agent := rtAgent(t, owner.Client)
	const members = 4
	conns := make([]*wsConn, members)
	ids := make([]string, members)
	for i := range members {
		member := s.Client(b).NewUser(fmt.Sprintf("member%d", i))
		ids[i] = owner.Must(201, "POST", "/v1/members", map[string]any{"email": member.Email, "role": "member"}).Str(t, "id")
		in := member.As(member.Token, owner.Org)
		conns[i] = wsDialWith(t, websocket.DefaultDialer, wsURL(b, "?ticket="+wsTicket(t, in)), nil)
		conns[i].subscribe(events.AgentTopic(agent), "")
	}
	for i, c := range conns {
		owner.Must(204, "DELETE", "/v1/members/"+ids[i], nil)
		start := time.Now()
		if ce, _ := c.closed(10 * time.Second); ce.Code != 4001 {
			t.Fatalf("member %d: want close 4001, got %d %q", i, ce.Code, ce.Text)
		}
		if took := time.Since(start); took > 5*time.Second {
			t.Fatalf("member %d: ended after %s; want within seconds", i, took)
		}
	}
}

// Logging out closes the session's WebSocket connections (4001) within
// seconds, on every replica; another session's stay.
func TestRealtimeLogoutClosesTheConnection(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	a, b := s.API(), s.API()
	u := s.Client(a).NewUser("logout")
	other := u.As(s.Client(a).As("", "").Must(200, "POST", "/v1/auth/login", map[string]any{"email": u.Email, "password": u.Password}).Str(t, "access_token"), u.Org)

	byTicket := wsDialTicket(t, b, u.Client)
	byTicket.subscribe("user:"+u.ID, "")
	byHeader := wsDial(t, a, u.Token)
	byHeader.subscribe("user:"+u.ID, "")
	otherSession := wsDial(t, b, other.Token)
	otherSession.subscribe("user:"+u.ID, "")

	u.Must(204, "POST", "/v1/auth/logout", nil)
	start := time.Now()
	for name, c := range map[string]*wsConn{"ticket": byTicket, "header": byHeader} {
		ce, _ := c.closed(10 * time.Second)
		if ce.Code != 4001 {
			t.Fatalf("%s: want close 4001, got %d %q", name, ce.Code, ce.Text)
		}
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("closed after %s; want within seconds", took)
	}
	if extra := otherSession.ping(); len(extra) != 0 {
		t.Fatalf("another session: want nothing but the pong, got %v", rtTypes(extra))
	}
	if status := wsStatus(t, wsURL(a, ""), http.Header{"Authorization": {"Bearer " + u.Token}}); status != 401 {
		t.Fatalf("the logged-out token: want 401, got %d", status)
	}
}

// SIGTERM: the api tells its clients to reconnect, then closes (1012).
func TestRealtimeShutdownTellsClientsToReconnect(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	u := s.Client(api).NewUser("shutdown")
	c := wsDial(t, api, u.Token)
	c.subscribe("user:"+u.ID, "")
	stopped := make(chan error, 1)
	go func() { stopped <- api.Stop() }()
	m := c.read()
	if m.Type != "reconnect" {
		t.Fatalf("want a reconnect message, got %s: %s", m.Type, m.Data)
	}
	c.expectClose(websocket.CloseServiceRestart, 10*time.Second)
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("the api exited with %v\n%s", err, api.Logs())
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the api did not exit")
	}
}
