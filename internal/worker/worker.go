package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sous-run/sous/internal/batch"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/wire"
)

// Broker is what the worker needs of a queue driver.
type Broker interface {
	// Receive blocks until at least one delivery is available and returns at
	// most max.
	Receive(ctx context.Context, max int) ([]*queue.Delivery, error)
	// Publish returns once the broker has accepted m.
	Publish(ctx context.Context, m queue.Message) error
	// Settle acks, requeues or dead-letters d.
	Settle(ctx context.Context, d *queue.Delivery, s queue.Settlement) error
	// StopReceiving stops delivery and returns prefetched messages to the
	// queue; Publish and Settle keep working.
	StopReceiving(ctx context.Context) error
}

// prefetcher is implemented by drivers whose broker pushes messages
// (RabbitMQ): the worker keeps the prefetch equal to its free capacity.
type prefetcher interface {
	SetPrefetch(ctx context.Context, n int) error
}

// staler is implemented by drivers that know when a delivery's lock is
// lost (Service Bus): its result is then not published.
type staler interface {
	Stale(d *queue.Delivery) bool
}

// readier is implemented by drivers and engines that can say whether they
// are usable.
type readier interface {
	Ready(ctx context.Context) error
}

// Engine runs a batch of requests that share kind, model and options.
type Engine interface {
	Infer(ctx context.Context, reqs []inference.Request) ([]inference.Result, error)
}

// pinger is implemented by engines that can be checked cheaply.
type pinger interface {
	Ping(ctx context.Context) error
}

// Sizer decides the batch size and learns from the engine's answers.
type Sizer interface {
	Size() int
	// Overloaded is called with the size of a batch the engine rejected
	// for lack of memory or slots.
	Overloaded(n int)
	// Succeeded is called after a batch of n items ran without overload.
	Succeeded(n int)
}

// Config tunes the worker. Zero values take the defaults noted.
type Config struct {
	// WorkerID names this worker in results (default: "sous").
	WorkerID string
	// ResultsQueue receives results of requests without reply_to.
	ResultsQueue string
	// Limits bound and complete requests (model defaults and allowlist).
	Limits wire.Limits
	// MaxAttempts is how many deliveries a request gets before it is
	// dead-lettered (default 5).
	MaxAttempts int
	// BatchWait is the batch window while the engine is busy (default 20ms).
	BatchWait time.Duration
	// Concurrency is how many batches run on the engine at once (default 1).
	Concurrency int
	// EngineTimeout bounds one engine call (default 5m).
	EngineTimeout time.Duration
	// DrainTimeout is how long running batches may finish on shutdown
	// (default 25s).
	DrainTimeout time.Duration
	// RetryBackoff and RetryBackoffMax pace engine calls after a retryable
	// engine failure (defaults 500ms and 30s).
	RetryBackoff, RetryBackoffMax time.Duration
	// RestartGrace is how long batches wait for an engine this worker
	// supervises to come back after a failure before they are tried (and
	// requeued) anyway; 0 never waits.
	RestartGrace time.Duration
	// StreamInterval and StreamBytes coalesce streamed deltas into chunks
	// (defaults 50ms and 256 bytes).
	StreamInterval time.Duration
	StreamBytes    int
	// Observer receives events for metrics and traces (default: none).
	Observer Observer
}

func (c Config) withDefaults() Config {
	if c.WorkerID == "" {
		c.WorkerID = "sous"
	}
	if c.MaxAttempts <= 0 {
		c.MaxAttempts = 5
	}
	if c.BatchWait <= 0 {
		c.BatchWait = 20 * time.Millisecond
	}
	if c.Concurrency <= 0 {
		c.Concurrency = 1
	}
	if c.EngineTimeout <= 0 {
		c.EngineTimeout = 5 * time.Minute
	}
	if c.DrainTimeout <= 0 {
		c.DrainTimeout = 25 * time.Second
	}
	if c.RetryBackoff <= 0 {
		c.RetryBackoff = 500 * time.Millisecond
	}
	if c.RetryBackoffMax <= 0 {
		c.RetryBackoffMax = 30 * time.Second
	}
	if c.StreamInterval <= 0 {
		c.StreamInterval = 50 * time.Millisecond
	}
	if c.StreamBytes <= 0 {
		c.StreamBytes = 256
	}
	if c.Observer == nil {
		c.Observer = NopObserver{}
	}
	return c
}

