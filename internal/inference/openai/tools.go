package openai

import (
	"encoding/json"
	"sort"

	"github.com/sous-run/sous/internal/inference"
)

// message is a chat message as OpenAI takes it. Content is null on an
// assistant message that only calls tools: Ollama's /v1 (0.6.5) drops the
// tool calls of a message whose content is a string, even "".
type message struct {
	Role       string     `json:"role"`
	Content    *string    `json:"content"`
	ToolCalls  []toolCall `json:"tool_calls,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
}

// toolCall is OpenAI's: arguments are a JSON string (some servers answer
// an object; both are read). In a streamed delta a call comes in pieces,
// joined by index.
type toolCall struct {
	Index    *int   `json:"index,omitempty"`
	ID       string `json:"id,omitempty"`
	Type     string `json:"type,omitempty"`
	Function struct {
		Name      string          `json:"name,omitempty"`
		Arguments json.RawMessage `json:"arguments"`
	} `json:"function"`
}

// argText is the text of streamed arguments: the string's content, or the
// raw JSON when it is not a string.
func argText(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	return string(raw)
}

func messages(r inference.Request) []message {
	var out []message
	if r.System != "" {
		s := r.System
		out = append(out, message{Role: "system", Content: &s})
	}
	for _, m := range r.Messages {
		content := m.Content
		om := message{Role: m.Role, Content: &content, ToolCallID: m.ToolCallID}
		if len(m.ToolCalls) > 0 && m.Content == "" {
			om.Content = nil
		}
		for _, c := range m.ToolCalls {
			var tc toolCall
			tc.ID, tc.Type = c.ID, "function"
			tc.Function.Name = c.Function.Name
			tc.Function.Arguments, _ = json.Marshal(string(c.Function.Arguments))
			om.ToolCalls = append(om.ToolCalls, tc)
		}
		out = append(out, om)
	}
	return out
}

// fromToolCalls converts an answer's calls; arguments become a JSON object.
func fromToolCalls(in []toolCall) []inference.ToolCall {
	if len(in) == 0 {
		return nil
	}
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

// callParts gathers streamed tool call pieces by index.
type callParts struct {
	calls map[int]*toolCall
	args  map[int]string
}

func (p *callParts) add(deltas []toolCall) {
	if p.calls == nil {
		p.calls, p.args = map[int]*toolCall{}, map[int]string{}
	}
	for i, d := range deltas {
		idx := i
		if d.Index != nil {
			idx = *d.Index
		}
		c, ok := p.calls[idx]
		if !ok {
			c = &toolCall{}
			p.calls[idx] = c
		}
		if d.ID != "" {
			c.ID = d.ID
		}
		c.Function.Name += d.Function.Name
		p.args[idx] += argText(d.Function.Arguments)
	}
}

func (p *callParts) done() []inference.ToolCall {
	idx := make([]int, 0, len(p.calls))
	for i := range p.calls {
		idx = append(idx, i)
	}
	sort.Ints(idx)
	calls := make([]toolCall, len(idx))
	for n, i := range idx {
		calls[n] = *p.calls[i]
		calls[n].Function.Arguments, _ = json.Marshal(p.args[i])
	}
	return fromToolCalls(calls)
}
