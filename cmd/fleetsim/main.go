// Command fleetsim replays a simulated day of mixed traffic through a sous
// fleet scaled by KEDA's message-count trigger and by sous's scaler
// (seconds of work), and prints what each cost and delivered
// (internal/fleetsim; docs/benchmarks.md has the reading).
package main

import (
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"

	"github.com/sous-run/sous/internal/fleetsim"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "fleetsim:", err)
		os.Exit(2)
	}
}

func run(args []string, w io.Writer) error {
	fs := flag.NewFlagSet("fleetsim", flag.ContinueOnError)
	fs.SetOutput(w)
	seed := fs.Uint64("seed", 1, "the traffic's random seed")
	hours := fs.Float64("hours", 24, "hours of traffic (the day's pattern, cut short)")
	max := fs.Int("max", 8, "maxReplicaCount, for every design")
	podStart := fs.Float64("pod-start", 90, "seconds from the HPA's decision to a ready worker")
	fixed := fs.Float64("fixed", 0.05, "the engine's fixed seconds per request")
	perToken := fs.Float64("per-token", 0.02, "the engine's seconds per output token")
	targets := fs.String("targets", "300,900,1800", "sous's targetDrainSeconds to try, comma-separated")
	inter := fs.Float64("interactive-target", 0, "when above 0, sous's scaler has a trigger per lane: this targetDrainSeconds for interactive, -targets for bulk")
	bulkOnly := fs.Bool("bulk-only", false, "leave out the interactive traffic: the bulk jobs alone")
	deadline := fs.String("deadline-aware", "", "also run design (c), sous's scaler with the Batch API's demands: TARGET:MARGIN seconds, deadlines raising the answer (margin: SOUS_SCALER_DEADLINE_MARGIN)")
	ceiling := fs.Int("bulk-ceiling", 0, "with -deadline-aware, also run (c) with bulk held to at most this many slots of a replica (not in sous)")
	kedaBulk := fs.String("keda-bulk-values", "", "also run (a) with these values on the bulk queue's trigger, comma-separated (interactive's stays 96)")
	deadlineScale := fs.Float64("deadline-scale", 1, "multiply every bulk job's deadline by this (a traffic variant)")
	bulkScale := fs.Float64("bulk-scale", 1, "multiply every bulk job's requests by this (a traffic variant)")
	format := fs.String("format", "markdown", "output: markdown")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *format != "markdown" {
		return fmt.Errorf("-format %q: only markdown", *format)
	}
	if *hours <= 0 || *max < 1 || *podStart < 0 || *fixed < 0 || *perToken < 0 || *deadlineScale <= 0 || *bulkScale < 0 {
		return fmt.Errorf("-hours, -max and -deadline-scale must be above 0, -pod-start, -fixed, -per-token and -bulk-scale at least 0")
	}
	ts, err := numbers("-targets", *targets)
	if err != nil {
		return err
	}
	var kb []float64
	if *kedaBulk != "" {
		if kb, err = numbers("-keda-bulk-values", *kedaBulk); err != nil {
			return err
		}
	}
	e := fleetsim.Engine{Slots: 32, Fixed: *fixed, PerToken: *perToken}
	tr := fleetsim.Day()
	tr.Span = *hours * 3600
	if *bulkOnly {
		tr.NightRate, tr.PeakRate = 0, 0
	}
	for i := range tr.Jobs {
		tr.Jobs[i].Deadline *= *deadlineScale
		tr.Jobs[i].Requests = int(math.Round(float64(tr.Jobs[i].Requests) * *bulkScale))
	}
	rs := fleetsim.Compare(tr, e, *seed, *max, *podStart, ts, *inter)
	reqs := fleetsim.Generate(tr, e, *seed)
	for _, v := range kb {
		rs = append(rs, fleetsim.Run(fleetsim.MessageCount(*max, *podStart, v), e, reqs, tr.Span))
	}
	if *deadline != "" {
		a, b, ok := strings.Cut(*deadline, ":")
		target, err1 := strconv.ParseFloat(a, 64)
		margin, err2 := strconv.ParseFloat(b, 64)
		if !ok || err1 != nil || err2 != nil || target <= 0 || margin < 0 {
			return fmt.Errorf("-deadline-aware %q: write TARGET:MARGIN in seconds, such as 3600:1800", *deadline)
		}
		c := fleetsim.DeadlineAware(*max, *podStart, target, margin, *inter)
		rs = append(rs, fleetsim.Run(c, e, reqs, tr.Span))
		if *ceiling > 0 {
			c.Name += fmt.Sprintf(", bulk ceiling %d slots", *ceiling)
			c.BulkCeiling = *ceiling
			rs = append(rs, fleetsim.Run(c, e, reqs, tr.Span))
		}
	}
	fmt.Fprintf(w, "seed %d, %g h, engine %g s + %g s/token on 32 slots, max %d replicas, pod start %g s: %d requests, %.1f replica-hours of slot time\n\n",
		*seed, *hours, *fixed, *perToken, *max, *podStart, len(reqs), fleetsim.SlotHours(reqs, e))
	return fleetsim.Table(w, rs)
}

// numbers reads a comma-separated list of numbers above 0.
func numbers(flag, list string) ([]float64, error) {
	var out []float64
	for _, f := range strings.Split(list, ",") {
		v, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil || v <= 0 {
			return nil, fmt.Errorf("%s: %q is not a number above 0", flag, f)
		}
		out = append(out, v)
	}
	return out, nil
}
