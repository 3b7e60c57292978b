package ollama_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/inference/ollama"
	"github.com/sous-run/sous/internal/tinymodel"
)

var weatherTool = inference.Tool{Type: "function", Function: inference.ToolFunction{
	Name:        tinymodel.WeatherTool,
	Description: "Get the current weather for a city",
	Parameters:  json.RawMessage(`{"type":"object","required":["city"],"properties":{"city":{"type":"string"}}}`),
}}

// TestScriptedToolLoop runs the two turns of an agent loop through the
// engine against the real Ollama with the scripted model, streamed and not.
func TestScriptedToolLoop(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	srv := ollamatest.StartT(t, ollamatest.Options{NumParallel: 4})
	e, err := ollama.New(ollama.Config{URL: srv.URL()})
	if err != nil {
		t.Fatal(err)
	}
	user := inference.Message{Role: "user", Content: tinymodel.WeatherQuestion}
	for _, stream := range []bool{false, true} {
		t.Run(fmt.Sprintf("stream=%v", stream), func(t *testing.T) {
			var mu sync.Mutex
			var deltas strings.Builder
			var streamedCalls []inference.ToolCall
			req := inference.Request{Kind: inference.Chat, Model: srv.ScriptedModel(), Messages: []inference.Message{user}, Tools: []inference.Tool{weatherTool}, ToolChoice: json.RawMessage(`"auto"`)}
			if stream {
				req.Stream = func(d string) { mu.Lock(); deltas.WriteString(d); mu.Unlock() }
				req.StreamToolCalls = func(c []inference.ToolCall) { mu.Lock(); streamedCalls = append(streamedCalls, c...); mu.Unlock() }
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
			if c.Function.Name != tinymodel.WeatherTool || string(c.Function.Arguments) != `{"city":"Paris"}` || c.ID == "" || c.Type != "function" {
				t.Errorf("call %+v (arguments %s)", c, c.Function.Arguments)
			}
			if stream && (len(streamedCalls) != 1 || streamedCalls[0].Function.Name != tinymodel.WeatherTool || deltas.Len() != 0) {
				t.Errorf("streamed calls %+v, text %q: want the one call and no text", streamedCalls, deltas.String())
			}

			deltas.Reset()
			req.Messages = []inference.Message{user, *m, {Role: "tool", ToolCallID: c.ID, Content: tinymodel.WeatherToolResult}}
			res, err = e.Infer(ctx, []inference.Request{req})
			if err != nil || res[0].Err != nil {
				t.Fatalf("second turn: %v %v", err, res[0].Err)
			}
			if got := res[0].Response.Message; got.Content != tinymodel.WeatherAnswer || len(got.ToolCalls) != 0 || res[0].Response.DoneReason != "stop" {
				t.Errorf("second turn: %+v (%s), want %q", got, res[0].Response.DoneReason, tinymodel.WeatherAnswer)
			}
			if stream && deltas.String() != tinymodel.WeatherAnswer {
				t.Errorf("streamed %q, want %q", deltas.String(), tinymodel.WeatherAnswer)
			}
		})
	}

	t.Run("tool_choice none offers no tools", func(t *testing.T) {
		res, _ := e.Infer(ctx, []inference.Request{{Kind: inference.Chat, Model: srv.ScriptedModel(), Messages: []inference.Message{user}, Tools: []inference.Tool{weatherTool}, ToolChoice: json.RawMessage(`"none"`)}})
		if res[0].Err != nil || res[0].Response.Message.Content != tinymodel.WeatherToolCall || len(res[0].Response.Message.ToolCalls) != 0 {
			t.Errorf("%+v %v: want the call as plain text", res[0].Response.Message, res[0].Err)
		}
	})
	t.Run("tool_choice required is refused", func(t *testing.T) {
		res, _ := e.Infer(ctx, []inference.Request{{Kind: inference.Chat, Model: srv.ScriptedModel(), Messages: []inference.Message{user}, Tools: []inference.Tool{weatherTool}, ToolChoice: json.RawMessage(`"required"`)}})
		if inference.KindOf(res[0].Err) != inference.Permanent || !strings.Contains(res[0].Err.Error(), "tool_choice") {
			t.Errorf("err = %v, want a permanent error naming tool_choice", res[0].Err)
		}
	})
	t.Run("a batch of scripted questions", func(t *testing.T) {
		qa := [][2]string{{tinymodel.SkyQuestion, tinymodel.SkyAnswer}, {tinymodel.QueueQuestion, tinymodel.QueueAnswer}, {tinymodel.CountQuestion, tinymodel.CountAnswer}}
		var reqs []inference.Request
		for i := range 9 {
			reqs = append(reqs, inference.Request{Kind: inference.Generate, Model: srv.ScriptedModel(), Prompt: qa[i%3][0], Options: map[string]any{"temperature": 1.0, "seed": int64(i)}})
		}
		res, err := e.Infer(ctx, reqs)
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range res {
			if r.Err != nil || r.Response.Text != qa[i%3][1] {
				t.Errorf("request %d (%q): %q %v, want %q", i, qa[i%3][0], r.Response.Text, r.Err, qa[i%3][1])
			}
		}
	})
}
