package scaler

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sous-run/sous/internal/fleet"
	"github.com/sous-run/sous/internal/scaler/externalscaler"
)

// Depth reads how many requests a queue holds.
type Depth interface {
	// Depth returns the requests queue holds: ready, plus those delivered
	// and not yet acknowledged when withUnacked. An error that wraps
	// ErrNoQueue says the queue does not exist.
	Depth(ctx context.Context, queue string) (n int, withUnacked bool, err error)
}

// ErrNoQueue: the queue a trigger names does not exist (yet).
var ErrNoQueue = errors.New("the queue does not exist")

// MetricName is the name of the metric the scaler answers.
const MetricName = "sous-work-seconds"

// The trigger metadata the scaler reads, besides KEDA's own scalerAddress
// (deploy/ checks the ScaledObjects against these names).
const (
	// QueueKey names the queues: one, or the lane queues separated by
	// commas.
	QueueKey = "queue"
	// TargetDrainSecondsKey is one replica's share of the backlog, in
	// seconds.
	TargetDrainSecondsKey = "targetDrainSeconds"
)

// Config tunes a Server.
type Config struct {
	// PriorCost is the seconds one replica spends per request of a queue
	// no worker has measured yet (SOUS_SCALER_PRIOR_SECONDS).
	PriorCost float64
	// DeadlineMargin is how long before each deadline a producer states
	// (fleet.Demand) its work should be done
	// (SOUS_SCALER_DEADLINE_MARGIN; 0 aims at the deadline itself).
	DeadlineMargin time.Duration
	// StreamInterval is how often StreamIsActive looks at the queues
	// (default 5s).
	StreamInterval time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Server implements externalscaler.ExternalScalerServer.
type Server struct {
	externalscaler.UnimplementedExternalScalerServer
	cfg   Config
	view  *fleet.View
	depth Depth
	log   *slog.Logger
}

// New returns a Server that reads queue depths from depth and costs from
// view.
func New(cfg Config, view *fleet.View, depth Depth, log *slog.Logger) *Server {
	if cfg.StreamInterval <= 0 {
		cfg.StreamInterval = 5 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Server{cfg: cfg, view: view, depth: depth, log: log}
}

// trigger is a ScaledObject trigger's metadata.
type trigger struct {
	queues []string
	target float64 // seconds
}

func parse(ref *externalscaler.ScaledObjectRef) (trigger, error) {
	var t trigger
	if ref == nil {
		return t, status.Error(codes.InvalidArgument, "no ScaledObject reference")
	}
	m := ref.GetScalerMetadata()
	for _, q := range strings.Split(m[QueueKey], ",") {
		if q = strings.TrimSpace(q); q != "" {
			t.queues = append(t.queues, q)
		}
	}
	if len(t.queues) == 0 {
		return t, status.Errorf(codes.InvalidArgument, "ScaledObject %s/%s: metadata queue is required: a queue, or the lane queues separated by commas", ref.GetNamespace(), ref.GetName())
	}
	v, err := strconv.ParseFloat(m[TargetDrainSecondsKey], 64)
	if err != nil || v <= 0 || math.IsInf(v, 0) || math.IsNaN(v) {
		return t, status.Errorf(codes.InvalidArgument, "ScaledObject %s/%s: metadata targetDrainSeconds must be a number of seconds above 0, such as \"300\"", ref.GetNamespace(), ref.GetName())
	}
	t.target = v
	return t, nil
}

// Work is what a trigger's queues hold now.
type Work struct {
	// Seconds is what one replica would need to drain the queues.
	Seconds float64
	// Requests is how many requests they hold.
	Requests int
	// Replicas is how many replicas finish the work producers say is
	// due on the queues in time (fleet.DeadlineReplicas, added up over
	// the queues); 0 when none is.
	Replicas float64
	// Metric is what GetMetrics answers: Seconds, raised so that the
	// HPA asks for at least Replicas.
	Metric float64
}

// work measures the trigger's queues. A queue that does not exist holds
// nothing.
func (s *Server) work(ctx context.Context, t trigger) (Work, error) {
	now := s.cfg.Now()
	var w Work
	for _, q := range t.queues {
		n, withUnacked, err := s.depth.Depth(ctx, q)
		if err != nil && !errors.Is(err, ErrNoQueue) {
			return w, status.Errorf(codes.Unavailable, "queue %s: %v", q, err)
		}
		lane := s.view.Lane(q, now)
		if !withUnacked {
			n += lane.InFlight // the requests the workers hold
		}
		cost := s.cfg.PriorCost
		if lane.Known {
			cost = lane.Cost
		}
		w.Requests += n
		w.Seconds += float64(n) * cost
		// The queues of a trigger share its replicas: what each needs
		// for its deadlines adds up (an upper bound when their deadlines
		// differ, and deadlines may only raise the answer).
		if due := s.view.Due(q, now); len(due) > 0 {
			w.Replicas += fleet.DeadlineReplicas(due, cost, now, s.cfg.DeadlineMargin)
		}
	}
	// KEDA's external metrics are AverageValue: the HPA asks for
	// ceil(metric / targetDrainSeconds) replicas. A metric of Replicas ×
	// targetDrainSeconds therefore asks for at least ceil(Replicas);
	// deadlines only ever raise the answer, never lower what the seconds
	// of work ask for.
	w.Metric = max(w.Seconds, w.Replicas*t.target)
	return w, nil
}

// IsActive implements externalscaler.ExternalScalerServer: true as soon as
// any queue holds a request (scale from zero on the first). Work a
// producer says is due does not activate on its own: the Batch API's
// gateway paces a running batch's lines into the queue, so the queue
// holds requests whenever there is work to do, and a demand with nothing
// in the broker (between two paced lines, or from a producer that has
// stopped) has nothing for a replica to receive.
func (s *Server) IsActive(ctx context.Context, ref *externalscaler.ScaledObjectRef) (*externalscaler.IsActiveResponse, error) {
	t, err := parse(ref)
	if err != nil {
		return nil, err
	}
	w, err := s.work(ctx, t)
	if err != nil {
		return nil, err
	}
	return &externalscaler.IsActiveResponse{Result: w.Requests > 0}, nil
}

// StreamIsActive implements externalscaler.ExternalScalerServer: it sends
// whether the queues hold work at once and whenever that changes.
func (s *Server) StreamIsActive(ref *externalscaler.ScaledObjectRef, stream externalscaler.ExternalScaler_StreamIsActiveServer) error {
	t, err := parse(ref)
	if err != nil {
		return err
	}
	tick := time.NewTicker(s.cfg.StreamInterval)
	defer tick.Stop()
	sent, last := false, false
	for {
		w, err := s.work(stream.Context(), t)
		if err == nil && (!sent || (w.Requests > 0) != last) {
			last, sent = w.Requests > 0, true
			if err := stream.Send(&externalscaler.IsActiveResponse{Result: last}); err != nil {
				return err
			}
		}
		select {
		case <-stream.Context().Done():
			return nil
		case <-tick.C:
		}
	}
}

// GetMetricSpec implements externalscaler.ExternalScalerServer: the target
// is targetDrainSeconds of work per replica.
func (s *Server) GetMetricSpec(_ context.Context, ref *externalscaler.ScaledObjectRef) (*externalscaler.GetMetricSpecResponse, error) {
	t, err := parse(ref)
	if err != nil {
		return nil, err
	}
	return &externalscaler.GetMetricSpecResponse{MetricSpecs: []*externalscaler.MetricSpec{{
		MetricName: MetricName, TargetSize: int64(math.Ceil(t.target)), TargetSizeFloat: t.target,
	}}}, nil
}

// GetMetrics implements externalscaler.ExternalScalerServer: the seconds
// one replica would need to drain the queues, raised so that the work
// producers say is due by a deadline is done in time (Work.Metric).
func (s *Server) GetMetrics(ctx context.Context, req *externalscaler.GetMetricsRequest) (*externalscaler.GetMetricsResponse, error) {
	t, err := parse(req.GetScaledObjectRef())
	if err != nil {
		return nil, err
	}
	w, err := s.work(ctx, t)
	if err != nil {
		s.log.Warn("GetMetrics", "queues", t.queues, "err", err)
		return nil, err
	}
	s.log.Debug("GetMetrics", "queues", t.queues, "requests", w.Requests, "work_seconds", w.Seconds, "deadline_replicas", w.Replicas, "metric", w.Metric, "target_seconds", t.target)
	return &externalscaler.GetMetricsResponse{MetricValues: []*externalscaler.MetricValue{{
		MetricName: MetricName, MetricValue: int64(math.Ceil(w.Metric)), MetricValueFloat: w.Metric,
	}}}, nil
}
