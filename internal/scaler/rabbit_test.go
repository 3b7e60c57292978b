package scaler_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/fleet"
	"github.com/sous-run/sous/internal/scaler"
	"github.com/sous-run/sous/internal/secret"
)

func brokerURL() string {
	if u := os.Getenv("RABBITMQ_URL"); u != "" {
		return u
	}
	return "amqp://guest:guest@127.0.0.1:5672/"
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// On the real broker: depths by passive declare, the workers' reports
// read from the fanout exchange into the view, and the view's costs saved
// in the last-value state queue and read back by the next scaler.
func TestRabbit(t *testing.T) {
	t.Parallel()
	conn, err := amqp.Dial(brokerURL())
	if err != nil {
		t.Fatalf("RabbitMQ at %s (`rabbitmq-server -detached`): %v", brokerURL(), err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("sous-scaler-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	exchange, state, q := name+".reports", name+".state", name+".requests"
	t.Cleanup(func() {
		c, _ := amqp.Dial(brokerURL())
		if c == nil {
			return
		}
		defer c.Close()
		cc, _ := c.Channel()
		for _, n := range []string{state, q} {
			_, _ = cc.QueueDelete(n, false, false, false)
		}
		_ = cc.ExchangeDelete(exchange, false, false)
	})
	if _, err := ch.QueueDeclare(q, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	for i := range 7 {
		if err := ch.Publish("", q, false, false, amqp.Publishing{Body: fmt.Appendf(nil, `{"prompt":"%d"}`, i)}); err != nil {
			t.Fatal(err)
		}
	}
	cfg := scaler.RabbitConfig{URL: secret.Value(brokerURL()), SaveEvery: 50 * time.Millisecond, StateQueue: state, Exchange: exchange}
	r := scaler.NewRabbit(cfg, discard)
	defer r.Close()
	waitFor(t, "7 ready requests", func() bool {
		n, unacked, err := r.Depth(context.Background(), q)
		return err == nil && n == 7 && !unacked
	})
	if _, _, err := r.Depth(context.Background(), name+".missing"); !errors.Is(err, scaler.ErrNoQueue) {
		t.Fatalf("a missing queue: %v, want ErrNoQueue", err)
	}
	if n, _, err := r.Depth(context.Background(), q); err != nil || n != 7 { // the channel reopens after a 404
		t.Fatalf("after a missing queue: %d, %v", n, err)
	}

	view := fleet.NewView(nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); r.Run(ctx, view) }()
	rep := fleet.Report{Worker: "w1", Lane: "bulk", Queue: q, At: time.Now(), Limit: 8, MeanServiceS: 4, InFlight: 2}
	body, _ := json.Marshal(rep)
	waitFor(t, "the report in the view", func() bool {
		// Published until the scaler's queue is bound: a fanout exchange
		// drops what arrives before.
		_ = ch.ExchangeDeclare(exchange, amqp.ExchangeFanout, true, false, false, false, nil)
		_ = ch.Publish(exchange, "", false, false, amqp.Publishing{Body: body})
		s := view.Lane(q, time.Now())
		return s.Known && s.Workers == 1
	})
	if s := view.Lane(q, time.Now()); math.Abs(s.Cost-0.5) > 1e-9 || s.InFlight != 2 {
		t.Fatalf("lane %+v, want cost 4/8 = 0.5 and 2 held", s)
	}
	waitFor(t, "the costs saved", func() bool {
		costs, err := scaler.NewRabbit(cfg, discard).LoadState()
		return err == nil && costs[q] == 0.5
	})
	cancel()
	<-done
}
