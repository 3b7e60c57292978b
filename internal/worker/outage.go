package worker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/sous-run/sous/internal/inference"
)

// outage is an engine that is down, or lacks the model the worker was
// configured with: a fault of the worker, not of any request. While it
// lasts the worker takes no work (the broker is paused where it can be,
// and waiting requests go back to the queue with no attempt counted), and
// a prober checks the engine until it answers.
type outage struct {
	err   error
	since time.Time
	up    chan struct{} // closed when the outage ends
}

// engineDown starts an outage, unless one is on. The prober runs until the
// engine answers or Run's context ends.
func (w *Worker) engineDown(err error) {
	o := &outage{err: err, since: w.now(), up: make(chan struct{})}
	w.bgMu.Lock()
	defer w.bgMu.Unlock()
	if w.bgClosed || !w.down.CompareAndSwap(nil, o) {
		return // draining: no prober is started once Run waits for them
	}
	w.engineUp.Store(false)
	w.obs.EngineHealth(err)
	w.log.Error("the engine cannot take work; taking none until it does (requests stay in the queue, no attempt counted)", "err", err)
	w.stopReceiving() // take nothing more
	w.signal()        // the dispatcher hands back what waits
	w.bg.Add(1)
	go func() {
		defer w.bg.Done()
		defer w.contain("engine prober")
		w.probeUntilUp(o)
	}()
}

func (w *Worker) probeUntilUp(o *outage) {
	ctx := w.runCtx
	for _, l := range w.lanes {
		p, ok := l.Broker.(pauser)
		if !ok {
			continue
		}
		if err := p.Pause(ctx); err != nil && ctx.Err() == nil {
			w.log.Warn("pause the broker while the engine is down", "lane", l.Name, "err", err)
		}
		defer func() {
			if err := p.Resume(context.WithoutCancel(ctx)); err != nil {
				w.log.Warn("resume the broker", "lane", l.Name, "err", err)
			}
		}()
	}
	step := w.cfg.RetryBackoff
	last := o.err
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(step):
		}
		err := w.checkEngine(ctx)
		if err == nil {
			w.down.Store(nil)
			close(o.up)
			w.engineOK()
			w.log.Info("the engine answers again; taking work", "down_for", w.now().Sub(o.since).Round(time.Millisecond))
			w.signal()
			return
		}
		if err.Error() != last.Error() {
			w.log.Warn("the engine still cannot take work", "err", err)
			last = err
		}
		step = min(step*2, w.cfg.RetryBackoffMax)
	}
}

// checkEngine probes the engine and checks that it has the default model
// (and says which allowed models it lacks). An engine with no probe is
// taken to be up.
func (w *Worker) checkEngine(ctx context.Context) error {
	if err := w.probeEngine(ctx); err != nil {
		return fmt.Errorf("the engine does not answer: %w", err)
	}
	m, ok := w.engine.(modeler)
	if !ok {
		return nil
	}
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	have, err := m.Models(lctx)
	if err != nil {
		// Not every server lists its models; the calls will tell.
		if !w.modelsUnlisted.Swap(true) {
			w.log.Warn("cannot check that the engine has the model: it does not list its models", "err", err)
		}
		return nil
	}
	def := w.cfg.Limits.DefaultModel
	if def != "" && !inference.HasModel(have, def) {
		return &missingModel{model: def, have: have}
	}
	var missing []string
	for _, a := range w.cfg.Limits.AllowedModels {
		if !inference.HasModel(have, a) {
			missing = append(missing, a)
		}
	}
	if len(missing) > 0 {
		w.log.Warn("the engine lacks some allowed models (SOUS_MODELS_ALLOWED): requests for them will fail with model_not_found", "missing", missing)
	}
	return nil
}

// missingModel: the engine lacks the worker's default model.
type missingModel struct {
	model string
	have  []string
}

func (e *missingModel) Error() string {
	return fmt.Sprintf("the engine has no model %q (SOUS_MODEL); it has %s: pull the model into the engine or set SOUS_MODEL to one it has", e.model, listOrNone(e.have))
}

func listOrNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	if len(s) > 10 {
		s = append(s[:10:10], "…")
	}
	return strings.Join(s, ", ")
}

// workerFault reports whether err, from an engine call for item it, is the
// worker's fault rather than the request's: the engine was never reached
// (the connection was refused: it cannot be the request that broke it), or
// the engine lacks the model the worker was configured with.
func (w *Worker) workerFault(it *item, err error) bool {
	var e *inference.Error
	if !errors.As(err, &e) {
		return false
	}
	if e.NotRun && e.Kind == inference.Retryable {
		return true
	}
	return e.Code == "model_not_found" && it.dec.Req.Model == w.cfg.Limits.DefaultModel
}

// deadLetters remembers that dead-lettering fails (a dead-letter queue that
// is missing, full with reject-publish, or without quorum), for /readyz,
// and sets the pause in taking work that follows each failure: it doubles
// while dead-lettering keeps failing, so a request that cannot be
// dead-lettered does not come straight back in a loop.
type deadLetters struct {
	mu    sync.Mutex
	err   error
	at    time.Time
	until time.Time // no new work before this
	step  time.Duration
	count int
}

// failed records a failure and returns the pause it starts.
func (d *deadLetters) failed(err error, now time.Time, base, ceiling time.Duration) time.Duration {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.err, d.at = err, now
	d.count++
	if d.step == 0 {
		d.step = base
	} else {
		d.step = min(d.step*2, ceiling)
	}
	d.until = now.Add(d.step)
	return d.step
}

func (d *deadLetters) succeeded() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.err, d.step, d.until = nil, 0, time.Time{}
}

// pausedFor is how long the worker is still to take no new work.
func (d *deadLetters) pausedFor(now time.Time) time.Duration {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.until.Sub(now)
}

// failing is the last failure, if dead-lettering has not worked since and
// it is recent.
func (d *deadLetters) failing(now time.Time) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err == nil || now.Sub(d.at) > 5*time.Minute {
		return nil
	}
	state := "taking work again; the next request to dead-letter tries again"
	if now.Before(d.until) {
		state = fmt.Sprintf("taking no new work for %s, then trying again", d.until.Sub(now).Round(time.Millisecond))
	}
	return fmt.Errorf("dead-lettering fails (%d times so far; requests that must be dead-lettered go back to the queue, no attempt counted; %s): %w", d.count, state, d.err)
}
