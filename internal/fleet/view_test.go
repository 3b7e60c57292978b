package fleet_test

import (
	"slices"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/fleet"
)

// Demands: the latest of each source and queue counts, merged by
// deadline; an older one does not replace it; an empty one clears it;
// one older than ReportTTL is gone.
func TestViewDue(t *testing.T) {
	t.Parallel()
	now := time.Unix(50_000, 0)
	by1, by2 := now.Add(time.Hour), now.Add(2*time.Hour)
	v := fleet.NewView(nil)
	demand := func(source, queue string, at time.Time, due ...fleet.Due) fleet.Demand {
		return fleet.Demand{Kind: fleet.KindDemand, Source: source, Queue: queue, At: at, Due: due}
	}
	check := func(what string, at time.Time, want []fleet.Due) {
		t.Helper()
		got := v.Due("bulk", at)
		if !slices.EqualFunc(got, want, func(a, b fleet.Due) bool { return a.By.Equal(b.By) && a.Requests == b.Requests }) {
			t.Fatalf("%s: Due = %v, want %v", what, got, want)
		}
	}
	check("no demand", now, nil)

	v.AddDemand(demand("gw1", "bulk", now, fleet.Due{By: by2, Requests: 50}, fleet.Due{By: by1, Requests: 10}))
	v.AddDemand(demand("gw2", "bulk", now.Add(time.Second), fleet.Due{By: by1, Requests: 5}, fleet.Due{By: by2, Requests: 0}))
	v.AddDemand(demand("gw1", "interactive", now, fleet.Due{By: by1, Requests: 1000}))
	check("two sources", now.Add(2*time.Second), []fleet.Due{{By: by1, Requests: 15}, {By: by2, Requests: 50}})

	v.AddDemand(demand("gw1", "bulk", now.Add(5*time.Second), fleet.Due{By: by2, Requests: 40}))
	check("gw1's next replaces its last", now.Add(6*time.Second), []fleet.Due{{By: by1, Requests: 5}, {By: by2, Requests: 40}})

	v.AddDemand(demand("gw1", "bulk", now.Add(4*time.Second), fleet.Due{By: by2, Requests: 99}))
	check("an older one is ignored", now.Add(6*time.Second), []fleet.Due{{By: by1, Requests: 5}, {By: by2, Requests: 40}})

	v.AddDemand(demand("gw2", "bulk", now.Add(7*time.Second)))
	check("an empty one clears its source", now.Add(8*time.Second), []fleet.Due{{By: by2, Requests: 40}})

	check("fresh for ReportTTL", now.Add(5*time.Second+fleet.ReportTTL), []fleet.Due{{By: by2, Requests: 40}})
	check("then gone", now.Add(5*time.Second+fleet.ReportTTL+time.Millisecond), nil)
	if got := v.Due("interactive", now); got != nil {
		t.Fatalf("a stale demand is dropped for good, even asked with an earlier clock: %v", got)
	}
}
