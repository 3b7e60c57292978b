package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/wire"
)

const weatherTool = `{"type":"function","function":{"name":"get_weather","description":"weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}`

func decodes(t *testing.T, body []byte) *wire.Decoded {
	t.Helper()
	d, err := wire.DecodeRequest(body, "application/json", "m", wire.Limits{MaxBodyBytes: 1 << 20, DefaultModel: "tiny"}, time.Now())
	if err != nil {
		t.Fatalf("the worker would refuse %s: %v", body, err)
	}
	return d
}

func parseTools(t *testing.T, args ...string) toolOptions {
	t.Helper()
	var o toolOptions
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	o.register(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	return o
}

func TestToolsFlagsBuildAChatWithTools(t *testing.T) {
	t.Parallel()
	file := filepath.Join(t.TempDir(), "tools.json")
	if err := os.WriteFile(file, []byte(weatherTool), 0o644); err != nil { // one tool, not a list
		t.Fatal(err)
	}
	tools := parseTools(t, "-tools", file, "-tool-choice", "get_weather", "-tool-answer", "get_weather=sunny")
	reqs, err := requests(options{tools: tools}, []string{"What is the weather in Paris?"}, nil)
	if err != nil || len(reqs) != 1 {
		t.Fatal(err, reqs)
	}
	bodies := [][]byte{reqs[0].body}
	d := decodes(t, bodies[0])
	if d.Req.Kind != inference.Chat || len(d.Req.Tools) != 1 || d.Req.Tools[0].Function.Name != "get_weather" ||
		string(d.Req.ToolChoice) != `{"function":{"name":"get_weather"},"type":"function"}` {
		t.Errorf("request %s: want a chat offering get_weather, chosen by name", bodies[0])
	}

	// The next turn: the assistant's call and the tool's answer appended.
	call := inference.Message{Role: "assistant", ToolCalls: []inference.ToolCall{{ID: "call_1", Type: "function", Function: inference.ToolCallFunction{Name: "get_weather", Arguments: json.RawMessage(`{"city":"Paris"}`)}}}}
	next, err := tools.next(bodies[0], call)
	if err != nil {
		t.Fatal(err)
	}
	d = decodes(t, next)
	if n := len(d.Req.Messages); n != 3 || d.Req.Messages[2].Role != "tool" || d.Req.Messages[2].Content != "sunny" || d.Req.Messages[2].ToolCallID != "call_1" ||
		len(d.Req.Messages[1].ToolCalls) != 1 || len(d.Req.Tools) != 1 {
		t.Errorf("next turn %s", next)
	}

	other := call
	other.ToolCalls = []inference.ToolCall{{ID: "c", Function: inference.ToolCallFunction{Name: "get_time", Arguments: json.RawMessage(`{}`)}}}
	if _, err := tools.next(bodies[0], other); err == nil || !strings.Contains(err.Error(), "-tool-answer get_time=") {
		t.Errorf("a call without an answer: %v, want advice to pass -tool-answer", err)
	}
}

func TestToolFlagErrors(t *testing.T) {
	t.Parallel()
	bad := filepath.Join(t.TempDir(), "bad.json")
	_ = os.WriteFile(bad, []byte(`{"nope"`), 0o644)
	for _, args := range [][]string{{"-tools", bad}, {"-tools", "/no/such/file"}, {"-tool-answer", "no-equals"}} {
		var o toolOptions
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		o.register(fs)
		if err := fs.Parse(args); err == nil {
			t.Errorf("%q: no error", args)
		}
	}
}

func TestPrintToolCalls(t *testing.T) {
	t.Parallel()
	var b bytes.Buffer
	r := wire.Result{ID: "r", Status: "ok", Message: &inference.Message{Role: "assistant", ToolCalls: []inference.ToolCall{{ID: "call_1", Function: inference.ToolCallFunction{Name: "get_weather", Arguments: json.RawMessage(`{"city":"Paris"}`)}}}}}
	printResult(&b, r)
	if !strings.Contains(b.String(), `tool call: get_weather({"city":"Paris"})  id=call_1`) {
		t.Errorf("printed:\n%s", b.String())
	}
}
