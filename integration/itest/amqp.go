package itest

import (
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"
)

// QueueDepth is the number of ready messages in q, read with a passive
// declare on a channel of its own.
func QueueDepth(t testing.TB, conn *amqp.Connection, q string) int {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	st, err := ch.QueueDeclarePassive(q, true, false, false, false, nil)
	if err != nil {
		t.Fatalf("inspect %s: %v", q, err)
	}
	return st.Messages
}

// Drain takes and acks what is in q now.
func Drain(t testing.TB, conn *amqp.Connection, q string) []amqp.Delivery {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	var out []amqp.Delivery
	for {
		d, ok, err := ch.Get(q, true)
		if err != nil {
			t.Fatalf("get from %s: %v", q, err)
		}
		if !ok {
			return out
		}
		out = append(out, d)
	}
}
