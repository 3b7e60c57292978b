// Command scaler is sous's KEDA external scaler: it answers KEDA's
// ExternalScaler gRPC service with the seconds of work a fleet's queues
// hold, priced by what the workers measured (internal/scaler). Point a
// ScaledObject's external trigger at it (deploy/k8s/scaler).
// Configuration is environment variables only; see README.md.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"reflect"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/sous-run/sous/internal/brokerconfig"
	"github.com/sous-run/sous/internal/envcheck"
	"github.com/sous-run/sous/internal/fleet"
	"github.com/sous-run/sous/internal/scaler"
	"github.com/sous-run/sous/internal/scaler/externalscaler"
	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/telemetry"
)

// Config is everything the scaler reads from its environment; README.md
// lists it (a test checks).
type Config struct {
	// Addr is the gRPC address KEDA calls (SOUS_SCALER_ADDR).
	Addr string `env:"SOUS_SCALER_ADDR" envDefault:":9090"`
	// HTTPAddr serves /healthz and /readyz; "off" disables it.
	HTTPAddr     string       `env:"SOUS_HTTP_ADDR" envDefault:":8083"`
	Broker       string       `env:"SOUS_BROKER" envDefault:"rabbitmq"`
	AMQPURL      secret.Value `env:"SOUS_AMQP_URL" envDefault:"amqp://guest:guest@localhost:5672/"`
	AMQPURLFile  string       `env:"SOUS_AMQP_URL_FILE"`
	AMQPCAFile   string       `env:"SOUS_AMQP_CA_FILE"`
	AMQPCertFile string       `env:"SOUS_AMQP_CERT_FILE"`
	AMQPKeyFile  string       `env:"SOUS_AMQP_KEY_FILE"`
	// ManagementURL is RabbitMQ's management API, with a user that may
	// read the queues: depths then count the requests workers hold as
	// the broker sees them (SOUS_SCALER_MANAGEMENT_URL; unset: the
	// workers' reports say it).
	ManagementURL                  secret.Value `env:"SOUS_SCALER_MANAGEMENT_URL"`
	ManagementURLFile              string       `env:"SOUS_SCALER_MANAGEMENT_URL_FILE"`
	ServiceBusConnectionString     secret.Value `env:"SOUS_SERVICEBUS_CONNECTION_STRING"`
	ServiceBusConnectionStringFile string       `env:"SOUS_SERVICEBUS_CONNECTION_STRING_FILE"`
	ServiceBusNamespace            string       `env:"SOUS_SERVICEBUS_NAMESPACE"`
	// PriorSeconds is the seconds one replica spends per request of a
	// queue no worker has measured yet (SOUS_SCALER_PRIOR_SECONDS).
	PriorSeconds time.Duration `env:"SOUS_SCALER_PRIOR_SECONDS" envDefault:"1s"`
	// DeadlineMargin is how long before each deadline a producer states
	// (fleet.Demand: the Batch API's gateway) its work should be done:
	// time for pods to start, the HPA's scale-up policy and retried lines
	// (SOUS_SCALER_DEADLINE_MARGIN; default 30m, as docs/benchmarks.md's
	// simulation of it).
	DeadlineMargin time.Duration `env:"SOUS_SCALER_DEADLINE_MARGIN" envDefault:"30m"`
	LogLevel       string        `env:"SOUS_LOG_LEVEL" envDefault:"info"`
	LogFormat      string        `env:"SOUS_LOG_FORMAT" envDefault:"json"`
}

