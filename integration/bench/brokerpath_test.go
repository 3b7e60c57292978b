package bench

import (
	"context"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

// BenchmarkBrokerPath: the cost of the broker path. An engine that answers
// at once over real HTTP (the Ollama driver against an httptest server);
// a hand-written amqp091-go worker at prefetch 96 against sous at its
// defaults with SOUS_ENGINE_PARALLEL=32 (prefetch worker.Capacity(32) =
// 96). Target (issue 29): sous ≥ 1.0 of the hand-written worker, with no
// more CPU per request in this process or the broker. Both designs report
// the CPU time per request of this process (cpu-us/msg: the design, plus
// the HTTP engine, which is the same for both) and of the RabbitMQ node
// (broker-cpu-us/msg), while the timer runs: not while the results are
// checked, which reads sous's larger results and their headers, nor while
// the worker stops. The designs' goroutines carry the pprof label
// design=handwritten or design=sous (make bench-profile).
//
// Each design starts its timed part from a collected heap, so neither pays
// for the garbage of the setup or of the design before it. The hand-written
// worker runs first, unless SOUS_BENCH_ORDER=sous-first (to tell a
// difference between the designs from one between first and second: then
// sous's line carries no xhandwritten, and the two lines' msgs/s give it).
func BenchmarkBrokerPath(b *testing.B) {
	const slots = 32
	prefetch := worker.Capacity(slots)
	srv := startHTTPEngine(b)
	work := uniform(1)
	// Warm the process with both designs first (its heap grown, every code
	// path taken once), untimed: without it, whichever design ran first
	// measured about 10 µs a request more CPU than it did second.
	for _, run := range []func(e *env, n int){
		func(e *env, n int) { e.runHandwritten(srv.client(b), prefetch, n, handOptions{}) },
		func(e *env, n int) { e.runSous(srv.client(b), slots, n) },
	} {
		e := setup(b, "tiny", work)
		e.fill(warmRequests)
		run(e, warmRequests)
	}
	// timed runs one design on b.N fresh requests with the timer and the CPU
	// meters on, from a collected heap.
	timed := func(b *testing.B, run func(e *env)) {
		e := setup(b, "tiny", work)
		e.fill(b.N)
		runtime.GC()
		e.cpu = startCPU()
		b.ResetTimer()
		run(e)
		b.StopTimer()
		e.cpu.report(b)
	}
	var hand baseline
	handwritten := func(b *testing.B) {
		timed(b, func(e *env) { e.runHandwritten(srv.client(b), prefetch, b.N, handOptions{}) })
		hand.set(b, perSecond(b))
	}
	sous := func(b *testing.B) {
		timed(b, func(e *env) { e.runSous(srv.client(b), slots, b.N) })
		hand.ratio(b, perSecond(b), "xhandwritten")
	}
	if os.Getenv("SOUS_BENCH_ORDER") == "sous-first" {
		b.Run("design=sous", sous)
		b.Run("design=handwritten", handwritten)
		return
	}
	b.Run("design=handwritten", handwritten)
	if os.Getenv("SOUS_BENCH_VARIANTS") != "" {
		// The hand-written worker with one of sous's broker habits each, to
		// tell which of them costs: one ack per delivery, and sous's
		// publish (mandatory, its two headers, a timestamp).
		for _, v := range []struct {
			name string
			opt  handOptions
		}{
			{"ack-each", handOptions{ackEach: true}},
			{"sous-publish", handOptions{sousPublish: true}},
			{"ack-each+sous-publish", handOptions{ackEach: true, sousPublish: true}},
		} {
			b.Run("design=handwritten/"+v.name, func(b *testing.B) {
				timed(b, func(e *env) { e.runHandwritten(srv.client(b), prefetch, b.N, v.opt) })
				hand.ratio(b, perSecond(b), "xhandwritten")
			})
		}
	}
	b.Run("design=sous", sous)
}

// warmRequests is how many requests each design takes to warm the process.
const warmRequests = 2000

// runHandwritten is the worker a user would write in an afternoon with
// amqp091-go: one connection, one channel in confirm mode, one consumer
// at the given prefetch; a goroutine per delivery decodes it, calls the
// engine, publishes the result with a deferred publisher confirm and waits
// for it; one goroutine acks in delivery order what is confirmed (with
// multiple=true, the highest delivery tag below which every result is
// confirmed). It stops when n requests are acked; then the results are
// checked with the timer stopped. It reports confirm-ms, the mean time from
// publishing a result to its confirm, as sous does.
func (e *env) runHandwritten(eng worker.Engine, prefetch, n int, opt handOptions) {
	e.b.Helper()
	var (
		conn      *amqp.Connection
		ch        *amqp.Channel
		failed    atomic.Pointer[string] // the first error
		confirmNS atomic.Int64           // publish to confirm, summed
		acked     = make(chan struct{})
		confirmed = make(chan uint64, prefetch) // delivery tags whose result is confirmed
	)
	fail := func(what string, err error) {
		msg := what + ": " + err.Error()
		failed.CompareAndSwap(nil, &msg)
	}
	pprof.Do(context.Background(), pprof.Labels("design", "handwritten"), func(ctx context.Context) {
		var err error
		if conn, err = amqp.Dial(brokerURL); err != nil {
			e.b.Fatal(err)
		}
		if ch, err = conn.Channel(); err != nil {
			e.b.Fatal(err)
		}
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
		go func() { // the acker
			next, count := uint64(1), 0 // delivery tags start at 1 on a channel
			done := map[uint64]bool{}
			for tag := range confirmed {
				done[tag] = true
				from := next
				for done[next] {
					delete(done, next)
					next++
				}
				if next == from {
					continue
				}
				if opt.ackEach {
					for t := from; t < next; t++ {
						if err := ch.Ack(t, false); err != nil {
							fail("ack", err)
						}
					}
				} else if err := ch.Ack(next-1, true); err != nil {
					fail("ack", err)
				}
				if count += int(next - from); count == n {
					close(acked)
				}
			}
		}()
		limits := e.limits()
		handle := func(d amqp.Delivery) {
			dec, err := wire.DecodeRequest(d.Body, d.ContentType, d.MessageId, limits, time.Now())
			if err != nil {
				fail("decode", err)
				return
			}
			if dec.ID == "" {
				dec.ID = d.MessageId
			}
			res, err := eng.Infer(ctx, []inference.Request{dec.Req})
			if err == nil {
				err = res[0].Err
			}
			if err != nil {
				fail("engine", err)
				return
			}
			r := wire.OKResult(dec.ID, dec.Req, res[0].Response)
			r.Worker = "handwritten"
			body, err := wire.Marshal(r)
			if err != nil {
				fail("marshal", err)
				return
			}
			p := amqp.Publishing{CorrelationId: d.MessageId, ContentType: "application/json", DeliveryMode: amqp.Persistent, Body: body}
			if opt.sousPublish {
				p.MessageId = d.MessageId + "/result"
				p.Timestamp = time.Now()
				p.Headers = amqp.Table{"x-sous-status": "ok", "x-sous-publish-id": strconv.FormatUint(d.DeliveryTag, 10)}
			}
			t0 := time.Now()
			c, err := ch.PublishWithDeferredConfirmWithContext(ctx, "", e.results, opt.sousPublish, false, p)
			if err != nil {
				fail("publish", err)
				return
			}
			if !c.Wait() {
				fail("publish", errNack)
				return
			}
			confirmNS.Add(int64(time.Since(t0)))
			confirmed <- d.DeliveryTag
		}
		go func() {
			for d := range ds {
				go handle(d)
			}
		}()
	})
	select {
	case <-acked:
	case <-time.After(10 * time.Minute):
		e.b.Fatalf("hand-written worker: not all %d requests acked (first error: %v)", n, deref(failed.Load()))
	}
	e.b.StopTimer()
	e.cpu.stop()
	close(confirmed) // every result is confirmed: the acker returns
	_ = conn.Close() // returns nothing: every delivery is acked
	if f := failed.Load(); f != nil {
		e.b.Fatalf("hand-written worker: %s", *f)
	}
	e.checkResults(n)
	e.b.ReportMetric(float64(confirmNS.Load())/float64(n)/1e6, "confirm-ms")
	e.b.StartTimer()
}

// handOptions give the hand-written worker one of sous's habits, to
// measure what each costs (SOUS_BENCH_VARIANTS=1).
type handOptions struct {
	ackEach     bool // ack each delivery alone, not multiple=true
	sousPublish bool // publish as sous does: mandatory, with headers and a timestamp
}

func deref(s *string) string {
	if s == nil {
		return "none"
	}
	return *s
}

type nackError struct{}

func (nackError) Error() string { return "the broker refused the result (nack)" }

var errNack error = nackError{}
