package openai_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/inference/openai"
)

// vllm answers the way vLLM documents its OpenAI-compatible server: a list
// of prompts gets one choice per prompt, each with its index.
type vllm struct {
	mu    sync.Mutex
	calls map[string]int
	auth  []string
}

func (v *vllm) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	v.mu.Lock()
	v.calls[r.URL.Path]++
	v.auth = append(v.auth, r.Header.Get("Authorization"))
	v.mu.Unlock()
	var body map[string]any
	_ = json.NewDecoder(r.Body).Decode(&body)
	if body["model"] == "missing" {
		w.WriteHeader(http.StatusNotFound)
		fmt.Fprint(w, `{"object":"error","message":"The model `+"`missing`"+` does not exist.","type":"NotFoundError","code":404}`)
		return
	}
	if body["model"] == "busy" {
		w.WriteHeader(http.StatusTooManyRequests)
		fmt.Fprint(w, `{"error":{"message":"too many requests"}}`)
		return
	}
	switch r.URL.Path {
	case "/v1/completions":
		prompts, ok := body["prompt"].([]any)
		if !ok {
			prompts = []any{body["prompt"]}
		}
		var choices []map[string]any
		for i := len(prompts) - 1; i >= 0; i-- { // out of order on purpose
			choices = append(choices, map[string]any{"index": i, "text": fmt.Sprintf("re:%v max=%v", prompts[i], body["max_tokens"]), "finish_reason": "length"})
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"choices": choices, "usage": map[string]int{"prompt_tokens": 10 * len(prompts), "completion_tokens": 4 * len(prompts)}})
	case "/v1/chat/completions":
		if body["stream"] == true {
			w.Header().Set("Content-Type", "text/event-stream")
			for _, d := range []string{"he", "llo"} {
				fmt.Fprintf(w, "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":%q}}]}\n\n", d)
			}
			fmt.Fprint(w, "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n")
			fmt.Fprint(w, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n")
			fmt.Fprint(w, "data: [DONE]\n\n")
			return
		}
		msgs := body["messages"].([]any)
		last := msgs[len(msgs)-1].(map[string]any)["content"]
		_ = json.NewEncoder(w).Encode(map[string]any{"choices": []map[string]any{{"index": 0, "message": map[string]string{"role": "assistant", "content": fmt.Sprintf("you said %v", last)}, "finish_reason": "stop"}}, "usage": map[string]int{"prompt_tokens": 5, "completion_tokens": 3}})
	case "/v1/embeddings":
		in := body["input"].([]any)
		var data []map[string]any
		for i := len(in) - 1; i >= 0; i-- {
			data = append(data, map[string]any{"index": i, "embedding": []float32{float32(i), float32(len(in[i].(string)))}})
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"data": data})
	default:
		http.NotFound(w, r)
	}
}

func setup(t *testing.T, cfg openai.Config) (*openai.Engine, *vllm) {
	t.Helper()
	v := &vllm{calls: map[string]int{}}
	srv := httptest.NewServer(v)
	t.Cleanup(srv.Close)
	cfg.URL = srv.URL
	e, err := openai.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return e, v
}

func prompts(model string, n int) []inference.Request {
	out := make([]inference.Request, n)
	for i := range out {
		out[i] = inference.Request{Kind: inference.Generate, Model: model, Prompt: fmt.Sprint("p", i), Options: map[string]any{"num_predict": int64(7)}}
	}
	return out
}

func TestPromptsGoAsOneListCall(t *testing.T) {
	t.Parallel()
	e, v := setup(t, openai.Config{APIKey: "sk-test-key"})
	res, err := e.Infer(context.Background(), prompts("m", 5))
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range res {
		if r.Err != nil || r.Response.Text != fmt.Sprintf("re:p%d max=7", i) || r.Response.Usage.InputTokens != 10 || r.Response.DoneReason != "length" {
			t.Fatalf("result %d: %+v", i, r)
		}
	}
	if v.calls["/v1/completions"] != 1 {
		t.Fatalf("%d calls for 5 prompts, want 1", v.calls["/v1/completions"])
	}
	if v.auth[0] != "Bearer sk-test-key" {
		t.Fatalf("auth header %q", v.auth[0])
	}
	if e.ListSupported() != 1 {
		t.Fatal("list support not remembered")
	}
}

