package gateway

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/sous-run/sous/internal/wire"
)

// apiError is an error in OpenAI's shape:
// {"error":{"message","type","param","code"}}. Message never holds a key,
// a prompt or a broker URL.
type apiError struct {
	Status     int
	Type       string
	Code       string
	Param      string
	Message    string
	RetryAfter time.Duration // 429 and 503: sent as Retry-After, in seconds
}

func (e *apiError) Error() string { return e.Message }

type errorBody struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
}

func (e *apiError) body() errorBody {
	d := errorDetail{Message: e.Message, Type: e.Type}
	if e.Param != "" {
		d.Param = &e.Param
	}
	if e.Code != "" {
		d.Code = &e.Code
	}
	return errorBody{Error: d}
}

func writeError(w http.ResponseWriter, e *apiError) {
	if e.RetryAfter > 0 {
		secs := int((e.RetryAfter + time.Second - 1) / time.Second)
		w.Header().Set("Retry-After", strconv.Itoa(secs))
	}
	writeJSON(w, e.Status, e.body())
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

func errUnauthorized() *apiError {
	return &apiError{Status: 401, Type: "invalid_request_error", Code: "invalid_api_key",
		Message: "missing or incorrect API key: send it as \"Authorization: Bearer <key>\""}
}

func errModelNotFound(model string) *apiError {
	return &apiError{Status: 404, Type: "invalid_request_error", Code: "model_not_found", Param: "model",
		Message: "the model `" + truncate(model, 128) + "` does not exist or you do not have access to it; GET /v1/models lists the models you may use"}
}

func errLanesNotConfigured() *apiError {
	return &apiError{Status: 400, Type: "invalid_request_error", Code: "lanes_not_configured",
		Message: "this gateway has no lanes (SOUS_GATEWAY_LANES is not set): send no " + LaneHeader + " header"}
}

func errUnknownLane(name string, known []string) *apiError {
	return &apiError{Status: 400, Type: "invalid_request_error", Code: "unknown_lane",
		Message: "the lane `" + truncate(name, 64) + "` (" + LaneHeader + ") does not exist; this gateway's lanes are " + strings.Join(known, ", ")}
}

func errLaneNotAllowed(name string, allowed []string) *apiError {
	return &apiError{Status: 403, Type: "invalid_request_error", Code: "lane_not_allowed",
		Message: "this API key may not use the lane `" + name + "` (" + LaneHeader + "); it may use " + strings.Join(allowed, ", ")}
}

func errRateLimited(wait time.Duration) *apiError {
	return &apiError{Status: 429, Type: "requests", Code: "rate_limit_exceeded", RetryAfter: wait,
		Message: "rate limit reached for this API key; retry after the Retry-After header's seconds"}
}

func errQueueFull(wait time.Duration) *apiError {
	return &apiError{Status: 429, Type: "requests", Code: "queue_full", RetryAfter: wait,
		Message: "the request queue is full: workers are busy or still scaling up; retry after the Retry-After header's seconds"}
}

func errTooManyOpen(wait time.Duration) *apiError {
	return &apiError{Status: 429, Type: "requests", Code: "too_many_open_requests", RetryAfter: wait,
		Message: "this gateway holds as many open requests as it may (SOUS_GATEWAY_MAX_OPEN); retry shortly"}
}

func errIntakeFull(wait time.Duration) *apiError {
	return &apiError{Status: 429, Type: "requests", Code: "too_many_open_requests", RetryAfter: wait,
		Message: "this gateway reads as many request bodies at once as it may (SOUS_GATEWAY_MAX_INTAKE); retry shortly"}
}

func errUnavailable(msg string) *apiError {
	return &apiError{Status: 503, Type: "server_error", Code: "service_unavailable", RetryAfter: time.Second, Message: msg}
}

func errTimeout(d time.Duration) *apiError {
	return &apiError{Status: 504, Type: "server_error", Code: "timeout",
		Message: "no answer within " + d.String() + " (SOUS_GATEWAY_TIMEOUT): the request expires and workers skip it; are workers running?"}
}

func errBodyTimeout(d time.Duration) *apiError {
	return &apiError{Status: 408, Type: "invalid_request_error", Code: "body_timeout",
		Message: "the request body did not arrive within " + d.String() + " (SOUS_GATEWAY_BODY_TIMEOUT)"}
}

func errBodyTooLarge(limit int) *apiError {
	return &apiError{Status: 413, Type: "invalid_request_error", Code: "body_too_large",
		Message: "the body is larger than " + strconv.Itoa(limit) + " bytes (SOUS_MAX_BODY_BYTES)"}
}

// fromInputError maps sous's decoder verdict to OpenAI's statuses.
func fromInputError(ie *wire.InputError, model string) *apiError {
	switch ie.Reason {
	case wire.ReasonModelNotAllowed:
		return errModelNotFound(model)
	case wire.ReasonPromptTooLarge, wire.ReasonBodyTooLarge:
		return &apiError{Status: 400, Type: "invalid_request_error", Code: "context_length_exceeded", Message: ie.Message}
	}
	return &apiError{Status: 400, Type: "invalid_request_error", Code: ie.Reason, Message: ie.Message}
}

// fromResult maps an error result from a worker. The worker's message
// may come from the engine (host names, paths, stack lines): clients get
// a sentence and the request id; the message stays in the gateway's log
// and trace (see answer.decodeResult).
func fromResult(e *wire.ErrorInfo, model, id string) *apiError {
	ref := " (request id " + id + "; the gateway's log and trace have the details)"
	switch e.Code {
	case wire.ReasonModelNotAllowed, "model_not_found":
		return errModelNotFound(model)
	case wire.ReasonExpired:
		return &apiError{Status: 504, Type: "server_error", Code: "timeout", Message: "the request expired before a worker started it" + ref}
	case "engine_rejected":
		return &apiError{Status: 400, Type: "invalid_request_error", Code: e.Code, Message: "the inference engine rejected the request" + ref}
	case wire.ReasonInvalidJSON, wire.ReasonInvalidUTF8, wire.ReasonInvalidRequest, wire.ReasonMissingPrompt,
		wire.ReasonInvalidOption, wire.ReasonContentType, wire.ReasonBodyTooLarge, wire.ReasonPromptTooLarge:
		// sous's own decoder said so: its message names the parameter.
		return &apiError{Status: 400, Type: "invalid_request_error", Code: e.Code, Message: e.Message}
	}
	return &apiError{Status: 502, Type: "server_error", Code: e.Code, Message: "the inference engine failed" + ref}
}
