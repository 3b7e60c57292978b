package reliability

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/wire"
)

// client is a producer and inspector with its own connection.
type client struct {
	t    testing.TB
	conn *amqp.Connection
	ch   *amqp.Channel // confirm mode
}

func newClient(t testing.TB, url string) *client {
	t.Helper()
	return newClientTLS(t, url, nil)
}

// dial connects to url, with TLS when tc is set.
func dial(url string, tc *tls.Config) (*amqp.Connection, error) {
	if tc != nil {
		return amqp.DialTLS(url, tc)
	}
	return amqp.Dial(url)
}

func newClientTLS(t testing.TB, url string, tc *tls.Config) *client {
	t.Helper()
	conn, err := dial(url, tc)
	if err != nil {
		t.Fatalf("connect to RabbitMQ at %s (the shared broker: `rabbitmq-server -detached`): %v", redactURL(url), err)
	}
	t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	return &client{t: t, conn: conn, ch: ch}
}

func redactURL(u string) string {
	if at := strings.LastIndex(u, "@"); at > 0 {
		if i := strings.Index(u, "://"); i > 0 {
			return u[:i+3] + "***" + u[at:]
		}
	}
	return u
}

// declare declares durable quorum queues, as the worker does.
func (c *client) declare(qs ...string) {
	c.t.Helper()
	for _, q := range qs {
		if _, err := c.ch.QueueDeclare(q, true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); err != nil {
			c.t.Fatalf("declare %s: %v", q, err)
		}
	}
}

// msg is one request to publish.
type msg struct {
	id, replyTo, contentType, body string
	headers                        amqp.Table
}

// request is the body of an ordinary request whose prompt is its id, so
// that the fake engine's echo ties a result to its request.
func request(id string) string {
	return `{"prompt":"` + id + `","options":{"num_predict":4}}`
}

func (c *client) publish(q string, m msg) {
	c.t.Helper()
	if err := c.publishAll(q, []msg{m}); err != nil {
		c.t.Fatal(err)
	}
}

// publishAll publishes persistent messages with confirms, pipelined in
// windows of 500, and returns once every one is confirmed.
func (c *client) publishAll(q string, ms []msg) error {
	const window = 500
	for start := 0; start < len(ms); start += window {
		var confs []*amqp.DeferredConfirmation
		for _, m := range ms[start:min(start+window, len(ms))] {
			ct := m.contentType
			if ct == "" {
				ct = "application/json"
			}
			conf, err := c.ch.PublishWithDeferredConfirmWithContext(context.Background(), "", q, false, false, amqp.Publishing{
				MessageId: m.id, ReplyTo: m.replyTo, ContentType: ct, DeliveryMode: amqp.Persistent,
				Timestamp: time.Now(), Headers: m.headers, Body: []byte(m.body)})
			if err != nil {
				return fmt.Errorf("publish %s: %w", m.id, err)
			}
			confs = append(confs, conf)
		}
		for _, conf := range confs {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			ok, err := conf.WaitContext(ctx)
			cancel()
			if err != nil || !ok {
				return fmt.Errorf("publish to %s not confirmed (ok=%v): %v", q, ok, err)
			}
		}
	}
	return nil
}

// publishRequests publishes n ordinary requests with ids prefix0..prefixN-1
// and returns the ids.
func (c *client) publishRequests(q, prefix string, n int) []string {
	c.t.Helper()
	ids := make([]string, n)
	ms := make([]msg, n)
	for i := range n {
		ids[i] = fmt.Sprintf("%s%d", prefix, i)
		ms[i] = msg{id: ids[i], body: request(ids[i])}
	}
	if err := c.publishAll(q, ms); err != nil {
		c.t.Fatal(err)
	}
	return ids
}

// depth is the number of ready messages in q.
func (c *client) depth(q string) int {
	c.t.Helper()
	return itest.QueueDepth(c.t, c.conn, q)
}

// drain returns what is in q now, acking it.
func (c *client) drain(q string) []amqp.Delivery {
	c.t.Helper()
	return itest.Drain(c.t, c.conn, q)
}

