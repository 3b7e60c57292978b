package telemetry

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	genai "go.opentelemetry.io/otel/semconv/v1.41.0"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/sizing"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

// ScopeName is the instrumentation scope of every span and metric.
const ScopeName = "github.com/sous-run/sous/internal/telemetry"

// Attribute keys sous adds where no semantic convention fits.
const (
	AttrAttempt     = attribute.Key("sous.attempt")      // delivery attempt, 1-based
	AttrBatchID     = attribute.Key("sous.batch.id")     // batch id, as in results
	AttrBatchReason = attribute.Key("sous.batch.reason") // batch.Reasons: slot, full, window, idle
	// AttrTimeResolution is how precise the enqueue timestamp behind a
	// queue time or request duration is: ms, s or unknown.
	AttrTimeResolution = attribute.Key("sous.time.resolution")
	AttrLimitReason    = attribute.Key("sous.batch.limit.reason") // sizing.Reasons: memory, max, min, config, ceiling, engine
	AttrSettleAction   = attribute.Key("sous.settle.action")      // ack, requeue, dead_letter
	AttrSettleReason   = attribute.Key("sous.settle.reason")      // a reason code, as in the dead-letter header
	AttrResultStatus   = attribute.Key("sous.result.status")      // ok, error
	AttrErrorClass     = attribute.Key("sous.error.class")        // input, retryable, overloaded, permanent
	// AttrQueue is on the per-queue metrics: the input queue.
	AttrQueue = semconv.MessagingDestinationNameKey
	// AttrLane is on the per-lane metrics: the lane's name (SOUS_LANES).
	AttrLane = attribute.Key("sous.lane")
)

const (
	defaultSystem   = "rabbitmq"
	defaultProvider = "ollama"
	// replyToPrefix starts RabbitMQ direct reply-to addresses.
	replyToPrefix    = "amq.rabbitmq.reply-to"
	statusChunk      = "chunk"
	reasonShutdown   = "shutdown"
	classInput       = "input"
	errorTypeStale   = "stale"
	errorTypeSettle  = "settle_failed"
	errorTypePublish = "publish_failed"
	operationProcess = "process"
	batchSpanPrefix  = "batch "
)

// Config configures an Observer. The zero value records nothing and still
// carries trace context from requests to results and logs.
type Config struct {
	// TracerProvider makes the spans; nil records none.
	TracerProvider trace.TracerProvider
	// MeterProvider makes the metrics; nil records none.
	MeterProvider metric.MeterProvider
	// Propagator reads and writes trace context in message headers
	// (default: W3C Trace Context, the traceparent and tracestate headers).
	// Baggage is not propagated by default: it may carry user data.
	Propagator propagation.TextMapPropagator
	// System is messaging.system: "rabbitmq" (default) or "servicebus".
	System string
	// Queue is the input queue, messaging.destination.name.
	Queue string
	// EngineProvider is gen_ai.provider.name (default "ollama").
	EngineProvider string
	// Model is the worker's default model: its token counters are
	// exported at 0 from the start. Empty: they appear with the first call.
	Model string
}

// Observer records the worker's events as spans and metrics. It implements
// worker.Observer. Create it with New.
type Observer struct {
	tracer  trace.Tracer
	tracing bool
	prop    propagation.TextMapPropagator
	meter   metric.Meter
	m       instruments
	system  string
	queue   string
	engine  string

	processName string
	queueAttr   metric.MeasurementOption // messaging.destination.name=<queue>
	opts        optCache
	engineUp    atomic.Int64 // 1 up, 0 down, -1 unknown
}

var (
	_ worker.Observer           = (*Observer)(nil)
	_ worker.FirstTokenObserver = (*Observer)(nil)
)

