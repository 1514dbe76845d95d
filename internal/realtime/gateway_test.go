package realtime

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/testenv"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fixture is a gateway on its own Redis prefix, served by an httptest
// server whose handler authenticates ?user= (in organization org1) with
// the session ?session=.
type fixture struct {
	t   *testing.T
	g   *Gateway
	bus *events.Bus
	url string

	deny    sync.Map // topic → refused by Authorize
	broken  sync.Map // topic → Authorize fails with EUNAVAILABLE
	revoked sync.Map // user id → rebuild fails with EUNAUTHORIZED
	slow    atomic.Int64
	slowCh  chan struct{}
}

type fixtureMetrics struct{ f *fixture }

func (fixtureMetrics) Connections(int)   {}
func (fixtureMetrics) Subscriptions(int) {}
func (fixtureMetrics) EventsSent(int)    {}
func (m fixtureMetrics) SlowClient() {
	m.f.slow.Add(1)
	select {
	case m.f.slowCh <- struct{}{}:
	default:
	}
}

func newFixture(t *testing.T, sendQueue int) *fixture {
	t.Helper()
	rdb, prefix := testenv.Redis(t)
	return newFixtureOn(t, sendQueue, rdb, prefix)
}

func newFixtureOn(t *testing.T, sendQueue int, rdb *redis.Client, prefix string) *fixture {
	t.Helper()
	f := &fixture{t: t, bus: events.NewBus(rdb, prefix, 100000), slowCh: make(chan struct{}, 1)}
	f.g = &Gateway{
		Events:       f.bus,
		Redis:        rdb,
		Authorize:    f.authorize,
		Logger:       slog.New(slog.DiscardHandler),
		Metrics:      fixtureMetrics{f},
		SendQueue:    sendQueue,
		PingInterval: time.Minute,
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := f.g.Start(ctx); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user := r.URL.Query().Get("user")
		p := &platform.Principal{ID: user, Kind: platform.KindUser, OrgID: "org1"}
		rebuild := func(context.Context) (*platform.Principal, error) {
			if _, ok := f.revoked.Load(user); ok {
				return nil, platform.Errorf(platform.EUNAUTHORIZED, "revoked")
			}
			cp := *p
			return &cp, nil
		}
		f.g.Accept(w, r, p, rebuild, r.URL.Query().Get("session"), "")
	}))
	f.url = "ws" + strings.TrimPrefix(srv.URL, "http")
	t.Cleanup(func() {
		ctx, cancelStop := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancelStop()
		f.g.Stop(ctx)
		srv.Close()
		cancel()
	})
	return f
}

// authorize allows every agent: and command: topic unless denied, and
// user:me as the caller's own topic.
func (f *fixture) authorize(_ context.Context, p *platform.Principal, topic string) (string, error) {
	if _, ok := f.deny.Load(topic); ok {
		return "", platform.Errorf(platform.ENOTFOUND, "no such agent")
	}
	if _, ok := f.broken.Load(topic); ok {
		return "", platform.Errorf(platform.EUNAVAILABLE, "database down")
	}
	kind, id, _ := strings.Cut(topic, ":")
	switch kind {
	case "user":
		if id == "me" || id == p.ID {
			return events.UserTopic(p.ID), nil
		}
		return "", platform.Errorf(platform.ENOTFOUND, "only user:me")
	case "agent", "command":
		return topic, nil
	}
	return "", platform.Errorf(platform.EINVALID, "unknown topic")
}

// publish publishes events {"n": from} … {"n": to-1} of type "ev" on topic
// and returns their ids.
func (f *fixture) publish(topic string, from, to int) []string {
	f.t.Helper()
	ctx := context.Background()
	var ids []string
	for i := from; i < to; i++ {
		if err := f.bus.Publish(ctx, "ev", map[string]int{"n": i}, topic); err != nil {
			f.t.Fatal(err)
		}
	}
	evs, err := f.bus.Since(ctx, topic, "", 1<<20)
	if err != nil {
		f.t.Fatal(err)
	}
	for _, e := range evs[len(evs)-(to-from):] {
		ids = append(ids, e.ID)
	}
	return ids
}

