package bench

import (
	"context"
	"encoding/json"
	"sort"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

// BenchmarkLowLoadLatency: one request at a time through sous (at its
// defaults, SOUS_ENGINE_PARALLEL=4) against the same call made to the
// engine directly; reports p50 and p99 of both. The engine answers at once
// over HTTP (the Ollama driver against an httptest server). Target: sous
// adds p50 < 5 ms, p99 < 20 ms.
func BenchmarkLowLoadLatency(b *testing.B) {
	eng := newHTTPEngine(b)
	work := uniform(1)
	b.Run("design=direct", func(b *testing.B) {
		lat := make([]time.Duration, 0, b.N)
		for i := range b.N {
			t0 := time.Now()
			if _, err := eng.Infer(context.Background(), []inference.Request{work.request("tiny", i)}); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(t0))
		}
		reportPercentiles(b, lat)
	})
	b.Run("design=sous", func(b *testing.B) {
		e := setup(b, "tiny", work)
		lat := e.roundTrips(eng, b.N)
		reportPercentiles(b, lat)
	})
}

func reportPercentiles(b *testing.B, lat []time.Duration) {
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	p := func(q float64) float64 {
		return float64(lat[min(len(lat)-1, int(q*float64(len(lat))))].Microseconds()) / 1000
	}
	b.ReportMetric(p(0.50), "p50-ms")
	b.ReportMetric(p(0.99), "p99-ms")
}

// roundTrips sends n requests one at a time through a running worker and
// returns each publish-to-result latency; each result must answer the
// request just sent.
func (e *env) roundTrips(engine worker.Engine, n int) []time.Duration {
	e.b.Helper()
	stop := e.startSous(engine, 4, nil)
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
			MessageId: requestID(i), ContentType: "application/json", Body: e.work.body(i)}); err != nil {
			e.b.Fatal(err)
		}
		select {
		case d := <-ds:
			lat = append(lat, time.Since(t0))
			var r wire.Result
			if err := json.Unmarshal(d.Body, &r); err != nil || r.Status != wire.StatusOK || r.ID != requestID(i) {
				e.b.Fatalf("request %s: result %s", requestID(i), d.Body)
			}
		case <-time.After(30 * time.Second):
			e.b.Fatal("no result")
		}
	}
	e.b.StopTimer()
	return lat
}
