package sqlq

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"net"
	"syscall"

	"github.com/lib/pq"

	"github.com/agentry/agentry/internal/platform"
)

// MapError turns a database error into the platform error a client should
// see: a unique violation is ECONFLICT, a foreign key or check violation is
// EINVALID, sql.ErrNoRows is ENOTFOUND (with notFound as its message). Any
// other error is returned unchanged (internal, or unavailable when
// IsUnavailable says so).
func MapError(err error, notFound string) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, sql.ErrNoRows) {
		return &platform.Error{Code: platform.ENOTFOUND, Message: notFound, Err: err}
	}
	var pqErr *pq.Error
	if errors.As(err, &pqErr) {
		switch pqErr.Code.Name() {
		case "unique_violation":
			return &platform.Error{Code: platform.ECONFLICT, Message: "a resource with the same unique fields already exists", Err: err}
		case "foreign_key_violation":
			return &platform.Error{Code: platform.EINVALID, Message: "a referenced resource does not exist", Err: err}
		case "check_violation", "not_null_violation":
			return &platform.Error{Code: platform.EINVALID, Message: "a value is out of range or malformed", Err: err}
		case "serialization_failure", "deadlock_detected", "lock_not_available":
			return &platform.Error{Code: platform.ECONFLICT, Message: "a concurrent change conflicted with this one; retry", Err: err}
		case "query_canceled":
			return &platform.Error{Code: platform.EUNAVAILABLE, Message: "the database took too long; retry", RetryAfter: 1, Err: err}
		}
		if bad := BadInput(err); bad != nil {
			return bad
		}
	}
	return err
}

// BadInput returns the EINVALID error a client should see for a database
// error caused by the data it sent (PostgreSQL's class 22, data exception:
// a NUL character, a malformed value, a number out of range), or nil for
// any other error.
func BadInput(err error) error {
	var pqErr *pq.Error
	if !errors.As(err, &pqErr) || pqErr.Code.Class() != "22" {
		return nil
	}
	msg := "a value is out of range or malformed"
	switch pqErr.Code.Name() {
	case "character_not_in_repertoire", "untranslatable_character":
		msg = "text may not contain the NUL character (\\u0000)"
	case "string_data_right_truncation":
		msg = "a value is too long"
	}
	return &platform.Error{Code: platform.EINVALID, Message: msg, Err: err}
}

// IsUnavailable reports whether err means the database (or another
// dependency reached over the network) could not be reached, as opposed to a
// bug: the answer is then 503 and the client may retry.
func IsUnavailable(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, driver.ErrBadConn) || errors.Is(err, sql.ErrConnDone) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		return true
	}
	var netErr net.Error
	if errors.As(err, &netErr) {
		return true
	}
	var opErr *net.OpError
	if errors.As(err, &opErr) {
		return true
	}
	var pqErr *pq.Error
	if errors.As(err, &pqErr) {
		switch pqErr.Code.Class() {
		case "08", "57": // connection exception, operator intervention (shutdown)
			return true
		}
		if pqErr.Code.Name() == "too_many_connections" || pqErr.Code.Name() == "cannot_connect_now" {
			return true
		}
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	return false
}