// client is a WebSocket client of the fixture.
type client struct {
	t  *testing.T
	ws *websocket.Conn
}

func (f *fixture) dial(user, session string) *client {
	return f.dialWith(user, session, websocket.DefaultDialer)
}

func (f *fixture) dialWith(user, session string, d *websocket.Dialer) *client {
	f.t.Helper()
	ws, res, err := d.Dial(f.url+"/?user="+user+"&session="+session, nil)
	if err != nil {
		f.t.Fatalf("dial: %v", err)
	}
	res.Body.Close()
	c := &client{t: f.t, ws: ws}
	f.t.Cleanup(func() { ws.Close() })
	return c
}

func (c *client) send(typ, topic, since string) {
	c.t.Helper()
	if err := c.ws.WriteJSON(clientMessage{Type: typ, Topic: topic, Since: since}); err != nil {
		c.t.Fatalf("send %s: %v", typ, err)
	}
}

// read returns the next message, failing after 5 s.
func (c *client) read() Message {
	c.t.Helper()
	m, err := c.tryRead(5 * time.Second)
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	return m
}

func (c *client) tryRead(within time.Duration) (Message, error) {
	_ = c.ws.SetReadDeadline(time.Now().Add(within))
	var m Message
	_, data, err := c.ws.ReadMessage()
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(data, &m); err != nil {
		return m, fmt.Errorf("not a message: %s", data)
	}
	return m, nil
}

// expect reads the next message and fails unless it has typ and topic.
func (c *client) expect(typ, topic string) Message {
	c.t.Helper()
	m := c.read()
	if m.Type != typ || m.Topic != topic {
		c.t.Fatalf("want %s on %q, got %s on %q: %s", typ, topic, m.Type, m.Topic, m.Data)
	}
	return m
}

func (c *client) subscribe(topic, since string) {
	c.t.Helper()
	c.send("subscribe", topic, since)
	c.expect("subscribed", topic)
}

// n is the sequence number of an "ev" event.
func n(t *testing.T, m Message) int {
	t.Helper()
	if m.Type != "ev" {
		t.Fatalf("want an event, got %s on %s: %s", m.Type, m.Topic, m.Data)
	}
	var d struct{ N int }
	if err := json.Unmarshal(m.Data, &d); err != nil {
		t.Fatalf("event data: %s", m.Data)
	}
	return d.N
}

// expectRun reads events of topic and fails unless they are exactly
// from … to-1, in order, with increasing ids.
func (c *client) expectRun(topic string, from, to int) {
	c.t.Helper()
	last := ""
	for want := from; want < to; want++ {
		m := c.read()
		if got := n(c.t, m); got != want || m.Topic != topic {
			c.t.Fatalf("want event %d of %s, got %d of %s", want, topic, got, m.Topic)
		}
		if !events.ValidID(m.ID) || last != "" && compareIDs(last, m.ID) >= 0 {
			c.t.Fatalf("event %d: id %q does not follow %q", want, m.ID, last)
		}
		last = m.ID
	}
}

// expectClose reads (and drops) messages until the connection closes, and
// fails unless it closed with code. It returns the messages of other types
// than "ev" seen before.
func (c *client) expectClose(code int, within time.Duration) []Message {
	c.t.Helper()
	var seen []Message
	deadline := time.Now().Add(within)
	for {
		m, err := c.tryRead(time.Until(deadline))
		if err != nil {
			var ce *websocket.CloseError
			if !errors.As(err, &ce) || ce.Code != code {
				c.t.Fatalf("want close code %d, got %v (after %d messages)", code, err, len(seen))
			}
			return seen
		}
		seen = append(seen, m)
	}
}

