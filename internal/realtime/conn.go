package realtime

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/platform"
)

// replayLimit bounds what one resubscription replays.
const replayLimit = 1000

type closeReq struct {
	code   int
	reason string
}

// conn is one client connection. Its reader handles the client's messages;
// its writer alone writes to the socket, from the bounded send queue.
type conn struct {
	g         *Gateway
	ws        *websocket.Conn
	p         atomic.Pointer[platform.Principal]
	rebuild   func(context.Context) (*platform.Principal, error)
	session   string
	keyPrefix string

	send    chan []byte
	closing chan closeReq
	recheck chan struct{}
	done    chan struct{}

	mu   sync.Mutex
	subs map[string]*subscription
	dead bool
}

// subscription is one topic a connection follows. While it replays the
// stream, live events wait in buf; after, only events newer than last pass.
type subscription struct {
	replaying bool
	last      string
	buf       [][]byte
	bufIDs    []string
}

func (c *conn) principal() *platform.Principal { return c.p.Load() }

func (c *conn) serve(ctx context.Context) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		c.writer(ctx)
	}()
	go c.rechecker(ctx)
	c.reader(ctx)
	cancel()
	<-writerDone
	c.ws.Close()
	c.mu.Lock()
	c.dead = true
	topics := make([]string, 0, len(c.subs))
	for t := range c.subs {
		topics = append(topics, t)
	}
	c.mu.Unlock()
	for _, t := range topics {
		c.g.unsubscribe(c, t)
	}
	close(c.done)
}

// reader handles the client's messages until the connection ends.
func (c *conn) reader(ctx context.Context) {
	c.ws.SetReadLimit(4096)
	deadline := 2*c.g.PingInterval + 5*time.Second
	_ = c.ws.SetReadDeadline(time.Now().Add(deadline))
	c.ws.SetPongHandler(func(string) error { return c.ws.SetReadDeadline(time.Now().Add(deadline)) })
	for {
		_, data, err := c.ws.ReadMessage()
		if err != nil {
			return
		}
		_ = c.ws.SetReadDeadline(time.Now().Add(deadline))
		var m clientMessage
		if err := json.Unmarshal(data, &m); err != nil {
			c.reply("error", "", map[string]string{"code": "invalid", "message": "messages are JSON objects with a type"})
			continue
		}
		switch m.Type {
		case "ping":
			c.reply("pong", "", struct{}{})
		case "subscribe":
			c.handleSubscribe(ctx, m)
		case "unsubscribe":
			c.handleUnsubscribe(m.Topic)
		default:
			c.reply("error", m.Topic, map[string]string{"code": "invalid", "message": "unknown message type; use subscribe, unsubscribe or ping"})
		}
	}
}

func (c *conn) handleSubscribe(ctx context.Context, m clientMessage) {
	if m.Since != "" && !events.ValidID(m.Since) {
		c.reply("error", m.Topic, map[string]string{"code": "invalid", "message": "since must be an event id from this topic"})
		return
	}
	topic, err := c.g.Authorize(platform.WithPrincipal(ctx, c.principal()), c.principal(), m.Topic)
	if err != nil {
		c.reply("error", m.Topic, map[string]string{"code": platform.ErrorCode(err), "message": platform.ErrorMessage(err)})
		return
	}
	c.mu.Lock()
	if _, ok := c.subs[topic]; ok {
		c.mu.Unlock()
		c.reply("subscribed", topic, map[string]any{"already": true})
		return
	}
	if len(c.subs) >= c.g.MaxSubscriptions {
		c.mu.Unlock()
		c.reply("error", topic, map[string]string{"code": "too_many_requests", "message": "too many subscriptions on this connection"})
		return
	}
	sub := &subscription{replaying: m.Since != "", last: m.Since}
	c.subs[topic] = sub
	c.mu.Unlock()
	if err := c.g.subscribe(ctx, c, topic); err != nil {
		c.g.Logger.Warn("subscription failed", "topic", topic, "err", err)
		c.drop(topic)
		c.reply("error", topic, map[string]string{"code": "unavailable", "message": "events are unavailable; retry"})
		return
	}
	c.reply("subscribed", topic, struct{}{})
	if m.Since == "" {
		return
	}
	missed, err := c.g.Events.Since(ctx, topic, m.Since, replayLimit)
	if err != nil {
		c.g.Logger.Warn("replay failed", "topic", topic, "err", err)
		c.reply("error", topic, map[string]string{"code": "unavailable", "message": "could not replay missed events; resubscribe"})
	}
	for _, e := range missed {
		data, _ := json.Marshal(Message{Type: e.Type, Topic: e.Topic, ID: e.ID, Data: e.Data})
		if !c.enqueue(data) {
			return
		}
		sub.last = e.ID
	}
	// Hand over to live delivery: release what arrived during the replay.
	c.mu.Lock()
	buf, ids := sub.buf, sub.bufIDs
	sub.buf, sub.bufIDs, sub.replaying = nil, nil, false
	last := sub.last
	c.mu.Unlock()
	for i, payload := range buf {
		if compareIDs(ids[i], last) > 0 {
			if !c.enqueue(payload) {
				return
			}
			c.mu.Lock()
			sub.last = ids[i]
			c.mu.Unlock()
		}
	}
}

