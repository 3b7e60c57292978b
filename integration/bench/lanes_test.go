package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sort"
	"sync"
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

// The lanes benchmarks (issue 24) run on the stand-in engine with 32
// slots, each design side by side in one run:
//
//   - lanes: one worker, two lanes (interactive, and bulk at the default
//     share 0.1), one engine of 32 slots;
//   - one-queue: today's single lane, interactive and bulk in one queue;
//   - split-8-24: two single-lane workers, interactive on an engine of 8
//     slots and bulk on one of 24 (two Deployments);
//   - idle: the interactive requests alone, on an idle worker.
//
// A request's time on the engine is 5 ms + 1 ms per output token.
const (
	laneSlots    = 32
	laneFixed    = 5 * time.Millisecond
	lanePerToken = time.Millisecond
)

// lanePrompt names request k of lane l ("i3", "b17"): the prompt and the
// message id, so the engine and the results know whose it is.
func lanePrompt(l byte, k int) string { return string(l) + fmt.Sprint(k) }

// clockEngine is a slotEngine that notes when each request starts and
// ends on it, by prompt, and the slot-time each lane (the prompt's first
// letter) spends.
type clockEngine struct {
	*slotEngine
	mu     sync.Mutex
	starts map[string]time.Time
	ends   map[string]time.Time
}

func newClockEngine(slots int) *clockEngine {
	return &clockEngine{slotEngine: newSlotEngine(slots, laneFixed, 0, lanePerToken), starts: map[string]time.Time{}, ends: map[string]time.Time{}}
}

func (e *clockEngine) Infer(ctx context.Context, reqs []inference.Request) ([]inference.Result, error) {
	p := reqs[0].Prompt
	start := time.Now()
	res, err := e.slotEngine.Infer(ctx, reqs)
	end := time.Now()
	e.mu.Lock()
	e.starts[p], e.ends[p] = start, end
	e.mu.Unlock()
	return res, err
}

// slotSeconds is the slot-time requests of lane l spent on the engine
// within [from, to].
func (e *clockEngine) slotSeconds(l byte, from, to time.Time) float64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	total := 0.0
	for p, s := range e.starts {
		if p[0] != l {
			continue
		}
		s, end := maxTime(s, from), e.ends[p]
		if end.After(to) {
			end = to
		}
		if end.After(s) {
			total += end.Sub(s).Seconds()
		}
	}
	return total
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// laneRun is one design's queues, workers and publishers.
type laneRun struct {
	b       *testing.B
	conn    *amqp.Connection
	pub     *amqp.Channel
	results string
	mu      sync.Mutex
	sent    map[string]time.Time // prompt → publish time
	acks    atomic.Int64
}

func newLaneRun(b *testing.B) *laneRun {
	b.Helper()
	conn, ch := publisher(b)
	r := &laneRun{b: b, conn: conn, pub: ch, sent: map[string]time.Time{}}
	r.results = r.queue("results")
	return r
}

// queue declares a fresh queue named for this run and what, and its DLQ,
// as the worker's driver declares them.
func (r *laneRun) queue(what string) string {
	q := fmt.Sprintf("sous-bench-lanes-%d-%s", seq.Add(1), what)
	for name, args := range map[string]amqp.Table{
		q:          {"x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": q + ".dlq", "x-delivery-limit": int64(maxAttempts)},
		q + ".dlq": {"x-queue-type": "quorum"},
	} {
		declared.Add(name)
		if _, err := r.pub.QueueDeclare(name, true, false, false, false, args); err != nil {
			r.b.Fatal(err)
		}
	}
	return q
}

// publish sends the request named p asking for tokens to queue q, with
// deadline when it is not zero, confirmed, and notes when it was sent.
func (r *laneRun) publish(q, p string, tokens int, deadline time.Time) {
	body := fmt.Appendf(nil, `{"prompt":%q,"options":{"num_predict":%d}`, p, tokens)
	if !deadline.IsZero() {
		body = fmt.Appendf(body, `,"deadline":%q`, deadline.UTC().Format(time.RFC3339Nano))
	}
	body = append(body, '}')
	r.mu.Lock()
	r.sent[p] = time.Now()
	r.mu.Unlock()
	c, err := r.pub.PublishWithDeferredConfirmWithContext(context.Background(), "", q, false, false, amqp.Publishing{
		MessageId: p, ContentType: "application/json", DeliveryMode: amqp.Persistent, Body: body})
	if err != nil {
		r.b.Fatal(err)
	}
	if !c.Wait() {
		r.b.Fatal("request not confirmed")
	}
}

// laneSpec is one lane of a worker: its name, queue and share.
type laneSpec struct {
	name, queue string
	share       float64
	window      int // the lane's window option; 0: the default
}