// New returns an Observer and registers its instruments.
func New(cfg Config) (*Observer, error) {
	if cfg.System == "" {
		cfg.System = defaultSystem
	}
	if cfg.EngineProvider == "" {
		cfg.EngineProvider = defaultProvider
	}
	if cfg.Propagator == nil {
		cfg.Propagator = propagation.TraceContext{}
	}
	o := &Observer{
		prop:        cfg.Propagator,
		system:      cfg.System,
		queue:       cfg.Queue,
		engine:      cfg.EngineProvider,
		processName: spanName(operationProcess, cfg.Queue),
		queueAttr:   metric.WithAttributeSet(attribute.NewSet(AttrQueue.String(cfg.Queue))),
	}
	o.engineUp.Store(-1)
	if cfg.TracerProvider != nil {
		o.tracing = true
		o.tracer = cfg.TracerProvider.Tracer(ScopeName, trace.WithSchemaURL(semconv.SchemaURL))
	}
	mp := cfg.MeterProvider
	if mp == nil {
		mp = metricnoop.NewMeterProvider()
	}
	o.meter = mp.Meter(ScopeName, metric.WithSchemaURL(semconv.SchemaURL))
	var err error
	if o.m, err = newInstruments(o.meter); err != nil {
		return nil, fmt.Errorf("telemetry: instruments: %w", err)
	}
	o.startAtZero(cfg.Model)
	if _, err := o.meter.RegisterCallback(func(_ context.Context, obs metric.Observer) error {
		if up := o.engineUp.Load(); up >= 0 {
			obs.ObserveInt64(o.m.engineUp, up)
		}
		return nil
	}, o.m.engineUp); err != nil {
		return nil, fmt.Errorf("telemetry: engine gauge: %w", err)
	}
	return o, nil
}

// ObserveSizer reports the batch sizer's state as gauges: the current
// batch size limit and what set it, the AIMD ceiling, and the free GPU
// memory of the fullest device (only once a reading exists). snapshot is
// called at each collection and must be quick; (*sizing.Sizer).Snapshot
// is.
func (o *Observer) ObserveSizer(snapshot func() sizing.Snapshot) error {
	limit, err1 := o.meter.Int64ObservableGauge(MetricBatchLimit, metric.WithUnit("{message}"),
		metric.WithDescription("The batch size the sizer allows now, by the limit that set it (memory, max, min, config, ceiling, engine)."))
	ceiling, err2 := o.meter.Int64ObservableGauge(MetricBatchCeiling, metric.WithUnit("{message}"),
		metric.WithDescription("The AIMD ceiling on the in-flight limit: halved when the engine is overloaded, grown by SOUS_BATCH_GROWTH_STEP for each call that succeeds with the engine at the ceiling."))
	free, err3 := o.meter.Int64ObservableGauge(MetricGPUFreeMemory, metric.WithUnit("By"),
		metric.WithDescription("Free memory of the fullest GPU the engine uses, at the last reading."))
	if err := errors.Join(err1, err2, err3); err != nil {
		return fmt.Errorf("telemetry: sizer gauges: %w", err)
	}
	_, err := o.meter.RegisterCallback(func(_ context.Context, obs metric.Observer) error {
		s := snapshot()
		obs.ObserveInt64(limit, int64(s.Size), metric.WithAttributes(AttrLimitReason.String(s.Reason)))
		obs.ObserveInt64(ceiling, int64(s.Ceiling))
		if !s.ReadAt.IsZero() {
			obs.ObserveInt64(free, int64(min(s.FreeBytes, 1<<63-1)))
		}
		return nil
	}, limit, ceiling, free)
	if err != nil {
		return fmt.Errorf("telemetry: sizer gauges: %w", err)
	}
	return nil
}

// ObserveLanes reports each lane's waiting and in-flight requests as
// gauges, and starts its counters at 0. stats is called at each collection
// and must be quick; (*worker.Worker).LaneStats is.
func (o *Observer) ObserveLanes(stats func() []worker.LaneStat) error {
	waiting, err1 := o.meter.Int64ObservableGauge(MetricLaneWaiting, metric.WithUnit("{request}"),
		metric.WithDescription("Requests of each lane waiting in the worker for a slot."))
	inFlight, err2 := o.meter.Int64ObservableGauge(MetricLaneInFlight, metric.WithUnit("{request}"),
		metric.WithDescription("Requests of each lane on the engine."))
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("telemetry: lane gauges: %w", err)
	}
	ctx := context.Background()
	for _, l := range stats() {
		lane := metric.WithAttributes(AttrLane.String(l.Name))
		o.m.laneServed.Add(ctx, 0, lane)
		o.m.laneMissed.Add(ctx, 0, lane)
	}
	_, err := o.meter.RegisterCallback(func(_ context.Context, obs metric.Observer) error {
		for _, l := range stats() {
			lane := metric.WithAttributes(AttrLane.String(l.Name))
			obs.ObserveInt64(waiting, int64(l.Waiting), lane)
			obs.ObserveInt64(inFlight, int64(l.OnEngine), lane)
		}
		return nil
	}, waiting, inFlight)
	if err != nil {
		return fmt.Errorf("telemetry: lane gauges: %w", err)
	}
	return nil
}