func (c *conn) handleUnsubscribe(topic string) {
	if strings.HasPrefix(topic, "user:") {
		topic = events.UserTopic(c.principal().ID)
	}
	if c.drop(topic) {
		c.reply("unsubscribed", topic, struct{}{})
	}
}

// drop removes a subscription; false if there was none.
func (c *conn) drop(topic string) bool {
	c.mu.Lock()
	_, ok := c.subs[topic]
	delete(c.subs, topic)
	c.mu.Unlock()
	if ok {
		c.g.unsubscribe(c, topic)
	}
	return ok
}

// deliver queues a live event of topic, unless the subscription is
// replaying (it waits) or already has it.
func (c *conn) deliver(topic, id string, payload []byte) {
	c.mu.Lock()
	sub, ok := c.subs[topic]
	if !ok || c.dead {
		c.mu.Unlock()
		return
	}
	if sub.replaying {
		if len(sub.buf) >= c.g.SendQueue {
			c.mu.Unlock()
			c.slow()
			return
		}
		sub.buf, sub.bufIDs = append(sub.buf, payload), append(sub.bufIDs, id)
		c.mu.Unlock()
		return
	}
	if sub.last != "" && compareIDs(id, sub.last) <= 0 {
		c.mu.Unlock()
		return
	}
	sub.last = id
	c.mu.Unlock()
	c.enqueue(payload)
}

// enqueue puts a message in the send queue without ever blocking: a full
// queue means the client is too slow, and it is cut off.
func (c *conn) enqueue(data []byte) bool {
	select {
	case c.send <- data:
		return true
	default:
		c.slow()
		return false
	}
}

func (c *conn) slow() {
	c.g.Metrics.SlowClient()
	c.shutdown(CloseSlowConsumer, "too slow: reconnect and resubscribe with since")
}

// shutdown asks the writer to close the connection with code.
func (c *conn) shutdown(code int, reason string) {
	select {
	case c.closing <- closeReq{code, reason}:
	default:
	}
}

func (c *conn) reply(typ, topic string, data any) {
	raw, _ := json.Marshal(data)
	msg, _ := json.Marshal(Message{Type: typ, Topic: topic, Data: raw})
	c.enqueue(msg)
}

// writer sends queued messages and pings, and closes the connection when
// asked, after a last message telling the client why.
func (c *conn) writer(ctx context.Context) {
	ping := time.NewTicker(c.g.PingInterval)
	defer ping.Stop()
	write := func(typ int, data []byte) bool {
		_ = c.ws.SetWriteDeadline(time.Now().Add(10 * time.Second))
		return c.ws.WriteMessage(typ, data) == nil
	}
	for {
		select {
		case <-ctx.Done():
			return
		case req := <-c.closing:
			if req.code != CloseSlowConsumer {
				raw, _ := json.Marshal(map[string]any{"code": req.code, "reason": req.reason})
				msg, _ := json.Marshal(Message{Type: "reconnect", Data: raw})
				write(websocket.TextMessage, msg)
			}
			_ = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(req.code, req.reason), time.Now().Add(time.Second))
			c.ws.Close()
			return
		case data := <-c.send:
			if !write(websocket.TextMessage, data) {
				c.ws.Close()
				return
			}
			c.g.Metrics.EventsSent(1)
		case <-ping.C:
			_ = c.ws.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(10*time.Second)); err != nil {
				c.ws.Close()
				return
			}
		}
	}
}

func (c *conn) requestRecheck() {
	select {
	case c.recheck <- struct{}{}:
	default:
	}
}

// rechecker re-authenticates and re-decides every subscription when access
// may have changed, and once a minute regardless: a revoked grant ends its
// subscription, revoked credentials the connection.
func (c *conn) rechecker(ctx context.Context) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.recheck:
		case <-t.C:
		}
		p, err := c.rebuild(ctx)
		if err != nil {
			if platform.ErrorCode(err) == platform.EUNAUTHORIZED || platform.ErrorCode(err) == platform.EFORBIDDEN {
				c.shutdown(CloseRevoked, "credentials revoked or expired")
				return
			}
			continue // a dependency hiccup: keep what we have, check again later
		}
		c.p.Store(p)
		c.mu.Lock()
		topics := make([]string, 0, len(c.subs))
		for t := range c.subs {
			topics = append(topics, t)
		}
		c.mu.Unlock()
		for _, topic := range topics {
			if _, err := c.g.Authorize(platform.WithPrincipal(ctx, p), p, topic); err != nil {
				if code := platform.ErrorCode(err); code == platform.EUNAVAILABLE || code == platform.EINTERNAL {
					continue
				}
				c.drop(topic)
				c.reply("error", topic, map[string]string{"code": "revoked", "message": "access to this topic was revoked"})
			}
		}
	}
}
