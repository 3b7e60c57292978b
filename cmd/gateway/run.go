package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/sous-run/sous/internal/gateway"
	"github.com/sous-run/sous/internal/gateway/batchstore"
	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/telemetry"
)

// run serves until ctx is done (SIGTERM), then drains: the listener
// closes, /readyz fails, open requests and streams get SOUS_DRAIN_TIMEOUT
// to finish, then the rest are cut and the broker connection closes.
func run(ctx context.Context, cfg Config, log *slog.Logger) error {
	var keys *gateway.Keys
	if cfg.KeysFile == "" {
		log.Warn("SOUS_GATEWAY_KEYS_FILE is not set: ANYONE WHO REACHES THE GATEWAY CAN USE IT. Set it to a file of \"<name> <sha256 of the key>\" lines")
	} else {
		var err error
		if keys, err = gateway.LoadKeys(cfg.KeysFile, cfg.Rate, cfg.laneNames(), log); err != nil {
			return bad("SOUS_GATEWAY_KEYS_FILE", "%v", err)
		}
		log.Info("API keys loaded", "keys", keys.Len())
	}
	var tlsCfg *tls.Config
	if cfg.Broker == "rabbitmq" {
		var err error
		if tlsCfg, err = cfg.amqp().TLS(); err != nil {
			return err
		}
	}
	tracer, closeTracer := startTracing(ctx, cfg, log)
	defer closeTracer()
	meter, metricsHandler, closeMetrics, err := startMetrics(ctx, cfg)
	if err != nil {
		return err
	}
	defer closeMetrics()
	if !cfg.otelDisabled() {
		// The SDK reports export failures here; keep them in the log.
		otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) { log.Warn("opentelemetry", "err", err) }))
	}
	prom, otlp := cfg.metricReaders()
	log.Info("telemetry", "metrics_endpoint", prom, "metrics_otlp", otlp,
		"traces_otlp", !cfg.otelDisabled() && cfg.OTelEndpoint+cfg.OTelTracesEndpoint != "" && cfg.OTelTracesExporter != "none")

	if cfg.WorkerLanes != "" && len(cfg.lanes) == 0 {
		log.Warn("SOUS_LANES (the workers' lanes) is set but SOUS_GATEWAY_LANES is not: every request goes to SOUS_QUEUE; set SOUS_GATEWAY_LANES to publish to the lanes' queues",
			"queue", cfg.Queue)
	}
	if cfg.Broker == "rabbitmq" && !cfg.Declare {
		if len(cfg.lanes) > 0 {
			log.Info("SOUS_DECLARE=false: the gateway does not declare the lanes' queues; until a lane's queue exists its requests are refused with 503",
				"lanes", cfg.Lanes)
		} else {
			log.Info("SOUS_DECLARE=false: the gateway does not declare the request queue; until it exists requests are refused with 503",
				"queue", cfg.Queue, "dead_letter_queue", cfg.DeadLetterQueue)
		}
	}
	var batches *gateway.BatchConfig
	switch {
	case cfg.batchOn():
		store, err := batchstore.Open(ctx, cfg.DatabaseURL.Reveal())
		if err != nil && !cfg.databaseSet {
			// The default, a file in the working directory, cannot be made
			// there (a read-only container): serve without the Batch API.
			log.Warn("the Batch API is off: its default store, a SQLite file in the working directory, cannot be opened; set SOUS_GATEWAY_DATABASE_URL (sqlite:PATH on a volume, or postgres://…), or off to silence this",
				"err", err)
			break
		}
		if err != nil {
			return bad("SOUS_GATEWAY_DATABASE_URL", "cannot open the Batch API's store: %v", secret.Scrub(err.Error(), cfg.DatabaseURL))
		}
		defer store.Close()
		host, _ := os.Hostname()
		batches = &gateway.BatchConfig{Store: store, Lane: cfg.batchLane(), ResultsQueue: cfg.BatchResultsQueue,
			MaxFileBytes: cfg.MaxFileBytes, MaxLines: cfg.BatchMaxLines, Outstanding: cfg.BatchOutstanding,
			UploadTimeout: cfg.UploadTimeout, CancelGrace: cfg.BatchCancelGrace,
			Holder: fmt.Sprintf("%s-%08x", host, rand.Uint32())}
		log.Info("Batch API on", "store", store.Driver(), "queue", batches.Lane.Queue, "results_queue", cfg.BatchResultsQueue)
		if store.Driver() == "sqlite" {
			log.Info("the Batch API keeps its state in a SQLite file: run ONE gateway replica, with the file on a volume; several replicas need SOUS_GATEWAY_DATABASE_URL=postgres://…")
		}
	case cfg.DatabaseURL.Reveal() != "off":
		log.Info("the Batch API needs RabbitMQ (its results come back on a queue every gateway replica consumes); it is off on Service Bus")
	}
	connectCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	broker, err := openBroker(connectCtx, cfg, tlsCfg, batches != nil, log)
	cancel()
	if err != nil {
		return fmt.Errorf("connect to the broker: %w", err) // a configError stays one: exit 2
	}
	defer broker.Close()

	if meter != nil {
		// Replies nobody waited for: the client had gone, or a duplicate.
		_, _ = meter.Int64ObservableCounter("sous.gateway.late_replies", metric.WithUnit("{message}"),
			metric.WithDescription("results and chunks dropped because their HTTP request had gone"),
			metric.WithInt64Callback(func(_ context.Context, o metric.Int64Observer) error {
				o.Observe(broker.LateReplies())
				return nil
			}))
	}
	watchCtx, stopWatch := context.WithCancel(context.Background())
	defer stopWatch()
	if keys != nil {
		go keys.Watch(watchCtx, cfg.KeysReload)
	}
	api := gateway.New(gateway.Config{
		Queue: cfg.Queue, Lanes: cfg.lanes, System: cfg.Broker, Model: cfg.Model, Models: allowedModels(cfg), Keys: keys,
		Timeout: cfg.Timeout, KeepAlive: cfg.KeepAlive, RetryAfter: cfg.RetryAfter, MaxOpen: cfg.MaxOpen,
		BodyTimeout: cfg.BodyTimeout, WriteTimeout: cfg.WriteTimeout, MaxIntake: cfg.MaxIntake,
		MaxBodyBytes: cfg.MaxBodyBytes, MaxPromptBytes: cfg.MaxPromptBytes, MaxNumPredict: cfg.MaxNumPredict,
		Tracer: tracer, Meter: meter, Batch: batches,
	}, broker, log)
	batchCtx, stopBatches := context.WithCancel(context.Background())
	batchesDone := make(chan struct{})
	go func() {
		defer close(batchesDone)
		if bb, ok := broker.(gateway.BatchBroker); ok && batches != nil {
			api.RunBatches(batchCtx, bb)
		}
	}()
	// After the HTTP drain: the batch work stops before the broker and
	// the store close (deferred above).
	defer func() {
		stopBatches()
		<-batchesDone
	}()

	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return bad("SOUS_GATEWAY_ADDR", "cannot listen on %s: %v", cfg.Addr, err)
	}
	ln = limitListener(ln, cfg.MaxConns)
	// Every phase of a connection is bounded: headers and idle time here,
	// the body and each write by the handler (see internal/gateway's
	// bounds.go). No ReadTimeout or WriteTimeout: a request may wait for
	// its answer as long as SOUS_GATEWAY_TIMEOUT.
	srv := &http.Server{Handler: api, ReadHeaderTimeout: cfg.HeaderTimeout, IdleTimeout: cfg.IdleTimeout,
		MaxHeaderBytes: cfg.MaxHeaderBytes, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	served := make(chan error, 1)
	go func() {
		if cfg.TLSCertFile != "" {
			served <- srv.ServeTLS(ln, cfg.TLSCertFile, cfg.TLSKeyFile)
		} else {
			served <- srv.Serve(ln)
		}
	}()
	draining := make(chan struct{})
	ops, err := startOps(cfg, broker, draining, metricsHandler, log)
	if err != nil {
		_ = srv.Close()
		return err
	}
	if len(cfg.lanes) > 0 {
		log.Info("gateway serving", "addr", ln.Addr().String(), "tls", cfg.TLSCertFile != "", "lanes", cfg.Lanes, "auth", keys != nil)
	} else {
		log.Info("gateway serving", "addr", ln.Addr().String(), "tls", cfg.TLSCertFile != "", "queue", cfg.Queue, "auth", keys != nil)
	}

	select {
	case err := <-served:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	close(draining)
	log.Info("draining: no new requests; open ones may finish", "within", cfg.DrainTimeout)
	drainCtx, cancelDrain := context.WithTimeout(context.Background(), cfg.DrainTimeout)
	defer cancelDrain()
	if err := srv.Shutdown(drainCtx); err != nil {
		log.Warn("drain time is up; cutting the requests still open", "err", err)
		_ = srv.Close()
	}
	if ops != nil {
		_ = ops.Close()
	}
	log.Info("gateway stopped")
	return nil
}

// broker is a gateway.Broker the gateway owns.
type broker interface {
	gateway.Broker
	LateReplies() int64
	Close() error
}

// openBroker connects to RabbitMQ (replies on direct reply-to) or to
// Service Bus (replies in sessions of SOUS_GATEWAY_REPLY_QUEUE).
func openBroker(ctx context.Context, cfg Config, tlsCfg *tls.Config, batches bool, log *slog.Logger) (broker, error) {
	if cfg.Broker == "servicebus" {
		host, _ := os.Hostname()
		if host == "" {
			host = "gateway"
		}
		sb, err := gateway.OpenServiceBus(ctx, gateway.ServiceBusConfig{
			ConnectionString: cfg.ServiceBusConnectionString, Namespace: cfg.ServiceBusNamespace,
			Queue: cfg.Queue, LaneQueues: laneQueues(cfg), ReplyQueue: cfg.ReplyQueue, Sessions: cfg.Channels,
			// Unique per process: a restarted gateway must not take over
			// sessions whose requests died with its predecessor.
			SessionPrefix: fmt.Sprintf("%s-%08x", host, rand.Uint32()),
		}, log)
		if err != nil {
			return nil, err
		}
		return sb, nil
	}
	results := ""
	if batches {
		results = cfg.BatchResultsQueue
	}
	a, err := gateway.OpenAMQP(ctx, gateway.AMQPConfig{
		URL: cfg.AMQPURL, TLS: tlsCfg, Queue: cfg.Queue, Channels: cfg.Channels, BatchResults: results,
		Heartbeat: cfg.AMQPHeartbeat, ConnectionName: "sous-gateway",
		Declare: cfg.Declare, DeadLetterQueue: cfg.DeadLetterQueue, DeliveryLimit: cfg.MaxAttempts, Lanes: amqpLanes(cfg),
	}, log)
	if errors.Is(err, gateway.ErrAccessRefused) {
		// Configuration, like any invalid variable: exit 2, as the worker.
		return nil, bad("SOUS_AMQP_URL", "%v", err)
	}
	if err != nil {
		return nil, err
	}
	return a, nil
}

// laneQueues are the lanes' queues, nil without lanes.
func laneQueues(cfg Config) []string {
	var out []string
	for _, l := range cfg.lanes {
		out = append(out, l.Queue)
	}
	return out
}

// amqpLanes are the lanes' queues with their dead-letter queues, nil
// without lanes.
func amqpLanes(cfg Config) []gateway.LaneQueue {
	var out []gateway.LaneQueue
	for _, l := range cfg.lanes {
		out = append(out, gateway.LaneQueue{Queue: l.Queue, DeadLetterQueue: cfg.laneDeadLetterQueue(l)})
	}
	return out
}

// startOps serves /healthz, /readyz and (when metrics is not nil)
// /metrics on SOUS_HTTP_ADDR.
func startOps(cfg Config, b gateway.Broker, draining <-chan struct{}, metrics http.Handler, log *slog.Logger) (*http.Server, error) {
	if cfg.HTTPAddr == "off" {
		return nil, nil
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-draining:
			http.Error(w, "not ready: draining", http.StatusServiceUnavailable)
			return
		default:
		}
		if err := b.Ready(r.Context()); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	if metrics != nil {
		mux.Handle("GET /metrics", metrics)
	}
	ln, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		return nil, bad("SOUS_HTTP_ADDR", "cannot listen on %s: %v", cfg.HTTPAddr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("ops http server", "err", err)
		}
	}()
	return srv, nil
}

