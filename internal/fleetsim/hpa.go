package fleetsim

import "math"

// PolicyType is a scaling policy's unit, as in autoscaling/v2.
type PolicyType int

const (
	// Pods: at most Value pods added (or removed) per Period.
	Pods PolicyType = iota
	// Percent: at most Value percent of the replicas at the period's
	// start.
	Percent
)

// Policy is one HPAScalingPolicy.
type Policy struct {
	Type   PolicyType
	Value  int
	Period float64 // seconds
}

// Select is a rule's selectPolicy.
type Select int

const (
	// SelectMax picks the policy that allows the most change (the
	// default).
	SelectMax Select = iota
	// SelectMin picks the policy that allows the least change.
	SelectMin
	// SelectDisabled forbids change in this direction.
	SelectDisabled
)

// Rules is one direction of an HPA's behavior.
type Rules struct {
	Window   float64 // stabilizationWindowSeconds
	Select   Select
	Policies []Policy
}

// Metric is one metric's reading and its AverageValue target.
type Metric struct{ Value, Target float64 }

// HPA is the horizontal pod autoscaler's decision for one target, as
// kube-controller-manager makes it (pkg/controller/podautoscaler):
// each metric proposes ceil(value / target) replicas unless the usage
// ratio value / (target × current) is within Tolerance of 1, the largest
// proposal wins, the stabilisation windows keep the least of the recent
// recommendations (scale-up) or the most (scale-down), and the policies
// bound the change per period from the replica changes the HPA itself
// made. Not safe for concurrent use.
type HPA struct {
	Min, Max  int
	Tolerance float64 // 0.1 by default in Kubernetes
	Up, Down  Rules

	recs   []rec
	events []event
}

type rec struct {
	at float64
	n  int
}

type event struct {
	at    float64
	delta int // + up, - down
}

// KEDABehavior is the HPA behavior the shipped ScaledObject sets
// (deploy/keda/rabbitmq/scaledobject.yaml): up 2 pods per 60 s with no
// stabilisation; down 1 pod per 120 s after 300 s of stabilisation.
func KEDABehavior(min, max int) *HPA {
	return &HPA{
		Min: min, Max: max, Tolerance: 0.1,
		Up:   Rules{Window: 0, Select: SelectMax, Policies: []Policy{{Pods, 2, 60}}},
		Down: Rules{Window: 300, Select: SelectMin, Policies: []Policy{{Pods, 1, 120}}},
	}
}

// Step is one sync of the HPA at now with current replicas (the scale
// target's spec) and the metrics' readings; it returns the replicas to
// set and records the change as the HPA's own event.
func (h *HPA) Step(now float64, current int, ms []Metric) int {
	desired := 0
	for _, m := range ms {
		desired = max(desired, proposal(m, current, h.Tolerance))
	}
	if h.recs == nil {
		// As the controller does on first sight of an autoscaler: the
		// current count is the first recommendation.
		h.recs = []rec{{now, current}}
	}
	desired = h.stabilize(now, current, desired)
	desired = h.limit(now, current, desired)
	if desired != current {
		h.events = append(h.events, event{now, desired - current})
	}
	h.prune(now)
	return desired
}

// proposal is one AverageValue external metric's replica count.
func proposal(m Metric, current int, tol float64) int {
	if m.Target <= 0 {
		return current
	}
	if current > 0 {
		ratio := m.Value / (m.Target * float64(current))
		if math.Abs(1-ratio) <= tol {
			return current
		}
	}
	return int(math.Ceil(m.Value / m.Target))
}

// stabilize is stabilizeRecommendationWithBehaviors.
func (h *HPA) stabilize(now float64, current, desired int) int {
	up, down := desired, desired
	keep := h.recs[:0]
	for _, r := range h.recs {
		if r.at > now-h.Up.Window {
			up = min(up, r.n)
		}
		if r.at > now-h.Down.Window {
			down = max(down, r.n)
		}
		if r.at > now-max(h.Up.Window, h.Down.Window) {
			keep = append(keep, r)
		}
	}
	h.recs = append(keep, rec{now, desired})
	out := current
	if out < up {
		out = up
	}
	if out > down {
		out = down
	}
	return out
}

// limit is convertDesiredReplicasWithBehaviorRate.
func (h *HPA) limit(now float64, current, desired int) int {
	switch {
	case desired > current:
		lim := h.upLimit(now, current)
		lim = max(lim, current)
		return min(desired, lim, h.Max)
	case desired < current:
		lim := h.downLimit(now, current)
		lim = min(lim, current)
		// The HPA's minimum (KEDA sets it to max(minReplicaCount, 1)).
		return max(desired, lim, h.Min)
	}
	return desired
}

// changed is the replicas added and removed by the HPA within period
// before now.
func (h *HPA) changed(now, period float64) (added, removed int) {
	for _, e := range h.events {
		if e.at > now-period {
			if e.delta > 0 {
				added += e.delta
			} else {
				removed -= e.delta
			}
		}
	}
	return added, removed
}

func (h *HPA) upLimit(now float64, current int) int {
	if h.Up.Select == SelectDisabled {
		return current
	}
	out, pick := math.MinInt, func(a, b int) int { return max(a, b) }
	if h.Up.Select == SelectMin {
		out, pick = math.MaxInt, func(a, b int) int { return min(a, b) }
	}
	for _, p := range h.Up.Policies {
		added, removed := h.changed(now, p.Period)
		start := current - added + removed
		prop := start + p.Value
		if p.Type == Percent {
			prop = int(math.Ceil(float64(start) * (1 + float64(p.Value)/100)))
		}
		out = pick(out, prop)
	}
	return out
}

func (h *HPA) downLimit(now float64, current int) int {
	if h.Down.Select == SelectDisabled {
		return current
	}
	// For scale-down the policy allowing the least change is the largest
	// proposal.
	out, pick := math.MaxInt, func(a, b int) int { return min(a, b) }
	if h.Down.Select == SelectMin {
		out, pick = math.MinInt, func(a, b int) int { return max(a, b) }
	}
	for _, p := range h.Down.Policies {
		added, removed := h.changed(now, p.Period)
		start := current - added + removed
		prop := start - p.Value
		if p.Type == Percent {
			prop = int(float64(start) * (1 - float64(p.Value)/100))
		}
		out = pick(out, prop)
	}
	return out
}

// prune drops the events no policy's period still reaches.
func (h *HPA) prune(now float64) {
	longest := 0.0
	for _, p := range append(h.Up.Policies[:len(h.Up.Policies):len(h.Up.Policies)], h.Down.Policies...) {
		longest = max(longest, p.Period)
	}
	keep := h.events[:0]
	for _, e := range h.events {
		if e.at > now-longest {
			keep = append(keep, e)
		}
	}
	h.events = keep
}
