// Package realtime is agentry's WebSocket gateway: it relays the events of
// the topics a client subscribes to (agent:{id}, command:{id}, user:me),
// from Redis to every API replica's clients, after an access decision at
// subscribe time that is made again whenever the client's access may have
// changed.
//
// One Redis pub/sub connection per replica subscribes to the channels of the
// topics its clients follow, so an event published once reaches each
// subscribed client once, in order per topic. A client resuming with the
// last event id it saw gets what it missed from the topic's Redis stream,
// then live events, without gaps or repeats. Each connection has a bounded
// send queue: a client too slow to keep up is disconnected with close code
// 4008 and reconnects with since, and never slows the others.
package realtime

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/platform"
)

// Close codes the gateway uses, besides the standard ones.
const (
	// CloseSlowConsumer: the client fell too far behind; reconnect and
	// resubscribe with since.
	CloseSlowConsumer = 4008
	// CloseRevoked: the session or credentials were revoked.
	CloseRevoked = 4001
)

// Message is every message the server sends.
type Message struct {
	Type  string          `json:"type"`
	Topic string          `json:"topic"`
	ID    string          `json:"id"`
	Data  json.RawMessage `json:"data"`
}

// clientMessage is what a client sends.
type clientMessage struct {
	Type  string `json:"type"`
	Topic string `json:"topic"`
	Since string `json:"since"`
}

// Authorize decides a subscription: it returns the canonical topic
// (user:me becomes user:{id}) or an error to tell the client.
type Authorize func(ctx context.Context, p *platform.Principal, topic string) (string, error)

// Metrics counts the gateway.
type Metrics interface {
	Connections(delta int)
	Subscriptions(delta int)
	EventsSent(n int)
	SlowClient()
}

type noMetrics struct{}

func (noMetrics) Connections(int)   {}
func (noMetrics) Subscriptions(int) {}
func (noMetrics) EventsSent(int)    {}
func (noMetrics) SlowClient()       {}

// Gateway is the WebSocket hub of one API replica.
type Gateway struct {
	Events    *events.Bus
	Redis     redis.UniversalClient
	Authorize Authorize
	Logger    *slog.Logger
	Metrics   Metrics
	// SendQueue bounds each connection's queue of messages to send.
	SendQueue int
	// PingInterval is how often the server pings; a peer silent for two
	// intervals is dead.
	PingInterval time.Duration
	// WriteTimeout bounds one write to a client (default 10 s): a client
	// that reads nothing for that long is cut off as too slow.
	WriteTimeout time.Duration
	// MaxSubscriptions bounds the topics one connection may follow.
	MaxSubscriptions int
	// RecheckInterval is how often every connection's access is decided
	// again, besides when an invalidation says it may have changed.
	RecheckInterval time.Duration
	// Recheckers is how many rechecks run at once (they query the
	// database).
	Recheckers int

	mu     sync.Mutex
	conns  map[*conn]struct{}
	topics map[string]map[*conn]struct{}
	// waiting holds, per channel, one signal per SUBSCRIBE sent and not
	// yet confirmed, oldest first; it is closed by the confirmation.
	// Subscribers arriving meanwhile wait for the newest. While a channel
	// has any, its messages are dropped: they come from an earlier
	// subscription, with a gap before the new one starts.
	waiting map[string][]chan struct{}
	ps      *redis.PubSub
	closing bool

	// psMu orders the replica's SUBSCRIBE and UNSUBSCRIBE commands as the
	// decisions to send them were taken: a topic's last subscriber
	// leaving and a new first one arriving must reach Redis in that order.
	psMu sync.Mutex

	// Connections waiting for a recheck, and a signal that there are.
	recheckMu   sync.Mutex
	rechecks    []*conn
	recheckWake chan struct{}

	stopOnce sync.Once
	cancel   context.CancelFunc
	wg       sync.WaitGroup
}

