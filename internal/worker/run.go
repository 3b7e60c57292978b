package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sous-run/sous/internal/batch"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/wire"
)

// runCall makes one engine call (one request, or a list of them) and
// settles its items. on is the number of requests on the engine counting
// this call's. The call's room in the in-flight limit is released the
// moment the engine answers, before its results are published, with the
// items the engine had no room for handed back to the dispatcher.
func (w *Worker) runCall(ctx context.Context, bt batch.Batch[*item], on int) {
	rec := newCallRecord(bt)
	// done marks items this goroutine no longer owns: settled, or handed
	// back to the dispatcher.
	done := rec.done
	listKey := ""
	if len(bt.Items) > 0 && bt.Items[0].perCall > 1 {
		listKey = bt.Key
	}
	l := bt.Items[0].lane // a call's items share a lane
	released := false     // only this goroutine releases
	release := func(back []*item) {
		if released {
			return
		}
		released = true
		w.giveBack(back, l.idx, listKey)
		w.onEngine.Add(-int64(len(bt.Items)))
		l.onEngine.Add(-int64(len(bt.Items)))
		w.signal()
	}
	defer func() {
		// A panic here (a stream callback, say) must not stop the worker or
		// strand deliveries: hand back what is not yet settled.
		if p := recover(); p != nil {
			w.log.ErrorContext(ctx, "panic in an engine call; requeueing what it had not settled", "batch_id", bt.ID, "panic", p, "stack", string(debug.Stack()))
			release(nil)
			for i, it := range bt.Items {
				if !done[i].Load() {
					w.settle(it, outcome{requeue: "internal_error"})
				}
			}
		}
		release(nil)
	}()
	// index finds an item's place in the call: a call holds few items, and
	// a map per call cost more than the search.
	index := func(it *item) int {
		for i, x := range bt.Items {
			if x == it {
				return i
			}
		}
		panic("worker: an item not in its own call")
	}
	start := w.now()
	info, ev := &rec.info, &rec.ev
	ev.Start = start
	ctx = w.obs.BatchStarted(ctx, ev)
	if w.log.Enabled(ctx, slog.LevelDebug) { // its arguments cost allocations even when not logged
		w.log.DebugContext(ctx, "engine call", "batch_id", bt.ID, "batch_size", len(bt.Items), "reason", bt.Reason)
	}

	live := make([]*item, 0, len(bt.Items))
	for _, it := range bt.Items {
		it.dispatched = start
		if !it.dec.Deadline.IsZero() && !start.Before(it.dec.Deadline) {
			done[index(it)].Store(true)
			w.settle(it, outcome{err: errDeadline, batch: info})
			continue
		}
		live = append(live, it)
	}
	results := w.infer(ctx, live, on)

	// What the engine had no room for was not run: it goes back to the
	// dispatcher, to run when there is room, and spends no attempt.
	var back []*item
	keep, keepRes := live[:0], results[:0] // filtered in place
	for i, it := range live {
		err := results[i].Err
		if inference.KindOf(err) == inference.Overloaded && ctx.Err() == nil && it.overloads < w.cfg.MaxAttempts {
			it.overloads++
			done[index(it)].Store(true)
			back = append(back, it)
			continue
		}
		keep, keepRes = append(keep, it), append(keepRes, results[i])
	}
	release(back)
	end := w.now()
	elapsed := end.Sub(start)
	w.obs.BatchFinished(ctx, ev, elapsed)

	for i := range keep {
		if keepRes[i].Err == nil {
			l.meter.observe(end, elapsed, keepRes[i].Response.Usage.OutputTokens)
		}
	}

	outcomeOf := func(i int) outcome {
		out := outcome{resp: keepRes[i].Response, err: keepRes[i].Err, batch: info, inference: elapsed}
		if out.err != nil && w.workerFault(keep[i], out.err) {
			out = outcome{requeue: queue.ReasonEngineDown}
		}
		return out
	}
	if len(keep) == 1 { // a call of one settles here, without a goroutine hand-off
		done[index(keep[0])].Store(true)
		w.settle(keep[0], outcomeOf(0))
		return
	}
	// Results of a list are published concurrently, so their confirms
	// overlap.
	var wg sync.WaitGroup
	for i, it := range keep {
		done[index(it)].Store(true)
		out := outcomeOf(i)
		wg.Go(func() { w.settle(it, out) })
	}
	wg.Wait()
}

// callRecord is what an engine call keeps for its observers and results,
// in one allocation for a call of one request (most calls).
type callRecord struct {
	info wire.BatchInfo
	ev   BatchEvent
	done []atomic.Bool // per item: settled, or handed back

	one     [1]BatchItem
	oneDone [1]atomic.Bool
}

