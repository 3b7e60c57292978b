package fleet

import (
	"slices"
	"time"
)

// DeadlineFloor is the least time left DeadlineReplicas divides by: the
// HPA's sync period, below which no answer can act in time anyway. A
// deadline closer than the margin (or already past) asks for its work
// to be done within the floor, a large but finite number of replicas
// that maxReplicaCount bounds.
const DeadlineFloor = 15 * time.Second

// DeadlineReplicas is how many replicas finish every deadline's work in
// time: for each deadline in order, the requests due by it (its own and
// every earlier one's) times cost (seconds of one replica per request)
// over the time left before it less margin, at least DeadlineFloor; the
// largest over the deadlines. due may be in any order; it is not
// changed. 0 when nothing is due or cost is 0.
//
// The scaler (internal/scaler) and the fleet simulation
// (internal/fleetsim) both call it, so the simulated design is the
// shipped one.
func DeadlineReplicas(due []Due, cost float64, now time.Time, margin time.Duration) float64 {
	if cost <= 0 || len(due) == 0 {
		return 0
	}
	if !slices.IsSortedFunc(due, byDeadline) {
		due = slices.SortedStableFunc(slices.Values(due), byDeadline)
	}
	r, seconds := 0.0, 0.0
	for _, u := range due {
		if u.Requests <= 0 {
			continue // nothing more due by it: a later time left, the same work
		}
		seconds += float64(u.Requests) * cost
		left := max(u.By.Sub(now)-margin, DeadlineFloor)
		r = max(r, seconds/left.Seconds())
	}
	return r
}

func byDeadline(a, b Due) int { return a.By.Compare(b.By) }

// mergeDue merges due lists into one, earliest first, the requests of
// equal deadlines added up and deadlines with none left out.
func mergeDue(lists ...[]Due) []Due {
	var out []Due
	for _, l := range lists {
		for _, u := range l {
			if u.Requests > 0 {
				out = append(out, u)
			}
		}
	}
	slices.SortFunc(out, byDeadline)
	merged := out[:0]
	for _, u := range out {
		if n := len(merged); n > 0 && merged[n-1].By.Equal(u.By) {
			merged[n-1].Requests += u.Requests
			continue
		}
		merged = append(merged, u)
	}
	if len(merged) == 0 {
		return nil
	}
	return merged
}
