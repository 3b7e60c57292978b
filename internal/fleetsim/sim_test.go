package fleetsim_test

import (
	"bytes"
	"math"
	"testing"

	"github.com/sous-run/sous/internal/fleetsim"
)

// one is a fleet of exactly one replica (max 1) that starts in 30 s, on
// an engine where a request of n tokens takes n/10 s.
func one() (fleetsim.Design, fleetsim.Engine) {
	d := fleetsim.Shipped("one", 1, fleetsim.Trigger{Kind: fleetsim.Messages, Lanes: []int{fleetsim.Interactive, fleetsim.Bulk}, Target: 96})
	d.PodStart = 30
	return d, fleetsim.Engine{Slots: 32, Fixed: 0, PerToken: 0.1}
}

// backlog is n requests at 0 s; bulk ones are job 0.
func backlog(e fleetsim.Engine, lane, n, tokens int, deadline float64) []fleetsim.Request {
	job := -1
	if lane == fleetsim.Bulk {
		job = 0
	}
	out := make([]fleetsim.Request, n)
	for i := range out {
		out[i] = fleetsim.Request{Lane: lane, Tokens: tokens, Service: e.Service(tokens), Deadline: deadline, Job: job}
	}
	return out
}

// A single replica drains 320 one-second requests in 10 waves of its 32
// slots, from the moment it is ready; KEDA wakes it on the first poll
// (0 s) and takes it back to zero a cooldown after the last poll that saw
// work (30 s): 630 s of one replica.
func TestOneReplicaDrainsABacklog(t *testing.T) {
	t.Parallel()
	d, e := one()
	res := fleetsim.Run(d, e, backlog(e, fleetsim.Bulk, 320, 10, 0), 0)
	if res.Drained != 40 {
		t.Fatalf("drained at %gs, want 30 s to start + 10 s", res.Drained)
	}
	if got := res.ReplicaHours * 3600; math.Abs(got-630) > 1e-9 {
		t.Fatalf("replica-seconds %g, want 630", got)
	}
	if res.PeakReplicas != 1 || res.BulkMissed != 0 || res.Bulk != 320 {
		t.Fatalf("%+v", res)
	}
}

// Interactive requests wait only for a slot; 64 of them on one replica
// wait the pod's start (half) and one service more (half).
func TestInteractiveWaits(t *testing.T) {
	t.Parallel()
	d, e := one()
	res := fleetsim.Run(d, e, backlog(e, fleetsim.Interactive, 64, 10, 0), 0)
	if res.InteractiveP95 != 31 || res.Drained != 32 {
		t.Fatalf("p95 %g drained %g, want 31 and 32", res.InteractiveP95, res.Drained)
	}
}

// Lanes: with a bulk backlog and interactive requests waiting together,
// bulk gets its share of a cold worker (floor(3.2) slots, one more while
// under its share: 4) and interactive the rest; a bulk request whose
// deadline passed before a slot freed is a miss, never run.
func TestLanesAndDeadlines(t *testing.T) {
	t.Parallel()
	d, e := one()
	d.PodStart = 0
	reqs := append(backlog(e, fleetsim.Interactive, 28, 10, 0), backlog(e, fleetsim.Bulk, 36, 10, 0.5)...)
	res := fleetsim.Run(d, e, reqs, 0)
	if res.InteractiveP95 != 0 {
		t.Fatalf("interactive p95 %g, want 0: 28 fit beside bulk's 4", res.InteractiveP95)
	}
	if res.BulkMissed != 32 {
		t.Fatalf("missed %d, want 32 (4 started before their deadline)", res.BulkMissed)
	}
	// The late ones expire at the first free slot, 1 s in.
	if res.Drained != 1 {
		t.Fatalf("drained at %g, want 1", res.Drained)
	}
}

// Earliest deadline first within bulk: on one slot, a request due at
// 0.5 s queued behind one due at 100 s still runs first and makes it.
func TestEarliestDeadlineFirst(t *testing.T) {
	t.Parallel()
	d, e := one()
	d.PodStart = 0
	e.Slots = 1
	reqs := append(backlog(e, fleetsim.Bulk, 1, 10, 100), backlog(e, fleetsim.Bulk, 1, 10, 0.5)...)
	if res := fleetsim.Run(d, e, reqs, 0); res.BulkMissed != 0 || res.Drained != 2 {
		t.Fatalf("missed %d, drained at %g: want 0 and 2", res.BulkMissed, res.Drained)
	}
}

func short() fleetsim.Traffic {
	tr := fleetsim.Day()
	tr.Span = 2 * 3600
	tr.Jobs = []fleetsim.Job{
		{Name: "short", Submit: 600, Requests: 3000, Deadline: 1800, Lengths: fleetsim.Lengths{Median: 8, Sigma: 0.5, Cap: 64}},
		{Name: "long", Submit: 1800, Requests: 2000, Deadline: 3600, Lengths: fleetsim.Lengths{Median: 400, Sigma: 0.9, Cap: 4096}},
	}
	return tr
}