// startAtZero exports every counter at 0 before its first event, so that a
// dashboard or an alert on rate() or increase() sees a series from the
// start (sous_broker_reconnects_total before the first reconnect). Counters
// with open-ended labels start with the label values the documented alerts
// select: results by status, settlements acked, dead letters for
// max_attempts and model_not_found, tokens of the default model.
func (o *Observer) startAtZero(model string) {
	ctx := context.Background()
	o.m.received.Add(ctx, 0, o.queueAttr)
	o.m.redelivered.Add(ctx, 0, o.queueAttr)
	o.m.reconnects.Add(ctx, 0, o.queueAttr)
	for _, status := range []string{wire.StatusOK, wire.StatusError} {
		o.m.results.Add(ctx, 0, o.opts.get(optKey{metric: keyResults, a: status}, func() []attribute.KeyValue {
			return []attribute.KeyValue{AttrResultStatus.String(status)}
		}))
	}
	ack := action(queue.Ack)
	o.m.settled.Add(ctx, 0, o.opts.get(optKey{metric: keySettled, a: ack}, func() []attribute.KeyValue {
		return []attribute.KeyValue{AttrQueue.String(o.queue), AttrSettleAction.String(ack), AttrSettleReason.String("")}
	}))
	for _, reason := range []string{"max_attempts", "model_not_found"} {
		o.m.deadLetters.Add(ctx, 0, o.opts.get(optKey{metric: keyDeadLetters, a: reason}, func() []attribute.KeyValue {
			return []attribute.KeyValue{AttrQueue.String(o.queue), AttrSettleReason.String(reason)}
		}))
	}
	if model == "" {
		return
	}
	m := genai.GenAIRequestModel(model)
	o.m.tokens.Add(ctx, 0, o.opts.get(optKey{metric: keyTokens, a: model, b: "input"}, func() []attribute.KeyValue {
		return []attribute.KeyValue{m, genai.GenAITokenTypeInput}
	}))
	o.m.tokens.Add(ctx, 0, o.opts.get(optKey{metric: keyTokens, a: model, b: "output"}, func() []attribute.KeyValue {
		return []attribute.KeyValue{m, genai.GenAITokenTypeOutput}
	}))
}

// BrokerReconnected counts a broker reconnect. It suits
// rabbitmq.Config.OnReconnect.
func (o *Observer) BrokerReconnected() {
	o.m.reconnects.Add(context.Background(), 1, o.queueAttr)
}

// Received continues the producer's trace and starts the delivery's
// "process <queue>" span, which Done ends.
func (o *Observer) Received(ctx context.Context, d *queue.Delivery) context.Context {
	o.m.received.Add(ctx, 1, o.queueAttr)
	o.m.inFlight.Add(ctx, 1, o.queueAttr)
	if d.Attempt > 1 {
		o.m.redelivered.Add(ctx, 1, o.queueAttr)
	}
	if !d.EnqueuedAt.IsZero() && !d.ReceivedAt.IsZero() {
		res := resolution(d.EnqueuedResolution)
		o.m.queueTime.Record(ctx, max(0, d.ReceivedAt.Sub(d.EnqueuedAt)).Seconds(), o.opts.get(optKey{metric: keyQueueTime, a: res}, func() []attribute.KeyValue {
			return []attribute.KeyValue{semconv.MessagingDestinationName(o.queue), AttrTimeResolution.String(res)}
		}))
	}
	if len(d.Headers) > 0 {
		ctx = o.prop.Extract(ctx, propagation.MapCarrier(d.Headers))
	}
	if !o.tracing {
		return ctx
	}
	attrs := []attribute.KeyValue{
		semconv.MessagingSystemKey.String(o.system),
		semconv.MessagingDestinationName(o.queue),
		semconv.MessagingOperationTypeProcess,
		semconv.MessagingOperationName(operationProcess),
		semconv.MessagingMessageBodySize(len(d.Body)),
		AttrAttempt.Int(d.Attempt),
	}
	if d.ID != "" {
		attrs = append(attrs, semconv.MessagingMessageID(d.ID))
	}
	if d.CorrelationID != "" {
		attrs = append(attrs, semconv.MessagingMessageConversationID(d.CorrelationID))
	}
	opts := []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindConsumer), trace.WithAttributes(attrs...)}
	if !d.ReceivedAt.IsZero() {
		opts = append(opts, trace.WithTimestamp(d.ReceivedAt))
	}
	ctx, _ = o.tracer.Start(ctx, o.processName, opts...)
	return ctx
}