// quiet fails if a message arrives within d. The connection cannot be
// read after.
func (c *client) quiet(d time.Duration) {
	c.t.Helper()
	if m, err := c.tryRead(d); err == nil {
		c.t.Fatalf("want nothing, got %s on %s: %s", m.Type, m.Topic, m.Data)
	}
}

func TestCompareIDs(t *testing.T) {
	t.Parallel()
	tests := []struct {
		a, b string
		want int
	}{
		{"1-0", "1-0", 0},
		{"1-0", "1-1", -1},
		{"1-1", "1-0", 1},
		{"1-9", "1-10", -1}, // numeric, not lexical
		{"9-0", "10-0", -1},
		{"10-0", "9-99", 1},
		{"1700000000000-5", "1700000000001-0", -1},
		{"18446744073709551615-18446744073709551615", "18446744073709551615-18446744073709551614", 1},
		{"0-0", "0-0", 0},
	}
	for _, tt := range tests {
		if got := compareIDs(tt.a, tt.b); got != tt.want {
			t.Errorf("compareIDs(%q, %q): want %d, got %d", tt.a, tt.b, tt.want, got)
		}
	}
}

func TestLiveEvents(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 64)
	c := f.dial("u1", "s1")
	c.subscribe("agent:a", "")
	f.publish("agent:a", 0, 5)
	f.publish("agent:other", 0, 3) // not followed
	c.expectRun("agent:a", 0, 5)
	c.send("ping", "", "")
	c.expect("pong", "")

	t.Run("user:me is the caller's own topic", func(t *testing.T) {
		c.send("subscribe", "user:me", "")
		c.expect("subscribed", "user:u1")
		f.publish(events.UserTopic("u1"), 0, 2)
		c.expectRun("user:u1", 0, 2)
	})
	t.Run("subscribing twice says so", func(t *testing.T) {
		c.send("subscribe", "agent:a", "")
		if m := c.expect("subscribed", "agent:a"); !strings.Contains(string(m.Data), "already") {
			t.Fatalf("want already, got %s", m.Data)
		}
		f.publish("agent:a", 5, 6)
		c.expectRun("agent:a", 5, 6) // and the event comes once
	})
}

// A subscription made while its topic is busy answers "subscribed" first,
// then every event from one on, in order.
func TestSubscribedComesBeforeLiveEvents(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 1024)
	stop := make(chan struct{})
	published := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				published <- nil
				return
			default:
			}
			if err := f.bus.Publish(context.Background(), "ev", map[string]int{"n": i}, "agent:busy"); err != nil {
				published <- err
				return
			}
		}
	}()
	defer func() {
		close(stop)
		if err := <-published; err != nil {
			t.Fatal(err)
		}
	}()
	for round := range 20 {
		c := f.dial(fmt.Sprintf("u%d", round), "s")
		c.send("subscribe", "agent:busy", "")
		c.expect("subscribed", "agent:busy")
		first := n(t, c.read())
		c.expectRun("agent:busy", first+1, first+20)
		c.ws.Close()
	}
}

func TestReplayThenLiveWithoutGapsOrRepeats(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 512)
	const stored, k, live = 30, 10, 200
	for round := range 8 {
		topic := fmt.Sprintf("agent:replay%d", round)
		ids := f.publish(topic, 0, stored)
		c := f.dial("u1", "s1")
		// Events keep coming while the client subscribes: some are in
		// the replay, some arrive during it, the rest are live.
		published := make(chan error, 1)
		go func() {
			for i := stored; i < stored+live; i++ {
				if err := f.bus.Publish(context.Background(), "ev", map[string]int{"n": i}, topic); err != nil {
					published <- err
					return
				}
			}
			published <- nil
		}()
		// since is the k-th event's id: the client saw 0 … k-1.
		c.subscribe(topic, ids[k-1])
		c.expectRun(topic, k, stored+live)
		if err := <-published; err != nil {
			t.Fatal(err)
		}
		c.quiet(50 * time.Millisecond)
		c.ws.Close()
	}
}

