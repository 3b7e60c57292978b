// Package itest holds what the end-to-end test suites share: running the
// real worker binary as a process, free loopback addresses, and waiting for
// conditions with a deadline. It is test support, imported only by tests.
//
// Concurrency: a *Worker is safe for concurrent use; its log is collected
// by a goroutine that ends when the process exits.
package itest

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// FreeAddr returns a free 127.0.0.1:port.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// FreePort returns a free loopback port.
func FreePort(t testing.TB) int {
	_, p, _ := net.SplitHostPort(FreeAddr(t))
	n, _ := strconv.Atoi(p)
	return n
}

// Eventually polls cond every 20ms until it holds (true) or within passes
// (false).
func Eventually(within time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// WaitUntil fails t unless cond holds within the deadline.
func WaitUntil(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	if !Eventually(within, cond) {
		t.Fatalf("timed out after %s waiting for %s", within, what)
	}
}

// Tail returns the last n lines of s.
func Tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// WorkerOptions says how to run the worker binary.
type WorkerOptions struct {
	// Bin is the worker binary.
	Bin string
	// Env is added to the test process's environment; later entries win.
	Env []string
	// Probe is the HTTP path to wait for: "/readyz" (default), "/healthz",
	// or "none".
	Probe string
	// Within bounds the wait for the probe (default 60s).
	Within time.Duration
}

// Worker is a running worker process. SOUS_HTTP_ADDR is set to Addr.
type Worker struct {
	Cmd  *exec.Cmd
	Addr string

	exited chan struct{}
	err    error
	mu     sync.Mutex
	log    strings.Builder
}

var httpClient = &http.Client{Timeout: 5 * time.Second}

// StartWorker runs the worker and waits for its probe. At cleanup the
// process is SIGKILLed if it still runs, a data race it reported fails the
// test, and its log's tail is printed if the test failed.
func StartWorker(t testing.TB, o WorkerOptions) *Worker {
	t.Helper()
	if o.Probe == "" {
		o.Probe = "/readyz"
	}
	if o.Within == 0 {
		o.Within = 60 * time.Second
	}
	w := &Worker{Addr: FreeAddr(t), exited: make(chan struct{})}
	cmd := exec.Command(o.Bin)
	// The race runtime sleeps 1s at exit by default; exit times in tests
	// are the worker's own.
	cmd.Env = append(append(os.Environ(), "SOUS_HTTP_ADDR="+w.Addr, "GORACE=atexit_sleep_ms=0"), o.Env...)
	w.Cmd = cmd
	// A grandchild that outlives the worker (an engine's model runner,
	// orphaned by a SIGKILL) may hold the output pipe open: Wait returns
	// this long after the worker exits all the same, so a failed test
	// reports its failure instead of hanging until the package's timeout.
	cmd.WaitDelay = 10 * time.Second
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64*1024), 4<<20)
		for sc.Scan() {
			w.mu.Lock()
			w.log.WriteString(sc.Text() + "\n")
			w.mu.Unlock()
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	go func() {
		w.err = cmd.Wait()
		pw.Close()
		<-scanned
		close(w.exited)
	}()
	t.Cleanup(func() {
		w.Kill()
		if strings.Contains(w.Logs(), "WARNING: DATA RACE") {
			t.Errorf("the race detector fired in worker %d", cmd.Process.Pid)
		}
		if t.Failed() {
			t.Logf("worker %d log (last 60 lines):\n%s", cmd.Process.Pid, Tail(w.Logs(), 60))
		}
	})
	if o.Probe != "none" {
		w.WaitProbe(t, o.Probe, o.Within)
	}
	return w
}

// WaitProbe waits until GET probe answers 200, failing t if the worker
// exits first or the deadline passes.
func (w *Worker) WaitProbe(t testing.TB, probe string, within time.Duration) {
	t.Helper()
	WaitUntil(t, within, "worker "+probe, func() bool {
		select {
		case <-w.exited:
			t.Fatalf("worker exited early: %v\n%s", w.err, Tail(w.Logs(), 40))
		default:
		}
		return w.Get(probe) == http.StatusOK
	})
}

// Get returns the status of GET path on the worker, 0 when it does not
// answer.
func (w *Worker) Get(path string) int {
	code, _ := w.GetBody(path)
	return code
}

// GetBody returns the status and body of GET path on the worker.
func (w *Worker) GetBody(path string) (int, string) {
	resp, err := httpClient.Get("http://" + w.Addr + path)
	if err != nil {
		return 0, ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	return resp.StatusCode, string(b)
}

// Pid is the worker's process id.
func (w *Worker) Pid() int { return w.Cmd.Process.Pid }

// Logs is everything the worker wrote so far.
func (w *Worker) Logs() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.log.String()
}

// Kill SIGKILLs the worker and waits for it to exit. The process groups
// of its children (a supervised engine runs in one of its own, with its
// model runner) are killed first: nothing the worker started outlives it.
func (w *Worker) Kill() {
	for _, pgid := range childGroups(w.Cmd.Process.Pid) {
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
	}
	_ = w.Cmd.Process.Signal(syscall.SIGKILL)
	<-w.exited
}

// childGroups are the process groups of pid's children, other than pid's
// own (Linux's /proc; none elsewhere).
func childGroups(pid int) []int {
	own, _ := syscall.Getpgid(pid)
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...: comm may hold spaces; it ends at
		// the last ')'.
		rest := string(b)
		if i := strings.LastIndexByte(rest, ')'); i >= 0 {
			rest = rest[i+1:]
		}
		var state string
		var ppid, pgrp int
		if _, err := fmt.Sscan(rest, &state, &ppid, &pgrp); err != nil || ppid != pid || pgrp == own || pgrp <= 1 {
			continue
		}
		out = append(out, pgrp)
	}
	return out
}

// Exited is closed when the process has exited.
func (w *Worker) Exited() <-chan struct{} { return w.exited }

// ExitCode waits for the process to exit and returns its code (-1 for a
// signal), failing t after within.
func (w *Worker) ExitCode(t testing.TB, within time.Duration) int {
	t.Helper()
	select {
	case <-w.exited:
	case <-time.After(within):
		t.Fatalf("worker did not exit within %s", within)
	}
	if w.err == nil {
		return 0
	}
	if ee, ok := w.err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	t.Fatalf("wait: %v", w.err)
	return -1
}