// BatchStarted records the batch's size and each delivery's wait, and
// starts the batch span, linked both ways to every delivery's span.
func (o *Observer) BatchStarted(ctx context.Context, b *worker.BatchEvent) context.Context {
	model := genai.GenAIRequestModel(b.Model)
	o.m.batchSize.Record(ctx, int64(len(b.Items)), o.opts.get(optKey{metric: keyBatchSize, a: b.Model, b: b.Reason}, func() []attribute.KeyValue {
		return []attribute.KeyValue{model, AttrBatchReason.String(b.Reason)}
	}))
	wait := o.opts.get(optKey{metric: keyBatchWait, a: b.Model}, func() []attribute.KeyValue { return []attribute.KeyValue{model} })
	for _, it := range b.Items {
		if !it.Delivery.ReceivedAt.IsZero() {
			o.m.batchWait.Record(it.Ctx, max(0, b.Start.Sub(it.Delivery.ReceivedAt)).Seconds(), wait)
		}
	}
	if !o.tracing {
		return ctx
	}
	links := make([]trace.Link, 0, len(b.Items))
	for _, it := range b.Items {
		if sc := trace.SpanContextFromContext(it.Ctx); sc.IsValid() {
			links = append(links, trace.Link{SpanContext: sc})
		}
	}
	opts := []trace.SpanStartOption{
		trace.WithSpanKind(trace.SpanKindInternal),
		trace.WithLinks(links...),
		trace.WithAttributes(
			semconv.MessagingSystemKey.String(o.system),
			semconv.MessagingDestinationName(o.queue),
			semconv.MessagingBatchMessageCount(len(b.Items)),
			AttrBatchID.String(b.ID),
			AttrBatchReason.String(b.Reason),
			operationName(b.Kind),
			model,
		),
	}
	if !b.Start.IsZero() {
		opts = append(opts, trace.WithTimestamp(b.Start))
	}
	if len(b.Items) == 1 {
		// One message: the batch is part of its trace.
		ctx = trace.ContextWithSpan(ctx, trace.SpanFromContext(b.Items[0].Ctx))
	} else {
		// Several messages, from as many traces: a root linked to each.
		opts = append(opts, trace.WithNewRoot())
	}
	ctx, span := o.tracer.Start(ctx, batchSpanPrefix+b.Model, opts...)
	back := trace.Link{SpanContext: span.SpanContext()}
	for _, it := range b.Items {
		trace.SpanFromContext(it.Ctx).AddLink(back)
	}
	return ctx
}

// BatchFinished ends the batch span.
func (o *Observer) BatchFinished(ctx context.Context, _ *worker.BatchEvent, _ time.Duration) {
	trace.SpanFromContext(ctx).End()
}

