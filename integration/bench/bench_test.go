package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/queue/rabbitmq"
	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

var (
	brokerURL = "amqp://guest:guest@127.0.0.1:5672/"
	seq       atomic.Int64
	declared  itest.Queues // deleted after the run
)

func TestMain(m *testing.M) {
	if u := os.Getenv("RABBITMQ_URL"); u != "" {
		brokerURL = u
	}
	code := m.Run()
	declared.Delete(brokerURL)
	os.Exit(code)
}

// fixedSizer is a constant batch size.
type fixedSizer int

func (s fixedSizer) Size() int    { return int(s) }
func (fixedSizer) Overloaded(int) {}
func (fixedSizer) Succeeded(int)  {}

// instant answers at once.
type instant struct{}

func (instant) Infer(_ context.Context, reqs []inference.Request) ([]inference.Result, error) {
	out := make([]inference.Result, len(reqs))
	for i := range out {
		out[i].Response = inference.Response{Text: "ok", DoneReason: "stop"}
	}
	return out, nil
}

// gpuSim is a simulated GPU: a call of n items takes fixed + perItem×n, and
// more than max items at once run it out of memory.
type gpuSim struct {
	fixed, perItem time.Duration
	max            int
	calls          atomic.Int64
	items          atomic.Int64
}

func (g *gpuSim) Infer(ctx context.Context, reqs []inference.Request) ([]inference.Result, error) {
	if len(reqs) > g.max {
		return nil, &inference.Error{Kind: inference.Overloaded, Code: "out_of_memory", Err: errors.New("simulated OOM")}
	}
	g.calls.Add(1)
	g.items.Add(int64(len(reqs)))
	select {
	case <-time.After(g.fixed + g.perItem*time.Duration(len(reqs))):
	case <-ctx.Done():
		return nil, &inference.Error{Kind: inference.Retryable, Code: "canceled", Err: ctx.Err()}
	}
	return instant{}.Infer(ctx, reqs)
}

type env struct {
	b       *testing.B
	conn    *amqp.Connection
	ch      *amqp.Channel
	queue   string
	results string
	model   string // the workers' default (and only allowed) model
	// streamInterval is the worker's StreamInterval (0: its default, 50ms).
	streamInterval time.Duration
}

func (e *env) limits() wire.Limits {
	return wire.Limits{MaxBodyBytes: 1 << 20, MaxNumPredict: 64, DefaultModel: e.model}
}

func setup(b *testing.B) *env {
	b.Helper()
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		b.Fatalf("RabbitMQ at %s (`rabbitmq-server -detached`): %v", brokerURL, err)
	}
	b.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		b.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		b.Fatal(err)
	}
	q := fmt.Sprintf("sous-bench-%d-%d", os.Getpid(), seq.Add(1))
	e := &env{b: b, conn: conn, ch: ch, queue: q, results: q + ".results", model: "tiny"}
	for _, name := range []string{q, q + ".dlq", e.results} {
		declared.Add(name)
		if _, err := ch.QueueDeclare(name, true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); err != nil {
			b.Fatal(err)
		}
	}
	return e
}

// fill publishes n requests with confirms.
func (e *env) fill(n int) { e.fillWith(n, `{"prompt":"hello","options":{"num_predict":4}}`) }

func (e *env) fillWith(n int, request string) {
	e.b.Helper()
	body := []byte(request)
	confs := make([]*amqp.DeferredConfirmation, 0, n)
	for i := range n {
		c, err := e.ch.PublishWithDeferredConfirmWithContext(context.Background(), "", e.queue, false, false, amqp.Publishing{
			MessageId: fmt.Sprint("m", i), ContentType: "application/json", DeliveryMode: amqp.Persistent, Body: body})
		if err != nil {
			e.b.Fatal(err)
		}
		confs = append(confs, c)
	}
	for _, c := range confs {
		if !c.Wait() {
			e.b.Fatal("request not confirmed")
		}
	}
}

