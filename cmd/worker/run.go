package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/sous-run/sous/internal/inference/ollama"
	"github.com/sous-run/sous/internal/inference/openai"
	"github.com/sous-run/sous/internal/lanes"
	"github.com/sous-run/sous/internal/queue/rabbitmq"
	"github.com/sous-run/sous/internal/queue/servicebus"
	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/sizing"
	"github.com/sous-run/sous/internal/supervisor"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

// run builds the parts, runs the worker until ctx is cancelled, then shuts
// down in stages: drain the worker, close the broker, stop the HTTP server.
func run(ctx context.Context, cfg Config, log *slog.Logger) error {
	// An engine URL may carry a password (basic auth in front of the
	// engine): log it redacted, like the broker's.
	log.Info("starting", "broker", cfg.Broker, "queue", cfg.Queue, "lanes", laneList(cfg), "engine", cfg.Engine, "engine_url", secret.URL(cfg.EngineURL), "model", cfg.Model, brokerLogKey(cfg), brokerLogValue(cfg))

	// Deferred calls run last-in first-out: the worker drains, then the
	// broker closes, then the engine this worker owns stops, then telemetry
	// flushes and the HTTP server stops.
	sizer, stopSizer, err := startSizer(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer stopSizer()
	tel, err := startTelemetry(ctx, cfg, sizer.Snapshot, log)
	if err != nil {
		return err
	}
	defer tel.close(log) // after the drain: flushes the last spans

	// /healthz answers from the start, so a liveness probe does not kill a
	// pod that is still loading its model; /readyz says "starting" until the
	// worker runs.
	ready := &lateReadiness{}
	srv, err := startHTTP(cfg, ready, tel.metrics, log)
	if err != nil {
		return err
	}
	if srv != nil {
		defer func() {
			shutCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(shutCtx)
		}()
	}

	engine, stopEngine, err := startEngine(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer stopEngine()
	if cfg.BatchConcurrency > 0 {
		log.Warn("SOUS_BATCH_CONCURRENCY has no effect any more: requests go to the engine continuously, up to the in-flight limit; unset it")
	}
	defer engineSlots(ctx, cfg, engine, sizer.Sizer, log)()

	// Start with the prefetch the worker will ask for, so the first
	// requests do not restart the consumer.
	prefetch := worker.Capacity(sizer.Size())
	wlanes, closeBrokers, err := openLanes(ctx, cfg, prefetch, tel.obs.BrokerReconnected, log)
	if err != nil {
		return fmt.Errorf("broker: %w", err)
	}
	defer closeBrokers()

	w := worker.NewLanes(worker.Config{
		WorkerID:     cfg.WorkerID,
		ResultsQueue: cfg.ResultsQueue,
		Limits: wire.Limits{
			MaxBodyBytes:   cfg.MaxBodyBytes,
			MaxPromptBytes: cfg.MaxPromptBytes,
			MaxNumPredict:  cfg.MaxNumPredict,
			DefaultModel:   cfg.Model,
			AllowedModels:  allowedModels(cfg),
		},
		MaxAttempts:     cfg.MaxAttempts,
		BatchWait:       cfg.BatchWait,
		EngineTimeout:   cfg.EngineTimeout,
		MaxWait:         cfg.maxWait(),
		DrainTimeout:    cfg.DrainTimeout,
		RetryBackoff:    cfg.RetryBackoff,
		RetryBackoffMax: cfg.RetryBackoffMax,
		StreamInterval:  cfg.StreamInterval,
		StreamBytes:     cfg.StreamBytes,
		Observer:        tel.obs,
	}, wlanes, engine, sizer, log)
	sizer.OnChange(w.SizeChanged)
	if err := tel.obs.ObserveLanes(w.LaneStats); err != nil {
		return err
	}

	// Reports for the work-aware scaler (report.go).
	defer startReports(ctx, cfg, w, sizer.Size, log)()
	// Producers' cancellations (cancel.go): a cancelled batch's lines.
	defer startCancels(ctx, cfg, w, log)()

	// Busy-aware scale-in (podcost.go); a no-op outside Kubernetes.
	defer startPodCost(ctx, cfg.PodCost, w.InFlight, log)()

	ready.set(w)
	httpAddr := "off"
	if srv != nil {
		httpAddr = srv.addr // the bound address: SOUS_HTTP_ADDR=:0 logs the real port
	}
	log.Info("ready to work", "http_addr", httpAddr)
	runErr := w.Run(ctx)
	log.Info("stopped")
	return runErr
}

// brokerLogKey and brokerLogValue say where the broker is, for the start
// log line: the RabbitMQ URL with its password masked, or the Service Bus
// namespace (a connection string is a secret whole; only its endpoint is
// shown).
func brokerLogKey(cfg Config) string {
	if cfg.Broker == "servicebus" {
		return "servicebus_namespace"
	}
	return "amqp_url"
}

func brokerLogValue(cfg Config) string {
	if cfg.Broker != "servicebus" {
		return secret.URL(cfg.AMQPURL.Reveal())
	}
	if cfg.ServiceBusNamespace != "" {
		return cfg.ServiceBusNamespace
	}
	for _, part := range strings.Split(cfg.ServiceBusConnectionString.Reveal(), ";") {
		if v, ok := strings.CutPrefix(part, "Endpoint="); ok {
			return secret.URL(v)
		}
	}
	return "(from the connection string)"
}

// lateReadiness is not ready until the worker exists.
type lateReadiness struct{ r atomic.Pointer[readiness] }

func (l *lateReadiness) set(r readiness) { l.r.Store(&r) }

func (l *lateReadiness) Ready(ctx context.Context) error {
	r := l.r.Load()
	if r == nil {
		return errors.New("starting: the engine and the broker are not up yet")
	}
	return (*r).Ready(ctx)
}

// slotser is an engine that can say how many requests it runs at once.
type slotser interface {
	Slots(ctx context.Context) (n int, source string, err error)
}

// engineSlots sets the sizer's engine slots with SOUS_ENGINE_PARALLEL=auto:
// what the engine says (llama.cpp /props, TGI /info); else, for an engine
// that shows its running and waiting requests (vLLM /metrics), slots
// adapted to keep its wait queue short; else the default. It logs which is
// in force. stop ends the adapting, if any.
func engineSlots(ctx context.Context, cfg Config, engine worker.Engine, sizer *sizing.Sizer, log *slog.Logger) (stop func()) {
	stop = func() {}
	if n, _ := cfg.engineParallel(); n > 0 {
		log.Info("engine slots", "slots", n, "source", "SOUS_ENGINE_PARALLEL")
		return stop
	}
	if n, err := strconv.Atoi(cfg.OllamaNumParallel); err == nil && n > 0 && cfg.EngineExec != "" && cfg.Engine == "ollama" {
		// The child Ollama inherits this environment: its slots are known.
		sizer.SetEngineParallel(n)
		log.Info("engine slots", "slots", n, "source", "OLLAMA_NUM_PARALLEL of the child engine")
		return stop
	}
	if s, ok := unwrapEngine(engine).(slotser); ok {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		n, src, err := s.Slots(sctx)
		cancel()
		switch {
		case err != nil:
			log.Warn("could not ask the engine for its slots", "err", err, "using", cfg.fixedParallel())
		case n > 0:
			sizer.SetEngineParallel(n)
			log.Info("engine slots", "slots", n, "source", src)
			return stop
		}
	}
	if q, ok := unwrapEngine(engine).(sizing.QueueReader); ok {
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, _, shows, err := q.Queue(qctx)
		cancel()
		if err == nil && shows {
			a, err := sizing.NewAdapter(sizer, q, cfg.fixedParallel(), cfg.EngineQueueInterval)
			if err == nil {
				log.Info("engine slots", "slots", a.Slots(), "source", "adaptive: the engine's running/waiting gauges (/metrics), read every "+cfg.EngineQueueInterval.String()+"; sous_batch_limit on /metrics shows the limit in force")
				actx, cancel := context.WithCancel(ctx)
				done := make(chan struct{})
				go func() { defer close(done); _ = a.Run(actx) }()
				return func() { cancel(); <-done }
			}
		}
	}
	log.Info("engine slots", "slots", cfg.fixedParallel(), "source", "default (the engine does not say; set SOUS_ENGINE_PARALLEL to its parallel slots, e.g. Ollama's OLLAMA_NUM_PARALLEL)")
	return stop
}

// unwrapEngine returns the driver inside the wrappers run puts around it.
func unwrapEngine(e worker.Engine) worker.Engine {
	switch x := e.(type) {
	case supervisedEngine:
		return unwrapEngine(x.Engine)
	case openaiEngine:
		return x.Engine
	}
	return e
}

// allowedModels is SOUS_MODELS_ALLOWED, trimmed, with SOUS_MODEL always in
// it: a request that names no model gets SOUS_MODEL.
func allowedModels(cfg Config) []string {
	out := []string{cfg.Model}
	for _, m := range cfg.ModelsAllowed {
		if m = strings.TrimSpace(m); m != "" && !slices.Contains(out, m) {
			out = append(out, m)
		}
	}
	return out
}

// readyEngine is an engine with a readiness check of its own.
type readyEngine interface {
	worker.Engine
	Ping(ctx context.Context) error
	Load(ctx context.Context, model string) error
}

func newEngine(cfg Config) (readyEngine, error) {
	switch cfg.Engine {
	case "ollama":
		e, err := ollama.New(ollama.Config{URL: cfg.EngineURL, KeepAlive: cfg.EngineKeepAlive})
		if err != nil {
			return nil, bad("SOUS_ENGINE_URL", "%v", err)
		}
		return e, nil
	case "openai":
		e, err := openai.New(openai.Config{URL: cfg.EngineURL, APIKey: cfg.EngineAPIKey, BatchPrompts: cfg.EngineBatchPrompts})
		if err != nil {
			return nil, bad("SOUS_ENGINE_URL", "%v", err)
		}
		return openaiEngine{e}, nil
	}
	return nil, bad("SOUS_ENGINE", "unknown engine %q", cfg.Engine)
}

// openaiEngine has no way to preload a model: OpenAI-compatible servers
// load theirs at start.
type openaiEngine struct{ *openai.Engine }

func (openaiEngine) Load(context.Context, string) error { return nil }

// supervisedEngine is ready when the supervisor says so: the child engine
// runs and has the model loaded.
type supervisedEngine struct {
	worker.Engine
	sup *supervisor.Supervisor
}

func (e supervisedEngine) Ready(ctx context.Context) error { return e.sup.Ready(ctx) }

// startEngine returns the engine, started as a child process first when
// SOUS_ENGINE_EXEC is set. stop stops that child; it is a no-op otherwise.
func startEngine(ctx context.Context, cfg Config, log *slog.Logger) (worker.Engine, func(), error) {
	e, err := newEngine(cfg)
	if err != nil {
		return nil, nil, err
	}
	if cfg.EngineExec == "" {
		return e, func() {}, nil
	}
	sup := supervisor.New(supervisor.Config{
		Command:      strings.Fields(cfg.EngineExec),
		Model:        cfg.Model,
		StartTimeout: cfg.EngineStartTimeout,
	}, e, log)
	log.Info("starting the engine as a child process", "command", cfg.EngineExec)
	startCtx, cancel := context.WithTimeout(ctx, cfg.EngineStartTimeout)
	defer cancel()
	if err := sup.Start(startCtx); err != nil {
		sup.Stop()
		return nil, nil, fmt.Errorf("engine: %w", err)
	}
	return supervisedEngine{Engine: e, sup: sup}, sup.Stop, nil
}

// brokerDriver is what run needs of a queue driver beyond the worker's
// Broker: a readiness check.
type brokerDriver interface {
	worker.Broker
	Ready(ctx context.Context) error
}

// laneList says the lanes for the start log line: name=queue(share), or
// "off" without SOUS_LANES.
func laneList(cfg Config) string {
	if cfg.Lanes == "" {
		return "off"
	}
	parts := make([]string, len(cfg.lanes))
	for i, l := range cfg.lanes {
		parts[i] = fmt.Sprintf("%s=%s(share %.2f)", l.Name, l.Queue, l.Share)
	}
	return strings.Join(parts, ",")
}

// openLanes opens one driver per lane, each on its own connection (a
// lane's consumer, prefetch and pauses are its own), and returns them
// highest rank first with a function that closes them all.
func openLanes(ctx context.Context, cfg Config, prefetch int, onReconnect func(), log *slog.Logger) ([]worker.Lane, func(), error) {
	var out []worker.Lane
	var closers []func()
	closeAll := func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	for _, l := range cfg.lanes {
		b, closeB, err := openBroker(ctx, cfg, l, prefetch, onReconnect, log)
		if err != nil {
			closeAll()
			if len(cfg.lanes) > 1 {
				return nil, nil, fmt.Errorf("lane %s (queue %s): %w", l.Name, l.Queue, err)
			}
			return nil, nil, err
		}
		out = append(out, worker.Lane{Name: l.Name, Share: l.Share, Broker: b, Queue: l.Queue, Window: l.Window})
		closers = append(closers, closeB)
	}
	return out, closeAll, nil
}

// openBroker opens the driver of lane l. onReconnect is called after each
// RabbitMQ reconnect.
func openBroker(ctx context.Context, cfg Config, l lanes.Lane, prefetch int, onReconnect func(), log *slog.Logger) (brokerDriver, func(), error) {
	connectCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	switch cfg.Broker {
	case "servicebus":
		d, err := servicebus.New(connectCtx, servicebus.Config{
			ConnectionString:  cfg.ServiceBusConnectionString,
			Namespace:         cfg.ServiceBusNamespace,
			Queue:             l.Queue,
			DeadLetterQueue:   cfg.ServiceBusDeadLetterQueue,
			LockRenewInterval: cfg.ServiceBusLockRenew,
			MaxSenders:        cfg.ServiceBusMaxSenders,
		}, log)
		if err != nil {
			return nil, nil, err
		}
		return d, func() {
			closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = d.Close(closeCtx)
		}, nil
	default:
		tlsCfg, err := cfg.amqp().TLS()
		if err != nil {
			return nil, nil, err
		}
		d, err := rabbitmq.Open(connectCtx, rabbitmq.Config{
			URL:             cfg.AMQPURL,
			TLS:             tlsCfg,
			Queue:           l.Queue,
			DeadLetterQueue: cfg.laneDeadLetterQueue(l),
			Declare:         cfg.Declare,
			ExtraQueues:     []string{cfg.ResultsQueue},
			DeliveryLimit:   cfg.MaxAttempts,
			Prefetch:        prefetch,
			Heartbeat:       cfg.AMQPHeartbeat,
			ConnectionName:  connectionName(cfg, l),
			Consume:         true,
			OnReconnect:     onReconnect,
		}, log)
		if errors.Is(err, rabbitmq.ErrAccessRefused) {
			// Configuration, like any invalid variable: exit 2.
			return nil, nil, bad("SOUS_AMQP_URL", "%v", err)
		}
		if err != nil {
			return nil, nil, err
		}
		return d, func() { _ = d.Close() }, nil
	}
}

// readiness is what /readyz asks.
type readiness interface {
	Ready(ctx context.Context) error
}

// httpServer is the probe and metrics server, with the address it bound.
type httpServer struct {
	*http.Server
	addr string // host:port as bound: the real port when SOUS_HTTP_ADDR asks for port 0
}

// startHTTP serves the probes and, when metrics is not nil, GET /metrics.
// It returns nil when SOUS_HTTP_ADDR is off.
func startHTTP(cfg Config, r readiness, metrics http.Handler, log *slog.Logger) (*httpServer, error) {
	if cfg.HTTPAddr == "" || cfg.HTTPAddr == "off" {
		return nil, nil
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, req *http.Request) {
		ctx, cancel := context.WithTimeout(req.Context(), 2*time.Second)
		defer cancel()
		if err := r.Ready(ctx); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	if metrics != nil {
		mux.Handle("GET /metrics", metrics)
	}
	if cfg.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	ln, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		return nil, bad("SOUS_HTTP_ADDR", "cannot listen on %s: %v", cfg.HTTPAddr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("http server", "err", err)
		}
	}()
	return &httpServer{Server: srv, addr: ln.Addr().String()}, nil
}

// connectionName names a lane's AMQP connection in the management UI.
func connectionName(cfg Config, l lanes.Lane) string {
	if len(cfg.lanes) > 1 {
		return "sous-worker " + cfg.WorkerID + " " + l.Name
	}
	return "sous-worker " + cfg.WorkerID
}