func newCallRecord(bt batch.Batch[*item]) *callRecord {
	n := len(bt.Items)
	rec := &callRecord{
		info: wire.BatchInfo{ID: bt.ID, Size: n},
		ev:   BatchEvent{ID: bt.ID, Reason: string(bt.Reason)},
	}
	if n == 1 {
		rec.ev.Items, rec.done = rec.one[:], rec.oneDone[:]
	} else {
		rec.ev.Items, rec.done = make([]BatchItem, n), make([]atomic.Bool, n)
	}
	for i, it := range bt.Items {
		rec.ev.Items[i] = BatchItem{Ctx: it.ctx, Delivery: it.d}
	}
	if n > 0 { // items of a call share kind and model
		rec.ev.Kind, rec.ev.Model = bt.Items[0].dec.Req.Kind, bt.Items[0].dec.Req.Model
	}
	return rec
}

// infer makes the engine call for items and learns from the answer: the
// sizer, the pause after failures, and whether the engine is down. on is
// the number of requests on the engine counting these.
func (w *Worker) infer(ctx context.Context, items []*item, on int) []inference.Result {
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
			reqs[i].StreamToolCalls = streams[i].addToolCalls
		}
	}
	callCtx, end := w.obs.EngineCall(ctx, EngineCall{Kind: reqs[0].Kind, Model: reqs[0].Model, Size: len(reqs)})
	results, err := w.callEngine(callCtx, reqs)
	if err == nil && len(results) != len(reqs) {
		err = &inference.Error{Kind: inference.Retryable, Code: "engine_error", Err: errors.New("engine returned a result count that does not match the call")}
	}
	if err != nil {
		results = make([]inference.Result, len(reqs))
		for i := range results {
			results[i].Err = err
		}
	}
	w.obs.engineCallEnded(end, results)
	for _, s := range streams {
		if s != nil {
			s.flush()
		}
	}
	if ctx.Err() != nil {
		// Cut off by the drain deadline: this says nothing about the
		// engine's health or room.
		return results
	}
	if err != nil && inference.KindOf(err) == inference.Permanent && len(items) > 1 {
		// The engine refused the whole call (one input over the context,
		// say): find the culprit by running each request alone, so its
		// call-mates are not dead-lettered with it.
		w.log.InfoContext(ctx, "engine refused a whole call; retrying its requests one by one", "batch_size", len(items), "err", err)
		for i, it := range items {
			results[i] = w.infer(ctx, []*item{it}, on)[0]
		}
		return results
	}
	var overload, lastErr error
	retryable, notRun := 0, false
	for _, r := range results {
		switch {
		case r.Err == nil:
		case inference.KindOf(r.Err) == inference.Overloaded:
			overload = r.Err
		case inference.KindOf(r.Err) == inference.Retryable && !errors.Is(r.Err, context.Canceled):
			retryable++
			lastErr = r.Err
			var e *inference.Error
			notRun = notRun || errors.As(r.Err, &e) && e.NotRun
		case inference.CodeOf(r.Err) == "model_not_found" && items[0].dec.Req.Model == w.cfg.Limits.DefaultModel:
			w.engineDown(fmt.Errorf("the engine has no model %q (SOUS_MODEL): %w", items[0].dec.Req.Model, r.Err))
		}
	}
	switch {
	case overload != nil:
		w.sizer.Overloaded(on)
		w.pause(ctx, "engine overloaded; lowering the in-flight limit and pausing engine calls", overload)
	case retryable == len(results):
		w.engineFailed(ctx, lastErr)
		if notRun || w.probeEngine(ctx) != nil {
			w.engineDown(lastErr)
		}
	default:
		w.engineOK()
		w.sizer.Succeeded(on)
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

// callEngine calls the engine with the engine timeout (to within
// boundStep: the bound is shared, see Worker.engineBound), turning a panic in the
// driver into a retryable error so one bad call cannot stop the worker.
func (w *Worker) callEngine(ctx context.Context, reqs []inference.Request) (res []inference.Result, err error) {
	callCtx, cancel := w.engineBound.Bound(ctx)
	defer cancel()
	defer func() {
		if p := recover(); p != nil {
			w.log.ErrorContext(ctx, "engine driver panicked", "panic", p)
			res, err = nil, &inference.Error{Kind: inference.Retryable, Code: "internal_error", Err: errPanic}
		}
	}()
	return w.engine.Infer(callCtx, reqs)
}
