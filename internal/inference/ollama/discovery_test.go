package ollama_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/inference/ollama"
)

// tags answers GET /api/tags as Ollama 0.6.5 does: api.ListResponse with
// one api.ListModelResponse per model, Name and Model both
// Name.DisplayShortest() (server/routes.go ListHandler in
// github.com/ollama/ollama@v0.6.5).
const tags = `{"models":[{"name":"tiny-endless:latest","model":"tiny-endless:latest","modified_at":"2026-11-27T15:40:01Z","size":1048576,"digest":"9f4b3c2a","details":{"parent_model":"","format":"gguf","family":"llama","families":["llama"],"parameter_size":"262.14K","quantization_level":"F32"}},{"name":"team/alias-b:v1","model":"team/alias-b:v1","modified_at":"2026-11-27T15:40:00Z","size":1048576,"digest":"9f4b3c2a","details":{"format":"gguf"}},{"name":"tiny:latest","model":"tiny:latest","modified_at":"2026-11-27T15:39:59Z","size":1048576,"digest":"9f4b3c2a","details":{"format":"gguf"}}]}`

func engineFor(t *testing.T, h http.HandlerFunc) *ollama.Engine {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	e, err := ollama.New(ollama.Config{URL: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func TestModelsFromTags(t *testing.T) {
	t.Parallel()
	e := engineFor(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || r.URL.Path != "/api/tags" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, tags)
	})
	got, err := e.Models(context.Background())
	want := []string{"tiny-endless:latest", "team/alias-b:v1", "tiny:latest"}
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("Models = %q, %v; want %q", got, err, want)
	}
	if !inference.HasModel(got, "tiny") || inference.HasModel(got, "team/alias-b") {
		t.Fatal("HasModel disagrees with Ollama's names")
	}
}

func TestModelsErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		h    http.HandlerFunc
		code string
	}{
		{"server error", func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusInternalServerError)
			fmt.Fprint(w, `{"error":"open /root/.ollama/models/manifests: permission denied"}`)
		}, "engine_error"},
		{"not Ollama", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html")
			fmt.Fprint(w, "<html>hello</html>")
		}, "engine_unavailable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got, err := engineFor(t, tt.h).Models(context.Background())
			if got != nil || inference.CodeOf(err) != tt.code {
				t.Fatalf("Models = %q, %v (%s); want code %s", got, err, inference.CodeOf(err), tt.code)
			}
		})
	}
	t.Run("unreachable", func(t *testing.T) {
		t.Parallel()
		e, _ := ollama.New(ollama.Config{URL: "http://127.0.0.1:1"})
		if _, err := e.Models(context.Background()); inference.CodeOf(err) != "engine_unavailable" {
			t.Fatalf("err = %v (%s)", err, inference.CodeOf(err))
		}
	})
}

func TestTakesListAndSlots(t *testing.T) {
	t.Parallel()
	var asked atomic.Int32
	e := engineFor(t, func(w http.ResponseWriter, r *http.Request) { asked.Add(1); http.NotFound(w, r) })
	for k, want := range map[inference.Kind]bool{inference.Embed: true, inference.Generate: false, inference.Chat: false, 0: false} {
		if got := e.TakesList(k); got != want {
			t.Errorf("TakesList(%s) = %v, want %v", k, got, want)
		}
	}
	if n, source, err := e.Slots(context.Background()); n != 0 || source != "" || err != nil {
		t.Fatalf("Slots = %d, %q, %v; want 0, \"\", nil", n, source, err)
	}
	if n := asked.Load(); n != 0 {
		t.Fatalf("Slots asked the server %d times; Ollama has nothing to ask", n)
	}
}

// The worker finds these abilities by type assertion: the signatures are
// the contract.
var _ interface {
	TakesList(inference.Kind) bool
	Slots(context.Context) (int, string, error)
	Models(context.Context) ([]string, error)
} = (*ollama.Engine)(nil)