// start runs a worker on lanes with an engine of slots, as cmd/worker
// builds it (the default sizer, a driver per lane); stop drains it.
func (r *laneRun) start(eng worker.Engine, slots int, ls ...laneSpec) (stop func()) {
	r.b.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx, cancel := context.WithCancel(context.Background())
	r.b.Cleanup(cancel)
	sizer := newDefaultSizer(r.b, slots)
	var wl []worker.Lane
	var drivers []*rabbitmq.Driver
	for _, l := range ls {
		d, err := rabbitmq.Open(ctx, rabbitmq.Config{
			URL: secret.Value(brokerURL), Queue: l.queue, DeadLetterQueue: l.queue + ".dlq",
			Declare: true, ExtraQueues: []string{r.results}, DeliveryLimit: maxAttempts,
			Prefetch: max(l.window, worker.Capacity(sizer.Size())), ConnectionName: "sous-bench-lanes", Consume: true,
		}, log)
		if err != nil {
			r.b.Fatal(err)
		}
		drivers = append(drivers, d)
		wl = append(wl, worker.Lane{Name: l.name, Share: l.share, Broker: d, Window: l.window})
	}
	w := worker.NewLanes(worker.Config{WorkerID: "bench", ResultsQueue: r.results, Limits: wire.Limits{MaxBodyBytes: 1 << 20, MaxNumPredict: 4096, DefaultModel: "tiny"}, Observer: ackCounter{&r.acks}}, wl, eng, sizer, log)
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	return func() {
		cancel()
		if err := <-done; err != nil {
			r.b.Fatal(err)
		}
		for _, d := range drivers {
			_ = d.Close()
		}
	}
}

// ackCounter counts the deliveries a worker has finished with (acked).
type ackCounter struct{ n *atomic.Int64 }

func (ackCounter) Received(ctx context.Context, _ *queue.Delivery) context.Context { return ctx }
func (ackCounter) BatchStarted(ctx context.Context, _ *worker.BatchEvent) context.Context {
	return ctx
}
func (ackCounter) EngineCall(ctx context.Context, _ worker.EngineCall) (context.Context, func([]inference.Result)) {
	return ctx, func([]inference.Result) {}
}
func (ackCounter) BatchFinished(context.Context, *worker.BatchEvent, time.Duration) {}
func (ackCounter) Publishing(context.Context, *queue.Message, string) func(error) {
	return func(error) {}
}
func (ackCounter) Settling(context.Context, *queue.Delivery, queue.Settlement) func(error) {
	return func(error) {}
}
func (c ackCounter) Done(_ context.Context, _ *queue.Delivery, _ worker.Outcome) { c.n.Add(1) }
func (ackCounter) EngineHealth(error)                                            {}

// waitDone waits until the workers are finished with n deliveries.
func (r *laneRun) waitDone(n int) {
	r.b.Helper()
	if !itest.Eventually(10*time.Minute, func() bool { return r.acks.Load() >= int64(n) }) {
		r.b.Fatalf("%d of %d requests settled", r.acks.Load(), n)
	}
}

// checkOnce fails unless the results queue holds exactly one result for
// each prompt in want, ok unless it is in expired (then an expired error),
// and nothing else.
func (r *laneRun) checkOnce(want []string, expired map[string]bool) {
	r.b.Helper()
	if !itest.Eventually(time.Minute, func() bool { return itest.QueueDepth(r.b, r.conn, r.results) >= len(want) }) {
		r.b.Fatalf("%d results for %d requests", itest.QueueDepth(r.b, r.conn, r.results), len(want))
	}
	seen := map[string]int{}
	for _, d := range itest.Drain(r.b, r.conn, r.results) {
		var res wire.Result
		if err := json.Unmarshal(d.Body, &res); err != nil {
			r.b.Fatalf("bad result: %s", d.Body)
		}
		if expired[res.ID] {
			if res.Error == nil || res.Error.Code != wire.ReasonExpired {
				r.b.Fatalf("%s: %s, want expired", res.ID, d.Body)
			}
		} else if res.Status != wire.StatusOK {
			r.b.Fatalf("%s: %s", res.ID, d.Body)
		}
		seen[res.ID]++
	}
	for _, p := range want {
		if seen[p] != 1 {
			r.b.Fatalf("request %s answered %d times, want once", p, seen[p])
		}
		delete(seen, p)
	}
	if len(seen) > 0 {
		r.b.Fatalf("results for requests never sent: %v", seen)
	}
}

// bulkTokens is the output length of bulk request k: mixed, 16 to 256
// tokens, the same sequence in every design.
func bulkTokens(k int) int { return 16 + (k*37)%241 }

// interactiveTokens is an agent's short turn.
const interactiveTokens = 16

