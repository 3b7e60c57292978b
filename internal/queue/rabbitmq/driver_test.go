package rabbitmq_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/queue/rabbitmq"
)

func uniqueQueue(t *testing.T) string {
	return fmt.Sprintf("sous-test-%s-%d-%d", strings.ReplaceAll(t.Name(), "/", "-"), time.Now().UnixNano(), seq.Add(1))
}

// rawChannel is a plain amqp091 channel on the test broker, beside the
// driver under test, closed by t.Cleanup.
func rawChannel(t *testing.T) *amqp.Channel {
	t.Helper()
	conn, err := amqp.Dial(brokerURL())
	if err != nil {
		t.Fatalf("dial the test broker: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	return ch
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func receiveOne(t *testing.T, ctx context.Context, d *rabbitmq.Driver) *queue.Delivery {
	t.Helper()
	ds, err := d.Receive(ctx, 1)
	if err != nil {
		t.Fatalf("receive: %v", err)
	}
	return ds[0]
}

// TestUnroutableIsAnError: a publish to a queue that does not exist is not
// a silent success, and a dead-letter whose queue is missing (to a driver
// that does not declare queues) leaves the delivery unsettled instead of
// dropping it.
func TestUnroutableIsAnError(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	// Declared once, as an operator would; the driver declares nothing.
	open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Consume: false}).Close()
	d := openAsIs(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 2, Consume: true}, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	err := d.Publish(ctx, queue.Message{To: q + ".nowhere", Body: []byte("x")})
	if !errors.Is(err, queue.ErrUnroutable) {
		t.Fatalf("publish to a missing queue: %v, want ErrUnroutable", err)
	}
	if err := d.Publish(ctx, queue.Message{To: q, MessageID: "m", Body: []byte("{}")}); err != nil {
		t.Fatalf("the channel did not survive: %v", err)
	}
	del := receiveOne(t, ctx, d)
	ch := rawChannel(t)
	if _, err := ch.QueueDelete(q+".dlq", false, false, false); err != nil {
		t.Fatal(err)
	}
	err = d.Settle(ctx, del, queue.Settlement{Action: queue.DeadLetter, Reason: "invalid_json"})
	if !errors.Is(err, queue.ErrUnroutable) {
		t.Fatalf("dead-letter to a missing DLQ: %v, want ErrUnroutable", err)
	}
	if err := d.Settle(ctx, del, queue.Settlement{Action: queue.Requeue, Reason: "dead_letter_failed"}); err != nil {
		t.Fatalf("the delivery was settled by the failed dead-letter: %v", err)
	}
	if again := receiveOne(t, ctx, d); again.ID != "m" {
		t.Fatalf("got %q back", again.ID)
	}
}

// TestReturnsFindTheirPublish: publishes to queues that exist and to queues
// that do not, many in flight at once on one channel, each with its own
// ids. Each one to a missing queue is unroutable to its caller, each other
// one succeeds and lands: a basic.return is matched to its own publish.
func TestReturnsFindTheirPublish(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	d := open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 1, Consume: false})
	const n = 400
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		to := q
		if i%3 == 0 {
			to = fmt.Sprintf("%s.nowhere-%d", q, i%7)
		}
		wg.Go(func() {
			errs[i] = d.Publish(ctx, queue.Message{To: to, MessageID: fmt.Sprint("m-", i), CorrelationID: fmt.Sprint("c-", i), Body: []byte("{}")})
		})
	}
	wg.Wait()
	landed := 0
	for i, err := range errs {
		switch {
		case i%3 == 0 && !errors.Is(err, queue.ErrUnroutable):
			t.Errorf("publish %d to a missing queue: %v, want ErrUnroutable", i, err)
		case i%3 != 0 && err != nil:
			t.Errorf("publish %d to %s: %v", i, q, err)
		case i%3 != 0:
			landed++
		}
	}
	qi, err := rawChannel(t).QueueDeclarePassive(q, true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if qi.Messages != landed {
		t.Fatalf("%d messages in %s, want the %d publishes that succeeded", qi.Messages, q, landed)
	}
}

