package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/sizing"
)

type slotsEngine struct {
	n   int
	src string
	err error
}

func (slotsEngine) Infer(context.Context, []inference.Request) ([]inference.Result, error) {
	return nil, nil
}
func (e slotsEngine) Slots(context.Context) (int, string, error) { return e.n, e.src, e.err }

// TestEngineSlots: which slot count is in force, in order: the variable,
// the child Ollama's OLLAMA_NUM_PARALLEL, what the engine says, the
// default.
func TestEngineSlots(t *testing.T) {
	t.Parallel()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	tests := []struct {
		name string
		cfg  Config
		eng  slotsEngine
		want int // the sizer's in-flight limit after (its Max is 32; the worker starts it at the configured or default slots)
	}{
		{"configured wins", Config{EngineParallel: "8", Engine: "openai"}, slotsEngine{n: 16, src: "llama.cpp /props"}, 8},
		{"the engine says", Config{EngineParallel: "auto", Engine: "openai"}, slotsEngine{n: 16, src: "llama.cpp /props"}, 16},
		{"the engine cannot say", Config{EngineParallel: "auto", Engine: "openai"}, slotsEngine{}, 4},
		{"the engine fails", Config{EngineParallel: "auto", Engine: "openai"}, slotsEngine{err: errors.New("refused")}, 4},
		{"the child Ollama's variable", Config{EngineParallel: "auto", Engine: "ollama", EngineExec: "ollama serve", OllamaNumParallel: "6"}, slotsEngine{}, 6},
		{"an Ollama not ours", Config{EngineParallel: "auto", Engine: "ollama", OllamaNumParallel: "6"}, slotsEngine{}, 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			sz, err := sizing.New(nil, sizing.Config{EngineParallel: tt.cfg.fixedParallel()})
			if err != nil {
				t.Fatal(err)
			}
			engineSlots(context.Background(), tt.cfg, tt.eng, sz, log)()
			if got := sz.Size().Size; got != tt.want {
				t.Fatalf("in-flight limit %d, want %d", got, tt.want)
			}
		})
	}
}

// TestEngineSlotsAdaptive: an OpenAI-compatible server that says no slot
// count but shows vLLM's running/waiting gauges gets slots adapted to its
// wait queue: through the real driver, over real HTTP, the limit grows
// while the server runs everything it gets and nothing waits.
func TestEngineSlotsAdaptive(t *testing.T) {
	t.Parallel()
	var running atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintf(w, "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine=\"0\",model_name=\"m\"} %d\nvllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 0\n", running.Load())
	}))
	defer srv.Close()
	cfg := Config{EngineParallel: "auto", Engine: "openai", EngineURL: srv.URL + "/v1", EngineQueueInterval: 5 * time.Millisecond, Model: "m"}
	eng, err := newEngine(cfg)
	if err != nil {
		t.Fatal(err)
	}
	sz, err := sizing.New(nil, sizing.Config{EngineParallel: cfg.fixedParallel()})
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	stop := engineSlots(context.Background(), cfg, eng, sz, slog.New(slog.NewTextHandler(&logs, nil)))
	defer stop()
	// The server runs every request sous keeps in flight: the limit
	// doubles each reading up to SOUS_BATCH_MAX's default, 32.
	deadline := time.Now().Add(10 * time.Second)
	for sz.Size().Size < 32 {
		running.Store(int64(sz.Size().Size))
		if time.Now().After(deadline) {
			t.Fatalf("in-flight limit %+v, want 32 by now", sz.Size())
		}
		time.Sleep(time.Millisecond)
	}
	if !strings.Contains(logs.String(), "adaptive") {
		t.Fatalf("no log line says the slots are adaptive:\n%s", logs.String())
	}
}

// TestSizerChangeReachesTheWorker: a change of the in-flight limit (here
// the engine's slots, as engineSlots sets them) calls the function set
// with OnChange, the worker's SizeChanged in run: the sizer's OnChange was
// never set, so a larger limit waited for some call to end.
func TestSizerChangeReachesTheWorker(t *testing.T) {
	t.Parallel()
	cfg, err := loadConfig([]string{"SOUS_MODEL=m"})
	if err != nil {
		t.Fatal(err)
	}
	sz, stop, err := startSizer(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	var called atomic.Int64
	sz.OnChange(func() { called.Add(1) })
	before := sz.Size()
	sz.SetEngineParallel(before + 3)
	if sz.Size() != before+3 {
		t.Fatalf("in-flight limit %d, want %d", sz.Size(), before+3)
	}
	if called.Load() == 0 {
		t.Fatal("the limit grew and nothing was told")
	}
}