// BenchmarkLanes compares the designs on interactive requests arriving at
// 10 a second into a bulk backlog. b.N is the number of interactive
// requests; the backlog is 50 bulk requests per interactive one, at most
// 5,000. It reports, per design, the interactive queue-to-start latency
// (publish to the engine starting it: its time to first token but for
// the engine's own prefill) p50 and p99, and slot-util, the share of the
// 32 slots busy from the first publish until the last bulk request ends;
// every request is answered exactly once or the benchmark fails.
func BenchmarkLanes(b *testing.B) {
	type design struct {
		name string
		run  func(r *laneRun, inter, bulk string) (engines []*clockEngine, stop func())
	}
	for _, d := range []design{
		{"idle", func(r *laneRun, inter, _ string) ([]*clockEngine, func()) {
			e := newClockEngine(laneSlots)
			return []*clockEngine{e}, r.start(e, laneSlots, laneSpec{name: "interactive", queue: inter, share: 0})
		}},
		{"lanes", func(r *laneRun, inter, bulk string) ([]*clockEngine, func()) {
			e := newClockEngine(laneSlots)
			return []*clockEngine{e}, r.start(e, laneSlots, laneSpec{name: "interactive", queue: inter, share: 0}, laneSpec{name: "bulk", queue: bulk, share: 0.1})
		}},
		{"one-queue", func(r *laneRun, inter, _ string) ([]*clockEngine, func()) {
			e := newClockEngine(laneSlots)
			return []*clockEngine{e}, r.start(e, laneSlots, laneSpec{name: "default", queue: inter, share: 0})
		}},
		{"split-8-24", func(r *laneRun, inter, bulk string) ([]*clockEngine, func()) {
			ei, eb := newClockEngine(8), newClockEngine(24)
			stopI := r.start(ei, 8, laneSpec{name: "default", queue: inter, share: 0})
			stopB := r.start(eb, 24, laneSpec{name: "default", queue: bulk, share: 0})
			return []*clockEngine{ei, eb}, func() { stopI(); stopB() }
		}},
	} {
		b.Run("design="+d.name, func(b *testing.B) {
			nI, nB := b.N, min(5000, 50*b.N)
			r := newLaneRun(b)
			inter := r.queue("interactive")
			bulk := inter // one-queue: the same queue
			if d.name != "one-queue" {
				bulk = r.queue("bulk")
			}
			var want []string
			nBulk := nB
			if d.name == "idle" {
				nBulk = 0
			}
			for k := range nBulk {
				p := lanePrompt('b', k)
				r.publish(bulk, p, bulkTokens(k), time.Time{})
				want = append(want, p)
			}
			b.ResetTimer()
			begin := time.Now()
			engines, stop := d.run(r, inter, bulk)
			tick := time.NewTicker(100 * time.Millisecond)
			for k := range nI {
				<-tick.C
				p := lanePrompt('i', k)
				r.publish(inter, p, interactiveTokens, time.Time{})
				want = append(want, p)
			}
			tick.Stop()
			r.waitDone(len(want))
			b.StopTimer()
			end := time.Now()
			stop()
			r.checkOnce(want, nil)
			var lat []time.Duration
			busy := 0.0
			slots := 0
			for _, e := range engines {
				busy += e.slotSeconds('b', begin, end) + e.slotSeconds('i', begin, end)
				slots += e.slots
				e.mu.Lock()
				for p, s := range e.starts {
					if p[0] == 'i' {
						lat = append(lat, s.Sub(r.sent[p]))
					}
				}
				e.mu.Unlock()
			}
			if len(lat) != nI {
				b.Fatalf("%d interactive starts seen, want %d", len(lat), nI)
			}
			b.ReportMetric(percentile(lat, 0.5), "int-p50-ms")
			b.ReportMetric(percentile(lat, 0.99), "int-p99-ms")
			b.ReportMetric(busy/(end.Sub(begin).Seconds()*float64(slots)), "slot-util")
		})
	}
}

// BenchmarkLaneShare saturates the engine with interactive work and keeps
// a bulk backlog: bulk must still get its share (0.2) of the slot-time.
// b.N × 20 interactive and b.N × 10 bulk requests, all of 64 tokens, are
// queued before the worker starts; bulk-share is bulk's part of the
// slot-time while both lanes still had work (until the first lane's last
// request started).
func BenchmarkLaneShare(b *testing.B) {
	const share = 0.2
	nI, nB := 20*b.N, 10*b.N
	r := newLaneRun(b)
	inter, bulk := r.queue("interactive"), r.queue("bulk")
	var want []string
	for k := range nI {
		p := lanePrompt('i', k)
		r.publish(inter, p, 64, time.Time{})
		want = append(want, p)
	}
	for k := range nB {
		p := lanePrompt('b', k)
		r.publish(bulk, p, 64, time.Time{})
		want = append(want, p)
	}
	e := newClockEngine(laneSlots)
	b.ResetTimer()
	begin := time.Now()
	stop := r.start(e, laneSlots, laneSpec{name: "interactive", queue: inter, share: 0}, laneSpec{name: "bulk", queue: bulk, share: share})
	r.waitDone(len(want))
	b.StopTimer()
	stop()
	r.checkOnce(want, nil)
	// Both lanes had work until the first lane's last request started.
	last := map[byte]time.Time{}
	e.mu.Lock()
	for p, s := range e.starts {
		if s.After(last[p[0]]) {
			last[p[0]] = s
		}
	}
	e.mu.Unlock()
	until := last['i']
	if last['b'].Before(until) {
		until = last['b']
	}
	bs, is := e.slotSeconds('b', begin, until), e.slotSeconds('i', begin, until)
	b.ReportMetric(bs/max(1e-9, bs+is), "bulk-share")
	b.ReportMetric(share, "want-share")
}

