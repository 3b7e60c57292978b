package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/sous-run/sous/internal/brokerconfig"
	"github.com/sous-run/sous/internal/fleet"
	"github.com/sous-run/sous/internal/scaler"
	"github.com/sous-run/sous/internal/scaler/externalscaler"
)

func TestConfig(t *testing.T) {
	c, err := loadConfig(nil)
	if err != nil || c.Addr != ":9090" || c.PriorSeconds != time.Second || c.HTTPAddr != ":8083" || c.DeadlineMargin != 30*time.Minute {
		t.Fatalf("defaults: %+v, %v", c, err)
	}
	for env, want := range map[string]string{
		"SOUS_SCALER_ADDR=9090":                  "SOUS_SCALER_ADDR",
		"SOUS_SCALER_PRIOR_SECONDS=0s":           "SOUS_SCALER_PRIOR_SECONDS",
		"SOUS_SCALER_PRIOR_SECONDS=soon":         "SOUS_SCALER_PRIOR_SECONDS",
		"SOUS_SCALER_DEADLINE_MARGIN=-1m":        "SOUS_SCALER_DEADLINE_MARGIN",
		"SOUS_SCALER_DEADLINE_MARGIN=early":      "SOUS_SCALER_DEADLINE_MARGIN",
		"SOUS_SCALER_MANAGEMENT_URL=rabbit:1567": "SOUS_SCALER_MANAGEMENT_URL",
		"SOUS_AMQP_URL=http://x":                 "SOUS_AMQP_URL",
		"SOUS_LOG_FORMAT=xml":                    "SOUS_LOG_FORMAT",
		"SOUS_BROKER=kafka":                      "SOUS_BROKER",
	} {
		_, err := loadConfig([]string{env})
		var ve *brokerconfig.VarError
		if !errors.As(err, &ve) || ve.Var != want {
			t.Errorf("%s: %v, want an error naming %s", env, err, want)
		}
	}
	// Service Bus: a connection string or a namespace.
	if _, err := loadConfig([]string{"SOUS_BROKER=servicebus"}); err == nil || !strings.Contains(err.Error(), "SOUS_SERVICEBUS_CONNECTION_STRING") {
		t.Errorf("servicebus without a connection string: %v", err)
	}
	if c, err := loadConfig([]string{"SOUS_BROKER=servicebus", "SOUS_SERVICEBUS_NAMESPACE=ns.servicebus.windows.net"}); err != nil || c.Broker != "servicebus" {
		t.Errorf("servicebus with a namespace: %v", err)
	}
}

func brokerURL() string {
	if u := os.Getenv("RABBITMQ_URL"); u != "" {
		return u
	}
	return "amqp://guest:guest@127.0.0.1:5672/"
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// The scaler end to end on the real broker, through KEDA's gRPC service:
// it reads a worker's report from sous.reports and answers seconds of
// work for the queue, active on the first request and inactive when the
// queue is empty.
func TestScalerEndToEnd(t *testing.T) {
	conn, err := amqp.Dial(brokerURL())
	if err != nil {
		t.Fatalf("RabbitMQ at %s (`rabbitmq-server -detached`): %v", brokerURL(), err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	q := fmt.Sprintf("sous-scaler-e2e-%d-%d", os.Getpid(), time.Now().UnixNano())
	if _, err := ch.QueueDeclare(q, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = ch.QueueDelete(q, false, false, false) })

	addr := freeAddr(t)
	cfg, err := loadConfig([]string{"SOUS_SCALER_ADDR=" + addr, "SOUS_HTTP_ADDR=off", "SOUS_AMQP_URL=" + brokerURL(), "SOUS_SCALER_PRIOR_SECONDS=10s"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil))) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	})
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	client := externalscaler.NewExternalScalerClient(cc)
	ref := &externalscaler.ScaledObjectRef{Name: "sous-worker", Namespace: "test", ScalerMetadata: map[string]string{"queue": q, "targetDrainSeconds": "3"}}
	call := func() (float64, bool, error) {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		m, err := client.GetMetrics(cctx, &externalscaler.GetMetricsRequest{ScaledObjectRef: ref, MetricName: scaler.MetricName})
		if err != nil {
			return 0, false, err
		}
		a, err := client.IsActive(cctx, ref)
		if err != nil {
			return 0, false, err
		}
		return m.MetricValues[0].MetricValueFloat, a.Result, nil
	}
	waitFor := func(what string, cond func(v float64, active bool) bool) {
		t.Helper()
		var v float64
		var active bool
		var err error
		deadline := time.Now().Add(30 * time.Second)
		for {
			v, active, err = call()
			if err == nil && cond(v, active) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: metric %v active %v err %v", what, v, active, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitFor("an empty queue", func(v float64, active bool) bool { return v == 0 && !active })
	spec, err := client.GetMetricSpec(context.Background(), ref)
	if err != nil || spec.MetricSpecs[0].TargetSizeFloat != 3 {
		t.Fatalf("GetMetricSpec: %+v %v", spec, err)
	}
	for i := range 12 {
		if err := ch.Publish("", q, false, false, amqp.Publishing{Body: fmt.Appendf(nil, `{"prompt":"%d"}`, i)}); err != nil {
			t.Fatal(err)
		}
	}
	// No worker has measured the queue: the prior prices it.
	waitFor("12 requests at the prior, 10 s each", func(v float64, active bool) bool { return v == 120 && active })
	// A worker's report: 4 at once, 2 s each: 0.5 s per request.
	rep, _ := json.Marshal(fleet.Report{Worker: "w-e2e", Lane: "default", Queue: q, At: time.Now(), Limit: 4, MeanServiceS: 2})
	waitFor("12 requests at the measured cost", func(v float64, active bool) bool {
		_ = ch.Publish(fleet.Exchange, "", false, false, amqp.Publishing{Body: rep})
		return v == 6 && active
	})
	if _, err := ch.QueuePurge(q, false); err != nil {
		t.Fatal(err)
	}
	waitFor("the queue drained", func(v float64, active bool) bool { return v == 0 && !active })
	_, err = client.GetMetrics(context.Background(), &externalscaler.GetMetricsRequest{ScaledObjectRef: &externalscaler.ScaledObjectRef{ScalerMetadata: map[string]string{"queue": q}}})
	if err == nil || !strings.Contains(err.Error(), "targetDrainSeconds") {
		t.Fatalf("a trigger without targetDrainSeconds: %v", err)
	}
}
