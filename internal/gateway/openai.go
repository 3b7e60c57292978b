package gateway

import (
	"encoding/json"
	"fmt"
	"reflect"
	"slices"
	"strings"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/wire"
)

// The request bodies of OpenAI's API, as far as sous can honour them.
// Fields sous cannot honour with a different meaning (n > 1, logprobs,
// top_logprobs, logit_bias, parallel_tool_calls false, the legacy
// functions) are refused with a 400 rather than ignored; fields that only
// tag a request (user, metadata, store) are ignored.

type chatRequest struct {
	Model               string          `json:"model"`
	Messages            []chatMessage   `json:"messages"`
	Stream              bool            `json:"stream"`
	StreamOptions       *streamOptions  `json:"stream_options"`
	Temperature         *float64        `json:"temperature"`
	TopP                *float64        `json:"top_p"`
	MaxTokens           *int64          `json:"max_tokens"`
	MaxCompletionTokens *int64          `json:"max_completion_tokens"`
	Seed                *int64          `json:"seed"`
	Stop                json.RawMessage `json:"stop"`
	PresencePenalty     *float64        `json:"presence_penalty"`
	FrequencyPenalty    *float64        `json:"frequency_penalty"`
	N                   *int            `json:"n"`
	ResponseFormat      *responseFormat `json:"response_format"`
	Logprobs            *bool           `json:"logprobs"`
	TopLogprobs         *int            `json:"top_logprobs"`
	LogitBias           map[string]any  `json:"logit_bias"`
	Tools               json.RawMessage `json:"tools"`
	ToolChoice          json.RawMessage `json:"tool_choice"`
	ParallelToolCalls   *bool           `json:"parallel_tool_calls"`
	Functions           json.RawMessage `json:"functions"`
	FunctionCall        json.RawMessage `json:"function_call"`
}