// ledger records what became of each request: results and dead letters,
// each counted once per distinct body (a message the follower sees twice
// because its own connection dropped is not a duplicate; a second result
// the worker published is), and results that do not belong to their
// request.
type ledger struct {
	mu      sync.Mutex
	results map[string]map[[32]byte]bool
	errors  map[string]wire.Result // the last error result per id
	dead    map[string][]amqp.Delivery
	deadSet map[string]map[[32]byte]bool
	wrong   []string
	// keepRaw keeps every delivery seen in raw (for tests that grep them).
	keepRaw bool
	raw     []amqp.Delivery
}

func newLedger() *ledger {
	return &ledger{results: map[string]map[[32]byte]bool{}, errors: map[string]wire.Result{}, dead: map[string][]amqp.Delivery{}, deadSet: map[string]map[[32]byte]bool{}}
}

// watch returns a ledger that follows the results and dead-letter queues
// of the request queue q (q.results, q.dlq) until the test ends.
func watch(t testing.TB, url, q string) *ledger {
	t.Helper()
	l := newLedger()
	l.follow(t, url, q+".results", "results", nil)
	l.follow(t, url, q+".dlq", "dead", nil)
	return l
}

// follow consumes q into the ledger until the test ends, reconnecting when
// the broker goes away: kind is "results" or "dead". Deliveries are acked
// after they are recorded.
func (l *ledger) follow(t testing.TB, url, q, kind string, tc *tls.Config) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	var readyOnce sync.Once
	var mu sync.Mutex
	var conn *amqp.Connection
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			c, err := dialFollow(url, q, tc)
			if err != nil {
				select {
				case <-ctx.Done():
				case <-time.After(200 * time.Millisecond):
				}
				continue
			}
			mu.Lock()
			conn = c.conn
			mu.Unlock()
			readyOnce.Do(func() { close(ready) })
			for d := range c.deliveries {
				l.record(kind, d)
				_ = d.Ack(false)
			}
			c.conn.Close()
		}
	}()
	t.Cleanup(func() {
		cancel()
		mu.Lock()
		if conn != nil {
			conn.Close()
		}
		mu.Unlock()
		<-done
	})
	select {
	case <-ready:
	case <-time.After(30 * time.Second):
		t.Fatalf("could not follow %s", q)
	}
}

type follower struct {
	conn       *amqp.Connection
	deliveries <-chan amqp.Delivery
}

func dialFollow(url, q string, tc *tls.Config) (*follower, error) {
	conn, err := dial(url, tc)
	if err != nil {
		return nil, err
	}
	ch, err := conn.Channel()
	if err == nil {
		_, err = ch.QueueDeclare(q, true, false, false, false, amqp.Table{"x-queue-type": "quorum"})
	}
	if err == nil {
		err = ch.Qos(500, 0, false)
	}
	var ds <-chan amqp.Delivery
	if err == nil {
		ds, err = ch.Consume(q, "", false, false, false, false, nil)
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	return &follower{conn: conn, deliveries: ds}, nil
}

func (l *ledger) record(kind string, d amqp.Delivery) {
	l.mu.Lock()
	defer l.mu.Unlock()
	id := d.CorrelationId
	if id == "" {
		id = d.MessageId
	}
	if l.keepRaw {
		l.raw = append(l.raw, d)
	}
	// The broker adds x-delivery-count to a redelivered copy: hash what the
	// publisher wrote.
	sum := sha256.Sum256(d.Body)
	if kind == "dead" {
		sum = sha256.Sum256(fmt.Appendf(nil, "%s\x00%v\x00%s", deadReason(d), d.Headers[queue.HeaderAttempts], d.Body))
		if l.deadSet[id] == nil {
			l.deadSet[id] = map[[32]byte]bool{}
		}
		if !l.deadSet[id][sum] {
			l.deadSet[id][sum] = true
			l.dead[id] = append(l.dead[id], d)
		}
		return
	}
	if l.results[id] == nil {
		l.results[id] = map[[32]byte]bool{}
	}
	if l.results[id][sum] {
		return // the follower's own redelivery
	}
	l.results[id][sum] = true
	var r wire.Result
	if err := json.Unmarshal(d.Body, &r); err != nil {
		l.wrong = append(l.wrong, fmt.Sprintf("%s: not JSON: %.200s", id, d.Body))
		return
	}
	if r.Status == wire.StatusOK && r.Response != nil && strings.HasPrefix(*r.Response, "echo:") && *r.Response != "echo:"+id {
		l.wrong = append(l.wrong, fmt.Sprintf("%s: carries the answer to another request: %q", id, *r.Response))
	}
	if r.Status == wire.StatusError {
		l.errors[id] = r
	}
}

// settled reports how many of ids have a result or a dead letter.
func (l *ledger) settled(ids []string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, id := range ids {
		if len(l.results[id]) > 0 || len(l.dead[id]) > 0 {
			n++
		}
	}
	return n
}

func (l *ledger) resultCount(id string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.results[id])
}

