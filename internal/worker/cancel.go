package worker

import (
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/wire"
)

// maxCancels bounds the cancels a worker keeps: each lasts until its
// Until, and a producer that sent more than this many at once would only
// make the oldest run.
const maxCancels = 4096

// cancels are the producers' cancellations in force (wire.Cancel): prefix
// of a correlation id → until when. Safe for concurrent use.
type cancels struct {
	mu  sync.Mutex
	m   map[string]time.Time
	gen uint64 // grows with every new cancel, for the dispatcher's sweep
}

func (c *cancels) add(x wire.Cancel, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !x.Until.After(now) {
		return false
	}
	if c.m == nil {
		c.m = map[string]time.Time{}
	}
	for p, until := range c.m {
		if !until.After(now) {
			delete(c.m, p)
		}
	}
	if _, ok := c.m[x.Prefix]; !ok && len(c.m) >= maxCancels {
		return false
	}
	c.m[x.Prefix] = x.Until
	c.gen++
	return true
}

// generation changes whenever a cancel is added.
func (c *cancels) generation() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gen
}

// match says whether d's correlation id is cancelled at now.
func (c *cancels) match(d *queue.Delivery, now time.Time) bool {
	if d == nil || d.CorrelationID == "" {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for p, until := range c.m {
		if until.After(now) && strings.HasPrefix(d.CorrelationID, p) {
			return true
		}
	}
	return false
}

// Cancel takes a producer's cancellation: the requests it names are
// answered cancelled (an error result, then acked) when they arrive, and
// those waiting in this worker for a slot at once; a request already on
// the engine finishes. Safe for concurrent use.
func (w *Worker) Cancel(c wire.Cancel) {
	if w.cancels.add(c, w.now()) {
		w.log.Info("requests cancelled by their producer", "prefix", c.Prefix, "until", c.Until)
		w.signal()
	}
}

// errCancelled is the outcome of a request its producer cancelled.
var errCancelled = &inference.Error{Kind: inference.Permanent, Code: wire.ReasonCancelled, Err: errors.New("cancelled by its producer before it reached the engine")}
