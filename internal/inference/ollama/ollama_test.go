package ollama_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/inference/ollama"
)

// setup starts a real Ollama with the tiny model behind a counting proxy.
func setup(t *testing.T) (*ollama.Engine, *ollamatest.Server, map[string]*atomic.Int32) {
	t.Helper()
	srv := ollamatest.StartT(t, ollamatest.Options{NumParallel: 4})
	target, _ := url.Parse(srv.URL())
	proxy := httputil.NewSingleHostReverseProxy(target)
	calls := map[string]*atomic.Int32{"/api/generate": {}, "/api/chat": {}, "/api/embed": {}}
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c, ok := calls[r.URL.Path]; ok {
			c.Add(1)
		}
		// Full duplex: otherwise the server closes the request body when the
		// engine's answer starts, the proxy's transport, still finishing the
		// body it forwards, fails and cuts the answer short ("ReverseProxy
		// read error during body copy: use of closed network connection",
		// golang/go#40747), now and then, on a loaded machine.
		_ = http.NewResponseController(w).EnableFullDuplex()
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(front.Close)
	e, err := ollama.New(ollama.Config{URL: front.URL})
	if err != nil {
		t.Fatal(err)
	}
	return e, srv, calls
}

func TestRealOllama(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e, srv, calls := setup(t)
	if err := e.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.Load(ctx, srv.Model()); err != nil {
		t.Fatalf("preload: %v", err)
	}
	opts := map[string]any{"num_predict": int64(6), "seed": int64(3)}
	gen := make([]inference.Request, 4)
	for i := range gen {
		gen[i] = inference.Request{Kind: inference.Generate, Model: srv.Model(), Prompt: "hello", Options: opts}
	}
	res, err := e.Infer(ctx, gen)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range res {
		if r.Err != nil || r.Response.Text == "" || r.Response.Usage.OutputTokens == 0 || r.Response.Usage.OutputTokens > 6 || r.Response.Usage.InputTokens == 0 || r.Response.DoneReason == "" {
			t.Fatalf("generate %d: %+v", i, r)
		}
	}
	chat, err := e.Infer(ctx, []inference.Request{{Kind: inference.Chat, Model: srv.Model(), System: "be brief", Messages: []inference.Message{{Role: "user", Content: "hi"}}, Options: opts}})
	if err != nil || chat[0].Err != nil || chat[0].Response.Message.Role != "assistant" || chat[0].Response.Message.Content == "" {
		t.Fatalf("chat: %+v %v", chat, err)
	}
	var deltas int
	st, err := e.Infer(ctx, []inference.Request{{Kind: inference.Generate, Model: srv.Model(), Prompt: "x", Options: opts, Stream: func(string) { deltas++ }}})
	if err != nil || st[0].Err != nil || deltas < 2 {
		t.Fatalf("stream: %d deltas %+v %v", deltas, st, err)
	}
	// A batch of embedding requests is ONE /api/embed call.
	before := calls["/api/embed"].Load()
	emb, err := e.Infer(ctx, []inference.Request{
		{Kind: inference.Embed, Model: srv.Model(), Input: []string{"a", "b"}},
		{Kind: inference.Embed, Model: srv.Model(), Input: []string{"c"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := calls["/api/embed"].Load() - before; got != 1 {
		t.Fatalf("%d /api/embed calls for one batch, want 1", got)
	}
	if len(emb[0].Response.Embeddings) != 2 || len(emb[1].Response.Embeddings) != 1 || len(emb[0].Response.Embeddings[0]) != 64 {
		t.Fatalf("embeddings split: %d %d", len(emb[0].Response.Embeddings), len(emb[1].Response.Embeddings))
	}
	missing, err := e.Infer(ctx, []inference.Request{{Kind: inference.Generate, Model: "no-such-model", Prompt: "x"}})
	if err != nil || inference.KindOf(missing[0].Err) != inference.Permanent || inference.CodeOf(missing[0].Err) != "model_not_found" {
		t.Fatalf("missing model: %v %v", missing[0].Err, err)
	}
}

func TestEngineKilledIsRetryable(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	srv := ollamatest.StartT(t, ollamatest.Options{})
	e, err := ollama.New(ollama.Config{URL: srv.URL()})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan []inference.Result, 1)
	started := make(chan struct{})
	var once sync.Once
	go func() {
		res, _ := e.Infer(ctx, []inference.Request{{Kind: inference.Generate, Model: srv.EndlessModel(), Prompt: "x",
			Options: map[string]any{"num_predict": int64(100000)}, Stream: func(string) { once.Do(func() { close(started) }) }}})
		done <- res
	}()
	select { // kill it mid-generation
	case <-started:
	case <-ctx.Done():
		t.Fatal("generation never started")
	}
	srv.Kill()
	res := <-done
	if res[0].Err == nil || inference.KindOf(res[0].Err) != inference.Retryable {
		t.Fatalf("killed engine: %v (%s), want retryable", res[0].Err, inference.KindOf(res[0].Err))
	}
	if err := e.Ping(ctx); inference.CodeOf(err) != "engine_unavailable" {
		t.Fatalf("ping a dead engine: %v", err)
	}
	if err := srv.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.Ping(ctx); err != nil {
		t.Fatalf("ping after restart: %v", err)
	}
}
