package ollamatest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/tinymodel"
)

const (
	// ModelName is the tiny model: it ends a generation by itself after
	// about 30 tokens (see tinymodel.Options.Endless).
	ModelName = "tiny"
	// EndlessModelName is the same model with </s> unreachable: a generation
	// runs until num_predict or the context is full. For requests that must
	// still be running when a test kills the engine.
	EndlessModelName = "tiny-endless"
	// ScriptedModelName is the scripted model (tinymodel.WriteScriptedFile):
	// its answers are known exactly, e.g. tinymodel.SkyQuestion is answered
	// tinymodel.SkyAnswer at any temperature, and it can call a tool.
	ScriptedModelName = "tiny-scripted"
	// BinEnv names the variable that points at the ollama binary.
	BinEnv = "SOUS_OLLAMA_BIN"
)

// ErrNoBinary is returned (wrapped, with the path tried and the advice to
// run `make ollama`) when no ollama binary is found.
var ErrNoBinary = errors.New("no ollama binary")

// template renders every message, so that a chat's system and earlier
// turns reach the model (Ollama's default template keeps only the last
// prompt). Generate requests are rendered through it too: Ollama turns
// system and prompt into messages first.
const template = `{{ range .Messages }}{{ .Role }}: {{ .Content }}
{{ end }}assistant:`

// Timeouts for what the package does on its own.
const (
	// stopGrace bounds how long Stop and Restart wait for a graceful exit
	// after SIGTERM before they SIGKILL the group, whatever the context says.
	stopGrace = 10 * time.Second
	// startTimeout bounds StartT.
	startTimeout = 2 * time.Minute
	// pollInterval is how often readiness is checked.
	pollInterval = 50 * time.Millisecond
)

// Options configure a Server. The zero value is valid.
type Options struct {
	// Bin is the ollama binary. Default: $SOUS_OLLAMA_BIN, else
	// <repo root>/.cache/bin/ollama (repo root: the nearest directory above
	// the working directory that holds go.mod).
	Bin string
	// Dir holds the models (OLLAMA_MODELS), the server's HOME, the model
	// files and server.log. Default: a new temporary directory, which Stop
	// removes. A Dir given here is left in place.
	Dir string
	// Port on 127.0.0.1. Default 0: a free port, chosen once and kept by
	// Restart.
	Port int
	// NumParallel is OLLAMA_NUM_PARALLEL, the requests one loaded model
	// serves at once. Default 0 leaves it to Ollama (0.6.5 picks 4, or 1
	// when memory is short).
	NumParallel int
	// Threads is the models' num_thread (a Modelfile PARAMETER; a request's
	// options can override it). Default 0 means 1: for a model this small
	// one thread is fastest, and it does not collapse when other processes
	// compete for the cores, as llama.cpp's spinning thread pool does.
	// Negative leaves it to Ollama (one per physical core).
	Threads int
	// Aliases are more names for the tiny model ("ollama cp"), e.g. the
	// names a test's config allows.
	Aliases []string
	// Seed selects the tiny model's weights.
	Seed uint64
	// Env adds KEY=VALUE pairs to the server's environment, after the ones
	// this package sets (so they win), e.g. "OLLAMA_DEBUG=1". OLLAMA_*
	// variables of the calling process are not inherited.
	Env []string
	// Logger receives lifecycle events. Default: discard.
	Logger *slog.Logger
}

// Server is a running `ollama serve`. Create it with Start or StartT.
type Server struct {
	bin     string
	dir     string
	ownDir  bool
	addr    string // 127.0.0.1:port
	env     []string
	logPath string
	log     *slog.Logger
	client  *http.Client

	mu      sync.Mutex
	proc    *process // nil after Kill or Stop
	starts  int
	stopped bool
}

// process is one run of the server; done closes when it has exited.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // set before done closes
}

