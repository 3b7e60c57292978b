package gateway

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"

	"github.com/sous-run/sous/internal/inference"
)

// Tools on chat completions, translated to the queue's request (docs/messages.md,
// Tools) and checked here so that a bad tool gets OpenAI's error shape with
// the parameter that is wrong; the worker's decoder checks the rest again.

// chatTool is one entry of "tools".
type chatTool struct {
	Type     string        `json:"type"`
	Function *toolFunction `json:"function"`
}

type toolFunction struct {
	Name        *string         `json:"name"`
	Description string          `json:"description"`
	Parameters  json.RawMessage `json:"parameters"`
	Strict      *bool           `json:"strict"`
}

// chatToolCall is a call in an assistant message, and in an answer.
type chatToolCall struct {
	ID       string `json:"id"`
	Type     string `json:"type"`
	Function struct {
		Name string `json:"name"`
		// Arguments is a JSON string holding a JSON object.
		Arguments json.RawMessage `json:"arguments"`
	} `json:"function"`
}

// functionName is what OpenAI accepts as a function name.
var functionName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

func missingParam(param string) *apiError {
	return &apiError{Status: 400, Type: "invalid_request_error", Code: "missing_required_parameter", Param: param,
		Message: fmt.Sprintf("Missing required parameter: '%s'.", param)}
}

func invalidValue(param, format string, args ...any) *apiError {
	return &apiError{Status: 400, Type: "invalid_request_error", Code: "invalid_value", Param: param, Message: fmt.Sprintf(format, args...)}
}

func isNull(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) == 0 || string(raw) == "null"
}

// translateTools checks "tools" and returns them in the queue's shape,
// with the set of names for tool_choice.
func translateTools(raw json.RawMessage) ([]inference.Tool, map[string]bool, *apiError) {
	if isNull(raw) {
		return nil, nil, nil
	}
	var tools []json.RawMessage
	if json.Unmarshal(raw, &tools) != nil {
		return nil, nil, invalidValue("tools", "\"tools\" must be a list of tools")
	}
	if len(tools) > 128 {
		return nil, nil, &apiError{Status: 400, Type: "invalid_request_error", Code: "array_above_max_length", Param: "tools",
			Message: fmt.Sprintf("Invalid 'tools': array too long. Expected an array with maximum length 128, but got an array with length %d instead.", len(tools))}
	}
	out := make([]inference.Tool, 0, len(tools))
	names := map[string]bool{}
	for i, tr := range tools {
		var t chatTool
		if json.Unmarshal(tr, &t) != nil {
			return nil, nil, invalidValue(fmt.Sprintf("tools[%d]", i), "tools[%d] must be an object {\"type\":\"function\",\"function\":{...}}", i)
		}
		switch t.Type {
		case "function":
		case "":
			return nil, nil, missingParam(fmt.Sprintf("tools[%d].type", i))
		default:
			return nil, nil, invalidValue(fmt.Sprintf("tools[%d].type", i), "tool type %q is not supported by this gateway; only \"function\" tools are", truncate(t.Type, 40))
		}
		if t.Function == nil {
			return nil, nil, missingParam(fmt.Sprintf("tools[%d].function", i))
		}
		f := t.Function
		if f.Name == nil || *f.Name == "" {
			return nil, nil, missingParam(fmt.Sprintf("tools[%d].function.name", i))
		}
		if !functionName.MatchString(*f.Name) {
			return nil, nil, invalidValue(fmt.Sprintf("tools[%d].function.name", i),
				"Invalid 'tools[%d].function.name': string does not match pattern. Expected a string that matches the pattern '^[a-zA-Z0-9_-]{1,64}$'.", i)
		}
		if names[*f.Name] {
			return nil, nil, invalidValue(fmt.Sprintf("tools[%d].function.name", i), "two tools are named %q; tool names must be unique", *f.Name)
		}
		names[*f.Name] = true
		params := f.Parameters
		if isNull(params) {
			params = nil
		} else if !isJSONObject(params) {
			return nil, nil, invalidValue(fmt.Sprintf("tools[%d].function.parameters", i), "tools[%d].function.parameters must be a JSON Schema object", i)
		}
		out = append(out, inference.Tool{Type: "function", Function: inference.ToolFunction{
			Name: *f.Name, Description: f.Description, Parameters: params, Strict: f.Strict}})
	}
	return out, names, nil
}

