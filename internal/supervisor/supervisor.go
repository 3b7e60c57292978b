package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// Engine is what the supervisor needs of the engine it runs.
type Engine interface {
	Ping(ctx context.Context) error
	Load(ctx context.Context, model string) error
}

// Config configures a Supervisor.
type Config struct {
	// Command is the engine's argv, e.g. ["ollama", "serve"].
	Command []string
	// Env is added to the worker's environment for the child.
	Env []string
	// Model is preloaded once the engine answers; empty skips preloading.
	Model string
	// StartTimeout bounds one start: answering and loading the model
	// (default 5m).
	StartTimeout time.Duration
	// BackoffMin and BackoffMax pace restarts (defaults 1s and 30s).
	BackoffMin, BackoffMax time.Duration
	// StopTimeout is how long the engine gets after SIGTERM (default 10s).
	StopTimeout time.Duration
	// Output receives the engine's stdout and stderr (default os.Stderr).
	Output io.Writer
}

// Supervisor runs and restarts the engine process.
type Supervisor struct {
	cfg    Config
	engine Engine
	log    *slog.Logger

	mu       sync.Mutex
	ready    bool
	lastErr  error
	cmd      *exec.Cmd
	restarts int

	startOnce sync.Once
	stopOnce  sync.Once
	cancel    context.CancelFunc
	done      chan struct{}
	firstUp   chan struct{}
}

// New returns a Supervisor; nothing runs until Start.
func New(cfg Config, engine Engine, log *slog.Logger) *Supervisor {
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = 5 * time.Minute
	}
	if cfg.BackoffMin <= 0 {
		cfg.BackoffMin = time.Second
	}
	if cfg.BackoffMax <= 0 {
		cfg.BackoffMax = 30 * time.Second
	}
	if cfg.StopTimeout <= 0 {
		cfg.StopTimeout = 10 * time.Second
	}
	if cfg.Output == nil {
		cfg.Output = os.Stderr
	}
	return &Supervisor{cfg: cfg, engine: engine, log: log.With("component", "engine-supervisor"), done: make(chan struct{}), firstUp: make(chan struct{}), lastErr: errors.New("engine not started")}
}

// Start starts the engine and returns once it answers with the model loaded,
// or with an error if ctx ends first. The engine keeps being supervised
// until Stop, whatever Start returns.
func (s *Supervisor) Start(ctx context.Context) error {
	if len(s.cfg.Command) == 0 {
		return errors.New("SOUS_ENGINE_EXEC is empty")
	}
	if _, err := exec.LookPath(s.cfg.Command[0]); err != nil {
		return fmt.Errorf("engine command %q: %w", s.cfg.Command[0], err)
	}
	s.startOnce.Do(func() {
		runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		s.cancel = cancel
		go s.loop(runCtx)
	})
	select {
	case <-s.firstUp:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("engine did not become ready: %w (last: %v)", ctx.Err(), s.Ready(ctx))
	}
}

// Ready is nil when the engine runs, answers and has the model loaded.
func (s *Supervisor) Ready(context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ready {
		return nil
	}
	return s.lastErr
}

// Restarts is how many times the engine was restarted after dying.
func (s *Supervisor) Restarts() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.restarts
}

// Pid is the engine's process id, 0 when none runs.
func (s *Supervisor) Pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil || s.cmd.Process == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

func (s *Supervisor) setState(ready bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ready, s.lastErr = ready, err
}

func (s *Supervisor) loop(ctx context.Context) {
	defer close(s.done)
	wait := s.cfg.BackoffMin
	first := true
	for ctx.Err() == nil {
		started := time.Now()
		err := s.runOnce(ctx, &first)
		if ctx.Err() != nil {
			return
		}
		s.setState(false, fmt.Errorf("engine exited: %v", err))
		if time.Since(started) > 2*s.cfg.BackoffMax {
			wait = s.cfg.BackoffMin // it ran a good while: start the backoff over
		}
		s.log.Warn("engine exited; restarting", "err", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(wait*2, s.cfg.BackoffMax)
		s.mu.Lock()
		s.restarts++
		s.mu.Unlock()
	}
}

// runOnce starts the engine, makes it ready, and waits for it to exit.
func (s *Supervisor) runOnce(ctx context.Context, first *bool) error {
	cmd := exec.Command(s.cfg.Command[0], s.cfg.Command[1:]...)
	cmd.Env = append(os.Environ(), s.cfg.Env...)
	cmd.Stdout, cmd.Stderr = s.cfg.Output, s.cfg.Output
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// The engine's own children (Ollama's model runners) inherit its output;
	// don't let them hold Wait open once the engine itself has exited.
	cmd.WaitDelay = time.Second
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", s.cfg.Command[0], err)
	}
	s.mu.Lock()
	s.cmd = cmd
	s.mu.Unlock()
	exited := make(chan error, 1)
	go func() {
		err := cmd.Wait()
		// Reap what the engine left behind in its process group (a model
		// runner holding GPU memory) before anything is restarted.
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		exited <- err
	}()
	s.log.Info("engine started", "pid", cmd.Process.Pid, "command", s.cfg.Command[0])

	upCtx, cancel := context.WithTimeout(ctx, s.cfg.StartTimeout)
	err := s.becomeReady(upCtx, exited)
	cancel()
	switch {
	case err == nil:
		s.setState(true, nil)
		s.log.Info("engine ready", "model", s.cfg.Model)
		if *first {
			*first = false
			close(s.firstUp)
		}
	case errors.Is(err, errExited):
		return <-exited
	default:
		s.log.Error("engine did not become ready; restarting it", "err", err)
		s.terminate(cmd, exited)
		return err
	}
	select {
	case err := <-exited:
		return err
	case <-ctx.Done():
		s.terminate(cmd, exited)
		return ctx.Err()
	}
}

var errExited = errors.New("engine exited while starting")

func (s *Supervisor) becomeReady(ctx context.Context, exited chan error) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := s.engine.Ping(pctx)
		cancel()
		if err == nil {
			break
		}
		s.setState(false, fmt.Errorf("engine starting: %v", err))
		select {
		case e := <-exited:
			exited <- e
			return errExited
		case <-ctx.Done():
			return fmt.Errorf("engine did not answer: %w", ctx.Err())
		case <-tick.C:
		}
	}
	if s.cfg.Model == "" {
		return nil
	}
	s.setState(false, fmt.Errorf("loading model %q", s.cfg.Model))
	if err := s.engine.Load(ctx, s.cfg.Model); err != nil {
		return fmt.Errorf("preload: %w", err)
	}
	return nil
}

// terminate sends SIGTERM to the engine's process group, then SIGKILL.
func (s *Supervisor) terminate(cmd *exec.Cmd, exited chan error) {
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(s.cfg.StopTimeout):
		s.log.Warn("engine ignored SIGTERM; killing it", "pid", cmd.Process.Pid)
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	}
}

// Stop stops supervising and terminates the engine. Call it after the
// worker has drained.
func (s *Supervisor) Stop() {
	s.stopOnce.Do(func() {
		if s.cancel == nil {
			return
		}
		s.cancel()
		<-s.done
		s.setState(false, errors.New("engine stopped"))
		s.log.Info("engine stopped")
	})
}
