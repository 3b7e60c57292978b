package reliability

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/gateway"
	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/wire"
)

// TestGatewayBrokerAlarm (item 8 of the gateway hardening issue): while a
// private node's memory alarm blocks publishing, the gateway is not ready
// and answers every request with a 503 and Retry-After at once, instead of
// holding it past SOUS_GATEWAY_TIMEOUT; when the alarm clears it is ready
// and answers again. The shared broker is never alarmed.
func TestGatewayBrokerAlarm(t *testing.T) {
	t.Parallel()
	node := startNode(t, nodeOptions{})
	q := names(t)
	conn, err := amqp.Dial(node.URL())
	must(t, err)
	defer conn.Close()
	ch, err := conn.Channel()
	must(t, err)
	_, err = ch.QueueDeclare(q, true, false, false, false, nil)
	must(t, err)
	// A worker that answers every request at once, on its own connection
	// (consuming only: an alarm does not block it).
	deliveries, err := ch.Consume(q, "", true, false, false, false, nil)
	must(t, err)
	go func() {
		for d := range deliveries {
			text := "ok"
			body, _ := json.Marshal(wire.Result{ID: d.MessageId, Status: wire.StatusOK, Model: "tiny", Response: &text})
			_ = ch.Publish("", d.ReplyTo, false, false, amqp.Publishing{CorrelationId: d.CorrelationId, ContentType: "application/json", Body: body})
		}
	}()

	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	b, err := gateway.OpenAMQP(ctx, gateway.AMQPConfig{URL: secret.Value(node.URL()), Queue: q, Channels: 4, ConnectionName: "sous-gateway-alarm-test"}, log)
	must(t, err)
	defer b.Close()
	const timeout = 60 * time.Second
	srv := httptest.NewServer(gateway.New(gateway.Config{Queue: q, Model: "tiny", Timeout: timeout, RetryAfter: 5 * time.Second,
		MaxPromptBytes: 1 << 16, MaxNumPredict: 64}, b, log))
	defer srv.Close()
	client := &http.Client{Timeout: timeout + 30*time.Second}
	ask := func() (int, string, time.Duration) {
		start := time.Now()
		resp, err := client.Post(srv.URL+"/v1/completions", "application/json", strings.NewReader(`{"prompt":"hi"}`))
		if err != nil {
			t.Logf("no answer after %s: %v", time.Since(start).Round(time.Second), err)
			return 0, "", time.Since(start)
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, resp.Header.Get("Retry-After"), time.Since(start)
	}
	// Publishing first: RabbitMQ tells publishing connections of an alarm.
	if status, _, _ := ask(); status != 200 {
		t.Fatalf("before the alarm: %d", status)
	}
	if err := b.Ready(ctx); err != nil {
		t.Fatalf("not ready before the alarm: %v", err)
	}

	_, err = node.ctl(ctx, "set_vm_memory_high_watermark", "0.000001")
	must(t, err)
	raised := time.Now()
	cleared := false
	defer func() {
		if !cleared {
			_, _ = node.ctl(context.Background(), "set_vm_memory_high_watermark", "0.4")
		}
	}()
	waitUntil(t, 30*time.Second, "the node's memory alarm", func() bool {
		out, err := node.ctl(ctx, "eval", "rabbit_alarm:get_alarms().")
		return err == nil && strings.Contains(out, "memory")
	})
	figure(t, "alarm_in_effect_after_s", time.Since(raised).Seconds())
	// 40 requests at once, as in the issue: each a 503 with Retry-After,
	// well before SOUS_GATEWAY_TIMEOUT.
	type result struct {
		status     int
		retryAfter string
		took       time.Duration
	}
	results := make(chan result, 40)
	for range 40 {
		go func() {
			s, ra, took := ask()
			results <- result{s, ra, took}
		}()
	}
	var slowest time.Duration
	for range 40 {
		r := <-results
		if r.status != 503 || r.retryAfter == "" {
			t.Errorf("during the alarm: %d, Retry-After %q; want 503 with Retry-After", r.status, r.retryAfter)
		}
		slowest = max(slowest, r.took)
	}
	figure(t, "alarm_503_slowest_of_40_s", slowest.Seconds())
	if slowest > timeout/2 {
		t.Errorf("a request took %s to be refused during the alarm, with a %s request timeout", slowest, timeout)
	}
	// RabbitMQ tells a connection it is blocked when it next publishes
	// (the first of the 40): from then on the gateway is not ready.
	if err := b.Ready(ctx); !errors.Is(err, gateway.ErrBlocked) {
		t.Errorf("ready during the alarm: %v", err)
	}
	if status, ra, took := ask(); status != 503 || ra != "5" {
		t.Errorf("a request during the alarm: %d, Retry-After %q (after %s); want 503, 5", status, ra, took)
	}

	_, err = node.ctl(ctx, "set_vm_memory_high_watermark", "0.4")
	must(t, err)
	cleared = true
	clearedAt := time.Now()
	waitUntil(t, 60*time.Second, "the gateway to be ready again", func() bool { return b.Ready(ctx) == nil })
	figure(t, "gateway_ready_after_clear_s", time.Since(clearedAt).Seconds())
	if status, _, _ := ask(); status != 200 {
		t.Fatalf("after the alarm: %d", status)
	}
}
