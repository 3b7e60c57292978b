package main

// Tools for publish: -tools offers functions to the model, -tool-choice
// picks among them, -tool-answer runs the agent loop (publish, receive the
// tool call, publish the conversation with the tool's answer, receive the
// final text), and tool calls in results and chunks are printed readably.
// Kept apart from publish.go, which calls in at a few marked places.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/wire"
)

// maxToolTurns bounds an agent loop: a model that keeps calling tools is
// stopped rather than followed forever.
const maxToolTurns = 8

// toolOptions are publish's tool flags.
type toolOptions struct {
	tools   json.RawMessage   // -tools FILE: a JSON list of tools (or one)
	choice  json.RawMessage   // -tool-choice
	answers map[string]string // -tool-answer NAME=TEXT
}

func (t *toolOptions) register(fs *flag.FlagSet) {
	fs.Func("tools", "offer the tools in this JSON file (a list of {\"type\":\"function\",\"function\":{\"name\",\"description\",\"parameters\"}}, or one); prompts go as chat messages", t.loadTools)
	fs.Func("tool-choice", "auto, none, required, or a function name the model must call (needs -tools)", func(s string) error {
		switch s {
		case "auto", "none", "required":
			t.choice, _ = json.Marshal(s)
		default:
			t.choice, _ = json.Marshal(map[string]any{"type": "function", "function": map[string]string{"name": s}})
		}
		return nil
	})
	fs.Func("tool-answer", "NAME=TEXT: when the model calls NAME, answer TEXT and publish the conversation again, until it answers in words (repeatable)", func(s string) error {
		name, text, ok := strings.Cut(s, "=")
		if !ok || name == "" {
			return errors.New("want NAME=TEXT, e.g. get_weather=sunny")
		}
		if t.answers == nil {
			t.answers = map[string]string{}
		}
		t.answers[name] = text
		return nil
	})
}

func (t *toolOptions) loadTools(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	b = bytes.TrimSpace(b)
	if len(b) > 0 && b[0] == '{' {
		b = append(append([]byte{'['}, b...), ']')
	}
	var tools []inference.Tool
	if err := json.Unmarshal(b, &tools); err != nil {
		return fmt.Errorf("%s is not a JSON list of tools: %v", path, err)
	}
	t.tools = b
	return nil
}

// offered reports whether -tools was given: prompts then go as chats.
func (t *toolOptions) offered() bool { return len(t.tools) > 0 }

// apply adds the tools to a request built from a prompt argument.
func (t *toolOptions) apply(r map[string]any) {
	if len(t.tools) > 0 {
		r["tools"] = t.tools
	}
	if len(t.choice) > 0 {
		r["tool_choice"] = t.choice
	}
}

// roundTrip is publish's round trip, or, with -tool-answer, the agent loop
// for each request in turn.
func (t *toolOptions) roundTrip(ctx context.Context, o options, reqs []request, stdout, stderr io.Writer) error {
	if len(t.answers) == 0 {
		return roundTrip(ctx, o, reqs, newPrinter(stdout, stderr, o.jsonOut, len(reqs)), stderr)
	}
	for _, r := range reqs {
		if err := t.converse(ctx, o, r, stdout, stderr); err != nil {
			return err
		}
	}
	return nil
}

// converse publishes r and, while the answer calls tools, the
// conversation with their answers.
func (t *toolOptions) converse(ctx context.Context, o options, r request, stdout, stderr io.Writer) error {
	body := r.body
	for turn := 1; ; turn++ {
		quiet := o
		quiet.jsonOut = true
		var buf bytes.Buffer
		err := roundTrip(ctx, quiet, []request{{body: body, stream: r.stream}}, newPrinter(&buf, io.Discard, true, 1), stderr)
		res, perr := printTurn(&buf, o, stdout)
		if err != nil {
			return err
		}
		if perr != nil {
			return perr
		}
		if res.Message == nil || len(res.Message.ToolCalls) == 0 {
			return nil
		}
		if turn == maxToolTurns {
			return fmt.Errorf("the model still calls tools after %d turns; stopping", turn)
		}
		if body, err = t.next(body, *res.Message); err != nil {
			return err
		}
		if !o.jsonOut {
			for _, c := range res.Message.ToolCalls {
				fmt.Fprintf(stdout, "  → %s answers %q; publishing the conversation again\n", c.Function.Name, t.answers[c.Function.Name])
			}
		}
	}
}

// printTurn prints what one round trip received (JSON lines: chunks, then
// the result) as publish would, and returns the result.
func printTurn(r io.Reader, o options, stdout io.Writer) (wire.Result, error) {
	var res wire.Result
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if o.jsonOut {
			fmt.Fprintln(stdout, string(line))
		}
		var probe struct {
			Seq *int `json:"seq"`
		}
		if json.Unmarshal(line, &probe) == nil && probe.Seq != nil {
			var c wire.Chunk
			if json.Unmarshal(line, &c) == nil && !o.jsonOut {
				fmt.Fprint(stdout, c.Delta)
				printChunkToolCalls(stdout, c)
			}
			continue
		}
		if err := json.Unmarshal(line, &res); err != nil {
			return res, fmt.Errorf("result is not JSON: %w", err)
		}
		if !o.jsonOut {
			printResult(stdout, res)
		}
	}
	return res, sc.Err()
}

// next is the request body for the turn after answer: the same request
// with the assistant's message and one tool message per call appended.
func (t *toolOptions) next(body []byte, answer inference.Message) ([]byte, error) {
	var req map[string]json.RawMessage
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, err
	}
	var msgs []json.RawMessage
	if err := json.Unmarshal(req["messages"], &msgs); err != nil || len(msgs) == 0 {
		return nil, errors.New("the model called a tool, but the request has no messages to continue")
	}
	add := func(v any) {
		b, _ := json.Marshal(v)
		msgs = append(msgs, b)
	}
	add(answer)
	for _, c := range answer.ToolCalls {
		text, ok := t.answers[c.Function.Name]
		if !ok {
			return nil, fmt.Errorf("the model called %s: give its answer with -tool-answer %s=TEXT", c.Function.Name, c.Function.Name)
		}
		add(inference.Message{Role: "tool", ToolCallID: c.ID, Content: text})
	}
	req["messages"], _ = json.Marshal(msgs)
	delete(req, "id") // each turn is its own request
	return json.Marshal(req)
}

// printToolCalls prints a result's tool calls, one line each.
func printToolCalls(w io.Writer, r wire.Result) {
	if r.Message == nil {
		return
	}
	writeToolCalls(w, r.Message.ToolCalls)
}

// printChunkToolCalls prints the tool calls a streamed chunk carries.
func printChunkToolCalls(w io.Writer, c wire.Chunk) {
	if len(c.ToolCalls) > 0 {
		fmt.Fprintln(w)
		writeToolCalls(w, c.ToolCalls)
	}
}

func writeToolCalls(w io.Writer, calls []inference.ToolCall) {
	for _, c := range calls {
		fmt.Fprintf(w, "  tool call: %s(%s)  id=%s\n", c.Function.Name, c.Function.Arguments, c.ID)
	}
}
