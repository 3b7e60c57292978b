package fleetsim

import (
	"cmp"
	"container/heap"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/sous-run/sous/internal/fleet"
	"github.com/sous-run/sous/internal/lanes"
)

// Kind is what a trigger measures.
type Kind int

const (
	// Messages is KEDA's rabbitmq trigger in QueueLength mode over the
	// management API: ready plus unacknowledged messages.
	Messages Kind = iota
	// WorkSeconds is sous's scaler: the held requests of each lane times
	// the lane's cost (seconds of one replica per request).
	WorkSeconds
)

// Trigger is one ScaledObject trigger: its lanes' queues and its target
// per replica (value for Messages, targetDrainSeconds for WorkSeconds).
type Trigger struct {
	Kind   Kind
	Lanes  []int
	Target float64
	// Deadlines (WorkSeconds only) raises the answer as cmd/scaler does
	// with a producer's fleet.Demand (SOUS_SCALER_DEADLINE_MARGIN is
	// DeadlineMargin, in seconds): to at least
	// fleet.DeadlineReplicas × Target, the replicas that finish each
	// job's held work DeadlineMargin before its deadline. The demand is
	// exact here (each job's held requests by its deadline), as the Batch
	// API's gateway states it for its batches.
	Deadlines      bool
	DeadlineMargin float64
}

// CostMode is how a WorkSeconds trigger prices a request.
type CostMode int

const (
	// Measured is what sous's scaler answers: each worker's smoothed mean
	// service time of the lane (internal/worker's meter: about a minute)
	// over its slots, averaged over the workers that have measured it,
	// else the last cost seen, else Design.Prior.
	Measured CostMode = iota
	// Exact is an oracle: the true seconds of work held, over the slots
	// (the service time of every waiting request and what is left of
	// each running one). It shows what a better estimate could gain.
	Exact
)

// Design is one autoscaling design and the fleet it drives.
type Design struct {
	Name     string
	Triggers []Trigger
	Cost     CostMode
	// Prior is the seconds one replica spends per request of a lane no
	// worker has measured yet (SOUS_SCALER_PRIOR_SECONDS, 1 s).
	Prior float64
	// MinReplicas and MaxReplicas are the ScaledObject's counts.
	MinReplicas, MaxReplicas int
	// PodStart is the seconds from the HPA's decision to a ready worker.
	PodStart float64
	// Polling and Cooldown are KEDA's pollingInterval and cooldownPeriod;
	// Sync is the HPA's sync period.
	Polling, Cooldown, Sync float64
	// Share is the bulk lane's share of the slots (lanes.DefaultShare).
	Share float64
	// BulkCeiling, when above 0, is the most slots bulk may hold on a
	// replica (not in sous: its lanes have a least share, no ceiling); the
	// rest wait for interactive requests.
	BulkCeiling int
	// Behavior returns the HPA (policies, windows) for these min and max.
	Behavior func(min, max int) *HPA
}

// Shipped returns a Design with the shipped ScaledObject's timings and
// behavior (deploy/keda/rabbitmq), a 90 s pod start, bulk share 0.1, and
// the triggers given.
func Shipped(name string, max int, ts ...Trigger) Design {
	return Design{
		Name: name, Triggers: ts, Prior: 1, MinReplicas: 0, MaxReplicas: max,
		PodStart: 90, Polling: 15, Cooldown: 600, Sync: 15,
		Share: lanes.DefaultShare, Behavior: KEDABehavior,
	}
}

// Result is what one Design did with a day.
type Result struct {
	Design string
	// ReplicaHours counts every replica from the decision that made it
	// (its GPU is held while the pod starts) to its exit (after its
	// drain), or to its removal while starting.
	ReplicaHours float64
	// InteractiveP95 and InteractiveP99 are the wait of interactive
	// requests from arrival to start on a slot, in seconds.
	InteractiveP95, InteractiveP99 float64
	// BulkMissed counts bulk requests whose deadline passed before they
	// started (sous answers them expired, never running them), of Bulk.
	BulkMissed, Bulk int
	// PeakReplicas is the most replicas the Deployment asked for.
	PeakReplicas int
	// Drained is when the last request ended (or expired), seconds.
	Drained float64
	// End is when the fleet was back at zero with nothing held, seconds.
	End float64
}

// MissedPct is the share of bulk requests that missed, in percent.
func (r Result) MissedPct() float64 {
	if r.Bulk == 0 {
		return 0
	}
	return 100 * float64(r.BulkMissed) / float64(r.Bulk)
}

