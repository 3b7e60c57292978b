package lanes

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// DefaultShare is the share of every lane but the first when it names none.
const DefaultShare = 0.1

// Default is the lane's name when SOUS_LANES is not set: one lane on
// SOUS_QUEUE.
const Default = "default"

// Lane is one lane of SOUS_LANES.
type Lane struct {
	Name  string
	Queue string
	// Share is the least fraction of the slots the lane gets over time
	// while it has work; 0 for the first lane, which goes first anyway.
	Share float64
	// Window, when above 0, is the most requests the worker holds of the
	// lane (its prefetch), instead of the window the in-flight limit
	// gives it: a lane whose requests carry deadlines can hold more of its
	// backlog, so that earliest-deadline-first sees more of it, at the
	// cost of holding what other workers could take.
	Window int
}

// Parse reads a SOUS_LANES value. An empty spec is one lane named
// "default" on queue. Errors name the entry at fault and what to write.
func Parse(spec, queue string) ([]Lane, error) {
	spec = strings.TrimSpace(spec)
	if spec == "" {
		return []Lane{{Name: Default, Queue: queue}}, nil
	}
	var out []Lane
	names, queues := map[string]bool{}, map[string]bool{}
	total := 0.0
	for i, entry := range strings.Split(spec, ",") {
		entry = strings.TrimSpace(entry)
		if entry == "" {
			return nil, fmt.Errorf("lane %d is empty: write NAME=QUEUE[:share=F], separated by commas", i+1)
		}
		head, opts, _ := strings.Cut(entry, ":")
		name, q, ok := strings.Cut(head, "=")
		name, q = strings.TrimSpace(name), strings.TrimSpace(q)
		if !ok || name == "" || q == "" {
			return nil, fmt.Errorf("lane %q: write NAME=QUEUE[:share=F]", entry)
		}
		if !validName(name) {
			return nil, fmt.Errorf("lane %q: a name is letters, digits, '-' and '_'", name)
		}
		if names[name] {
			return nil, fmt.Errorf("lane %q is listed twice", name)
		}
		if queues[q] {
			return nil, fmt.Errorf("queue %q is listed for two lanes: each lane has its own queue", q)
		}
		names[name], queues[q] = true, true
		l := Lane{Name: name, Queue: q}
		if i > 0 {
			l.Share = DefaultShare
		}
		if opts != "" {
			for _, opt := range strings.Split(opts, ":") {
				k, v, _ := strings.Cut(opt, "=")
				switch strings.TrimSpace(k) {
				case "window":
					n, err := strconv.Atoi(strings.TrimSpace(v))
					if err != nil || n < 1 || n > 65535 {
						return nil, fmt.Errorf("lane %q: window=%s is not a number of requests from 1 to 65535, such as window=2000", name, v)
					}
					l.Window = n
				case "share":
					f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
					if err != nil || f < 0 || f >= 1 || math.IsNaN(f) {
						return nil, fmt.Errorf("lane %q: share=%s is not a fraction in [0, 1), such as share=0.2", name, v)
					}
					l.Share = f
				default:
					return nil, fmt.Errorf("lane %q: unknown option %q (known: share, window)", name, opt)
				}
			}
		}
		total += l.Share
		out = append(out, l)
	}
	if total >= 1 {
		return nil, fmt.Errorf("the lanes' shares add up to %.2f: they must leave room for the others (less than 1)", total)
	}
	return out, nil
}

func validName(s string) bool {
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return s != ""
}

// Find returns the lane named name.
func Find(ls []Lane, name string) (Lane, bool) {
	for _, l := range ls {
		if l.Name == name {
			return l, true
		}
	}
	return Lane{}, false
}

// Names lists the lanes' names, in rank order.
func Names(ls []Lane) []string {
	out := make([]string, len(ls))
	for i, l := range ls {
		out[i] = l.Name
	}
	return out
}

// Window is the time constant over which a Scheduler measures use: a
// lane's share holds over roughly the last Window.
const Window = 30 * time.Second

// Scheduler decides which lane gets the next free slot. The zero value is
// not usable; call NewScheduler. Not safe for concurrent use.
type Scheduler struct {
	shares []float64
	use    []float64 // slot-seconds, decayed
	last   time.Time
}

// NewScheduler returns a Scheduler for lanes with these shares, in rank
// order.
func NewScheduler(shares []float64) *Scheduler {
	return &Scheduler{shares: append([]float64(nil), shares...), use: make([]float64, len(shares))}
}

// Advance accounts the time since the last call to the requests each lane
// had on the engine (onEngine[i] for lane i) and decays older use.
func (s *Scheduler) Advance(now time.Time, onEngine []int) {
	if s.last.IsZero() || !now.After(s.last) {
		if s.last.IsZero() {
			s.last = now
		}
		return
	}
	dt := now.Sub(s.last).Seconds()
	s.last = now
	decay := math.Exp(-dt / Window.Seconds())
	for i := range s.use {
		s.use[i] = s.use[i]*decay + float64(onEngine[i])*dt
	}
}

// Fraction is lane i's part of the recent use, 0 when nothing ran.
func (s *Scheduler) Fraction(i int) float64 {
	total := 0.0
	for _, u := range s.use {
		total += u
	}
	if total == 0 {
		return 0
	}
	return s.use[i] / total
}

// Order appends to dst the lanes that have work (has[i]) in the order they
// should be offered the next slot, given the requests each lane has on the
// engine and the in-flight limit. A lane is owed a slot while it holds
// fewer than its share of the limit: fewer than floor(share × limit) at
// once, or one more while its recent use (in slot-seconds) is under its
// share, so that over time it holds exactly its share. Lanes owed a slot
// come first, the furthest below their share first; then the rest by rank.
// So a steady stream in a higher lane leaves a lower one its share, and a
// lower lane's backlog never delays a higher lane by more than the time it
// takes one of its requests on the engine to end.
func (s *Scheduler) Order(dst []int, has []bool, onEngine []int, limit int) []int {
	dst = dst[:0]
	for i, h := range has {
		if h && s.owed(i, onEngine[i], limit) {
			dst = append(dst, i)
		}
	}
	// Insertion sort by how far below its share each lane is: a handful.
	for a := 1; a < len(dst); a++ {
		for b := a; b > 0 && s.below(dst[b], onEngine, limit) > s.below(dst[b-1], onEngine, limit); b-- {
			dst[b], dst[b-1] = dst[b-1], dst[b]
		}
	}
	owed := len(dst)
	for i, h := range has {
		if h && !slices.Contains(dst[:owed], i) {
			dst = append(dst, i)
		}
	}
	return dst
}

func (s *Scheduler) owed(i, on, limit int) bool {
	want := s.shares[i] * float64(max(1, limit))
	if want <= 0 {
		return false
	}
	if float64(on) < math.Floor(want) {
		return true
	}
	return float64(on) < math.Ceil(want) && s.Fraction(i) < s.shares[i]
}

// below is how far lane i is below its share of the limit, as a fraction
// of the limit.
func (s *Scheduler) below(i int, onEngine []int, limit int) float64 {
	return s.shares[i] - float64(onEngine[i])/float64(max(1, limit))
}