// The same seed gives the same table, byte for byte; another seed
// another.
func TestDeterministic(t *testing.T) {
	t.Parallel()
	e := fleetsim.Engine{Slots: 32, Fixed: 0.05, PerToken: 0.02}
	table := func(seed uint64) string {
		var b bytes.Buffer
		if err := fleetsim.Table(&b, fleetsim.Compare(short(), e, seed, 8, 90, []float64{300, 900}, 0)); err != nil {
			t.Fatal(err)
		}
		return b.String()
	}
	a, b, c := table(7), table(7), table(8)
	if a != b {
		t.Fatalf("seed 7 twice:\n%s\n%s", a, b)
	}
	if a == c {
		t.Fatalf("seeds 7 and 8 gave the same table:\n%s", a)
	}
}

// Properties of a short day under every design: every bulk request is
// settled, the fleet ends at zero, and the replica-hours are at least
// the work's slot-hours.
func TestEveryDesignSettles(t *testing.T) {
	t.Parallel()
	e := fleetsim.Engine{Slots: 32, Fixed: 0.05, PerToken: 0.02}
	tr := short()
	reqs := fleetsim.Generate(tr, e, 3)
	floor := fleetsim.SlotHours(reqs, e)
	for _, d := range fleetsim.Designs(8, 90, []float64{300}, 2) {
		res := fleetsim.Run(d, e, reqs, tr.Span)
		if res.Bulk != 5000 || res.ReplicaHours < floor || res.End < res.Drained || res.PeakReplicas > 8 {
			t.Errorf("%s: %+v (slot-hours %g)", d.Name, res, floor)
		}
	}
}

// The generated day: in order of arrival, the rate's extremes where the
// traffic says, every bulk request due its job's deadline after its
// submission, answers within their caps.
func TestGenerate(t *testing.T) {
	t.Parallel()
	tr := short()
	if got := tr.Rate(tr.PeakAt); got != tr.PeakRate {
		t.Fatalf("rate at the peak %g, want %g", got, tr.PeakRate)
	}
	if got := tr.Rate(tr.PeakAt - 12*3600); math.Abs(got-tr.NightRate) > 1e-9 {
		t.Fatalf("rate at night %g, want %g", got, tr.NightRate)
	}
	e := fleetsim.Engine{Slots: 32, Fixed: 0.05, PerToken: 0.02}
	reqs := fleetsim.Generate(tr, e, 1)
	perJob := make([]int, len(tr.Jobs))
	for i, q := range reqs {
		if i > 0 && q.Arrive < reqs[i-1].Arrive {
			t.Fatalf("request %d arrives before the one before it", i)
		}
		if q.Service != e.Service(q.Tokens) || q.Tokens < 1 {
			t.Fatalf("request %d: %+v", i, q)
		}
		if q.Lane == fleetsim.Bulk {
			j := tr.Jobs[q.Job]
			perJob[q.Job]++
			if q.Deadline != j.Submit+j.Deadline || q.Tokens > j.Lengths.Cap {
				t.Fatalf("request %d of job %s: %+v", i, j.Name, q)
			}
		} else if q.Tokens > tr.Interactive.Cap || q.Arrive >= tr.Span {
			t.Fatalf("interactive request %d: %+v", i, q)
		}
	}
	for i, j := range tr.Jobs {
		if perJob[i] != j.Requests {
			t.Errorf("job %s: %d requests, want %d", j.Name, perJob[i], j.Requests)
		}
	}
}

// Deadlines raise the answer: a job one replica would finish in 2 h,
// due in 1 h, misses under seconds of work at a day's target and is met
// when its deadline raises the answer.
func TestDeadlinesRaiseTheAnswer(t *testing.T) {
	t.Parallel()
	e := fleetsim.Engine{Slots: 32, Fixed: 0, PerToken: 0.1}
	reqs := backlog(e, fleetsim.Bulk, 23040, 100, 3600) // 10 s each: 7,200 s of one replica
	plain := fleetsim.Shipped("plain", 8, fleetsim.Trigger{Kind: fleetsim.WorkSeconds, Lanes: []int{fleetsim.Bulk}, Target: 86400})
	plain.Cost = fleetsim.Exact
	if res := fleetsim.Run(plain, e, reqs, 0); res.BulkMissed == 0 || res.PeakReplicas != 1 {
		t.Fatalf("without deadlines: %+v, want one replica and misses", res)
	}
	c := fleetsim.DeadlineAware(8, 90, 86400, 600, 0)
	res := fleetsim.Run(c, e, reqs, 0)
	if res.BulkMissed != 0 || res.PeakReplicas < 2 || res.PeakReplicas == 8 {
		t.Fatalf("deadlines raising it: %+v, want none missed on more than one replica and fewer than the most", res)
	}
}
