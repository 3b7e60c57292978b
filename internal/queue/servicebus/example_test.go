package servicebus_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/queue/servicebus"
	"github.com/sous-run/sous/internal/secret"
)

// A worker loop on Service Bus: receive, publish the result to the reply
// queue, then settle; stop receiving on SIGTERM and close.
func Example() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))

	d, err := servicebus.New(ctx, servicebus.Config{
		ConnectionString: secret.Value(os.Getenv("SOUS_SERVICEBUS_CONNECTION_STRING")),
		Queue:            "sous.requests",
	}, log)
	if err != nil {
		log.Error("servicebus", "err", err)
		return
	}
	defer d.Close(context.WithoutCancel(ctx))

	for {
		batch, err := d.Receive(ctx, 8)
		if err != nil {
			_ = d.StopReceiving(context.WithoutCancel(ctx))
			return
		}
		for _, del := range batch {
			to := del.ReplyTo
			if to == "" {
				to = "sous.results"
			}
			settlement := queue.Settlement{Action: queue.Ack}
			if err := d.Publish(ctx, queue.Message{
				To: to, CorrelationID: del.CorrelationKey(), SessionID: del.ReplyToSessionID,
				ContentType: "application/json", Body: []byte(`{"status":"ok"}`),
			}); err != nil {
				settlement = queue.Settlement{Action: queue.Requeue, Reason: "publish_failed"}
			}
			if err := d.Settle(context.WithoutCancel(ctx), del, settlement); errors.Is(err, queue.ErrStale) {
				log.Warn("lock lost, Service Bus redelivers", "message_id", del.ID)
			}
		}
	}
}
