package tasks

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
)

// TypeHTTPRequest sends one HTTP request and returns the answer.
const TypeHTTPRequest = "http:request"

// HTTPRequestPayload is the payload of http:request.
type HTTPRequestPayload struct {
	Method  string            `json:"method,omitempty" enum:"GET,HEAD,POST,PUT,PATCH,DELETE" doc:"The method (default GET)."`
	URL     string            `json:"url" doc:"An http or https URL; private, loopback and link-local addresses are refused unless allowlisted."`
	Headers map[string]string `json:"headers,omitempty" doc:"Request headers."`
	Body    string            `json:"body,omitempty" doc:"The request body."`
}

// Validate checks the URL and method.
func (p *HTTPRequestPayload) Validate() error {
	if p.Method == "" {
		p.Method = http.MethodGet
	}
	switch p.Method {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete:
	default:
		return fmt.Errorf("method: %q is not one of GET, HEAD, POST, PUT, PATCH, DELETE", p.Method)
	}
	for name, value := range p.Headers {
		if !httpguts.ValidHeaderFieldName(name) {
			return fmt.Errorf("headers: %q is not a valid header name", name)
		}
		if !httpguts.ValidHeaderFieldValue(value) {
			return fmt.Errorf("headers: the value of %s has a character headers may not carry (such as a line break)", name)
		}
	}
	return checkURL(p.URL)
}

func checkURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return errors.New("url: must be an absolute http or https URL")
	}
	if u.User != nil {
		return errors.New("url: must not carry credentials")
	}
	return nil
}

// HTTPResponse is what http:request returns.
type HTTPResponse struct {
	Status    int               `json:"status"`
	Headers   map[string]string `json:"headers"`
	Body      string            `json:"body"`
	Truncated bool              `json:"truncated"`
}

// NewHTTPRequestCommand is the dispatch body of an HTTP request.
func NewHTTPRequestCommand(method, url string) Command {
	return Command{Task: TypeHTTPRequest, Payload: HTTPRequestPayload{Method: method, URL: url}}
}

// HandleHTTPRequest sends the request through the worker's egress policy.
func HandleHTTPRequest(ctx context.Context, run *Run, p HTTPRequestPayload) (any, error) {
	req, err := http.NewRequestWithContext(ctx, p.Method, p.URL, strings.NewReader(p.Body))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadPayload, err)
	}
	for k, v := range p.Headers {
		req.Header.Set(k, v)
	}
	run.Progress.Report(10, "sending "+p.Method+" "+req.URL.Redacted())
	res, err := run.Egress.Client().Do(req)
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	body, truncated, err := readLimited(res.Body, run.Egress.MaxBytes())
	if err != nil {
		return nil, err
	}
	headers := map[string]string{}
	for k := range res.Header {
		headers[k] = res.Header.Get(k)
	}
	return HTTPResponse{Status: res.StatusCode, Headers: headers, Body: string(body), Truncated: truncated}, nil
}

// readLimited reads at most max bytes, reporting whether there was more.
func readLimited(r io.Reader, max int64) ([]byte, bool, error) {
	data, err := io.ReadAll(io.LimitReader(r, max+1))
	if err != nil {
		return nil, false, err
	}
	if int64(len(data)) > max {
		return data[:max], true, nil
	}
	return data, false, nil
}

func init() {
	Register(Task[HTTPRequestPayload]{
		Type:        TypeHTTPRequest,
		Description: "Sends one HTTP request and returns status, headers and body. Private, loopback and link-local addresses are refused unless allowlisted; redirects are re-checked; size and time are limited.",
		MaxRetries:  2,
		Timeout:     time.Minute,
		Handle:      HandleHTTPRequest,
	})
}
