package gateway

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/wire"
)

// The Responses API (POST /v1/responses), stateless: the whole conversation
// comes in "input" on every call, as agent SDKs send it with store false.
// Nothing is stored, so what needs a stored response (previous_response_id,
// conversation, background, prompt templates, store true) is refused, and
// so are hosted tools and inputs the queue cannot carry (images, files,
// reasoning items).

type responsesRequest struct {
	Model              string          `json:"model"`
	Input              json.RawMessage `json:"input"`
	Instructions       *string         `json:"instructions"`
	Tools              json.RawMessage `json:"tools"`
	ToolChoice         json.RawMessage `json:"tool_choice"`
	ParallelToolCalls  *bool           `json:"parallel_tool_calls"`
	Stream             bool            `json:"stream"`
	Store              *bool           `json:"store"`
	Temperature        *float64        `json:"temperature"`
	TopP               *float64        `json:"top_p"`
	MaxOutputTokens    *int64          `json:"max_output_tokens"`
	Text               *responsesText  `json:"text"`
	Truncation         *string         `json:"truncation"`
	PreviousResponseID *string         `json:"previous_response_id"`
	Conversation       json.RawMessage `json:"conversation"`
	Background         *bool           `json:"background"`
	Prompt             json.RawMessage `json:"prompt"`
	Include            []string        `json:"include"`
	Reasoning          json.RawMessage `json:"reasoning"`
	TopLogprobs        *int            `json:"top_logprobs"`
	MaxToolCalls       *int            `json:"max_tool_calls"`
}

type responsesText struct {
	Format *struct {
		Type   string          `json:"type"`
		Name   string          `json:"name"`
		Schema json.RawMessage `json:"schema"`
	} `json:"format"`
}

// inputItem is one item of "input": a message (type "message" or none), a
// function_call the model made, or a function_call_output answering one.
type inputItem struct {
	Type    string          `json:"type"`
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
	// function_call
	CallID    string          `json:"call_id"`
	Name      string          `json:"name"`
	Arguments json.RawMessage `json:"arguments"`
	// function_call_output
	Output json.RawMessage `json:"output"`
}

// responsesEcho is what a Response repeats of its request.
type responsesEcho struct {
	Instructions      *string
	Tools             json.RawMessage
	ToolChoice        json.RawMessage
	MaxOutputTokens   *int64
	Temperature       *float64
	TopP              *float64
	Text              json.RawMessage
	ParallelToolCalls bool
}

func unsupported(param, what string) *apiError {
	return &apiError{Status: 400, Type: "invalid_request_error", Code: "unsupported_parameter", Param: param,
		Message: fmt.Sprintf("Unsupported parameter: '%s' %s.", param, what)}
}

