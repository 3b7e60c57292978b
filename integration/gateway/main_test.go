package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/integration/ollamatest"
)

var (
	binDir    string
	ollama    *ollamatest.Server
	brokerURL = "amqp://guest:guest@127.0.0.1:5672/"
	queues    itest.Queues
	seq       atomic.Int64
)

func TestMain(m *testing.M) { os.Exit(testMain(m)) }

func testMain(m *testing.M) int {
	if u := os.Getenv("RABBITMQ_URL"); u != "" {
		brokerURL = u
	}
	// npm ci, a race build of two binaries and the dev Ollama, on a busy machine.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		fmt.Fprintf(os.Stderr, "connect to RabbitMQ at %s (`make rabbitmq` starts it): %v\n", brokerURL, err)
		return 1
	}
	conn.Close()
	if err := installClient(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	dir, err := os.MkdirTemp("", "sous-gw-it-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	binDir = dir
	build := exec.CommandContext(ctx, "go", "build", "-race", "-o", binDir, "../../cmd/worker", "../../cmd/gateway", "../../cmd/sousctl")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build binaries:", err)
		return 1
	}
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

// installClient runs `npm ci` in node/ when a pinned package is missing
// (package.json's dependencies: the OpenAI client and the agent frameworks).
func installClient(ctx context.Context) error {
	var pkg struct {
		Dependencies map[string]string `json:"dependencies"`
	}
	b, err := os.ReadFile(filepath.Join("node", "package.json"))
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, &pkg); err != nil {
		return fmt.Errorf("node/package.json: %w", err)
	}
	missing := false
	for name, version := range pkg.Dependencies {
		var got struct {
			Version string `json:"version"`
		}
		b, err := os.ReadFile(filepath.Join("node", "node_modules", name, "package.json"))
		if err != nil || json.Unmarshal(b, &got) != nil || got.Version != version {
			missing = true
		}
	}
	if !missing {
		return nil
	}
	if _, err := exec.LookPath("npm"); err != nil {
		return fmt.Errorf("npm is not installed; the gateway tests need Node.js and npm (apt-get install nodejs npm): %w", err)
	}
	cmd := exec.CommandContext(ctx, "npm", "ci", "--no-audit", "--no-fund")
	cmd.Dir = "node"
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("npm ci in integration/gateway/node: %v\n%s", err, out)
	}
	return nil
}

// queueName returns a fresh queue name for one test, deleted after the run.
func queueName(t *testing.T, suffix string) string {
	q := fmt.Sprintf("sous-gw-%s-%d-%d%s", strings.ReplaceAll(t.Name(), "/", "-"), os.Getpid(), seq.Add(1), suffix)
	queues.Add(q, q+".dlq", q+".results")
	return q
}
