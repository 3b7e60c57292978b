package integration

import (
	"bytes"
	"errors"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/sous-run/sous/internal/tinymodel"
)

// runSousctl runs the sousctl binary and returns stdout, stderr and the
// exit code.
func runSousctl(t *testing.T, stdin string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "sousctl"), args...)
	cmd.Stdin = strings.NewReader(stdin)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return o.String(), e.String(), 0
	case errors.As(err, &ee):
		return o.String(), e.String(), ee.ExitCode()
	}
	t.Fatal(err)
	return "", "", 0
}

// TestSousctlStreamsStayWithTheirRequests: four streamed prompts at once
// each print under their own header, text once, then their summary; no
// text of one request lands in another's block. The scripted model answers
// each with its fallback sentence, streamed a piece at a time, so every
// block's text is known exactly (the random model can end an answer after
// one token, before any chunk is streamed).
func TestSousctlStreamsStayWithTheirRequests(t *testing.T) {
	t.Parallel()
	q, _ := names(t)
	startScriptedWorker(t, q, "SOUS_BATCH_WAIT=200ms", "SOUS_STREAM_BYTES=1", "SOUS_STREAM_INTERVAL=1ms")
	stdout, stderr, code := runSousctl(t, "", "publish", "-url", brokerURL, "-queue", q, "-stream", "a", "b", "c", "d")
	if code != 0 {
		t.Fatalf("exit %d\n%s\n%s", code, stdout, stderr)
	}
	checkStreamBlocks(t, stdout, 4)
	if !strings.Contains(stderr, "sousctl: 4 of 4 results") {
		t.Errorf("no progress line on stderr (piped):\n%s", stderr)
	}

	// A -f line that asks for a stream itself, with no flag: printed once,
	// under its header.
	stdout, stderr, code = runSousctl(t, `{"messages":[{"role":"user","content":"hi"}],"stream":true}`+"\n", "publish", "-url", brokerURL, "-queue", q, "-f", "-")
	if code != 0 {
		t.Fatalf("exit %d\n%s\n%s", code, stdout, stderr)
	}
	checkStreamBlocks(t, stdout, 1)
	if strings.Contains(stdout, "assistant:") {
		t.Errorf("the streamed message is printed again at the end:\n%s", stdout)
	}
}

var (
	streamHeader = regexp.MustCompile(`^\[[0-9a-f]{16}\] streaming$`)
	summaryLine  = regexp.MustCompile(`^  ok model=tiny-scripted queue=\d+ms wait=\d+ms inference=\d+ms, batch \S+ of \d+ worker=\S+$`)
	tokensLine   = regexp.MustCompile(`^  tokens in=\d+ out=([1-9]\d*) done=\S+$`)
)

// checkStreamBlocks reads text output as blocks: a header, indented text
// (the scripted model's fallback answer, exactly), the summary, the token
// line.
func checkStreamBlocks(t *testing.T, stdout string, want int) {
	t.Helper()
	lines := strings.Split(strings.TrimRight(stdout, "\n"), "\n")
	blocks := 0
	for i := 0; i < len(lines); i++ {
		if !streamHeader.MatchString(lines[i]) {
			continue
		}
		blocks++
		j := i + 1
		for j < len(lines) && strings.HasPrefix(lines[j], "  ") && !summaryLine.MatchString(lines[j]) {
			if strings.Contains(lines[j], "] streaming") {
				t.Errorf("a header inside another request's text at line %d:\n%s", j+1, stdout)
			}
			j++
		}
		if text := strings.TrimPrefix(strings.Join(lines[i+1:j], "\n"), "  "); text != tinymodel.FallbackAnswer {
			t.Errorf("the text under the header at line %d is %q, want %q:\n%s", i+1, text, tinymodel.FallbackAnswer, stdout)
		}
		if j+1 >= len(lines) || !summaryLine.MatchString(lines[j]) || !tokensLine.MatchString(lines[j+1]) {
			t.Errorf("the block at line %d does not end with its summary and token line:\n%s", i+1, stdout)
			return
		}
		i = j + 1
	}
	if blocks != want {
		t.Errorf("%d stream blocks, want %d:\n%s", blocks, want, stdout)
	}
}

// TestSousctlShowsIDsAndNotes: a request rejected as malformed comes back
// with the producer's own id; a num_predict above the worker's limit runs,
// capped, with a note.
func TestSousctlShowsIDsAndNotes(t *testing.T) {
	t.Parallel()
	q, _ := names(t)
	startWorker(t, q) // SOUS_MAX_NUM_PREDICT=16
	lines := `{"id":"mine","prompt":42}
{"id":"capped","prompt":"x","options":{"num_predict":100}}
`
	stdout, stderr, code := runSousctl(t, lines, "publish", "-url", brokerURL, "-queue", q, "-f", "-")
	if code != 1 || !strings.Contains(stderr, "1 request(s) failed") {
		t.Errorf("exit %d, stderr %q; want 1 and one failure", code, stderr)
	}
	for _, want := range []string{
		"[mine] error model=",
		`  error invalid_request: field "prompt" must be a string, not a JSON number`,
		"[capped] ok model=tiny",
		"  note: num_predict 100 capped at 16 (SOUS_MAX_NUM_PREDICT)",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("stdout lacks %q:\n%s", want, stdout)
		}
	}
}

// TestSousctlProgressOnATerminal: on a terminal, how many results arrived
// is drawn in place on one line and cleared at the end; piped, it comes as
// plain lines (TestSousctlStreamsStayWithTheirRequests). util-linux's
// script gives sousctl a terminal.
func TestSousctlProgressOnATerminal(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("script"); err != nil {
		t.Fatal("script (util-linux) is needed to give sousctl a terminal: apt-get install util-linux")
	}
	q, _ := names(t)
	startWorker(t, q)
	line := strings.Join([]string{filepath.Join(binDir, "sousctl"), "publish", "-url", brokerURL, "-queue", q, "a", "b", "c", "d", "e"}, " ")
	cmd := exec.Command("script", "-qefc", line, "/dev/null")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("sousctl on a terminal: %v\n%q", err, out)
	}
	text := string(out)
	if !strings.Contains(text, "\r\x1b[K5 of 5 results\r\x1b[K") { // drawn in place, then cleared
		t.Errorf("no in-place progress ending cleared:\n%q", text)
	}
	if strings.Contains(text, "sousctl: 5 of 5 results") {
		t.Errorf("plain progress lines on a terminal:\n%q", text)
	}
	if n := strings.Count(text, "] ok model=tiny"); n != 5 {
		t.Errorf("%d results printed, want 5:\n%q", n, text)
	}
}
