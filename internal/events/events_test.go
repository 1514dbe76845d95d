package events_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/testenv"
)

func newBus(t *testing.T, maxLen int64) *events.Bus {
	t.Helper()
	rdb, prefix := testenv.Redis(t)
	return events.NewBus(rdb, prefix, maxLen)
}

// publishN publishes n events of type "n" with data {"n": i} on topic and
// returns their ids.
func publishN(t *testing.T, b *events.Bus, topic string, n int) []string {
	t.Helper()
	ctx := context.Background()
	for i := range n {
		if err := b.Publish(ctx, "n", map[string]int{"n": i}, topic); err != nil {
			t.Fatal(err)
		}
	}
	all, err := b.Since(ctx, topic, "", int64(n+10))
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != n {
		t.Fatalf("stream: want %d events, got %d", n, len(all))
	}
	ids := make([]string, n)
	for i, e := range all {
		ids[i] = e.ID
	}
	return ids
}

func seqOf(t *testing.T, evs []events.Event) []int {
	t.Helper()
	out := make([]int, len(evs))
	for i, e := range evs {
		var d struct{ N int }
		if err := json.Unmarshal(e.Data, &d); err != nil {
			t.Fatalf("event %s: data %s: %v", e.ID, e.Data, err)
		}
		out[i] = d.N
	}
	return out
}

func span(from, to int) []int {
	var out []int
	for i := from; i < to; i++ {
		out = append(out, i)
	}
	return out
}

func TestPublishSinceOrderAndContent(t *testing.T) {
	t.Parallel()
	b := newBus(t, 1000)
	ctx := context.Background()
	topic := events.AgentTopic("a1")
	if err := b.Publish(ctx, "command.queued", map[string]any{"id": "c1", "quote": `he said "hi" / bye`}, topic, events.CommandTopic("c1")); err != nil {
		t.Fatal(err)
	}
	for _, tp := range []string{topic, events.CommandTopic("c1")} {
		evs, err := b.Since(ctx, tp, "", 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(evs) != 1 {
			t.Fatalf("%s: want 1 event, got %d", tp, len(evs))
		}
		e := evs[0]
		if e.Type != "command.queued" || e.Topic != tp || !events.ValidID(e.ID) {
			t.Fatalf("%s: want a command.queued of the topic with a stream id, got %+v", tp, e)
		}
		var d map[string]string
		if err := json.Unmarshal(e.Data, &d); err != nil || d["quote"] != `he said "hi" / bye` {
			t.Fatalf("%s: data: want the quote back, got %s (%v)", tp, e.Data, err)
		}
	}

	ids := publishN(t, b, events.AgentTopic("a2"), 20)
	for i := 1; i < len(ids); i++ {
		if !before(ids[i-1], ids[i]) {
			t.Fatalf("ids not increasing: %s then %s", ids[i-1], ids[i])
		}
	}
}

func TestSinceSemantics(t *testing.T) {
	t.Parallel()
	b := newBus(t, 1000)
	ctx := context.Background()
	topic := events.CommandTopic("c")
	ids := publishN(t, b, topic, 10)
	tests := []struct {
		name  string
		since string
		limit int64
		want  []int
	}{
		{"empty since: from the oldest", "", 100, span(0, 10)},
		{"0: from the oldest", "0", 100, span(0, 10)},
		{"after the first", ids[0], 100, span(1, 10)},
		{"after the fourth", ids[3], 100, span(4, 10)},
		{"after the last: nothing", ids[9], 100, []int{}},
		{"limit applies from since", ids[3], 2, []int{4, 5}},
		{"an id older than the stream", "1-0", 100, span(0, 10)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			evs, err := b.Since(ctx, topic, tt.since, tt.limit)
			if err != nil {
				t.Fatal(err)
			}
			if got := seqOf(t, evs); !slices.Equal(got, tt.want) {
				t.Fatalf("since %q limit %d: want %v, got %v", tt.since, tt.limit, tt.want, got)
			}
		})
	}
	t.Run("unknown topic: nothing", func(t *testing.T) {
		evs, err := b.Since(ctx, events.CommandTopic("none"), "", 10)
		if err != nil || len(evs) != 0 {
			t.Fatalf("want no events and no error, got %v, %v", evs, err)
		}
	})
}

