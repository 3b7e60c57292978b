package ollamatest_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/tinymodel"
)

// weatherTool is the function schema a client offers the scripted model.
var weatherTool = map[string]any{
	"type": "function",
	"function": map[string]any{
		"name":        tinymodel.WeatherTool,
		"description": "Get the current weather for a city",
		"parameters": map[string]any{
			"type":       "object",
			"required":   []string{"city"},
			"properties": map[string]any{"city": map[string]any{"type": "string", "description": "the city"}},
		},
	},
}

type toolChatResponse struct {
	Message struct {
		Role      string `json:"role"`
		Content   string `json:"content"`
		ToolCalls []struct {
			Function struct {
				Name      string         `json:"name"`
				Arguments map[string]any `json:"arguments"`
			} `json:"function"`
		} `json:"tool_calls"`
	} `json:"message"`
	Done       bool   `json:"done"`
	DoneReason string `json:"done_reason"`
	EvalCount  int    `json:"eval_count"`
}

// TestScripted checks that the scripted model answers exactly what its
// scripts say, through the real Ollama, whatever the sampling options.
func TestScripted(t *testing.T) {
	t.Parallel()
	srv := ollamatest.StartT(t, ollamatest.Options{NumParallel: 4})
	ctx := ctxT(t)
	url := srv.URL()
	model := srv.ScriptedModel()

	qa := []struct{ q, a string }{
		{tinymodel.SkyQuestion, tinymodel.SkyAnswer},
		{tinymodel.QueueQuestion, tinymodel.QueueAnswer},
		{tinymodel.CountQuestion, tinymodel.CountAnswer},
		{tinymodel.WeatherQuestion, tinymodel.WeatherToolCall}, // no tools offered: plain text
		{"Tell me a story.", tinymodel.FallbackAnswer},
	}
	for _, opts := range []map[string]any{
		{"temperature": 0},
		{"temperature": 1, "seed": 7},
		{"temperature": 1.5, "top_k": 100, "top_p": 1},
	} {
		for _, c := range qa {
			t.Run(fmt.Sprintf("generate %v %q", opts, c.q), func(t *testing.T) {
				got := decode[generateResponse](t, post(t, ctx, url+"/api/generate", map[string]any{
					"model": model, "prompt": c.q, "stream": false, "options": opts,
				}))
				if got.Response != c.a || got.DoneReason != "stop" {
					t.Errorf("answer %q (%s), want %q (stop)", got.Response, got.DoneReason, c.a)
				}
			})
			t.Run(fmt.Sprintf("chat %v %q", opts, c.q), func(t *testing.T) {
				got := decode[chatResponse](t, post(t, ctx, url+"/api/chat", map[string]any{
					"model": model, "stream": false, "options": opts,
					"messages": []map[string]string{{"role": "system", "content": "be brief"}, {"role": "user", "content": c.q}},
				}))
				if got.Message == nil || got.Message.Content != c.a {
					t.Errorf("answer %+v, want %q", got.Message, c.a)
				}
			})
		}
	}

	t.Run("num_predict cuts a script", func(t *testing.T) {
		got := decode[generateResponse](t, post(t, ctx, url+"/api/generate", map[string]any{
			"model": model, "prompt": tinymodel.SkyQuestion, "stream": false, "options": map[string]any{"num_predict": 3},
		}))
		if got.Response != "The sky is blue because" || got.DoneReason != "length" || *got.EvalCount != 3 {
			t.Errorf("answer %q (%s, %d tokens), want the first 3 pieces (length)", got.Response, got.DoneReason, *got.EvalCount)
		}
	})

	t.Run("stream reassembles, one line per token", func(t *testing.T) {
		a := post(t, ctx, url+"/api/generate", map[string]any{"model": model, "prompt": tinymodel.SkyQuestion})
		var text strings.Builder
		var lines int
		sc := bufio.NewScanner(bytes.NewReader(a.body))
		for sc.Scan() {
			var c generateResponse
			if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
				t.Fatal(err)
			}
			text.WriteString(c.Response)
			lines++
		}
		if text.String() != tinymodel.SkyAnswer || lines != 8 {
			t.Errorf("streamed %q in %d lines, want %q in 7 + 1", text.String(), lines, tinymodel.SkyAnswer)
		}
	})

	t.Run("concurrent requests each get their own answer", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan string, 60)
		for i := range 60 {
			c := qa[i%len(qa)]
			wg.Go(func() {
				a, err := postErr(ctx, url+"/api/generate", map[string]any{
					"model": model, "prompt": c.q, "stream": false, "options": map[string]any{"temperature": 1, "seed": i},
				})
				if err != nil {
					errs <- err.Error()
					return
				}
				var got generateResponse
				if a.status != http.StatusOK || json.Unmarshal(a.body, &got) != nil || got.Response != c.a {
					errs <- fmt.Sprintf("%q: HTTP %d %s", c.q, a.status, a.body)
				}
			})
		}
		wg.Wait()
		close(errs)
		for e := range errs {
			t.Error(e)
		}
	})

	// The agent loop on Ollama's own API.
	user := map[string]any{"role": "user", "content": tinymodel.WeatherQuestion}
	call := map[string]any{"role": "assistant", "content": "", "tool_calls": []map[string]any{
		{"function": map[string]any{"name": tinymodel.WeatherTool, "arguments": map[string]any{"city": "Paris"}}},
	}}
	result := map[string]any{"role": "tool", "content": tinymodel.WeatherToolResult}
	for _, stream := range []bool{false, true} {
		t.Run(fmt.Sprintf("tool call stream=%v", stream), func(t *testing.T) {
			a := post(t, ctx, url+"/api/chat", map[string]any{
				"model": model, "stream": stream, "tools": []any{weatherTool}, "messages": []any{user},
			})
			if a.status != http.StatusOK {
				t.Fatalf("HTTP %d: %s", a.status, a.body)
			}
			var calls []string
			var last toolChatResponse
			sc := bufio.NewScanner(bytes.NewReader(a.body))
			for sc.Scan() {
				last = toolChatResponse{}
				if err := json.Unmarshal(sc.Bytes(), &last); err != nil {
					t.Fatal(err)
				}
				for _, c := range last.Message.ToolCalls {
					b, _ := json.Marshal(c.Function.Arguments)
					calls = append(calls, c.Function.Name+string(b))
				}
				if last.Message.Content != "" {
					t.Errorf("content %q beside the tool call", last.Message.Content)
				}
			}
			if want := tinymodel.WeatherTool + `{"city":"Paris"}`; len(calls) != 1 || calls[0] != want || !last.Done {
				t.Errorf("tool calls %q (done %v), want [%s]", calls, last.Done, want)
			}
		})
		t.Run(fmt.Sprintf("second turn stream=%v", stream), func(t *testing.T) {
			a := post(t, ctx, url+"/api/chat", map[string]any{
				"model": model, "stream": stream, "tools": []any{weatherTool}, "messages": []any{user, call, result},
			})
			var text strings.Builder
			sc := bufio.NewScanner(bytes.NewReader(a.body))
			for sc.Scan() {
				var c toolChatResponse
				if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
					t.Fatal(err)
				}
				text.WriteString(c.Message.Content)
			}
			if text.String() != tinymodel.WeatherAnswer {
				t.Errorf("answer %q, want %q", text.String(), tinymodel.WeatherAnswer)
			}
		})
	}
	t.Run("tool result without the call is not the script", func(t *testing.T) {
		got := decode[chatResponse](t, post(t, ctx, url+"/api/chat", map[string]any{
			"model": model, "stream": false, "messages": []any{user, map[string]any{"role": "assistant", "content": "hm"}, result},
		}))
		if got.Message.Content != tinymodel.FallbackAnswer {
			t.Errorf("answer %q, want the fallback", got.Message.Content)
		}
	})

	// Two calls in one answer (parallel tool calls), then both results.
	for _, stream := range []bool{false, true} {
		t.Run(fmt.Sprintf("parallel tool calls stream=%v", stream), func(t *testing.T) {
			puser := map[string]any{"role": "user", "content": tinymodel.ParallelQuestion}
			a := post(t, ctx, url+"/api/chat", map[string]any{
				"model": model, "stream": stream, "tools": []any{weatherTool}, "messages": []any{puser},
			})
			if a.status != http.StatusOK {
				t.Fatalf("HTTP %d: %s", a.status, a.body)
			}
			var calls []string
			sc := bufio.NewScanner(bytes.NewReader(a.body))
			for sc.Scan() {
				var c toolChatResponse
				if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
					t.Fatal(err)
				}
				for _, tc := range c.Message.ToolCalls {
					b, _ := json.Marshal(tc.Function.Arguments)
					calls = append(calls, tc.Function.Name+string(b))
				}
			}
			want := []string{tinymodel.WeatherTool + `{"city":"Paris"}`, tinymodel.WeatherTool + `{"city":"London"}`}
			if !slices.Equal(calls, want) {
				t.Fatalf("tool calls %q, want %q", calls, want)
			}
			pcall := map[string]any{"role": "assistant", "content": "", "tool_calls": []map[string]any{
				{"function": map[string]any{"name": tinymodel.WeatherTool, "arguments": map[string]any{"city": "Paris"}}},
				{"function": map[string]any{"name": tinymodel.WeatherTool, "arguments": map[string]any{"city": "London"}}},
			}}
			a = post(t, ctx, url+"/api/chat", map[string]any{
				"model": model, "stream": stream, "tools": []any{weatherTool}, "messages": []any{puser, pcall,
					map[string]any{"role": "tool", "content": tinymodel.WeatherToolResult},
					map[string]any{"role": "tool", "content": tinymodel.ParallelToolResult}},
			})
			var text strings.Builder
			sc = bufio.NewScanner(bytes.NewReader(a.body))
			for sc.Scan() {
				var c toolChatResponse
				if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
					t.Fatal(err)
				}
				text.WriteString(c.Message.Content)
			}
			if text.String() != tinymodel.ParallelAnswer {
				t.Errorf("answer %q, want %q", text.String(), tinymodel.ParallelAnswer)
			}
		})
	}

	// The same loop through Ollama's OpenAI-compatible API: arguments are a
	// JSON string, and an assistant message with tool calls has content null
	// (Ollama 0.6.5 drops the tool calls of a message whose content is a
	// string).
	t.Run("v1 chat completions", func(t *testing.T) {
		type v1 struct {
			Choices []struct {
				Message struct {
					Content   string `json:"content"`
					ToolCalls []struct {
						ID       string `json:"id"`
						Type     string `json:"type"`
						Function struct {
							Name      string `json:"name"`
							Arguments string `json:"arguments"`
						} `json:"function"`
					} `json:"tool_calls"`
				} `json:"message"`
				FinishReason string `json:"finish_reason"`
			} `json:"choices"`
		}
		first := decode[v1](t, post(t, ctx, url+"/v1/chat/completions", map[string]any{
			"model": model, "tools": []any{weatherTool}, "tool_choice": "auto", "messages": []any{user},
		}))
		if len(first.Choices) != 1 || len(first.Choices[0].Message.ToolCalls) != 1 {
			t.Fatalf("answer %+v", first)
		}
		tc := first.Choices[0].Message.ToolCalls[0]
		if tc.Function.Name != tinymodel.WeatherTool || tc.Function.Arguments != `{"city":"Paris"}` || tc.ID == "" || first.Choices[0].FinishReason != "tool_calls" {
			t.Errorf("tool call %+v, finish %q", tc, first.Choices[0].FinishReason)
		}
		for _, content := range []any{nil, ""} {
			second := decode[v1](t, post(t, ctx, url+"/v1/chat/completions", map[string]any{
				"model": model, "tools": []any{weatherTool}, "messages": []any{
					user,
					map[string]any{"role": "assistant", "content": content, "tool_calls": []any{tc}},
					map[string]any{"role": "tool", "tool_call_id": tc.ID, "content": tinymodel.WeatherToolResult},
				},
			}))
			want := tinymodel.WeatherAnswer
			if content != nil {
				want = tinymodel.FallbackAnswer // the call was dropped
			}
			if got := second.Choices[0].Message.Content; got != want {
				t.Errorf("content %#v: answer %q, want %q", content, got, want)
			}
		}
	})
}