// EngineCall times one engine call as a GenAI client span and records its
// duration, tokens and output rate.
func (o *Observer) EngineCall(ctx context.Context, c worker.EngineCall) (context.Context, func([]inference.Result)) {
	start := time.Now()
	op := operationName(c.Kind)
	model := genai.GenAIRequestModel(c.Model)
	var span trace.Span
	if o.tracing {
		ctx, span = o.tracer.Start(ctx, op.Value.AsString()+" "+c.Model,
			trace.WithSpanKind(trace.SpanKindClient),
			trace.WithAttributes(op, genai.GenAIProviderNameKey.String(o.engine), model, semconv.MessagingBatchMessageCount(c.Size)))
	}
	o.m.active.Add(ctx, int64(c.Size), o.queueAttr)
	return ctx, func(results []inference.Result) {
		o.m.active.Add(ctx, -int64(c.Size), o.queueAttr)
		elapsed := time.Since(start)
		var in, out int
		var firstErr error
		failed := 0
		for _, r := range results {
			if r.Err != nil {
				failed++
				if firstErr == nil {
					firstErr = r.Err
				}
				continue
			}
			in += r.Response.Usage.InputTokens
			out += r.Response.Usage.OutputTokens
		}
		errType := ""
		if firstErr != nil {
			errType = inference.CodeOf(firstErr)
		}
		o.m.engineTime.Record(ctx, elapsed.Seconds(), o.opts.get(optKey{metric: keyEngineTime, a: c.Model, b: op.Value.AsString(), c: errType}, func() []attribute.KeyValue {
			attrs := []attribute.KeyValue{model, op}
			if errType != "" {
				attrs = append(attrs, semconv.ErrorTypeKey.String(errType))
			}
			return attrs
		}))
		if in > 0 {
			o.m.tokens.Add(ctx, int64(in), o.opts.get(optKey{metric: keyTokens, a: c.Model, b: "input"}, func() []attribute.KeyValue {
				return []attribute.KeyValue{model, genai.GenAITokenTypeInput}
			}))
		}
		if out > 0 {
			o.m.tokens.Add(ctx, int64(out), o.opts.get(optKey{metric: keyTokens, a: c.Model, b: "output"}, func() []attribute.KeyValue {
				return []attribute.KeyValue{model, genai.GenAITokenTypeOutput}
			}))
			if elapsed > 0 {
				o.m.tokenRate.Record(ctx, float64(out)/elapsed.Seconds(), o.opts.get(optKey{metric: keyTokenRate, a: c.Model}, func() []attribute.KeyValue {
					return []attribute.KeyValue{model}
				}))
			}
		}
		if span == nil {
			return
		}
		span.SetAttributes(genai.GenAIUsageInputTokens(in), genai.GenAIUsageOutputTokens(out))
		if firstErr != nil {
			span.SetAttributes(
				semconv.ErrorTypeKey.String(inference.CodeOf(firstErr)),
				AttrErrorClass.String(inference.KindOf(firstErr).String()),
				attribute.Int("sous.engine.failed_requests", failed))
			span.SetStatus(codes.Error, firstErr.Error())
		}
		span.End()
	}
}

// Publishing starts the publish span of a result, a child of the
// delivery's span, and writes its context into m's headers: the result's
// consumer continues the trace from there. Stream chunks carry the
// delivery's context and get no span of their own.
func (o *Observer) Publishing(ctx context.Context, m *queue.Message, status string) func(error) {
	if m.Headers == nil {
		m.Headers = map[string]string{}
	}
	if status == statusChunk {
		o.prop.Inject(ctx, propagation.MapCarrier(m.Headers))
		return nopEnd
	}
	var span trace.Span
	if o.tracing {
		op := "publish"
		if o.system == semconv.MessagingSystemServiceBus.Value.AsString() {
			op = "send"
		}
		attrs := []attribute.KeyValue{
			semconv.MessagingSystemKey.String(o.system),
			semconv.MessagingOperationTypeSend,
			semconv.MessagingOperationName(op),
			semconv.MessagingMessageBodySize(len(m.Body)),
			AttrResultStatus.String(status),
		}
		if m.MessageID != "" {
			attrs = append(attrs, semconv.MessagingMessageID(m.MessageID))
		}
		if m.CorrelationID != "" {
			attrs = append(attrs, semconv.MessagingMessageConversationID(m.CorrelationID))
		}
		name := op
		if temporary(m.To) {
			// A reply-to address names one producer's channel: keep it out
			// of the span name, which must have few distinct values.
			attrs = append(attrs, semconv.MessagingDestinationName(m.To), semconv.MessagingDestinationTemporary(true), semconv.MessagingDestinationAnonymous(true))
		} else {
			attrs = append(attrs, semconv.MessagingDestinationName(m.To))
			name = spanName(op, m.To)
		}
		if o.system == defaultSystem {
			attrs = append(attrs, semconv.MessagingRabbitMQDestinationRoutingKey(m.To))
		}
		ctx, span = o.tracer.Start(ctx, name, trace.WithSpanKind(trace.SpanKindProducer), trace.WithAttributes(attrs...))
	}
	o.prop.Inject(ctx, propagation.MapCarrier(m.Headers))
	return func(err error) {
		if err == nil {
			o.m.results.Add(ctx, 1, o.opts.get(optKey{metric: keyResults, a: status}, func() []attribute.KeyValue {
				return []attribute.KeyValue{AttrResultStatus.String(status)}
			}))
		}
		if span == nil {
			return
		}
		if err != nil {
			span.SetAttributes(semconv.ErrorTypeKey.String(errorTypePublish))
			span.SetStatus(codes.Error, err.Error())
		}
		span.End()
	}
}