// meter is internal/worker's meter: the mean time on the engine per
// request, smoothed over about a minute of time.
type meter struct {
	last    float64
	seen    bool
	service float64
}

const rateWindow = 60.0

func (m *meter) observe(now, d float64) {
	if !m.seen {
		m.seen, m.last, m.service = true, now, d
	}
	decay := math.Exp(-max(0, now-m.last) / rateWindow)
	m.last = now
	alpha := max(1-decay, 1/(rateWindow*10))
	m.service += alpha * (d - m.service)
}

type replica struct {
	born, readyAt, goneAt float64
	ready, draining, gone bool
	on                    []int
	sched                 *lanes.Scheduler
	meters                [2]meter
}

func (r *replica) held() int { return r.on[0] + r.on[1] }

type evKind int

const (
	evDone evKind = iota
	evReady
)

type ev struct {
	at   float64
	seq  int
	kind evKind
	rep  *replica
	req  int
}

type evHeap []ev

func (h evHeap) Len() int { return len(h) }
func (h evHeap) Less(i, j int) bool {
	if h[i].at != h[j].at {
		return h[i].at < h[j].at
	}
	return h[i].seq < h[j].seq
}
func (h evHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *evHeap) Push(x any)   { *h = append(*h, x.(ev)) }
func (h *evHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// edf orders the bulk lane: earliest deadline, then oldest, then drawn
// first.
type edf struct {
	idx  []int
	reqs []Request
}

func (q *edf) Len() int { return len(q.idx) }
func (q *edf) Less(i, j int) bool {
	a, b := q.reqs[q.idx[i]], q.reqs[q.idx[j]]
	if da, db := due(a), due(b); da != db {
		return da < db
	}
	if a.Arrive != b.Arrive {
		return a.Arrive < b.Arrive
	}
	return q.idx[i] < q.idx[j]
}

// due is a request's deadline, none after any.
func due(r Request) float64 {
	if r.Deadline <= 0 {
		return math.Inf(1)
	}
	return r.Deadline
}

func (q *edf) Swap(i, j int) { q.idx[i], q.idx[j] = q.idx[j], q.idx[i] }
func (q *edf) Push(x any)    { q.idx = append(q.idx, x.(int)) }
func (q *edf) Pop() any {
	x := q.idx[len(q.idx)-1]
	q.idx = q.idx[:len(q.idx)-1]
	return x
}

// sim is one Run's state.
type sim struct {
	d      Design
	e      Engine
	reqs   []Request
	now    float64
	seq    int
	events evHeap

	inter     []int // FIFO of interactive request indexes
	interHead int
	bulk      edf

	reps    []*replica
	spec    int
	peak    int
	hpa     *HPA
	lastAct float64

	held    [2]int // waiting + on a slot, per lane
	heldJob []int  // the same, per bulk job
	jobs    []int  // bulk jobs by deadline
	due     []fleet.Due
	first   []int      // each job's first request
	heldSvc [2]float64 // service seconds of the waiting ones
	sumEnd  [2]float64 // end times of the running ones
	running [2]int
	last    [2]float64 // last measured cost per lane
	known   [2]bool

	retired float64
	drained float64
	waits   []float64
	missed  int
	bulkN   int
}

var epoch = time.Unix(0, 0)

// Run replays reqs (from Generate, in order of arrival) through design d
// on engine e until every request is settled and the fleet is back at
// zero (or, failing that, span + 12 h, when what is left counts as
// missed).
func Run(d Design, e Engine, reqs []Request, span float64) Result {
	s := &sim{d: d, e: e, reqs: reqs, lastAct: math.Inf(-1)}
	s.jobIndex()
	s.bulk.reqs = reqs
	s.hpa = d.Behavior(max(d.MinReplicas, 1), d.MaxReplicas)
	next := 0
	keda, sync := 0.0, d.Sync/3 // the two loops are not in phase
	limit := span + 12*3600
	for {
		ta := math.Inf(1)
		if next < len(reqs) {
			ta = reqs[next].Arrive
		}
		te := math.Inf(1)
		if len(s.events) > 0 {
			te = s.events[0].at
		}
		if next == len(reqs) && s.empty() {
			break
		}
		t := min(ta, te, keda, sync)
		if t > limit {
			break
		}
		s.now = t
		switch {
		case te == t:
			x := heap.Pop(&s.events).(ev)
			s.handle(x)
		case ta == t:
			s.arrive(next)
			next++
		case keda == t:
			s.activation()
			keda += d.Polling
		default:
			s.scale()
			sync += d.Sync
		}
	}
	return s.result()
}

// jobIndex finds the bulk jobs in reqs, in order of deadline.
func (s *sim) jobIndex() {
	for i, q := range s.reqs {
		if q.Job < 0 {
			continue
		}
		for len(s.first) <= q.Job {
			s.first = append(s.first, -1)
		}
		if s.first[q.Job] < 0 {
			s.first[q.Job] = i
			s.jobs = append(s.jobs, q.Job)
		}
	}
	s.heldJob = make([]int, len(s.first))
	slices.SortStableFunc(s.jobs, func(a, b int) int { return cmp.Compare(due(s.reqs[s.first[a]]), due(s.reqs[s.first[b]])) })
}

func (s *sim) empty() bool {
	if s.held[0]+s.held[1] > 0 || s.spec > 0 {
		return false
	}
	for _, r := range s.reps {
		if !r.gone {
			return false
		}
	}
	return true
}

func (s *sim) push(x ev) {
	x.seq = s.seq
	s.seq++
	heap.Push(&s.events, x)
}

func (s *sim) arrive(i int) {
	q := s.reqs[i]
	s.held[q.Lane]++
	if q.Job >= 0 {
		s.heldJob[q.Job]++
	}
	s.heldSvc[q.Lane] += q.Service
	if q.Lane == Interactive {
		s.inter = append(s.inter, i)
	} else {
		s.bulkN++
		heap.Push(&s.bulk, i)
	}
	for _, r := range s.reps {
		if !s.hasWork() {
			return
		}
		s.dispatch(r)
	}
}

func (s *sim) hasWork() bool { return s.interHead < len(s.inter) || s.bulk.Len() > 0 }

func (s *sim) handle(x ev) {
	r := x.rep
	switch x.kind {
	case evReady:
		if r.gone {
			return
		}
		r.ready = true
		s.dispatch(r)
	case evDone:
		q := s.reqs[x.req]
		r.sched.Advance(epoch.Add(time.Duration(s.now*1e9)), r.on)
		r.on[q.Lane]--
		r.meters[q.Lane].observe(s.now, q.Service)
		s.drained = s.now
		s.held[q.Lane]--
		if q.Job >= 0 {
			s.heldJob[q.Job]--
		}
		s.sumEnd[q.Lane] -= s.now
		s.running[q.Lane]--
		if s.running[q.Lane] == 0 {
			s.sumEnd[q.Lane] = 0 // no drift from rounding
		}
		if r.draining {
			if r.held() == 0 {
				r.gone, r.goneAt = true, s.now
			}
			return
		}
		s.dispatch(r)
	}
}

// dispatch fills r's free slots the way sous's dispatcher does: the
// lane the scheduler offers first, the earliest deadline first within
// bulk, and a bulk request already past its deadline expired unrun.
func (s *sim) dispatch(r *replica) {
	if !r.ready || r.draining || r.gone {
		return
	}
	has := make([]bool, 2)
	var order []int
	for r.held() < s.e.Slots && s.hasWork() {
		at := epoch.Add(time.Duration(s.now * 1e9))
		r.sched.Advance(at, r.on)
		has[0], has[1] = s.interHead < len(s.inter), s.bulk.Len() > 0
		if s.d.BulkCeiling > 0 && r.on[Bulk] >= s.d.BulkCeiling {
			has[1] = false
		}
		if !has[0] && !has[1] {
			break
		}
		order = r.sched.Order(order, has, r.on, s.e.Slots)
		var i int
		if order[0] == Interactive {
			i = s.inter[s.interHead]
			s.interHead++
			if s.interHead > 4096 && s.interHead*2 > len(s.inter) {
				s.inter = append(s.inter[:0], s.inter[s.interHead:]...)
				s.interHead = 0
			}
			s.waits = append(s.waits, s.now-s.reqs[i].Arrive)
		} else {
			i = heap.Pop(&s.bulk).(int)
			if dl := s.reqs[i].Deadline; dl > 0 && dl < s.now {
				s.missed++
				s.drained = s.now
				s.held[Bulk]--
				if j := s.reqs[i].Job; j >= 0 {
					s.heldJob[j]--
				}
				s.heldSvc[Bulk] -= s.reqs[i].Service
				continue
			}
		}
		q := s.reqs[i]
		r.on[q.Lane]++
		s.heldSvc[q.Lane] -= q.Service
		s.sumEnd[q.Lane] += s.now + q.Service
		s.running[q.Lane]++
		s.push(ev{at: s.now + q.Service, kind: evDone, rep: r, req: i})
	}
}

// activation is KEDA's loop: 0 → 1 as soon as a trigger's queues hold a
// request, back to MinReplicas after Cooldown without one.
func (s *sim) activation() {
	if s.held[0]+s.held[1] > 0 {
		s.lastAct = s.now
		if s.spec == 0 {
			s.set(max(1, s.d.MinReplicas))
		}
		return
	}
	if s.spec > s.d.MinReplicas && s.now-s.lastAct >= s.d.Cooldown {
		s.set(s.d.MinReplicas)
	}
}

// scale is the HPA's sync; it does nothing at zero replicas (KEDA's
// part).
func (s *sim) scale() {
	if s.spec == 0 {
		return
	}
	ms := make([]Metric, len(s.d.Triggers))
	for i, t := range s.d.Triggers {
		ms[i] = Metric{Value: s.metric(t), Target: t.Target}
	}
	s.set(s.hpa.Step(s.now, s.spec, ms))
}

func (s *sim) metric(t Trigger) float64 {
	v := s.work(t)
	if !t.Deadlines || !slices.Contains(t.Lanes, Bulk) {
		return v
	}
	// What the Batch API's gateway would say in its fleet.Demand: the
	// requests of each job still held, by the job's deadline.
	due := s.due[:0]
	for _, j := range s.jobs {
		if s.heldJob[j] > 0 {
			due = append(due, fleet.Due{By: at(s.reqs[s.first[j]].Deadline), Requests: s.heldJob[j]})
		}
	}
	s.due = due
	r := fleet.DeadlineReplicas(due, s.cost(Bulk), at(s.now), seconds(t.DeadlineMargin))
	return max(v, r*t.Target)
}

// at is the simulated clock's time t seconds.
func at(t float64) time.Time { return epoch.Add(seconds(t)) }

func seconds(f float64) time.Duration { return time.Duration(f * float64(time.Second)) }

func (s *sim) work(t Trigger) float64 {
	v := 0.0
	for _, l := range t.Lanes {
		switch {
		case t.Kind == Messages:
			v += float64(s.held[l])
		case s.d.Cost == Exact:
			v += (s.heldSvc[l] + max(0, s.sumEnd[l]-float64(s.running[l])*s.now)) / float64(s.e.Slots)
		default:
			v += float64(s.held[l]) * s.cost(l)
		}
	}
	return v
}

// cost is what the scaler's fleet.View answers for lane l: the mean of
// the live workers' measured costs, else the last seen, else the prior.
func (s *sim) cost(l int) float64 {
	sum, n := 0.0, 0
	for _, r := range s.reps {
		if !r.gone && r.meters[l].seen {
			sum += r.meters[l].service / float64(s.e.Slots)
			n++
		}
	}
	if n > 0 {
		s.last[l], s.known[l] = sum/float64(n), true
		return s.last[l]
	}
	if s.known[l] {
		return s.last[l]
	}
	return s.d.Prior
}

// set changes the Deployment's replicas. New pods hold a GPU from now
// and serve after PodStart. Scale-in removes starting pods first, then
// the ready workers holding the fewest requests (internal/podcost), which
// drain: they take nothing new and exit when their last request ends.
func (s *sim) set(n int) {
	for ; s.spec < n; s.spec++ {
		r := &replica{born: s.now, readyAt: s.now + s.d.PodStart, on: make([]int, 2), sched: lanes.NewScheduler([]float64{0, s.d.Share})}
		s.reps = append(s.reps, r)
		s.push(ev{at: r.readyAt, kind: evReady, rep: r})
	}
	s.peak = max(s.peak, s.spec)
	for ; s.spec > n; s.spec-- {
		var victim *replica
		for _, r := range slices.Backward(s.reps) {
			if r.gone || r.draining {
				continue
			}
			if victim == nil || better(r, victim) {
				victim = r
			}
		}
		if !victim.ready || victim.held() == 0 {
			victim.gone, victim.goneAt = true, s.now
			continue
		}
		victim.draining = true
	}
	if len(s.reps) > 64 {
		keep := s.reps[:0]
		for _, r := range s.reps {
			if !r.gone {
				keep = append(keep, r)
			} else {
				s.retired += r.goneAt - r.born
			}
		}
		s.reps = keep
	}
}

// better says a is removed before b: not ready first, then fewer held.
func better(a, b *replica) bool {
	if a.ready != b.ready {
		return !a.ready
	}
	return a.held() < b.held()
}

func (s *sim) result() Result {
	res := Result{Design: s.d.Name, BulkMissed: s.missed + s.held[Bulk], Bulk: s.bulkN, PeakReplicas: s.peak, Drained: s.drained, End: s.now}
	total := s.retired
	for _, r := range s.reps {
		end := s.now
		if r.gone {
			end = r.goneAt
		}
		total += end - r.born
	}
	res.ReplicaHours = total / 3600
	slices.Sort(s.waits)
	res.InteractiveP95 = quantile(s.waits, 0.95)
	res.InteractiveP99 = quantile(s.waits, 0.99)
	return res
}

func quantile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(math.Ceil(q*float64(len(sorted))))-1)]
}

