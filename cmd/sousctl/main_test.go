package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/itest"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
	seq       struct {
		sync.Mutex
		n int
	}
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// sousctlBin builds cmd/sousctl once for the package's tests.
func sousctlBin(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "sousctl-bin-")
		if buildErr != nil {
			return
		}
		out, err := exec.Command("go", "build", "-o", binDir, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, "sousctl")
}

func brokerURL() string {
	if u := os.Getenv("RABBITMQ_URL"); u != "" {
		return u
	}
	return "amqp://guest:guest@127.0.0.1:5672/"
}

type result struct {
	stdout, stderr string
	code           int
}

// sousctl runs the binary with args and stdin, and a bare environment.
func sousctl(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	return sousctlEnv(t, nil, stdin, args...)
}

// sousctlEnv is sousctl with env added to the bare environment.
func sousctlEnv(t *testing.T, env []string, stdin string, args ...string) result {
	t.Helper()
	bin := sousctlBin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
	cmd.Stdin = strings.NewReader(stdin)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	r := result{stdout: o.String(), stderr: e.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatal(err)
	}
	return r
}

// testQueue declares a plain queue nobody consumes, deleted at cleanup,
// and returns its name and a channel to inspect it.
func testQueue(t *testing.T) (string, *amqp.Channel) {
	t.Helper()
	conn, err := amqp.Dial(brokerURL())
	if err != nil {
		t.Fatalf("RabbitMQ at %s (`rabbitmq-server -detached`): %v", brokerURL(), err)
	}
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	seq.Lock()
	seq.n++
	name := fmt.Sprintf("sousctl-test-%d-%d", os.Getpid(), seq.n)
	seq.Unlock()
	if _, err := ch.QueueDeclare(name, false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = ch.QueueDelete(name, false, false, false)
		conn.Close()
	})
	return name, ch
}

func depth(t *testing.T, ch *amqp.Channel, q string) int {
	t.Helper()
	st, err := ch.QueueDeclarePassive(q, false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	return st.Messages
}

func TestHelpAndCommands(t *testing.T) {
	t.Parallel()
	tests := []struct {
		args       []string
		code       int
		stdout     []string // each must appear in stdout
		stderr     []string // each must appear in stderr
		quietError bool     // stderr must be empty
	}{
		{args: []string{"-h"}, stdout: []string{"usage: sousctl <command>", "publish"}, quietError: true},
		{args: []string{"--help"}, stdout: []string{"usage: sousctl <command>"}, quietError: true},
		{args: []string{"help"}, stdout: []string{"usage: sousctl <command>"}, quietError: true},
		{args: []string{"publish", "-h"}, stdout: []string{"usage: sousctl publish", "Flags may come before, between or after", "-timeout", "-stream"}, quietError: true},
		{args: []string{"help", "publish"}, stdout: []string{"usage: sousctl publish"}, quietError: true},
		{args: []string{"frob"}, code: 2, stderr: []string{`unknown command "frob"`, "publish", "help"}},
		{args: nil, code: 2, stderr: []string{"usage: sousctl <command>"}},
		{args: []string{"publish", "-nosuch", "hi"}, code: 2, stderr: []string{"unknown flag -nosuch", "after --", "sousctl publish -h"}},
		{args: []string{"publish"}, code: 2, stderr: []string{"nothing to publish"}},
	}
	for _, tt := range tests {
		r := sousctl(t, "", tt.args...)
		if r.code != tt.code {
			t.Errorf("sousctl %q: exit %d, want %d\nstdout %s\nstderr %s", tt.args, r.code, tt.code, r.stdout, r.stderr)
		}
		for _, w := range tt.stdout {
			if !strings.Contains(r.stdout, w) {
				t.Errorf("sousctl %q: stdout lacks %q:\n%s", tt.args, w, r.stdout)
			}
		}
		for _, w := range tt.stderr {
			if !strings.Contains(r.stderr, w) {
				t.Errorf("sousctl %q: stderr lacks %q:\n%s", tt.args, w, r.stderr)
			}
		}
		if tt.quietError && r.stderr != "" {
			t.Errorf("sousctl %q: stderr %q, want nothing", tt.args, r.stderr)
		}
	}
}

// TestFlagsAfterPromptsAreFlags: `publish "Why?" -timeout 1s` publishes one
// request, not three, and says at once that no worker consumes the queue.
func TestFlagsAfterPromptsAreFlags(t *testing.T) {
	t.Parallel()
	q, ch := testQueue(t)
	r := sousctl(t, "", "publish", "Why?", "-timeout", "1s", "-url", brokerURL(), "-queue", q, "--", "-5 degrees?")
	if got := depth(t, ch, q); got != 2 {
		t.Fatalf("%d requests queued, want 2 (\"Why?\" and \"-5 degrees?\")\nstdout %s\nstderr %s", got, r.stdout, r.stderr)
	}
	if r.code != 1 {
		t.Errorf("exit %d, want 1", r.code)
	}
	for _, w := range []string{
		"no worker is consuming " + q + "; the requests stay queued",
		"2 result(s) did not arrive within 1s",
		"will still run",
	} {
		if !strings.Contains(r.stderr, w) {
			t.Errorf("stderr lacks %q:\n%s", w, r.stderr)
		}
	}
	if !strings.Contains(r.stdout, "published 2 request(s) to "+q) {
		t.Errorf("stdout %q", r.stdout)
	}
	msgs := drain(t, ch, q)
	if len(msgs) != 2 || !strings.Contains(msgs[0], `"prompt":"Why?"`) || !strings.Contains(msgs[1], `"prompt":"-5 degrees?"`) {
		t.Errorf("published %q", msgs)
	}
}

func drain(t *testing.T, ch *amqp.Channel, q string) []string {
	t.Helper()
	var out []string
	for {
		d, ok, err := ch.Get(q, true)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			return out
		}
		out = append(out, string(d.Body))
	}
}

