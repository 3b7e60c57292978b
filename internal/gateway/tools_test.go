package gateway

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/wire"
)

const weatherTool = `{"type":"function","function":{"name":"get_weather","description":"Get the weather","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}`

// callAnswer answers with the given tool calls (and text), streamed as the
// worker streams them: text chunks, then one chunk per call.
func callAnswer(text string, calls ...inference.ToolCall) func(Message, *fakeCall) {
	return func(m Message, c *fakeCall) {
		var r wire.Request
		_ = json.Unmarshal(m.Body, &r)
		res := wire.Result{ID: m.ID, Status: wire.StatusOK, Model: r.Model, DoneReason: inference.DoneToolCalls,
			Usage:   &inference.Usage{InputTokens: 11, OutputTokens: 5},
			Message: &inference.Message{Role: "assistant", Content: text, ToolCalls: calls}}
		if r.Stream {
			seq := 0
			if text != "" {
				c.push(true, wire.Chunk{ID: m.ID, Seq: seq, Delta: text, Attempt: 1})
				seq++
			}
			for _, tc := range calls {
				c.push(true, wire.Chunk{ID: m.ID, Seq: seq, ToolCalls: []inference.ToolCall{tc}, Attempt: 1})
				seq++
			}
			done := true
			res.Done = &done
		}
		c.push(false, res)
	}
}

func weatherCall(id, city string) inference.ToolCall {
	return inference.ToolCall{ID: id, Type: "function", Function: inference.ToolCallFunction{Name: "get_weather", Arguments: json.RawMessage(`{"city":"` + city + `"}`)}}
}

func TestChatTools(t *testing.T) {
	t.Parallel()
	srv, b := setup(t, setupOpts{answer: callAnswer("", weatherCall("call_1", "Paris"), weatherCall("call_2", "London"))})
	resp := post(t, srv.URL+"/v1/chat/completions", "", `{"messages":[{"role":"user","content":"Weather?"}],"tools":[`+weatherTool+`],"tool_choice":"auto","parallel_tool_calls":true}`)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	got := decode[chatCompletion](t, resp)
	ch := got.Choices[0]
	if ch.FinishReason != "tool_calls" || ch.Message.Content != nil || len(ch.Message.ToolCalls) != 2 {
		t.Fatalf("choice %+v", ch)
	}
	for i, want := range []struct{ id, args string }{{"call_1", `{"city":"Paris"}`}, {"call_2", `{"city":"London"}`}} {
		c := ch.Message.ToolCalls[i]
		if c.ID != want.id || c.Type != "function" || c.Function.Name != "get_weather" || *c.Function.Arguments != want.args || c.Index != nil {
			t.Fatalf("call %d: %+v", i, c)
		}
	}
	r := b.last(t)
	if len(r.Tools) != 1 || r.Tools[0].Function.Name != "get_weather" || r.Tools[0].Function.Description != "Get the weather" ||
		!strings.Contains(string(r.Tools[0].Function.Parameters), `"required":["city"]`) || string(r.ToolChoice) != `"auto"` {
		t.Fatalf("published tools %+v choice %s", r.Tools, r.ToolChoice)
	}
}

func TestChatToolConversation(t *testing.T) {
	t.Parallel()
	srv, b := setup(t, setupOpts{answer: okAnswer("It is sunny in Paris.")})
	body := `{"messages":[{"role":"user","content":"Weather?"},
		{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}},
		                                                 {"id":"call_2","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"London\"}"}}]},
		{"role":"tool","tool_call_id":"call_1","content":"sunny"},
		{"role":"tool","tool_call_id":"call_2","content":[{"type":"text","text":"rainy"}]}],
		"tools":[` + weatherTool + `],"tool_choice":{"type":"function","function":{"name":"get_weather"}}}`
	resp := post(t, srv.URL+"/v1/chat/completions", "", body)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	r := b.last(t)
	if len(r.Messages) != 4 {
		t.Fatalf("messages %+v", r.Messages)
	}
	a := r.Messages[1]
	if a.Role != "assistant" || a.Content != "" || len(a.ToolCalls) != 2 || a.ToolCalls[0].ID != "call_1" ||
		string(a.ToolCalls[0].Function.Arguments) != `{"city":"Paris"}` || string(a.ToolCalls[1].Function.Arguments) != `{"city":"London"}` {
		t.Fatalf("assistant message %+v", a)
	}
	if r.Messages[2].ToolCallID != "call_1" || r.Messages[2].Content != "sunny" || r.Messages[3].ToolCallID != "call_2" || r.Messages[3].Content != "rainy" {
		t.Fatalf("tool messages %+v", r.Messages[2:])
	}
	if string(r.ToolChoice) != `{"function":{"name":"get_weather"},"type":"function"}` {
		t.Fatalf("tool_choice %s", r.ToolChoice)
	}
}

