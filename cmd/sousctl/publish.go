package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/envcheck"
	"github.com/sous-run/sous/internal/lanes"
	"github.com/sous-run/sous/internal/queue/rabbitmq"
	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/wire"
)

const publishUsage = `usage: sousctl publish [flags] [prompt ...]

Publishes each prompt, or each JSON request line of -f FILE ("-" for stdin),
to the sous request queue, waits for the results on RabbitMQ's direct
reply-to and prints them. Flags may come before, between or after the
prompts; everything after -- is a prompt, even one that starts with "-".
-model, -chat and -stream also apply to the lines of -f; a line's own
"model", "messages" or "stream" wins. A missing request queue is declared
as the worker declares it (SOUS_DECLARE, SOUS_DEAD_LETTER_QUEUE and
SOUS_MAX_ATTEMPTS read as the worker reads them), so that requests wait
for a worker that has not started; with SOUS_DECLARE=false it is an error.

Exit code: 0 every result ok, 1 a request failed or a result did not arrive,
2 a usage error, 130 interrupted (the requests stay queued and still run).

Flags:
`

// maxLine bounds one request line of -f. The worker refuses bodies above
// SOUS_MAX_BODY_BYTES (1 MiB by default) anyway.
const maxLine = 16 << 20

type options struct {
	url     string
	queue   string
	lane    string // -lane: its queue, from SOUS_LANES, replaces queue
	model   string
	file    string
	jsonOut bool
	stream  bool
	chat    bool
	timeout time.Duration
	trace   *producerTrace // nil: no trace context in the requests
	tools   toolOptions    // -tools, -tool-choice, -tool-answer: tools.go
	// declare, deadLetterQueue and deliveryLimit are read as the worker
	// reads SOUS_DECLARE, SOUS_DEAD_LETTER_QUEUE and SOUS_MAX_ATTEMPTS:
	// with declare, a missing request queue is declared with the worker's
	// arguments before publishing, so that requests wait for a worker
	// that has not started yet (KEDA scales from zero on them). An
	// existing queue is used as it is.
	declare         bool
	deadLetterQueue string
	deliveryLimit   int
}

// request is one body to publish.
type request struct {
	body   []byte
	stream bool // the body asks for streamed output
}

func newFlagSet(o *options) *flag.FlagSet {
	fs := flag.NewFlagSet("publish", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are worded by parseArgs, -h printed by publish
	// No default shown in -h: SOUS_AMQP_URL may hold a password.
	fs.StringVar(&o.url, "url", "", "broker URL (default $SOUS_AMQP_URL, else amqp://guest:guest@localhost:5672/)")
	fs.StringVar(&o.queue, "queue", envOr("SOUS_QUEUE", "sous.requests"), "request queue (env SOUS_QUEUE)")
	fs.StringVar(&o.lane, "lane", "", "publish to this lane's queue, as SOUS_LANES names it (overrides -queue)")
	fs.StringVar(&o.model, "model", "", "model to ask for (default: the worker's SOUS_MODEL)")
	fs.StringVar(&o.file, "f", "", "read JSON requests, one per line, from this file (- for stdin)")
	fs.BoolVar(&o.jsonOut, "json", false, "print results (and stream chunks) as JSON lines")
	fs.BoolVar(&o.stream, "stream", false, "ask for streamed output and print it as it arrives")
	fs.BoolVar(&o.chat, "chat", false, "send each prompt as a chat message instead of a completion prompt")
	fs.DurationVar(&o.timeout, "timeout", 2*time.Minute, "how long to wait for all results")
	o.tools.register(fs) // tools.go
	return fs
}

// parseArgs parses flags wherever they are among the prompts: a flag after
// a prompt is a flag, not a prompt. Everything after "--" is a prompt.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var prompts, after []string
	for i, a := range args {
		if a == "--" {
			args, after = args[:i], args[i+1:]
			break
		}
	}
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			if name, ok := strings.CutPrefix(err.Error(), "flag provided but not defined: "); ok {
				return nil, fmt.Errorf("unknown flag %s (a prompt that starts with \"-\" goes after --, as in: sousctl publish -- %q)", name, name)
			}
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		prompts, args = append(prompts, args[0]), args[1:]
	}
	return append(prompts, after...), nil
}