// errorResult is the last error result for id, if any.
func (l *ledger) errorResult(id string) (wire.Result, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	r, ok := l.errors[id]
	return r, ok
}

func (l *ledger) deadLetters(id string) []amqp.Delivery {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dead[id]
}

// tally is the outcome of a run over a set of ids.
type tally struct {
	ids        int
	answered   int // ids with at least one result
	dead       int // ids dead-lettered and never answered
	deadAndAns int // ids both answered and dead-lettered
	missing    []string
	duplicates int // results beyond the first, summed over ids
	dupIDs     int // ids with more than one result
	wrong      []string
}

func (l *ledger) tally(ids []string) tally {
	l.mu.Lock()
	defer l.mu.Unlock()
	tl := tally{ids: len(ids), wrong: append([]string(nil), l.wrong...)}
	for _, id := range ids {
		r, d := len(l.results[id]), len(l.dead[id])
		switch {
		case r > 0 && d > 0:
			tl.answered++
			tl.deadAndAns++
		case r > 0:
			tl.answered++
		case d > 0:
			tl.dead++
		default:
			tl.missing = append(tl.missing, id)
		}
		if r > 1 {
			tl.duplicates += r - 1
			tl.dupIDs++
		}
	}
	sort.Strings(tl.missing)
	return tl
}

func (tl tally) String() string {
	return fmt.Sprintf("ids=%d answered=%d dead_lettered=%d answered_and_dead=%d missing=%d duplicate_results=%d (on %d ids) wrong=%d",
		tl.ids, tl.answered, tl.dead, tl.deadAndAns, len(tl.missing), tl.duplicates, tl.dupIDs, len(tl.wrong))
}

// waitSettled waits until every id has a result or a dead letter and
// returns the tally; it fails the test with the tally when time runs out.
func (l *ledger) waitSettled(t testing.TB, ids []string, within time.Duration) tally {
	t.Helper()
	if !eventually(within, func() bool { return l.settled(ids) == len(ids) }) {
		tl := l.tally(ids)
		t.Fatalf("after %s: %s; first missing: %v", within, tl, first(tl.missing, 10))
	}
	// Let late duplicates arrive: a redelivery can follow its first result.
	time.Sleep(300 * time.Millisecond)
	return l.tally(ids)
}

func first(s []string, n int) []string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// checkNoLoss fails the test if a request is missing or a result belongs to
// another request.
func checkNoLoss(t testing.TB, tl tally) {
	t.Helper()
	if len(tl.missing) > 0 {
		t.Errorf("LOST %d requests: %v", len(tl.missing), first(tl.missing, 10))
	}
	if len(tl.wrong) > 0 {
		t.Errorf("%d wrong results: %v", len(tl.wrong), first(tl.wrong, 5))
	}
}

// deadReason is the sous reason header of a dead letter ("" when the broker
// dead-lettered it on its own, e.g. past x-delivery-limit).
func deadReason(d amqp.Delivery) string {
	s, _ := d.Headers[queue.HeaderDeadLetterReason].(string)
	return s
}