// translateToolChoice checks "tool_choice" against the tools.
func translateToolChoice(raw json.RawMessage, names map[string]bool) (json.RawMessage, *apiError) {
	if isNull(raw) {
		return nil, nil
	}
	if names == nil {
		return nil, invalidValue("tool_choice", "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.")
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		switch s {
		case "auto", "none", "required":
			b, _ := json.Marshal(s)
			return b, nil
		}
		return nil, invalidValue("tool_choice", "Invalid value for 'tool_choice': expected \"none\", \"auto\", \"required\" or {\"type\":\"function\",\"function\":{\"name\":...}}.")
	}
	var c struct {
		Type     string `json:"type"`
		Function *struct {
			Name string `json:"name"`
		} `json:"function"`
	}
	if json.Unmarshal(raw, &c) != nil || c.Type != "function" {
		return nil, invalidValue("tool_choice", "Invalid value for 'tool_choice': expected \"none\", \"auto\", \"required\" or {\"type\":\"function\",\"function\":{\"name\":...}}; allowed_tools and custom tools are not supported by this gateway.")
	}
	if c.Function == nil || c.Function.Name == "" {
		return nil, missingParam("tool_choice.function.name")
	}
	if !names[c.Function.Name] {
		return nil, invalidValue("tool_choice", "Invalid value for 'tool_choice': function %q is not among 'tools'.", truncate(c.Function.Name, 64))
	}
	b, _ := json.Marshal(map[string]any{"type": "function", "function": map[string]string{"name": c.Function.Name}})
	return b, nil
}

// translateToolCalls checks an assistant message's tool calls and returns them in
// the queue's shape, arguments a JSON object.
func translateToolCalls(i int, calls []chatToolCall) ([]inference.ToolCall, *apiError) {
	out := make([]inference.ToolCall, 0, len(calls))
	for j, c := range calls {
		p := fmt.Sprintf("messages[%d].tool_calls[%d]", i, j)
		if c.ID == "" {
			return nil, missingParam(p + ".id")
		}
		if len(c.ID) > 256 {
			return nil, invalidValue(p+".id", "Invalid '%s.id': string too long (at most 256 bytes).", p)
		}
		if c.Type != "" && c.Type != "function" {
			return nil, invalidValue(p+".type", "tool call type %q is not supported by this gateway; only \"function\" calls are", truncate(c.Type, 40))
		}
		if c.Function.Name == "" {
			return nil, missingParam(p + ".function.name")
		}
		if !functionName.MatchString(c.Function.Name) {
			return nil, invalidValue(p+".function.name", "Invalid '%s.function.name': string does not match pattern. Expected a string that matches the pattern '^[a-zA-Z0-9_-]{1,64}$'.", p)
		}
		args, ok := callArguments(c.Function.Arguments)
		if !ok {
			return nil, invalidValue(p+".function.arguments", "Invalid '%s.function.arguments': expected a string holding a JSON object.", p)
		}
		out = append(out, inference.ToolCall{ID: c.ID, Type: "function", Function: inference.ToolCallFunction{Name: c.Function.Name, Arguments: args}})
	}
	return out, nil
}

// callArguments decodes OpenAI's arguments, a JSON string holding a JSON
// object ("" meaning none); an object as it is is accepted too.
func callArguments(raw json.RawMessage) (json.RawMessage, bool) {
	if isNull(raw) {
		return json.RawMessage("{}"), true
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		if len(bytes.TrimSpace([]byte(s))) == 0 {
			return json.RawMessage("{}"), true
		}
		raw = json.RawMessage(s)
	}
	if !isJSONObject(raw) {
		return nil, false
	}
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		return nil, false
	}
	return b.Bytes(), true
}

func isJSONObject(raw json.RawMessage) bool {
	var m map[string]json.RawMessage
	return json.Unmarshal(raw, &m) == nil && m != nil
}

// outToolCall is a call in an answer: arguments as a JSON string, as
// OpenAI sends them.
type outToolCall struct {
	Index    *int   `json:"index,omitempty"` // streamed deltas only
	ID       string `json:"id,omitempty"`
	Type     string `json:"type,omitempty"`
	Function struct {
		Name      string  `json:"name,omitempty"`
		Arguments *string `json:"arguments,omitempty"`
	} `json:"function"`
}

// answerCalls turns the result's calls into OpenAI's.
func answerCalls(calls []inference.ToolCall) []outToolCall {
	if len(calls) == 0 {
		return nil
	}
	out := make([]outToolCall, len(calls))
	for i, c := range calls {
		args := argumentsText(c.Function.Arguments)
		out[i].ID, out[i].Type = c.ID, "function"
		out[i].Function.Name, out[i].Function.Arguments = c.Function.Name, &args
	}
	return out
}

// argumentsText is a call's arguments as OpenAI's JSON string: the object's
// text, or the model's text when it was not JSON (the worker then keeps a
// JSON string).
func argumentsText(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	if len(raw) == 0 {
		return "{}"
	}
	return string(raw)
}