// Start opens the pub/sub connection and relays events until Stop.
func (g *Gateway) Start(ctx context.Context) error {
	if g.Metrics == nil {
		g.Metrics = noMetrics{}
	}
	if g.SendQueue <= 0 {
		g.SendQueue = 256
	}
	if g.WriteTimeout <= 0 {
		g.WriteTimeout = 10 * time.Second
	}
	if g.PingInterval <= 0 {
		g.PingInterval = 20 * time.Second
	}
	if g.MaxSubscriptions <= 0 {
		g.MaxSubscriptions = 1000
	}
	if g.RecheckInterval <= 0 {
		g.RecheckInterval = time.Minute
	}
	if g.Recheckers <= 0 {
		g.Recheckers = 4
	}
	g.conns = map[*conn]struct{}{}
	g.topics = map[string]map[*conn]struct{}{}
	g.waiting = map[string][]chan struct{}{}
	g.recheckWake = make(chan struct{}, 1)
	ctx, g.cancel = context.WithCancel(ctx)
	g.ps = g.Redis.Subscribe(ctx)
	g.wg.Add(3 + g.Recheckers)
	go func() {
		defer g.wg.Done()
		g.relay(ctx)
	}()
	go func() {
		defer g.wg.Done()
		g.recheckAll(ctx)
	}()
	go func() {
		defer g.wg.Done()
		g.pingAll(ctx)
	}()
	for range g.Recheckers {
		go func() {
			defer g.wg.Done()
			g.rechecker(ctx)
		}()
	}
	return nil
}

// relay reads the pub/sub connection and fans each event out to the local
// subscribers of its topic.
func (g *Gateway) relay(ctx context.Context) {
	for {
		msg, err := g.ps.Receive(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			// go-redis reconnects and resubscribes by itself, but the
			// events published meanwhile were not relayed: every client
			// reconnects and resubscribes with since, to replay them from
			// the streams.
			g.Logger.Warn("event relay interrupted; clients are told to reconnect", "err", err)
			g.mu.Lock()
			conns := make([]*conn, 0, len(g.conns))
			for c := range g.conns {
				conns = append(conns, c)
			}
			g.mu.Unlock()
			for _, c := range conns {
				c.shutdown(websocket.CloseServiceRestart, "event relay interrupted: reconnect and resubscribe with since")
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" {
				g.mu.Lock()
				if w := g.waiting[m.Channel]; len(w) > 0 {
					close(w[0])
					if len(w) == 1 {
						delete(g.waiting, m.Channel)
					} else {
						g.waiting[m.Channel] = w[1:]
					}
				}
				g.mu.Unlock()
			}
		case *redis.Message:
			g.fanOut(m.Channel, m.Payload)
		}
	}
}

func (g *Gateway) fanOut(channel, payload string) {
	var head struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal([]byte(payload), &head); err != nil {
		return
	}
	topic := g.Events.TopicOf(channel)
	g.mu.Lock()
	if len(g.waiting[channel]) > 0 {
		g.mu.Unlock()
		return
	}
	subs := make([]*conn, 0, len(g.topics[topic]))
	for c := range g.topics[topic] {
		subs = append(subs, c)
	}
	g.mu.Unlock()
	for _, c := range subs {
		c.deliver(topic, head.ID, []byte(payload))
	}
}

// subscribe adds c to topic's subscribers and returns once Redis delivers
// the topic's events to this replica.
func (g *Gateway) subscribe(ctx context.Context, c *conn, topic string) error {
	g.psMu.Lock()
	g.mu.Lock()
	subs := g.topics[topic]
	first := subs == nil
	if first {
		subs = map[*conn]struct{}{}
		g.topics[topic] = subs
	}
	subs[c] = struct{}{}
	channel := g.Events.Channel(topic)
	var confirmed chan struct{}
	if w := g.waiting[channel]; first {
		confirmed = make(chan struct{})
		g.waiting[channel] = append(w, confirmed)
	} else if len(w) > 0 {
		confirmed = w[len(w)-1]
	}
	g.mu.Unlock()
	g.Metrics.Subscriptions(1)
	if first {
		// Even if this fails, go-redis keeps the channel and subscribes
		// when it reconnects; the confirmation says when.
		_ = g.ps.Subscribe(ctx, channel)
	}
	g.psMu.Unlock()
	if confirmed == nil {
		return nil
	}
	select {
	case <-confirmed:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(5 * time.Second):
		return errors.New("event subscription not confirmed")
	}
}

