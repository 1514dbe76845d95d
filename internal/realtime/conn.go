package realtime

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/platform"
)

// replayPage is how many stored events one read of a topic's stream
// returns; a replay reads pages until it has caught up.
const replayPage = 500

type closeReq struct {
	code   int
	reason string
}

// conn is one client connection. Its reader, the one goroutine it keeps,
// handles the client's messages. Messages to send wait in a bounded queue;
// a flush goroutine, started when there is something to send and gone when
// the queue is empty, alone writes to the socket. An idle connection holds
// one goroutine blocked in a read, a small read buffer and no write buffer.
type conn struct {
	g         *Gateway
	ws        *websocket.Conn
	p         atomic.Pointer[platform.Principal]
	rebuild   func(context.Context) (*platform.Principal, error)
	session   string
	keyPrefix string

	// The send queue: messages wait in queue (at most g.SendQueue of
	// them; nil when empty). space tells a replay waiting for room that a
	// message left. closeWith is the close the flush goroutine makes once
	// asked; stopped is closed when the socket takes nothing more.
	qmu       sync.Mutex
	queue     [][]byte
	flushing  bool
	ended     bool // the reader is done: no flush starts any more
	closeWith *closeReq
	flushes   sync.WaitGroup
	space     chan struct{}
	stopped   chan struct{}
	stopOnce  sync.Once

	cut        atomic.Bool // a close was requested: nothing more is queued
	rechecking atomic.Bool // a recheck is queued at the gateway
	done       chan struct{}

	mu   sync.Mutex
	subs map[string]*subscription
	dead bool
}

// subscription is one topic a connection follows. Until it is handed over
// to live delivery (after the "subscribed" reply and any replay), live
// events wait in buf; after, only events newer than last pass.
type subscription struct {
	pending bool
	last    string
	buf     [][]byte
	bufIDs  []string
}

// pingMessage in the queue stands for a ping frame.
var pingMessage = []byte{}

func newConn(g *Gateway, ws *websocket.Conn, p *platform.Principal, rebuild func(context.Context) (*platform.Principal, error), session, keyPrefix string) *conn {
	c := &conn{
		g: g, ws: ws, rebuild: rebuild, session: session, keyPrefix: keyPrefix,
		space: make(chan struct{}, 1), stopped: make(chan struct{}), done: make(chan struct{}),
		subs: map[string]*subscription{},
	}
	c.p.Store(p)
	return c
}

func (c *conn) principal() *platform.Principal { return c.p.Load() }

func (c *conn) serve(ctx context.Context) {
	c.reader(ctx)
	c.ws.Close() // a flush blocked in a write returns
	c.qmu.Lock()
	c.ended = true
	c.queue = nil
	c.qmu.Unlock()
	c.flushes.Wait()
	c.stop()
	c.mu.Lock()
	c.dead = true
	topics := make([]string, 0, len(c.subs))
	for t := range c.subs {
		topics = append(topics, t)
	}
	c.subs = nil
	c.mu.Unlock()
	for _, t := range topics {
		c.g.unsubscribe(c, t)
	}
	c.g.forget(c)
	close(c.done)
}

// stop marks the socket as taking nothing more.
func (c *conn) stop() {
	c.stopOnce.Do(func() { close(c.stopped) })
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
			c.reply(ctx, "error", "", map[string]string{"code": "invalid", "message": "messages are JSON objects with a type"})
			continue
		}
		switch m.Type {
		case "ping":
			c.reply(ctx, "pong", "", struct{}{})
		case "subscribe":
			c.handleSubscribe(ctx, m)
		case "unsubscribe":
			c.handleUnsubscribe(ctx, m.Topic)
		default:
			c.reply(ctx, "error", m.Topic, map[string]string{"code": "invalid", "message": "unknown message type; use subscribe, unsubscribe or ping"})
		}
	}
}

