package ollama

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/ollama/ollama/api"

	"github.com/sous-run/sous/internal/inference"
)

// chatRequest is /api/chat's body. It is the api package's ChatRequest
// with tools and tool call arguments kept raw: api.Tool decodes a schema
// into a fixed struct that drops what it does not know (anyOf, items,
// nested objects), and sous passes schemas on as the producer wrote them.
type chatRequest struct {
	Model     string           `json:"model"`
	Messages  []chatMessage    `json:"messages"`
	Tools     []inference.Tool `json:"tools,omitempty"`
	Format    json.RawMessage  `json:"format,omitempty"`
	Options   map[string]any   `json:"options,omitempty"`
	Stream    *bool            `json:"stream,omitempty"`
	KeepAlive *api.Duration    `json:"keep_alive,omitempty"`
}

type chatMessage struct {
	Role      string         `json:"role"`
	Content   string         `json:"content"`
	ToolCalls []chatToolCall `json:"tool_calls,omitempty"`
	// ToolName names the function a tool message answers (newer Ollama
	// templates use it; 0.6.5 ignores it).
	ToolName   string `json:"tool_name,omitempty"`
	ToolCallID string `json:"tool_call_id,omitempty"`
}

type chatToolCall struct {
	ID       string `json:"id,omitempty"`
	Function struct {
		Index     int             `json:"index,omitempty"`
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	} `json:"function"`
}

// chatLine is one NDJSON line of /api/chat's answer.
type chatLine struct {
	Message struct {
		Content   string         `json:"content"`
		ToolCalls []chatToolCall `json:"tool_calls"`
	} `json:"message"`
	Done            bool   `json:"done"`
	DoneReason      string `json:"done_reason"`
	PromptEvalCount int    `json:"prompt_eval_count"`
	EvalCount       int    `json:"eval_count"`
}

// errToolChoice: Ollama has no tool_choice, and sous does not pretend.
var errToolChoice = errors.New(`Ollama cannot force or name a tool call: send "tool_choice" "auto" or "none", or none at all, or use an OpenAI engine`)

func newChatRequest(r inference.Request, stream bool, keepAlive *api.Duration) (*chatRequest, error) {
	req := &chatRequest{Model: r.Model, Format: r.Format, Options: r.Options, Stream: &stream, KeepAlive: keepAlive, Tools: r.Tools}
	if len(r.ToolChoice) > 0 {
		var choice string
		_ = json.Unmarshal(r.ToolChoice, &choice)
		switch choice {
		case "auto":
		case "none":
			req.Tools = nil // the model cannot call what it is not offered
		default:
			return nil, &inference.Error{Kind: inference.Permanent, Code: "engine_rejected", Err: errToolChoice}
		}
	}
	if r.System != "" {
		req.Messages = append(req.Messages, chatMessage{Role: "system", Content: r.System})
	}
	names := map[string]string{} // call id → function
	for _, m := range r.Messages {
		cm := chatMessage{Role: m.Role, Content: m.Content, ToolCallID: m.ToolCallID}
		for _, c := range m.ToolCalls {
			var tc chatToolCall
			tc.ID = c.ID
			tc.Function.Name = c.Function.Name
			tc.Function.Arguments = c.Function.Arguments
			cm.ToolCalls = append(cm.ToolCalls, tc)
			if c.ID != "" {
				names[c.ID] = c.Function.Name
			}
		}
		if m.Role == "tool" {
			cm.ToolName = names[m.ToolCallID]
		}
		req.Messages = append(req.Messages, cm)
	}
	return req, nil
}

// toolCalls converts the calls of one answer line.
func toolCalls(in []chatToolCall) []inference.ToolCall {
	out := make([]inference.ToolCall, len(in))
	for i, c := range in {
		id := c.ID
		if id == "" {
			id = inference.NewToolCallID()
		}
		out[i] = inference.ToolCall{ID: id, Type: "function", Function: inference.ToolCallFunction{
			Name: c.Function.Name, Arguments: inference.ToolArguments(c.Function.Arguments),
		}}
	}
	return out
}

// chat runs one chat request. Ollama (0.6.5) sends a tool call as one
// line with "tool_calls" and empty content: streamed, that line comes
// before the final one; not streamed, the one line holds both.
func (e *Engine) chat(ctx context.Context, r inference.Request) (inference.Response, bool, error) {
	stream := r.Stream != nil
	req, err := newChatRequest(r, stream, e.keepAlive)
	if err != nil {
		return inference.Response{}, false, err
	}
	var resp inference.Response
	var text []byte
	var calls []inference.ToolCall
	done := false
	err = e.stream(ctx, "/api/chat", req, func(line []byte) error {
		var cl chatLine
		if err := json.Unmarshal(line, &cl); err != nil {
			return inference.Classify(0, "", fmt.Errorf("ollama: decode a chat line: %w", err))
		}
		if stream && cl.Message.Content != "" {
			r.Stream(cl.Message.Content)
		}
		text = append(text, cl.Message.Content...)
		if len(cl.Message.ToolCalls) > 0 {
			tc := toolCalls(cl.Message.ToolCalls)
			if stream && r.StreamToolCalls != nil {
				r.StreamToolCalls(tc)
			}
			calls = append(calls, tc...)
		}
		if cl.Done {
			done = true
			resp.DoneReason = cl.DoneReason
			resp.Usage = inference.Usage{InputTokens: cl.PromptEvalCount, OutputTokens: cl.EvalCount}
		}
		return nil
	})
	resp.Message = &inference.Message{Role: "assistant", Content: string(text), ToolCalls: calls}
	if len(calls) > 0 {
		resp.DoneReason = inference.DoneToolCalls
	}
	return resp, done, err
}