// Start launches the server, creates the models and returns once ModelName
// is loaded and answering. ctx bounds the start only; the server runs until
// Stop or Kill. The caller must call Stop.
func Start(ctx context.Context, opts Options) (_ *Server, err error) {
	bin, err := findBinary(opts.Bin)
	if err != nil {
		return nil, err
	}
	s := &Server{
		bin:    bin,
		dir:    opts.Dir,
		log:    opts.Logger,
		client: &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()},
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.dir == "" {
		if s.dir, err = os.MkdirTemp("", "ollamatest-"); err != nil {
			return nil, fmt.Errorf("ollamatest: %w", err)
		}
		s.ownDir = true
	} else if s.dir, err = filepath.Abs(s.dir); err != nil {
		// The Modelfile names the model file by path, read by the CLI.
		return nil, fmt.Errorf("ollamatest: %w", err)
	}
	defer func() {
		if err != nil {
			s.Kill()
			s.client.CloseIdleConnections()
			if s.ownDir {
				_ = os.RemoveAll(s.dir)
			}
		}
	}()

	port := opts.Port
	if port == 0 {
		if port, err = freePort(); err != nil {
			return nil, fmt.Errorf("ollamatest: %w", err)
		}
	}
	s.addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	s.logPath = filepath.Join(s.dir, "server.log")
	home := filepath.Join(s.dir, "home")
	models := filepath.Join(s.dir, "models")
	for _, d := range []string{home, models} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("ollamatest: %w", err)
		}
	}
	s.env = serverEnv(os.Environ(), s.addr, home, models, opts)

	if err := s.start(ctx); err != nil {
		return nil, err
	}
	if err := s.createModels(ctx, opts); err != nil {
		return nil, err
	}
	if err := s.preload(ctx); err != nil {
		return nil, err
	}
	s.log.Info("ollama ready", "url", s.URL(), "dir", s.dir, "pid", s.Pid())
	return s, nil
}

// StartT is Start for tests: it fails tb when the server cannot start, puts
// the server's files in tb.TempDir() (unless opts.Dir is set), stops it in
// tb.Cleanup and logs the tail of the server's log when tb has failed.
func StartT(tb testing.TB, opts Options) *Server {
	tb.Helper()
	if opts.Dir == "" {
		opts.Dir = tb.TempDir()
	}
	ctx, cancel := context.WithTimeout(tb.Context(), startTimeout)
	defer cancel()
	s, err := Start(ctx, opts)
	if err != nil {
		tb.Fatalf("start ollama: %v", err)
	}
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("ollama log (%s), tail:\n%s", s.logPath, s.logTail())
		}
		ctx, cancel := context.WithTimeout(context.Background(), stopGrace)
		defer cancel()
		if err := s.Stop(ctx); err != nil {
			tb.Errorf("stop ollama: %v", err)
		}
	})
	return s
}

// URL is the server's base URL, http://127.0.0.1:PORT, without a trailing
// slash. It stays the same across Restart.
func (s *Server) URL() string { return "http://" + s.addr }

// Model is the name of the tiny model, ModelName.
func (s *Server) Model() string { return ModelName }

// ScriptedModel is the name of the scripted model, ScriptedModelName.
func (s *Server) ScriptedModel() string { return ScriptedModelName }

// EndlessModel is the name of the model that never stops by itself,
// EndlessModelName.
func (s *Server) EndlessModel() string { return EndlessModelName }

// LogPath is the server's log file; each start appends to it.
func (s *Server) LogPath() string { return s.logPath }

// Pid is the server's process id (also its process group id), 0 when it
// is not running.
func (s *Server) Pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc == nil {
		return 0
	}
	return s.proc.cmd.Process.Pid
}

// Kill sends SIGKILL to the server's process group, as a crash would, and
// returns once the server has exited. Requests in flight fail; the models
// stay on disk for Restart. Safe when the server is not running.
func (s *Server) Kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.killLocked()
}

// Stop stops the server: SIGTERM to its process group, then SIGKILL when
// ctx is done or after a grace period. It removes the directory if Start
// made it. Safe to call twice; after Stop, Restart fails.
func (s *Server) Stop(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return nil
	}
	s.stopped = true
	s.terminateLocked(ctx)
	s.client.CloseIdleConnections()
	if s.ownDir {
		if err := os.RemoveAll(s.dir); err != nil {
			return fmt.Errorf("ollamatest: remove %s: %w", s.dir, err)
		}
	}
	s.log.Info("ollama stopped", "url", s.URL())
	return nil
}

// Restart stops the server if it runs (gracefully, as Stop does) and starts
// it again on the same port with the same models, returning once ModelName
// is loaded and answering. Use it after Kill to bring the engine back.
func (s *Server) Restart(ctx context.Context) error {
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return errors.New("ollamatest: restart after Stop")
	}
	s.terminateLocked(ctx)
	s.client.CloseIdleConnections()
	s.mu.Unlock()

	if err := s.start(ctx); err != nil {
		return err
	}
	if err := s.preload(ctx); err != nil {
		s.Kill()
		return err
	}
	s.log.Info("ollama restarted", "url", s.URL(), "pid", s.Pid())
	return nil
}

