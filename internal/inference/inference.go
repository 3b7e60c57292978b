package inference

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// Kind of request: what the engine is asked to do.
type Kind int

const (
	// Generate completes a prompt.
	Generate Kind = iota + 1
	// Chat answers a list of messages.
	Chat
	// Embed returns one vector per input.
	Embed
)

func (k Kind) String() string {
	switch k {
	case Generate:
		return "generate"
	case Chat:
		return "chat"
	case Embed:
		return "embed"
	default:
		return "unknown"
	}
}

// Message is one chat turn. An assistant turn may hold tool calls instead
// of (or beside) content; a "tool" turn answers one of them.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
	// ToolCalls are the functions the assistant asked to call.
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
	// ToolCallID names the call a "tool" message answers (OpenAI engines
	// match it against ToolCall.ID; Ollama 0.6.5 ignores it).
	ToolCallID string `json:"tool_call_id,omitempty"`
}

// Tool is a function the model may call, in the OpenAI / Ollama schema.
type Tool struct {
	// Type is "function".
	Type     string       `json:"type"`
	Function ToolFunction `json:"function"`
}

// ToolFunction describes a callable function.
type ToolFunction struct {
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	// Parameters is a JSON Schema object, raw.
	Parameters json.RawMessage `json:"parameters,omitempty"`
	// Strict is OpenAI's strict schema adherence; other engines ignore it.
	Strict *bool `json:"strict,omitempty"`
}

// ToolCall is one call the model asked for.
type ToolCall struct {
	// ID identifies the call within the conversation: the engine's, or one
	// sous made up when the engine gives none (Ollama).
	ID       string           `json:"id,omitempty"`
	Type     string           `json:"type,omitempty"` // "function"
	Function ToolCallFunction `json:"function"`
}

// ToolCallFunction is the function and arguments of a call.
type ToolCallFunction struct {
	Name string `json:"name"`
	// Arguments is a JSON object, raw (never the JSON string OpenAI
	// engines send: drivers decode that).
	Arguments json.RawMessage `json:"arguments"`
}

// DoneToolCalls is the done reason of an answer that asks for tool calls,
// whatever the engine called it.
const DoneToolCalls = "tool_calls"

// NewToolCallID returns a random call id, "call_" and 24 characters, for
// engines that give none.
func NewToolCallID() string {
	return "call_" + strings.ToLower(rand.Text()[:24])
}

// ToolArguments turns an engine's arguments into a JSON object: raw JSON
// as it is when it is an object, a string holding a JSON object (OpenAI's
// form) decoded; anything else is kept as a JSON string, so the caller sees
// what the model produced.
func ToolArguments(raw json.RawMessage) json.RawMessage {
	raw = json.RawMessage(bytes.TrimSpace(raw))
	if len(raw) == 0 || string(raw) == "null" {
		return json.RawMessage("{}")
	}
	if raw[0] == '{' && json.Valid(raw) {
		return raw
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		t := bytes.TrimSpace([]byte(s))
		if len(t) == 0 {
			return json.RawMessage("{}")
		}
		if t[0] == '{' && json.Valid(t) {
			return json.RawMessage(t)
		}
		return raw
	}
	b, _ := json.Marshal(string(raw))
	return b
}

// Request is one validated item of work.
type Request struct {
	Kind     Kind
	Model    string
	Prompt   string    // Generate
	System   string    // Generate and Chat
	Messages []Message // Chat
	Input    []string  // Embed
	// Options are engine options (temperature, num_predict, seed, ...),
	// already type-checked by the decoder.
	Options map[string]any
	// Format is the requested output format ("json" or a JSON schema), raw.
	Format json.RawMessage
	// Tools the model may call (Chat only). Nil: none.
	Tools []Tool
	// ToolChoice is "auto", "none", "required" or {"type":"function",
	// "function":{"name":...}}, raw; nil leaves it to the engine.
	ToolChoice json.RawMessage
	// Notes say what the decoder changed in the request (a num_predict
	// capped at the worker's limit); they are echoed in the result.
	// Engines ignore them.
	Notes []string
	// Stream, when set, receives text deltas as the engine produces them,
	// in order, from one goroutine. It must not block for long.
	Stream func(delta string)
	// StreamToolCalls, when set beside Stream, receives tool calls as the
	// engine streams them, from the same goroutine as Stream and in order
	// with the deltas. The final Response holds them all again.
	StreamToolCalls func(calls []ToolCall)
}

