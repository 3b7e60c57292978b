package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/wire"
)

type options struct {
	url     string
	queue   string
	model   string
	file    string
	jsonOut bool
	stream  bool
	chat    bool
	timeout time.Duration
	trace   *producerTrace // nil: no trace context in the requests
	tools   toolOptions    // -tools, -tool-choice, -tool-answer: tools.go
}

func publish(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	var o options
	fs := flag.NewFlagSet("publish", flag.ContinueOnError)
	fs.SetOutput(stderr)
	// No default shown in -h: SOUS_AMQP_URL may hold a password.
	fs.StringVar(&o.url, "url", "", "broker URL (default $SOUS_AMQP_URL, else amqp://guest:guest@localhost:5672/)")
	fs.StringVar(&o.queue, "queue", envOr("SOUS_QUEUE", "sous.requests"), "request queue (env SOUS_QUEUE)")
	fs.StringVar(&o.model, "model", "", "model to ask for (default: the worker's SOUS_MODEL)")
	fs.StringVar(&o.file, "f", "", "read JSON requests, one per line, from this file (- for stdin)")
	fs.BoolVar(&o.jsonOut, "json", false, "print results as JSON lines")
	fs.BoolVar(&o.stream, "stream", false, "ask for streamed output and print it as it arrives")
	fs.BoolVar(&o.chat, "chat", false, "send each prompt as a chat message instead of a completion prompt")
	fs.DurationVar(&o.timeout, "timeout", 2*time.Minute, "how long to wait for all results")
	o.tools.register(fs) // tools.go
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if o.url == "" {
		o.url = envOr("SOUS_AMQP_URL", "amqp://guest:guest@localhost:5672/")
	}
	bodies, err := requests(o, fs.Args(), stdin)
	if err != nil {
		fmt.Fprintf(stderr, "sousctl: %v\n", err)
		return 2
	}
	if len(bodies) == 0 {
		fmt.Fprint(stderr, "sousctl: nothing to publish: give prompts as arguments or -f FILE\n")
		return 2
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	o.trace = startTrace(ctx, stderr)
	traceOut := stdout
	if o.jsonOut {
		traceOut = stderr // stdout holds only JSON lines
	}
	fmt.Fprintf(traceOut, "trace_id=%s\n", o.trace.traceID())
	if err := o.tools.roundTrip(ctx, o, bodies, stdout); err != nil { // tools.go: roundTrip, or the agent loop
		msg := secret.Scrub(err.Error(), secret.Value(o.url))
		o.trace.finish(msg)
		fmt.Fprintf(stderr, "sousctl: %s\n", msg)
		return 1
	}
	o.trace.finish("")
	return 0
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// requests turns arguments or request lines into JSON bodies.
func requests(o options, prompts []string, stdin io.Reader) ([][]byte, error) {
	var out [][]byte
	for _, p := range prompts {
		r := map[string]any{}
		if o.chat || o.tools.offered() {
			r["messages"] = []map[string]string{{"role": "user", "content": p}}
		} else {
			r["prompt"] = p
		}
		if o.model != "" {
			r["model"] = o.model
		}
		if o.stream {
			r["stream"] = true
		}
		o.tools.apply(r) // tools.go
		b, _ := json.Marshal(r)
		out = append(out, b)
	}
	if o.file == "" {
		return out, nil
	}
	var in io.Reader = stdin
	if o.file != "-" {
		f, err := os.Open(o.file)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		in = f
	}
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 64*1024), 16<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if !json.Valid([]byte(line)) {
			return nil, fmt.Errorf("%s line %d is not JSON", o.file, n)
		}
		out = append(out, []byte(line))
	}
	return out, sc.Err()
}

