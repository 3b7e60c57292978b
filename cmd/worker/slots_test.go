package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"

	"github.com/sous-run/sous/internal/inference"
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

type recordSlots struct{ got []int }

func (r *recordSlots) SetEngineParallel(n int) { r.got = append(r.got, n) }

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
		want []int // SetEngineParallel calls; none: the configured or default value stays
	}{
		{"configured wins", Config{EngineParallel: "8", Engine: "openai"}, slotsEngine{n: 16, src: "llama.cpp /props"}, nil},
		{"the engine says", Config{EngineParallel: "auto", Engine: "openai"}, slotsEngine{n: 16, src: "llama.cpp /props"}, []int{16}},
		{"the engine cannot say", Config{EngineParallel: "auto", Engine: "openai"}, slotsEngine{}, nil},
		{"the engine fails", Config{EngineParallel: "auto", Engine: "openai"}, slotsEngine{err: errors.New("refused")}, nil},
		{"the child Ollama's variable", Config{EngineParallel: "auto", Engine: "ollama", EngineExec: "ollama serve", OllamaNumParallel: "6"}, slotsEngine{}, []int{6}},
		{"an Ollama not ours", Config{EngineParallel: "auto", Engine: "ollama", OllamaNumParallel: "6"}, slotsEngine{}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := &recordSlots{}
			engineSlots(context.Background(), tt.cfg, tt.eng, r, log)
			if len(r.got) != len(tt.want) || (len(r.got) > 0 && r.got[0] != tt.want[0]) {
				t.Fatalf("SetEngineParallel calls %v, want %v", r.got, tt.want)
			}
		})
	}
}
