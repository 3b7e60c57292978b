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

func brokerHost() string {
	host := "127.0.0.1:5672"
	if u := os.Getenv("RABBITMQ_URL"); u != "" {
		host = strings.TrimSuffix(u[strings.LastIndex(u, "@")+1:], "/")
	}
	return host
}

// A wrong AMQP password at start is configuration: the gateway stops with
// a configError naming SOUS_AMQP_URL (exit 2) at once, with a hint, as the
// worker does, instead of retrying the 403 without listening. Needs the
// shared broker on 127.0.0.1:5672.
func TestWrongAMQPPasswordStopsTheGateway(t *testing.T) {
	t.Parallel()
	const password = "not-the-password-4711"
	cfg, err := loadConfig([]string{"SOUS_MODEL=m", "SOUS_AMQP_URL=amqp://guest:" + password + "@" + brokerHost() + "/"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, err := openBroker(ctx, cfg, nil, slog.New(slog.DiscardHandler))
	if err == nil {
		b.Close()
		t.Fatal("the gateway connected with a wrong password")
	}
	var ce *configError
	if !errors.As(err, &ce) || ce.Var != "SOUS_AMQP_URL" || ctx.Err() != nil {
		t.Fatalf("openBroker = %v, want a configError naming SOUS_AMQP_URL at once (exit 2)", err)
	}
	if strings.Contains(err.Error(), password) {
		t.Errorf("the password is in the error: %v", err)
	}
	if !strings.Contains(err.Error(), "rabbitmqctl list_permissions") {
		t.Errorf("the error gives no hint: %v", err)
	}
}