func TestReplayLongerThanTheQueueAndAPage(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 16)
	const total = 3*replayPage + 100
	ids := f.publish("agent:long", 0, total)
	c := f.dial("u1", "s1")
	c.subscribe("agent:long", ids[0])
	c.expectRun("agent:long", 1, total)
	f.publish("agent:long", total, total+3)
	c.expectRun("agent:long", total, total+3)
	if got := f.slow.Load(); got != 0 {
		t.Fatalf("a replay is paced by the client: want no slow client, got %d", got)
	}
}

func TestSinceMustBeAnID(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 16)
	c := f.dial("u1", "s1")
	for _, since := range []string{"0", "abc", "1-x", "-", "+"} {
		c.send("subscribe", "agent:a", since)
		m := c.expect("error", "agent:a")
		if !strings.Contains(string(m.Data), `"invalid"`) {
			t.Fatalf("since %q: want an invalid error, got %s", since, m.Data)
		}
	}
	c.subscribe("agent:a", "0-0") // from the oldest kept
}

func TestRefusedSubscriptionKeepsTheSocket(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 16)
	f.deny.Store("agent:secret", true)
	c := f.dial("u1", "s1")
	c.send("subscribe", "agent:secret", "")
	m := c.expect("error", "agent:secret")
	var e struct{ Code, Message string }
	if err := json.Unmarshal(m.Data, &e); err != nil || e.Code != platform.ENOTFOUND || e.Message == "" {
		t.Fatalf("want a not_found error with a message, got %s", m.Data)
	}
	c.send("subscribe", "user:someone-else", "")
	c.expect("error", "user:someone-else")
	c.send("subscribe", "bogus", "")
	c.expect("error", "bogus")
	c.send("dance", "", "")
	c.expect("error", "")
	if err := c.ws.WriteMessage(websocket.TextMessage, []byte("not json")); err != nil {
		t.Fatal(err)
	}
	c.expect("error", "")

	f.publish("agent:secret", 0, 1) // never delivered
	c.subscribe("agent:open", "")
	f.publish("agent:open", 0, 2)
	c.expectRun("agent:open", 0, 2)
}

func TestUnsubscribeStopsDelivery(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 16)
	c := f.dial("u1", "s1")
	c.subscribe("agent:a", "")
	c.subscribe("agent:b", "")
	f.publish("agent:a", 0, 1)
	c.expectRun("agent:a", 0, 1)
	c.send("unsubscribe", "agent:a", "")
	c.expect("unsubscribed", "agent:a")
	// Events are relayed in publish order: had agent:a's been delivered,
	// it would come before agent:b's.
	f.publish("agent:a", 1, 2)
	f.publish("agent:b", 0, 1)
	c.expectRun("agent:b", 0, 1)

	t.Run("unsubscribing an unknown topic is answered", func(t *testing.T) {
		c.send("unsubscribe", "agent:never", "")
		c.expect("unsubscribed", "agent:never")
	})
	t.Run("user:me", func(t *testing.T) {
		c.send("subscribe", "user:me", "")
		c.expect("subscribed", "user:u1")
		c.send("unsubscribe", "user:me", "")
		c.expect("unsubscribed", "user:u1")
		f.publish("user:u1", 0, 1)
		f.publish("agent:b", 1, 2)
		c.expectRun("agent:b", 1, 2)
	})
}

// A client subscribing to a topic as the last other subscriber leaves it
// must still get its events: the replica's Redis subscription must not be
// dropped after the new subscriber's was made.
func TestResubscribeRacingTheLastUnsubscribe(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 16)
	a, b := f.dial("ua", "sa"), f.dial("ub", "sb")
	for round := range 500 {
		topic := fmt.Sprintf("agent:race%d", round)
		a.subscribe(topic, "")
		a.send("unsubscribe", topic, "")
		b.send("subscribe", topic, "")
		a.expect("unsubscribed", topic)
		b.expect("subscribed", topic)
		f.publish(topic, 0, 1)
		b.expectRun(topic, 0, 1)
		b.send("unsubscribe", topic, "")
		b.expect("unsubscribed", topic)
	}
}

