package integration

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/wire"
)

// TestEngineExecSupervised: with SOUS_ENGINE_EXEC the worker runs the real
// Ollama as its own child. Killing the child mid-batch requeues the batch
// (not loss); the worker restarts the engine and answers the request on a
// later attempt; SIGTERM stops the child after the drain.
func TestEngineExecSupervised(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	serve, err := ollamatest.Prepare(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	q, _ := names(t)
	w := startWorker(t, q, append(serve.Env,
		"SOUS_ENGINE_EXEC="+serve.Bin+" serve", "SOUS_ENGINE_URL=http://"+serve.Addr,
		"SOUS_MODELS_ALLOWED=tiny,"+ollamatest.EndlessModelName, "SOUS_MAX_NUM_PREDICT=100000", "SOUS_STREAM_BYTES=1",
	)...)
	engine := childPid(t, w.Cmd.Process.Pid)
	if engine == 0 {
		t.Fatal("the worker runs no engine child")
	}
	c := newClient(t)
	replies := q + ".replies"
	c.declare(replies)
	c.publish(q, "long", replies, `{"prompt":"go on","model":"`+ollamatest.EndlessModelName+`","stream":true,"options":{"num_predict":3000}}`)
	// The first chunk proves the batch is running; then kill the engine.
	c.collect(replies, 1, 60*time.Second)
	if err := syscall.Kill(engine, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var final wire.Result
	var restarted bool
	waitUntil(t, 150*time.Second, "the final result after the restart", func() bool {
		for _, d := range drain(t, c, replies) {
			if d.Headers["x-sous-status"] != "chunk" {
				final = decodeResult(t, d)
				return true
			}
			var ch wire.Chunk
			if err := json.Unmarshal(d.Body, &ch); err != nil {
				t.Fatalf("chunk: %v", err)
			}
			if ch.Restart && ch.Seq == 0 && ch.Attempt >= 2 {
				restarted = true
			}
		}
		return false
	})
	if final.Status != wire.StatusOK || final.Attempt < 2 {
		t.Fatalf("final result %+v, want ok on attempt 2 or later", final)
	}
	if !restarted {
		t.Fatal("the redelivered stream did not start with a restart marker")
	}
	next := childPid(t, w.Cmd.Process.Pid)
	if next == 0 || next == engine {
		t.Fatalf("engine not restarted (old pid %d, now %d)", engine, next)
	}
	if err := w.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := w.ExitCode(t, 40*time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}
	if err := syscall.Kill(next, 0); err == nil {
		t.Fatalf("engine child %d outlived the worker", next)
	}
}

// childPid returns the first child process of pid, 0 when none.
func childPid(t *testing.T, pid int) int {
	t.Helper()
	tasks, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/children")
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, field := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(field); err == nil {
				return n
			}
		}
	}
	return 0
}
