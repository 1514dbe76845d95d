// Package events carries what happens on the platform (command transitions
// and progress, notifications) from whoever causes it to every API replica:
// each event is appended to a bounded Redis stream per topic, for replay,
// and published on the topic's pub/sub channel, for live delivery. Both
// happen in one Lua script, so live order equals stream order.
package events

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/agentry/agentry/internal/batch"
)

// Event is one message on a topic. ID is its stream entry id in that topic:
// a client that reconnects asks for what came after the last ID it saw.
type Event struct {
	Type  string          `json:"type"`
	Topic string          `json:"topic"`
	ID    string          `json:"id"`
	Data  json.RawMessage `json:"data"`
}

// Topics.
func CommandTopic(id string) string { return "command:" + id }
func AgentTopic(id string) string   { return "agent:" + id }
func UserTopic(id string) string    { return "user:" + id }

// Bus publishes and replays events.
type Bus struct {
	rdb    redis.UniversalClient
	prefix string
	maxLen int64
	ttl    time.Duration

	// Linger, if set before the first Publish, is how long events wait for
	// others to go to Redis with (see batch.Batcher.Linger).
	Linger time.Duration

	once sync.Once
	pubs *batch.Batcher[publication, error]
}

// publication is one Publish call.
type publication struct {
	typ    string
	data   []byte
	topics []string
}

// NewBus returns a bus whose keys start with prefix and whose streams keep
// about maxLen events each.
func NewBus(rdb redis.UniversalClient, prefix string, maxLen int64) *Bus {
	return &Bus{rdb: rdb, prefix: prefix, maxLen: maxLen, ttl: 7 * 24 * time.Hour}
}

// StreamKey is the Redis stream of a topic.
func (b *Bus) StreamKey(topic string) string { return b.prefix + ":stream:" + topic }

// Channel is the pub/sub channel of a topic.
func (b *Bus) Channel(topic string) string { return b.prefix + ":ev:" + topic }

// TopicOf returns the topic of a channel name.
func (b *Bus) TopicOf(channel string) string { return strings.TrimPrefix(channel, b.prefix+":ev:") }

// publish appends an event to the stream KEYS[1] (capped near ARGV[1]
// entries, kept ARGV[2] ms after its last event) and publishes it, with its
// new id, on channel ARGV[3]. ARGV[4] is the type, ARGV[5] the topic and
// ARGV[6] the JSON data. Returns the id.
var publish = redis.NewScript(`
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 't', ARGV[4], 'd', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], '{"type":' .. cjson.encode(ARGV[4]) .. ',"topic":' .. cjson.encode(ARGV[5]) .. ',"id":"' .. id .. '","data":' .. ARGV[6] .. '}')
return id`)

// Publish sends an event of typ with data (marshalled to JSON) to every topic.
//
// Events published at once (by commands starting or ending together) go to
// Redis in one pipeline.
func (b *Bus) Publish(ctx context.Context, typ string, data any, topics ...string) error {
	raw, err := json.Marshal(data)
	if err != nil {
		return err
	}
	b.once.Do(func() {
		b.pubs = batch.New(1, 128, b.publishMany)
		b.pubs.Linger = b.Linger
	})
	perr, err := b.pubs.Do(publication{typ: typ, data: raw, topics: topics})
	if err == nil {
		err = perr
	}
	if err != nil {
		return fmt.Errorf("events: publish %s: %w", typ, err)
	}
	return nil
}

// publishMany runs the publish script for every topic of ps in one
// pipeline, by its hash; scripts Redis does not hold (after a restart) are
// sent whole, once more. Each publication gets its own error: one that
// failed is not sent again with those that did not.
func (b *Bus) publishMany(ctx context.Context, ps []publication) ([]error, error) {
	type call struct {
		i     int
		topic string
		cmd   *redis.Cmd
	}
	var calls []call
	pipe := b.rdb.Pipeline()
	for i, p := range ps {
		for _, topic := range p.topics {
			calls = append(calls, call{i, topic, publish.EvalSha(ctx, pipe, []string{b.StreamKey(topic)}, b.args(p, topic)...)})
		}
	}
	_, _ = pipe.Exec(ctx) // each command holds its own error
	errs := make([]error, len(ps))
	var again []call
	for _, c := range calls {
		switch err := c.cmd.Err(); {
		case redis.HasErrorPrefix(err, "NOSCRIPT"):
			again = append(again, c)
		case err != nil && errs[c.i] == nil:
			errs[c.i] = err
		}
	}
	if len(again) > 0 {
		pipe = b.rdb.Pipeline()
		for k, c := range again {
			again[k].cmd = publish.Eval(ctx, pipe, []string{b.StreamKey(c.topic)}, b.args(ps[c.i], c.topic)...)
		}
		_, _ = pipe.Exec(ctx)
		for _, c := range again {
			if err := c.cmd.Err(); err != nil && errs[c.i] == nil {
				errs[c.i] = err
			}
		}
	}
	return errs, nil
}

// args are the publish script's arguments for p on topic.
func (b *Bus) args(p publication, topic string) []any {
	return []any{b.maxLen, b.ttl.Milliseconds(), b.Channel(topic), p.typ, topic, string(p.data)}
}

// Since returns the events of topic after the id since ("" or "0": from the
// oldest kept), at most limit of them.
func (b *Bus) Since(ctx context.Context, topic, since string, limit int64) ([]Event, error) {
	start := "-"
	if since != "" && since != "0" {
		start = "(" + since
	}
	msgs, err := b.rdb.XRangeN(ctx, b.StreamKey(topic), start, "+", limit).Result()
	if err != nil {
		return nil, err
	}
	out := make([]Event, 0, len(msgs))
	for _, m := range msgs {
		typ, _ := m.Values["t"].(string)
		data, _ := m.Values["d"].(string)
		out = append(out, Event{Type: typ, Topic: topic, ID: m.ID, Data: json.RawMessage(data)})
	}
	return out, nil
}

// ValidID reports whether s is a stream entry id (ms-seq).
func ValidID(s string) bool {
	ms, seq, ok := strings.Cut(s, "-")
	return ok && digits(ms) && digits(seq) && len(s) <= 41
}

func digits(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// Signal publishes payload on the installation's channel name (not a topic:
// signals are not streamed), for processes listening with Signals.
func (b *Bus) Signal(ctx context.Context, name, payload string) error {
	return b.rdb.Publish(ctx, b.prefix+":signal:"+name, payload).Err()
}

// Signals delivers the payloads signalled on name until ctx ends. The
// channel is closed when ctx ends.
func (b *Bus) Signals(ctx context.Context, name string) (<-chan string, error) {
	sub := b.rdb.Subscribe(ctx, b.prefix+":signal:"+name)
	if _, err := sub.Receive(ctx); err != nil {
		sub.Close()
		return nil, err
	}
	out := make(chan string, 64)
	go func() {
		defer close(out)
		defer sub.Close()
		ch := sub.Channel()
		for {
			select {
			case <-ctx.Done():
				return
			case m, ok := <-ch:
				if !ok {
					return
				}
				select {
				case out <- m.Payload:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out, nil
}
