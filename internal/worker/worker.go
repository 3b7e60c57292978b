package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sous-run/sous/internal/batch"
	"github.com/sous-run/sous/internal/deadline"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/lanes"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/wire"
)

// Broker is what the worker needs of a queue driver.
type Broker interface {
	// Receive blocks until at least one delivery is available and returns at
	// most max.
	Receive(ctx context.Context, max int) ([]*queue.Delivery, error)
	// Publish returns once the broker has accepted m. It keeps nothing of
	// m.Headers once it returns: the worker hands the map to its next
	// result.
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

// pauser is implemented by drivers whose broker pushes messages: while the
// engine is down the worker asks the broker to stop sending and to take
// back what it had sent, so the requests wait in the queue for a healthy
// worker instead of in this one.
type pauser interface {
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
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

// Engine runs requests that share kind, model and options in one call:
// one request, or several where the engine's API takes a list.
type Engine interface {
	Infer(ctx context.Context, reqs []inference.Request) ([]inference.Result, error)
}

// lister is implemented by engines that say which kinds of request one
// call can carry as a list. Without it, embeddings go as lists and every
// other kind one request per call.
type lister interface {
	TakesList(kind inference.Kind) bool
}

// modeler is implemented by engines that can list the models they have.
type modeler interface {
	Models(ctx context.Context) ([]string, error)
}

// pinger is implemented by engines that can be checked cheaply.
type pinger interface {
	Ping(ctx context.Context) error
}

// Sizer decides the in-flight limit, the most requests on the engine at
// once, and learns from the engine's answers.
type Sizer interface {
	Size() int
	// Overloaded is called with the number of requests that were on the
	// engine when it refused one for lack of memory or slots.
	Overloaded(n int)
	// Succeeded is called with the number of requests that were on the
	// engine when one call ran without overload.
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
	// dead-lettered (default 5). It also bounds how often a request the
	// engine had no room for is retried here before it goes back to the
	// queue with an attempt counted.
	MaxAttempts int
	// BatchWait is how long items of an API that takes a list wait to be
	// coalesced while the engine is busy (default 20ms).
	BatchWait time.Duration
	// EngineTimeout bounds one engine call (default 5m).
	EngineTimeout time.Duration
	// MaxWait is the longest a request waits in the worker for a slot;
	// past it the request goes back to the queue with no attempt counted,
	// so a delivery is never held past the broker's consumer_timeout (see
	// HoldBound). 0: no limit.
	MaxWait time.Duration
	// DrainTimeout is how long running calls may finish on shutdown
	// (default 25s).
	DrainTimeout time.Duration
	// RetryBackoff and RetryBackoffMax pace engine calls after a retryable
	// failure or an overload, and the engine probes while it is down
	// (defaults 500ms and 30s).
	RetryBackoff, RetryBackoffMax time.Duration
	// StreamInterval and StreamBytes coalesce streamed deltas into chunks
	// (defaults 50ms and 256 bytes).
	StreamInterval time.Duration
	StreamBytes    int
	// Observer receives events for metrics and traces (default: none).
	// Its panics are contained and logged.
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

// Lane is one queue the worker consumes. Lanes are given highest rank
// first: a free slot goes to the highest-ranked lane that has work, unless
// a lower lane with work is below its share (see internal/lanes).
type Lane struct {
	// Name labels the lane in metrics and logs.
	Name string
	// Share is the least fraction of the slots the lane gets over time
	// while it has work; the first lane needs none.
	Share float64
	// Broker is the lane's queue driver: the lane's deliveries are
	// received, settled and answered through it.
	Broker Broker
	// Queue names the lane's queue in the worker's reports (LaneRates).
	Queue string
	// Window, when above 0, is the most deliveries of the lane the worker
	// holds, instead of the window the in-flight limit gives it.
	Window int
}

// lane is a Lane with its state in the worker.
type lane struct {
	Lane
	idx      int
	inflight atomic.Int64                       // its deliveries received and not settled
	onEngine atomic.Int64                       // its requests in engine calls not yet answered
	freed    chan struct{}                      // signalled when one of its deliveries is settled
	stopRecv atomic.Pointer[context.CancelFunc] // cuts its Receive in progress
	// waiting is the number of its requests in the dispatcher, for the
	// lane's gauge; written by the dispatcher only.
	waiting atomic.Int64
	meter   meter // its completions, for LaneRates

	// The last one-request call's batcher key, kept by the lane's receive
	// loop (see oneKey).
	keyKind  inference.Kind
	keyModel string
	key      string
}

// oneKey is the batcher key of a one-request call of kind and model: they
// order the batcher's groups, and a call of one groups with nothing. The
// last key is kept, for a lane's requests mostly ask for one model, so the
// key is not built again for each. Only the lane's receive loop calls it.
func (l *lane) oneKey(kind inference.Kind, model string) string {
	if l.key == "" || kind != l.keyKind || model != l.keyModel {
		l.keyKind, l.keyModel, l.key = kind, model, kind.String()+"\x00"+model
	}
	return l.key
}

// Worker is the runtime. Create it with New or NewLanes and call Run once.
type Worker struct {
	cfg    Config
	lanes  []*lane
	engine Engine
	sizer  Sizer
	obs    safeObserver // cfg.Observer with its panics contained
	log    *slog.Logger
	now    func() time.Time

	inflight atomic.Int64  // deliveries received and not settled, all lanes
	onEngine atomic.Int64  // requests in engine calls that have not answered
	wake     chan struct{} // wakes the dispatcher: a call ended, work came back

	backMu sync.Mutex
	back   []*item   // taken for the engine but not run: no room; retried here
	ended  []listEnd // list calls that ended, for the batchers

	backoffMu    sync.Mutex
	backoffUntil time.Time
	backoffStep  time.Duration

	down     atomic.Pointer[outage] // nil while the engine is up
	dlq      deadLetters
	settling sync.WaitGroup // settlements of bad input, beside the receive loop
	bg       sync.WaitGroup // outage probers
	bgMu     sync.Mutex     // guards bg.Add against bgClosed
	bgClosed bool           // Run is waiting for the probers: start no more
	runCtx   context.Context
	running  atomic.Bool
	engineUp atomic.Bool // the last engine call or probe succeeded

	modelsUnlisted atomic.Bool // said once: the engine does not list models

	// Bounds shared by the settles and engine calls of each second, so
	// neither costs a timer each (issue 29): settleTimeout on settles,
	// cfg.EngineTimeout on engine calls (set by Run, on its work context).
	settleBound *deadline.Source
	engineBound *deadline.Source

	headers sync.Pool // of map[string]string: results' header maps (reply)

	cancels cancels // producers' cancellations (Cancel)
}

// New returns a Worker on one queue, the lane "default". log must not be
// nil.
func New(cfg Config, b Broker, e Engine, s Sizer, log *slog.Logger) *Worker {
	return NewLanes(cfg, []Lane{{Name: "default", Broker: b}}, e, s, log)
}

// NewLanes returns a Worker on several queues, highest rank first. log must
// not be nil; lanes must not be empty.
func NewLanes(cfg Config, ls []Lane, e Engine, s Sizer, log *slog.Logger) *Worker {
	cfg = cfg.withDefaults()
	w := &Worker{
		cfg: cfg, engine: e, sizer: s, log: log, now: time.Now,
		obs:         safeObserver{o: cfg.Observer, log: log},
		wake:        make(chan struct{}, 1),
		settleBound: deadline.New(context.Background(), settleTimeout, boundStep(settleTimeout), nil),
	}
	for i, l := range ls {
		w.lanes = append(w.lanes, &lane{Lane: l, idx: i, freed: make(chan struct{}, 1)})
	}
	return w
}

// stopReceiving cuts every lane's Receive in progress.
func (w *Worker) stopReceiving() {
	for _, l := range w.lanes {
		if cancel := l.stopRecv.Load(); cancel != nil {
			(*cancel)()
		}
	}
}

// item is one decoded delivery on its way through the worker.
type item struct {
	// ctx is the delivery's context from Observer.Received: it carries
	// values (a span) for hooks and logs, never a cancellation.
	ctx        context.Context
	lane       *lane
	d          *queue.Delivery
	dec        *wire.Decoded
	key        string // empty until the request has decoded
	perCall    int    // the most items of its key one engine call takes
	queued     time.Time
	dispatched time.Time
	overloads  int         // engine calls that refused it for lack of room
	bad        outcome     // its outcome, for one settled without an engine call
	streamed   atomic.Bool // a chunk of this request has gone out
}

// Run processes deliveries until ctx is cancelled, then drains and returns.
// It returns nil after a clean drain.
func (w *Worker) Run(ctx context.Context) error {
	if !w.running.CompareAndSwap(false, true) {
		return errors.New("worker: Run called twice")
	}
	w.runCtx = ctx
	// Engine calls and settlement outlive ctx: they are cut off by the
	// drain deadline, not by the signal.
	workCtx, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()
	w.engineBound = deadline.New(workCtx, w.cfg.EngineTimeout, boundStep(w.cfg.EngineTimeout), nil)

	// An engine that is down, or lacks the model, at start: take no work
	// until it answers, rather than spend requests on it.
	if err := w.checkEngine(ctx); err != nil {
		w.engineDown(err)
	} else {
		w.log.Info("the engine answers and has the model; taking work", "in_flight_limit", w.sizer.Size(), "prefetch", w.laneCapacity(w.lanes[0]), "lanes", len(w.lanes))
	}

	in := make(chan []*item)
	recvDone := make(chan struct{})
	var lanesDone sync.WaitGroup
	for _, l := range w.lanes {
		lanesDone.Go(func() {
			for !w.receive(ctx, l, in) {
				// A panic is contained and the loop goes on: a bug must not
				// leave the worker alive but deaf.
			}
			// Stop the consumer before the dispatcher hands back what waits
			// (it does when in closes): otherwise the broker would send
			// those deliveries straight back to this consumer, to be handed
			// back twice.
			if l.idx == 0 {
				w.log.Info("draining: stop receiving", "drain_timeout", w.cfg.DrainTimeout)
			}
			stopCtx, cancelStop := context.WithTimeout(workCtx, 5*time.Second)
			if err := l.Broker.StopReceiving(stopCtx); err != nil {
				w.log.Warn("stop receiving", "lane", l.Name, "err", err)
			}
			cancelStop()
		})
	}
	go func() {
		defer close(recvDone)
		lanesDone.Wait()
		close(in)
	}()

	dispDone := make(chan struct{})
	go func() {
		defer close(dispDone)
		w.dispatch(workCtx, ctx.Done(), in)
		// The receive loop started every one of these before it closed in.
		w.settling.Wait()
	}()

	<-ctx.Done()
	<-recvDone
	w.bgMu.Lock()
	w.bgClosed = true
	w.bgMu.Unlock()
	w.bg.Wait() // the outage prober stops with ctx
	timer := time.NewTimer(w.cfg.DrainTimeout)
	defer timer.Stop()
	select {
	case <-dispDone:
		w.log.Info("drained", "in_flight", w.inflight.Load())
		return nil
	case <-timer.C:
		w.log.Warn("drain timeout: cancelling running engine calls; their deliveries are requeued", "in_flight", w.inflight.Load())
		cancelWork()
	}
	// Settling a cancelled call is quick, unless the broker blocks
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

// laneCapacity is the most deliveries lane l holds, and so its prefetch:
// its Window when set. Otherwise the first lane takes the whole window,
// Capacity of the in-flight limit.
// A lower lane's window covers only the slots it could start now (those
// the lanes above it do not hold, and at least its share): the dispatcher
// serves higher lanes first anyway, and the bound leaves the rest of a
// lower lane's backlog in the queue, for this worker later or another
// worker, rather than held here waiting.
func (w *Worker) laneCapacity(l *lane) int {
	if l.Window > 0 {
		return min(MaxPrefetch, l.Window)
	}
	limit := w.sizer.Size()
	if l.idx == 0 {
		return Capacity(limit)
	}
	higher := 0
	for _, h := range w.lanes[:l.idx] {
		higher += int(h.inflight.Load())
	}
	return Capacity(max(limit-higher, int(math.Ceil(l.Share*float64(limit))), 1))
}

// MaxPrefetch is the most a RabbitMQ prefetch can say: the AMQP field is
// 16 bits, and 0 means no limit at all.
const MaxPrefetch = 65535

// windowFloor is the least room the window leaves beyond the requests on
// the engine: the results being confirmed and the requests that replace
// them. A confirm takes tens of milliseconds on a busy broker, as long as a
// short answer, so a window of 3 × a small limit left slots idle.
const windowFloor = 32

// Capacity is the most deliveries a worker holds (received and not yet
// settled) at an in-flight limit, and so its prefetch: 3 × limit, or limit
// + 32 when that is more, clamped to MaxPrefetch. The window covers the
// three places a request can be: waiting for a slot (so that when calls on
// the engine end, their slots are refilled from memory, not from the
// broker), on the engine, and having its result confirmed (the slot frees
// when the engine answers, before the broker confirms, so the engine never
// waits for the broker).
func Capacity(limit int) int {
	limit = max(1, limit)
	return min(MaxPrefetch, max(3*limit, limit+windowFloor))
}

// HoldBound is the longest a delivery is held between its receipt and its
// settlement, for a broker that takes back deliveries unacknowledged for
// too long (RabbitMQ's consumer_timeout): it waits for a slot at most
// maxWait (then it goes back to the queue), a pause after an overload or a
// failure (at most backoffMax) and a list's window (batchWait), then runs
// in one engine call (its timeout, which ends up to a tenth of it later, a
// second at most: see Worker.engineBound). While the engine is down nothing
// is held: the worker hands its deliveries back.
func HoldBound(maxWait, engineTimeout, backoffMax, batchWait time.Duration) time.Duration {
	return maxWait + engineTimeout + boundStep(engineTimeout) + backoffMax + batchWait
}

// receiveLoop keeps lane l's prefetch at its capacity and hands its decoded
// deliveries to the dispatcher.
func (w *Worker) receiveLoop(ctx context.Context, l *lane, in chan<- []*item) {
	pf, _ := l.Broker.(prefetcher)
	// Delivery contexts keep ctx's values but not its cancellation: a
	// delivery outlives the receive loop until it is settled.
	base := context.WithoutCancel(ctx)
	lastPrefetch := 0
	errWait := 100 * time.Millisecond
	// rctx is what Receive runs on: kept from one Receive to the next until
	// stopReceiving cuts it, so a receive of one delivery does not cost a
	// context and a place among ctx's children each.
	var rctx context.Context
	for ctx.Err() == nil {
		if o := w.down.Load(); o != nil {
			// Take nothing while the engine is down: what the broker holds
			// waits there, for this worker or a healthy one.
			select {
			case <-o.up:
			case <-ctx.Done():
				return
			}
			continue
		}
		if w.dlq.pausedFor(w.now()) > 0 {
			w.holdForDeadLetters(ctx, l)
			continue
		}
		capacity := w.laneCapacity(l)
		if pf != nil && capacity != lastPrefetch {
			if err := pf.SetPrefetch(ctx, capacity); err != nil {
				if ctx.Err() == nil {
					w.log.Warn("set prefetch", "lane", l.Name, "prefetch", capacity, "err", err)
				}
			} else {
				lastPrefetch = capacity
			}
		}
		free := capacity - int(l.inflight.Load())
		if free <= 0 {
			select {
			case <-l.freed:
			case <-ctx.Done():
			}
			continue
		}
		if rctx == nil || rctx.Err() != nil {
			var cancel context.CancelFunc
			rctx, cancel = context.WithCancel(ctx) // released with ctx, or by stopReceiving
			l.stopRecv.Store(&cancel)
		}
		if w.down.Load() != nil || w.dlq.pausedFor(w.now()) > 0 { // since the checks above
			(*l.stopRecv.Load())()
		}
		if rctx.Err() != nil {
			continue // cut already: take nothing, not even what is ready
		}
		ds, err := l.Broker.Receive(rctx, free)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, queue.ErrClosed) {
				return
			}
			if rctx.Err() != nil {
				continue // cut by an outage
			}
			w.log.Warn("receive", "lane", l.Name, "err", err, "retry_in", errWait)
			select {
			case <-time.After(errWait):
			case <-ctx.Done():
			}
			errWait = min(errWait*2, 5*time.Second)
			continue
		}
		errWait = 100 * time.Millisecond
		w.inflight.Add(int64(len(ds)))
		l.inflight.Add(int64(len(ds)))
		items := make([]*item, 0, len(ds))
		for _, d := range ds {
			dctx := w.obs.Received(base, d)
			it, ok := w.decode(dctx, l, d)
			if ok {
				items = append(items, it)
				continue
			}
			// Bad input is settled beside the loop: its result and
			// dead-letter take round trips to the broker (more when
			// dead-lettering fails), which must not hold back the valid
			// requests received with it. In flight, it counts against the
			// capacity like any delivery, which bounds these goroutines.
			w.settling.Go(func() { w.settle(it, it.bad) })
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

// receive runs the receive loop and reports whether it ended without a
// panic.
func (w *Worker) receive(ctx context.Context, l *lane, in chan<- []*item) (ended bool) {
	defer w.contain("receive loop")
	w.receiveLoop(ctx, l, in)
	return true
}

// decode validates d. ok is false for a delivery to settle without an
// engine call, with the outcome in it.bad: bad input, or a request answered
// before its dead-letter failed.
func (w *Worker) decode(ctx context.Context, l *lane, d *queue.Delivery) (it *item, ok bool) {
	it = &item{ctx: ctx, lane: l, d: d}
	now := w.now()
	dec, err := wire.DecodeRequest(d.Body, d.ContentType, d.ID, w.cfg.Limits, now)
	it.dec = dec
	if err != nil {
		it.bad = outcome{err: err}
		return it, false
	}
	if d.Headers[headerAnswered] != "" {
		return it, false // decide dead-letters it
	}
	if w.cancels.match(d, now) {
		it.bad = outcome{err: errCancelled}
		return it, false
	}
	if dec.ID == "" {
		dec.ID = d.CorrelationKey()
	}
	it.perCall = w.perCall(dec.Req.Kind)
	if it.perCall > 1 {
		it.key = dec.BatchKey() // a list holds requests the same in all but their input
	} else {
		it.key = l.oneKey(dec.Req.Kind, dec.Req.Model)
	}
	return it, true
}

// holdForDeadLetters takes no new work while the pause after a failed
// dead-letter lasts: it pauses a broker that pushes (what it had sent goes
// back to the queue, no attempt counted), waits, and resumes it.
func (w *Worker) holdForDeadLetters(ctx context.Context, l *lane) {
	p, _ := l.Broker.(pauser)
	if p != nil {
		if err := p.Pause(ctx); err != nil && ctx.Err() == nil {
			w.log.Warn("pause the broker while dead-lettering fails", "err", err)
		}
	}
	for {
		wait := w.dlq.pausedFor(w.now())
		if wait <= 0 {
			break
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return // StopReceiving ends the pause for good
		}
	}
	if p != nil {
		if err := p.Resume(ctx); err != nil && ctx.Err() == nil {
			w.log.Warn("resume the broker", "err", err)
		}
	}
	w.log.Info("the pause after a failed dead-letter is over; taking work again", "lane", l.Name)
}

// listAll is the perCall of a kind the engine takes as a list: the room
// the in-flight limit leaves bounds the list.
const listAll = math.MaxInt32

func (w *Worker) perCall(kind inference.Kind) int {
	if l, ok := w.engine.(lister); ok {
		if l.TakesList(kind) {
			return listAll
		}
		return 1
	}
	if kind == inference.Embed {
		return listAll
	}
	return 1
}

// dispatch owns the batchers, one per lane: it sends each request to the
// engine the moment the in-flight limit has room (coalescing only where the
// API takes a list), the lane the scheduler picks first (the highest rank,
// unless a lower lane is owed its share), within a lane the earliest
// deadline then the oldest, and starts one goroutine per engine call.
// Once stop is closed (the drain begins) it starts no more calls: what
// waits goes back to the queue when in closes.
func (w *Worker) dispatch(workCtx context.Context, stop <-chan struct{}, in <-chan []*item) {
	n := len(w.lanes)
	bs := make([]*batch.Batcher[*item], n)
	shares := make([]float64, n)
	for i, l := range w.lanes {
		prefix := w.cfg.WorkerID + "-"
		if n > 1 {
			prefix += l.Name + "-"
		}
		bs[i], shares[i] = batch.New[*item](w.cfg.BatchWait, prefix), l.Share
	}
	sched := lanes.NewScheduler(shares)
	var cancelGen uint64
	has, on, order := make([]bool, n), make([]int, n), make([]int, 0, n)
	waiting := func() int {
		total := 0
		for i, b := range bs {
			w.lanes[i].waiting.Store(int64(b.Len()))
			total += b.Len()
		}
		return total
	}
	drain := func() []*item {
		var out []*item
		for _, b := range bs {
			out = append(out, b.Drain()...)
		}
		return out
	}
	var calls sync.WaitGroup // engine calls, each settling its items
	pool := callPool{w: w}
	defer pool.close()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	stopping := false
	for {
		draining := false
		select {
		case <-stop:
			stop, stopping = nil, true
		case items, ok := <-in:
			if !ok {
				in = nil
				draining = true
				break
			}
			now := w.now()
			for _, it := range items {
				it.queued = now
				bs[it.lane.idx].Add(now, it.dec.Deadline, it.key, it.perCall, it)
			}
		case <-w.wake:
		case <-timer.C:
		}
		back, ended := w.takeBack()
		for _, it := range back {
			bs[it.lane.idx].PutBack(it.queued, it.dec.Deadline, it.key, it.perCall, it)
		}
		for _, e := range ended {
			bs[e.lane].Ended(e.key)
		}
		if draining {
			// Requeue what waits; let running calls finish, then requeue
			// what they gave back.
			w.handBack(drain(), queue.ReasonShutdown)
			waiting()
			calls.Wait()
			back, _ := w.takeBack()
			w.handBack(back, queue.ReasonShutdown)
			return
		}
		if stopping {
			// Draining: the receive loops are stopping the consumers; what
			// waits is handed back once they have (in closes), so that the
			// broker does not send it straight back here.
			waiting()
			timer.Reset(time.Hour)
			continue
		}
		if w.down.Load() != nil {
			// The engine is down: the requests go back to the queue, with no
			// attempt counted, for a healthy worker or for this one later.
			if waiting() > 0 {
				w.handBack(drain(), queue.ReasonEngineDown)
				waiting()
			}
			timer.Reset(time.Hour)
			continue
		}
		now := w.now()
		sweep := false
		if g := w.cancels.generation(); g != cancelGen {
			cancelGen, sweep = g, true
		}
		for _, b := range bs {
			// A request whose deadline passed while it waited is answered
			// expired, never sent to the engine.
			if due := b.Overdue(now); len(due) > 0 {
				w.settleAll(due, outcome{err: errDeadline})
			}
			// One its producer cancelled since the last look is answered
			// cancelled.
			if sweep {
				if gone := b.Remove(func(it *item) bool { return w.cancels.match(it.d, now) }); len(gone) > 0 {
					w.settleAll(gone, outcome{err: errCancelled})
				}
			}
			if w.cfg.MaxWait > 0 {
				if old := b.Expire(now.Add(-w.cfg.MaxWait)); len(old) > 0 {
					w.log.Warn("requests waited longer than their bound for a slot; handing them back to the queue (no attempt counted)", "requests", len(old), "max_wait", w.cfg.MaxWait)
					w.handBack(old, queue.ReasonHeldTooLong)
				}
			}
		}
		if wait := w.backoffLeft(now); wait > 0 {
			waiting()
			timer.Reset(wait)
			continue
		}
		limit := w.sizer.Size()
		for i, l := range w.lanes {
			on[i] = int(l.onEngine.Load())
		}
		sched.Advance(now, on)
		for {
			total := int(w.onEngine.Load())
			for i, b := range bs {
				has[i], on[i] = b.Len() > 0, int(w.lanes[i].onEngine.Load())
			}
			order = sched.Order(order, has, on, limit)
			started := false
			for _, li := range order {
				bt, ok := bs[li].Next(now, limit, limit-total, total > 0)
				if !ok {
					continue
				}
				k := int64(len(bt.Items))
				w.onEngine.Add(k)
				w.lanes[li].onEngine.Add(k)
				calls.Add(1)
				pool.run(call{ctx: workCtx, bt: bt, on: total + int(k), done: &calls})
				started = true
				break
			}
			if !started {
				break
			}
		}
		left := waiting()
		// With the limit reached, only a call that ends can change anything:
		// wait for it rather than wake for windows that already passed (a
		// call that ends looks at the wait bound too). A deadline wakes the
		// dispatcher whatever the room: an expired request is answered at
		// once.
		next := time.Hour
		for _, b := range bs {
			if at, ok := b.Deadline(); ok && int(w.onEngine.Load()) < limit {
				next = min(next, max(at.Sub(now), time.Millisecond))
			}
			if at, ok := b.NextDue(); ok {
				next = min(next, max(at.Sub(now), time.Millisecond))
			}
		}
		if w.cfg.MaxWait > 0 && left > 0 {
			next = min(next, w.cfg.MaxWait)
		}
		timer.Reset(next)
	}
}

// callPool runs the dispatcher's engine calls on goroutines it keeps: a call
// goes to an idle one, or to a new one when none is idle. A call's stack
// grows deep (the engine's HTTP client, JSON, the broker's frames); a fresh
// goroutine per call grew it again each time, by copying, which cost the
// broker path about a tenth of its CPU (issue 29). There are never more
// goroutines than calls once ran at once (a call lives until its results
// are settled, so the prefetch window bounds them), and one idle for
// callIdle ends: an idle worker holds none. Only the dispatcher calls run
// and close.
const callIdle = 500 * time.Millisecond

type callPool struct {
	w    *Worker
	work chan call // unbuffered: taken only by an idle goroutine
	wg   sync.WaitGroup
}

// call is one engine call for the pool: a value, so handing it over costs
// no closure.
type call struct {
	ctx  context.Context
	bt   batch.Batch[*item]
	on   int             // requests on the engine counting this call's
	done *sync.WaitGroup // told when the call has settled its items
}

func (p *callPool) run(c call) {
	if p.work == nil {
		p.work = make(chan call)
	}
	select {
	case p.work <- c:
	default:
		p.wg.Go(func() {
			p.do(c)
			idle := time.NewTimer(callIdle)
			defer idle.Stop()
			for {
				select {
				case c, ok := <-p.work:
					if !ok {
						return
					}
					p.do(c)
					idle.Reset(callIdle)
				case <-idle.C:
					return
				}
			}
		})
	}
}

func (p *callPool) do(c call) {
	defer c.done.Done()
	p.w.runCall(c.ctx, c.bt, c.on)
}

// close ends the idle goroutines once their calls return, and waits for them.
func (p *callPool) close() {
	if p.work != nil {
		close(p.work)
	}
	p.wg.Wait()
}

// handBack requeues items with reason, concurrently: the dispatcher does
// not wait for the broker one delivery at a time.
func (w *Worker) handBack(items []*item, reason string) {
	w.settleAll(items, outcome{requeue: reason})
}

// settleAll settles items with out, concurrently.
func (w *Worker) settleAll(items []*item, out outcome) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for _, it := range items {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			w.settle(it, out)
		})
	}
	wg.Wait()
}

// listEnd is a list call of key, in lane, that ended.
type listEnd struct {
	lane int
	key  string
}

// giveBack returns items the engine had no room for to the dispatcher, and
// says that a list call of key in lane ended (key empty: not a list).
func (w *Worker) giveBack(items []*item, lane int, key string) {
	if len(items) > 0 || key != "" {
		w.backMu.Lock()
		w.back = append(w.back, items...)
		if key != "" {
			w.ended = append(w.ended, listEnd{lane, key})
		}
		w.backMu.Unlock()
	}
}

func (w *Worker) takeBack() (back []*item, ended []listEnd) {
	w.backMu.Lock()
	defer w.backMu.Unlock()
	back, ended = w.back, w.ended
	w.back, w.ended = nil, nil
	return back, ended
}

// SizeChanged tells the worker that Sizer.Size may have changed: the
// dispatcher uses a larger in-flight limit at once, and the receive loop
// takes the larger window, rather than when some call ends. Safe for
// concurrent use; it does not block (for sizing.Config.OnChange).
func (w *Worker) SizeChanged() {
	w.signal()
	w.freeAll()
}

// freeAll wakes every lane's receive loop: the room of one lane depends
// on what the lanes above it hold.
func (w *Worker) freeAll() {
	for _, l := range w.lanes {
		select {
		case l.freed <- struct{}{}:
		default:
		}
	}
}

// signal wakes the dispatcher.
func (w *Worker) signal() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *Worker) backoffLeft(now time.Time) time.Duration {
	w.backoffMu.Lock()
	defer w.backoffMu.Unlock()
	return w.backoffUntil.Sub(now)
}

// pause holds the next engine calls back after a retryable failure or an
// overload: the pause doubles with each one in a row, up to
// RetryBackoffMax, and ends with the next call that succeeds.
func (w *Worker) pause(ctx context.Context, msg string, err error) {
	w.backoffMu.Lock()
	if w.backoffStep == 0 {
		w.backoffStep = w.cfg.RetryBackoff
	} else {
		w.backoffStep = min(w.backoffStep*2, w.cfg.RetryBackoffMax)
	}
	step := w.backoffStep
	w.backoffUntil = w.now().Add(step)
	w.backoffMu.Unlock()
	w.log.WarnContext(ctx, msg, "err", err, "retry_in", step)
}

// engineFailed records a retryable engine failure and paces the next call.
func (w *Worker) engineFailed(ctx context.Context, err error) {
	w.engineUp.Store(false)
	w.obs.EngineHealth(err)
	w.pause(ctx, "engine call failed; pausing engine calls", err)
}

func (w *Worker) engineOK() {
	if !w.engineUp.Swap(true) {
		w.obs.EngineHealth(nil)
	}
	w.backoffMu.Lock()
	w.backoffStep = 0
	w.backoffMu.Unlock()
}

// Ready reports whether the worker can do work: the broker is connected,
// the engine answers and has the model, and dead-lettering works.
func (w *Worker) Ready(ctx context.Context) error {
	for _, l := range w.lanes {
		if r, ok := l.Broker.(readier); ok {
			if err := r.Ready(ctx); err != nil {
				if len(w.lanes) > 1 {
					return fmt.Errorf("broker (lane %s): %w", l.Name, err)
				}
				return fmt.Errorf("broker: %w", err)
			}
		}
	}
	if o := w.down.Load(); o != nil {
		return fmt.Errorf("engine: %w (taking no work until it answers)", o.err)
	}
	if err := w.dlq.failing(w.now()); err != nil {
		return err
	}
	if err := w.probeEngine(ctx); err != nil {
		return fmt.Errorf("engine: %w", err)
	}
	return nil
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
	w.obs.EngineHealth(err)
	return err
}

// LaneStat is one lane's state now.
type LaneStat struct {
	Name string
	// Waiting is the number of its requests waiting in the worker for a
	// slot; InFlight the number received and not settled (waiting, on the
	// engine, or having their result confirmed); OnEngine the number in
	// engine calls.
	Waiting, InFlight, OnEngine int
}

// LaneStats reports every lane's state, highest rank first. Safe for
// concurrent use.
func (w *Worker) LaneStats() []LaneStat {
	out := make([]LaneStat, len(w.lanes))
	for i, l := range w.lanes {
		out[i] = LaneStat{Name: l.Name, Waiting: int(l.waiting.Load()), InFlight: int(l.inflight.Load()), OnEngine: int(l.onEngine.Load())}
	}
	return out
}

// InFlight is the number of deliveries received and not yet settled.
func (w *Worker) InFlight() int { return int(w.inflight.Load()) }

// OnEngine is the number of requests in engine calls that have not
// answered yet.
func (w *Worker) OnEngine() int { return int(w.onEngine.Load()) }

var errPanic = errors.New("internal error")

// errDeadline is the error of a request whose deadline passed while queued.
var errDeadline = &inference.Error{Kind: inference.Permanent, Code: wire.ReasonExpired, Err: errors.New("the request's deadline passed before it reached the engine")}

// contain logs a panic in a goroutine the worker owns instead of letting it
// end the process. Use it deferred.
func (w *Worker) contain(where string) {
	if p := recover(); p != nil {
		w.log.Error("panic contained", "where", where, "panic", p, "stack", string(debug.Stack()))
	}
}
