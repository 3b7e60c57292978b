package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/inference/ollama"
	"github.com/sous-run/sous/internal/worker"
)

// newHTTPEngine is the Ollama driver against an HTTP server that answers
// /api/generate at once, so latency figures show sous and the network path,
// not a model.
func newHTTPEngine(b *testing.B) *ollama.Engine {
	b.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		_ = json.NewEncoder(w).Encode(map[string]any{"model": "tiny", "response": "ok", "done": true, "done_reason": "stop", "prompt_eval_count": 1, "eval_count": 1})
	}))
	b.Cleanup(srv.Close)
	e, err := ollama.New(ollama.Config{URL: srv.URL})
	if err != nil {
		b.Fatal(err)
	}
	return e
}

// roundTrips sends n requests one at a time through a running worker and
// returns each publish-to-result latency.
func (e *env) roundTrips(engine worker.Engine, n int) []time.Duration {
	e.b.Helper()
	stop := e.startSous(engine, 4, 1, nil)
	defer stop()
	ch, err := e.conn.Channel()
	if err != nil {
		e.b.Fatal(err)
	}
	defer ch.Close()
	ds, err := ch.Consume(e.results, "", true, false, false, false, nil)
	if err != nil {
		e.b.Fatal(err)
	}
	pub, err := e.conn.Channel()
	if err != nil {
		e.b.Fatal(err)
	}
	defer pub.Close()
	lat := make([]time.Duration, 0, n)
	e.b.ResetTimer()
	for i := range n {
		t0 := time.Now()
		if err := pub.PublishWithContext(context.Background(), "", e.queue, false, false, amqp.Publishing{
			MessageId: fmt.Sprint("l", i), ContentType: "application/json", Body: []byte(`{"prompt":"x"}`)}); err != nil {
			e.b.Fatal(err)
		}
		select {
		case <-ds:
		case <-time.After(30 * time.Second):
			e.b.Fatal("no result")
		}
		lat = append(lat, time.Since(t0))
	}
	return lat
}