func (c *conn) handleSubscribe(ctx context.Context, m clientMessage) {
	if m.Since != "" && !events.ValidID(m.Since) {
		c.reply(ctx, "error", m.Topic, map[string]string{"code": "invalid", "message": "since must be an event id from this topic"})
		return
	}
	topic, err := c.g.Authorize(platform.WithPrincipal(ctx, c.principal()), c.principal(), m.Topic)
	if err != nil {
		c.reply(ctx, "error", m.Topic, map[string]string{"code": platform.ErrorCode(err), "message": platform.ErrorMessage(err)})
		return
	}
	if m.Since != "" {
		// A since after the topic's last event would hold back every live
		// event until one passed it: refuse it. On a topic with no events
		// kept, there is nothing to replay nor to hold back.
		last, err := c.g.Events.Last(ctx, topic)
		switch {
		case err != nil:
			c.g.Logger.Warn("last event id not read", "topic", topic, "err", err)
		case last == "":
			m.Since = ""
		case compareIDs(m.Since, last) > 0:
			c.reply(ctx, "error", topic, map[string]string{"code": "invalid", "message": "since is after the last event of this topic (" + last + ")"})
			return
		}
	}
	c.mu.Lock()
	if _, ok := c.subs[topic]; ok {
		c.mu.Unlock()
		c.reply(ctx, "subscribed", topic, map[string]any{"already": true})
		return
	}
	if len(c.subs) >= c.g.MaxSubscriptions {
		c.mu.Unlock()
		c.reply(ctx, "error", topic, map[string]string{"code": "too_many_requests", "message": "too many subscriptions on this connection"})
		return
	}
	sub := &subscription{pending: true, last: m.Since}
	c.subs[topic] = sub
	c.mu.Unlock()
	if err := c.g.subscribe(ctx, c, topic); err != nil {
		c.g.Logger.Warn("subscription failed", "topic", topic, "err", err)
		c.drop(topic)
		c.reply(ctx, "error", topic, map[string]string{"code": "unavailable", "message": "events are unavailable; retry"})
		return
	}
	// The subscription may have been revoked meanwhile (a recheck drops
	// it from subs, and the gateway must forget it too).
	c.mu.Lock()
	current := c.subs[topic] == sub
	c.mu.Unlock()
	if !current {
		c.g.unsubscribe(c, topic)
		return
	}
	// Live events wait in sub.buf until the reply and the replay are queued,
	// so that the client sees "subscribed", then what it missed, then
	// live events, each once.
	c.reply(ctx, "subscribed", topic, struct{}{})
	if m.Since != "" && !c.replay(ctx, topic, sub) {
		return
	}
	c.handOver(ctx, sub)
}

// replay queues the events of topic stored after sub.last, at the pace the
// client reads them.
func (c *conn) replay(ctx context.Context, topic string, sub *subscription) bool {
	for {
		c.mu.Lock()
		since := sub.last
		c.mu.Unlock()
		missed, err := c.g.Events.Since(ctx, topic, since, replayPage)
		if err != nil {
			c.g.Logger.Warn("replay failed", "topic", topic, "err", err)
			c.reply(ctx, "error", topic, map[string]string{"code": "unavailable", "message": "could not replay missed events; resubscribe"})
			return true // live events go on
		}
		for _, e := range missed {
			data, _ := json.Marshal(Message{Type: e.Type, Topic: e.Topic, ID: e.ID, Data: e.Data})
			if !c.enqueueWait(ctx, data) {
				return false
			}
			c.mu.Lock()
			sub.last = e.ID
			c.mu.Unlock()
		}
		if len(missed) < replayPage {
			return true
		}
	}
}

// handOver queues the live events that arrived while sub was pending, then
// lets live events through. Events the replay already sent are skipped.
func (c *conn) handOver(ctx context.Context, sub *subscription) {
	for {
		c.mu.Lock()
		buf, ids := sub.buf, sub.bufIDs
		sub.buf, sub.bufIDs = nil, nil
		if len(buf) == 0 {
			sub.pending = false
			c.mu.Unlock()
			return
		}
		last := sub.last
		c.mu.Unlock()
		for i, payload := range buf {
			if last != "" && compareIDs(ids[i], last) <= 0 {
				continue
			}
			if !c.enqueueWait(ctx, payload) {
				return
			}
			last = ids[i]
		}
		c.mu.Lock()
		sub.last = last
		c.mu.Unlock()
	}
}

