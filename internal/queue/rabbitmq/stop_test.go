package rabbitmq_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/rs/zerolog"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/queue/rabbitmq"
	"github.com/sous-run/sous/internal/secret"
)

// slowLink is a TCP proxy to the test broker, in the test process, that
// delays every chunk by latency in each direction.
func slowLink(t *testing.T, latency time.Duration) string {
	t.Helper()
	u, err := amqp.ParseURI(brokerURL())
	if err != nil {
		t.Fatal(err)
	}
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	p := toxiproxy.NewProxy(srv, "slow-"+fmt.Sprint(seq.Add(1)), "127.0.0.1:0", fmt.Sprintf("%s:%d", u.Host, u.Port))
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	for _, stream := range []string{"upstream", "downstream"} {
		body := fmt.Sprintf(`{"name":"latency_%s","type":"latency","stream":%q,"attributes":{"latency":%d}}`, stream, stream, latency.Milliseconds())
		if _, err := p.Toxics.AddToxicJson(strings.NewReader(body)); err != nil {
			t.Fatal(err)
		}
	}
	u.Host, u.Port = "127.0.0.1", 0
	_, port, _ := strings.Cut(p.Listen, ":")
	if _, err := fmt.Sscan(port, &u.Port); err != nil {
		t.Fatal(err)
	}
	return u.String()
}

// TestStopReceivingOnASlowLink: at shutdown the driver hands every delivery
// the broker had pushed but the worker had not taken back to the queue,
// without spending an attempt (a copy with x-sous-attempts, then an ack).
// One at a time, each copy waited a round trip for its confirm: on a link
// with 100ms each way, 39 took about 8s, past the worker's 5s budget, and
// the rest were nacked back (an attempt spent on quorum queues) or left
// unacknowledged until the connection closed. Pipelined, they all go back
// within the budget, each once.
func TestStopReceivingOnASlowLink(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	const n = 40
	q := uniqueQueue(t)
	d := open(t, rabbitmq.Config{URL: secret.Value(slowLink(t, 100*time.Millisecond)), Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: n, Consume: true})
	ch := rawChannel(t)
	for i := range n {
		if err := ch.PublishWithContext(ctx, "", q, false, false, amqp.Publishing{MessageId: fmt.Sprint(i), Body: []byte("{}")}); err != nil {
			t.Fatal(err)
		}
	}
	taken := receiveOne(t, ctx, d)
	conn, err := amqp.Dial(brokerURL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	itest.WaitUntil(t, 10*time.Second, "the broker to push the whole window", func() bool { return itest.QueueDepth(t, conn, q) == 0 })
	time.Sleep(300 * time.Millisecond) // the last deliveries cross the slow link

	stopCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	began := time.Now()
	if err := d.StopReceiving(stopCtx); err != nil {
		t.Errorf("StopReceiving: %v", err)
	}
	t.Logf("handed back %d deliveries in %v on a link with 100ms each way", n-1, time.Since(began).Round(time.Millisecond))
	if err := d.Settle(ctx, taken, queue.Settlement{Action: queue.Ack}); err != nil {
		t.Fatal(err)
	}

	seen := map[string]int{}
	var spent []string
	itest.WaitUntil(t, 10*time.Second, "every delivery back in the queue", func() bool {
		for _, m := range itest.Drain(t, conn, q) {
			seen[m.MessageId]++
			if c, _ := m.Headers["x-delivery-count"].(int64); c > 0 || m.Redelivered {
				spent = append(spent, m.MessageId)
			}
		}
		return len(seen) == n-1
	})
	time.Sleep(300 * time.Millisecond)
	for _, m := range itest.Drain(t, conn, q) {
		seen[m.MessageId]++
	}
	for id, c := range seen {
		if c != 1 {
			t.Errorf("delivery %s is %d times in the queue", id, c)
		}
	}
	if len(spent) > 0 {
		t.Errorf("%d of %d deliveries came back with an attempt spent (nacked, or requeued by the connection's close): %v", len(spent), n-1, spent)
	}
}