func publish(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	warnUnknownEnv(stderr, os.Environ())
	var o options
	fs := newFlagSet(&o)
	prompts, err := parseArgs(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stdout, publishUsage)
		fs.SetOutput(stdout)
		fs.PrintDefaults()
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "sousctl publish: %v\nRun \"sousctl publish -h\" for the flags.\n", err)
		return 2
	}
	if o.url == "" {
		o.url = envOr("SOUS_AMQP_URL", "amqp://guest:guest@localhost:5672/")
	}
	if err := checkURL(o.url); err != nil {
		fmt.Fprintf(stderr, "sousctl publish: %v\n", err)
		return 2
	}
	if err := laneQueue(&o, os.Getenv("SOUS_LANES")); err != nil {
		fmt.Fprintf(stderr, "sousctl publish: %v\n", err)
		return 2
	}
	if err := declareOptions(&o); err != nil {
		fmt.Fprintf(stderr, "sousctl publish: %v\n", err)
		return 2
	}
	reqs, err := requests(o, prompts, stdin)
	if err != nil {
		fmt.Fprintf(stderr, "sousctl publish: %v\n", err)
		return 2
	}
	if len(reqs) == 0 {
		fmt.Fprint(stderr, "sousctl publish: nothing to publish: give prompts as arguments or -f FILE\n")
		return 2
	}
	o.trace = startTrace(ctx, stderr)
	traceOut := stdout
	if o.jsonOut {
		traceOut = stderr // stdout holds only JSON lines
	}
	fmt.Fprintf(traceOut, "trace_id=%s\n", o.trace.traceID())
	err = o.tools.roundTrip(ctx, o, reqs, stdout, stderr) // tools.go: roundTrip, or the agent loop
	if err != nil {
		msg := secret.Scrub(err.Error(), secret.Value(o.url))
		o.trace.finish(msg)
		fmt.Fprintf(stderr, "sousctl: %s\n", msg)
		if errors.Is(err, errInterrupted) {
			return 130
		}
		return 1
	}
	o.trace.finish("")
	return 0
}

// warnUnknownEnv says which SOUS_* variables of environ no part of sous
// reads, with the closest known name: a misspelled SOUS_QUEUE would otherwise publish to
// the default queue without a word.
func warnUnknownEnv(w io.Writer, environ []string) {
	for _, u := range envcheck.Check(environ) {
		fmt.Fprintf(w, "sousctl: warning: %s is not a variable sous reads; ignored (did you mean %s?)\n", u.Name, u.Closest)
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// checkURL refuses what is not an AMQP URL before dialling, naming the
// scheme it got but never the rest (it may hold a password).
func checkURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme == "" {
		return errors.New("-url (or SOUS_AMQP_URL) is not a URL; use one such as amqp://guest:guest@localhost:5672/")
	}
	if u.Scheme != "amqp" && u.Scheme != "amqps" {
		return fmt.Errorf("-url (or SOUS_AMQP_URL) starts with %s://, but sousctl speaks AMQP: use amqp:// or amqps://, such as amqp://guest:guest@localhost:5672/", truncateScheme(u.Scheme))
	}
	if u.Host == "" {
		return errors.New("-url (or SOUS_AMQP_URL) has no host; use one such as amqp://guest:guest@localhost:5672/")
	}
	return nil
}

func truncateScheme(s string) string {
	if len(s) > 16 {
		return s[:16] + "…"
	}
	return s
}

// requests turns arguments or request lines into bodies.
func requests(o options, prompts []string, stdin io.Reader) ([]request, error) {
	var out []request
	for _, p := range prompts {
		r := map[string]any{}
		if o.chat || o.tools.offered() { // tools.go
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
		out = append(out, request{body: b, stream: o.stream})
	}
	if o.file == "" {
		return out, nil
	}
	var in io.Reader = stdin
	name := "stdin"
	if o.file != "-" {
		f, err := os.Open(o.file)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		in, name = f, o.file
	}
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 64*1024), maxLine)
	n := 0
	for sc.Scan() {
		n++
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 || line[0] == '#' {
			continue
		}
		r, err := fromLine(o, line)
		if err != nil {
			return nil, fmt.Errorf("%s line %d %v", name, n, err)
		}
		out = append(out, r)
	}
	if errors.Is(sc.Err(), bufio.ErrTooLong) {
		return nil, fmt.Errorf("%s line %d is longer than the line limit of %d MiB: one request per line (the worker takes at most SOUS_MAX_BODY_BYTES, 1 MiB by default)", name, n+1, maxLine>>20)
	}
	if sc.Err() != nil {
		return nil, fmt.Errorf("read %s: %w", name, sc.Err())
	}
	return out, nil
}

