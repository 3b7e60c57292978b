package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// workerBin builds cmd/worker once for the package's tests and returns its
// path.
func workerBin(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "sous-worker-bin-")
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
	return filepath.Join(binDir, "worker")
}

// runWorker runs the binary to its end with env (on top of a bare PATH)
// and returns stdout, stderr and the exit code.
func runWorker(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	bin := workerBin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatal(err)
	}
	return o.String(), e.String(), code
}

func TestHelpListsEveryVariable(t *testing.T) {
	t.Parallel()
	for _, arg := range []string{"-h", "--help", "help"} {
		stdout, stderr, code := runWorker(t, nil, arg)
		if code != 0 || stderr != "" {
			t.Fatalf("worker %s: exit %d, stderr %q; want 0 and nothing", arg, code, stderr)
		}
		if strings.Contains(stdout, "is required") {
			t.Errorf("worker %s validates the configuration instead of printing help:\n%s", arg, stdout)
		}
		for _, v := range configVars() {
			if !regexp.MustCompile(`(?m)^  ` + v.name + ` +\S`).MatchString(stdout) {
				t.Errorf("worker %s does not list %s with its default:\n%s", arg, v.name, stdout)
			}
		}
		for _, want := range []string{"SOUS_MODEL", "(required)", "SOUS_BATCH_MAX", "32", "SOUS_DEAD_LETTER_QUEUE", "<SOUS_QUEUE>.dlq", "README.md"} {
			if !strings.Contains(stdout, want) {
				t.Errorf("worker %s: no %q in\n%s", arg, want, stdout)
			}
		}
	}
	_, stderr, code := runWorker(t, nil, "serve")
	if code != 2 || !strings.Contains(stderr, `unexpected argument "serve"`) || !strings.Contains(stderr, "worker -h") {
		t.Errorf("worker serve: exit %d, stderr %q", code, stderr)
	}
}

// TestInvalidValuesReadForAPerson: a value that does not parse says what the
// variable takes, never Go's parser error.
func TestInvalidValuesReadForAPerson(t *testing.T) {
	t.Parallel()
	tests := []struct {
		env  string
		want string
	}{
		{"SOUS_BATCH_MAX=abc", "SOUS_BATCH_MAX: must be a whole number, such as 32"},
		{"SOUS_BATCH_WAIT=soon", "SOUS_BATCH_WAIT: must be a duration with a unit (ms, s, m, h), such as 20ms"},
		{"SOUS_DECLARE=maybe", "SOUS_DECLARE: must be true or false"},
		{"SOUS_GPU_RESERVE_BYTES=1GB", "SOUS_GPU_RESERVE_BYTES: must be a whole number, such as 0"},
	}
	for _, tt := range tests {
		stdout, stderr, code := runWorker(t, []string{"SOUS_MODEL=m", tt.env})
		if code != 2 || stdout != "" {
			t.Errorf("%s: exit %d, stdout %q; want 2 and nothing", tt.env, code, stdout)
		}
		if !strings.Contains(stderr, tt.want) {
			t.Errorf("%s: stderr %q, want %q", tt.env, stderr, tt.want)
		}
		for _, leak := range []string{"strconv", "ParseInt", "time: invalid", "cannot parse as"} {
			if strings.Contains(stderr, leak) {
				t.Errorf("%s: stderr %q shows Go's parser error", tt.env, stderr)
			}
		}
	}
}