func (g *Gateway) unsubscribe(c *conn, topic string) {
	g.psMu.Lock()
	defer g.psMu.Unlock()
	g.mu.Lock()
	subs := g.topics[topic]
	if _, ok := subs[c]; !ok {
		g.mu.Unlock()
		return
	}
	delete(subs, c)
	last := len(subs) == 0
	if last {
		delete(g.topics, topic)
		// A subscription Redis never confirmed (it was down) is given up
		// with its topic: left waiting, it would take the confirmation of
		// the topic's next subscription, and hold back its events, for
		// good.
		channel := g.Events.Channel(topic)
		for _, w := range g.waiting[channel] {
			close(w)
		}
		delete(g.waiting, channel)
	}
	g.mu.Unlock()
	g.Metrics.Subscriptions(-1)
	if last {
		_ = g.ps.Unsubscribe(context.Background(), g.Events.Channel(topic))
	}
}

// Stop tells every client to reconnect elsewhere, closes their connections
// and the pub/sub connection. It is idempotent.
func (g *Gateway) Stop(ctx context.Context) {
	g.stopOnce.Do(func() {
		g.mu.Lock()
		g.closing = true
		conns := make([]*conn, 0, len(g.conns))
		for c := range g.conns {
			conns = append(conns, c)
		}
		g.mu.Unlock()
		for _, c := range conns {
			c.shutdown(websocket.CloseServiceRestart, "server restarting: reconnect and resubscribe with since")
		}
		for _, c := range conns {
			select {
			case <-c.done:
			case <-ctx.Done():
			}
		}
		if g.cancel != nil {
			g.cancel()
			_ = g.ps.Close()
			g.wg.Wait()
		}
	})
}

// Connections returns how many clients are connected.
func (g *Gateway) Connections() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.conns)
}

// Invalidate is told of credential and access changes (the cache bus):
// connections whose session was revoked are closed, and those whose access
// may have changed re-check their subscriptions.
func (g *Gateway) Invalidate(keys ...string) {
	g.mu.Lock()
	var recheck, revoke []*conn
	for c := range g.conns {
		for _, key := range keys {
			switch {
			case key == "*" || key == "facts:*":
				recheck = append(recheck, c)
			case strings.HasPrefix(key, "session:") && c.session != "" && key == "session:"+c.session:
				revoke = append(revoke, c)
			case strings.HasPrefix(key, "facts:") && strings.HasPrefix(key, "facts:"+c.principal().ID+":"):
				recheck = append(recheck, c)
			case strings.HasPrefix(key, "key:") && c.keyPrefix != "" && key == "key:"+c.keyPrefix:
				recheck = append(recheck, c)
			case strings.HasPrefix(key, "acl:") && key == "acl:"+c.principal().OrgID:
				recheck = append(recheck, c)
			default:
				continue
			}
			break
		}
	}
	g.mu.Unlock()
	for _, c := range revoke {
		c.shutdown(CloseRevoked, "session revoked")
	}
	for _, c := range recheck {
		c.requestRecheck()
	}
}

// queueRecheck hands c to the rechecking goroutines, without blocking.
func (g *Gateway) queueRecheck(c *conn) {
	g.recheckMu.Lock()
	g.rechecks = append(g.rechecks, c)
	g.recheckMu.Unlock()
	signal(g.recheckWake)
}

// rechecker re-decides the access of the connections queued for it.
func (g *Gateway) rechecker(ctx context.Context) {
	for ctx.Err() == nil {
		g.recheckMu.Lock()
		var c *conn
		if len(g.rechecks) > 0 {
			c = g.rechecks[0]
			g.rechecks[0] = nil
			g.rechecks = g.rechecks[1:]
			if len(g.rechecks) == 0 {
				g.rechecks = nil
			} else {
				signal(g.recheckWake) // for another rechecker
			}
		}
		g.recheckMu.Unlock()
		if c == nil {
			select {
			case <-ctx.Done():
				return
			case <-g.recheckWake:
			}
			continue
		}
		select {
		case <-c.done:
		default:
			c.recheck(ctx)
		}
	}
}