// TestFileLinesTakeTheFlags: -model, -chat and -stream apply to -f lines;
// a line's own field wins.
func TestFileLinesTakeTheFlags(t *testing.T) {
	t.Parallel()
	q, ch := testQueue(t)
	lines := `{"prompt":"plain"}
{"prompt":"own model","model":"mine"}
{"prompt":"no stream","stream":false}
# a comment
{"input":"embed me"}
`
	r := sousctl(t, lines, "publish", "-f", "-", "-model", "tiny", "-chat", "-stream", "-timeout", "500ms", "-url", brokerURL(), "-queue", q)
	if r.code != 1 {
		t.Fatalf("exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	got := drain(t, ch, q)
	want := []string{
		`{"messages":[{"content":"plain","role":"user"}],"model":"tiny","stream":true}`,
		`{"messages":[{"content":"own model","role":"user"}],"model":"mine","stream":true}`,
		`{"messages":[{"content":"no stream","role":"user"}],"model":"tiny","stream":false}`,
		`{"input":"embed me","model":"tiny"}`,
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("published\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// Without flags a line goes as it is, byte for byte.
	r = sousctl(t, `{"prompt": "as is",  "stream": true}`+"\n", "publish", "-f", "-", "-timeout", "200ms", "-url", brokerURL(), "-queue", q)
	if got := drain(t, ch, q); len(got) != 1 || got[0] != `{"prompt": "as is",  "stream": true}` {
		t.Errorf("published %q (%s)", got, r.stderr)
	}
}

func TestInputErrorsSayWhatToDo(t *testing.T) {
	t.Parallel()
	big := `{"prompt":"` + strings.Repeat("a", 20<<20) + `"}` + "\n"
	tests := []struct {
		name, stdin string
		args        []string
		want        string
		secret      string // must not appear
	}{
		{"plain text on stdin", "Why is the sky blue?\n", []string{"-f", "-"}, "stdin line 1 is not JSON: expected JSON lines", ""},
		{"plain text says drop -f", "hello\n", []string{"-f", "-"}, "drop -f", ""},
		{"a JSON line that is not an object", `["prompt"]` + "\n", []string{"-f", "-"}, "stdin line 1 is JSON but not a request object", ""},
		{"a 20 MB line", `{"prompt":"ok"}` + "\n" + big, []string{"-f", "-"}, "stdin line 2 is longer than the line limit of 16 MiB", ""},
		{"an http URL", "", []string{"-url", "http://user:hunter2@example.com/", "hi"}, "starts with http://, but sousctl speaks AMQP", "hunter2"},
		{"not a URL", "", []string{"-url", "hunter2", "hi"}, "is not a URL", "hunter2"},
		{"no such file", "", []string{"-f", "/nonexistent/requests.jsonl"}, "/nonexistent/requests.jsonl", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := sousctl(t, tt.stdin, append([]string{"publish"}, tt.args...)...)
			if r.code != 2 {
				t.Errorf("exit %d, want 2", r.code)
			}
			if !strings.Contains(r.stderr, tt.want) {
				t.Errorf("stderr %q lacks %q", r.stderr, tt.want)
			}
			if strings.Contains(r.stderr, "bufio.Scanner") || tt.secret != "" && strings.Contains(r.stderr+r.stdout, tt.secret) {
				t.Errorf("stderr %q shows a library error or the secret", r.stderr)
			}
		})
	}
}

func TestBrokerErrorsSayWhatToDo(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, url string
		want      string
		not       []string
	}{
		{"refused password", "amqp://guest:hunter2@127.0.0.1:5672/", "refused the user name or password", []string{"rabbitmq-server", "is RabbitMQ running", "hunter2"}},
		{"nothing listening", "amqp://guest:hunter2@127.0.0.1:9/", "is RabbitMQ running?", []string{"hunter2"}},
		{"unknown vhost", "amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "vhost no-such-vhost not found", []string{"rabbitmq-server"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := sousctl(t, "", "publish", "-url", tt.url, "hi")
			if r.code != 1 || !strings.Contains(r.stderr, tt.want) {
				t.Errorf("exit %d, stderr %q; want 1 and %q", r.code, r.stderr, tt.want)
			}
			for _, n := range tt.not {
				if strings.Contains(r.stderr, n) {
					t.Errorf("stderr %q contains %q", r.stderr, n)
				}
			}
		})
	}
	r := sousctlEnv(t, []string{"SOUS_DECLARE=false"}, "", "publish", "-url", brokerURL(), "-queue", fmt.Sprintf("sousctl-missing-%d", os.Getpid()), "hi")
	if r.code != 1 || !strings.Contains(r.stderr, "does not exist: start the worker first") || !strings.Contains(r.stderr, "SOUS_DECLARE=true") {
		t.Errorf("missing queue, SOUS_DECLARE=false: exit %d, stderr %q", r.code, r.stderr)
	}
}

// TestPublishDeclaresMissingQueue: with SOUS_DECLARE unset (true), a
// missing request queue is declared with the worker's arguments (a
// declare with them is accepted), so the request can wait in it for a
// worker that has not started.
func TestPublishDeclaresMissingQueue(t *testing.T) {
	t.Parallel()
	q := fmt.Sprintf("sousctl-declare-%d", os.Getpid())
	conn, err := amqp.Dial(brokerURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if ch, err := conn.Channel(); err == nil {
			_, _ = ch.QueueDelete(q, false, false, false)
			_, _ = ch.QueueDelete(q+".dlq", false, false, false)
		}
		conn.Close()
	})
	r := sousctlEnv(t, []string{"SOUS_MAX_ATTEMPTS=3"}, "", "publish", "-url", brokerURL(), "-queue", q, "-timeout", "1s", "hi")
	if !strings.Contains(r.stderr, "declared queue") || strings.Contains(r.stderr, "does not exist") {
		t.Fatalf("exit %d, stderr %q; want the queue declared", r.code, r.stderr)
	}
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	_, err = ch.QueueDeclare(q, true, false, false, false, amqp.Table{
		"x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": q + ".dlq", "x-delivery-limit": int64(3),
	})
	if err != nil {
		t.Fatalf("declare %s with the worker's arguments: %v", q, err)
	}
	if _, err := ch.QueueDeclare(q+".dlq", true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); err != nil {
		t.Fatalf("declare %s.dlq with the worker's arguments: %v", q, err)
	}
}