// TestChatToolStream reassembles a stream's tool calls from their deltas as
// OpenAI's clients do: by index, arguments concatenated.
func TestChatToolStream(t *testing.T) {
	t.Parallel()
	srv, _ := setup(t, setupOpts{answer: callAnswer("", weatherCall("call_1", "Paris"), weatherCall("call_2", "London"))})
	resp := post(t, srv.URL+"/v1/chat/completions", "", `{"messages":[{"role":"user","content":"Weather?"}],"tools":[`+weatherTool+`],"stream":true,"stream_options":{"include_usage":true}}`)
	data, _ := events(t, resp)
	if data[len(data)-1] != "[DONE]" {
		t.Fatalf("last event %q", data[len(data)-1])
	}
	type acc struct{ id, name, args string }
	var calls []acc
	var finish, role string
	var u *usage
	for _, d := range data[:len(data)-1] {
		var c struct {
			Choices []chatChunkChoice `json:"choices"`
			Usage   *usage            `json:"usage"`
		}
		if err := json.Unmarshal([]byte(d), &c); err != nil {
			t.Fatal(err)
		}
		if c.Usage != nil {
			u = c.Usage
		}
		for _, ch := range c.Choices {
			if ch.Delta.Role != "" {
				if role != "" {
					t.Fatal("role sent twice")
				}
				role = ch.Delta.Role
			}
			if ch.FinishReason != nil {
				finish = *ch.FinishReason
			}
			for _, tc := range ch.Delta.ToolCalls {
				if tc.Index == nil {
					t.Fatalf("a tool call delta without index: %s", d)
				}
				for len(calls) <= *tc.Index {
					calls = append(calls, acc{})
				}
				a := &calls[*tc.Index]
				if tc.ID != "" {
					a.id = tc.ID
				}
				a.name += tc.Function.Name
				if tc.Function.Arguments != nil {
					a.args += *tc.Function.Arguments
				}
			}
		}
	}
	want := []acc{{"call_1", "get_weather", `{"city":"Paris"}`}, {"call_2", "get_weather", `{"city":"London"}`}}
	if len(calls) != 2 || calls[0] != want[0] || calls[1] != want[1] {
		t.Fatalf("reassembled %+v, want %+v", calls, want)
	}
	if finish != "tool_calls" || role != "assistant" || u == nil || u.TotalTokens != 16 {
		t.Fatalf("finish %q role %q usage %+v", finish, role, u)
	}
}

