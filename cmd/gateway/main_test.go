package main

import (
	"bufio"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// gatewayLines runs the gateway's main in a child with env and returns its
// JSON log lines up to and including the first whose msg is until.
func gatewayLines(t *testing.T, env []string, until string) []map[string]any {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestExitTwoOnBadConfig$")
	cmd.Env = append(os.Environ(), append([]string{"SOUS_GATEWAY_TEST_MAIN=1"}, env...)...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	var lines []map[string]any
	sc := bufio.NewScanner(stderr)
	for sc.Scan() {
		var line map[string]any
		if json.Unmarshal(sc.Bytes(), &line) != nil {
			continue
		}
		lines = append(lines, line)
		if line["msg"] == until {
			return lines
		}
	}
	t.Fatalf("the gateway ended without logging %q: %v", until, lines)
	return nil
}

// A misspelled variable is warned about at start, naming the one meant;
// durations in JSON logs read as text ("250ms"), not nanoseconds. The
// broker port is closed, so the gateway logs its retry and its wait.
func TestStartLogsWarnAndReadDurations(t *testing.T) {
	t.Parallel()
	lines := gatewayLines(t, []string{"SOUS_MODEL=m", "SOUS_ENGNE_URL=http://x", "SOUS_AMQP_URL=amqp://guest:guest@127.0.0.1:9/",
		"SOUS_HTTP_ADDR=off", "OTEL_SDK_DISABLED=true", "SOUS_GATEWAY_ADDR=127.0.0.1:0"}, "cannot connect to the broker; retrying")
	warned := false
	for _, l := range lines {
		if l["var"] == "SOUS_ENGNE_URL" && l["did_you_mean"] == "SOUS_ENGINE_URL" && l["level"] == "WARN" {
			warned = true
		}
	}
	if !warned {
		t.Errorf("no warning naming SOUS_ENGNE_URL and SOUS_ENGINE_URL in %v", lines)
	}
	retry := lines[len(lines)-1]["retry_in"]
	if s, ok := retry.(string); !ok {
		t.Errorf("retry_in = %#v, want a duration as text", retry)
	} else if _, err := time.ParseDuration(s); err != nil {
		t.Errorf("retry_in = %q: %v", s, err)
	}
}

// The workers' SOUS_LANES without SOUS_GATEWAY_LANES (a ConfigMap the
// gateway shares with the workers) is warned about at start: every request
// would go to SOUS_QUEUE.
func TestStartWarnsOfWorkerLanesAlone(t *testing.T) {
	t.Parallel()
	lines := gatewayLines(t, []string{"SOUS_MODEL=m", "SOUS_LANES=interactive=sous.interactive,bulk=sous.bulk", "SOUS_AMQP_URL=amqp://guest:guest@127.0.0.1:9/",
		"SOUS_HTTP_ADDR=off", "OTEL_SDK_DISABLED=true", "SOUS_GATEWAY_ADDR=127.0.0.1:0"}, "cannot connect to the broker; retrying")
	for _, l := range lines {
		if msg, _ := l["msg"].(string); l["level"] == "WARN" && strings.Contains(msg, "SOUS_GATEWAY_LANES is not") {
			return
		}
	}
	t.Errorf("no warning that SOUS_GATEWAY_LANES is not set in %v", lines)
}
