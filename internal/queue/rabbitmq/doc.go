// Package rabbitmq is the RabbitMQ driver for sous, on
// github.com/rabbitmq/amqp091-go.
//
// It keeps one connection with two channels: a consumer channel (manual acks,
// prefetch set by SetPrefetch) and a publisher channel in confirm mode, so
// Publish returns only once the broker has taken responsibility for the
// message. When the connection drops, a supervisor goroutine reconnects with
// backoff; deliveries from the lost channel become stale (settling them
// returns queue.ErrStale) and the broker redelivers them.
//
// Dead-lettering publishes a copy of the message to the dead-letter queue with
// the reason in headers (confirmed), then acks the original. The input queue
// is also declared with the dead-letter queue as its dead-letter target and a
// delivery limit, so a message that keeps crashing workers still ends there.
//
// Concurrency: Receive and SetPrefetch must be called from one goroutine (the
// worker's receive loop). Publish, Settle, Ready and Close are safe for
// concurrent use. Every goroutine the driver starts is stopped by Close.
package rabbitmq
