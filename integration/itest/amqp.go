package itest

import (
	"sync"
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

// Queues collects the names of the queues tests declare on a shared
// broker, so that TestMain can delete them after the run. Safe for
// concurrent use; the zero value is ready.
type Queues struct {
	mu    sync.Mutex
	names []string
}

// Add records names for deletion.
func (q *Queues) Add(names ...string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.names = append(q.names, names...)
}

// Delete deletes every queue added from the broker at url, best effort: a
// run's result never depends on its clean-up.
func (q *Queues) Delete(url string) {
	conn, err := amqp.Dial(url)
	if err != nil {
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, name := range q.names {
		_, _ = ch.QueueDelete(name, false, false, false)
	}
}
