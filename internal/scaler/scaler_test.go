package scaler_test

import (
	"context"
	"io"
	"log/slog"
	"math"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sous-run/sous/internal/fleet"
	"github.com/sous-run/sous/internal/scaler"
	"github.com/sous-run/sous/internal/scaler/externalscaler"
)

type depths map[string]int

func (d depths) Depth(_ context.Context, q string) (int, bool, error) {
	n, ok := d[q]
	if !ok {
		return 0, true, scaler.ErrNoQueue
	}
	return n, true, nil
}

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

func ref(md map[string]string) *externalscaler.ScaledObjectRef {
	return &externalscaler.ScaledObjectRef{Name: "sous-worker", Namespace: "sous", ScalerMetadata: md}
}

func metric(t *testing.T, s *scaler.Server, md map[string]string) float64 {
	t.Helper()
	r, err := s.GetMetrics(context.Background(), &externalscaler.GetMetricsRequest{ScaledObjectRef: ref(md), MetricName: scaler.MetricName})
	if err != nil {
		t.Fatal(err)
	}
	return r.MetricValues[0].MetricValueFloat
}

// The same number of requests of long answers is more work than of short
// ones: the desired replicas (seconds / target) follow what the workers
// measured, not the message count.
func TestSecondsOfWork(t *testing.T) {
	now := time.Unix(1000, 0)
	view := fleet.NewView(nil)
	// 32 slots; short answers take 0.5 s, long ones 32 s.
	view.Add(fleet.Report{Worker: "w1", Queue: "short", At: now, Limit: 32, MeanServiceS: 0.5})
	view.Add(fleet.Report{Worker: "w1", Queue: "long", At: now, Limit: 32, MeanServiceS: 32, InFlight: 3})
	d := depths{"short": 960, "long": 960, "empty": 0}
	s := scaler.New(scaler.Config{PriorCost: 2, Now: func() time.Time { return now }}, view, d, discard)
	target := 60.0
	spec, err := s.GetMetricSpec(context.Background(), ref(map[string]string{"queue": "short", "targetDrainSeconds": "60"}))
	if err != nil || spec.MetricSpecs[0].TargetSizeFloat != target || spec.MetricSpecs[0].MetricName != scaler.MetricName {
		t.Fatalf("GetMetricSpec = %+v, %v", spec, err)
	}
	short := metric(t, s, map[string]string{"queue": "short", "targetDrainSeconds": "60"})
	long := metric(t, s, map[string]string{"queue": "long", "targetDrainSeconds": "60"})
	if math.Abs(short-15) > 1e-9 || math.Abs(long-960) > 1e-9 {
		t.Fatalf("short %.2f s, long %.2f s; want 960 × 0.5/32 = 15 and 960 × 32/32 = 960 (the depth counts unacked)", short, long)
	}
	if rs, rl := math.Ceil(short/target), math.Ceil(long/target); rs != 1 || rl != 16 {
		t.Fatalf("desired replicas short %v long %v, want 1 and 16", rs, rl)
	}
	// A lane list adds up; a queue no worker measured is priced at the prior.
	d["new"] = 10
	both := metric(t, s, map[string]string{"queue": "short, long,new", "targetDrainSeconds": "60"})
	if math.Abs(both-(15+960+20)) > 1e-9 {
		t.Fatalf("short,long,new = %.2f s, want 995", both)
	}
	// Active on the first request; inactive when every queue is empty or missing.
	for md, want := range map[string]bool{"short": true, "empty": false, "missing,empty": false, "empty,new": true} {
		r, err := s.IsActive(context.Background(), ref(map[string]string{"queue": md, "targetDrainSeconds": "60"}))
		if err != nil || r.Result != want {
			t.Errorf("IsActive(%s) = %v, %v; want %v", md, r, err, want)
		}
	}
	// Once the workers are gone (scaled to zero), the last cost is kept.
	later := now.Add(time.Hour)
	s = scaler.New(scaler.Config{PriorCost: 2, Now: func() time.Time { return later }}, view, d, discard)
	if got := metric(t, s, map[string]string{"queue": "long", "targetDrainSeconds": "60"}); math.Abs(got-960) > 1e-9 {
		t.Fatalf("long after its workers left: %.2f s, want 960 (the last cost, and no held requests)", got)
	}
}