// startMetrics makes the gateway's meter: read by Prometheus at
// GET /metrics and, with an OTLP endpoint, exported over OTLP every
// OTEL_METRIC_EXPORT_INTERVAL (default 60s), like the worker's.
// OTEL_SDK_DISABLED=true turns both off.
func startMetrics(ctx context.Context, cfg Config) (metric.Meter, http.Handler, func(), error) {
	prom, otlp := cfg.metricReaders()
	if !prom && !otlp {
		return nil, nil, func() {}, nil
	}
	var opts []sdkmetric.Option
	var handler http.Handler
	if prom {
		reader, h, err := telemetry.NewPrometheus(cfg.MetricsScopeLabels)
		if err != nil {
			return nil, nil, nil, err
		}
		opts = append(opts, sdkmetric.WithReader(reader))
		handler = h
	}
	if otlp {
		protocol := cfg.OTelMetricsProtocol
		if protocol == "" {
			protocol = cfg.OTelProtocol
		}
		exp, err := telemetry.NewMetricExporter(ctx, protocol)
		if err != nil {
			return nil, nil, nil, bad("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "%v", err)
		}
		opts = append(opts, sdkmetric.WithReader(sdkmetric.NewPeriodicReader(exp)))
	}
	res, _ := resource.New(ctx, resource.WithSchemaURL(semconv.SchemaURL),
		resource.WithAttributes(semconv.ServiceName(cfg.OTelServiceName)), resource.WithFromEnv(), resource.WithTelemetrySDK())
	if res != nil {
		opts = append(opts, sdkmetric.WithResource(res))
	}
	mp := sdkmetric.NewMeterProvider(opts...)
	return mp.Meter("github.com/sous-run/sous/internal/gateway"), handler, func() {
		// Flushes the last OTLP export.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = mp.Shutdown(ctx)
	}, nil
}

// startTracing returns the tracer of the gateway's producer spans. Spans
// are exported over OTLP when an endpoint is set; otherwise they are made
// but not sent, so that the trace still runs from the client's
// traceparent through the message to the worker.
func startTracing(ctx context.Context, cfg Config, log *slog.Logger) (trace.Tracer, func()) {
	if strings.EqualFold(strings.TrimSpace(cfg.OTelDisabled), "true") {
		return nil, func() {}
	}
	var opts []sdktrace.TracerProviderOption
	if cfg.OTelEndpoint+cfg.OTelTracesEndpoint != "" && cfg.OTelTracesExporter != "none" {
		protocol := cfg.OTelTracesProtocol
		if protocol == "" {
			protocol = cfg.OTelProtocol
		}
		exp, err := telemetry.NewSpanExporter(ctx, protocol)
		if err != nil {
			log.Warn("telemetry: spans are not exported", "err", err)
		} else {
			opts = append(opts, sdktrace.WithBatcher(exp))
		}
	}
	res, _ := resource.New(ctx, resource.WithSchemaURL(semconv.SchemaURL),
		resource.WithAttributes(semconv.ServiceName(cfg.OTelServiceName)), resource.WithFromEnv(), resource.WithTelemetrySDK())
	if res != nil {
		opts = append(opts, sdktrace.WithResource(res))
	}
	tp := sdktrace.NewTracerProvider(opts...)
	return tp.Tracer("github.com/sous-run/sous/internal/gateway", trace.WithSchemaURL(semconv.SchemaURL)), func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = tp.Shutdown(ctx)
	}
}