func (c *conn) handleUnsubscribe(ctx context.Context, topic string) {
	if kind, id, _ := strings.Cut(topic, ":"); kind == "user" {
		topic = events.UserTopic(c.principal().ID)
	} else if kind == "agent" || kind == "command" {
		topic = kind + ":" + strings.ToLower(id)
	}
	c.drop(topic)
	c.reply(ctx, "unsubscribed", topic, struct{}{})
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

// deliver queues a live event of topic, unless the subscription is pending
// (it waits) or already has it. It never blocks.
func (c *conn) deliver(topic, id string, payload []byte) {
	c.mu.Lock()
	sub, ok := c.subs[topic]
	if !ok || c.dead {
		c.mu.Unlock()
		return
	}
	if sub.pending {
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
	if c.cut.Load() {
		return false
	}
	c.qmu.Lock()
	if len(c.queue) >= c.g.SendQueue {
		c.qmu.Unlock()
		c.slow()
		return false
	}
	c.push(data)
	c.qmu.Unlock()
	return true
}

// enqueueWait puts a message in the send queue, waiting for room: a replay
// goes at the pace of the client. False if the connection ends first.
func (c *conn) enqueueWait(ctx context.Context, data []byte) bool {
	for {
		if c.cut.Load() {
			return false
		}
		c.qmu.Lock()
		if len(c.queue) < c.g.SendQueue {
			c.push(data)
			c.qmu.Unlock()
			return true
		}
		c.qmu.Unlock()
		select {
		case <-c.space:
		case <-c.stopped:
			return false
		case <-ctx.Done():
			return false
		}
	}
}

// ping queues a ping frame, unless the queue is full (then the client is
// about to be cut off anyway).
func (c *conn) ping() {
	c.qmu.Lock()
	if len(c.queue) < c.g.SendQueue && !c.cut.Load() {
		c.push(pingMessage)
	}
	c.qmu.Unlock()
}

// push appends to the queue and makes sure a flush runs. qmu is held.
func (c *conn) push(data []byte) {
	if c.ended {
		return
	}
	c.queue = append(c.queue, data)
	c.startFlush()
}

// startFlush starts the flush goroutine unless it runs. qmu is held.
func (c *conn) startFlush() {
	if c.flushing || c.ended {
		return
	}
	c.flushing = true
	c.flushes.Add(1)
	go c.flush()
}

// next takes what the flush goroutine does next: a close to make, or the
// oldest message. Nothing (and the flush ends) when the queue is empty.
func (c *conn) next() (*closeReq, []byte) {
	c.qmu.Lock()
	defer c.qmu.Unlock()
	if req := c.closeWith; req != nil {
		c.queue = nil
		return req, nil
	}
	if len(c.queue) == 0 || c.ended {
		c.flushing = false
		return nil, nil
	}
	data := c.queue[0]
	c.queue[0] = nil
	c.queue = c.queue[1:]
	if len(c.queue) == 0 {
		c.queue = nil // let an idle connection hold no buffer
	}
	signal(c.space)
	return nil, data
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func (c *conn) slow() {
	if c.shutdown(CloseSlowConsumer, "too slow: reconnect and resubscribe with since") {
		c.g.Metrics.SlowClient()
	}
}

// shutdown asks the flush goroutine to close the connection with code;
// the first request wins, and false means there was one already.
func (c *conn) shutdown(code int, reason string) bool {
	if !c.cut.CompareAndSwap(false, true) {
		return false
	}
	c.qmu.Lock()
	c.closeWith = &closeReq{code, reason}
	c.startFlush()
	c.qmu.Unlock()
	return true
}

// reply answers the client. Only the reader replies, and it waits for
// room in the queue: a client that sends faster than it reads is slowed
// down, not cut off.
func (c *conn) reply(ctx context.Context, typ, topic string, data any) {
	c.enqueueWait(ctx, message(typ, topic, data))
}

func message(typ, topic string, data any) []byte {
	raw, _ := json.Marshal(data)
	msg, _ := json.Marshal(Message{Type: typ, Topic: topic, Data: raw})
	return msg
}

// flush writes the queued messages until the queue is empty, or closes
// the connection when asked, telling a client that should come back (the
// server restarts) to reconnect first.
func (c *conn) flush() {
	defer c.flushes.Done()
	for {
		req, data := c.next()
		switch {
		case req != nil:
			if req.code == websocket.CloseServiceRestart {
				raw, _ := json.Marshal(map[string]any{"code": req.code, "reason": req.reason})
				msg, _ := json.Marshal(Message{Type: "reconnect", Data: raw})
				_ = c.ws.SetWriteDeadline(time.Now().Add(time.Second))
				_ = c.ws.WriteMessage(websocket.TextMessage, msg)
			}
			_ = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(req.code, req.reason), time.Now().Add(time.Second))
			c.fail()
			return
		case data == nil:
			return
		case len(data) == 0: // pingMessage
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(c.g.WriteTimeout)); err != nil {
				c.writeFailed(err)
				return
			}
		default:
			_ = c.ws.SetWriteDeadline(time.Now().Add(c.g.WriteTimeout))
			if err := c.ws.WriteMessage(websocket.TextMessage, data); err != nil {
				c.writeFailed(err)
				return
			}
			c.g.Metrics.EventsSent(1)
		}
	}
}

// writeFailed ends the connection after a failed write. One that timed out
// is a client too slow to read (its buffers full), counted as one cut off
// for its queue: no close frame can reach it.
func (c *conn) writeFailed(err error) {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() && !c.cut.Load() {
		c.g.Metrics.SlowClient()
	}
	c.fail()
}

// fail ends the connection from the writing side: the reader's read fails
// and the connection ends.
func (c *conn) fail() {
	c.cut.Store(true)
	c.qmu.Lock()
	c.flushing = false
	c.ended = true // nothing more to write
	c.queue = nil
	c.qmu.Unlock()
	c.stop()
	c.ws.Close()
}

// requestRecheck queues the connection for a recheck at the gateway,
// once however often it is asked before the recheck runs.
func (c *conn) requestRecheck() {
	if c.rechecking.CompareAndSwap(false, true) {
		c.g.queueRecheck(c)
	}
}

// recheck re-authenticates and re-decides every subscription: a revoked
// grant ends its subscription, revoked credentials the connection.
func (c *conn) recheck(ctx context.Context) {
	c.rechecking.Store(false)
	p, err := c.rebuild(ctx)
	if err != nil {
		if code := platform.ErrorCode(err); code == platform.EUNAUTHORIZED || code == platform.EFORBIDDEN {
			c.shutdown(CloseRevoked, "credentials revoked or expired")
		}
		return // a dependency hiccup: keep what we have, check again later
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
			if c.drop(topic) {
				c.enqueue(message("error", topic, map[string]string{"code": "revoked", "message": "access to this topic was revoked, or what it follows was deleted"}))
			}
		}
	}
}
