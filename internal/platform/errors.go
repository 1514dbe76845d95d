package platform

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
)

// Error codes. Each maps to exactly one HTTP status in the HTTP adapter; an
// error without a code is internal and is never shown to a client as is.
const (
	ECONFLICT     = "conflict"            // 409: the request conflicts with stored state
	EINTERNAL     = "internal"            // 500: a bug or an unexpected failure
	EINVALID      = "invalid"             // 400: the input is malformed or fails validation
	ENOTFOUND     = "not_found"           // 404: no such thing, or the caller may not see it
	EFORBIDDEN    = "forbidden"           // 403: the caller may see it but not do this
	EUNAUTHORIZED = "unauthorized"        // 401: no or bad credentials
	EPRECONDITION = "precondition_failed" // 412: If-Match did not match the stored version
	ETOOLARGE     = "too_large"           // 413: the body is over the limit
	EMEDIATYPE    = "unsupported_media"   // 415: the Content-Type is not accepted
	ETOOMANY      = "too_many_requests"   // 429: throttled; RetryAfter says when to retry
	EUNAVAILABLE  = "unavailable"         // 503: a dependency is down; retry later
	ENOTALLOWED   = "method_not_allowed"  // 405: the operation is switched off
)

// FieldError names one bad field of an input and says what is wrong with it.
// Field is a dotted path from the input's root: "body.email", "query.page".
type FieldError struct {
	Field   string `json:"field"`
	Message string `json:"message"`
}

// Error is the error type every service returns for a failure a caller is
// meant to see. Message is written for the client; internal detail belongs in
// the wrapped error, which is logged and never shown.
type Error struct {
	Code    string
	Message string
	Fields  []FieldError
	// RetryAfter, in seconds, accompanies ETOOMANY and EUNAVAILABLE.
	RetryAfter int
	// Err is the underlying cause, for logs only.
	Err error
}

func (e *Error) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("%s: %s: %v", e.Code, e.Message, e.Err)
	}
	return fmt.Sprintf("%s: %s", e.Code, e.Message)
}

func (e *Error) Unwrap() error { return e.Err }

// GetHeaders gives the HTTP adapter the Retry-After of a throttled or
// unavailable answer.
func (e *Error) GetHeaders() http.Header {
	if e.RetryAfter <= 0 {
		return nil
	}
	return http.Header{"Retry-After": {strconv.Itoa(e.RetryAfter)}}
}

// Errorf returns an *Error with the code and a client-facing message.
func Errorf(code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Invalid returns an EINVALID error listing every bad field.
func Invalid(message string, fields ...FieldError) *Error {
	return &Error{Code: EINVALID, Message: message, Fields: fields}
}

// ErrorCode returns the code of the first *Error in err's chain, EINTERNAL for
// any other non-nil error, and "" for nil.
func ErrorCode(err error) string {
	var e *Error
	switch {
	case err == nil:
		return ""
	case errors.As(err, &e):
		return e.Code
	default:
		return EINTERNAL
	}
}

// ErrorMessage returns the client-facing message of err: the message of its
// *Error, or "internal error" for anything else.
func ErrorMessage(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Message
	}
	return "internal error"
}