// Worker is the runtime. Create it with New and call Run once.
type Worker struct {
	cfg    Config
	broker Broker
	engine Engine
	sizer  Sizer
	log    *slog.Logger
	now    func() time.Time

	inflight atomic.Int64  // deliveries received and not settled
	freed    chan struct{} // signalled when a delivery is settled

	backoffMu    sync.Mutex
	backoffUntil time.Time
	backoffStep  time.Duration
	downSince    time.Time // first failure of the current outage

	engineErr atomic.Pointer[error] // last engine failure, nil after a success
	running   atomic.Bool
}

// New returns a Worker. log must not be nil.
func New(cfg Config, b Broker, e Engine, s Sizer, log *slog.Logger) *Worker {
	return &Worker{cfg: cfg.withDefaults(), broker: b, engine: e, sizer: s, log: log, now: time.Now, freed: make(chan struct{}, 1)}
}

// item is one decoded delivery on its way through the worker.
type item struct {
	// ctx is the delivery's context from Observer.Received: it carries
	// values (a span) for hooks and logs, never a cancellation.
	ctx        context.Context
	d          *queue.Delivery
	dec        *wire.Decoded
	key        string // empty until the request has decoded
	dispatched time.Time
	streamed   atomic.Bool // a chunk of this request has gone out
}

type batchDone struct{}

// Run processes deliveries until ctx is cancelled, then drains and returns.
// It returns nil after a clean drain.
func (w *Worker) Run(ctx context.Context) error {
	if !w.running.CompareAndSwap(false, true) {
		return errors.New("worker: Run called twice")
	}
	// Engine calls and settlement outlive ctx: they are cut off by the
	// drain deadline, not by the signal.
	workCtx, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()

	in := make(chan []*item)
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		w.receiveLoop(ctx, in)
		// Stop the consumer before the dispatcher hands back what waits
		// (it does when in closes): otherwise the broker would send those
		// deliveries straight back to this consumer, to be handed back twice.
		w.log.Info("draining: stop receiving", "drain_timeout", w.cfg.DrainTimeout)
		stopCtx, cancelStop := context.WithTimeout(workCtx, 5*time.Second)
		if err := w.broker.StopReceiving(stopCtx); err != nil {
			w.log.Warn("stop receiving", "err", err)
		}
		cancelStop()
		close(in)
	}()

	dispDone := make(chan struct{})
	go func() {
		defer close(dispDone)
		w.dispatch(ctx, workCtx, in)
	}()

	<-ctx.Done()
	<-recvDone
	timer := time.NewTimer(w.cfg.DrainTimeout)
	defer timer.Stop()
	select {
	case <-dispDone:
		w.log.Info("drained", "in_flight", w.inflight.Load())
		return nil
	case <-timer.C:
		w.log.Warn("drain timeout: cancelling running batches; their deliveries are requeued", "in_flight", w.inflight.Load())
		cancelWork()
	}
	// Settling a cancelled batch is quick, unless the broker blocks
	// publishing (a resource alarm): then stop waiting. What is left
	// unsettled returns to the queue when the connection closes.
	final := time.NewTimer(settleTimeout + 5*time.Second)
	defer final.Stop()
	select {
	case <-dispDone:
	case <-final.C:
		w.log.Error("gave up waiting for settlements; the broker redelivers what is unsettled", "in_flight", w.inflight.Load())
	}
	return nil
}

func (w *Worker) capacity() int {
	return Capacity(w.sizer.Size(), w.cfg.Concurrency)
}

// Capacity is the most deliveries a worker holds (received and not yet
// settled) at a batch size and batch concurrency, and so its prefetch:
// batchSize × (concurrency + 2). The window covers the three stages a
// batch goes through: one batch forming, concurrency batches on the
// engine, and one batch whose results are being confirmed. A batch leaves
// the engine before its results are confirmed (so the engine never waits
// for the broker), and without the third stage its confirmations would
// hold the room the next batch forms in: the worker would wait for the
// broker's ack-to-delivery round trip after every batch.
func Capacity(batchSize, concurrency int) int {
	return max(1, batchSize) * (max(1, concurrency) + 2)
}