func translateResponses(body []byte) (*translated, *apiError) {
	var c responsesRequest
	if err := decodeJSON(body, &c); err != nil {
		return nil, err
	}
	switch {
	case c.Store != nil && *c.Store:
		return nil, unsupported("store", "is not supported by this gateway: responses are not stored; send store false and the whole conversation in input")
	case c.PreviousResponseID != nil && *c.PreviousResponseID != "":
		return nil, unsupported("previous_response_id", "is not supported by this gateway: responses are not stored; send the whole conversation in input")
	case !isNull(c.Conversation):
		return nil, unsupported("conversation", "is not supported by this gateway: conversations are not stored; send the whole conversation in input")
	case c.Background != nil && *c.Background:
		return nil, unsupported("background", "is not supported by this gateway")
	case !isNull(c.Prompt):
		return nil, unsupported("prompt", "is not supported by this gateway: it has no stored prompt templates")
	case len(c.Include) > 0:
		return nil, unsupported("include", "is not supported by this gateway")
	case !isNull(c.Reasoning) && string(c.Reasoning) != "{}":
		return nil, unsupported("reasoning", "is not supported by this gateway")
	case c.TopLogprobs != nil && *c.TopLogprobs != 0:
		return nil, unsupported("top_logprobs", "is not supported by this gateway")
	case c.MaxToolCalls != nil:
		return nil, unsupported("max_tool_calls", "is not supported by this gateway")
	case c.Truncation != nil && *c.Truncation != "disabled":
		return nil, unsupported("truncation", "'auto' is not supported by this gateway; a conversation over the context is refused")
	case c.ParallelToolCalls != nil && !*c.ParallelToolCalls:
		return nil, unsupported("parallel_tool_calls", "false is not supported by this gateway: the engine may answer with several calls")
	}
	t := &translated{ep: epResponses}
	t.req.Model = c.Model
	t.req.Stream = c.Stream
	t.echo = &responsesEcho{Instructions: c.Instructions, MaxOutputTokens: c.MaxOutputTokens, Temperature: c.Temperature, TopP: c.TopP, ParallelToolCalls: true}

	// Tools: the Responses API's flat function tools, checked as chat's.
	var names map[string]bool
	if !isNull(c.Tools) {
		var flat []json.RawMessage
		if json.Unmarshal(c.Tools, &flat) != nil {
			return nil, invalidValue("tools", "\"tools\" must be a list of tools")
		}
		chat := make([]json.RawMessage, len(flat))
		for i, raw := range flat {
			var f struct {
				Type        string          `json:"type"`
				Name        *string         `json:"name"`
				Description string          `json:"description"`
				Parameters  json.RawMessage `json:"parameters"`
				Strict      *bool           `json:"strict"`
			}
			if json.Unmarshal(raw, &f) != nil {
				return nil, invalidValue(fmt.Sprintf("tools[%d]", i), "tools[%d] must be an object {\"type\":\"function\",\"name\":...}", i)
			}
			if f.Type != "function" && f.Type != "" {
				return nil, invalidValue(fmt.Sprintf("tools[%d].type", i), "tool type %q is not supported by this gateway: only \"function\" tools are (hosted tools run at OpenAI)", truncate(f.Type, 40))
			}
			chat[i], _ = json.Marshal(map[string]any{"type": f.Type, "function": map[string]any{
				"name": f.Name, "description": f.Description, "parameters": f.Parameters, "strict": f.Strict}})
		}
		all, _ := json.Marshal(chat)
		tools, n, aerr := translateTools(all)
		if aerr != nil {
			aerr.Param = strings.Replace(aerr.Param, ".function.", ".", 1)
			aerr.Message = strings.Replace(aerr.Message, ".function.", ".", 1)
			return nil, aerr
		}
		t.req.Tools, names = tools, n
		t.echo.Tools = c.Tools
	}
	if !isNull(c.ToolChoice) {
		choice := c.ToolChoice
		var named struct {
			Type string `json:"type"`
			Name string `json:"name"`
		}
		if json.Unmarshal(choice, &named) == nil && named.Type == "function" {
			choice, _ = json.Marshal(map[string]any{"type": "function", "function": map[string]string{"name": named.Name}})
		}
		tc, aerr := translateToolChoice(choice, names)
		if aerr != nil {
			return nil, aerr
		}
		t.req.ToolChoice = tc
		t.echo.ToolChoice = c.ToolChoice
	}

	msgs, index, aerr := responsesInput(c.Input)
	if aerr != nil {
		return nil, aerr
	}
	if c.Instructions != nil && *c.Instructions != "" {
		msgs = append([]chatMessage{{Role: "system", Content: mustJSON(*c.Instructions)}}, msgs...)
		index = append([]int{-1}, index...)
	}
	if t.req.Messages, aerr = chatMessages(msgs); aerr != nil {
		aerr.Param = inputParam(aerr.Param, index)
		aerr.Message = inputParam(aerr.Message, index)
		return nil, aerr
	}

	opts, aerr := options(c.Temperature, c.TopP, c.MaxOutputTokens, nil, nil, nil, nil)
	if aerr != nil {
		return nil, aerr
	}
	t.req.Options = opts
	if c.Text != nil && c.Text.Format != nil {
		f := c.Text.Format
		switch f.Type {
		case "", "text":
		case "json_object":
			t.req.Format = json.RawMessage(`"json"`)
		case "json_schema":
			if isNull(f.Schema) {
				return nil, missingParam("text.format.schema")
			}
			t.req.Format = f.Schema
		default:
			return nil, invalidValue("text.format.type", "text.format type %q is not supported; use text, json_object or json_schema", truncate(f.Type, 40))
		}
		t.echo.Text, _ = json.Marshal(c.Text)
	}
	return t, nil
}

