// Command gateway is sous's OpenAI-compatible HTTP front door: it publishes
// each request durably to the request queue and answers from the results
// and streamed chunks that come back on RabbitMQ's direct reply-to or, with
// Azure Service Bus, in the gateway's sessions of a session-enabled reply
// queue.
// Configuration is environment variables only; see README.md.
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
	cfg, err := loadConfig(os.Environ())
	if err != nil {
		fmt.Fprintf(os.Stderr, "sous gateway: invalid configuration: %v\n", err)
		os.Exit(2)
	}
	log := newLogger(cfg, os.Stderr)
	warnUnknownEnv(log, os.Environ())
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, cfg, log); err != nil {
		log.Error("gateway stopped", "err", err)
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
	return slog.New(h)
}
