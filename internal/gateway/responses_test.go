package gateway

import (
	"encoding/json"
	"strings"
	"testing"
)

const flatWeatherTool = `{"type":"function","name":"get_weather","description":"Get the weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}},"strict":false}`

func TestResponses(t *testing.T) {
	t.Parallel()
	srv, b := setup(t, setupOpts{answer: callAnswer("", weatherCall("call_1", "Paris"), weatherCall("call_2", "London"))})
	resp := post(t, srv.URL+"/v1/responses", "", `{"model":"tiny","instructions":"Use the tools.","input":"Weather?","tools":[`+flatWeatherTool+`],"tool_choice":{"type":"function","name":"get_weather"},"store":false,"max_output_tokens":32}`)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	got := decode[responseObject](t, resp)
	if got.Object != "response" || !strings.HasPrefix(got.ID, "resp_") || got.Status != "completed" || got.Store || got.Usage == nil || got.Usage.TotalTokens != 16 {
		t.Fatalf("response %+v", got)
	}
	if len(got.Output) != 2 || got.Output[0].Type != "function_call" || got.Output[0].CallID != "call_1" || got.Output[0].Name != "get_weather" ||
		*got.Output[0].Arguments != `{"city":"Paris"}` || got.Output[1].CallID != "call_2" || got.Output[0].ID == got.Output[1].ID {
		t.Fatalf("output %+v", got.Output)
	}
	r := b.last(t)
	if len(r.Messages) != 2 || r.Messages[0].Role != "system" || r.Messages[0].Content != "Use the tools." || r.Messages[1].Content != "Weather?" ||
		len(r.Tools) != 1 || string(r.ToolChoice) != `{"function":{"name":"get_weather"},"type":"function"}` || r.Options["num_predict"] != float64(32) {
		t.Fatalf("published %+v", r)
	}
}

func TestResponsesInputItems(t *testing.T) {
	t.Parallel()
	srv, b := setup(t, setupOpts{answer: okAnswer("It is sunny in Paris.")})
	resp := post(t, srv.URL+"/v1/responses", "", `{"input":[
		{"role":"user","content":[{"type":"input_text","text":"Weather?"}]},
		{"type":"function_call","id":"fc_1","call_id":"call_1","name":"get_weather","arguments":"{\"city\":\"Paris\"}","status":"completed"},
		{"type":"function_call","id":"fc_2","call_id":"call_2","name":"get_weather","arguments":"{\"city\":\"London\"}","status":"completed"},
		{"type":"function_call_output","call_id":"call_1","output":"sunny"},
		{"type":"function_call_output","call_id":"call_2","output":"rainy"}],
		"tools":[`+flatWeatherTool+`],"text":{"format":{"type":"json_schema","name":"x","schema":{"type":"object"}}}}`)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	got := decode[responseObject](t, resp)
	if len(got.Output) != 1 || got.Output[0].Type != "message" || (*got.Output[0].Content)[0].Text != "It is sunny in Paris." || got.Status != "incomplete" {
		t.Fatalf("output %+v (okAnswer's done_reason is length: incomplete)", got)
	}
	r := b.last(t)
	if len(r.Messages) != 4 || len(r.Messages[1].ToolCalls) != 2 || r.Messages[1].ToolCalls[1].ID != "call_2" ||
		r.Messages[2].ToolCallID != "call_1" || r.Messages[3].Content != "rainy" || string(r.Format) != `{"type":"object"}` {
		t.Fatalf("published %+v", r)
	}
}

