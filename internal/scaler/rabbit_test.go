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

// On the real broker: a producer's demand on the reports exchange reaches
// the view, and GetMetrics rises to the replicas its deadline needs.
func TestRabbitDemand(t *testing.T) {
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
	name := fmt.Sprintf("sous-scaler-demand-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	exchange, state, q := name+".reports", name+".state", name+".bulk"
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
	r := scaler.NewRabbit(scaler.RabbitConfig{URL: secret.Value(brokerURL()), StateQueue: state, Exchange: exchange}, discard)
	defer r.Close()
	view := fleet.NewView(nil)
	// The prior prices a request at 1 s of one replica; 30 minutes early.
	s := scaler.New(scaler.Config{PriorCost: 1, DeadlineMargin: 30 * time.Minute}, view, r, discard)
	md := map[string]string{"queue": q, "targetDrainSeconds": "300"}
	waitFor(t, "7 ready requests", func() bool { return metric(t, s, md) == 7 })

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); r.Run(ctx, view) }()
	defer func() { cancel(); <-done }()
	// 3,600 requests due within the hour: 3,600 s of one replica in less
	// than 1,800 s, more than 2 replicas, more than 600 s at target 300.
	now := time.Now()
	body, _ := json.Marshal(fleet.Demand{Kind: fleet.KindDemand, Source: "gateway-0", Queue: q, At: now,
		Due: []fleet.Due{{By: now.Add(time.Hour), Requests: 3600}}})
	waitFor(t, "the demand to raise the metric", func() bool {
		// Published until the scaler's queue is bound: a fanout exchange
		// drops what arrives before.
		_ = ch.ExchangeDeclare(exchange, amqp.ExchangeFanout, true, false, false, false, nil)
		_ = ch.Publish(exchange, "", false, false, amqp.Publishing{Body: body})
		return metric(t, s, md) > 600
	})
	if l := view.Lane(q, time.Now()); l.Workers != 0 {
		t.Fatalf("the demand was read as a worker's report: %+v", l)
	}
}