func TestSlowClientIsCutOffWithoutSlowingOthers(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 64)
	// The slow client reads nothing, through a small receive buffer.
	slow := f.dialWith("slow", "s1", testenv.SmallBufferDialer())
	fast := f.dial("fast", "s2")
	slow.subscribe("agent:busy", "")
	fast.subscribe("agent:busy", "")

	pad := strings.Repeat("x", 2000)
	received := make(chan error, 1)
	var total atomic.Int64
	total.Store(-1)
	go func() {
		// The fast client reads all the events, in order.
		want := 0
		for {
			_ = fast.ws.SetReadDeadline(time.Now().Add(10 * time.Second))
			var m Message
			if err := fast.ws.ReadJSON(&m); err != nil {
				received <- fmt.Errorf("fast client after %d events: %w", want, err)
				return
			}
			var d struct{ N int }
			_ = json.Unmarshal(m.Data, &d)
			if d.N != want {
				received <- fmt.Errorf("fast client: want event %d, got %d", want, d.N)
				return
			}
			want++
			if int64(want) == total.Load() {
				received <- nil
				return
			}
		}
	}()
	ctx := context.Background()
	sent := 0
	deadline := time.After(20 * time.Second)
	// About 2,000 events/s: the reading client keeps up even under the race
	// detector on a loaded machine; the other fills its queue.
	pace := time.NewTicker(500 * time.Microsecond)
	defer pace.Stop()
publishing:
	for {
		if err := f.bus.Publish(ctx, "ev", map[string]any{"n": sent, "pad": pad}, "agent:busy"); err != nil {
			t.Fatal(err)
		}
		sent++
		<-pace.C
		select {
		case <-f.slowCh:
			break publishing
		case <-deadline:
			t.Fatalf("the slow client was not detected after %d events", sent)
		default:
		}
	}
	// A few more after the cut, which the fast client still gets. Their
	// count is told before they go: the fast client may read them all
	// before the last Publish returns.
	t.Logf("the slow client was cut off after %d events", sent)
	total.Store(int64(sent + 20))
	for range 20 {
		if err := f.bus.Publish(ctx, "ev", map[string]any{"n": sent, "pad": pad}, "agent:busy"); err != nil {
			t.Fatal(err)
		}
		sent++
	}
	if err := <-received; err != nil {
		t.Fatal(err)
	}
	// Reading now, the slow client gets what was sent to it, then 4008.
	slow.expectClose(CloseSlowConsumer, 15*time.Second)
	if got := f.slow.Load(); got != 1 {
		t.Errorf("slow clients counted: want 1, got %d", got)
	}
}

func TestRevokedSessionClosesWith4001(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 16)
	c := f.dial("u1", "s1")
	other := f.dial("u1", "s2")
	c.subscribe("agent:a", "")
	other.subscribe("agent:a", "")
	f.g.Invalidate("session:s1")
	for _, m := range c.expectClose(CloseRevoked, 5*time.Second) {
		if m.Type == "reconnect" {
			t.Fatalf("a revoked session is not told to reconnect: %s", m.Data)
		}
	}
	// Another session of the same user is untouched.
	f.publish("agent:a", 0, 1)
	other.expectRun("agent:a", 0, 1)
}

func TestRevokedCredentialsCloseWith4001(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 16)
	c := f.dial("u1", "s1")
	c.subscribe("agent:a", "")
	f.revoked.Store("u1", true)
	f.g.Invalidate("facts:u1:")
	c.expectClose(CloseRevoked, 5*time.Second)
}

