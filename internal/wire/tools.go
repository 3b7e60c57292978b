package wire

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"regexp"

	"github.com/sous-run/sous/internal/inference"
)

// Reason codes for tools and tool calls.
const (
	// ReasonInvalidTools: "tools" or "tool_choice" is malformed.
	ReasonInvalidTools = "invalid_tools"
	// ReasonInvalidToolCall: a message's "tool_calls" is malformed, or on a
	// message that is not the assistant's.
	ReasonInvalidToolCall = "invalid_tool_call"
)

// MaxTools bounds the tools one request may offer (OpenAI's limit).
const MaxTools = 128

// functionName is what OpenAI accepts as a function name; Ollama accepts
// more, but a name one engine refuses would make requests engine-bound.
var functionName = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,64}$`)

// checkTools validates tools, tool_choice and the tool calls in messages,
// normalises tool call arguments to JSON objects, and returns the bytes
// they add to the prompt.
func checkTools(r *Request, req *inference.Request) (int, *InputError) {
	size := 0
	if string(r.ToolChoice) == "null" {
		r.ToolChoice = nil
	}
	if r.Tools != nil || len(r.ToolChoice) > 0 {
		if req.Kind != inference.Chat {
			return 0, inputErr(ReasonInvalidTools, "\"tools\" and \"tool_choice\" need a chat request (\"messages\"); engines offer tools on chat only")
		}
	}
	if len(r.Tools) > MaxTools {
		return 0, inputErr(ReasonInvalidTools, "%d tools, at most %d", len(r.Tools), MaxTools)
	}
	names := make(map[string]bool, len(r.Tools))
	for i := range r.Tools {
		t := &r.Tools[i]
		if t.Type == "" {
			t.Type = "function"
		}
		if t.Type != "function" {
			return 0, inputErr(ReasonInvalidTools, "tools[%d].type must be \"function\"", i)
		}
		f := t.Function
		if !functionName.MatchString(f.Name) {
			return 0, inputErr(ReasonInvalidTools, "tools[%d].function.name must be 1 to 64 letters, digits, '_', '.' or '-'", i)
		}
		if names[f.Name] {
			return 0, inputErr(ReasonInvalidTools, "tools[%d]: two tools are named %q", i, f.Name)
		}
		names[f.Name] = true
		if len(f.Parameters) > 0 && !isObject(f.Parameters) {
			return 0, inputErr(ReasonInvalidTools, "tools[%d].function.parameters must be a JSON Schema object", i)
		}
		size += len(f.Name) + len(f.Description) + len(f.Parameters)
	}
	if len(r.ToolChoice) > 0 {
		if len(r.Tools) == 0 {
			return 0, inputErr(ReasonInvalidTools, "\"tool_choice\" needs \"tools\"")
		}
		if err := checkToolChoice(r.ToolChoice, names); err != nil {
			return 0, err
		}
		size += len(r.ToolChoice)
	}
	for i := range req.Messages {
		m := &req.Messages[i]
		if len(m.ToolCalls) > 0 && m.Role != "assistant" {
			return 0, inputErr(ReasonInvalidToolCall, "messages[%d] has \"tool_calls\" but only assistant messages can", i)
		}
		if m.ToolCallID != "" && m.Role != "tool" {
			return 0, inputErr(ReasonInvalidToolCall, "messages[%d] has \"tool_call_id\" but only tool messages can", i)
		}
		if len(m.ToolCallID) > 256 {
			return 0, inputErr(ReasonInvalidToolCall, "messages[%d].tool_call_id is over 256 bytes", i)
		}
		size += len(m.ToolCallID)
		for j := range m.ToolCalls {
			c := &m.ToolCalls[j]
			if c.Type == "" {
				c.Type = "function"
			}
			if c.Type != "function" {
				return 0, inputErr(ReasonInvalidToolCall, "messages[%d].tool_calls[%d].type must be \"function\"", i, j)
			}
			if !functionName.MatchString(c.Function.Name) {
				return 0, inputErr(ReasonInvalidToolCall, "messages[%d].tool_calls[%d].function.name must be 1 to 64 letters, digits, '_', '.' or '-'", i, j)
			}
			if len(c.ID) > 256 {
				return 0, inputErr(ReasonInvalidToolCall, "messages[%d].tool_calls[%d].id is over 256 bytes", i, j)
			}
			args, ok := objectArguments(c.Function.Arguments)
			if !ok {
				return 0, inputErr(ReasonInvalidToolCall, "messages[%d].tool_calls[%d].function.arguments must be a JSON object (or a string holding one)", i, j)
			}
			c.Function.Arguments = args
			size += len(c.ID) + len(c.Function.Name) + len(args)
		}
	}
	if len(r.Tools) > 0 {
		req.Tools = r.Tools
	}
	req.ToolChoice = r.ToolChoice
	return size, nil
}

func checkToolChoice(raw json.RawMessage, names map[string]bool) *InputError {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		switch s {
		case "auto", "none", "required":
			return nil
		}
		return inputErr(ReasonInvalidTools, "\"tool_choice\" must be \"auto\", \"none\", \"required\" or {\"type\":\"function\",\"function\":{\"name\":...}}")
	}
	var c struct {
		Type     string `json:"type"`
		Function struct {
			Name string `json:"name"`
		} `json:"function"`
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil || c.Type != "function" {
		return inputErr(ReasonInvalidTools, "\"tool_choice\" must be \"auto\", \"none\", \"required\" or {\"type\":\"function\",\"function\":{\"name\":...}}")
	}
	if !names[c.Function.Name] {
		return inputErr(ReasonInvalidTools, "\"tool_choice\" names function %q, which is not among \"tools\"", truncate(c.Function.Name, 64))
	}
	return nil
}

func isObject(raw json.RawMessage) bool {
	var m map[string]json.RawMessage
	return json.Unmarshal(raw, &m) == nil && m != nil
}

// objectArguments accepts a JSON object, or a JSON string holding one (as
// OpenAI sends them), and returns the object compacted.
func objectArguments(raw json.RawMessage) (json.RawMessage, bool) {
	if len(raw) == 0 {
		return nil, false
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		raw = json.RawMessage(s)
	}
	if !isObject(raw) {
		return nil, false
	}
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		return nil, false
	}
	return b.Bytes(), true
}

// toolsDigest is a short digest of the tools and tool choice, for BatchKey;
// empty when the request offers none.
func toolsDigest(req inference.Request) string {
	if len(req.Tools) == 0 && len(req.ToolChoice) == 0 {
		return ""
	}
	b, _ := json.Marshal(struct {
		T []inference.Tool `json:"t"`
		C json.RawMessage  `json:"c,omitempty"`
	}{req.Tools, req.ToolChoice})
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:12])
}
