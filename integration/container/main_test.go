package container

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/containertest"
	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/integration/ollamatest"
)

var (
	brokerURL = "amqp://guest:guest@127.0.0.1:5672/"
	ollama    *ollamatest.Server
	queues    itest.Queues
	seq       atomic.Int64
)

func TestMain(m *testing.M) { os.Exit(testMain(m)) }

func testMain(m *testing.M) int {
	// A cold image build (debootstrap, the Go build in the build stage) takes
	// minutes on a busy machine; later runs reuse what docker keeps.
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Minute)
	defer cancel()
	if err := containertest.Init(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if why := containertest.Unavailable(); why != "" {
		fmt.Fprintln(os.Stderr, "container tests:", why)
		return m.Run() // each test skips (or fails in CI) with the reason
	}
	if u := os.Getenv("RABBITMQ_URL"); u != "" {
		brokerURL = u
	}
	var err error
	ollama, err = ollamatest.Start(ctx, ollamatest.Options{NumParallel: 4})
	if err != nil {
		fmt.Fprintln(os.Stderr, "start the dev Ollama:", err)
		return 1
	}
	defer ollama.Stop(context.Background())
	code := m.Run()
	queues.Delete(brokerURL)
	return code
}

// names returns a fresh queue name for one test, deleted after the run.
func names(t *testing.T) (requests, results string) {
	base := fmt.Sprintf("sous-ct-%s-%d-%d", strings.ReplaceAll(t.Name(), "/", "-"), os.Getpid(), seq.Add(1))
	queues.Add(base, base+".dlq", base+".results")
	return base, base + ".results"
}

// dial connects to url, closed in t.Cleanup.
func dial(t *testing.T, url string) *amqp.Connection {
	t.Helper()
	conn, err := amqp.Dial(url)
	if err != nil {
		t.Fatalf("connect to RabbitMQ at %s: %v", url, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}
