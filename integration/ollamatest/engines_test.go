package ollamatest_test

import (
	"slices"
	"testing"

	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/inference/ollama"
	"github.com/sous-run/sous/internal/inference/openai"
)

// TestEngineDiscovery asks the real Ollama, through both engine drivers,
// what the worker asks an engine about itself: the models it has, which
// kinds go as one list call, and how many requests it runs at once.
func TestEngineDiscovery(t *testing.T) {
	t.Parallel()
	srv := ollamatest.StartT(t, ollamatest.Options{NumParallel: 2, Aliases: []string{"alias-a", "team/alias-b:v1"}})
	ctx := ctxT(t)
	// Ollama lists every model with its tag, and without the default
	// registry and namespace.
	want := []string{"tiny:latest", "tiny-endless:latest", "alias-a:latest", "team/alias-b:v1"}

	checkModels := func(t *testing.T, got []string) {
		t.Helper()
		for _, w := range want {
			if !slices.Contains(got, w) {
				t.Errorf("models %q lack %q", got, w)
			}
		}
		for name, has := range map[string]bool{
			srv.Model():                       true, // "tiny" is "tiny:latest"
			srv.EndlessModel():                true,
			"alias-a":                         true,
			"team/alias-b:v1":                 true,
			"team/alias-b":                    false, // that would be team/alias-b:latest
			"library/tiny":                    true,
			"tiny:v2":                         false,
			"no-such-model":                   false,
			"registry.ollama.ai/library/tiny": true,
		} {
			if got := inference.HasModel(got, name); got != has {
				t.Errorf("HasModel(%q) = %v, want %v", name, got, has)
			}
		}
	}

	t.Run("ollama", func(t *testing.T) {
		e, err := ollama.New(ollama.Config{URL: srv.URL()})
		if err != nil {
			t.Fatal(err)
		}
		models, err := e.Models(ctx)
		if err != nil {
			t.Fatal(err)
		}
		checkModels(t, models)
		if !e.TakesList(inference.Embed) || e.TakesList(inference.Generate) || e.TakesList(inference.Chat) {
			t.Error("TakesList: want embed only")
		}
		// OLLAMA_NUM_PARALLEL is 2, but Ollama says it nowhere.
		if n, source, err := e.Slots(ctx); n != 0 || source != "" || err != nil {
			t.Errorf("Slots = %d, %q, %v; want 0, \"\", nil", n, source, err)
		}
	})

	t.Run("openai", func(t *testing.T) {
		e, err := openai.New(openai.Config{URL: srv.URL() + "/v1", APIKey: "sk-ignored"})
		if err != nil {
			t.Fatal(err)
		}
		models, err := e.Models(ctx)
		if err != nil {
			t.Fatal(err)
		}
		checkModels(t, models)
		// Ollama 0.6.5 answers 404 to /props, /info and /metrics: it
		// cannot say, which is no error.
		if n, source, err := e.Slots(ctx); n != 0 || source != "" || err != nil {
			t.Errorf("Slots = %d, %q, %v; want 0, \"\", nil", n, source, err)
		}
		if running, waiting, ok, err := e.Queue(ctx); ok || running != 0 || waiting != 0 || err != nil {
			t.Errorf("Queue = %d, %d, %v, %v; want 0, 0, false, nil", running, waiting, ok, err)
		}
		if !e.TakesList(inference.Embed) || e.TakesList(inference.Chat) {
			t.Error("TakesList: embed must, chat must not")
		}
		// Auto mode says lists until it has tried one; Ollama refuses a
		// list of prompts, and from then on TakesList says so.
		if !e.TakesList(inference.Generate) {
			t.Fatal("TakesList(generate) = false before auto mode has tried a list")
		}
		reqs := make([]inference.Request, 2)
		for i := range reqs {
			reqs[i] = inference.Request{Kind: inference.Generate, Model: srv.Model(), Prompt: "hi", Options: map[string]any{"num_predict": int64(3)}}
		}
		res, err := e.Infer(ctx, reqs)
		if err != nil || res[0].Err != nil || res[1].Err != nil {
			t.Fatalf("infer: %+v %v", res, err)
		}
		if e.TakesList(inference.Generate) || e.ListSupported() != -1 {
			t.Errorf("after Ollama refused a list: TakesList(generate) = %v, state %d", e.TakesList(inference.Generate), e.ListSupported())
		}
	})
}