func mustJSON(v any) json.RawMessage {
	b, _ := json.Marshal(v)
	return b
}

// messageRef finds "messages[3]" and "messages.[3]" in chatMessages'
// errors, to name the input item instead.
var messageRef = regexp.MustCompile(`messages\.?\[(\d+)\]`)

func inputParam(s string, index []int) string {
	return messageRef.ReplaceAllStringFunc(s, func(m string) string {
		var k int
		fmt.Sscanf(messageRef.FindStringSubmatch(m)[1], "%d", &k)
		if k < len(index) && index[k] >= 0 {
			return fmt.Sprintf("input[%d]", index[k])
		}
		return "instructions"
	})
}

// responsesInput turns input items into chat messages: function_call items
// in a row become one assistant message's tool calls; index maps each
// message to its (first) input item.
func responsesInput(raw json.RawMessage) ([]chatMessage, []int, *apiError) {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return []chatMessage{{Role: "user", Content: mustJSON(s)}}, []int{0}, nil
	}
	var items []inputItem
	if json.Unmarshal(raw, &items) != nil || len(items) == 0 {
		return nil, nil, invalidValue("input", "\"input\" must be a string or a non-empty list of input items")
	}
	var msgs []chatMessage
	var index []int
	for i, it := range items {
		p := fmt.Sprintf("input[%d]", i)
		switch it.Type {
		case "", "message":
			text, aerr := responsesContent(it.Content)
			if aerr != nil {
				aerr.Param = p + ".content"
				return nil, nil, aerr
			}
			msgs = append(msgs, chatMessage{Role: it.Role, Content: mustJSON(text)})
			index = append(index, i)
		case "function_call":
			if it.CallID == "" {
				return nil, nil, missingParam(p + ".call_id")
			}
			call := chatToolCall{ID: it.CallID, Type: "function"}
			call.Function.Name = it.Name
			call.Function.Arguments = it.Arguments
			if n := len(msgs); n > 0 && msgs[n-1].Role == "assistant" && (len(msgs[n-1].ToolCalls) > 0 || index[n-1] == i-1) {
				msgs[n-1].ToolCalls = append(msgs[n-1].ToolCalls, call)
				continue
			}
			msgs = append(msgs, chatMessage{Role: "assistant", ToolCalls: []chatToolCall{call}})
			index = append(index, i)
		case "function_call_output":
			if it.CallID == "" {
				return nil, nil, missingParam(p + ".call_id")
			}
			text, aerr := responsesContent(it.Output)
			if aerr != nil {
				aerr.Param = p + ".output"
				return nil, nil, aerr
			}
			id := it.CallID
			msgs = append(msgs, chatMessage{Role: "tool", ToolCallID: &id, Content: mustJSON(text)})
			index = append(index, i)
		default:
			return nil, nil, invalidValue(p+".type", "input item type %q is not supported by this gateway: send messages, function_call and function_call_output items", truncate(it.Type, 40))
		}
	}
	return msgs, index, nil
}

// responsesContent flattens a message's content or a call's output: a
// string, or text parts (input_text, output_text).
func responsesContent(raw json.RawMessage) (string, *apiError) {
	return flattenText(raw, invalidValue, "content part type %q is not supported by this gateway; only text parts are", "input_text", "output_text", "text")
}

// The Response object and its output items.

type responseObject struct {
	ID                 string            `json:"id"`
	Object             string            `json:"object"` // response
	CreatedAt          int64             `json:"created_at"`
	Status             string            `json:"status"`
	Error              *struct{}         `json:"error"`
	IncompleteDetails  *incompleteDetail `json:"incomplete_details"`
	Instructions       *string           `json:"instructions"`
	MaxOutputTokens    *int64            `json:"max_output_tokens"`
	Model              string            `json:"model"`
	Output             []outputItem      `json:"output"`
	ParallelToolCalls  bool              `json:"parallel_tool_calls"`
	PreviousResponseID *string           `json:"previous_response_id"`
	Store              bool              `json:"store"`
	Temperature        *float64          `json:"temperature"`
	Text               json.RawMessage   `json:"text"`
	ToolChoice         json.RawMessage   `json:"tool_choice"`
	Tools              json.RawMessage   `json:"tools"`
	TopP               *float64          `json:"top_p"`
	Truncation         string            `json:"truncation"`
	Usage              *responsesUsage   `json:"usage"`
	Metadata           map[string]string `json:"metadata"`
}

