package rabbitmq_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/internal/queue/queuetest"
	"github.com/sous-run/sous/internal/queue/rabbitmq"
	"github.com/sous-run/sous/internal/secret"
)

var (
	seq      atomic.Int64
	declared itest.Queues // deleted from the shared broker after the run
)

func brokerURL() string {
	if u := os.Getenv("RABBITMQ_URL"); u != "" {
		return u
	}
	return "amqp://guest:guest@127.0.0.1:5672/"
}

func open(t *testing.T, cfg rabbitmq.Config) *rabbitmq.Driver {
	t.Helper()
	return openWithLog(t, cfg, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
}

// openWithLog opens a driver on the test broker, declaring its queues, that
// logs to log; closed by t.Cleanup.
func openWithLog(t *testing.T, cfg rabbitmq.Config, log *slog.Logger) *rabbitmq.Driver {
	t.Helper()
	cfg.Declare = true
	return openAsIs(t, cfg, log)
}

// openAsIs is openWithLog with cfg.Declare as given.
func openAsIs(t *testing.T, cfg rabbitmq.Config, log *slog.Logger) *rabbitmq.Driver {
	t.Helper()
	if cfg.URL.IsZero() {
		cfg.URL = secret.Value(brokerURL())
	}
	declared.Add(cfg.Queue, cfg.DeadLetterQueue)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	d, err := rabbitmq.Open(ctx, cfg, log)
	if err != nil {
		t.Fatalf("open RabbitMQ (is it running? `rabbitmq-server -detached`): %v", err)
	}
	t.Cleanup(func() { _ = d.Close() })
	return d
}

func TestContract(t *testing.T) {
	t.Parallel()
	queuetest.Run(t, queuetest.Harness{
		Queue: func(t *testing.T) string {
			return fmt.Sprintf("sous-test-%s-%d-%d", strings.ReplaceAll(t.Name(), "/", "-"), time.Now().UnixNano(), seq.Add(1))
		},
		Open: func(t *testing.T, name string, prefetch int) queuetest.Driver {
			return open(t, rabbitmq.Config{Queue: name, DeadLetterQueue: name + ".dlq", Prefetch: prefetch, Consume: true, DeliveryLimit: 10})
		},
		OpenDeadLetters: func(t *testing.T, name string) queuetest.Driver {
			return open(t, rabbitmq.Config{Queue: name + ".dlq", DeadLetterQueue: name + ".dlq.dlq", Prefetch: 4, Consume: true})
		},
	})
}

func TestMain(m *testing.M) {
	code := m.Run()
	declared.Delete(brokerURL())
	os.Exit(code)
}