// TestInterruptSaysRequestsStayQueued: Ctrl-C while waiting says the
// requests stay queued and still run, exits 130, and leaves them queued.
func TestInterruptSaysRequestsStayQueued(t *testing.T) {
	t.Parallel()
	q, ch := testQueue(t)
	cmd := exec.Command(sousctlBin(t), "publish", "-url", brokerURL(), "-queue", q, "a", "b", "c")
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	var stdout, stderr syncBuffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	itest.WaitUntil(t, 30*time.Second, "sousctl says no worker consumes the queue", func() bool {
		return strings.Contains(stderr.String(), "no worker is consuming")
	})
	_ = cmd.Process.Signal(syscall.SIGINT)
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 130 {
		t.Errorf("exit %v, want 130", err)
	}
	if want := "interrupted while waiting for 3 result(s): the requests stay on " + q + " and will still run"; !strings.Contains(stderr.String(), want) {
		t.Errorf("stderr %q lacks %q", stderr.String(), want)
	}
	if got := depth(t, ch, q); got != 3 {
		t.Errorf("%d requests queued after Ctrl-C, want 3", got)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A misspelled variable is named with the one it was meant to be.
func TestWarnUnknownEnv(t *testing.T) {
	t.Parallel()
	var b strings.Builder
	warnUnknownEnv(&b, []string{"SOUS_QEUE=x", "SOUS_QUEUE=y", "SOUS_MODEL=m", "HOME=/"})
	if got, want := b.String(), "sousctl: warning: SOUS_QEUE is not a variable sous reads; ignored (did you mean SOUS_QUEUE?)\n"; got != want {
		t.Errorf("warning = %q, want %q", got, want)
	}
}

func TestLaneQueue(t *testing.T) {
	const spec = "interactive=sous.interactive,bulk=sous.bulk:share=0.2"
	o := options{queue: "sous.requests", lane: "bulk"}
	if err := laneQueue(&o, spec); err != nil || o.queue != "sous.bulk" {
		t.Fatalf("-lane bulk: queue %q, err %v; want sous.bulk", o.queue, err)
	}
	o = options{queue: "sous.requests"}
	if err := laneQueue(&o, spec); err != nil || o.queue != "sous.requests" {
		t.Fatalf("no -lane: queue %q, err %v; want -queue's", o.queue, err)
	}
	for _, c := range []struct{ spec, lane, want string }{
		{spec, "nightly", "has no such lane (it has interactive, bulk)"},
		{"", "bulk", "SOUS_LANES is not set"},
		{"a=q:share=x", "a", "SOUS_LANES: "},
	} {
		o := options{queue: "sous.requests", lane: c.lane}
		if err := laneQueue(&o, c.spec); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("SOUS_LANES=%q -lane %s: %v, want an error with %q", c.spec, c.lane, err, c.want)
		}
	}
}
