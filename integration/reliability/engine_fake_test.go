package reliability

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeEngine speaks the part of Ollama's API the worker uses. It answers
// each prompt with "echo:" + the prompt, so a result proves which request
// it belongs to, after delay; it can hang or fail on demand. Safe for
// concurrent use; its knobs can change while the worker runs.
type fakeEngine struct {
	srv *httptest.Server

	delay    atomic.Int64 // nanoseconds per call
	hang     atomic.Bool  // hold every call until the client gives up
	status   atomic.Int64 // answer with this HTTP status when non-zero
	errorMsg atomic.Value // string: the error text of a failing answer

	calls    atomic.Int64
	inflight atomic.Int64
	maxIn    atomic.Int64

	closing   chan struct{}
	closeOnce sync.Once
}

func newFakeEngine(t testing.TB) *fakeEngine {
	t.Helper()
	e := &fakeEngine{closing: make(chan struct{})}
	e.errorMsg.Store("simulated engine failure")
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/version", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(`{"version":"0.6.5"}`))
	})
	mux.HandleFunc("GET /api/tags", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(`{"models":[{"name":"tiny:latest","model":"tiny:latest"}]}`))
	})
	mux.HandleFunc("GET /", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("Ollama is running")) })
	mux.HandleFunc("POST /api/generate", func(w http.ResponseWriter, r *http.Request) { e.serve(w, r, false) })
	mux.HandleFunc("POST /api/chat", func(w http.ResponseWriter, r *http.Request) { e.serve(w, r, true) })
	e.srv = httptest.NewServer(mux)
	t.Cleanup(e.close)
	return e
}

func (e *fakeEngine) close() {
	e.closeOnce.Do(func() {
		close(e.closing)
		e.srv.CloseClientConnections()
		e.srv.Close()
	})
}

func (e *fakeEngine) URL() string { return e.srv.URL }

func (e *fakeEngine) setDelay(d time.Duration) { e.delay.Store(int64(d)) }

func (e *fakeEngine) serve(w http.ResponseWriter, r *http.Request, chat bool) {
	var req struct {
		Model    string `json:"model"`
		Prompt   string `json:"prompt"`
		Messages []struct {
			Content string `json:"content"`
		} `json:"messages"`
		Stream *bool `json:"stream"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, `{"error":"bad request"}`, http.StatusBadRequest)
		return
	}
	e.calls.Add(1)
	n := e.inflight.Add(1)
	defer e.inflight.Add(-1)
	for {
		m := e.maxIn.Load()
		if n <= m || e.maxIn.CompareAndSwap(m, n) {
			break
		}
	}
	if e.hang.Load() {
		select {
		case <-r.Context().Done():
		case <-e.closing:
		}
		return
	}
	if d := time.Duration(e.delay.Load()); d > 0 {
		select {
		case <-time.After(d):
		case <-r.Context().Done():
			return
		case <-e.closing:
			return
		}
	}
	if s := e.status.Load(); s != 0 {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(int(s))
		_ = json.NewEncoder(w).Encode(map[string]string{"error": e.errorMsg.Load().(string)})
		return
	}
	prompt := req.Prompt
	if chat && len(req.Messages) > 0 {
		prompt = req.Messages[len(req.Messages)-1].Content
	}
	out := map[string]any{
		"model": req.Model, "created_at": time.Now().UTC().Format(time.RFC3339Nano),
		"done": true, "done_reason": "stop", "prompt_eval_count": 1, "eval_count": 1,
	}
	if chat {
		out["message"] = map[string]string{"role": "assistant", "content": "echo:" + prompt}
	} else {
		out["response"] = "echo:" + prompt
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	_ = json.NewEncoder(w).Encode(out)
}
