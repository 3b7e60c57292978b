package worker_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

type ctxKey string

// recorder is an Observer that tags the contexts it returns and checks
// that the worker hands them back.
type recorder struct {
	worker.NopObserver
	mu       sync.Mutex
	events   []string
	outcomes map[string]worker.Outcome
	problems []string
	health   []error
}

func (r *recorder) add(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, fmt.Sprintf(format, args...))
}

func (r *recorder) problem(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.problems = append(r.problems, fmt.Sprintf(format, args...))
}

// check reports a problem unless ctx holds value v under key k.
func (r *recorder) check(ctx context.Context, where string, k ctxKey, v string) {
	if got, _ := ctx.Value(k).(string); got != v {
		r.problem("%s: context has %s=%q, want %q", where, k, got, v)
	}
}

func (r *recorder) Received(ctx context.Context, d *queue.Delivery) context.Context {
	r.add("received:%s", d.ID)
	return context.WithValue(ctx, ctxKey("delivery"), d.ID)
}

func (r *recorder) BatchStarted(ctx context.Context, b *worker.BatchEvent) context.Context {
	for _, it := range b.Items {
		r.check(it.Ctx, "batch item "+it.Delivery.ID, "delivery", it.Delivery.ID)
	}
	if b.Model != "tiny" || b.Kind != inference.Generate || b.Reason == "" || b.Start.IsZero() {
		r.problem("batch event %+v", b)
	}
	r.add("batch:%s:%d", b.ID, len(b.Items))
	return context.WithValue(ctx, ctxKey("batch"), b.ID)
}

func (r *recorder) EngineCall(ctx context.Context, c worker.EngineCall) (context.Context, func([]inference.Result)) {
	if ctx.Value(ctxKey("batch")) == nil {
		r.problem("engine call without the batch's context")
	}
	if ctx.Done() == nil {
		r.problem("engine call context lost its cancellation")
	}
	r.add("engine:%d", c.Size)
	return ctx, func(res []inference.Result) {
		if len(res) != c.Size {
			r.problem("engine end got %d results for %d requests", len(res), c.Size)
		}
		r.add("engine-end:%d", c.Size)
	}
}

func (r *recorder) BatchFinished(ctx context.Context, b *worker.BatchEvent, _ time.Duration) {
	r.check(ctx, "batch finished", "batch", b.ID)
	r.add("batch-end:%s", b.ID)
}

func (r *recorder) Publishing(ctx context.Context, m *queue.Message, status string) func(error) {
	r.check(ctx, "publishing "+m.CorrelationID, "delivery", m.CorrelationID)
	m.Headers["traceparent"] = "from-observer"
	r.add("publish:%s:%s", m.CorrelationID, status)
	return func(err error) { r.add("publish-end:%s:%v", m.CorrelationID, err) }
}

func (r *recorder) Settling(ctx context.Context, d *queue.Delivery, s queue.Settlement) func(error) {
	r.check(ctx, "settling "+d.ID, "delivery", d.ID)
	r.add("settle:%s:%s", d.ID, s.Action)
	return func(err error) { r.add("settle-end:%s:%v", d.ID, err) }
}

func (r *recorder) Done(ctx context.Context, d *queue.Delivery, o worker.Outcome) {
	r.check(ctx, "done "+d.ID, "delivery", d.ID)
	r.add("done:%s", d.ID)
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, dup := r.outcomes[d.ID]; dup {
		r.problems = append(r.problems, "Done twice for "+d.ID)
	}
	r.outcomes[d.ID] = o
}

func (r *recorder) EngineHealth(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.health = append(r.health, err)
}

func (r *recorder) snapshot() ([]string, []string, map[string]worker.Outcome, []error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events), slices.Clone(r.problems), maps.Clone(r.outcomes), slices.Clone(r.health)
}

func TestObserverSeesEachDeliveryThrough(t *testing.T) {
	t.Parallel()
	rec := &recorder{outcomes: map[string]worker.Outcome{}}
	h := setup(t, worker.Config{Observer: rec}, &fakeEngine{})
	h.b.Send("ok", `{"prompt":"x"}`)
	h.b.Send("bad", `nope`, replyTo("replies"))
	h.b.WaitSettled(t, 2)
	waitFor(t, func() bool { _, _, o, _ := rec.snapshot(); return len(o) == 2 })
	events, problems, outcomes, health := rec.snapshot()
	for _, p := range problems {
		t.Error(p)
	}
	order := func(id string, names ...string) {
		t.Helper()
		last := -1
		for _, n := range names {
			i := slices.Index(events, n)
			if i < 0 || i < last {
				t.Errorf("%s: event %q missing or out of order in %v", id, n, events)
				return
			}
			last = i
		}
	}
	order("ok", "received:ok", "engine:1", "engine-end:1", "publish:ok:ok", "publish-end:ok:<nil>", "settle:ok:ack", "settle-end:ok:<nil>", "done:ok")
	order("bad", "received:bad", "publish:bad:error", "settle:bad:dead-letter", "settle-end:bad:<nil>", "done:bad")

	if o := outcomes["ok"]; o.Settlement.Action != queue.Ack || o.Model != "tiny" || o.Kind != inference.Generate || o.Usage.OutputTokens != 2 || o.Err != nil {
		t.Errorf("ok outcome %+v", o)
	}
	var inErr *wire.InputError
	if o := outcomes["bad"]; o.Settlement.Action != queue.DeadLetter || o.Model != "" || !errors.As(o.Err, &inErr) {
		t.Errorf("bad outcome %+v", o)
	}
	if len(health) == 0 || health[len(health)-1] != nil {
		t.Errorf("engine health %v, want a nil verdict after a good call", health)
	}
	for _, m := range h.b.Published() {
		if m.Headers["traceparent"] != "from-observer" {
			t.Errorf("headers the Observer set did not reach the broker: %v", m.Headers)
		}
	}
	if h.w.InFlight() != 0 {
		t.Errorf("in flight %d", h.w.InFlight())
	}
}

func TestObserverOnEngineFailure(t *testing.T) {
	t.Parallel()
	down := &inference.Error{Kind: inference.Retryable, Code: "engine_unavailable", Err: errors.New("connection refused")}
	rec := &recorder{outcomes: map[string]worker.Outcome{}}
	h := setup(t, worker.Config{Observer: rec}, &fakeEngine{answer: func([]inference.Request) ([]inference.Result, error) { return nil, down }})
	h.b.Send("m", `{"prompt":"x"}`)
	h.b.WaitSettled(t, 1)
	waitFor(t, func() bool { _, _, o, _ := rec.snapshot(); return len(o) == 1 })
	_, problems, outcomes, health := rec.snapshot()
	for _, p := range problems {
		t.Error(p)
	}
	if o := outcomes["m"]; o.Settlement.Action != queue.Requeue || !errors.Is(o.Err, down) || o.Model != "tiny" {
		t.Errorf("outcome %+v", o)
	}
	if len(health) == 0 || !errors.Is(health[len(health)-1], down) {
		t.Errorf("engine health %v, want the engine's error", health)
	}
}
