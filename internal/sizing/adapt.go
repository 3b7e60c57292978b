package sizing

import (
	"context"
	"fmt"
	"time"
)

// QueueReader reads an engine's own scheduler gauges: how many requests it
// runs now and how many it holds waiting. ok is false when the engine shows
// no such gauges. The OpenAI-compatible driver's Queue satisfies it (vLLM's
// vllm:num_requests_running and vllm:num_requests_waiting).
type QueueReader interface {
	Queue(ctx context.Context) (running, waiting int, ok bool, err error)
}

// Adapter finds an engine's slots from its wait queue, for an engine that
// shows its running and waiting requests but not how many it runs at once
// (vLLM: max_num_seqs and the KV cache decide, and neither is exposed). It
// sets the Sizer's engine slots so the engine's own wait queue stays short:
//
//   - Slow start: while nothing waits in the engine and it runs about as
//     many requests as the slots allow, the slots double each reading, up
//     to Max.
//   - A wait queue of more than a few requests (max(1, slots/16)) on two
//     readings in a row means the engine is full below the slots: they drop
//     to what it runs plus that margin, and growth from then on is by an
//     eighth per reading (at least 1), so the limit settles just above what
//     the engine takes.
//
// A request waiting inside the engine is a request no other worker can
// take and one the engine's own scheduler, not sous's fairness, orders; a
// short queue keeps the engine busy without either.
type Adapter struct {
	s        *Sizer
	q        QueueReader
	interval time.Duration

	slots    int
	cut      bool // the slots have been cut once: growth is additive
	fullRuns int  // readings in a row with a wait queue over the margin
}

// NewAdapter returns an Adapter that reads q every interval and sets s's
// engine slots, starting at start.
func NewAdapter(s *Sizer, q QueueReader, start int, interval time.Duration) (*Adapter, error) {
	if interval <= 0 {
		return nil, fmt.Errorf("sizing: queue reading interval is %v, want more than 0", interval)
	}
	a := &Adapter{s: s, q: q, interval: interval, slots: min(max(start, s.cfg.Min), s.cfg.Max)}
	s.SetEngineParallel(a.slots)
	return a, nil
}

// Slots returns the slots the Adapter set last. Not safe for use
// concurrently with Run.
func (a *Adapter) Slots() int { return a.slots }

// Observe takes one reading and adjusts the slots; it returns the slots in
// force after it. Run calls it on each tick; tests call it directly.
func (a *Adapter) Observe(running, waiting int) int {
	margin := max(1, a.slots/16)
	if waiting > margin {
		a.fullRuns++
		if a.fullRuns >= 2 {
			a.fullRuns = 0
			if n := running + margin; n < a.slots {
				a.set(n)
				a.cut = true
			}
		}
		return a.slots
	}
	a.fullRuns = 0
	if waiting == 0 && running >= a.slots-margin && a.slots < a.s.cfg.Max {
		if a.cut {
			a.set(a.slots + max(1, a.slots/8))
		} else {
			a.set(a.slots * 2)
		}
	}
	return a.slots
}

func (a *Adapter) set(n int) {
	a.slots = min(max(n, a.s.cfg.Min), a.s.cfg.Max)
	a.s.SetEngineParallel(a.slots)
}

// Run reads the engine's queue every interval until ctx is done, and
// returns nil then. A failed or empty reading leaves the slots as they
// are; the Logger hears when readings start and stop failing, not each
// one.
func (a *Adapter) Run(ctx context.Context) error {
	t := time.NewTicker(a.interval)
	defer t.Stop()
	failing := ""
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, a.interval)
		running, waiting, ok, err := a.q.Queue(rctx)
		cancel()
		switch {
		case ctx.Err() != nil:
			return nil
		case err != nil || !ok:
			msg := "the engine shows no running/waiting gauges"
			if err != nil {
				msg = err.Error()
			}
			if msg != failing {
				failing = msg
				a.s.cfg.Logger.Warn("engine queue reading failed; keeping the engine slots", "slots", a.slots, "err", msg)
			}
			continue
		case failing != "":
			failing = ""
			a.s.cfg.Logger.Info("engine queue reading recovered")
		}
		a.Observe(running, waiting)
	}
}