// QueuedEngineCalls bounds how many engine calls a delivery can wait
// through, its own included, between its receipt and its ack. The worst
// case is a window (Capacity) that fills while the engine runs concurrency
// small batches (an idle engine gets a batch of one at once): the rest of
// the window is up to concurrency + 2 full batches, the delivery in the
// last of them waits for a running batch to end, then for those batches
// to run, concurrency at a time: 1 + ceil((concurrency + 2) / concurrency)
// calls, 4 at concurrency 1 and 3 above. Not counted: a batch the engine
// refuses and that is retried in halves or item by item within its slot.
// A broker that takes back deliveries unacknowledged for too long
// (RabbitMQ's consumer_timeout) must allow that many.
func QueuedEngineCalls(concurrency int) int {
	c := max(1, concurrency)
	return 1 + (c+2+c-1)/c
}

// receiveLoop keeps the prefetch at the worker's capacity and hands decoded
// deliveries to the dispatcher.
func (w *Worker) receiveLoop(ctx context.Context, in chan<- []*item) {
	pf, _ := w.broker.(prefetcher)
	// Delivery contexts keep ctx's values but not its cancellation: a
	// delivery outlives the receive loop until it is settled.
	base := context.WithoutCancel(ctx)
	lastPrefetch := 0
	errWait := 100 * time.Millisecond
	for ctx.Err() == nil {
		capacity := w.capacity()
		if pf != nil && capacity != lastPrefetch {
			if err := pf.SetPrefetch(ctx, capacity); err != nil {
				if ctx.Err() == nil {
					w.log.Warn("set prefetch", "prefetch", capacity, "err", err)
				}
			} else {
				lastPrefetch = capacity
			}
		}
		free := capacity - int(w.inflight.Load())
		if free <= 0 {
			select {
			case <-w.freed:
			case <-ctx.Done():
			}
			continue
		}
		ds, err := w.broker.Receive(ctx, free)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, queue.ErrClosed) {
				return
			}
			w.log.Warn("receive", "err", err, "retry_in", errWait)
			select {
			case <-time.After(errWait):
			case <-ctx.Done():
			}
			errWait = min(errWait*2, 5*time.Second)
			continue
		}
		errWait = 100 * time.Millisecond
		w.inflight.Add(int64(len(ds)))
		items := make([]*item, 0, len(ds))
		for _, d := range ds {
			dctx := w.cfg.Observer.Received(base, d)
			if it := w.decode(dctx, d); it != nil {
				items = append(items, it)
			}
		}
		if len(items) == 0 {
			continue
		}
		select {
		case in <- items:
		case <-ctx.Done():
			for _, it := range items {
				w.settle(it, outcome{requeue: queue.ReasonShutdown})
			}
			return
		}
	}
}

// decode validates d; bad input is settled here and nil returned.
func (w *Worker) decode(ctx context.Context, d *queue.Delivery) *item {
	it := &item{ctx: ctx, d: d}
	dec, err := wire.DecodeRequest(d.Body, d.ContentType, d.ID, w.cfg.Limits, w.now())
	it.dec = dec
	if err != nil {
		w.settle(it, outcome{err: err})
		return nil
	}
	if dec.ID == "" {
		dec.ID = d.CorrelationKey()
	}
	it.key = dec.BatchKey()
	return it
}

// dispatch owns the batcher: it groups items and starts batch runners.
func (w *Worker) dispatch(ctx, workCtx context.Context, in <-chan []*item) {
	b := batch.New[*item](w.cfg.BatchWait, w.cfg.WorkerID+"-")
	done := make(chan batchDone, w.cfg.Concurrency)
	var runners sync.WaitGroup
	running := 0
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	draining := false
	for {
		select {
		case items, ok := <-in:
			if !ok {
				in = nil
				draining = true
				break
			}
			now := w.now()
			for _, it := range items {
				b.Add(now, it.key, it)
			}
		case <-done:
			running--
		case <-timer.C:
		}
		if draining {
			// Requeue what waits; let running batches finish.
			for _, it := range b.Drain() {
				w.settle(it, outcome{requeue: queue.ReasonShutdown})
			}
			for running > 0 {
				<-done
				running--
			}
			runners.Wait()
			return
		}
		now := w.now()
		if wait := w.backoffLeft(now); wait > 0 {
			timer.Reset(wait)
			continue
		}
		if b.Len() > 0 && w.waitForRestart(workCtx) {
			timer.Reset(max(w.backoffLeft(w.now()), time.Millisecond))
			continue
		}
		idle := running == 0 && len(in) == 0
		for _, bt := range b.Ready(now, w.sizer.Size(), w.cfg.Concurrency-running, idle) {
			running++
			runners.Add(1)
			go func() {
				defer runners.Done()
				// The engine slot frees as soon as the engine answers: the
				// next batch runs while this one's results are confirmed.
				var once sync.Once
				release := func() { once.Do(func() { done <- batchDone{} }) }
				defer release()
				w.runBatch(workCtx, bt, release)
			}()
		}
		// With every slot busy, only a finished batch can change anything:
		// wait for it rather than wake for windows that already passed.
		if at, ok := b.Deadline(); ok && running < w.cfg.Concurrency {
			timer.Reset(max(at.Sub(now), time.Millisecond))
		} else {
			timer.Reset(time.Hour)
		}
	}
}

