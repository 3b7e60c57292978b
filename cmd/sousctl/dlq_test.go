package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// deadLetters fills a fresh dead-letter queue as the worker's driver does:
// copies with the reason, description, attempts and source queue headers,
// and the driver's publish tag. It returns the source queue, the
// dead-letter queue and a channel to inspect them.
func deadLetters(t *testing.T) (src, dlq string, ch *amqp.Channel) {
	t.Helper()
	src, ch = testQueue(t)
	dlq = src + ".dlq"
	if _, err := ch.QueueDeclare(dlq, true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = ch.QueueDelete(dlq, false, false, false) })
	for i, reason := range []string{"invalid_json", "engine_error", "model_not_allowed"} {
		err := ch.PublishWithContext(context.Background(), "", dlq, false, false, amqp.Publishing{
			MessageId: fmt.Sprintf("q-%d", i+1), CorrelationId: fmt.Sprintf("q-%d", i+1), ReplyTo: "amq.rabbitmq.reply-to.x",
			DeliveryMode: amqp.Persistent, ContentType: "application/json",
			Headers: amqp.Table{
				"x-sous-dead-letter-reason": reason, "x-sous-dead-letter-description": "what went wrong with " + reason,
				"x-sous-attempts": int64(i + 1), "x-sous-source-queue": src, "x-sous-publish-id": "p-1",
				"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
			},
			Body: []byte(fmt.Sprintf(`{"prompt":"p%d"}`, i+1)),
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, func() bool { return depth(t, ch, dlq) == 3 })
	return src, dlq, ch
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 20s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestDLQListShowsReasons(t *testing.T) {
	t.Parallel()
	_, dlq, ch := deadLetters(t)
	r := sousctl(t, "", "dlq", "list", "-url", brokerURL(), "-dlq", dlq)
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	for _, want := range []string{"ID", "REASON", "q-1", "invalid_json", "q-2", "engine_error", "q-3", "model_not_allowed", "what went wrong with engine_error", dlq[:len(dlq)-4]} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("list does not say %q:\n%s", want, r.stdout)
		}
	}
	// Listing takes nothing away.
	waitFor(t, func() bool { return depth(t, ch, dlq) == 3 })

	r = sousctl(t, "", "dlq", "show", "-json", "-url", brokerURL(), "-dlq", dlq, "q-2")
	var got deadLetter
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &got) != nil {
		t.Fatalf("show: exit %d, %q %s", r.code, r.stdout, r.stderr)
	}
	if got.ID != "q-2" || got.Reason != "engine_error" || got.Attempts != 2 || got.Body != `{"prompt":"p2"}` || got.Headers["traceparent"] == nil {
		t.Errorf("show q-2 = %+v", got)
	}
	if r := sousctl(t, "", "dlq", "show", "-url", brokerURL(), "-dlq", dlq, "q-9"); r.code != 1 || !strings.Contains(r.stderr, "q-9") {
		t.Errorf("show of a missing id: exit %d, %s", r.code, r.stderr)
	}
	waitFor(t, func() bool { return depth(t, ch, dlq) == 3 })
}

// Replay puts the message back on its source queue as it was before it
// was dead-lettered, and takes it from the dead-letter queue; the others
// stay.
func TestDLQReplay(t *testing.T) {
	t.Parallel()
	src, dlq, ch := deadLetters(t)
	r := sousctl(t, "", "dlq", "replay", "-url", brokerURL(), "-dlq", dlq, "q-2")
	if r.code != 0 || !strings.Contains(r.stdout, "replayed q-2 to "+src) {
		t.Fatalf("replay: exit %d, %s %s", r.code, r.stdout, r.stderr)
	}
	waitFor(t, func() bool { return depth(t, ch, src) == 1 && depth(t, ch, dlq) == 2 })
	d, ok, err := ch.Get(src, true)
	if err != nil || !ok {
		t.Fatalf("get: %v %v", ok, err)
	}
	if d.MessageId != "q-2" || d.CorrelationId != "q-2" || d.ReplyTo != "amq.rabbitmq.reply-to.x" || string(d.Body) != `{"prompt":"p2"}` || d.DeliveryMode != amqp.Persistent {
		t.Errorf("replayed message = %+v", d)
	}
	for k := range d.Headers {
		if strings.HasPrefix(k, "x-sous-") || strings.HasPrefix(k, "x-death") {
			t.Errorf("replayed message keeps header %s=%v", k, d.Headers[k])
		}
	}
	if d.Headers["traceparent"] == nil {
		t.Errorf("replayed message lost its traceparent: %v", d.Headers)
	}
	out := sousctl(t, "", "dlq", "list", "-url", brokerURL(), "-dlq", dlq).stdout
	if strings.Contains(out, "q-2") || !strings.Contains(out, "q-1") || !strings.Contains(out, "q-3") {
		t.Errorf("after replaying q-2 the list is\n%s", out)
	}
}

// A dead letter whose source queue is gone stays in the dead-letter queue:
// it is removed only after the broker confirmed the copy.
func TestDLQReplayKeepsWhatItCannotPlace(t *testing.T) {
	t.Parallel()
	src, dlq, ch := deadLetters(t)
	if _, err := ch.QueueDelete(src, false, false, false); err != nil {
		t.Fatal(err)
	}
	r := sousctl(t, "", "dlq", "replay", "-all", "-url", brokerURL(), "-dlq", dlq)
	if r.code != 1 || !strings.Contains(r.stderr, "still in "+dlq) {
		t.Fatalf("replay to a missing queue: exit %d, %s %s", r.code, r.stdout, r.stderr)
	}
	waitFor(t, func() bool { return depth(t, ch, dlq) == 3 })
}

func TestDLQUsage(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"dlq"}, {"dlq", "purge"}, {"dlq", "show"}, {"dlq", "replay"}, {"dlq", "replay", "-all", "q-1"}, {"dlq", "list", "q-1"}} {
		if r := sousctl(t, "", args...); r.code != 2 {
			t.Errorf("%q: exit %d, want 2: %s", args, r.code, r.stderr)
		}
	}
	if r := sousctl(t, "", "help", "dlq"); r.code != 0 || !strings.Contains(r.stdout, "x-sous-dead-letter-reason") {
		t.Errorf("help dlq: exit %d: %s", r.code, r.stdout)
	}
}

// The README's requests.jsonl and tools.json are what its examples feed
// to sousctl: they must read as sousctl reads them.
func TestReadmeExampleFiles(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	block := func(name, lang string) string {
		m := regexp.MustCompile("`" + regexp.QuoteMeta(name) + "`[^\n]*\n+```" + lang + "\n((?s:.*?))```").FindSubmatch(readme)
		if m == nil {
			t.Fatalf("README.md shows no %s (a ```%s block after a line naming it)", name, lang)
		}
		return string(m[1])
	}
	dir := t.TempDir()
	reqs := filepath.Join(dir, "requests.jsonl")
	tools := filepath.Join(dir, "tools.json")
	if err := os.WriteFile(reqs, []byte(block("requests.jsonl", "jsonl")), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tools, []byte(block("tools.json", "json")), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := requests(options{file: reqs}, nil, nil)
	if err != nil || len(got) < 2 {
		t.Errorf("requests.jsonl: %d requests, %v", len(got), err)
	}
	var o toolOptions
	if err := o.loadTools(tools); err != nil || !o.offered() {
		t.Errorf("tools.json: %v", err)
	}
	if !strings.Contains(string(o.tools), `"get_weather"`) {
		t.Errorf("tools.json does not offer get_weather, which the README's -tool-answer answers: %s", o.tools)
	}
}
