package tasks

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// TypeSleep waits, reporting progress at every step, and stops at once
// when cancelled.
const TypeSleep = "agent:sleep"

// SleepPayload is the payload of agent:sleep.
type SleepPayload struct {
	// Milliseconds to wait in all (at most one hour; none when absent).
	Milliseconds int `json:"milliseconds,omitempty" minimum:"0" maximum:"3600000" doc:"How long to wait in all (at most one hour)."`
	// Steps is how many progress reports to make (default 10).
	Steps int `json:"steps,omitempty" minimum:"0" maximum:"1000" doc:"How many progress reports to make (default 10)."`
}

// Validate bounds the wait.
func (p *SleepPayload) Validate() error {
	if p.Milliseconds < 0 || p.Milliseconds > 3_600_000 {
		return errors.New("milliseconds: between 0 and 3600000")
	}
	if p.Steps < 0 || p.Steps > 1000 {
		return errors.New("steps: between 0 and 1000")
	}
	return nil
}

// NewSleepCommand is the dispatch body of a sleep.
func NewSleepCommand(d time.Duration, steps int) Command {
	return Command{Task: TypeSleep, Payload: SleepPayload{Milliseconds: int(d.Milliseconds()), Steps: steps}}
}

// HandleSleep waits in steps.
func HandleSleep(ctx context.Context, run *Run, p SleepPayload) (any, error) {
	steps := p.Steps
	if steps == 0 {
		steps = 10
	}
	step := time.Duration(p.Milliseconds) * time.Millisecond / time.Duration(steps)
	t := time.NewTimer(step)
	defer t.Stop()
	for i := 1; i <= steps; i++ {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-t.C:
		}
		run.Progress.Report(i*100/steps, fmt.Sprintf("step %d of %d", i, steps))
		t.Reset(step)
	}
	return map[string]any{"slept_ms": p.Milliseconds}, nil
}

func init() {
	Register(Task[SleepPayload]{
		Type:        TypeSleep,
		Description: "Waits milliseconds in steps, reporting progress at each; stops at once when cancelled.",
		MaxRetries:  1,
		Timeout:     time.Hour + time.Minute,
		Handle:      HandleSleep,
	})
}
