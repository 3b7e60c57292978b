package bench

import (
	"context"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/inference/ollama"
)

// BenchmarkRealOllama: the real Ollama (the dev binary, $SOUS_OLLAMA_BIN)
// with the tiny model and OLLAMA_NUM_PARALLEL=4; answers of mixed length,
// 9 requests in 10 asking for 8 tokens and 1 in 10 for 128, from the model
// that never stops early, so every request makes exactly the tokens it
// asks for and both designs do the same work. A plain client keeping 4
// requests in flight against Ollama directly (no broker) against sous at
// its defaults with SOUS_ENGINE_PARALLEL=4, through the local RabbitMQ.
// Target: sous ≥ 0.9 of the plain client.
func BenchmarkRealOllama(b *testing.B) {
	const parallel = 4
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	srv, err := ollamatest.Start(ctx, ollamatest.Options{NumParallel: parallel})
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Stop(context.Background())
	eng, err := ollama.New(ollama.Config{URL: srv.URL()})
	if err != nil {
		b.Fatal(err)
	}
	model := srv.EndlessModel()
	work := mixed(8, 128)
	work.temperature = true
	if _, err := eng.Infer(ctx, []inference.Request{work.request(model, 0)}); err != nil { // load the model
		b.Fatal(err)
	}
	var plain baseline
	b.Run("design=plain-client", func(b *testing.B) {
		runDirect(b, eng, model, work, parallel, b.N)
		plain.set(b, perSecond(b))
	})
	b.Run("design=sous", func(b *testing.B) {
		e := setup(b, model, work)
		e.fill(b.N)
		b.ResetTimer()
		e.runSous(eng, parallel, b.N)
		plain.ratio(b, perSecond(b), "xplain-client")
	})
}
