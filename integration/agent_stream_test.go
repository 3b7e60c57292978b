package integration

import (
	"encoding/json"
	"fmt"
	"testing"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/tinymodel"
)

// TestStreamedToolCallChunk: with stream set, the tool call the engine
// makes goes out in a chunk as soon as it is whole, and the final result
// repeats it with the same id and done_reason tool_calls, for both engine
// drivers against the real Ollama with the scripted model.
func TestStreamedToolCallChunk(t *testing.T) {
	t.Parallel()
	for _, eng := range scriptedEngines {
		t.Run(eng.name, func(t *testing.T) {
			t.Parallel()
			q, _ := names(t)
			startScriptedWorker(t, q, eng.env...)
			c := newClient(t)
			replies := q + ".replies"
			c.declare(replies)
			chunks, res := c.stream(q, replies, "s1", fmt.Sprintf(`{"messages":[{"role":"user","content":%q}],"tools":[%s],"stream":true}`, tinymodel.WeatherQuestion, weatherTool))
			var streamed []inference.ToolCall
			for _, k := range chunks {
				streamed = append(streamed, k.ToolCalls...)
			}
			if len(streamed) != 1 || streamed[0].Function.Name != "get_weather" || streamed[0].ID == "" {
				t.Fatalf("streamed tool calls %+v, want one get_weather call with an id", streamed)
			}
			var args map[string]any
			if err := json.Unmarshal(streamed[0].Function.Arguments, &args); err != nil || args["city"] != "Paris" {
				t.Fatalf("streamed arguments %s: want {\"city\":\"Paris\"}", streamed[0].Function.Arguments)
			}
			if res.Message == nil || len(res.Message.ToolCalls) != 1 || res.Message.ToolCalls[0].ID != streamed[0].ID || res.DoneReason != "tool_calls" {
				t.Fatalf("final result %+v, want the same call (id %s) and done_reason tool_calls", res, streamed[0].ID)
			}
		})
	}
}
