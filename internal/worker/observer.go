package worker

import (
	"context"
	"log/slog"
	"runtime/debug"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue"
)

// Observer receives the worker's events, for metrics and traces
// (internal/telemetry implements it with OpenTelemetry). Its methods are
// called from several goroutines at once and must return quickly.
//
// Contexts thread the events together so that spans get proper parents:
// Received returns a context for the delivery, and the worker passes that
// context back to every later call about the delivery (Publishing,
// Settling, Done, and through BatchItem to BatchStarted) and logs with it.
// BatchStarted returns the batch's context, which EngineCall and
// BatchFinished get. An Observer may store values in these contexts (a
// span); it must derive them from the context it is given, because the
// worker keeps the given context's cancellation. Delivery contexts carry no
// cancellation: the worker uses them for values only.
//
// The interface has no OpenTelemetry types so that the worker does not
// depend on a telemetry SDK; embed NopObserver to implement only some
// methods.
type Observer interface {
	// Received is called once per delivery, when the worker takes it and
	// before it is decoded.
	Received(ctx context.Context, d *queue.Delivery) context.Context
	// BatchStarted is called when a batch is dispatched, before the engine
	// is called.
	BatchStarted(ctx context.Context, b *BatchEvent) context.Context
	// EngineCall is called before each engine call: one per batch, more
	// when a batch the engine rejected as overloaded is retried in halves.
	// end is called once, with one result per request, each carrying its
	// error (a failed call gives every request the call's error).
	EngineCall(ctx context.Context, c EngineCall) (_ context.Context, end func([]inference.Result))
	// BatchFinished is called when the engine calls of b are over, before
	// its deliveries are settled.
	BatchFinished(ctx context.Context, b *BatchEvent, elapsed time.Duration)
	// Publishing is called before a result or a stream chunk for the
	// delivery whose context is ctx is published. It may add headers to m,
	// such as trace context. status is wire.StatusOK, wire.StatusError or
	// "chunk". end is called once, with the broker's answer.
	Publishing(ctx context.Context, m *queue.Message, status string) (end func(error))
	// Settling is called before each settlement the worker asks of the
	// broker; end is called once, with the broker's answer.
	Settling(ctx context.Context, d *queue.Delivery, s queue.Settlement) (end func(error))
	// Done is called once per delivery, last, when the worker is finished
	// with it.
	Done(ctx context.Context, d *queue.Delivery, o Outcome)
	// EngineHealth reports whether the engine answers: nil after an engine
	// call that was not a total retryable failure or a good readiness
	// probe, the error otherwise.
	EngineHealth(err error)
}

// BatchEvent describes a batch going to the engine.
type BatchEvent struct {
	ID string
	// Reason says why the batch was dispatched: full, window or idle.
	Reason string
	// Kind, Model: what every request in the batch asks for.
	Kind  inference.Kind
	Model string
	// Start is when the batch was dispatched.
	Start time.Time
	// Items are the batch's deliveries, in batch order, with the contexts
	// Received returned for them.
	Items []BatchItem
}

// BatchItem is one delivery of a batch.
type BatchItem struct {
	Ctx      context.Context
	Delivery *queue.Delivery
}

// EngineCall describes one call to the engine.
type EngineCall struct {
	Kind  inference.Kind
	Model string
	// Size is the number of requests in the call.
	Size int
}

// Outcome is what became of a delivery.
type Outcome struct {
	// Settlement is the last settlement the worker asked for.
	Settlement queue.Settlement
	// Kind and Model are the request's; Model is empty when the request
	// could not be decoded (then it has not been checked against the
	// allowed models either).
	Kind  inference.Kind
	Model string
	// Usage is the engine's token count for the request; zero without an
	// answer.
	Usage inference.Usage
	// Err is why the request failed: an input error (*wire.InputError), an
	// engine error (*inference.Error) or another failure; nil on success
	// and for a delivery requeued untouched at shutdown.
	Err error
	// Lane is the name of the lane the delivery came in on.
	Lane string
	// Wait is how long the request waited in the worker for a slot: from
	// receipt to its engine call, or to its settlement when it never
	// reached the engine (expired, bad input, handed back).
	Wait time.Duration
}

