package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/secret"
)

const dlqUsage = `usage: sousctl dlq list [flags]
       sousctl dlq show [flags] ID ...
       sousctl dlq replay [flags] (ID ... | -all)

Reads the worker's RabbitMQ dead-letter queue (SOUS_DEAD_LETTER_QUEUE, by
default <SOUS_QUEUE>.dlq).

  list    each dead letter: its id, why it was dead-lettered
          (x-sous-dead-letter-reason and -description), the attempts made
          and the queue it came from; the messages stay in the queue
  show    the dead letters with these ids (message id, else correlation id),
          with every header and the body
  replay  put the dead letters with these ids (or -all) back on their
          source queue without the dead-letter headers, each removed from
          the dead-letter queue only after the broker confirmed the
          republish; a replayed request gets SOUS_MAX_ATTEMPTS afresh

list and show read the queue by taking the messages unacknowledged and
closing the channel, which hands them back to the broker as they were.

Exit code: 0 done, 1 an id was not found or a republish failed (that
message stays in the dead-letter queue), 2 a usage error.

Flags:
`

// dlqOptions are the flags of sousctl dlq.
type dlqOptions struct {
	url     string
	queue   string
	dlq     string
	limit   int
	all     bool
	jsonOut bool
	timeout time.Duration
}

// replayDrop are the headers a replay leaves out: the dead-letter record,
// the attempt count (the request starts afresh), the driver's publish tag,
// the mark of a request answered before a failed dead-letter (it would be
// dead-lettered again at once), and the broker's own counts.
var replayDrop = []string{
	queue.HeaderDeadLetterReason, queue.HeaderDeadLetterDescription, queue.HeaderAttempts, queue.HeaderSourceQueue,
	"x-sous-publish-id", "x-sous-answered", "x-delivery-count", "x-death", "x-first-death-exchange",
	"x-first-death-queue", "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason",
}