// TestHeldAcksGo: an ack that no run can cover yet (an older delivery is
// still out) is held, then goes alone; one held while the older delivery
// ends is covered by that one's run. Nothing acked comes back, and the
// older delivery handed back does.
func TestHeldAcksGo(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	d := open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 8, Consume: true})
	for i := range 5 {
		if err := d.Publish(ctx, queue.Message{To: q, MessageID: fmt.Sprint(i), Body: []byte("{}")}); err != nil {
			t.Fatal(err)
		}
	}
	var got []*queue.Delivery
	for len(got) < 5 {
		ds, err := d.Receive(ctx, 5-len(got))
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, ds...)
	}
	settle := func(del *queue.Delivery, a queue.Action) <-chan error {
		done := make(chan error, 1)
		go func() { done <- d.Settle(ctx, del, queue.Settlement{Action: a, Reason: queue.ReasonShutdown}) }()
		return done
	}
	// 1 and 2 wait behind 0: held, then covered by 0's ack.
	held := []<-chan error{settle(got[1], queue.Ack), settle(got[2], queue.Ack)}
	if err := <-settle(got[0], queue.Ack); err != nil {
		t.Fatal(err)
	}
	for _, h := range held {
		if err := <-h; err != nil {
			t.Fatal(err)
		}
	}
	// 4 waits behind 3, which stays out: 4 goes alone. Then 3 goes back.
	if err := <-settle(got[4], queue.Ack); err != nil {
		t.Fatal(err)
	}
	if err := <-settle(got[3], queue.Requeue); err != nil {
		t.Fatal(err)
	}
	if again := receiveOne(t, ctx, d); again.ID != "3" {
		t.Fatalf("got %q back, want 3 (the one handed back)", again.ID)
	} else if err := d.Settle(ctx, again, queue.Settlement{Action: queue.Ack}); err != nil {
		t.Fatal(err)
	}
	d.Close()
	qi, err := rawChannel(t).QueueDeclarePassive(q, true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if qi.Messages != 0 {
		t.Fatalf("%d messages back in the queue after every delivery was acked", qi.Messages)
	}
}

// TestLongIDsDoNotKillTheChannel: AMQP short strings end at 255 bytes.
func TestLongIDsDoNotKillTheChannel(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	d := open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 1, Consume: true})
	if err := d.Publish(ctx, queue.Message{To: q, MessageID: strings.Repeat("x", 300), Body: []byte("x")}); err == nil {
		t.Fatal("a 300-byte message id was accepted")
	}
	if err := d.Publish(ctx, queue.Message{To: q, MessageID: "ok", Body: []byte("x")}); err != nil {
		t.Fatalf("the channel did not survive: %v", err)
	}
	if err := d.Ready(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestAttemptsCountOnClassicQueues: requeues are counted by the driver, so
// SOUS_MAX_ATTEMPTS works on queues without x-delivery-count too; a
// shutdown hands a delivery back without spending an attempt.
func TestAttemptsCountOnClassicQueues(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	ch := rawChannel(t)
	if _, err := ch.QueueDeclare(q, true, false, false, false, nil); err != nil { // classic
		t.Fatal(err)
	}
	d := open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 1, Consume: true})
	if err := d.Publish(ctx, queue.Message{To: q, MessageID: "c", Body: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	var seen []int
	for range 4 {
		del := receiveOne(t, ctx, d)
		seen = append(seen, del.Attempt)
		if err := d.Settle(ctx, del, queue.Settlement{Action: queue.Requeue, Reason: "engine_unavailable"}); err != nil {
			t.Fatal(err)
		}
	}
	del := receiveOne(t, ctx, d)
	seen = append(seen, del.Attempt)
	if err := d.Settle(ctx, del, queue.Settlement{Action: queue.Requeue, Reason: queue.ReasonShutdown}); err != nil {
		t.Fatal(err)
	}
	del = receiveOne(t, ctx, d)
	seen = append(seen, del.Attempt)
	if want := []int{1, 2, 3, 4, 5, 5}; fmt.Sprint(seen) != fmt.Sprint(want) {
		t.Fatalf("attempts %v, want %v", seen, want)
	}
	if err := d.Settle(ctx, del, queue.Settlement{Action: queue.Ack}); err != nil {
		t.Fatal(err)
	}
}

// TestConsumerCancelledByTheBroker: the queue is deleted under the worker.
// The broker cancels the consumer; the driver consumes again (here it
// declares the queue anew, as SOUS_DECLARE=true does) instead of going
// quiet.
func TestConsumerCancelledByTheBroker(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	d := open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 1, Consume: true})
	ch := rawChannel(t)
	if _, err := ch.QueueDelete(q, false, false, false); err != nil {
		t.Fatal(err)
	}
	got := make(chan *queue.Delivery, 1)
	go func() {
		ds, err := d.Receive(ctx, 1)
		if err == nil {
			got <- ds[0]
		}
		close(got)
	}()
	// Publish until the queue is back (unroutable until then).
	for {
		err := d.Publish(ctx, queue.Message{To: q, MessageID: "after", Body: []byte("{}")})
		if err == nil {
			break
		}
		if !errors.Is(err, queue.ErrUnroutable) && ctx.Err() == nil {
			t.Logf("publish while the driver reconnects: %v", err)
		}
		select {
		case <-ctx.Done():
			t.Fatal("the queue never came back")
		case <-time.After(50 * time.Millisecond):
		}
	}
	select {
	case del, ok := <-got:
		if !ok || del.ID != "after" {
			t.Fatalf("got %v", del)
		}
	case <-ctx.Done():
		t.Fatal("the worker went quiet after the broker cancelled its consumer")
	}
}