// FirstTokenObserver is an Observer that also wants the time to first
// token of streamed requests: from the start of the engine call that took
// the request to its first output. Requests that do not stream have no
// first token the worker sees (the answer comes whole).
type FirstTokenObserver interface {
	FirstToken(ctx context.Context, model string, ttft time.Duration)
}

func (s safeObserver) FirstToken(ctx context.Context, model string, ttft time.Duration) {
	defer s.recover("FirstToken")
	if f, ok := s.o.(FirstTokenObserver); ok {
		f.FirstToken(ctx, model, ttft)
	}
}

// NopObserver ignores every event. Embed it in an Observer that needs only
// some of them.
type NopObserver struct{}

func (NopObserver) Received(ctx context.Context, _ *queue.Delivery) context.Context { return ctx }
func (NopObserver) BatchStarted(ctx context.Context, _ *BatchEvent) context.Context { return ctx }
func (NopObserver) EngineCall(ctx context.Context, _ EngineCall) (context.Context, func([]inference.Result)) {
	return ctx, func([]inference.Result) {}
}
func (NopObserver) BatchFinished(context.Context, *BatchEvent, time.Duration) {}
func (NopObserver) Publishing(context.Context, *queue.Message, string) func(error) {
	return func(error) {}
}
func (NopObserver) Settling(context.Context, *queue.Delivery, queue.Settlement) func(error) {
	return func(error) {}
}
func (NopObserver) Done(context.Context, *queue.Delivery, Outcome) {}
func (NopObserver) EngineHealth(error)                             {}

// safeObserver contains the panics of an Observer: a bug in a metrics or
// tracing hook is logged, and never ends the process or changes what
// happens to a delivery (a panic after the broker took an ack must not
// lead to a second settlement).
type safeObserver struct {
	o   Observer
	log *slog.Logger
}

func (s safeObserver) recover(hook string) {
	if p := recover(); p != nil {
		s.log.Error("observer panicked; ignoring it", "hook", hook, "panic", p, "stack", string(debug.Stack()))
	}
}

func (s safeObserver) Received(ctx context.Context, d *queue.Delivery) (out context.Context) {
	out = ctx
	defer s.recover("Received")
	return s.o.Received(ctx, d)
}

func (s safeObserver) BatchStarted(ctx context.Context, b *BatchEvent) (out context.Context) {
	out = ctx
	defer s.recover("BatchStarted")
	return s.o.BatchStarted(ctx, b)
}

// EngineCall returns the observer's own end: the caller ends it through
// engineCallEnded, which contains its panics, so no wrapper is allocated
// per call.
func (s safeObserver) EngineCall(ctx context.Context, c EngineCall) (out context.Context, end func([]inference.Result)) {
	out, end = ctx, nopEngineCallEnd
	defer s.recover("EngineCall")
	return s.o.EngineCall(ctx, c)
}

func nopEngineCallEnd([]inference.Result) {}

func (s safeObserver) engineCallEnded(end func([]inference.Result), r []inference.Result) {
	defer s.recover("EngineCall end")
	end(r)
}

func (s safeObserver) BatchFinished(ctx context.Context, b *BatchEvent, elapsed time.Duration) {
	defer s.recover("BatchFinished")
	s.o.BatchFinished(ctx, b, elapsed)
}

// Publishing and Settling return the observer's own end, for ended.
func (s safeObserver) Publishing(ctx context.Context, m *queue.Message, status string) (end func(error)) {
	end = nopEnd
	defer s.recover("Publishing")
	return s.o.Publishing(ctx, m, status)
}

func (s safeObserver) Settling(ctx context.Context, d *queue.Delivery, st queue.Settlement) (end func(error)) {
	end = nopEnd
	defer s.recover("Settling")
	return s.o.Settling(ctx, d, st)
}

func nopEnd(error) {}

// ended calls the end that a hook returned, containing its panics; hook
// names it in the log ("Publishing end").
func (s safeObserver) ended(hook string, end func(error), err error) {
	defer s.recover(hook)
	end(err)
}

func (s safeObserver) Done(ctx context.Context, d *queue.Delivery, o Outcome) {
	defer s.recover("Done")
	s.o.Done(ctx, d, o)
}

func (s safeObserver) EngineHealth(err error) {
	defer s.recover("EngineHealth")
	s.o.EngineHealth(err)
}
