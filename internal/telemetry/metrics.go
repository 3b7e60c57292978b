package telemetry

import (
	"errors"

	"go.opentelemetry.io/otel/metric"
)

// Metric names. Prometheus sees them with dots as underscores and a unit
// suffix: sous.queue.time becomes sous_queue_time_seconds, a counter gets
// _total (docs/observability.md lists every exported name).
const (
	MetricReceived      = "sous.messages.received"
	MetricRedelivered   = "sous.messages.redelivered"
	MetricInFlight      = "sous.messages.in_flight"
	MetricSettled       = "sous.messages.settled"
	MetricDeadLetters   = "sous.dead_letters"
	MetricResults       = "sous.results"
	MetricQueueTime     = "sous.queue.time"
	MetricBatchWait     = "sous.batch.wait"
	MetricBatchSize     = "sous.batch.size"
	MetricBatchLimit    = "sous.batch.limit"
	MetricBatchCeiling  = "sous.batch.ceiling"
	MetricEngineTime    = "sous.engine.duration"
	MetricEngineTokens  = "sous.engine.tokens"
	MetricEngineRate    = "sous.engine.token_rate"
	MetricEngineUp      = "sous.engine.up"
	MetricEngineActive  = "sous.engine.requests.active"
	MetricGPUFreeMemory = "sous.gpu.memory.free"
	MetricReconnects    = "sous.broker.reconnects"
	MetricRequestTime   = "sous.request.duration"
	MetricFirstToken    = "sous.engine.time_to_first_token"
	// Per lane (SOUS_LANES; the lane "default" without it).
	MetricLaneWaiting        = "sous.lane.waiting"
	MetricLaneInFlight       = "sous.lane.in_flight"
	MetricLaneServed         = "sous.lane.served"
	MetricLaneWait           = "sous.lane.wait"
	MetricLaneDeadlineMissed = "sous.lane.deadline_missed"
)

// Bucket boundaries. OpenTelemetry's default buckets suit milliseconds;
// these suit what sous measures.
var (
	// secondsBuckets span a fast model's batch wait to a slow model's
	// long generation, and a queue backlog of minutes.
	secondsBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}
	// sizeBuckets are powers of two up to SOUS_BATCH_MAX's limit.
	sizeBuckets = []float64{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096}
	// rateBuckets are output tokens per second of one engine call.
	rateBuckets = []float64{1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000}
)

type instruments struct {
	received    metric.Int64Counter
	redelivered metric.Int64Counter
	inFlight    metric.Int64UpDownCounter
	settled     metric.Int64Counter
	deadLetters metric.Int64Counter
	results     metric.Int64Counter
	queueTime   metric.Float64Histogram
	batchWait   metric.Float64Histogram
	batchSize   metric.Int64Histogram
	engineTime  metric.Float64Histogram
	tokens      metric.Int64Counter
	tokenRate   metric.Float64Histogram
	reconnects  metric.Int64Counter
	laneServed  metric.Int64Counter
	laneWait    metric.Float64Histogram
	laneMissed  metric.Int64Counter
	requestTime metric.Float64Histogram
	firstToken  metric.Float64Histogram
	engineUp    metric.Int64ObservableGauge
	active      metric.Int64UpDownCounter
}

