package fleetsim

import (
	"math"
	"math/rand/v2"
	"sort"
)

// Lane indexes: the interactive lane first, as SOUS_LANES lists it.
const (
	Interactive = 0
	Bulk        = 1
)

// Engine is the stand-in engine's cost model (integration/bench's
// slotEngine): a request takes Fixed + PerToken × its output tokens on
// one of Slots slots.
type Engine struct {
	Slots           int
	Fixed, PerToken float64 // seconds
}

// Service is the seconds a request of tokens output tokens holds a slot.
func (e Engine) Service(tokens int) float64 { return e.Fixed + e.PerToken*float64(tokens) }

// Lengths is a capped lognormal distribution of output tokens: median
// Median, shape Sigma (the log's standard deviation), at least 1, at most
// Cap.
type Lengths struct {
	Median float64
	Sigma  float64
	Cap    int
}

func (l Lengths) draw(r *rand.Rand) int {
	n := int(math.Round(l.Median * math.Exp(l.Sigma*r.NormFloat64())))
	return min(max(n, 1), l.Cap)
}

// Job is one bulk job: Requests requests submitted at once at Submit,
// each due Deadline seconds later.
type Job struct {
	Name     string
	Submit   float64
	Requests int
	Deadline float64
	Lengths  Lengths
}

// Traffic is a day's load.
type Traffic struct {
	// Span is how long interactive requests arrive, in seconds.
	Span float64
	// NightRate and PeakRate are the interactive arrivals per second at
	// the quietest hour (PeakAt - 12 h) and the busiest (PeakAt); the
	// rate follows a cosine between them.
	NightRate, PeakRate float64
	PeakAt              float64
	Interactive         Lengths
	Jobs                []Job
}

// Request is one request of the day.
type Request struct {
	Arrive   float64
	Lane     int
	Tokens   int
	Service  float64
	Deadline float64 // absolute; 0 for none
	Job      int     // index into Traffic.Jobs; -1 for interactive
}

// Day is the default day: see docs/benchmarks.md for the reasoning.
func Day() Traffic {
	const h = 3600.0
	return Traffic{
		Span:      24 * h,
		NightRate: 0.5, PeakRate: 14, PeakAt: 15 * h,
		Interactive: Lengths{Median: 80, Sigma: 0.6, Cap: 512},
		Jobs: []Job{
			{"summaries", 1 * h, 20000, 6 * h, Lengths{Median: 400, Sigma: 0.9, Cap: 4096}},
			{"classify-am", 9 * h, 8000, 2 * h, Lengths{Median: 8, Sigma: 0.5, Cap: 64}},
			{"extract", 13 * h, 6000, 3 * h, Lengths{Median: 150, Sigma: 0.8, Cap: 2048}},
			{"reports", 19 * h, 24000, 4 * h, Lengths{Median: 600, Sigma: 1.0, Cap: 4096}},
			{"classify-pm", 22.5 * h, 10000, 2 * h, Lengths{Median: 8, Sigma: 0.5, Cap: 64}},
		},
	}
}

// Rate is the interactive arrival rate at t, per second.
func (tr Traffic) Rate(t float64) float64 {
	phase := 2 * math.Pi * (t - tr.PeakAt) / 86400
	return tr.NightRate + (tr.PeakRate-tr.NightRate)*(1+math.Cos(phase))/2
}

// Generate draws the day's requests from seed, in order of arrival.
// Jobs submitted after Span are left out.
// Interactive arrivals are a non-homogeneous Poisson process (thinning
// against PeakRate); a job's requests arrive at its Submit time, in the
// order they were drawn.
func Generate(tr Traffic, e Engine, seed uint64) []Request {
	r := rand.New(rand.NewPCG(seed, 0x50c5))
	var out []Request
	peak := max(tr.PeakRate, tr.NightRate)
	for t := 0.0; peak > 0; {
		t += r.ExpFloat64() / peak
		if t >= tr.Span {
			break
		}
		if r.Float64()*peak > tr.Rate(t) {
			continue
		}
		n := tr.Interactive.draw(r)
		out = append(out, Request{Arrive: t, Lane: Interactive, Tokens: n, Service: e.Service(n), Job: -1})
	}
	for j, job := range tr.Jobs {
		if job.Submit >= tr.Span {
			continue
		}
		for range job.Requests {
			n := job.Lengths.draw(r)
			out = append(out, Request{Arrive: job.Submit, Lane: Bulk, Tokens: n, Service: e.Service(n), Deadline: job.Submit + job.Deadline, Job: j})
		}
	}
	sort.SliceStable(out, func(a, b int) bool { return out[a].Arrive < out[b].Arrive })
	return out
}