// fromLine applies -model, -chat and -stream to one request line; a
// field the line sets itself wins. A line the flags do not change is
// published as it is.
func fromLine(o options, line []byte) (request, error) {
	var m map[string]json.RawMessage
	if !json.Valid(line) {
		return request{}, errors.New(`is not JSON: expected JSON lines, one request per line, such as {"prompt": "Why is the sky blue?"}; to publish plain text as prompts, drop -f and pass them as arguments`)
	}
	if err := json.Unmarshal(line, &m); err != nil || m == nil {
		return request{}, errors.New(`is JSON but not a request object such as {"prompt": "Why is the sky blue?"}`)
	}
	changed := false
	set := func(k string, v any) {
		b, _ := json.Marshal(v)
		m[k], changed = b, true
	}
	if _, has := m["model"]; o.model != "" && !has {
		set("model", o.model)
	}
	if p, has := m["prompt"]; o.chat && has && m["messages"] == nil {
		var text string
		if json.Unmarshal(p, &text) == nil {
			delete(m, "prompt")
			set("messages", []map[string]string{{"role": "user", "content": text}})
		}
	}
	if _, has := m["stream"]; o.stream && !has && m["input"] == nil {
		set("stream", true)
	}
	var stream bool
	_ = json.Unmarshal(m["stream"], &stream)
	if !changed {
		return request{body: append([]byte(nil), line...), stream: stream}, nil
	}
	b, err := json.Marshal(m)
	if err != nil {
		return request{}, err
	}
	return request{body: b, stream: stream}, nil
}

func newID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// errInterrupted marks a run stopped by SIGINT or SIGTERM.
var errInterrupted = errors.New("interrupted")

// dial connects to the broker and words its errors for a person: a refused
// password is not a broker that is down.
func dial(rawURL string) (*amqp.Connection, error) {
	conn, err := amqp.DialConfig(rawURL, amqp.Config{Properties: amqp.Table{"connection_name": "sousctl"}})
	if err == nil {
		return conn, nil
	}
	where := secret.URL(rawURL)
	var aerr *amqp.Error
	var nerr *net.OpError
	switch {
	case errors.Is(err, amqp.ErrCredentials) || errors.As(err, &aerr) && aerr.Code == amqp.AccessRefused:
		return nil, fmt.Errorf("the broker at %s refused the user name or password: check the credentials in -url or SOUS_AMQP_URL", where)
	case errors.As(err, &aerr):
		return nil, fmt.Errorf("the broker at %s refused the connection: %s", where, aerr.Reason)
	case errors.As(err, &nerr):
		return nil, fmt.Errorf("cannot reach the broker at %s: %v (is RabbitMQ running? `rabbitmq-server -detached`)", where, nerr.Err)
	}
	return nil, fmt.Errorf("connect to %s: %v", where, err)
}

// declareOptions reads SOUS_DECLARE, SOUS_DEAD_LETTER_QUEUE and
// SOUS_MAX_ATTEMPTS with the worker's defaults.
// laneQueue points o at the queue of the lane -lane names, read from spec
// (SOUS_LANES) as the worker reads it.
func laneQueue(o *options, spec string) error {
	if o.lane == "" {
		return nil
	}
	if strings.TrimSpace(spec) == "" {
		return fmt.Errorf("-lane %s: SOUS_LANES is not set; set it as the workers have it (e.g. SOUS_LANES=\"interactive=sous.interactive,bulk=sous.bulk:share=0.2\"), or use -queue", o.lane)
	}
	ls, err := lanes.Parse(spec, o.queue)
	if err != nil {
		return fmt.Errorf("SOUS_LANES: %v", err)
	}
	l, ok := lanes.Find(ls, o.lane)
	if !ok {
		return fmt.Errorf("-lane %s: SOUS_LANES has no such lane (it has %s)", o.lane, strings.Join(lanes.Names(ls), ", "))
	}
	o.queue = l.Queue
	return nil
}

func declareOptions(o *options) error {
	var err error
	if o.declare, err = strconv.ParseBool(envOr("SOUS_DECLARE", "true")); err != nil {
		return errors.New("SOUS_DECLARE must be true or false")
	}
	o.deadLetterQueue = envOr("SOUS_DEAD_LETTER_QUEUE", o.queue+".dlq")
	if o.deliveryLimit, err = strconv.Atoi(envOr("SOUS_MAX_ATTEMPTS", "5")); err != nil || o.deliveryLimit <= 0 {
		return errors.New("SOUS_MAX_ATTEMPTS must be a whole number greater than zero")
	}
	return nil
}

// errNoQueue: the request queue does not exist.
var errNoQueue = errors.New("does not exist")

// consumers returns how many consumers the queue has. It uses its own
// channel: a passive declare of a missing queue closes the channel.
func consumers(conn *amqp.Connection, queue string) (int, error) {
	ch, err := conn.Channel()
	if err != nil {
		return 0, err
	}
	q, err := ch.QueueDeclarePassive(queue, false, false, false, false, nil)
	var aerr *amqp.Error
	if errors.As(err, &aerr) && aerr.Code == amqp.NotFound {
		return 0, fmt.Errorf("queue %q %w: start the worker first, or publish with SOUS_DECLARE=true (the default), which declares it, or check -queue / SOUS_QUEUE", queue, errNoQueue)
	}
	if err != nil {
		return 0, fmt.Errorf("check queue %q: %w", queue, err)
	}
	_ = ch.Close()
	return q.Consumers, nil
}