func TestBadMetadata(t *testing.T) {
	s := scaler.New(scaler.Config{PriorCost: 1}, fleet.NewView(nil), depths{}, discard)
	for _, md := range []map[string]string{
		{"targetDrainSeconds": "60"},
		{"queue": "q"},
		{"queue": "q", "targetDrainSeconds": "0"},
		{"queue": "q", "targetDrainSeconds": "soon"},
	} {
		_, err := s.GetMetricSpec(context.Background(), ref(md))
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%v: %v, want InvalidArgument", md, err)
		}
	}
}

// A producer's demand raises the answer so that the HPA asks for the
// replicas that finish each deadline's work in time; it never lowers
// what the seconds of work ask for, and a queue of another trigger's is
// not counted.
func TestDeadlinesRaiseTheMetric(t *testing.T) {
	t.Parallel()
	now := time.Unix(10_000, 0)
	view := fleet.NewView(nil)
	// 32 slots, 16 s a request: 0.5 s of one replica per request.
	view.Add(fleet.Report{Worker: "w1", Queue: "bulk", At: now, Limit: 32, MeanServiceS: 16})
	d := depths{"bulk": 100, "interactive": 0, "idle": 0}
	s := scaler.New(scaler.Config{PriorCost: 1, DeadlineMargin: 30 * time.Minute, Now: func() time.Time { return now }}, view, d, discard)
	md := map[string]string{"queue": "interactive,bulk", "targetDrainSeconds": "300"}
	if got := metric(t, s, md); math.Abs(got-50) > 1e-9 {
		t.Fatalf("without a demand: %.2f s, want 100 × 0.5 = 50", got)
	}
	// 7,200 requests due in an hour, 30 minutes early: 3,600 s of one
	// replica in 1,800 s, 2 replicas, so 2 × 300 s.
	view.AddDemand(fleet.Demand{Kind: fleet.KindDemand, Source: "gw", Queue: "bulk", At: now, Due: []fleet.Due{{By: now.Add(time.Hour), Requests: 7200}}})
	got := metric(t, s, md)
	if math.Abs(got-600) > 1e-9 || math.Ceil(got/300) != 2 {
		t.Fatalf("with 7200 due in an hour: %.2f s, want 600 (2 replicas at target 300)", got)
	}
	// A demand that asks for less than the seconds of work lowers nothing.
	view.AddDemand(fleet.Demand{Kind: fleet.KindDemand, Source: "gw", Queue: "bulk", At: now.Add(time.Second), Due: []fleet.Due{{By: now.Add(24 * time.Hour), Requests: 100}}})
	if got := metric(t, s, md); math.Abs(got-50) > 1e-9 {
		t.Fatalf("with 100 due in a day: %.2f s, want the 50 s of work", got)
	}
	// Another trigger's queue, and an unknown queue priced at the prior.
	view.AddDemand(fleet.Demand{Kind: fleet.KindDemand, Source: "gw", Queue: "idle", At: now, Due: []fleet.Due{{By: now.Add(time.Hour), Requests: 3600}}})
	if got := metric(t, s, md); math.Abs(got-50) > 1e-9 {
		t.Fatalf("another queue's demand counted: %.2f s", got)
	}
	if got := metric(t, s, map[string]string{"queue": "idle", "targetDrainSeconds": "300"}); math.Abs(got-600) > 1e-9 {
		t.Fatalf("idle: %.2f s, want 3600 × 1 s prior / 1800 s = 2 replicas, 600", got)
	}
	// Work a producer says is due does not wake a fleet whose queues
	// hold nothing: the gateway paces lines into the queue.
	r, err := s.IsActive(context.Background(), ref(map[string]string{"queue": "idle", "targetDrainSeconds": "300"}))
	if err != nil || r.Result {
		t.Fatalf("IsActive(idle) with a demand and no request = %v, %v; want false", r, err)
	}
}
