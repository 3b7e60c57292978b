package openai_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/inference/openai"
	"github.com/sous-run/sous/internal/tinymodel"
)

var weatherTool = inference.Tool{Type: "function", Function: inference.ToolFunction{
	Name:        tinymodel.WeatherTool,
	Description: "Get the current weather for a city",
	Parameters:  json.RawMessage(`{"type":"object","required":["city"],"properties":{"city":{"type":"string"}}}`),
}}

// TestStreamedToolCallFragments: OpenAI streams a call's arguments in
// pieces; the engine hands on the whole call once, arguments an object.
func TestStreamedToolCallFragments(t *testing.T) {
	t.Parallel()
	var sent map[string]any
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		_ = json.Unmarshal(b, &sent)
		w.Header().Set("Content-Type", "text/event-stream")
		for _, ev := range []string{
			`{"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_abc","type":"function","function":{"name":"get_weather","arguments":""}}]}}]}`,
			`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"ci"}}]}}]}`,
			`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ty\": \"Paris\"}"}}]}}]}`,
			`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_def","type":"function","function":{"name":"get_time","arguments":"{}"}}]}}]}`,
			`{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}`,
			`[DONE]`,
		} {
			fmt.Fprintf(w, "data: %s\n\n", ev)
		}
	}))
	defer srv.Close()
	e, err := openai.New(openai.Config{URL: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	var streamed [][]inference.ToolCall
	req := inference.Request{
		Kind: inference.Chat, Model: "m", Tools: []inference.Tool{weatherTool}, ToolChoice: json.RawMessage(`"required"`),
		Messages: []inference.Message{
			{Role: "user", Content: "weather?"},
			{Role: "assistant", ToolCalls: []inference.ToolCall{{ID: "call_0", Type: "function", Function: inference.ToolCallFunction{Name: "get_weather", Arguments: json.RawMessage(`{"city":"Oslo"}`)}}}},
			{Role: "tool", ToolCallID: "call_0", Content: "rain"},
		},
		Stream:          func(string) {},
		StreamToolCalls: func(c []inference.ToolCall) { streamed = append(streamed, c) },
	}
	res, err := e.Infer(context.Background(), []inference.Request{req})
	if err != nil || res[0].Err != nil {
		t.Fatal(err, res[0].Err)
	}
	calls := res[0].Response.Message.ToolCalls
	if len(calls) != 2 || calls[0].ID != "call_abc" || calls[0].Function.Name != "get_weather" || string(calls[0].Function.Arguments) != `{"city": "Paris"}` ||
		calls[1].Function.Name != "get_time" || string(calls[1].Function.Arguments) != `{}` || res[0].Response.DoneReason != "tool_calls" {
		t.Errorf("calls %+v, done %q", calls, res[0].Response.DoneReason)
	}
	if len(streamed) != 1 || len(streamed[0]) != 2 {
		t.Errorf("streamed %+v, want both calls once", streamed)
	}
	// What went to the server: the OpenAI shapes.
	b, _ := json.Marshal(sent)
	for _, want := range []string{
		`"tool_choice":"required"`,
		`"tools":[{"function":{"description":"Get the current weather for a city","name":"get_weather","parameters":{`,
		`{"content":null,"role":"assistant","tool_calls":[{"function":{"arguments":"{\"city\":\"Oslo\"}","name":"get_weather"},"id":"call_0","type":"function"}]}`,
		`{"content":"rain","role":"tool","tool_call_id":"call_0"}`,
	} {
		if !strings.Contains(string(b), want) {
			t.Errorf("request lacks %s:\n%s", want, b)
		}
	}
}

// TestRealOllamaV1ToolLoop runs the two turns of an agent loop through
// Ollama's /v1/chat/completions with the scripted model.
func TestRealOllamaV1ToolLoop(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	srv := ollamatest.StartT(t, ollamatest.Options{NumParallel: 2})
	e, err := openai.New(openai.Config{URL: srv.URL()})
	if err != nil {
		t.Fatal(err)
	}
	user := inference.Message{Role: "user", Content: tinymodel.WeatherQuestion}
	for _, stream := range []bool{false, true} {
		t.Run(fmt.Sprintf("stream=%v", stream), func(t *testing.T) {
			var mu sync.Mutex
			var text strings.Builder
			req := inference.Request{Kind: inference.Chat, Model: srv.ScriptedModel(), Messages: []inference.Message{user}, Tools: []inference.Tool{weatherTool}, ToolChoice: json.RawMessage(`"auto"`)}
			if stream {
				req.Stream = func(d string) { mu.Lock(); text.WriteString(d); mu.Unlock() }
			}
			res, err := e.Infer(ctx, []inference.Request{req})
			if err != nil || res[0].Err != nil {
				t.Fatalf("first turn: %v %v", err, res[0].Err)
			}
			m := res[0].Response.Message
			if len(m.ToolCalls) != 1 || m.Content != "" || res[0].Response.DoneReason != inference.DoneToolCalls {
				t.Fatalf("first turn: %+v (%s), want one tool call", m, res[0].Response.DoneReason)
			}
			c := m.ToolCalls[0]
			if c.Function.Name != tinymodel.WeatherTool || string(c.Function.Arguments) != `{"city":"Paris"}` || c.ID == "" {
				t.Errorf("call %+v (arguments %s)", c, c.Function.Arguments)
			}
			text.Reset()
			req.Messages = []inference.Message{user, *m, {Role: "tool", ToolCallID: c.ID, Content: tinymodel.WeatherToolResult}}
			res, err = e.Infer(ctx, []inference.Request{req})
			if err != nil || res[0].Err != nil {
				t.Fatalf("second turn: %v %v", err, res[0].Err)
			}
			if got := res[0].Response.Message; got.Content != tinymodel.WeatherAnswer || len(got.ToolCalls) != 0 || res[0].Response.DoneReason != "stop" {
				t.Errorf("second turn: %+v (%s), want %q", got, res[0].Response.DoneReason, tinymodel.WeatherAnswer)
			}
			if stream && text.String() != tinymodel.WeatherAnswer {
				t.Errorf("streamed %q, want %q", text.String(), tinymodel.WeatherAnswer)
			}
		})
	}
}
