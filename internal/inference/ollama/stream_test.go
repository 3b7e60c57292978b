package ollama_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/ollama/ollama/api"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/inference/ollama"
)

// fakeOllama answers /api/generate with the given NDJSON lines and status.
func fakeOllama(t testing.TB, status int, lines ...string) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(status)
		for _, l := range lines {
			fmt.Fprintln(w, l)
		}
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

func TestStreamErrorsAreClassified(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		status int
		lines  []string
		kind   inference.ErrorKind
		code   string
	}{
		{"out of memory mid-stream", 200, []string{`{"response":"a","done":false}`, `{"error":"CUDA error: out of memory"}`}, inference.Overloaded, "out_of_memory"},
		{"model too big", 500, []string{`{"error":"model requires more system memory (16 GiB) than is available (8 GiB)"}`}, inference.Overloaded, "out_of_memory"},
		{"missing model", 404, []string{`{"error":"model 'x' not found"}`}, inference.Permanent, "model_not_found"},
		{"busy", 503, []string{`{"error":"server busy, please try again.  maximum pending requests exceeded"}`}, inference.Overloaded, "engine_busy"},
		{"not json", 502, []string{`<html>bad gateway</html>`}, inference.Retryable, "engine_error"},
		{"cut short", 200, []string{`{"response":"a","done":false}`}, inference.Retryable, "engine_error"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e, err := ollama.New(ollama.Config{URL: fakeOllama(t, tt.status, tt.lines...)})
			if err != nil {
				t.Fatal(err)
			}
			res, _ := e.Infer(context.Background(), []inference.Request{{Kind: inference.Generate, Model: "m", Prompt: "x"}})
			if res[0].Err == nil || inference.KindOf(res[0].Err) != tt.kind || inference.CodeOf(res[0].Err) != tt.code {
				t.Fatalf("got %v (%s, %s), want %s %s", res[0].Err, inference.KindOf(res[0].Err), inference.CodeOf(res[0].Err), tt.kind, tt.code)
			}
		})
	}
}

// BenchmarkGenerate compares the memory one generation call costs: sous's
// NDJSON reader against the official client's, on the same answer.
func BenchmarkGenerate(b *testing.B) {
	lines := make([]string, 0, 65)
	for range 64 {
		lines = append(lines, `{"model":"m","response":"tok","done":false}`)
	}
	lines = append(lines, `{"model":"m","response":"","done":true,"done_reason":"stop","prompt_eval_count":3,"eval_count":64}`)
	base := fakeOllama(b, 200, lines...)
	b.Run("client=sous", func(b *testing.B) {
		e, _ := ollama.New(ollama.Config{URL: base})
		req := []inference.Request{{Kind: inference.Generate, Model: "m", Prompt: "x"}}
		b.ReportAllocs()
		for b.Loop() {
			if res, err := e.Infer(context.Background(), req); err != nil || res[0].Err != nil || !strings.HasPrefix(res[0].Response.Text, "toktok") {
				b.Fatal(err, res)
			}
		}
	})
	b.Run("client=official", func(b *testing.B) {
		u, _ := url.Parse(base)
		c := api.NewClient(u, http.DefaultClient)
		stream := false
		b.ReportAllocs()
		for b.Loop() {
			n := 0
			if err := c.Generate(context.Background(), &api.GenerateRequest{Model: "m", Prompt: "x", Stream: &stream}, func(api.GenerateResponse) error { n++; return nil }); err != nil || n != 65 {
				b.Fatal(err, n)
			}
		}
	})
}