// checkResults consumes n results and fails unless each is a good answer.
// It runs after the timer stops: consuming results is the producers' work,
// which none of the designs compared here does while it is timed.
func (e *env) checkResults(n int) {
	e.b.Helper()
	ch, err := e.conn.Channel()
	if err != nil {
		e.b.Fatal(err)
	}
	defer ch.Close()
	_ = ch.Qos(1000, 0, false)
	ds, err := ch.Consume(e.results, "", true, false, false, false, nil)
	if err != nil {
		e.b.Fatal(err)
	}
	timeout := time.After(5 * time.Minute)
	for got := 0; got < n; got++ {
		select {
		case d := <-ds:
			var r wire.Result
			if json.Unmarshal(d.Body, &r) != nil || r.Status != wire.StatusOK {
				e.b.Fatalf("bad result: %s", d.Body)
			}
		case <-timeout:
			e.b.Fatalf("%d of %d results", got, n)
		}
	}
}

// ackCounter is an Observer that closes done when n deliveries have been
// acked: the in-process worker's own count, which costs the broker nothing,
// as the plain loop's count of its own acks does.
type ackCounter struct {
	worker.NopObserver
	n    int64
	acks atomic.Int64
	done chan struct{}
}

func (c *ackCounter) Done(_ context.Context, _ *queue.Delivery, o worker.Outcome) {
	if o.Settlement.Action == queue.Ack && c.acks.Add(1) == c.n {
		close(c.done)
	}
}

// runSous runs the sous worker in-process on the env's queue until it has
// acked n requests, then checks their results with the timer stopped.
// Connecting the driver is timed: the driver starts consuming as it
// connects, as the plain loop does when it consumes.
func (e *env) runSous(engine worker.Engine, size, concurrency int, n int) {
	e.b.Helper()
	c := &ackCounter{n: int64(n), done: make(chan struct{})}
	stop := e.startSous(engine, size, concurrency, c)
	select {
	case <-c.done:
	case <-time.After(5 * time.Minute):
		e.b.Fatalf("%d of %d requests acked", c.acks.Load(), n)
	}
	e.b.StopTimer()
	stop()
	e.checkResults(n)
	e.b.StartTimer()
}

// startSous connects a driver and starts an in-process worker on it; stop
// drains the worker. obs may be nil.
func (e *env) startSous(engine worker.Engine, size, concurrency int, obs worker.Observer) (stop func()) {
	e.b.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx, cancel := context.WithCancel(context.Background())
	e.b.Cleanup(cancel) // a failed benchmark does not leave the worker running
	d, err := rabbitmq.Open(ctx, rabbitmq.Config{URL: secret.Value(brokerURL), Queue: e.queue, DeadLetterQueue: e.queue + ".dlq", Consume: true, Prefetch: worker.Capacity(size, concurrency)}, log)
	if err != nil {
		e.b.Fatal(err)
	}
	w := worker.New(worker.Config{
		WorkerID: "bench", ResultsQueue: e.results, Concurrency: concurrency, BatchWait: 5 * time.Millisecond,
		Limits: e.limits(), Observer: obs, StreamInterval: e.streamInterval,
	}, d, engine, fixedSizer(size), log)
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	return func() {
		cancel()
		if err := <-done; err != nil {
			e.b.Fatal(err)
		}
		_ = d.Close()
	}
}

// runPlain is the baseline: a plain amqp091-go consume -> engine ->
// publish (confirmed) -> ack loop, one message at a time, at the given
// prefetch.
func (e *env) runPlain(engine worker.Engine, prefetch, n int) {
	e.b.Helper()
	ch, err := e.conn.Channel()
	if err != nil {
		e.b.Fatal(err)
	}
	defer ch.Close()
	if err := ch.Confirm(false); err != nil {
		e.b.Fatal(err)
	}
	if err := ch.Qos(prefetch, 0, false); err != nil {
		e.b.Fatal(err)
	}
	ds, err := ch.Consume(e.queue, "", false, false, false, false, nil)
	if err != nil {
		e.b.Fatal(err)
	}
	for range n {
		d := <-ds
		dec, err := wire.DecodeRequest(d.Body, d.ContentType, d.MessageId, e.limits(), time.Now())
		if err != nil {
			e.b.Fatal(err)
		}
		res, err := engine.Infer(context.Background(), []inference.Request{dec.Req})
		if err != nil || res[0].Err != nil {
			e.b.Fatal(err)
		}
		body, _ := json.Marshal(wire.OKResult(dec.ID, dec.Req, res[0].Response))
		c, err := ch.PublishWithDeferredConfirmWithContext(context.Background(), "", e.results, false, false, amqp.Publishing{
			CorrelationId: d.MessageId, ContentType: "application/json", DeliveryMode: amqp.Persistent, Body: body})
		if err != nil || !c.Wait() {
			e.b.Fatalf("publish: %v", err)
		}
		if err := d.Ack(false); err != nil {
			e.b.Fatal(err)
		}
	}
}

