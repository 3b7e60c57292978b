package fleet_test

import (
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/fleet"
)

func TestDeadlineReplicas(t *testing.T) {
	t.Parallel()
	now := time.Unix(100_000, 0)
	in := func(d time.Duration, n int) fleet.Due { return fleet.Due{By: now.Add(d), Requests: n} }
	for _, c := range []struct {
		name   string
		due    []fleet.Due
		cost   float64
		margin time.Duration
		want   float64
	}{
		{"nothing due", nil, 1, 0, 0},
		// 3600 requests of 2 s due in 2 h, 30 min early: 7200 s of one
		// replica in 5400 s.
		{"one deadline", []fleet.Due{in(2*time.Hour, 3600)}, 2, 30 * time.Minute, 7200.0 / 5400},
		{"no margin", []fleet.Due{in(2*time.Hour, 3600)}, 2, 0, 1},
		// The later deadline counts the earlier one's work too: by 1 h,
		// 1800 s in 3600 s (0.5); by 2 h, 1800 + 9000 s in 7200 s (1.5).
		{"several, the later binds", []fleet.Due{in(time.Hour, 900), in(2*time.Hour, 4500)}, 2, 0, 1.5},
		// By 10 min, 1200 s in 600 s (2); by 4 h, 1400 s in 14400 s.
		{"several, the earlier binds", []fleet.Due{in(4*time.Hour, 100), in(10*time.Minute, 600)}, 2, 0, 2},
		{"a deadline with nothing due", []fleet.Due{in(time.Minute, 0), in(time.Hour, 1800)}, 1, 0, 0.5},
		// Closer than the margin, or past: the work within the floor.
		{"inside the margin", []fleet.Due{in(20*time.Minute, 30)}, 1, 30 * time.Minute, 30 / fleet.DeadlineFloor.Seconds()},
		{"past", []fleet.Due{in(-time.Hour, 30)}, 1, 0, 30 / fleet.DeadlineFloor.Seconds()},
		{"zero cost", []fleet.Due{in(time.Hour, 1000)}, 0, 0, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			before := append([]fleet.Due(nil), c.due...)
			got := fleet.DeadlineReplicas(c.due, c.cost, now, c.margin)
			if math.Abs(got-c.want) > 1e-9 {
				t.Fatalf("DeadlineReplicas = %v, want %v", got, c.want)
			}
			for i := range before {
				if before[i] != c.due[i] {
					t.Fatalf("the due list was changed: %v, was %v", c.due, before)
				}
			}
		})
	}
}

func ExampleDeadlineReplicas() {
	now := time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC)
	due := []fleet.Due{
		{By: now.Add(2 * time.Hour), Requests: 10_000}, // a batch due at 14:00
		{By: now.Add(6 * time.Hour), Requests: 20_000}, // another at 18:00
	}
	// 0.5 s of one replica per request, done 30 minutes early.
	r := fleet.DeadlineReplicas(due, 0.5, now, 30*time.Minute)
	// By 14:00, 5,000 s in 5,400 s; by 18:00, 15,000 s in 19,800 s.
	fmt.Printf("%.2f replicas\n", r)
	// Output: 0.93 replicas
}
