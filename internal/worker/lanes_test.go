package worker_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/queue/queuetest"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

// startLanes runs a worker on two lanes, interactive (hi) and bulk (lo,
// with share), at in-flight limit 0: it takes deliveries but starts none
// until the test raises the limit, so what the lanes hold is known before
// the dispatcher chooses.
func startLanes(t *testing.T, share float64, eng worker.Engine) (w *worker.Worker, hi, lo *queuetest.MemBroker, s *fixedSizer) {
	t.Helper()
	cfg := worker.Config{
		Limits:       wire.Limits{MaxBodyBytes: 1 << 20, DefaultModel: "tiny", AllowedModels: []string{"tiny"}},
		ResultsQueue: "results", WorkerID: "w-test", RetryBackoff: time.Millisecond,
		DrainTimeout: 2 * time.Second, // a failed test leaves calls stuck on the engine
	}
	hi, lo, s = queuetest.NewMemBroker(), queuetest.NewMemBroker(), &fixedSizer{size: 0}
	w = worker.NewLanes(cfg, []worker.Lane{{Name: "interactive", Broker: hi}, {Name: "bulk", Share: share, Broker: lo}}, eng, s, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("worker did not stop")
		}
	})
	return w, hi, lo, s
}

// waitHeld waits until the worker holds n deliveries.
func waitHeld(t *testing.T, w *worker.Worker, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for w.InFlight() < n {
		if time.Now().After(deadline) {
			t.Fatalf("the worker holds %d deliveries, want %d", w.InFlight(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// waitWaiting waits until the dispatcher holds want[i] requests of lane i
// waiting for a slot: received is not enough, they must have reached it.
func waitWaiting(t *testing.T, w *worker.Worker, want ...int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		stats := w.LaneStats()
		ok := len(stats) == len(want)
		for i := range stats {
			ok = ok && stats[i].Waiting == want[i]
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("lanes %+v, want %v waiting", stats, want)
		}
		time.Sleep(time.Millisecond)
	}
}

// waitStarted waits until the engine has started n requests.
func waitStarted(t *testing.T, e *gateEngine, n int) []string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		started, _, _ := e.snapshot()
		if len(started) >= n {
			return started
		}
		if time.Now().After(deadline) {
			t.Fatalf("the engine started %d requests, want %d: %q", len(started), n, started)
		}
		time.Sleep(time.Millisecond)
	}
}

// A bulk backlog fills the engine while interactive has nothing; a new
// interactive request takes the next slot that frees, ahead of every bulk
// request the worker holds.
func TestInteractiveTakesTheNextFreeSlot(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	w, hi, lo, s := startLanes(t, 0.1, e)
	for i := range 20 {
		lo.Send(fmt.Sprint("b", i), fmt.Sprintf(`{"prompt":"wait:b%d"}`, i))
	}
	waitWaiting(t, w, 0, 20)
	s.set(4)
	w.SizeChanged()
	started := waitStarted(t, e, 4) // bulk fills the slack
	for _, p := range started {
		if !strings.HasPrefix(p, "wait:b") {
			t.Fatalf("started %q before any interactive request came", started)
		}
	}
	hi.Send("i0", `{"prompt":"wait:i0"}`)
	hi.Send("i1", `{"prompt":"wait:i1"}`)
	waitWaiting(t, w, 2, 16)
	e.open("b0")
	if got := waitStarted(t, e, 5)[4]; got != "wait:i0" {
		t.Fatalf("the slot b0 freed went to %q, want the interactive i0", got)
	}
	e.open("b1")
	if got := waitStarted(t, e, 6)[5]; got != "wait:i1" {
		t.Fatalf("the slot b1 freed went to %q, want the interactive i1", got)
	}
	for i := 2; i < 20; i++ {
		e.open(fmt.Sprint("b", i))
	}
	e.open("i0")
	e.open("i1")
	lo.WaitSettled(t, 20)
	hi.WaitSettled(t, 2)
	for _, id := range []string{"b0", "b19", "i0", "i1"} {
		b := lo
		if id[0] == 'i' {
			b = hi
		}
		if st, _ := b.Settlement(id); st.Action != queue.Ack {
			t.Errorf("%s: %+v", id, st)
		}
	}
}

// With interactive work enough to fill the engine, bulk still gets its
// share of the slots; and each lane's deliveries are settled through its
// own broker, every id once.
func TestBulkGetsItsShare(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	w, hi, lo, s := startLanes(t, 0.3, e)
	for i := range 30 {
		hi.Send(fmt.Sprint("i", i), fmt.Sprintf(`{"prompt":"wait:i%d"}`, i))
	}
	for i := range 10 {
		lo.Send(fmt.Sprint("b", i), fmt.Sprintf(`{"prompt":"wait:b%d"}`, i))
	}
	waitWaiting(t, w, 30, 10)
	s.set(10)
	w.SizeChanged()
	started := waitStarted(t, e, 10)
	bulk := 0
	for _, p := range started[:10] {
		if strings.HasPrefix(p, "wait:b") {
			bulk++
		}
	}
	if bulk != 3 {
		t.Fatalf("bulk got %d of 10 slots, want its share, 3: %q", bulk, started[:10])
	}
	var ids []string
	for i := range 30 {
		ids = append(ids, fmt.Sprint("i", i))
	}
	for i := range 10 {
		ids = append(ids, fmt.Sprint("b", i))
	}
	for _, id := range ids {
		e.open(id)
	}
	hi.WaitSettled(t, 30)
	lo.WaitSettled(t, 10)
	if n := hi.SettledCount() + lo.SettledCount(); n != 40 {
		t.Fatalf("%d settlements, want 40", n)
	}
	seen := map[string]int{}
	for _, m := range append(hi.Published(), lo.Published()...) {
		seen[m.CorrelationID]++
	}
	for _, id := range ids {
		if seen[id] != 1 {
			t.Errorf("%s answered %d times through its lane's broker", id, seen[id])
		}
	}
}

// Within a lane the earliest deadline goes first, then the oldest; one
// whose deadline passes while it waits is answered expired and never
// reaches the engine.
func TestDeadlinesInALane(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	b := queuetest.NewMemBroker()
	w, s, _ := startWorker(t, worker.Config{}, b, e, 0)
	at := func(d time.Duration) string { return time.Now().Add(d).UTC().Format(time.RFC3339Nano) }
	b.Send("none", `{"prompt":"none"}`)
	b.Send("late", fmt.Sprintf(`{"prompt":"late","deadline":%q}`, at(2*time.Hour)))
	b.Send("early", fmt.Sprintf(`{"prompt":"early","deadline":%q}`, at(time.Hour)))
	b.Send("soon", fmt.Sprintf(`{"prompt":"soon","deadline":%q}`, at(200*time.Millisecond)))
	b.WaitSettled(t, 1) // "soon" expires while the limit is 0
	st, ok := b.Settlement("soon")
	if !ok || st.Action != queue.DeadLetter || st.Reason != wire.ReasonExpired {
		t.Fatalf("soon: %+v, want dead-lettered %q", st, wire.ReasonExpired)
	}
	res := results(t, b)["soon"]
	if res.Status != wire.StatusError || res.Error == nil || res.Error.Code != wire.ReasonExpired {
		t.Fatalf("soon's result: %+v, want an %q error", res, wire.ReasonExpired)
	}
	waitWaiting(t, w, 3)
	s.set(1)
	w.SizeChanged()
	b.WaitSettled(t, 4)
	started, _, _ := e.snapshot()
	if want := []string{"early", "late", "none"}; !slices.Equal(started, want) {
		t.Fatalf("the engine ran %q, want %q (earliest deadline first, no deadline last, the expired never)", started, want)
	}
}

// A lane's window option bounds what the worker holds of it, whatever the
// in-flight limit would give.
func TestLaneWindow(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	b := queuetest.NewMemBroker()
	cfg := worker.Config{
		Limits:       wire.Limits{MaxBodyBytes: 1 << 20, DefaultModel: "tiny", AllowedModels: []string{"tiny"}},
		ResultsQueue: "results", WorkerID: "w-test", RetryBackoff: time.Millisecond,
	}
	w := worker.NewLanes(cfg, []worker.Lane{{Name: "bulk", Broker: b, Window: 5}}, e, &fixedSizer{size: 1}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	defer func() { cancel(); <-done }()
	for i := range 20 {
		b.Send(fmt.Sprint("b", i), fmt.Sprintf(`{"prompt":"wait:b%d"}`, i))
	}
	waitHeld(t, w, 5)
	waitStarted(t, e, 1)
	time.Sleep(50 * time.Millisecond) // time to take more, if it would
	if n := w.InFlight(); n != 5 {
		t.Fatalf("the worker holds %d of the lane, want its window, 5 (the limit alone gives Capacity(1) = 33)", n)
	}
	for i := range 20 {
		e.open(fmt.Sprint("b", i))
	}
	b.WaitSettled(t, 20)
}

// slowStop is a broker whose StopReceiving waits until release is closed,
// as a real broker's basic.cancel takes a round trip.
type slowStop struct {
	*queuetest.MemBroker
	release chan struct{}
}

func (b slowStop) StopReceiving(ctx context.Context) error {
	<-b.release
	return b.MemBroker.StopReceiving(ctx)
}

// Once the drain begins, a slot that frees starts nothing new, even before
// the consumer has stopped: what waits goes back to the queue.
func TestDrainStartsNoNewCall(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	b := slowStop{queuetest.NewMemBroker(), make(chan struct{})}
	cfg := worker.Config{
		Limits:       wire.Limits{MaxBodyBytes: 1 << 20, DefaultModel: "tiny", AllowedModels: []string{"tiny"}},
		ResultsQueue: "results", WorkerID: "w-test", RetryBackoff: time.Millisecond,
	}
	w := worker.New(cfg, b, e, &fixedSizer{size: 1}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	b.Send("a", `{"prompt":"wait:a"}`)
	b.Send("b", `{"prompt":"wait:b"}`)
	waitStarted(t, e, 1)
	waitWaiting(t, w, 1)
	cancel() // SIGTERM: the drain begins; the consumer takes a while to stop
	time.Sleep(20 * time.Millisecond)
	e.open("a")
	b.WaitSettled(t, 1)
	time.Sleep(50 * time.Millisecond) // room for a wrong dispatch to happen
	close(b.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if started, _, _ := e.snapshot(); len(started) != 1 {
		t.Fatalf("the engine started %q after the drain began, want only the call already running", started)
	}
	if st, _ := b.Settlement("b"); st.Action != queue.Requeue || st.Reason != queue.ReasonShutdown {
		t.Fatalf("b: %+v, want requeued for the shutdown", st)
	}
}
