package tasks

import (
	"context"
	"errors"
)

// TypeEcho answers its message back: the smallest useful task, for
// checking an agent end to end.
const TypeEcho = "agent:echo"

// EchoPayload is the payload of agent:echo.
type EchoPayload struct {
	Message string `json:"message,omitempty" doc:"What to echo back (at most 64 KiB of UTF-8)."`
	// Fail makes the attempt fail with this error (for trying retries).
	Fail string `json:"fail,omitempty" doc:"Make the attempt fail with this error (for trying retries)."`
}

// Validate limits the message size.
func (p *EchoPayload) Validate() error {
	if len(p.Message) > 64<<10 {
		return errors.New("message: at most 64 KiB")
	}
	return nil
}

// EchoResult is what agent:echo returns.
type EchoResult struct {
	Message string `json:"message"`
	Agent   string `json:"agent"`
	Attempt int    `json:"attempt"`
}

// NewEchoCommand is the dispatch body of an echo.
func NewEchoCommand(message string) Command {
	return Command{Task: TypeEcho, Payload: EchoPayload{Message: message}}
}

// HandleEcho returns the message.
func HandleEcho(ctx context.Context, run *Run, p EchoPayload) (any, error) {
	if p.Fail != "" {
		return nil, errors.New(p.Fail)
	}
	run.Progress.Report(100, "echoed")
	return EchoResult{Message: p.Message, Agent: run.AgentID, Attempt: run.Attempt}, nil
}

func init() {
	Register(Task[EchoPayload]{
		Type:        TypeEcho,
		Description: "Returns its message. With fail set, the attempt fails with that error (to see retries).",
		MaxRetries:  3,
		Handle:      HandleEcho,
	})
}