// TestPrefetchChangesDoNotPileUp: many prefetch changes never leave the
// worker holding more than the old window plus the new one.
func TestPrefetchChangesDoNotPileUp(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	d := open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 2, Consume: true})
	for i := range 40 {
		if err := d.Publish(ctx, queue.Message{To: q, MessageID: fmt.Sprint(i), Body: []byte("{}")}); err != nil {
			t.Fatal(err)
		}
	}
	var held []*queue.Delivery
	for i := range 10 {
		if err := d.SetPrefetch(ctx, 3+i%3); err != nil {
			t.Fatal(err)
		}
		short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		ds, _ := d.Receive(short, 100)
		cancel()
		held = append(held, ds...)
	}
	if len(held) > 2+5 {
		t.Fatalf("holding %d unacknowledged deliveries after prefetch changes, want at most 7", len(held))
	}
	for _, del := range held {
		if err := d.Settle(ctx, del, queue.Settlement{Action: queue.Ack}); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDirectReplyTo: RabbitMQ returns mandatory messages to direct reply-to
// as unroutable even as it delivers them; the driver must not call that a
// failure.
func TestDirectReplyTo(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	d := open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 1, Consume: true})
	ch := rawChannel(t)
	replies, err := ch.Consume("amq.rabbitmq.reply-to", "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.PublishWithContext(ctx, "", q, false, false, amqp.Publishing{MessageId: "r", ReplyTo: "amq.rabbitmq.reply-to", Body: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	del := receiveOne(t, ctx, d)
	if err := d.Publish(ctx, queue.Message{To: del.ReplyTo, CorrelationID: "r", Body: []byte("answer")}); err != nil {
		t.Fatalf("publish to direct reply-to: %v", err)
	}
	select {
	case m := <-replies:
		if string(m.Body) != "answer" {
			t.Fatalf("got %q", m.Body)
		}
	case <-ctx.Done():
		t.Fatal("no reply")
	}
}