// Settling times one settlement as a "settle" client span, a child of the
// delivery's span.
func (o *Observer) Settling(ctx context.Context, d *queue.Delivery, s queue.Settlement) func(error) {
	if !o.tracing {
		return nopEnd
	}
	op := o.settleOperation(s.Action)
	attrs := []attribute.KeyValue{
		semconv.MessagingSystemKey.String(o.system),
		semconv.MessagingDestinationName(o.queue),
		semconv.MessagingOperationTypeSettle,
		semconv.MessagingOperationName(op),
		AttrSettleAction.String(action(s.Action)),
	}
	if d.ID != "" {
		attrs = append(attrs, semconv.MessagingMessageID(d.ID))
	}
	if s.Reason != "" {
		attrs = append(attrs, AttrSettleReason.String(s.Reason))
	}
	_, span := o.tracer.Start(ctx, spanName(op, o.queue), trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(attrs...))
	return func(err error) {
		if err != nil {
			t := errorTypeSettle
			if errors.Is(err, queue.ErrStale) {
				t = errorTypeStale
			}
			span.SetAttributes(semconv.ErrorTypeKey.String(t))
			span.SetStatus(codes.Error, err.Error())
		}
		span.End()
	}
}

// Done counts the settlement and ends the delivery's span with what became
// of it: action, reason, model, tokens and, for a failure, its class.
func (o *Observer) Done(ctx context.Context, d *queue.Delivery, out worker.Outcome) {
	act, reason := action(out.Settlement.Action), out.Settlement.Reason
	// In flight drops last: a reader that sees it back to 0 sees every
	// counter of the deliveries that left (a test once read it between).
	defer o.m.inFlight.Add(ctx, -1, o.queueAttr)
	// A request that was answered, not one handed back (requeued) to run
	// again: the producer's wait ends here.
	if !d.EnqueuedAt.IsZero() && out.Settlement.Action != queue.Requeue {
		res := resolution(d.EnqueuedResolution)
		o.m.requestTime.Record(ctx, max(0, time.Since(d.EnqueuedAt)).Seconds(), o.opts.get(optKey{metric: keyRequestTime, a: out.Model, b: res}, func() []attribute.KeyValue {
			return []attribute.KeyValue{genai.GenAIRequestModel(out.Model), AttrTimeResolution.String(res)}
		}))
	}
	if out.Lane != "" {
		lane := o.opts.get(optKey{metric: keyLane, a: out.Lane}, func() []attribute.KeyValue {
			return []attribute.KeyValue{AttrLane.String(out.Lane)}
		})
		if out.Settlement.Action != queue.Requeue {
			o.m.laneServed.Add(ctx, 1, lane)
			o.m.laneWait.Record(ctx, out.Wait.Seconds(), lane)
		}
		if reason == wire.ReasonExpired && out.Settlement.Action == queue.DeadLetter {
			o.m.laneMissed.Add(ctx, 1, lane)
		}
	}
	o.m.settled.Add(ctx, 1, o.opts.get(optKey{metric: keySettled, a: act, b: reason}, func() []attribute.KeyValue {
		return []attribute.KeyValue{AttrQueue.String(o.queue), AttrSettleAction.String(act), AttrSettleReason.String(reason)}
	}))
	if out.Settlement.Action == queue.DeadLetter {
		o.m.deadLetters.Add(ctx, 1, o.opts.get(optKey{metric: keyDeadLetters, a: reason}, func() []attribute.KeyValue {
			return []attribute.KeyValue{AttrQueue.String(o.queue), AttrSettleReason.String(reason)}
		}))
	}
	span := trace.SpanFromContext(ctx)
	if !span.IsRecording() {
		return
	}
	attrs := []attribute.KeyValue{AttrSettleAction.String(act)}
	if reason != "" {
		attrs = append(attrs, AttrSettleReason.String(reason))
	}
	if out.Model != "" {
		attrs = append(attrs, operationName(out.Kind), genai.GenAIRequestModel(out.Model))
	}
	if out.Usage != (inference.Usage{}) {
		attrs = append(attrs, genai.GenAIUsageInputTokens(out.Usage.InputTokens), genai.GenAIUsageOutputTokens(out.Usage.OutputTokens))
	}
	failed := out.Settlement.Action == queue.DeadLetter ||
		out.Settlement.Action == queue.Requeue && reason != reasonShutdown
	if failed {
		attrs = append(attrs, semconv.ErrorTypeKey.String(reason))
		if out.Err != nil {
			attrs = append(attrs, AttrErrorClass.String(errorClass(out.Err)))
		}
		desc := reason
		if out.Settlement.Description != "" {
			desc += ": " + out.Settlement.Description
		}
		span.SetStatus(codes.Error, desc)
	}
	span.SetAttributes(attrs...)
	span.End()
}