func newID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// roundTrip publishes every body with direct reply-to and prints each result.
func roundTrip(ctx context.Context, o options, bodies [][]byte, stdout io.Writer) error {
	conn, err := amqp.DialConfig(o.url, amqp.Config{Properties: amqp.Table{"connection_name": "sousctl"}})
	if err != nil {
		return fmt.Errorf("connect to %s: %v (is RabbitMQ running? `rabbitmq-server -detached`)", secret.URL(o.url), err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	// Direct reply-to: consume the pseudo-queue on the same channel we
	// publish on, with auto-ack (RabbitMQ requires both).
	replies, err := ch.Consume("amq.rabbitmq.reply-to", "", true, false, false, false, nil)
	if err != nil {
		return fmt.Errorf("consume direct reply-to: %w", err)
	}
	if err := ch.Confirm(false); err != nil {
		return err
	}
	// Mandatory publishing: a request the broker cannot route (no such
	// queue) comes back before its confirm, instead of vanishing.
	returns := ch.NotifyReturn(make(chan amqp.Return, len(bodies)))
	pending := map[string]int{}
	for i, body := range bodies {
		id := newID()
		pending[id] = i
		headers, sent := o.trace.send(o.queue, id)
		if headers == nil {
			headers = amqp.Table{}
		}
		// Milliseconds, for queue_ms: the AMQP timestamp has whole seconds.
		headers["timestamp_in_ms"] = time.Now().UnixMilli()
		conf, err := ch.PublishWithDeferredConfirmWithContext(ctx, "", o.queue, true, false, amqp.Publishing{
			ContentType: "application/json", DeliveryMode: amqp.Persistent, MessageId: id, CorrelationId: id,
			ReplyTo: "amq.rabbitmq.reply-to", Timestamp: time.Now(), Body: body, Headers: headers,
		})
		if err != nil {
			sent(err)
			return fmt.Errorf("publish: %w", err)
		}
		if ok, err := conf.WaitContext(ctx); err != nil || !ok {
			err = fmt.Errorf("broker did not confirm the request (queue %q exists?): %v", o.queue, err)
			sent(err)
			return err
		}
		// amqp091-go delivers a return before the confirm of the same
		// message, and the channel is buffered for every request.
		select {
		case r := <-returns:
			err := fmt.Errorf("queue %q does not exist (%s): start the worker first (it declares its queue) or check -queue / SOUS_QUEUE", o.queue, r.ReplyText)
			sent(err)
			return err
		default:
		}
		sent(nil)
	}
	if !o.jsonOut {
		fmt.Fprintf(stdout, "published %d request(s) to %s; waiting for results…\n", len(bodies), o.queue)
	}
	failed := 0
	for len(pending) > 0 {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d result(s) did not arrive in time: %w (is a worker running?)", len(pending), ctx.Err())
		case m, ok := <-replies:
			if !ok {
				return errors.New("connection closed while waiting for results")
			}
			if _, mine := pending[m.CorrelationId]; !mine {
				continue
			}
			if m.Headers["x-sous-status"] == "chunk" {
				if !o.jsonOut {
					var c wire.Chunk
					if json.Unmarshal(m.Body, &c) == nil {
						if c.Restart {
							fmt.Fprintf(stdout, "\n[%s] (stream restarted, attempt %d)\n", c.ID, c.Attempt)
						}
						fmt.Fprint(stdout, c.Delta)
						printChunkToolCalls(stdout, c) // tools.go
					}
				} else {
					fmt.Fprintln(stdout, string(m.Body))
				}
				continue
			}
			delete(pending, m.CorrelationId)
			var r wire.Result
			if err := json.Unmarshal(m.Body, &r); err != nil {
				return fmt.Errorf("result is not JSON: %w", err)
			}
			if r.Status != wire.StatusOK {
				failed++
			}
			if o.jsonOut {
				fmt.Fprintln(stdout, string(m.Body))
			} else {
				printResult(stdout, r, o.stream)
			}
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d request(s) failed", failed)
	}
	return nil
}

func printResult(w io.Writer, r wire.Result, streamed bool) {
	if streamed {
		fmt.Fprintln(w)
	}
	batch := ""
	if r.Batch != nil {
		batch = fmt.Sprintf(", batch %s of %d", r.Batch.ID, r.Batch.Size)
	}
	fmt.Fprintf(w, "[%s] %s model=%s queue=%dms wait=%dms inference=%dms%s worker=%s\n", r.ID, r.Status, r.Model, r.Timing.QueueMS, r.Timing.BatchWaitMS, r.Timing.InferenceMS, batch, r.Worker)
	switch {
	case r.Error != nil:
		fmt.Fprintf(w, "  error %s: %s\n", r.Error.Code, r.Error.Message)
	case r.Response != nil && !streamed:
		fmt.Fprintf(w, "  %s\n", strings.ReplaceAll(*r.Response, "\n", "\n  "))
	case r.Message != nil && !streamed && (r.Message.Content != "" || len(r.Message.ToolCalls) == 0): // tool calls: tools.go
		fmt.Fprintf(w, "  %s: %s\n", r.Message.Role, strings.ReplaceAll(r.Message.Content, "\n", "\n  "))
	case r.Embeddings != nil:
		fmt.Fprintf(w, "  %d embedding(s)\n", len(r.Embeddings))
	}
	printToolCalls(w, r) // tools.go
	if r.Usage != nil {
		fmt.Fprintf(w, "  tokens in=%d out=%d done=%s\n", r.Usage.InputTokens, r.Usage.OutputTokens, r.DoneReason)
	}
}