func loadConfig(environ []string) (Config, error) {
	var c Config
	if err := brokerconfig.Parse(&c, environ); err != nil {
		return c, err
	}
	if err := brokerconfig.ReadSecretFiles(
		brokerconfig.SecretFile{Var: "SOUS_AMQP_URL_FILE", Path: c.AMQPURLFile, Dst: &c.AMQPURL},
		brokerconfig.SecretFile{Var: "SOUS_SCALER_MANAGEMENT_URL_FILE", Path: c.ManagementURLFile, Dst: &c.ManagementURL},
		brokerconfig.SecretFile{Var: "SOUS_SERVICEBUS_CONNECTION_STRING_FILE", Path: c.ServiceBusConnectionStringFile, Dst: &c.ServiceBusConnectionString},
	); err != nil {
		return c, err
	}
	return c, c.validate()
}

func (c Config) amqp() brokerconfig.AMQP {
	return brokerconfig.AMQP{URL: c.AMQPURL, CAFile: c.AMQPCAFile, CertFile: c.AMQPCertFile, KeyFile: c.AMQPKeyFile, Heartbeat: 10 * time.Second}
}

func (c Config) validate() error {
	if _, _, err := net.SplitHostPort(c.Addr); err != nil {
		return brokerconfig.Bad("SOUS_SCALER_ADDR", "must be host:port or :port, such as :9090")
	}
	switch c.Broker {
	case "rabbitmq":
		if err := c.amqp().Check(); err != nil {
			return err
		}
	case "servicebus":
		if err := (brokerconfig.ServiceBus{ConnectionString: c.ServiceBusConnectionString, Namespace: c.ServiceBusNamespace}).Check(); err != nil {
			return err
		}
	default:
		return brokerconfig.Bad("SOUS_BROKER", "%q is not a broker sous knows; use rabbitmq or servicebus", c.Broker)
	}
	if m := c.ManagementURL.Reveal(); m != "" && !strings.HasPrefix(m, "http://") && !strings.HasPrefix(m, "https://") {
		return brokerconfig.Bad("SOUS_SCALER_MANAGEMENT_URL", "must be an http:// or https:// URL, such as http://user:password@rabbitmq:15672")
	}
	if c.PriorSeconds <= 0 {
		return brokerconfig.Bad("SOUS_SCALER_PRIOR_SECONDS", "must be a duration above 0, such as 1s: the seconds one replica spends per request before any worker has measured the queue")
	}
	if c.DeadlineMargin < 0 {
		return brokerconfig.Bad("SOUS_SCALER_DEADLINE_MARGIN", "must be a duration of at least 0, such as 30m: how long before a batch's deadline its work should be done")
	}
	var l slog.Level
	if err := l.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return brokerconfig.Bad("SOUS_LOG_LEVEL", "%q is not one of debug, info, warn, error", c.LogLevel)
	}
	if c.LogFormat != "json" && c.LogFormat != "text" {
		return brokerconfig.Bad("SOUS_LOG_FORMAT", "must be json or text")
	}
	return nil
}

func main() {
	cfg, err := loadConfig(os.Environ())
	if err != nil {
		fmt.Fprintf(os.Stderr, "sous scaler: invalid configuration: %v\n", err)
		os.Exit(2)
	}
	log := newLogger(cfg, os.Stderr)
	for _, u := range envcheck.Check(os.Environ(), envcheck.Tags(reflect.TypeFor[Config]())) {
		log.Warn("unknown SOUS_* variable, ignored; is it misspelled?", "var", u.Name, "did_you_mean", u.Closest)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, cfg, log); err != nil {
		log.Error("scaler stopped", "err", err)
		os.Exit(1)
	}
}

func newLogger(cfg Config, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	opts := &slog.HandlerOptions{Level: level, ReplaceAttr: telemetry.DurationText}
	var h slog.Handler = slog.NewJSONHandler(w, opts)
	if cfg.LogFormat == "text" {
		h = slog.NewTextHandler(w, opts)
	}
	return slog.New(h)
}