// FirstToken records a streamed request's time to first token
// (worker.FirstTokenObserver).
func (o *Observer) FirstToken(ctx context.Context, model string, ttft time.Duration) {
	o.m.firstToken.Record(ctx, ttft.Seconds(), o.opts.get(optKey{metric: keyFirstToken, a: model}, func() []attribute.KeyValue {
		return []attribute.KeyValue{genai.GenAIRequestModel(model)}
	}))
}

// resolution names how precise an enqueue timestamp is, for the
// sous.time.resolution attribute: ms, s, or unknown.
func resolution(d time.Duration) string {
	switch {
	case d <= 0:
		return "unknown"
	case d < time.Second:
		return "ms"
	}
	return "s"
}

// EngineHealth feeds the sous.engine.up gauge.
func (o *Observer) EngineHealth(err error) {
	if err == nil {
		o.engineUp.Store(1)
	} else {
		o.engineUp.Store(0)
	}
}

func nopEnd(error) {}

// spanName follows the messaging convention "{operation} {destination}".
func spanName(op, destination string) string {
	if destination == "" {
		return op
	}
	return op + " " + destination
}

func temporary(to string) bool { return strings.HasPrefix(to, replyToPrefix) }

// operationName maps a request kind to gen_ai.operation.name.
func operationName(k inference.Kind) attribute.KeyValue {
	switch k {
	case inference.Chat:
		return genai.GenAIOperationNameChat
	case inference.Embed:
		return genai.GenAIOperationNameEmbeddings
	default:
		return genai.GenAIOperationNameTextCompletion
	}
}

// action names a settlement action in attribute values.
func action(a queue.Action) string {
	switch a {
	case queue.Ack:
		return "ack"
	case queue.Requeue:
		return "requeue"
	case queue.DeadLetter:
		return "dead_letter"
	default:
		return "unknown"
	}
}

// settleOperation is messaging.operation.name for a settlement: the
// broker's own word for it.
func (o *Observer) settleOperation(a queue.Action) string {
	if o.system == semconv.MessagingSystemServiceBus.Value.AsString() {
		switch a {
		case queue.Ack:
			return "complete"
		case queue.Requeue:
			return "abandon"
		}
		return "dead_letter"
	}
	switch a {
	case queue.Ack:
		return "ack"
	case queue.Requeue:
		return "nack"
	}
	return "dead_letter"
}

// errorClass is input for bad requests, else the engine error's kind.
func errorClass(err error) string {
	var in *wire.InputError
	if errors.As(err, &in) {
		return classInput
	}
	return inference.KindOf(err).String()
}
