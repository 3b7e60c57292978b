package supervisor_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/inference/ollama"
	"github.com/sous-run/sous/internal/supervisor"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestSupervisesRealOllama runs the real dev Ollama as a child: ready only
// once the model is loaded, restarted after SIGKILL, stopped on Stop.
func TestSupervisesRealOllama(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// Make the models with the test helper, then let the supervisor serve them.
	serve, err := ollamatest.Prepare(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	addr := serve.Addr
	eng, err := ollama.New(ollama.Config{URL: "http://" + addr})
	if err != nil {
		t.Fatal(err)
	}
	s := supervisor.New(supervisor.Config{
		Command:    []string{serve.Bin, "serve"},
		Env:        serve.Env,
		Model:      ollamatest.ModelName,
		BackoffMin: 50 * time.Millisecond,
		Output:     io.Discard,
	}, eng, slog.New(slog.NewTextHandler(io.Discard, nil)))
	defer s.Stop()
	if err := s.Ready(ctx); err == nil {
		t.Fatal("ready before Start")
	}
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Ready(ctx); err != nil {
		t.Fatalf("not ready after Start: %v", err)
	}
	if !loaded(t, addr) {
		t.Fatal("model not preloaded: /api/ps lists nothing")
	}
	first := s.Pid()
	if err := syscall.Kill(first, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "restart", func() bool { return s.Restarts() == 1 && s.Ready(ctx) == nil && s.Pid() != first })
	if !loaded(t, addr) {
		t.Fatal("model not preloaded after the restart")
	}
	pid := s.Pid()
	s.Stop()
	s.Stop() // safe twice
	if err := syscall.Kill(pid, 0); err == nil {
		t.Fatalf("engine pid %d still alive after Stop", pid)
	}
	if s.Ready(ctx) == nil {
		t.Fatal("ready after Stop")
	}
}

func TestStartFailsClearly(t *testing.T) {
	s := supervisor.New(supervisor.Config{Command: []string{"/nonexistent/engine", "serve"}}, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err := s.Start(context.Background()); err == nil {
		t.Fatal("started a missing binary")
	}
	s.Stop()
	supervisor.New(supervisor.Config{}, nil, slog.New(slog.NewTextHandler(io.Discard, nil))).Stop() // before Start
}

func loaded(t *testing.T, addr string) bool {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/api/ps")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var ps struct {
		Models []struct {
			Name string `json:"name"`
		} `json:"models"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&ps); err != nil {
		t.Fatal(err)
	}
	return len(ps.Models) > 0 && ps.Models[0].Name == fmt.Sprint(ollamatest.ModelName, ":latest")
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