func TestSingleModeAndChatAndEmbeddings(t *testing.T) {
	t.Parallel()
	e, v := setup(t, openai.Config{BatchPrompts: openai.BatchSingle})
	if _, err := e.Infer(context.Background(), prompts("m", 3)); err != nil {
		t.Fatal(err)
	}
	if v.calls["/v1/completions"] != 3 {
		t.Fatalf("single mode made %d calls, want 3", v.calls["/v1/completions"])
	}
	chat := []inference.Request{{Kind: inference.Chat, Model: "m", System: "be brief", Messages: []inference.Message{{Role: "user", Content: "hi"}}}}
	res, err := e.Infer(context.Background(), chat)
	if err != nil || res[0].Err != nil || res[0].Response.Message.Content != "you said hi" || res[0].Response.Usage.OutputTokens != 3 {
		t.Fatalf("chat: %+v %v", res, err)
	}
	emb := []inference.Request{{Kind: inference.Embed, Model: "m", Input: []string{"a", "bb"}}, {Kind: inference.Embed, Model: "m", Input: []string{"ccc"}}}
	res, err = e.Infer(context.Background(), emb)
	if err != nil {
		t.Fatal(err)
	}
	if len(res[0].Response.Embeddings) != 2 || res[0].Response.Embeddings[1][1] != 2 || res[1].Response.Embeddings[0][0] != 2 || res[1].Response.Embeddings[0][1] != 3 {
		t.Fatalf("embeddings split wrong: %+v", res)
	}
	if v.calls["/v1/embeddings"] != 1 {
		t.Fatalf("embeddings made %d calls, want 1", v.calls["/v1/embeddings"])
	}
}

func TestStreamChat(t *testing.T) {
	t.Parallel()
	e, _ := setup(t, openai.Config{})
	var deltas []string
	req := inference.Request{Kind: inference.Chat, Model: "m", Messages: []inference.Message{{Role: "user", Content: "x"}}, Stream: func(d string) { deltas = append(deltas, d) }}
	res, err := e.Infer(context.Background(), []inference.Request{req})
	if err != nil || res[0].Err != nil {
		t.Fatal(err, res)
	}
	if strings.Join(deltas, "|") != "he|llo" || res[0].Response.Message.Content != "hello" || res[0].Response.DoneReason != "stop" || res[0].Response.Usage.OutputTokens != 2 {
		t.Fatalf("stream: %v %+v", deltas, res[0].Response)
	}
}

func TestErrorsAreClassified(t *testing.T) {
	t.Parallel()
	e, _ := setup(t, openai.Config{APIKey: "sk-secret-value"})
	tests := []struct {
		model string
		kind  inference.ErrorKind
		code  string
	}{
		{"missing", inference.Permanent, "model_not_found"},
		{"busy", inference.Overloaded, "engine_busy"},
	}
	for _, tt := range tests {
		res, err := e.Infer(context.Background(), []inference.Request{{Kind: inference.Chat, Model: tt.model, Messages: []inference.Message{{Role: "user", Content: "x"}}}})
		if err != nil {
			t.Fatal(err)
		}
		if inference.KindOf(res[0].Err) != tt.kind || inference.CodeOf(res[0].Err) != tt.code {
			t.Errorf("%s: %v (%s), want %s", tt.model, res[0].Err, inference.KindOf(res[0].Err), tt.code)
		}
		if strings.Contains(res[0].Err.Error(), "sk-secret-value") {
			t.Error("API key in an error")
		}
	}
	down, _ := openai.New(openai.Config{URL: "http://127.0.0.1:1", APIKey: "sk-secret-value"})
	_, err := down.Infer(context.Background(), []inference.Request{{Kind: inference.Embed, Model: "m", Input: []string{"x"}}})
	var ie *inference.Error
	if !errors.As(err, &ie) || ie.Kind != inference.Retryable || ie.Code != "engine_unavailable" {
		t.Fatalf("engine down: %v", err)
	}
}

func TestCutStreamIsNotAnAnswer(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"The sky\"}}]}\n\n")
		// and then the engine dies: no finish_reason, no [DONE]
	}))
	defer srv.Close()
	e, _ := openai.New(openai.Config{URL: srv.URL})
	res, err := e.Infer(context.Background(), []inference.Request{{Kind: inference.Chat, Model: "m", Messages: []inference.Message{{Role: "user", Content: "x"}}, Stream: func(string) {}}})
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Err == nil || inference.KindOf(res[0].Err) != inference.Retryable {
		t.Fatalf("a cut stream gave %+v, want a retryable error", res[0])
	}
}

func TestTimeoutsStayTimeouts(t *testing.T) {
	t.Parallel()
	block := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-block }))
	defer srv.Close()
	defer close(block)
	e, _ := openai.New(openai.Config{URL: srv.URL, APIKey: "sk-abcdef"})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	res, _ := e.Infer(ctx, []inference.Request{{Kind: inference.Chat, Model: "m", Messages: []inference.Message{{Role: "user", Content: "x"}}}})
	if inference.CodeOf(res[0].Err) != "engine_timeout" || !errors.Is(res[0].Err, context.DeadlineExceeded) {
		t.Fatalf("got %v (%s)", res[0].Err, inference.CodeOf(res[0].Err))
	}
}

func TestPanickingStreamCallbackIsContained(t *testing.T) {
	t.Parallel()
	e, _ := setup(t, openai.Config{})
	res, err := e.Infer(context.Background(), []inference.Request{{Kind: inference.Chat, Model: "m", Messages: []inference.Message{{Role: "user", Content: "x"}}, Stream: func(string) { panic("observer bug") }}})
	if err != nil || res[0].Err == nil || inference.CodeOf(res[0].Err) != "internal_error" {
		t.Fatalf("got %+v %v", res, err)
	}
}