func TestResponsesStream(t *testing.T) {
	t.Parallel()
	srv, _ := setup(t, setupOpts{answer: callAnswer("Let me look.", weatherCall("call_1", "Paris"), weatherCall("call_2", "London"))})
	resp := post(t, srv.URL+"/v1/responses", "", `{"input":"Weather?","tools":[`+flatWeatherTool+`],"stream":true}`)
	data, _ := events(t, resp)
	var types []string
	var text strings.Builder
	args := map[int]string{}
	var final responseObject
	for i, d := range data {
		var e struct {
			Type     string          `json:"type"`
			Seq      int             `json:"sequence_number"`
			Delta    string          `json:"delta"`
			Index    int             `json:"output_index"`
			Response json.RawMessage `json:"response"`
		}
		if err := json.Unmarshal([]byte(d), &e); err != nil {
			t.Fatalf("%v: %s", err, d)
		}
		if e.Seq != i {
			t.Fatalf("event %d has sequence_number %d", i, e.Seq)
		}
		types = append(types, e.Type)
		switch e.Type {
		case "response.output_text.delta":
			text.WriteString(e.Delta)
		case "response.function_call_arguments.delta":
			args[e.Index] += e.Delta
		case "response.completed":
			_ = json.Unmarshal(e.Response, &final)
		}
	}
	want := []string{"response.created", "response.in_progress",
		"response.output_item.added", "response.content_part.added", "response.output_text.delta",
		"response.output_text.done", "response.content_part.done", "response.output_item.done",
		"response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done",
		"response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done",
		"response.completed"}
	if strings.Join(types, " ") != strings.Join(want, " ") {
		t.Fatalf("events\n%s\nwant\n%s", strings.Join(types, " "), strings.Join(want, " "))
	}
	if text.String() != "Let me look." || args[1] != `{"city":"Paris"}` || args[2] != `{"city":"London"}` {
		t.Fatalf("text %q args %v", text.String(), args)
	}
	if final.Status != "completed" || len(final.Output) != 3 || final.Output[2].CallID != "call_2" || final.Usage == nil {
		t.Fatalf("completed %+v", final)
	}
}

func TestResponsesErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, body, code, param string
	}{
		{"store true", `{"input":"hi","store":true}`, "unsupported_parameter", "store"},
		{"previous_response_id", `{"input":"hi","previous_response_id":"resp_1"}`, "unsupported_parameter", "previous_response_id"},
		{"conversation", `{"input":"hi","conversation":"conv_1"}`, "unsupported_parameter", "conversation"},
		{"background", `{"input":"hi","background":true}`, "unsupported_parameter", "background"},
		{"include", `{"input":"hi","include":["reasoning.encrypted_content"]}`, "unsupported_parameter", "include"},
		{"hosted tool", `{"input":"hi","tools":[{"type":"web_search"}]}`, "invalid_value", "tools[0].type"},
		{"tool without a name", `{"input":"hi","tools":[{"type":"function","parameters":{"type":"object"}}]}`, "missing_required_parameter", "tools[0].name"},
		{"image input", `{"input":[{"role":"user","content":[{"type":"input_image","image_url":"x"}]}]}`, "invalid_value", "input[0].content"},
		{"reasoning item", `{"input":[{"type":"reasoning","summary":[]}]}`, "invalid_value", "input[0].type"},
		{"output answering no call", `{"input":[{"role":"user","content":"hi"},{"type":"function_call_output","call_id":"call_1","output":"sunny"}]}`, "invalid_value", "input[1].role"},
		{"arguments not JSON", `{"input":[{"role":"user","content":"hi"},{"type":"function_call","call_id":"c","name":"f","arguments":"{x"}]}`, "invalid_value", "input[1].tool_calls[0].function.arguments"},
		{"parallel_tool_calls false", `{"input":"hi","parallel_tool_calls":false}`, "unsupported_parameter", "parallel_tool_calls"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv, b := setup(t, setupOpts{})
			resp := post(t, srv.URL+"/v1/responses", "", tc.body)
			e := decode[errorBody](t, resp)
			if resp.StatusCode != 400 || e.Error.Code == nil || *e.Error.Code != tc.code || e.Error.Param == nil || *e.Error.Param != tc.param {
				t.Fatalf("got %d %+v (param %v), want 400 %s %s", resp.StatusCode, e.Error, deref(e.Error.Param), tc.code, tc.param)
			}
			b.mu.Lock()
			defer b.mu.Unlock()
			if len(b.sent) != 0 {
				t.Fatal("an invalid request was published")
			}
		})
	}
}

func deref(p *string) string {
	if p == nil {
		return "<nil>"
	}
	return *p
}
