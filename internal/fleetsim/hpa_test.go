package fleetsim_test

import (
	"testing"

	"github.com/sous-run/sous/internal/fleetsim"
)

// step is one HPA sync and the replicas it must set.
type step struct {
	at      float64
	current int
	metric  float64
	want    int
}

func run(t *testing.T, h *fleetsim.HPA, target float64, steps []step) {
	t.Helper()
	for _, s := range steps {
		got := h.Step(s.at, s.current, []fleetsim.Metric{{Value: s.metric, Target: target}})
		if got != s.want {
			t.Fatalf("at %gs with %d replicas and metric %g: got %d replicas, want %d", s.at, s.current, s.metric, got, s.want)
		}
	}
}

// The hand-checked cases of the shipped behavior: up 2 pods per 60 s, no
// stabilisation; down 1 pod per 120 s (selectPolicy Min) after 300 s.
func TestHPAStep(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name  string
		steps []step
	}{
		{"within tolerance: 200/(96×2) = 1.04 keeps 2", []step{
			{0, 2, 200, 2},
			{15, 2, 175, 2}, // 0.91: within 10%
		}},
		{"beyond tolerance: ceil(300/96) = 4, two pods a minute allow it from 2", []step{
			{0, 2, 300, 4},
		}},
		{"scale-up policy: 2 pods per 60 s from the period's start", []step{
			{0, 1, 960, 3},  // wants 10; 1 + 2
			{15, 3, 960, 3}, // 2 added in the last 60 s: still 1 + 2
			{45, 3, 960, 3},
			{60, 3, 960, 5}, // the first event is 60 s old: out of the period
			{75, 5, 960, 5},
			{120, 5, 960, 7},
			{180, 7, 960, 8}, // max
		}},
		{"scale-down stabilisation: the most of the last 300 s", []step{
			{0, 4, 384, 4},
			{15, 4, 0, 4},
			{299, 4, 0, 4},
			{300, 4, 0, 3}, // the 384 at 0 s is out of the window; 1 pod per 120 s
			{315, 3, 0, 3},
			{420, 3, 0, 2}, // 120 s after the last scale-down
			{540, 2, 0, 1}, // the HPA's minimum is 1 (KEDA takes it to 0)
			{900, 1, 0, 1},
		}},
		{"a high reading inside the window holds the count", []step{
			{0, 3, 0, 3},
			{100, 3, 288, 3}, // 288/(96×3) = 1: no change, but recorded
			{390, 3, 0, 3},   // 288 at 100 s still within 300 s: 3
			{401, 3, 0, 2},
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			run(t, fleetsim.KEDABehavior(1, 8), 96, c.steps)
		})
	}
}

// Several metrics: the largest proposal wins; Percent policies and
// selectPolicy Max pick the larger allowance.
func TestHPAPolicies(t *testing.T) {
	t.Parallel()
	h := fleetsim.KEDABehavior(1, 100)
	got := h.Step(0, 2, []fleetsim.Metric{{Value: 10, Target: 96}, {Value: 600, Target: 300}, {Value: 50, Target: 10}})
	if got != 4 { // proposals 1, 2 (tolerance: 600/(300×2) = 1), 5; limited to 2 + 2
		t.Fatalf("got %d, want 4", got)
	}
	h = &fleetsim.HPA{Min: 1, Max: 100, Tolerance: 0.1,
		Up: fleetsim.Rules{Select: fleetsim.SelectMax, Policies: []fleetsim.Policy{
			{Type: fleetsim.Pods, Value: 4, Period: 15}, {Type: fleetsim.Percent, Value: 100, Period: 15}}},
		Down: fleetsim.Rules{Window: 0, Select: fleetsim.SelectMax, Policies: []fleetsim.Policy{
			{Type: fleetsim.Percent, Value: 50, Period: 60}}},
	}
	steps := []step{
		{0, 2, 100, 6},   // max(2+4, 2×2) = 6
		{15, 6, 100, 12}, // max(6+4, 6×2) = 12
		// The down policy's period (60 s) began at 2 replicas, 10 added
		// since: from the period's start, as the controller counts, 2 is
		// allowed at once.
		{30, 12, 2, 2},
	}
	run(t, h, 1, steps)
	h2 := fleetsim.HPA{Min: h.Min, Max: h.Max, Tolerance: h.Tolerance, Up: h.Up, Down: h.Down}
	run(t, &h2, 1, []step{
		{0, 12, 2, 6},  // half of 12
		{15, 6, 2, 6},  // 6 removed within the last 60 s: the period began at 12
		{60, 6, 2, 3},  // that removal is out of the period
		{200, 3, 2, 2}, // the metric's own answer
	})
	h2.Down.Select = fleetsim.SelectDisabled
	if got := h2.Step(200, 3, []fleetsim.Metric{{Value: 0, Target: 1}}); got != 3 {
		t.Fatalf("scale-down disabled: got %d, want 3", got)
	}
}
