package openai_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/inference/openai"
)

// TestRealOllamaV1 runs the engine against a real Ollama's /v1 endpoints.
// Ollama 0.6.5 answers 400 to a list of prompts, so auto mode must detect
// that once and fall back to single calls.
func TestRealOllamaV1(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv := ollamatest.StartT(t, ollamatest.Options{NumParallel: 2})
	target, _ := url.Parse(srv.URL())
	var completionCalls atomic.Int32
	proxy := httputil.NewSingleHostReverseProxy(target)
	counting := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/completions" {
			completionCalls.Add(1)
		}
		// Full duplex: otherwise the server closes the request body when the
		// engine's answer starts, the proxy's transport, still finishing the
		// body it forwards, fails and cuts the answer short ("ReverseProxy
		// read error during body copy: use of closed network connection",
		// golang/go#40747), now and then, on a loaded machine.
		_ = http.NewResponseController(w).EnableFullDuplex()
		proxy.ServeHTTP(w, r)
	}))
	defer counting.Close()
	e, err := openai.New(openai.Config{URL: counting.URL})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Ping(ctx); err != nil {
		t.Fatalf("ping: %v", err)
	}
	reqs := prompts(srv.EndlessModel(), 3) // never stops early: the answers are never empty
	res, err := e.Infer(ctx, reqs)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range res {
		if r.Err != nil || r.Response.Text == "" || r.Response.Usage.OutputTokens == 0 {
			t.Fatalf("prompt %d: %+v", i, r)
		}
	}
	if e.ListSupported() != -1 {
		t.Fatalf("auto mode did not learn that Ollama refuses prompt lists (state %d)", e.ListSupported())
	}
	if got := completionCalls.Load(); got != 4 {
		t.Fatalf("%d /v1/completions calls, want 1 refused list + 3 singles", got)
	}
	// Learned once: the next batch goes straight to single calls.
	if _, err := e.Infer(ctx, prompts(srv.EndlessModel(), 2)); err != nil {
		t.Fatal(err)
	}
	if got := completionCalls.Load(); got != 6 {
		t.Fatalf("%d calls after the second batch, want 6", got)
	}
	chat, err := e.Infer(ctx, []inference.Request{{Kind: inference.Chat, Model: srv.Model(), Messages: []inference.Message{{Role: "user", Content: "hi"}}, Options: map[string]any{"num_predict": int64(5)}}})
	if err != nil || chat[0].Err != nil || chat[0].Response.Message == nil {
		t.Fatalf("chat: %+v %v", chat, err)
	}
	emb, err := e.Infer(ctx, []inference.Request{{Kind: inference.Embed, Model: srv.Model(), Input: []string{"a", "b"}}, {Kind: inference.Embed, Model: srv.Model(), Input: []string{"c"}}})
	if err != nil || len(emb[0].Response.Embeddings) != 2 || len(emb[1].Response.Embeddings) != 1 || len(emb[1].Response.Embeddings[0]) == 0 {
		t.Fatalf("embeddings: %+v %v", emb, err)
	}
	// The stream goes straight to Ollama: the counting proxy above once cut
	// a stream under load ("ReverseProxy read error during body copy: use of
	// closed network connection"), a failure of the test's proxy, not of the
	// engine or of Ollama.
	direct, err := openai.New(openai.Config{URL: srv.URL()})
	if err != nil {
		t.Fatal(err)
	}
	var streamed int
	st, err := direct.Infer(ctx, []inference.Request{{Kind: inference.Generate, Model: srv.EndlessModel(), Prompt: "x", Options: map[string]any{"num_predict": int64(6)}, Stream: func(string) { streamed++ }}})
	if err != nil || st[0].Err != nil || streamed == 0 || st[0].Response.Text == "" {
		t.Fatalf("stream: %d deltas, %+v %v", streamed, st, err)
	}
	missing, _ := e.Infer(ctx, []inference.Request{{Kind: inference.Chat, Model: "no-such-model", Messages: []inference.Message{{Role: "user", Content: "x"}}}})
	if inference.CodeOf(missing[0].Err) != "model_not_found" {
		t.Fatalf("missing model: %v", missing[0].Err)
	}
}
