package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/ollamatest"
)

// TestMakeSaysItBuildsOllama: the first `make` announces the dev Ollama's
// build, and how long it takes, before it starts (a dry run of make).
func TestMakeSaysItBuildsOllama(t *testing.T) {
	t.Parallel()
	cmd := exec.Command("make", "-n", "ollama", "CACHE="+t.TempDir())
	cmd.Dir = ".."
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make -n ollama: %v\n%s", err, out)
	}
	text := string(out)
	announce := strings.Index(text, "building the dev Ollama")
	install := strings.Index(text, "go install github.com/ollama/ollama@")
	if announce < 0 || install < 0 || announce > install || !strings.Contains(text[:install], "about 5 minutes") {
		t.Errorf("make does not say what it builds and how long it takes before it starts:\n%s", text)
	}
}

// TestDemoCleansUp runs scripts/demo.sh, as `make demo` does, with the
// worker and sousctl TestMain built and on queues of its own, and checks that it removes what it made: its request queue, its
// results queue and the dead-letter queue holding the demo's bad request.
func TestDemoCleansUp(t *testing.T) {
	t.Parallel()
	q, results := names(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := ollamatest.Binary()
	if err != nil {
		t.Fatal(err)
	}
	if bin, err = filepath.Abs(bin); err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, "scripts/demo.sh")
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "SOUS_QUEUE="+q, "SOUS_RESULTS_QUEUE="+results, "SOUS_OLLAMA_BIN="+bin, "SOUS_AMQP_URL="+brokerURL, "BIN_DIR="+binDir)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("demo: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	out := stdout.String()
	for _, want := range []string{
		"removing the queues the demo made",
		fmt.Sprintf("deleted %s.dlq (1 message(s))", q),
		"deleted " + q + " (0 message(s))",
		"deleted " + results + " ",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for _, name := range []string{q, q + ".dlq", results} {
		ch, err := conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		_, err = ch.QueueDeclarePassive(name, false, false, false, false, nil)
		var aerr *amqp.Error
		if !errors.As(err, &aerr) || aerr.Code != amqp.NotFound {
			t.Errorf("queue %s still exists after the demo (%v)", name, err)
			_ = ch.Close()
		}
	}
}