func (w *Worker) backoffLeft(now time.Time) time.Duration {
	w.backoffMu.Lock()
	defer w.backoffMu.Unlock()
	return w.backoffUntil.Sub(now)
}

// engineFailed paces the next engine call after a retryable failure.
func (w *Worker) engineFailed(ctx context.Context, err error) {
	w.engineErr.Store(&err)
	w.cfg.Observer.EngineHealth(err)
	w.backoffMu.Lock()
	defer w.backoffMu.Unlock()
	if w.backoffStep == 0 {
		w.backoffStep = w.cfg.RetryBackoff
		w.downSince = w.now()
	} else {
		w.backoffStep = min(w.backoffStep*2, w.cfg.RetryBackoffMax)
	}
	w.backoffUntil = w.now().Add(w.backoffStep)
	w.log.WarnContext(ctx, "engine call failed; pausing batches", "err", err, "retry_in", w.backoffStep)
}

func (w *Worker) engineOK() {
	w.engineErr.Store(nil)
	w.cfg.Observer.EngineHealth(nil)
	w.backoffMu.Lock()
	defer w.backoffMu.Unlock()
	w.backoffStep = 0
}

// Ready reports whether the worker can do work: the broker is connected and
// the engine answers.
func (w *Worker) Ready(ctx context.Context) error {
	if r, ok := w.broker.(readier); ok {
		if err := r.Ready(ctx); err != nil {
			return fmt.Errorf("broker: %w", err)
		}
	}
	if err := w.probeEngine(ctx); err != nil {
		return fmt.Errorf("engine: %w", err)
	}
	return nil
}

// waitForRestart reports whether batches should wait because the engine
// this worker owns (a supervised child, which has Ready but no Ping) is
// restarting after a failure: work waits for it instead of spending the
// waiting requests' attempts on an engine known to be down. The wait is
// bounded by Config.RestartGrace; an engine this worker does not own is
// never waited for (its requests are requeued so other workers can take
// them).
func (w *Worker) waitForRestart(ctx context.Context) bool {
	if w.engineErr.Load() == nil || w.cfg.RestartGrace <= 0 {
		return false
	}
	if _, ok := w.engine.(pinger); ok {
		return false
	}
	r, ok := w.engine.(readier)
	if !ok {
		return false
	}
	w.backoffMu.Lock()
	since := w.downSince
	w.backoffMu.Unlock()
	if w.now().Sub(since) > w.cfg.RestartGrace {
		return false
	}
	err := r.Ready(ctx)
	w.cfg.Observer.EngineHealth(err)
	if err == nil {
		return false
	}
	w.engineFailed(ctx, err)
	return true
}

// probeEngine asks the engine whether it can take work: Ping where the
// engine has it, else Ready (a supervised engine: running, model loaded).
func (w *Worker) probeEngine(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var err error
	if p, ok := w.engine.(pinger); ok {
		err = p.Ping(ctx)
	} else if r, ok := w.engine.(readier); ok {
		err = r.Ready(ctx)
	} else {
		return nil
	}
	w.cfg.Observer.EngineHealth(err)
	return err
}

// InFlight is the number of deliveries received and not yet settled.
func (w *Worker) InFlight() int { return int(w.inflight.Load()) }

var errPanic = errors.New("internal error")

// errDeadline is the error of a request whose deadline passed while queued.
var errDeadline = &inference.Error{Kind: inference.Permanent, Code: wire.ReasonDeadlineExceeded, Err: errors.New("the request's deadline passed before it reached the engine")}
