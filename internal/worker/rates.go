package worker

import (
	"math"
	"sync"
	"time"
)

// rateWindow is the time constant of a lane's measured rates: about a
// minute of completions, so that a burst of short answers does not make
// the lane look fast, nor one long answer slow.
const rateWindow = time.Minute

// meter measures one lane's completions: requests and output tokens per
// second, and the mean time on the engine per request, each smoothed
// exponentially over rateWindow of time (not of requests). Safe for
// concurrent use.
type meter struct {
	mu             sync.Mutex
	last           time.Time
	served, tokens float64 // per second
	service        float64 // seconds per request
}

// observe records one request that spent d on the engine and wrote tokens
// output tokens, finished at now.
func (m *meter) observe(now time.Time, d time.Duration, tokens int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	tau := rateWindow.Seconds()
	if m.last.IsZero() {
		m.last, m.service = now, d.Seconds()
	}
	dt := max(0, now.Sub(m.last).Seconds())
	m.last = now
	decay := math.Exp(-dt / tau)
	m.served = m.served*decay + 1/tau
	m.tokens = m.tokens*decay + float64(tokens)/tau
	// The mean moves by the weight of the time since the last completion,
	// at least a small step per request.
	alpha := max(1-decay, 1/(tau*10))
	m.service += alpha * (d.Seconds() - m.service)
}

// read returns the rates decayed to now.
func (m *meter) read(now time.Time) (served, tokens, service float64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.last.IsZero() {
		return 0, 0, 0
	}
	decay := math.Exp(-max(0, now.Sub(m.last).Seconds()) / rateWindow.Seconds())
	return m.served * decay, m.tokens * decay, m.service
}

// LaneRate is one lane's measured rates.
type LaneRate struct {
	Name, Queue string
	// ServedPerS and OutputTokensPerS are completions and output tokens
	// per second; MeanServiceS the mean time on the engine per request
	// (0 before the first completion). Smoothed over about a minute.
	ServedPerS, OutputTokensPerS, MeanServiceS float64
}

// LaneRates reports every lane's measured rates, highest rank first. Safe
// for concurrent use.
func (w *Worker) LaneRates() []LaneRate {
	now := w.now()
	out := make([]LaneRate, len(w.lanes))
	for i, l := range w.lanes {
		s, t, svc := l.meter.read(now)
		out[i] = LaneRate{Name: l.Name, Queue: l.Queue, ServedPerS: s, OutputTokensPerS: t, MeanServiceS: svc}
	}
	return out
}