// perSecond reports requests per second of timed work, and returns it.
func perSecond(b *testing.B) float64 {
	rate := float64(b.N) / b.Elapsed().Seconds()
	b.ReportMetric(rate, "msgs/s")
	return rate
}

// baseline remembers a design's rate in one run of a benchmark, so that the
// designs after it report their ratio to it ("x<unit>"): ratios measured
// side by side, on the same broker, minutes apart at most.
type baseline struct {
	n    int
	rate float64
}

func (bl *baseline) set(b *testing.B, rate float64) { bl.n, bl.rate = b.N, rate }

// ratio reports rate / the baseline's, when the baseline ran with the same
// b.N (it did not run when a -bench pattern left it out).
func (bl *baseline) ratio(b *testing.B, rate float64, unit string) {
	if bl.n == b.N && bl.rate > 0 {
		b.ReportMetric(rate/bl.rate, unit)
	}
}

// BenchmarkOverhead: an engine that answers instantly, sous against the
// plain loop at the same prefetch on the same broker. sous's prefetch is
// worker.Capacity(size, 1) = 3 × size, so the plain loop gets that
// prefetch.
func BenchmarkOverhead(b *testing.B) {
	for _, size := range []int{1, 32} {
		prefetch := worker.Capacity(size, 1)
		var plain baseline
		b.Run(fmt.Sprintf("prefetch=%d/design=plain", prefetch), func(b *testing.B) {
			e := setup(b)
			e.fill(b.N)
			b.ResetTimer()
			e.runPlain(instant{}, prefetch, b.N)
			plain.set(b, perSecond(b))
		})
		b.Run(fmt.Sprintf("prefetch=%d/design=sous", prefetch), func(b *testing.B) {
			e := setup(b)
			e.fill(b.N)
			b.ResetTimer()
			e.runSous(instant{}, size, 1, b.N)
			plain.ratio(b, perSecond(b), "xplain")
		})
	}
}

// BenchmarkBatching: a simulated GPU whose call takes 50ms + 2ms per item
// (at most 32 items). Compare sous at size 32 with the ideal n/(a+b·n) and
// with a one-message-at-a-time consumer (prefetch 1, as KEDA's sample
// consumer does).
func BenchmarkBatching(b *testing.B) {
	const fixed, perItem, size = 50 * time.Millisecond, 2 * time.Millisecond, 32
	ideal := float64(size) / (fixed + perItem*size).Seconds()
	b.Run("design=one-at-a-time", func(b *testing.B) {
		e := setup(b)
		e.fill(b.N)
		b.ResetTimer()
		e.runPlain(&gpuSim{fixed: fixed, perItem: perItem, max: size}, 1, b.N)
		perSecond(b)
	})
	b.Run(fmt.Sprintf("design=sous/size=%d", size), func(b *testing.B) {
		e := setup(b)
		e.fill(b.N)
		g := &gpuSim{fixed: fixed, perItem: perItem, max: size}
		b.ResetTimer()
		e.runSous(g, size, 1, b.N)
		b.ReportMetric(perSecond(b)/ideal, "xideal")
		b.ReportMetric(ideal, "ideal-msgs/s")
		if c := g.calls.Load(); c > 0 {
			b.ReportMetric(float64(g.items.Load())/float64(c), "items/batch")
		}
	})
}

// BenchmarkLowLoadLatency: one request at a time through sous against the
// same call made to the engine directly; reports p50 and p99 of both.
func BenchmarkLowLoadLatency(b *testing.B) {
	eng := newHTTPEngine(b)
	b.Run("design=direct", func(b *testing.B) {
		lat := make([]time.Duration, 0, b.N)
		for range b.N {
			t0 := time.Now()
			if _, err := eng.Infer(context.Background(), []inference.Request{{Kind: inference.Generate, Model: "tiny", Prompt: "x"}}); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(t0))
		}
		reportPercentiles(b, lat)
	})
	b.Run("design=sous", func(b *testing.B) {
		e := setup(b)
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