// start runs `ollama serve` and waits until it answers HTTP.
func (s *Server) start(ctx context.Context) error {
	p, err := s.spawn()
	if err != nil {
		return err
	}
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		if s.answers(ctx) {
			return nil
		}
		select {
		case <-ctx.Done():
			return s.failf("wait for %s to answer: %w", s.URL(), ctx.Err())
		case <-p.done:
			return s.failf("ollama serve exited before it answered: %v", p.err)
		case <-t.C:
		}
	}
}

// spawn starts the server process and the goroutine that waits for it.
func (s *Server) spawn() (*process, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return nil, errors.New("ollamatest: start after Stop")
	}
	if s.proc != nil {
		return nil, errors.New("ollamatest: already running")
	}
	s.starts++
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("ollamatest: %w", err)
	}
	defer logf.Close() // the child has its own descriptor
	fmt.Fprintf(logf, "--- ollamatest: start %d: %s serve on %s\n", s.starts, s.bin, s.addr)

	cmd := exec.Command(s.bin, "serve")
	cmd.Env = s.env
	cmd.Dir = s.dir
	// A file, not a pipe: Wait then needs no copying goroutine, and cannot
	// hang on a runner that still holds the pipe.
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("ollamatest: start %s: %w", s.bin, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	s.proc = p
	// Owned by the Server: Kill and Stop wait for done.
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// answers reports whether the server answers GET /api/version.
func (s *Server) answers(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	resp, err := s.do(ctx, http.MethodGet, "/api/version", nil)
	if err != nil {
		return false // not listening yet
	}
	_ = resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// createModels writes the model files and creates the models with the
// ollama CLI, as a user would.
func (s *Server) createModels(ctx context.Context, opts Options) error {
	for _, m := range []struct {
		name     string
		endless  bool
		scripted bool
	}{{ModelName, false, false}, {EndlessModelName, true, false}, {ScriptedModelName, false, true}} {
		gguf := filepath.Join(s.dir, m.name+".gguf")
		tmpl := template
		var err error
		if m.scripted {
			tmpl = tinymodel.ScriptedTemplate
			err = tinymodel.WriteScriptedFile(gguf, tinymodel.ScriptedOptions{})
		} else {
			err = tinymodel.WriteFile(gguf, tinymodel.Options{Seed: opts.Seed, Endless: m.endless})
		}
		if err != nil {
			return fmt.Errorf("ollamatest: %w", err)
		}
		modelfile := filepath.Join(s.dir, m.name+".Modelfile")
		content := fmt.Sprintf("FROM %s\nTEMPLATE \"\"\"%s\"\"\"\n", gguf, tmpl)
		switch {
		case opts.Threads == 0:
			content += "PARAMETER num_thread 1\n"
		case opts.Threads > 0:
			content += fmt.Sprintf("PARAMETER num_thread %d\n", opts.Threads)
		}
		if err := os.WriteFile(modelfile, []byte(content), 0o644); err != nil {
			return fmt.Errorf("ollamatest: %w", err)
		}
		if err := s.cli(ctx, "create", m.name, "-f", modelfile); err != nil {
			return err
		}
	}
	for _, alias := range opts.Aliases {
		body := map[string]string{"source": ModelName, "destination": alias}
		if err := s.call(ctx, "/api/copy", body, nil); err != nil {
			return s.failf("alias %q: %w", alias, err)
		}
	}
	return nil
}

// cli runs an ollama client command against the server, its output going
// to the server's log.
func (s *Server) cli(ctx context.Context, args ...string) error {
	logf, err := os.OpenFile(s.logPath, os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("ollamatest: %w", err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "--- ollamatest: ollama %s\n", strings.Join(args, " "))
	cmd := exec.CommandContext(ctx, s.bin, args...)
	cmd.Env = s.env
	cmd.Dir = s.dir
	cmd.Stdout = logf
	cmd.Stderr = logf
	if err := cmd.Run(); err != nil {
		return s.failf("ollama %s: %w", strings.Join(args, " "), err)
	}
	return nil
}

// preload loads ModelName into memory (a generate request without a
// prompt), so the first request a test makes is not slowed by loading.
func (s *Server) preload(ctx context.Context) error {
	var out struct {
		DoneReason string `json:"done_reason"`
	}
	if err := s.call(ctx, "/api/generate", map[string]string{"model": ModelName}, &out); err != nil {
		return s.failf("load %s: %w", ModelName, err)
	}
	if out.DoneReason != "load" {
		return s.failf("load %s: done_reason %q, want \"load\"", ModelName, out.DoneReason)
	}
	return nil
}

// call POSTs a JSON body and decodes a 200 answer into out (when not nil).
func (s *Server) call(ctx context.Context, path string, body, out any) error {
	b, err := json.Marshal(body)
	if err != nil {
		return err
	}
	resp, err := s.do(ctx, http.MethodPost, path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("POST %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("POST %s: HTTP %d: %s", path, resp.StatusCode, bytes.TrimSpace(data))
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("POST %s: %w", path, err)
	}
	return nil
}

func (s *Server) do(ctx context.Context, method, path string, body io.Reader) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, s.URL()+path, body)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	return s.client.Do(req)
}

// killLocked SIGKILLs the group and waits for the server to exit.
func (s *Server) killLocked() {
	p := s.proc
	if p == nil {
		return
	}
	s.proc = nil
	signalGroup(p, syscall.SIGKILL)
	<-p.done
	s.log.Info("ollama killed", "url", s.URL(), "pid", p.cmd.Process.Pid)
}

// terminateLocked asks the server to exit and kills the group when it has
// not by the time ctx is done or stopGrace has passed. Runners left in the
// group after the server exits are killed too.
func (s *Server) terminateLocked(ctx context.Context) {
	p := s.proc
	if p == nil {
		return
	}
	s.proc = nil
	ctx, cancel := context.WithTimeout(ctx, stopGrace)
	defer cancel()
	signalGroup(p, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-ctx.Done():
		s.log.Warn("ollama did not stop in time; killing", "pid", p.cmd.Process.Pid)
	}
	signalGroup(p, syscall.SIGKILL)
	<-p.done
}

func signalGroup(p *process, sig syscall.Signal) {
	// The group may be gone already (ESRCH); nothing else can fail here
	// for a child we started.
	_ = syscall.Kill(-p.cmd.Process.Pid, sig)
}

// failf returns an error that ends with the tail of the server's log.
func (s *Server) failf(format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	return fmt.Errorf("ollamatest: %w\nollama log (%s), tail:\n%s", err, s.logPath, s.logTail())
}

// logTail returns the last lines of the server's log.
func (s *Server) logTail() string {
	const maxBytes, maxLines = 4 << 10, 30
	f, err := os.Open(s.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	off := max(st.Size()-maxBytes, 0)
	buf := make([]byte, st.Size()-off)
	if _, err := f.ReadAt(buf, off); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(buf), "\n"), "\n")
	if off > 0 && len(lines) > 1 {
		lines = lines[1:] // the first line is cut
	}
	if len(lines) > maxLines {
		lines = lines[len(lines)-maxLines:]
	}
	return strings.Join(lines, "\n")
}

// serverEnv is the calling process's environment without its OLLAMA_*
// variables, plus the server's own.
func serverEnv(environ []string, addr, home, models string, opts Options) []string {
	env := make([]string, 0, len(environ)+8+len(opts.Env))
	for _, kv := range environ {
		if strings.HasPrefix(kv, "OLLAMA_") || strings.HasPrefix(kv, "HOME=") {
			continue
		}
		env = append(env, kv)
	}
	env = append(env,
		"HOME="+home, // ollama writes its key pair under $HOME/.ollama
		"OLLAMA_HOST="+addr,
		"OLLAMA_MODELS="+models,
		"GIN_MODE=release",
	)
	if opts.NumParallel > 0 {
		env = append(env, "OLLAMA_NUM_PARALLEL="+strconv.Itoa(opts.NumParallel))
	}
	return append(env, opts.Env...)
}

// findBinary resolves the ollama binary: bin, else $SOUS_OLLAMA_BIN, else
// <repo root>/.cache/bin/ollama.
func findBinary(bin string) (string, error) {
	if bin == "" {
		bin = os.Getenv(BinEnv)
	}
	if bin == "" {
		wd, err := os.Getwd()
		if err != nil {
			return "", fmt.Errorf("ollamatest: %w", err)
		}
		return binaryInRepo(wd)
	}
	if err := checkExecutable(bin); err != nil {
		return "", fmt.Errorf("ollamatest: %w (Options.Bin or %s): %v: run `make ollama`", ErrNoBinary, BinEnv, err)
	}
	return bin, nil
}

// binaryInRepo returns .cache/bin/ollama under the nearest directory above
// dir that holds go.mod.
func binaryInRepo(dir string) (string, error) {
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			bin := filepath.Join(d, ".cache", "bin", "ollama")
			if err := checkExecutable(bin); err != nil {
				return "", fmt.Errorf("ollamatest: %w at %s (and %s is not set): run `make ollama`", ErrNoBinary, bin, BinEnv)
			}
			return bin, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("ollamatest: %w: no go.mod above %s (and %s is not set): run `make ollama`", ErrNoBinary, dir, BinEnv)
		}
	}
}

func checkExecutable(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if st.IsDir() || st.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s is not an executable file", path)
	}
	return nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