// roundTrip publishes every request with direct reply-to and prints each
// result. ctx is cancelled on SIGINT or SIGTERM.
func roundTrip(ctx context.Context, o options, reqs []request, p *printer, stderr io.Writer) error {
	conn, err := dial(o.url)
	if err != nil {
		return err
	}
	defer conn.Close()
	workers, err := consumers(conn, o.queue)
	if errors.Is(err, errNoQueue) && o.declare {
		// No worker has run yet (KEDA scales from zero): declare the
		// queue as the worker would, so that the requests wait for one.
		log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
		if err := rabbitmq.DeclareRequestQueue(conn, o.queue, o.deadLetterQueue, o.deliveryLimit, log); err != nil {
			return fmt.Errorf("%w (or set SOUS_DECLARE=false and declare it yourself)", err)
		}
		fmt.Fprintf(stderr, "sousctl: declared queue %q (and %q) as the worker does (SOUS_DECLARE=true)\n", o.queue, o.deadLetterQueue)
		workers, err = consumers(conn, o.queue)
	}
	if err != nil {
		return err
	}
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
	// Mandatory publishing: a request the broker cannot route (the queue
	// went away since the check) comes back before its confirm.
	returns := ch.NotifyReturn(make(chan amqp.Return, len(reqs)))
	pending := map[string]bool{} // id → streamed
	interrupted := func() error {
		return fmt.Errorf("%w after publishing %d of %d request(s): those stay queued on %s and will still run", errInterrupted, len(pending), len(reqs), o.queue)
	}
	for _, r := range reqs {
		if ctx.Err() != nil {
			return interrupted()
		}
		id := newID()
		headers, sent := o.trace.send(o.queue, id)
		if headers == nil {
			headers = amqp.Table{}
		}
		// Milliseconds, for queue_ms: the AMQP timestamp has whole seconds.
		headers["timestamp_in_ms"] = time.Now().UnixMilli()
		conf, err := ch.PublishWithDeferredConfirmWithContext(ctx, "", o.queue, true, false, amqp.Publishing{
			ContentType: "application/json", DeliveryMode: amqp.Persistent, MessageId: id, CorrelationId: id,
			ReplyTo: "amq.rabbitmq.reply-to", Timestamp: time.Now(), Body: r.body, Headers: headers,
		})
		if err != nil {
			sent(err)
			if ctx.Err() != nil {
				return interrupted()
			}
			return fmt.Errorf("publish: %w", err)
		}
		if ok, err := conf.WaitContext(ctx); err != nil || !ok {
			if ctx.Err() != nil {
				// The broker may still take this one: it is not counted.
				sent(ctx.Err())
				return interrupted()
			}
			err = fmt.Errorf("the broker did not confirm the request (queue %q exists?): %v", o.queue, err)
			sent(err)
			return err
		}
		// amqp091-go delivers a return before the confirm of the same
		// message, and the channel is buffered for every request.
		select {
		case ret := <-returns:
			err := fmt.Errorf("queue %q does not exist (%s): start the worker first, or publish with SOUS_DECLARE=true (the default), which declares it, or check -queue / SOUS_QUEUE", o.queue, ret.ReplyText)
			sent(err)
			return err
		default:
		}
		sent(nil)
		pending[id] = r.stream
	}
	where := o.queue
	if o.lane != "" {
		where = fmt.Sprintf("lane %s (%s)", o.lane, o.queue)
	}
	p.published(len(reqs), where)
	if workers == 0 {
		fmt.Fprintf(stderr, "sousctl: no worker is consuming %s; the requests stay queued until one starts (waiting up to %s)\n", o.queue, o.timeout)
	}
	timeout := time.NewTimer(o.timeout)
	defer timeout.Stop()
	failed := 0
	for len(pending) > 0 {
		select {
		case <-ctx.Done():
			p.endLine()
			return fmt.Errorf("%w while waiting for %d result(s): the requests stay on %s and will still run; their results will not come back to this sousctl", errInterrupted, len(pending), o.queue)
		case <-timeout.C:
			p.endLine()
			why := ""
			if workers == 0 {
				why = " (no worker was consuming it)"
			}
			return fmt.Errorf("%d result(s) did not arrive within %s: the requests stay on %s%s and will still run; their results will not come back to this sousctl", len(pending), o.timeout, o.queue, why)
		case m, ok := <-replies:
			if !ok {
				p.endLine()
				return errors.New("the broker closed the connection while waiting for results")
			}
			streamed, mine := pending[m.CorrelationId]
			if !mine {
				continue
			}
			if m.Headers["x-sous-status"] == "chunk" {
				p.chunk(m.CorrelationId, m.Body)
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
			p.result(m.CorrelationId, m.Body, r, streamed)
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d request(s) failed", failed)
	}
	return nil
}