// Designs returns the designs Compare runs: (a) KEDA's rabbitmq trigger
// at the shipped value 96 on each lane's queue (the rabbitmq-lanes
// overlay), then (b) sous's scaler, one trigger over both queues, at each
// of targets (targetDrainSeconds), with the measured cost and, for the
// first target, the exact one.
func Designs(max int, podStart float64, targets []float64, interactive float64) []Design {
	out := []Design{MessageCount(max, podStart, 96)}
	for i, t := range targets {
		b := Shipped(fmt.Sprintf("(b) sous scaler, targetDrainSeconds %g", t), max,
			Trigger{Kind: WorkSeconds, Lanes: []int{Interactive, Bulk}, Target: t})
		if interactive > 0 {
			b = Shipped(fmt.Sprintf("(b) sous scaler per lane, interactive %g, bulk %g", interactive, t), max,
				Trigger{Kind: WorkSeconds, Lanes: []int{Interactive}, Target: interactive},
				Trigger{Kind: WorkSeconds, Lanes: []int{Bulk}, Target: t})
		}
		b.PodStart = podStart
		out = append(out, b)
		if i == 0 {
			x := b
			x.Name += ", exact cost"
			x.Cost = Exact
			out = append(out, x)
		}
	}
	return out
}

// MessageCount is design (a): KEDA's rabbitmq trigger on each lane's
// queue, value 96 for interactive (the shipped value) and bulk for bulk.
func MessageCount(max int, podStart, bulk float64) Design {
	name := "(a) KEDA message count, value 96 per lane"
	if bulk != 96 {
		name = fmt.Sprintf("(a) KEDA message count, value 96 interactive, %g bulk", bulk)
	}
	a := Shipped(name, max,
		Trigger{Kind: Messages, Lanes: []int{Interactive}, Target: 96},
		Trigger{Kind: Messages, Lanes: []int{Bulk}, Target: bulk})
	a.PodStart = podStart
	return a
}

