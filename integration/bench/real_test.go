package bench

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/inference/ollama"
)

// BenchmarkRealOllama: the real Ollama with the tiny model and 4 parallel
// slots. sous against a one-at-a-time consumer and against a plain client
// that calls the engine directly with its full parallelism (no broker).
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
	// The endless model never stops early, so every request makes exactly
	// num_predict tokens and the designs do the same work.
	model := srv.EndlessModel()
	request := `{"prompt":"hello","options":{"num_predict":16,"temperature":0}}`
	one := inference.Request{Kind: inference.Generate, Model: model, Prompt: "hello", Options: map[string]any{"num_predict": int64(16), "temperature": 0.0}}
	if _, err := eng.Infer(ctx, []inference.Request{one}); err != nil { // load the model
		b.Fatal(err)
	}
	var plain, oneAtATime baseline
	b.Run("design=plain-client-parallel", func(b *testing.B) {
		next := make(chan struct{}, b.N)
		for range b.N {
			next <- struct{}{}
		}
		close(next)
		b.ResetTimer()
		var wg sync.WaitGroup
		for range parallel {
			wg.Go(func() {
				for range next {
					if res, err := eng.Infer(ctx, []inference.Request{one}); err != nil || res[0].Err != nil {
						b.Error(err, res[0].Err)
						return
					}
				}
			})
		}
		wg.Wait()
		plain.set(b, perSecond(b))
	})
	b.Run("design=one-at-a-time", func(b *testing.B) {
		e := setup(b)
		e.model = model
		e.fillWith(b.N, request)
		b.ResetTimer()
		e.runPlain(eng, 1, b.N)
		oneAtATime.set(b, perSecond(b))
	})
	for _, conc := range []int{1, 2} {
		b.Run(fmt.Sprintf("design=sous/concurrency=%d", conc), func(b *testing.B) {
			e := setup(b)
			e.model = model
			e.fillWith(b.N, request)
			b.ResetTimer()
			e.runSous(eng, parallel, conc, b.N)
			rate := perSecond(b)
			plain.ratio(b, rate, "xplain-client")
			oneAtATime.ratio(b, rate, "xone-at-a-time")
		})
	}
}
