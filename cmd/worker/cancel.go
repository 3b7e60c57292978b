package main

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/wire"
)

// canceller is what the cancellations reach of the worker.
type canceller interface{ Cancel(wire.Cancel) }

// startCancels listens on the fanout exchange wire.CancelExchange for
// producers' cancellations (the Batch API's gateway sends one when a batch
// is cancelled, and again every few seconds while it is cancelling), on a
// connection of its own, with a queue of its own that goes when it does.
// A lost connection is dialled again; what was sent meanwhile comes again
// with the producer's next repeat. RabbitMQ only.
func startCancels(ctx context.Context, cfg Config, w canceller, log *slog.Logger) (stop func()) {
	if cfg.Broker != "rabbitmq" {
		return func() {}
	}
	tlsCfg, err := cfg.amqp().TLS()
	if err != nil {
		log.Warn("cancellations off: TLS", "err", err)
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		wait := time.Second
		for ctx.Err() == nil {
			err := listenCancels(ctx, cfg, tlsCfg, w, log)
			if ctx.Err() != nil {
				return
			}
			log.Warn("cancellations: connection lost; connecting again", "err", secret.Scrub(err.Error(), cfg.AMQPURL), "retry_in", wait)
			select {
			case <-ctx.Done():
			case <-time.After(wait):
			}
			wait = min(2*wait, 30*time.Second)
		}
	}()
	return func() { cancel(); <-done }
}

func listenCancels(ctx context.Context, cfg Config, tlsCfg *tls.Config, w canceller, log *slog.Logger) error {
	conn, err := amqp.DialConfig(cfg.AMQPURL.Reveal(), amqp.Config{
		Heartbeat: cfg.AMQPHeartbeat, TLSClientConfig: tlsCfg, Dial: amqp.DefaultDial(10 * time.Second),
		Properties: amqp.Table{"connection_name": "sous-worker " + cfg.WorkerID + " cancellations"},
	})
	if err != nil {
		return err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	if err := ch.ExchangeDeclare(wire.CancelExchange, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		return err
	}
	q, err := ch.QueueDeclare("", false, true, true, false, amqp.Table{"x-max-length": int64(10000)})
	if err != nil {
		return err
	}
	if err := ch.QueueBind(q.Name, "", wire.CancelExchange, false, nil); err != nil {
		return err
	}
	ds, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case d, ok := <-ds:
			if !ok {
				return errors.New("the cancellations consumer was closed")
			}
			c, err := wire.DecodeCancel(d.Body)
			if err != nil {
				log.Warn("a cancellation was not understood; ignored", "err", err)
				continue
			}
			w.Cancel(c)
		}
	}
}