// before reports whether stream id a comes before b.
func before(a, b string) bool {
	var am, as, bm, bs uint64
	fmt.Sscanf(a, "%d-%d", &am, &as)
	fmt.Sscanf(b, "%d-%d", &bm, &bs)
	return am < bm || am == bm && as < bs
}

func TestPublishIsLiveInStreamOrder(t *testing.T) {
	t.Parallel()
	rdb, prefix := testenv.Redis(t)
	b := events.NewBus(rdb, prefix, 1000)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	topic := events.AgentTopic("live")
	sub := subscribe(ctx, t, rdb, b, topic)
	if got := b.TopicOf(b.Channel(topic)); got != topic {
		t.Fatalf("TopicOf(Channel(%q)): got %q", topic, got)
	}
	const n = 50
	ids := publishN(t, b, topic, n)
	for i := range n {
		e, _ := receive(ctx, t, sub)
		if e.ID != ids[i] || e.Topic != topic || e.Type != "n" || seqOf(t, []events.Event{e})[0] != i {
			t.Fatalf("live event %d: want id %s (the stream's), got %+v", i, ids[i], e)
		}
	}
}

// subscribe follows the live events of topics, from when it returns until
// the test ends.
func subscribe(ctx context.Context, t *testing.T, rdb *redis.Client, b *events.Bus, topics ...string) *redis.PubSub {
	t.Helper()
	channels := make([]string, len(topics))
	for i, topic := range topics {
		channels[i] = b.Channel(topic)
	}
	sub := rdb.Subscribe(ctx, channels...)
	t.Cleanup(func() { sub.Close() })
	for range topics {
		if _, err := sub.Receive(ctx); err != nil { // the confirmations
			t.Fatal(err)
		}
	}
	return sub
}

// receive returns the next live event on sub and the channel it came on.
func receive(ctx context.Context, t *testing.T, sub *redis.PubSub) (events.Event, string) {
	t.Helper()
	msg, err := sub.ReceiveMessage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var e events.Event
	if err := json.Unmarshal([]byte(msg.Payload), &e); err != nil {
		t.Fatalf("live payload is not an event: %s", msg.Payload)
	}
	return e, msg.Channel
}

// An event on several topics goes live on each, naming that topic and
// carrying that topic's stream id.
func TestPublishToSeveralTopicsIsLiveOnEach(t *testing.T) {
	t.Parallel()
	rdb, prefix := testenv.Redis(t)
	b := events.NewBus(rdb, prefix, 1000)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	topics := []string{events.CommandTopic("c9"), events.AgentTopic("a9"), events.UserTopic("u9")}
	sub := subscribe(ctx, t, rdb, b, topics...)
	if err := b.Publish(ctx, "command.running", map[string]string{"id": "c9"}, topics...); err != nil {
		t.Fatal(err)
	}
	got := map[string]events.Event{}
	for range topics {
		e, channel := receive(ctx, t, sub)
		if channel != b.Channel(e.Topic) {
			t.Fatalf("an event naming topic %s came on %s", e.Topic, channel)
		}
		got[e.Topic] = e
	}
	for _, topic := range topics {
		stored, err := b.Since(ctx, topic, "", 10)
		if err != nil || len(stored) != 1 {
			t.Fatalf("%s: want one stored event, got %v (%v)", topic, stored, err)
		}
		if e := got[topic]; e.Type != "command.running" || e.ID != stored[0].ID || string(e.Data) != `{"id":"c9"}` {
			t.Fatalf("%s: live %+v, stored %+v", topic, e, stored[0])
		}
	}
}