func dlq(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "-help" || args[0] == "--help" || args[0] == "help" {
		w := stderr
		code := 2
		if len(args) > 0 {
			w, code = stdout, 0
		}
		var o dlqOptions
		fmt.Fprint(w, dlqUsage)
		fs := newDLQFlagSet(&o)
		fs.SetOutput(w)
		fs.PrintDefaults()
		return code
	}
	sub := args[0]
	if sub != "list" && sub != "show" && sub != "replay" {
		fmt.Fprintf(stderr, "sousctl dlq: unknown command %q: use list, show or replay (sousctl dlq -h)\n", sub)
		return 2
	}
	var o dlqOptions
	fs := newDLQFlagSet(&o)
	ids, err := parseArgs(fs, args[1:])
	if errors.Is(err, flag.ErrHelp) {
		return dlq(ctx, []string{"-h"}, stdout, stderr)
	}
	if err != nil {
		fmt.Fprintf(stderr, "sousctl dlq %s: %v\n", sub, err)
		return 2
	}
	if o.url == "" {
		o.url = envOr("SOUS_AMQP_URL", "amqp://guest:guest@localhost:5672/")
	}
	if o.dlq == "" {
		o.dlq = o.queue + ".dlq"
	}
	switch {
	case sub == "list" && len(ids) > 0:
		err = errors.New("list takes no ids; sousctl dlq show ID shows one")
	case sub == "show" && len(ids) == 0:
		err = errors.New("give the ids to show (sousctl dlq list lists them)")
	case sub == "replay" && len(ids) == 0 && !o.all:
		err = errors.New("give the ids to replay, or -all")
	case sub == "replay" && len(ids) > 0 && o.all:
		err = errors.New("give ids or -all, not both")
	case o.limit < 1:
		err = errors.New("-n must be 1 or more")
	}
	if err == nil {
		err = checkURL(o.url)
	}
	if err != nil {
		fmt.Fprintf(stderr, "sousctl dlq %s: %v\n", sub, err)
		return 2
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	switch sub {
	case "list":
		err = dlqList(ctx, o, stdout)
	case "show":
		err = dlqShow(ctx, o, ids, stdout)
	case "replay":
		err = dlqReplay(ctx, o, ids, stdout)
	}
	if err != nil {
		fmt.Fprintf(stderr, "sousctl dlq %s: %s\n", sub, secret.Scrub(err.Error(), secret.Value(o.url)))
		return 1
	}
	return 0
}

func newDLQFlagSet(o *dlqOptions) *flag.FlagSet {
	fs := flag.NewFlagSet("dlq", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.url, "url", "", "broker URL (default $SOUS_AMQP_URL, else amqp://guest:guest@localhost:5672/)")
	fs.StringVar(&o.queue, "queue", envOr("SOUS_QUEUE", "sous.requests"), "request queue: the replay target of a dead letter without x-sous-source-queue (env SOUS_QUEUE)")
	fs.StringVar(&o.dlq, "dlq", os.Getenv("SOUS_DEAD_LETTER_QUEUE"), "dead-letter queue (env SOUS_DEAD_LETTER_QUEUE; default <queue>.dlq)")
	fs.IntVar(&o.limit, "n", 1000, "read at most this many dead letters")
	fs.BoolVar(&o.all, "all", false, "replay: every dead letter read (up to -n)")
	fs.BoolVar(&o.jsonOut, "json", false, "list, show: JSON lines with headers and body")
	fs.DurationVar(&o.timeout, "timeout", time.Minute, "how long the whole command may take")
	return fs
}

// deadLetter is one message of the dead-letter queue as the commands show
// it.
type deadLetter struct {
	ID          string         `json:"id"`
	Reason      string         `json:"reason"`
	Description string         `json:"description"`
	Attempts    int64          `json:"attempts"`
	SourceQueue string         `json:"source_queue"`
	Headers     map[string]any `json:"headers"`
	Body        string         `json:"body"`

	d amqp.Delivery
}

func newDeadLetter(d amqp.Delivery) deadLetter {
	id := d.MessageId
	if id == "" {
		id = d.CorrelationId
	}
	str := func(k string) string { s, _ := d.Headers[k].(string); return s }
	var attempts int64
	switch v := d.Headers[queue.HeaderAttempts].(type) {
	case int64:
		attempts = v
	case int32:
		attempts = int64(v)
	case int:
		attempts = int64(v)
	}
	return deadLetter{
		ID: id, Reason: str(queue.HeaderDeadLetterReason), Description: str(queue.HeaderDeadLetterDescription),
		Attempts: attempts, SourceQueue: str(queue.HeaderSourceQueue), Headers: d.Headers, Body: string(d.Body), d: d,
	}
}

// browse takes up to o.limit messages of the dead-letter queue
// unacknowledged on ch and returns them; closing ch hands back those not
// acked. It stops at what the queue held when it started.
func browse(ctx context.Context, ch *amqp.Channel, o dlqOptions) ([]deadLetter, error) {
	st, err := ch.QueueDeclarePassive(o.dlq, false, false, false, false, nil)
	if err != nil {
		return nil, fmt.Errorf("dead-letter queue %q: %w (set -dlq or SOUS_DEAD_LETTER_QUEUE)", o.dlq, err)
	}
	want := min(st.Messages, o.limit)
	if want == 0 {
		return nil, nil
	}
	if err := ch.Qos(want, 0, false); err != nil {
		return nil, err
	}
	// The consumer is cancelled here, before the caller goes on with the
	// channel. ConsumeWithContext would cancel it from a goroutine of its
	// own when ctx ends, an RPC racing the caller's next one on the same
	// channel (its Close, or replay's Confirm): amqp091-go does not
	// serialise a channel's RPCs, a reply can reach the wrong waiter, and a
	// CI run saw `dlq list` hang until it was killed.
	tag := fmt.Sprintf("sousctl-dlq-%d", time.Now().UnixNano())
	msgs, err := ch.Consume(o.dlq, tag, false, false, false, false, nil)
	if err != nil {
		return nil, fmt.Errorf("read %q: %w", o.dlq, err)
	}
	defer func() { _ = ch.Cancel(tag, false) }() // what it took stays unacked: closing the channel hands it back
	var out []deadLetter
	for len(out) < want {
		select {
		case d, ok := <-msgs:
			if !ok {
				return nil, fmt.Errorf("read %q: the channel closed", o.dlq)
			}
			out = append(out, newDeadLetter(d))
		case <-ctx.Done():
			// Another consumer took some: show what arrived.
			if len(out) > 0 {
				return out, nil
			}
			return nil, fmt.Errorf("read %q: %w", o.dlq, ctx.Err())
		}
	}
	return out, nil
}

// session dials and opens a channel; close hands back what was not acked.
func dlqSession(o dlqOptions) (*amqp.Channel, func(), error) {
	conn, err := dial(o.url)
	if err != nil {
		return nil, nil, err
	}
	ch, err := conn.Channel()
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	return ch, func() { _ = ch.Close(); _ = conn.Close() }, nil
}

// readDLQ reads the dead-letter queue without removing anything, in a
// session of its own. A short wait per read: it shows what is there, it
// does not wait for more.
func readDLQ(ctx context.Context, o dlqOptions) ([]deadLetter, error) {
	ch, closeSession, err := dlqSession(o)
	if err != nil {
		return nil, err
	}
	defer closeSession()
	bctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return browse(bctx, ch, o)
}

func dlqList(ctx context.Context, o dlqOptions, stdout io.Writer) error {
	dls, err := readDLQ(ctx, o)
	if err != nil {
		return err
	}
	if o.jsonOut {
		return printJSON(stdout, dls)
	}
	if len(dls) == 0 {
		fmt.Fprintf(stdout, "%s is empty\n", o.dlq)
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tREASON\tATTEMPTS\tSOURCE\tDESCRIPTION")
	for _, d := range dls {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", orDash(d.ID), orDash(d.Reason), d.Attempts, orDash(d.SourceQueue), orDash(oneLine(d.Description, 100)))
	}
	return tw.Flush()
}

func dlqShow(ctx context.Context, o dlqOptions, ids []string, stdout io.Writer) error {
	dls, err := readDLQ(ctx, o)
	if err != nil {
		return err
	}
	var picked []deadLetter
	for _, d := range dls {
		if slices.Contains(ids, d.ID) {
			picked = append(picked, d)
		}
	}
	if o.jsonOut {
		if err := printJSON(stdout, picked); err != nil {
			return err
		}
	} else {
		for _, d := range picked {
			fmt.Fprintf(stdout, "id:          %s\nreason:      %s\ndescription: %s\nattempts:    %d\nsource:      %s\n", d.ID, orDash(d.Reason), orDash(d.Description), d.Attempts, orDash(d.SourceQueue))
			for _, k := range slices.Sorted(maps.Keys(d.Headers)) {
				fmt.Fprintf(stdout, "header:      %s=%v\n", k, d.Headers[k])
			}
			fmt.Fprintf(stdout, "body:        %s\n\n", d.Body)
		}
	}
	return missing(ids, picked)
}

// dlqReplay republishes the chosen dead letters, one at a time, each acked
// in the dead-letter queue only once the broker confirmed its copy on the
// source queue; one it could not place (no such queue, a nack) stays.
func dlqReplay(ctx context.Context, o dlqOptions, ids []string, stdout io.Writer) error {
	ch, closeSession, err := dlqSession(o)
	if err != nil {
		return err
	}
	defer closeSession()
	bctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	dls, err := browse(bctx, ch, o)
	cancel()
	if err != nil {
		return err
	}
	if err := ch.Confirm(false); err != nil {
		return fmt.Errorf("enable publisher confirms: %w", err)
	}
	// Buffered: the library hands a basic.return over before it handles
	// the basic.ack of the same publish, so after the confirm any return
	// of this publish is already here.
	returns := ch.NotifyReturn(make(chan amqp.Return, 1))
	var picked []deadLetter
	var failed []string
	for _, d := range dls {
		if !o.all && !slices.Contains(ids, d.ID) {
			continue
		}
		picked = append(picked, d)
		to := d.SourceQueue
		if to == "" {
			to = o.queue
		}
		if err := republish(ctx, ch, returns, to, d.d); err != nil {
			failed = append(failed, fmt.Sprintf("%s: %v", orDash(d.ID), err))
			continue
		}
		if err := d.d.Ack(false); err != nil {
			// The copy is on the source queue and the dead letter comes
			// back: the request may run twice. Say so.
			return fmt.Errorf("%s was replayed to %s, but removing it from %s failed (it is still there; do not replay it again): %w", orDash(d.ID), to, o.dlq, err)
		}
		fmt.Fprintf(stdout, "replayed %s to %s\n", orDash(d.ID), to)
	}
	if o.all && len(picked) == 0 {
		fmt.Fprintf(stdout, "%s is empty\n", o.dlq)
	}
	var errs []error
	if !o.all {
		if err := missing(ids, picked); err != nil {
			errs = append(errs, err)
		}
	}
	if len(failed) > 0 {
		errs = append(errs, fmt.Errorf("not replayed, still in %s: %s", o.dlq, strings.Join(failed, "; ")))
	}
	return errors.Join(errs...)
}

// republish publishes a copy of d to queue to without the dead-letter
// headers and waits for the broker's confirm. A copy the broker returned
// (no such queue) or nacked is an error.
func republish(ctx context.Context, ch *amqp.Channel, returns <-chan amqp.Return, to string, d amqp.Delivery) error {
	headers := amqp.Table{}
	for k, v := range d.Headers {
		if !slices.Contains(replayDrop, k) {
			headers[k] = v
		}
	}
	conf, err := ch.PublishWithDeferredConfirmWithContext(ctx, "", to, true, false, amqp.Publishing{
		Headers: headers, ContentType: d.ContentType, ContentEncoding: d.ContentEncoding,
		DeliveryMode: amqp.Persistent, Priority: d.Priority, CorrelationId: d.CorrelationId,
		ReplyTo: d.ReplyTo, Expiration: d.Expiration, MessageId: d.MessageId, Timestamp: d.Timestamp,
		Type: d.Type, AppId: d.AppId, Body: d.Body,
	})
	if err != nil {
		return fmt.Errorf("publish to %s: %w", to, err)
	}
	ok, err := conf.WaitContext(ctx)
	if err != nil {
		return fmt.Errorf("publish to %s: no confirm: %w", to, err)
	}
	select {
	case r := <-returns:
		return fmt.Errorf("the broker returned it: %s (is there a queue %q?)", r.ReplyText, to)
	default:
	}
	if !ok {
		return fmt.Errorf("the broker refused it (nack) on %s", to)
	}
	return nil
}

func missing(ids []string, found []deadLetter) error {
	var miss []string
	for _, id := range ids {
		if !slices.ContainsFunc(found, func(d deadLetter) bool { return d.ID == id }) {
			miss = append(miss, id)
		}
	}
	if len(miss) > 0 {
		return fmt.Errorf("not in the dead-letter queue: %s", strings.Join(miss, ", "))
	}
	return nil
}

func printJSON(w io.Writer, dls []deadLetter) error {
	enc := json.NewEncoder(w)
	for _, d := range dls {
		if err := enc.Encode(d); err != nil {
			return err
		}
	}
	return nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
