package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/lanes"
	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/wire"
)

// takeRequest takes the next request from q, waiting for it.
func takeRequest(t *testing.T, ch *amqp.Channel, q string) amqp.Delivery {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		d, ok, err := ch.Get(q, true)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			return d
		}
		if time.Now().After(deadline) {
			t.Fatalf("no request in %s", q)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestAMQPLanes, on the real RabbitMQ: with Declare the gateway declares
// every lane's queue and dead-letter queue (not Queue); a request with
// X-Sous-Lane: bulk lands in the bulk queue, one without it in the first
// lane's, and each gets its answer.
func TestAMQPLanes(t *testing.T) {
	t.Parallel()
	base := fmt.Sprintf("sous-gw-unit-lanes-%d-%d", os.Getpid(), queueSeq.Add(1))
	ls := []lanes.Lane{{Name: "interactive", Queue: base + ".interactive"}, {Name: "bulk", Queue: base + ".bulk", Share: 0.2}}
	var lq []LaneQueue
	for _, l := range ls {
		lq = append(lq, LaneQueue{Queue: l.Queue, DeadLetterQueue: l.Queue + ".dlq"})
	}
	t.Cleanup(func() {
		// Durable queues: delete them, on a connection of their own.
		conn, err := amqp.Dial(brokerURL())
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		ch, err := conn.Channel()
		if err != nil {
			t.Error(err)
			return
		}
		for _, q := range lq {
			for _, name := range []string{q.Queue, q.DeadLetterQueue} {
				if _, err := ch.QueueDelete(name, false, false, false); err != nil {
					t.Errorf("delete %s: %v", name, err)
				}
			}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, err := OpenAMQP(ctx, AMQPConfig{URL: secret.Value(brokerURL()), Queue: base + ".unused", Channels: 2,
		Declare: true, DeliveryLimit: 5, Lanes: lq}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })

	ch := rawChannel(t)
	for _, q := range lq {
		for _, name := range []string{q.Queue, q.DeadLetterQueue} {
			if _, err := ch.QueueDeclarePassive(name, true, false, false, false, nil); err != nil {
				t.Fatalf("%s was not declared: %v", name, err)
			}
		}
	}
	// A failed passive declare closes its channel: use one of its own.
	if _, err := rawChannel(t).QueueDeclarePassive(base+".unused", true, false, false, false, nil); err == nil {
		t.Errorf("Queue was declared although there are lanes")
	}

	srv := httptest.NewServer(New(Config{Queue: base + ".unused", Lanes: ls, Model: "tiny", Timeout: 30 * time.Second}, a, slog.New(slog.DiscardHandler)))
	t.Cleanup(srv.Close)
	for _, tc := range []struct {
		header string
		queue  string
		other  string
	}{{"bulk", ls[1].Queue, ls[0].Queue}, {"", ls[0].Queue, ls[1].Queue}} {
		prompt := "to the " + tc.queue
		type answer struct {
			status int
			body   string
		}
		done := make(chan answer, 1)
		go func() {
			req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v1/completions", strings.NewReader(`{"prompt":"`+prompt+`"}`))
			req.Header.Set("Content-Type", "application/json")
			if tc.header != "" {
				req.Header.Set(LaneHeader, tc.header)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				done <- answer{0, err.Error()}
				return
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			done <- answer{resp.StatusCode, string(b)}
		}()
		d := takeRequest(t, ch, tc.queue)
		var r wire.Request
		if err := json.Unmarshal(d.Body, &r); err != nil || r.Prompt == nil || *r.Prompt != prompt {
			t.Fatalf("header %q: took %s from %s, want the prompt %q (%v)", tc.header, d.Body, tc.queue, prompt, err)
		}
		if q, err := ch.QueueDeclarePassive(tc.other, true, false, false, false, nil); err != nil || q.Messages != 0 {
			t.Fatalf("header %q: the other lane's queue %s holds %d messages (%v)", tc.header, tc.other, q.Messages, err)
		}
		text := "done"
		res, _ := json.Marshal(wire.Result{ID: r.ID, Status: wire.StatusOK, Model: "tiny", Response: &text})
		if err := ch.Publish("", d.ReplyTo, false, false, amqp.Publishing{CorrelationId: d.CorrelationId, Body: res,
			Headers: amqp.Table{"x-sous-status": "ok"}}); err != nil {
			t.Fatal(err)
		}
		select {
		case got := <-done:
			if got.status != 200 || !strings.Contains(got.body, `"done"`) {
				t.Fatalf("header %q: %d %s", tc.header, got.status, got.body)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("header %q: no answer", tc.header)
		}
	}
	// A lane queue that does not exist is ErrNoQueue, naming it (mandatory).
	missing := base + ".missing"
	if _, err := a.Send(context.Background(), Message{ID: "m", Queue: missing, Body: []byte(`{}`)}); !errors.Is(err, ErrNoQueue) || !strings.Contains(err.Error(), missing) {
		t.Fatalf("send to a missing lane queue: %v, want ErrNoQueue naming it", err)
	}
}