// recheckAll queues every connection for a recheck each RecheckInterval.
func (g *Gateway) recheckAll(ctx context.Context) {
	g.everyConn(ctx, g.RecheckInterval, (*conn).requestRecheck)
}

// pingAll pings every connection each PingInterval.
func (g *Gateway) pingAll(ctx context.Context) {
	g.everyConn(ctx, g.PingInterval, (*conn).ping)
}

// everyConn calls fn on every connection each interval, spread over the
// first half of the interval, until ctx ends.
func (g *Gateway) everyConn(ctx context.Context, interval time.Duration, fn func(*conn)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		g.mu.Lock()
		conns := make([]*conn, 0, len(g.conns))
		for c := range g.conns {
			conns = append(conns, c)
		}
		g.mu.Unlock()
		// In batches, with a pause between them.
		const batch = 100
		pause := interval / 2 / time.Duration(len(conns)/batch+1)
		for i, c := range conns {
			fn(c)
			if i%batch == batch-1 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(pause):
				}
			}
		}
	}
}

// Upgrader settings: small buffers (a pool shares write buffers), since a
// replica holds many mostly idle connections.
var writeBuffers = &sync.Pool{}

// Accept upgrades an authenticated request to a WebSocket connection,
// which it serves from then on, and returns. rebuild reloads the principal
// (to re-check access); session and keyPrefix say which revocations end it.
func (g *Gateway) Accept(w http.ResponseWriter, r *http.Request, p *platform.Principal, rebuild func(context.Context) (*platform.Principal, error), session, keyPrefix string) {
	up := websocket.Upgrader{
		ReadBufferSize:    1024,
		WriteBufferSize:   1024,
		WriteBufferPool:   writeBuffers,
		HandshakeTimeout:  10 * time.Second,
		EnableCompression: false,
		// The origin was checked before the upgrade (Handler), against the
		// allowed origins; nothing reaches here unchecked.
		CheckOrigin: func(*http.Request) bool { return true },
	}
	ws, err := up.Upgrade(w, r, nil)
	if err != nil {
		return // the upgrader answered the client
	}
	c := newConn(g, ws, p, rebuild, session, keyPrefix)
	g.mu.Lock()
	if g.closing {
		g.mu.Unlock()
		_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseServiceRestart, "server restarting"), time.Now().Add(time.Second))
		ws.Close()
		return
	}
	g.conns[c] = struct{}{}
	g.mu.Unlock()
	g.Metrics.Connections(1)
	// The connection outlives the request: the handler returns, and with
	// it go its (deep) stack, the HTTP server's buffers and the request.
	// Only the request's identification is kept, for logs and audit.
	ctx := platform.WithRequestInfo(context.Background(), platform.RequestInfoFrom(r.Context()))
	go c.serve(ctx)
}

// forget removes an ended connection.
func (g *Gateway) forget(c *conn) {
	g.mu.Lock()
	delete(g.conns, c)
	g.mu.Unlock()
	g.Metrics.Connections(-1)
}

// compareIDs orders two stream ids (ms-seq): -1, 0 or 1.
func compareIDs(a, b string) int {
	am, as, _ := strings.Cut(a, "-")
	bm, bs, _ := strings.Cut(b, "-")
	an, _ := strconv.ParseUint(am, 10, 64)
	bn, _ := strconv.ParseUint(bm, 10, 64)
	if an != bn {
		if an < bn {
			return -1
		}
		return 1
	}
	asq, _ := strconv.ParseUint(as, 10, 64)
	bsq, _ := strconv.ParseUint(bs, 10, 64)
	switch {
	case asq < bsq:
		return -1
	case asq > bsq:
		return 1
	}
	return 0
}