// TestPrefetchChangeKeepsWhatWasDelivered: a delivery the old consumer had
// received is handed out after the consumer restarts for a new prefetch,
// even when nothing else arrives.
func TestPrefetchChangeKeepsWhatWasDelivered(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	d := open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 1, Consume: true})
	if err := d.Publish(ctx, queue.Message{To: q, MessageID: "only", Body: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // let the broker push it to the consumer
	if err := d.SetPrefetch(ctx, 4); err != nil {
		t.Fatal(err)
	}
	if got := receiveOne(t, ctx, d); got.ID != "only" {
		t.Fatalf("got %q", got.ID)
	}
}

func TestEnqueuedAtInMilliseconds(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	d := open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 1, Consume: true})
	ch := rawChannel(t)
	at := time.Now().Add(-1500 * time.Millisecond).Truncate(time.Millisecond)
	if err := ch.PublishWithContext(ctx, "", q, false, false, amqp.Publishing{MessageId: "t", Timestamp: at, Headers: amqp.Table{"timestamp_in_ms": at.UnixMilli()}, Body: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	got := receiveOne(t, ctx, d)
	if !got.EnqueuedAt.Equal(at) || got.EnqueuedResolution != time.Millisecond {
		t.Fatalf("EnqueuedAt %v (resolution %v), want %v to the millisecond", got.EnqueuedAt, got.EnqueuedResolution, at)
	}
	if err := d.Settle(ctx, got, queue.Settlement{Action: queue.Ack}); err != nil {
		t.Fatal(err)
	}
	// Without the header, the AMQP timestamp property: whole seconds, and
	// the delivery says so.
	if err := ch.PublishWithContext(ctx, "", q, false, false, amqp.Publishing{MessageId: "s", Timestamp: at, Body: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	if got := receiveOne(t, ctx, d); !got.EnqueuedAt.Equal(at.Truncate(time.Second)) || got.EnqueuedResolution != time.Second {
		t.Fatalf("EnqueuedAt %v (resolution %v), want %v in whole seconds", got.EnqueuedAt, got.EnqueuedResolution, at.Truncate(time.Second))
	}
}

// TestStaleAfterConnectionLoss: once the broker has closed the connection
// (here from the management API, as an operator would), a delivery of the
// lost session is stale, so the worker publishes no result for it; the
// broker redelivers it on the new session, where it is not stale.
func TestStaleAfterConnectionLoss(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	name := "sous-test " + q
	d := open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 2, Consume: true, ConnectionName: name})
	if err := d.Publish(ctx, queue.Message{To: q, MessageID: "s", Body: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	old := receiveOne(t, ctx, d)
	if d.Stale(old) {
		t.Fatal("a delivery of the live session is stale")
	}
	if n := itest.CloseConnections(t, name, 20*time.Second); n != 1 {
		t.Fatalf("closed %d connections named %q, want 1", n, name)
	}
	itest.WaitUntil(t, 10*time.Second, "the driver to see its session die", func() bool { return d.Stale(old) })
	again := receiveOne(t, ctx, d) // on the new session, after the reconnect
	if again.ID != "s" || d.Stale(again) {
		t.Fatalf("redelivery %q stale=%v, want s on a live session", again.ID, d.Stale(again))
	}
	if err := d.Settle(ctx, old, queue.Settlement{Action: queue.Ack}); !errors.Is(err, queue.ErrStale) {
		t.Fatalf("settle the stale copy: %v, want ErrStale", err)
	}
	if err := d.Settle(ctx, again, queue.Settlement{Action: queue.Ack}); err != nil {
		t.Fatal(err)
	}
	if d.Stale(&queue.Delivery{ID: "foreign", Handle: "not a rabbitmq handle"}) {
		t.Error("a foreign delivery is stale")
	}
}

// TestPrefetchAboveTheAMQPLimitIsClamped: the AMQP prefetch count is 16
// bits and amqp091-go's Qos casts its int to uint16, so 65,536 went out as
// 0, which RabbitMQ reads as unlimited (the whole queue on one worker), and
// 70,000 as 4,464. The driver clamps to 65,535 and says so, at Open and on
// SetPrefetch.
func TestPrefetchAboveTheAMQPLimitIsClamped(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		open, set int
	}{
		{"Open", 65536, 0},
		{"SetPrefetch", 2, 70000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx := testCtx(t)
			q := uniqueQueue(t)
			logs := &syncBuffer{}
			log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
			d := openWithLog(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: tt.open, Consume: true}, log)
			skip := -1
			if tt.set > 0 {
				if got := itest.ConsumerPrefetch(t, q, -1, 20*time.Second); got != tt.open {
					t.Fatalf("prefetch %d at Open, want %d", got, tt.open)
				}
				skip = tt.open
				if err := d.SetPrefetch(ctx, tt.set); err != nil {
					t.Fatal(err)
				}
				short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
				_, _ = d.Receive(short, 1) // applies the prefetch: a new consumer
				cancel()
			}
			if got := itest.ConsumerPrefetch(t, q, skip, 20*time.Second); got != 65535 {
				t.Fatalf("the broker applies prefetch %d, want 65535 (0 is unlimited)", got)
			}
			if !strings.Contains(logs.String(), "prefetch above the AMQP limit") {
				t.Errorf("no log line about the clamped prefetch:\n%s", logs.String())
			}
		})
	}
}

// syncBuffer collects a driver's log from its goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// TestMissingDeadLetterQueueIsDeclaredAgain: with Declare, a dead-letter
// that finds its queue deleted declares it again and lands there, rather
// than fail (the worker then kept the request in a loop, and before that
// lost it past the delivery limit).
func TestMissingDeadLetterQueueIsDeclaredAgain(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	dlq := q + ".dlq"
	d := open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: dlq, Prefetch: 10, Consume: true})
	ch := rawChannel(t)
	t.Cleanup(func() { _, _ = ch.QueueDelete(q, false, false, false); _, _ = ch.QueueDelete(dlq, false, false, false) })
	if _, err := ch.QueueDelete(dlq, false, false, false); err != nil {
		t.Fatal(err)
	}
	if err := d.Publish(ctx, queue.Message{To: q, MessageID: "bad", Body: []byte("nope"), Persistent: true}); err != nil {
		t.Fatal(err)
	}
	del := receiveOne(t, ctx, d)
	if err := d.Settle(ctx, del, queue.Settlement{Action: queue.DeadLetter, Reason: "invalid_json", Description: "not JSON"}); err != nil {
		t.Fatalf("dead-letter with the queue deleted: %v", err)
	}
	got, ok, err := ch.Get(dlq, true)
	if err != nil || !ok {
		t.Fatalf("nothing in the dead-letter queue declared again (ok %v, err %v)", ok, err)
	}
	if got.MessageId != "bad" || got.Headers[queue.HeaderDeadLetterReason] != "invalid_json" {
		t.Fatalf("dead letter %q with headers %v", got.MessageId, got.Headers)
	}
}