// TestStartLogsSayWhatIsThere: the start logs name what is configured and
// nothing that is not: the port actually bound, no endpoint when none is
// set, no AMQP URL on Service Bus.
func TestStartLogsSayWhatIsThere(t *testing.T) {
	t.Parallel()
	queue := fmt.Sprintf("sous-cmd-worker-logs-%d", os.Getpid())
	t.Cleanup(func() { deleteQueues(queue, queue+".dlq") })
	logs := startAndStop(t, []string{
		"SOUS_MODEL=m", "SOUS_QUEUE=" + queue, "SOUS_HTTP_ADDR=127.0.0.1:0", "SOUS_LOG_FORMAT=text",
		"SOUS_ENGINE_URL=http://127.0.0.1:9", "SOUS_AMQP_URL=" + brokerURL(),
	}, "ready to work")
	for _, re := range []string{
		`msg="ready to work" .*http_addr=127\.0\.0\.1:[1-9][0-9]*`,
		`msg=telemetry .*traces_endpoint=none`,
		`msg=starting .*amqp_url=amqp://guest:xxxxx@127\.0\.0\.1:5672/`,
	} {
		if !regexp.MustCompile(re).MatchString(logs) {
			t.Errorf("no line matching %s in\n%s", re, logs)
		}
	}
	if strings.Contains(logs, "REDACTED") || strings.Contains(logs, "http_addr=127.0.0.1:0 ") {
		t.Errorf("logs say REDACTED or port 0:\n%s", logs)
	}

	// Service Bus at a loopback address nothing listens on: the worker
	// logs where it goes, then fails to connect.
	logs = startAndStop(t, []string{
		"SOUS_MODEL=m", "SOUS_BROKER=servicebus", "SOUS_HTTP_ADDR=off", "SOUS_LOG_FORMAT=text", "SOUS_ENGINE_URL=http://127.0.0.1:9",
		"SOUS_SERVICEBUS_CONNECTION_STRING=Endpoint=sb://127.0.0.1:9/;SharedAccessKeyName=k;SharedAccessKey=hunter2",
	}, "msg=telemetry")
	if !regexp.MustCompile(`msg=starting .*servicebus_namespace=sb://127\.0\.0\.1:9/`).MatchString(logs) {
		t.Errorf("Service Bus start line does not name the namespace:\n%s", logs)
	}
	if strings.Contains(logs, "amqp_url") || strings.Contains(logs, "hunter2") || strings.Contains(logs, "REDACTED") {
		t.Errorf("Service Bus logs name amqp_url, REDACTED or the key:\n%s", logs)
	}
}

func brokerURL() string {
	if u := os.Getenv("RABBITMQ_URL"); u != "" {
		return u
	}
	return "amqp://guest:guest@127.0.0.1:5672/"
}

func deleteQueues(names ...string) {
	conn, err := amqp.Dial(brokerURL())
	if err != nil {
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return
	}
	for _, n := range names {
		_, _ = ch.QueueDelete(n, false, false, false)
	}
}

// startAndStop runs the worker until a log line contains until, then sends
// SIGTERM and returns everything it logged.
func startAndStop(t *testing.T, env []string, until string) string {
	t.Helper()
	cmd := exec.Command(workerBin(t))
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var logs strings.Builder
	seen := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(pr)
		once := sync.Once{}
		for sc.Scan() {
			logs.WriteString(sc.Text() + "\n")
			if strings.Contains(sc.Text(), until) {
				once.Do(func() { close(seen) })
			}
		}
	}()
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); pw.Close(); close(exited) }()
	select {
	case <-seen:
		_ = cmd.Process.Signal(syscall.SIGTERM)
	case <-exited:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
	}
	<-exited
	<-done
	return logs.String()
}