func TestRevokedAccessEndsTheSubscription(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 16)
	c := f.dial("u1", "s1")
	c.subscribe("agent:a", "")
	c.subscribe("agent:b", "")
	c.subscribe("agent:c", "")
	f.deny.Store("agent:a", true)
	f.broken.Store("agent:c", true) // a failed check keeps the subscription
	f.g.Invalidate("acl:org-of-someone-else")
	f.g.Invalidate("acl:org1")
	m := c.expect("error", "agent:a")
	if !strings.Contains(string(m.Data), `"revoked"`) {
		t.Fatalf("want a revoked error, got %s", m.Data)
	}
	f.publish("agent:a", 0, 1)
	f.publish("agent:b", 0, 1)
	f.publish("agent:c", 0, 1)
	c.expectRun("agent:b", 0, 1)
	c.expectRun("agent:c", 0, 1)
	// The socket stays usable.
	c.send("ping", "", "")
	c.expect("pong", "")
}

func TestStopTellsClientsToReconnect(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 16)
	c := f.dial("u1", "s1")
	c.subscribe("agent:a", "")
	done := make(chan struct{})
	go func() {
		defer close(done)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		f.g.Stop(ctx)
	}()
	m := c.read()
	if m.Type != "reconnect" {
		t.Fatalf("want a reconnect message, got %s: %s", m.Type, m.Data)
	}
	c.expectClose(websocket.CloseServiceRestart, 5*time.Second)
	<-done
	if got := f.g.Connections(); got != 0 {
		t.Fatalf("connections after Stop: want 0, got %d", got)
	}
	// A client arriving after Stop is closed at once.
	late := f.dial("u2", "s2")
	late.expectClose(websocket.CloseServiceRestart, 5*time.Second)
	f.g.Stop(context.Background()) // idempotent
}

func TestTooManySubscriptions(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 16)
	f.g.MaxSubscriptions = 2
	c := f.dial("u1", "s1")
	c.subscribe("agent:a", "")
	c.subscribe("agent:b", "")
	c.send("subscribe", "agent:c", "")
	c.expect("error", "agent:c")
	c.send("unsubscribe", "agent:a", "")
	c.expect("unsubscribed", "agent:a")
	c.subscribe("agent:c", "")
}

func TestManyClientsOneTopic(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 64)
	clients := make([]*client, 20)
	for i := range clients {
		clients[i] = f.dial(fmt.Sprintf("u%d", i), "s")
		clients[i].subscribe("agent:shared", "")
	}
	f.publish("agent:shared", 0, 30)
	for _, c := range clients {
		c.expectRun("agent:shared", 0, 30)
	}
	for _, c := range clients {
		c.ws.Close()
	}
	// Once the last leaves, the replica stops following the topic.
	deadline := time.Now().Add(5 * time.Second)
	for f.g.Connections() != 0 || f.topicCount() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("want no connections and no topics, got %d and %d", f.g.Connections(), f.topicCount())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (f *fixture) topicCount() int {
	f.g.mu.Lock()
	defer f.g.mu.Unlock()
	return len(f.g.topics)
}

// When the replica's pub/sub connection breaks, the events published until
// it is back are not relayed: clients are told to reconnect and resume
// with since, rather than miss them without knowing.
func TestRelayInterruptedTellsClientsToReconnect(t *testing.T) {
	t.Parallel()
	_, prefix := testenv.Redis(t) // for the prefix and its cleanup
	opts, err := redis.ParseURL(testenv.RedisURL())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var ids []int64
	opts.OnConnect = func(ctx context.Context, cn *redis.Conn) error {
		id, err := cn.ClientID(ctx).Result()
		mu.Lock()
		ids = append(ids, id)
		mu.Unlock()
		return err
	}
	rdb := redis.NewClient(opts)
	t.Cleanup(func() { rdb.Close() })
	f := newFixtureOn(t, 64, rdb, prefix)
	c := f.dial("u1", "s1")
	c.subscribe("agent:a", "")
	ids0 := f.publish("agent:a", 0, 1)
	c.expectRun("agent:a", 0, 1)

	killer, _ := testenv.Redis(t)
	mu.Lock()
	for _, id := range ids {
		killer.ClientKillByFilter(context.Background(), "ID", fmt.Sprint(id))
	}
	mu.Unlock()
	if m := c.read(); m.Type != "reconnect" {
		t.Fatalf("want reconnect, got %s: %s", m.Type, m.Data)
	}
	c.expectClose(websocket.CloseServiceRestart, 5*time.Second)

	// Meanwhile an event; the client resumes with since and gets it.
	f.publish("agent:a", 1, 2)
	again := f.dial("u1", "s1")
	again.subscribe("agent:a", ids0[0])
	again.expectRun("agent:a", 1, 2)
	f.publish("agent:a", 2, 3)
	again.expectRun("agent:a", 2, 3)
}

