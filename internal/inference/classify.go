package inference

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
)

// Classify turns a failed engine call into an *Error. status is the HTTP
// status the engine answered (0 when the call failed before an answer) and
// msg its error text. Engine drivers share it so every engine is classified
// the same way.
func Classify(status int, msg string, err error) *Error {
	lower := strings.ToLower(msg)
	switch {
	case status == 0 && errors.Is(err, context.DeadlineExceeded):
		return &Error{Kind: Retryable, Code: "engine_timeout", Err: err}
	case status == 0 && errors.Is(err, context.Canceled):
		return &Error{Kind: Retryable, Code: "canceled", Err: err}
	case status == 0:
		var nerr net.Error
		if errors.As(err, &nerr) && nerr.Timeout() {
			return &Error{Kind: Retryable, Code: "engine_timeout", Err: err}
		}
		var oerr *net.OpError
		notRun := errors.As(err, &oerr) && oerr.Op == "dial"
		return &Error{Kind: Retryable, Code: "engine_unavailable", NotRun: notRun, Err: err}
	case strings.Contains(lower, "out of memory") || strings.Contains(lower, "requires more system memory") ||
		strings.Contains(lower, "cuda error") && strings.Contains(lower, "memory"):
		return &Error{Kind: Overloaded, Code: "out_of_memory", Status: status, Err: err}
	case status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable && strings.Contains(lower, "busy"):
		return &Error{Kind: Overloaded, Code: "engine_busy", Status: status, Err: err}
	case status == http.StatusNotFound:
		return &Error{Kind: Permanent, Code: "model_not_found", Status: status, Err: err}
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		// A configuration problem, not the request's: retry so nothing is
		// lost while an operator fixes the key.
		return &Error{Kind: Retryable, Code: "engine_unauthorized", Status: status, Err: err}
	case status >= 400 && status < 500:
		return &Error{Kind: Permanent, Code: "engine_rejected", Status: status, Err: err}
	default:
		return &Error{Kind: Retryable, Code: "engine_error", Status: status, Err: err}
	}
}

// Recover turns a panic in an engine driver's per-request goroutine (a
// stream callback, say) into a retryable error in *err, so one request's
// panic does not take the process down. Use it deferred.
func Recover(err *error) {
	if p := recover(); p != nil {
		*err = &Error{Kind: Retryable, Code: "internal_error", Err: fmt.Errorf("panic: %v", p)}
	}
}
