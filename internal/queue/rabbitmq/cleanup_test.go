package rabbitmq_test

import (
	"sync"

	amqp "github.com/rabbitmq/amqp091-go"
)

var (
	declaredMu sync.Mutex
	declared   []string
)

func remember(names ...string) {
	declaredMu.Lock()
	defer declaredMu.Unlock()
	declared = append(declared, names...)
}

// cleanupQueues deletes the queues the tests declared on the shared broker.
func cleanupQueues() {
	conn, err := amqp.Dial(brokerURL())
	if err != nil {
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return
	}
	for _, q := range declared {
		_, _ = ch.QueueDelete(q, false, false, false)
	}
}
