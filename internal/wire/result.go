package wire

import (
	"encoding/json"

	"github.com/sous-run/sous/internal/inference"
)

// Result statuses.
const (
	StatusOK    = "ok"
	StatusError = "error"
)

// Result is the body sous publishes for every request it settles with an
// answer: a response, or an error that says what went wrong.
type Result struct {
	ID         string             `json:"id"`
	Status     string             `json:"status"`
	Model      string             `json:"model,omitempty"`
	Response   *string            `json:"response,omitempty"`
	Message    *inference.Message `json:"message,omitempty"`
	Embeddings [][]float32        `json:"embeddings,omitempty"`
	DoneReason string             `json:"done_reason,omitempty"`
	Usage      *inference.Usage   `json:"usage,omitempty"`
	Timing     Timing             `json:"timing"`
	Batch      *BatchInfo         `json:"batch,omitempty"`
	Worker     string             `json:"worker"`
	// Lane is the lane the request came in on (SOUS_LANES); empty for a
	// worker without lanes.
	Lane    string     `json:"lane,omitempty"`
	Attempt int        `json:"attempt,omitempty"`
	Error   *ErrorInfo `json:"error,omitempty"`
	// Notes say what the worker changed in the request to run it, such as
	// a num_predict capped at SOUS_MAX_NUM_PREDICT.
	Notes []string `json:"notes,omitempty"`
	// Done is set on streamed requests: the final message of a stream.
	Done *bool `json:"done,omitempty"`
}

// Timing is in milliseconds.
type Timing struct {
	QueueMS     int64 `json:"queue_ms"`
	BatchWaitMS int64 `json:"batch_wait_ms"`
	InferenceMS int64 `json:"inference_ms"`
}

// BatchInfo names the batch a request ran in.
type BatchInfo struct {
	ID   string `json:"id"`
	Size int    `json:"size"`
}

// ErrorInfo is the error part of a result. Message never holds secrets or
// the request body.
type ErrorInfo struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Chunk is one piece of a streamed response.
type Chunk struct {
	ID    string `json:"id"`
	Seq   int    `json:"seq"`
	Delta string `json:"delta"`
	Done  bool   `json:"done"`
	// Restart is set on the first chunk of a stream that replaces an earlier,
	// interrupted one for the same request: the consumer discards what it
	// has and starts again.
	Restart bool `json:"restart,omitempty"`
	// ToolCalls are tool calls the engine streamed (whole calls, as in the
	// result's message.tool_calls).
	ToolCalls []inference.ToolCall `json:"tool_calls,omitempty"`
	Attempt   int                  `json:"attempt"`
}

// OKResult builds the result of a successful engine call.
func OKResult(id string, req inference.Request, resp inference.Response) Result {
	r := Result{ID: id, Status: StatusOK, Model: req.Model, DoneReason: resp.DoneReason, Notes: req.Notes}
	u := resp.Usage
	r.Usage = &u
	switch req.Kind {
	case inference.Chat:
		m := inference.Message{Role: "assistant"}
		if resp.Message != nil {
			m = *resp.Message
		}
		if len(m.ToolCalls) > 0 {
			// The same shape from every engine: an id and a type on each
			// call, arguments a JSON object, done_reason "tool_calls".
			calls := make([]inference.ToolCall, len(m.ToolCalls))
			for i, c := range m.ToolCalls {
				if c.ID == "" {
					c.ID = inference.NewToolCallID()
				}
				c.Type = "function"
				c.Function.Arguments = inference.ToolArguments(c.Function.Arguments)
				calls[i] = c
			}
			m.ToolCalls = calls
			r.DoneReason = inference.DoneToolCalls
		}
		r.Message = &m
	case inference.Embed:
		r.Embeddings = resp.Embeddings
		if r.Embeddings == nil {
			r.Embeddings = [][]float32{}
		}
	default:
		text := resp.Text
		r.Response = &text
	}
	return r
}

// ErrorResult builds an error result.
func ErrorResult(id, model, code, message string) Result {
	return Result{ID: id, Status: StatusError, Model: model, Error: &ErrorInfo{Code: code, Message: message}}
}

// Marshal encodes v as JSON. Results are plain data, so it cannot fail for
// them; the error is returned for completeness.
func Marshal(v any) ([]byte, error) { return json.Marshal(v) }