func newInstruments(m metric.Meter) (instruments, error) {
	var (
		in   instruments
		errs []error
	)
	collect := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	var err error
	in.received, err = m.Int64Counter(MetricReceived, metric.WithUnit("{message}"),
		metric.WithDescription("Deliveries the worker received."))
	collect(err)
	in.redelivered, err = m.Int64Counter(MetricRedelivered, metric.WithUnit("{message}"),
		metric.WithDescription("Deliveries received on a second or later attempt (requeued, or a worker died holding them)."))
	collect(err)
	in.inFlight, err = m.Int64UpDownCounter(MetricInFlight, metric.WithUnit("{message}"),
		metric.WithDescription("Deliveries received and not yet settled: waiting for a slot, at the engine or being settled."))
	collect(err)
	in.active, err = m.Int64UpDownCounter(MetricEngineActive, metric.WithUnit("{request}"),
		metric.WithDescription("Requests in engine calls that have not answered: kept at the in-flight limit (sous.batch.limit) while there is work."))
	collect(err)
	in.settled, err = m.Int64Counter(MetricSettled, metric.WithUnit("{message}"),
		metric.WithDescription("Deliveries settled, by action (ack, requeue, dead_letter) and reason."))
	collect(err)
	in.deadLetters, err = m.Int64Counter(MetricDeadLetters, metric.WithUnit("{message}"),
		metric.WithDescription("Deliveries moved to the dead-letter queue, by reason."))
	collect(err)
	in.results, err = m.Int64Counter(MetricResults, metric.WithUnit("{result}"),
		metric.WithDescription("Results published, by status (ok, error)."))
	collect(err)
	in.queueTime, err = m.Float64Histogram(MetricQueueTime, metric.WithUnit("s"),
		metric.WithDescription("Time from enqueue to receipt by the worker, where the broker or producer gave a timestamp, by the timestamp's resolution (ms: timestamp_in_ms or Service Bus; s: the AMQP timestamp property)."),
		metric.WithExplicitBucketBoundaries(secondsBuckets...))
	collect(err)
	in.batchWait, err = m.Float64Histogram(MetricBatchWait, metric.WithUnit("s"),
		metric.WithDescription("Time from receipt to the dispatch of the delivery's batch."),
		metric.WithExplicitBucketBoundaries(secondsBuckets...))
	collect(err)
	in.batchSize, err = m.Int64Histogram(MetricBatchSize, metric.WithUnit("{message}"),
		metric.WithDescription("Deliveries per dispatched batch, by why it was dispatched (slot, full, window, idle)."),
		metric.WithExplicitBucketBoundaries(sizeBuckets...))
	collect(err)
	in.engineTime, err = m.Float64Histogram(MetricEngineTime, metric.WithUnit("s"),
		metric.WithDescription("Duration of one engine call for a batch; error.type is set when a request in it failed."),
		metric.WithExplicitBucketBoundaries(secondsBuckets...))
	collect(err)
	in.tokens, err = m.Int64Counter(MetricEngineTokens, metric.WithUnit("{token}"),
		metric.WithDescription("Tokens the engine read (gen_ai.token.type=input) and wrote (output)."))
	collect(err)
	in.tokenRate, err = m.Float64Histogram(MetricEngineRate, metric.WithUnit("{token}/s"),
		metric.WithDescription("Output tokens per second of one engine call, over the whole batch."),
		metric.WithExplicitBucketBoundaries(rateBuckets...))
	collect(err)
	in.reconnects, err = m.Int64Counter(MetricReconnects, metric.WithUnit("{reconnect}"),
		metric.WithDescription("Times the broker connection was lost and made again."))
	collect(err)
	in.requestTime, err = m.Float64Histogram(MetricRequestTime, metric.WithUnit("s"),
		metric.WithDescription("Time from enqueue to the end of the request in the worker (its result published and the delivery settled): what the producer waited, by model and the enqueue timestamp's resolution (ms, s)."),
		metric.WithExplicitBucketBoundaries(secondsBuckets...))
	collect(err)
	in.firstToken, err = m.Float64Histogram(MetricFirstToken, metric.WithUnit("s"),
		metric.WithDescription("Time from the start of the engine call to a streamed request's first output; requests that do not stream have none."),
		metric.WithExplicitBucketBoundaries(secondsBuckets...))
	collect(err)
	in.laneServed, err = m.Int64Counter(MetricLaneServed, metric.WithUnit("{request}"),
		metric.WithDescription("Requests of each lane the worker is finished with (answered or dead-lettered; not those handed back to the queue)."))
	collect(err)
	in.laneWait, err = m.Float64Histogram(MetricLaneWait, metric.WithUnit("s"),
		metric.WithDescription("Time a request of each lane waited in the worker for a slot: from receipt to its engine call (or to its settlement, for one that never reached the engine)."),
		metric.WithExplicitBucketBoundaries(secondsBuckets...))
	collect(err)
	in.laneMissed, err = m.Int64Counter(MetricLaneDeadlineMissed, metric.WithUnit("{request}"),
		metric.WithDescription("Requests of each lane whose deadline passed before they reached the engine (answered expired and dead-lettered)."))
	collect(err)
	in.engineUp, err = m.Int64ObservableGauge(MetricEngineUp,
		metric.WithDescription("1 when the last engine call or readiness probe got an answer, 0 when the engine was unreachable, timed out or failed every request."))
	collect(err)
	return in, errors.Join(errs...)
}