// SlotHours is the replica-hours of pure work in reqs: their service
// time over the slots, what a fleet that never left a slot idle and
// started pods instantly would pay.
func SlotHours(reqs []Request, e Engine) float64 {
	total := 0.0
	for _, q := range reqs {
		total += q.Service
	}
	return total / float64(e.Slots) / 3600
}

// DeadlineAware is design (c), cmd/scaler with the Batch API's demands:
// sous's scaler with bulk's target at target and its deadlines raising
// the answer (Trigger.Deadlines, margin seconds before each deadline).
// With interactive above 0 the interactive lane has a trigger of its
// own at that target.
func DeadlineAware(max int, podStart, target, margin, interactive float64) Design {
	c := Shipped(fmt.Sprintf("(c) seconds of work, target %g, deadlines raise it (margin %g s)", target, margin), max,
		Trigger{Kind: WorkSeconds, Lanes: []int{Interactive, Bulk}, Target: target, Deadlines: true, DeadlineMargin: margin})
	if interactive > 0 {
		c = Shipped(fmt.Sprintf("(c) per lane, interactive %g, bulk %g, deadlines raise it (margin %g s)", interactive, target, margin), max,
			Trigger{Kind: WorkSeconds, Lanes: []int{Interactive}, Target: interactive},
			Trigger{Kind: WorkSeconds, Lanes: []int{Bulk}, Target: target, Deadlines: true, DeadlineMargin: margin})
	}
	c.PodStart = podStart
	return c
}

// Compare generates the traffic from seed and runs every design of
// Designs on it.
func Compare(tr Traffic, e Engine, seed uint64, max int, podStart float64, targets []float64, interactive float64) []Result {
	reqs := Generate(tr, e, seed)
	var out []Result
	for _, d := range Designs(max, podStart, targets, interactive) {
		out = append(out, Run(d, e, reqs, tr.Span))
	}
	return out
}
