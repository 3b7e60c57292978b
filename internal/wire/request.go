package wire

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/sous-run/sous/internal/inference"
)

// Request is the body a producer publishes.
type Request struct {
	ID       string              `json:"id,omitempty"`
	Model    string              `json:"model,omitempty"`
	Prompt   *string             `json:"prompt,omitempty"`
	Messages []inference.Message `json:"messages,omitempty"`
	// Input asks for embeddings: a string or a list of strings.
	Input   json.RawMessage `json:"input,omitempty"`
	System  string          `json:"system,omitempty"`
	Options map[string]any  `json:"options,omitempty"`
	// Format is "json" or a JSON schema object.
	Format json.RawMessage `json:"format,omitempty"`
	// Tools the model may call (chat only), in the OpenAI / Ollama
	// function schema; ToolChoice is "auto", "none", "required" or
	// {"type":"function","function":{"name":...}}.
	Tools      []inference.Tool `json:"tools,omitempty"`
	ToolChoice json.RawMessage  `json:"tool_choice,omitempty"`
	Stream     bool             `json:"stream,omitempty"`
	Deadline   *time.Time       `json:"deadline,omitempty"`
}

// Limits bound what a request may ask for. Zero values mean "no limit"
// except where noted.
type Limits struct {
	// MaxBodyBytes bounds the raw body (required, > 0).
	MaxBodyBytes int
	// MaxPromptBytes bounds prompt + system + all message contents + inputs
	// + tools (names, descriptions, parameter schemas, tool_choice) + the
	// tool calls in messages.
	MaxPromptBytes int
	// MaxNumPredict bounds options.num_predict.
	MaxNumPredict int
	// DefaultModel fills in a request without a model.
	DefaultModel string
	// AllowedModels lists the models a request may name; empty means only
	// DefaultModel.
	AllowedModels []string
}

// Decoded is a validated request, ready for the engine. Notes on its Req
// say what the decoder changed (a capped num_predict); results carry them.
type Decoded struct {
	ID       string
	Stream   bool
	Deadline time.Time // zero when none
	Req      inference.Request
}

// BatchKey groups requests that may share one engine call: the same kind,
// model, options, output format, tools (a digest of tools and tool_choice)
// and stream flag. Anything a request adds that an engine would apply to a
// whole call belongs in it. Map keys are marshalled sorted, so equal
// options give equal keys.
func (d *Decoded) BatchKey() string {
	opts, _ := json.Marshal(d.Req.Options)
	return fmt.Sprintf("%s\x00%s\x00%s\x00%s\x00%t\x00%s", d.Req.Kind, d.Req.Model, opts, d.Req.Format, d.Stream, toolsDigest(d.Req))
}

// Reason codes for rejected input; they appear in dead-letter headers and
// error results.
const (
	ReasonBodyTooLarge    = "body_too_large"
	ReasonInvalidUTF8     = "invalid_utf8"
	ReasonInvalidJSON     = "invalid_json"
	ReasonInvalidRequest  = "invalid_request"
	ReasonMissingPrompt   = "missing_prompt"
	ReasonInvalidOption   = "invalid_option"
	ReasonModelNotAllowed = "model_not_allowed"
	ReasonPromptTooLarge  = "prompt_too_large"
	ReasonExpired         = "expired"
	ReasonContentType     = "unsupported_content_type"
)

// InputError says why a request was rejected. Its message is safe to send
// back to the producer: it never echoes the body.
type InputError struct {
	Reason  string
	Message string
}

func (e *InputError) Error() string { return e.Reason + ": " + e.Message }