// run serves until ctx ends, then stops in stages: the gRPC server
// (gracefully, a few seconds), the reports consumer, the broker.
func run(ctx context.Context, cfg Config, log *slog.Logger) error {
	var (
		depth scaler.Depth
		view  *fleet.View
		ready = func(context.Context) error { return nil }
	)
	switch cfg.Broker {
	case "servicebus":
		sb, err := scaler.NewServiceBusDepth(cfg.ServiceBusConnectionString, cfg.ServiceBusNamespace)
		if err != nil {
			return err
		}
		depth, view = sb, fleet.NewView(nil)
		log.Info("starting", "addr", cfg.Addr, "broker", "servicebus", "prior", cfg.PriorSeconds,
			"note", "workers report on RabbitMQ only: Service Bus queues are priced at the prior")
	default:
		tlsCfg, err := cfg.amqp().TLS()
		if err != nil {
			return err
		}
		rabbit := scaler.NewRabbit(scaler.RabbitConfig{URL: cfg.AMQPURL, TLS: tlsCfg, ManagementURL: cfg.ManagementURL}, log)
		defer rabbit.Close()
		saved, err := rabbit.LoadState()
		if err != nil {
			log.Warn("could not read the last costs; queues no worker has measured are priced at the prior", "err", err, "prior", cfg.PriorSeconds)
		}
		depth, view = rabbit, fleet.NewView(saved)
		// Ready when the broker answers (a missing queue is an answer).
		ready = func(ctx context.Context) error {
			if _, _, err := rabbit.Depth(ctx, scaler.StateQueue); err != nil && !errors.Is(err, scaler.ErrNoQueue) {
				return err
			}
			return nil
		}
		log.Info("starting", "addr", cfg.Addr, "broker", "rabbitmq", "amqp_url", secret.URL(cfg.AMQPURL.Reveal()), "management", cfg.ManagementURL != "", "saved_costs", len(saved), "prior", cfg.PriorSeconds, "deadline_margin", cfg.DeadlineMargin)
		rctx, cancelReports := context.WithCancel(ctx)
		reportsDone := make(chan struct{})
		go func() { defer close(reportsDone); rabbit.Run(rctx, view) }()
		defer func() { cancelReports(); <-reportsDone }()
	}

	lis, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return fmt.Errorf("listen on %s (SOUS_SCALER_ADDR): %w", cfg.Addr, err)
	}
	// Bounds on what a client holds: KEDA's few connections, small
	// messages, idle streams kept alive by KEDA itself.
	srv := grpc.NewServer(grpc.MaxRecvMsgSize(1<<20), grpc.MaxConcurrentStreams(256), grpc.ConnectionTimeout(10*time.Second))
	externalscaler.RegisterExternalScalerServer(srv, scaler.New(scaler.Config{PriorCost: cfg.PriorSeconds.Seconds(), DeadlineMargin: cfg.DeadlineMargin}, view, depth, log))
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	log.Info("serving KEDA's external scaler", "addr", lis.Addr().String())

	var httpSrv *http.Server
	if cfg.HTTPAddr != "off" && cfg.HTTPAddr != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
		mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
			cctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
			defer cancel()
			if err := ready(cctx); err != nil {
				http.Error(w, "the broker does not answer", http.StatusServiceUnavailable)
				return
			}
			_, _ = w.Write([]byte("ready\n"))
		})
		httpSrv = &http.Server{Addr: cfg.HTTPAddr, Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second, IdleTimeout: 60 * time.Second, MaxHeaderBytes: 16 << 10}
		hl, err := net.Listen("tcp", cfg.HTTPAddr)
		if err != nil {
			srv.Stop()
			return fmt.Errorf("listen on %s (SOUS_HTTP_ADDR): %w", cfg.HTTPAddr, err)
		}
		go func() { _ = httpSrv.Serve(hl) }()
	}

	select {
	case <-ctx.Done():
	case err := <-served:
		return err
	}
	log.Info("stopping")
	hs.Shutdown()
	if httpSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = httpSrv.Shutdown(sctx)
		cancel()
	}
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		srv.Stop() // KEDA's streams do not end on their own
	}
	return nil
}