// TestEveryVariableIsInTheReadme keeps README.md's table and the code in
// step, both ways: every variable Config reads and every SOUS_* name the
// worker's and sousctl's code uses is a row, and every row is a variable
// Config reads.
func TestEveryVariableIsInTheReadme(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	// The worker's table is in "## Configuration"; the gateway's variables
	// have a table of their own in a later section.
	text := string(readme)
	if i := strings.Index(text, "\n## Configuration"); i >= 0 {
		text = text[i:]
		if j := strings.Index(text[1:], "\n## "); j >= 0 {
			text = text[:j+1]
		}
	}
	rows := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `([A-Z_]+)` \\|").FindAllStringSubmatch(text, -1) {
		rows[m[1]] = true
	}
	if len(rows) < 40 {
		t.Fatalf("found only %d rows in README.md's configuration table; did the table's format change?", len(rows))
	}
	read := map[string]bool{}
	for _, v := range configVars() {
		read[v.name] = true
		if !rows[v.name] {
			t.Errorf("Config reads %s (cmd/worker), but README.md's configuration table has no row for it: add one", v.name)
		}
	}
	var names []string
	for name := range rows {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if !read[name] {
			t.Errorf("README.md's configuration table lists %s, but no Config field has env:%q: the worker does not read it; remove the row or read it", name, name)
		}
	}
	// Every SOUS_* name in the code a user runs (messages that point at a
	// variable included) must be a row: of the worker's table, or of the
	// gateway's for its own.
	all := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `([A-Z_]+)` \\|").FindAllStringSubmatch(string(readme), -1) {
		all[m[1]] = true
	}
	used := regexp.MustCompile(`\bSOUS_[A-Z0-9_]*[A-Z0-9]\b`)
	for _, dir := range []string{".", "../sousctl", "../../internal"} {
		err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() && d.Name() == "envcheck" {
				// It lists every SOUS_* name sous reads, the scripts' and
				// tests' included, so that none is warned about.
				return filepath.SkipDir
			}
			if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return err
			}
			src, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			for n, line := range strings.Split(string(src), "\n") {
				for _, name := range used.FindAllString(line, -1) {
					if !all[name] {
						t.Errorf("%s:%d names %s, which README.md's configuration tables do not list", path, n+1, name)
					}
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// A misspelled variable is warned about at start, naming the one meant;
// durations in JSON logs read as text ("250ms"), not nanoseconds. The
// broker port is closed, so the worker logs its retry and its wait.
func TestStartLogsWarnAndReadDurations(t *testing.T) {
	t.Parallel()
	logs := startAndStop(t, []string{
		"SOUS_MODEL=m", "SOUS_ENGNE_URL=http://x", "SOUS_HTTP_ADDR=off", "OTEL_SDK_DISABLED=true",
		"SOUS_ENGINE_URL=http://127.0.0.1:9", "SOUS_AMQP_URL=amqp://guest:guest@127.0.0.1:9/",
	}, "broker connect failed")
	var warned, retried bool
	for _, raw := range strings.Split(strings.TrimSpace(logs), "\n") {
		var l map[string]any
		if json.Unmarshal([]byte(raw), &l) != nil {
			t.Errorf("not a JSON line: %s", raw)
			continue
		}
		if l["var"] == "SOUS_ENGNE_URL" && l["did_you_mean"] == "SOUS_ENGINE_URL" && l["level"] == "WARN" {
			warned = true
		}
		if l["msg"] == "broker connect failed" {
			retried = true
			if s, ok := l["retry_in"].(string); !ok {
				t.Errorf("retry_in = %#v, want a duration as text: %s", l["retry_in"], raw)
			} else if _, err := time.ParseDuration(s); err != nil {
				t.Errorf("retry_in = %q: %v", s, err)
			}
		}
	}
	if !warned || !retried {
		t.Errorf("warned about SOUS_ENGNE_URL: %v, logged a retry: %v, in\n%s", warned, retried, logs)
	}
}

// README's result example is a prompt's result, so its batch is the engine
// call that took that request alone: size 1 (docs/messages.md: one-request
// APIs go to the engine one request per call). It said 4 once.
func TestReadmeResultExample(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var checked int
	for _, m := range regexp.MustCompile("(?s)```json\n(.*?)```").FindAllStringSubmatch(string(readme), -1) {
		for _, line := range regexp.MustCompile(`(?s)\{"id".*?"attempt": \d+\}`).FindAllString(m[1], -1) {
			var r struct {
				Status   string          `json:"status"`
				Response *string         `json:"response"`
				Message  json.RawMessage `json:"message"`
				Batch    struct{ Size int }
			}
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				t.Errorf("README's result example is not JSON: %v\n%s", err, line)
				continue
			}
			checked++
			if (r.Response != nil || r.Message != nil) && r.Batch.Size != 1 {
				t.Errorf("README's result of a prompt or chat request says batch size %d; such a request goes to the engine alone (size 1)", r.Batch.Size)
			}
		}
	}
	if checked == 0 {
		t.Error("README.md has no result example")
	}
}