// Usage counts tokens.
type Usage struct {
	InputTokens  int `json:"input_tokens"`
	OutputTokens int `json:"output_tokens"`
}

// Response is the engine's answer to one Request.
type Response struct {
	Text       string      // Generate
	Message    *Message    // Chat
	Embeddings [][]float32 // Embed
	DoneReason string
	Usage      Usage
}

// Result pairs a Response with the error that replaced it.
type Result struct {
	Response Response
	Err      error
}

// ErrorKind classifies an engine failure once, so that the settle decision
// is made from the kind alone.
type ErrorKind int

const (
	// Retryable: the engine is down, timed out or answered 5xx. The request
	// is requeued.
	Retryable ErrorKind = iota + 1
	// Overloaded: the engine ran out of memory or answered "too many
	// requests". The batch is retried smaller; the batch ceiling shrinks.
	Overloaded
	// Permanent: the request itself is wrong (unknown model, bad options).
	// Retrying cannot help; it is answered with an error and dead-lettered.
	Permanent
)

func (k ErrorKind) String() string {
	switch k {
	case Retryable:
		return "retryable"
	case Overloaded:
		return "overloaded"
	case Permanent:
		return "permanent"
	default:
		return "unknown"
	}
}

// Error is an engine failure with its class and a short code for results
// and dead-letter headers.
type Error struct {
	Kind ErrorKind
	// Code is machine-readable: "engine_unavailable", "engine_timeout",
	// "model_not_found", "out_of_memory", ...
	Code string
	// Status is the HTTP status the engine answered, 0 when none.
	Status int
	// NotRun is set when the request never reached the engine (the
	// connection was refused): the request cannot be what failed.
	NotRun bool
	Err    error
}

// Error reads as a sentence with the code in brackets, e.g. "the engine
// is unavailable (engine_unavailable): dial tcp ...: connection refused".
func (e *Error) Error() string {
	code := e.Code
	if e.Status != 0 {
		code = fmt.Sprintf("%s, HTTP %d", e.Code, e.Status)
	}
	if e.Err == nil {
		return fmt.Sprintf("%s (%s)", describeCode(e.Code), code)
	}
	return fmt.Sprintf("%s (%s): %v", describeCode(e.Code), code, e.Err)
}

// describeCode says what a code means, for a person reading a result or a
// dead-letter header.
func describeCode(code string) string {
	switch code {
	case "engine_unavailable":
		return "the engine is unavailable"
	case "engine_timeout":
		return "the engine did not answer within SOUS_ENGINE_TIMEOUT"
	case "out_of_memory":
		return "the engine ran out of memory"
	case "engine_busy":
		return "the engine is busy"
	case "model_not_found":
		return "the engine does not have the model"
	case "engine_unauthorized":
		return "the engine refused the credentials; check SOUS_ENGINE_API_KEY"
	case "engine_rejected":
		return "the engine rejected the request"
	case "engine_error", "":
		return "the engine failed"
	}
	return "the engine failed"
}

func (e *Error) Unwrap() error { return e.Err }

// KindOf returns the class of err: the Kind of an *Error in its chain, else
// Retryable (an unknown failure is assumed transient so nothing is lost).
// A nil error has no kind: KindOf(nil) is 0.
func KindOf(err error) ErrorKind {
	if err == nil {
		return 0
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return Retryable
}

// CodeOf returns the Code of an *Error in err's chain, else "engine_error".
func CodeOf(err error) string {
	var e *Error
	if errors.As(err, &e) && e.Code != "" {
		return e.Code
	}
	return "engine_error"
}