func TestChatResponseFormat(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, format, want string }{
		{"json_object", `{"type":"json_object"}`, `"json"`},
		{"json_schema", `{"type":"json_schema","json_schema":{"name":"w","schema":{"type":"object","properties":{"city":{"type":"string"}}}}}`, `{"type":"object","properties":{"city":{"type":"string"}}}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv, b := setup(t, setupOpts{answer: okAnswer(`{"city":"Paris"}`)})
			resp := post(t, srv.URL+"/v1/chat/completions", "", `{"messages":[{"role":"user","content":"hi"}],"response_format":`+tc.format+`}`)
			if resp.StatusCode != 200 {
				t.Fatalf("status %d", resp.StatusCode)
			}
			if f := b.last(t).Format; string(f) != tc.want {
				t.Fatalf("format %s, want %s", f, tc.want)
			}
		})
	}
}

func TestToolErrors(t *testing.T) {
	t.Parallel()
	user := `{"role":"user","content":"hi"}`
	assistant := `{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{}"}}]}`
	for _, tc := range []struct {
		name, body, code, param string
	}{
		{"tool without a name", `{"messages":[` + user + `],"tools":[{"type":"function","function":{"parameters":{"type":"object"}}}]}`, "missing_required_parameter", "tools[0].function.name"},
		{"tool with a bad name", `{"messages":[` + user + `],"tools":[{"type":"function","function":{"name":"get weather"}}]}`, "invalid_value", "tools[0].function.name"},
		{"tool without type", `{"messages":[` + user + `],"tools":[{}]}`, "missing_required_parameter", "tools[0].type"},
		{"custom tool", `{"messages":[` + user + `],"tools":[{"type":"custom","custom":{"name":"x"}}]}`, "invalid_value", "tools[0].type"},
		{"parameters not an object", `{"messages":[` + user + `],"tools":[{"type":"function","function":{"name":"f","parameters":[1]}}]}`, "invalid_value", "tools[0].function.parameters"},
		{"two tools one name", `{"messages":[` + user + `],"tools":[` + weatherTool + `,` + weatherTool + `]}`, "invalid_value", "tools[1].function.name"},
		{"tools not a list", `{"messages":[` + user + `],"tools":{}}`, "invalid_value", "tools"},
		{"tool_choice without tools", `{"messages":[` + user + `],"tool_choice":"auto"}`, "invalid_value", "tool_choice"},
		{"tool_choice unknown", `{"messages":[` + user + `],"tools":[` + weatherTool + `],"tool_choice":"always"}`, "invalid_value", "tool_choice"},
		{"tool_choice names another", `{"messages":[` + user + `],"tools":[` + weatherTool + `],"tool_choice":{"type":"function","function":{"name":"get_time"}}}`, "invalid_value", "tool_choice"},
		{"parallel_tool_calls false", `{"messages":[` + user + `],"tools":[` + weatherTool + `],"parallel_tool_calls":false}`, "invalid_request", "parallel_tool_calls"},
		{"functions", `{"messages":[` + user + `],"functions":[{"name":"f"}]}`, "invalid_request", "functions"},
		{"function_call", `{"messages":[` + user + `],"function_call":"auto"}`, "invalid_request", "function_call"},
		{"function role", `{"messages":[` + user + `,{"role":"function","name":"f","content":"x"}]}`, "invalid_request", "messages[1].role"},
		{"arguments not JSON", `{"messages":[` + user + `,{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{city: Paris"}}]}]}`, "invalid_value", "messages[1].tool_calls[0].function.arguments"},
		{"arguments not an object", `{"messages":[` + user + `,{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"[1]"}}]}]}`, "invalid_value", "messages[1].tool_calls[0].function.arguments"},
		{"call without id", `{"messages":[` + user + `,{"role":"assistant","tool_calls":[{"type":"function","function":{"name":"f","arguments":"{}"}}]}]}`, "missing_required_parameter", "messages[1].tool_calls[0].id"},
		{"tool message answering no call", `{"messages":[` + user + `,{"role":"tool","tool_call_id":"call_1","content":"sunny"}]}`, "invalid_value", "messages.[1].role"},
		{"tool message after a user message", `{"messages":[` + user + `,` + assistant + `,` + user + `,{"role":"tool","tool_call_id":"call_1","content":"sunny"}]}`, "invalid_value", "messages.[3].role"},
		{"tool message for another call", `{"messages":[` + user + `,` + assistant + `,{"role":"tool","tool_call_id":"call_9","content":"sunny"}]}`, "invalid_value", "messages[2].tool_call_id"},
		{"tool message without id", `{"messages":[` + user + `,` + assistant + `,{"role":"tool","content":"sunny"}]}`, "missing_required_parameter", "messages[2].tool_call_id"},
		{"tool_calls on a user message", `{"messages":[{"role":"user","content":"x","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]}]}`, "invalid_value", "messages[0].tool_calls"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv, b := setup(t, setupOpts{})
			resp := post(t, srv.URL+"/v1/chat/completions", "", tc.body)
			e := decode[errorBody](t, resp)
			if resp.StatusCode != 400 || e.Error.Type != "invalid_request_error" || e.Error.Code == nil || *e.Error.Code != tc.code || e.Error.Message == "" {
				t.Fatalf("got %d %+v, want 400 %s", resp.StatusCode, e.Error, tc.code)
			}
			if e.Error.Param == nil || *e.Error.Param != tc.param {
				t.Fatalf("param %v, want %q (%s)", e.Error.Param, tc.param, e.Error.Message)
			}
			b.mu.Lock()
			defer b.mu.Unlock()
			if len(b.sent) != 0 {
				t.Fatal("an invalid request was published")
			}
		})
	}
}

// A stream restarted on another attempt after a tool call was shown: the
// final answer is sent on only if it holds that same call (the same id);
// a new attempt's new call is an error, since the client already has the
// old one.
func TestToolStreamRestart(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		finalID string
		wantErr bool
	}{{"call_1", false}, {"call_9", true}} {
		srv, _ := setup(t, setupOpts{answer: func(m Message, c *fakeCall) {
			c.push(true, wire.Chunk{ID: m.ID, Seq: 0, ToolCalls: []inference.ToolCall{weatherCall("call_1", "Paris")}, Attempt: 1})
			c.push(true, wire.Chunk{ID: m.ID, Seq: 0, Restart: true, Attempt: 2})
			done := true
			c.push(false, wire.Result{ID: m.ID, Status: wire.StatusOK, DoneReason: inference.DoneToolCalls, Done: &done,
				Message: &inference.Message{Role: "assistant", ToolCalls: []inference.ToolCall{weatherCall(tc.finalID, "Paris"), weatherCall("call_2", "London")}}})
		}})
		resp := post(t, srv.URL+"/v1/chat/completions", "", `{"messages":[{"role":"user","content":"Weather?"}],"tools":[`+weatherTool+`],"stream":true}`)
		data, _ := events(t, resp)
		var ids []string
		failed := false
		for _, d := range data {
			var e errorBody
			if json.Unmarshal([]byte(d), &e) == nil && e.Error.Message != "" {
				failed = true
			}
			var c struct {
				Choices []chatChunkChoice `json:"choices"`
			}
			if json.Unmarshal([]byte(d), &c) == nil {
				for _, ch := range c.Choices {
					for _, tc := range ch.Delta.ToolCalls {
						if tc.ID != "" {
							ids = append(ids, tc.ID)
						}
					}
				}
			}
		}
		if failed != tc.wantErr || (!failed && strings.Join(ids, ",") != "call_1,call_2") {
			t.Fatalf("final call %s: calls %v, failed %v", tc.finalID, ids, failed)
		}
	}
}

// An engine that cannot force a call refuses a forced tool_choice; the
// client is told that tool_choice is the likely cause.
func TestForcedToolChoiceRejected(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ choice, param string }{
		{`"required"`, "tool_choice"},
		{`{"type":"function","function":{"name":"get_weather"}}`, "tool_choice"},
		{`"auto"`, ""},
	} {
		srv, _ := setup(t, setupOpts{answer: func(m Message, c *fakeCall) {
			c.push(false, wire.ErrorResult(m.ID, "tiny", "engine_rejected", "Ollama cannot force or name a tool call"))
		}})
		resp := post(t, srv.URL+"/v1/chat/completions", "", `{"messages":[{"role":"user","content":"Weather?"}],"tools":[`+weatherTool+`],"tool_choice":`+tc.choice+`}`)
		e := decode[errorBody](t, resp)
		if resp.StatusCode != 400 || *e.Error.Code != "engine_rejected" || deref(e.Error.Param) != map[bool]string{true: tc.param, false: "<nil>"}[tc.param != ""] {
			t.Fatalf("tool_choice %s: %d %+v param %s", tc.choice, resp.StatusCode, e.Error, deref(e.Error.Param))
		}
	}
}
