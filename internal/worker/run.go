package worker

import (
	"context"
	"errors"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sous-run/sous/internal/batch"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/wire"
)

// runBatch runs one batch on the engine and settles every item. It calls
// release once the engine has answered, before settling.
func (w *Worker) runBatch(ctx context.Context, bt batch.Batch[*item], release func()) {
	settled := make([]atomic.Bool, len(bt.Items))
	defer func() {
		// A panic here (an observer, a stream callback) must not stop the
		// worker or strand deliveries: hand back what is not yet settled.
		if p := recover(); p != nil {
			w.log.ErrorContext(ctx, "panic in a batch; requeueing what it had not settled", "batch_id", bt.ID, "panic", p, "stack", string(debug.Stack()))
			for i, it := range bt.Items {
				if !settled[i].Load() {
					w.settle(it, outcome{requeue: "internal_error"})
				}
			}
		}
	}()
	index := make(map[*item]int, len(bt.Items))
	for i, it := range bt.Items {
		index[it] = i
	}
	start := w.now()
	info := &wire.BatchInfo{ID: bt.ID, Size: len(bt.Items)}
	ev := &BatchEvent{ID: bt.ID, Reason: string(bt.Reason), Start: start, Items: make([]BatchItem, len(bt.Items))}
	for i, it := range bt.Items {
		ev.Items[i] = BatchItem{Ctx: it.ctx, Delivery: it.d}
	}
	if len(bt.Items) > 0 { // items of a batch share kind and model
		ev.Kind, ev.Model = bt.Items[0].dec.Req.Kind, bt.Items[0].dec.Req.Model
	}
	ctx = w.cfg.Observer.BatchStarted(ctx, ev)
	w.log.DebugContext(ctx, "batch", "batch_id", bt.ID, "batch_size", len(bt.Items), "reason", bt.Reason)

	live := make([]*item, 0, len(bt.Items))
	for _, it := range bt.Items {
		it.dispatched = start
		if !it.dec.Deadline.IsZero() && !start.Before(it.dec.Deadline) {
			settled[index[it]].Store(true)
			w.settle(it, outcome{err: errDeadline, batch: info})
			continue
		}
		live = append(live, it)
	}
	results := w.infer(ctx, live)
	release()
	elapsed := w.now().Sub(start)
	w.cfg.Observer.BatchFinished(ctx, ev, elapsed)

	// Results of a batch are published concurrently, so their confirms
	// overlap; a batch of one settles here, without a goroutine hand-off.
	var wg sync.WaitGroup
	for i, it := range live {
		settled[index[it]].Store(true)
		out := outcome{resp: results[i].Response, err: results[i].Err, batch: info, inference: elapsed}
		if len(live) == 1 {
			w.settle(it, out)
			break
		}
		wg.Go(func() { w.settle(it, out) })
	}
	wg.Wait()
}

// infer calls the engine. Items rejected for overload are retried in halves
// before their error stands, and the sizer learns of it.
func (w *Worker) infer(ctx context.Context, items []*item) []inference.Result {
	if len(items) == 0 {
		return nil
	}
	reqs := make([]inference.Request, len(items))
	streams := make([]*chunker, len(items))
	for i, it := range items {
		reqs[i] = it.dec.Req
		if it.dec.Stream {
			streams[i] = w.newChunker(ctx, it)
			reqs[i].Stream = streams[i].add
		}
	}
	callCtx, end := w.cfg.Observer.EngineCall(ctx, EngineCall{Kind: reqs[0].Kind, Model: reqs[0].Model, Size: len(reqs)})
	results, err := w.callEngine(callCtx, reqs)
	if err == nil && len(results) != len(reqs) {
		err = &inference.Error{Kind: inference.Retryable, Code: "engine_error", Err: errors.New("engine returned a result count that does not match the batch")}
	}
	if err != nil {
		results = make([]inference.Result, len(reqs))
		for i := range results {
			results[i].Err = err
		}
	}
	end(results)
	if err != nil && inference.KindOf(err) == inference.Permanent && len(items) > 1 && ctx.Err() == nil {
		// The engine refused the whole call (one input over the context,
		// say): find the culprit by running each request alone, so its
		// batch-mates are not dead-lettered with it.
		w.log.InfoContext(ctx, "engine refused a whole batch; retrying its requests one by one", "batch_size", len(items), "err", err)
		for i, it := range items {
			results[i] = w.infer(ctx, []*item{it})[0]
		}
		return results
	}
	var overloaded []int
	retryable := 0
	var lastErr error
	for i, r := range results {
		switch {
		case r.Err == nil:
		case inference.KindOf(r.Err) == inference.Overloaded:
			overloaded = append(overloaded, i)
		case inference.KindOf(r.Err) == inference.Retryable && !errors.Is(r.Err, context.Canceled):
			retryable++
			lastErr = r.Err
		}
	}
	switch {
	case len(overloaded) > 0:
		w.sizer.Overloaded(len(items))
	case retryable == len(results):
		w.engineFailed(ctx, lastErr)
	default:
		w.engineOK()
		w.sizer.Succeeded(len(items))
	}
	for _, s := range streams {
		if s != nil {
			s.flush()
		}
	}
	if len(overloaded) > 1 && ctx.Err() == nil {
		// Split the rejected part in halves and retry each before anything
		// is requeued: a smaller batch may fit.
		half := len(overloaded) / 2
		for _, part := range [][]int{overloaded[:half], overloaded[half:]} {
			sub := make([]*item, len(part))
			for j, i := range part {
				sub[j] = items[i]
			}
			w.log.InfoContext(ctx, "engine overloaded: retrying a smaller batch", "batch_size", len(sub))
			for j, r := range w.infer(ctx, sub) {
				results[part[j]] = r
			}
		}
	}
	return results
}

// outcome is what happened to one item; settle turns it into a decision.
type outcome struct {
	resp      inference.Response
	err       error
	batch     *wire.BatchInfo
	inference time.Duration
	// requeue, when set, returns the delivery untouched with this reason
	// (shutdown, or a result that could not be published).
	requeue string
}

// callEngine calls the engine with the engine timeout, turning a panic in the
// driver into a retryable error so one bad call cannot stop the worker.
func (w *Worker) callEngine(ctx context.Context, reqs []inference.Request) (res []inference.Result, err error) {
	callCtx, cancel := context.WithTimeout(ctx, w.cfg.EngineTimeout)
	defer cancel()
	defer func() {
		if p := recover(); p != nil {
			w.log.ErrorContext(ctx, "engine driver panicked", "panic", p)
			res, err = nil, &inference.Error{Kind: inference.Retryable, Code: "internal_error", Err: errPanic}
		}
	}()
	return w.engine.Infer(callCtx, reqs)
}