func inputErr(reason, format string, args ...any) *InputError {
	return &InputError{Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// DecodeRequest validates body and returns the request it carries. fallbackID
// is used when the body has no id (the broker message id). now is compared
// with the request's deadline. A non-nil error is always an *InputError.
//
// With an error, the Decoded returned (when not nil) holds what could be
// read before the request was rejected, at least its ID: the producer's own
// id is echoed in the error result even when the rest of the body is wrong
// (not JSON after the id, a field of the wrong type, a body too large).
func DecodeRequest(body []byte, contentType, fallbackID string, lim Limits, now time.Time) (*Decoded, error) {
	d, err := decodeRequest(body, contentType, fallbackID, lim, now)
	if err != nil && d == nil {
		if id := scanID(body, lim.MaxBodyBytes); id != "" {
			d = &Decoded{ID: id}
		}
	}
	return d, err
}

func decodeRequest(body []byte, contentType, fallbackID string, lim Limits, now time.Time) (*Decoded, error) {
	if lim.MaxBodyBytes > 0 && len(body) > lim.MaxBodyBytes {
		return nil, inputErr(ReasonBodyTooLarge, "body is %d bytes, the limit is %d (SOUS_MAX_BODY_BYTES)", len(body), lim.MaxBodyBytes)
	}
	if ct := strings.TrimSpace(strings.ToLower(strings.SplitN(contentType, ";", 2)[0])); ct != "" && ct != "application/json" && ct != "text/json" {
		return nil, inputErr(ReasonContentType, "content type %q is not supported; send application/json", truncate(ct, 64))
	}
	if !utf8.Valid(body) {
		return nil, inputErr(ReasonInvalidUTF8, "body is not valid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	dec.UseNumber()
	var r Request
	if err := dec.Decode(&r); err != nil {
		return nil, describeJSONError(err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, inputErr(ReasonInvalidJSON, "body holds more than one JSON value, or trailing bytes")
	}
	if strings.ContainsRune(r.ID, 0) || len(r.ID) > 256 {
		return nil, inputErr(ReasonInvalidRequest, "id must be at most 256 bytes and contain no NUL")
	}
	d := &Decoded{ID: r.ID, Stream: r.Stream}
	if d.ID == "" {
		d.ID = fallbackID
	}
	if r.Deadline != nil {
		d.Deadline = *r.Deadline
		if !now.Before(d.Deadline) {
			return d, inputErr(ReasonExpired, "deadline %s has passed", d.Deadline.Format(time.RFC3339))
		}
	}
	model := r.Model
	if model == "" {
		model = lim.DefaultModel
	}
	if model == "" {
		return d, inputErr(ReasonInvalidRequest, "no model: set \"model\" in the request or SOUS_MODEL on the worker")
	}
	allowed := lim.AllowedModels
	if len(allowed) == 0 {
		allowed = []string{lim.DefaultModel}
	}
	if !slices.Contains(allowed, model) {
		return d, inputErr(ReasonModelNotAllowed, "model %q is not allowed on this worker (SOUS_MODELS_ALLOWED)", truncate(model, 128))
	}
	req := inference.Request{Model: model, System: r.System}
	kinds := 0
	if r.Prompt != nil {
		kinds++
		req.Kind, req.Prompt = inference.Generate, *r.Prompt
	}
	if r.Messages != nil {
		kinds++
		req.Kind, req.Messages = inference.Chat, r.Messages
	}
	if len(r.Input) > 0 {
		kinds++
		in, err := decodeInput(r.Input)
		if err != nil {
			return d, err
		}
		req.Kind, req.Input = inference.Embed, in
	}
	switch {
	case kinds == 0:
		return d, inputErr(ReasonMissingPrompt, "request has none of \"prompt\", \"messages\" or \"input\"")
	case kinds > 1:
		return d, inputErr(ReasonInvalidRequest, "request must have exactly one of \"prompt\", \"messages\" or \"input\"")
	}
	if err := checkContent(req); err != nil {
		return d, err
	}
	if req.Kind == inference.Embed && r.Stream {
		return d, inputErr(ReasonInvalidRequest, "embedding requests cannot be streamed")
	}
	size := len(req.Prompt) + len(req.System)
	for _, m := range req.Messages {
		size += len(m.Content)
	}
	for _, s := range req.Input {
		size += len(s)
	}
	toolBytes, terr := checkTools(&r, &req)
	if terr != nil {
		return d, terr
	}
	size += toolBytes
	if lim.MaxPromptBytes > 0 && size > lim.MaxPromptBytes {
		return d, inputErr(ReasonPromptTooLarge, "prompt is %d bytes, the limit is %d (SOUS_MAX_PROMPT_BYTES)", size, lim.MaxPromptBytes)
	}
	opts, notes, err := checkOptions(r.Options, lim)
	if err != nil {
		return d, err
	}
	req.Options, req.Notes = opts, notes
	if len(r.Format) > 0 {
		if err := checkFormat(r.Format); err != nil {
			return d, err
		}
		req.Format = r.Format
	}
	d.Req = req
	return d, nil
}

var validRoles = []string{"system", "user", "assistant", "tool"}

func checkContent(req inference.Request) *InputError {
	switch req.Kind {
	case inference.Generate:
		if strings.TrimSpace(req.Prompt) == "" {
			return inputErr(ReasonMissingPrompt, "\"prompt\" is empty")
		}
	case inference.Chat:
		if len(req.Messages) == 0 {
			return inputErr(ReasonMissingPrompt, "\"messages\" is empty")
		}
		for i, m := range req.Messages {
			if !slices.Contains(validRoles, m.Role) {
				return inputErr(ReasonInvalidRequest, "messages[%d].role must be one of %s", i, strings.Join(validRoles, ", "))
			}
		}
	case inference.Embed:
		if len(req.Input) == 0 {
			return inputErr(ReasonMissingPrompt, "\"input\" is empty")
		}
	}
	return nil
}

func decodeInput(raw json.RawMessage) ([]string, *InputError) {
	var one string
	if err := json.Unmarshal(raw, &one); err == nil {
		return []string{one}, nil
	}
	var many []string
	if err := json.Unmarshal(raw, &many); err != nil {
		return nil, inputErr(ReasonInvalidRequest, "\"input\" must be a string or a list of strings")
	}
	return many, nil
}

func checkFormat(raw json.RawMessage) *InputError {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		if s != "json" {
			return inputErr(ReasonInvalidRequest, "\"format\" must be \"json\" or a JSON schema object")
		}
		return nil
	}
	var obj map[string]any
	if err := json.Unmarshal(raw, &obj); err != nil {
		return inputErr(ReasonInvalidRequest, "\"format\" must be \"json\" or a JSON schema object")
	}
	return nil
}

func describeJSONError(err error) *InputError {
	var typeErr *json.UnmarshalTypeError
	if errors.As(err, &typeErr) {
		if typeErr.Field == "" {
			return inputErr(ReasonInvalidRequest, "the body must be a JSON object such as {\"prompt\": \"Why is the sky blue?\"}, not a JSON %s", typeErr.Value)
		}
		return inputErr(ReasonInvalidRequest, "field %q must be %s, not a JSON %s; see docs/messages.md", truncate(typeErr.Field, 80), describeType(typeErr.Type), typeErr.Value)
	}
	var timeErr *time.ParseError
	if errors.As(err, &timeErr) {
		return inputErr(ReasonInvalidRequest, "\"deadline\" must be an RFC 3339 time such as 2026-01-02T15:04:05Z")
	}
	var synErr *json.SyntaxError
	if errors.As(err, &synErr) {
		return inputErr(ReasonInvalidJSON, "body is not JSON: %s at offset %d", synErr.Error(), synErr.Offset)
	}
	msg := err.Error()
	if strings.HasPrefix(msg, "json: unknown field ") {
		return inputErr(ReasonInvalidRequest, "unknown field %s; see docs/messages.md", truncate(strings.TrimPrefix(msg, "json: unknown field "), 80))
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return inputErr(ReasonInvalidJSON, "body is empty or truncated")
	}
	return inputErr(ReasonInvalidJSON, "body is not a JSON request object: %s", truncate(msg, 120))
}

// describeType names a Go type the way a producer writing JSON thinks of it.
func describeType(t reflect.Type) string {
	switch t {
	case reflect.TypeFor[time.Time]():
		return "an RFC 3339 time string"
	case reflect.TypeFor[json.RawMessage]():
		return "a JSON value"
	}
	switch t.Kind() {
	case reflect.Pointer:
		return describeType(t.Elem())
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a whole number"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Slice, reflect.Array:
		return "a list of " + strings.TrimPrefix(strings.TrimPrefix(describeType(t.Elem()), "a "), "an ") + "s"
	case reflect.Map, reflect.Struct:
		return "an object"
	}
	return "a different JSON type"
}

// maxScannedID bounds the id scanID returns, as DecodeRequest bounds ids.
const maxScannedID = 256

// maxIDScan bounds the bytes scanID reads of a body too large to decode.
const maxIDScan = 64 << 10

// scanID is a best-effort read of the top-level "id" string of a body that
// failed to decode, so that the error result still carries the producer's
// id. It reads tokens until the JSON breaks, at most limit bytes (or 64 KiB
// when limit is not set or larger), and never recurses. "" when no usable id
// (a string of 1 to 256 bytes without NUL) came before the break.
func scanID(body []byte, limit int) string {
	if limit <= 0 || limit > maxIDScan {
		limit = maxIDScan
	}
	if len(body) > limit {
		body = body[:limit]
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	tok, err := dec.Token()
	if err != nil || tok != json.Delim('{') {
		return ""
	}
	id := ""
	depth := 1
	key := true // at depth 1, the next string token is a key
	idNext := false
	for depth > 0 {
		tok, err := dec.Token()
		if err != nil {
			return id
		}
		switch v := tok.(type) {
		case json.Delim:
			switch v {
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 1 {
					key = true
				}
			}
			idNext = false
			continue
		case string:
			if depth == 1 && key {
				idNext = strings.EqualFold(v, "id") // as encoding/json matches field names
				key = false
				continue
			}
			if depth == 1 && idNext && v != "" && len(v) <= maxScannedID && !strings.ContainsRune(v, 0) {
				id = v
			}
		}
		if depth == 1 {
			key, idNext = true, false
		}
	}
	return id
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}
