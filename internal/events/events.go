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

// publish appends one event to the streams KEYS (each capped near ARGV[1]
// entries, kept ARGV[2] ms after its last event) and publishes it, with its
// new id in each, on each one's channel. ARGV[3] is the type, ARGV[4] the
// JSON data; then come the channels of KEYS, in order, then their topics.
// One call for all the topics of an event spares Redis a script call per
// topic. Returns how many topics it reached.
var publish = redis.NewScript(`
local n = #KEYS
local typ = cjson.encode(ARGV[3])
for i = 1, n do
  local id = redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[1], '*', 't', ARGV[3], 'd', ARGV[4])
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
  redis.call('PUBLISH', ARGV[4 + i], '{"type":' .. typ .. ',"topic":' .. cjson.encode(ARGV[4 + n + i]) .. ',"id":"' .. id .. '","data":' .. ARGV[4] .. '}')
end
return n`)

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

// publishMany runs the publish script for each of ps (all its topics at
// once) in one pipeline, by its hash; scripts Redis does not hold (after a
// restart) are sent whole, once more. Each publication gets its own error:
// one that failed is not sent again with those that did not.
func (b *Bus) publishMany(ctx context.Context, ps []publication) ([]error, error) {
	cmds := make([]*redis.Cmd, len(ps))
	pipe := b.rdb.Pipeline()
	for i, p := range ps {
		if len(p.topics) > 0 {
			keys, args := b.script(p)
			cmds[i] = publish.EvalSha(ctx, pipe, keys, args...)
		}
	}
	_, _ = pipe.Exec(ctx) // each command holds its own error
	errs := make([]error, len(ps))
	var again []int
	for i, c := range cmds {
		switch err := cmdErr(c); {
		case redis.HasErrorPrefix(err, "NOSCRIPT"):
			again = append(again, i)
		case err != nil:
			errs[i] = err
		}
	}
	if len(again) > 0 {
		pipe = b.rdb.Pipeline()
		for _, i := range again {
			keys, args := b.script(ps[i])
			cmds[i] = publish.Eval(ctx, pipe, keys, args...)
		}
		_, _ = pipe.Exec(ctx)
		for _, i := range again {
			errs[i] = cmdErr(cmds[i])
		}
	}
	return errs, nil
}

func cmdErr(c *redis.Cmd) error {
	if c == nil {
		return nil
	}
	return c.Err()
}

// script is the publish script's keys and arguments for p.
func (b *Bus) script(p publication) (keys []string, args []any) {
	keys = make([]string, len(p.topics))
	args = make([]any, 4, 4+2*len(p.topics))
	args[0], args[1], args[2], args[3] = b.maxLen, b.ttl.Milliseconds(), p.typ, string(p.data)
	for i, topic := range p.topics {
		keys[i] = b.StreamKey(topic)
		args = append(args, b.Channel(topic))
	}
	for _, topic := range p.topics {
		args = append(args, topic)
	}
	return keys, args
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

// Last returns the id of the last event kept of topic, "" if none is.
func (b *Bus) Last(ctx context.Context, topic string) (string, error) {
	msgs, err := b.rdb.XRevRangeN(ctx, b.StreamKey(topic), "+", "-", 1).Result()
	if err != nil || len(msgs) == 0 {
		return "", err
	}
	return msgs[0].ID, nil
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
