package schedule

import (
	"testing"
	"time"
)

// FuzzNext feeds Parse and Next any expression and time zone: they answer
// an error or a fire time after the given one, and never panic or spin.
func FuzzNext(f *testing.F) {
	for _, seed := range []struct{ expr, tz string }{
		{"*/5 * * * *", "UTC"},
		{"30 2 * * *", "Europe/Paris"},
		{"0 0 30 2 *", "UTC"},
		{"@every 90s", "America/New_York"},
		{"@every 0.5s", "UTC"},
		{"0 30 1 * * SUN", "Australia/Lord_Howe"},
		{"CRON_TZ=Asia/Tokyo 0 9 * * *", "UTC"},
		{"@hourly", "Local"},
		{"1-59/0 * * * *", "UTC"},
		{"* * * * * * *", "UTC"},
	} {
		f.Add(seed.expr, seed.tz, int64(1_790_000_000))
	}
	f.Fuzz(func(t *testing.T, expr, tz string, unix int64) {
		// Any instant within a few centuries either way.
		from := time.Unix(unix%(1<<33), 0).UTC()
		next, err := Next(expr, tz, from)
		if err != nil {
			return
		}
		if !next.After(from) {
			t.Fatalf("Next(%q, %q, %v) = %v, not after", expr, tz, from, next)
		}
	})
}
