package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/secret"
)

// These tests use the real RabbitMQ at $RABBITMQ_URL (default
// amqp://guest:guest@127.0.0.1:5672/); each declares its own queues.

var queueSeq atomic.Int64

func brokerURL() string {
	if u := os.Getenv("RABBITMQ_URL"); u != "" {
		return u
	}
	return "amqp://guest:guest@127.0.0.1:5672/"
}

// rawChannel is a plain channel beside the broker under test.
func rawChannel(t *testing.T) *amqp.Channel {
	t.Helper()
	conn, err := amqp.Dial(brokerURL())
	if err != nil {
		t.Fatalf("dial the test broker (`make rabbitmq`): %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	return ch
}

func declare(t *testing.T, ch *amqp.Channel, args amqp.Table) string {
	t.Helper()
	q := fmt.Sprintf("sous-gw-unit-%s-%d-%d", strings.ReplaceAll(t.Name(), "/", "-"), os.Getpid(), queueSeq.Add(1))
	if _, err := ch.QueueDeclare(q, false, true, false, false, args); err != nil {
		t.Fatal(err)
	}
	return q
}

func openAMQP(t *testing.T, queue string) *AMQP {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, err := OpenAMQP(ctx, AMQPConfig{URL: secret.Value(brokerURL()), Queue: queue, Channels: 2}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	return a
}

func waitReplies(t *testing.T, c Call, n int) []Reply {
	t.Helper()
	var out []Reply
	deadline := time.After(10 * time.Second)
	for len(out) < n {
		rs, err := c.Take()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, rs...)
		if len(out) >= n {
			break
		}
		select {
		case <-c.Notify():
		case <-deadline:
			t.Fatalf("%d of %d replies", len(out), n)
		}
	}
	return out
}

// playWorker plays a worker: for the next request on q, two chunks and a result
// to its reply-to address.
func playWorker(t *testing.T, ch *amqp.Channel, q string) amqp.Delivery {
	t.Helper()
	var d amqp.Delivery
	deadline := time.Now().Add(10 * time.Second)
	for {
		var ok bool
		var err error
		if d, ok, err = ch.Get(q, true); err != nil {
			t.Fatal(err)
		} else if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no request in the queue")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for i, body := range []string{`{"seq":0}`, `{"seq":1}`, `{"status":"ok"}`} {
		status := "chunk"
		if i == 2 {
			status = "ok"
		}
		if err := ch.Publish("", d.ReplyTo, false, false, amqp.Publishing{CorrelationId: d.CorrelationId, Body: []byte(body),
			Headers: amqp.Table{"x-sous-status": status}}); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

func TestAMQPRoundTrip(t *testing.T) {
	t.Parallel()
	ch := rawChannel(t)
	q := declare(t, ch, nil)
	a := openAMQP(t, q)
	ctx := context.Background()
	for i := range 3 { // more than one lane
		c, err := a.Send(ctx, Message{ID: fmt.Sprint("r", i), Body: []byte(`{"prompt":"x"}`), Headers: map[string]string{"traceparent": "00-abc-def-01"}})
		if err != nil {
			t.Fatal(err)
		}
		d := playWorker(t, ch, q)
		if d.DeliveryMode != amqp.Persistent || d.CorrelationId != fmt.Sprint("r", i) || d.MessageId != d.CorrelationId ||
			!strings.HasPrefix(d.ReplyTo, "amq.rabbitmq.reply-to") || d.Headers["traceparent"] != "00-abc-def-01" || d.Headers["timestamp_in_ms"] == nil {
			t.Fatalf("published %+v", d)
		}
		rs := waitReplies(t, c, 3)
		if !rs[0].Chunk || !rs[1].Chunk || rs[2].Chunk || string(rs[1].Body) != `{"seq":1}` {
			t.Fatalf("replies %+v", rs)
		}
		c.Close()
		c.Close() // safe twice
	}
}

func TestAMQPLateReplyDropped(t *testing.T) {
	t.Parallel()
	ch := rawChannel(t)
	q := declare(t, ch, nil)
	a := openAMQP(t, q)
	c, err := a.Send(context.Background(), Message{ID: "late", Body: []byte(`{}`)})
	if err != nil {
		t.Fatal(err)
	}
	c.Close() // the HTTP client went away
	playWorker(t, ch, q)
	waitFor(t, func() bool { return a.LateReplies() == 3 })
}

func TestAMQPRefusals(t *testing.T) {
	t.Parallel()
	ch := rawChannel(t)
	full := declare(t, ch, amqp.Table{"x-max-length": int64(1), "x-overflow": "reject-publish"})
	if err := ch.Publish("", full, false, false, amqp.Publishing{Body: []byte("filler")}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		q, err := ch.QueueDeclarePassive(full, false, true, false, false, nil)
		return err == nil && q.Messages == 1
	})
	for _, tc := range []struct {
		queue string
		want  error
	}{{full, ErrQueueFull}, {full + ".missing", ErrNoQueue}} {
		a := openAMQP(t, tc.queue)
		_, err := a.Send(context.Background(), Message{ID: "x", Body: []byte(`{}`)})
		if !errors.Is(err, tc.want) {
			t.Fatalf("%s: %v, want %v", tc.queue, err, tc.want)
		}
		// The broker is still usable after a refusal.
		if err := a.Ready(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
}

func TestAMQPSendAfterClose(t *testing.T) {
	t.Parallel()
	ch := rawChannel(t)
	a := openAMQP(t, declare(t, ch, nil))
	_ = a.Close()
	if _, err := a.Send(context.Background(), Message{ID: "x", Body: []byte(`{}`)}); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("send after close: %v", err)
	}
}

func managementURL() string {
	if u := os.Getenv("RABBITMQ_MANAGEMENT_URL"); u != "" {
		return u
	}
	return "http://guest:guest@127.0.0.1:15672"
}

// closeConnection has the broker close the connection whose client named
// itself name, through the management API (as an operator or a broker
// restart would).
func closeConnection(t *testing.T, name string) {
	t.Helper()
	// No idle connection outlives the test (goleak).
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	var target string
	deadline := time.Now().Add(20 * time.Second) // the API lists a connection after its first stats tick
	for target == "" {
		resp, err := client.Get(managementURL() + "/api/connections?columns=name,user_provided_name")
		if err != nil {
			t.Fatalf("management API (rabbitmq-plugins enable rabbitmq_management): %v", err)
		}
		var conns []struct {
			Name         string `json:"name"`
			ProvidedName string `json:"user_provided_name"`
		}
		err = json.NewDecoder(resp.Body).Decode(&conns)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range conns {
			if c.ProvidedName == name {
				target = c.Name
			}
		}
		if target == "" {
			if time.Now().After(deadline) {
				t.Fatalf("connection %q not listed by the management API", name)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	req, _ := http.NewRequest(http.MethodDelete, managementURL()+"/api/connections/"+url.PathEscape(target), nil)
	req.Header.Set("X-Reason", "test: connection lost")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		t.Fatalf("close connection: %s", resp.Status)
	}
}

// TestAMQPReconnects: a lost connection fails the calls waiting on it
// (their replies cannot reach a new channel) with ErrUnavailable, and the
// broker reconnects and serves again.
func TestAMQPReconnects(t *testing.T) {
	t.Parallel()
	ch := rawChannel(t)
	q := declare(t, ch, nil)
	name := fmt.Sprintf("sous-gw-unit-reconnect-%d-%d", os.Getpid(), queueSeq.Add(1))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, err := OpenAMQP(ctx, AMQPConfig{URL: secret.Value(brokerURL()), Queue: q, Channels: 2, ConnectionName: name,
		ReconnectMin: 50 * time.Millisecond, ReconnectMax: 200 * time.Millisecond}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	c, err := a.Send(ctx, Message{ID: "before", Body: []byte(`{}`)})
	if err != nil {
		t.Fatal(err)
	}
	closeConnection(t, name)
	select {
	case <-c.Notify():
	case <-time.After(10 * time.Second):
		t.Fatal("the waiting call was not told about the lost connection")
	}
	if _, err := c.Take(); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("waiting call: %v, want ErrUnavailable", err)
	}
	c.Close()
	waitFor(t, func() bool { return a.Ready(ctx) == nil })
	var c2 Call
	waitFor(t, func() bool {
		c2, err = a.Send(ctx, Message{ID: "after", Body: []byte(`{}`)})
		return err == nil
	})
	defer c2.Close()
	playWorker(t, ch, q) // "before" is still in the queue: persistent
	playWorker(t, ch, q)
	if rs := waitReplies(t, c2, 3); len(rs) != 3 {
		t.Fatalf("replies after the reconnect: %d", len(rs))
	}
}