// BenchmarkLaneDeadlines: a bulk backlog with mixed deadlines (each
// request's deadline spread from 0.2 to 1.5 times the backlog's drain
// time, published in an order unrelated to it). design=edf publishes the
// deadlines (sous runs the earliest first among what it holds and answers
// the expired "expired" without running them); design=edf-window does the
// same with the lane's window option at the whole backlog
// (bulk=...:window=N), so the worker holds, and orders, all of it;
// design=arrival publishes none, so sous runs them in arrival order. A
// request counts as met when the engine started it by its deadline. met
// is the share of requests met; xedf-sim divides it by the share an
// earliest-deadline-first schedule of the same requests on 32 slots meets
// in a simulation that sees the whole backlog from the worker's start (the
// best a non-preemptive scheduler could do).
func BenchmarkLaneDeadlines(b *testing.B) {
	service := func(k int) time.Duration { return laneFixed + lanePerToken*time.Duration(bulkTokens(k)) }
	for _, design := range []string{"edf", "edf-window", "arrival"} {
		b.Run("design="+design, func(b *testing.B) {
			n := 40 * b.N
			var work time.Duration
			for k := range n {
				work += service(k)
			}
			drain := work / laneSlots
			rng := rand.New(rand.NewPCG(24, 26))
			offset := make([]time.Duration, n)
			for k := range offset {
				offset[k] = time.Duration((0.2 + 1.3*rng.Float64()) * float64(drain))
			}
			r := newLaneRun(b)
			q := r.queue("bulk")
			// Deadlines count from about when the worker starts; publishing
			// comes first. The simulation counts from the real start.
			base := time.Now().Add(2*time.Second + time.Duration(n)*3*time.Millisecond)
			var want []string
			for k := range n {
				p := lanePrompt('b', k)
				dl := time.Time{}
				if design != "arrival" {
					dl = base.Add(offset[k])
				}
				r.publish(q, p, bulkTokens(k), dl)
				want = append(want, p)
			}
			time.Sleep(time.Until(base))
			e := newClockEngine(laneSlots)
			lane := laneSpec{name: "bulk", queue: q, share: 0}
			if design == "edf-window" {
				lane.window = n
			}
			b.ResetTimer()
			start := time.Now()
			stop := r.start(e, laneSlots, lane)
			r.waitDone(n)
			b.StopTimer()
			stop()
			left := make([]time.Duration, n) // deadlines from the worker's start
			for k := range left {
				left[k] = base.Add(offset[k]).Sub(start)
			}
			sim := simulateEDF(n, service, left)
			met := 0
			expired := map[string]bool{}
			e.mu.Lock()
			for k, p := range want {
				s, ran := e.starts[p]
				if ran && !s.After(base.Add(offset[k])) {
					met++
				}
				if !ran {
					expired[p] = true
				}
			}
			e.mu.Unlock()
			if design == "arrival" && len(expired) > 0 {
				b.Fatalf("%d requests never ran without deadlines", len(expired))
			}
			r.checkOnce(want, expired)
			b.ReportMetric(float64(met)/float64(n), "met")
			b.ReportMetric(float64(sim)/float64(n), "edf-sim-met")
			b.ReportMetric(float64(met)/float64(max(1, sim)), "xedf-sim")
		})
	}
}

// simulateEDF schedules n requests, all waiting at time 0, on laneSlots
// slots, earliest deadline first, non-preemptive, skipping one whose
// deadline has passed when a slot frees; it returns how many start by
// their deadline.
func simulateEDF(n int, service func(int) time.Duration, deadline []time.Duration) int {
	order := make([]int, n)
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool { return deadline[order[a]] < deadline[order[b]] })
	free := make([]time.Duration, laneSlots) // when each slot frees
	met := 0
	for _, k := range order {
		i := slices.Index(free, slices.Min(free))
		if free[i] > deadline[k] {
			continue // expired before a slot freed: skipped, costs nothing
		}
		met++
		free[i] += service(k)
	}
	return met
}