type incompleteDetail struct {
	Reason string `json:"reason"`
}

type responsesUsage struct {
	InputTokens        int `json:"input_tokens"`
	InputTokensDetails struct {
		CachedTokens int `json:"cached_tokens"`
	} `json:"input_tokens_details"`
	OutputTokens        int `json:"output_tokens"`
	OutputTokensDetails struct {
		ReasoningTokens int `json:"reasoning_tokens"`
	} `json:"output_tokens_details"`
	TotalTokens int `json:"total_tokens"`
}

// outputItem is a message or a function_call.
type outputItem struct {
	Type   string `json:"type"`
	ID     string `json:"id"`
	Status string `json:"status"`
	// message
	Role    string        `json:"role,omitempty"`
	Content *[]outputText `json:"content,omitempty"`
	// function_call
	CallID    string  `json:"call_id,omitempty"`
	Name      string  `json:"name,omitempty"`
	Arguments *string `json:"arguments,omitempty"`
}

type outputText struct {
	Type        string `json:"type"` // output_text
	Text        string `json:"text"`
	Annotations []any  `json:"annotations"`
	Logprobs    []any  `json:"logprobs"`
}

func messageItem(id, text, status string) outputItem {
	content := []outputText{}
	if status == "completed" {
		content = append(content, outputText{Type: "output_text", Text: text, Annotations: []any{}, Logprobs: []any{}})
	}
	return outputItem{Type: "message", ID: id, Status: status, Role: "assistant", Content: &content}
}

func callItem(id string, c inference.ToolCall, args, status string) outputItem {
	return outputItem{Type: "function_call", ID: id, Status: status, CallID: c.ID, Name: c.Function.Name, Arguments: &args}
}

// response builds the Response object; r nil: one in progress.
func (a *answer) response(r *wire.Result, output []outputItem) responseObject {
	e := a.echo
	if e == nil {
		e = &responsesEcho{}
	}
	o := responseObject{ID: a.id, Object: "response", CreatedAt: a.created, Status: "in_progress", Model: a.model,
		Output: output, Instructions: e.Instructions, MaxOutputTokens: e.MaxOutputTokens, ParallelToolCalls: true,
		Temperature: e.Temperature, TopP: e.TopP, Text: e.Text, ToolChoice: e.ToolChoice, Tools: e.Tools,
		Truncation: "disabled", Metadata: map[string]string{}}
	if o.Output == nil {
		o.Output = []outputItem{}
	}
	if o.Text == nil {
		o.Text = json.RawMessage(`{"format":{"type":"text"}}`)
	}
	if o.ToolChoice == nil {
		o.ToolChoice = json.RawMessage(`"auto"`)
	}
	if o.Tools == nil {
		o.Tools = json.RawMessage(`[]`)
	}
	if r != nil {
		o.Status = "completed"
		if r.DoneReason == "length" {
			o.Status = "incomplete"
			o.IncompleteDetails = &incompleteDetail{Reason: "max_output_tokens"}
		}
		u := usageOf(r)
		o.Usage = &responsesUsage{InputTokens: u.PromptTokens, OutputTokens: u.CompletionTokens, TotalTokens: u.TotalTokens}
	}
	return o
}

// itemID names an output item: the response's id with the item's index.
func (a *answer) itemID(prefix string, i int) string {
	return fmt.Sprintf("%s_%s_%d", prefix, strings.TrimPrefix(a.id, "resp_"), i)
}

// responseOutput is a finished result's output items: the text as one
// message (when there is text, or nothing else), then one function_call
// per tool call.
func (a *answer) responseOutput(r *wire.Result) []outputItem {
	var out []outputItem
	text, calls := resultText(r), resultCalls(r)
	if text != "" || len(calls) == 0 {
		out = append(out, messageItem(a.itemID("msg", 0), text, "completed"))
	}
	for _, c := range calls {
		out = append(out, callItem(a.itemID("fc", len(out)), c, argumentsText(c.Function.Arguments), "completed"))
	}
	return out
}

