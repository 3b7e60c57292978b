package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"
)

// A wrong AMQP password at start is configuration: the worker stops with a
// configError naming SOUS_AMQP_URL (exit 2) at once, instead of retrying
// the 403 every few seconds. Needs the shared broker on 127.0.0.1:5672.
func TestWrongAMQPPasswordStopsTheWorker(t *testing.T) {
	t.Parallel()
	const password = "not-the-password-4711"
	host := "127.0.0.1:5672"
	if u := os.Getenv("RABBITMQ_URL"); u != "" {
		host = u[strings.LastIndex(u, "@")+1:]
		host = strings.TrimSuffix(host, "/")
	}
	cfg, err := loadConfig([]string{"SOUS_MODEL=m", "SOUS_AMQP_URL=amqp://guest:" + password + "@" + host + "/", "SOUS_QUEUE=sous-test-wrong-password"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	began := time.Now()
	_, closeBroker, err := openLanes(ctx, cfg, 1, nil, slog.New(slog.DiscardHandler))
	if err == nil {
		closeBroker()
		t.Fatal("the worker connected with a wrong password")
	}
	var ce *configError
	if !errors.As(err, &ce) || ce.Var != "SOUS_AMQP_URL" || ctx.Err() != nil {
		t.Fatalf("openLanes = %v after %v, want a configError naming SOUS_AMQP_URL at once (exit 2)", err, time.Since(began).Round(time.Millisecond))
	}
	if strings.Contains(err.Error(), password) {
		t.Errorf("the password is in the error: %v", err)
	}
	if strings.Contains(strings.ToLower(err.Error()), "rabbitmq-server") || strings.Contains(err.Error(), "is it running") {
		t.Errorf("the error suggests starting RabbitMQ: %v", err)
	}
	t.Logf("%v", err)
}