type chatMessage struct {
	Role string `json:"role"`
	// Content is a string or a list of content parts; only text parts are
	// supported.
	Content json.RawMessage `json:"content"`
	// ToolCalls are an assistant message's calls; ToolCallID names the
	// call a tool message answers.
	ToolCalls    []chatToolCall  `json:"tool_calls"`
	ToolCallID   *string         `json:"tool_call_id"`
	FunctionCall json.RawMessage `json:"function_call"`
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

type responseFormat struct {
	Type       string `json:"type"`
	JSONSchema *struct {
		Schema json.RawMessage `json:"schema"`
	} `json:"json_schema"`
}

type completionRequest struct {
	Model            string          `json:"model"`
	Prompt           json.RawMessage `json:"prompt"`
	Stream           bool            `json:"stream"`
	StreamOptions    *streamOptions  `json:"stream_options"`
	Temperature      *float64        `json:"temperature"`
	TopP             *float64        `json:"top_p"`
	MaxTokens        *int64          `json:"max_tokens"`
	Seed             *int64          `json:"seed"`
	Stop             json.RawMessage `json:"stop"`
	PresencePenalty  *float64        `json:"presence_penalty"`
	FrequencyPenalty *float64        `json:"frequency_penalty"`
	N                *int            `json:"n"`
	BestOf           *int            `json:"best_of"`
	Echo             bool            `json:"echo"`
	Suffix           *string         `json:"suffix"`
	Logprobs         *int            `json:"logprobs"`
	LogitBias        map[string]any  `json:"logit_bias"`
}

type embeddingRequest struct {
	Model          string          `json:"model"`
	Input          json.RawMessage `json:"input"`
	EncodingFormat string          `json:"encoding_format"`
	Dimensions     *int            `json:"dimensions"`
}

// endpoint says which OpenAI call a request came in as.
type endpoint int

const (
	epChat endpoint = iota + 1
	epCompletion
	epEmbedding
	epResponses
)

// translated is an OpenAI request turned into a sous request.
type translated struct {
	ep           endpoint
	req          wire.Request
	includeUsage bool
	base64       bool // embeddings: answer in base64 (openai-node's default)
	echo         *responsesEcho
}

// badRequest is a 400 whose message names the offending parameter.
func badRequest(param, format string, args ...any) *apiError {
	return &apiError{Status: 400, Type: "invalid_request_error", Code: "invalid_request", Param: param, Message: fmt.Sprintf(format, args...)}
}

func decodeJSON(body []byte, v any) *apiError {
	if err := json.Unmarshal(body, v); err != nil {
		var te *json.UnmarshalTypeError
		if ok := asTypeError(err, &te); ok {
			if te.Field == "" {
				return badRequest("", "the body must be a JSON object, not a JSON %s", te.Value)
			}
			return badRequest(te.Field, "parameter %q must be %s, not a JSON %s", te.Field, jsonKind(te.Type), te.Value)
		}
		return badRequest("", "the body is not a JSON object: %v", err)
	}
	return nil
}

// jsonKind names t as JSON does, never as Go does ("an integer", not
// "int64").
func jsonKind(t reflect.Type) string {
	if t == nil {
		return "another JSON type"
	}
	switch t.Kind() {
	case reflect.Pointer:
		return jsonKind(t.Elem())
	case reflect.Bool:
		return "a boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.String:
		return "a string"
	case reflect.Slice, reflect.Array:
		return "a list"
	case reflect.Struct, reflect.Map:
		return "an object"
	}
	return "another JSON type"
}

// checkStreamOptions refuses stream_options without stream, as OpenAI does.
func checkStreamOptions(stream bool, o *streamOptions) *apiError {
	if o != nil && !stream {
		return badRequest("stream_options", "stream_options is only allowed when stream is true")
	}
	return nil
}

func asTypeError(err error, te **json.UnmarshalTypeError) bool {
	t, ok := err.(*json.UnmarshalTypeError)
	if ok {
		*te = t
	}
	return ok
}

// options maps OpenAI sampling parameters onto sous's (Ollama's) option names.
func options(temperature, topP *float64, maxTokens, seed *int64, stop json.RawMessage, presence, frequency *float64) (map[string]any, *apiError) {
	o := map[string]any{}
	if temperature != nil {
		o["temperature"] = *temperature
	}
	if topP != nil {
		o["top_p"] = *topP
	}
	if maxTokens != nil {
		o["num_predict"] = *maxTokens
	}
	if seed != nil {
		o["seed"] = *seed
	}
	if presence != nil {
		o["presence_penalty"] = *presence
	}
	if frequency != nil {
		o["frequency_penalty"] = *frequency
	}
	if len(stop) > 0 && string(stop) != "null" {
		var one string
		var many []string
		switch {
		case json.Unmarshal(stop, &one) == nil:
			o["stop"] = []string{one}
		case json.Unmarshal(stop, &many) == nil:
			o["stop"] = many
		default:
			return nil, badRequest("stop", "\"stop\" must be a string or a list of strings")
		}
	}
	if len(o) == 0 {
		return nil, nil
	}
	return o, nil
}

func checkN(n *int) *apiError {
	if n != nil && *n != 1 {
		return badRequest("n", "only n=1 is supported: send one request per choice")
	}
	return nil
}

func translateChat(body []byte) (*translated, *apiError) {
	var c chatRequest
	if err := decodeJSON(body, &c); err != nil {
		return nil, err
	}
	if err := checkN(c.N); err != nil {
		return nil, err
	}
	// The legacy functions are refused, not translated: an answer would
	// have to say function_call, which no current client reads.
	if !isNull(c.Functions) {
		return nil, badRequest("functions", "\"functions\" is deprecated and not supported by this gateway: send \"tools\" (type \"function\")")
	}
	if !isNull(c.FunctionCall) {
		return nil, badRequest("function_call", "\"function_call\" is deprecated and not supported by this gateway: send \"tool_choice\"")
	}
	if c.ParallelToolCalls != nil && !*c.ParallelToolCalls {
		// Engines (Ollama) cannot be held to one call per answer.
		return nil, badRequest("parallel_tool_calls", "parallel_tool_calls false is not supported by this gateway: the engine may answer with several calls")
	}
	if c.Logprobs != nil && *c.Logprobs {
		return nil, badRequest("logprobs", "logprobs are not supported by this gateway")
	}
	if c.TopLogprobs != nil && *c.TopLogprobs != 0 {
		return nil, badRequest("top_logprobs", "top_logprobs are not supported by this gateway")
	}
	if len(c.LogitBias) > 0 {
		return nil, badRequest("logit_bias", "logit_bias is not supported by this gateway")
	}
	if err := checkStreamOptions(c.Stream, c.StreamOptions); err != nil {
		return nil, err
	}
	if len(c.Messages) == 0 {
		return nil, badRequest("messages", "\"messages\" must be a non-empty list")
	}
	t := &translated{ep: epChat}
	t.req.Model = c.Model
	t.req.Stream = c.Stream
	t.includeUsage = c.Stream && c.StreamOptions != nil && c.StreamOptions.IncludeUsage
	tools, names, aerr := translateTools(c.Tools)
	if aerr != nil {
		return nil, aerr
	}
	t.req.Tools = tools
	if t.req.ToolChoice, aerr = translateToolChoice(c.ToolChoice, names); aerr != nil {
		return nil, aerr
	}
	if t.req.Messages, aerr = chatMessages(c.Messages); aerr != nil {
		return nil, aerr
	}
	maxTokens := c.MaxCompletionTokens
	if maxTokens == nil {
		maxTokens = c.MaxTokens
	}
	opts, err := options(c.Temperature, c.TopP, maxTokens, c.Seed, c.Stop, c.PresencePenalty, c.FrequencyPenalty)
	if err != nil {
		return nil, err
	}
	t.req.Options = opts
	if c.ResponseFormat != nil {
		switch c.ResponseFormat.Type {
		case "", "text":
		case "json_object":
			t.req.Format = json.RawMessage(`"json"`)
		case "json_schema":
			if c.ResponseFormat.JSONSchema == nil || len(c.ResponseFormat.JSONSchema.Schema) == 0 {
				return nil, badRequest("response_format", "response_format json_schema needs json_schema.schema")
			}
			t.req.Format = c.ResponseFormat.JSONSchema.Schema
		default:
			return nil, badRequest("response_format", "response_format type %q is not supported; use text, json_object or json_schema", truncate(c.ResponseFormat.Type, 40))
		}
	}
	return t, nil
}

// chatMessages translates the conversation: roles, text, the assistant's
// tool calls and the tool messages that answer them.
func chatMessages(msgs []chatMessage) ([]inference.Message, *apiError) {
	out := make([]inference.Message, 0, len(msgs))
	// open holds the ids of the calls the latest assistant message made,
	// for the tool messages that follow it.
	var open map[string]bool
	for i, m := range msgs {
		role := m.Role
		switch role {
		case "developer": // OpenAI's newer name for system
			role = "system"
		case "system", "user", "assistant", "tool":
		case "":
			return nil, missingParam(fmt.Sprintf("messages[%d].role", i))
		case "function":
			return nil, badRequest(fmt.Sprintf("messages[%d].role", i), "messages with role \"function\" are deprecated and not supported by this gateway: answer tool calls with role \"tool\"")
		default:
			return nil, invalidValue(fmt.Sprintf("messages[%d].role", i), "Invalid value: '%s'. Supported values are: 'system', 'developer', 'user', 'assistant' and 'tool'.", truncate(role, 40))
		}
		text, err := messageText(m.Content)
		if err != nil {
			err.Param = fmt.Sprintf("messages[%d].content", i)
			return nil, err
		}
		msg := inference.Message{Role: role, Content: text}
		if !isNull(m.FunctionCall) {
			return nil, badRequest(fmt.Sprintf("messages[%d].function_call", i), "\"function_call\" is deprecated and not supported by this gateway: send \"tool_calls\"")
		}
		if len(m.ToolCalls) > 0 && role != "assistant" {
			return nil, invalidValue(fmt.Sprintf("messages[%d].tool_calls", i), "only assistant messages may have 'tool_calls'")
		}
		if m.ToolCallID != nil && role != "tool" {
			return nil, invalidValue(fmt.Sprintf("messages[%d].tool_call_id", i), "only tool messages may have 'tool_call_id'")
		}
		switch role {
		case "assistant":
			calls, err := translateToolCalls(i, m.ToolCalls)
			if err != nil {
				return nil, err
			}
			if len(calls) > 0 {
				msg.ToolCalls = calls
				open = make(map[string]bool, len(calls))
				for _, c := range calls {
					open[c.ID] = true
				}
			} else {
				open = nil
			}
		case "tool":
			if open == nil {
				return nil, invalidValue(fmt.Sprintf("messages.[%d].role", i), "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.")
			}
			if m.ToolCallID == nil || *m.ToolCallID == "" {
				return nil, missingParam(fmt.Sprintf("messages[%d].tool_call_id", i))
			}
			if !open[*m.ToolCallID] {
				return nil, invalidValue(fmt.Sprintf("messages[%d].tool_call_id", i), "Invalid parameter: 'tool_call_id' of '%s' not found in 'tool_calls' of previous message.", truncate(*m.ToolCallID, 64))
			}
			msg.ToolCallID = *m.ToolCallID
		default:
			open = nil
		}
		out = append(out, msg)
	}
	return out, nil
}

// messageText flattens a chat message's content: a string, or text parts.
func messageText(raw json.RawMessage) (string, *apiError) {
	return flattenText(raw, badRequest, "content part type %q is not supported; only text parts are", "text")
}

// flattenText joins content given as a string or as a list of parts whose
// types are among types; another part type is refused with refuse(msg).
func flattenText(raw json.RawMessage, refuse func(param, format string, args ...any) *apiError, msg string, types ...string) (string, *apiError) {
	if isNull(raw) {
		return "", nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", badRequest("", "content must be a string or a list of content parts")
	}
	var b strings.Builder
	for _, p := range parts {
		if !slices.Contains(types, p.Type) {
			return "", refuse("", msg, truncate(p.Type, 40))
		}
		b.WriteString(p.Text)
	}
	return b.String(), nil
}

func translateCompletion(body []byte) (*translated, *apiError) {
	var c completionRequest
	if err := decodeJSON(body, &c); err != nil {
		return nil, err
	}
	if err := checkN(c.N); err != nil {
		return nil, err
	}
	switch {
	case c.BestOf != nil && *c.BestOf != 1:
		return nil, badRequest("best_of", "best_of is not supported by this gateway")
	case c.Echo:
		return nil, badRequest("echo", "echo is not supported by this gateway")
	case c.Suffix != nil && *c.Suffix != "":
		return nil, badRequest("suffix", "suffix is not supported by this gateway")
	case c.Logprobs != nil:
		return nil, badRequest("logprobs", "logprobs are not supported by this gateway")
	case len(c.LogitBias) > 0:
		return nil, badRequest("logit_bias", "logit_bias is not supported by this gateway")
	}
	if err := checkStreamOptions(c.Stream, c.StreamOptions); err != nil {
		return nil, err
	}
	var prompt string
	var list []string
	switch {
	case json.Unmarshal(c.Prompt, &prompt) == nil:
	case json.Unmarshal(c.Prompt, &list) == nil && len(list) == 1:
		prompt = list[0]
	default:
		return nil, badRequest("prompt", "\"prompt\" must be a string (or a list of exactly one string); token arrays are not supported")
	}
	t := &translated{ep: epCompletion}
	t.req.Model = c.Model
	t.req.Prompt = &prompt
	t.req.Stream = c.Stream
	t.includeUsage = c.Stream && c.StreamOptions != nil && c.StreamOptions.IncludeUsage
	opts, err := options(c.Temperature, c.TopP, c.MaxTokens, c.Seed, c.Stop, c.PresencePenalty, c.FrequencyPenalty)
	if err != nil {
		return nil, err
	}
	t.req.Options = opts
	return t, nil
}

func translateEmbedding(body []byte) (*translated, *apiError) {
	var e embeddingRequest
	if err := decodeJSON(body, &e); err != nil {
		return nil, err
	}
	if e.Dimensions != nil {
		return nil, badRequest("dimensions", "dimensions is not supported by this gateway: the model decides the vector size")
	}
	t := &translated{ep: epEmbedding}
	switch e.EncodingFormat {
	case "", "float":
	case "base64":
		t.base64 = true
	default:
		return nil, badRequest("encoding_format", "encoding_format must be float or base64")
	}
	var one string
	var many []string
	switch {
	case len(e.Input) == 0 || string(e.Input) == "null":
		return nil, badRequest("input", "\"input\" is required: a string or a list of strings")
	case json.Unmarshal(e.Input, &one) == nil:
		many = []string{one}
	case json.Unmarshal(e.Input, &many) == nil:
		if len(many) == 0 {
			return nil, badRequest("input", "\"input\" must not be an empty list")
		}
	default:
		return nil, badRequest("input", "\"input\" must be a string or a list of strings; token arrays are not supported")
	}
	for _, s := range many {
		if s == "" {
			return nil, badRequest("input", "\"input\" must not be an empty string")
		}
	}
	t.req.Model = e.Model
	t.req.Input, _ = json.Marshal(many)
	return t, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
