// Command demoqueues lets scripts/demo.sh clean up after itself: it lists
// which of the named queues do not exist yet (before the demo), and deletes
// queues (after it), saying how many messages each held. The broker is
// SOUS_AMQP_URL, else amqp://guest:guest@localhost:5672/.
//
//	go run ./scripts/demoqueues missing sous.demo.requests sous.demo.requests.dlq
//	go run ./scripts/demoqueues delete sous.demo.requests sous.demo.requests.dlq
package main

import (
	"errors"
	"fmt"
	"os"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/secret"
)

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "missing" && os.Args[1] != "delete") {
		fmt.Fprintln(os.Stderr, "usage: demoqueues missing|delete QUEUE...")
		os.Exit(2)
	}
	url := os.Getenv("SOUS_AMQP_URL")
	if url == "" {
		url = "amqp://guest:guest@localhost:5672/"
	}
	conn, err := amqp.Dial(url)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demoqueues: connect to %s: %v\n", secret.URL(url), secret.Scrub(err.Error(), secret.Value(url)))
		os.Exit(1)
	}
	defer conn.Close()
	for _, q := range os.Args[2:] {
		// A passive declare of a missing queue closes its channel: one
		// channel per queue.
		ch, err := conn.Channel()
		if err != nil {
			fmt.Fprintf(os.Stderr, "demoqueues: %v\n", err)
			os.Exit(1)
		}
		switch os.Args[1] {
		case "missing":
			_, err := ch.QueueDeclarePassive(q, false, false, false, false, nil)
			var aerr *amqp.Error
			if errors.As(err, &aerr) && aerr.Code == amqp.NotFound {
				fmt.Println(q)
				continue
			}
		case "delete":
			n, err := ch.QueueDelete(q, false, false, false)
			if err != nil {
				fmt.Fprintf(os.Stderr, "demoqueues: delete %s: %v\n", q, err)
				continue
			}
			fmt.Printf("   deleted %s (%d message(s))\n", q, n)
		}
		_ = ch.Close()
	}
}
