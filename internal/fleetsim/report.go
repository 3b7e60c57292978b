package fleetsim

import (
	"fmt"
	"io"
)

// Table writes results as a markdown table, each design's replica-hours
// also as a multiple of the first row's.
func Table(w io.Writer, rs []Result) error {
	if _, err := fmt.Fprintln(w, "| design | replica-hours | × first | interactive p95 wait | p99 | bulk deadline misses | peak replicas |\n|---|---:|---:|---:|---:|---:|---:|"); err != nil {
		return err
	}
	for _, r := range rs {
		ratio := 0.0
		if len(rs) > 0 && rs[0].ReplicaHours > 0 {
			ratio = r.ReplicaHours / rs[0].ReplicaHours
		}
		if _, err := fmt.Fprintf(w, "| %s | %.1f | %.2f | %s | %s | %d of %d (%.2f%%) | %d |\n",
			r.Design, r.ReplicaHours, ratio, secs(r.InteractiveP95), secs(r.InteractiveP99), r.BulkMissed, r.Bulk, r.MissedPct(), r.PeakReplicas); err != nil {
			return err
		}
	}
	return nil
}

func secs(s float64) string {
	if s < 10 {
		return fmt.Sprintf("%.2f s", s)
	}
	return fmt.Sprintf("%.0f s", s)
}