// responsesStream writes the Responses API's stream events: the response
// created, then per output item added, its deltas, done, and the response
// completed with every item and the usage.
type responsesStream struct {
	a     *answer
	out   sse
	seq   int
	items []outputItem
	msg   int // the open message item's index; -1: none
	sofar strings.Builder
}

type event map[string]any

func (s *responsesStream) emit(typ string, e event) error {
	e["type"] = typ
	e["sequence_number"] = s.seq
	s.seq++
	return s.out.named(typ, e)
}

func (s *responsesStream) start() error {
	if err := s.emit("response.created", event{"response": s.a.response(nil, nil)}); err != nil {
		return err
	}
	return s.emit("response.in_progress", event{"response": s.a.response(nil, nil)})
}

func (s *responsesStream) text(d string, _ bool) error {
	if s.msg < 0 {
		s.msg = len(s.items)
		item := messageItem(s.a.itemID("msg", s.msg), "", "in_progress")
		s.items = append(s.items, item)
		if err := s.emit("response.output_item.added", event{"output_index": s.msg, "item": item}); err != nil {
			return err
		}
		if err := s.emit("response.content_part.added", event{"item_id": item.ID, "output_index": s.msg, "content_index": 0,
			"part": outputText{Type: "output_text", Annotations: []any{}, Logprobs: []any{}}}); err != nil {
			return err
		}
	}
	if d == "" {
		return nil
	}
	s.sofar.WriteString(d)
	return s.emit("response.output_text.delta", event{"item_id": s.items[s.msg].ID, "output_index": s.msg, "content_index": 0, "delta": d, "logprobs": []any{}})
}

// closeMessage ends the open message item, if any.
func (s *responsesStream) closeMessage() error {
	if s.msg < 0 {
		return nil
	}
	i, text := s.msg, s.sofar.String()
	s.msg = -1
	item := messageItem(s.items[i].ID, text, "completed")
	s.items[i] = item
	if err := s.emit("response.output_text.done", event{"item_id": item.ID, "output_index": i, "content_index": 0, "text": text, "logprobs": []any{}}); err != nil {
		return err
	}
	if err := s.emit("response.content_part.done", event{"item_id": item.ID, "output_index": i, "content_index": 0, "part": (*item.Content)[0]}); err != nil {
		return err
	}
	return s.emit("response.output_item.done", event{"output_index": i, "item": item})
}

func (s *responsesStream) calls(calls []inference.ToolCall, _ int, _ bool) error {
	if err := s.closeMessage(); err != nil {
		return err
	}
	for _, c := range calls {
		i := len(s.items)
		id, args := s.a.itemID("fc", i), argumentsText(c.Function.Arguments)
		if err := s.emit("response.output_item.added", event{"output_index": i, "item": callItem(id, c, "", "in_progress")}); err != nil {
			return err
		}
		if err := s.emit("response.function_call_arguments.delta", event{"item_id": id, "output_index": i, "delta": args}); err != nil {
			return err
		}
		if err := s.emit("response.function_call_arguments.done", event{"item_id": id, "output_index": i, "name": c.Function.Name, "arguments": args}); err != nil {
			return err
		}
		item := callItem(id, c, args, "completed")
		s.items = append(s.items, item)
		if err := s.emit("response.output_item.done", event{"output_index": i, "item": item}); err != nil {
			return err
		}
	}
	return nil
}

func (s *responsesStream) finish(r *wire.Result) error {
	if len(s.items) == 0 {
		// No output at all: one empty message, as a finished response has.
		if err := s.text("", true); err != nil {
			return err
		}
	}
	if err := s.closeMessage(); err != nil {
		return err
	}
	resp := s.a.response(r, s.items)
	typ := "response.completed"
	if resp.Status == "incomplete" {
		typ = "response.incomplete"
	}
	return s.emit(typ, event{"response": resp})
}

// fail writes an error event; its "error" member makes OpenAI's clients
// raise it as an APIError.
func (s *responsesStream) fail(e *apiError) {
	b := e.body()
	_ = s.emit("error", event{"code": b.Error.Code, "message": b.Error.Message, "param": b.Error.Param, "error": b.Error})
}
