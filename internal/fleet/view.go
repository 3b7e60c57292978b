package fleet

import (
	"maps"
	"sync"
	"time"
)

// View is the scaler's picture of the fleet: the latest report of each
// worker and lane, the latest demand of each producer and queue, and the
// last cost seen of each queue, kept when its workers are gone (scaled
// to zero) so that the first request of the next burst is priced as the
// last ones were. Safe for concurrent use.
type View struct {
	mu      sync.Mutex
	reports map[key]Report
	demands map[key]Demand     // key.worker is the demand's source
	last    map[string]float64 // queue → cost
}

type key struct{ worker, queue string }

// NewView returns a View that starts from saved costs (queue → seconds
// per request for one replica), as Costs returned them; nil for none.
func NewView(saved map[string]float64) *View {
	v := &View{reports: map[key]Report{}, demands: map[key]Demand{}, last: map[string]float64{}}
	maps.Copy(v.last, saved)
	return v
}

// Add takes a report. An older report of the same worker and lane than
// the one held is ignored.
func (v *View) Add(r Report) {
	v.mu.Lock()
	defer v.mu.Unlock()
	k := key{r.Worker, r.Queue}
	if old, ok := v.reports[k]; ok && old.At.After(r.At) {
		return
	}
	v.reports[k] = r
	if c, ok := r.Cost(); ok {
		v.last[r.Queue] = c
	}
}

// AddDemand takes a producer's demand: it replaces the one held of the
// same source and queue (an empty Due clears it), unless that one is
// newer.
func (v *View) AddDemand(d Demand) {
	v.mu.Lock()
	defer v.mu.Unlock()
	k := key{d.Source, d.Queue}
	if old, ok := v.demands[k]; ok && old.At.After(d.At) {
		return
	}
	v.demands[k] = d
}

// Due returns the work due on queue at now by deadline, from the latest
// demand of each source, earliest first, the requests of equal deadlines
// added up; nil when none is due. Demands older than ReportTTL are
// dropped: a producer that stops saying it has stopped needing it.
func (v *View) Due(queue string, now time.Time) []Due {
	v.mu.Lock()
	defer v.mu.Unlock()
	var lists [][]Due
	for k, d := range v.demands {
		if now.Sub(d.At) > ReportTTL {
			delete(v.demands, k)
			continue
		}
		if k.queue == queue {
			lists = append(lists, d.Due)
		}
	}
	return mergeDue(lists...)
}

// LaneState is what the fleet says of one queue now.
type LaneState struct {
	// Cost is the seconds one replica spends per request of the queue:
	// the mean over the workers reporting it now, else the last seen.
	// Known is false when no worker has ever measured the queue.
	Cost  float64
	Known bool
	// InFlight is the requests of the queue the reporting workers hold;
	// Workers is how many report it.
	InFlight, Workers int
}

// Lane returns the state of queue at now, dropping reports older than
// ReportTTL.
func (v *View) Lane(queue string, now time.Time) LaneState {
	v.mu.Lock()
	defer v.mu.Unlock()
	var s LaneState
	sum, n := 0.0, 0
	for k, r := range v.reports {
		if now.Sub(r.At) > ReportTTL {
			delete(v.reports, k)
			continue
		}
		if k.queue != queue {
			continue
		}
		s.Workers++
		s.InFlight += r.InFlight
		if c, ok := r.Cost(); ok {
			sum += c
			n++
		}
	}
	switch {
	case n > 0:
		s.Cost, s.Known = sum/float64(n), true
	default:
		s.Cost, s.Known = v.last[queue]
	}
	return s
}

// Costs returns the last cost seen of every queue, to save.
func (v *View) Costs() map[string]float64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return maps.Clone(v.last)
}