func TestServerPings(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 16)
	g := &Gateway{Events: f.bus, Redis: f.g.Redis, Authorize: f.authorize, Logger: f.g.Logger, PingInterval: 50 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := g.Start(ctx); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := &platform.Principal{ID: "u1", Kind: platform.KindUser}
		g.Accept(w, r, p, func(context.Context) (*platform.Principal, error) { return p, nil }, "", "")
	}))
	defer func() {
		stopCtx, cancelStop := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancelStop()
		g.Stop(stopCtx)
		srv.Close()
	}()
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	pings := make(chan struct{}, 10)
	ws.SetPingHandler(func(data string) error {
		signal(pings)
		return ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(time.Second))
	})
	go func() {
		for {
			if _, _, err := ws.ReadMessage(); err != nil {
				return
			}
		}
	}()
	for i := range 3 {
		select {
		case <-pings:
		case <-time.After(5 * time.Second):
			t.Fatalf("ping %d did not come", i+1)
		}
	}
}

// A client that reads nothing while its queue has room still holds up the
// write to it: when the write times out, it is counted as a slow client cut
// off, like one whose queue filled.
func TestClientThatStopsReadingTimesOutAsSlow(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 1_000_000)
	f.g.WriteTimeout = 300 * time.Millisecond
	stuck := f.dialWith("stuck", "s1", testenv.SmallBufferDialer())
	stuck.subscribe("agent:busy", "")
	pad := strings.Repeat("x", 4000)
	deadline := time.After(20 * time.Second)
	for n := 0; ; n++ {
		if err := f.bus.Publish(context.Background(), "ev", map[string]any{"n": n, "pad": pad}, "agent:busy"); err != nil {
			t.Fatal(err)
		}
		select {
		case <-f.slowCh:
			return
		case <-deadline:
			t.Fatalf("a client that reads nothing was not counted slow after %d events", n)
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// A subscription Redis never confirmed (it was down at the time) is given
// up with its topic: the topic's next subscriber is confirmed and gets its
// events, instead of timing out on the stale wait for good.
func TestUnconfirmedSubscriptionDoesNotBreakItsTopic(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 64)
	a := f.dial("a", "s1")
	a.subscribe("agent:t2", "")
	// As a subscribe during a Redis outage leaves it: a wait no
	// confirmation will end.
	f.g.mu.Lock()
	channel := f.g.Events.Channel("agent:t2")
	f.g.waiting[channel] = append(f.g.waiting[channel], make(chan struct{}))
	f.g.mu.Unlock()
	a.send("unsubscribe", "agent:t2", "")
	a.expect("unsubscribed", "agent:t2")

	b := f.dial("b", "s2")
	b.subscribe("agent:t2", "")
	if err := f.bus.Publish(context.Background(), "ev", map[string]any{"n": 0}, "agent:t2"); err != nil {
		t.Fatal(err)
	}
	if m := b.read(); m.Type != "ev" || m.Topic != "agent:t2" {
		t.Fatalf("want the topic's event, got %s on %s: %s", m.Type, m.Topic, m.Data)
	}
}