func TestStreamIsBounded(t *testing.T) {
	t.Parallel()
	rdb, prefix := testenv.Redis(t)
	b := events.NewBus(rdb, prefix, 10)
	ctx := context.Background()
	topic := events.AgentTopic("bounded")
	for i := range 500 {
		if err := b.Publish(ctx, "n", map[string]int{"n": i}, topic); err != nil {
			t.Fatal(err)
		}
	}
	n, err := rdb.XLen(ctx, b.StreamKey(topic)).Result()
	if err != nil {
		t.Fatal(err)
	}
	// MAXLEN ~ trims whole macro nodes (100 entries by default).
	if n < 10 || n > 200 {
		t.Fatalf("stream length: want about 10, got %d", n)
	}
	ttl, err := rdb.PTTL(ctx, b.StreamKey(topic)).Result()
	if err != nil || ttl <= 0 {
		t.Fatalf("stream TTL: want one, got %v (%v)", ttl, err)
	}
	evs, _ := b.Since(ctx, topic, "", 1000)
	if last := seqOf(t, evs); last[len(last)-1] != 499 {
		t.Fatalf("the newest events are kept: want 499 last, got %d", last[len(last)-1])
	}
}

func TestPublishRefusesUnmarshalableData(t *testing.T) {
	t.Parallel()
	b := newBus(t, 10)
	if err := b.Publish(context.Background(), "x", func() {}, events.AgentTopic("x")); err == nil {
		t.Fatal("want an error for data that is not JSON")
	}
}

func TestValidID(t *testing.T) {
	t.Parallel()
	tests := []struct {
		id   string
		want bool
	}{
		{"1700000000000-0", true},
		{"0-0", true},
		{"1-18446744073709551615", true},
		{"", false},
		{"0", false},
		{"123", false},
		{"-1", false},
		{"1-", false},
		{"1--1", false},
		{"a-1", false},
		{"1-a", false},
		{"1-1-1", false},
		{"+", false},
		{"-", false},
		{" 1-1", false},
		{"１-1", false}, // full-width digit
		{"1-1)", false},
		{"12345678901234567890-123456789012345678901", false}, // over 41 characters
	}
	for _, tt := range tests {
		if got := events.ValidID(tt.id); got != tt.want {
			t.Errorf("ValidID(%q): want %v, got %v", tt.id, tt.want, got)
		}
	}
}

func TestSignals(t *testing.T) {
	t.Parallel()
	b := newBus(t, 10)
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := b.Signals(ctx, "cancel")
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Signal(ctx, "cancel", "c1"); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-ch:
		if got != "c1" {
			t.Fatalf("want c1, got %q", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("signal not delivered")
	}
	cancel()
	for range ch {
	}
}

// Publishing works again after Redis lost its scripts (a restart), and
// events published at once all land, in order per topic.
func TestPublishAfterScriptFlushAndConcurrently(t *testing.T) {
	t.Parallel()
	rdb, prefix := testenv.Redis(t)
	b := events.NewBus(rdb, prefix, 1000)
	ctx := context.Background()
	if err := b.Publish(ctx, "n", map[string]int{"n": 0}, events.AgentTopic("a")); err != nil {
		t.Fatal(err)
	}
	if err := rdb.ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	if err := b.Publish(ctx, "n", map[string]int{"n": 1}, events.AgentTopic("a")); err != nil {
		t.Fatalf("after SCRIPT FLUSH: %v", err)
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			topic := events.AgentTopic(fmt.Sprint("g", g))
			for i := range 25 {
				if err := b.Publish(ctx, "n", map[string]int{"n": i}, topic); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	for g := range 8 {
		got, err := b.Since(ctx, events.AgentTopic(fmt.Sprint("g", g)), "", 100)
		if err != nil {
			t.Fatal(err)
		}
		seq := seqOf(t, got)
		if len(seq) != 25 {
			t.Fatalf("topic g%d: want 25 events, got %d", g, len(seq))
		}
		for i, s := range seq {
			if s != i {
				t.Fatalf("topic g%d: out of order: %v", g, seq)
			}
		}
	}
}
