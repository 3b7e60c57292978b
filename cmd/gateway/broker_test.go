package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
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
	b, err := openBroker(ctx, cfg, nil, false, slog.New(slog.DiscardHandler))
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

// With SOUS_GATEWAY_LANES the gateway declares every lane's queue and its
// dead-letter queue (<queue>.dlq) at connect, as the worker does, so that
// requests to any lane queue up before a worker runs. Needs the shared
// broker on 127.0.0.1:5672.
func TestLanesDeclared(t *testing.T) {
	t.Parallel()
	base := fmt.Sprintf("sous-gw-cmd-lanes-%d", os.Getpid())
	queues := []string{base + ".interactive", base + ".interactive.dlq", base + ".bulk", base + ".bulk.dlq"}
	url := "amqp://guest:guest@" + brokerHost() + "/"
	t.Cleanup(func() {
		conn, err := amqp.Dial(url)
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
		for _, q := range queues {
			if _, err := ch.QueueDelete(q, false, false, false); err != nil {
				t.Errorf("delete %s: %v", q, err)
			}
		}
	})
	cfg, err := loadConfig([]string{"SOUS_MODEL=m", "SOUS_AMQP_URL=" + url,
		"SOUS_GATEWAY_LANES=interactive=" + base + ".interactive,bulk=" + base + ".bulk:share=0.2"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, err := openBroker(ctx, cfg, nil, false, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	conn, err := amqp.Dial(url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for _, q := range queues {
		ch, err := conn.Channel() // a failed passive declare closes its channel
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ch.QueueDeclarePassive(q, true, false, false, false, nil); err != nil {
			t.Errorf("%s was not declared: %v", q, err)
		}
		_ = ch.Close()
	}
}
