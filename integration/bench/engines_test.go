package bench

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/inference/ollama"
)

// slotEngine stands in for an engine that batches continuously inside
// (vLLM, TGI, llama.cpp's server, Ollama): it takes one request per call,
// runs up to slots of them at once, and frees a slot the moment one
// answer ends. A request beyond its slots waits in the engine's own queue,
// oldest first, as those engines queue it, rather than failing. A request
// takes fixed + perRunning × (requests running, itself included, when it
// starts) + perToken × its num_predict, and makes exactly num_predict
// tokens.
type slotEngine struct {
	slots                       int
	fixed, perRunning, perToken time.Duration

	sem     chan struct{}
	running atomic.Int64
	busy    atomic.Int64 // slot-nanoseconds spent running requests
	peak    atomic.Int64 // the most requests running at once
	queued  atomic.Int64 // requests that waited in the engine's queue
}

func newSlotEngine(slots int, fixed, perRunning, perToken time.Duration) *slotEngine {
	return &slotEngine{slots: slots, fixed: fixed, perRunning: perRunning, perToken: perToken, sem: make(chan struct{}, slots)}
}

// TakesList says the engine's API takes one request per call, as
// Ollama's /api/generate and OpenAI's /v1/chat/completions do.
func (*slotEngine) TakesList(inference.Kind) bool { return false }

func (e *slotEngine) Infer(ctx context.Context, reqs []inference.Request) ([]inference.Result, error) {
	if len(reqs) != 1 {
		return nil, &inference.Error{Kind: inference.Permanent, Code: "invalid_request", Err: errors.New("this API takes one request per call")}
	}
	tokens := numPredict(reqs[0])
	select {
	case e.sem <- struct{}{}:
	default:
		e.queued.Add(1)
		select {
		case e.sem <- struct{}{}:
		case <-ctx.Done():
			return nil, &inference.Error{Kind: inference.Retryable, Code: "canceled", Err: ctx.Err()}
		}
	}
	n := e.running.Add(1)
	for p := e.peak.Load(); n > p && !e.peak.CompareAndSwap(p, n); p = e.peak.Load() {
	}
	d := e.fixed + e.perRunning*time.Duration(n) + e.perToken*time.Duration(tokens)
	t := time.NewTimer(d)
	start := time.Now()
	var err error
	select {
	case <-t.C:
	case <-ctx.Done():
		t.Stop()
		err = &inference.Error{Kind: inference.Retryable, Code: "canceled", Err: ctx.Err()}
	}
	e.busy.Add(int64(time.Since(start)))
	e.running.Add(-1)
	<-e.sem
	if err != nil {
		return nil, err
	}
	return []inference.Result{{Response: inference.Response{Text: "ok", DoneReason: "length", Usage: inference.Usage{InputTokens: 1, OutputTokens: tokens}}}}, nil
}

// startRun resets the counters for a design's timed run.
func (e *slotEngine) startRun() {
	e.busy.Store(0)
	e.peak.Store(0)
	e.queued.Store(0)
}

// report adds slot-util (the share of slot time spent running requests
// over the timed run), peak-running and engine-queued metrics.
func (e *slotEngine) report(b *testing.B) {
	b.ReportMetric(float64(e.busy.Load())/(float64(b.Elapsed())*float64(e.slots)), "slot-util")
	b.ReportMetric(float64(e.peak.Load()), "peak-running")
	b.ReportMetric(float64(e.queued.Load()), "engine-queued")
}

func numPredict(r inference.Request) int {
	switch v := r.Options["num_predict"].(type) {
	case int64:
		return int(v)
	case int:
		return v
	case float64:
		return int(v)
	}
	return 0
}

// gpuSim is a simulated GPU whose API takes a list and which runs one
// call at a time (later calls wait their turn): a call of n requests takes
// fixed + perItem × n, and more than max requests in one call run it out
// of memory.
type gpuSim struct {
	fixed, perItem time.Duration
	max            int
	mu             sync.Mutex
	calls          atomic.Int64
	items          atomic.Int64
}

// TakesList says one call carries a list of requests of any kind.
func (*gpuSim) TakesList(inference.Kind) bool { return true }

func (g *gpuSim) Infer(ctx context.Context, reqs []inference.Request) ([]inference.Result, error) {
	if len(reqs) > g.max {
		return nil, &inference.Error{Kind: inference.Overloaded, Code: "out_of_memory", Err: errors.New("simulated OOM")}
	}
	g.calls.Add(1)
	g.items.Add(int64(len(reqs)))
	g.mu.Lock() // one call at a time on the device
	defer g.mu.Unlock()
	select {
	case <-time.After(g.fixed + g.perItem*time.Duration(len(reqs))):
	case <-ctx.Done():
		return nil, &inference.Error{Kind: inference.Retryable, Code: "canceled", Err: ctx.Err()}
	}
	out := make([]inference.Result, len(reqs))
	for i, r := range reqs {
		out[i].Response = inference.Response{Text: "ok", DoneReason: "length", Usage: inference.Usage{InputTokens: 1, OutputTokens: numPredict(r)}}
	}
	return out, nil
}

// newHTTPEngine is the Ollama driver against an HTTP server that answers
// /api/generate at once, as Ollama does (one NDJSON line, done), with the
// num_predict asked for as its eval_count, and /api/version and /api/tags
// (the model "tiny") as Ollama does: what is measured is sous, the broker
// and the HTTP path, not a model. Each call starts a server of its own;
// httpEngine.client makes more clients of it.
func newHTTPEngine(b *testing.B) *ollama.Engine { return startHTTPEngine(b).client(b) }

// httpEngine is the server newHTTPEngine starts.
type httpEngine struct{ url string }

// client is a new Ollama driver, with HTTP connections of its own, for the
// server: designs compared side by side each get one, so that neither
// runs on connections (and their goroutines) the other opened.
func (h httpEngine) client(b *testing.B) *ollama.Engine {
	b.Helper()
	e, err := ollama.New(ollama.Config{URL: h.url})
	if err != nil {
		b.Fatal(err)
	}
	return e
}

func startHTTPEngine(b *testing.B) httpEngine {
	b.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/version", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(`{"version":"0.6.5"}`))
	})
	mux.HandleFunc("GET /api/tags", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(`{"models":[{"name":"tiny:latest","model":"tiny:latest"}]}`))
	})
	mux.HandleFunc("POST /api/generate", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Model   string         `json:"model"`
			Options map[string]any `json:"options"`
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		n, _ := req.Options["num_predict"].(float64)
		w.Header().Set("Content-Type", "application/x-ndjson")
		_ = json.NewEncoder(w).Encode(map[string]any{"model": req.Model, "response": "ok", "done": true, "done_reason": "length", "prompt_eval_count": 1, "eval_count": int(n)})
	})
	srv := httptest.NewServer(mux)
	b.Cleanup(srv.Close)
	return httpEngine{url: srv.URL}
}
