// Command worker is the sous daemon: it drains a request queue, runs batches
// on the local inference engine and publishes the results. Configuration is
// environment variables only; see README.md.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/sous-run/sous/internal/telemetry"
)

func main() {
	if isHelp(os.Args[1:]) {
		printUsage(os.Stdout)
		return
	}
	if len(os.Args) > 1 {
		fmt.Fprintf(os.Stderr, "sous worker: unexpected argument %q: the worker takes no arguments, only SOUS_* environment variables (worker -h lists them)\n", os.Args[1])
		os.Exit(2)
	}
	cfg, err := loadConfig(os.Environ())
	if err != nil {
		fmt.Fprintf(os.Stderr, "sous worker: invalid configuration: %v\n(worker -h lists every variable with its default)\n", err)
		os.Exit(2)
	}
	log := newLogger(cfg, os.Stderr)
	warnUnknownEnv(log, os.Environ())
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, cfg, log); err != nil {
		log.Error("worker stopped", "err", err)
		var ce *configError
		if errors.As(err, &ce) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

func newLogger(cfg Config, w io.Writer) *slog.Logger {
	level, _ := parseLevel(cfg.LogLevel)
	opts := &slog.HandlerOptions{Level: level, ReplaceAttr: telemetry.DurationText}
	var h slog.Handler = slog.NewJSONHandler(w, opts)
	if cfg.LogFormat == "text" {
		h = slog.NewTextHandler(w, opts)
	}
	// Records logged with a context carry its trace_id and span_id.
	return slog.New(telemetry.LogHandler(h)).With("worker", cfg.WorkerID)
}
